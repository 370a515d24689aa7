"""The connection of one output: a TCP connection or a connected UDP socket to one subreceiver.

It owns the socket, the connect/backoff cycle and the refresh and close timers, and drives a
``core.sendqueue.SendQueue``: TCP ``next_iovec`` -> ``sendmsg`` -> ``written``; UDP ``send_datagrams(send)``;
any error -> ``connection_lost``.
Every failure goes through ``_fail``, once per state change in the log.

A TCP output reads the socket's unsent+unacknowledged byte count (``SIOCOUTQ``) once per flush, before
writing, and tells the queue how far the collector acknowledged; while bytes wait, a timer checks that the
acknowledged offset advances, and marks the output stalled when it has not for the queue's ``stall``
seconds. A UDP output that failed comes back tentatively: it sends one datagram, and is up again (its
backoff reset, the rest of its queue sent) only when a check of the socket's error finds no refusal of it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time

from ..core.sendqueue import MSG, OVERSIZE, UP, SendQueue, State
from ..logs import Throttle
from . import mmsg
from .loop import READ, WRITE, Loop

SNDBUF = 4 * 1024 * 1024
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0
STALL_BACKOFF_CAP = 60.0  # a collector that stalled again: each retry costs what its kernel takes unread
CLOSE_TIMEOUT = 30.0  # after its exporter left, how long an output may keep trying to deliver its queue
PROGRESS_CHECK = 0.5  # seconds between checks of a TCP output's acknowledged offset while bytes wait
UDP_CONFIRM = 0.5     # seconds after a datagram before a returning UDP output's refusal check
SEND_BATCH = 64       # datagrams per sendmmsg
_INT = struct.Struct("i")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_HEADERS = _IPV4.size + _UDP.size


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, unsent or unacknowledged (SIOCOUTQ); still valid after a reset."""
    return _INT.unpack(fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class OutputConnection:
    """Implements ``core.sendqueue.Transport`` for one queue."""

    def __init__(self, loop: Loop, queue: SendQueue, log, throttle: Throttle, source: tuple | None = None):
        self.loop = loop
        self.queue = queue
        self.log = log
        self.throttle = throttle  # up/down lines: shared by every output to a subreceiver, which may flap
        self.source = source  # (IPv4 address, port) UDP datagrams claim to come from (BALANCER_SUB_SOURCE)
        self.sock: socket.socket | None = None
        self._send = None  # sendmsg of the socket, or of the raw socket with our headers
        self._send_many = None  # UDP with mmsg: sendmmsg of the socket (or of the raw socket, our headers)
        self.closed = False
        self._backoff = BACKOFF_FIRST
        self._timer = None          # reconnect, or the close deadline
        self._refresh_timer = None  # UDP template refresh
        self._check_timer = None    # TCP progress check, or UDP refusal check
        self._progress = 0.0        # monotonic time the acknowledged offset last advanced
        self._up_at = 0.0           # monotonic time the connection came up
        self._stalled_before = False  # RoundRobin reset this collector's connection for a stall
        self._oversize_logged = False
        self._tcp = queue.subreceiver.proto == "tcp"
        queue.track_acks = self._tcp
        queue.transport = self
        self._connect()

    # -- Transport -----------------------------------------------------------------------------
    def wake(self) -> None:
        self.loop.after_turn(id(self), self.flush)

    def close_when_drained(self) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(CLOSE_TIMEOUT, self._give_up)
        if self.queue.state is UP:
            self.flush()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
        if abort:  # the kernel must not deliver what was counted as lost
            self._reset()
        self._release()

    # -- connecting ----------------------------------------------------------------------------
    def _connect(self) -> None:
        self._timer = None
        sub = self.queue.subreceiver
        try:
            if self.source is not None:  # we write the IP and UDP headers ourselves
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            else:
                sock = socket.socket(sub.family, socket.SOCK_STREAM if self._tcp else socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE at the descriptor limit: an outage like any other (backoff, retry)
            self._fail(exc)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        self.sock = sock
        self._send = sock.sendmsg if self._tcp else sock.send  # a stream's iovec, a datagram's one buffer
        if not self._tcp:
            try:
                if self.source is not None:
                    self._send = self._raw_sender(sock, sub)
                else:
                    sock.connect((sub.host, sub.port))  # no handshake: fixes the peer and our source port
                    if mmsg.AVAILABLE:
                        self._send_many = mmsg.Sender(sock, SEND_BATCH).send
            except OSError as exc:
                self._fail(exc)
                return
            self._up()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((sub.host, sub.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(OSError(err, os.strerror(err)))
            return
        self.queue.state = State.CONNECTING
        self.loop.watch(sock, WRITE, self._on_connect)

    def _on_connect(self, _mask) -> None:
        if self.sock is None:  # closed since the event was reported (the loop skips such events too)
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        self._up()

    def _up(self) -> None:
        # A UDP socket connects whatever the peer does, and a hung collector's kernel accepts connections:
        # after such a failure the output must show it works first.
        tentative = self._stalled_before or (not self._tcp and bool(self.queue.stats.last_error))
        self._up_at = time.monotonic()
        if self.queue.connection_up(int(time.time()), tentative):
            sub = str(self.queue.subreceiver)
            self.throttle.info("subreceiver_up", sub, subreceiver=sub)
        if not tentative:
            self._backoff = BACKOFF_FIRST
        elif not self._tcp:  # (TCP: the progress checks confirm it)
            self._check_timer = self.loop.call_later(UDP_CONFIRM, self._confirm_udp)
        if self._tcp:
            self.loop.watch(self.sock, READ, self._on_event)
        elif self.queue.refresh and self._refresh_timer is None:
            self._refresh_timer = self.loop.call_later(self.queue.refresh, self._refresh_tick)
        self.flush()

    def _refresh_tick(self) -> None:
        self.queue.refresh_templates(int(time.time()))
        self._refresh_timer = self.loop.call_later(self.queue.refresh, self._refresh_tick)

    def _raw_sender(self, sock: socket.socket, sub):
        """send for a raw socket: IPv4 and UDP headers with the exporter's address and port. The kernel
        fills the IP length, id and checksum; UDP checksum 0 means none (RFC 768). A datagram beyond the
        path MTU fails with EMSGSIZE (no fragmentation with our own headers): counted as oversize."""
        ip = _IPV4.pack(0x45, 0, 0, 0, 0, 64, socket.IPPROTO_UDP, 0, socket.inet_aton(self.source[0]),
                        socket.inet_aton(sub.host))
        sport, dport, dest = self.source[1], sub.port, (sub.host, 0)
        sendmsg, pack = sock.sendmsg, _UDP.pack
        if mmsg.AVAILABLE:
            self._send_many = mmsg.Sender(sock, SEND_BATCH, (ip, sport, dport, dest)).send

        def send(data) -> int:
            return sendmsg([ip, pack(sport, dport, _UDP.size + len(data), 0), data], (), 0, dest) - _HEADERS
        return send

    def _confirm_udp(self) -> None:
        """A returning UDP output: a refusal of what went out shows as the socket's error by now."""
        self._check_timer = None
        queue = self.queue
        if self.sock is None or queue.state is not UP:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
        elif not queue.sent_total:  # nothing went out yet: nothing to judge by
            self._check_timer = self.loop.call_later(UDP_CONFIRM, self._confirm_udp)
        else:
            self._backoff = BACKOFF_FIRST
            if queue.confirm():
                sub = str(queue.subreceiver)
                self.throttle.info("subreceiver_up", sub, subreceiver=sub)
            self.flush()

    def _fail(self, exc: BaseException, stalled: bool = False) -> None:
        """The connection is gone: the queue takes back what may not have arrived, and we retry with
        backoff. ``stalled``: we give it up ourselves (logged as the stall), with a reset, so that the
        kernel does not deliver what goes elsewhere; it shows as stalled until the retry."""
        queue = self.queue
        if self._tcp and self.sock is not None:
            self._acknowledge()  # the last word on what the collector's TCP received (valid after a reset)
        elif isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            queue.refused()
        if stalled:
            self._reset()
            self._backoff = max(self._backoff, queue.stall)
        self._release()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        resent, news = queue.connection_lost(reason)
        if stalled:
            queue.state = State.STALLED
            if queue.closing and queue.on_down is not None:  # its exporter left: now or never (counted)
                queue.on_down(queue)
                queue.close()
                return
        elif news:  # once per state change, not per retry; and at most once a minute (sessions share a subreceiver)
            sub = str(queue.subreceiver)
            self.throttle.warning("subreceiver_down", sub, subreceiver=sub, reason=reason, resent=resent,
                                  queued=len(queue.pending), retry_in=self._backoff)
        if queue.closing and not queue.pending:
            queue.close()
            return
        self._cancel_timer()
        self._timer = self.loop.call_later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, STALL_BACKOFF_CAP if self._stalled_before else BACKOFF_CAP)
        if queue.on_down is not None:
            queue.on_down(queue)

    def _give_up(self) -> None:
        """The close deadline passed with messages still queued: they are lost, counted and logged."""
        self._timer = None
        unsent = self.queue.close()
        if unsent:  # per output, so per exporter session: throttled (status counts every drop)
            sub = str(self.queue.subreceiver)
            self.throttle.error("subreceiver_closed_with_loss", sub, subreceiver=sub, unsent_messages=unsent)

    def _reset(self) -> None:
        """Close with RST: the kernel discards what it still holds for the collector."""
        if self.sock is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _release(self) -> None:
        if self._check_timer is not None:
            self._check_timer.cancel()
            self._check_timer = None
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
            self._send_many = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_event(self, mask: int) -> None:
        if self.sock is None:  # closed since the event was reported
            return
        if mask & READ:
            # Collectors never send IPFIX back: readable means closed (or junk we discard).
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as exc:
                self._fail(exc)
                return
            if data == b"":
                self._fail(ConnectionResetError("closed by subreceiver"))
                return
        if mask & WRITE:
            if self.queue.state is State.STALLED:  # room in the send buffer: the collector took data
                self._acknowledge()
                self._resume()
            self.flush()

    # -- sending -------------------------------------------------------------------------------
    def flush(self) -> None:
        queue = self.queue
        queue.armed = False
        if queue.state is not UP or self.sock is None:
            return
        try:
            if self._tcp:
                self._flush_stream()
            else:
                self._flush_datagrams()
        except OSError as exc:
            self._fail(exc)
            return
        if queue.closing and queue.idle:
            queue.close()

    def _flush_stream(self) -> None:
        queue = self.queue
        if queue.sent_total != queue.acked:
            # Before writing: what the collector acknowledged since the last flush is let go now, so the
            # chunks it held are free for the reads to come.
            self._acknowledge()
        if self._write():
            self.loop.watch(self.sock, READ, self._on_event)  # all sent: watch for the collector closing
        if queue.sent_total != queue.acked and self._check_timer is None:  # bytes may wait: watch progress
            self._progress = time.monotonic()
            self._check_timer = self.loop.call_later(PROGRESS_CHECK, self._check_progress)

    def _acknowledge(self) -> int:
        """Tell the queue how far the collector's TCP acknowledged; returns the bytes still unacknowledged.
        The offset advanced means the collector takes data: a stall timer restarts from now."""
        queue = self.queue
        waiting = unsent_bytes(self.sock)
        acked = queue.sent_total - waiting
        if acked > queue.acked:
            self._progress = time.monotonic()
            queue.acknowledged(acked)
        return waiting

    def _check_progress(self) -> None:
        """While bytes wait: no progress for ``stall`` seconds makes the output stalled; progress on a
        stalled output makes it up again."""
        self._check_timer = None
        queue = self.queue
        if self.sock is None or queue.state not in (UP, State.STALLED):
            return
        before = self._progress
        waiting = self._acknowledge()
        if queue.state is State.STALLED:
            if self._progress != before or not waiting:
                self._resume()
                self.flush()
            elif queue.move_stalled and time.monotonic() - self._progress >= 2 * queue.stall:
                # Still stalled: RoundRobin gives the connection up (reset, so the kernel delivers none of
                # it) and moves everything not acknowledged to the live subreceivers. What the collector's
                # kernel acknowledged and its process did not read is lost with it.
                self._stalled_before = True
                self._fail(ConnectionAbortedError(queue.stats.last_error), stalled=True)
                return
        elif queue.stall and waiting and time.monotonic() - self._progress >= queue.stall:
            self._stall(waiting)
        elif queue.tentative and time.monotonic() - self._up_at >= queue.stall:
            self._resume()  # connected this long without a stall: it reads again
        if waiting or queue.state is State.STALLED:
            self._check_timer = self.loop.call_later(PROGRESS_CHECK, self._check_progress)

    def _stall(self, waiting: int) -> None:
        """The connection stays, in case the collector reads again soon: RoundRobin moves its queue to the
        live subreceivers at once (and, after another ``stall`` seconds, what it had not acknowledged);
        All keeps its bounded queue."""
        queue = self.queue
        if queue.stalled(f"stalled: nothing acknowledged for {queue.stall:g} s"):
            sub = str(queue.subreceiver)
            self.throttle.warning("subreceiver_stalled", sub, subreceiver=sub, unacked_bytes=waiting,
                                  queued=len(queue.pending), stall_seconds=queue.stall,
                                  action="moved to the live subreceivers" if queue.move_stalled else "kept, bounded")
        if queue.on_down is not None:
            queue.on_down(queue)

    def _resume(self) -> None:
        self._backoff = BACKOFF_FIRST
        self._stalled_before = False
        if self.queue.confirm():
            sub = str(self.queue.subreceiver)
            self.throttle.info("subreceiver_up", sub, subreceiver=sub, reason="takes data again")

    def _flush_datagrams(self) -> None:
        """One datagram per message. A message leaves the queue only once the kernel took it, so a send
        refused by the peer (ICMP port unreachable) leaves it queued for re-dispatch. A returning output
        sends one datagram until its refusal check: a collector still down costs that one (counted), not a
        burst nobody could count."""
        queue = self.queue
        while True:
            try:
                if not queue.tentative:
                    sent_all = (queue.send_datagrams(self._send) if self._send_many is None
                                else queue.send_datagram_batch(self._send_many, SEND_BATCH))
                else:
                    sent_all = queue.sent_total > 0 or queue.send_datagrams(self._send, 1)
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                self._oversize(len(queue.pending[0][MSG]))
                continue
            break
        if sent_all:
            self.loop.unwatch(self.sock)
        else:
            self.loop.watch(self.sock, WRITE, self._on_event)

    def _write(self) -> bool:
        """Write what the queue commits until it is empty (True) or the kernel is full (False: the write
        resumes on the next WRITE event)."""
        sock, send, take, written = self.sock, self._send, self.queue.next_iovec, self.queue.written
        while bufs := take():
            try:
                sent = send(bufs)
            except BlockingIOError:
                sent = 0
            if not written(sent):
                self.loop.watch(sock, READ | WRITE, self._on_event)
                return False
        return True

    def _oversize(self, size: int) -> None:
        """A message no UDP datagram can carry (TCP in, UDP out): dropped and counted, never retried."""
        queue = self.queue
        queue.drop_first(OVERSIZE)
        if not self._oversize_logged:  # once per output session
            self._oversize_logged = True
            self.log.error("message_oversize", subreceiver=str(queue.subreceiver), size=size,
                           action="dropped for this UDP subreceiver; exporters must keep messages under "
                                  "65,507 bytes")
