"""Liveness as operators and systemd see it: a port held by another process, a hung (SIGSTOPped) handler,
and the sd_notify messages the supervisor sends to systemd."""

import contextlib
import glob
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest

from ipfixkit import (REPO_ROOT, TcpExporter, TcpSink, extract_serials, fault_env, forwarding_env, free_port,
                      make_stream, run_cli, wait_until)


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


# Test-only fault: while the flag file exists, the supervisor cannot make a socketpair (its descriptors
# are exhausted, as under the metrics flood of issue 20).
NO_SOCKETPAIR = """
import errno, os, socket, sys
if sys.argv[1:2] == ["run"]:
    real = socket.socketpair
    def socketpair(*args, **kwargs):
        if os.path.exists({flag!r}):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(*args, **kwargs)
    socket.socketpair = socketpair
"""


def test_a_handler_that_cannot_be_started_is_logged_and_retried_with_backoff(balancer, tmp_path):
    flag, port = tmp_path / "emfile", free_port()
    with TcpSink() as sink:
        fault = fault_env(tmp_path / "fault", NO_SOCKETPAIR.format(flag=str(flag)))
        bal = balancer(forwarding_env(port, [sink]), env=fault)
        bal.wait_ready()
        first = bal.handler_pid("fullflow[0]")
        flag.touch()
        os.kill(first, signal.SIGKILL)
        failed = [bal.wait_log(lambda line, n=n: line.get("event") == "handler_start_failed"
                               and line["restarts"] == n, timeout=20) for n in (1, 2)]
        assert [f["restart_in"] for f in failed] == [2.0, 4.0]  # the backoff goes on doubling
        assert "Too many open files" in failed[0]["reason"]
        flag.unlink()
        new = bal.wait_status("fullflow[0]", lambda s: s["pid"] != first and s["listen"]["listening"], timeout=20)
        assert bal.running and bal.supervisor()["handlers"][0]["pid"] == new["pid"]
        stream = make_stream(20)
        with TcpExporter(port) as exporter:
            exporter.send(stream)
            assert sink.wait_messages(20)
        assert not [line for line in bal.logs() if line.get("event") == "supervisor_turn_failed"]


def _faketime() -> str | None:
    found = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    return found[0] if found else None


def test_wall_clock_steps_kill_no_handler_and_lose_no_record(balancer, tmp_path):
    """The balancer's processes read a wall clock that steps +20 s, then back an hour (libfaketime, from a
    file: the machine's clock is never touched); their monotonic clock runs on."""
    lib = _faketime()
    if lib is None:
        pytest.skip("needs libfaketime (scripts/install-deps installs it)")
    offset = tmp_path / "wall-offset"
    offset.write_text("+0s\n")
    fake = {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    port, metrics = free_port(), free_port()
    stream = make_stream(500, records_per_message=2)
    with TcpSink() as sink:
        bal = balancer(forwarding_env(port, [sink], extra=f"IPFIX_BALANCER_METRICS=127.0.0.1/{metrics}\n"
                                                          "IPFIX_BALANCER_HANG_SECONDS=3\n"), env=fake)
        bal.wait_ready()
        handler = bal.handler_pid("fullflow[0]")
        with TcpExporter(port) as exporter:
            exporter.send(stream[:1])
            sent = 1
            for step in (20, -3600):
                offset.write_text(f"{step:+d}s\n")
                # proof that the handler reads the stepped clock: its document's wall time moved
                bal.wait_status("fullflow[0]", lambda s, step=step: abs(s["time"] - time.time() - step) < 2)
                for message in stream[sent:sent + 200]:  # 4 s: longer than HANG_SECONDS
                    exporter.send([message])
                    time.sleep(0.02)
                sent += 200
                assert _get(f"http://127.0.0.1:{metrics}/healthz")[0] == 200
                doc = json.loads(run_cli("status", "--json", "--run-dir", str(bal.run_dir)).stdout)
                assert doc["handlers"][0]["stale"] is False  # status, on the real clock, judges the beat
            exporter.send(stream[sent:])
        assert sink.wait_messages(500, timeout=30) and sink.wait_quiet(0.5)
        assert sorted(extract_serials(sink.messages())) == list(range(1000)), "every record, once"
        assert bal.running and bal.handler_pid("fullflow[0]") == handler
        assert not [line for line in bal.logs() if line.get("event") in ("handler_hung", "handler_died")]
