"""The console's charts' memory: the last hour of each handler's and subreceiver's status, in fixed buckets.

Samples are folded into buckets of ``step`` seconds as they come (count, sum and maximum per metric, the
worst state seen), kept in rings of ``window / step`` slots of plain arrays: a subject costs about
6 KiB per metric whatever the sampling rate or the traffic, and the current bucket is live (a collector
going down shows in it at the next sample). Cumulative counters are turned into per-second rates between
two samples of a subject. Time is passed in.
"""

from __future__ import annotations

import dataclasses
import math
from array import array

# Worst last: a bucket shows the worst state it saw (a down collector is not hidden by an up one).
STATES = ("up", "idle", "stalled", "down")


def _rank(state: str) -> int:
    return STATES.index(state) if state in STATES else len(STATES)  # an unknown state counts as the worst


@dataclasses.dataclass
class Chart:
    """What a chart draws: bucket start times, and per metric one value per bucket (None: no sample)."""
    times: list[float]
    lines: dict[str, list[float | None]]
    states: list[str | None]


class _Subject:
    """One subject's ring: slot ``n % size`` holds bucket n while ``numbers[slot] == n``."""

    def __init__(self, size: int, number: int):
        self.numbers = array("q", [-1]) * size
        self.states: list[str | None] = [None] * size
        # name -> (count, sum, max) per slot
        self.metrics: dict[str, tuple[array[int], array[float], array[float]]] = {}
        self.first = self.newest = number
        self.last: tuple[float, dict[str, float]] | None = None  # (when, counters) of the last sample

    def slot(self, number: int) -> int:
        """The slot of bucket ``number``, emptied first when it still held an older bucket."""
        slot = number % len(self.numbers)
        if self.numbers[slot] != number:
            self.numbers[slot], self.states[slot] = number, None
            for count, total, peak in self.metrics.values():
                count[slot] = total[slot] = peak[slot] = 0
        return slot

    def add(self, number: int, values: dict[str, float], state: str | None) -> None:
        slot = self.slot(number)
        size = len(self.numbers)
        for name, value in values.items():
            if name not in self.metrics:
                self.metrics[name] = (array("q", [0]) * size, array("d", [0.0]) * size, array("d", [0.0]) * size)
            count, total, peak = self.metrics[name]
            peak[slot] = value if not count[slot] else max(peak[slot], value)
            count[slot] += 1
            total[slot] += value
        seen = self.states[slot]
        if state is not None and (seen is None or _rank(state) > _rank(seen)):
            self.states[slot] = state


class History:
    def __init__(self, window: float = 3600.0, step: float = 20.0):
        self.window, self.step = window, step
        self.size = math.ceil(window / step)
        self._subjects: dict[str, _Subject] = {}

    def record(self, key: str, now: float, *, counters: dict[str, float] | None = None,
               gauges: dict[str, float] | None = None, state: str | None = None, at: float | None = None) -> None:
        """One sample of ``key`` taken at ``now``: ``counters`` are cumulative (charted as rates per second
        since the previous sample, measured at ``at``, default ``now``), ``gauges`` are charted as they are.
        A counter that went back (its handler restarted) gives no rate for that sample."""
        at = now if at is None else at
        number = math.floor(now / self.step)
        subject = self._subjects.get(key)
        if subject is None:
            subject = self._subjects[key] = _Subject(self.size, number)
        elif number < subject.newest:
            return  # the clock went back: a sample cannot go into the past
        values = dict(gauges or {})
        last = subject.last
        if counters is not None:
            if last is not None and at > last[0]:
                elapsed = at - last[0]
                values.update({name: (value - last[1].get(name, 0)) / elapsed for name, value in counters.items()
                               if value >= last[1].get(name, 0)})  # a counter new since then counted from 0
            if last is None or at > last[0]:
                subject.last = (at, dict(counters))
        subject.newest = number
        subject.add(number, values, state)

    def expire(self, now: float) -> None:
        """Forget subjects with no sample in the window (a receiver deleted, a subreceiver removed)."""
        oldest = math.floor((now - self.window) / self.step)
        for key in [k for k, s in self._subjects.items() if s.newest < oldest]:
            del self._subjects[key]

    def keys(self) -> list[str]:
        return list(self._subjects)

    def metrics(self, key: str, prefix: str = "") -> list[str]:
        """The metrics sampled for key in the ring that start with prefix, sorted."""
        subject = self._subjects.get(key)
        if subject is None:
            return []
        return sorted(name for name, (count, _, _) in subject.metrics.items()
                      if name.startswith(prefix) and any(count))

    def span(self, key: str, now: float, least: float) -> float:
        """The time a chart of key should cover: back to its oldest sample, at least ``least``, at most the
        window (a console started a minute ago charts ten minutes, not a nearly empty hour)."""
        subject = self._subjects.get(key)
        covered = (math.floor(now / self.step) - subject.first + 1) * self.step if subject else 0.0
        return min(self.window, max(least, covered))

    def chart(self, key: str, now: float, metrics: list[str], peak: bool = False, span: float | None = None) -> Chart:
        """Every bucket of the ``span`` (default: the window) ending at now, oldest first: per metric its mean
        (``peak``: its maximum, for a gauge such as queued bytes whose peaks matter) or None where nothing
        was sampled."""
        last = math.floor(now / self.step)
        count = min(self.size, math.ceil((self.window if span is None else span) / self.step))
        numbers = range(last - count + 1, last + 1)
        subject = self._subjects.get(key)
        lines: dict[str, list[float | None]] = {m: [] for m in metrics}
        states: list[str | None] = []
        for n in numbers:
            slot = n % self.size
            held = subject if subject is not None and subject.numbers[slot] == n else None
            states.append(held.states[slot] if held is not None else None)
            for m in metrics:
                arrays = held.metrics.get(m) if held is not None else None
                if arrays is None or not arrays[0][slot]:
                    lines[m].append(None)
                else:
                    lines[m].append(arrays[2][slot] if peak else arrays[1][slot] / arrays[0][slot])
        return Chart([n * self.step for n in numbers], lines, states)
