"""End to end (issue 3): what every subreceiver receives is correct IPFIX on its own.

The real ``ipfix-balancer run`` supervisor forwards test streams to loopback sinks; each sink connection (or UDP
output session) is then decoded as a collector would, by a decoder that shares nothing with the product:

* ``Collector`` below: a plain ``struct`` walk of RFC 7011 (templates, options templates, withdrawals,
  variable-length fields), strict: a data set whose template is unknown, trailing bytes in a set, or a
  withdrawal of an unknown template is an error;
* scapy (``ipfixkit.decode_records``) for the fixed-length layouts it understands;
* tshark (when installed) as a third opinion on variable-length records and sequence numbers.

Every record carries a unique serial, so "the union over the subreceivers equals what was sent, each exactly
once" is a multiset comparison of decoded records (odid, template id, every field's bytes).
"""
from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from ipfixkit import TcpExporter, TcpSink, UdpSink, decode_records, free_port, split_messages, wait_until

HANDLER = "fullflow[0]"
READY_TIMEOUT = 30
TIMEOUT = 20
EXPORT_TIME = 1_700_000_000
VARLEN = 65535

HDR = struct.Struct("!HHIII")
SETH = struct.Struct("!HH")

# Layouts: (IE id, length). IE 1 (octetDeltaCount, 8 bytes) carries each record's serial.
FLOW_A = ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (1, 8), (2, 8), (152, 8), (153, 8))
FLOW_B = ((1, 8), (27, 16), (28, 16), (11, 2), (10, 4))            # IPv6 flow: other fields, other length
FLOW_C = ((4, 1), (1, 8), (7, 2))
OPTIONS = ((143, 4), (1, 8), (41, 8), (42, 8))                     # scope meteringProcessId; then counters
VAR_ONE = ((1, 8), (96, VARLEN))                                   # applicationName (string), variable length
VAR_TWO = ((1, 8), (96, VARLEN), (4, 1), (82, VARLEN), (11, 2))    # two variable-length strings


# --------------------------------------------------------------------------- #
# test exporter: builds messages and remembers every record it sent
# --------------------------------------------------------------------------- #


class Long(bytes):
    """A variable-length value to encode with the 3-byte length prefix even when shorter than 255."""


@dataclass
class Exporter:
    """Builds an IPFIX session: correct per-ODID sequence numbers, and the list of records sent."""

    messages: list = field(default_factory=list)
    records: list = field(default_factory=list)      # (odid, template id, tuple of field bytes)
    seq: Counter = field(default_factory=Counter)
    layouts: dict = field(default_factory=dict)     # (odid, tid) -> fields
    serials: list = field(default_factory=list)     # (odid, template id, serial) of every record sent
    next_serial: int = 0

    @staticmethod
    def tset(*templates) -> bytes:
        """A template set; each template is (tid, fields), fields () = withdrawal of tid."""
        body = b"".join(SETH.pack(tid, len(f)) + b"".join(SETH.pack(ie, n) for ie, n in f) for tid, f in templates)
        return SETH.pack(2, 4 + len(body)) + body

    @staticmethod
    def oset(tid: int, scope: int, fields) -> bytes:
        body = struct.pack("!HHH", tid, len(fields), scope) + b"".join(SETH.pack(ie, n) for ie, n in fields)
        return SETH.pack(3, 4 + len(body)) + body

    @staticmethod
    def withdraw_all(kind: int = 2) -> bytes:
        return SETH.pack(kind, 8) + SETH.pack(kind, 0)

    def define(self, odid: int, tid: int, fields) -> None:
        """Remember the layout a later ``dset`` encodes with (the wire bytes come from tset/oset)."""
        self.layouts[(odid, tid)] = tuple(fields)

    def dset(self, odid: int, tid: int, count: int, var=None, fields=None):
        """A data set of ``count`` records of the template; ``var(i, k)`` gives the k-th variable-length value."""
        fields = fields or self.layouts[(odid, tid)]
        raws, recs = [], []
        for _ in range(count):
            serial = self.next_serial
            self.next_serial += 1
            values, raw, nvar = [], b"", 0
            for ie, n in fields:
                if n == VARLEN:
                    v = var(serial, nvar) if var else b"v%d" % serial
                    nvar += 1
                    if len(v) < 255 and not isinstance(v, Long):
                        raw += bytes([len(v)]) + v
                    else:
                        raw += b"\xff" + struct.pack("!H", len(v)) + v
                    values.append(bytes(v))
                else:
                    v = serial.to_bytes(n, "big") if ie == 1 else ((ie * 7919 + serial) % (1 << (8 * n))).to_bytes(n, "big")
                    raw += v
                    values.append(v)
            raws.append(raw)
            recs.append((odid, tid, tuple(values)))
            self.serials.append((odid, tid, serial))
        body = b"".join(raws)
        return SETH.pack(tid, 4 + len(body)) + body, recs

    def msg(self, odid: int, *parts) -> bytes:
        """Append one message: parts are set bytes or (set bytes, records) from ``dset``."""
        sets, recs = [], []
        for p in parts:
            if isinstance(p, tuple):
                sets.append(p[0])
                recs += p[1]
            else:
                sets.append(p)
        body = b"".join(sets)
        m = HDR.pack(10, 16 + len(body), EXPORT_TIME, self.seq[odid] & 0xFFFFFFFF, odid) + body
        self.seq[odid] += len(recs)
        self.records += recs
        self.messages.append(m)
        return m


# --------------------------------------------------------------------------- #
# independent collector
# --------------------------------------------------------------------------- #


class DecodeError(AssertionError):
    pass


@dataclass
class Decoded:
    records: list                 # (odid, tid, values)
    per_message: list             # data records decoded in each message
    events: list                  # template events in order: (odid, "define"|"withdraw", tid, ...)
    unknown: list                 # (msg index, odid, set id, set bytes) when not strict
    templates: dict               # final (odid, tid) -> (kind, fields, scope)


def collect(messages, *, strict: bool = True) -> Decoded:
    """Decode one transport session like a collector: templates scoped per ODID, learnt in order."""
    templates: dict = {}
    out = Decoded([], [], [], [], templates)
    for i, m in enumerate(messages):
        version, length, _, _, odid = HDR.unpack_from(m)
        if version != 10 or length != len(m):
            raise DecodeError(f"message {i}: not one IPFIX message")
        off, n = 16, 0
        while off < length:
            if length - off < 4:
                raise DecodeError(f"message {i}: stray bytes at {off}")
            sid, slen = SETH.unpack_from(m, off)
            end = off + slen
            if slen < 4 or end > length:
                raise DecodeError(f"message {i}: bad set length {slen}")
            p = off + 4
            if sid in (2, 3):
                while end - p >= 4:
                    tid, count = SETH.unpack_from(m, p)
                    p += 4
                    if count == 0:
                        if tid == sid:
                            for key in [k for k, v in templates.items() if k[0] == odid and v[0] == sid]:
                                del templates[key]
                        elif (odid, tid) not in templates:
                            raise DecodeError(f"message {i}: withdrawal of unknown template {tid} in odid {odid}")
                        else:
                            del templates[(odid, tid)]
                        out.events.append((odid, "withdraw", tid))
                        continue
                    scope = 0
                    if sid == 3:
                        scope, = struct.unpack_from("!H", m, p)
                        p += 2
                    fields = []
                    for _ in range(count):
                        ie, flen = SETH.unpack_from(m, p)
                        p += 4
                        if ie & 0x8000:
                            p += 4
                        fields.append((ie & 0x7FFF, flen))
                    if p > end:
                        raise DecodeError(f"message {i}: template {tid} runs past its set")
                    templates[(odid, tid)] = (sid, tuple(fields), scope)
                    out.events.append((odid, "define", tid, sid, tuple(fields), scope))
                if p != end:
                    raise DecodeError(f"message {i}: {end - p} bytes after the template records")
            elif sid >= 256:
                t = templates.get((odid, sid))
                if t is None:
                    if strict:
                        raise DecodeError(f"message {i}: data set {sid} in odid {odid} with unknown template")
                    out.unknown.append((i, odid, sid, bytes(m[off:end])))
                else:
                    fields = t[1]
                    while p < end:
                        values = []
                        for _ie, flen in fields:
                            if flen == VARLEN:
                                if p >= end:
                                    raise DecodeError(f"message {i}: record cut in a length prefix")
                                flen = m[p]
                                p += 1
                                if flen == 255:
                                    flen, = struct.unpack_from("!H", m, p)
                                    p += 2
                            if p + flen > end:
                                raise DecodeError(f"message {i}: record of template {sid} runs past its set")
                            values.append(bytes(m[p:p + flen]))
                            p += flen
                        out.records.append((odid, sid, tuple(values)))
                        n += 1
            off = end
        out.per_message.append(n)
    return out


def assert_gap_free(messages, decoded: Decoded, where: str = "") -> None:
    """RFC 7011 §3.1 per ODID: seq(k+1) = seq(k) + data records in k; template-only messages keep the value."""
    expected: dict[int, int] = {}
    for i, (m, n) in enumerate(zip(messages, decoded.per_message)):
        _, _, _, seq, odid = HDR.unpack_from(m)
        if odid in expected:
            assert seq == expected[odid], f"{where}: message {i} (odid {odid}) has seq {seq}, expected {expected[odid]}"
        expected[odid] = (seq + n) & 0xFFFFFFFF


# --------------------------------------------------------------------------- #
# harness
# --------------------------------------------------------------------------- #


@pytest.fixture
def sinks():
    """Factory ``sinks(kind="tcp", **kw)``; request before ``balancer`` so the balancer stops first."""
    with contextlib.ExitStack() as stack:
        def make(kind: str = "tcp", **kw):
            return stack.enter_context((TcpSink if kind == "tcp" else UdpSink)(**kw))
        yield make


def start(balancer, port, subs, *, mode="RoundRobin", port_type="tcp", sub_proto="tcp", extra=()):
    lines = [f"IPFIX_FULLFLOW_PORT_TYPE[0]={port_type}", f"IPFIX_FULLFLOW_PORT[0]={port}",
             f"IPFIX_FULLFLOW_BALANCER[0]={mode}",
             "IPFIX_FULLFLOW_BALANCER_SUB[0]=" + ",".join(f"127.0.0.1/{s.port}" for s in subs),
             f"IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]={sub_proto}", *extra]
    b = balancer("\n".join(lines) + "\n")
    b.wait_ready(READY_TIMEOUT)
    return b


def sessions(sink) -> list[list[bytes]]:
    """Messages per output session: per TCP connection, or per UDP source port."""
    if sink.kind == "tcp":
        return [split_messages(c) for c in sink.connections]
    by_src: dict = defaultdict(list)
    for peer, d in zip(sink.peers, sink.datagrams):
        by_src[peer].append(d)
    return list(by_src.values())


def received_records(subs, strict: bool = True) -> Counter:
    return Counter(r for s in subs for msgs in sessions(s) for r in collect(msgs, strict=strict).records)


def wait_all_records(subs, expected, b, strict: bool = True) -> None:
    """Wait until the sinks together decode exactly the ``expected`` records, then for quiet."""
    want = Counter(expected)

    def done():
        try:
            return received_records(subs, strict) == want
        except DecodeError:
            return False
    try:
        wait_until(done, what="every record at the sinks", b=b)
    finally:
        for s in subs:
            s.wait_quiet(0.3, timeout=TIMEOUT)
    got = received_records(subs, strict)
    assert got == want, (f"lost: {sum((want - got).values())}, duplicated or altered: {sum((got - want).values())}"
                         f"\n{b.log_tail()}")


def check_every_session(subs, *, want_events=None) -> list[Decoded]:
    """Every output session decodes strictly and is gap-free; optionally saw exactly ``want_events``."""
    out = []
    for s in subs:
        for k, msgs in enumerate(sessions(s)):
            where = f"{s.kind} sink {s.port} session {k}"
            try:
                d = collect(msgs)
            except DecodeError as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert_gap_free(msgs, d, where)
            if want_events is not None:
                assert d.events == want_events, f"{where}: template events differ from the exporter's"
            out.append(d)
    return out


def scapy_serials(subs) -> Counter:
    """Second opinion for fixed-length layouts: scapy decodes each session; serial = octetDeltaCount."""
    out = Counter()
    for s in subs:
        for msgs in sessions(s):
            out.update((r["odid"], r["template_id"], r["serial"]) for r in decode_records(msgs))
    return out


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #


def test_round_robin_every_record_decodes_exactly_once_with_gap_free_sequence(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, subs)
    ex = Exporter()
    ex.define(1, 256, FLOW_A)
    ex.define(7, 300, FLOW_B)
    ex.define(7, 256, FLOW_C)   # same template id, other ODID, other layout
    ex.msg(1, ex.tset((256, FLOW_A)))
    ex.msg(7, ex.tset((300, FLOW_B), (256, FLOW_C)))
    for i in range(40):
        ex.msg(1, ex.dset(1, 256, 1 + i % 4))
        if i % 3 == 0:
            ex.msg(7, ex.dset(7, 300, 2), ex.dset(7, 256, 3))   # two data sets in one message
        if i == 20:   # a template set and a data set in one message: templates everywhere, data once
            ex.define(1, 257, FLOW_C)
            ex.msg(1, ex.tset((257, FLOW_C)), ex.dset(1, 256, 2), ex.dset(1, 257, 2))
        if i > 20:
            ex.msg(1, ex.dset(1, 257, 1))
    with TcpExporter(port) as e:
        e.send(ex.messages, chunking="random", seed=11)   # at once, straight after connect
    wait_all_records(subs, ex.records, b)
    decoded = check_every_session(subs)
    assert len(decoded) == 3
    for d in decoded:   # every collector learnt every template (data sets went to one collector each)
        assert set(d.templates) == {(1, 256), (7, 300), (7, 256), (1, 257)}
        assert d.records
    assert scapy_serials(subs) == Counter(ex.serials)
    assert b.status(HANDLER)["unknown_template"] == 0


def test_two_exporters_same_template_id_different_layouts(sinks, balancer):
    subs = [sinks(), sinks()]
    port = free_port()
    b = start(balancer, port, subs)
    a, c = Exporter(), Exporter(next_serial=1_000_000)
    a.define(1, 256, FLOW_A)
    c.define(1, 256, FLOW_B)
    a.msg(1, a.tset((256, FLOW_A)))
    c.msg(1, c.tset((256, FLOW_B)))
    for i in range(30):
        a.msg(1, a.dset(1, 256, 3))
        c.msg(1, c.dset(1, 256, 2))
    with TcpExporter(port) as ea, TcpExporter(port) as ec:
        for ma, mc in zip(a.messages, c.messages):   # interleaved message by message
            ea.send([ma])
            ec.send([mc])
    wait_all_records(subs, a.records + c.records, b)
    mine = {"a": Counter(a.records), "c": Counter(c.records)}
    for s in subs:
        assert s.connection_count == 2
        owners = set()
        for msgs in sessions(s):
            d = collect(msgs)
            assert_gap_free(msgs, d, f"sink {s.port}")
            owner = [k for k, recs in mine.items() if all(r in recs for r in d.records)]
            assert len(owner) == 1 and d.records, f"sink {s.port}: a connection mixes both exporters' layouts"
            owners.add(owner[0])
        assert owners == {"a", "c"}
    assert scapy_serials(subs) == Counter(a.serials + c.serials)


def test_template_withdrawal_and_redefinition_mid_stream(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, subs)
    ex = Exporter()
    ex.define(1, 256, FLOW_A)
    ex.define(1, 260, FLOW_C)
    ex.msg(1, ex.tset((256, FLOW_A), (260, FLOW_C)))
    for _ in range(9):
        ex.msg(1, ex.dset(1, 256, 2), ex.dset(1, 260, 1))
    ex.msg(1, ex.tset((256, ())))                      # withdraw one template
    for _ in range(6):
        ex.msg(1, ex.dset(1, 260, 2))
    ex.define(1, 256, FLOW_B)                          # redefine the id with another layout
    ex.msg(1, ex.tset((256, FLOW_B)))
    for _ in range(9):
        ex.msg(1, ex.dset(1, 256, 3))
    ex.define(1, 256, FLOW_C)
    ex.define(1, 270, VAR_ONE)
    # withdraw all, then new definitions and data using them, all in one message
    ex.msg(1, ex.withdraw_all(), ex.tset((256, FLOW_C), (270, VAR_ONE)), ex.dset(1, 256, 2), ex.dset(1, 270, 2))
    for _ in range(9):
        ex.msg(1, ex.dset(1, 256, 1), ex.dset(1, 270, 1))
    want_events = collect(ex.messages).events
    with TcpExporter(port) as e:
        e.send(ex.messages, chunking="message")
    wait_all_records(subs, ex.records, b)
    # every collector saw every definition and withdrawal in order, and decoded its data with the right layout
    # (the union check above compares every field's bytes: each record was decoded with its own layout)
    check_every_session(subs, want_events=want_events)


def test_options_templates(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, subs)
    ex = Exporter()
    ex.define(5, 256, FLOW_A)
    ex.define(5, 400, OPTIONS)
    ex.msg(5, ex.tset((256, FLOW_A)))
    ex.msg(5, ex.oset(400, 1, OPTIONS))
    for i in range(30):
        ex.msg(5, ex.dset(5, 256, 2))
        if i % 5 == 0:
            ex.msg(5, ex.dset(5, 400, 1))
        if i % 7 == 0:
            ex.msg(5, ex.dset(5, 256, 1), ex.dset(5, 400, 2))
    ex.define(5, 401, OPTIONS[:2])
    ex.msg(5, ex.oset(401, 1, OPTIONS[:2]), ex.dset(5, 401, 3))   # options template with its data
    for _ in range(6):
        ex.msg(5, ex.dset(5, 401, 1))
    with TcpExporter(port) as e:
        e.send(ex.messages)
    wait_all_records(subs, ex.records, b)
    for d in check_every_session(subs):
        assert d.templates[(5, 400)] == (3, OPTIONS, 1)
        assert d.templates[(5, 401)] == (3, OPTIONS[:2], 1)
    assert sum(1 for r in ex.records if r[1] in (400, 401)) > 10


def _strings(serial: int, k: int) -> bytes:
    """Variable-length values with 1-byte and 3-byte length prefixes (and the boundaries 0, 254, 255)."""
    choice = (serial + k) % 6
    if choice == 0:
        return b""
    if choice == 1:
        return b"a" * 254                              # longest 1-byte prefix
    if choice == 2:
        return b"b" * 255                              # shortest 3-byte prefix
    if choice == 3:
        return Long(b"short but 3-byte prefix %d" % serial)   # RFC 7011 §7 allows it
    if choice == 4:
        return b"c" * (300 + serial % 700)
    return b"host%d.example" % serial


def _tshark_check(messages):
    """tshark's reading of one session (each message as one UDP datagram to port 4739): per message the
    octetDeltaCount values, the applicationName strings, and tshark's own sequence-gap flag."""
    with tempfile.TemporaryDirectory() as tmp:
        pcap = f"{tmp}/s.pcap"
        wrpcap(pcap, [Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=40000, dport=4739) / Raw(m)
                      for m in messages])
        res = subprocess.run(["tshark", "-n", "-r", pcap, "-d", "udp.port==4739,cflow", "-T", "fields",
                              "-E", "separator=|", "-E", "occurrence=a", "-e", "cflow.octets", "-e", "cflow.appl_name",
                              "-e", "cflow.sequence_analysis.expected_sn", "-e", "_ws.malformed"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line.split("|") for line in res.stdout.splitlines()]


def test_variable_length_fields_decode_and_sequence_is_gap_free(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, subs)
    ex = Exporter()
    ex.define(1, 256, VAR_ONE)
    ex.define(1, 257, VAR_TWO)
    ex.define(1, 258, FLOW_C)
    ex.msg(1, ex.tset((256, VAR_ONE), (257, VAR_TWO), (258, FLOW_C)))
    for i in range(45):
        ex.msg(1, ex.dset(1, 256, 1 + i % 5, var=_strings), ex.dset(1, 257, 1 + i % 3, var=_strings))
        if i % 4 == 0:
            ex.msg(1, ex.dset(1, 258, 2))
    with TcpExporter(port) as e:
        e.send(ex.messages, chunking="random", seed=5)
    wait_all_records(subs, ex.records, b)
    check_every_session(subs)   # gap-free: the balancer counted variable-length records right
    lengths = Counter(len(v[1]) for _, tid, v in ex.records if tid in (256, 257))
    assert lengths[254] and lengths[255] and lengths[0]
    if shutil.which("tshark"):   # third opinion on one subreceiver's stream
        (msgs,) = sessions(subs[0])
        rows = _tshark_check(msgs)
        assert len(rows) == len(msgs)
        mine = collect(msgs)
        for row, m, n in zip(rows, msgs, mine.per_message):
            octets = [x for x in row[0].split(",") if x]
            assert len(octets) == n, f"tshark decodes {len(octets)} records, we {n}"
            assert not row[2], f"tshark sees a sequence gap (expected {row[2]})"
            assert not row[3], "tshark: malformed"
        tshark_serials = [int(x) for row in rows for x in row[0].split(",") if x]
        at = {256: VAR_ONE.index((1, 8)), 257: VAR_TWO.index((1, 8)), 258: FLOW_C.index((1, 8))}
        assert sorted(tshark_serials) == sorted(int.from_bytes(v[at[tid]], "big") for _, tid, v in mine.records)
        names = sorted(x for row in rows for x in row[1].split(",") if x)   # applicationName strings
        assert names == sorted(v[1].decode() for _, tid, v in mine.records if tid in (256, 257) and v[1])


def test_data_set_with_unknown_template_is_forwarded_and_counted(sinks, balancer):
    subs = [sinks(), sinks()]
    port = free_port()
    b = start(balancer, port, subs)
    ex = Exporter()
    ex.define(1, 256, FLOW_A)
    ex.msg(1, ex.tset((256, FLOW_A)))
    for _ in range(10):
        ex.msg(1, ex.dset(1, 256, 2))
    mystery_set = SETH.pack(999, 4 + 24) + bytes(range(24))
    mystery = ex.msg(1, mystery_set)                               # only an unknown set
    mixed = ex.msg(1, ex.dset(1, 256, 3), mystery_set)           # known records + an unknown set
    for _ in range(10):
        ex.msg(1, ex.dset(1, 256, 2))
    with TcpExporter(port) as e:
        e.send(ex.messages)
    wait_all_records(subs, ex.records, b, strict=False)
    st = b.wait_status(HANDLER, lambda st: st["unknown_template"] == 2, TIMEOUT)
    assert st["msgs_in"] == len(ex.messages)
    # forwarded unchanged (except the sequence number), exactly once each
    got = [m for s in subs for m in s.messages()]
    for sent in (mystery, mixed):
        assert sum(1 for m in got if m[:8] + m[12:] == sent[:8] + sent[12:]) == 1
    for s in subs:
        (msgs,) = sessions(s)
        d = collect(msgs, strict=False)
        assert_gap_free(msgs, d, f"sink {s.port}")   # the unknown set counts no records
    unknown = [u for s in subs for msgs in sessions(s) for u in collect(msgs, strict=False).unknown]
    assert sorted(u[3] for u in unknown) == [mystery_set, mystery_set]


@pytest.mark.parametrize("how", ["drop_connections", "down_up"])
def test_restarted_subreceiver_decodes_everything_after_reconnecting(sinks, balancer, how):
    subs = [sinks() for _ in range(3)]
    victim = subs[1]
    port = free_port()
    b = start(balancer, port, subs)
    ex = Exporter()
    ex.define(1, 256, FLOW_A)
    ex.define(2, 256, FLOW_B)
    ex.define(2, 400, OPTIONS)
    ex.define(1, 258, VAR_ONE)

    def batch(n):
        start_at = len(ex.messages)
        for i in range(n):
            ex.msg(1, ex.dset(1, 256, 2), ex.dset(1, 258, 1, var=_strings))
            ex.msg(2, ex.dset(2, 256, 1 + i % 2))
            if i % 4 == 0:
                ex.msg(2, ex.dset(2, 400, 1))
        return ex.messages[start_at:]

    ex.msg(1, ex.tset((256, FLOW_A), (258, VAR_ONE)))
    ex.msg(2, ex.tset((256, FLOW_B)), ex.oset(400, 1, OPTIONS))
    first = ex.messages[:] + batch(12)
    with TcpExporter(port) as e:
        e.send(first)
        wait_all_records(subs, ex.records, b)
        endpoint = f"127.0.0.1/{victim.port}/tcp"
        if how == "drop_connections":
            assert victim.drop_connections() == 1
        else:
            victim.down()
        b.wait_log(lambda line: line.get("event") == "subreceiver_down" and line.get("subreceiver") == endpoint,
                   TIMEOUT)
        e.send(batch(12))                              # the others take it meanwhile
        wait_all_records(subs, ex.records, b)
        if how == "down_up":
            victim.up()
        assert victim.wait_connections(2, TIMEOUT), b.log_tail()
        # the balancer replays the templates on the new connection before any data
        wait_until(lambda: len(sessions(victim)[1]) >= 2, what="template replay", b=b)
        e.send(batch(12))
        wait_all_records(subs, ex.records, b)
    check_every_session(subs)
    after = sessions(victim)[1]
    d = collect(after)   # decodes on its own: every template it needs came on this connection
    assert d.records, "the restarted subreceiver got no data after reconnecting"
    first_data = next(i for i, m in enumerate(after) if any(sid >= 256 for sid in _set_ids(m)))
    replayed = collect(after[:first_data]).templates
    assert set(replayed) == {(1, 256), (1, 258), (2, 256), (2, 400)}
    assert replayed[(2, 400)] == (3, OPTIONS, 1) and replayed[(2, 256)] == (2, FLOW_B, 0)


def _set_ids(m: bytes) -> list[int]:
    out, off = [], 16
    while off < len(m):
        sid, slen = SETH.unpack_from(m, off)
        out.append(sid)
        off += slen
    return out


def _template_only(m: bytes) -> bool:
    return set(_set_ids(m)) <= {2, 3}


@pytest.mark.parametrize("mode", ["RoundRobin", "All"])
def test_udp_output_templates_resent_on_refresh_period(sinks, balancer, mode):
    subs = [sinks("udp"), sinks("udp")]
    port = free_port()
    b = start(balancer, port, subs, mode=mode, sub_proto="udp", extra=["IPFIX_FULLFLOW_TEMPLATE_REFRESH[0]=1"])
    ex = Exporter()
    ex.define(3, 256, FLOW_A)
    ex.define(3, 400, OPTIONS)
    ex.msg(3, ex.tset((256, FLOW_A)), ex.oset(400, 1, OPTIONS))
    for _ in range(6):
        ex.msg(3, ex.dset(3, 256, 2))
    ex.msg(3, ex.dset(3, 400, 1))
    with TcpExporter(port) as e:
        e.send(ex.messages)   # the only templates the exporter ever sends
        first_at, refresh_at = {}, {}
        deadline = time.monotonic() + 8
        while len(refresh_at) < len(subs) and time.monotonic() < deadline:
            now = time.monotonic()
            for s in subs:
                n = sum(1 for m in s.messages() if _template_only(m))
                if n >= 1:
                    first_at.setdefault(s.port, now)
                if n >= 2:
                    refresh_at.setdefault(s.port, now)
            time.sleep(0.02)  # the poll interval of the measurement: when each refresh arrived
        for s in subs:
            assert s.port in refresh_at, f"no template refresh at {s.port} within 8 s\n{b.log_tail()}"
            # period 1 s (timers and polling make it a little less exact)
            assert 0.7 <= refresh_at[s.port] - first_at[s.port] <= 4
            (msgs,) = sessions(s)
            refreshed = [m for m in msgs if _template_only(m)][1]
            assert collect([refreshed]).templates == {(3, 256): (2, FLOW_A, 0), (3, 400): (3, OPTIONS, 1)}
        wait_all_records(subs, ex.records * (len(subs) if mode == "All" else 1), b)
        # the stream goes on after refreshes: still decodable, sequence numbers still gap-free
        more = len(ex.messages)
        for _ in range(6):
            ex.msg(3, ex.dset(3, 256, 1))
        e.send(ex.messages[more:])
        wait_all_records(subs, ex.records * (len(subs) if mode == "All" else 1), b)
    # a refresh is a template-only message: it carries the current sequence number (gap-free check)
    check_every_session(subs)
