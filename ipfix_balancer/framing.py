"""Cut IPFIX transport into whole messages (RFC 7011 §3.1 message header).

Zero-copy by construction: every ``recv_into`` fills a *fresh* chunk, and messages are handed out as
memoryviews into it. A chunk is never reused, so a message still waiting in an output queue can never be
overwritten; it lives exactly as long as something references it. Only the incomplete tail of a read (less
than one message) is copied, into the start of the next chunk.
"""

from __future__ import annotations

import struct

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence number, observation domain id
HEADER_LEN = HEADER.size
MAX_MESSAGE = 65535
_VERSION_LENGTH = struct.Struct("!HH")


class FramingError(Exception):
    """The byte stream is not IPFIX: ``reason`` is a short counter name, ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_header(version: int, length: int) -> None:
    if version != VERSION:
        raise FramingError("bad_version", f"version {version}, expected {VERSION}")
    if length < HEADER_LEN:
        raise FramingError("bad_length", f"message length {length}, expected {HEADER_LEN}..{MAX_MESSAGE}")


class StreamFramer:
    """Frames one TCP session. ``recv(sock)`` reads once; ``messages`` then holds the complete messages.

    Reads go one after another into the same chunk until less than ``MIN_READ`` is free; only then does
    a new chunk start, taking the incomplete message along (the one copy). Filling chunks matters: a
    queued message keeps its whole chunk alive, so one small read per chunk would let a few thousand
    small queued messages pin gigabytes.
    """

    __slots__ = ("chunk_size", "_view", "_start", "_end", "messages")
    MIN_READ = 64 * 1024

    def __init__(self, chunk_size: int = 256 * 1024, tail: bytes = b""):
        # Room for a whole message of the largest size plus a worthwhile read, whatever is asked.
        self.chunk_size = max(chunk_size, MAX_MESSAGE + self.MIN_READ)
        self._new_chunk(tail)  # tail: the start of a message a predecessor had read (handover)
        self.messages: list[memoryview] | tuple = ()

    def _new_chunk(self, carry) -> None:
        view = memoryview(bytearray(self.chunk_size))
        view[:len(carry)] = carry
        self._view, self._start, self._end = view, 0, len(carry)

    def recv(self, sock) -> int:
        """Read what the socket has (one ``recv_into``) and frame it. Returns bytes read; 0 means EOF.

        Raises ``FramingError`` on a header that cannot be IPFIX; the session must then be closed, since
        a TCP stream offers no safe point to resynchronise. Messages before the bad header are delivered.
        """
        self.messages = ()  # nothing from an earlier read may be delivered twice
        if self.chunk_size - self._end < self.MIN_READ:
            self._new_chunk(self._view[self._start:self._end])
        n = sock.recv_into(self._view[self._end:])
        if n:
            self._end += n
            self._frame()
        return n

    def _frame(self) -> None:
        view, pos, end = self._view, self._start, self._end
        out = []
        unpack = _VERSION_LENGTH.unpack_from
        while end - pos >= HEADER_LEN:
            version, length = unpack(view, pos)
            if version != VERSION or length < HEADER_LEN:
                self.messages, self._start = out, end  # nothing after a bad header is usable
                check_header(version, length)
            if pos + length > end:
                break
            out.append(view[pos:pos + length])
            pos += length
        self._start = pos
        self.messages = out

    @property
    def tail(self) -> bytes:
        """The incomplete message held for the next read."""
        return bytes(self._view[self._start:self._end])

    @property
    def pending(self) -> int:
        return self._end - self._start


class DatagramReader:
    """Reads UDP datagrams (one IPFIX message each) into shared chunks, without a copy per datagram."""

    __slots__ = ("chunk_size", "_buf", "_view", "_pos")

    def __init__(self, chunk_size: int = 1024 * 1024):
        self.chunk_size = max(chunk_size, 2 * (MAX_MESSAGE + 1))
        self._new_chunk()

    def _new_chunk(self) -> None:
        self._buf = bytearray(self.chunk_size)
        self._view = memoryview(self._buf)
        self._pos = 0

    def recv(self, sock) -> tuple[memoryview, tuple]:
        """Receive one datagram; returns (message view, peer address). Raises BlockingIOError when empty.

        Reads up to MAX_MESSAGE + 1 bytes so that a datagram longer than any IPFIX message is noticed.
        """
        if self.chunk_size - self._pos < MAX_MESSAGE + 1:
            self._new_chunk()
        pos = self._pos
        n, peer = sock.recvfrom_into(self._view[pos:pos + MAX_MESSAGE + 1])
        self._pos = pos + n
        return self._view[pos:pos + n], peer


def check_datagram(msg: memoryview) -> None:
    """A datagram must carry exactly one whole message: header length == datagram size."""
    if len(msg) < HEADER_LEN:
        raise FramingError("short_datagram", f"datagram of {len(msg)} bytes, shorter than the {HEADER_LEN}-byte header")
    version, length = _VERSION_LENGTH.unpack_from(msg)
    check_header(version, length)
    if length != len(msg):
        raise FramingError("length_mismatch", f"header length {length} but datagram of {len(msg)} bytes")
