"""The IPFIX wire layout in one place (RFC 7011 §3.1 message header, §3.3 set header).

Every module that reads or writes a header field uses these names, and every walk over consecutive
messages (TCP framing, dump recovery, dump export) goes through ``walk``.
"""

from __future__ import annotations

import struct
from typing import Callable, TypeAlias, TypeVar

VERSION = 10
HEADER = struct.Struct("!HHIII")   # version, length, export time, sequence number, observation domain id
HEADER_LEN = HEADER.size
MAX_MESSAGE = 65535
#: largest IPFIX message one UDP datagram can carry (65535 - IP and UDP headers)
UDP_MAX_PAYLOAD = {4: 65507, 6: 65527}

# offsets of the header fields after version and length
EXPORT_TIME = 4
SEQUENCE = 8
ODID = 12

VERSION_LENGTH = struct.Struct("!HH")
U32 = struct.Struct("!I")          # export time, sequence number or ODID, at the offsets above
TIME_SEQUENCE = struct.Struct("!II")

# set ids (RFC 7011 §3.3.2)
TEMPLATE_SET = 2
OPTIONS_TEMPLATE_SET = 3
MIN_DATA_SET = 256
SET_HEADER = struct.Struct("!HH")  # set id, set length; also template id + field count, IE id + length
SET_HEADER_LEN = SET_HEADER.size

#: one whole message as the rooms pass it on: a view into the chunk it was read into, or bytes made here (a
#: template-only copy, a template replay)
Message: TypeAlias = memoryview | bytes
#: what ``walk`` cuts: each message is a slice of the same type (a view of a view, bytes of bytes)
Buffer = TypeVar("Buffer", memoryview, bytes, bytearray)


class FramingError(Exception):
    """The bytes are not IPFIX: ``reason`` is a short counter name, ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def header_error(version: int, length: int) -> FramingError | None:
    """Why a message header cannot start an IPFIX message, or None when it can."""
    if version != VERSION:
        return FramingError("bad_version", f"version {version}, expected {VERSION}")
    if length < HEADER_LEN:
        return FramingError("bad_length", f"message length {length}, expected {HEADER_LEN}..{MAX_MESSAGE}")
    return None


def walk(buf: Buffer, pos: int, end: int, emit: Callable[[Buffer], object]) -> tuple[int, FramingError | None]:
    """Hand ``emit`` each whole message of ``buf[pos:end]`` (as ``buf[a:b]``: a view when ``buf`` is one).

    Returns (start of the first incomplete message, or of the bad header; the error or None). The loop is
    the framer's hot path: one unpack and one slice per message, the header checked only when it fails.
    """
    unpack = VERSION_LENGTH.unpack_from
    while end - pos >= HEADER_LEN:
        version, length = unpack(buf, pos)
        if version != VERSION or length < HEADER_LEN:
            return pos, header_error(version, length)
        nxt = pos + length
        if nxt > end:
            break
        emit(buf[pos:nxt])
        pos = nxt
    return pos, None
