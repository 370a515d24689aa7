"""control/rundir.py: the run-directory names every process agrees on, and atomic JSON documents."""
import os

from ipfix_balancer.control import rundir


def test_handler_file_names():
    assert rundir.handler_status_path("/run/b", "FULLFLOW", 1) == "/run/b/handler-fullflow-1.json"
    assert rundir.next_config_path("/run/b", "CLICKSTREAM", 0) == "/run/b/handler-clickstream-0.next"


def test_supervisor_file_names():
    assert [rundir.supervisor_pid_path("/r"), rundir.supervisor_status_path("/r"), rundir.adopt_path("/r")] == [
        "/r/supervisor.pid", "/r/supervisor.json", "/r/supervisor.adopt.json"]


def test_handover_address_is_abstract_and_per_run_dir_and_receiver():
    a = rundir.handover_address("/run/a", "FULLFLOW", 0)
    assert a.startswith("\0fast_ipfix_balancer/") and a.endswith("/fullflow/0")
    assert len({a, rundir.handover_address("/run/b", "FULLFLOW", 0), rundir.handover_address("/run/a", "DNSFLOW", 0),
                rundir.handover_address("/run/a", "FULLFLOW", 1)}) == 4


def test_status_files_are_found_and_handler_files_removable(tmp_path):
    for name in ("handler-fullflow-0.json", "handler-fullflow-0.next", "handler-dnsflow-2.json",
                 "handler-dnsflow-2.json.tmp", "supervisor.json"):
        (tmp_path / name).write_text("{}")
    run = str(tmp_path)
    assert rundir.handler_status_paths(run) == [rundir.handler_status_path(run, "DNSFLOW", 2),
                                                rundir.handler_status_path(run, "FULLFLOW", 0)]
    assert sorted(os.path.basename(p) for p in rundir.handler_files(run)) == [
        "handler-dnsflow-2.json", "handler-dnsflow-2.json.tmp", "handler-fullflow-0.json", "handler-fullflow-0.next"]


def test_json_documents_are_replaced_whole(tmp_path):
    path = str(tmp_path / "doc.json")
    assert rundir.read_json(path) is None
    rundir.write_json(path, {"a": [1, 2]})
    rundir.write_json(path, {"b": 3})
    assert rundir.read_json(path) == {"b": 3} and os.listdir(tmp_path) == ["doc.json"]
    (tmp_path / "doc.json").write_text('{"cut')
    assert rundir.read_json(path) is None


def test_resolve_run_dir_precedence(monkeypatch):
    monkeypatch.delenv("IPFIX_BALANCER_RUN_DIR", raising=False)
    assert rundir.resolve_run_dir(None) == rundir.DEFAULT_RUN_DIR == "/run/fast_ipfix_balancer"
    monkeypatch.setenv("IPFIX_BALANCER_RUN_DIR", "/env")
    assert rundir.resolve_run_dir(None) == "/env" and rundir.resolve_run_dir("/cli") == "/cli"
