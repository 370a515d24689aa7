"""Malformed input at set level (issue 11 item 7, README "Hostile input"): a message whose set structure does
not parse is not forwarded; it is counted by reason and logged once per session and reason, and the session
goes on (its message boundaries are intact). Against the real handler process."""

import struct

from ipfixkit import TcpExporter, TcpSink, free_port, make_stream

VAR = 65535


def message(*sets: bytes, odid: int = 1) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), 1_700_000_000, 0, odid) + body


def ipfix_set(set_id: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HH", set_id, 4 + len(body) if length is None else length) + body


VARLEN_TEMPLATE = message(ipfix_set(2, struct.pack("!HHHH", 400, 1, 82, VAR)))
#: reason -> a message with that defect (and otherwise well-formed sets before it)
MALFORMED = {
    "set_length": message(ipfix_set(400, b"\x01a"), ipfix_set(400, b"", length=3)),
    "set_past_end": message(ipfix_set(400, b"\x01a", length=40)),
    "template_past_set": message(ipfix_set(2, struct.pack("!HHHH", 401, 5, 8, 4))),
    "scope_count": message(ipfix_set(3, struct.pack("!HHHHH", 402, 1, 2, 149, 4))),
    "enterprise_truncated": message(ipfix_set(2, struct.pack("!HHHH", 403, 1, 0x8008, 4))),
    "varlen_past_end": message(ipfix_set(400, b"\x01a" + b"\x20" + b"z" * 5)),
    "template_id": message(ipfix_set(2, struct.pack("!HHHH", 255, 1, 8, 4))),
    "stray_bytes": message(ipfix_set(400, b"\x01a"), b"\x00\x00"),
    "reserved_set_id": message(ipfix_set(400, b"\x01a"), ipfix_set(4, b"zzzz")),
}


def test_malformed_sets_are_dropped_counted_logged_once_and_the_session_goes_on(balancer):
    port = free_port()
    with TcpSink() as sink:
        bal = balancer(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
                       f"IPFIX_FULLFLOW_BALANCER[0]=All\nIPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}\n")
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        good = make_stream(2 * len(MALFORMED) + 1, records_per_message=3) + [message(ipfix_set(400, b"\x01a"))]
        sent, expected = [VARLEN_TEMPLATE], [VARLEN_TEMPLATE]
        for i, bad in enumerate(list(MALFORMED.values()) * 2):
            sent += [good[i], bad]
            expected.append(good[i])
        sent += good[2 * len(MALFORMED):]
        expected += good[2 * len(MALFORMED):]
        with TcpExporter(port) as exporter:
            exporter.send(sent)
            assert sink.wait_messages(len(expected)), sink.message_count
            st = bal.wait_status("fullflow[0]", lambda s: s["malformed"] == 2 * len(MALFORMED))
            assert sink.wait_quiet(0.5)
            assert sink.messages() == expected  # byte-identical (All), in order, none of the malformed ones
            assert st["malformed_by_reason"] == dict.fromkeys(MALFORMED, 2) and st["connections"] == 1
            assert not [e for e in bal.logs() if e.get("event") == "exporter_disconnected"]
            peer = f"127.0.0.1:{exporter.local_port}"
        lines = [e for e in bal.logs() if e.get("event") == "malformed_ipfix"]
        assert sorted(e["reason"] for e in lines) == sorted(MALFORMED)  # once per session and reason
        assert {(e["peer"], e["action"]) for e in lines} == {(peer, "message dropped, session continues")}
        assert bal.handler_pid("fullflow[0]") == pid
