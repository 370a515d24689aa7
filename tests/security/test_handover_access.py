"""Issue 13, item 1 and the `ps` part of item 2: nobody but the supervisor's own handlers can reach the
handover, and a restart in place cannot be hijacked."""
import json
import signal
import threading
import time

import psutil
from attack import legacy_handover_name, named_unix_sockets

from ipfixkit import TcpExporter, TcpSink, extract_serials, fault_env, free_port, make_stream, run_cli

STEAL = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect(sys.argv[1] if len(sys.argv) > 1 else {name!r})
except OSError as exc:
    print("refused", type(exc).__name__)
    raise SystemExit
try:
    msg, fds, flags, addr = socket.recv_fds(s, 65536, 250)
    print("fds", len(fds), len(msg))
except OSError as exc:
    print("nothing", type(exc).__name__)
s.close()  # the poke: connect and close
"""

# Binds the name first (squat), then serves a forged state to whoever connects (hijack), until killed.
SQUAT = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind({name!r})
s.listen(8)
print("bound", flush=True)
while True:
    conn, _ = s.accept()
    print("accepted", flush=True)
    doc = json.dumps({{"pid": 1, "listener": 0, "sessions": [], "fd_count": 1}}).encode()
    conn.sendall(struct.pack("!I", len(doc)) + doc)
    evil = socket.socket()
    evil.bind(("127.0.0.1", 0))
    evil.listen(8)
    socket.send_fds(conn, [b"F"], [evil.fileno()])
    conn.close()
"""


def env(port: int, sinks) -> str:
    subs = ",".join(f"127.0.0.1/{s.port}" for s in sinks)
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]=RoundRobin\nIPFIX_FULLFLOW_BALANCER_SUB[0]={subs}\n")


def started(reachable_balancer, sink):
    """A running balancer forwarding a fresh port to ``sink``; (balancer, port, handler pid)."""
    port = free_port()
    bal = reachable_balancer(env(port, [sink]))
    bal.wait_ready()
    return bal, port, bal.handler_pid("fullflow[0]")


def balancer_processes(bal) -> list[psutil.Process]:
    sup = psutil.Process(bal.pid)
    return [sup] + sup.children()


def test_no_named_socket_to_steal_or_poke(attacker, reachable_balancer):
    with TcpSink() as sink:
        bal, port, handler = started(reachable_balancer, sink)
        for proc in balancer_processes(bal):
            assert named_unix_sockets(proc.pid) == [], f"{proc.name()} holds a socket others can reach"
        for _ in range(3):  # steal, and the repeated poke that used to kill the handler (exit 70)
            out = attacker.run(STEAL.format(name=legacy_handover_name(bal.run_dir))).stdout
            assert out.startswith("refused"), out
        with TcpExporter(port) as exporter:
            exporter.send(make_stream(50, records_per_message=2))
            assert sink.wait_messages(50)
        assert bal.handler_pid("fullflow[0]") == handler and psutil.pid_exists(handler)
        assert not [line for line in bal.logs() if line.get("event") in ("handed_over", "handler_crashed")]


def test_squatted_name_and_hijack_attempt_during_a_real_restart(attacker, reachable_balancer):
    port = free_port()
    with TcpSink() as a, TcpSink() as b:
        bal = reachable_balancer(env(port, [a, b]), start=False)
        squatter = attacker.start(SQUAT.format(name=legacy_handover_name(bal.run_dir)))
        try:
            assert squatter.stdout.readline().strip() == "bound"
            bal.start()
            bal.wait_ready()  # the handler starts although the old name is taken
            old = bal.handler_pid("fullflow[0]")
            stream = make_stream(20000, records_per_message=3)
            sent, errors, restarted = [0], [], threading.Event()

            def export():
                try:
                    with TcpExporter(port) as exporter:
                        exporter.send(stream[:1])
                        after = 0
                        for i in range(1, len(stream), 50):
                            exporter.send(stream[i:i + 50])
                            sent[0] = i + 49
                            after += restarted.is_set()
                            if after > 10:
                                break
                            time.sleep(0.01)
                except OSError as exc:
                    errors.append(exc)

            sender = threading.Thread(target=export)
            sender.start()
            assert a.wait_messages(100)
            result = run_cli("restart", "--config", bal.config_path, "--run-dir", bal.run_dir)
            restarted.set()
            sender.join(60)
            assert result.returncode == 0, result.stderr
            assert not errors and sent[0] < len(stream)
            bal.wait_status("fullflow[0]", lambda s: s["pid"] != old and s["msgs_in"] > 0)
            assert bal.wait_log("took_over")["from_pid"] == old, "the real predecessor, not the squatter"
            status = run_cli("status", "--json", "--run-dir", bal.run_dir)
            assert json.loads(status.stdout)["supervisor_pid"] == bal.pid, "the lock survived the re-execution"
            assert a.wait_quiet(1.0, timeout=30) and b.wait_quiet(1.0, timeout=30)
            got = sorted(extract_serials(a.messages()) + extract_serials(b.messages()))
            assert got == list(range(sent[0] * 3)), "exactly the exporter's records, nothing forged"
        finally:
            out = attacker.stop(squatter)
        assert "accepted" not in out, "a balancer process connected to the squatter"


def test_ps_shows_no_receiver_settings(attacker, reachable_balancer):
    with TcpSink() as sink:
        bal, _port, handler = started(reachable_balancer, sink)
        pids = [p.pid for p in balancer_processes(bal)]
        out = attacker.run(f"""
            for pid in {pids}:  # what `ps -eo args` shows of the balancer (other balancers may run here)
                print(open(f"/proc/{{pid}}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
            try:
                open("/proc/{handler}/environ").read()
                print("ENVIRON READABLE")
            except OSError:
                pass
            """).stdout
        assert "ipfix_balancer handler --control-fd" in out, "the attacker does see the handler"
        assert f"/{sink.port}" not in out and "subreceiver" not in out
        assert "ENVIRON READABLE" not in out


# Test-only fault: while the flag file exists, a new handler dies before it asks for the sockets.
DIE_EARLY = """
import os, sys
if "handler" in sys.argv and os.path.exists({flag!r}):
    os._exit(9)
"""


def test_a_successor_that_dies_before_asking_leaves_the_old_handler_serving(balancer, tmp_path):
    flag, port = tmp_path / "die", free_port()
    with TcpSink() as sink:
        bal = balancer(env(port, [sink]), env=fault_env(tmp_path / "fault", DIE_EARLY.format(flag=str(flag))))
        bal.wait_ready()
        old = bal.handler_pid("fullflow[0]")
        stream = make_stream(40, records_per_message=2)
        with TcpExporter(port) as exporter:
            flag.touch()
            bal.send_signal(signal.SIGUSR2)  # restart in place; the successor dies at once
            bal.wait_log("handover_abandoned", timeout=20)
            exporter.send(stream[:20])
            assert sink.wait_messages(20), "the old handler keeps serving"
            assert not any(line.get("event") == "handler_crashed" for line in bal.logs())
            flag.unlink()  # the supervisor's next restart of the successor takes over from the same handler
            assert bal.wait_log("took_over", timeout=30)["from_pid"] == old
            exporter.send(stream[20:])
            assert sink.wait_quiet(1.0, timeout=30)
        status = bal.wait_status("fullflow[0]", lambda s: s["pid"] != old and s["msgs_in"] >= 20)
        assert status["connections_total"] == 1, "the exporter's connection was handed over, not reopened"
        assert sorted(extract_serials(sink.messages())) == sorted(extract_serials(stream)), "each record once"
