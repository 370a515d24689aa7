"""The loss ledger: one place that counts every message a handler lost or refused, so the status document,
the metrics, the log at stop and the exit status agree.

It holds each subreceiver's counters (``SubreceiverStats``; the send queues count into them), keeps those of
subreceivers a reload removed (their outputs drain, and what they lost stays lost), adds what the recorders
lost (the current one is asked, replaced ones were added when they closed), the refused input (malformed
messages, by reason) and the UDP listening socket's kernel drops. Pure: the caller reads the kernel and
the recorder and passes the numbers in.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config.model import Endpoint
from .records import Held, Loss
from .sendqueue import Budget, SubreceiverStats
from .session import ExporterSession, Lifecycle

RECORDER = "recorder"  # the drop reason of a recorder's losses (a recorder counts no reasons of its own)


class LossLedger:
    def __init__(self, subreceivers: Iterable[Endpoint] = ()):
        self.subreceivers = [SubreceiverStats(ep) for ep in subreceivers]  # the configured ones, in order
        self._retired: list[SubreceiverStats] = []  # removed by a reload
        self._recorders = 0  # drops of recorders replaced or closed
        self._malformed: dict[str, int] = {}
        self._overflow_base: int | None = None  # the kernel's count when this process took the socket
        self._overflow = 0  # ... and since then, as last read

    # -- what is counted -----------------------------------------------------------------------------
    def subscribe(self, subreceivers: Iterable[Endpoint]) -> None:
        """A reload's subreceivers: one kept keeps its counters; one removed is retired, counters and all."""
        kept = {s.subreceiver: s for s in self.subreceivers}
        self.subreceivers = [kept.pop(ep) if ep in kept else SubreceiverStats(ep) for ep in subreceivers]
        self._retired.extend(kept.values())

    def recorder_closed(self, drops: int) -> None:
        self._recorders += drops

    def refused(self, reason: str) -> int:
        """One malformed (or over a limit) message; returns how many were refused in all."""
        self._malformed[reason] = self._malformed.get(reason, 0) + 1
        return sum(self._malformed.values())

    def kernel_drops(self, n: int | None) -> None:
        """The listening socket's kernel drop count as read now (None: unreadable, the last value stays).
        The first reading is the base: a handed-over socket has a past that is its predecessor's."""
        if n is None:
            return
        if self._overflow_base is None:
            self._overflow_base = n
        self._overflow = n - self._overflow_base

    # -- what is reported ----------------------------------------------------------------------------
    def outputs(self) -> list[SubreceiverStats]:
        """Every subreceiver counted, removed ones included (sums over them never go backwards)."""
        return self.subreceivers + self._retired

    def sent(self) -> tuple[int, int]:
        """Messages and bytes handed to subreceivers, over every one counted."""
        outputs = self.outputs()
        return sum(s.msgs_out for s in outputs), sum(s.bytes_out for s in outputs)

    def loss(self, recorder_drops: int = 0) -> Loss:
        """The totals, with ``recorder_drops`` of the current recorder (counted under RECORDER)."""
        msgs: dict[str, int] = {}
        records: dict[str, int] = {}
        for stats in self.outputs():
            for total, part in ((msgs, stats.drops_by_reason), (records, stats.drop_records_by_reason)):
                for reason, n in part.items():
                    total[reason] = total.get(reason, 0) + n
        recorder = self._recorders + recorder_drops
        if recorder:
            msgs[RECORDER] = recorder
        return Loss(drops=sum(s.drops for s in self.outputs()) + recorder, drop_records=sum(records.values()),
                    drops_by_reason=msgs, drop_records_by_reason=records,
                    malformed=sum(self._malformed.values()), malformed_by_reason=dict(self._malformed),
                    rcvbuf_overflow=self._overflow)


def held(sessions: Iterable[ExporterSession], budget: Budget) -> Held:
    """What the send queues of ``sessions`` hold now: lost if the process dies (the supervisor then counts
    it from the last status), delivered or counted here otherwise."""
    sessions = list(sessions)
    counts = [q.held_counts() for s in sessions for q in s.queues]
    draining = [s for s in sessions if s.state is Lifecycle.DRAINING]
    return Held(queued_bytes=budget.used, memory_bytes=budget.limit, queued_msgs=sum(m for m, _r in counts),
                queued_records=sum(r for _m, r in counts), draining=len(draining),
                draining_bytes=sum(s.queued_bytes for s in draining))
