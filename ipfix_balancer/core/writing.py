"""How an output's connection takes the messages its send queue holds: a stream commits a run of them and
writes it with one ``sendmsg`` (``StreamWriter``); a datagram socket sends each as one datagram, many per
``sendmmsg`` (``DatagramWriter``).

A message handed to the kernel is *committed* to that connection; a message still queued is not, and may
still move to another output. The sequence number is written at the last moment (``core.sequencer``), and
only what the kernel took leaves the queue's byte count (``SendQueue.account``).
"""

from __future__ import annotations

import bisect
from itertools import accumulate, islice, repeat
from typing import TYPE_CHECKING, Callable, Sequence

from .entry import MSG, Entry, entries_size
from .wire import Message

if TYPE_CHECKING:
    from .sendqueue import SendQueue

IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV; sysconf is I/O's business); one per entry


class StreamWriter:
    """What a stream connection took from the queue and the kernel has not taken yet: ``bufs`` to write (the
    first one maybe cut), ``entries``, and ``ends``: where each entry ends in the run committed since the
    kernel last took everything, of which it took ``offset`` bytes. (Absolute ends: a partial write costs
    a step per message it completed, not per message still committed.)"""

    __slots__ = ("bufs", "ends", "entries", "offset", "queue", "pending", "sequencer", "acks", "stats")

    def __init__(self, queue: SendQueue) -> None:
        self.queue = queue
        self.pending, self.sequencer, self.acks, self.stats = queue.pending, queue.sequencer, queue.acks, queue.stats
        self.clear()

    def clear(self) -> None:
        self.bufs: list[Message] = []
        self.ends: list[int] = []
        self.entries: list[Entry] = []
        self.offset = 0

    @property
    def head_written(self) -> int:
        """Bytes of the first entry written already (then its rest must follow on this connection)."""
        entries = self.entries
        return len(entries[0][MSG]) - (self.ends[0] - self.offset) if entries else 0

    def next_iovec(self) -> list[Message]:
        """The committed buffers to write, after committing queued entries up to IOV_MAX buffers (one
        ``sendmsg``). A run of entries is taken, numbered and measured in C-level steps."""
        pending, bufs = self.pending, self.bufs
        free = IOV_MAX - len(bufs)
        if not pending or free <= 0:
            return bufs
        if len(pending) <= free:
            batch = list(pending)
            pending.clear()
        else:
            popleft = pending.popleft
            batch = [popleft() for _ in range(free)]
        self.entries += batch
        msgs = self.sequencer.number_stream(batch)
        ends = self.ends
        sizes = accumulate(map(len, msgs), initial=ends[-1] if ends else 0)
        next(sizes)  # the starting offset itself
        ends += sizes
        bufs += msgs
        return bufs

    def written(self, sent: int) -> bool:
        """The kernel took ``sent`` bytes of ``bufs``: account them. True when all committed bytes went.
        What it took whole is kept until acknowledged (TCP): the bytes stay in the budget, held not
        pending; the log counts them from the start of this write."""
        ends, entries, stats, acks = self.ends, self.entries, self.stats, self.acks
        stats.bytes_out += sent
        base = acks.sent_total
        acks.sent_total = base + sent
        offset = self.offset
        end = offset + sent
        if end == ends[-1]:
            stats.msgs_out += len(ends)
            kept = acks.keep(base, [e - offset for e in ends] if offset else ends, entries) if acks.track else 0
            self.queue.handed(sent, kept)
            self.clear()
            return True
        done = bisect.bisect_right(ends, end)
        stats.msgs_out += done
        kept = acks.keep(base, [e - offset for e in ends[:done]], entries[:done]) if done and acks.track else 0
        self.queue.handed(sent, kept)
        del ends[:done]
        del entries[:done]
        self.offset = end
        bufs = self.bufs
        i = 0
        while sent:  # drop whole buffers sent, slice the one cut in the middle
            n = len(bufs[i])
            if n <= sent:
                sent -= n
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[sent:]
                sent = 0
        self.bufs = bufs[i:]
        return False

    def take_back(self) -> list[Entry]:
        """The entries not yet started (a stall) leave, their numbers given back; one cut in the middle
        stays."""
        entries, ends = self.entries, self.ends
        keep = 1 if self.head_written else 0
        back = entries[keep:]
        if back:
            self.sequencer.take_back(back)
            if not keep:
                self.clear()
                return back
            bufs, left, i = self.bufs, ends[0] - self.offset, 0
            while left > 0:  # the buffers that make up the rest of the head message
                left -= len(bufs[i])
                i += 1
            self.bufs, self.ends, self.entries = bufs[:i], ends[:1], entries[:1]
        return back


class DatagramWriter:
    """A datagram socket's sends. ``last_sent``: what the last send call took (a refusal loses it)."""

    __slots__ = ("queue", "pending", "sequencer", "last_sent")

    def __init__(self, queue: SendQueue) -> None:
        self.queue = queue
        self.pending, self.sequencer = queue.pending, queue.sequencer
        self.last_sent: Sequence[Entry] = ()

    def send(self, send: Callable[[object], object], most: int = -1) -> bool:
        """Hand each queued message to ``send`` as one datagram (a bytes-like), oldest first, at most ``most``
        (-1: all). False when ``send`` raised BlockingIOError (the kernel is full), else True. A message
        leaves the queue only once ``send`` returned, so any other error propagates with it still first (a
        refusal leaves it for re-dispatch; ``drop_first`` for one that can never go)."""
        pending, number_and_send = self.pending, self.sequencer.send
        msgs = nbytes = 0
        last = None
        try:
            while pending and msgs != most:
                entry = pending[0]
                number_and_send(entry, send)
                pending.popleft()
                msgs += 1
                nbytes += len(entry[MSG])
                last = entry
        except BlockingIOError:
            return False
        finally:
            if last is not None:
                self.last_sent = (last,)
            self._sent(msgs, nbytes)
        return True

    def send_batch(self, send_many: Callable[[list[Message]], int], batch: int) -> bool:
        """``send`` with one call per up to ``batch`` datagrams (``sendmmsg``): ``send_many(bufs)`` returns
        how many of ``bufs`` the kernel took, oldest first, and raises only when it took none. Only what it
        took leaves the queue (and advances the sequence numbers); after a short count the next call starts
        at the first datagram not taken, and raises its error if it has one."""
        pending = self.pending
        while pending:
            entries = list(islice(pending, batch))
            # Numbered once, then handed to the kernel call after call (a call takes a segmentation run
            # or up to its own batch): numbering the rest again per call cost a step per message per call.
            bufs, after = self.sequencer.number_datagrams(entries)
            done, count = 0, len(entries)
            try:
                while done < count:
                    sent = send_many(bufs[done:] if done else bufs)
                    self.last_sent = entries[done:done + sent]
                    done += sent
            except BlockingIOError:
                return False
            finally:  # what the kernel took leaves the queue, also when a call raised
                if done:
                    self._took(entries, done, after)
        return True

    def _took(self, entries: list[Entry], done: int, after: list[int] | None) -> None:
        """The kernel took the first ``done`` of ``entries`` (the queue's oldest): they leave the queue and
        take their sequence numbers."""
        pending = self.pending
        taken = entries if done == len(entries) else entries[:done]
        if done == len(pending):
            pending.clear()
        else:
            popleft = pending.popleft
            for _ in repeat(None, done):
                popleft()
        self.sequencer.advance(taken, after)
        self._sent(done, entries_size(taken))

    def _sent(self, msgs: int, nbytes: int) -> None:
        queue = self.queue
        stats = queue.stats
        stats.msgs_out += msgs
        stats.bytes_out += nbytes
        queue.acks.sent_total += nbytes
        queue.handed(nbytes, 0)

    def take_refused(self) -> Sequence[Entry]:
        """What the last send took, once: a refusal came back for it."""
        lost, self.last_sent = self.last_sent, ()
        return lost
