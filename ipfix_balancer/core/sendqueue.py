"""The send queue of one output: what one exporter session still owes one subreceiver.

An *entry* is the plain tuple ``(message, odid, data_records, snapshot)`` (indexed by ``MSG, ODID, NREC,
SNAP``; a NamedTuple would cost a quarter of a microsecond per message). Entries turn into bytes on the wire
only when a connection takes them, which is what lets a RoundRobin dispatcher move unsent entries to
another subreceiver when a connection fails, and lets the sequence number be rewritten per connection
(RFC 7011 §3.1) at the last moment.

The queue decides; a transport (``net.connection.OutputConnection``) does. A stream transport asks for
buffers (``next_iovec``), writes them, and reports what the kernel took (``written``); a datagram transport
hands the queue its send call (``send_datagrams``). It reports a new connection (``connection_up``) and a
lost one (``connection_lost``). A message handed to the kernel is *committed* to that connection; a message
still queued is not. Every count of loss lives here, by reason (``DROP_REASONS``).

A TCP transport also reports, once per flush, how far the collector's TCP has acknowledged the stream
(``acknowledged``): a message written but not yet acknowledged is kept, and goes back to the queue when the
connection fails, so a collector's death costs only what its own kernel acknowledged and it never read.
"""

from __future__ import annotations

import bisect
from collections import deque
from itertools import accumulate, islice, repeat
from operator import itemgetter
from typing import Callable, Protocol

from .lifecycle import COUNT, DELIVERED, OutputLifecycle, State
from .records import SubreceiverStatus
from .templates import Snapshot
from .wire import SEQUENCE, U32

MSG, ODID, NREC, SNAP = range(4)
_msg_of, _odid_of, _nrec_of = itemgetter(MSG), itemgetter(ODID), itemgetter(NREC)
_consume = deque(maxlen=0).extend  # runs an iterator to its end at C speed
Entry = tuple  # (memoryview | bytes, int, int, Snapshot)
IOV_MAX = 1024          # buffers per sendmsg (Linux's UIO_MAXIOV; sysconf is I/O's business)
_ENTRY_IOV = 3          # buffers one entry may take (a shared template message: header, sequence, rest)
_SEQ_MASK = 0xFFFFFFFF


def entries_size(entries) -> int:
    """The bytes of the messages of ``entries`` (C-level steps: this runs per batch on the hot path)."""
    return sum(map(len, map(_msg_of, entries)))


#: why a message was not delivered (status and logs show drops per reason, in messages and records)
QUEUE_FULL, MEMORY_BUDGET, OVERSIZE, CONNECTION_LOST, STALLED, REFUSED, DRAIN_DEADLINE, DRAIN_LIMIT = \
    DROP_REASONS = ("queue_full", "memory_budget", "oversize", "connection_lost", "stalled", "refused",
                    "drain_deadline", "drain_limit")

#: ``State.UP`` and ``State.PROBATION``, for the hot paths: an enum member lookup costs about 65 ns on
#: Python 3.11 (a module global 10), several times per UDP datagram
UP, PROBATION = State.UP, State.PROBATION


class Transport(Protocol):
    """What a queue asks of the connection that drives it."""

    def wake(self) -> None:
        """Flush once after the current loop turn."""

    def flush(self) -> None:
        """Write what the kernel takes now."""

    def close_when_drained(self) -> None:
        """The exporter left: start the drain deadline (the transport knows the time)."""

    def close(self, abort: bool = False) -> None:
        """Release the connection now (the queue counts what it still held); ``abort``: reset it, so the
        kernel discards what it still held too (it was counted as lost)."""


class Budget:
    """The bytes every send queue of a handler holds together, bounded by ``limit`` (MEMORY_BYTES): per-queue
    bounds multiply with sessions x subreceivers, this one does not. Queues keep ``used`` current: messages
    not yet written, and written ones kept until acknowledged (``SendQueue.held``). When it would pass the
    limit, the kept copies go first (that loses nothing unless their connection then fails), then the
    largest queues lose their oldest unsent messages (reason ``memory_budget``)."""

    __slots__ = ("limit", "used", "queues")

    def __init__(self, limit: float):
        self.limit = limit
        self.used = 0
        self.queues: set[SendQueue] = set()

    def exhausted(self, size: int) -> bool:
        return self.used + size > self.limit

    def make_room(self, size: int) -> None:
        """Free room for ``size`` more bytes, and a sixteenth of the budget besides, so that the scan for
        the largest queue runs once per many messages, not per message."""
        target = self.limit - self.limit / 16
        for queue in self.queues:
            if self.used + size <= target:
                return
            if queue.held:
                queue.let_go(self.used + size - target)
        while self.used + size > target and self.queues:
            largest = max(self.queues, key=lambda q: q.pending_bytes)
            if not largest.pending:  # only messages already committed to the kernel are left
                return
            largest.shed(self.used + size - target)


class SubreceiverStats:
    """Counters for one subreceiver, summed over every output (exporter session) to it."""

    __slots__ = ("subreceiver", "msgs_out", "bytes_out", "drops", "queues", "last_error", "drop_records",
                 "drops_by_reason", "drop_records_by_reason", "resent")

    def __init__(self, subreceiver):
        self.subreceiver = subreceiver
        self.msgs_out = 0
        self.bytes_out = 0
        self.drops = 0          # messages lost: the sum of drops_by_reason
        self.drop_records = 0   # the data records in them
        self.drops_by_reason: dict[str, int] = {}
        self.drop_records_by_reason: dict[str, int] = {}
        self.resent = 0         # written whole, not acknowledged when the connection failed: sent again
        self.queues: set[SendQueue] = set()
        self.last_error = ""

    def drop(self, reason: str, entries) -> None:
        """Count ``entries`` as lost for ``reason`` (one of DROP_REASONS)."""
        self.drop_counts(reason, len(entries), sum([e[NREC] for e in entries]))

    def drop_counts(self, reason: str, msgs: int, records: int) -> None:
        self.drops += msgs
        self.drop_records += records
        self.drops_by_reason[reason] = self.drops_by_reason.get(reason, 0) + msgs
        self.drop_records_by_reason[reason] = self.drop_records_by_reason.get(reason, 0) + records

    def status(self) -> SubreceiverStatus:
        states = {q.state for q in self.queues}
        # A stalled connection is what an operator must see, even when other sessions to it are up.
        state = next((s for s in (State.STALLED, PROBATION, UP) if s in states),
                     State.DOWN if states - {State.CLOSED} else None)
        return SubreceiverStatus(
            subreceiver=str(self.subreceiver), state=state.value if state else "idle", sessions=len(self.queues),
            msgs_out=self.msgs_out, bytes_out=self.bytes_out, drops=self.drops,
            queued_bytes=sum(q.pending_bytes for q in self.queues), last_error=self.last_error,
            drop_records=self.drop_records, drops_by_reason=dict(self.drops_by_reason),
            drop_records_by_reason=dict(self.drop_records_by_reason), resent=self.resent,
            unacked_bytes=sum(q.sent_total - q.acked for q in self.queues if q.track_acks),
            draining=sum(1 for q in self.queues if q.closing))


class SendQueue:
    """One output's queue, bounded in bytes. ``rewrite_seq`` makes the header sequence number count this
    connection's data records per ODID (RoundRobin); without it messages go out byte-identical (All)."""

    def __init__(self, stats: SubreceiverStats, *, limit: int, rewrite_seq: bool,
                 current_snapshot: Callable[[], Snapshot], refresh: float = 0.0, stall: float = 0.0,
                 move_stalled: bool = False, drain_seconds: float = 600.0,
                 on_down: Callable[[SendQueue], None] | None = None,
                 on_closed: Callable[[SendQueue], None] | None = None,
                 on_settled: Callable[[SendQueue], None] | None = None,
                 on_up: Callable[[SendQueue], None] | None = None, budget: Budget | None = None):
        self.budget = budget if budget is not None else Budget(float("inf"))
        self.stats = stats
        self.subreceiver = stats.subreceiver
        self.limit = limit
        self.rewrite_seq = rewrite_seq
        self.current_snapshot = current_snapshot  # the session's templates now
        self.refresh = refresh                    # seconds between template re-sends (UDP); 0 = never
        self.drain_seconds = drain_seconds        # after the exporter left: how long the queue may wait
        self.on_down = on_down                    # dispatcher hook: move unsent entries elsewhere
        self.on_closed = on_closed                # session hook: called once, when CLOSED
        self.on_settled = on_settled              # session hook: a closing queue delivered everything
        self.on_up = on_up                        # dispatcher hook: the output is healthy (again)
        self.transport: Transport | None = None
        # The lifecycle decides the state; the queue mirrors it in a plain attribute for its hot paths.
        self.life = OutputLifecycle(stall=stall, move_stalled=move_stalled)
        self.state = State.DOWN
        self.life.on_state = self._mirror_state
        self.closing = False
        self.armed = False  # the transport was woken for this turn already
        self.pending: deque = deque()
        # Bytes of every message not yet handed to the kernel: queued, or committed but not yet written.
        # The bound applies to all of it, so memory per output stays near ``limit``.
        self.pending_bytes = 0      # changed only with budget.used (``_account``; inline on hot paths)
        self.bufs: list = []        # buffers committed to the connection, not yet written
        self._ends: list[int] = []  # bytes left to write up to the end of each committed message
        self._entries: list = []    # the committed entries, parallel to _ends
        self._seq: dict[int, int] = {}      # rewrite_seq: next sequence number per ODID on this connection
        self._last: dict[int, Entry] = {}   # byte-identical UDP: the last datagram committed per ODID
        self._last_written: Entry | None = None  # the newest message the kernel took (a refused datagram)
        self._last_batch: list = []  # what the last send_datagram_batch call took (refused together)
        # Acknowledgement tracking (set by a TCP transport): offsets in this connection's byte stream.
        self.track_acks = False
        self.sent_total = 0   # bytes the kernel took
        self.acked = 0        # bytes the collector's TCP acknowledged
        # One item per write not yet acknowledged whole: (base offset, ends from base, entries); once let go
        # under memory pressure (``let_go``), the entries are replaced by their record counts (a tuple).
        self._unacked: deque = deque()
        self.held = 0  # bytes of the entries kept in _unacked (the budget counts them)
        # (end offset, messages, records) of the last acknowledged writes, ``tail_bytes`` of them (0: none
        # kept, as for UDP): what may sit unread in the collector's buffer, counted as lost if a reset for a
        # stall, or the collector's own, discards it. Cleared when the collector shows it read it.
        self._acked_tail: deque = deque()
        self.tail_bytes = 0
        # True while the queue still holds every message of the session since it had no templates: then the
        # first connection learns the templates from those messages, and a replay would only duplicate them.
        self._complete = not len(current_snapshot())
        stats.queues.add(self)
        self.budget.queues.add(self)

    def _mirror_state(self, state: State) -> None:
        self.state = state

    def _account(self, delta: int) -> None:
        """``delta`` bytes more (or fewer) not yet handed to the kernel: the handler's budget too. (A
        property did this, at two calls per change: too dear per datagram.)"""
        self.pending_bytes += delta
        self.budget.used += delta

    # -- queueing ------------------------------------------------------------------------------
    def enqueue(self, entry: Entry) -> None:
        """Queue an entry; when full, the oldest unsent entries are dropped and counted (never the newest:
        a collector that falls behind should get the most recent data). Messages already committed to the
        kernel cannot be dropped, so the bound is ``limit`` plus the newest message."""
        size = len(entry[MSG])
        if self.pending_bytes + size > self.limit:
            if (self.state is UP or self.state is PROBATION) and self.transport is not None:
                self.transport.flush()  # a read batch can exceed a small queue: the kernel may take some first
            self._make_room(size)
        if self.budget.exhausted(size):
            self.budget.make_room(size)
        self.pending.append(entry)
        self._account(size)
        if (self.state is UP or self.state is PROBATION) and not self.armed:
            self.armed = True
            self.transport.wake()

    def enqueue_many(self, entries: list, size: int) -> None:
        """Queue a batch of entries of ``size`` bytes in all (one ``deque.extend`` when they fit)."""
        if self.pending_bytes + size > self.limit:
            for entry in entries:  # the drop-oldest path, entry by entry
                self.enqueue(entry)
            return
        budget = self.budget
        if budget.used + size > budget.limit:
            budget.make_room(size)
        self.pending.extend(entries)
        self.pending_bytes += size
        budget.used += size
        if (self.state is UP or self.state is PROBATION) and not self.armed:
            self.armed = True
            self.transport.wake()

    def _make_room(self, size: int) -> None:
        pending = self.pending
        reason = STALLED if self.state is State.STALLED else QUEUE_FULL
        while pending and self.pending_bytes + size > self.limit:
            entry = pending.popleft()
            self._account(-len(entry[MSG]))
            self.stats.drop(reason, (entry,))
            self._complete = False

    def shed(self, nbytes: int) -> None:
        """The handler-wide budget needs ``nbytes``: drop the oldest unsent entries worth that (or all)."""
        pending, dropped = self.pending, []
        while pending and nbytes > 0:
            entry = pending.popleft()
            self._account(-len(entry[MSG]))
            nbytes -= len(entry[MSG])
            dropped.append(entry)
        self._complete = False
        self.stats.drop(MEMORY_BUDGET, dropped)

    def take_pending(self) -> list:
        """Hand over every unsent entry (RoundRobin re-dispatch on failure)."""
        entries = list(self.pending)
        self.pending.clear()
        self._account(-entries_size(entries))
        self._complete = False
        return entries

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing committed: everything was handed to the kernel."""
        return not self.pending and not self._entries

    @property
    def settled(self) -> bool:
        """Idle, and (TCP) everything written was acknowledged: nothing can come back to the queue."""
        return not self.pending and not self._entries and not self._unacked and not self.life.unread

    def held_counts(self) -> tuple[int, int]:
        """(messages, data records) the queue holds: queued, committed, written and not acknowledged. What
        a killed process loses (the supervisor counts it from the last status)."""
        msgs = len(self.pending) + len(self._entries)
        records = sum(map(_nrec_of, self.pending)) + sum(map(_nrec_of, self._entries))
        upto = self.acked
        for base, ends, entries in self._unacked:
            first = bisect.bisect_right(ends, upto - base)
            counts = entries if entries.__class__ is tuple else tuple(map(_nrec_of, entries))
            msgs += len(counts) - first
            records += sum(counts[first:])
        return msgs, records

    @property
    def outstanding(self) -> int:
        """Bytes queued or written and not yet acknowledged: what a probe measures."""
        return self.pending_bytes + (self.sent_total - self.acked if self.track_acks else 0)

    # -- connection events ---------------------------------------------------------------------
    def connection_up(self, now: int) -> None:
        """A new transport session (the lifecycle has made it UP or PROBATION): its sequence numbers start at
        zero, and it first gets the templates valid for the next queued message (``now``: export time of the
        template messages)."""
        self._seq.clear()
        self._acked_tail.clear()
        if not self._complete:
            self._replay_templates(now)
        self._complete = False  # whatever follows an earlier connection: a later one needs the replay

    def confirm(self) -> bool:
        """The collector showed it takes data: True when it was failing or stalled before (news, logged
        once)."""
        recovered = bool(self.stats.last_error)
        self.stats.last_error = ""
        return recovered

    def connection_lost(self, reason: str, acked: str = DELIVERED) -> tuple[int, bool]:
        """The connection failed: every message the collector may not have whole goes back to the queue, in
        order (a dispatcher may move them elsewhere): written but not acknowledged (``resent``), cut in the
        middle (a collector drops a partial message with its connection), committed but not written.

        ``acked`` says what became of messages its TCP acknowledged that may sit unread in its buffer (the
        acknowledged tail): ``DELIVERED`` (it closed cleanly: its process read them), or ``COUNT`` (a reset,
        ours for a stall or the collector's: counted as lost, an upper bound).
        Returns (messages queued again that had been written whole, True when this is news: the subreceiver
        had no error yet, so the caller logs it once)."""
        entries, ends = self._entries, self._ends
        back = self._take_unacked(CONNECTION_LOST, acked)
        resent = len(back)
        returned = entries_size(back)
        if entries and len(entries[0][MSG]) > ends[0]:  # the head message was partly written
            back.append(entries[0])
            returned += len(entries[0][MSG]) - ends[0]  # its unwritten rest is still counted
            entries = entries[1:]
        self._account(returned)
        self.pending.extendleft(reversed(back + entries))  # committed ones are still counted in pending_bytes
        self.bufs, self._ends, self._entries = [], [], []
        self.stats.resent += resent
        self.sent_total = self.acked = 0  # the next connection's stream starts at zero
        news = self.stats.last_error != reason
        self.stats.last_error = reason
        self.armed = False
        return resent, news

    def acknowledged(self, upto: int) -> None:
        """The collector's TCP acknowledged this connection's stream up to byte ``upto``: forget the
        messages that end by then (a write batch at a time)."""
        self.acked = upto
        unacked = self._unacked
        released = 0
        tail, keep_tail = self._acked_tail, self.tail_bytes
        while unacked and unacked[0][0] + unacked[0][1][-1] <= upto:
            base, ends, entries = unacked.popleft()
            if entries.__class__ is list:  # (a tuple: let go under memory pressure, counts only)
                released += ends[-1]
                if keep_tail:
                    tail.append((base + ends[-1], len(entries), sum(map(_nrec_of, entries))))
            elif keep_tail:
                tail.append((base + ends[-1], len(entries), sum(entries)))
        if released:
            self.held -= released
            self.budget.used -= released
        while tail and tail[0][0] < upto - keep_tail:
            tail.popleft()

    def read_all(self) -> None:
        """The collector showed it read everything it acknowledged: nothing of it can be lost any more."""
        self._acked_tail.clear()

    def let_go(self, nbytes: int) -> None:
        """The handler's memory budget needs ``nbytes``: stop keeping the oldest written messages for a
        re-send (at least ``nbytes`` of them, or all). Nothing is lost by that unless this connection then
        fails before the collector acknowledged them; then they are counted as lost."""
        unacked, released = self._unacked, 0
        for i in range(len(unacked)):
            if released >= nbytes:
                break
            base, ends, entries = unacked[i]
            if entries.__class__ is list:
                unacked[i] = (base, ends, tuple(map(_nrec_of, entries)))
                released += ends[-1]
        self.held -= released
        self.budget.used -= released

    def _take_unacked(self, reason: str, acked: str = DELIVERED) -> list:
        """The written messages not acknowledged whole, oldest first; the record of them is cleared. Those let
        go under memory pressure cannot be sent again: counted as lost for ``reason``; with ``COUNT``, so is
        the acknowledged tail."""
        out: list = []
        upto, msgs, records = self.acked, 0, 0
        lost: list = []
        for base, ends, entries in self._unacked:
            first = bisect.bisect_right(ends, upto - base)
            if entries.__class__ is list:
                out += entries[first:]
                if acked is COUNT:
                    lost += entries[:first]
            else:
                counted = entries if acked is COUNT else entries[first:]
                msgs += len(counted)
                records += sum(counted)
        if acked is COUNT:
            for _end, n, nrec in self._acked_tail:
                msgs += n
                records += nrec
            if lost:
                self.stats.drop(reason, lost)
        self._acked_tail.clear()
        if msgs:
            self.stats.drop_counts(reason, msgs, records)
        self._release_unacked()
        return out

    def _release_unacked(self) -> None:
        self._unacked.clear()
        self.budget.used -= self.held
        self.held = 0

    def stalled(self, reason: str) -> bool:
        """The collector has taken nothing for ``stall`` seconds while data waits. Committed messages not
        yet started go back to the queue (their sequence numbers are taken back), so a dispatcher can move
        them; a message cut in the middle stays, its rest must follow on this connection. Returns True when
        this is news (logged once)."""
        entries, ends = self._entries, self._ends
        keep = 1 if entries and len(entries[0][MSG]) > ends[0] else 0
        back = entries[keep:]
        if back:
            if self.rewrite_seq:
                seq = self._seq
                for entry in back:
                    seq[entry[ODID]] = (seq[entry[ODID]] - entry[NREC]) & _SEQ_MASK
            bufs, left, i = self.bufs, ends[0] if keep else 0, 0
            while left > 0:  # the buffers that make up the rest of the head message
                left -= len(bufs[i])
                i += 1
            self.bufs, self._ends, self._entries = bufs[:i], ends[:keep], entries[:keep]
            self.pending.extendleft(reversed(back))  # still counted in pending_bytes
        news = self.stats.last_error != reason
        self.stats.last_error = reason
        return news

    def refused(self) -> None:
        """A UDP collector refused (ICMP port unreachable): what the last send took was lost, the datagram
        that drew it or, from ``send_datagram_batch``, every datagram of that call (the port was closed for
        them all, unless it closed during the call: then this counts a few too many, never too few)."""
        last = self._last_written
        if last is not None:
            batch = self._last_batch
            self.stats.drop(REFUSED, batch if batch and batch[-1] is last else (last,))
            self._last_written = self._last_batch = None

    def _replay_templates(self, now: int, snapshot: Snapshot | None = None) -> None:
        """Put the templates valid for the next queued message in front of it, so the collector can decode
        everything this connection carries. Uses the head entry's snapshot: a template redefined after that
        message was queued must not be announced before it."""
        if snapshot is None:
            snapshot = self.pending[0][SNAP] if self.pending else self.current_snapshot()
        if not len(snapshot):
            return
        entries = [(memoryview(m), U32.unpack_from(m, 12)[0], 0, snapshot)
                   for m in snapshot.messages(self.next_sequence, now)]
        self.pending.extendleft(reversed(entries))
        self._account(entries_size(entries))

    def refresh_templates(self, now: int) -> None:
        """Re-announce the current templates after everything queued (UDP collectors expire templates)."""
        snapshot = self.current_snapshot()
        if (self.state is UP or self.state is PROBATION) and len(snapshot):
            for m in snapshot.messages(self.next_sequence, now):
                self.enqueue((memoryview(m), U32.unpack_from(m, 12)[0], 0, snapshot))

    def next_sequence(self, odid: int) -> int:
        """The sequence number a template message for ``odid`` carries if sent now on this connection."""
        if self.rewrite_seq:
            return self._seq.get(odid, 0)
        last = self._last.get(odid)  # byte-identical: the exporter's numbering after its last message
        if last is not None:
            return U32.unpack_from(last[MSG], SEQUENCE)[0] + last[NREC]
        return U32.unpack_from(self.pending[0][MSG], SEQUENCE)[0] if self.pending else 0

    # -- writing -------------------------------------------------------------------------------
    def next_iovec(self) -> list:
        """The committed buffers to write on a stream, after committing queued entries up to IOV_MAX
        buffers (one ``sendmsg``)."""
        return self._commit(IOV_MAX - _ENTRY_IOV + 1)

    def send_datagrams(self, send: Callable[[object], object], most: int = -1) -> bool:
        """UDP: hand each queued message to ``send`` as one datagram (a bytes-like), oldest first, at most
        ``most`` (-1: all). False when ``send`` raised BlockingIOError (the kernel is full), else True. A
        message leaves the queue only once ``send`` returned, so any other error propagates with it still
        first (a refusal leaves it for re-dispatch; ``drop_first`` for one that can never go). The sequence
        number is rewritten here, as in ``_commit``; one loop per flush, nothing committed: a datagram is
        one call."""
        pending, seq, last = self.pending, self._seq, self._last
        rewrite, pack_into = self.rewrite_seq, U32.pack_into
        msgs = nbytes = 0
        try:
            while pending and msgs != most:
                entry = pending[0]
                msg, odid, nrec, _snap = entry
                if not rewrite:
                    send(msg)
                    last[odid] = entry  # for the template refresh, which only UDP outputs have
                elif nrec:  # RoundRobin gave this data message to this output alone: rewritten in place
                    n = seq.get(odid, 0)
                    pack_into(msg, SEQUENCE, n)
                    send(msg)
                    seq[odid] = (n + nrec) & _SEQ_MASK
                else:
                    send(b"".join(self._numbered(entry, seq.get(odid, 0))))
                pending.popleft()
                msgs += 1
                nbytes += len(msg)
                self._last_written = entry
        except BlockingIOError:
            return False
        finally:
            self._datagrams_sent(msgs, nbytes)
        return True

    def _datagrams_sent(self, msgs: int, nbytes: int) -> None:
        stats = self.stats
        stats.msgs_out += msgs
        stats.bytes_out += nbytes
        self.sent_total += nbytes
        self.pending_bytes -= nbytes
        self.budget.used -= nbytes

    def send_datagram_batch(self, send_many: Callable[[list], int], batch: int) -> bool:
        """``send_datagrams`` with one call per up to ``batch`` datagrams (``sendmmsg``): ``send_many(bufs)``
        returns how many of ``bufs`` the kernel took, oldest first, and raises only when it took none. Only
        what it took leaves the queue (and advances the sequence numbers); after a short count the next call
        starts at the first datagram not taken, and raises its error if it has one. As in ``_commit``, the
        common run (data messages of one ODID) is numbered in C-level steps."""
        pending, seq = self.pending, self._seq
        popleft = pending.popleft
        while pending:
            entries = list(islice(pending, batch))
            bufs = list(map(_msg_of, entries))
            if self.rewrite_seq:
                after = self._number_datagrams(entries, bufs)  # each one's ODID's next number once it went
            try:
                sent = send_many(bufs)
            except BlockingIOError:
                return False
            taken = entries[:sent] if sent < len(entries) else entries
            for _ in repeat(None, sent):
                popleft()
            if self.rewrite_seq:
                seq.update(zip(map(_odid_of, taken), after))  # the last of each ODID wins
            else:
                self._last.update(zip(map(_odid_of, taken), taken))  # for the template refresh (UDP only)
            self._last_written, self._last_batch = taken[-1], taken
            self._datagrams_sent(sent, entries_size(taken))
        return True

    def _number_datagrams(self, entries: list, bufs: list) -> list:
        """Write this connection's sequence numbers into ``bufs`` (a template message's buffer becomes a
        numbered copy); returns, per entry, its ODID's next number after it. ``_seq`` is left as it was."""
        seq = self._seq
        nrecs = list(map(_nrec_of, entries))
        odid = entries[0][ODID]
        n = seq.get(odid, 0)
        if n + sum(nrecs) <= _SEQ_MASK and 0 not in nrecs and len(set(map(_odid_of, entries))) == 1:
            numbers = list(accumulate(nrecs, initial=n))
            _consume(map(U32.pack_into, bufs, repeat(SEQUENCE), numbers))
            return numbers[1:]
        after, nxt = [], {}
        for i, entry in enumerate(entries):
            odid, nrec = entry[ODID], entry[NREC]
            n = nxt[odid] if odid in nxt else seq.get(odid, 0)
            if nrec:
                U32.pack_into(bufs[i], SEQUENCE, n)
                n = nxt[odid] = (n + nrec) & _SEQ_MASK
            else:
                bufs[i] = b"".join(self._numbered(entry, n))
            after.append(n)
        return after

    def drop_first(self, reason: str) -> None:
        """The first queued message can never be sent (too big for a datagram): count it, go on."""
        entry = self.pending.popleft()
        self._account(-len(entry[MSG]))
        self.stats.drop(reason, (entry,))

    @staticmethod
    def _numbered(entry: Entry, n: int) -> list:
        """The buffers of ``entry`` carrying sequence number ``n``. A data message is rewritten in place
        (RoundRobin gave it to this output alone); a template message may be shared with other outputs (or
        immutable), so its header is copied."""
        msg = entry[MSG]
        if entry[NREC]:
            U32.pack_into(msg, SEQUENCE, n)
            return [msg]
        return [msg[:SEQUENCE], U32.pack(n), msg[SEQUENCE + 4:]]

    def _commit(self, room: int) -> list:
        """Commit queued entries while fewer than ``room`` buffers are committed (a stream's ``sendmsg``).
        The sequence number is rewritten here, at the last moment. A run of entries is taken and measured by
        C-level steps; only the rewrite is a Python step per message."""
        bufs, ends, pending = self.bufs, self._ends, self.pending
        free = room - len(bufs)
        if not pending or free <= 0:
            return bufs
        if self.rewrite_seq:  # a template message takes 3 buffers: take no more than fit in any case
            free = max(1, (free + _ENTRY_IOV - 1) // _ENTRY_IOV)
        if len(pending) <= free:
            batch = list(pending)
            pending.clear()
        else:
            popleft = pending.popleft
            batch = [popleft() for _ in range(free)]
        self._entries += batch
        msgs = list(map(_msg_of, batch))
        if self.rewrite_seq:
            seq = self._seq
            nrecs = list(map(_nrec_of, batch))
            odid = batch[0][ODID]
            n = seq.get(odid, 0)
            last = n + sum(nrecs)
            if last <= _SEQ_MASK and 0 not in nrecs and len(set(map(_odid_of, batch))) == 1:
                # The common run, data messages of one ODID: numbered in C-level steps. (A template message
                # or another ODID in the run, or the counter wrapping, take the step per message below.)
                _consume(map(U32.pack_into, msgs, repeat(SEQUENCE), accumulate(nrecs, initial=n)))
                bufs += msgs
                seq[odid] = last
                batch = ()
            current = n = None  # the ODID being numbered, and its next sequence number
            for entry in batch:
                odid = entry[ODID]
                if odid != current:
                    if current is not None:
                        seq[current] = n
                    current, n = odid, seq.get(odid, 0)
                bufs += self._numbered(entry, n)
                n = (n + entry[NREC]) & _SEQ_MASK
            if current is not None:
                seq[current] = n
        else:
            bufs += msgs
        sizes = accumulate(map(len, msgs), initial=ends[-1] if ends else 0)
        next(sizes)  # the starting offset itself
        ends += sizes
        return bufs

    def written(self, sent: int) -> bool:
        """The kernel took ``sent`` bytes of ``bufs``: account them. True when all committed bytes went."""
        ends, stats, entries = self._ends, self.stats, self._entries
        stats.bytes_out += sent
        base = self.sent_total
        self.sent_total = base + sent
        if sent == ends[-1]:
            stats.msgs_out += len(ends)
            self._last_written = entries[-1]
            if self.track_acks:  # kept until acknowledged: the bytes stay in the budget, held not pending
                self._unacked.append((base, ends, entries))
                self.pending_bytes -= sent
                self.held += sent
            else:
                self.pending_bytes -= sent
                self.budget.used -= sent
            self.bufs, self._ends, self._entries = [], [], []
            return True
        self._account(-sent)
        done = bisect.bisect_right(ends, sent)
        stats.msgs_out += done
        if done and self.track_acks:
            self._unacked.append((base, ends[:done], entries[:done]))
            self.held += ends[done - 1]
            self.budget.used += ends[done - 1]
        self._ends = [e - sent for e in ends[done:]]
        del entries[:done]
        bufs = self.bufs
        i = 0
        while sent:  # drop whole buffers sent, slice the one cut in the middle
            n = len(bufs[i])
            if n <= sent:
                sent -= n
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[sent:]
                sent = 0
        self.bufs = bufs[i:]
        return False

    # -- shutdown ------------------------------------------------------------------------------
    def close_when_drained(self) -> None:
        """The exporter left, or the subreceiver was removed: deliver what is queued, then close. The
        transport starts the drain deadline; ``on_settled`` (the session) decides when to close, because a
        sibling output may still need this one to take its messages."""
        self.closing = True
        if self.state is State.CLOSED:
            return
        if self.transport is None:
            self.close()
            return
        self.transport.close_when_drained()
        self.check_settled()

    def check_settled(self) -> None:
        """A closing queue that holds nothing more tells its session (or, without one, closes)."""
        if self.closing and self.state is not State.CLOSED and self.settled:
            if self.on_settled is not None:
                self.on_settled(self)
            else:
                self.close()

    def close(self, reason: str | None = None) -> int:
        """Final: whatever is still queued or committed is counted as dropped (``reason``, else ``stalled``
        when the collector was connected but not taking it, else ``connection_lost``). A stalled connection,
        or one on probation that still holds something, is reset (else the kernel still delivers after we
        close what we count as lost): what was written and not acknowledged is counted too, and what it
        acknowledged and (by its window) has not read. Returns that count."""
        state = self.state
        if state is State.CLOSED:
            return 0
        abort = (state is State.STALLED or state is PROBATION) and not self.settled
        if reason is None:
            reason = STALLED if state is UP or abort else CONNECTION_LOST
        acked = COUNT if self.life.unread or state is State.STALLED else DELIVERED
        lost = list(self.pending) + self._entries + (self._take_unacked(reason, acked) if abort else [])
        if lost:
            self.stats.drop(reason, lost)
        self.pending.clear()
        self._account(-self.pending_bytes)
        self.bufs, self._ends, self._entries = [], [], []
        self._release_unacked()
        self.life.close()
        self.stats.queues.discard(self)
        self.budget.queues.discard(self)
        if self.transport is not None:
            self.transport.close(abort=abort)
        if self.on_closed is not None:
            self.on_closed(self)
        return len(lost)
