"""The header sequence numbers of one output's connection, per observation domain: a pure object, like the
``Sender`` of IPFIXcol2's forwarder.

RoundRobin gives each collector only some messages, so ``rewrite`` renumbers them: on each connection the
sequence number counts the data records that connection carried per ODID (RFC 7011 §3.1), and a collector
sees no false gaps. A number is written when a connection takes a message, never earlier, so unsent
messages can move to another output; messages taken back after a stall give their numbers back
(``take_back``). Byte-identical forwarding (All) keeps the exporter's numbers; the sequencer then remembers
the last datagram per ODID, so that a template refresh continues the exporter's numbering.
"""

from __future__ import annotations

from itertools import accumulate, repeat
from typing import Callable

from .entry import MSG, NREC, ODID_FIELD, Entry, consume, msg_of, nrec_of, odid_of
from .wire import SEQUENCE, U32, Message

SEQ_MASK = 0xFFFFFFFF


class Sequencer:
    """``next``: the next sequence number per ODID on this connection (``rewrite``); ``last``: the last
    datagram taken per ODID (byte-identical UDP)."""

    __slots__ = ("rewrite", "next", "last")

    def __init__(self, rewrite: bool):
        self.rewrite = rewrite
        self.next: dict[int, int] = {}
        self.last: dict[int, Entry] = {}

    def restart(self) -> None:
        """A new connection: its numbers start at zero."""
        self.next.clear()

    def template_sequence(self, odid: int, head: Entry | None) -> int:
        """The number a template message for ``odid`` carries if sent now (``head``: the next queued entry)."""
        if self.rewrite:
            return self.next.get(odid, 0)
        last = self.last.get(odid)  # byte-identical: the exporter's numbering after its last message
        seq: int
        if last is not None:
            seq = U32.unpack_from(last[MSG], SEQUENCE)[0]
            return seq + last[NREC]
        seq = U32.unpack_from(head[MSG], SEQUENCE)[0] if head is not None else 0
        return seq

    @staticmethod
    def numbered(entry: Entry, n: int) -> Message:
        """The message of ``entry`` carrying sequence number ``n``. A data message is rewritten in place
        (RoundRobin gave it to this output alone); a template message may be shared with other outputs (or
        immutable), so it is copied."""
        msg = entry[MSG]
        if entry[NREC]:
            U32.pack_into(msg, SEQUENCE, n)
            return msg
        return b"".join((msg[:SEQUENCE], U32.pack(n), msg[SEQUENCE + 4:]))

    def _number(self, entries: list[Entry], bufs: list[Message]) -> tuple[list[int], int | None]:
        """Write the numbers into ``bufs`` (the messages of ``entries``; a template message's becomes a
        numbered copy). Returns, per entry, its ODID's next number after it, and the ODID when there was
        only one; ``next`` is left as it was."""
        seq = self.next
        nrecs = list(map(nrec_of, entries))
        odid = entries[0][ODID_FIELD]
        n = seq.get(odid, 0)
        if n + sum(nrecs) <= SEQ_MASK and 0 not in nrecs and len(set(map(odid_of, entries))) == 1:
            # The common run, data messages of one ODID: numbered in C-level steps. (A template message or
            # another ODID in the run, or the counter wrapping, take the step per message below.)
            numbers = list(accumulate(nrecs, initial=n))
            consume(map(U32.pack_into, bufs, repeat(SEQUENCE), numbers))
            del numbers[0]
            return numbers, odid
        after: list[int]
        nxt: dict[int, int]
        after, nxt = [], {}
        for i, entry in enumerate(entries):
            odid, nrec = entry[ODID_FIELD], entry[NREC]
            n = nxt[odid] if odid in nxt else seq.get(odid, 0)
            bufs[i] = self.numbered(entry, n)
            n = nxt[odid] = (n + nrec) & SEQ_MASK
            after.append(n)
        return after, None

    def number_stream(self, entries: list[Entry]) -> list[Message]:
        """The messages of ``entries``, numbered, all taken by the connection now (a stream's commit)."""
        bufs = list(map(msg_of, entries))
        if self.rewrite:
            after, odid = self._number(entries, bufs)
            if odid is not None:
                self.next[odid] = after[-1]
            else:
                self.next.update(zip(map(odid_of, entries), after))  # the last of each ODID wins
        return bufs

    def number_datagrams(self, entries: list[Entry]) -> tuple[list[Message], list[int] | None]:
        """(the messages of ``entries``, numbered; per entry its ODID's next number once it went, or None
        without the rewrite). Nothing advances until ``advance`` says what the kernel took."""
        bufs = list(map(msg_of, entries))
        return bufs, (self._number(entries, bufs)[0] if self.rewrite else None)

    def advance(self, taken: list[Entry], after: list[int] | None) -> None:
        """The kernel took ``taken``, the first of the entries numbered with ``after``."""
        if after is not None:
            self.next.update(zip(map(odid_of, taken), after))  # the last of each ODID wins
        else:
            self.last.update(zip(map(odid_of, taken), taken))  # for the template refresh (UDP only)

    def send(self, entry: Entry, send: Callable[[object], object]) -> None:
        """Hand ``entry`` to ``send`` as one datagram, numbered; its numbers count only once ``send``
        returned."""
        msg, odid, nrec, _snap = entry
        if not self.rewrite:
            send(msg)
            self.last[odid] = entry
            return
        n = self.next.get(odid, 0)
        send(self.numbered(entry, n))
        if nrec:
            self.next[odid] = (n + nrec) & SEQ_MASK

    def take_back(self, entries: list[Entry]) -> None:
        """Committed ``entries`` go back to the queue unsent (a stall): their numbers are free again."""
        if self.rewrite:
            seq = self.next
            for entry in entries:
                seq[entry[ODID_FIELD]] = (seq[entry[ODID_FIELD]] - entry[NREC]) & SEQ_MASK
