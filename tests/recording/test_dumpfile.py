"""recording/dumpfile.py: dump names; DumpWriter on its own (open never overwrites, whole-message flushes,
cut back to the last whole message on a write error, close deletes an empty file)."""
from __future__ import annotations

import errno
import os

import pytest

from ipfixkit import make_stream, split_messages
from fakes import Log
from recordkit import T0
from ipfix_balancer.config import Endpoint
from ipfix_balancer.recording import dumpfile
from ipfix_balancer.recording.dumpfile import (PART_RE, DumpWriter, WriteFailed, dump_name, dump_prefix, dump_stem,
                                               parse_stamp, stamp)
from ipfix_balancer.recording.export import target_token


def test_names_are_utc_sortable_and_carry_stream_and_dpi_id():
    assert stamp(T0) == "20231114T221320Z" and parse_stamp("20231114T221320Z") == T0
    stem = dump_stem(dump_prefix("FULLFLOW", 7), T0)
    assert stem == "fullflow_7_20231114T221320Z"
    assert dump_name(stem, T0 + 600) == "fullflow_7_20231114T221320Z_20231114T222320Z.ipfix"
    assert dump_name(stem, T0 + 600, taken=2) == "fullflow_7_20231114T221320Z_20231114T222320Z_002.ipfix"
    assert sorted([dump_name(stem, T0, 1), dump_name(stem, T0), dump_name(stem, T0 + 1)]) == \
        [dump_name(stem, T0), dump_name(stem, T0, 1), dump_name(stem, T0 + 1)], "sorted by name is by time"
    for part in (f"{stem}.part", f"{stem}.3.part"):  # what a recovery reads back from a leftover .part
        m = PART_RE.fullmatch(part)
        assert (m["stem"], parse_stamp(m["start"])) == (stem, T0)
    assert target_token(Endpoint("10.0.0.2", 9920, "tcp")) == "10.0.0.2_9920_tcp"
    assert target_token(Endpoint("::1", 9920, "udp")) == "[::1]_9920_udp"


def write(w: DumpWriter, messages, flows=10):
    """What Recorder.dispatch does inline, through the slow-path method."""
    for m in messages:
        if w.pos + len(m) > w.cap:
            w.flush()
        w.append(m)
        w.msgs += 1
        w.flows += flows


def test_open_makes_the_directory_and_never_overwrites_a_part(tmp_path):
    w = DumpWriter(str(tmp_path / "d"), Log())
    first = w.open("fullflow_0_X")
    assert first == str(tmp_path / "d" / "fullflow_0_X.part") and w.fd is not None
    os.close(w.fd)
    assert w.open("fullflow_0_X") == str(tmp_path / "d" / "fullflow_0_X.1.part")
    w.close()


def test_open_fails_with_an_oserror(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(OSError):
        DumpWriter(str(tmp_path / "blocker" / "d"), Log()).open("x")


def test_buffer_reaches_the_file_only_on_flush_and_counts_survive(tmp_path):
    w = DumpWriter(str(tmp_path), Log(), buffer_bytes=0)   # the minimum: two largest messages
    assert w.cap == 2 * 65535
    stream = make_stream(5, 10)
    w.open("f")
    write(w, stream)
    assert os.path.getsize(w.path) == 0 and w.pos == sum(map(len, stream))
    w.flush()
    assert split_messages((tmp_path / "f.part").read_bytes()) == stream
    assert (w.pos, w.flushed, w.msgs, w.flows) == (0, sum(map(len, stream)), 6, 60)
    assert w.close() == w.flushed and w.fd is None and os.path.exists(w.path)


def test_write_error_cuts_back_to_the_last_whole_message(tmp_path, monkeypatch):
    w = DumpWriter(str(tmp_path), Log())
    stream = make_stream(9, 10)
    w.open("f")
    write(w, stream[:5])
    w.flush()
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data[:100]))       # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dumpfile.os, "write", full)
    write(w, stream[5:])
    with pytest.raises(WriteFailed) as failure:
        w.flush()
    assert failure.value.lost == 5 and failure.value.cause.errno == errno.ENOSPC
    assert split_messages((tmp_path / "f.part").read_bytes()) == stream[:5]
    assert (w.pos, w.msgs, w.flows) == (0, 5, 50) and w.fd is not None   # the caller completes the file
    monkeypatch.setattr(dumpfile.os, "write", real_write)
    w.close()


def test_close_deletes_an_empty_file(tmp_path):
    w = DumpWriter(str(tmp_path), Log())
    w.open("f")
    assert w.close() == 0 and os.listdir(tmp_path) == []
