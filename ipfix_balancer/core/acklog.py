"""What one TCP output wrote and its collector has not acknowledged: kept, so that a collector's death costs
only what its own kernel acknowledged and its process never read.

Offsets count this connection's byte stream (``sent_total``: what the kernel took; ``acked``: what the
collector's TCP acknowledged). One item per write not yet acknowledged whole: (base offset, ends from base,
entries); once let go under memory pressure (``let_go``) the entries are replaced by their record counts (a
tuple). Kept bytes are ``held``: the queue counts them in the handler's memory budget (the methods that
let some go return how many).

The *acknowledged tail* is (end offset, messages, records) of the last acknowledged writes, up to the most
the collector's buffer can hold unread (the lifecycle's ``unread_bound``): counted as lost if a reset
discards it, cleared once the collector shows it read it.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import TYPE_CHECKING, TypeAlias, cast

from .entry import Entry, nrec_of
from .lifecycle import COUNT, DELIVERED

if TYPE_CHECKING:
    from .sendqueue import SubreceiverStats

#: one write not yet acknowledged whole: (base offset, ends from base, its entries or, let go, their record
#: counts)
Kept: TypeAlias = tuple[int, list[int], list[Entry] | tuple[int, ...]]


class AckLog:
    """``track``: a stream transport reports acknowledgements (UDP: nothing is kept)."""

    __slots__ = ("stats", "track", "sent_total", "acked", "unacked", "held", "tail")

    def __init__(self, stats: SubreceiverStats) -> None:
        self.stats = stats    # the subreceiver's counters: what a failure loses is counted there
        self.track = False
        self.sent_total = 0
        self.acked = 0
        self.unacked: deque[Kept] = deque()
        self.held = 0
        self.tail: deque[tuple[int, int, int]] = deque()  # (end offset, messages, records)

    @property
    def outstanding(self) -> int:
        """Bytes written and not yet acknowledged."""
        return self.sent_total - self.acked if self.track else 0

    def keep(self, base: int, ends: list[int], entries: list[Entry]) -> int:
        """Written whole by the kernel from offset ``base``: kept until acknowledged. Returns the bytes."""
        self.unacked.append((base, ends, entries))
        self.held += ends[-1]
        return ends[-1]

    def acknowledged(self, upto: int, keep_tail: int) -> int:
        """The collector's TCP acknowledged the stream up to byte ``upto``: forget the messages that end by
        then (a write at a time), keeping ``keep_tail`` bytes of them as the acknowledged tail. Returns the
        bytes no longer held."""
        self.acked = upto
        unacked, tail = self.unacked, self.tail
        released = 0
        while unacked and unacked[0][0] + unacked[0][1][-1] <= upto:
            base, ends, entries = unacked.popleft()
            # (``x.__class__ is list`` here and below: the cheapest type test, and this runs per acknowledged
            # write; a tuple holds the record counts of entries let go. mypy narrows only the ``is`` branch
            # of such a test: the others say what they hold with a ``cast``, or here, per write, an ignore.)
            if entries.__class__ is list:
                released += ends[-1]
                if keep_tail:
                    tail.append((base + ends[-1], len(entries), sum(map(nrec_of, entries))))
            elif keep_tail:
                tail.append((base + ends[-1], len(entries), sum(entries)))  # type: ignore[arg-type]
        self.held -= released
        while tail and tail[0][0] < upto - keep_tail:
            tail.popleft()
        return released

    def read_all(self) -> None:
        """The collector showed it read everything it acknowledged: nothing of it can be lost any more."""
        self.tail.clear()

    def let_go(self, nbytes: float) -> int:
        """The memory budget needs ``nbytes``: stop keeping the oldest written messages for a re-send (at
        least ``nbytes`` of them, or all; returns how many). Lost only if the connection then fails before
        they are acknowledged."""
        unacked, released = self.unacked, 0
        for i in range(len(unacked)):
            if released >= nbytes:
                break
            base, ends, entries = unacked[i]
            if entries.__class__ is list:
                unacked[i] = (base, ends, tuple(map(nrec_of, entries)))
                released += ends[-1]
        self.held -= released
        return released

    def held_counts(self) -> tuple[int, int]:
        """(messages, data records) written and not acknowledged."""
        msgs = records = 0
        upto = self.acked
        for base, ends, entries in self.unacked:
            first = bisect.bisect_right(ends, upto - base)
            counts = entries if entries.__class__ is tuple else tuple(map(nrec_of, cast("list[Entry]", entries)))
            msgs += len(counts) - first
            records += sum(counts[first:])
        return msgs, records

    def take(self, reason: str, acked: str = DELIVERED) -> list[Entry]:
        """The connection ended: the written messages not acknowledged whole, oldest first, to send again;
        ``release`` clears the log. Those let go cannot be sent again: counted as
        lost for ``reason``; with ``acked`` ``COUNT`` (a reset: what the collector acknowledged may sit
        unread), so is the acknowledged tail."""
        out: list[Entry] = []
        lost: list[Entry] = []
        upto, msgs, records = self.acked, 0, 0
        for base, ends, entries in self.unacked:
            first = bisect.bisect_right(ends, upto - base)
            if entries.__class__ is list:
                out += entries[first:]
                if acked is COUNT:
                    lost += entries[:first]
            else:
                counts = cast("tuple[int, ...]", entries)
                counted = counts if acked is COUNT else counts[first:]
                msgs += len(counted)
                records += sum(counted)
        if acked is COUNT:
            for _end, n, nrec in self.tail:
                msgs += n
                records += nrec
            if lost:
                self.stats.drop(reason, lost)
        self.tail.clear()
        if msgs:
            self.stats.drop_counts(reason, msgs, records)
        return out

    def release(self) -> int:
        """Forget everything kept; returns the bytes it held."""
        self.unacked.clear()
        held, self.held = self.held, 0
        return held

    def restart(self) -> None:
        """The next connection's stream starts at zero."""
        self.sent_total = self.acked = 0
