"""Export of completed dumps to one insert process (docs/configuration.md "Recording mode", "Export"): one file at a time,
oldest first, each as its own IPFIX transport session.

TCP: one connection per file, delivered once the target's TCP stack acknowledged every byte (the send queue,
TIOCOUTQ, is empty after our FIN). UDP: one datagram per message, best effort. Outcomes go to the owner through
callbacks (``on_delivered``, ``on_vanished``, ``on_drop``); the target never touches markers or the spool.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import time
from typing import Callable

from ..control.status import ExportTargetStatus
from ..core.wire import UDP_MAX_PAYLOAD, walk
from ..net.connection import unsent_bytes
from ..net.loop import READ, WRITE, Loop, cancel
from .dumpfile import open_regular

EXPORT_CHUNK = 1024 * 1024       # bytes read from a dump at a time for export
EXPORT_TURN_BYTES = 4 * 1024 * 1024   # TCP bytes sent per loop turn per target (traffic keeps its turns)
EXPORT_TURN_DATAGRAMS = 256      # UDP datagrams per loop turn per target
EXPORT_RETRY_FIRST = 1.0
EXPORT_RETRY_CAP = 30.0
EXPORT_STALL = 60.0              # seconds without acknowledgement progress before a TCP transfer is failed
ACK_POLL = 0.02                  # seconds between two looks at the unacknowledged bytes while draining


def target_token(endpoint) -> str:
    """A target as it appears in marker file names: ``10.0.0.2_9920_tcp``, ``[::1]_9920_udp``."""
    return str(endpoint).replace("/", "_")


class State(enum.StrEnum):
    """Where a target is. A transfer is IDLE -> CONNECTING (TCP) -> SENDING -> DRAINING (TCP) -> IDLE;
    any failure goes to DOWN, and the retry timer back to IDLE. ``drop`` of the file in transfer ends it
    (-> IDLE), ``close`` ends everything (-> CLOSED, final)."""
    IDLE = "idle"                # nothing in transfer; starts the oldest queued file when there is one
    CONNECTING = "connecting"    # TCP connect in progress
    SENDING = "sending"          # file bytes / datagrams going out
    DRAINING = "draining"        # TCP: all sent and FIN queued; waiting for the acknowledgements
    DOWN = "down"                # last attempt failed; a retry is scheduled (backoff)
    CLOSED = "closed"            # the recorder stopped


_ACTIVE = frozenset({State.CONNECTING, State.SENDING, State.DRAINING})
#: state -> the states it may go to (checked on every change: a transfer changes state a handful of times)
TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.CONNECTING, State.SENDING, State.DOWN, State.CLOSED}),
    State.CONNECTING: frozenset({State.SENDING, State.DOWN, State.IDLE, State.CLOSED}),
    State.SENDING: frozenset({State.DRAINING, State.IDLE, State.DOWN, State.CLOSED}),
    State.DRAINING: frozenset({State.IDLE, State.DOWN, State.CLOSED}),
    State.DOWN: frozenset({State.IDLE, State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}


class ExportTarget:
    """Export of completed dumps (names in ``directory``) to one insert process ``ep``.

    ``on_delivered(name)``: the target has the whole file (its ``queue`` no longer holds it).
    ``on_vanished(name)``: the file is gone from the directory (the owner forgets it everywhere, ``drop``).
    ``on_drop(count)``: messages that could not be sent (a UDP message larger than a datagram).
    """

    def __init__(self, loop: Loop, directory: str, ep, log, *, on_delivered: Callable[[str], None],
                 on_vanished: Callable[[str], None], on_drop: Callable[[int], None]):
        self.loop = loop
        self.dir = directory
        self.ep = ep
        self.log = log
        self.on_delivered = on_delivered
        self.on_vanished = on_vanished
        self.on_drop = on_drop
        self.token = target_token(ep)
        self.queue: list[str] = []       # dump names not yet delivered, oldest first; queue[0] is in transfer
        self.state = State.IDLE
        self.sock: socket.socket | None = None
        self.fh = None
        self._data = b""                 # TCP: the chunk being sent, from _off
        self._off = 0
        self._messages: list = []        # UDP: the whole messages of the chunk read, from _next
        self._next = 0
        self._tail = b""                 # UDP: the start of a message cut by the chunk boundary
        self._timer = None
        self._backoff = EXPORT_RETRY_FIRST
        self._acked_at = 0.0
        self._outq = -1
        self._size = 0
        self.files_sent = 0
        self.bytes_sent = 0
        self.skipped = 0
        self.last_error = ""

    def _to(self, state: State) -> None:
        assert state in TRANSITIONS[self.state], f"export {self.state} -> {state}"
        self.state = state

    def add(self, name: str) -> None:
        self.queue.append(name)
        self.kick()

    def kick(self) -> None:
        if self.state is State.IDLE and self.queue:
            self._start(self.queue[0])

    def drop(self, name: str) -> None:
        """Forget a dump (evicted or gone); a transfer of it in progress is abandoned."""
        if name not in self.queue:
            return
        if self.queue[0] == name and self.state in _ACTIVE:
            self._cleanup()
            self._to(State.IDLE)
            self.queue.remove(name)
            self.loop.call_later(0, self.kick)
            return
        self.queue.remove(name)

    def close(self) -> None:
        self._cleanup()
        self._to(State.CLOSED)

    def status(self) -> ExportTargetStatus:
        return ExportTargetStatus(target=str(self.ep), state=self.state.value, pending=len(self.queue),
                                  sent=self.files_sent, error=self.last_error)

    # -- one transfer ----------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        try:
            self.fh = open(open_regular(os.path.join(self.dir, name), os.O_RDONLY), "rb", buffering=0)
            self._size = os.fstat(self.fh.fileno()).st_size
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.EINVAL):
                self._fail(exc)
                return
            self.on_vanished(name)  # gone, or not a regular file of ours (a planted symlink, a FIFO)
            self.loop.call_later(0, self.kick)
            return
        ep = self.ep
        tcp = ep.proto == "tcp"
        try:
            family = socket.AF_INET6 if ep.ip_version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE at the descriptor limit: retry with backoff
            self._fail(exc)
            return
        sock.setblocking(False)
        self.sock = sock
        if tcp:
            err = sock.connect_ex((ep.host, ep.port))
            if err not in (0, errno.EINPROGRESS):
                self._fail(OSError(err, os.strerror(err)))
                return
            self._to(State.CONNECTING)
            self.loop.watch(sock, WRITE, self._on_connect)
        else:
            try:
                sock.connect((ep.host, ep.port))
            except OSError as exc:
                self._fail(exc)
                return
            self._to(State.SENDING)
            self.loop.watch(sock, WRITE, self._on_udp)

    def _on_connect(self, _mask) -> None:
        if self.sock is None:  # the transfer ended since the event was reported (the loop skips such events too)
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        self._to(State.SENDING)
        self.loop.watch(self.sock, READ | WRITE, self._on_tcp)

    def _on_tcp(self, mask: int) -> None:
        if self.sock is None:  # the transfer ended since the event was reported
            return
        if mask & READ and not self._read():
            return
        if mask & WRITE and self.state is State.SENDING:
            self._send_tcp()

    def _read(self) -> bool:
        """Insert processes send nothing back: EOF or junk is ignored, a reset fails the transfer."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError as exc:
            self._fail(exc)
            return False
        if not data:  # the peer closed its side (stop watching EOF); a reset, if it did not read all, shows on send
            if self.state is State.SENDING:
                self.loop.watch(self.sock, WRITE, self._on_tcp)
            else:
                self.loop.unwatch(self.sock)
        return True

    def _send_tcp(self) -> None:
        sock = self.sock
        budget = EXPORT_TURN_BYTES
        while budget > 0:
            if self._off >= len(self._data):
                try:
                    self._data, self._off = self.fh.read(EXPORT_CHUNK), 0
                except OSError as exc:
                    self._fail(exc)
                    return
                if not self._data:
                    self._all_sent()
                    return
            try:
                n = sock.send(memoryview(self._data)[self._off:])
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._off += n
            budget -= n

    def _all_sent(self) -> None:
        """Everything is in the kernel: close our side, then wait until the target acknowledged it all."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)
            return
        self._to(State.DRAINING)
        self.loop.watch(self.sock, READ, self._on_tcp)
        self._acked_at, self._outq = time.monotonic(), -1
        self._poll_acked()

    def _poll_acked(self) -> None:
        self._timer = None
        if self.state is not State.DRAINING:
            return
        sock = self.sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        try:
            outq = unsent_bytes(sock)
        except OSError:
            outq = 0  # cannot tell: the kernel accepted everything, that has to do
        if outq == 0:
            self._success()
            return
        now = time.monotonic()
        if outq != self._outq:
            self._outq, self._acked_at = outq, now
        elif now - self._acked_at > EXPORT_STALL:
            self._fail(TimeoutError(errno.ETIMEDOUT, f"no acknowledgement for {EXPORT_STALL:.0f} s"))
            return
        self._timer = self.loop.call_later(ACK_POLL, self._poll_acked)

    def _on_udp(self, _mask) -> None:
        """One datagram per message (found by ``wire.walk`` in the chunks read), EXPORT_TURN_DATAGRAMS per turn."""
        if self.sock is None:  # the transfer ended since the event was reported
            return
        sock, limit = self.sock, UDP_MAX_PAYLOAD[self.ep.ip_version]
        for _ in range(EXPORT_TURN_DATAGRAMS):
            if self._next >= len(self._messages) and not self._read_messages():
                return
            msg = self._messages[self._next]
            if len(msg) > limit:
                self.skipped += 1
                self.on_drop(1)
                self._next += 1
                continue
            try:
                sock.send(msg)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._next += 1

    def _read_messages(self) -> bool:
        """Read on until whole messages are at hand (True). At the end of the file the transfer succeeds (a
        completed dump holds whole messages only), and so it does at an invalid header (logged)."""
        while True:
            try:
                more = self.fh.read(EXPORT_CHUNK)
            except OSError as exc:
                self._fail(exc)
                return False
            if not more:
                self._success()  # a cut-off tail cannot be in a completed dump; nothing is left
                return False
            chunk = memoryview(self._tail + more)
            messages: list = []
            end, error = walk(chunk, 0, len(chunk), messages.append)
            self._tail = bytes(chunk[end:])
            if error is not None:
                self.log.warning("export_dump_invalid", file=self.queue[0], target=str(self.ep),
                                 reason=error.detail, action="the messages before it were sent, not the rest")
                self.fh.seek(0, os.SEEK_END)  # the next read ends the transfer
                self._tail = b""
            if messages:
                self._messages, self._next = messages, 0
                return True

    # -- outcome ---------------------------------------------------------------------------------
    def _success(self) -> None:
        name = self.queue.pop(0)
        self._cleanup()
        self._to(State.IDLE)
        self.files_sent += 1
        self.bytes_sent += self._size
        self._backoff = EXPORT_RETRY_FIRST
        if self.last_error:
            self.log.info("export_target_up", target=str(self.ep))
            self.last_error = ""
        self.log.info("dump_exported", file=name, target=str(self.ep), bytes=self._size, waiting=len(self.queue))
        self.on_delivered(name)
        self.kick()

    def _fail(self, exc: BaseException) -> None:
        self._cleanup()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if reason != self.last_error:
            self.log.warning("export_failed", target=str(self.ep), file=self.queue[0] if self.queue else "",
                             reason=reason, waiting=len(self.queue), retry_in=self._backoff)
        self.last_error = reason
        self._to(State.DOWN)
        self._timer = self.loop.call_later(self._backoff, self._retry)
        self._backoff = min(self._backoff * 2, EXPORT_RETRY_CAP)

    def _retry(self) -> None:
        self._timer = None
        if self.state is State.DOWN:
            self._to(State.IDLE)
            self.kick()

    def _cleanup(self) -> None:
        cancel(self._timer)
        self._timer = None
        if self.sock is not None:
            self.loop.close_socket(self.sock)
            self.sock = None
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self._data, self._off, self._messages, self._next, self._tail = b"", 0, [], 0, b""
