"""The connection of one output: a TCP connection or a connected UDP socket to one subreceiver.

It owns the socket, the connect/backoff cycle and the refresh and close timers, and drives a
``core.sendqueue.SendQueue``: ``next_iovec`` -> ``sendmsg`` -> ``written``; any error -> ``connection_lost``.
Every failure goes through ``_fail``, once per state change in the log.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from ..core.sendqueue import SendQueue, State
from ..logs import Throttle
from .loop import READ, WRITE, Loop

SNDBUF = 4 * 1024 * 1024
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0
CLOSE_TIMEOUT = 30.0  # after its exporter left, how long an output may keep trying to deliver its queue


class OutputConnection:
    """Implements ``core.sendqueue.Transport`` for one queue."""

    def __init__(self, loop: Loop, queue: SendQueue, log, throttle: Throttle):
        self.loop = loop
        self.queue = queue
        self.log = log
        self.throttle = throttle  # up/down lines: shared by every output to a subreceiver, which may flap
        self.sock: socket.socket | None = None
        self.closed = False
        self._backoff = BACKOFF_FIRST
        self._timer = None          # reconnect, or the close deadline
        self._refresh_timer = None  # UDP template refresh
        self._tcp = queue.subreceiver.proto == "tcp"
        queue.transport = self
        self._connect()

    # -- Transport -----------------------------------------------------------------------------
    def wake(self) -> None:
        self.loop.after_turn(id(self), self.flush)

    def close_when_drained(self) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(CLOSE_TIMEOUT, self._give_up)
        if self.queue.state is State.UP:
            self.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
        self._release()

    # -- connecting ----------------------------------------------------------------------------
    def _connect(self) -> None:
        self._timer = None
        sub = self.queue.subreceiver
        try:
            sock = socket.socket(sub.family, socket.SOCK_STREAM if self._tcp else socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE at the descriptor limit: an outage like any other (backoff, retry)
            self._fail(exc)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        self.sock = sock
        if not self._tcp:
            try:
                sock.connect((sub.host, sub.port))  # no handshake: fixes the peer and our source port
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
        self._backoff = BACKOFF_FIRST
        if self.queue.connection_up(int(time.time())):
            sub = str(self.queue.subreceiver)
            self.throttle.info("subreceiver_up", sub, subreceiver=sub)
        if self._tcp:
            self.loop.watch(self.sock, READ, self._on_event)
        elif self.queue.refresh and self._refresh_timer is None:
            self._refresh_timer = self.loop.call_later(self.queue.refresh, self._refresh_tick)
        self.flush()

    def _refresh_tick(self) -> None:
        self.queue.refresh_templates(int(time.time()))
        self._refresh_timer = self.loop.call_later(self.queue.refresh, self._refresh_tick)

    def _fail(self, exc: BaseException) -> None:
        """The connection is gone: the queue takes back what was not written, and we retry with backoff."""
        self._release()
        queue = self.queue
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        lost, news = queue.connection_lost(reason)
        if news:  # once per state change, not per retry; and at most once a minute (sessions share a subreceiver)
            sub = str(queue.subreceiver)
            self.throttle.warning("subreceiver_down", sub, subreceiver=sub, reason=reason, lost_in_flight=lost,
                                  queued=len(queue.pending), retry_in=self._backoff)
        if queue.closing and not queue.pending:
            queue.close()
            return
        self._cancel_timer()
        self._timer = self.loop.call_later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, BACKOFF_CAP)
        if queue.on_down is not None:
            queue.on_down(queue)

    def _give_up(self) -> None:
        """The close deadline passed with messages still queued: they are lost, counted and logged."""
        self._timer = None
        unsent = self.queue.close()
        if unsent:  # per output, so per exporter session: throttled (status counts every drop)
            sub = str(self.queue.subreceiver)
            self.throttle.error("subreceiver_closed_with_loss", sub, subreceiver=sub, unsent_messages=unsent)

    def _release(self) -> None:
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None

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
            self.flush()

    # -- sending -------------------------------------------------------------------------------
    def flush(self) -> None:
        queue = self.queue
        queue.armed = False
        if queue.state is not State.UP or self.sock is None:
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
        if self._write(self.queue.next_iovec, READ | WRITE):
            self.loop.watch(self.sock, READ, self._on_event)  # all sent: watch for the collector closing

    def _flush_datagrams(self) -> None:
        """One datagram per message. A message leaves the queue only once the kernel took it, so a send
        refused by the peer (ICMP port unreachable) leaves it queued for re-dispatch."""
        if self._write(self.queue.next_datagram, WRITE):
            self.loop.unwatch(self.sock)

    def _write(self, take, blocked_events: int) -> bool:
        """Send what ``take`` commits until the queue is empty (True) or the kernel is full (False: watch
        for ``blocked_events``, the write resumes on the next event)."""
        sock, written = self.sock, self.queue.written
        while bufs := take():
            try:
                sent = sock.sendmsg(bufs)
            except BlockingIOError:
                sent = 0
            if not written(sent):
                self.loop.watch(sock, blocked_events, self._on_event)
                return False
        return True
