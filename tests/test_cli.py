"""cli.py in-process (click's CliRunner): what each command prints, to which stream, and its exit code, against
.env files and run directories made by the test. The supervisor a command signals is a child process that
holds the run dir's supervisor lock, named as ``status`` expects."""
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from click.testing import CliRunner

from ipfix_balancer.cli import main
from ipfix_balancer.control import rundir
from ipfix_balancer.control import status as status_mod
from ipfix_balancer.control.status import SupervisedHandler, SupervisorStatus

from control.test_status import handler

GOOD = """\
IPFIX_FULLFLOW_PORT[0]=1500
IPFIX_FULLFLOW_BALANCER[0]=All
IPFIX_FULLFLOW_BALANCER_SUB[0]=10.0.0.1/4739
IPFIX_CLICKSTREAM_PORT[0]=1600
IPFIX_CLICKSTREAM_PORT_TYPE[0]=udp
IPFIX_CLICKSTREAM_BALANCER[0]=RoundRobin
IPFIX_CLICKSTREAM_BALANCER_SUB[0]=10.0.0.2/4739,[::1]/4739
IPFIX_CLICKSTREAM_BALANCER_SUB_PROTO[0]=udp
IPFIX_BALANCER_CONSOLE=127.0.0.1/8080
"""
BAD = """\
IPFIX_FULLFLOW_PORT[0]=70000
# the next key is on line 3
IPFIX_FULLFLOW_BALANCER[0]=Sideways
"""


def cli(*args, env=None):
    """Run a command with none of the caller's IPFIX_BALANCER_* settings unless given."""
    clean = {"IPFIX_BALANCER_CONFIG": None, "IPFIX_BALANCER_RUN_DIR": None, **(env or {})}
    return CliRunner().invoke(main, [str(a) for a in args], env=clean)


@pytest.fixture
def env_file(tmp_path):
    def write(text: str, name: str = "balancer.env"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


# -- the group ------------------------------------------------------------------------------------------------
def test_help_lists_the_operator_commands_only():
    result = cli("--help")
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == {"run", "check-config", "status", "stop", "reload", "restart"}, "handler, console are internal"


def test_version_is_the_installed_distributions():
    result = cli("--version")
    assert result.exit_code == 0 and importlib.metadata.version("fast_ipfix_balancer") in result.stdout


@pytest.mark.parametrize("args, says", [(["frobnicate"], "No such command 'frobnicate'"),
                                        (["status", "--bogus"], "No such option '--bogus'"),
                                        (["stop", "--timeout", "soon"], "'soon' is not a valid float"),
                                        (["handler"], "Missing option '--control-fd'")])
def test_a_usage_error_exits_2_and_says_what(args, says):
    result = cli(*args)
    assert result.exit_code == 2 and says in result.stderr and result.stdout == ""


# -- check-config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, code, stdout, stderr", [
    (GOOD, 0, ["{path}: OK, 2 receiver(s)",
               "  fullflow[0]      tcp/1500   All        cpu=-   -> 10.0.0.1/4739/tcp",
               "  clickstream[0]   udp/1600   RoundRobin cpu=-   -> 10.0.0.2/4739/udp, [::1]/4739/udp",
               "  console          http://127.0.0.1:8080/ (token in {path.parent}/console.token)"], []),
    (BAD, 1, [], ["{path}: 2 problem(s):",
                  "  - line 1: IPFIX_FULLFLOW_PORT[0]='70000': expected a port number 1..65535",
                  "  - line 3: IPFIX_FULLFLOW_BALANCER[0]='Sideways': expected one of RoundRobin, All, Disabled "
                  "(any case)"]),
], ids=["good: each receiver", "bad: every problem with its line"])
def test_check_config(env_file, text, code, stdout, stderr):
    path = env_file(text)
    result = cli("check-config", "--config", path)
    assert result.exit_code == code
    assert result.stdout.splitlines() == [line.format(path=path) for line in stdout]
    assert result.stderr.splitlines() == [line.format(path=path) for line in stderr]


def test_check_config_warns_on_stderr_and_still_passes(env_file):
    path = env_file("# nothing configured yet\n")
    result = cli("check-config", "--config", path)
    assert result.exit_code == 0 and result.stdout == f"{path}: OK, 0 receiver(s)\n"
    assert result.stderr.startswith(f"warning: {path}: no IPFIX_<STREAM>_<PARAM>[i] keys")


def test_check_config_takes_the_file_from_the_environment_and_the_option_wins(env_file, tmp_path):
    good, bad = env_file(GOOD), env_file(BAD, "bad.env")
    assert cli("check-config", env={"IPFIX_BALANCER_CONFIG": str(good)}).exit_code == 0
    assert cli("check-config", env={"IPFIX_BALANCER_CONFIG": str(bad)}).exit_code == 1
    assert cli("check-config", "--config", good, env={"IPFIX_BALANCER_CONFIG": str(bad)}).exit_code == 0
    missing = cli("check-config", "--config", tmp_path / "none.env")
    assert missing.exit_code == 1 and f"{tmp_path / 'none.env'}: 1 problem(s):" in missing.stderr


# -- status ---------------------------------------------------------------------------------------------------
def test_status_without_a_supervisor_exits_1_and_says_so(tmp_path):
    text = cli("status", "--run-dir", tmp_path)
    assert text.exit_code == 1
    lines = text.stdout.splitlines()
    assert lines[0] == f"supervisor: NOT RUNNING   config: -   run dir: {tmp_path}"
    assert lines[-1] == "(no handler status files)"
    doc = cli("status", "--json", env={"IPFIX_BALANCER_RUN_DIR": str(tmp_path)})
    assert doc.exit_code == 1
    assert json.loads(doc.stdout) == {"running": False, "supervisor_pid": None, "config": None,
                                      "run_dir": str(tmp_path), "handlers": []}


def supervise(run: str, ignore_term: bool = False) -> subprocess.Popen:
    """A stand-in supervisor: a child process holding the run dir's lock until it is signalled."""
    code = ("import signal, sys, time\nfrom ipfix_balancer.control import rundir\n"
            f"{'signal.signal(signal.SIGTERM, signal.SIG_IGN)' if ignore_term else ''}\n"
            "rundir.lock(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, run], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "locked\n"
    return child


@pytest.fixture
def supervisor(tmp_path, monkeypatch):
    """``supervisor(ignore_term=False) -> Popen``; the child is named as status expects, killed at the end."""
    started = []

    def start(ignore_term: bool = False) -> subprocess.Popen:
        child = supervise(str(tmp_path), ignore_term)
        started.append(child)
        monkeypatch.setattr(status_mod, "SUPERVISOR_NAME", psutil.Process(child.pid).name())
        return child
    yield start
    for child in started:
        child.kill()
        child.wait()


def test_status_of_a_running_balancer_reads_the_documents_and_exits_0(tmp_path, supervisor):
    run = str(tmp_path)
    child = supervisor()
    mine = handler(pid=os.getpid(), started=time.time() - 90)
    rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 0), mine.to_dict())
    rundir.write_json(rundir.supervisor_status_path(run), SupervisorStatus(child.pid, "/etc/b.env", [
        SupervisedHandler("fullflow[0]", "FULLFLOW", 0, os.getpid(), restarts=2)]).to_dict())
    doc = cli("status", "--json", "--run-dir", run)
    assert doc.exit_code == 0
    report = json.loads(doc.stdout)
    assert (report["running"], report["supervisor_pid"], report["config"]) == (True, child.pid, "/etc/b.env")
    (h,) = report["handlers"]
    assert h["name"] == "fullflow[0]" and h["alive"] is True and h["restarts"] == 2 and h["msgs_in"] == 1000
    text = cli("status", "--run-dir", run)
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0] == f"supervisor: running, pid {child.pid}   config: /etc/b.env   run dir: {run}"
    assert text.stdout.splitlines()[2].split()[:2] == ["fullflow[0]", str(os.getpid())]


def test_status_does_not_believe_a_lock_holder_not_named_like_a_supervisor(tmp_path, supervisor):
    supervisor()
    status_mod.SUPERVISOR_NAME = "ipfix-balancer"  # monkeypatch restores the attribute at teardown
    assert cli("status", "--run-dir", tmp_path).exit_code == 1


# -- stop, reload, restart ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["stop", "reload", "restart"])
def test_signalling_commands_without_a_supervisor_exit_1(command, tmp_path, env_file):
    result = cli(command, "--run-dir", tmp_path, *(["--config", env_file(GOOD)] if command == "restart" else []))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("ipfix-balancer: supervisor is not running")


def test_stop_signals_the_supervisor_and_waits_until_it_is_gone(tmp_path, supervisor):
    child = supervisor()
    result = cli("stop", "--run-dir", tmp_path)
    assert result.exit_code == 0 and result.stdout == f"stopped supervisor {child.pid}\n"
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_stop_gives_up_after_its_timeout(tmp_path, supervisor):
    child = supervisor(ignore_term=True)
    started = time.monotonic()
    result = cli("stop", "--run-dir", tmp_path, "--timeout", "0.3")
    assert result.exit_code == 1 and f"supervisor {child.pid} still running after 0.3s" in result.stderr
    assert time.monotonic() - started < 5 and child.poll() is None


def test_restart_refuses_an_invalid_file_before_signalling(tmp_path, env_file, supervisor, monkeypatch):
    supervisor()
    signalled, kill = [], os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)) or kill(pid, sig))
    path = env_file(BAD)
    result = cli("restart", "--run-dir", tmp_path, "--config", path)
    assert result.exit_code == 1 and signalled == []
    assert result.stderr.splitlines()[0] == f"restart refused, the running balancer keeps running: {path}: 2 problem(s):"


def test_restart_reads_the_file_the_running_supervisor_reads(tmp_path, env_file, supervisor):
    child = supervisor()
    rundir.write_json(rundir.supervisor_status_path(str(tmp_path)),
                      SupervisorStatus(child.pid, str(env_file(BAD, "running.env")), []).to_dict())
    result = cli("restart", "--run-dir", tmp_path, "--config", env_file(GOOD))
    assert result.exit_code == 1 and "running.env: 2 problem(s):" in result.stderr, "--config is ignored"
