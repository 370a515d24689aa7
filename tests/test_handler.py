"""handler.py: the composition root wires its rooms right. Real loopback sockets (the listener's), a fake
signal wake-up (the test process keeps its own handlers) and a log that records events."""

import json
import socket
import struct
import threading
import time

import pytest

from ipfixkit import LOOPBACK, free_port
from fakes import Log
from ipfix_balancer import config
from ipfix_balancer import handler as handler_mod
from ipfix_balancer.config.host import LocalHost
from ipfix_balancer.control import channel, rundir
from ipfix_balancer.control.exits import Exit
from ipfix_balancer.core.templates import MalformedSet
from ipfix_balancer.handler import Handler

SUBS = "127.0.0.1/1,127.0.0.1/2"


class FakeWakeup:
    """Like control.signals.Wakeup, without touching the process's signal handlers."""

    def __init__(self, _signals):
        self.sock, self._peer = socket.socketpair()
        self.pending = []

    def take(self):
        signals, self.pending = self.pending, []
        return signals


@pytest.fixture(autouse=True)
def no_signals(monkeypatch):
    monkeypatch.setattr(handler_mod, "Wakeup", FakeWakeup)
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())


def receiver(port: int, subs: str = SUBS, proto: str = "tcp") -> config.ReceiverConfig:
    return config.load_values({"IPFIX_FULLFLOW_PORT[0]": str(port), "IPFIX_FULLFLOW_BIND[0]": LOOPBACK,
                         "IPFIX_FULLFLOW_PORT_TYPE[0]": proto, "IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin",
                         "IPFIX_FULLFLOW_BALANCER_SUB[0]": subs}, cpus=range(4)).receivers[0]


def make(tmp_path, rc=None) -> tuple[Handler, Log]:
    log = Log()
    return Handler(rc or receiver(free_port()), str(tmp_path), log), log


def document(h: Handler, tmp_path) -> dict:
    h.write_status()
    with open(rundir.handler_status_path(str(tmp_path), h.rc.stream, h.rc.index)) as f:
        return json.load(f)


def turn_until(h: Handler, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    h.loop.run(until=lambda: done() or time.monotonic() > deadline)
    assert done()


def test_start_listens_and_publishes_then_a_stop_without_loss_exits_ok(tmp_path):
    h, log = make(tmp_path)
    h.start()
    doc = document(h, tmp_path)
    assert doc["listen"]["listening"] and doc["pid"] and doc["drops"] == 0
    assert [s["subreceiver"] for s in doc["subreceivers"]] == ["127.0.0.1/1/tcp", "127.0.0.1/2/tcp"]
    h.stop()
    assert h._done() and not document(h, tmp_path)["listen"]["listening"]
    assert h._finish() is Exit.OK and log.named("handler_stopped")[0]["drops"] == 0


def test_every_refused_message_counts_once_in_one_ledger_whichever_room_refused_it(tmp_path):
    h, log = make(tmp_path)
    h.start()
    with socket.create_connection((LOOPBACK, h.rc.listen.port)) as exporter:
        exporter.sendall(struct.pack("!HH", 9, 16) + bytes(12))  # the listener's framer refuses version 9
        turn_until(h, lambda: log.named("malformed_ipfix"))
    session = type("S", (), {"peer": "192.0.2.1:4000"})()
    h._session_refused(session, MalformedSet("reserved_set_id", "set id 3"), first=True)  # the session refuses
    h._session_refused(session, MalformedSet("reserved_set_id", "set id 3"), first=False)  # counted, not logged
    doc = document(h, tmp_path)
    assert doc["malformed"] == 3 and doc["malformed_by_reason"] == {"bad_version": 1, "reserved_set_id": 2}
    assert [e["malformed_total"] for e in log.named("malformed_ipfix")] == [1, 2]
    assert doc["drops"] == 0  # refused input is not lost output


def test_a_removed_subreceiver_leaves_the_document_and_its_losses_stay_counted(tmp_path):
    h, log = make(tmp_path)
    h.start()
    h.ledger.subreceivers[1].drop_counts("connection_lost", 2, 6)
    h.reconfigure(receiver(h.rc.listen.port, subs="127.0.0.1/1"))
    doc = document(h, tmp_path)
    assert [s["subreceiver"] for s in doc["subreceivers"]] == ["127.0.0.1/1/tcp"]
    assert (doc["drops"], doc["drop_records"], doc["drops_by_reason"]) == (2, 6, {"connection_lost": 2})
    assert log.named("reconfigured")
    h.stop()
    assert h._finish() is Exit.FAILED  # lost over its life: not a clean exit
    assert log.named("handler_stopped_with_loss")[0]["drops_by_reason"] == {"connection_lost": 2}


def test_a_successor_that_dies_before_asking_leaves_the_handler_serving(tmp_path):
    h, log = make(tmp_path)
    ours, theirs = socket.socketpair()
    supervisor, h.control = socket.socketpair()
    h.start()
    channel.send(supervisor, {"handover": True}, (theirs.fileno(),))
    theirs.close()
    turn_until(h, lambda: h.successor is not None)
    ours.close()  # the successor died while starting
    turn_until(h, lambda: log.named("handover_abandoned"))
    assert log.named("handover_abandoned") == [{"reason": "successor closed"}]
    assert h.successor is None and document(h, tmp_path)["listen"]["listening"]
    supervisor.close()  # and then the supervisor: a handler without one stops
    turn_until(h, lambda: h.stopping)
    assert log.named("supervisor_gone") and h._finish() is Exit.OK


def test_a_restart_in_place_hands_the_listening_socket_and_sessions_to_the_successor(tmp_path):
    old, old_log = make(tmp_path)
    supervisor, old.control = socket.socketpair()
    old.start()
    exporter = socket.create_connection((LOOPBACK, old.rc.listen.port))
    turn_until(old, lambda: old.sessions)
    to_successor, from_predecessor = socket.socketpair()
    channel.send(supervisor, {"handover": True}, (to_successor.fileno(),))  # as the supervisor announces it
    to_successor.close()
    turn_until(old, lambda: old.successor is not None)
    new, new_log = make(tmp_path / "new", rc=old.rc)
    (tmp_path / "new").mkdir()
    taking = threading.Thread(target=new.start, args=(from_predecessor,))
    taking.start()
    turn_until(old, lambda: old.status is None)
    taking.join(10)
    assert old_log.named("handed_over") == [{"sessions": 1}] and old.stopping
    assert new_log.named("took_over")[0]["sessions"] == 1 and len(new.sessions) == 1
    doc = document(new, tmp_path / "new")
    assert doc["listen"]["listening"] and doc["connections"] == 1
    with socket.create_connection((LOOPBACK, old.rc.listen.port)):  # the successor accepts now
        turn_until(new, lambda: len(new.sessions) == 2)
    exporter.close()
    turn_until(old, old._done)
    assert old._finish() is Exit.OK
    new.stop()
    turn_until(new, new._done)
    assert new._finish() is Exit.OK
    supervisor.close()


def test_a_stop_while_a_successor_is_announced_cancels_the_handover(tmp_path):
    h, log = make(tmp_path)
    supervisor, h.control = socket.socketpair()
    ours, theirs = socket.socketpair()
    h.start()
    channel.send(supervisor, {"handover": True}, (theirs.fileno(),))
    theirs.close()
    turn_until(h, lambda: h.successor is not None)
    h.stop()
    assert h.successor is None and ours.recv(1) == b""  # our end closed: the successor binds anew
    assert h._finish() is Exit.OK
    supervisor.close()
