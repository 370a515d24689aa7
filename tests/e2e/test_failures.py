"""Ordinary network failures are not crashes, and lose nothing they need not lose."""

import socket
import struct

from ipfixkit import TcpExporter, TcpSink, decode_records, extract_serials, free_port, make_stream, \
    split_messages, tcp_send, wait_until


def env(port: int, sinks, mode="RoundRobin", extra="") -> str:
    subs = ",".join(f"127.0.0.1/{s.port}" for s in sinks)
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB[0]={subs}\n{extra}")


def settled(bal, value) -> int:
    """``value(status)`` once two successive status documents (published every second) agree on it."""
    seen: dict[float, int] = {}

    def agree(doc: dict) -> bool:
        seen[doc["time"]] = value(doc)
        last_two = [seen[t] for t in sorted(seen)][-2:]
        return len(last_two) == 2 and last_two[0] == last_two[1]
    return value(bal.wait_status("fullflow[0]", agree))


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_full_speed_burst_on_a_fresh_connection_loses_nothing(balancer):
    """The first messages of a session wait for the output connections instead of being dropped."""
    port = free_port()
    with TcpSink() as a, TcpSink() as b, TcpSink() as c:
        bal = balancer(env(port, [a, b, c]))
        bal.wait_ready()
        stream = make_stream(30000, records_per_message=4)
        tcp_send(port, stream)  # one sendall, straight after connect
        bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == len(stream), timeout=30)
        for sink in (a, b, c):
            assert sink.wait_quiet(0.5, timeout=30)
        got = sorted(s for sink in (a, b, c) for s in extract_serials(sink.messages()))
        assert got == list(range(30000 * 4))
        assert bal.status("fullflow[0]")["drops"] == 0


def test_exporter_reset_mid_message_is_an_ordinary_end(balancer):
    port = free_port()
    with TcpSink() as a:
        bal = balancer(env(port, [a]))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        stream = make_stream(10, records_per_message=2)
        with TcpExporter(port) as steady:
            steady.send(stream[:6])
            rude = socket.create_connection(("127.0.0.1", port))
            rude.sendall(b"".join(stream[:3]) + stream[3][:30])  # half a message, then RST
            # read by the handler before the RST (which would discard it): the whole ones counted, and the
            # half one came in the same segment
            bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 6 + 3)
            reset(rude)
            bal.wait_log("exporter_truncated")
            steady.send(stream[6:])
        assert a.wait_messages(11 + 3)
        assert bal.handler_pid("fullflow[0]") == pid, "no crash, no restart"
        assert bal.status("fullflow[0]")["malformed"] == 0


def test_subreceiver_reset_while_a_message_is_half_sent(balancer):
    """A collector resets mid-message and stays away: the handler keeps running, the messages queued for
    it move to the collector that is up (RoundRobin), and only what the failed collector's kernel had
    already taken can be missing. When it comes back, its new connection starts with templates."""
    port = free_port()
    with TcpSink(rcvbuf=65536) as a, TcpSink() as b:
        bal = balancer(env(port, [a, b]))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        stream = make_stream(8000, target_size=8000)
        rpm = len(extract_serials(stream[1:2]))
        a.pause()  # a stops reading: the balancer's writes to it stall part-way, a queue builds
        with TcpExporter(port) as exporter:
            exporter.send(stream[:6001])
            bal.wait_status("fullflow[0]", lambda s: s["subreceivers"][0]["queued_bytes"] > 0)
            committed = settled(bal, lambda s: s["subreceivers"][0]["msgs_out"])  # a's buffers are full
            a.drop_connections(reset=True)
            a.down()
            bal.wait_log("subreceiver_down")
            # With a gone, everything that was only queued for it reaches b, exporter still connected.
            first = split_messages(a.connections[0], partial_ok=True)
            expected = 6000 * rpm - (committed - len(first) + 1) * rpm
            wait_until(lambda: len(set(extract_serials(first) + extract_serials(b.messages()))) >= expected,
                       "the messages queued for the failed collector to move to the other", bal, timeout=30)
            a.resume()
            a.up()
            assert a.wait_connections(2, timeout=15)
            exporter.send(stream[6001:])
            bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == len(stream))
            # Queue accounting survived partial writes, the failure and the re-dispatch: with the session
            # still open, both outputs report nothing left once everything went out.
            bal.wait_status("fullflow[0]", lambda s: all(sub["sessions"] == 1 and sub["queued_bytes"] == 0
                                                         for sub in s["subreceivers"]), timeout=30)
        assert a.wait_quiet(1.0, timeout=30) and b.wait_quiet(1.0, timeout=30)
        assert bal.handler_pid("fullflow[0]") == pid, "no crash, no restart"
        later = [m for conn in a.connections[1:] for m in split_messages(conn)]
        got = extract_serials(first) + extract_serials(later) + extract_serials(b.messages())
        assert len(got) == len(set(got)), "nothing twice"
        missing = set(range(8000 * rpm)) - set(got)
        assert len(missing) <= (committed - len(first) + 1) * rpm
        assert extract_serials(later), "the returning collector gets its share again"
        decode_records(later)  # the reconnected session decodes on its own: templates came first


def test_stop_with_undeliverable_queue_reports_the_loss_and_exits_nonzero(balancer):
    """An exporter came and went while the only collector is down; at stop the queue cannot be
    delivered within the drain time: that is loss, so the handler and the supervisor exit non-zero."""
    port = free_port()
    down = TcpSink(up=False)
    bal = balancer(env(port, [down]))
    bal.wait_ready()
    stream = make_stream(5, records_per_message=2)
    tcp_send(port, stream)
    bal.wait_log("exporter_disconnected")
    assert bal.stop(timeout=30) == 1
    loss = bal.wait_log("handler_stopped_with_loss")
    assert loss["unsent_messages"] == len(stream)
    gone = [line for line in bal.logs() if line.get("event") == "exporter_disconnected"]
    assert len(gone) == 1, "an exporter that left is not disconnected again at stop"
    down.close()
