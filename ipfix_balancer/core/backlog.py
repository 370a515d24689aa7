"""The queue proper of one output and its loss accounting: entries wait in ``pending`` until a connection
takes them, bounded in bytes per output (``limit``) and per handler (``Budget``); when full, the oldest
unsent entries are dropped and counted by reason (``DROP_REASONS``), never the newest.

``SendQueue`` (``core.sendqueue``) builds on it with what a connection needs. This part is the hot path of
every message (``enqueue``, ``enqueue_many``, called by the dispatchers): a base class rather than a
member, so that a message costs no extra call.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

from .entry import MSG, Entry, entries_size
from .lifecycle import State
from .replay import TemplateReplay

if TYPE_CHECKING:
    from .sendqueue import SendQueue, SubreceiverStats

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


class Backlog:
    """What an output holds that no connection took yet. ``state`` mirrors the output's lifecycle (a plain
    attribute: read per message); ``armed``: the transport was woken for this turn already."""

    def __init__(self, stats: SubreceiverStats, limit: int, replay: TemplateReplay, budget: Budget | None):
        self.budget = budget if budget is not None else Budget(float("inf"))
        self.stats = stats
        self.limit = limit
        self.replay = replay
        self.transport: Transport | None = None
        self.state = State.DOWN
        self.armed = False
        self.pending: deque[Entry] = deque()
        # Bytes of every message not yet handed to the kernel: queued, or committed but not yet written.
        # The bound applies to all of it, so memory per output stays near ``limit``.
        self.pending_bytes = 0      # changed only with budget.used (``account``; inline on hot paths)

    def handed(self, nbytes: int, kept: int) -> None:
        """The kernel took ``nbytes``, ``kept`` of them held until acknowledged (still in the budget)."""
        self.pending_bytes -= nbytes
        self.budget.used -= nbytes - kept

    def account(self, delta: int) -> None:
        """``delta`` bytes more (or fewer) not yet handed to the kernel: the handler's budget too. (A
        property did this, at two calls per change: too dear per datagram; the hot paths inline it.)"""
        self.pending_bytes += delta
        self.budget.used += delta

    def flushing(self) -> None:
        """The transport flushes now: the next queued message wakes it again."""
        self.armed = False

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
            self.transport.wake()  # type: ignore[union-attr]  # an UP or PROBATION queue has its connection

    def enqueue_many(self, entries: list[Entry], size: int) -> None:
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
            self.transport.wake()  # type: ignore[union-attr]  # an UP or PROBATION queue has its connection

    def _make_room(self, size: int) -> None:
        pending = self.pending
        reason = STALLED if self.state is State.STALLED else QUEUE_FULL
        while pending and self.pending_bytes + size > self.limit:
            entry = pending.popleft()
            self.account(-len(entry[MSG]))
            self.stats.drop(reason, (entry,))
            self.replay.incomplete()

    def shed(self, nbytes: float) -> None:
        """The handler-wide budget needs ``nbytes``: drop the oldest unsent entries worth that (or all)."""
        pending, dropped = self.pending, []
        while pending and nbytes > 0:
            entry = pending.popleft()
            self.account(-len(entry[MSG]))
            nbytes -= len(entry[MSG])
            dropped.append(entry)
        self.replay.incomplete()
        self.stats.drop(MEMORY_BUDGET, dropped)

    def take_pending(self) -> list[Entry]:
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
