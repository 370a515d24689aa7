"""The connecting side of one output (IPFIXcol2's forwarder ``Connector``): it opens a TCP connection or a
connected UDP socket to one subreceiver, retries with the backoff the output's lifecycle decides, and runs
that lifecycle's clock. An open socket is a ``net.connection.Connection``, which writes and reads.

It executes what the lifecycle (``core.lifecycle``, reached as ``queue.life``) decides: it reports events
with the time (connected, lost) and carries out the actions (connect, declare a stall, reset, close at the
drain deadline). Every failure, the connection's or its own, goes through ``fail``: the transport
reports, the lifecycle decides, and the log says it once per state change.

While TCP bytes wait for acknowledgement the one timer polls them every ``PROGRESS_CHECK`` seconds and lets
the lifecycle judge. A UDP output that failed comes back on probation: it sends one datagram, and is up
again only when a check of the socket's error finds no refusal of it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Callable

from ..core.lifecycle import Action, State
from ..core.sendqueue import DRAIN_DEADLINE, OVERSIZE, UP, SendQueue
from ..logs import Throttle
from . import mmsg
from .connection import SEND_BATCH, Connection, peer_window
from .loop import READ, WRITE, Loop, cancel

SNDBUF = 4 * 1024 * 1024
PROGRESS_CHECK = 0.5  # seconds between polls of a TCP output's acknowledged offset while bytes wait
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_HEADERS = _IPV4.size + _UDP.size


def raw_senders(sock: socket.socket, source: tuple, sub) -> tuple:
    """(send, send_many) for a raw socket: IPv4 and UDP headers with the exporter's address and port
    (``source``). The kernel fills the IP length, id and checksum; UDP checksum 0 means none (RFC 768). A
    datagram beyond the path MTU fails with EMSGSIZE (no fragmentation with our own headers): counted as
    oversize."""
    ip = _IPV4.pack(0x45, 0, 0, 0, 0, 64, socket.IPPROTO_UDP, 0, socket.inet_aton(source[0]),
                    socket.inet_aton(sub.host))
    sport, dport, dest = source[1], sub.port, (sub.host, 0)
    sendmsg, pack = sock.sendmsg, _UDP.pack

    def send(data) -> int:
        return sendmsg([ip, pack(sport, dport, _UDP.size + len(data), 0), data], (), 0, dest) - _HEADERS
    return send, (mmsg.Sender(sock, SEND_BATCH, (ip, sport, dport, dest)).send if mmsg.AVAILABLE else None)


def open_socket(sub, tcp: bool, source: tuple | None) -> tuple:
    """(socket, send, send_many) for ``sub``, non-blocking: a TCP socket still to connect (its ``sendmsg``
    takes an iovec), or a UDP socket ready to send (connected, which fixes the peer and our source port; or
    raw, with ``source``'s headers). Raises OSError, with nothing left open."""
    if source is not None:  # we write the IP and UDP headers ourselves
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    else:
        family = socket.AF_INET6 if sub.ip_version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        if tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, sock.sendmsg, None
        if source is not None:
            return (sock, *raw_senders(sock, source, sub))
        sock.connect((sub.host, sub.port))  # no handshake
        return sock, sock.send, (mmsg.Sender(sock, SEND_BATCH).send if mmsg.AVAILABLE else None)
    except OSError:
        sock.close()
        raise


class Connector:
    """Implements ``core.sendqueue.Transport`` for one queue. ``clock``: monotonic seconds (the lifecycle's
    time; a test passes a fake one)."""

    def __init__(self, loop: Loop, queue: SendQueue, log, throttle: Throttle, source: tuple | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.loop = loop
        self.queue = queue
        self.life = queue.life
        self.log = log
        self.throttle = throttle  # up/down lines: shared by every output to a subreceiver, which may flap
        self.source = source  # (IPv4 address, port) UDP datagrams claim to come from (BALANCER_SUB_SOURCE)
        self.clock = clock
        self.tcp = queue.subreceiver.proto == "tcp"
        self.conn: Connection | None = None
        self.closed = False
        self._timer = None          # the lifecycle's next deadline, or the next acknowledgement poll
        self._timer_at = 0.0
        self._polling = False       # the timer is an acknowledgement poll (TCP bytes wait)
        self._refresh_timer = None  # UDP template refresh
        self._oversize_logged = False
        queue.attach(self, stream=self.tcp)
        self._connect()

    # -- Transport -----------------------------------------------------------------------------
    def wake(self) -> None:
        self.loop.after_turn(id(self), self.flush)

    def flush(self) -> None:
        """Write what the kernel takes now (core calls this too: the connection defers its failures)."""
        self.queue.flushing()
        if self.conn is not None:
            self.conn.flush()

    def close_when_drained(self) -> None:
        self.life.exporter_left(self.clock())
        self._schedule()
        if self.life.sending:
            self.flush()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        cancel(self._refresh_timer)
        if self.conn is not None:
            if abort:  # the kernel must not deliver what was counted as lost
                self.conn.reset()
            self._release()

    # -- the lifecycle's clock -----------------------------------------------------------------
    def waiting(self) -> bool:
        """Bytes written and not acknowledged, or acknowledged and (by the window) not yet read."""
        acks = self.queue.acks
        return self.tcp and (acks.sent_total != acks.acked or self.life.unread)

    def bytes_wait(self) -> None:
        """After a write: when bytes begin to wait for acknowledgement, the stall clock starts now."""
        if not self._polling and self.waiting():
            self.life.waiting(self.clock())
            self._schedule()

    def _schedule(self) -> None:
        """Arm the one timer: the lifecycle's next deadline, or sooner the next poll while TCP bytes wait."""
        if self.closed:
            return
        now = self.clock()
        waiting = self.waiting()
        when = self.life.next_deadline(waiting)
        poll = waiting and self.conn is not None
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

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._polling = False

    def _on_timer(self) -> None:
        self._timer = None
        self._polling = False
        now = self.clock()
        life = self.life
        if self.tcp and self.conn is not None and life.state is not State.CONNECTING:
            before = life.state
            self.conn.observe(now)
            if self.closed:
                return
            if before is State.STALLED and life.state is State.PROBATION:
                self.taking_again()
        for action in life.tick(now, self.waiting()):
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
            self.fail(ConnectionAbortedError(self.queue.stats.last_error), reset=True)
        elif action is Action.CLOSE:
            self._give_up()

    # -- connecting ----------------------------------------------------------------------------
    def _connect(self) -> None:
        sub = self.queue.subreceiver
        self.life.connecting()
        try:
            sock, send, send_many = open_socket(sub, self.tcp, self.source)
        except OSError as exc:  # EMFILE at the descriptor limit: an outage like any other (backoff, retry)
            self.fail(exc)
            return
        self.conn = Connection(self, sock, send, send_many)
        if not self.tcp:
            self._established()
            return
        err = sock.connect_ex((sub.host, sub.port))
        if err not in (0, errno.EINPROGRESS):
            self.fail(OSError(err, os.strerror(err)))
            return
        self.loop.watch(sock, WRITE, self._on_connect)

    def _on_connect(self, _mask) -> None:
        if self.conn is None:  # closed since the event was reported (the loop skips such events too)
            return
        err = self.conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(OSError(err, os.strerror(err)))
            return
        self._established()

    def _established(self) -> None:
        queue, conn = self.queue, self.conn
        state = self.life.connected(self.clock(), (peer_window(conn.sock) or 0) if self.tcp else 0)
        queue.connection_up(int(time.time()))
        if state is UP:
            self.healthy()
        else:
            sub = str(queue.subreceiver)
            self.throttle.info("subreceiver_probation", sub, subreceiver=sub, reason=queue.stats.last_error,
                               action="connected; gets a probe's worth until it shows it reads")
            if not self.tcp:
                conn.confirm_later()
        if self.tcp:
            self.loop.watch(conn.sock, READ, conn.on_event)
        elif queue.refresh and self._refresh_timer is None:
            self._refresh_timer = self.loop.call_later(queue.refresh, self._refresh_tick)
        self.flush()
        self._schedule()

    def _refresh_tick(self) -> None:
        self.queue.refresh_templates(int(time.time()))
        self._refresh_timer = self.loop.call_later(self.queue.refresh, self._refresh_tick)

    # -- what the connection reports -----------------------------------------------------------
    def healthy(self, **why) -> None:
        """The output is UP and shown to work: logged once per recovery; RoundRobin moves waiting messages
        of outputs still down here."""
        queue = self.queue
        if queue.confirm():
            sub = str(queue.subreceiver)
            self.throttle.info("subreceiver_up", sub, subreceiver=sub, **why)
        queue.came_up()

    def taking_again(self) -> None:
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
                                  unacked_bytes=queue.acks.outstanding, queued=len(queue.pending),
                                  stall_seconds=life.stall,
                                  action="moved to the live subreceivers" if life.move_stalled else "kept, bounded")
        queue.went_down()

    def oversize(self, size: int) -> None:
        """A message no UDP datagram can carry (TCP in, UDP out): dropped and counted, never retried."""
        queue = self.queue
        queue.drop_first(OVERSIZE)
        if not self._oversize_logged:  # once per output
            self._oversize_logged = True
            self.log.error("message_oversize", subreceiver=str(queue.subreceiver), size=size,
                           action="dropped for this UDP subreceiver; exporters must keep messages under "
                                  "65,507 bytes")

    def fail(self, exc: BaseException, reset: bool = False, clean: bool = False) -> None:
        """The one failure funnel: the connection is gone, the queue takes back what may not have arrived,
        and the lifecycle says when to retry. ``reset``: we give it up ourselves for a stall, with a reset,
        so that the kernel delivers none of what goes elsewhere. ``clean``: the collector closed (FIN): a
        process that closes with unread data resets instead, so everything it acknowledged was read."""
        queue, life, conn = self.queue, self.life, self.conn
        if self.tcp and conn is not None and life.state is not State.CONNECTING:
            conn.last_word(self.clock())
        elif not self.tcp and isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            queue.refused()
        if conn is not None:
            if reset:
                conn.reset()
            self._release()
        acked = life.unread_fate(clean)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        resent, news = queue.connection_lost(reason, acked)
        delay = life.lost(self.clock(), stalled=reset)
        if news and not reset:  # once per state change, not per retry; and at most once a minute
            sub = str(queue.subreceiver)
            self.throttle.warning("subreceiver_down", sub, subreceiver=sub, reason=reason, resent=resent,
                                  queued=len(queue.pending), retry_in=round(delay, 1))
        queue.went_down()
        queue.check_settled()
        self._schedule()

    def _give_up(self) -> None:
        """The drain deadline passed with messages still queued: they are lost, counted and logged."""
        unsent = self.queue.close(DRAIN_DEADLINE)
        if unsent:  # per output, so per exporter session: throttled (status counts every drop)
            sub = str(self.queue.subreceiver)
            self.throttle.error("subreceiver_drain_deadline", sub, subreceiver=sub, unsent_messages=unsent,
                                drain_seconds=self.life.drain_seconds)

    def _release(self) -> None:
        self.conn.release()
        self.conn = None
