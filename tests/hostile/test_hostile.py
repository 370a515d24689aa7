"""Hostile traffic and ordinary races against the real handler process (issue 11, README "Hostile input").

Each test attacks one handler while a well-behaved exporter (``Probe``) sends a message every 20 ms, and
asserts: the same handler pid (no crash, no restart), the probe's messages all delivered within a bound,
and the counters and log lines the attack must leave. Sizes are small here; ``scripts/hostile`` runs the
heavy versions.
"""

import collections
import contextlib
import socket
import struct
import threading
import time

import pytest

from hostilekit import LimitedBalancer, Probe, Process, connect, env, health_checks, idle_connections, junk_datagrams, \
    short_burst, short_sessions, stopped, trickle, udp_source_ports
from ipfixkit import TcpSink, UdpSink, free_port, make_stream, udp_send, wait_until
from ipfix_balancer.core.admission import FIRST_MESSAGE_SECONDS, SILENT_GRACE
from ipfix_balancer.logs import Throttle

HANDLER = "fullflow[0]"
DELAY = 5.0  # seconds: the worst delay of the probe under a (contended) test machine's load


@pytest.fixture
def probe():
    p = Probe()
    yield p
    p.close()


def start(balancer, port: int, subs: list[int], **kw) -> tuple:
    b = balancer(env(port, subs, **kw))
    b.wait_ready()
    return b, b.handler_pid(HANDLER)


def events(b, name: str, **match) -> list[dict]:
    return [line for line in b.logs() if line.get("event") == name
            and all(line.get(k) == v for k, v in match.items())]


def unharmed(b, pid: int, probe: Probe) -> None:
    """The handler survived and the well-behaved session lost nothing and waited little."""
    assert probe.wait_delivered(), f"probe messages missing: {probe.missing()}\n{b.log_tail()}"
    assert probe.worst_delay < DELAY, f"probe delayed {probe.worst_delay:.2f} s"
    assert b.handler_pid(HANDLER) == pid and Process(pid).alive, "the handler crashed or was restarted"
    assert not events(b, "handler_crashed")


# -- 1. races ------------------------------------------------------------------------------------------
def test_exporters_and_their_collector_closing_in_one_batch(probe, balancer):
    """The handler is stopped while 20 exporters leave and the collector closes every mirror connection:
    on SIGCONT both events of each session are in one select() batch (the mirror's read event must not
    run once the output was closed)."""
    port = free_port()
    b, pid = start(balancer, port, [probe.port])
    probe.start(port)
    leaving = [connect(port) for _ in range(20)]
    for sock in leaving:
        sock.sendall(b"".join(make_stream(1, 1, odid=9)))
    wait_until(lambda: b.status(HANDLER)["connections"] == 21, "21 sessions", b)
    wait_until(lambda: probe.messages >= 20 * 2, "the 20 sessions mirrored", b)  # each output is up and idle
    with stopped(pid):
        for sock in leaving:
            sock.close()
        probe.close_mirrors()
    wait_until(lambda: b.status(HANDLER)["connections"] == 1, "the 20 sessions gone", b)
    unharmed(b, pid, probe)


def test_health_check_closing_while_its_output_connects(probe, balancer):
    """A health check connects and closes while its output to a slow collector is still connecting: the
    handler is stopped, the check closes, and the collector completes the handshake (its full accept
    queue had dropped the SYN; the retransmission gets through once there is room). On SIGCONT the
    exporter's end and the output's "connected" are one batch, the end first: it closes the output."""
    port = free_port()
    slow = socket.create_server(("127.0.0.1", 0), backlog=0)  # the accept queue holds one connection
    slow.settimeout(10)
    b, pid = start(balancer, port, [probe.port, slow.getsockname()[1]])
    probe.start(port)
    accepted = [slow.accept()[0]]  # the probe's output
    filler = socket.create_connection(slow.getsockname())  # the accept queue is full now
    check = connect(port)
    wait_until(lambda: b.status(HANDLER)["connections"] == 2, "the health check's session", b)
    with stopped(pid):
        check.close()
        slow.accept()[0].close()  # the filler: room for the output's next SYN
        filler.close()
        accepted.append(slow.accept()[0])  # the health check's output completed its handshake
    wait_until(lambda: b.status(HANDLER)["connections"] == 1, "the health check's session gone", b)
    unharmed(b, pid, probe)
    for conn in accepted:
        conn.close()
    slow.close()


def test_export_target_evicted_while_its_connection_completes(balancer, tmp_path):
    """Recording: the export of the oldest dump waits for a slow insert process (full accept queue). The
    handler is stopped; the exporter completes another dump, which pushes the spool over SPOOL_BYTES and
    evicts the dump in transfer; meanwhile the insert process's handshake completes. On SIGCONT the
    exporter's data and the export connection's "connected" are one batch, the data first."""
    port = free_port()
    insert = socket.create_server(("127.0.0.1", 0), backlog=0)
    insert.settimeout(10)
    filler = socket.create_connection(insert.getsockname())  # the accept queue is full
    stream = make_stream(30, 10)  # a template, then 10 messages (100 flows) per dump
    dump = len(stream[0]) + sum(map(len, stream[1:11]))
    b = balancer(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
                 f"IPFIX_FULLFLOW_DUMP_DIR[0]={tmp_path}/dump/\nIPFIX_FULLFLOW_FW_MAX_QUEUE_SIZE[0]=100\n"
                 f"IPFIX_FULLFLOW_SPOOL_BYTES[0]={dump * 3 // 2}\n"
                 f"IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]=127.0.0.1/{insert.getsockname()[1]}/tcp\n")
    b.wait_ready()
    pid = b.handler_pid(HANDLER)
    exporter = connect(port)
    exporter.sendall(b"".join(stream[:11]))
    b.wait_status(HANDLER, lambda s: s["recorder"]["exports"][0]["state"] == "connecting")
    with stopped(pid):
        exporter.sendall(b"".join(stream[11:21]))  # the second dump: the first is evicted
        insert.accept()[0].close()  # the filler: room for the export connection's next SYN
        filler.close()
        accepted = insert.accept()[0]  # its handshake completed
    st = b.wait_status(HANDLER, lambda s: s["recorder"]["evicted_files"] == 1)
    exporter.sendall(b"".join(stream[21:]))
    st = b.wait_status(HANDLER, lambda s: s["msgs_in"] == len(stream), timeout=15)
    assert st["pid"] == pid and Process(pid).alive and not events(b, "handler_crashed")
    for sock in (exporter, accepted, insert):
        sock.close()


def test_health_check_flood_while_stopped(probe, balancer):
    """50 connect+close while the handler is stopped: accepted, outputs opened and closed in a burst."""
    port = free_port()
    b, pid = start(balancer, port, [probe.port])
    probe.start(port)
    with stopped(pid):
        health_checks(port, 50)
    wait_until(lambda: b.status(HANDLER)["connections_total"] == 51, "51 sessions seen", b)
    unharmed(b, pid, probe)


# -- 3. idle and trickling connections ------------------------------------------------------------------
def test_short_sessions_return_their_memory(probe, balancer):
    port = free_port()
    b, pid = start(balancer, port, [probe.port])
    probe.start(port)
    proc = Process(pid)
    short_sessions(port, 200)  # warm up: the allocator's pools, the status document at its size
    wait_until(lambda: b.status(HANDLER)["connections"] == 1, "sessions gone", b)
    before = proc.sample()
    short_sessions(port, 1000)
    wait_until(lambda: b.status(HANDLER)["connections"] == 1, "sessions gone", b)
    wait_until(lambda: proc.sample() < before + 20 * 2**20, "RSS back within 20 MB", b, timeout=10,
               diag=lambda: f"RSS {proc.rss >> 20} MB, was {before >> 20} MB")
    unharmed(b, pid, probe)


def test_idle_connections_are_closed_and_cost_no_chunk(probe, balancer):
    port = free_port()
    b, pid = start(balancer, port, [probe.port], extra="IPFIX_FULLFLOW_IDLE_TIMEOUT[0]=3\n"
                                                       "IPFIX_FULLFLOW_MAX_SESSIONS_PER_SOURCE[0]=1000\n")
    probe.start(port)
    proc = Process(pid)
    before = proc.sample()
    idle = idle_connections(port, 200)
    for sock in idle[:100]:  # half of them began a message: the part read is kept, the chunk is not
        sock.sendall(make_stream(1, 1)[0][:10])
    wait_until(lambda: b.status(HANDLER)["connections"] == 201, "201 sessions", b)
    assert proc.sample() - before < 15 * 2**20, "200 idle connections hold no 256 KiB chunk each"
    st = b.wait_status(HANDLER, lambda s: s["limited"].get("idle_timeout") == 200, timeout=15)
    assert st["connections"] == 1, "the probe, which sends, is not idle"
    for sock in idle:
        sock.settimeout(5)
        assert sock.recv(1) == b""
        sock.close()
    lines = events(b, "exporter_limited", reason="idle_timeout")
    assert len(lines) == 1, "logged once per source per minute"
    unharmed(b, pid, probe)


def test_at_the_caps_silent_sessions_make_room_and_active_ones_are_never_evicted(probe, balancer):
    port = free_port()
    b, pid = start(balancer, port, [probe.port], extra="IPFIX_FULLFLOW_MAX_SESSIONS[0]=12\n"
                                                       "IPFIX_FULLFLOW_MAX_SESSIONS_PER_SOURCE[0]=5\n")
    probe.start(port)  # one session from 127.0.0.1 that delivers
    silent = idle_connections(port, 4)  # 127.0.0.1 at its cap
    time.sleep(SILENT_GRACE + 0.2)
    later = idle_connections(port, 4)  # each closes the oldest silent one of 127.0.0.1, never the probe
    st = b.wait_status(HANDLER, lambda s: s["limited"].get("evicted_silent") == 4)
    for sock in silent:
        sock.settimeout(5)
        assert sock.recv(1) == b""
    # 127.0.0.2's sessions all deliver: none can be evicted, the sixth is refused at accept
    message = b"".join(make_stream(1, 1, odid=9))
    active = idle_connections(port, 5, source="127.0.0.2")
    for sock in active:
        sock.sendall(message)
    b.wait_status(HANDLER, lambda s: s["msgs_in"] >= 10 + 5)
    refused = connect(port, source="127.0.0.2")
    st = b.wait_status(HANDLER, lambda s: s["limited"].get("max_sessions_per_source") == 1)
    assert st["limited"] == {"evicted_silent": 4, "max_sessions_per_source": 1}
    assert st["connections"] == 1 + 4 + 5
    assert len(events(b, "exporter_limited")) == 2, "once per source and reason"
    for sock in silent + later + active + [refused]:
        sock.close()
    unharmed(b, pid, probe)


def test_udp_sessions_over_the_cap_never_take_the_steady_exporters(balancer):
    port = free_port("udp")
    with UdpSink() as sink:
        b, _ = start(balancer, port, [sink.port], **UDP, extra="IPFIX_FULLFLOW_MAX_SESSIONS[0]=5\n")
        steady = make_stream(30, 1, odid=1)
        src = udp_send(port, steady[:2])
        for i in range(10):  # 10 more source ports; the steady exporter keeps sending in between
            udp_source_ports(port, 1)
            udp_send(port, steady[2 + i:3 + i], src_port=src)
        udp_send(port, steady[12:], src_port=src, delay=0.001)
        # 4 new ports fit; the other 6 deliver too lately to be evicted: their 2 datagrams each are dropped
        st = b.wait_status(HANDLER, lambda s: s["msgs_in"] == len(steady) + 4 * 2 and s["limited"])
        assert st["limited"] == {"max_sessions": 12}, "never the steady exporter"
        assert st["connections"] == 5
        wait_until(lambda: sum(d in steady for d in sink.datagrams) == len(steady), "the steady exporter", b)


def test_trickling_connections_from_ten_addresses_cannot_lock_the_exporter_out(probe, balancer):
    """Issue 20: a byte a second kept a slot, and at MAX_SESSIONS the real exporter was refused (100 of 100
    records lost). Now bytes that never make a message keep no slot: at the cap the oldest silent session
    makes room, and each is closed FIRST_MESSAGE_SECONDS after it opened."""
    port = free_port()
    b, pid = start(balancer, port, [probe.port], extra="IPFIX_FULLFLOW_MAX_SESSIONS[0]=100\n")
    tricklers = [s for i in range(10) for s in idle_connections(port, 10, source=f"127.0.0.{10 + i}")]
    b.wait_status(HANDLER, lambda s: s["connections"] == 100)
    sender = threading.Thread(target=trickle, args=(tricklers, 30, 0.5))  # 15 s, a byte per 0.5 s each
    sender.start()
    time.sleep(SILENT_GRACE + 0.5)
    probe.start(port)
    st = b.wait_status(HANDLER, lambda s: s["limited"].get("first_message_deadline", 0) >= 99,
                       timeout=FIRST_MESSAGE_SECONDS + 10)
    assert st["limited"]["evicted_silent"] == 1 and st["connections"] == 1
    sender.join()
    for sock in tricklers:
        sock.close()
    unharmed(b, pid, probe)


def test_udp_source_port_flood_opens_few_connections_to_collectors(balancer):
    """Issue 20: 3,000 datagrams from new source ports made 5,824 connections to two collectors. Now one
    source has at most MAX_SESSIONS_PER_SOURCE sessions and new ones come at most UDP_NEW_PER_SECOND."""
    port = free_port("udp")
    with TcpSink() as a, TcpSink() as c:
        b, pid = start(balancer, port, [a.port, c.port], proto="udp")
        steady = make_stream(20, 1, odid=1)
        src = udp_send(port, steady[:10], delay=0.001)
        udp_source_ports(port, 3000)
        udp_send(port, steady[10:], src_port=src, delay=0.001)
        # every datagram either delivered or counted as dropped by a limit
        st = b.wait_status(HANDLER, lambda s: s["msgs_in"] + sum(s["limited"].values()) == len(steady) + 2 * 3000)
        assert st["connections_total"] <= 1 + 100 and st["connections"] <= 1 + 100
        assert a.connection_count + c.connection_count <= 2 * (1 + 100)
        assert set(st["limited"]) <= {"new_session_rate", "max_sessions_per_source"}
        wait_until(lambda: sum(1 for m in a.messages() + c.messages() if m in steady) >= len(steady) - 1,
                   "the steady exporter's messages", b)
        assert b.handler_pid(HANDLER) == pid


def test_udp_junk_from_new_source_ports_opens_no_session(balancer):
    """A new UDP session (and its connections to the collectors) only for a valid message: a set that
    does not parse is counted as malformed and opens nothing."""
    port = free_port("udp")
    junk = struct.pack("!HHIII", 10, 20, 0, 0, 1) + struct.pack("!HH", 256, 2)  # a set length of 2
    with TcpSink() as sink:
        b, pid = start(balancer, port, [sink.port], proto="udp")
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(junk, ("127.0.0.1", port))
        st = b.wait_status(HANDLER, lambda s: s["malformed_by_reason"].get("set_length") == 50)
        assert st["connections_total"] == 0 and st["msgs_in"] == 0
        time.sleep(0.5)
        assert sink.connection_count == 0 and b.handler_pid(HANDLER) == pid


def test_junk_from_thousands_of_sources_writes_a_bounded_number_of_lines(balancer):
    """Issue 20: the throttle was per source only: junk from 2,000 sources wrote 4,000 lines over UDP and
    6,000 over TCP. Now each event writes at most Throttle.PER_EVENT lines a minute, all sources together."""
    udp_port, tcp_port = free_port("udp"), free_port()
    with UdpSink() as sink:
        udp, _ = start(balancer, udp_port, [sink.port], **UDP)
        tcp, _ = start(balancer, tcp_port, [sink.port], sub_proto="udp")
        sources = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(2000)]
        for host in sources:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, 0))
                s.sendto(b"junk", ("127.0.0.1", udp_port))
        for host in sources[:500]:
            with contextlib.suppress(OSError), connect(tcp_port, source=host) as s:
                s.sendall(b"junk" * 5)
        udp.wait_status(HANDLER, lambda s: s["malformed"] == 2000)
        tcp.wait_status(HANDLER, lambda s: s["malformed"] == 500 and s["connections"] == 0)
        for b in (udp, tcp):
            by_event = collections.Counter(line["event"] for line in b.logs() if line.get("stream") == "FULLFLOW")
            noisy = {e: n for e, n in by_event.items() if n > Throttle.PER_EVENT}
            assert not noisy, noisy
        assert len(events(udp, "malformed_ipfix")) == Throttle.PER_EVENT


# -- 4. descriptor exhaustion -----------------------------------------------------------------------------
NOFILE = 64  # descriptors: a handler at the limit after some 27 TCP sessions with one subreceiver


def test_accept_pauses_at_the_descriptor_limit(tmp_path, probe):
    port = free_port()
    with LimitedBalancer(tmp_path, env(port, [probe.port]), nofile=NOFILE) as b:
        b.wait_ready()
        pid = b.handler_pid(HANDLER)
        probe.start(port)
        proc = Process(pid)
        flood = idle_connections(port, 60)  # 2 descriptors per session: far over 64
        b.wait_log("accept_paused")
        cpu = proc.cpu
        time.sleep(2)
        assert proc.cpu - cpu < 0.5, "the loop does not spin on a listener it cannot accept from"
        assert len(events(b, "accept_paused")) == 1 and len(events(b, "accept_failed")) <= 1
        for sock in flood:
            sock.close()
        b.wait_log("accept_resumed")
        b.wait_status(HANDLER, lambda s: s["connections"] == 1 and s["limited"]["fd_limit"] == 1)
        later = connect(port)  # accepting again
        wait_until(lambda: b.status(HANDLER)["connections"] == 2, "a new session after the episode", b)
        later.close()
        unharmed(b, pid, probe)


UDP = {"proto": "udp", "sub_proto": "udp"}  # a UDP receiver forwarding to UDP collectors


def test_udp_sources_at_the_descriptor_limit(tmp_path):
    """Each UDP source port is a session with an output socket per subreceiver; at the limit socket()
    fails: those outputs go down and retry, the earlier exporter keeps flowing, the handler lives."""
    port = free_port("udp")
    with UdpSink() as sink:
        with LimitedBalancer(tmp_path, env(port, [sink.port], **UDP), nofile=NOFILE) as b:
            b.wait_ready()
            pid = b.handler_pid(HANDLER)
            early = make_stream(40, 1, odid=77)
            src = udp_send(port, early[:20], delay=0.001)
            assert sink.wait_messages(20)
            udp_source_ports(port, 200)  # one source: its cap (100 sessions) and the new-session rate hold it
            b.wait_status(HANDLER, lambda s: s["connections_total"] >= 100, timeout=15)
            udp_send(port, early[20:], src_port=src, delay=0.001)
            wait_until(lambda: sum(1 for d in sink.datagrams if d in early) == len(early), "the early exporter", b)
            assert b.handler_pid(HANDLER) == pid and Process(pid).alive
            assert len(events(b, "subreceiver_down")) <= 2
            b.kill()  # a stop would wait DRAIN_TIMEOUT for outputs that cannot open


# -- 5. who may export --------------------------------------------------------------------------------------
def test_an_ipv4_mapped_allow_range_admits_ipv4_exporters(probe, balancer):
    port = free_port()
    b, pid = start(balancer, port, [probe.port], extra="IPFIX_FULLFLOW_ALLOW[0]=::ffff:127.0.0.0/104\n")
    probe.start(port)  # from 127.0.0.1: inside the mapped range (it used to be refused)
    unharmed(b, pid, probe)
    assert not b.status(HANDLER)["limited"]


def test_allowlist_refuses_tcp_at_accept(probe, balancer):
    port = free_port()
    b, pid = start(balancer, port, [probe.port], extra="IPFIX_FULLFLOW_ALLOW[0]=127.0.0.1, 10.0.0.0/8\n")
    probe.start(port)
    for _ in range(20):
        sock = connect(port, source="127.0.0.9")
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        sock.close()
    st = b.wait_status(HANDLER, lambda s: s["limited"].get("not_allowed") == 20)
    assert st["connections_total"] == 1, "a refused connection never becomes a session"
    lines = events(b, "exporter_limited", reason="not_allowed")
    assert len(lines) == 1 and lines[0]["peer"].startswith("127.0.0.9:")
    b.write_config(env(port, [probe.port], extra="IPFIX_FULLFLOW_ALLOW[0]=127.0.0.0/24\n"))
    b.reload()  # applied in place: the sessions stay, the new list decides the next connections
    b.wait_log("reconfigured")
    late = connect(port, source="127.0.0.9")
    b.wait_status(HANDLER, lambda s: s["connections"] == 2)
    late.close()
    unharmed(b, pid, probe)


def test_allowlist_drops_datagrams_of_others(balancer):
    port = free_port("udp")
    with UdpSink() as sink:
        b, _ = start(balancer, port, [sink.port], **UDP, extra="IPFIX_FULLFLOW_ALLOW[0]=127.0.0.2\n")
        good, bad = make_stream(30, 1, odid=1), make_stream(30, 1, odid=2)
        udp_send(port, bad, delay=0.001)
        _send_from("127.0.0.2", port, good)
        assert sink.wait_messages(len(good))
        st = b.wait_status(HANDLER, lambda s: s["limited"].get("not_allowed") == len(bad))
        assert st["connections_total"] == 1 and st["msgs_in"] == len(good)
        assert sorted(sink.datagrams) == sorted(good)


def _send_from(source: str, port: int, messages) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for msg in messages:
            s.sendto(msg, ("127.0.0.1", port))
            time.sleep(0.001)


# -- 6. one memory budget for the whole handler ---------------------------------------------------------------
def test_memory_budget_bounds_every_queue_together(probe, balancer):
    """All mode, a second collector that never comes up: its queues (one per session) fill up to the
    handler-wide MEMORY_BYTES, not QUEUE_BYTES each; the oldest of the largest go, counted by reason."""
    port = free_port()
    dead = free_port()
    b, pid = start(balancer, port, [probe.port, dead], extra="IPFIX_FULLFLOW_MEMORY_BYTES[0]=2097152\n")
    probe.start(port)
    for _ in range(3):
        short_burst(port, 4_800_000)  # 600 messages of 8000 bytes
    st = b.wait_status(HANDLER, lambda s: s["msgs_in"] >= 3 * 601)
    assert st["queued_bytes"] <= st["memory_bytes"] == 2097152
    down = next(s for s in st["subreceivers"] if s["endpoint"].endswith(f"/{dead}/tcp"))
    assert down["drops_by_reason"]["memory_budget"] >= 3 * 601 - 2097152 // 8000
    unharmed(b, pid, probe)
    b.kill()  # a stop would wait DRAIN_TIMEOUT for the collector that never comes


# -- 8. log floods ----------------------------------------------------------------------------------------------
def test_junk_datagram_flood_writes_one_line(balancer):
    port = free_port("udp")
    with UdpSink() as sink:
        b, pid = start(balancer, port, [sink.port], **UDP)
        good = make_stream(200, 1)
        src = udp_send(port, good[:1])
        for i in range(1, len(good), 20):  # paced: the kernel's receive buffer must not be what drops
            junk_datagrams(port, 200)
            udp_send(port, good[i:i + 20], src_port=src)
            time.sleep(0.01)
        st = b.wait_status(HANDLER, lambda s: s["malformed"] >= 1000 and s["msgs_in"] >= len(good) * 9 // 10)
        assert sink.wait_messages(st["msgs_in"]), "the legitimate stream flows"
        assert len(events(b, "malformed_ipfix")) == 1, f"{st['malformed']} junk datagrams, one line"
        assert b.handler_pid(HANDLER) == pid


def test_connection_flood_writes_few_lines(probe, balancer):
    port = free_port()
    b, pid = start(balancer, port, [probe.port], extra="IPFIX_FULLFLOW_MAX_SESSIONS_PER_SOURCE[0]=1000\n")
    probe.start(port)
    health_checks(port, 300)
    wait_until(lambda: b.status(HANDLER)["connections_total"] == 301, "301 sessions", b)
    assert len(events(b, "exporter_connected")) <= 2
    assert len(events(b, "exporter_disconnected")) <= 2
    unharmed(b, pid, probe)
