"""Template replay and refresh for one output: a collector can decode everything a connection carries only
if that connection announced the templates first.

A new connection gets, in front of the next queued message, the templates valid for that message (its
snapshot: a template redefined after it was queued must not be announced before it). UDP collectors expire
templates, so a UDP output re-announces the current ones every ``refresh`` seconds.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .entry import SNAP, Entry
from .templates import Snapshot
from .wire import ODID, U32


class TemplateReplay:
    """``current_snapshot``: the session's templates now. ``complete``: the queue still holds every message of
    the session since it had no templates, so the first connection learns the templates from those messages
    and a replay would only duplicate them."""

    __slots__ = ("current_snapshot", "refresh", "complete")

    def __init__(self, current_snapshot: Callable[[], Snapshot], refresh: float = 0.0):
        self.current_snapshot = current_snapshot
        self.refresh = refresh  # seconds between re-announcements (UDP); 0 = never
        self.complete = not len(current_snapshot())

    def incomplete(self) -> None:
        """A message of the session left the queue without being sent (dropped, or moved elsewhere)."""
        self.complete = False

    @staticmethod
    def entries(snapshot: Snapshot, next_sequence: Callable[[int], int], now: int) -> Iterator[Entry]:
        """The template messages of ``snapshot`` as entries (``now``: their export time), each numbered
        when it is made."""
        return ((memoryview(m), U32.unpack_from(m, ODID)[0], 0, snapshot)
                for m in snapshot.messages(next_sequence, now))

    def on_connection(self, head: Entry | None, next_sequence: Callable[[int], int], now: int) -> list[Entry]:
        """A new connection: the entries to put in front of ``head`` (the next queued entry, or None)."""
        if self.complete:
            self.complete = False  # whatever follows this connection: a later one needs the replay
            return []
        snapshot = head[SNAP] if head is not None else self.current_snapshot()
        return list(self.entries(snapshot, next_sequence, now)) if len(snapshot) else []

    def refreshed(self, next_sequence: Callable[[int], int], now: int) -> Iterable[Entry]:
        """The current templates, to re-announce after everything queued."""
        snapshot = self.current_snapshot()
        return self.entries(snapshot, next_sequence, now) if len(snapshot) else []
