"""The send queue of one output: what one exporter session still owes one subreceiver.

Its parts, each a job of its own: the ``Backlog`` (the queue proper, its bound and its drops, the hot path
of every message), the ``Sequencer`` (the numbers a connection's messages carry, RFC 7011 §3.1), the
``AckLog`` (what a TCP collector has not acknowledged), ``TemplateReplay`` (the templates each new
connection gets first) and the writers (``core.writing``: what the kernel takes). The queue ties them to one
connection at a time; every count of loss is kept by reason (``DROP_REASONS``).

The queue decides; a transport (``net.connector.Connector``) does. A stream transport asks for buffers
(``stream.next_iovec``), writes them, reports what the kernel took (``stream.written``) and, once per
flush, how far the collector's TCP acknowledged (``acknowledged``); a datagram transport hands its send
call to ``datagrams.send``. It reports a new connection (``connection_up``) and a lost one
(``connection_lost``). A message handed to the kernel is *committed* to that connection; a message still
queued is not, and may move to another output. The queue's state is its lifecycle's (``core.lifecycle``:
every change checked against its table), mirrored in ``state`` for the hot paths; net and the session
change the queue only through its methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from ..config.model import Endpoint
from .acklog import AckLog
from .backlog import (CONNECTION_LOST, DRAIN_DEADLINE, DRAIN_LIMIT, OVERSIZE, PROBATION, REFUSED, STALLED, UP,
                      Backlog, Budget, Transport)
from .entry import Entry, entries_size, nrec_of
from .lifecycle import COUNT, DELIVERED, OutputLifecycle, State
from .records import SubreceiverStatus
from .replay import TemplateReplay
from .sequencer import Sequencer
from .templates import Snapshot
from .writing import DatagramWriter, StreamWriter

if TYPE_CHECKING:
    from .dispatch import Forwarder

#: what callers take from here (some defined by the queue's parts)
__all__ = ["SendQueue", "SubreceiverStats", "OutputHooks", "Budget", "Transport", "State", "UP", "PROBATION",
           "DELIVERED", "COUNT", "CONNECTION_LOST", "DRAIN_DEADLINE", "DRAIN_LIMIT", "OVERSIZE", "REFUSED",
           "STALLED"]


class SubreceiverStats:
    """Counters for one subreceiver, summed over every output (exporter session) to it."""

    __slots__ = ("subreceiver", "msgs_out", "bytes_out", "drops", "queues", "last_error", "drop_records",
                 "drops_by_reason", "drop_records_by_reason", "resent")

    def __init__(self, subreceiver: Endpoint) -> None:
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

    def drop(self, reason: str, entries: Sequence[Entry]) -> None:
        """Count ``entries`` as lost for ``reason`` (one of DROP_REASONS)."""
        self.drop_counts(reason, len(entries), sum(map(nrec_of, entries)))

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
            unacked_bytes=sum(q.acks.outstanding for q in self.queues),
            draining=sum(1 for q in self.queues if q.closing))


class OutputHooks:
    """Whom a queue tells what happened (injected as one record): its dispatcher when the output goes down
    (``on_down``: move unsent entries elsewhere) or is healthy again (``on_up``); its session when it is
    closing and holds nothing more (``on_settled``) and when it closed (``on_closed``)."""

    __slots__ = ("on_down", "on_up", "on_settled", "on_closed")

    def __init__(self, on_down: Callable[[SendQueue], None] | None = None,
                 on_up: Callable[[SendQueue], None] | None = None,
                 on_settled: Callable[[SendQueue], None] | None = None,
                 on_closed: Callable[[SendQueue], None] | None = None) -> None:
        self.on_down: Callable[[SendQueue], None] | None = on_down
        self.on_up: Callable[[SendQueue], None] | None = on_up
        self.on_settled: Callable[[SendQueue], None] | None = on_settled
        self.on_closed: Callable[[SendQueue], None] | None = on_closed


class SendQueue(Backlog):
    """One output's queue, bounded in bytes. ``rewrite_seq`` makes the header sequence number count this
    connection's data records per ODID (RoundRobin); without it messages go out byte-identical (All)."""

    def __init__(self, stats: SubreceiverStats, *, limit: int, rewrite_seq: bool,
                 current_snapshot: Callable[[], Snapshot], refresh: float = 0.0, stall: float = 0.0,
                 move_stalled: bool = False, drain_seconds: float = 600.0,
                 on_down: Callable[[SendQueue], None] | None = None,
                 on_closed: Callable[[SendQueue], None] | None = None,
                 on_settled: Callable[[SendQueue], None] | None = None,
                 on_up: Callable[[SendQueue], None] | None = None, budget: Budget | None = None):
        super().__init__(stats, limit, TemplateReplay(current_snapshot, refresh), budget)
        self.hooks = OutputHooks(on_down, on_up, on_settled, on_closed)
        # The lifecycle decides the state; the queue mirrors it in ``state`` for its hot paths.
        self.life = OutputLifecycle(stall=stall, move_stalled=move_stalled, drain_seconds=drain_seconds)
        self.life.on_state = self._mirror_state
        self.sequencer = Sequencer(rewrite_seq)
        self.acks = AckLog(stats)
        self.stream = StreamWriter(self)        # what a stream connection took (``next_iovec``, ``written``)
        self.datagrams = DatagramWriter(self)   # a datagram socket's sends
        stats.queues.add(self)
        self.budget.queues.add(self)

    def _mirror_state(self, state: State) -> None:
        self.state = state

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

    def dispatched_by(self, dispatcher: Forwarder) -> None:
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

    @property
    def subreceiver(self) -> Endpoint:
        return self.stats.subreceiver

    @property
    def refresh(self) -> float:
        return self.replay.refresh

    @property
    def closing(self) -> bool:
        """The exporter left (or the subreceiver was removed): the queue closes once settled."""
        return self.life.leaving

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
        entries = stream.entries
        back = self.acks.take(CONNECTION_LOST, acked)
        self.budget.used -= self.acks.release()
        resent = len(back)
        returned = entries_size(back)
        head = stream.head_written
        if head:  # a collector drops a partial message with its connection
            back.append(entries[0])
            returned += head  # its unwritten rest is still counted
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

    def let_go(self, nbytes: float) -> None:
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
        that drew it or, from ``datagrams.send_batch``, every datagram of that call (the port was closed for
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
