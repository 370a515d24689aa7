"""What the supervisor learns from its handlers' status documents on every turn of its loop.

- **Heartbeat**: a handler rewrites its document every period from its event loop; a document older than
  ``hang_seconds`` (or none ``hang_seconds`` after the start) means the loop does not turn: hung, stopped
  (SIGSTOP), or stuck in the kernel. The supervisor replaces such a handler.
- **Readiness**: every handler's current process listens (systemd's READY=1).
- **Counters over restarts** (``CounterCarry``) and the ``MetricsSnapshot`` the metrics thread serves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..core import liveness
from . import rundir
from .metrics import DROPPED, DROPPED_RECORDS, HandlerView, MetricsSnapshot, Sample, counter_samples
from .status import load_handler_document

if TYPE_CHECKING:
    from ..config.model import ReceiverConfig

KILLED = (("subreceiver", "handler"), ("reason", "handler_killed"))
_SAMPLES = list[tuple[str, list[tuple[str, str]], float]]  # [name, [[label, value], ...], count]
_CARRIED = {"pid": int, "last": _SAMPLES, "offset": _SAMPLES}  # one handler's entry of ``CounterCarry.to_json``


@dataclasses.dataclass
class _Carried:
    pid: int
    last: dict[Sample, float]    # the latest counters of process pid
    offset: dict[Sample, float]  # counted by earlier processes (or before a counter restarted)


class Child(Protocol):
    """What ``Watch.turn`` reads of a handler the supervisor runs (``supervisor.Child``)."""

    @property
    def rc(self) -> ReceiverConfig: ...
    @property
    def pid(self) -> int | None: ...  # None while no process of it runs
    @property
    def started(self) -> float: ...  # when its process started, on the supervisor's monotonic clock
    @property
    def restarts(self) -> int: ...


_Child = TypeVar("_Child", bound=Child)


class CounterCarry:
    """A handler's counters summed over all its processes. When its pid changes (a restart, a restart in
    place) or a counter falls (a subreceiver removed and added again starts from 0), what had been counted
    becomes an offset, so an exported counter never goes backwards."""

    def __init__(self) -> None:
        self.handlers: dict[str, _Carried] = {}

    def see(self, name: str, pid: int, samples: dict[Sample, float]) -> dict[Sample, float]:
        c = self.handlers.setdefault(name, _Carried(pid, {}, {}))
        if pid != c.pid:
            self._bank(c, c.last)
            c.pid, c.last = pid, {}
        self._bank(c, {k: c.last[k] for k, v in samples.items() if v < c.last.get(k, 0)})
        c.last.update(samples)  # a series that disappears keeps its last value
        return self.totals(name)

    @staticmethod
    def _bank(c: _Carried, counted: dict[Sample, float]) -> None:
        for k, v in counted.items():
            c.offset[k] = c.offset.get(k, 0) + v

    def totals(self, name: str) -> dict[Sample, float]:
        c = self.handlers.get(name)
        if c is None:
            return {}
        return {k: c.offset.get(k, 0) + c.last.get(k, 0) for k in sorted(c.offset.keys() | c.last.keys())}

    def add(self, name: str, counted: dict[Sample, float]) -> None:
        """Counts that no status document will carry (the supervisor's own, for a handler)."""
        self._bank(self.handlers.setdefault(name, _Carried(0, {}, {})), counted)

    def forget(self, name: str) -> None:
        self.handlers.pop(name, None)

    # A supervisor restarting in place hands the carry to its successor through the run directory.
    def to_json(self) -> dict[str, Any]:
        def pairs(d: dict[Sample, float]) -> list[list[Any]]:
            return [[name, [list(kv) for kv in labels], v] for (name, labels), v in d.items()]
        return {name: {"pid": c.pid, "last": pairs(c.last), "offset": pairs(c.offset)}
                for name, c in self.handlers.items()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> CounterCarry:
        """What ``to_json`` wrote (each entry checked by the reader against ``_CARRIED``)."""
        def samples(items: list[Any]) -> dict[Sample, float]:
            return {(name, tuple(tuple(kv) for kv in labels)): v for name, labels, v in items}
        carry = cls()
        for name, c in doc.items():
            carry.handlers[name] = _Carried(c["pid"], samples(c["last"]), samples(c["offset"]))
        return carry


class Watch:
    """Reads the handlers' documents for the supervisor; ``snapshot`` is read by the metrics thread (it is
    replaced whole on each turn, never changed in place)."""

    def __init__(self, run_dir: str, hang_seconds: float) -> None:
        self.run_dir = run_dir
        self.hang_seconds = hang_seconds
        self.carry = CounterCarry()
        self.snapshot = MetricsSnapshot(time.monotonic(), time.time(), hang_seconds)
        self.unreadable: dict[str, str] = {}  # handler name -> why its document could not be read this turn

    def turn(self, children: Iterable[_Child], now: float) -> list[tuple[_Child, float]]:
        """Look at each child (``now`` on the same monotonic clock as ``started``). Returns the running ones
        without a heartbeat for more than hang_seconds, with the seconds of silence (``core.liveness``). A
        document that could not be read is no evidence either way: its handler keeps the view of the last turn
        and is named in ``unreadable``."""
        wall, previous = time.time(), {h.name: h for h in self.snapshot.handlers}
        views, hung, self.unreadable = [], [], {}
        for child in children:
            rc, doc = child.rc, None
            if child.pid is not None:
                beat: float | None | liveness.Unreadable
                try:
                    doc = load_handler_document(rundir.handler_status_path(self.run_dir, rc.stream, rc.index))
                    doc = doc if doc is not None and doc.pid == child.pid else None
                    beat = None if doc is None else now - doc.age(now, wall)  # its heartbeat, on our clock
                except OSError as exc:
                    self.unreadable[rc.name] = str(exc)
                    last = previous.get(rc.name)
                    doc = last.doc if last is not None and last.doc is not None and last.doc.pid == child.pid else None
                    beat = liveness.UNREADABLE
                silent = liveness.hung(now, child.started, beat, self.hang_seconds)
                if silent is not None:
                    hung.append((child, silent))
            counters = (self.carry.see(rc.name, doc.pid, counter_samples(doc)) if doc is not None
                        else self.carry.totals(rc.name))
            views.append(HandlerView(rc.name, rc.stream, rc.index, doc, child.restarts, counters))
        self.snapshot = MetricsSnapshot(now, wall, self.hang_seconds, tuple(views))
        return hung

    def killed(self, name: str) -> tuple[int, int]:
        """The handler ``name`` died without its graceful drain (killed as hung, crashed): what its last
        status said its queues held is lost. Counted as its drops for reason ``handler_killed`` (in the
        carried counters: they survive the restart). Returns (messages, records)."""
        view = next((h for h in self.snapshot.handlers if h.name == name), None)
        if view is None or view.doc is None or not view.doc.queued_msgs:
            return 0, 0
        doc = view.doc
        self.carry.add(name, {(DROPPED, KILLED): doc.queued_msgs, (DROPPED_RECORDS, KILLED): doc.queued_records})
        return doc.queued_msgs, doc.queued_records

    def not_listening(self) -> list[str]:
        """The handlers whose current process has not yet written a document saying it listens."""
        return [h.name for h in self.snapshot.handlers if h.doc is None or not h.doc.listen.listening]

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        views = self.snapshot.handlers
        fresh = sum(1 for h in views if h.fresh(self.snapshot))
        msgs = sum(h.doc.msgs_in for h in views if h.doc is not None)
        drops = sum(h.doc.drops for h in views if h.doc is not None)
        waiting = self.not_listening()
        return (f"{fresh}/{len(views)} handlers healthy, {sum(h.restarts for h in views)} restarts; "
                f"{msgs} messages in, {drops} dropped" + ("; not listening: " + ", ".join(waiting) if waiting else ""))

    def save(self, restarts: dict[str, int]) -> None:
        rundir.write_json(rundir.supervisor_carry_path(self.run_dir),
                          {"counters": self.carry.to_json(), "restarts": restarts})

    def load(self, log: Any) -> dict[str, int]:
        """The carry a predecessor saved (restart in place); returns its restarts per handler. What does not
        read as what ``save`` writes is logged and left out (that handler's counters or restarts start from
        0): a bad entry must not stop the supervisor from starting, nor break the metrics later."""
        path = rundir.supervisor_carry_path(self.run_dir)
        doc = rundir.read_json(path) or {}
        with contextlib.suppress(OSError):
            os.unlink(path)
        counters, bad_counters = rundir.entries(doc, "counters", _CARRIED)
        restarts, bad_restarts = rundir.entries(doc, "restarts", int)
        for reason in bad_counters + bad_restarts:
            log.warning("carry_ignored", reason=reason, effect="counted from 0")
        self.carry = CounterCarry.from_json(counters)
        return restarts
