"""Property tests for the framer (bounded here; `scripts/fuzz` runs many more examples)."""

import os
import struct

from hypothesis import given, settings, strategies as st

from ipfix_balancer.core.framing import FramingError, StreamFramer, check_datagram
from test_framing import feed  # in as many reads as the buffers take

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

bodies = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12)


def frame(body: bytes) -> bytes:
    return struct.pack("!HHIII", 10, 16 + len(body), 0, 0, 7) + body


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=EXAMPLES, deadline=None)
@given(bodies, st.lists(st.integers(min_value=0, max_value=10**6), max_size=20))
def test_any_split_gives_the_same_messages(payloads, cuts):
    messages = [frame(b) for b in payloads]
    data = b"".join(messages)
    framer, out = StreamFramer(), []
    for piece in pieces(data, cuts):
        got, error = feed(framer, piece)
        assert error is None
        out.extend(bytes(m) for m in got)
    assert out == messages
    assert framer.pending == 0


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_random_bytes_give_messages_or_a_framing_error(data, cuts):
    framer = StreamFramer()
    for piece in pieces(data, cuts):
        got, error = feed(framer, piece)
        for m in got:
            assert len(m) >= 16 and m[0:2] == b"\x00\x0a"
        if error is not None:
            assert isinstance(error, FramingError)
            break
    try:
        check_datagram(memoryview(data))
    except FramingError:
        pass
