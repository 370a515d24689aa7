"""control/health.py and control/metrics.py without processes: counters carried over restarts, /healthz."""
import dataclasses
import json
import os
import time
import types

import pytest

from ipfix_balancer.control import rundir
from ipfix_balancer.control.health import CounterCarry, Watch
from ipfix_balancer.control.metrics import HandlerView, MetricsSnapshot, counter_samples, health
from ipfix_balancer.control.sdnotify import Notifier
from ipfix_balancer.control.status import SubreceiverStatus

from fakes import Log
from test_status import NOW, handler

IN = ("ipfix_balancer_messages_received", ())
SENT = ("ipfix_balancer_messages_sent", (("subreceiver", "10.0.0.2/9920/tcp"),))


def test_counters_carry_over_a_new_process_and_a_counter_that_restarts():
    carry = CounterCarry()
    assert carry.see("fullflow[0]", 10, {IN: 100, SENT: 40})[IN] == 100
    assert carry.see("fullflow[0]", 11, {IN: 5}) == {IN: 105, SENT: 40}   # new pid: both banked
    assert carry.see("fullflow[0]", 11, {IN: 7, SENT: 3}) == {IN: 107, SENT: 43}
    assert carry.see("fullflow[0]", 11, {IN: 9, SENT: 1}) == {IN: 109, SENT: 44}   # subreceiver re-added: from 0
    again = CounterCarry.from_json(json.loads(json.dumps(carry.to_json())))
    assert again.see("fullflow[0]", 12, {IN: 1, SENT: 0}) == {IN: 110, SENT: 44}   # after a restart in place


def test_dropped_messages_by_reason_and_the_rest_unspecified():
    doc = handler(subreceivers=[SubreceiverStatus("10.0.0.2/9920/tcp", "stalled", 1, 5, 500, 9, 0,
                                                  drops_by_reason={"queue_full": 6})])
    drops = {labels: v for (name, labels), v in counter_samples(doc).items()
             if name == "ipfix_balancer_dropped_messages"}
    sub = ("subreceiver", "10.0.0.2/9920/tcp")
    assert drops == {(sub, ("reason", "queue_full")): 6, (sub, ("reason", "unspecified")): 3}


def view(doc, name="fullflow[0]") -> HandlerView:
    return HandlerView(name, "FULLFLOW", 0, doc, 0, {})


def test_healthz_needs_every_handler_fresh_and_a_supervisor_that_looks():
    ok = MetricsSnapshot(NOW, NOW, 15, (view(handler(time=NOW - 1)),))
    assert health(ok, NOW + 1) == (True, "fullflow[0] pid 4242 ok\n")
    stale = dataclasses.replace(ok, handlers=ok.handlers + (view(handler(time=NOW - 5), "fullflow[1]"),
                                                            view(None, "dnsflow[0]")))
    assert health(stale, NOW + 1) == (False, "fullflow[0] pid 4242 ok\nfullflow[1] pid 4242 STALE: no status "
                                             "for 5s\ndnsflow[0] not running\n")
    assert health(ok, NOW + 20) == (False, "fullflow[0] pid 4242 ok\nsupervisor: has not looked at the handlers "
                                           "for 20s\n")


def test_notify_socket_and_watchdog_environment():
    n = Notifier({"NOTIFY_SOCKET": "@sd/notify", "WATCHDOG_USEC": "30000000"})
    assert (n.address, n.watchdog_interval) == ("\0sd/notify", 15.0)
    other = Notifier({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None
    assert Notifier({}).send("READY=1") is False


def test_kernel_drops_of_a_udp_listener_are_a_counter_tcp_has_none():
    from ipfix_balancer.control.status import ListenStatus
    udp = handler(listen=ListenStatus("udp", "0.0.0.0", 1500, True), rcvbuf_overflow=17)
    assert counter_samples(udp)["ipfix_balancer_rcvbuf_overflow", ()] == 17
    assert ("ipfix_balancer_rcvbuf_overflow", ()) not in counter_samples(handler()), "TCP has no such drops"


class _Child:
    """What Watch.turn reads of the supervisor's Child."""

    def __init__(self, pid: int, started: float):
        self.rc = types.SimpleNamespace(stream="FULLFLOW", index=0, name="fullflow[0]")
        self.pid, self.started, self.restarts = pid, started, 0


def test_watch_judges_the_monotonic_heartbeat_and_never_an_unreadable_document(tmp_path):
    run, mono = str(tmp_path), time.monotonic()
    path = rundir.handler_status_path(run, "FULLFLOW", 0)
    child = _Child(4242, mono - 100)
    watch = Watch(run, 15)
    # the wall clock stepped 1,000 s either way since the handler wrote: its monotonic beat is 1 s old
    for step in (-1000, 1000):
        rundir.write_json(path, handler(time=time.time() + step, beat=mono - 1).to_dict())
        assert watch.turn([child], mono) == [] and watch.unreadable == {}
        assert watch.summary().startswith("1/1 handlers healthy")
    rundir.write_json(path, handler(beat=mono - 20).to_dict())
    assert watch.turn([child], mono) == [(child, 20)]
    # a document that cannot be read (here a planted symlink: ELOOP; EMFILE alike) is no evidence of a hang
    rundir.write_json(path, handler(beat=mono - 1).to_dict())
    watch.turn([child], mono)
    os.replace(path, path + ".real")
    os.symlink(path + ".real", path)
    assert watch.turn([child], mono + 60) == []
    assert "Too many levels of symbolic links" in watch.unreadable["fullflow[0]"]
    assert watch.snapshot.handlers[0].doc.pid == 4242  # the last view is kept
    os.unlink(path)  # gone: silence again, counted from its start
    assert watch.turn([child], mono + 60) == [(child, 160)]


def test_the_carry_a_supervisor_saves_is_what_its_successor_loads(tmp_path):
    watch = Watch(str(tmp_path), 15)
    watch.carry.see("fullflow[0]", 10, {IN: 100, SENT: 40})
    watch.carry.see("fullflow[0]", 11, {IN: 5})
    watch.save({"fullflow[0]": 3})
    successor, log = Watch(str(tmp_path), 15), Log()
    assert successor.load(log) == {"fullflow[0]": 3} and log.events == []
    assert successor.carry.see("fullflow[0]", 12, {IN: 1}) == {IN: 106, SENT: 40}


GOOD = {"pid": 10, "last": [["ipfix_balancer_messages_received", [], 7]], "offset": []}


@pytest.mark.parametrize("doc, restarts, carried, ignored", [
    ({"restarts": 1}, {}, [], ["restarts: not a JSON object"]),
    ({"restarts": [1]}, {}, [], ["restarts: not a JSON object"]),
    ({"restarts": {"a": "x", "b": True, "c": 2}}, {"c": 2}, [], ["restarts: a:", "restarts: b:"]),
    ({"counters": [1], "restarts": {"c": 2}}, {"c": 2}, [], ["counters: not a JSON object"]),
    ({"counters": {"a": {"pid": 10, "last": [["ipfix_balancer_messages_received", [], "7"]], "offset": []},
                   "b": {"pid": "10", "last": [], "offset": []}, "c": GOOD}},
     {}, ["c"], ["counters: a:", "counters: b:"]),
])
def test_a_carry_entry_of_another_shape_is_logged_and_starts_from_0(tmp_path, doc, restarts, carried, ignored):
    """A bad supervisor.carry.json (a bug, another release, tampering) must not stop the supervisor at its start
    (restarts), nor every turn after it (a counter that is not a number)."""
    rundir.write_json(rundir.supervisor_carry_path(str(tmp_path)), doc)
    watch, log = Watch(str(tmp_path), 15), Log()
    assert watch.load(log) == restarts
    assert sorted(watch.carry.handlers) == carried
    reasons = [e["reason"] for e in log.named("carry_ignored")]
    assert len(reasons) == len(ignored) and all(r.startswith(i) for r, i in zip(reasons, ignored)), reasons
    assert [watch.carry.totals(name) for name in carried] == [{IN: 7}] * len(carried)
    assert not os.path.exists(rundir.supervisor_carry_path(str(tmp_path)))
