"""The connection of one output: a TCP connection or a connected UDP socket to one subreceiver.

It owns the socket and the timers, and executes what the output's lifecycle (``core.lifecycle``, reached as
``queue.life``) decides: it reports events with the time (connected, lost, what the collector's TCP
acknowledged and the window it advertises) and carries out the actions (connect, declare a stall, reset,
close at the drain deadline). It drives a ``core.sendqueue.SendQueue``: TCP ``next_iovec`` -> ``sendmsg`` ->
``written``; UDP ``send_datagrams(send)``; any error -> ``connection_lost``. Every failure goes through
``_fail``, once per state change in the log.

A TCP output reads the socket's unsent+unacknowledged byte count (``SIOCOUTQ``) once per flush, before
writing, and, until the collector has shown it reads, the window it advertises (``TCP_INFO``); while bytes
wait it polls them every ``PROGRESS_CHECK`` seconds and lets the lifecycle judge. A UDP output that failed
comes back on probation: it sends one datagram, and is up again only when a check of the socket's error finds
no refusal of it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time

from ..core.lifecycle import Action, State
from ..core.sendqueue import DRAIN_DEADLINE, MSG, OVERSIZE, PROBATION, UP, SendQueue
from ..logs import Throttle
from . import mmsg
from .loop import READ, WRITE, Loop

SNDBUF = 4 * 1024 * 1024
PROGRESS_CHECK = 0.5  # seconds between polls of a TCP output's acknowledged offset while bytes wait
UDP_CONFIRM = 0.5     # seconds after a datagram before a returning UDP output's refusal check
SEND_BATCH = 64       # datagrams per sendmmsg
_INT = struct.Struct("i")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_HEADERS = _IPV4.size + _UDP.size
_TCP_INFO_LEN = 232   # struct tcp_info up to tcpi_snd_wnd (Linux 5.19 and later)
_SND_WND = struct.Struct("I")  # tcpi_snd_wnd: the peer's advertised receive window, at offset 228


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, unsent or unacknowledged (SIOCOUTQ); still valid after a reset."""
    return _INT.unpack(fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def peer_window(sock: socket.socket) -> int | None:
    """The receive window the peer advertises (``tcpi_snd_wnd``); None where the kernel does not say."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return _SND_WND.unpack_from(info, 228)[0] if len(info) >= _TCP_INFO_LEN else None


class OutputConnection:
    """Implements ``core.sendqueue.Transport`` for one queue."""

    def __init__(self, loop: Loop, queue: SendQueue, log, throttle: Throttle, source: tuple | None = None):
        self.loop = loop
        self.queue = queue
        self.life = queue.life
        self.log = log
        self.throttle = throttle  # up/down lines: shared by every output to a subreceiver, which may flap
        self.source = source  # (IPv4 address, port) UDP datagrams claim to come from (BALANCER_SUB_SOURCE)
        self.sock: socket.socket | None = None
        self._send = None  # sendmsg of the socket, or of the raw socket with our headers
        self._send_many = None  # UDP with mmsg: sendmmsg of the socket (or of the raw socket, our headers)
        self.closed = False
        self._timer = None          # the lifecycle's next deadline, or the next acknowledgement poll
        self._timer_at = 0.0
        self._polling = False       # the timer is an acknowledgement poll (TCP bytes wait)
        self._refresh_timer = None  # UDP template refresh
        self._check_timer = None    # UDP refusal check
        self._oversize_logged = False
        self._failed: OSError | None = None  # a write failed: handled after the loop turn (``_fail_later``)
        self._tcp = queue.subreceiver.proto == "tcp"
        self.life.stream = self._tcp
        queue.track_acks = self._tcp
        queue.transport = self
        self._connect()

    # -- Transport -----------------------------------------------------------------------------
    def wake(self) -> None:
        self.loop.after_turn(id(self), self.flush)

    def close_when_drained(self) -> None:
        self.life.exporter_left(time.monotonic(), self.queue.drain_seconds)
        self._schedule()
        if self.life.sending:
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

    # -- the lifecycle's clock -----------------------------------------------------------------
    def _waiting(self) -> bool:
        """Bytes written and not acknowledged, or acknowledged and (by the window) not yet read."""
        queue = self.queue
        return self._tcp and (queue.sent_total != queue.acked or self.life.unread)

    def _schedule(self) -> None:
        """Arm the one timer: the lifecycle's next deadline, or sooner the next poll while TCP bytes wait."""
        if self.closed:
            return
        now = time.monotonic()
        waiting = self._waiting()
        when = self.life.next_deadline(waiting)
        poll = waiting and self.sock is not None
        if poll:
            when = now + PROGRESS_CHECK if when is None else min(when, now + PROGRESS_CHECK)
        if when is None:
            self._cancel_timer()
            return
        if self._timer is not None and self._timer_at <= when:
            return  # that one comes first, and schedules again
        self._cancel_timer()
        self._timer_at, self._polling = when, poll
        self._timer = self.loop.call_later(max(0.0, when - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._polling = False
        now = time.monotonic()
        life = self.life
        if self._tcp and self.sock is not None and life.state is not State.CONNECTING:
            before = life.state
            self._observe(now)
            if self.closed:
                return
            if before is State.STALLED and life.state is PROBATION:
                self._taking_again()
        for action in life.tick(now, self._waiting()):
            self._execute(action)
            if self.closed:
                return
        self._schedule()

    def _execute(self, action: Action) -> None:
        if action is Action.CONNECT:
            self._connect()
        elif action is Action.STALLED:
            self._stall()
        elif action is Action.RESET:
            # Still stalled: RoundRobin gives the connection up (reset, so the kernel delivers none of it)
            # and moves everything not acknowledged to the live subreceivers; what its kernel acknowledged
            # and its process may not have read is counted.
            self._fail(ConnectionAbortedError(self.queue.stats.last_error), reset=True)
        elif action is Action.CLOSE:
            self._give_up()

    # -- connecting ----------------------------------------------------------------------------
    def _connect(self) -> None:
        sub = self.queue.subreceiver
        self.life.connecting()
        try:
            if self.source is not None:  # we write the IP and UDP headers ourselves
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            else:
                family = socket.AF_INET6 if sub.ip_version == 6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM if self._tcp else socket.SOCK_DGRAM)
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
        queue = self.queue
        state = self.life.connected(time.monotonic(), (peer_window(self.sock) or 0) if self._tcp else 0)
        queue.tail_bytes = self.life.unread_bound if self._tcp else 0
        queue.connection_up(int(time.time()))
        if state is UP:
            self._healthy()
        else:
            sub = str(queue.subreceiver)
            self.throttle.info("subreceiver_probation", sub, subreceiver=sub, reason=queue.stats.last_error,
                               action="connected; gets a probe's worth until it shows it reads")
            if not self._tcp:
                self._check_timer = self.loop.call_later(UDP_CONFIRM, self._confirm_udp)
        if self._tcp:
            self.loop.watch(self.sock, READ, self._on_event)
        elif queue.refresh and self._refresh_timer is None:
            self._refresh_timer = self.loop.call_later(queue.refresh, self._refresh_tick)
        self.flush()
        self._schedule()

    def _healthy(self, **why) -> None:
        """The output is UP and shown to work: logged once per recovery; RoundRobin moves waiting messages
        of outputs still down here."""
        queue = self.queue
        if queue.confirm():
            sub = str(queue.subreceiver)
            self.throttle.info("subreceiver_up", sub, subreceiver=sub, **why)
        if queue.on_up is not None:
            queue.on_up(queue)

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
        """A UDP output on probation: a refusal of what went out shows as the socket's error by now."""
        self._check_timer = None
        queue = self.queue
        if self.sock is None or queue.state is not PROBATION:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
        elif not queue.sent_total:  # nothing went out yet: nothing to judge by
            self._check_timer = self.loop.call_later(UDP_CONFIRM, self._confirm_udp)
        else:
            self.life.confirmed()
            self._healthy()
            self.flush()

    def _fail(self, exc: BaseException, reset: bool = False, clean: bool = False) -> None:
        """The connection is gone: the queue takes back what may not have arrived, and the lifecycle says
        when to retry. ``reset``: we give it up ourselves for a stall, with a reset, so that the kernel
        delivers none of what goes elsewhere. ``clean``: the collector closed (FIN): a process that closes
        with unread data resets instead, so everything it acknowledged was read."""
        queue, life = self.queue, self.life
        if self._tcp and self.sock is not None and life.state is not State.CONNECTING:
            # The last word on what its TCP acknowledged, and the window it last advertised (both valid
            # after a reset).
            acked = queue.sent_total - unsent_bytes(self.sock)
            if acked > queue.acked:
                queue.acknowledged(acked)
            life.observe(time.monotonic(), acked, peer_window(self.sock))
        elif not self._tcp and isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            queue.refused()
        if reset:
            self._reset()
        self._release()
        acked = life.unread_fate(clean)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        resent, news = queue.connection_lost(reason, acked)
        delay = life.lost(time.monotonic(), stalled=reset)
        if news and not reset:  # once per state change, not per retry; and at most once a minute
            sub = str(queue.subreceiver)
            self.throttle.warning("subreceiver_down", sub, subreceiver=sub, reason=reason, resent=resent,
                                  queued=len(queue.pending), retry_in=round(delay, 1))
        if queue.on_down is not None:
            queue.on_down(queue)
        queue.check_settled()
        self._schedule()

    def _fail_later(self) -> None:
        exc, self._failed = self._failed, None
        if exc is not None and self.sock is not None:
            self._fail(exc)

    def _give_up(self) -> None:
        """The drain deadline passed with messages still queued: they are lost, counted and logged."""
        unsent = self.queue.close(DRAIN_DEADLINE)
        if unsent:  # per output, so per exporter session: throttled (status counts every drop)
            sub = str(self.queue.subreceiver)
            self.throttle.error("subreceiver_drain_deadline", sub, subreceiver=sub, unsent_messages=unsent,
                                drain_seconds=self.queue.drain_seconds)

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
            self._polling = False

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
                self._fail(ConnectionResetError("closed by subreceiver"), clean=True)
                return
        if mask & WRITE:
            if self.queue.state is State.STALLED:  # room in the send buffer: the collector took data
                self._observe(time.monotonic())
                if self.closed or self.sock is None:
                    return
                if self.queue.state is PROBATION:
                    self._taking_again()
            self.flush()

    # -- acknowledgements ----------------------------------------------------------------------
    def _observe(self, now: float) -> None:
        """Tell the queue and the lifecycle how far the collector's TCP acknowledged, and (until it is
        proven) the window it advertises; release what it has shown it read."""
        queue, life = self.queue, self.life
        acked = queue.sent_total - unsent_bytes(self.sock)
        if acked > queue.acked:
            queue.acknowledged(acked)
        if life.proven:
            action = life.observe(now, acked)
        else:
            action = life.observe(now, acked, peer_window(self.sock))
            queue.tail_bytes = life.unread_bound
        if action is Action.PROVEN:
            self._healthy(reason="takes data again")
        elif action is Action.READ:
            queue.read_all()
            if queue.stats.last_error:
                self._healthy(reason="takes data again")
        if queue.closing:
            queue.check_settled()

    def _taking_again(self) -> None:
        sub = str(self.queue.subreceiver)
        self.throttle.info("subreceiver_probation", sub, subreceiver=sub, reason="takes data again",
                           action="on probation until it shows it reads")
        self.flush()

    def _stall(self) -> None:
        """The connection stays, in case the collector reads again soon: RoundRobin moves its queue to the
        live subreceivers at once (and, after another ``stall`` seconds, what it had not shown read); All
        keeps its bounded queue."""
        queue, life = self.queue, self.life
        if queue.stalled(f"stalled: nothing read for {life.stall:g} s"):
            sub = str(queue.subreceiver)
            self.throttle.warning("subreceiver_stalled", sub, subreceiver=sub,
                                  unacked_bytes=queue.sent_total - queue.acked, queued=len(queue.pending),
                                  stall_seconds=life.stall,
                                  action="moved to the live subreceivers" if life.move_stalled else "kept, bounded")
        if queue.on_down is not None:
            queue.on_down(queue)

    # -- sending -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the kernel takes now. Core calls this too, from inside ``enqueue`` and a dispatcher's
        choice: a failure is therefore handled after the loop turn, never re-entrantly (the dispatcher would
        otherwise re-dispatch this queue while it is dispatching into it)."""
        queue = self.queue
        queue.armed = False
        state = queue.state
        if (state is not UP and state is not PROBATION) or self.sock is None or self._failed is not None:
            return
        try:
            if self._tcp:
                self._flush_stream()
            else:
                self._flush_datagrams()
        except OSError as exc:
            self._failed = exc
            self.loop.after_turn(-id(self), self._fail_later)  # (a wake must not replace it)
            return
        if queue.closing:
            queue.check_settled()

    def _flush_stream(self) -> None:
        queue = self.queue
        if queue.sent_total != queue.acked:
            # Before writing: what the collector acknowledged since the last flush is let go now, so the
            # chunks it held are free for the reads to come.
            self._observe(time.monotonic())
            if self.sock is None:
                return
        if self._write():
            self.loop.watch(self.sock, READ, self._on_event)  # all sent: watch for the collector closing
        if not self._polling and self._waiting():  # bytes begin to wait: the stall clock starts now
            self.life.waiting(time.monotonic())
            self._schedule()
    def _flush_datagrams(self) -> None:
        """One datagram per message. A message leaves the queue only once the kernel took it, so a send
        refused by the peer (ICMP port unreachable) leaves it queued for re-dispatch. A returning output
        sends one datagram until its refusal check: a collector still down costs that one (counted), not a
        burst nobody could count."""
        queue = self.queue
        while True:
            try:
                if queue.state is UP:
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
