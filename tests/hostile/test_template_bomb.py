"""Template bomb (issue 11 item 2, README "Hostile input"): one exporter session defining template after
template costs the handler memory linear in templates, is stopped at its session's limits, and never disturbs
another session. Against the real handler process."""

import socket
import struct
import time

import psutil

from ipfixkit import (TcpExporter, TcpSink, UdpSink, extract_serials, free_port, header, make_stream,
                      udp_send, wait_until)

MB = 1024 * 1024
BOMB_ODID = 99


def env(port: int, sink, mode: str = "RoundRobin", proto: str = "tcp", extra: str = "") -> str:
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_PORT_TYPE[0]={proto}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}\n"
            f"IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]={proto}\n{extra}")


def tiny_template(tid: int, odid: int = BOMB_ODID) -> bytes:
    """A 28-byte message defining template ``tid`` with one 4-byte field."""
    return struct.pack("!HHIII HH HHHH", 10, 28, 0, 0, odid, 2, 12, tid, 1, 8, 4)


def bomb(count: int) -> bytes:
    return b"".join(tiny_template(tid) for tid in range(256, 256 + count))


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def of_odid(messages, odid: int) -> list[bytes]:
    return [m for m in messages if header(m)[4] == odid]


def test_queued_template_bomb_costs_memory_linear_in_templates(balancer):
    """Limits raised so all 20,000 definitions are accepted, and the collector down so every message stays
    queued with its snapshot: a copy of the templates per change would take gigabytes."""
    port = free_port()
    with TcpSink(up=False) as sink:
        bal = balancer(env(port, sink, extra="IPFIX_FULLFLOW_TEMPLATES_MAX[0]=65280\n"
                                             "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]=67108864\n"))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        before = rss(pid)
        with TcpExporter(port) as exporter:
            exporter.send([bomb(20_000)])
            bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 20_000, timeout=60)
            grown = rss(pid) - before
            sink.up()
            assert sink.wait_messages(20_000, timeout=60), sink.message_count
        assert grown < 40 * MB, f"handler RSS grew {grown / MB:.1f} MB for 20,000 queued template changes"
        last = sink.messages()[-1]
        assert last == tiny_template(256 + 19_999)
        st = bal.status("fullflow[0]")
        assert st["drops"] == 0 and st["malformed"] == 0 and bal.handler_pid("fullflow[0]") == pid


def test_session_over_templates_max_is_closed_and_another_session_flows(balancer):
    """Default limits: the bomb session is closed at its 4,097th template id, counted and logged once; a
    well-behaved session sending meanwhile gets every record through, promptly."""
    port = free_port()
    with TcpSink() as sink:
        bal = balancer(env(port, sink))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        before = rss(pid)
        stream = make_stream(200, records_per_message=5)
        with TcpExporter(port) as good:
            good.send(stream[:101])
            rude = socket.create_connection(("127.0.0.1", port))
            rude_port = rude.getsockname()[1]
            try:
                rude.sendall(bomb(20_000))
            except OSError:
                pass  # the balancer closed the session while we were still sending
            line = bal.wait_log("template_limit", timeout=30)
            good.send(stream[101:200])
            sent = time.monotonic()
            good.send(stream[200:])
            wait_until(lambda: 200 * 5 - 5 in extract_serials(of_odid(sink.messages(), 1)), "last record", bal)
            delay = time.monotonic() - sent
            rude.close()
        assert delay < 2.0, f"well-behaved session's message took {delay:.2f} s"
        assert sorted(extract_serials(of_odid(sink.messages(), 1))) == list(range(1000))
        assert (line["reason"], line["peer"], line["action"]) == ("templates_max", f"127.0.0.1:{rude_port}",
                                                                  "session closed")
        # 4096 accepted definitions reached the collector, the refused one and everything after it did not
        assert len(of_odid(sink.messages(), BOMB_ODID)) == 4096
        bal.wait_status("fullflow[0]", lambda s: s["malformed_by_reason"] == {"templates_max": 1})
        assert [entry for entry in bal.logs() if entry.get("event") == "template_limit"] == [line]
        assert bal.handler_pid("fullflow[0]") == pid and rss(pid) - before < 100 * MB


def test_udp_datagram_over_a_limit_is_dropped_and_the_session_goes_on(balancer):
    port = free_port("udp")
    with UdpSink() as sink:
        bal = balancer(env(port, sink, proto="udp", extra="IPFIX_FULLFLOW_ODIDS_MAX[0]=1\n"))
        bal.wait_ready()
        stream = make_stream(3, records_per_message=2)
        src = udp_send(port, [stream[0], stream[1]])
        udp_send(port, [tiny_template(300, odid=7), tiny_template(301, odid=8), stream[2], stream[3]], src,
                 delay=0.05)
        assert sink.wait_messages(4), sink.message_count
        bal.wait_status("fullflow[0]", lambda s: s["malformed_by_reason"] == {"odids_max": 2})
        assert sink.messages() == [stream[0], stream[1], stream[2], stream[3]]  # byte-identical, in order
        lines = [entry for entry in bal.logs() if entry.get("event") == "template_limit"]
        assert [(x["reason"], x["action"]) for x in lines] == [("odids_max", "datagram dropped")]


def test_the_templates_of_all_sessions_together_are_bounded_and_freed_with_them(balancer):
    """Issue 20: TEMPLATE_BYTES_MAX bounded each session, nothing their sum (150 sessions x 0.79 MB took
    264 MB). Now the handler's sessions together hold at most MEMORY_BYTES / 8 of templates: here 1 MiB,
    so three sessions of 4,096 templates (72 bytes each) fit and the fourth is refused at its limit."""
    port = free_port()
    with TcpSink() as sink:
        bal = balancer(env(port, sink, extra="IPFIX_FULLFLOW_MEMORY_BYTES[0]=8388608\n"))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        holders = [TcpExporter(port) for _ in range(3)]
        for i, exporter in enumerate(holders):
            exporter.send([bomb(4096)])
            bal.wait_status("fullflow[0]", lambda s, n=4096 * (i + 1): s["msgs_in"] == n, timeout=30)
        with TcpExporter(port) as fourth:
            fourth.send([bomb(4096)])
            fourth.sock.settimeout(10)
            try:
                closed = fourth.sock.recv(1) == b""
            except ConnectionResetError:  # closed with bytes of ours unread
                closed = True
            assert closed, "closed at the handler's template limit"
        bal.wait_status("fullflow[0]", lambda s: s["malformed_by_reason"].get("template_memory") == 1)
        refused = [line for line in bal.logs() if line.get("event") == "template_limit"]
        assert [line["reason"] for line in refused] == ["template_memory"]
        for exporter in holders:  # their sessions end: their templates leave the pool
            exporter.close()
        bal.wait_status("fullflow[0]", lambda s: s["connections"] == 0 and s["draining"] == 0, timeout=30)
        with TcpExporter(port) as later:
            later.send(make_stream(10, 2))
            wait_until(lambda: extract_serials(of_odid(sink.messages(), 1)) == list(range(20)),
                       "a new session's records, templates and all", bal)
        assert bal.handler_pid("fullflow[0]") == pid
