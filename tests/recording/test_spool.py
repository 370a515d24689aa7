"""recording/spool.py: .part recovery, start-up bookkeeping of dumps and markers, delivery to every target,
eviction beyond SPOOL_BYTES; whole_messages and the Spool's export callbacks on their own."""
from __future__ import annotations

import os

from ipfixkit import TcpSink, free_port, make_stream
from fakes import Log
from recordkit import T0, Exporter, dumps, markers, read_messages, run_loop, write_part
from ipfix_balancer.net.loop import Loop
from ipfix_balancer.recording.export import target_token
from ipfix_balancer.recording.spool import Spool, whole_messages


# --------------------------------------------------------------------------- #
# crash safety: leftover .part files
# --------------------------------------------------------------------------- #

def test_leftover_part_is_cut_to_whole_messages_and_renamed(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    stream = make_stream(5, 10)
    write_part(dump / "fullflow_0_20231114T220000Z.part", stream, tail=stream[1][:37], mtime=T0 - 60)
    rec, _, log, _ = make()
    assert dumps(dump) == ["fullflow_0_20231114T220000Z_20231114T221220Z.ipfix"]
    assert read_messages(dump / dumps(dump)[0]) == stream
    (event,) = log.named("dump_recovered")
    assert event["cut_bytes"] == 37 and event["messages"] == 6
    assert rec.status().recovered_files == 1 and not [n for n in os.listdir(dump) if n.endswith(".part")]

def test_leftover_parts_of_other_dpi_ids_and_suffixes_are_recovered(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    write_part(dump / "fullflow_3_20231114T220000Z.part", make_stream(1, 1), mtime=T0)
    write_part(dump / "fullflow_3_20231114T220000Z.1.part", make_stream(1, 1), mtime=T0)
    make()
    assert dumps(dump) == ["fullflow_3_20231114T220000Z_20231114T221320Z.ipfix",
                           "fullflow_3_20231114T220000Z_20231114T221320Z_001.ipfix"]

def test_empty_and_corrupt_parts(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "fullflow_0_20231114T220000Z.part").write_bytes(b"")
    (dump / "fullflow_0_20231114T220100Z.part").write_bytes(b"not ipfix at all, no")
    (dump / "notes.part").write_bytes(b"someone else's")
    _, _, log, _ = make()
    assert sorted(os.listdir(dump)) == ["fullflow_0_20231114T220100Z.part.corrupt", "notes.part"]
    assert log.named("dump_part_corrupt") and log.named("dump_part_unknown")

# --------------------------------------------------------------------------- #
# bookkeeping and limit
# --------------------------------------------------------------------------- #

def test_file_is_kept_until_every_target_has_it(make, tmp_path):
    down = f"127.0.0.1/{free_port()}/tcp"
    loop = Loop()
    with TcpSink() as sink:
        rec, _, _, _ = make(loop=loop, DUMP_INSERT_PROCESSES=f"{sink.endpoint},{down}")
        Exporter(rec).send(make_stream(3, 3))
        rec.rotate("hup")
        run_loop(loop, lambda: rec.targets[0].files_sent == 1 and rec.targets[1].state == "down")
        (name,) = dumps(tmp_path / "dump")
        assert markers(tmp_path / "dump") == [f"{name}.pending-{target_token(rec.targets[1].ep)}",
                                              f"{name}.sent-{target_token(rec.targets[0].ep)}"]

def test_startup_bookkeeping_delivered_removed_target_orphans(make, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    data = b"".join(make_stream(1, 1))
    a, b = "127.0.0.1_1_tcp", "127.0.0.1_2_tcp"
    (dump / "fullflow_0_A_B.ipfix").write_bytes(data)          # delivered to the only configured target
    (dump / f"fullflow_0_A_B.ipfix.sent-{a}").touch()
    (dump / "fullflow_0_C_D.ipfix").write_bytes(data)          # pending only for a target no longer configured
    (dump / f"fullflow_0_C_D.ipfix.pending-{b}").touch()
    (dump / "fullflow_0_E_F.ipfix").write_bytes(data)          # recorded without targets: kept, not exported
    (dump / f"fullflow_0_X_Y.ipfix.pending-{a}").touch()       # orphan marker
    (dump / "fullflow_0_G_H.ipfix").write_bytes(data)          # still pending for a, sent to removed b
    (dump / f"fullflow_0_G_H.ipfix.pending-{a}").touch()
    (dump / f"fullflow_0_G_H.ipfix.sent-{b}").touch()
    rec, _, log, _ = make(DUMP_INSERT_PROCESSES="127.0.0.1/1/tcp")
    assert dumps(dump) == ["fullflow_0_C_D.ipfix", "fullflow_0_E_F.ipfix", "fullflow_0_G_H.ipfix"]
    assert markers(dump) == [f"fullflow_0_G_H.ipfix.pending-{a}"]
    assert rec.targets[0].queue == ["fullflow_0_G_H.ipfix"]
    (removed,) = log.named("export_target_removed")
    assert (removed["target"], removed["files"]) == (b, 1)

def test_spool_limit_evicts_oldest_undelivered_first(make, tmp_path):
    target = f"127.0.0.1/{free_port()}/tcp"
    stream = make_stream(30, 10)
    size = sum(map(len, stream[:11]))   # one file: head template + 10 data messages (+ the exporter's template)
    rec, clock, log, _ = make(DUMP_INSERT_PROCESSES=target, SPOOL_BYTES=3 * size + 100)
    e = Exporter(rec)
    for i in range(3):
        e.send(stream[1 + 10 * i: 11 + 10 * i] if i else stream[:11])
        clock.advance(1)
        rec.rotate("hup")
    names = dumps(tmp_path / "dump")
    assert len(names) == 3 and rec.spool.evicted_files == 0
    e.send(make_stream(10, 10, first_serial=300, first_seq=300, with_template=False))
    rec.rotate("hup")
    assert dumps(tmp_path / "dump") == names[1:] + [rec.spool.last_file]
    (evicted,) = log.named("dump_evicted")
    assert evicted["file"] == names[0] and evicted["not_delivered_to"] == [target]
    assert rec.targets[0].queue == dumps(tmp_path / "dump")
    assert rec.status().spool_bytes == 3 * size and not any(names[0] in m for m in markers(tmp_path / "dump"))

def test_without_targets_and_limit_files_stay(make, tmp_path):
    rec, _, _, _ = make(FW_MAX_QUEUE_SIZE=10)
    Exporter(rec).send(make_stream(20, 10))
    rec.close()
    assert len(dumps(tmp_path / "dump")) == 20 and rec.spool.evicted_files == 0


# --------------------------------------------------------------------------- #
# on their own: whole_messages, the export callbacks
# --------------------------------------------------------------------------- #

def test_whole_messages_stops_at_a_cut_or_a_bad_header(tmp_path):
    stream = make_stream(3, 10)
    size = sum(map(len, stream))
    path = tmp_path / "f"
    cases = [(b"".join(stream), (size, 4)), (b"".join(stream) + stream[1][:20], (size, 4)),
             (b"".join(stream) + b"\x00\x09" + stream[1][2:], (size, 4)), (b"", (0, 0)), (stream[0][:15], (0, 0)),
             (b"not ipfix at all, no", (0, 0))]
    for data, expected in cases:
        path.write_bytes(data)
        assert whole_messages(str(path)) == expected


class FakeTarget:
    """What the spool uses of an ExportTarget."""

    def __init__(self, token):
        self.token = self.ep = token
        self.queue = []

    def add(self, name):
        self.queue.append(name)

    def drop(self, name):
        if name in self.queue:
            self.queue.remove(name)


def completed_spool(tmp_path, *tokens, limit=0):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "fullflow_0_20231114T221320Z.part").write_bytes(b"".join(make_stream(1, 1)))
    targets = [FakeTarget(t) for t in tokens]
    spool = Spool(str(dump), targets, Log(), limit)
    name = spool.complete(str(dump / "fullflow_0_20231114T221320Z.part"), "fullflow_0_20231114T221320Z", T0, 10)
    return spool, targets, dump, name


def test_delivered_renames_the_marker_and_deletes_once_every_target_has_it(tmp_path):
    spool, (a, b), dump, name = completed_spool(tmp_path, "a", "b")
    assert name == "fullflow_0_20231114T221320Z_20231114T221320Z.ipfix" and spool.last_file == name
    assert a.queue == b.queue == [name] and markers(dump) == [f"{name}.pending-a", f"{name}.pending-b"]
    a.queue.remove(name)          # what ExportTarget does before on_delivered
    spool.delivered(a, name)
    assert markers(dump) == [f"{name}.pending-b", f"{name}.sent-a"] and dumps(dump) == [name]
    b.queue.remove(name)
    spool.delivered(b, name)
    assert os.listdir(dump) == [] and spool.completed == {} and spool.bytes == 0


def test_vanished_is_forgotten_everywhere(tmp_path):
    spool, (a, b), dump, name = completed_spool(tmp_path, "a", "b")
    os.unlink(dump / name)
    spool.vanished(name)
    assert a.queue == b.queue == [] and os.listdir(dump) == [] and spool.completed == {}
    assert spool.log.named("dump_missing") == [{"file": name, "action": "not exported: the file is gone"}]


def test_limit_evicts_from_the_targets_too(tmp_path):
    spool, (a,), dump, name = completed_spool(tmp_path, "a", limit=5)
    assert a.queue == [] and os.listdir(dump) == [] and spool.evicted_files == 1
