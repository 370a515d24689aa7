"""recorder.py: rotation decisions on a fake clock, flow-count rotation, file naming, templates at the head of
every file, .part recovery, export bookkeeping, spool eviction and disk errors.

Files are checked with an independent decoder (ipfixkit: struct framing, scapy records) and, where installed,
libfixbuf's ipfixDump.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import pytest

import ipfixkit
from ipfixkit import (FULLFLOW_FIELDS, TcpSink, UdpSink, decode_records, extract_serials, free_port,
                      header, make_stream, split_messages)
from ipfix_balancer import recorder as recorder_mod
from ipfix_balancer.config import Endpoint, parse
from ipfix_balancer.core.templates import TemplateTracker
from ipfix_balancer.net.loop import Loop
from ipfix_balancer.recorder import Recorder, dump_name, parse_stamp, stamp, target_token

T0 = 1_700_000_000.0   # 2023-11-14T22:13:20Z
IPFIXDUMP = shutil.which("ipfixDump")


class Log:
    """Captures structlog-style calls: ``events`` is a list of (level, event, fields)."""

    def __init__(self):
        self.events = []

    def bind(self, **_kw):
        return self

    def _add(self, level):
        return lambda event, **kw: self.events.append((level, event, kw))

    def __getattr__(self, level):
        if level in ("debug", "info", "warning", "error", "exception"):
            return self._add(level)
        raise AttributeError(level)

    def named(self, event):
        return [kw for _, e, kw in self.events if e == event]


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def receiver(dump_dir, **keys):
    values = {"IPFIX_FULLFLOW_DUMP_DIR[0]": str(dump_dir)}
    values.update({f"IPFIX_FULLFLOW_{k}[0]": str(v) for k, v in keys.items()})
    (rc,) = parse(values, cpus=range(64)).receivers
    return rc


class Exporter:
    """One exporter session as the handler drives it: a template tracker, then recorder.dispatch."""

    def __init__(self, rec):
        self.rec = rec
        self.tracker = TemplateTracker()

    def send(self, messages):
        for m in messages:
            view = memoryview(bytearray(m))  # like the framer: a view into a buffer the recorder must not keep
            odid, nrec, tmpl = self.tracker.inspect(view)
            self.rec.dispatch(view, odid, nrec, tmpl, self.tracker.snapshot)


@pytest.fixture
def make(tmp_path):
    """``make(**keys) -> (recorder, clock, log, notified)``; every recorder is closed at teardown."""
    made = []

    def factory(dump_dir=None, clock=None, loop=None, **keys):
        clock = clock or Clock()
        log = Log()
        notified = []
        rc = receiver(dump_dir or tmp_path / "dump", **keys)
        rec = Recorder(loop or Loop(), rc, log, clock=clock, notify=lambda: notified.append(clock()))
        made.append(rec)
        return rec, clock, log, notified

    yield factory
    for rec in made:
        rec.close()


def dumps(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".ipfix"))


def read_messages(path):
    with open(path, "rb") as f:
        return split_messages(f.read())


def run_loop(loop, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    loop.run(until=lambda: until() or time.monotonic() > deadline)
    assert until(), "condition not reached in time"


# --------------------------------------------------------------------------- #
# naming
# --------------------------------------------------------------------------- #

def test_names_are_utc_sortable_and_carry_stream_and_dpi_id():
    assert stamp(T0) == "20231114T221320Z" and parse_stamp("20231114T221320Z") == T0
    assert dump_name("FULLFLOW", 7, T0, T0 + 600) == "fullflow_7_20231114T221320Z_20231114T222320Z.ipfix"
    assert target_token(Endpoint("10.0.0.2", 9920, "tcp")) == "10.0.0.2_9920_tcp"
    assert target_token(Endpoint("::1", 9920, "udp")) == "[::1]_9920_udp"


def test_part_name_then_final_name_with_dpi_id(make, tmp_path):
    rec, clock, _, _ = make(DPI_ID=7)
    Exporter(rec).send(make_stream(3, 5))
    assert rec.status().file == "fullflow_7_20231114T221320Z.part"
    assert os.listdir(tmp_path / "dump") == ["fullflow_7_20231114T221320Z.part"]
    clock.advance(90)
    rec.rotate("hup")
    assert dumps(tmp_path / "dump") == ["fullflow_7_20231114T221320Z_20231114T221450Z.ipfix"]
    assert rec.status().last_file == "fullflow_7_20231114T221320Z_20231114T221450Z.ipfix"


def test_same_second_names_get_a_sortable_suffix(make, tmp_path):
    rec, _, _, _ = make(FW_MAX_QUEUE_SIZE=10)
    Exporter(rec).send(make_stream(3, 10))   # three flow rotations within the same second
    names = dumps(tmp_path / "dump")
    base = "fullflow_0_20231114T221320Z_20231114T221320Z"
    assert names == [f"{base}.ipfix", f"{base}_001.ipfix", f"{base}_002.ipfix"] == sorted(names)


# --------------------------------------------------------------------------- #
# rotation
# --------------------------------------------------------------------------- #

def test_time_rotation_decision_on_a_fake_clock(make, tmp_path):
    rec, clock, _, notified = make(ROTATE_MINUTES=10)
    exporter = Exporter(rec)
    exporter.send(make_stream(2, 5))
    clock.advance(599.9)
    assert rec.poll_time() is False and rec.status().next_rotation_s == pytest.approx(0.1)
    clock.advance(0.1)
    assert rec.poll_time() is True
    assert dumps(tmp_path / "dump") == ["fullflow_0_20231114T221320Z_20231114T222320Z.ipfix"]
    assert notified == [T0 + 600]   # a Fullflow recorder asks for the HUP relay after each rotation
    assert rec.due == T0 + 1200


def test_minutes_rotation_is_driven_by_the_loop_timer(make):
    """The real timer path: the loop's timer calls poll_time, which asks the (fake) clock."""
    loop = Loop()
    rec, clock, _, _ = make(loop=loop, ROTATE_MINUTES=10)
    Exporter(rec).send(make_stream(1, 1))
    clock.advance(600)
    rec._schedule()  # the timer is due now on the loop's monotonic clock
    run_loop(loop, lambda: rec.files_completed == 1, timeout=5)


def test_rotate_delay_seconds_overrides_minutes(make):
    rec, clock, _, _ = make(ROTATE_MINUTES=10, ROTATE_DELAY_SECONDS=5)
    assert rec.rotate_seconds == 5 and rec.due == T0 + 5


def test_hup_rotation_restarts_the_timer(make, tmp_path):
    rec, clock, _, _ = make(ROTATE_DELAY_SECONDS=60)
    Exporter(rec).send(make_stream(1, 5))
    clock.advance(45)
    rec.rotate("hup")
    assert rec.due == T0 + 45 + 60
    clock.advance(30)   # 75 s after start: the old period would be over, the new one is not
    assert rec.poll_time() is False
    assert len(dumps(tmp_path / "dump")) == 1


def test_empty_period_makes_no_file_but_still_rotates(make, tmp_path):
    rec, clock, _, notified = make(ROTATE_DELAY_SECONDS=10)
    clock.advance(10)
    assert rec.poll_time() is True
    rec.rotate("hup")
    assert dumps(tmp_path / "dump") == [] and rec.rotations == 2 and len(notified) == 2


def test_clock_stepped_back_rotates_instead_of_waiting(make):
    rec, clock, _, _ = make(ROTATE_DELAY_SECONDS=600)
    clock.advance(-3600)
    assert rec.poll_time() is True and rec.due == T0 - 3600 + 600


def test_no_time_rotation_when_both_periods_are_zero(make):
    rec, clock, _, _ = make(ROTATE_MINUTES=0, FW_MAX_QUEUE_SIZE=5)
    assert rec.due is None and rec.status().next_rotation_s is None
    clock.advance(10 ** 6)
    assert rec.poll_time() is False


def test_flow_count_rotation_never_cuts_a_message(make, tmp_path):
    rec, _, _, _ = make(FW_MAX_QUEUE_SIZE=100)
    Exporter(rec).send(make_stream(10, 30))   # 300 flows in 30-flow messages: 120 + 120 + 60
    rec.close()
    counts = [len(extract_serials(read_messages(tmp_path / "dump" / n))) for n in dumps(tmp_path / "dump")]
    assert counts == [120, 120, 60]


def test_flow_count_rotation_exact_multiple(make, tmp_path):
    rec, _, log, _ = make(FW_MAX_QUEUE_SIZE=100)
    Exporter(rec).send(make_stream(25, 10))
    names = dumps(tmp_path / "dump")
    assert [len(extract_serials(read_messages(tmp_path / "dump" / n))) for n in names] == [100, 100]
    assert [e["reason"] for e in log.named("dump_completed")] == ["flows", "flows"]
    assert rec.status().file_flows == 50


def test_non_fullflow_recorder_does_not_notify_by_default(tmp_path):
    (rc,) = parse({"IPFIX_CLICKSTREAM_DUMP_DIR[0]": str(tmp_path)}, cpus=range(4)).receivers
    rec = Recorder(Loop(), rc, Log(), clock=Clock())
    assert rec._notify is None
    rec.close()


# --------------------------------------------------------------------------- #
# templates at the head of each file
# --------------------------------------------------------------------------- #

def test_every_file_decodes_alone_and_all_files_hold_every_record_once(make, tmp_path):
    rec, clock, _, _ = make(ROTATE_DELAY_SECONDS=1)
    stream = make_stream(40, 7)
    exporter = Exporter(rec)
    for i in range(0, len(stream), 10):
        exporter.send(stream[i:i + 10])
        clock.advance(1)
        rec.poll_time()
    rec.close()
    names = dumps(tmp_path / "dump")
    assert len(names) == 5
    serials = []
    for name in names:
        messages = read_messages(tmp_path / "dump" / name)
        assert set(ipfixkit.set_ids(messages[0])) == {2}   # a file starts with templates
        records = decode_records(messages)                  # strict: raises on an unknown template
        serials += [r["serial"] for r in records]
    assert serials == list(range(280))


def test_head_templates_carry_the_next_messages_sequence_number_and_export_time(make, tmp_path):
    rec, _, _, _ = make()
    stream = make_stream(6, 10, export_time=1_600_000_000)
    exporter = Exporter(rec)
    exporter.send(stream[:4])
    rec.rotate("hup")
    exporter.send(stream[4:])
    rec.close()
    first, second = dumps(tmp_path / "dump")
    head, data = read_messages(tmp_path / "dump" / second)[:2]
    assert ipfixkit.set_ids(head) == [2] and header(head)[2:] == header(data)[2:] == (1_600_000_000, 30, 1)
    assert read_messages(tmp_path / "dump" / second)[1:] == stream[4:]   # exporter messages byte-identical


@pytest.mark.skipif(IPFIXDUMP is None, reason="libfixbuf's ipfixDump is not installed")
def test_ipfixdump_reads_each_file_without_warnings(make, tmp_path):
    rec, _, _, _ = make(FW_MAX_QUEUE_SIZE=50)
    Exporter(rec).send(make_stream(20, 10))
    rec.close()
    names = dumps(tmp_path / "dump")
    assert len(names) == 4
    for name in names:
        out = subprocess.run([IPFIXDUMP, "-s", "-i", str(tmp_path / "dump" / name)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert "50 Data Records" in out.stdout


def test_each_odid_gets_its_own_head(make, tmp_path):
    rec, _, _, _ = make()
    exporter = Exporter(rec)
    a, b = make_stream(3, 5, odid=1), make_stream(3, 5, odid=2, first_serial=100)
    exporter.send([a[0], b[0], a[1], b[1]])
    rec.rotate("hup")
    exporter.send([b[2], a[2], b[3], a[3]])
    rec.close()
    _, second = dumps(tmp_path / "dump")
    messages = read_messages(tmp_path / "dump" / second)
    assert [(header(m)[4], ipfixkit.set_ids(m)) for m in messages] == [
        (2, [2]), (2, [256]), (1, [2]), (1, [256]), (2, [256]), (1, [256])]
    assert sorted(r["serial"] for r in decode_records(messages)) == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                    105, 106, 107, 108, 109, 110, 111, 112, 113,
                                                                    114]


SHORT_FIELDS = tuple(f for f in FULLFLOW_FIELDS if f.name in ("sourceIPv4Address", "octetDeltaCount"))


def test_sessions_sharing_an_odid_with_different_templates(make, tmp_path):
    """Two exporters, ODID 1 each, template 256 defined differently: the sender's templates are written
    whenever the sender changes, so a sequential decoder gets every record right."""
    rec, _, log, _ = make()
    a, b = Exporter(rec), Exporter(rec)
    sa = make_stream(3, 4)
    sb = make_stream(3, 4, fields=SHORT_FIELDS, first_serial=1000)
    a.send(sa[:1])
    b.send(sb[:1])
    a.send(sa[1:2])
    b.send(sb[1:2])
    a.send(sa[2:])
    b.send(sb[2:])
    rec.close()
    (name,) = dumps(tmp_path / "dump")
    records = decode_records(read_messages(tmp_path / "dump" / name))
    assert sorted(r["serial"] for r in records) == list(range(12)) + list(range(1000, 1012))
    assert all(("packetDeltaCount" in r) == (r["serial"] < 1000) for r in records)
    # b's template message announces itself; then data-only sender changes a->b->a->b->a->b... are switches
    assert rec.template_switches == 4
    assert len(log.named("odid_shared_templates")) == 1   # once per ODID per file


def test_sessions_sharing_an_odid_with_equal_templates_write_no_extra_templates(make, tmp_path):
    rec, _, log, _ = make()
    a, b = Exporter(rec), Exporter(rec)
    sa, sb = make_stream(3, 4), make_stream(3, 4, first_serial=1000)
    for i in range(4):
        a.send(sa[i:i + 1])
        b.send(sb[i:i + 1])
    rec.close()
    (name,) = dumps(tmp_path / "dump")
    messages = read_messages(tmp_path / "dump" / name)
    assert sum(ipfixkit.set_ids(m) == [2] for m in messages) == 3   # head + each exporter's own template message
    assert rec.template_switches == 0 and not log.named("odid_shared_templates")


def test_template_redefinition_by_the_exporter_is_kept_in_order(make, tmp_path):
    rec, _, _, _ = make()
    e = Exporter(rec)
    e.send(make_stream(2, 3))
    e.send(make_stream(2, 3, fields=SHORT_FIELDS, first_serial=50))   # redefines 256
    rec.close()
    (name,) = dumps(tmp_path / "dump")
    records = decode_records(read_messages(tmp_path / "dump" / name))
    assert [(r["serial"], "packetDeltaCount" in r) for r in records] == [
        (0, True), (1, True), (2, True), (3, True), (4, True), (5, True),
        (50, False), (51, False), (52, False), (53, False), (54, False), (55, False)]


# --------------------------------------------------------------------------- #
# crash safety
# --------------------------------------------------------------------------- #

def write_part(path, messages, tail=b"", mtime=None):
    path.write_bytes(b"".join(messages) + tail)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_leftover_part_is_cut_to_whole_messages_and_renamed(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    stream = make_stream(5, 10)
    write_part(dump / "fullflow_0_20231114T220000Z.part", stream, tail=stream[1][:37], mtime=T0 - 60)
    rec, _, log, _ = make()
    assert dumps(dump) == ["fullflow_0_20231114T220000Z_20231114T221220Z.ipfix"]
    assert read_messages(dump / dumps(dump)[0]) == stream
    (event,) = log.named("dump_recovered")
    assert event["cut_bytes"] == 37 and event["messages"] == 6
    assert rec.status().recovered_files == 1 and not [n for n in os.listdir(dump) if n.endswith(".part")]


def test_leftover_parts_of_other_dpi_ids_and_suffixes_are_recovered(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    write_part(dump / "fullflow_3_20231114T220000Z.part", make_stream(1, 1), mtime=T0)
    write_part(dump / "fullflow_3_20231114T220000Z.1.part", make_stream(1, 1), mtime=T0)
    make()
    assert dumps(dump) == ["fullflow_3_20231114T220000Z_20231114T221320Z.ipfix",
                           "fullflow_3_20231114T220000Z_20231114T221320Z_001.ipfix"]


def test_empty_and_corrupt_parts(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "fullflow_0_20231114T220000Z.part").write_bytes(b"")
    (dump / "fullflow_0_20231114T220100Z.part").write_bytes(b"not ipfix at all, no")
    (dump / "notes.part").write_bytes(b"someone else's")
    _, _, log, _ = make()
    assert sorted(os.listdir(dump)) == ["fullflow_0_20231114T220100Z.part.corrupt", "notes.part"]
    assert log.named("dump_part_corrupt") and log.named("dump_part_unknown")


def test_a_part_that_appears_is_never_overwritten(make, tmp_path):
    rec, _, _, _ = make()
    squatter = tmp_path / "dump" / "fullflow_0_20231114T221320Z.part"
    squatter.write_bytes(b"precious")
    Exporter(rec).send(make_stream(1, 1))
    assert squatter.read_bytes() == b"precious"
    assert rec.status().file == "fullflow_0_20231114T221320Z.1.part"
    rec.close()
    assert dumps(tmp_path / "dump") == ["fullflow_0_20231114T221320Z_20231114T221320Z.ipfix"]


def test_periodic_flush_puts_whole_messages_in_the_part(make, tmp_path):
    rec, _, _, _ = make()
    stream = make_stream(10, 10)
    Exporter(rec).send(stream)
    assert rec.status().buffered_bytes == 2 * len(stream[0]) + sum(map(len, stream[1:]))  # head + stream
    rec._periodic_flush()
    (part,) = os.listdir(tmp_path / "dump")
    assert read_messages(tmp_path / "dump" / part)[1:] == stream and rec.status().buffered_bytes == 0


def test_full_buffer_is_written_in_whole_messages(tmp_path):
    rec = Recorder(Loop(), receiver(tmp_path), Log(), clock=Clock(), notify=lambda: None, buffer_bytes=200_000)
    stream = make_stream(500, 10)   # ~240 kB: one write when the buffer is full
    Exporter(rec).send(stream)
    (part,) = os.listdir(tmp_path)
    on_disk = split_messages((tmp_path / part).read_bytes())
    assert 1 < len(on_disk) < len(stream) and on_disk[1:] == stream[:len(on_disk) - 1]
    rec.close()


# --------------------------------------------------------------------------- #
# disk errors
# --------------------------------------------------------------------------- #

def test_unusable_directory_counts_drops_and_recovers_at_rotation(make, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the dump directory should be")
    rec, clock, log, _ = make(dump_dir=blocker / "dump")
    stream = make_stream(5, 2)
    Exporter(rec).send(stream)
    st = rec.status()
    assert rec.drops == 6 and st.drops == 6 and "Not a directory" in st.error
    assert len(log.named("dump_open_failed")) == 1   # not once per message
    blocker.unlink()
    rec.rotate("time")
    Exporter(rec).send(stream)
    assert rec.status().error == "" and log.named("dump_writable_again")
    rec.close()
    assert len(dumps(blocker / "dump")) == 1


def test_disk_full_cuts_back_to_whole_messages_and_keeps_accepting(make, tmp_path, monkeypatch):
    rec, clock, log, _ = make()
    stream = make_stream(20, 10)
    exporter = Exporter(rec)
    exporter.send(stream[:11])
    rec._flush()                               # 11 messages on disk
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data[:100]))       # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(recorder_mod.os, "write", full)
    exporter.send(stream[11:16])
    rec._flush()                               # fails: 5 buffered messages lost, file completed
    exporter.send(stream[16:])                 # no file until the next rotation: counted
    assert rec.drops == 5 + 5
    assert "No space left on device" in rec.status().error and log.named("dump_write_failed")
    (name,) = dumps(tmp_path / "dump")
    assert read_messages(tmp_path / "dump" / name)[1:] == stream[:11]   # the partial write was cut off
    monkeypatch.setattr(recorder_mod.os, "write", real_write)
    rec.rotate("time")
    exporter.send(make_stream(1, 10, first_serial=200, first_seq=200)[1:])
    rec.close()
    assert len(dumps(tmp_path / "dump")) == 2
    assert rec.status().error == ""


# --------------------------------------------------------------------------- #
# export bookkeeping and spool
# --------------------------------------------------------------------------- #

def markers(path):
    return sorted(n for n in os.listdir(path) if ".pending-" in n or ".sent-" in n)


def test_tcp_export_delivers_each_file_then_deletes_it(make, tmp_path):
    loop = Loop()
    with TcpSink() as sink:
        rec, clock, log, _ = make(loop=loop, FW_MAX_QUEUE_SIZE=50, DUMP_INSERT_PROCESSES=sink.endpoint)
        stream = make_stream(20, 10)
        Exporter(rec).send(stream)   # 4 files
        run_loop(loop, lambda: rec.targets[0].files_sent == 4)
        assert sink.connection_count == 4
        serials = []
        for conn in sink.connections:
            serials += [r["serial"] for r in decode_records(split_messages(conn))]   # each transfer decodes alone
        assert serials == list(range(200))
        assert dumps(tmp_path / "dump") == [] and markers(tmp_path / "dump") == []
        assert [e["target"] for e in log.named("dump_exported")] == [sink.endpoint] * 4


def test_udp_export_sends_one_datagram_per_message(make, tmp_path):
    loop = Loop()
    with UdpSink() as sink:
        rec, _, _, _ = make(loop=loop, DUMP_INSERT_PROCESSES=sink.endpoint)
        stream = make_stream(30, 10)
        Exporter(rec).send(stream)
        rec.rotate("hup")
        run_loop(loop, lambda: rec.targets[0].files_sent == 1)
        assert sink.wait_messages(32, timeout=5)
        assert sink.datagrams == stream[:1] + stream   # the head template, then the stream as received


def test_down_target_keeps_files_pending_across_a_restart(make, tmp_path):
    port = free_port()
    target = f"127.0.0.1/{port}/tcp"
    loop = Loop()
    rec, clock, log, _ = make(loop=loop, DUMP_INSERT_PROCESSES=target, ROTATE_DELAY_SECONDS=60)
    stream = make_stream(9, 10)
    Exporter(rec).send(stream[:4])
    rec.rotate("hup")
    Exporter(rec).send(stream[4:])   # a new session (its template message first)
    rec.rotate("hup")
    run_loop(loop, lambda: rec.targets[0].state == "down")
    assert [(t.target, t.pending) for t in rec.status().exports] == [(target, 2)] and log.named("export_failed")
    assert len(markers(tmp_path / "dump")) == 2
    rec.close()
    # a new run finds the pending markers; the target is up now
    with TcpSink(port=port) as sink:
        loop2 = Loop()
        rec2, _, _, _ = make(loop=loop2, DUMP_INSERT_PROCESSES=target)
        assert len(rec2.targets[0].queue) == 2
        run_loop(loop2, lambda: rec2.targets[0].files_sent == 2)
        assert sorted(s for c in sink.connections for s in extract_serials(split_messages(c))) == list(range(90))
    assert dumps(tmp_path / "dump") == [] and markers(tmp_path / "dump") == []


def test_file_is_kept_until_every_target_has_it(make, tmp_path):
    down = f"127.0.0.1/{free_port()}/tcp"
    loop = Loop()
    with TcpSink() as sink:
        rec, _, _, _ = make(loop=loop, DUMP_INSERT_PROCESSES=f"{sink.endpoint},{down}")
        Exporter(rec).send(make_stream(3, 3))
        rec.rotate("hup")
        run_loop(loop, lambda: rec.targets[0].files_sent == 1 and rec.targets[1].state == "down")
        (name,) = dumps(tmp_path / "dump")
        assert markers(tmp_path / "dump") == [f"{name}.pending-{target_token(rec.targets[1].ep)}",
                                              f"{name}.sent-{target_token(rec.targets[0].ep)}"]


def test_startup_bookkeeping_delivered_removed_target_orphans(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    data = b"".join(make_stream(1, 1))
    a, b = "127.0.0.1_1_tcp", "127.0.0.1_2_tcp"
    (dump / "fullflow_0_A_B.ipfix").write_bytes(data)          # delivered to the only configured target
    (dump / f"fullflow_0_A_B.ipfix.sent-{a}").touch()
    (dump / "fullflow_0_C_D.ipfix").write_bytes(data)          # pending only for a target no longer configured
    (dump / f"fullflow_0_C_D.ipfix.pending-{b}").touch()
    (dump / "fullflow_0_E_F.ipfix").write_bytes(data)          # recorded without targets: kept, not exported
    (dump / f"fullflow_0_X_Y.ipfix.pending-{a}").touch()       # orphan marker
    (dump / "fullflow_0_G_H.ipfix").write_bytes(data)          # still pending for a, sent to removed b
    (dump / f"fullflow_0_G_H.ipfix.pending-{a}").touch()
    (dump / f"fullflow_0_G_H.ipfix.sent-{b}").touch()
    rec, _, log, _ = make(DUMP_INSERT_PROCESSES="127.0.0.1/1/tcp")
    assert dumps(dump) == ["fullflow_0_C_D.ipfix", "fullflow_0_E_F.ipfix", "fullflow_0_G_H.ipfix"]
    assert markers(dump) == [f"fullflow_0_G_H.ipfix.pending-{a}"]
    assert rec.targets[0].queue == ["fullflow_0_G_H.ipfix"]
    (removed,) = log.named("export_target_removed")
    assert (removed["target"], removed["files"]) == (b, 1)


def test_spool_limit_evicts_oldest_undelivered_first(make, tmp_path):
    target = f"127.0.0.1/{free_port()}/tcp"
    stream = make_stream(30, 10)
    size = sum(map(len, stream[:11]))   # one file: head template + 10 data messages (+ the exporter's template)
    rec, clock, log, _ = make(DUMP_INSERT_PROCESSES=target, SPOOL_BYTES=3 * size + 100)
    e = Exporter(rec)
    for i in range(3):
        e.send(stream[1 + 10 * i: 11 + 10 * i] if i else stream[:11])
        clock.advance(1)
        rec.rotate("hup")
    names = dumps(tmp_path / "dump")
    assert len(names) == 3 and rec.evicted_files == 0
    e.send(make_stream(10, 10, first_serial=300, first_seq=300, with_template=False))
    rec.rotate("hup")
    assert dumps(tmp_path / "dump") == names[1:] + [rec.last_file]
    (evicted,) = log.named("dump_evicted")
    assert evicted["file"] == names[0] and evicted["not_delivered_to"] == [target]
    assert rec.targets[0].queue == dumps(tmp_path / "dump")
    assert rec.status().spool_bytes == 3 * size and not any(names[0] in m for m in markers(tmp_path / "dump"))


def test_without_targets_and_limit_files_stay(make, tmp_path):
    rec, _, _, _ = make(FW_MAX_QUEUE_SIZE=10)
    Exporter(rec).send(make_stream(20, 10))
    rec.close()
    assert len(dumps(tmp_path / "dump")) == 20 and rec.evicted_files == 0


def test_status_has_one_entry_per_export_target(make):
    rec, _, _, _ = make(DUMP_INSERT_PROCESSES="127.0.0.1/9/tcp,127.0.0.1/10/udp")
    Exporter(rec).send(make_stream(2, 3))
    st = rec.status()
    assert st.dpi_id == 0 and st.file_msgs == 3 and st.file_flows == 6
    assert [(t.target, t.pending, t.sent) for t in st.exports] == [("127.0.0.1/9/tcp", 0, 0),
                                                                   ("127.0.0.1/10/udp", 0, 0)]
