"""No silent loss, against real processes and sockets: every message is delivered, moved to a live
collector, or counted by reason. Faults: a hung collector (accepts, never reads), a collector SIGKILLed at
full speed, a collector that resets mid-message, a message too big for a datagram, a UDP collector that is
down and comes back."""

import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from ipfixkit import (FULLFLOW_FIELDS, MAX_MESSAGE_LENGTH, TcpExporter, TcpSink, UdpSink, data_message, extract_serials, free_port,
                      make_stream, split_messages, template_message, udp_send, wait_until)
from ipfix_balancer import config

HANDLER = "fullflow[0]"
RCVBUF = 65536  # the hung or killed collector's receive buffer (the kernel doubles it)


def env(port: int, subs: list[str], mode: str = "RoundRobin", listen: str = "tcp", stall: int = 1,
        extra: str = "") -> str:
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\nIPFIX_FULLFLOW_PORT_TYPE[0]={listen}\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB[0]={','.join(subs)}\n"
            f"IPFIX_FULLFLOW_STALL_SECONDS[0]={stall}\n{extra}")


def sub(status: dict, i: int) -> dict:
    return status["subreceivers"][i]


def serials(messages) -> list[int]:
    return extract_serials(list(messages))


def at_most_a_receive_buffer(rpm: int, size: int) -> int:
    """Records a collector's kernel may have acknowledged and its process never read (plus one cut message)."""
    return (2 * RCVBUF // size + 2) * rpm


@pytest.mark.parametrize("mode", ["RoundRobin", "All"])
def test_a_hung_collector_is_stalled_and_loses_nothing_it_did_not_count(balancer, mode):
    """a accepts and never reads. It is shown stalled within STALL_SECONDS + 1 s of taking nothing.
    RoundRobin: a's connection is reset and everything it had not acknowledged goes to b, which gets all
    the rest; All: a keeps its connection, its bounded queue drops its oldest, counted as ``stalled``. When a
    reads again it is up, and every record is at a or b once, counted, or was in a's receive buffer."""
    port = free_port()
    with TcpSink(rcvbuf=RCVBUF) as a, TcpSink() as b:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"], mode, extra="IPFIX_FULLFLOW_QUEUE_BYTES[0]=262144\n"))
        bal.wait_ready()
        a.pause()
        stream = make_stream(3000, target_size=1000)
        rpm = len(serials(stream[1:2]))
        with TcpExporter(port) as exporter:
            exporter.send(stream[:1001])
            stalled_at = time.monotonic()
            bal.wait_status(HANDLER, lambda s: sub(s, 0)["state"] == "stalled", timeout=30)
            # status is written every second; the stall is declared STALL_SECONDS (1) after the last progress
            assert time.monotonic() - stalled_at < 1 + 1 + 1 + 5, "stalled within STALL_SECONDS + 1 s (+ slack)"
            assert bal.wait_log("subreceiver_stalled")["subreceiver"] == a.endpoint
            before = a.bytes_received
            exporter.send(stream[1001:])
            bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream), timeout=30)
            assert b.wait_quiet(1.0, timeout=30)
            got_b = serials(b.messages())
            if mode == "RoundRobin":
                assert set(range(1000 * rpm, 3000 * rpm)) <= set(got_b), "after the stall, b gets everything"
            else:
                assert sorted(got_b) == list(range(3000 * rpm))
            assert a.bytes_received == before
            a.resume()
            # All: its kept connection's window opens again, it shows it reads: up. RoundRobin: reset, and its
            # new connection is on probation until traffic shows it reads (this export is over)
            back = "up" if mode == "All" else "probation"
            st = bal.wait_status(HANDLER, lambda s: sub(s, 0)["state"] == back, timeout=30)
            assert a.wait_quiet(1.0, timeout=30)
            st = bal.wait_status(HANDLER, lambda s: sub(s, 0)["queued_bytes"] == 0, timeout=30)
        got_a = serials(a.messages())
        drops = sub(st, 0)
        assert [line["event"] for line in bal.logs()].count("subreceiver_stalled") == 1, "logged once"
        if mode == "RoundRobin":  # its connection was reset: only what its kernel took unread may be gone
            together = got_a + got_b
            assert len(together) == len(set(together)), "nothing twice"
            missing = 3000 * rpm - len(together)
            counted = drops["drop_records_by_reason"].get("connection_lost", 0)
            # counted as lost: what its kernel acknowledged and its process had not read when it was reset
            # (an upper bound: this collector reads its buffer after all when it resumes)
            assert missing <= counted <= at_most_a_receive_buffer(rpm, 1000), (missing, counted)
            assert counted > 0 and drops["drops_by_reason"] == {"connection_lost": drops["drops"]}
            assert sub(st, 0)["resent"] > 0
        else:
            assert len(got_a) == len(set(got_a))
            missing = 3000 * rpm - len(got_a)
            assert missing > 0 and drops["drop_records"] == missing, "every record a missed is counted"
            assert drops["drops_by_reason"] == {"stalled": drops["drops"]}
            assert drops["drop_records_by_reason"] == {"stalled": missing}
            assert st["drops_by_reason"] == drops["drops_by_reason"]
    assert bal.stop(timeout=30) == 1, "a handler exits 0 only without counted loss"


COLLECTOR = f"""
import socket, sys, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, {RCVBUF})
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(8)
with open(sys.argv[2], "wb", buffering=0) as out:
    while True:
        conn, _ = listener.accept()
        while data := conn.recv(16384):
            out.write(data)
            time.sleep(0.002)  # slower than the balancer: a backlog waits in the kernel when it dies
"""


def test_a_collector_killed_at_full_speed_costs_at_most_its_receive_buffer(balancer, tmp_path):
    """What the collector's kernel had not acknowledged is sent again to the live collector."""
    port, cport = free_port(), free_port()
    got_path = tmp_path / "collector.bin"
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR, str(cport), str(got_path)])
    try:
        with TcpSink() as b:
            bal = balancer(env(port, [f"127.0.0.1/{cport}", f"127.0.0.1/{b.port}"]))
            bal.wait_ready()
            bal.wait_status(HANDLER, lambda s: True)
            stream = make_stream(12000, target_size=1000)
            rpm, size = len(serials(stream[1:2])), len(stream[1])
            with TcpExporter(port) as exporter:
                sender = threading.Thread(target=exporter.send, args=(stream,))
                sender.start()
                wait_until(lambda: got_path.exists() and got_path.stat().st_size > 2_000_000, "collector traffic",
                           bal, timeout=30)
                collector.send_signal(signal.SIGKILL)
                collector.wait(10)
                sender.join(60)
                st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream), timeout=60)
                assert b.wait_quiet(1.0, timeout=30)
                st = bal.wait_status(HANDLER, lambda s: sub(s, 1)["queued_bytes"] == 0, timeout=30)
        got = serials(split_messages(got_path.read_bytes(), partial_ok=True)) + serials(b.messages())
        assert len(got) == len(set(got)), "nothing twice"
        missing = 12000 * rpm - len(got)
        assert missing <= at_most_a_receive_buffer(rpm, size), missing
        assert sub(st, 0)["resent"] > 0
        down = bal.wait_log("subreceiver_down")
        assert down["resent"] == sub(st, 0)["resent"]
    finally:
        collector.kill()
        collector.wait()


def test_a_collector_that_resets_mid_message_costs_at_most_its_receive_buffer(balancer):
    port = free_port()
    with TcpSink(rcvbuf=RCVBUF) as a, TcpSink() as b:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"], stall=60))
        bal.wait_ready()
        stream = make_stream(1000, target_size=8000)
        rpm, size = len(serials(stream[1:2])), len(stream[1])
        a.pause()  # a's kernel takes its receive buffer, then our writes to it stop part-way
        with TcpExporter(port) as exporter:
            exporter.send(stream)
            bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) and sub(s, 0)["unacked_bytes"] > 0)
            a.drop_connections(reset=True)
            a.down()
            bal.wait_log("subreceiver_down")
            st = bal.wait_status(HANDLER, lambda s: sub(s, 1)["queued_bytes"] == 0 and sub(s, 0)["resent"] > 0,
                                 timeout=30)
            assert b.wait_quiet(1.0, timeout=30)
        got = serials(split_messages(a.data, partial_ok=True)) + serials(b.messages())
        assert len(got) == len(set(got))
        missing = 1000 * rpm - len(got)
        assert missing <= at_most_a_receive_buffer(rpm, size), missing
        # what its kernel acknowledged and its process never read is counted (an upper bound), never 0
        counted = sub(st, 0)["drop_records_by_reason"].get("connection_lost", 0)
        assert 0 < missing <= counted <= at_most_a_receive_buffer(rpm, size), (missing, counted)


def big_message(first_serial: int) -> bytes:
    """A 65,535-byte data message (legal on TCP, more than a UDP datagram carries): as many records as fit,
    and the set padded to the end (RFC 7011 §3.3.1)."""
    probe = data_message([0])
    per_record = len(data_message([0, 1])) - len(probe)
    msg = bytearray(data_message(range(first_serial, first_serial + (MAX_MESSAGE_LENGTH - len(probe)) // per_record + 1)))
    padding = MAX_MESSAGE_LENGTH - len(msg)
    struct.pack_into("!H", msg, 2, MAX_MESSAGE_LENGTH)
    struct.pack_into("!H", msg, 18, struct.unpack_from("!H", msg, 18)[0] + padding)
    return bytes(msg + bytes(padding))


@pytest.mark.parametrize("mode", ["RoundRobin", "All"])
def test_tcp_to_udp_a_message_too_big_for_a_datagram_is_dropped_counted_and_the_stream_goes_on(balancer, mode):
    port = free_port()
    with UdpSink() as a, UdpSink() as b:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}", f"127.0.0.1/{b.port}"], mode,
                           extra="IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]=udp\n"))
        bal.wait_ready()
        stream = make_stream(400, records_per_message=10)
        big = big_message(10_000_000)
        with TcpExporter(port) as exporter:
            exporter.send(stream[:201] + [big] + stream[201:])
            copies = 2 if mode == "All" else 1
            st = bal.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream) + 1 and s["drops"] == copies,
                                 timeout=30)
            wait_until(lambda: len(serials(a.messages() + b.messages())) >= 4000 * copies, "the rest", bal,
                       timeout=30)
        assert sorted(serials(a.messages() + b.messages())) == sorted(list(range(4000)) * copies)
        assert st["drops_by_reason"] == {"oversize": copies}
        assert st["drop_records_by_reason"] == {"oversize": copies * len(serials([big]))}
        logged = [line for line in bal.logs() if line.get("event") == "message_oversize"]
        assert len(logged) == copies and logged[0]["size"] == len(big)
        assert [line for line in bal.logs() if line.get("event") == "subreceiver_down"] == []


def test_check_config_warns_that_tcp_in_udp_out_limits_message_size():
    values = {"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920",
              "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "udp"}
    (warning,) = config.load_values(values, cpus={0}).warnings
    assert "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]='udp'" in warning and "65,507 bytes" in warning
    assert not config.load_values({**values, "IPFIX_FULLFLOW_PORT_TYPE[0]": "udp"}, cpus={0}).warnings


def test_a_udp_collector_down_then_back_backs_off_logs_once_and_counts_the_refused(balancer):
    port = free_port("udp")
    with UdpSink(up=False) as a:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}"], "All", listen="udp",
                           extra="IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]=udp\n"))
        bal.wait_ready()
        stream = make_stream(300, records_per_message=2)
        udp_send(port, stream[:150], delay=0.02)  # 3 s while the collector is down
        st = bal.wait_status(HANDLER, lambda s: s["drops_by_reason"].get("refused", 0) > 0)
        events = [line["event"] for line in bal.logs()]
        assert events.count("subreceiver_down") == 1 and events.count("subreceiver_up") == 0, "no flapping"
        retries = [line["retry_in"] for line in bal.logs() if line.get("event") == "subreceiver_down"]
        assert sub(st, 0)["drops_by_reason"]["refused"] == st["drops_by_reason"]["refused"]
        a.up()
        bal.wait_log("subreceiver_up", timeout=30)
        udp_send(port, stream[150:], delay=0.005)
        st = bal.wait_status(HANDLER, lambda s: sub(s, 0)["state"] == "up" and s["msgs_in"] == len(stream)
                             and sub(s, 0)["queued_bytes"] == 0, timeout=30)
        assert a.wait_quiet(0.5, timeout=30)
    events = [line["event"] for line in bal.logs()]
    assert events.count("subreceiver_down") == 1 and events.count("subreceiver_up") == 1
    assert retries == [0.2]
    got = serials(a.messages())
    assert len(got) == len(set(got)) == 600 - st["drop_records"], "every record arrived or was counted"
    assert bal.stop(timeout=30) == 1, "refused datagrams are loss: the handler exits non-zero"


def test_two_sessions_sharing_an_odid_with_other_templates_are_logged_once(balancer):
    """Collectors that scope templates by (source address, ODID) cannot tell them apart behind the balancer."""
    port = free_port()
    with TcpSink() as a:
        bal = balancer(env(port, [f"127.0.0.1/{a.port}"], "All"))
        bal.wait_ready()
        first = make_stream(2, odid=0)
        other = [template_message(0, 0, fields=FULLFLOW_FIELDS[:-1])]
        with TcpExporter(port) as x, TcpExporter(port) as y, TcpExporter(port) as z:
            x.send(first)
            bal.wait_status(HANDLER, lambda s: s["msgs_in"] == 3)
            y.send(first)  # same templates: no conflict
            bal.wait_status(HANDLER, lambda s: s["msgs_in"] == 6)
            z.send(other * 2)
            bal.wait_status(HANDLER, lambda s: s["msgs_in"] == 8)
            line = bal.wait_log("odid_shared_with_other_templates")
            assert line["odid"] == 0 and line["sessions"][1].endswith(str(z.local_port))
        assert [entry["event"] for entry in bal.logs()].count("odid_shared_with_other_templates") == 1
