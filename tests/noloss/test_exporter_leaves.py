"""A session outlives its exporter, against real processes and sockets: the exporter sends a burst and
closes while collectors are away (down, restarting, hung), and what it sent still reaches them, or is
counted. Also: a steady export with a collector that stays hung, and a collector that resets every
connection."""

import os
import signal
import socket
import struct
import threading
import time

from ipfixkit import TcpExporter, TcpSink, free_port, make_stream, run_cli, wait_until

from test_noloss import HANDLER, RCVBUF, at_most_a_receive_buffer, env, serials, sub

N = 3000
SIZE = 1400


def burst_and_leave(port: int, n: int = N):
    stream = make_stream(n, target_size=SIZE)
    with TcpExporter(port) as exporter:
        exporter.send(stream)
    return stream, len(serials(stream[1:2]))


def test_all_a_collector_back_after_the_exporter_left_gets_every_record(balancer):
    port = free_port()
    with TcpSink() as a, TcpSink(up=False) as b:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"], "All"))
        bal.wait_ready()
        stream, rpm = burst_and_leave(port)
        st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and s["connections"] == 0)
        st = bal.wait_status(HANDLER, lambda s: s["draining"] == 1 and s["draining_bytes"] > 0)
        time.sleep(2)  # the collector restarts meanwhile (the exporter is long gone)
        b.up()
        bal.wait_status(HANDLER, lambda s: s["draining"] == 0, timeout=30)
        assert a.wait_quiet(0.5) and b.wait_quiet(0.5)
        assert sorted(serials(b.messages())) == list(range(N * rpm)), "the late collector gets everything"
        assert sorted(serials(a.messages())) == list(range(N * rpm))
        assert bal.status(HANDLER)["drops"] == 0
    assert bal.stop() == 0


def test_roundrobin_collectors_all_back_after_the_exporter_left_get_every_record_once(balancer):
    port = free_port()
    with TcpSink(up=False) as a, TcpSink(up=False) as b:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"]))
        bal.wait_ready()
        stream, rpm = burst_and_leave(port)
        bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and s["draining"] == 1)
        time.sleep(2)
        a.up()
        b.up()
        bal.wait_status(HANDLER, lambda s: s["draining"] == 0, timeout=30)
        assert a.wait_quiet(0.5) and b.wait_quiet(0.5)
        together = serials(a.messages()) + serials(b.messages())
        assert sorted(together) == list(range(N * rpm)), "every record once"
        assert bal.status(HANDLER)["drops"] == 0
    assert bal.stop() == 0


def test_roundrobin_a_hung_collector_after_the_exporter_left_costs_at_most_its_buffer_counted(balancer):
    port = free_port()
    with TcpSink() as a, TcpSink(rcvbuf=RCVBUF) as b:
        b.pause()  # accepts, never reads
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"]))
        bal.wait_ready()
        stream, rpm = burst_and_leave(port)
        st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and s["draining"] == 0, timeout=30)
        assert a.wait_quiet(0.5)
        got = serials(a.messages())
        assert len(got) == len(set(got)), "nothing twice"
        missing = N * rpm - len(got)
        counted = sub(st, 1)["drop_records_by_reason"].get("connection_lost", 0)
        assert 0 < missing <= counted <= at_most_a_receive_buffer(rpm, SIZE), (missing, counted)
        assert bal.wait_log("subreceiver_stalled")["subreceiver"] == f"127.0.0.1/{b.port}/tcp"
        b.resume()


def test_a_steady_export_with_a_collector_that_stays_hung_loses_at_most_a_buffer_all_counted(balancer):
    """RoundRobin to a healthy and a hung collector, 6 s of steady export: the hung one is probed with
    backoff, never given a full share again; what its kernel took unread is counted."""
    port = free_port()
    with TcpSink() as a, TcpSink(rcvbuf=RCVBUF) as b:
        b.pause()
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"]))
        bal.wait_ready()
        n, seconds = 12000, 6.0
        stream = make_stream(n, target_size=SIZE)
        rpm = len(serials(stream[1:2]))
        with TcpExporter(port) as exporter:
            step, states = n // 80, []
            for i in range(0, n + 1, step):
                exporter.send(stream[i:i + step])
                time.sleep(seconds / 80)
                states.append(sub(bal.status(HANDLER), 1)["state"])
            bal.wait_log("subreceiver_stalled", timeout=1)  # while the export runs
        st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and s["draining"] == 0, timeout=60)
        assert a.wait_quiet(0.5)
        got = serials(a.messages())
        missing = n * rpm - len(got)
        counted = sub(st, 1)["drop_records_by_reason"].get("connection_lost", 0)
        assert len(got) == len(set(got))
        assert missing <= counted <= n * rpm // 100 + 2 * at_most_a_receive_buffer(rpm, SIZE), (missing, counted)
        assert "stalled" in states and "up" not in states[states.index("stalled"):], states
        b.resume()


class ResettingCollector:
    """Accepts, waits a moment (its kernel acknowledges what arrives), then resets: every connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.endpoint = f"127.0.0.1/{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


def test_a_collector_that_resets_every_connection_loses_nothing_uncounted(balancer):
    port = free_port()
    bad = ResettingCollector()
    try:
        with TcpSink() as a:
            bal = balancer(env(port, [f"127.0.0.1/{a.port}", bad.endpoint]))
            bal.wait_ready()
            n = 6000
            stream = make_stream(n, target_size=SIZE)
            rpm = len(serials(stream[1:2]))
            with TcpExporter(port) as exporter:
                for i in range(0, n + 1, 200):
                    exporter.send(stream[i:i + 200])
                    time.sleep(0.05)
            st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and s["draining"] == 0,
                                 timeout=60)
            assert a.wait_quiet(0.5)
            got = serials(a.messages())
            missing = n * rpm - len(got)
            counted = sub(st, 1)["drop_records_by_reason"].get("connection_lost", 0)
            assert len(got) == len(set(got))
            assert missing <= counted, (missing, counted)
            assert bad.accepted >= 2
    finally:
        bad.close()


def test_a_handler_killed_as_hung_has_what_its_queues_held_counted_as_handler_killed(balancer):
    """Collectors down, messages queued; the handler is SIGSTOPped and the supervisor kills it: what its last
    status said it held is counted by the supervisor (log, its document, ``status``), not silently gone."""
    port = free_port()
    with TcpSink(up=False) as a, TcpSink(up=False) as b:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"],
                           extra="IPFIX_BALANCER_HANG_SECONDS=2\n"))
        bal.wait_ready()
        stream = make_stream(500, target_size=SIZE)
        rpm = len(serials(stream[1:2]))
        with TcpExporter(port) as exporter:
            exporter.send(stream)
            st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and s["queued_msgs"] >= 500)
            assert st["queued_records"] == 500 * rpm
            hung = st["pid"]
            os.kill(hung, signal.SIGSTOP)
            try:
                line = bal.wait_log("handler_killed_with_loss", timeout=20)
            finally:
                try:
                    os.kill(hung, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        assert line["lost_messages"] == st["queued_msgs"] and line["lost_records"] == 500 * rpm
        wait_until(lambda: bal.supervisor()["handlers"][0]["killed_records"] == 500 * rpm, "counted", bal)
        out = run_cli("status", "--run-dir", str(bal.run_dir)).stdout
        assert f"handler_killed: {st['queued_msgs']}/{500 * rpm} msgs/records" in out


def test_sessions_that_left_drain_and_past_max_sessions_draining_are_counted_at_once(balancer):
    """MAX_SESSIONS=2 with the collector down: six exporters in turn send 20 messages and leave. Sessions that
    left keep their messages while they drain; past MAX_SESSIONS draining ones, the first to leave are closed
    and what they held is counted as ``drain_limit`` right away, not when the handler stops. (A UDP session
    evicted at the cap drains the same way.)"""
    port = free_port()
    with TcpSink(up=False) as a:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}"], extra="IPFIX_FULLFLOW_MAX_SESSIONS[0]=2\n"))
        bal.wait_ready()
        stream = make_stream(20, target_size=SIZE)
        rpm = len(serials(stream[1:2]))
        for k in range(1, 7):
            with TcpExporter(port) as exporter:
                exporter.send(stream)
            bal.wait_status(HANDLER, lambda s: s["msgs_in"] == k * len(stream) and s["connections"] == 0)
        st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == 6 * len(stream)
                             and s["drops_by_reason"].get("drain_limit", 0) == 4 * len(stream))
        assert st["draining"] == 2 and st["queued_msgs"] == 2 * len(stream), "every message held or counted"
        assert st["drop_records_by_reason"]["drain_limit"] == 4 * 20 * rpm
        assert bal.wait_log("drain_limit")["sessions_closed"] >= 1
        a.up()
        st = bal.wait_status(HANDLER, lambda s: s["draining"] == 0, timeout=30)
        assert a.wait_quiet(0.5)
        assert len(serials(a.messages())) == 2 * 20 * rpm, "the two that were left drain to the collector"
