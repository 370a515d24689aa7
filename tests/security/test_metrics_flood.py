"""Issue 20, item 1: a local user holding connections to the metrics port stops neither the supervisor nor a
handler (it used to exhaust the supervisor's descriptors: a healthy handler was taken for hung and killed,
its restart failed in channel.pair() and the supervisor exited)."""
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request

from ipfixkit import TcpExporter, TcpSink, extract_serials, forwarding_env, free_port, make_stream

# Keeps up to N connections open to the port for SECONDS, opening a new one for each the server closes;
# prints how many it opened and how many the server closed.
FLOOD = """
import select, socket, time
N, PORT, SECONDS = {n}, {port}, {seconds}
open_, opened, closed = [], 0, 0
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    while len(open_) < N and time.monotonic() < end:
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", PORT))
        except OSError:
            s.close()
            break
        open_.append(s)
        opened += 1
    readable = select.select(open_, [], [], 0.1)[0] if open_ else []
    for s in readable:
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            open_.remove(s)
            s.close()
            closed += 1
print(opened, closed, len(open_), flush=True)
"""
LIMIT = 256  # the supervisor's descriptor limit in the original report


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def test_idle_connections_to_the_metrics_port_stop_nothing_and_lose_nothing(attacker, reachable_balancer):
    port, metrics = free_port(), free_port()
    with TcpSink() as sink:
        bal = reachable_balancer(forwarding_env(port, [sink], extra=f"IPFIX_BALANCER_METRICS=127.0.0.1/{metrics}\n"
                                                                   "IPFIX_BALANCER_HANG_SECONDS=4\n"))
        bal.wait_ready()
        handler = bal.handler_pid("fullflow[0]")
        # The supervisor raised its soft limit to the hard one; put both back at the report's 256.
        subprocess.run(["prlimit", f"--pid={bal.pid}", f"--nofile={LIMIT}:{LIMIT}"], check=True)
        stream = make_stream(600, records_per_message=2)
        flood = attacker.start(FLOOD.format(n=2 * LIMIT, port=metrics, seconds=12))
        peak, errors = [0], []

        def export():
            try:
                with TcpExporter(port) as exporter:
                    exporter.send(stream[:1])
                    for message in stream[1:]:  # one message every 20 ms, throughout the attack
                        exporter.send([message])
                        time.sleep(0.02)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=export)
        sender.start()
        try:
            while flood.poll() is None:
                peak[0] = max(peak[0], _fd_count(bal.pid))
                time.sleep(0.2)
        finally:
            out = attacker.stop(flood)
            sender.join(60)
        events = {line.get("event") for line in bal.logs()}
        assert not events & {"handler_hung", "handler_died", "handler_start_failed", "supervisor_turn_failed"}, events
        assert bal.running and bal.handler_pid("fullflow[0]") == handler
        opened, closed, _held = map(int, out.split())
        assert opened > 2 * LIMIT, f"the attack ran: {out}"
        assert closed > 0, "connections over the cap or past their deadline are closed"
        assert peak[0] < 64, f"the supervisor held {peak[0]} descriptors"
        assert not errors
        assert sink.wait_messages(len(stream) - 1, timeout=30) and sink.wait_quiet(0.5)
        assert sorted(extract_serials(sink.messages())) == list(range(600 * 2)), "every record, once"
        deadline = time.monotonic() + 10
        while _healthz(metrics) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _healthz(metrics) == 200, "metrics served again once the attacker is gone"
        status = json.loads(open(bal.run_dir / "supervisor.json").read())
        assert status["pid"] == bal.pid and status["handlers"][0]["restarts"] == 0
