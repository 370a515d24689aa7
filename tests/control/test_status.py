"""control/status.py: status documents to and from JSON, what ``status`` collects and how it renders it."""
import dataclasses
import json
import os
import time

import pytest

from ipfix_balancer.control import rundir
from ipfix_balancer.control.status import (ExporterSessionStatus, ExportTargetStatus, HandlerReport, HandlerStatus, ListenStatus,
                                           PeriodRates, RecorderStatus, StatusReport, SubreceiverStatus, SupervisedHandler,
                                           SupervisorStatus, collect, read_supervisor_status, render,
                                           write_supervisor_status)

NOW = time.time()
RATES = {"msgs_in": 30012.4, "bytes_in": 42.5e6, "msgs_out": 90037.0, "bytes_out": 127.5e6}


def recorder(**kw) -> RecorderStatus:
    doc = RecorderStatus(
        dpi_id=5, dir="/d/", file="fullflow_5_20231114T221320Z.part", file_bytes=2048, buffered_bytes=0, file_msgs=3,
        file_flows=30, file_age_s=1.5, next_rotation_s=58.4, rotate_seconds=60, max_flows=0, rotations=1,
        files_completed=1, last_file="", recovered_files=0, spool_files=1, spool_bytes=4096, spool_limit=0,
        evicted_files=0, template_switches=0, drops=0, error="", errors=0,
        exports=[ExportTargetStatus("10.0.0.2/9920/tcp", "idle", 0, 4),
                 ExportTargetStatus("[::1]/9920/udp", "down", 2, 0, "Connection refused")])
    return dataclasses.replace(doc, **kw)


def handler(pid=4242, **kw) -> HandlerStatus:
    doc = HandlerStatus(
        stream="FULLFLOW", index=0, name="fullflow[0]", pid=pid, started=NOW - 90, time=NOW,
        listen=ListenStatus("tcp", "0.0.0.0", 1500, True), mode="RoundRobin", dpi_id=0, cpu=None, msgs_in=1000,
        bytes_in=1_400_000, malformed=1, malformed_by_reason={"bad version": 1}, unknown_template=0,
        connections=2, connections_total=3, drops=7,
        subreceivers=[SubreceiverStatus("10.0.0.2/9920/tcp", "up", 2, 993, 1_390_000, 7, 0, drop_records=20,
                                        drops_by_reason={"queue_full": 5, "stalled": 2}, resent=4,
                                        drop_records_by_reason={"queue_full": 15, "stalled": 5}),
                      SubreceiverStatus("10.0.0.3/9920/tcp", "down", 2, 0, 0, 0, 3000, "Connection refused")])
    return dataclasses.replace(doc, **kw)


def through_json(doc: dict) -> dict:
    return json.loads(json.dumps(doc))


def test_handler_document_round_trips_through_json():
    for doc in (handler(), handler(mode="Disabled", subreceivers=[], recorder=recorder())):
        assert HandlerStatus.from_dict(through_json(doc.to_dict())) == doc


def test_export_targets_are_nested_under_the_recorder():
    doc = handler(recorder=recorder()).to_dict()
    assert doc["recorder"]["exports"] == [
        {"target": "10.0.0.2/9920/tcp", "state": "idle", "pending": 0, "sent": 4, "error": ""},
        {"target": "[::1]/9920/udp", "state": "down", "pending": 2, "sent": 0, "error": "Connection refused"}]
    assert not any(key.startswith("export[") for key in doc["recorder"])


def test_json_keys_operators_and_scripts_read():
    doc = handler().to_dict()
    assert "recorder" not in doc   # forwarding handlers have none
    assert doc["listen"] == {"proto": "tcp", "bind": "0.0.0.0", "port": 1500, "listening": True}
    assert set(doc["subreceivers"][0]) == {"subreceiver", "endpoint", "state", "sessions", "msgs_out", "bytes_out", "drops",
                                           "queued_bytes", "last_error", "drop_records", "drops_by_reason",
                                           "drop_records_by_reason", "resent", "unacked_bytes", "draining"}
    assert {"drops", "drop_records", "drops_by_reason", "drop_records_by_reason"} <= set(doc)
    assert {"draining", "draining_bytes"} <= set(doc)


def test_a_subreceiver_is_named_subreceiver_and_endpoint_until_the_deprecated_key_goes():
    doc = handler().to_dict()
    assert [(s["subreceiver"], s["endpoint"]) for s in doc["subreceivers"]] == [
        ("10.0.0.2/9920/tcp", "10.0.0.2/9920/tcp"), ("10.0.0.3/9920/tcp", "10.0.0.3/9920/tcp")]
    older = through_json(doc)  # a handler of the release before the rename wrote ``endpoint`` only
    for sub in older["subreceivers"]:
        del sub["subreceiver"]
    assert HandlerStatus.from_dict(older) == handler()


def test_documents_of_another_release_read_with_the_keys_both_know():
    # a recorder of the release before nested export targets, seen during a restart in place for an upgrade
    old = handler(recorder=recorder(exports=[])).to_dict()
    old["recorder"]["export[10.0.0.2/9920/tcp].state"] = "idle"
    old["future_counter"] = 1
    assert HandlerStatus.from_dict(old) == handler(recorder=recorder(exports=[]))


def test_exporter_sessions_round_trip_and_an_older_document_has_none():
    doc = handler(sessions=[ExporterSessionStatus("192.0.2.1:4000", 1700000000.5, [1, 256])])
    assert HandlerStatus.from_dict(through_json(doc.to_dict())) == doc
    older = doc.to_dict()
    del older["sessions"]
    assert HandlerStatus.from_dict(older).sessions == []


def test_supervisor_document_round_trips(tmp_path):
    doc = SupervisorStatus(pid=1, config="/e.env", handlers=[SupervisedHandler("fullflow[0]", "FULLFLOW", 0, None, 2)])
    assert SupervisorStatus.from_dict(through_json(doc.to_dict())) == doc
    write_supervisor_status(str(tmp_path), doc)
    assert read_supervisor_status(str(tmp_path)) == doc


def test_report_shows_process_facts_only_when_known():
    report = HandlerReport(handler(), alive=False, uptime=90.0)
    assert report.to_dict() == {**handler().to_dict(), "alive": False, "stale": False, "uptime": 90.0}
    facts = HandlerReport(handler(), alive=True, uptime=1.0, psr=3, rss=1024, restarts=2).to_dict()
    assert list(facts)[-6:] == ["alive", "stale", "psr", "rss", "restarts", "uptime"]


def test_render_table_with_nested_export_targets():
    report = StatusReport(running=True, supervisor_pid=17, config="/e.env", run_dir="/run/b", handlers=[
        HandlerReport(handler(cpu_percent=2.5, rates=RATES), alive=True, uptime=90.4, psr=1, rss=50 << 20, restarts=3),
        HandlerReport(handler(pid=4243, name="fullflow[1]", mode="Disabled", subreceivers=[], recorder=recorder()),
                      alive=False, uptime=12.0)])
    assert render(report).splitlines() == [
        "supervisor: running, pid 17   config: /e.env   run dir: /run/b",
        "HANDLER              PID  CPU  %CPU    RSS  LISTEN    MODE           MSGS IN    MSG/S MB/S IN MB/S OUT   DROPS"
        " MALFORMED CONN RESTARTS  UPTIME",
        "fullflow[0]         4242    1   2.5    50M  tcp/1500  RoundRobin        1000    30012    42.5    127.5       7"
        "         1    2        3  90s",
        "    -> 10.0.0.2/9920/tcp           up       msgs_out=993 bytes_out=1390000 drops=7 (queue_full=5/15 "
        "stalled=2/5 msgs/records) queued=0B resent=4",
        "    -> 10.0.0.3/9920/tcp           down     msgs_out=0 bytes_out=0 drops=0 queued=3K error='Connection refused'",
        "fullflow[1]         4243    -   0.0     0B  tcp/1500  Disabled          1000        0     0.0      0.0       7"
        "         1    2        -  12s  (not running)",
        "    recorder: dpi_id=5 file=fullflow_5_20231114T221320Z.part bytes=2K flows=30 msgs=3 next_rotation=58s "
        "completed=1 spool=1 files/4K",
        "      dir=/d/ buffered_bytes=0 file_age_s=1.5 rotate_seconds=60 max_flows=0 rotations=1 last_file= "
        "recovered_files=0 spool_limit=0 evicted_files=0 template_switches=0 drops=0 errors=0",
        "    => export 10.0.0.2/9920/tcp         idle        pending=0 sent=4",
        "    => export [::1]/9920/udp            down        pending=2 sent=0 error='Connection refused'",
    ]


def test_render_recorder_error_and_no_handlers():
    lines = render(StatusReport(False, None, None, "/r", [HandlerReport(
        handler(recorder=recorder(error="No space left on device", exports=[])), alive=True, uptime=1)])).splitlines()
    assert lines[0] == "supervisor: NOT RUNNING   config: -   run dir: /r"
    assert lines[-1] == "      ERROR: No space left on device"
    assert render(StatusReport(False, None, None, "/r", [])).splitlines()[-1] == "(no handler status files)"


def test_collect_reads_handler_documents_and_observes_their_processes(tmp_path):
    run = str(tmp_path)
    mine = handler(pid=os.getpid(), started=time.time() - 90)
    rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 0), mine.to_dict())
    rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 1), {"not": "a handler document"})
    rundir.write_json(rundir.supervisor_status_path(run), SupervisorStatus(1, "/e.env", []).to_dict())
    report = collect(run)
    assert (report.running, report.supervisor_pid, report.config) == (False, None, "/e.env")
    (h,) = report.handlers
    assert h.doc == mine and h.alive and h.rss > 0 and 85 < h.uptime < 120


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "null"])
def test_collect_takes_documents_that_are_not_json_objects_for_missing_ones(tmp_path, text):
    run = str(tmp_path)
    rundir.write_atomic(rundir.supervisor_status_path(run), text)
    rundir.write_atomic(rundir.handler_status_path(run, "FULLFLOW", 0), text)
    assert collect(run) == StatusReport(running=False, supervisor_pid=None, config=None, run_dir=run, handlers=[])


def test_a_document_older_than_three_of_its_periods_is_stale_and_marked(tmp_path):
    run = str(tmp_path)
    fresh, old = handler(pid=os.getpid(), time=time.time() - 2.5), handler(pid=os.getpid(), index=1,
                                                                          name="fullflow[1]", time=time.time() - 40)
    rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 0), fresh.to_dict())
    rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 1), old.to_dict())
    rundir.write_json(rundir.supervisor_status_path(run), SupervisorStatus(1, "/e.env", [
        SupervisedHandler("fullflow[1]", "FULLFLOW", 1, os.getpid(), 4)]).to_dict())
    report = collect(run)
    assert [(h.stale, h.restarts) for h in report.handlers] == [(False, None), (True, 4)]
    assert [h["stale"] for h in report.to_dict()["handlers"]] == [False, True]
    lines = render(report).splitlines()
    assert "STALE" not in lines[2] and lines[5].endswith("  STALE: no status for 40s")


def test_period_rates_are_per_second_deltas_and_never_negative():
    rates = PeriodRates()
    assert rates.update(10.0, {"cpu": 5.0, "msgs": 100}) == {"cpu": 0.0, "msgs": 0.0}
    assert rates.update(12.0, {"cpu": 6.5, "msgs": 700}) == {"cpu": 0.75, "msgs": 300.0}
    assert rates.update(13.0, {"cpu": 6.5, "msgs": 200}) == {"cpu": 0.0, "msgs": 0.0}   # a subreceiver removed


def test_render_shows_sessions_refused_or_closed_by_a_limit():
    limited = {"not_allowed": 20, "idle_timeout": 3}
    text = render(StatusReport(running=True, supervisor_pid=17, config="/e.env", run_dir="/run/b", handlers=[
        HandlerReport(handler(limited=limited), alive=True, uptime=1)]))
    assert "    limited: idle_timeout=3 not_allowed=20" in text.splitlines()
    assert HandlerStatus.from_dict(through_json(handler(limited=limited).to_dict())).limited == limited
    assert "limited" not in render(StatusReport(running=True, supervisor_pid=17, config="/e.env", run_dir="/run/b",
                                                handlers=[HandlerReport(handler(), alive=True, uptime=1)]))
