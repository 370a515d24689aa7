"""Issue 13, item 5: `ipfix-balancer run` started by root outside a unit becomes the service user, keeping
only CAP_NET_BIND_SERVICE when a port < 1024 needs it."""
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ipfix_balancer.control import privileges
from ipfixkit import TcpSink, free_port, make_stream, tcp_send


def free_low_port() -> int:
    for port in range(900, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below 1024")


def test_drop_keeps_only_the_ambient_capability(service_user, shared_dir):
    """The mechanism itself, in a forked child (no exec: works whatever interpreter runs the tests)."""
    user = pwd.getpwnam(service_user)
    own = shared_dir / "run"
    port = free_low_port()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            privileges.drop(user, ("CAP_NET_BIND_SERVICE",), [str(own)])
            with open("/proc/self/status") as f:
                caps = {k: int(v, 16) for k, v in (ln.split(":\t") for ln in f if ln.startswith("Cap"))}
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
            ok = (os.getuid(), os.geteuid(), os.getgroups()) == (user.pw_uid, user.pw_uid, []) and \
                caps["CapEff"] == caps["CapAmb"] == caps["CapPrm"] == 1 << 10
            code = 0 if ok else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert own.stat().st_uid == user.pw_uid and own.stat().st_mode & 0o777 == 0o750


def test_root_run_drops_to_the_service_user_with_only_the_needed_capability(service_user, reachable_balancer):
    uid = pwd.getpwnam(service_user).pw_uid
    if subprocess.run(["runuser", "-u", service_user, "--", sys.executable, "-c", ""]).returncode != 0:
        pytest.skip(f"{sys.executable} is not executable by {service_user} (an interpreter under /root?)")
    low, high = free_low_port(), free_port()
    with TcpSink() as sink:
        bal = reachable_balancer(
            # All, not the default Disabled: a recorder would write into the real /var/fast_ipfix_balancer/dump
            f"IPFIX_FULLFLOW_PORT[0]={low}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\nIPFIX_FULLFLOW_BALANCER[0]=All\n"
            f"IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}\n"
            f"IPFIX_CLICKSTREAM_PORT[0]={high}\nIPFIX_CLICKSTREAM_BIND[0]=127.0.0.1\nIPFIX_CLICKSTREAM_BALANCER[0]=All\n"
            f"IPFIX_CLICKSTREAM_BALANCER_SUB[0]=127.0.0.1/{sink.port}\n",
            env={"IPFIX_BALANCER_USER": service_user})
        bal.config_path.chmod(0o644)
        bal.wait_ready(30)
        line = bal.wait_log("privileges_dropped")
        assert line["user"] == service_user and line["capabilities"] == ["CAP_NET_BIND_SERVICE"]
        procs = [psutil.Process(bal.pid)] + psutil.Process(bal.pid).children()
        assert len(procs) == 3 and all(p.uids().effective == uid and p.uids().real == uid for p in procs)
        assert bal.run_dir.stat().st_uid == uid
        with open(f"/proc/{procs[1].pid}/status") as f:
            caps = {k: int(v, 16) for k, v in (line.split(":\t") for line in f if line.startswith("Cap"))}
        assert caps["CapEff"] == caps["CapAmb"] == 1 << 10, caps  # CAP_NET_BIND_SERVICE and nothing else
        tcp_send(low, make_stream(5))
        assert sink.wait_messages(5)


def test_a_drop_that_cannot_work_says_why_in_one_line(service_user, tmp_path):
    """Root runs it from a place the service user cannot reach (a venv under /root, pytest's private tmp
    dir): one line naming the path and the way out, exit 3, no traceback, nothing left running."""
    config = tmp_path / "balancer.env"
    config.write_text(f"IPFIX_FULLFLOW_PORT[0]={free_port()}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n")
    env = {k: v for k, v in os.environ.items() if k != "INVOCATION_ID"}
    done = subprocess.run([sys.executable, "-m", "ipfix_balancer", "run", "--config", str(config),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=60,
                          env={**env, "IPFIX_BALANCER_USER": service_user,
                               "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    [line] = [ln for ln in done.stdout.splitlines() if "not_started" in ln]
    assert f"runs as {service_user}, who may not " in line and "IPFIX_BALANCER_USER=" in line, line
