"""Output sessions: one connection (TCP) or socket (UDP) from one exporter session to one subreceiver.

Each output owns a bounded queue of *entries* ``(message, odid, data_records, snapshot)``. Entries are
turned into bytes on the wire only when they are sent, which is what lets a RoundRobin dispatcher move
unsent entries to another subreceiver when a connection fails, and lets the sequence number be
rewritten per connection (RFC 7011 §3.1) at the last moment.

Sending is batched: one ``sendmsg`` carries up to IOV_MAX buffers (many messages) per flush. A message
handed to the kernel is *committed* to that connection; a message still in the queue is not.
"""

from __future__ import annotations

import bisect
import errno
import os
import socket
import struct
import time
from collections import deque

from .loop import READ, WRITE, Loop

SEQ = struct.Struct("!I")
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
SNDBUF = 4 * 1024 * 1024
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0
CLOSE_TIMEOUT = 30.0  # after its exporter left, how long an output may keep trying to deliver its queue

DOWN, CONNECTING, UP, CLOSED = "down", "connecting", "up", "closed"
#: errors that mean "this connection is gone", an ordinary event for a network appliance.
_CONNECTION_ERRORS = (ConnectionError, TimeoutError, OSError)


class EndpointStats:
    """Counters for one subreceiver, summed over every output session to it (what ``status`` shows)."""

    __slots__ = ("endpoint", "msgs_out", "bytes_out", "drops", "outputs", "last_error")

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.msgs_out = 0
        self.bytes_out = 0
        self.drops = 0
        self.outputs: set[Output] = set()
        self.last_error = ""

    def snapshot(self) -> dict:
        states = {o.state for o in self.outputs}
        state = UP if UP in states else (DOWN if states - {CLOSED} else "idle")
        return {"endpoint": str(self.endpoint), "state": state, "sessions": len(self.outputs),
                "msgs_out": self.msgs_out, "bytes_out": self.bytes_out, "drops": self.drops,
                "queued_bytes": sum(o.pending_bytes for o in self.outputs), "last_error": self.last_error}


class Output:
    """One output session. ``rewrite_seq`` makes the header sequence number count this connection's
    data records per ODID (RoundRobin); without it messages go out byte-identical (All)."""

    def __init__(self, loop: Loop, stats: EndpointStats, *, limit: int, rewrite_seq: bool, log,
                 current_snapshot, refresh: float = 0.0, on_down=None, on_drained=None):
        self.loop = loop
        self.stats = stats
        self.endpoint = stats.endpoint
        self.limit = limit
        self.rewrite_seq = rewrite_seq
        self.log = log
        self.current_snapshot = current_snapshot  # callable: the session's templates now
        self.on_down = on_down                    # dispatcher hook: move unsent entries elsewhere
        self.on_drained = on_drained              # session hook: called once when closing and empty
        self.refresh = refresh                    # seconds between template re-sends (UDP); 0 = never
        self._refresh_timer = None
        self.pending: deque = deque()
        # Bytes of every message not yet handed to the kernel: queued, or committed to a send but not yet
        # written. The bound applies to all of it, so memory per output stays near ``limit``.
        self.pending_bytes = 0
        self._armed = False  # a flush is scheduled for the end of this loop turn
        self._bufs: list = []      # buffers committed to the connection but not yet written
        self._ends: list[int] = []  # bytes left to write up to the end of each committed message
        self._entries: list = []    # the committed entries, parallel to _ends
        self.seq: dict[int, int] = {}
        self.sock: socket.socket | None = None
        self.state = DOWN
        self.closing = False
        self._backoff = BACKOFF_FIRST
        self._timer = None
        # True while the queue still holds every message of the session since it had no templates: then the
        # first connection learns the templates from those messages, and a replay would only duplicate them.
        self._complete = not len(current_snapshot())
        stats.outputs.add(self)
        self._connect()

    # -- queue ---------------------------------------------------------------------------------
    def enqueue(self, entry) -> None:
        """Queue an entry; when full, the oldest unsent entries are dropped and counted (never the newest:
        a collector that falls behind should get the most recent data)."""
        size = len(entry[0])
        if self.state is UP and not self.closing and self.pending_bytes + size > self.limit:
            self.flush()  # a read batch can exceed a small queue: give the kernel what it takes before dropping
        while self.pending and self.pending_bytes + size > self.limit:
            old = self.pending.popleft()
            self.pending_bytes -= len(old[0])
            self.stats.drops += 1
            self._complete = False
        self.pending.append(entry)
        self.pending_bytes += size
        if self.state is UP and not self._armed:
            self._armed = True
            self.loop.after_turn(id(self), self.flush)

    def enqueue_many(self, entries: list, size: int) -> None:
        """Queue a batch of entries of ``size`` bytes in all (one ``deque.extend`` when they fit)."""
        if self.pending_bytes + size > self.limit:
            for entry in entries:  # the drop-oldest path, entry by entry
                self.enqueue(entry)
            return
        self.pending.extend(entries)
        self.pending_bytes += size
        if self.state is UP and not self._armed:
            self._armed = True
            self.loop.after_turn(id(self), self.flush)

    def take_pending(self) -> list:
        """Hand over every unsent entry (RoundRobin re-dispatch on failure)."""
        entries = list(self.pending)
        self.pending.clear()
        self.pending_bytes -= sum(len(e[0]) for e in entries)
        self._complete = False
        return entries

    @property
    def idle(self) -> bool:
        return not self.pending and not self._entries

    # -- connection ----------------------------------------------------------------------------
    def _connect(self) -> None:
        self._timer = None
        ep = self.endpoint
        kind = socket.SOCK_STREAM if ep.proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(ep.family, kind)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        self.sock = sock
        if kind == socket.SOCK_DGRAM:
            try:
                sock.connect((ep.host, ep.port))  # no handshake: fixes the peer and our source port
            except OSError as exc:
                self._fail(exc)
                return
            self._up()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((ep.host, ep.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(OSError(err, os.strerror(err)))
            return
        self.state = CONNECTING
        self.loop.watch(sock, WRITE, self._on_connect)

    def _on_connect(self, _mask) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        self._up()

    def _up(self) -> None:
        self.state = UP
        self._backoff = BACKOFF_FIRST
        self.seq.clear()  # a new transport session: its sequence starts at zero
        if self.stats.last_error:
            self.log.info("subreceiver_up", subreceiver=str(self.endpoint))
            self.stats.last_error = ""
        if not self._complete:
            self._replay_templates()
        self._complete = False  # whatever follows an earlier connection: a later one needs the replay
        if self.endpoint.proto == "tcp":
            self.loop.watch(self.sock, READ, self._on_event)
        elif self.refresh and self._refresh_timer is None:
            self._refresh_timer = self.loop.call_later(self.refresh, self._refresh_tick)
        self.flush()

    def _replay_templates(self, snapshot=None) -> None:
        """Put the templates valid for the next queued message in front of it, so the collector can decode
        everything this connection carries. Uses the head entry's snapshot: a template redefined after
        that message was queued must not be announced before it."""
        if snapshot is None:
            snapshot = self.pending[0][3] if self.pending else self.current_snapshot()
        if not len(snapshot):
            return
        if self.rewrite_seq:
            def seq_for(odid):
                return self.seq.get(odid, 0)
        else:  # byte-identical mode keeps the exporter's numbering: use the next message's
            head_seq = SEQ.unpack_from(self.pending[0][0], 8)[0] if self.pending else 0

            def seq_for(_odid):
                return head_seq
        entries = [(memoryview(m), SEQ.unpack_from(m, 12)[0], 0, snapshot)
                   for m in snapshot.messages(seq_for, int(time.time()))]
        self.pending.extendleft(reversed(entries))
        self.pending_bytes += sum(len(e[0]) for e in entries)

    def _refresh_tick(self) -> None:
        """Re-announce current templates after everything queued (UDP collectors expire templates)."""
        snapshot = self.current_snapshot()
        if self.state is UP and len(snapshot):
            for m in snapshot.messages(lambda o: self.seq.get(o, 0), int(time.time())):
                self.enqueue((memoryview(m), SEQ.unpack_from(m, 12)[0], 0, snapshot))
        self._refresh_timer = self.loop.call_later(self.refresh, self._refresh_tick)

    def _uncommit(self) -> int:
        """The connection failed: committed messages not written at all go back to the queue (a
        dispatcher may move them elsewhere); one cut in the middle is lost. Returns the count lost."""
        entries, ends = self._entries, self._ends
        lost = 0
        if entries and len(entries[0][0]) > ends[0]:  # the head message was partly written
            lost = 1
            self.pending_bytes -= ends[0]  # its unwritten rest
            entries = entries[1:]
        self.pending.extendleft(reversed(entries))  # still counted in pending_bytes
        self._bufs, self._ends, self._entries = [], [], []
        self.stats.drops += lost
        return lost

    def _fail(self, exc: BaseException) -> None:
        """The connection is gone: count what was committed but unwritten, and retry with backoff."""
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
        lost = self._uncommit()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if self.state is UP or not self.stats.last_error:  # once per state change, not per retry
            self.log.warning("subreceiver_down", subreceiver=str(self.endpoint), reason=reason,
                             lost_in_flight=lost, queued=len(self.pending), retry_in=self._backoff)
        self.stats.last_error = reason
        self.state = DOWN
        if self.closing and not self.pending:
            self.close()
            return
        self._timer = self.loop.call_later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, BACKOFF_CAP)
        if self.on_down is not None:
            self.on_down(self)

    def _on_event(self, mask: int) -> None:
        if mask & READ:
            # Collectors never send IPFIX back: readable means closed (or junk we discard).
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = b"?"
            except _CONNECTION_ERRORS as exc:
                self._fail(exc)
                return
            if not data:
                self._fail(ConnectionResetError("closed by subreceiver"))
                return
        if mask & WRITE:
            self.flush()

    # -- sending -------------------------------------------------------------------------------
    def flush(self) -> None:
        self._armed = False
        if self.state is not UP:
            return
        try:
            if self.endpoint.proto == "tcp":
                self._flush_stream()
            else:
                self._flush_datagrams()
        except _CONNECTION_ERRORS as exc:
            self._fail(exc)
            return
        if self.closing and self.idle:
            self.close()

    def _fill(self) -> None:
        """Commit queued entries to ``_bufs`` (rewriting the sequence number if asked) up to IOV_MAX."""
        bufs, ends, entries, pending = self._bufs, self._ends, self._entries, self.pending
        total = ends[-1] if ends else 0
        rewrite, seq, pack, pack_into = self.rewrite_seq, self.seq, SEQ.pack, SEQ.pack_into
        limit = IOV_MAX - 3
        while pending and len(bufs) < limit:
            entry = pending.popleft()
            entries.append(entry)
            msg, odid, nrec, _snap = entry
            if rewrite:
                n = seq.get(odid, 0)
                if nrec:  # a data message: RoundRobin gave it to this output alone, rewrite it in place
                    pack_into(msg, 8, n)
                    bufs.append(msg)
                else:  # template messages may be shared with other outputs (or immutable): copy the header
                    bufs += (msg[:8], pack(n), msg[12:])
                seq[odid] = (n + nrec) & 0xFFFFFFFF
            else:
                bufs.append(msg)
            total += len(msg)
            ends.append(total)

    def _flush_stream(self) -> None:
        sock = self.sock
        while True:
            if self.pending and len(self._bufs) < IOV_MAX - 3:
                self._fill()
            if not self._bufs:
                break
            try:
                sent = sock.sendmsg(self._bufs)
            except BlockingIOError:
                sent = 0
            ends = self._ends
            if sent == ends[-1]:
                self.stats.msgs_out += len(ends)
                self.stats.bytes_out += sent
                self.pending_bytes -= sent
                self._bufs, self._ends, self._entries = [], [], []
                continue
            self._written(sent)
            self.loop.watch(sock, READ | WRITE, self._on_event)
            return
        self.loop.watch(sock, READ, self._on_event)

    def _written(self, sent: int) -> None:
        """Account a partial write: drop whole buffers sent, slice the one cut in the middle."""
        ends = self._ends
        done = bisect.bisect_right(ends, sent)
        self.stats.msgs_out += done
        self.stats.bytes_out += sent
        self.pending_bytes -= sent
        self._ends = [e - sent for e in ends[done:]]
        del self._entries[:done]
        bufs = self._bufs
        i = 0
        while sent:
            n = len(bufs[i])
            if n <= sent:
                sent -= n
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[sent:]
                sent = 0
        self._bufs = bufs[i:]

    def _flush_datagrams(self) -> None:
        """One datagram per message. Entries leave the queue only once the kernel took them, so a send
        refused by the peer (ICMP port unreachable) leaves the message queued for re-dispatch."""
        sock, pending, stats = self.sock, self.pending, self.stats
        rewrite, seq, pack, pack_into = self.rewrite_seq, self.seq, SEQ.pack, SEQ.pack_into
        while pending:
            msg, odid, nrec, _snap = pending[0]
            try:
                if rewrite:
                    n = seq.get(odid, 0)
                    if nrec:  # this output's alone (see _fill)
                        pack_into(msg, 8, n)
                        sock.send(msg)
                    else:
                        sock.sendmsg((msg[:8], pack(n), msg[12:]))
                    seq[odid] = (n + nrec) & 0xFFFFFFFF
                else:
                    sock.send(msg)
                    # the exporter's numbering: a template refresh (template-only) must carry the current value
                    seq[odid] = (SEQ.unpack_from(msg, 8)[0] + nrec) & 0xFFFFFFFF
            except BlockingIOError:
                self.loop.watch(sock, WRITE, self._on_event)
                return
            pending.popleft()
            size = len(msg)
            self.pending_bytes -= size
            stats.msgs_out += 1
            stats.bytes_out += size
        self.loop.unwatch(sock)

    # -- shutdown ------------------------------------------------------------------------------
    def close_when_drained(self) -> None:
        """Deliver what is queued, then close; give up (counted, logged) after CLOSE_TIMEOUT."""
        self.closing = True
        if self.idle or self.state is CLOSED:
            self.close()
            return
        self.loop.call_later(CLOSE_TIMEOUT, self.close)
        if self.state is UP:
            self.flush()

    def close(self) -> None:
        """Close now; whatever is still queued is counted as dropped."""
        if self.state is CLOSED:
            return
        for timer in (self._timer, self._refresh_timer):
            if timer is not None:
                timer.cancel()
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
        unsent = len(self.pending) + len(self._entries)
        if unsent:
            self.stats.drops += unsent
            self.log.error("subreceiver_closed_with_loss", subreceiver=str(self.endpoint), unsent_messages=unsent,
                           state=self.state)
        self.pending.clear()
        self.pending_bytes = 0
        self._bufs, self._ends, self._entries = [], [], []
        self.state = CLOSED
        self.stats.outputs.discard(self)
        if self.on_drained is not None:
            self.on_drained(self)
