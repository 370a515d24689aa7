"""The send queue of one output: what one exporter session still owes one subreceiver, and its accounting.

The queue holds entries (``core.entry``) until a connection takes them, which is what lets a RoundRobin
dispatcher move unsent entries to another subreceiver when a connection fails. Its parts, each a job of its
own: the ``Sequencer`` numbers what a connection takes (RFC 7011 §3.1), the ``AckLog`` keeps what a TCP
collector has not acknowledged, ``TemplateReplay`` announces the templates to each new connection, and the
writers (``core.writing``) hand messages to the kernel. Every count of loss lives here, by reason
(``DROP_REASONS``).

The queue decides; a transport (``net.connection.OutputConnection``) does. A stream transport asks for
buffers (``stream.next_iovec``), writes them, and reports what the kernel took (``stream.written``) and, once per flush,
how far the collector's TCP acknowledged (``acknowledged``); a datagram transport hands the queue its send
call (``datagrams.send``). It reports a new connection (``connection_up``) and a lost one
(``connection_lost``). A message handed to the kernel is *committed* to that connection; a message still
queued is not. The queue's state is its lifecycle's (``core.lifecycle``: every change checked against its
table), mirrored in ``state`` for the hot paths; net and the session change it only through methods.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

from .acklog import AckLog
from .entry import MSG, Entry, entries_size, nrec_of
from .lifecycle import COUNT, DELIVERED, OutputLifecycle, State
from .replay import TemplateReplay
from .sequencer import Sequencer
from .templates import Snapshot
from .writing import DatagramWriter, StreamWriter

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
    not yet written, and written ones kept until acknowledged (``AckLog.held``). When it would pass the
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
            if queue.acks.held:
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
        self.drop_counts(reason, len(entries), sum(map(nrec_of, entries)))

    def drop_counts(self, reason: str, msgs: int, records: int) -> None:
        self.drops += msgs
        self.drop_records += records
        self.drops_by_reason[reason] = self.drops_by_reason.get(reason, 0) + msgs
        self.drop_records_by_reason[reason] = self.drop_records_by_reason.get(reason, 0) + records

    def status(self) -> dict:
        states = {q.state for q in self.queues}
        # A stalled connection is what an operator must see, even when other sessions to it are up.
        state = next((s for s in (State.STALLED, PROBATION, UP) if s in states),
                     State.DOWN if states - {State.CLOSED} else None)
        return {"endpoint": str(self.subreceiver), "state": state.value if state else "idle",
                "sessions": len(self.queues), "msgs_out": self.msgs_out, "bytes_out": self.bytes_out,
                "drops": self.drops, "queued_bytes": sum(q.pending_bytes for q in self.queues),
                "last_error": self.last_error, "drop_records": self.drop_records,
                "drops_by_reason": dict(self.drops_by_reason),
                "drop_records_by_reason": dict(self.drop_records_by_reason), "resent": self.resent,
                "unacked_bytes": sum(q.acks.outstanding for q in self.queues),
                "draining": sum(1 for q in self.queues if q.closing)}


class OutputHooks:
    """Whom a queue tells what happened (injected as one record): its dispatcher when the output goes down
    (``on_down``: move unsent entries elsewhere) or is healthy again (``on_up``); its session when it is
    closing and holds nothing more (``on_settled``) and when it closed (``on_closed``)."""

    __slots__ = ("on_down", "on_up", "on_settled", "on_closed")

    def __init__(self, on_down=None, on_up=None, on_settled=None, on_closed=None):
        self.on_down: Callable[[SendQueue], None] | None = on_down
        self.on_up: Callable[[SendQueue], None] | None = on_up
        self.on_settled: Callable[[SendQueue], None] | None = on_settled
        self.on_closed: Callable[[SendQueue], None] | None = on_closed


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
        self.limit = limit
        self.hooks = OutputHooks(on_down, on_up, on_settled, on_closed)
        self.transport: Transport | None = None
        # The lifecycle decides the state; the queue mirrors it in a plain attribute for its hot paths.
        self.life = OutputLifecycle(stall=stall, move_stalled=move_stalled, drain_seconds=drain_seconds)
        self.state = State.DOWN
        self.life.on_state = self._mirror_state
        self.armed = False  # the transport was woken for this turn already (``flushing`` disarms)
        self.pending: deque = deque()
        # Bytes of every message not yet handed to the kernel: queued, or committed but not yet written.
        # The bound applies to all of it, so memory per output stays near ``limit``.
        self.pending_bytes = 0      # changed only with budget.used (``account``; inline on hot paths)
        self.sequencer = Sequencer(rewrite_seq)
        self.acks = AckLog(stats)
        self.replay = TemplateReplay(current_snapshot, refresh)
        self.stream = StreamWriter(self)        # what a stream connection took (``next_iovec``, ``written``)
        self.datagrams = DatagramWriter(self)   # a datagram socket's sends
        stats.queues.add(self)
        self.budget.queues.add(self)

    def _mirror_state(self, state: State) -> None:
        self.state = state

    def handed(self, nbytes: int, kept: int) -> None:
        """The kernel took ``nbytes``, ``kept`` of them held until acknowledged (still in the budget)."""
        self.pending_bytes -= nbytes
        self.budget.used -= nbytes - kept

    def account(self, delta: int) -> None:
        """``delta`` bytes more (or fewer) not yet handed to the kernel: the handler's budget too. (A
        property did this, at two calls per change: too dear per datagram; the hot paths inline it.)"""
        self.pending_bytes += delta
        self.budget.used += delta

    # -- wiring (the transport and the session) -------------------------------------------------
    def attach(self, transport: Transport, stream: bool) -> None:
        """``transport`` drives this queue; ``stream``: it reports acknowledgements (TCP), and a written
        message is kept until acknowledged."""
        self.transport = transport
        self.acks.track = self.life.stream = stream

    def reconfigure(self, *, limit: int, refresh: float, stall: float, drain_seconds: float) -> None:
        """The session kept this output across a reload: its new settings."""
        self.limit = limit
        self.replay.refresh = refresh
        self.life.stall, self.life.drain_seconds = stall, drain_seconds

    def dispatched_by(self, dispatcher) -> None:
        """Tell ``dispatcher`` when this output goes down or is healthy again."""
        self.hooks.on_down, self.hooks.on_up = dispatcher.on_down, dispatcher.on_up

    def went_down(self) -> None:
        """The connection failed or stalled: the dispatcher may move what is queued."""
        if self.hooks.on_down is not None:
            self.hooks.on_down(self)

    def came_up(self) -> None:
        """The output is healthy (again): the dispatcher may move waiting messages here."""
        if self.hooks.on_up is not None:
            self.hooks.on_up(self)

    def flushing(self) -> None:
        """The transport flushes now: the next queued message wakes it again."""
        self.armed = False

    @property
    def subreceiver(self):
        return self.stats.subreceiver

    @property
    def refresh(self) -> float:
        return self.replay.refresh

    @property
    def closing(self) -> bool:
        """The exporter left (or the subreceiver was removed): the queue closes once settled."""
        return self.life.leaving

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
        self.account(size)
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
            self.account(-len(entry[MSG]))
            self.stats.drop(reason, (entry,))
            self.replay.incomplete()

    def shed(self, nbytes: int) -> None:
        """The handler-wide budget needs ``nbytes``: drop the oldest unsent entries worth that (or all)."""
        pending, dropped = self.pending, []
        while pending and nbytes > 0:
            entry = pending.popleft()
            self.account(-len(entry[MSG]))
            nbytes -= len(entry[MSG])
            dropped.append(entry)
        self.replay.incomplete()
        self.stats.drop(MEMORY_BUDGET, dropped)

    def take_pending(self) -> list:
        """Hand over every unsent entry (RoundRobin re-dispatch on failure)."""
        entries = list(self.pending)
        self.pending.clear()
        self.account(-entries_size(entries))
        self.replay.incomplete()
        return entries

    def drop_first(self, reason: str) -> None:
        """The first queued message can never be sent (too big for a datagram): count it, go on."""
        entry = self.pending.popleft()
        self.account(-len(entry[MSG]))
        self.stats.drop(reason, (entry,))

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing committed: everything was handed to the kernel."""
        return not self.pending and not self.stream.entries

    @property
    def settled(self) -> bool:
        """Idle, and (TCP) everything written was acknowledged: nothing can come back to the queue."""
        return (not self.pending and not self.stream.entries and not self.acks.unacked
                and not self.life.unread)

    def held_counts(self) -> tuple[int, int]:
        """(messages, data records) the queue holds: queued, committed, written and not acknowledged. What
        a killed process loses (the supervisor counts it from the last status)."""
        entries = self.stream.entries
        msgs, records = self.acks.held_counts()
        return (msgs + len(self.pending) + len(entries),
                records + sum(map(nrec_of, self.pending)) + sum(map(nrec_of, entries)))

    @property
    def outstanding(self) -> int:
        """Bytes queued or written and not yet acknowledged: what a probe measures."""
        return self.pending_bytes + self.acks.outstanding

    # -- connection events ---------------------------------------------------------------------
    def connection_up(self, now: int) -> None:
        """A new transport session (the lifecycle has made it UP or PROBATION): its sequence numbers start at
        zero, and it first gets the templates valid for the next queued message (``now``: export time of the
        template messages)."""
        self.sequencer.restart()
        self.acks.read_all()
        entries = self.replay.on_connection(self.pending[0] if self.pending else None, self.next_sequence, now)
        if entries:
            self.pending.extendleft(reversed(entries))
            self.account(entries_size(entries))

    def next_sequence(self, odid: int) -> int:
        """The sequence number a template message for ``odid`` carries if sent now on this connection."""
        return self.sequencer.template_sequence(odid, self.pending[0] if self.pending else None)

    def refresh_templates(self, now: int) -> None:
        """Re-announce the current templates after everything queued (UDP collectors expire templates)."""
        if self.state is UP or self.state is PROBATION:
            for entry in self.replay.refreshed(self.next_sequence, now):
                self.enqueue(entry)

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
        stream = self.stream
        entries, ends = stream.entries, stream.ends
        back = self.acks.take(CONNECTION_LOST, acked)
        self.budget.used -= self.acks.release()
        resent = len(back)
        returned = entries_size(back)
        if stream.cut:  # a collector drops a partial message with its connection
            back.append(entries[0])
            returned += len(entries[0][MSG]) - ends[0]  # its unwritten rest is still counted
            entries = entries[1:]
        self.account(returned)
        self.pending.extendleft(reversed(back + entries))  # committed ones are still counted in pending_bytes
        stream.clear()
        self.stats.resent += resent
        self.acks.restart()
        news = self.stats.last_error != reason
        self.stats.last_error = reason
        self.armed = False
        return resent, news

    def acknowledged(self, upto: int) -> None:
        """The collector's TCP acknowledged this connection's stream up to byte ``upto``: forget the
        messages that end by then, keeping as the tail what its buffer may hold unread."""
        self.budget.used -= self.acks.acknowledged(upto, self.life.unread_bound)

    def let_go(self, nbytes: int) -> None:
        """The memory budget needs ``nbytes``: stop keeping the oldest written messages for a re-send."""
        self.budget.used -= self.acks.let_go(nbytes)

    def read_all(self) -> None:
        """The collector showed it read everything it acknowledged: nothing of it can be lost any more."""
        self.acks.read_all()

    def stalled(self, reason: str) -> bool:
        """The collector has taken nothing for ``stall`` seconds while data waits. Committed messages not
        yet started go back to the queue (their sequence numbers are taken back), so a dispatcher can move
        them; a message cut in the middle stays, its rest must follow on this connection. Returns True when
        this is news (logged once)."""
        back = self.stream.take_back()
        if back:
            self.pending.extendleft(reversed(back))  # still counted in pending_bytes
        news = self.stats.last_error != reason
        self.stats.last_error = reason
        return news

    def refused(self) -> None:
        """A UDP collector refused (ICMP port unreachable): what the last send took was lost, the datagram
        that drew it or, from ``send_datagram_batch``, every datagram of that call (the port was closed for
        them all, unless it closed during the call: then this counts a few too many, never too few)."""
        lost = self.datagrams.take_refused()
        if lost:
            self.stats.drop(REFUSED, lost)

    # -- shutdown ------------------------------------------------------------------------------
    def close_when_drained(self) -> None:
        """The exporter left, or the subreceiver was removed: deliver what is queued, then close. The
        transport starts the drain deadline; ``on_settled`` (the session) decides when to close, because a
        sibling output may still need this one to take its messages."""
        if self.state is State.CLOSED:
            return
        self.life.leave()
        if self.transport is None:
            self.close()
            return
        self.transport.close_when_drained()
        self.check_settled()

    def check_settled(self) -> None:
        """A closing queue that holds nothing more tells its session (or, without one, closes)."""
        if self.life.leaving and self.state is not State.CLOSED and self.settled:
            if self.hooks.on_settled is not None:
                self.hooks.on_settled(self)
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
        lost = list(self.pending) + self.stream.entries + (self.acks.take(reason, acked) if abort else [])
        if lost:
            self.stats.drop(reason, lost)
        self.pending.clear()
        self.account(-self.pending_bytes)
        self.stream.clear()
        self.budget.used -= self.acks.release()
        self.life.close()
        self.stats.queues.discard(self)
        self.budget.queues.discard(self)
        if self.transport is not None:
            self.transport.close(abort=abort)
        if self.hooks.on_closed is not None:
            self.hooks.on_closed(self)
        return len(lost)
