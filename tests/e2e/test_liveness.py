"""Liveness as operators and systemd see it: a port held by another process, a hung (SIGSTOPped) handler,
and the sd_notify messages the supervisor sends to systemd."""

import contextlib
import json
import os
import signal
import socket
import urllib.error
import urllib.request

import psutil
import pytest

from ipfixkit import REPO_ROOT, TcpSink, forwarding_env, free_port, run_cli, wait_until


class FakeSystemd:
    """A unix datagram socket standing in for systemd's notify socket; keeps every message it got."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(20)
        self.got: list[str] = []

    def receive(self, until) -> str:
        """Messages until one has a line for which until(line); returns that line."""
        while True:
            msg = self.sock.recv(4096).decode()
            self.got.append(msg)
            for line in msg.split("\n"):
                if until(line):
                    return line

    def lines(self) -> list[str]:
        return [line for msg in self.got for line in msg.split("\n")]


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    with fake.sock:
        yield fake


def test_port_in_use_is_one_plain_line_naming_the_holder_and_the_handler_backs_off(balancer, systemd):
    port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    with TcpSink() as sink:
        bal = balancer(forwarding_env(port, [sink]), env={"NOTIFY_SOCKET": systemd.path})
        failed = bal.wait_log("listen_failed", timeout=20)
        assert failed["reason"] == (f"cannot listen on tcp 127.0.0.1:{port}: address already in use by "
                                    f"pid {os.getpid()} ({psutil.Process().name()})")
        died = [bal.wait_log(lambda line: line.get("event") == "handler_died" and line["restarts"] == n, timeout=20)
                for n in (0, 1)]
        assert [d["exit_code"] for d in died] == [75, 75]
        assert [d["restart_in"] for d in died] == [1.0, 2.0]   # backoff, not a tight loop
        systemd.receive(lambda line: line.startswith("STATUS=") and line.endswith("; not listening: fullflow[0]"))
        assert "READY=1" not in systemd.lines()     # not before every handler listens
        holder.close()
        systemd.receive(lambda line: line == "READY=1")
        bal.wait_status("fullflow[0]", lambda s: s["listen"]["listening"], timeout=30)
        assert "Traceback" not in bal.log_text()
        assert not [line for line in bal.logs() if line.get("event") == "handler_crashed"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_stopped_handler_turns_stale_then_is_replaced_and_logged(balancer):
    port, metrics = free_port(), free_port()
    with TcpSink() as sink:
        bal = balancer(forwarding_env(port, [sink], extra=f"IPFIX_BALANCER_METRICS=127.0.0.1/{metrics}\n"
                                                          "IPFIX_BALANCER_HANG_SECONDS=8\n"))
        bal.wait_ready()
        healthz = f"http://127.0.0.1:{metrics}/healthz"
        wait_until(lambda: _get(healthz)[0] == 200, "healthz 200", bal)
        hung = bal.handler_pid("fullflow[0]")
        os.kill(hung, signal.SIGSTOP)
        try:
            def stale():
                doc = json.loads(run_cli("status", "--json", "--run-dir", str(bal.run_dir)).stdout)
                return doc["handlers"][0]["stale"] and doc
            doc = wait_until(stale, "status --json: stale", bal, timeout=8)
            assert doc["handlers"][0]["pid"] == hung and doc["handlers"][0]["alive"] is True
            assert "STALE: no status for" in run_cli("status", "--run-dir", str(bal.run_dir)).stdout
            code, text = _get(healthz)
            assert code == 503 and f"fullflow[0] pid {hung} STALE" in text
            line = bal.wait_log("handler_hung", timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert line["handler_pid"] == hung and line["silent_s"] >= 8
        assert line["reason"].startswith("no status heartbeat for") and "HANG_SECONDS=8" in line["reason"]
        new = bal.wait_status("fullflow[0]", lambda s: s["pid"] != hung and s["listen"]["listening"], timeout=20)
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        wait_until(lambda: _get(healthz)[0] == 200, "healthz 200 again", bal)
        assert bal.supervisor()["handlers"][0] == {"name": "fullflow[0]", "stream": "FULLFLOW", "index": 0,
                                                   "pid": new["pid"], "restarts": 1, "killed_msgs": 0,
                                                   "killed_records": 0}


def test_sd_notify_ready_status_watchdog_reload_and_stopping(balancer, systemd):
    port = free_port()
    receive = systemd.receive
    with TcpSink() as sink:
        bal = balancer(forwarding_env(port, [sink], extra=f"IPFIX_CLICKSTREAM_PORT[0]={free_port()}\n"
                                                          "IPFIX_CLICKSTREAM_BIND[0]=127.0.0.1\n"),
                       env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "2000000"})
        receive(lambda line: line == "READY=1")
        assert bal._not_ready() is None          # READY=1 only once every handler listens
        assert systemd.got[-1].split("\n")[1].startswith("STATUS=2/2 handlers healthy, 0 restarts;")
        for _ in range(3):                        # every 1 s: half of WATCHDOG_USEC
            receive(lambda line: line == "WATCHDOG=1")
        bal.reload()
        assert receive(lambda line: line.startswith("RELOADING=1") or line == "READY=1") == "RELOADING=1"
        receive(lambda line: line == "READY=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in systemd.lines())
        bal.send_signal(signal.SIGTERM)
        receive(lambda line: line == "STOPPING=1")
        assert bal.wait_exit() == 0


def test_the_unit_is_type_notify_with_a_watchdog():
    unit = (REPO_ROOT / "etc" / "systemd" / "fast_ipfix_balancer.service").read_text().splitlines()
    assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=60"} <= set(unit)
