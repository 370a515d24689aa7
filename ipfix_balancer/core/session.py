"""An exporter session (a TCP connection, or a UDP exporter address+port) and its mirrors.

Each session has its own template tracker and one output (send queue + transport) per subreceiver, so the
template scopes of different exporters never mix at a collector. Where the queues' transports come from
is injected (``make_output``): the session decides, the ``net`` package connects.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from itertools import repeat
from typing import Callable

from ..config.model import Mode, TemplateLimits
from .dispatch import FORWARDERS, Dispatcher
from .entry import Entry
from .sendqueue import SendQueue, State, SubreceiverStats
from .templates import MalformedSet, Snapshot, TemplateLimit, TemplateTracker
from .wire import FramingError, Message


class Counters:
    """What a handler received, summed over all its sessions (sessions come and go, totals stay)."""

    __slots__ = ("msgs_in", "bytes_in", "unknown_template", "connections_total")

    def __init__(self) -> None:
        self.msgs_in = self.bytes_in = self.unknown_template = 0
        self.connections_total = 0  # exporter sessions opened (the handler counts them)


class Lifecycle(enum.Enum):
    OPEN = "open"          # the exporter is there
    DRAINING = "draining"  # the exporter left; its outputs deliver what they hold, together
    GONE = "gone"          # every output closed


#: ``make_output(stats, limit=, rewrite_seq=, move_stalled=, refresh=, stall=, drain_seconds=, current_snapshot=,
#: on_down=, on_closed=, on_settled=)``: a SendQueue whose transport is already attached (and connecting)
OutputFactory = Callable[..., SendQueue]
#: ``on_refused(session, error, first)``: a message was refused (MalformedSet: dropped; TemplateLimit: the
#: session is over a limit); ``first`` is True the first time this session is refused for that reason
RefusalReport = Callable[["ExporterSession", FramingError, bool], None]


class Forwarding:
    """What a session is told to do: the settings its dispatcher and queues are built from."""

    __slots__ = ("mode", "subreceivers", "queue_bytes", "template_refresh", "recorder", "stall_seconds",
                 "template_limits", "drain_seconds")

    def __init__(self, mode: Mode, subreceivers: list[SubreceiverStats], queue_bytes: int,
                 template_refresh: float, recorder: Dispatcher | None = None, stall_seconds: float = 0.0,
                 template_limits: TemplateLimits = TemplateLimits(), drain_seconds: float = 600.0):
        self.mode = mode
        self.subreceivers = subreceivers
        self.queue_bytes = queue_bytes
        self.template_refresh = template_refresh  # 0: no periodic re-send (TCP subreceivers)
        self.recorder = recorder
        self.stall_seconds = stall_seconds  # 0: no stall detection
        self.template_limits = template_limits
        self.drain_seconds = drain_seconds  # after the exporter left: how long its queues may wait


_left = itertools.count()  # the order in which sessions began to drain


def over_drain_limit(sessions: Iterable[ExporterSession], limit: int) -> list[ExporterSession]:
    """The draining sessions past ``limit`` to close now, the first to leave first: a flood of short sessions
    while collectors are away must not hold a handler's descriptors for DRAIN_SECONDS."""
    draining = sorted((s for s in sessions if s.state is Lifecycle.DRAINING), key=lambda s: s.left)
    return draining[:max(0, len(draining) - limit)]


class ExporterSession:
    def __init__(self, peer: str, counters: Counters, make_output: OutputFactory,
                 on_gone: Callable[[ExporterSession], None], templates: Iterable[Message] = (),
                 on_refused: RefusalReport | None = None):
        self.peer = peer
        self.counters = counters
        self.make_output = make_output
        self.on_gone = on_gone
        self.on_refused = on_refused
        self._reported: set[str] = set()  # refusal reasons reported as first already
        self.tracker = TemplateTracker()  # limits come with configure: a predecessor's templates were accepted
        for msg in templates:  # learnt by a predecessor (handover): known before any output connects
            self.tracker.inspect(msg)
        self.queues: list[SendQueue] = []  # every open queue: the dispatcher's, and retired ones draining
        self.state = Lifecycle.OPEN
        self.dispatcher: Dispatcher | None = None
        self.on_templates: Callable[[ExporterSession, int], None] | None = None  # after a template message
        self.msgs_in = 0  # this session's messages (the status lists them per exporter)

    def configure(self, fw: Forwarding) -> None:
        """(Re)build the dispatcher from ``fw``, keeping what can be kept.

        A queue to a subreceiver that stays keeps its connection and content. A new subreceiver gets a new
        output, which replays the templates before any data. A removed one is flushed, then closed. A switch
        between RoundRobin and All starts new output sessions (sequence numbering differs between them), so
        a collector sees a fresh transport session rather than a jump in sequence numbers.
        """
        self.tracker.limits = fw.template_limits
        old = self.dispatcher
        active: list[SendQueue] = []
        if fw.mode is Mode.DISABLED:
            self.dispatcher = fw.recorder
        else:
            cls = FORWARDERS[fw.mode]
            reusable = {}
            if isinstance(old, cls):
                reusable = {q.subreceiver: q for q in old.queues if q.state is not State.CLOSED and not q.closing}
            dispatcher = self.dispatcher = cls(active)
            made: list[SendQueue] = []
            for stats in fw.subreceivers:
                queue = reusable.pop(stats.subreceiver, None)
                if queue is None:
                    queue = self.make_output(stats, limit=fw.queue_bytes, rewrite_seq=cls.rewrite_seq,
                                             move_stalled=cls.move_stalled,
                                             refresh=fw.template_refresh, stall=fw.stall_seconds,
                                             drain_seconds=fw.drain_seconds, current_snapshot=self._snapshot,
                                             on_down=dispatcher.on_down, on_closed=self._queue_closed,
                                             on_settled=self._queue_settled)
                    made.append(queue)
                else:
                    queue.reconfigure(limit=fw.queue_bytes, refresh=fw.template_refresh, stall=fw.stall_seconds,
                                      drain_seconds=fw.drain_seconds)
                queue.dispatched_by(dispatcher)
                active.append(queue)
            for queue in made:  # up while being made (UDP), before the dispatcher had it: it is told now
                if queue.state is State.UP:
                    queue.came_up()
        retired = [q for q in self.queues if q not in active]
        for queue in retired:
            queue.close_when_drained()
        self.queues = active + [q for q in retired if q.state is not State.CLOSED]

    def _snapshot(self) -> Snapshot:
        return self.tracker.snapshot

    def deliver(self, messages: list[Message], stop: bool = True) -> tuple[int, TemplateLimit | None]:
        """The hot path: every whole message of one read. Runs of data-only messages are handed to the
        dispatcher as one batch; a message with template sets goes on its own, in order.

        A message whose sets do not parse is dropped. A message that takes the session over a template limit
        is refused, and with ``stop`` ends the delivery (a TCP session is then closed; UDP datagrams stand
        alone: the next ones go on). Returns (the messages dispatched, the refusal or None): a UDP run with
        one datagram refused is still activity when others were dispatched."""
        tracker = self.tracker
        inspect, dispatcher = tracker.inspect, self.dispatcher
        # (configure made the dispatcher before any delivery: no check per read)
        many = dispatcher.dispatch_many  # type: ignore[union-attr]
        snapshot = tracker.snapshot  # changes only with a message that carries template sets
        run = tracker.inspect_data_run(messages) if len(messages) > 1 else None
        if run is not None:  # the common run (a UDP batch from one exporter): no step per message in Python
            size = sum(map(len, messages))
            many(list(zip(messages, repeat(run[0]), run[1], repeat(snapshot))), size)
            self._count_in(len(messages), size)
            return len(messages), None
        batch: list[Entry] = []
        batch_size = size = dispatched = 0
        refused = None
        for msg in messages:
            n = len(msg)
            size += n
            try:
                odid, nrec, tmpl = inspect(msg)
            except MalformedSet as exc:
                self._refuse(exc)
                continue
            except TemplateLimit as exc:
                self._refuse(exc)
                refused = exc
                if stop:
                    break
                continue
            if tmpl is None:
                batch.append((msg, odid, nrec, snapshot))
                batch_size += n
                continue
            if batch:
                many(batch, batch_size)
                dispatched += len(batch)
                batch, batch_size = [], 0
            snapshot = tracker.snapshot
            dispatcher.dispatch(msg, odid, nrec, tmpl, snapshot)  # type: ignore[union-attr]  # (as above)
            dispatched += 1
            if self.on_templates is not None:
                self.on_templates(self, odid)
        if batch:
            many(batch, batch_size)
            dispatched += len(batch)
        self._count_in(len(messages), size)
        return dispatched, refused

    def _count_in(self, msgs: int, size: int) -> None:
        counters = self.counters
        counters.msgs_in += msgs
        counters.bytes_in += size
        self.msgs_in += msgs

    def _refuse(self, error: FramingError) -> None:
        first = error.reason not in self._reported
        self._reported.add(error.reason)
        if self.on_refused is not None:
            self.on_refused(self, error, first)

    def end(self) -> None:
        """The exporter went away: its outputs keep delivering (reconnecting as needed) until every one of
        them has delivered everything, or their drain deadline passes. They close together: a RoundRobin
        output that stalls late needs its live siblings still there to take its messages."""
        if self.state is not Lifecycle.OPEN:
            return
        self.state = Lifecycle.DRAINING
        self.left = next(_left)
        self.counters.unknown_template += self.tracker.unknown_template
        for queue in list(self.queues):
            queue.close_when_drained()
        self._queue_closed(None)

    def abandon(self, reason: str) -> int:
        """Close every output now, counting what it holds for ``reason``; returns the messages lost."""
        return sum(q.close(reason) for q in list(self.queues))

    @property
    def queued_bytes(self) -> int:
        return sum(q.outstanding for q in self.queues)

    def _queue_settled(self, queue: SendQueue) -> None:
        """A closing output holds nothing more: a retired one closes now; a leaving session's outputs close
        when all of them are settled."""
        if self.dispatcher is None or queue not in getattr(self.dispatcher, "queues", ()):
            queue.close()
        elif self.state is Lifecycle.DRAINING and all(q.settled for q in self.queues):
            for q in list(self.queues):
                q.close()

    def _queue_closed(self, queue: SendQueue | None) -> None:
        if queue in self.queues:
            self.queues.remove(queue)
        if self.state is Lifecycle.DRAINING and not self.queues:
            self.state = Lifecycle.GONE
            self.on_gone(self)
