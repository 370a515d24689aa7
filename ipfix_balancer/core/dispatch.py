"""Dispatchers decide which outputs get a message: RoundRobin spreads, Replicate (mode ``All``) copies.

Both keep every collector able to decode what it gets: a message carrying template sets reaches every
output (for a mixed message, the chosen output gets the message and the others a copy holding only its
template sets, so no data record is ever duplicated). The recorder is the third dispatcher; the two
forwarding ones (``FORWARDERS``) are also ``Forwarder``s: they own send queues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from ..config.model import Mode
from .entry import MSG, entries_size
from .sendqueue import PROBATION, UP, SendQueue
from .wire import MAX_MESSAGE

if TYPE_CHECKING:
    from .entry import Entry
    from .templates import Snapshot
    from .wire import Message


class Dispatcher(Protocol):
    """What an exporter session hands its messages to. Entries are ``core.entry.Entry`` tuples."""

    def dispatch(self, msg: Message, odid: int, nrec: int, tmpl: Message | None, snapshot: Snapshot) -> None:
        """One message; ``tmpl`` is None, the message itself (templates only) or its template-only copy."""

    def dispatch_many(self, entries: list[Entry], size: int) -> None:
        """A run of data-only entries (one read's worth), ``size`` bytes in all."""


class Forwarder(Dispatcher, Protocol):
    """A dispatcher over one send queue per subreceiver (``RoundRobin``, ``Replicate``): the session makes
    the queues with the class's ``rewrite_seq`` and ``move_stalled`` and hooks their ``on_down`` and
    ``on_up`` to it."""

    rewrite_seq: ClassVar[bool]  # the queues rewrite the header sequence number (``SendQueue``)
    move_stalled: ClassVar[bool]  # a stalled queue gives up its messages (``OutputLifecycle``)
    queues: list[SendQueue]

    def __init__(self, queues: list[SendQueue]) -> None:
        """Dispatch to ``queues`` (the session's list: it adds the queues after)."""

    def on_down(self, queue: SendQueue) -> None:
        """``queue``'s connection failed."""

    def on_up(self, queue: SendQueue) -> None:
        """``queue``'s connection is up (again)."""


class Replicate:
    """Every message to every output; each output's queue is bounded on its own, so a slow collector
    loses its oldest messages (counted) instead of stalling the exporter or the other collectors."""

    rewrite_seq: ClassVar[bool] = False  # copies are complete: the exporter's sequence numbers stay true
    move_stalled: ClassVar[bool] = False  # a stalled collector keeps its connection and its bounded queue

    def __init__(self, queues: list[SendQueue]):
        self.queues = queues

    def dispatch(self, msg: Message, odid: int, nrec: int, tmpl: Message | None, snapshot: Snapshot) -> None:
        entry = (msg, odid, nrec, snapshot)
        for queue in self.queues:
            queue.enqueue(entry)

    def dispatch_many(self, entries: list[Entry], size: int) -> None:
        for queue in self.queues:
            queue.enqueue_many(entries, size)

    def on_down(self, _queue: SendQueue) -> None:
        """A down subreceiver keeps its queue (bounded) and gets it after reconnecting."""

    def on_up(self, _queue: SendQueue) -> None:
        """Copies are not moved: each subreceiver gets its own."""


class RoundRobin:
    """Each data message to the next *available* output (connected, with room in its queue)."""

    rewrite_seq: ClassVar[bool] = True  # each collector sees only some messages: renumber so it sees no false gaps
    move_stalled: ClassVar[bool] = True  # a stalled collector's messages go to the live ones

    def __init__(self, queues: list[SendQueue]):
        self.queues = queues
        self._next = 0

    def _choose(self, size: int) -> SendQueue:
        """Next queue that is up with room (one on probation counts while it has less than a probe's worth
        outstanding: a collector that stalled before gets enough to show it reads, not a full share); else (all down: session start or outage) the next with room,
        where the message waits for the connection (unless the memory budget is reached); else the next one,
        which drops its oldest."""
        queues = self.queues
        count = len(queues)
        start = self._next
        fallback = None
        # At the handler-wide memory budget an output that is not up counts as full: it would only hold more.
        waiting_ok = not queues[0].budget.exhausted(size)
        for i in range(count):
            queue = queues[(start + i) % count]
            if queue.pending_bytes + size > queue.limit and queue.state is UP:
                # A read batch can exceed a small queue: the kernel may take some first, rather than the
                # message waiting at a collector that is down or stalled.
                queue.transport.flush()  # type: ignore[union-attr]  # an UP queue has its connection
            if queue.pending_bytes + size <= queue.limit:
                if queue.state is UP or (queue.state is PROBATION
                                         and queue.outstanding + size <= queue.life.probe_bytes):
                    self._next = (start + i + 1) % count
                    return queue
                if fallback is None and waiting_ok:
                    fallback = (i, queue)
            elif fallback is None and not waiting_ok and queue.state is UP:
                fallback = (i, queue)  # it drops its own oldest, where a down output would only grow
        i, queue = fallback if fallback is not None else (0, queues[start % count])
        self._next = (start + i + 1) % count
        return queue

    def dispatch(self, msg: Message, odid: int, nrec: int, tmpl: Message | None, snapshot: Snapshot) -> None:
        target = self._choose(len(msg))
        target.enqueue((msg, odid, nrec, snapshot))
        if tmpl is not None:
            # Template sets are protocol state every collector needs, not payload to spread.
            entry = (tmpl, odid, 0, snapshot)
            for queue in self.queues:
                if queue is not target:
                    queue.enqueue(entry)

    def dispatch_many(self, entries: list[Entry], size: int) -> None:
        """When every output is up with room for its share, output k gets ``entries[k::n]``: exactly the
        message-by-message rotation, without a call per message."""
        queues = self.queues
        n = len(queues)
        share = size // n + MAX_MESSAGE + 1  # shares differ by at most one message
        for q in queues:  # (a loop, not all() over a generator: this runs per datagram on UDP)
            if q.state is not UP or q.pending_bytes + share > q.limit:
                break
        else:
            start = self._next
            for k in range(min(n, len(entries))):
                part = entries[k::n]
                queues[(start + k) % n].enqueue_many(part, entries_size(part))
            self._next = (start + len(entries)) % n
            return
        for entry in entries:
            self._choose(len(entry[MSG])).enqueue(entry)

    def on_down(self, queue: SendQueue) -> None:
        """Move the failed output's unsent messages to outputs that are up, so an outage of one collector
        loses nothing that was still queued (a template re-sent to a collector that has it is harmless)."""
        if any(q.state is UP for q in self.queues if q is not queue):
            for entry in queue.take_pending():
                self._choose(len(entry[MSG])).enqueue(entry)

    def on_up(self, queue: SendQueue) -> None:
        """An output is up (again): what waits at outputs that are still down moves to the live ones, so a
        leaving session's messages reach the first collector back, not only their own."""
        for other in self.queues:
            if other is not queue and other.pending and other.state is not UP and other.state is not PROBATION:
                self.on_down(other)


#: the dispatcher class of each forwarding mode (``Disabled`` records instead)
FORWARDERS: dict[Mode, type[Forwarder]] = {Mode.ROUND_ROBIN: RoundRobin, Mode.ALL: Replicate}
