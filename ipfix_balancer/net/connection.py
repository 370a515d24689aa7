"""An open socket of one output (IPFIXcol2's forwarder ``Connection``): a TCP connection or a connected UDP
socket to one subreceiver, from its creation by a ``net.connector.Connector`` to its close.

It drives a ``core.sendqueue.SendQueue``: TCP ``stream.next_iovec`` -> ``sendmsg`` -> ``stream.written``;
UDP ``datagrams.send`` (``send_batch`` with ``sendmmsg``). It decides nothing about failures: it reports
them to its connector (``Connector.fail``), and a write error found inside a flush (which core calls from
inside ``enqueue`` and a dispatcher's choice) is reported after the loop turn, never re-entrantly.

A TCP output reads the socket's unsent+unacknowledged byte count (``SIOCOUTQ``) once per flush, before
writing, and, until the collector has shown it reads, the window it advertises (``TCP_INFO``); the
lifecycle judges both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios

from ..core.entry import MSG
from ..core.lifecycle import Action, State
from ..core.sendqueue import PROBATION, UP
from .loop import READ, WRITE, cancel

UDP_CONFIRM = 0.5     # seconds after a datagram before a returning UDP output's refusal check
SEND_BATCH = 64       # datagrams per sendmmsg
_INT = struct.Struct("i")
_TCP_INFO_LEN = 232   # struct tcp_info up to tcpi_snd_wnd (Linux 5.19 and later)
_SND_WND = struct.Struct("I")  # tcpi_snd_wnd: the peer's advertised receive window, at offset 228


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, unsent or unacknowledged (SIOCOUTQ); still valid after a reset."""
    return _INT.unpack(fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def peer_window(sock: socket.socket) -> int | None:
    """The receive window the peer advertises (``tcpi_snd_wnd``); None where the kernel does not say."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return _SND_WND.unpack_from(info, 228)[0] if len(info) >= _TCP_INFO_LEN else None


class Connection:
    """``send``: a stream's ``sendmsg`` (an iovec) or a datagram's send (one buffer); ``send_many``: UDP
    ``sendmmsg`` where available."""

    def __init__(self, owner, sock: socket.socket, send, send_many=None):
        self.owner = owner  # the Connector: the clock, the failure funnel, what is logged
        self.loop = owner.loop
        self.queue = owner.queue
        self.tcp = owner.tcp
        self.sock: socket.socket | None = sock
        self.send = send
        self.send_many = send_many
        self.failed: OSError | None = None  # a write failed: reported after the loop turn
        self.check_timer = None             # UDP refusal check

    # -- sending -------------------------------------------------------------------------------
    def flush(self) -> None:
        queue = self.queue
        state = queue.state
        if (state is not UP and state is not PROBATION) or self.sock is None or self.failed is not None:
            return
        try:
            if self.tcp:
                self._flush_stream()
            else:
                self._flush_datagrams()
        except OSError as exc:
            self.failed = exc
            self.loop.after_turn(id(self), self._report_failed)
            return
        if queue.closing:
            queue.check_settled()

    def _report_failed(self) -> None:
        exc, self.failed = self.failed, None
        if exc is not None and self.sock is not None:
            self.owner.fail(exc)

    def _flush_stream(self) -> None:
        acks = self.queue.acks
        if acks.sent_total != acks.acked:
            # Before writing: what the collector acknowledged since the last flush is let go now, so the
            # chunks it held are free for the reads to come.
            self.observe(self.owner.clock())
            if self.sock is None:
                return
        if self._write():
            self.loop.watch(self.sock, READ, self.on_event)  # all sent: watch for the collector closing
        self.owner.bytes_wait()

    def _write(self) -> bool:
        """Write what the queue commits until it is empty (True) or the kernel is full (False: the write
        resumes on the next WRITE event)."""
        sock, send, take, written = self.sock, self.send, self.queue.stream.next_iovec, self.queue.stream.written
        while bufs := take():
            try:
                sent = send(bufs)
            except BlockingIOError:
                sent = 0
            if not written(sent):
                self.loop.watch(sock, READ | WRITE, self.on_event)
                return False
        return True

    def _flush_datagrams(self) -> None:
        """One datagram per message. A message leaves the queue only once the kernel took it, so a send
        refused by the peer (ICMP port unreachable) leaves it queued for re-dispatch. A returning output
        sends one datagram until its refusal check: a collector still down costs that one (counted), not a
        burst nobody could count."""
        queue = self.queue
        while True:
            try:
                if queue.state is UP:
                    sent_all = (queue.datagrams.send(self.send) if self.send_many is None
                                else queue.datagrams.send_batch(self.send_many, SEND_BATCH))
                else:
                    sent_all = queue.acks.sent_total > 0 or queue.datagrams.send(self.send, 1)
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                self.owner.oversize(len(queue.pending[0][MSG]))
                continue
            break
        if sent_all:
            self.loop.unwatch(self.sock)
        else:
            self.loop.watch(self.sock, WRITE, self.on_event)

    # -- what the collector shows --------------------------------------------------------------
    def on_event(self, mask: int) -> None:
        if self.sock is None:  # closed since the event was reported
            return
        owner = self.owner
        if mask & READ:
            # Collectors never send IPFIX back: readable means closed (or junk we discard).
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as exc:
                owner.fail(exc)
                return
            if data == b"":
                owner.fail(ConnectionResetError("closed by subreceiver"), clean=True)
                return
        if mask & WRITE:
            if self.queue.state is State.STALLED:  # room in the send buffer: the collector took data
                self.observe(owner.clock())
                if owner.closed or self.sock is None:
                    return
                if self.queue.state is PROBATION:
                    owner.taking_again()
            owner.flush()

    def _acknowledged(self) -> int:
        """Tell the queue how far the collector's TCP acknowledged; returns that offset."""
        queue = self.queue
        acked = queue.acks.sent_total - unsent_bytes(self.sock)
        if acked > queue.acks.acked:
            queue.acknowledged(acked)
        return acked

    def observe(self, now: float) -> None:
        """Tell the queue and the lifecycle how far the collector's TCP acknowledged, and (until it is
        proven) the window it advertises; release what it has shown it read."""
        queue, life = self.queue, self.queue.life
        acked = self._acknowledged()
        action = life.observe(now, acked) if life.proven else life.observe(now, acked, peer_window(self.sock))
        if action is Action.PROVEN:
            self.owner.healthy(reason="takes data again")
        elif action is Action.READ:
            queue.read_all()
            if queue.stats.last_error:
                self.owner.healthy(reason="takes data again")
        if queue.closing:
            queue.check_settled()

    def last_word(self, now: float) -> None:
        """The connection failed: what its TCP acknowledged, and the window it last advertised (both valid
        after a reset)."""
        self.queue.life.observe(now, self._acknowledged(), peer_window(self.sock))

    def confirm_later(self) -> None:
        self.check_timer = self.loop.call_later(UDP_CONFIRM, self._confirm_udp)

    def _confirm_udp(self) -> None:
        """A UDP output on probation: a refusal of what went out shows as the socket's error by now."""
        self.check_timer = None
        queue = self.queue
        if self.sock is None or queue.state is not PROBATION:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.owner.fail(OSError(err, os.strerror(err)))
        elif not queue.acks.sent_total:  # nothing went out yet: nothing to judge by
            self.confirm_later()
        else:
            queue.life.confirmed()
            self.owner.healthy()
            self.owner.flush()

    # -- closing -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Close with RST: the kernel discards what it still holds for the collector."""
        if self.sock is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def release(self) -> None:
        cancel(self.check_timer)
        self.check_timer = None
        if self.sock is not None:
            self.loop.close_socket(self.sock)
            self.sock = None
            self.send_many = None
