"""Who gets an exporter session, and who loses one to make room.

A slot is worth what it delivers: a session counts as active only by its *whole* messages (a byte a second
keeps no slot), one that has not delivered its first whole message within FIRST_MESSAGE_SECONDS is closed,
and at a cap the sessions that never delivered one go first, then one idle for IDLE_EVICT_SECONDS, before
a new exporter is refused (a session younger than SILENT_GRACE has not had its turn yet and is spared).
Sources are counted as an operator blocks them: an IPv4 address, an IPv6 /64 (one host owns a whole /64).
New UDP sessions are rate-limited (``Rate``): spoofed source ports cannot make the balancer open
connections to its collectors faster than that. Failed console logins are throttled (``FailureThrottle``).

Pure: the callers pass the time in and carry the verdicts out (``net/listener.py``, ``console/app.py``).
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Hashable, TypeVar

FIRST_MESSAGE_SECONDS = 10.0  # a TCP session's first whole message must come within this
IDLE_EVICT_SECONDS = 10.0  # at a cap, a session without a whole message for this long makes room
SILENT_GRACE = 1.0  # ... and one without any after this long: a connection just accepted has had no turn yet
UDP_NEW_PER_SECOND = 100.0  # new UDP exporter sessions per second (the burst is the same number)

K = TypeVar("K", bound=Hashable)


def source_of(host: str) -> str:
    """The source a per-source cap counts: an IPv4 address (also IPv4-mapped IPv6), an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Slot:
    __slots__ = ("source", "opened", "last_message")

    def __init__(self, source: str, opened: float):
        self.source = source
        self.opened = opened
        self.last_message: float | None = None  # None: no whole message yet


class Admission(Generic[K]):
    """The sessions of one listener, by key (a TCP connection, a UDP address), and the caps on them."""

    def __init__(self, max_sessions: int, max_per_source: int):
        self.max_sessions = max_sessions
        self.max_per_source = max_per_source
        self._slots: dict[K, _Slot] = {}
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: K) -> bool:
        return key in self._slots

    def admit(self, source: str, now: float) -> tuple[str | None, list[K]]:
        """May a new session from ``source`` open now? (None, the sessions to close first), or (the reason
        it is refused, []). The caller closes those and then ``add``s the new one."""
        evict: list[K] = []
        if self._per_source.get(source, 0) >= self.max_per_source:
            victim = self._victim(now, source)
            if victim is None:
                return "max_sessions_per_source", []
            evict.append(victim)
        elif len(self._slots) >= self.max_sessions:
            victim = self._victim(now)
            if victim is None:
                return "max_sessions", []
            evict.append(victim)
        return None, evict

    def _victim(self, now: float, source: str | None = None) -> K | None:
        """The session to close for a new one: the oldest that never delivered a whole message in the
        SILENT_GRACE since it opened, else the one idle longest if that is IDLE_EVICT_SECONDS or more
        (``source``: among that source's only)."""
        never, idlest, idle_for = None, None, IDLE_EVICT_SECONDS
        for key, slot in self._slots.items():
            if source is not None and slot.source != source:
                continue
            if slot.last_message is None:
                if now - slot.opened < SILENT_GRACE:
                    continue
                if never is None or slot.opened < self._slots[never].opened:
                    never = key
            elif now - slot.last_message >= idle_for:
                idlest, idle_for = key, now - slot.last_message
        return never if never is not None else idlest

    def add(self, key: K, source: str, now: float) -> None:
        self._slots[key] = _Slot(source, now)
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def delivered(self, key: K, now: float) -> None:
        """``key`` delivered a whole message (the only thing that counts as activity)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.last_message = now

    def remove(self, key: K) -> None:
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        left = self._per_source[slot.source] - 1
        if left:
            self._per_source[slot.source] = left
        else:
            del self._per_source[slot.source]

    def overdue(self, now: float, deadline: float = FIRST_MESSAGE_SECONDS) -> list[K]:
        """Sessions that did not deliver their first whole message within ``deadline`` of opening."""
        return [k for k, s in self._slots.items() if s.last_message is None and now - s.opened > deadline]

    def idle(self, now: float, timeout: float) -> list[K]:
        """Sessions without a whole message for ``timeout`` (0: never), counted from their last one (from
        their opening before their first)."""
        if not timeout:
            return []
        return [k for k, s in self._slots.items()
                if now - (s.opened if s.last_message is None else s.last_message) >= timeout]

    def never_delivered(self, key: K) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.last_message is None


class Rate:
    """A token bucket: at most ``per_second`` events a second on average, ``per_second`` at once."""

    def __init__(self, per_second: float = UDP_NEW_PER_SECOND):
        self.per_second = per_second
        self._tokens = per_second
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.per_second, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class FailureThrottle:
    """Failed attempts (console logins) counted per address and in all over a sliding ``window``: past
    ``per_address`` for one address, or ``overall`` in all, further attempts are refused unheard until the
    window lets the oldest failures go. Guessing stays slow from any number of addresses, and the table
    holds at most ``overall`` failures."""

    def __init__(self, per_address: int = 5, overall: int = 20, window: float = 60.0):
        self.per_address, self.overall, self.window = per_address, overall, window
        self._failures: list[tuple[float, str]] = []  # (when, address), oldest first

    def _forget(self, now: float) -> None:
        while self._failures and now - self._failures[0][0] >= self.window:
            self._failures.pop(0)

    def blocked(self, address: str, now: float) -> bool:
        """May ``address`` not try now?"""
        self._forget(now)
        return (len(self._failures) >= self.overall
                or sum(1 for _, a in self._failures if a == address) >= self.per_address)

    def failed(self, address: str, now: float) -> None:
        self._forget(now)
        self._failures.append((now, address))
        del self._failures[:-self.overall]  # never more than ``overall`` kept
