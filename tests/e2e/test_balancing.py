"""End to end (issue 2): the real ``ipfix-balancer run`` supervisor, real handler processes, loopback sockets.

Exporters are scapy-built IPFIX streams (ipfixkit.make_stream: one template message, then data messages whose
records carry unique serials); subreceivers are ipfixkit sinks that record every byte per connection/datagram.
Outcomes are checked byte for byte: RoundRobin may only change the header sequence number (bytes 8..12, renumbered
per output connection), All forwards every message unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import types
from collections import Counter

import psutil
import pytest

from ipfixkit import (
    TcpExporter,
    wait_until,
    TcpSink,
    UdpSink,
    extract_serials,
    free_port,
    header,
    make_stream,
    run_cli,
    set_ids,
    split_messages,
    stream_serials,
    tcp_send,
    udp_send,
)

HANDLER = "fullflow[0]"
READY_TIMEOUT = 30
TIMEOUT = 20   # generous: 2 cores, other work running


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


@pytest.fixture
def sinks():
    """Factory ``sinks(kind="tcp", **kw)`` -> a TcpSink/UdpSink closed at teardown.

    Request it *before* ``balancer`` so the balancer is stopped first at teardown.
    """
    with contextlib.ExitStack() as stack:
        def make(kind: str = "tcp", **kw):
            return stack.enter_context((TcpSink if kind == "tcp" else UdpSink)(**kw))
        yield make


def config(port: int, mode: str, subs, *, port_type: str = "tcp", sub_proto: str = "tcp", extra=()) -> str:
    lines = [
        f"IPFIX_FULLFLOW_PORT_TYPE[0]={port_type}",
        f"IPFIX_FULLFLOW_PORT[0]={port}",
        f"IPFIX_FULLFLOW_BALANCER[0]={mode}",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]=" + ",".join(f"127.0.0.1/{s.port}" for s in subs),
        f"IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]={sub_proto}",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def start(balancer, port, mode, subs, **kw):
    b = balancer(config(port, mode, subs, **kw))
    b.wait_ready(READY_TIMEOUT)
    return b


def wait_total(subs, n: int, timeout: float = TIMEOUT, b=None) -> None:
    """Wait until the sinks together hold at least ``n`` complete messages."""
    wait_until(lambda: sum(s.message_count for s in subs) >= n,
               f"{n} messages at the sinks (have {[s.message_count for s in subs]})", b, timeout=timeout)


def settle(subs, quiet: float = 0.3) -> None:
    """Nothing more arrives (catches extra, duplicated messages after the expected count was reached)."""
    for s in subs:
        assert s.wait_quiet(quiet, timeout=TIMEOUT)


def no_seq(msg: bytes) -> bytes:
    """A message without its sequence number field (bytes 8..12), the only bytes RoundRobin may change."""
    return msg[:8] + msg[12:]


def seq_of(msg: bytes) -> int:
    return header(msg)[3]


def by_endpoint(status: dict) -> dict[str, dict]:
    return {s["endpoint"]: s for s in status["subreceivers"]}


def ep(sink) -> str:
    return f"127.0.0.1/{sink.port}/{sink.kind}"


def serial_counts(messages) -> Counter:
    return Counter(extract_serials(messages))


def assert_round_robin_shares(subs, template: bytes, data: list[bytes], rpm: int) -> None:
    """Each sink: the template first, then exactly every len(subs)-th data message, in order, byte-identical
    except the sequence number, which counts this connection's data records (gap-free from 0)."""
    k = len(subs)
    index = {no_seq(m): i for i, m in enumerate(data)}
    assert len(index) == len(data)
    residues = []
    for s in subs:
        if s.kind == "tcp":
            assert s.connection_count == 1, f"{ep(s)}: {s.connection_count} connections for one exporter session"
        got = s.messages()
        assert got[0] == template, f"{ep(s)}: first message is not the exporter's template message"
        assert all(set_ids(m) == [256] for m in got[1:]), f"{ep(s)}: extra non-data messages"
        positions = [index.get(no_seq(m)) for m in got[1:]]
        assert None not in positions, f"{ep(s)}: a message differs from every sent one beyond the sequence number"
        assert len(positions) == len(data) // k, f"{ep(s)}: {len(positions)} data messages, expected {len(data) // k}"
        r = positions[0]
        assert positions == list(range(r, len(data), k)), f"{ep(s)}: not every {k}th message in order: {positions}"
        residues.append(r)
        assert [seq_of(m) for m in got] == [0] + [i * rpm for i in range(len(got) - 1)]
    assert sorted(residues) == list(range(k))


# --------------------------------------------------------------------------- #
# RoundRobin / All, TCP and UDP
# --------------------------------------------------------------------------- #


def test_round_robin_tcp_each_sink_gets_its_share_in_order(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, "RoundRobin", subs)
    n, rpm = 60, 5
    template, *data = make_stream(n, rpm)
    with TcpExporter(port) as ex:
        ex.send([template])
        # the template goes to every sink; once it arrived, every output connection is up
        wait_total(subs, 3, b=b)
        assert all(s.message_count == 1 for s in subs)
        ex.send(data, chunking="random", seed=7)
    wait_total(subs, 3 + n, b=b)
    settle(subs)
    assert_round_robin_shares(subs, template, data, rpm)
    assert sum((serial_counts(s.messages()) for s in subs), Counter()) == Counter(stream_serials(n, rpm))


def test_all_tcp_every_sink_gets_every_message_byte_identical(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, "All", subs)
    msgs = make_stream(80, 4, odid=3, first_seq=1000)   # All keeps the exporter's sequence numbers
    tcp_send(port, msgs, chunking=997)                   # exporter sends at once, cut across messages
    wait_total(subs, 3 * len(msgs), b=b)
    settle(subs)
    for s in subs:
        assert s.connection_count == 1
        assert s.messages() == msgs, f"{ep(s)} did not get the exact stream"
        assert not s.errors


@pytest.mark.parametrize("mode", ["RoundRobin", "All"])
def test_udp_in_udp_out(sinks, balancer, mode):
    subs = [sinks("udp") for _ in range(3)]
    port = free_port("udp")
    b = start(balancer, port, mode, subs, port_type="udp", sub_proto="udp")
    n, rpm = 60, 5
    msgs = make_stream(n, rpm)
    udp_send(port, msgs, delay=0.002, batch=10)
    expected = 3 * len(msgs) if mode == "All" else 3 + n
    wait_total(subs, expected, b=b)
    settle(subs)
    for s in subs:
        # one output session (one source port) mirrors the one exporter session; one message per datagram
        assert len(set(s.peers)) == 1
        assert all(split_messages(d) == [d] for d in s.datagrams)
    if mode == "All":
        for s in subs:
            assert s.datagrams == msgs
    else:
        assert_round_robin_shares(subs, msgs[0], msgs[1:], rpm)


def test_tcp_in_udp_out_one_message_per_datagram(sinks, balancer):
    subs = [sinks("udp") for _ in range(2)]
    port = free_port()
    b = start(balancer, port, "All", subs, sub_proto="udp")
    msgs = make_stream(50, target_size=1400)
    tcp_send(port, msgs, chunking="random", seed=3)   # TCP reads cut through messages
    wait_total(subs, 2 * len(msgs), b=b)
    settle(subs)
    for s in subs:
        assert s.datagrams == msgs   # every datagram is exactly one whole message, in order, unchanged


def test_two_exporters_at_once_each_mirrored_on_its_own_connection(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, "RoundRobin", subs)
    n, rpm = 30, 5
    streams = {"a": make_stream(n, rpm, odid=1, first_serial=0),
               "b": make_stream(n, rpm, odid=1, first_serial=1_000_000)}
    with TcpExporter(port) as ea, TcpExporter(port) as eb:
        ea.send(streams["a"][:1])
        eb.send(streams["b"][:1])
        wait_total(subs, 6, b=b)
        for i in range(n):   # interleaved, message by message
            ea.send([streams["a"][1 + i]])
            eb.send([streams["b"][1 + i]])
    wait_total(subs, 6 + 2 * n, b=b)
    settle(subs)
    owner = {}
    for name, stream in streams.items():
        for serial in extract_serials(stream):
            owner[serial] = name
    got = {"a": Counter(), "b": Counter()}
    for s in subs:
        assert s.connection_count == 2, f"{ep(s)}: {s.connection_count} connections for two exporter sessions"
        seen = set()
        for conn in s.connections:
            msgs = split_messages(conn)
            assert set_ids(msgs[0]) == [2]
            serials = extract_serials(msgs)
            names = {owner[x] for x in serials}
            assert len(names) == 1, f"{ep(s)}: one output connection carries records of both exporters"
            name = names.pop()
            seen.add(name)
            got[name].update(serials)
            assert len(msgs) == 1 + n // 3   # each session round-robins on its own
        assert seen == {"a", "b"}
    for name, stream in streams.items():
        assert got[name] == Counter(extract_serials(stream)), f"exporter {name}: records lost or duplicated"


# --------------------------------------------------------------------------- #
# failures
# --------------------------------------------------------------------------- #


def test_subreceiver_down_at_start_gets_traffic_after_it_comes_up(sinks, balancer):
    s0, s1 = sinks(), sinks()
    late = sinks(port=free_port(), up=False)
    subs = [s0, s1, late]
    port = free_port()
    b = start(balancer, port, "RoundRobin", subs)
    rpm = 5
    template, *batch1 = make_stream(30, rpm)
    batch2 = make_stream(30, rpm, first_serial=10_000, first_seq=150, with_template=False)
    with TcpExporter(port) as ex:
        ex.send([template])
        wait_total([s0, s1], 2, b=b)
        b.wait_status(HANDLER, lambda st: by_endpoint(st)[ep(late)]["state"] == "down", TIMEOUT)
        ex.send(batch1)
        # meanwhile nothing is lost: the two live sinks take all of batch 1 between them
        wait_until(lambda: sum((serial_counts(s.messages()) for s in (s0, s1)), Counter())
                   == Counter(extract_serials(batch1)), what="batch 1 at the live sinks", b=b)
        assert late.connection_count == 0
        late.up()
        assert late.wait_connections(1, timeout=TIMEOUT), b.log_tail()
        # the late sink learns the template before any data
        assert late.wait_messages(1, timeout=TIMEOUT)
        ex.send(batch2)
    wait_until(lambda: sum((serial_counts(s.messages()) for s in subs), Counter())
               == Counter(extract_serials(batch1 + batch2)), what="all records, exactly once", b=b)
    settle(subs)
    late_msgs = late.messages()
    assert set_ids(late_msgs[0]) == [2]
    late_serials = extract_serials(late_msgs)
    assert len(late_serials) == len(batch2) // 3 * rpm, "the late sink does not take its RoundRobin share"
    assert set(late_serials) <= set(extract_serials(batch2))
    # all three together: exactly once
    assert sum((serial_counts(s.messages()) for s in subs), Counter()) == Counter(extract_serials(batch1 + batch2))
    down = [line for line in b.logs() if line.get("event") == "subreceiver_down"
            and line.get("subreceiver") == ep(late)]
    assert 1 <= len(down) <= 3, f"subreceiver_down logged {len(down)} times: per state change, not per attempt"
    b.wait_log(lambda line: line.get("event") == "subreceiver_up" and line.get("subreceiver") == ep(late))


def test_malformed_stream_closes_only_that_connection(sinks, balancer):
    sink = sinks()
    port = free_port()
    b = start(balancer, port, "All", [sink])
    good = make_stream(20, 3, odid=2, first_serial=1_000_000)
    bad_stream = make_stream(10, 3, odid=1)
    with TcpExporter(port) as bad, TcpExporter(port) as ok:
        bad.send(bad_stream[:6])
        ok.send(good[:11])
        wait_total([sink], 17, b=b)
        broken = b"\x00\x09" + bad_stream[6][2:]   # version 9: not IPFIX
        bad.send([broken, *bad_stream[7:]])
        line = b.wait_log("malformed_ipfix", TIMEOUT)
        assert line["peer"] == f"127.0.0.1:{bad.local_port}"
        assert line["reason"] == "bad_version"
        # the balancer closed the malformed connection
        bad.sock.settimeout(TIMEOUT)
        try:
            assert bad.sock.recv(1) == b""
        except ConnectionResetError:
            pass
        # ... and only that one: the other exporter keeps flowing on the same listener
        ok.send(good[11:])
        wait_total([sink], 6 + len(good), b=b)
        st = b.wait_status(HANDLER, lambda st: st["malformed"] == 1 and st["connections"] == 1, TIMEOUT)
        assert st["malformed_by_reason"] == {"bad_version": 1}
        assert st["connections_total"] == 2
    settle([sink])
    conns = [split_messages(c) for c in sink.connections]
    assert len(conns) == 2
    by_odid = {header(c[0])[4]: c for c in conns}
    assert by_odid[2] == good
    assert by_odid[1] == bad_stream[:6], "messages before the bad header are forwarded, nothing after it"


def test_udp_datagram_with_wrong_length_is_counted_and_dropped(sinks, balancer):
    sink = sinks()
    port = free_port("udp")
    b = start(balancer, port, "All", [sink], port_type="udp")
    msgs = make_stream(10, 3)
    too_long = msgs[3] + b"\x00" * 8       # header length shorter than the datagram
    too_short = msgs[4][:-5]               # header length longer than the datagram
    src = udp_send(port, [*msgs[:6], too_long, too_short, *msgs[6:]], delay=0.002)
    wait_total([sink], len(msgs), b=b)
    st = b.wait_status(HANDLER, lambda st: st["malformed"] == 2, TIMEOUT)
    assert st["malformed_by_reason"] == {"length_mismatch": 2}
    settle([sink])
    assert sink.connection_count == 1          # the session survived the bad datagrams
    assert sink.messages() == msgs             # the bad ones were dropped, the others flowed unchanged
    lines = [line for line in b.logs() if line.get("event") == "malformed_ipfix"]
    # one line per source per minute (logs.Throttle): the second bad datagram is counted, not logged
    assert len(lines) == 1 and lines[0]["peer"] == f"127.0.0.1:{src}"


def test_handler_killed_is_restarted_and_traffic_flows_again(sinks, balancer):
    subs = [sinks(), sinks()]
    port = free_port()
    b = start(balancer, port, "RoundRobin", subs)
    first = make_stream(10, 3)
    tcp_send(port, first)
    wait_total(subs, 2 + 10, b=b)
    old = b.handler_pid(HANDLER)
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: next((h["pid"] for h in (b.supervisor() or {}).get("handlers", [])
                                   if h["name"] == HANDLER and h["pid"] not in (None, old)), None),
                     what="a new handler pid in supervisor.json", b=b)
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    died = b.wait_log("handler_died", TIMEOUT)
    assert died["handler"] == HANDLER and died["exit_code"] == -signal.SIGKILL
    b.wait_ready(READY_TIMEOUT)
    assert b.status(HANDLER)["pid"] == new
    assert next(h for h in b.supervisor()["handlers"] if h["name"] == HANDLER)["restarts"] == 1
    second = make_stream(12, 3, first_serial=5_000)
    tcp_send(port, second)
    wait_total(subs, 12 + 2 + 12, b=b)
    settle(subs)
    after = sum((serial_counts(split_messages(c)) for s in subs for c in s.connections[1:]), Counter())
    assert after == Counter(extract_serials(second))
    assert all(s.connection_count == 2 for s in subs)


# --------------------------------------------------------------------------- #
# operator commands and lifecycle
# --------------------------------------------------------------------------- #


def test_status_command_shows_counters_and_exit_code(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port()
    b = start(balancer, port, "RoundRobin", subs)
    n, rpm = 30, 4
    template, *data = make_stream(n, rpm)
    with TcpExporter(port) as ex:
        ex.send([template])
        wait_total(subs, 3, b=b)
        ex.send(data)
    wait_total(subs, 3 + n, b=b)
    settle(subs)
    per_sink = 1 + n // 3
    b.wait_status(HANDLER, lambda st: st["msgs_in"] == n + 1
                  and all(x["msgs_out"] == per_sink for x in st["subreceivers"]), TIMEOUT)

    res = run_cli("status", "--run-dir", b.run_dir, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["running"] is True and doc["supervisor_pid"] == b.pid
    (h,) = doc["handlers"]
    assert h["name"] == HANDLER and h["alive"] is True and h["mode"] == "RoundRobin"
    assert h["msgs_in"] == n + 1
    assert h["bytes_in"] == len(template) + sum(map(len, data))
    assert h["drops"] == 0 and h["malformed"] == 0
    subs_doc = by_endpoint(h)
    assert set(subs_doc) == {ep(s) for s in subs}
    for s in subs:
        assert subs_doc[ep(s)]["msgs_out"] == per_sink == s.message_count
        assert subs_doc[ep(s)]["bytes_out"] == s.bytes_received
        assert subs_doc[ep(s)]["drops"] == 0

    res = run_cli("status", "--run-dir", b.run_dir)
    assert res.returncode == 0, res.stderr
    assert f"running, pid {b.pid}" in res.stdout
    assert HANDLER in res.stdout and f"tcp/{port}" in res.stdout and "RoundRobin" in res.stdout
    assert f" {n + 1} " in res.stdout.split(HANDLER, 1)[1].splitlines()[0]   # MSGS IN column
    for s in subs:
        line = next(x for x in res.stdout.splitlines() if ep(s) in x)
        assert f"msgs_out={per_sink}" in line and f"bytes_out={s.bytes_received}" in line and "drops=0" in line

    assert b.stop() == 0
    res = run_cli("status", "--run-dir", b.run_dir)
    assert res.returncode == 1
    assert "NOT RUNNING" in res.stdout


def test_bad_config_check_config_lists_all_problems_and_run_refuses(tmp_path, balancer):
    sink_port = free_port()
    bad = "\n".join([
        "IPFIX_FULLFLOW_PORT[0]=70000",                   # bad port
        "IPFIX_FULLFLOW_BALANCER[0]=Sideways",            # bad mode
        f"IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink_port}",
        "IPFIX_FULLFLOW_FROBNICATE[0]=1",                 # unknown key
        f"IPFIX_CLICKSTREAM_PORT[0]={free_port()}",
        "IPFIX_CLICKSTREAM_BALANCER[0]=All",              # All without subreceivers
    ]) + "\n"
    path = tmp_path / "bad.env"
    path.write_text(bad)
    res = run_cli("check-config", "--config", path)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    for key, value in [("IPFIX_FULLFLOW_PORT[0]", "70000"), ("IPFIX_FULLFLOW_BALANCER[0]", "Sideways"),
                       ("IPFIX_FULLFLOW_FROBNICATE", None), ("IPFIX_CLICKSTREAM_BALANCER_SUB", None)]:
        lines = [x for x in out.splitlines() if key in x]
        assert lines, f"check-config does not report {key}:\n{out}"
        if value:
            assert any(value in x for x in lines)
    assert "4 problem" in out
    # each key-level problem says where the key is written
    assert "  - line 1: IPFIX_FULLFLOW_PORT[0]='70000'" in res.stderr
    assert "  - line 4: IPFIX_FULLFLOW_FROBNICATE[0]='1': unknown key" in res.stderr

    b = balancer(bad)
    assert b.wait_exit(READY_TIMEOUT) == 2
    problems = [line for line in b.logs() if line.get("event") == "config_invalid"]
    assert len(problems) == 4
    assert not any(line.get("event") == "handler_spawned" for line in b.logs())
    assert not (b.run_dir / "supervisor.json").exists()
    assert not list(b.run_dir.glob("handler-*.json"))   # (glob of a missing directory is empty too)


def test_sigterm_flushes_everything_queued_and_exits_0(sinks, balancer):
    sink = sinks(rcvbuf=65536)
    port = free_port()
    b = start(balancer, port, "All", [sink])
    # ~12 MB: more than the output socket's send buffer, so messages wait in the balancer's queue
    msgs = make_stream(1500, target_size=8000)
    total = sum(map(len, msgs))
    with TcpExporter(port) as ex:
        ex.send(msgs[:1])
        assert sink.wait_messages(1, TIMEOUT)
        sink.pause()
        ex.send(msgs[1:])
        # everything was read, and part of it still waits in the handler (not yet taken by the kernel)
        st = b.wait_status(HANDLER, lambda st: st["msgs_in"] == len(msgs), TIMEOUT)
        assert st["subreceivers"][0]["msgs_out"] < len(msgs) and st["drops"] == 0
        b.send_signal(signal.SIGTERM)
        b.wait_log("handler_stopping", TIMEOUT)
        sink.resume()
        assert b.wait_exit(TIMEOUT) == 0
        # the exporter's session was closed by the stopping handler
        ex.sock.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionResetError):
            assert ex.sock.recv(1) == b""
    assert sink.wait_bytes(total, TIMEOUT)
    settle([sink])
    assert sink.messages() == msgs, "queued messages were lost at stop"
    final = json.loads((b.run_dir / "handler-fullflow-0.json").read_text())
    assert final["drops"] == 0 and final["subreceivers"][0]["msgs_out"] == len(msgs)
    assert not b.orphans


def test_all_mode_slow_sink_drops_are_counted_and_nobody_waits(sinks, balancer):
    fast = [sinks(), sinks()]
    slow = sinks(rcvbuf=65536)
    subs = [*fast, slow]
    port = free_port()
    b = start(balancer, port, "All", subs, extra=["IPFIX_FULLFLOW_QUEUE_BYTES[0]=65536"])
    # ~12.6 MB in 1,400-byte messages: more than the slow sink's socket buffers (~8 MB), the handler's
    # per-connection staging (IOV_MAX messages) and the 64 KiB queue together
    msgs = make_stream(9000, target_size=1400)
    with TcpExporter(port) as ex:
        ex.send(msgs[:1])
        wait_total(subs, 3, b=b)
        slow.pause()
        t0 = time.monotonic()
        ex.send(msgs[1:])
        # the exporter was never blocked: the balancer read everything while the slow sink still reads nothing
        st = b.wait_status(HANDLER, lambda st: st["msgs_in"] == len(msgs), TIMEOUT)
        assert time.monotonic() - t0 < TIMEOUT
        for s in fast:
            assert s.wait_messages(len(msgs), TIMEOUT), b.log_tail()
        st = b.wait_status(HANDLER, lambda st: by_endpoint(st)[ep(slow)]["drops"] > 0, TIMEOUT)
        assert st["drops"] == by_endpoint(st)[ep(slow)]["drops"]
        for s in fast:
            assert by_endpoint(st)[ep(s)]["drops"] == 0
        slow.resume()
    # the exporter left: the slow sink's output delivers what it still holds, then closes
    st = b.wait_status(HANDLER, lambda st: by_endpoint(st)[ep(slow)]["state"] == "idle", TIMEOUT)
    slow_st = by_endpoint(st)[ep(slow)]
    assert slow_st["msgs_out"] + slow_st["drops"] == len(msgs), "a message neither sent nor counted as dropped"
    assert slow.wait_messages(slow_st["msgs_out"], TIMEOUT)
    settle(subs)
    for s in fast:
        assert s.messages() == msgs
    # the slow sink got an in-order, unchanged subsequence: what was not dropped
    got = slow.messages()
    assert len(got) == slow_st["msgs_out"]
    it = iter(msgs)
    assert all(any(m == x for x in it) for m in got), "slow sink got messages out of order or altered"
    assert 0 < len(got) < len(msgs)


# --------------------------------------------------------------------------- #
# UDP at line rate (issue 22): bursts read and sent in batches (recvmmsg, sendmmsg)
# --------------------------------------------------------------------------- #


def udp_burst(port: int, streams: list[list[bytes]], run: int = 16) -> list[tuple]:
    """Each stream from its own socket, interleaved in runs of ``run`` datagrams, without a pause: the
    handler reads them many at a time, runs from several sources in one read. Returns the source addresses."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in streams]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        for start in range(0, max(map(len, streams)), run):
            for s, msgs in zip(socks, streams):
                for msg in msgs[start:start + run]:
                    s.sendto(msg, ("127.0.0.1", port))
        return [s.getsockname() for s in socks]
    finally:
        for s in socks:
            s.close()


def by_peer(sink) -> dict[tuple, list[bytes]]:
    """A UDP sink's datagrams per source: one output session each."""
    out: dict[tuple, list[bytes]] = {}
    for peer, d in zip(sink.peers, sink.datagrams):
        out.setdefault(peer, []).append(d)
    return out


def odid_of(msg: bytes) -> int:
    return header(msg)[4]


@pytest.mark.parametrize("mode", ["RoundRobin", "All"])
def test_udp_bursts_from_three_exporters_arrive_byte_exact(sinks, balancer, mode):
    subs = [sinks("udp") for _ in range(3)]
    port = free_port("udp")
    b = start(balancer, port, mode, subs, port_type="udp", sub_proto="udp")
    rpm = 30  # 1,380-byte messages
    streams = [make_stream(400, rpm, odid=odid) for odid in (1, 2, 3)]
    udp_burst(port, streams)
    copies = 3 if mode == "All" else 1
    expected = sum(map(len, streams)) * copies + (3 * 2 if mode == "RoundRobin" else 0)  # + template copies
    wait_total(subs, expected, b=b)
    settle(subs)
    st = b.wait_status(HANDLER, lambda s: s["msgs_in"] == sum(map(len, streams)), timeout=TIMEOUT)
    assert st["drops"] == 0 and st["rcvbuf_overflow"] == 0
    sessions = [(s, msgs) for s in subs for msgs in by_peer(s).values()]
    assert len(sessions) == 9, "one output session per exporter session and subreceiver"
    for sink, got in sessions:
        stream = streams[odid_of(got[0]) - 1]
        assert all(odid_of(m) == odid_of(got[0]) for m in got)
        if mode == "All":
            assert got == stream, f"{ep(sink)}: not the exporter's exact stream"
        else:
            assert got[0] == stream[0]
            index = {no_seq(m): i for i, m in enumerate(stream[1:])}
            positions = [index[no_seq(m)] for m in got[1:]]
            assert positions == sorted(positions), f"{ep(sink)}: out of order"
            assert [seq_of(m) for m in got[1:]] == [i * rpm for i in range(len(got) - 1)], "gap-free per output"
    if mode == "RoundRobin":
        for stream in streams:
            shares = [m for s, got in sessions if odid_of(got[0]) == odid_of(stream[0]) for m in got[1:]]
            assert sorted(map(no_seq, shares)) == sorted(map(no_seq, stream[1:])), "each data message once"


def test_udp_burst_to_tcp_round_robin_each_sink_gets_its_share_in_order(sinks, balancer):
    subs = [sinks() for _ in range(3)]
    port = free_port("udp")
    b = start(balancer, port, "RoundRobin", subs, port_type="udp")
    rpm = 30
    msgs = make_stream(900, rpm)
    source = udp_burst(port, [msgs[:1]])[0]  # the template opens the session and its TCP outputs
    b.wait_status(HANDLER, lambda st: [s["state"] for s in st["subreceivers"]] == ["up"] * 3, timeout=TIMEOUT)
    udp_send(port, msgs[1:], source[1])  # then the data, as fast as it goes
    wait_total(subs, 3 + len(msgs) - 1, b=b)
    settle(subs)
    seen = []
    for sink in subs:
        got = sink.messages()
        first = next(i for i, m in enumerate(got) if set_ids(m) == [256])
        # The template first; a collector may get it more than once while the outputs of a new UDP session
        # connect (harmless: templates are state, not payload). The data are checked as strictly as ever.
        assert first >= 1 and set(got[:first]) == {msgs[0]}, f"{ep(sink)}: not the template first"
        seen.append(types.SimpleNamespace(kind="tcp", connection_count=sink.connection_count, port=sink.port,
                                          messages=lambda got=got, first=first: got[first - 1:]))
    assert_round_robin_shares(seen, msgs[0], msgs[1:], rpm)


def test_tcp_burst_to_udp_round_robin_each_sink_gets_its_share_in_order(sinks, balancer):
    subs = [sinks("udp") for _ in range(3)]
    port = free_port()
    b = start(balancer, port, "RoundRobin", subs, sub_proto="udp")
    rpm = 30
    msgs = make_stream(900, rpm)
    tcp_send(port, msgs)  # large reads: a few hundred messages per flush, sent in batches
    wait_total(subs, 3 + len(msgs) - 1, b=b)
    settle(subs)
    assert_round_robin_shares(subs, msgs[0], msgs[1:], rpm)
    assert all(split_messages(d) == [d] for s in subs for d in s.datagrams)


def test_datagrams_the_kernel_dropped_before_the_handler_read_them_are_counted(sinks, balancer):
    """A handler that does not read for a moment (stopped here) with a small receive buffer: the kernel
    drops what does not fit. Every datagram sent is either received or in rcvbuf_overflow."""
    sink = sinks("udp")
    port = free_port("udp")
    b = start(balancer, port, "All", [sink], port_type="udp", sub_proto="udp",
              extra=["IPFIX_FULLFLOW_RCVBUF_BYTES[0]=65536"])
    msgs = make_stream(300, target_size=1400)
    pid = b.handler_pid(HANDLER)
    os.kill(pid, signal.SIGSTOP)
    try:
        udp_send(port, msgs)
    finally:
        os.kill(pid, signal.SIGCONT)
    st = b.wait_status(HANDLER, lambda s: s["msgs_in"] + s["rcvbuf_overflow"] == len(msgs), timeout=TIMEOUT)
    assert 0 < st["rcvbuf_overflow"] < len(msgs) - 20, "the buffer held some, the rest was dropped"
    wait_total([sink], st["msgs_in"], b=b)
    settle([sink])
    assert sink.message_count == st["msgs_in"] and st["drops"] == 0
    text = run_cli("status", "--run-dir", b.run_dir).stdout
    assert f"rcvbuf_overflow: {st['rcvbuf_overflow']} datagrams dropped by the kernel" in text
