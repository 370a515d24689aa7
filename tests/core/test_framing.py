"""Framing: whole messages out of any split of a TCP stream; clear errors for what is not IPFIX."""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfix_balancer.core.framing import (ChunkPool, DatagramReader, DatagramSlots, FramingError, StreamFramer,
                                         all_whole, check_datagram)
from ipfix_balancer.core.wire import MAX_MESSAGE


def message(body: bytes, seq: int = 0, odid: int = 1) -> bytes:
    return struct.pack("!HHIII", 10, 16 + len(body), 1700000000, seq, odid) + body


STREAM = [message(b""), message(b"\x01\x00\x00\x08abcd", 1), message(bytes(range(256)) * 5, 2),
          message(b"x" * 1000, 3)]
DATA = b"".join(STREAM)


def feed(framer, piece: bytes):
    """``piece`` through the framer's buffer protocol, in as many reads as its buffers take (a socket
    would do the same): (messages, the first error)."""
    messages, error = [], None
    while piece:
        buf = framer.get_buffer()
        n = min(len(buf), len(piece))
        buf[:n], piece = piece[:n], piece[n:]
        got, err = framer.feed(n)
        messages += got
        error = error or err
    return messages, error


def frame_all(pieces, framer=None):
    framer = framer or StreamFramer()
    out = []
    for piece in pieces:
        messages, error = feed(framer, piece)
        assert error is None
        out.extend(bytes(m) for m in messages)
    return out, framer


@pytest.mark.parametrize("cut", range(1, len(DATA)))
def test_split_at_every_byte_boundary(cut):
    out, framer = frame_all([DATA[:cut], DATA[cut:]])
    assert out == STREAM
    assert framer.pending == 0


def test_many_messages_in_one_read_and_one_byte_reads():
    assert frame_all([DATA])[0] == STREAM
    assert frame_all([DATA[i:i + 1] for i in range(len(DATA))])[0] == STREAM


def test_messages_stay_valid_after_later_reads():
    """Zero copy must not mean aliasing: views handed out earlier keep their bytes."""
    framer = StreamFramer()
    first, _ = feed(framer, STREAM[1] + STREAM[2][:7])
    second, _ = feed(framer, STREAM[2][7:] + STREAM[3])
    assert [bytes(m) for m in first] == [STREAM[1]]
    assert [bytes(m) for m in second] == STREAM[2:]


def test_largest_message_and_real_socket():
    big = message(b"z" * (65535 - 16))
    a, b = socket.socketpair()
    a.sendall(big + STREAM[0])
    a.close()
    out, framer = [], StreamFramer()
    while n := b.recv_into(framer.get_buffer()):
        messages, error = framer.feed(n)
        assert error is None
        out.extend(bytes(m) for m in messages)
    assert out == [big, STREAM[0]]


@pytest.mark.parametrize("header,reason", [
    (struct.pack("!HHIII", 9, 20, 0, 0, 0), "bad_version"),
    (struct.pack("!HHIII", 5, 16, 0, 0, 0), "bad_version"),
    (struct.pack("!HHIII", 10, 15, 0, 0, 0), "bad_length"),
    (struct.pack("!HHIII", 10, 0, 0, 0, 0), "bad_length"),
])
def test_bad_header_is_reported_after_the_whole_messages_before_it(header, reason):
    framer = StreamFramer()
    messages, error = feed(framer, STREAM[1] + header + b"\0" * 8)
    assert isinstance(error, FramingError) and error.reason == reason
    assert [bytes(m) for m in messages] == [STREAM[1]]
    assert framer.pending == 0  # nothing after a bad header is kept


def test_truncated_stream_keeps_partial_as_pending():
    out, framer = frame_all([DATA[:-5]])
    assert out == STREAM[:-1]
    assert framer.pending == len(STREAM[-1]) - 5


def test_datagrams():
    check_datagram(memoryview(STREAM[2]))
    with pytest.raises(FramingError, match="length_mismatch"):
        check_datagram(memoryview(STREAM[2] + b"extra"))
    with pytest.raises(FramingError, match="length_mismatch"):
        check_datagram(memoryview(STREAM[2][:-1]))
    with pytest.raises(FramingError, match="short_datagram"):
        check_datagram(memoryview(b"\x00\x0a"))
    with pytest.raises(FramingError, match="bad_version"):
        check_datagram(memoryview(b"\x00\x09" + STREAM[0][2:]))


def test_datagram_reader_views_do_not_alias():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reader = DatagramReader(chunk_size=1)  # forces a fresh chunk for every datagram
    got = []
    for msg in STREAM:
        tx.sendto(msg, rx.getsockname())
        n, peer = rx.recvfrom_into(reader.get_buffer())
        got.append(reader.feed(n))
        assert peer[1] == tx.getsockname()[1]
    assert [bytes(v) for v in got] == STREAM


def test_small_reads_share_a_chunk_and_views_survive_rollover():
    """Queued messages pin their chunk: small reads must fill one chunk, not take one each; and views
    handed out before a new chunk starts keep their bytes."""
    msgs = [message(bytes([i % 251]) * (300 + i % 700), i) for i in range(2000)]
    data = b"".join(msgs)
    pieces = [data[i:i + 777] for i in range(0, len(data), 777)]
    framer, kept = StreamFramer(), []
    for piece in pieces:
        kept.extend(feed(framer, piece)[0])
    assert [bytes(m) for m in kept] == msgs
    chunks = {id(m.obj): len(m.obj) for m in kept}
    assert sum(chunks.values()) <= len(data) * 4 // 3 + 2 * StreamFramer.FIRST_CHUNK, "chunks filled to 3/4 at least"


def test_chunks_start_small_grow_for_a_busy_connection_and_go_when_quiet():
    """An idle connection holds no chunk; a trickling one a small one; one whose reads fill the chunk
    soon reads full-size chunks; release() keeps only the message begun."""
    framer = StreamFramer()
    assert framer.pending == 0 and framer.tail == b""
    assert len(framer.get_buffer()) == StreamFramer.FIRST_CHUNK
    data = b"".join(message(b"y" * 984, i) for i in range(1000))  # 1000-byte messages
    pos, sizes = 0, []
    while pos < len(data) - 1500:
        buf = framer.get_buffer()
        n = min(len(buf), len(data) - 1500 - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        framer.feed(n)
        sizes.append(len(framer._view))
    assert sizes[0] == StreamFramer.FIRST_CHUNK and sizes[-1] == framer.chunk_size, sizes
    framer.release()
    assert framer._view is None and framer.tail == data[pos - framer.pending:pos] and framer.pending == pos % 1000
    rest = data[pos:]
    messages, error = feed(framer, rest)
    assert error is None and b"".join(map(bytes, messages)) == data[pos - pos % 1000:]
    assert len(framer._view) == StreamFramer.FIRST_CHUNK, "after a release the next chunk starts small"


def test_a_connection_is_busy_by_reads_per_chunk_not_by_read_size():
    """Reads smaller than the free room (what a socket returns under load) still grow the chunk when few
    of them fill it; a trickle of tiny reads keeps the first size."""
    data = b"".join(message(b"z" * 984, i) for i in range(2000))
    for piece, grows in ((20_000, True), (100, False)):
        framer, pos, sizes = StreamFramer(), 0, set()
        while pos < 600_000:
            buf = framer.get_buffer()
            n = min(len(buf), piece)
            buf[:n] = data[pos:pos + n]
            pos += n
            framer.feed(n)
            sizes.add(len(framer._view))
        assert (max(sizes) == framer.chunk_size) is grows, (piece, sorted(sizes))
        assert grows or sizes == {StreamFramer.FIRST_CHUNK}


def test_a_pooled_chunk_is_reused_only_when_no_message_points_into_it():
    """Reuse must never overwrite a message still queued or kept for a re-send: the pool hands a chunk out
    again only once every view of it is gone."""
    pool = ChunkPool(StreamFramer().chunk_size, keep=2)
    first = pool.take()
    view = memoryview(first)[100:200]
    second = pool.take()
    assert second is not first, "a chunk with a live view is not handed out"
    view2 = memoryview(second)[-1:]
    third = pool.take()
    assert third is not first and third is not second, "both kept chunks are in use: a plain allocation"
    del view
    assert pool.take() is first, "no view left: reused"
    assert pool.take() is not second and bytes(view2) == b"\0"


def test_messages_kept_across_many_pooled_chunks_keep_their_bytes():
    """A busy connection cycles through pooled chunks; messages kept meanwhile (every seventh, as a
    stalled collector's queue would) still read what was sent."""
    pool = ChunkPool(StreamFramer().chunk_size, keep=3)
    framer = StreamFramer(pool=pool)
    msgs = [message(bytes([i % 251]) * 1400, i) for i in range(3000)]
    data = b"".join(msgs)
    kept, pos = {}, 0
    while pos < len(data):
        buf = framer.get_buffer()
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        for m in framer.feed(n)[0]:
            seq = struct.unpack_from("!I", m, 8)[0]
            if seq % 7 == 0:
                kept[seq] = m
    assert len(kept) == len(range(0, 3000, 7))
    assert all(bytes(m) == msgs[seq] for seq, m in kept.items())
    assert len({id(m.obj) for m in kept.values()}) > 3, "more chunks than the pool keeps were in use"


def receive(slots: DatagramSlots, datagrams: list[bytes]) -> list:
    """What a recvmmsg does with the slots: each datagram into its slot, the rest of a long one into the
    spill area of that slot position, as many as there are free slots; returns the views ``received``
    hands out."""
    slots.next_read()
    datagrams = datagrams[:slots.count - slots.first]
    for i, d in enumerate(datagrams, slots.first):
        start = i * slots.slot
        head = d[:slots.slot]
        slots.chunk[start:start + len(head)] = head
        rest = d[slots.slot:]
        slots.spill[i * slots.spill_size:i * slots.spill_size + len(rest)] = rest
    return slots.received([len(d) for d in datagrams])


def test_datagram_slots_fill_a_chunk_across_reads_and_reuse_it_only_after_release():
    slots = DatagramSlots(slot=64, count=4, keep=2)
    first = receive(slots, [b"a" * 10, b"b" * 64])
    chunk = slots.chunk
    assert [bytes(v) for v in first] == [b"a" * 10, b"b" * 64] and slots.first == 2
    second = receive(slots, [b"c" * 5, b"d" * 7])
    assert slots.chunk is chunk, "reads go on in the free slots of the same chunk"
    third = receive(slots, [b"e"])
    assert slots.chunk is not chunk and slots.first == 1, "a full chunk: the next read starts a new one"
    del first, second
    receive(slots, [b"f"] * 3)  # the second chunk fills up; the first is free now
    fourth = receive(slots, [b"g"])
    assert slots.chunk is chunk, "no view of it left: reused"
    assert [bytes(v) for v in third] == [b"e"] and [bytes(v) for v in fourth] == [b"g"]


def test_datagram_slots_views_stay_valid_while_held_through_many_chunks():
    slots = DatagramSlots(slot=32, count=8, keep=2)
    kept = []
    for i in range(200):
        views = receive(slots, [bytes([i % 251]) * (1 + i % 32)] * (1 + i % 8))
        if i % 5 == 0:
            kept.append((i, views))
    assert all(bytes(v) == bytes([i % 251]) * (1 + i % 32) for i, views in kept for v in views)


def test_datagram_slots_a_datagram_longer_than_its_slot_is_joined_with_its_spill_area_and_writable():
    slots = DatagramSlots(slot=16, count=4, keep=1)
    small, long = b"s" * 16, bytes(range(100))
    longest = message(b"L" * (MAX_MESSAGE - 16)) + b"!"  # a whole largest message and one byte more
    views = receive(slots, [small, long])
    views += receive(slots, [longest])
    assert [bytes(v) for v in views] == [small, long, longest]
    views[1][0] = 0  # RoundRobin renumbers in place
    with pytest.raises(FramingError, match="length_mismatch"):  # refused as today
        check_datagram(views[2])



@pytest.mark.parametrize("bad", [b"", b"\x00\x0a", message(b"abc")[:-1], message(b"abc") + b"!",
                                 b"\x00\x09" + message(b"abc")[2:], struct.pack("!HH", 10, 8) + bytes(4)])
def test_a_run_is_all_whole_only_when_check_datagram_passes_every_one(bad):
    run = [memoryview(m) for m in STREAM]
    assert all_whole(run)
    for at in range(len(run) + 1):
        mixed = run[:at] + [memoryview(bad)] + run[at:]
        assert not all_whole(mixed)
        with pytest.raises(FramingError):
            check_datagram(mixed[at])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(
    STREAM + [b"", b"\x00\x0a", b"\x00\x0a\x00\x10", message(b"abc")[:-1], message(b"abc") + b"!",
              b"\x00\x09" + message(b"abc")[2:], struct.pack("!HH", 10, 8) + bytes(4), message(bytes(100)),
              message(b"x" * 40)[:20]]), min_size=1, max_size=5), min_size=1, max_size=12))
def test_datagram_slots_whole_says_what_all_whole_says_of_each_read(reads):
    """``whole`` is read from the slots' headers at once: it must agree with ``all_whole`` on the views, also
    when a short datagram lands on a slot that still holds an older datagram's header."""
    slots = DatagramSlots(slot=64, count=4, keep=1)
    for datagrams in reads:
        views = receive(slots, datagrams)
        assert slots.whole == all_whole(views)
