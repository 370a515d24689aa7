"""control/rundir.py: the run-directory names every process agrees on, and atomic JSON documents."""
import os

from ipfix_balancer.control import rundir


def test_handler_file_names():
    assert rundir.handler_status_path("/run/b", "FULLFLOW", 1) == "/run/b/handler-fullflow-1.json"


def test_supervisor_file_names():
    assert [rundir.supervisor_pid_path("/r"), rundir.supervisor_status_path("/r"), rundir.adopt_path("/r")] == [
        "/r/supervisor.pid", "/r/supervisor.json", "/r/supervisor.adopt.json"]


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
