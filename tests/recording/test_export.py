"""recording/export.py: TCP and UDP export of completed dumps through a recorder, pending files across a restart;
ExportTarget on its own: the outcome callbacks and the state transitions."""
from __future__ import annotations

from ipfixkit import TcpSink, UdpSink, decode_records, extract_serials, free_port, make_stream, split_messages
from recordkit import Exporter, dumps, markers, run_loop
from ipfix_balancer.config import Endpoint
from ipfix_balancer.loop import Loop
from ipfix_balancer.recording.export import target_token


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
    assert rec.status()[f"export[{target}].pending"] == 2 and log.named("export_failed")
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
