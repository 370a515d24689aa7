"""End to end (issue 4): recording mode through the real ``ipfix-balancer run``, loopback only.

Every completed dump is decoded on its own by an independent decoder (ipfixkit: struct framing + scapy
records; libfixbuf's ``ipfixDump`` where installed), and the dumps together must hold every record sent
exactly once. Waits poll status/log conditions with generous timeouts (2 cores, other work running).
"""
from __future__ import annotations

import datetime
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ipfixkit import TcpExporter, TcpSink, decode_records, extract_serials, free_port, make_stream, run_cli, \
    split_messages, wait_until

READY = 30
TIMEOUT = 20
IPFIXDUMP = shutil.which("ipfixDump")


def recorder_env(stream: str, port: int, dump_dir: Path, **keys) -> str:
    lines = [f"IPFIX_{stream}_PORT[0]={port}", f"IPFIX_{stream}_BALANCER[0]=Disabled",
             f"IPFIX_{stream}_DUMP_DIR[0]={dump_dir}"]
    lines += [f"IPFIX_{stream}_{k}[0]={v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def dumps(path: Path) -> list[Path]:
    return sorted(path.glob("*.ipfix")) if path.exists() else []


def recorder_status(b, name="fullflow[0]") -> dict:
    return b.status(name).get("recorder") or {}


def decode_alone(path: Path) -> list[int]:
    """Serials of one dump decoded with nothing but the dump (scapy, strict: unknown templates raise)."""
    messages = split_messages(path.read_bytes())
    return [r["serial"] for r in decode_records(messages)]


def ipfixdump_records(path: Path) -> int:
    out = subprocess.run([IPFIXDUMP, "-s", "-i", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Missing" not in out.stderr, out.stderr
    return int(out.stdout.split(" Data Records")[0].rsplit(" ", 1)[1])


def log_time(line: dict) -> float:
    return datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def test_seconds_rotation_each_file_decodes_alone_and_status_shows_the_recorder(balancer, tmp_path):
    dump = tmp_path / "dump"
    port = free_port()
    b = balancer(recorder_env("FULLFLOW", port, dump, ROTATE_DELAY_SECONDS=1, DPI_ID=5))
    b.wait_ready(READY)
    stream = make_stream(300, 10)
    with TcpExporter(port) as exporter:
        for i, batch in enumerate((stream[:101], stream[101:201], stream[201:])):
            exporter.send(batch)
            if i < 2:   # a rotation after each batch: at least three files with data
                done = recorder_status(b).get("files_completed", 0)
                wait_until(lambda: recorder_status(b).get("files_completed", 0) > done, "a rotation", b)
        wait_until(lambda: b.status("fullflow[0]")["msgs_in"] == len(stream), "all messages in", b)
        st = recorder_status(b)
        assert st["dpi_id"] == 5 and st["rotate_seconds"] == 1 and st["error"] == ""
        out = run_cli("status", "--run-dir", b.run_dir)
        assert out.returncode == 0 and "recorder" in out.stdout and "dpi_id=5" in out.stdout, out.stdout
    assert b.stop() == 0
    files = dumps(dump)
    assert len(files) >= 3 and not list(dump.glob("*.part"))
    assert all(f.name.startswith("fullflow_5_") for f in files)
    serials = []
    for f in files:
        serials += decode_alone(f)
        if IPFIXDUMP:
            assert ipfixdump_records(f) == len(extract_serials(split_messages(f.read_bytes())))
    assert serials == list(range(3000))


def test_flow_count_rotation(balancer, tmp_path):
    dump = tmp_path / "dump"
    port = free_port()
    b = balancer(recorder_env("FULLFLOW", port, dump, FW_MAX_QUEUE_SIZE=100, ROTATE_MINUTES=0))
    b.wait_ready(READY)
    TcpExporter(port).send(make_stream(100, 10))
    wait_until(lambda: len(dumps(dump)) == 10, "ten dumps", b)
    assert recorder_status(b)["file"] == ""   # the 10th rotation came with the last record: no open file
    for f in dumps(dump):
        assert len(decode_alone(f)) == 100
        if IPFIXDUMP:
            assert ipfixdump_records(f) == 100
    assert {e["reason"] for e in b.logs() if e.get("event") == "dump_completed"} == {"flows"}


@pytest.mark.skipif(IPFIXDUMP is None, reason="libfixbuf's ipfixDump is not installed")
def test_ipfixdump_sees_no_sequence_gap_at_a_file_start(balancer, tmp_path):
    dump = tmp_path / "dump"
    port = free_port()
    b = balancer(recorder_env("FULLFLOW", port, dump, FW_MAX_QUEUE_SIZE=50, ROTATE_MINUTES=0))
    b.wait_ready(READY)
    TcpExporter(port).send(make_stream(20, 10))
    wait_until(lambda: len(dumps(dump)) == 4, "four dumps", b)
    for f in dumps(dump):
        out = subprocess.run([IPFIXDUMP, "-s", "-i", str(f)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stderr == "", out.stderr   # no missing template, no out-of-sequence


def test_fullflow_rotation_rotates_clickstream_within_a_second(balancer, tmp_path):
    ff_port, cs_port = free_port(), free_port()
    env = recorder_env("FULLFLOW", ff_port, tmp_path / "ff", ROTATE_DELAY_SECONDS=1) + \
        recorder_env("CLICKSTREAM", cs_port, tmp_path / "cs", ROTATE_DELAY_SECONDS=2)
    b = balancer(env)
    b.wait_ready(READY)
    ff, cs = TcpExporter(ff_port), TcpExporter(cs_port)
    try:
        serial = 0
        deadline = time.monotonic() + TIMEOUT
        while True:   # keep both files non-empty until two Fullflow rotations happened
            cs.send(make_stream(1, 5, first_serial=serial, with_template=serial == 0))
            ff.send(make_stream(1, 5, first_serial=serial, with_template=serial == 0))
            serial += 5
            ff_done = [e for e in b.logs() if e.get("event") == "dump_completed" and e.get("stream") == "FULLFLOW"]
            if len(ff_done) >= 2:
                break
            assert time.monotonic() < deadline, b.log_tail()
            time.sleep(0.1)  # the exporters' pace while the rotations are waited for
        wait_until(lambda: len([e for e in b.logs() if e.get("event") == "dump_completed"
                                and e.get("stream") == "CLICKSTREAM"]) >= 2, "clickstream rotations", b)
    finally:
        ff.close()
        cs.close()
    logs = b.logs()
    ff_times = [log_time(e) for e in logs if e.get("event") == "dump_completed" and e.get("stream") == "FULLFLOW"]
    cs_done = [e for e in logs if e.get("event") == "dump_completed" and e.get("stream") == "CLICKSTREAM"]
    assert all(e["reason"] == "hup" for e in cs_done), cs_done   # its own 2 s timer restarts at every HUP
    for t in ff_times[:2]:
        assert min(abs(log_time(e) - t) for e in cs_done) < 1.0


def test_export_to_tcp_targets_one_down_during_rotation(balancer, tmp_path):
    dump = tmp_path / "dump"
    port = free_port()
    with TcpSink() as up, TcpSink(up=False) as late:
        targets = f"{up.endpoint},{late.endpoint}"
        b = balancer(recorder_env("FULLFLOW", port, dump, ROTATE_DELAY_SECONDS=1, DUMP_INSERT_PROCESSES=targets))
        b.wait_ready(READY)
        stream = make_stream(60, 10)
        with TcpExporter(port) as exporter:
            exporter.send(stream[:31])
            wait_until(lambda: recorder_status(b).get("files_completed", 0) >= 1, "a dump", b)
            exporter.send(stream[31:])
            wait_until(lambda: b.status("fullflow[0]")["msgs_in"] == len(stream), "all messages in", b)
            # a period without data leaves everything in completed files
            wait_until(lambda: recorder_status(b)["file"] == "" and recorder_status(b)["files_completed"] >= 2,
                       "all data in completed dumps", b)
        files = recorder_status(b)["files_completed"]
        def export(sink) -> dict:
            (target,) = [t for t in recorder_status(b)["exports"] if t["target"] == sink.endpoint]
            return target

        wait_until(lambda: export(up)["sent"] == files, "export to the live target", b)
        st = export(late)
        assert st["pending"] == files and st["state"] in ("down", "connecting")
        assert len(dumps(dump)) == files   # kept until every target has them
        assert len(list(dump.glob("*.pending-*"))) == files
        late.up()
        wait_until(lambda: export(late)["pending"] == 0, "export to the late target", b, timeout=40)
        wait_until(lambda: not dumps(dump), "delivered dumps deleted", b)
        for sink in (up, late):
            assert sink.connection_count == files
            serials = []
            for conn in sink.connections:   # one transfer per dump; each decodes alone
                serials += [r["serial"] for r in decode_records(split_messages(conn))]
            assert sorted(serials) == list(range(600)), sink.endpoint
        assert not list(dump.iterdir())   # markers gone too


def test_sigkill_mid_file_keeps_whole_messages_and_is_not_overwritten(balancer, tmp_path):
    dump = tmp_path / "dump"
    port = free_port()
    b = balancer(recorder_env("FULLFLOW", port, dump, ROTATE_MINUTES=60))
    b.wait_ready(READY)
    first = make_stream(50, 10)
    with TcpExporter(port) as exporter:
        exporter.send(first)
        wait_until(lambda: recorder_status(b).get("file_msgs") == len(first)
                   and recorder_status(b)["buffered_bytes"] == 0, "the periodic flush", b)
    (part,) = dump.glob("*.part")
    on_disk = part.read_bytes()
    pid = b.handler_pid("fullflow[0]")
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with open(part, "ab") as f:   # as if the kill had cut a write in the middle of a message
        f.write(first[5][:100])
    wait_until(lambda: b.supervisor() and b.handler_pid("fullflow[0]") not in (None, pid)
               and b.status("fullflow[0]")["pid"] != pid and b.status("fullflow[0]")["listen"]["listening"],
               "the restarted handler", b)
    (recovered,) = dumps(dump)
    assert recovered.read_bytes() == on_disk and recovered.name.startswith(part.name[:-len(".part")] + "_")
    second = make_stream(20, 10, first_serial=500)
    with TcpExporter(port) as exporter:
        exporter.send(second)
        wait_until(lambda: b.status("fullflow[0]")["msgs_in"] == len(second), "new messages in", b)
    assert len(list(dump.glob("*.part"))) == 1 and recovered.read_bytes() == on_disk   # a new .part, old data intact
    assert b.stop() == 0
    serials = [s for f in dumps(dump) for s in decode_alone(f)]
    assert sorted(serials) == list(range(500)) + list(range(500, 700))
    assert any(e.get("event") == "dump_recovered" and e["cut_bytes"] == 100 for e in b.logs())


def test_balancer_auto_records_on_local_subreceivers(balancer, tmp_path):
    port, p1, p2 = free_port(), free_port(), free_port()
    env = "\n".join([
        f"IPFIX_FULLFLOW_PORT[0]={port}", "IPFIX_FULLFLOW_BALANCER[0]=RoundRobin",
        f"IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{p1},127.0.0.1/{p2}", "IPFIX_FULLFLOW_BALANCER_AUTO[0]=Enabled",
        f"IPFIX_FULLFLOW_DUMP_DIR[0]={tmp_path / 'ff'}", "IPFIX_FULLFLOW_ROTATE_MINUTES[0]=60"]) + "\n"
    b = balancer(env)
    ready = b.wait_ready(READY)
    assert set(ready) == {"fullflow[0]", "fullflow[100]", "fullflow[101]"}
    assert {ready[n]["listen"]["port"] for n in ("fullflow[100]", "fullflow[101]")} == {p1, p2}
    TcpExporter(port).send(make_stream(40, 10))
    wait_until(lambda: sum(b.status(n)["recorder"]["file_flows"] for n in ("fullflow[100]", "fullflow[101]"))
               == 400, "all flows recorded", b)
    assert b.stop() == 0
    serials = []
    for sub_port in (p1, p2):
        files = dumps(tmp_path / "ff" / f"auto-{sub_port}")
        assert len(files) == 1
        serials += decode_alone(files[0])
    assert sorted(serials) == list(range(400))


def test_restart_in_place_completes_the_file_and_the_successor_records_on(balancer, tmp_path):
    """SIGUSR2 to the supervisor: the old handler completes its dump before handing the sockets over; the new
    one starts a new dump whose head carries the templates it took over (the exporter never re-sends them)."""
    dump = tmp_path / "dump"
    port = free_port()
    b = balancer(recorder_env("FULLFLOW", port, dump, ROTATE_MINUTES=60))
    b.wait_ready(READY)
    stream = make_stream(100, 10)
    with TcpExporter(port) as exporter:
        exporter.send(stream[:51])
        b.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 51, timeout=TIMEOUT)
        pid = b.handler_pid("fullflow[0]")
        b.send_signal(signal.SIGUSR2)
        b.wait_status("fullflow[0]", lambda s: s["pid"] != pid and s["listen"]["listening"], timeout=TIMEOUT)
        exporter.send(stream[51:])
        b.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 50, timeout=TIMEOUT)
    assert b.stop() == 0
    files = dumps(dump)
    assert len(files) == 2
    assert [len(decode_alone(f)) for f in files] == [500, 500]
    assert sorted(s for f in files for s in decode_alone(f)) == list(range(1000))
