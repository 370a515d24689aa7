"""recording/recorder.py: rotation decisions on a fake clock, flow-count rotation, file naming, templates at the
head of every file, the write buffer, disk errors, status and balancer-auto receivers.

Files are checked with an independent decoder (ipfixkit: struct framing, scapy records) and, where installed,
libfixbuf's ipfixDump.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

import ipfixkit
from ipfixkit import FULLFLOW_FIELDS, decode_records, extract_serials, header, make_stream, split_messages
from fakes import FakeClock, Log
from recordkit import T0, Exporter, dumps, read_messages, receiver, run_loop
from ipfix_balancer.config import parse
from ipfix_balancer.net.loop import Loop
from ipfix_balancer.recording import dumpfile
from ipfix_balancer.recording.recorder import Recorder

IPFIXDUMP = shutil.which("ipfixDump")


# --------------------------------------------------------------------------- #
# naming
# --------------------------------------------------------------------------- #

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

def test_a_part_that_appears_is_never_overwritten(make, tmp_path):
    rec, _, _, _ = make()
    squatter = tmp_path / "dump" / "fullflow_0_20231114T221320Z.part"
    squatter.write_bytes(b"precious")
    Exporter(rec).send(make_stream(1, 1))
    assert squatter.read_bytes() == b"precious"
    assert rec.status().file == "fullflow_0_20231114T221320Z.1.part"
    rec.close()
    assert dumps(tmp_path / "dump") == ["fullflow_0_20231114T221320Z_20231114T221320Z.ipfix"]

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
    (rc,) = parse.load_values({"IPFIX_CLICKSTREAM_DUMP_DIR[0]": str(tmp_path)}, cpus=range(4)).receivers
    rec = Recorder(Loop(), rc, Log(), clock=FakeClock(T0))
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
# write buffer, disk errors
# --------------------------------------------------------------------------- #

def test_periodic_flush_puts_whole_messages_in_the_part(make, tmp_path):
    rec, _, _, _ = make()
    stream = make_stream(10, 10)
    Exporter(rec).send(stream)
    assert rec.status().buffered_bytes == 2 * len(stream[0]) + sum(map(len, stream[1:]))  # head + stream
    rec._periodic_flush()
    (part,) = os.listdir(tmp_path / "dump")
    assert read_messages(tmp_path / "dump" / part)[1:] == stream and rec.status().buffered_bytes == 0

def test_full_buffer_is_written_in_whole_messages(tmp_path):
    rec = Recorder(Loop(), receiver(tmp_path), Log(), clock=FakeClock(T0), notify=lambda: None, buffer_bytes=200_000)
    stream = make_stream(500, 10)   # ~240 kB: one write when the buffer is full
    Exporter(rec).send(stream)
    (part,) = os.listdir(tmp_path)
    on_disk = split_messages((tmp_path / part).read_bytes())
    assert 1 < len(on_disk) < len(stream) and on_disk[1:] == stream[:len(on_disk) - 1]
    rec.close()

def test_unusable_directory_counts_drops_and_recovers_at_rotation(make, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the dump directory should be")
    monkeypatch.setattr(parse, "_unusable_dir", lambda _path, _host: None)  # it appeared after the config was checked
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

    monkeypatch.setattr(dumpfile.os, "write", full)
    exporter.send(stream[11:16])
    rec._flush()                               # fails: 5 buffered messages lost, file completed
    exporter.send(stream[16:])                 # no file until the next rotation: counted
    assert rec.drops == 5 + 5
    assert "No space left on device" in rec.status().error and log.named("dump_write_failed")
    (name,) = dumps(tmp_path / "dump")
    assert read_messages(tmp_path / "dump" / name)[1:] == stream[:11]   # the partial write was cut off
    monkeypatch.setattr(dumpfile.os, "write", real_write)
    rec.rotate("time")
    exporter.send(make_stream(1, 10, first_serial=200, first_seq=200)[1:])
    rec.close()
    assert len(dumps(tmp_path / "dump")) == 2
    assert rec.status().error == ""

# --------------------------------------------------------------------------- #
# status
# --------------------------------------------------------------------------- #

def test_status_has_one_entry_per_export_target(make):
    rec, _, _, _ = make(DUMP_INSERT_PROCESSES="127.0.0.1/9/tcp,127.0.0.1/10/udp")
    Exporter(rec).send(make_stream(2, 3))
    st = rec.status()
    assert st.dpi_id == 0 and st.file_msgs == 3 and st.file_flows == 6
    assert [(t.target, t.pending, t.sent) for t in st.exports] == [("127.0.0.1/9/tcp", 0, 0),
                                                                   ("127.0.0.1/10/udp", 0, 0)]

def test_names_stay_in_time_order_when_the_clock_steps_back(make, tmp_path):
    rec, clock, _, _ = make(ROTATE_DELAY_SECONDS=60)
    exporter = Exporter(rec)
    exporter.send(make_stream(2, 1))
    clock.advance(30)
    exporter.send(make_stream(2, 1, first_serial=2, with_template=False))
    clock.advance(-3600)  # an NTP step back: rotates at once
    assert rec.poll_time() is True
    for i in range(2):
        exporter.send(make_stream(1, 1, first_serial=4 + i, with_template=False))
        clock.advance(60)
        rec.poll_time()
    clock.advance(3600)
    exporter.send(make_stream(1, 1, first_serial=6, with_template=False))
    rec.rotate("hup")
    names = dumps(tmp_path / "dump")  # sorted by name
    a = "20231114T221320Z"  # T0: the open file ends at its start, the time its clock last showed
    assert names == [f"fullflow_0_{a}_{a}.ipfix", f"fullflow_0_{a}_{a}_001.ipfix", f"fullflow_0_{a}_{a}_002.ipfix",
                     f"fullflow_0_{a}_20231114T221550Z.ipfix"]  # past T0 again: T0 + 150 s
    files = [read_messages(tmp_path / "dump" / n) for n in names]
    assert [extract_serials(m) for m in files] == [[0, 1, 2, 3], [4], [5], [6]]
