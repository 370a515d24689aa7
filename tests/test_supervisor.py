"""supervisor.py: it depends on the control-plane contract and the config only, and runs the configured plus
the balancer-auto receivers."""
import ast
import subprocess
import sys
from pathlib import Path

from ipfix_balancer import config, supervisor
from ipfix_balancer.config.host import LocalHost
from ipfix_balancer.control.status import SupervisedHandler

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


def test_an_adopt_file_of_a_version_without_channels_means_stop_not_take_over(tmp_path, monkeypatch):
    """An upgrade from a supervisor without channels: its handlers are stopped and replaced, never adopted
    (their handover socket had no access check)."""
    import json
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())
    rc = config.load_values({"IPFIX_FULLFLOW_PORT[0]": "1500"}, cpus=range(4)).receivers[0]
    (tmp_path / "supervisor.adopt.json").write_text(json.dumps(
        {"handlers": {rc.name: {"pid": 4242, "receiver": rc.to_json()}}, "retiring": [4343]}))
    sup = supervisor.Supervisor("/none.env", str(tmp_path), "json", log=None, adopt=True)
    assert sup._read_adopt_file() == {rc.name: (4242, rc, None)}
    assert sup.retiring == {4343: None} and sup.lock_fd is None
    assert not (tmp_path / "supervisor.adopt.json").exists()


def test_a_handlers_line_in_the_supervisors_document(monkeypatch):
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())
    child = supervisor.Child(config.load_values({"IPFIX_FULLFLOW_PORT[0]": "1500"}, cpus=range(4)).receivers[0])
    child.restarts, child.killed = 2, (5, 50)
    assert child.status() == SupervisedHandler("fullflow[0]", "FULLFLOW", 0, None, 2, killed_msgs=5, killed_records=50)
