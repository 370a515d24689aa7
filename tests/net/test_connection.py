"""OutputConnection (and the recorder's ExportTarget): callbacks tolerate a closed object; a socket that
cannot be created (EMFILE at the descriptor limit) is an outage with backoff, not a crash."""

import errno

import pytest

from ipfix_balancer.config import Endpoint
from ipfix_balancer.core.sendqueue import SendQueue, State, SubreceiverStats
from ipfix_balancer.core.templates import EMPTY
from ipfix_balancer.logs import Throttle
from ipfix_balancer.net import connection
from ipfix_balancer.net.connection import OutputConnection
from ipfix_balancer.net.loop import READ, WRITE, Loop
from ipfix_balancer.recording import export
from ipfix_balancer.recording.export import ExportTarget

from fakes import Log


def output(proto: str = "tcp") -> OutputConnection:
    queue = SendQueue(SubreceiverStats(Endpoint("127.0.0.1", 9, proto)), limit=1 << 20, rewrite_seq=False,
                      current_snapshot=lambda: EMPTY)
    log = Log()
    return OutputConnection(Loop(), queue, log, Throttle(log))


def no_socket(*_args, **_kw):
    raise OSError(errno.EMFILE, "Too many open files")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_callbacks_of_a_closed_output_do_nothing(proto):
    out = output(proto)
    out.close()
    assert out.sock is None
    out._on_connect(WRITE)
    out._on_event(READ | WRITE)
    out.flush()


def test_an_output_without_a_descriptor_goes_down_and_retries(monkeypatch):
    monkeypatch.setattr(connection.socket, "socket", no_socket)
    out = output()
    assert out.queue.state is State.DOWN and out.queue.stats.last_error == "Too many open files"
    assert out._timer is not None and not out._timer.cancelled, "a retry is scheduled"
    (line,) = [e for e in out.log.events if e[1] == "subreceiver_down"]
    assert line[2]["reason"] == "Too many open files"


def target(directory: str = "/nonexistent") -> ExportTarget:
    return ExportTarget(Loop(), directory, Endpoint("127.0.0.1", 9, "tcp"), Log(), on_delivered=print,
                        on_vanished=print, on_drop=print)


def test_callbacks_of_an_export_target_without_a_transfer_do_nothing():
    t = target()
    t._on_connect(WRITE)
    t._on_tcp(READ | WRITE)
    t._on_udp(WRITE)
    assert t.state is export.State.IDLE


def test_an_export_target_without_a_descriptor_goes_down(monkeypatch, tmp_path):
    (tmp_path / "a.ipfix").write_bytes(b"")
    t = target(str(tmp_path))
    monkeypatch.setattr(export.socket, "socket", no_socket)
    t.add("a.ipfix")
    assert t.state is export.State.DOWN and t.last_error == "Too many open files" and t.fh is None
