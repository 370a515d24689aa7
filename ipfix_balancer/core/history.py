"""The console's charts' memory: the last hour of each handler's and subreceiver's status, in fixed buckets.

Samples are folded into buckets of ``step`` seconds as they come (sum, count and maximum per metric, the
worst state seen), so memory is ``window / step`` buckets per subject whatever the sampling rate, and the
current bucket is live: a collector going down shows in it at the next sample. Cumulative counters are
turned into per-second rates between two samples of a subject. Time is passed in.
"""

from __future__ import annotations

import collections
import dataclasses
import math

# Worst last: a bucket shows the worst state it saw (a down collector is not hidden by an up one).
STATES = ("up", "idle", "stalled", "down")


@dataclasses.dataclass
class Bucket:
    number: int  # its start is number * step
    count: dict[str, int] = dataclasses.field(default_factory=dict)
    total: dict[str, float] = dataclasses.field(default_factory=dict)
    peak: dict[str, float] = dataclasses.field(default_factory=dict)
    state: str | None = None

    def add(self, values: dict[str, float], state: str | None) -> None:
        for name, value in values.items():
            self.count[name] = self.count.get(name, 0) + 1
            self.total[name] = self.total.get(name, 0.0) + value
            self.peak[name] = max(self.peak.get(name, value), value)
        if state is not None and (self.state is None or _rank(state) > _rank(self.state)):
            self.state = state

    def mean(self, name: str) -> float | None:
        return self.total[name] / self.count[name] if name in self.count else None


def _rank(state: str) -> int:
    return STATES.index(state) if state in STATES else len(STATES)  # an unknown state counts as the worst


@dataclasses.dataclass
class Chart:
    """What a chart draws: bucket start times, and per metric one value per bucket (None: no sample)."""
    times: list[float]
    lines: dict[str, list[float | None]]
    states: list[str | None]


class History:
    def __init__(self, window: float = 3600.0, step: float = 20.0):
        self.window, self.step = window, step
        self.size = math.ceil(window / step)
        self._buckets: dict[str, collections.deque[Bucket]] = {}
        self._last: dict[str, tuple[float, dict[str, float]]] = {}  # key -> (when, counters) of its last sample

    def record(self, key: str, now: float, *, counters: dict[str, float] | None = None,
               gauges: dict[str, float] | None = None, state: str | None = None, at: float | None = None) -> None:
        """One sample of ``key`` taken at ``now``: ``counters`` are cumulative (charted as rates per second
        since the previous sample, measured at ``at``, default ``now``), ``gauges`` are charted as they are.
        A counter that went back (its handler restarted) gives no rate for that sample."""
        at = now if at is None else at
        values = dict(gauges or {})
        last = self._last.get(key)
        if counters is not None:
            if last is not None and at > last[0]:
                elapsed = at - last[0]
                values.update({name: (value - last[1].get(name, 0)) / elapsed for name, value in counters.items()
                               if value >= last[1].get(name, 0)})  # a counter new since then counted from 0
            if last is None or at > last[0]:
                self._last[key] = (at, dict(counters))
        number = math.floor(now / self.step)
        buckets = self._buckets.setdefault(key, collections.deque(maxlen=self.size))
        if not buckets or buckets[-1].number < number:
            buckets.append(Bucket(number))
        elif buckets[-1].number > number:
            return  # the clock went back: a sample cannot go into the past
        buckets[-1].add(values, state)

    def expire(self, now: float) -> None:
        """Forget subjects with no sample in the window (a receiver deleted, a subreceiver removed)."""
        oldest = math.floor((now - self.window) / self.step)
        for key in [k for k, b in self._buckets.items() if b[-1].number < oldest]:
            del self._buckets[key]
            self._last.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._buckets)

    def metrics(self, key: str, prefix: str = "") -> list[str]:
        """The metrics seen for key in the window that start with prefix, sorted."""
        return sorted({name for b in self._buckets.get(key, ()) for name in b.count if name.startswith(prefix)})

    def span(self, key: str, now: float, least: float) -> float:
        """The time a chart of key should cover: back to its oldest sample, at least ``least``, at most the
        window (a console started a minute ago charts ten minutes, not a nearly empty hour)."""
        buckets = self._buckets.get(key)
        covered = (math.floor(now / self.step) - buckets[0].number + 1) * self.step if buckets else 0.0
        return min(self.window, max(least, covered))

    def chart(self, key: str, now: float, metrics: list[str], peak: bool = False, span: float | None = None) -> Chart:
        """Every bucket of the ``span`` (default: the window) ending at now, oldest first: per metric its mean
        (``peak``: its maximum, for a gauge such as queued bytes whose peaks matter) or None where nothing
        was sampled."""
        last = math.floor(now / self.step)
        count = min(self.size, math.ceil((self.window if span is None else span) / self.step))
        numbers = range(last - count + 1, last + 1)
        found = {b.number: b for b in self._buckets.get(key, ())}
        lines: dict[str, list[float | None]] = {m: [] for m in metrics}
        states: list[str | None] = []
        for n in numbers:
            b = found.get(n)
            states.append(b.state if b else None)
            for m in metrics:
                lines[m].append(None if b is None else (b.peak.get(m) if peak else b.mean(m)))
        return Chart([n * self.step for n in numbers], lines, states)
