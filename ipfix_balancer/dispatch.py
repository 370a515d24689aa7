"""Dispatchers decide which output sessions get a message: RoundRobin spreads, All replicates.

Both keep every collector able to decode what it gets: a message carrying template sets reaches every
output (for a mixed message, the chosen output gets the message and the others a copy holding only its
template sets, so no data record is ever duplicated).
"""

from __future__ import annotations

from .outputs import UP, Output


class All:
    """Every message to every output; each output's queue is bounded on its own, so a slow collector
    loses its oldest messages (counted) instead of stalling the exporter or the other collectors."""

    rewrite_seq = False  # copies are complete: the exporter's sequence numbers stay true

    def __init__(self, outputs: list[Output]):
        self.outputs = outputs

    def dispatch(self, msg, odid: int, nrec: int, tmpl, snapshot) -> None:
        entry = (msg, odid, nrec, snapshot)
        for out in self.outputs:
            out.enqueue(entry)

    def dispatch_many(self, entries: list, size: int) -> None:
        """A run of data-only entries (one read's worth): one queue extension per output."""
        for out in self.outputs:
            out.enqueue_many(entries, size)

    def on_down(self, _output: Output) -> None:
        """A down subreceiver keeps its queue (bounded) and gets it after reconnecting."""


class RoundRobin:
    """Each data message to the next *available* output (connected, with room in its queue)."""

    rewrite_seq = True  # each collector sees only some messages: renumber so it sees no false gaps

    def __init__(self, outputs: list[Output]):
        self.outputs = outputs
        self._next = 0

    def _choose(self, size: int) -> Output:
        """Next output that is up with room; else (all down: session start or outage) the next with room,
        where the message waits for the connection; else the next one, which drops its oldest."""
        outputs = self.outputs
        count = len(outputs)
        start = self._next
        fallback = None
        for i in range(count):
            out = outputs[(start + i) % count]
            if out.pending_bytes + size <= out.limit:
                if out.state is UP:
                    self._next = (start + i + 1) % count
                    return out
                if fallback is None:
                    fallback = (i, out)
        i, out = fallback if fallback is not None else (0, outputs[start % count])
        self._next = (start + i + 1) % count
        return out

    def dispatch(self, msg, odid: int, nrec: int, tmpl, snapshot) -> None:
        target = self._choose(len(msg))
        target.enqueue((msg, odid, nrec, snapshot))
        if tmpl is not None:
            # Template sets are protocol state every collector needs, not payload to spread.
            entry = (tmpl, odid, 0, snapshot)
            for out in self.outputs:
                if out is not target:
                    out.enqueue(entry)

    def dispatch_many(self, entries: list, size: int) -> None:
        """A run of data-only entries. When every output is up with room for its share, output k gets
        ``entries[k::n]``: exactly the message-by-message rotation, without a call per message."""
        outputs = self.outputs
        n = len(outputs)
        share = size // n + 65536  # shares differ by at most one message
        if all(o.state is UP and o.pending_bytes + share <= o.limit for o in outputs):
            start = self._next
            for k in range(min(n, len(entries))):
                part = entries[k::n]
                outputs[(start + k) % n].enqueue_many(part, sum([len(e[0]) for e in part]))
            self._next = (start + len(entries)) % n
            return
        for entry in entries:
            self._choose(len(entry[0])).enqueue(entry)

    def on_down(self, output: Output) -> None:
        """Move the failed output's unsent messages to outputs that are up, so an outage of one collector
        loses nothing that was still queued (a template re-sent to a collector that has it is harmless)."""
        if any(o.state is UP for o in self.outputs if o is not output):
            for entry in output.take_pending():
                self._choose(len(entry[0])).enqueue(entry)
