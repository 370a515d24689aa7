"""supervisor.py: it depends on the control-plane contract and the config only, and runs the configured plus
the balancer-auto receivers."""
import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ipfix_balancer import config, supervisor
from ipfix_balancer.config.host import LocalHost
from ipfix_balancer.control import rundir
from ipfix_balancer.control.status import SupervisedHandler

from fakes import Log

REPO = Path(__file__).resolve().parents[1]
ALLOWED = ("ipfix_balancer.config", "ipfix_balancer.control")
# pure, no data plane: the hang decision, and the records core fills for the status contract
DECISIONS = ("ipfix_balancer.core", "ipfix_balancer.core.liveness", "ipfix_balancer.core.records")


def _allowed(module: str) -> bool:
    return (module == "ipfix_balancer" or module in DECISIONS
            or any(module == a or module.startswith(a + ".") for a in ALLOWED))


def test_supervisor_imports_only_control_and_config():
    tree = ast.parse((REPO / "ipfix_balancer" / "supervisor.py").read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "ipfix_balancer" + ("." + node.module if node.module else "") if node.level else node.module
            imported += [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
    package = [m for m in imported if m.split(".")[0] == "ipfix_balancer"]
    assert package and all(_allowed(m) for m in package), package


def test_importing_the_supervisor_loads_no_data_plane_module():
    code = ("import sys, ipfix_balancer.supervisor; "
            "print(*sorted(m for m in sys.modules if m.split('.')[0] == 'ipfix_balancer'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "ipfix_balancer.supervisor" in loaded
    assert [m for m in loaded if not _allowed(m) and m != "ipfix_balancer.supervisor"] == []


def test_supervisor_runs_configured_plus_auto_receivers(monkeypatch):
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())
    cfg = config.load_values({
        "IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1600,10.255.255.1/1601", "IPFIX_FULLFLOW_BALANCER_AUTO[0]":
        "Enabled", "IPFIX_FULLFLOW_PORT[100]": "1700", "IPFIX_FULLFLOW_DUMP_DIR[100]": "/d/other"}, cpus=range(4))
    assert [rc.name for rc in supervisor.receivers(cfg)] == ["fullflow[0]", "fullflow[100]", "fullflow[101]"]


@pytest.fixture
def adopting(tmp_path, monkeypatch):
    """A supervisor about to read the adopt file in tmp_path, whose child processes are 4242 and 4343 (none
    is signalled: the pids it stops are recorded in ``stopped``)."""
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())
    monkeypatch.setattr(supervisor, "_child_pids", lambda: {4242, 4343})
    sup = supervisor.Supervisor("/none.env", str(tmp_path), "json", log=Log(), adopt=True)
    sup.stopped = []
    monkeypatch.setattr(sup, "_stop_pid", lambda pid, control: sup.stopped.append(pid))
    return sup


RC = config.model.ReceiverConfig(
    "FULLFLOW", 0, config.model.Listen("tcp", "0.0.0.0", 1500),
    config.model.ForwardingSettings(config.model.Mode.ROUND_ROBIN, (), "tcp", 1, 0, False),
    config.model.Recording(0, 0, 1, (), 0, "/d"), None)


def adopt_file(sup, doc) -> None:
    (Path(sup.run_dir) / "supervisor.adopt.json").write_text(json.dumps(doc))


def test_an_adopt_file_of_a_version_without_channels_means_stop_not_take_over(adopting):
    """An upgrade from a supervisor without channels: its handlers are stopped and replaced, never adopted
    (their handover socket had no access check)."""
    adopt_file(adopting, {"handlers": {RC.name: {"pid": 4242, "receiver": RC.to_json()}}, "retiring": [4343]})
    assert adopting._read_adopt_file() == {RC.name: (4242, RC, None)}
    assert adopting.retiring == {4343: None} and adopting.lock_fd is None
    assert not (Path(adopting.run_dir) / "supervisor.adopt.json").exists()
    assert adopting.log.events == [] and adopting.stopped == []


def test_the_lock_and_the_channels_are_taken_over(adopting):
    lock = rundir.lock(adopting.run_dir)
    mine, theirs = socket.socketpair()
    old_mine, old_theirs = socket.socketpair()
    with mine, theirs, old_mine, old_theirs:
        for fd in (lock, mine.fileno(), old_mine.fileno()):
            os.set_inheritable(fd, True)  # as _reexec leaves them
        adopt_file(adopting, {"handlers": {RC.name: {"pid": 4242, "receiver": RC.to_json(),
                                                     "control_fd": mine.fileno()}},
                              "retiring": [[4343, old_mine.fileno()]], "lock_fd": lock})
        predecessors = adopting._read_adopt_file()
        assert adopting.lock_fd == lock
        assert [(pid, rc, control.fileno()) for pid, rc, control in predecessors.values()] == [
            (4242, RC, mine.fileno())]
        assert {pid: control.fileno() for pid, control in adopting.retiring.items()} == {4343: old_mine.fileno()}
        assert adopting.log.events == [] and adopting.stopped == []
        assert not any(map(os.get_inheritable, (lock, mine.fileno(), old_mine.fileno())))
        for sock in (*adopting.retiring.values(), predecessors[RC.name][2]):
            sock.detach()  # the same descriptors as the pairs'
    os.close(lock)


@pytest.mark.parametrize("doc, adopted, retiring, ignored", [
    ([1], [], [], ["the whole file"]),
    ({"handlers": 1, "retiring": 5}, [], [], ["handlers: not a JSON object", "retiring: not a JSON array"]),
    ({"handlers": {RC.name: {"pid": "4242", "receiver": RC.to_json()}}}, [], [], ["handlers: fullflow[0]: not as"]),
    ({"handlers": {RC.name: {"pid": 4242, "receiver": 1}}}, [], [], ["handlers: fullflow[0]: not as"]),
    ({"handlers": {RC.name: {"pid": 4242, "receiver": "{}"}}, "retiring": [4343]}, [], [4343],
     ["handlers: fullflow[0]: KeyError"]),
    ({"handlers": {RC.name: {"pid": 4242, "receiver": RC.to_json(), "control_fd": -1}}}, [], [],
     ["handlers: fullflow[0]: ValueError"]),
    ({"handlers": {RC.name: {"pid": 1, "receiver": RC.to_json()}}}, [], [],
     ["handlers: fullflow[0]: ValueError: pid 1 is not a process of this supervisor"]),
    ({"handlers": {RC.name: {"pid": 4242, "receiver": RC.to_json()}}, "retiring": [[4343], "x", 1, [4343, 10 ** 30]]},
     [4242], [], ["retiring: [4343]: ValueError: not a pid", 'retiring: "x"', "retiring: 1: ValueError: pid 1 is not",
      "retiring: [4343, 1000000000000000000000000000000]: OverflowError"]),
    ({"lock_fd": "x", "retiring": [4242, 4343]}, [], [4242, 4343], ['lock_fd: "x" is not'])],
    ids=["not-an-object", "sections", "pid", "receiver-type", "receiver-fields", "negative-fd", "not-our-pid",
         "retiring-entries", "lock-fd"])
def test_what_cannot_be_adopted_is_logged_and_every_process_it_leaves_unknown_stopped(adopting, doc, adopted,
                                                                                    retiring, ignored):
    """A bad adopt file (a bug, another release, tampering) must not stop the supervisor from starting, nor leave
    a handler running unknown: it would hold its receiver's port. Only processes of ours are ever signalled."""
    adopt_file(adopting, doc)
    predecessors = adopting._read_adopt_file()
    assert [pid for pid, _rc, _control in predecessors.values()] == adopted
    assert adopting.retiring == dict.fromkeys(retiring) and adopting.lock_fd is None
    reasons = [e["reason"] for e in adopting.log.named("adopt_entry_ignored")]
    assert len(reasons) == len(ignored) and all(r.startswith(i) for r, i in zip(reasons, ignored)), reasons
    strays = sorted({4242, 4343} - set(adopted) - set(retiring))
    assert adopting.stopped == strays == [e["handler_pid"] for e in adopting.log.named("adopt_stray_stopped")]


def test_a_control_fd_that_is_no_socket_is_left_as_it_was(adopting, tmp_path):
    with open(tmp_path / "other", "w") as other:
        os.set_inheritable(other.fileno(), True)
        adopt_file(adopting, {"handlers": {RC.name: {"pid": 4242, "receiver": RC.to_json(),
                                                     "control_fd": other.fileno()}}})
        assert adopting._read_adopt_file() == {} and adopting.stopped == [4242, 4343]
        assert os.get_inheritable(other.fileno())
    [reason] = [e["reason"] for e in adopting.log.named("adopt_entry_ignored")]
    assert reason == "handlers: fullflow[0]: OSError: [Errno 88] Socket operation on non-socket"


def test_a_handlers_line_in_the_supervisors_document(monkeypatch):
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())
    child = supervisor.Child(config.load_values({"IPFIX_FULLFLOW_PORT[0]": "1500"}, cpus=range(4)).receivers[0])
    child.restarts, child.killed = 2, (5, 50)
    assert child.status() == SupervisedHandler("fullflow[0]", "FULLFLOW", 0, None, 2, killed_msgs=5, killed_records=50)
