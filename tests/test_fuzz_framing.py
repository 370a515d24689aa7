"""Property tests for the framer (bounded here; `scripts/fuzz` runs many more examples)."""

import os
import struct

from hypothesis import given, settings, strategies as st

from ipfix_balancer.framing import FramingError, StreamFramer, check_datagram

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

bodies = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12)


def frame(body: bytes) -> bytes:
    return struct.pack("!HHIII", 10, 16 + len(body), 0, 0, 7) + body


class Reads:
    def __init__(self, data: bytes, cuts: list[int]):
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        self.pieces = [data[a:b] for a, b in zip(points, points[1:])]

    def recv_into(self, view):
        piece = self.pieces.pop(0) if self.pieces else b""
        view[:len(piece)] = piece
        return len(piece)


@settings(max_examples=EXAMPLES, deadline=None)
@given(bodies, st.lists(st.integers(min_value=0, max_value=10**6), max_size=20))
def test_any_split_gives_the_same_messages(payloads, cuts):
    messages = [frame(b) for b in payloads]
    data = b"".join(messages)
    framer, sock, out = StreamFramer(), Reads(data, cuts), []
    while framer.recv(sock):
        out.extend(bytes(m) for m in framer.messages)
    assert out == messages
    assert framer.pending == 0


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_random_bytes_raise_only_framing_errors(data, cuts):
    framer, sock = StreamFramer(), Reads(data, cuts)
    try:
        while framer.recv(sock):
            for m in framer.messages:
                assert len(m) >= 16 and m[0:2] == b"\x00\x0a"
    except FramingError:
        pass
    try:
        check_datagram(memoryview(data))
    except FramingError:
        pass
