"""recording/export.py: TCP and UDP export of completed dumps through a recorder, pending files across a restart;
ExportTarget on its own: the outcome callbacks and the state transitions."""
from __future__ import annotations

import os
import socket

import pytest

from ipfixkit import FULLFLOW_FIELDS, TcpSink, UdpSink, decode_records, extract_serials, free_port, make_stream, split_messages
from fakes import Log
from recordkit import Exporter, dumps, markers, run_loop
from ipfix_balancer.config import Endpoint
from ipfix_balancer.control.status import ExportTargetStatus
from ipfix_balancer.net.loop import Loop
from ipfix_balancer.recording.export import TRANSITIONS, ExportTarget, State


# --------------------------------------------------------------------------- #
# through the recorder
# --------------------------------------------------------------------------- #

def test_tcp_export_delivers_each_file_then_deletes_it(make, tmp_path):
    loop = Loop()
    with TcpSink() as sink:
        rec, clock, log, _ = make(loop=loop, FW_MAX_QUEUE_SIZE=50, DUMP_INSERT_PROCESSES=sink.endpoint)
        stream = make_stream(20, 10)
        Exporter(rec).send(stream)   # 4 files
        run_loop(loop, lambda: rec.targets[0].files_sent == 4)
        assert sink.connection_count == 4
        serials = []
        for conn in sink.connections:
            serials += [r["serial"] for r in decode_records(split_messages(conn))]   # each transfer decodes alone
        assert serials == list(range(200))
        assert dumps(tmp_path / "dump") == [] and markers(tmp_path / "dump") == []
        assert [e["target"] for e in log.named("dump_exported")] == [sink.endpoint] * 4

def test_udp_export_sends_one_datagram_per_message(make, tmp_path):
    loop = Loop()
    with UdpSink() as sink:
        rec, _, _, _ = make(loop=loop, DUMP_INSERT_PROCESSES=sink.endpoint)
        stream = make_stream(30, 10)
        Exporter(rec).send(stream)
        rec.rotate("hup")
        run_loop(loop, lambda: rec.targets[0].files_sent == 1)
        assert sink.wait_messages(32, timeout=5)
        assert sink.datagrams == stream[:1] + stream   # the head template, then the stream as received

def test_udp_export_counts_a_message_too_large_for_a_datagram_as_a_drop(make, tmp_path):
    loop = Loop()
    with UdpSink() as sink:
        rec, _, _, _ = make(loop=loop, DUMP_INSERT_PROCESSES=sink.endpoint)
        stream = make_stream(2, 10)
        short = tuple(f for f in FULLFLOW_FIELDS if f.name in ("sourceIPv4Address", "octetDeltaCount"))
        big = make_stream(1, 5459, template_id=300, fields=short, first_serial=100)   # 12-byte records
        assert 65507 < len(big[1]) <= 65535
        Exporter(rec).send(stream[:2] + big + stream[2:])
        rec.rotate("hup")
        run_loop(loop, lambda: rec.targets[0].files_sent == 1)
        assert rec.drops == 1 and rec.status().drops == 1 and rec.targets[0].skipped == 1
        assert sink.wait_messages(6, timeout=5)   # heads, the stream, big's template message: all but big[1]
        got = sink.datagrams
        assert big[1] not in got and big[0] in got and [m for m in got if m in stream] == stream[:1] + stream


def test_down_target_keeps_files_pending_across_a_restart(make, tmp_path):
    port = free_port()
    target = f"127.0.0.1/{port}/tcp"
    loop = Loop()
    rec, clock, log, _ = make(loop=loop, DUMP_INSERT_PROCESSES=target, ROTATE_DELAY_SECONDS=60)
    stream = make_stream(9, 10)
    Exporter(rec).send(stream[:4])
    rec.rotate("hup")
    Exporter(rec).send(stream[4:])   # a new session (its template message first)
    rec.rotate("hup")
    run_loop(loop, lambda: rec.targets[0].state == "down")
    assert [(t.target, t.pending) for t in rec.status().exports] == [(target, 2)] and log.named("export_failed")
    assert len(markers(tmp_path / "dump")) == 2
    rec.close()
    # a new run finds the pending markers; the target is up now
    with TcpSink(port=port) as sink:
        loop2 = Loop()
        rec2, _, _, _ = make(loop=loop2, DUMP_INSERT_PROCESSES=target)
        assert len(rec2.targets[0].queue) == 2
        run_loop(loop2, lambda: rec2.targets[0].files_sent == 2)
        assert sorted(s for c in sink.connections for s in extract_serials(split_messages(c))) == list(range(90))
    assert dumps(tmp_path / "dump") == [] and markers(tmp_path / "dump") == []


# --------------------------------------------------------------------------- #
# ExportTarget on its own: callbacks, states
# --------------------------------------------------------------------------- #

class Traced(ExportTarget):
    """An ExportTarget recording its state changes and the outcomes it reports."""

    def __init__(self, loop, directory, ep):
        self.trace, self.delivered, self.vanished, self.dropped = [], [], [], []
        self.log = Log()
        super().__init__(loop, str(directory), ep, self.log, on_delivered=self.delivered.append,
                         on_vanished=self._on_vanished, on_drop=self.dropped.append)

    def _on_vanished(self, name):
        self.vanished.append(name)
        self.drop(name)   # what the spool does: forget it everywhere

    def _to(self, state):
        self.trace.append(state)
        super()._to(state)


def dump_file(directory, name, messages):
    (directory / name).write_bytes(b"".join(messages))
    return name


def test_tcp_transfer_reports_delivery_and_walks_the_states(tmp_path):
    loop = Loop()
    stream = make_stream(5, 10)
    with TcpSink() as sink:
        t = Traced(loop, tmp_path, Endpoint("127.0.0.1", sink.port, "tcp"))
        t.add(dump_file(tmp_path, "a.ipfix", stream))
        t.add(dump_file(tmp_path, "b.ipfix", stream))
        run_loop(loop, lambda: len(t.delivered) == 2)
        assert t.delivered == ["a.ipfix", "b.ipfix"] and t.queue == [] and t.state is State.IDLE
        assert t.trace == [State.CONNECTING, State.SENDING, State.DRAINING, State.IDLE] * 2
        assert t.status() == ExportTargetStatus(sink.endpoint, "idle", pending=0, sent=2, error="")
        assert (t.files_sent, t.bytes_sent) == (2, 2 * sum(map(len, stream)))
        assert sorted(os.listdir(tmp_path)) == ["a.ipfix", "b.ipfix"]   # the files are the owner's business
        assert [split_messages(c) for c in sink.connections] == [stream, stream]


def test_down_target_retries_and_a_vanished_file_is_reported(tmp_path):
    loop = Loop()
    port = free_port()
    t = Traced(loop, tmp_path, Endpoint("127.0.0.1", port, "tcp"))
    t.add(dump_file(tmp_path, "a.ipfix", make_stream(1, 1)))
    run_loop(loop, lambda: t.state is State.DOWN)
    assert t.trace[-1] is State.DOWN and t.last_error and t.status().state == "down"
    assert t.delivered == [] and t.queue == ["a.ipfix"] and t.log.named("export_failed")
    os.unlink(tmp_path / "a.ipfix")
    t._retry()   # the backoff timer: DOWN -> IDLE, the file is gone
    assert t.vanished == ["a.ipfix"] and t.queue == [] and t.state is State.IDLE
    t.close()
    assert t.state is State.CLOSED
    t.add(dump_file(tmp_path, "b.ipfix", make_stream(1, 1)))
    assert t.state is State.CLOSED and t.sock is None   # a closed target starts nothing


def test_drop_of_the_file_in_transfer_ends_it(tmp_path):
    loop = Loop()
    with socket.create_server(("127.0.0.1", 0)) as server:   # accepts in the kernel, never reads
        t = Traced(loop, tmp_path, Endpoint("127.0.0.1", server.getsockname()[1], "tcp"))
        (tmp_path / "big.ipfix").write_bytes(bytes(32 << 20))   # more than the socket buffers hold
        t.add("big.ipfix")
        t.add(dump_file(tmp_path, "next.ipfix", make_stream(1, 1)))
        run_loop(loop, lambda: t.state is State.SENDING and t.bytes_sent == 0 and t._off > 0)
        t.drop("big.ipfix")
        assert t.state is State.IDLE and t.sock is None and t.queue == ["next.ipfix"]
        assert t.trace == [State.CONNECTING, State.SENDING, State.IDLE]
        t.drop("not-queued.ipfix")   # nothing to do
        run_loop(loop, lambda: t.state is not State.IDLE)   # the next file starts on the next turn
        assert t.trace[-1] is State.CONNECTING
        t.close()


def test_udp_oversized_message_is_reported_as_a_drop(tmp_path):
    loop = Loop()
    stream = make_stream(3, 10)
    big = bytearray(stream[1]) + bytes(65520 - len(stream[1]))
    big[2:4] = (65520).to_bytes(2, "big")   # a valid IPFIX length no UDP datagram can carry
    with UdpSink() as sink:
        t = Traced(loop, tmp_path, Endpoint("127.0.0.1", sink.port, "udp"))
        t.add(dump_file(tmp_path, "a.ipfix", stream[:2] + [bytes(big)] + stream[2:]))
        run_loop(loop, lambda: t.delivered == ["a.ipfix"])
        assert t.dropped == [1] and t.skipped == 1
        assert sink.wait_messages(4, timeout=5) and sink.datagrams == stream
        assert t.trace == [State.SENDING, State.IDLE]


def test_udp_export_stops_at_an_invalid_header(tmp_path):
    loop = Loop()
    stream = make_stream(3, 10)
    with UdpSink() as sink:
        t = Traced(loop, tmp_path, Endpoint("127.0.0.1", sink.port, "udp"))
        t.add(dump_file(tmp_path, "a.ipfix", stream[:2] + [b"\x00\x09" + stream[2][2:]] + stream[2:]))
        run_loop(loop, lambda: t.delivered == ["a.ipfix"])
        assert sink.wait_messages(2, timeout=5) and sink.datagrams == stream[:2]
        (event,) = t.log.named("export_dump_invalid")
        assert event["file"] == "a.ipfix" and "version 9" in event["reason"]


def test_transition_table():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.CLOSED] == {State.CLOSED}                       # final
    assert all(State.CLOSED in targets for targets in TRANSITIONS.values())  # close() from anywhere
    assert all(State.DOWN in TRANSITIONS[s] for s in (State.IDLE, State.CONNECTING, State.SENDING, State.DRAINING))
    assert TRANSITIONS[State.DOWN] == {State.IDLE, State.CLOSED}               # only the retry leaves DOWN
    t = ExportTarget(Loop(), "/nonexistent", Endpoint("127.0.0.1", 9, "tcp"), Log(), on_delivered=print,
                     on_vanished=print, on_drop=print)
    with pytest.raises(AssertionError):
        t._to(State.DRAINING)   # IDLE -> DRAINING skips the transfer
