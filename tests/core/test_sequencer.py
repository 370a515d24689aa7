"""The per-ODID sequencer without a queue: a connection's numbering counts its data records per ODID, the
common run and the message-by-message path agree, datagrams count only once the kernel took them, and a
stall gives numbers back."""

import struct

import pytest
from hypothesis import given, strategies as st

from ipfix_balancer.core.sequencer import SEQ_MASK, Sequencer
from ipfix_balancer.core.templates import EMPTY
from ipfix_balancer.core.wire import HEADER, SEQUENCE, U32


def entry(odid: int = 7, nrec: int = 2, seq: int = 999, size: int = 24):
    msg = memoryview(bytearray(HEADER.pack(10, size, 1, seq, odid) + b"\0" * (size - 16)))
    return (msg, odid, nrec, EMPTY)


def numbers(bufs) -> list[int]:
    return [U32.unpack_from(b, SEQUENCE)[0] for b in bufs]


def test_a_connection_numbers_each_odid_by_the_data_records_it_carried():
    seq = Sequencer(rewrite=True)
    bufs = seq.number_stream([entry(7, 2), entry(8, 5), entry(7, 3), entry(8, 1)])
    assert numbers(bufs) == [0, 0, 2, 5] and seq.next == {7: 5, 8: 6}
    assert numbers(seq.number_stream([entry(7, 1)])) == [5], "the next commit goes on from there"
    seq.restart()
    assert numbers(seq.number_stream([entry(7, 1)])) == [0], "a new connection starts at zero"


def test_a_template_message_is_numbered_in_a_copy_and_counts_no_records():
    seq = Sequencer(rewrite=True)
    seq.number_stream([entry(7, 4)])
    template = entry(7, 0, seq=123)
    (buf,) = seq.number_stream([template])
    assert numbers([buf]) == [4] and numbers([template[0]]) == [123], "the shared message is untouched"
    assert seq.next == {7: 4}


def test_the_counter_wraps_at_32_bits():
    seq = Sequencer(rewrite=True)
    seq.next[7] = SEQ_MASK - 1
    assert numbers(seq.number_stream([entry(7, 2), entry(7, 2)])) == [SEQ_MASK - 1, 0]
    assert seq.next[7] == 2


@given(st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.integers(0, 4)), min_size=1, max_size=30),
       st.integers(0, SEQ_MASK))
def test_a_run_is_numbered_as_message_by_message(runs, start):
    """The C-level common run and the step per message give the same numbers (a reference model)."""
    seq = Sequencer(rewrite=True)
    seq.next = {1: start, 2: 0, 3: 7}
    expected, model = [], dict(seq.next)
    for odid, nrec in runs:
        expected.append(model[odid])
        model[odid] = (model[odid] + nrec) & SEQ_MASK
    assert numbers(seq.number_stream([entry(o, n) for o, n in runs])) == expected and seq.next == model


def test_datagrams_count_only_what_the_kernel_took():
    seq = Sequencer(rewrite=True)
    entries = [entry(7, 2), entry(7, 2), entry(7, 2)]
    bufs, after = seq.number_datagrams(entries)
    assert numbers(bufs) == [0, 2, 4] and seq.next == {}, "nothing counts before the send"
    seq.advance(entries[:2], after)
    assert seq.next == {7: 4}, "two of three went"


def test_a_single_datagram_counts_only_once_sent():
    seq = Sequencer(rewrite=True)
    sent = []
    seq.send(entry(7, 3), sent.append)
    with pytest.raises(BlockingIOError):
        seq.send(entry(7, 3), lambda data: (_ for _ in ()).throw(BlockingIOError))
    assert numbers(sent) == [0] and seq.next == {7: 3}


def test_a_stall_gives_the_numbers_of_what_went_back():
    seq = Sequencer(rewrite=True)
    committed = [entry(7, 2), entry(7, 3), entry(8, 1)]
    seq.number_stream(committed)
    seq.take_back(committed[1:])
    assert seq.next == {7: 2, 8: 0}


def test_byte_identical_keeps_the_exporters_numbers_and_templates_follow_them():
    seq = Sequencer(rewrite=False)
    assert seq.template_sequence(7, None) == 0
    assert seq.template_sequence(7, entry(7, 2, seq=50)) == 50, "before any datagram: the next message's"
    (buf,) = seq.number_stream([entry(7, 2, seq=50)])
    assert numbers([buf]) == [50]
    seq.send(entry(7, 2, seq=60), lambda data: None)
    assert seq.template_sequence(7, None) == 62, "after its last datagram: that one's number plus its records"
    assert struct.unpack_from("!I", buf, SEQUENCE)[0] == 50
