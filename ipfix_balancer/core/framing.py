"""Cut IPFIX transport into whole messages (RFC 7011 §3.1 message header).

The shape is asyncio's ``BufferedProtocol``: the caller reads into ``get_buffer()`` and reports the byte
count to ``feed(n)``, which returns the whole messages. No socket is touched here.

Zero-copy by construction: messages are handed out as memoryviews into the chunks reads land in, and a
chunk is reused only once no view of it is left (``ChunkPool``), so a message still waiting in an output
queue, or written and not yet acknowledged, can never be overwritten. Only the incomplete tail of a read
(less than one message) is copied, into the start of the next chunk.
"""

from __future__ import annotations

import struct
from collections import deque
from itertools import repeat
from operator import add

from .wire import HEADER_LEN, MAX_MESSAGE, VERSION, VERSION_LENGTH, FramingError, Message, header_error, walk

_VERSION_WORD = VERSION.to_bytes(2, "big")

__all__ = ["ChunkPool", "DatagramReader", "DatagramSlots", "FramingError", "StreamFramer", "all_whole",
           "check_datagram"]


class ChunkPool:
    """Full-size read chunks of one process, handed out again once nothing points into them.

    A fresh bytearray costs a zero fill and, whenever the allocator had given the memory back to the
    kernel, a page fault per 4 KiB. Messages written and not yet acknowledged keep their chunks alive for
    a while, and that pattern made glibc trim and re-fault the heap about once per 25 messages (8% of a
    handler's CPU). A chunk is free when it can be resized: a bytearray refuses that (BufferError) while
    any memoryview of it lives, which is exactly "no message points into it". Bounded: at most ``keep``
    chunks are kept; beyond that, chunks are plain allocations again.
    """

    __slots__ = ("size", "keep", "_chunks")
    TRIES = 4  # the oldest chunks checked per take: in a FIFO stream, the oldest is free first

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        self._chunks: deque[bytearray] = deque()

    def take(self) -> bytearray:
        chunks = self._chunks
        for _ in range(min(self.TRIES, len(chunks))):
            chunk = chunks[0]
            chunks.rotate(-1)
            try:
                chunk.pop()  # a chunk still viewed refuses before it changes (no realloc either way)
            except BufferError:
                continue
            chunk.append(0)
            return chunk
        chunk = bytearray(self.size)
        if len(chunks) < self.keep:
            chunks.append(chunk)
        return chunk


#: the chunks of every busy TCP session of a handler: 32 x 256 KiB at most (8 MiB, a few ms of traffic)
STREAM_CHUNKS = ChunkPool(256 * 1024, 32)


class StreamFramer:
    """Frames one TCP session.

    Reads go one after another into the same chunk until less than a quarter of it is free; only then
    does a new chunk start, taking the incomplete message along (the one copy). Filling chunks matters: a
    queued message keeps its whole chunk alive, so one small read per chunk would let a few thousand
    small queued messages pin gigabytes.

    Chunks are allocated at the first read, start small, and grow only for a busy connection: one that
    filled its chunk in at most ``BUSY_READS`` reads gets one four times larger next (up to ``chunk_size``).
    A busy exporter soon reads 256 KiB at a time, whatever its reads return, while thousands of idle or
    trickling connections cost a few KiB each. ``release()`` lets go of the chunk of
    a connection gone quiet.
    """

    __slots__ = ("chunk_size", "_size", "_view", "_start", "_end", "_held", "_reads", "_pool")
    MIN_READ = 64 * 1024  # free room asked of a full-size chunk (a quarter of it)
    FIRST_CHUNK = 16 * 1024
    BUSY_READS = 4  # reads that filled a chunk: at most this many, and the connection is busy

    def __init__(self, chunk_size: int = 256 * 1024, tail: bytes = b"", pool: ChunkPool = STREAM_CHUNKS):
        # Room for a whole message of the largest size plus a worthwhile read, whatever is asked.
        self.chunk_size = max(chunk_size, MAX_MESSAGE + self.MIN_READ)
        self._pool = pool if pool.size == self.chunk_size else None  # full-size chunks come from it
        self._size = self.FIRST_CHUNK  # the size of the next chunk
        self._view: memoryview | None = None
        self._start = self._end = 0
        self._held = bytes(tail)  # without a chunk: the start of a message already read (handover, release)

    def _new_chunk(self, carry: Message) -> None:
        size = max(self._size, 2 * len(carry))  # 2x: a long message always fits in time
        view = memoryview(self._pool.take() if size == self.chunk_size and self._pool else bytearray(size))
        view[:len(carry)] = carry
        self._view, self._start, self._end, self._reads = view, 0, len(carry), 0

    def get_buffer(self) -> memoryview:
        """Where the next read goes (at least a quarter of the chunk)."""
        view = self._view
        if view is None:
            self._new_chunk(self._held)
            self._held = b""
        elif len(view) - self._end < len(view) >> 2:
            if self._reads <= self.BUSY_READS and self._size < self.chunk_size:
                self._size = min(self._size * 4, self.chunk_size)
            self._new_chunk(view[self._start:self._end])
        return self._view[self._end:]  # type: ignore[index]  # _new_chunk made one

    def feed(self, n: int) -> tuple[list[memoryview], FramingError | None]:
        """``n`` bytes were read into the last ``get_buffer()``: the whole messages now complete, and the
        error when a header cannot be IPFIX. Messages before a bad header are returned, the bytes after it
        discarded: a TCP stream offers no safe point to resynchronise, so the caller closes the session."""
        self._end += n
        self._reads += 1
        view: memoryview = self._view  # type: ignore[assignment]  # get_buffer() made one
        out: list[memoryview] = []
        self._start, error = walk(view, self._start, self._end, out.append)
        if error is not None:
            self._start = self._end
        return out, error

    def release(self) -> None:
        """The connection went quiet: drop our reference to the chunk (queued messages keep what they use)
        and keep only the part of a message already read; the next chunk starts small again."""
        if self._view is not None:
            self._held = self.tail
            self._view = None
            self._start = self._end = 0
            self._size = self.FIRST_CHUNK

    @property
    def tail(self) -> bytes:
        """The incomplete message held for the next read."""
        return self._held if self._view is None else bytes(self._view[self._start:self._end])

    @property
    def pending(self) -> int:
        return len(self._held) if self._view is None else self._end - self._start


class DatagramReader:
    """Places UDP datagrams (one IPFIX message each) in shared chunks, without a copy per datagram."""

    __slots__ = ("chunk_size", "_view", "_pos")

    def __init__(self, chunk_size: int = 1024 * 1024):
        self.chunk_size = max(chunk_size, 2 * (MAX_MESSAGE + 1))
        self._view = memoryview(bytearray(self.chunk_size))
        self._pos = 0

    def get_buffer(self) -> memoryview:
        """Room for one datagram: MAX_MESSAGE + 1 bytes, so one longer than any IPFIX message is noticed."""
        if self.chunk_size - self._pos < MAX_MESSAGE + 1:
            self._view, self._pos = memoryview(bytearray(self.chunk_size)), 0
        return self._view[self._pos:self._pos + MAX_MESSAGE + 1]

    def feed(self, n: int) -> memoryview:
        """A datagram of ``n`` bytes was received into the last ``get_buffer()``: its view."""
        pos = self._pos
        self._pos = pos + n
        return self._view[pos:pos + n]


class DatagramSlots:
    """Where a batched UDP receive (``recvmmsg``) puts its datagrams: consecutive slots of ``slot`` bytes in
    chunks of ``count`` slots. A read fills the free slots of the current chunk from the first free one, so a
    chunk fills up whatever the batch sizes, and a queued datagram pins about one slot, not a whole batch. A
    chunk comes from a ``ChunkPool``: reused only once no datagram view points into it. A datagram longer
    than its slot runs on into the spill area of its slot position (one per position, MAX_MESSAGE + 1 - slot
    bytes, shared by every chunk) and is copied out at once: IPFIX over UDP rarely exceeds a 1,500-byte MTU."""

    __slots__ = ("slot", "count", "pool", "spill", "spill_size", "chunk", "first", "whole")

    def __init__(self, slot: int = 2048, count: int = 64, keep: int = 64):
        self.slot = slot
        self.count = count
        self.pool = ChunkPool(slot * count, keep)
        self.spill_size = MAX_MESSAGE + 1 - slot
        self.spill = bytearray(self.spill_size * count)
        self.chunk: bytearray | None = None
        self.first = count  # the first free slot of ``chunk``
        self.whole = False  # every datagram of the last read holds exactly one whole message

    def next_read(self) -> bool:
        """Before a read: True when it goes into a new chunk (``chunk``, from slot 0); the read may fill
        slots ``first`` .. ``count - 1``."""
        if self.first < self.count:
            return False
        self.chunk = self.pool.take()
        self.first = 0
        return True

    def received(self, lengths: list[int]) -> list[memoryview]:
        """The read filled the next ``len(lengths)`` slots with datagrams of these lengths: their views
        (a copy for one that ran into the spill area). Sets ``whole``: what ``all_whole`` would say of them,
        read from every slot's header at once (the slots are evenly spaced)."""
        slot, first = self.slot, self.first
        view = memoryview(self.chunk)  # type: ignore[arg-type]  # next_read() made one
        count, half, longest = len(lengths), slot // 2, max(lengths)
        words = view.cast("H")  # a slot's header starts (version, length): its 1st and 2nd 16-bit words
        self.whole = (min(lengths) >= HEADER_LEN and longest <= MAX_MESSAGE
                      and words[first * half:(first + count) * half:half].tobytes() == _VERSION_WORD * count
                      and words[first * half + 1:(first + count) * half:half].tobytes()
                      == struct.pack(f"!{count}H", *lengths))
        starts = range(first * slot, (first + count) * slot, slot)
        out = list(map(view.__getitem__, map(slice, starts, map(add, starts, lengths))))  # C-level steps
        if longest > slot:
            for i, n in enumerate(lengths):
                if n > slot:
                    spilled = (first + i) * self.spill_size
                    joined = bytearray(out[i][:slot])  # writable: RoundRobin renumbers in place
                    joined += self.spill[spilled:spilled + n - slot]
                    out[i] = memoryview(joined)
        self.first = first + count
        return out


def check_datagram(msg: memoryview) -> None:
    """A datagram must carry exactly one whole message: header length == datagram size."""
    if len(msg) < HEADER_LEN:
        raise FramingError("short_datagram", f"datagram of {len(msg)} bytes, shorter than the {HEADER_LEN}-byte header")
    version, length = VERSION_LENGTH.unpack_from(msg)
    error = header_error(version, length)
    if error is not None:
        raise error
    if length != len(msg):
        raise FramingError("length_mismatch", f"header length {length} but datagram of {len(msg)} bytes")


def all_whole(msgs: list[Message]) -> bool:
    """True when every datagram of a run carries exactly one whole message, checked in C-level steps (the
    common case); otherwise ``check_datagram`` tells which do not, and why."""
    lengths = list(map(len, msgs))
    return min(lengths) >= HEADER_LEN and list(map(VERSION_LENGTH.unpack_from, msgs)) == list(
        zip(repeat(VERSION), lengths))
