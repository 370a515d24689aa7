"""Tests for ipfix_balancer.core.templates: template tracking and data record counting (RFC 7011 §3.4, §8)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipfix_balancer.core.wire import HEADER, HEADER_LEN, MAX_MESSAGE
from ipfix_balancer.core.templates import (EMPTY, TEMPLATE_OVERHEAD, MalformedSet, Snapshot, TemplateLimit,
                                           TemplatePool, TemplateTracker)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))  # scripts/fuzz raises it

VAR = 65535
PEN = 43823  # an enterprise number


# --- message builders (independent of the module under test) ---------------------------------------------

def field(ie: int, length: int, pen: int | None = None) -> bytes:
    if pen is None:
        return struct.pack("!HH", ie, length)
    return struct.pack("!HHI", ie | 0x8000, length, pen)


def trec(tid: int, fields: list[bytes]) -> bytes:
    return struct.pack("!HH", tid, len(fields)) + b"".join(fields)


def otrec(tid: int, scope: list[bytes], fields: list[bytes]) -> bytes:
    return struct.pack("!HHH", tid, len(scope) + len(fields), len(scope)) + b"".join(scope) + b"".join(fields)


def withdraw(tid: int) -> bytes:
    return struct.pack("!HH", tid, 0)


def ipfix_set(set_id: int, *records: bytes, pad: int = 0) -> bytes:
    body = b"".join(records) + b"\0" * pad
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def message(*sets: bytes, odid: int = 1, seq: int = 0, export_time: int = 1_700_000_000) -> bytes:
    body = b"".join(sets)
    return HEADER.pack(10, HEADER_LEN + len(body), export_time, seq, odid) + body


def varlen(value: bytes, long: bool = False) -> bytes:
    """Variable-length encoding: 1-byte length, or 255 + 2-byte length (forced with long=True)."""
    if long or len(value) >= 255:
        return b"\xff" + struct.pack("!H", len(value)) + value
    return bytes([len(value)]) + value


def inspect(tracker: TemplateTracker, msg: bytes):
    return tracker.inspect(memoryview(msg))


def snapshot_contents(snap: Snapshot) -> dict[int, dict[int, tuple[int, bytes]]]:
    """Decode Snapshot.messages() independently: odid -> template id -> (set id, record bytes)."""
    out: dict[int, dict[int, tuple[int, bytes]]] = {}
    for m in snap.messages(lambda odid: 0, 0):
        version, length, _, _, odid = HEADER.unpack_from(m)
        assert version == 10 and length == len(m) <= MAX_MESSAGE
        pos = HEADER_LEN
        while pos < length:
            sid, slen = struct.unpack_from("!HH", m, pos)
            assert sid in (2, 3)
            p, end = pos + 4, pos + slen
            while end - p >= 4:
                start = p
                tid, fc = struct.unpack_from("!HH", m, p)
                p += 4
                if sid == 3:
                    p += 2
                for _ in range(fc):
                    ie, _len = struct.unpack_from("!HH", m, p)
                    p += 8 if ie & 0x8000 else 4
                out.setdefault(odid, {})[tid] = (sid, m[start:p])
            assert p == end
            pos = end
    return out


FIXED_FIELDS = [field(8, 4), field(12, 4), field(7, 2), field(11, 2), field(4, 1), field(1, 8), field(2, 8)]  # 29 bytes
FIXED_LEN = 29


# --- fixed-length templates --------------------------------------------------------------------------------

def test_fixed_length_counts_and_padding():
    t = TemplateTracker()
    tmpl_msg = message(ipfix_set(2, trec(256, FIXED_FIELDS)))
    odid, n, tmpl = inspect(t, tmpl_msg)
    assert (odid, n) == (1, 0) and bytes(tmpl) == tmpl_msg
    rec = bytes(range(FIXED_LEN))
    data = message(ipfix_set(256, rec * 7, pad=3), ipfix_set(256, rec * 2))
    assert inspect(t, data) == (1, 9, None)
    assert t.unknown_template == 0
    assert len(t.snapshot) == 1


def test_data_only_message_identity_and_none():
    t = TemplateTracker()
    tmpl_msg = memoryview(message(ipfix_set(2, trec(300, FIXED_FIELDS))))
    odid, n, tmpl = t.inspect(tmpl_msg)
    assert tmpl is tmpl_msg and n == 0
    assert t.inspect(memoryview(message(ipfix_set(300, b"x" * FIXED_LEN * 30)))) == (1, 30, None)


def test_unknown_template_counted():
    t = TemplateTracker()
    assert inspect(t, message(ipfix_set(400, b"x" * 40))) == (1, 0, None)
    assert t.unknown_template == 1


def test_template_then_data_in_same_message():
    t = TemplateTracker()
    msg = message(ipfix_set(256, b"a" * 20), ipfix_set(2, trec(256, [field(8, 4)])), ipfix_set(256, b"b" * 20))
    odid, n, tmpl = inspect(t, msg)
    assert n == 5  # the first data set preceded its template
    assert t.unknown_template == 1


def test_scapy_cross_check_fixed_length():
    from scapy.all import raw
    from scapy.layers.netflow import (NetflowDataflowsetV9, NetflowFlowsetV9, NetflowHeader, NetflowHeaderV10,
                                      NetflowRecordV9, NetflowTemplateFieldV9, NetflowTemplateV9,
                                      netflowv9_defragment)

    fields = [NetflowTemplateFieldV9(fieldType=8, fieldLength=4),
              NetflowTemplateFieldV9(fieldType=12, fieldLength=4),
              NetflowTemplateFieldV9(enterpriseBit=1, fieldType=100, fieldLength=3, enterpriseNumber=PEN),
              NetflowTemplateFieldV9(fieldType=7, fieldLength=2)]
    reclen = 13
    tpl = NetflowFlowsetV9(flowSetID=2, templates=[NetflowTemplateV9(templateID=310, template_fields=fields)])
    t = TemplateTracker()
    for nrec in (1, 3, 30, 100):
        data = NetflowDataflowsetV9(templateID=310, records=[NetflowRecordV9(fieldValue=b"\x05" * reclen * nrec)])
        wire = raw(NetflowHeader(version=10) / NetflowHeaderV10(ObservationDomainID=9) / tpl / data)
        decoded = NetflowHeader(wire)
        netflowv9_defragment([decoded], verb=0)
        expected = len(decoded[NetflowDataflowsetV9].records)
        odid, n, tmpl = inspect(t, wire)
        assert (odid, n) == (9, expected) == (9, nrec)
        # mixed: the template-only copy is the scapy template set under the same header
        assert tmpl[HEADER_LEN:] == raw(tpl)


# --- variable-length fields ---------------------------------------------------------------------------------

def test_variable_length_short_and_long_encodings():
    t = TemplateTracker()
    # ipv4 src (4), string (var), port (2), string (var)
    fields = [field(8, 4), field(82, VAR), field(7, 2), field(96, VAR)]
    inspect(t, message(ipfix_set(2, trec(257, fields))))
    recs = [
        b"\1\2\3\4" + varlen(b"eth0") + b"\0\x50" + varlen(b""),
        b"\1\2\3\4" + varlen(b"x" * 300) + b"\0\x50" + varlen(b"abc", long=True),
        b"\1\2\3\4" + varlen(b"", long=True) + b"\0\x50" + varlen(b"y" * 254),
    ]
    # minimum record length is 4 + 1 + 2 + 1 = 8: up to 7 bytes of padding are not a record
    msg = message(ipfix_set(257, *recs, pad=7))
    assert inspect(t, msg) == (1, 3, None)


def malformed(tracker: TemplateTracker, msg: bytes) -> str:
    """The reason inspect refuses ``msg`` for; the tracker's templates and counters stay as they were."""
    before, unknown = snapshot_contents(tracker.snapshot), tracker.unknown_template
    with pytest.raises(MalformedSet) as info:
        inspect(tracker, msg)
    assert snapshot_contents(tracker.snapshot) == before and tracker.unknown_template == unknown
    return info.value.reason


def test_variable_length_record_overrun_is_malformed():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(258, [field(82, VAR)]))))
    good = varlen(b"abc")
    bad = b"\x20" + b"z" * 5  # claims 32 bytes, only 5 follow
    assert malformed(t, message(ipfix_set(258, good, bad), ipfix_set(258, good))) == "varlen_past_end"
    # 3-byte encoding cut off after 255
    assert malformed(t, message(ipfix_set(258, good + b"\xff\x00"))) == "varlen_past_end"
    assert inspect(t, message(ipfix_set(258, good, good))) == (1, 2, None)


# --- enterprise-specific IEs and options templates ----------------------------------------------------------

def test_enterprise_fields():
    t = TemplateTracker()
    fields = [field(1, 4, PEN), field(8, 4), field(2, VAR, PEN), field(3, 2, 0)]
    inspect(t, message(ipfix_set(2, trec(260, fields))))
    rec = b"aaaa" + b"bbbb" + varlen(b"hello") + b"cc"
    assert inspect(t, message(ipfix_set(260, rec * 4))) == (1, 4, None)
    assert snapshot_contents(t.snapshot)[1][260] == (2, trec(260, fields))


def test_options_template():
    t = TemplateTracker()
    rec = otrec(500, [field(149, 4)], [field(41, 8), field(42, 8, PEN)])
    msg = message(ipfix_set(3, rec, pad=2))
    odid, n, tmpl = inspect(t, msg)
    assert n == 0 and bytes(tmpl) == msg
    assert inspect(t, message(ipfix_set(500, b"o" * 20 * 3))) == (1, 3, None)
    assert snapshot_contents(t.snapshot) == {1: {500: (3, rec)}}


def test_options_template_scope_count_zero_is_malformed():
    t = TemplateTracker()
    bad = struct.pack("!HHH", 501, 1, 0) + field(41, 8)
    good = otrec(502, [field(149, 4)], [])
    assert malformed(t, message(ipfix_set(3, good, bad))) == "scope_count"
    assert len(t.snapshot) == 0  # nothing of a refused message is learnt, not even the good record before
    too_many = struct.pack("!HHH", 503, 1, 2) + field(41, 8)  # scope count > field count
    assert malformed(t, message(ipfix_set(3, too_many))) == "scope_count"


def test_template_id_below_256_is_malformed():
    t = TemplateTracker()
    assert malformed(t, message(ipfix_set(2, trec(256, [field(8, 4)]), trec(255, [field(8, 4)])))) == "template_id"
    assert len(t.snapshot) == 0


def test_zero_length_template_is_unknown():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(270, [field(8, 0), field(12, 0)]))))
    assert len(t.snapshot) == 1  # still forwarded to collectors
    assert inspect(t, message(ipfix_set(270, b"\0" * 8))) == (1, 0, None)
    assert t.unknown_template == 1


# --- mixed messages -----------------------------------------------------------------------------------------

def test_mixed_message_template_only_copy():
    t = TemplateTracker()
    ts = ipfix_set(2, trec(256, [field(8, 4)]), trec(257, [field(82, VAR)]))
    os_ = ipfix_set(3, otrec(258, [field(149, 4)], [field(41, 8)]), pad=2)
    msg = message(ts, ipfix_set(256, b"1234" * 3), os_, ipfix_set(257, varlen(b"q")),
                  odid=77, seq=123456, export_time=987654)
    odid, n, tmpl = inspect(t, msg)
    assert (odid, n) == (77, 4)
    assert isinstance(tmpl, bytes)
    assert tmpl[HEADER_LEN:] == ts + os_
    assert HEADER.unpack_from(tmpl) == (10, HEADER_LEN + len(ts) + len(os_), 987654, 123456, 77)
    # the copy itself is template-only: inspected again, it is returned as is
    t2 = TemplateTracker()
    mv = memoryview(tmpl)
    assert t2.inspect(mv) == (77, 0, mv)
    assert snapshot_contents(t2.snapshot) == snapshot_contents(t.snapshot)


def test_template_sets_then_malformed_tail_learns_nothing():
    t = TemplateTracker()
    ts = ipfix_set(2, trec(256, [field(8, 4)]))
    assert malformed(t, message(ts, b"\x01\x00\x00\x40")) == "set_past_end"
    assert t.snapshot is EMPTY


# --- withdrawal and redefinition ---------------------------------------------------------------------------

def test_withdraw_one_and_all():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]), trec(257, [field(8, 4)]), trec(258, [field(8, 4)])),
                       ipfix_set(3, otrec(600, [field(149, 4)], []))))
    assert len(t.snapshot) == 4
    before = t.snapshot
    odid, n, tmpl = inspect(t, message(ipfix_set(2, withdraw(257))))
    assert tmpl is not None and t.snapshot is not before
    assert set(snapshot_contents(t.snapshot)[1]) == {256, 258, 600}
    assert inspect(t, message(ipfix_set(257, b"1234"))) == (1, 0, None)
    assert t.unknown_template == 1
    # withdraw-all of templates (id 2 in set 2) keeps options templates
    inspect(t, message(ipfix_set(2, withdraw(2))))
    assert set(snapshot_contents(t.snapshot)[1]) == {600}
    assert inspect(t, message(ipfix_set(256, b"1234"), ipfix_set(600, b"abcd"))) == (1, 1, None)
    assert t.unknown_template == 2
    # withdraw-all of options templates (id 3 in set 3)
    inspect(t, message(ipfix_set(3, withdraw(3))))
    assert len(t.snapshot) == 0 and snapshot_contents(t.snapshot) == {}
    assert t.snapshot.messages(lambda o: 0, 0) == []
    # old snapshots are untouched
    assert len(before) == 4 and set(snapshot_contents(before)[1]) == {256, 257, 258, 600}


def test_withdraw_all_id_must_match_set_kind():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), ipfix_set(3, otrec(600, [field(149, 4)], []))))
    before = t.snapshot
    assert malformed(t, message(ipfix_set(2, withdraw(3)))) == "template_id"
    assert malformed(t, message(ipfix_set(3, withdraw(2)))) == "template_id"
    assert t.snapshot is before and len(before) == 2


def test_withdraw_all_only_that_odid():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=1))
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=2))
    inspect(t, message(ipfix_set(2, withdraw(2)), odid=1))
    assert list(t.snapshot.odids()) == [2]
    assert inspect(t, message(ipfix_set(256, b"1234" * 2), odid=2)) == (2, 2, None)
    assert inspect(t, message(ipfix_set(256, b"1234" * 2), odid=1)) == (1, 0, None)


def test_redefinition_copy_on_write():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]))))
    old = t.snapshot
    # identical re-send (template refresh): same snapshot object
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]))))
    assert t.snapshot is old
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4), field(12, 4)]))))
    assert t.snapshot is not old and len(t.snapshot) == 1 == len(old)
    assert snapshot_contents(old)[1][256] == (2, trec(256, [field(8, 4)]))
    assert snapshot_contents(t.snapshot)[1][256] == (2, trec(256, [field(8, 4), field(12, 4)]))
    assert inspect(t, message(ipfix_set(256, b"x" * 24))) == (1, 3, None)
    # an old snapshot still replays the old layout: a fresh tracker fed from it counts by 4
    t2 = TemplateTracker()
    for m in old.messages(lambda o: 0, 0):
        t2.inspect(memoryview(m))
    assert inspect(t2, message(ipfix_set(256, b"x" * 24))) == (1, 6, None)


def test_two_odids_kept_apart():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=10))
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 8)])), odid=20))
    assert sorted(t.snapshot.odids()) == [10, 20] and len(t.snapshot) == 2
    assert inspect(t, message(ipfix_set(256, b"x" * 32), odid=10)) == (10, 8, None)
    assert inspect(t, message(ipfix_set(256, b"x" * 32), odid=20)) == (20, 4, None)
    assert inspect(t, message(ipfix_set(256, b"x" * 32), odid=30)) == (30, 0, None)


# --- snapshot messages --------------------------------------------------------------------------------------

def test_empty_snapshot():
    assert len(EMPTY) == 0 and list(EMPTY.odids()) == [] and EMPTY.messages(lambda o: 1, 2) == []
    assert TemplateTracker().snapshot is EMPTY


def test_snapshot_messages_split_and_reparse():
    t = TemplateTracker()
    # 400 templates of 100 fields each (404 bytes) in ODID 5, plus options templates, plus a small ODID 6
    for base in range(256, 656, 100):
        recs = [trec(tid, [field(i % 300 + 1, 4, PEN if i % 7 == 0 else None) for i in range(100)])
                for tid in range(base, base + 100)]
        sets = []
        chunk = []
        for r in recs:
            chunk.append(r)
            if len(chunk) == 50:
                sets.append(message(ipfix_set(2, *chunk), odid=5))
                chunk = []
        for m in sets:
            inspect(t, m)
    inspect(t, message(ipfix_set(3, *[otrec(tid, [field(149, 4)], [field(41, 8)] * 50) for tid in range(700, 900)]
                                 [:150]), odid=5))
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=6))
    assert len(t.snapshot) == 400 + 150 + 1
    seqs = {5: 1000, 6: 77}
    msgs = t.snapshot.messages(seqs.__getitem__, 424242)
    assert len(msgs) > 3
    total = 0
    for m in msgs:
        version, length, et, seq, odid = HEADER.unpack_from(m)
        assert version == 10 and length == len(m) <= MAX_MESSAGE
        assert et == 424242 and seq == seqs[odid]
        total += len(m)
    # packed close to the limit: no more messages than needed plus one per set kind / ODID
    assert len(msgs) <= total // (MAX_MESSAGE - 500) + 3
    t2 = TemplateTracker()
    for m in msgs:
        mv = memoryview(m)
        assert t2.inspect(mv)[2] is mv
    assert snapshot_contents(t2.snapshot) == snapshot_contents(t.snapshot)
    assert sorted(t2.snapshot.odids()) == [5, 6] and len(t2.snapshot) == len(t.snapshot)
    # cached bodies, fresh headers
    again = t.snapshot.messages(lambda o: 1, 5)
    assert [m[HEADER_LEN:] for m in again] == [m[HEADER_LEN:] for m in msgs]
    assert HEADER.unpack_from(again[0])[2:4] == (5, 1)


# --- malformed input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tail, reason", [
    (b"\x00", "stray_bytes"),                       # fewer than 4 bytes for a set header
    (b"\x01\x00\x00\x03", "set_length"),           # set length < 4
    (b"\x01\x00\x00\x00", "set_length"),           # set length 0
    (b"\x01\x00\x00\x20abcd", "set_past_end"),     # runs past the message end
    (b"\x00\x02\x00\x0c\x01\x00\x00\x05\x00\x08\x00\x04", "template_past_set"),  # 5 fields, room for 1
    (b"\x00\x03\x00\x08\x01\x00\x00\x05", "template_past_set"),              # options template header cut off
    (b"\x00\x02\x00\x0c\x01\x00\x00\x01\x80\x08\x00\x04", "enterprise_truncated"),
    (b"\x00\x03\x00\x0e\x01\x00\x00\x01\x00\x02\x00\x08\x00\x04", "scope_count"),  # scope 2 of 1 field
    (b"\x00\x02\x00\x08\x00\xff\x00\x00", "template_id"),                     # withdrawal of id 255
])
def test_malformed_raises_by_reason_and_changes_nothing(tail, reason):
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]))))
    assert malformed(t, message(ipfix_set(256, b"1234" * 2), ipfix_set(999, b"x"), tail)) == reason
    assert inspect(t, message(ipfix_set(256, b"1234" * 2))) == (1, 2, None)  # the session goes on


def test_header_only_and_stray_bytes():
    t = TemplateTracker()
    assert inspect(t, message(odid=3)) == (3, 0, None)
    assert malformed(t, message(b"\0\0\0", odid=3)) == "stray_bytes"


def test_reserved_set_ids_make_the_message_malformed():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]))))
    for reserved in (0, 1, 4, 255):
        assert malformed(t, message(ipfix_set(256, b"1234"), ipfix_set(reserved, b"zzzz"))) == "reserved_set_id"
    assert malformed(t, message(ipfix_set(1, b""), ipfix_set(2, trec(300, [field(8, 4)])))) == "reserved_set_id"
    assert t.unknown_template == 0 and len(t.snapshot) == 1, "nothing learnt"


# --- properties ---------------------------------------------------------------------------------------------

field_spec = st.tuples(
    st.integers(1, 0x7FFF),                                  # IE id
    st.one_of(st.integers(0, 40), st.just(VAR)),             # length, 65535 = variable
    st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),        # enterprise number
)


@st.composite
def template_and_records(draw):
    fields = draw(st.lists(field_spec, min_size=1, max_size=12))
    if all(length == 0 for _, length, _ in fields):
        fields[0] = (fields[0][0], 1, fields[0][2])
    nrec = draw(st.integers(0, 25))
    records = []
    for _ in range(nrec):
        rec = bytearray()
        for _, length, _ in fields:
            if length == VAR:
                size = draw(st.one_of(st.integers(0, 20), st.integers(250, 600)))
                rec += varlen(b"v" * size, long=draw(st.booleans()))
            else:
                rec += b"f" * length
        records.append(bytes(rec))
    options = draw(st.booleans())
    return fields, records, options


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template_and_records(), st.integers(256, 65535), st.integers(0, 0xFFFFFFFF))
def test_property_records_counted_exactly(case, tid, odid):
    fields, records, options = case
    specs = [field(ie, length, pen) for ie, length, pen in fields]
    if options:
        rec = struct.pack("!HHH", tid, len(specs), 1) + b"".join(specs)
        tset = ipfix_set(3, rec)
    else:
        tset = ipfix_set(2, trec(tid, specs))
    fixed = [length for _, length, _ in fields if length != VAR]
    nvar = len(fields) - len(fixed)
    min_len = sum(fixed) + nvar
    # padding must be shorter than any record (RFC 7011 §3.3.1)
    pad = min(3, min_len - 1)
    body = b"".join(records)
    if len(body) + pad + 4 + len(tset) + HEADER_LEN > MAX_MESSAGE:
        return
    t = TemplateTracker()
    odid_, n, tmpl = inspect(t, message(tset, odid=odid))
    assert n == 0 and len(t.snapshot) == 1
    data = message(ipfix_set(tid, *records, pad=pad), odid=odid)
    assert inspect(t, data) == (odid, len(records), None)
    # data split over two sets, after the template in the same message
    half = len(records) // 2
    both = message(tset, ipfix_set(tid, *records[:half]), ipfix_set(tid, *records[half:], pad=pad), odid=odid)
    if len(both) <= MAX_MESSAGE:
        odid_, n, tmpl = inspect(t, both)
        assert n == len(records) and tmpl[HEADER_LEN:] == tset
    assert t.unknown_template == 0


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=200))
def test_property_random_bytes_parse_or_refuse(garbage, template_garbage):
    t = TemplateTracker()
    # a known template so that data sets get walked, and one with a variable-length field
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]), trec(257, [field(82, VAR), field(7, 2)]))))
    for body in (garbage, ipfix_set(2, template_garbage) + garbage, ipfix_set(3, template_garbage) + garbage,
                 ipfix_set(256, garbage), ipfix_set(257, garbage)):
        if HEADER_LEN + len(body) > MAX_MESSAGE:
            continue
        before = t.snapshot
        try:
            odid, n, tmpl = inspect(t, message(body))
        except MalformedSet as exc:
            assert exc.reason and t.snapshot is before  # refused whole: nothing learnt
            continue
        assert odid == 1 and n >= 0
        if tmpl is not None:
            assert HEADER.unpack_from(tmpl)[1] == len(tmpl)
        for m in t.snapshot.messages(lambda o: 0, 0):
            assert len(m) <= MAX_MESSAGE


# --- withdrawals leave no stale state (property) -----------------------------------------------------------

_ops = st.lists(st.tuples(st.sampled_from(["define", "withdraw", "withdraw_all"]), st.sampled_from([1, 2]),
                          st.integers(256, 259), st.integers(1, 6)), min_size=1, max_size=30)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_ops)
def test_definitions_and_withdrawals_match_a_model(ops):
    """After any sequence of definitions and withdrawals the snapshot equals a plain model, and data for
    each template id is counted when defined and counted as unknown when not."""
    tracker, model = TemplateTracker(), {}
    for op, odid, tid, nfields in ops:
        domain = model.setdefault(odid, {})
        if op == "define":
            record = trec(tid, [field(100 + i, 4) for i in range(nfields)])
            domain[tid] = (2, record)
            inspect(tracker, message(ipfix_set(2, record), odid=odid))
        elif op == "withdraw":
            domain.pop(tid, None)
            inspect(tracker, message(ipfix_set(2, withdraw(tid)), odid=odid))
        else:
            domain.clear()
            inspect(tracker, message(ipfix_set(2, withdraw(2)), odid=odid))
        assert snapshot_contents(tracker.snapshot) == {o: d for o, d in model.items() if d}
        for check_odid in (1, 2):
            for check_tid in range(256, 260):
                before = tracker.unknown_template
                known = model.get(check_odid, {}).get(check_tid)
                width = 4 * ((len(known[1]) - 4) // 4) if known else 4
                _, n, _ = inspect(tracker, message(ipfix_set(check_tid, bytes(width * 3)), odid=check_odid))
                assert (n, tracker.unknown_template - before) == ((3, 0) if known else (0, 1))


# --- hostile input: cost and limits (README "Hostile input") ------------------------------------------------

def test_template_bomb_with_every_snapshot_held_costs_o_templates():
    """20,000 messages each defining a new template id, every snapshot held as a queued entry would hold it:
    the memory is linear in templates (a copy per change would be 200 million dict entries)."""
    import tracemalloc
    t = TemplateTracker()
    held = []
    tracemalloc.start()
    for tid in range(256, 20_256):
        inspect(t, message(ipfix_set(2, trec(tid, [field(8, 4)]))))
        held.append(t.snapshot)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000 * 600, peak
    assert len(t.snapshot) == 20_000 and len(held[99]) == 100
    assert set(snapshot_contents(held[99])[1]) == set(range(256, 356))  # an old snapshot: only its templates


def test_redefinitions_keep_history_only_while_a_snapshot_needs_it():
    t = TemplateTracker()
    old_record = trec(256, [field(8, 4)])
    inspect(t, message(ipfix_set(2, old_record)))
    kept = t.snapshot  # a message queued since the first definition
    for n in range(1, 2001):
        inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)] * (n % 7 + 2)))))
    store = t._store
    # what ``kept`` needs and at most a compaction's slack: later versions nobody holds are forgotten
    assert len(store.retired) <= 64 and len(store._live) <= 64
    assert snapshot_contents(kept) == {1: {256: (2, old_record)}} and kept.domain(1) == {256: (2, old_record)}
    del kept
    assert len(store.retired) == 0
    inspect(t, message(ipfix_set(2, withdraw(2))))  # the ODID emptied, its bookkeeping goes with the history
    assert t.snapshot.domain(1) is None and 1 not in store.domains and len(store.retired) == 0


def test_domain_object_is_shared_while_the_odid_is_unchanged():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=1))
    first = t.snapshot
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=2))
    assert t.snapshot.domain(1) is first.domain(1)  # the recorder's "nothing changed" check stays O(1)
    assert t.snapshot.domain(2) == {256: (2, trec(256, [field(8, 4)]))} and first.domain(2) is None


def limited(**kw) -> TemplateTracker:
    from ipfix_balancer.config import TemplateLimits
    return TemplateTracker(TemplateLimits(**kw))


def refused(tracker: TemplateTracker, msg: bytes) -> str:
    from ipfix_balancer.core.templates import TemplateLimit
    before = tracker.snapshot
    with pytest.raises(TemplateLimit) as info:
        inspect(tracker, msg)
    assert tracker.snapshot is before
    return info.value.reason


def test_templates_max_per_odid():
    t = limited(templates_max=3)
    inspect(t, message(ipfix_set(2, *[trec(tid, [field(8, 4)]) for tid in (256, 257, 258)])))
    assert refused(t, message(ipfix_set(2, trec(259, [field(8, 4)])))) == "templates_max"
    inspect(t, message(ipfix_set(2, trec(258, [field(8, 8)]))))  # redefinition at the limit: fine
    inspect(t, message(ipfix_set(2, trec(259, [field(8, 4)])), odid=2))  # another ODID has its own count
    inspect(t, message(ipfix_set(2, withdraw(256), trec(259, [field(8, 4)]))))  # withdraw first: fits
    assert len(t.snapshot) == 4
    assert inspect(t, message(ipfix_set(259, b"1234"))) == (1, 1, None)


def test_odids_max_per_session():
    t = limited(odids_max=2)
    for odid in (1, 2):
        inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=odid))
    assert refused(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=3)) == "odids_max"
    inspect(t, message(ipfix_set(2, withdraw(2)), odid=1))  # an ODID without templates frees its place
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=3))
    assert sorted(t.snapshot.odids()) == [2, 3]


def test_template_bytes_max_per_session():
    record = trec(256, [field(i, 4) for i in range(1, 40)])  # 160 bytes, + 64 counted per template
    t = limited(template_bytes_max=3 * (len(record) + 64))
    for odid in (1, 2, 3):
        inspect(t, message(ipfix_set(2, record), odid=odid))
    assert refused(t, message(ipfix_set(2, trec(257, [field(8, 4)])), odid=1)) == "template_bytes_max"
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)])), odid=1))  # shrinking is always fine
    inspect(t, message(ipfix_set(2, trec(257, [field(8, 4)])), odid=1))
    assert len(t.snapshot) == 4


def test_changes_within_one_message_apply_in_order():
    t = TemplateTracker()
    inspect(t, message(ipfix_set(2, trec(256, [field(8, 4)]), trec(258, [field(8, 4)])),
                       ipfix_set(3, otrec(600, [field(149, 4)], []))))
    msg = message(ipfix_set(2, trec(257, [field(8, 8)]), withdraw(2)), ipfix_set(256, b"1234"),
                  ipfix_set(2, trec(259, [field(8, 2)])), ipfix_set(259, b"12" * 5), ipfix_set(600, b"abcd"),
                  ipfix_set(2, withdraw(259)), ipfix_set(259, b"12"))
    assert inspect(t, msg)[:2] == (1, 6)  # 256 and the last 259 unknown (withdrawn before), 5 + 1 counted
    assert t.unknown_template == 2
    assert snapshot_contents(t.snapshot) == {1: {600: (3, otrec(600, [field(149, 4)], []))}}


def test_the_handlers_template_pool_bounds_all_sessions_together():
    pool = TemplatePool(limit=3 * (8 + TEMPLATE_OVERHEAD))  # three one-field templates
    a, b = TemplateTracker(), TemplateTracker()
    a.pool = b.pool = pool
    inspect(a, message(ipfix_set(2, trec(256, [field(8, 4)]), trec(257, [field(12, 4)]))))
    inspect(b, message(ipfix_set(2, trec(256, [field(8, 4)]))))
    assert pool.used == pool.limit
    with pytest.raises(TemplateLimit, match="template_memory"):
        inspect(b, message(ipfix_set(2, trec(300, [field(8, 4)]))))
    assert len(b.snapshot) == 1 and pool.used == pool.limit, "nothing learnt, nothing charged"
    inspect(b, message(ipfix_set(2, trec(256, [field(8, 4)]))))  # a refresh, unchanged: always accepted
    inspect(a, message(ipfix_set(2, struct.pack("!HH", 257, 0))))  # a withdrawal frees its bytes
    inspect(b, message(ipfix_set(2, trec(300, [field(8, 4)]))))
    assert pool.used == pool.limit
    a.release()
    assert pool.used == 2 * (8 + TEMPLATE_OVERHEAD)
    b.release()
    b.release()
    assert pool.used == 0


def test_templates_learnt_before_the_pool_are_never_taken_out_of_it():
    adopted = TemplateTracker()
    inspect(adopted, message(ipfix_set(2, trec(256, [field(8, 4)]), trec(257, [field(12, 4)]))))
    adopted.pool = pool = TemplatePool(limit=1000)
    inspect(adopted, message(ipfix_set(2, struct.pack("!HH", 257, 0))))
    assert pool.used == 0
    adopted.release()
    assert pool.used == 0


def _run_strategy():
    """Runs of messages: mostly data sets of the known template (two ODIDs, padding, several sets), some with
    an unknown template, a template set, a reserved set id, or truncated."""
    data = st.builds(lambda odid, n, pad: message(ipfix_set(256, *[bytes(FIXED_LEN)] * n, pad=pad), odid=odid),
                     st.sampled_from([1, 1, 1, 2]), st.integers(0, 40), st.sampled_from([0, 0, 3]))
    other = st.sampled_from([
        message(ipfix_set(257, bytes(8))),                           # unknown template
        message(ipfix_set(2, trec(258, [field(8, 4)]))),             # a template set
        message(ipfix_set(3, bytes(4))),                             # reserved set id
        message(ipfix_set(256, bytes(FIXED_LEN)), ipfix_set(256, bytes(FIXED_LEN))),  # two data sets
        message(),                                                   # no set
        message(ipfix_set(256, bytes(FIXED_LEN)))[:-3],              # set length past the end
    ])
    return st.lists(st.one_of(data, data, data, other), min_size=1, max_size=20)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(_run_strategy())
def test_the_run_fast_path_says_what_inspect_says_of_each_message_or_nothing(run):
    """``inspect_data_run`` answers only for a run of one ODID's data sets of a known fixed-length template,
    and then exactly what ``inspect`` gives each message; it changes no state."""
    tracker = TemplateTracker()
    for odid in (1, 2):
        inspect(tracker, message(ipfix_set(2, trec(256, FIXED_FIELDS)), odid=odid))
    views = [memoryview(m) for m in run]
    before = (tracker.snapshot, tracker.unknown_template)
    fast = tracker.inspect_data_run(views)
    assert (tracker.snapshot, tracker.unknown_template) == before
    one = {struct.unpack_from("!I", m, 12)[0] for m in run}
    eligible = len(one) == 1 and all(len(m) >= HEADER_LEN + 4 and struct.unpack_from("!HH", m, HEADER_LEN)
                                     == (256, len(m) - HEADER_LEN) for m in run)
    assert (fast is not None) == eligible
    if fast is not None:
        assert [(fast[0], n, None) for n in fast[1]] == [tracker.inspect(v) for v in views]
