"""Whether a handler still turns: decided from its heartbeat, on the monotonic clock.

A handler stamps each status document with ``CLOCK_MONOTONIC`` (Python's ``time.monotonic()``), which
every process of the machine shares and which no NTP step, VM resume or ``date -s`` moves: compared with
the supervisor's own monotonic time, silence is real silence. The wall clock serves only documents of a
handler from before this field (a restart in place from an older version).

Pure: every time is passed in.
"""

from __future__ import annotations

STALE_PERIODS = 3  # a heartbeat older than this many of its periods: the handler is not turning (status)


class Unreadable:
    """The status document could not be read this turn (the supervisor out of descriptors, a permission
    change): that tells nothing about the handler, so it is never silence."""

    def __repr__(self) -> str:
        return "UNREADABLE"


UNREADABLE = Unreadable()


def silence(now: float, started: float, beat: float | None | Unreadable) -> float | None:
    """Seconds since the handler last showed life (its latest heartbeat; before its first one, its start),
    or None when that cannot be told (``UNREADABLE``). ``now``, ``started`` and ``beat`` on one clock."""
    if isinstance(beat, Unreadable):  # (UNREADABLE, the only one; isinstance tells the type checker)
        return None
    return now - (started if beat is None else beat)


def hung(now: float, started: float, beat: float | None | Unreadable, hang_seconds: float) -> float | None:
    """The seconds of silence when they pass ``hang_seconds`` (the supervisor replaces the handler), else None."""
    silent = silence(now, started, beat)
    return silent if silent is not None and silent > hang_seconds else None


def stale(age: float, period: float) -> bool:
    """A heartbeat ``age`` seconds old is older than STALE_PERIODS of its periods (``status`` shows STALE,
    ``/healthz`` answers 503)."""
    return age > STALE_PERIODS * period
