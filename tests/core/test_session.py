"""Exporter sessions without sockets: delivery through the dispatcher, reconfiguration (kept queues stay,
a mode switch opens fresh ones, a removed subreceiver drains), and the end of a session."""

import struct

from hypothesis import example, given, settings, strategies as st

from ipfix_balancer.config import Mode
from ipfix_balancer.core.dispatch import Replicate, RoundRobin
from ipfix_balancer.core.sendqueue import DRAIN_DEADLINE, SendQueue, State, SubreceiverStats
from ipfix_balancer.core.session import Counters, ExporterSession, Forwarding, Lifecycle
from ipfix_balancer.core.wire import HEADER

from fakes import FakeTransport
from test_sendqueue import data_message, ident_of, lose, messages, stall, up, write


class Outputs:
    """The injected factory: queues with fake transports, all up at once."""

    def __init__(self):
        self.made: list[SendQueue] = []

    def __call__(self, stats, **settings) -> SendQueue:
        queue = SendQueue(stats, **settings)
        queue.transport = FakeTransport()
        queue.acks.track = True
        up(queue)
        self.made.append(queue)
        return queue


def session(outputs=None):
    gone = []
    s = ExporterSession("10.0.0.1:4739", Counters(), outputs or Outputs(), gone.append)
    return s, gone


def forwarding(mode, subs, recorder=None):
    return Forwarding(mode, subs, 1_000_000, 0.0, recorder)


def template_message() -> memoryview:
    tset = struct.pack("!HHHHHH", 2, 12, 256, 1, 8, 4)
    return memoryview(bytearray(HEADER.pack(10, 16 + len(tset), 1, 0, 7) + tset))


def test_deliver_spreads_data_and_copies_templates():
    subs = [SubreceiverStats("a"), SubreceiverStats("b")]
    s, _ = session()
    s.configure(forwarding(Mode.ROUND_ROBIN, subs))
    assert s.deliver([template_message()] + [data_message(i) for i in range(4)]) == (5, None)
    a, b = s.queues
    assert len(a.pending) == 3 and len(b.pending) == 3  # the template to both, data spread
    assert s.counters.msgs_in == 5 and s.counters.bytes_in == 28 + 4 * 40
    assert s.deliver([data_message(i) for i in range(4, 7)]) == (3, None), "a data-only run, in one step"


def test_reconfigure_keeps_the_queues_of_kept_subreceivers():
    outputs = Outputs()
    a, b, c = SubreceiverStats("a"), SubreceiverStats("b"), SubreceiverStats("c")
    s, _ = session(outputs)
    s.configure(forwarding(Mode.ROUND_ROBIN, [a, b]))
    kept = s.queues[0]
    kept.enqueue((data_message(1), 7, 1, s.tracker.snapshot))
    s.configure(forwarding(Mode.ROUND_ROBIN, [a, c]))
    assert s.dispatcher.queues[0] is kept and [ident_of(e[0]) for e in kept.pending] == [1]
    assert s.dispatcher.queues[1].subreceiver == "c"
    removed = outputs.made[1]
    assert removed.state is State.CLOSED  # it was idle: drained at once
    assert len(outputs.made) == 3


def test_a_removed_subreceiver_with_a_queue_drains_before_closing():
    outputs = Outputs()
    a, b = SubreceiverStats("a"), SubreceiverStats("b")
    s, _ = session(outputs)
    s.configure(forwarding(Mode.ALL, [a, b]))
    s.deliver([data_message(1)])
    s.configure(forwarding(Mode.ALL, [a]))
    retired = outputs.made[1]
    assert retired.closing and retired.transport.draining == 1 and retired in s.queues
    assert retired not in s.dispatcher.queues


def test_switching_mode_opens_fresh_output_sessions():
    outputs = Outputs()
    a = SubreceiverStats("a")
    s, _ = session(outputs)
    s.configure(forwarding(Mode.ROUND_ROBIN, [a]))
    first = s.queues[0]
    s.configure(forwarding(Mode.ALL, [a]))
    assert isinstance(s.dispatcher, Replicate) and s.dispatcher.queues[0] is not first
    assert not s.dispatcher.queues[0].sequencer.rewrite and first.sequencer.rewrite
    s.configure(forwarding(Mode.ROUND_ROBIN, [a]))
    assert isinstance(s.dispatcher, RoundRobin) and len(outputs.made) == 3


def test_recording_mode_hands_messages_to_the_recorder():
    class Recorder:
        def __init__(self):
            self.got = []

        def dispatch(self, msg, odid, nrec, tmpl, snapshot):
            self.got.append(("one", bytes(msg)))

        def dispatch_many(self, entries, size):
            self.got.extend(("many", bytes(e[0])) for e in entries)

    rec = Recorder()
    s, _ = session()
    s.configure(forwarding(Mode.DISABLED, [], rec))
    tmpl, d1, d2 = template_message(), data_message(1), data_message(2)
    s.deliver([d1, tmpl, d2])
    assert [kind for kind, _ in rec.got] == ["many", "one", "many"]
    assert not s.queues


def test_end_drains_then_reports_gone_once():
    s, gone = session()
    s.configure(forwarding(Mode.ALL, [SubreceiverStats("a")]))
    s.deliver([data_message(1)])
    s.end()
    assert s.state is Lifecycle.DRAINING and not gone
    queue = s.queues[0]
    queue.stream.written(len(queue.stream.next_iovec()[0]))
    queue.check_settled()
    assert s.state is Lifecycle.DRAINING, "written, not yet acknowledged: it could come back"
    queue.acknowledged(queue.acks.sent_total)
    queue.check_settled()  # what the transport does after each acknowledgement of a closing queue
    assert s.state is Lifecycle.GONE and gone == [s]
    s.end()
    assert gone == [s]


def test_malformed_message_dropped_reported_once_per_reason_and_limit_ends_delivery():
    from ipfix_balancer.config import TemplateLimits
    refusals = []
    s = ExporterSession("10.0.0.1:4739", Counters(), Outputs(), lambda _s: None,
                        on_refused=lambda sess, err, first: refusals.append((err.reason, first)))
    s.configure(Forwarding(Mode.ALL, [SubreceiverStats("a")], 1_000_000, 0.0,
                           template_limits=TemplateLimits(templates_max=1)))
    bad = bytearray(data_message(9))
    bad[18:20] = b"\x00\x00"  # the data set's length: 0
    second = bytearray(template_message())
    second[20:22] = b"\x01\x01"  # template id 257: one template too many for ODID 7
    assert s.deliver([template_message(), data_message(1), memoryview(bad), memoryview(bad), data_message(2)]) \
        == (3, None), "the dropped ones are not dispatched"
    (queue,) = s.queues
    assert [bytes(e[0]) for e in queue.pending][1:] == [bytes(data_message(1)), bytes(data_message(2))]
    dispatched, refused = s.deliver([data_message(3), memoryview(second), data_message(4)])
    assert dispatched == 1 and refused is not None and refused.reason == "templates_max"
    assert refusals == [("set_length", True), ("set_length", False), ("templates_max", True)]
    assert bytes(queue.pending[-1][0]) == bytes(data_message(3)) and len(s.tracker.snapshot) == 1


def test_a_udp_run_goes_on_after_a_datagram_over_a_template_limit():
    """UDP datagrams stand alone (``stop=False``): the one refused is counted, the next ones are delivered, and
    the delivery reports both (a listener counts the run as activity: it dispatched some)."""
    from ipfix_balancer.config import TemplateLimits
    refusals = []
    s = ExporterSession("10.0.0.1:4739", Counters(), Outputs(), lambda _s: None,
                        on_refused=lambda sess, err, first: refusals.append(err.reason))
    s.configure(Forwarding(Mode.ALL, [SubreceiverStats("a")], 1_000_000, 0.0,
                           template_limits=TemplateLimits(templates_max=1)))
    second = bytearray(template_message())
    second[20:22] = b"\x01\x01"  # template id 257: one template too many for ODID 7
    run = [template_message(), data_message(3), memoryview(second), data_message(4), data_message(5)]
    dispatched, refused = s.deliver(run, stop=False)
    assert dispatched == 4 and refused is not None and refused.reason == "templates_max"
    (queue,) = s.queues
    assert [ident_of(e[0]) for e in list(queue.pending)[1:]] == [3, 4, 5] and refusals == ["templates_max"]
    assert s.counters.msgs_in == 5 and s.counters.bytes_in == sum(map(len, run))


# -- a session outlives its exporter ----------------------------------------------------------------
def deliver_and_leave(mode, states, n=10):
    subs = [SubreceiverStats(name) for name in "ab"]
    s, gone = session()
    s.configure(forwarding(mode, subs))
    for queue, state in zip(s.queues, states):
        if state is State.DOWN:
            lose(queue, "Connection refused")
    s.deliver([data_message(i) for i in range(n)])
    s.end()
    return s, gone, subs


def collect(queue) -> list[int]:
    """The collector of ``queue`` reads everything written (its TCP acknowledges it)."""
    got = [ident_of(m) for m in messages(write(queue))]
    queue.acknowledged(queue.acks.sent_total)
    queue.check_settled()
    return got


def test_all_a_collector_that_comes_back_after_the_exporter_left_gets_everything():
    s, gone, _ = deliver_and_leave(Mode.ALL, [State.UP, State.DOWN])
    a, b = s.queues
    assert collect(a) == list(range(10))
    assert s.state is Lifecycle.DRAINING and a.state is State.UP, "a stays while b still owes data"
    up(b)
    assert collect(b) == list(range(10)) and s.state is Lifecycle.GONE and gone == [s]


def test_roundrobin_all_down_the_first_collector_back_gets_everything():
    s, gone, subs = deliver_and_leave(Mode.ROUND_ROBIN, [State.DOWN, State.DOWN])
    a, b = s.queues
    up(a)
    a.came_up()  # what the transport does once the output is up and healthy
    assert sorted(collect(a)) == list(range(10)) and s.state is Lifecycle.GONE and gone == [s]
    assert subs[0].drops == subs[1].drops == 0


def test_roundrobin_a_hung_collector_after_the_exporter_left_costs_only_what_its_kernel_took_counted():
    s, gone, subs = deliver_and_leave(Mode.ROUND_ROBIN, [State.UP, State.UP])
    a, b = s.queues
    got_a = collect(a)
    assert s.state is Lifecycle.DRAINING, "a stays while b holds data"
    write(b)  # its kernel takes all five, acknowledges two, its process reads none
    b.acknowledged(80)
    stall(b)
    b.went_down()
    lose(b, "stalled", acked="count")  # reset after another stall: the tail is counted, the rest moves
    b.went_down()
    got_a += collect(a)
    b.check_settled()
    assert sorted(got_a) == [i for i in range(10) if i not in (1, 3)], "b's two acknowledged are not resent"
    assert subs[1].drops_by_reason == {"connection_lost": 2}
    assert s.state is Lifecycle.GONE and gone == [s]


# -- the accounting property, with exporters that leave ---------------------------------------------------
session_ops = st.lists(st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 6)),
    st.tuples(st.sampled_from(["write", "kernel_ack", "read", "up", "refused", "fin", "reset", "stall",
                               "deadline"]), st.integers(0, 1)),
    st.tuples(st.just("end"), st.just(0)),
), max_size=50)


def held_ids(q) -> set[int]:
    if q.state is State.CLOSED:
        return set()
    kept = [e for _b, _e, entries in q.acks.unacked if isinstance(entries, list) for e in entries]
    return {ident_of(e[0]) for e in list(q.pending) + q.stream.entries + kept}


@settings(max_examples=400, deadline=None)
@given(session_ops, st.sampled_from([Mode.ROUND_ROBIN, Mode.ALL]))
@example([("deliver", 3), ("write", 0), ("kernel_ack", 0), ("reset", 0)], Mode.ROUND_ROBIN)
@example([("deliver", 2), ("write", 0), ("kernel_ack", 0), ("end", 0), ("stall", 0), ("deadline", 0)],
         Mode.ALL)
@example([("deliver", 2), ("end", 0), ("refused", 1), ("write", 0), ("kernel_ack", 0), ("read", 0)],
         Mode.ROUND_ROBIN)
@example([("deliver", 2), ("write", 1), ("kernel_ack", 1), ("refused", 1)], Mode.ROUND_ROBIN)
def test_every_message_of_a_session_that_leaves_is_read_once_held_or_counted(steps, mode):
    """Two outputs; collectors that come and go, close (FIN: their process read all their TCP acknowledged)
    or reset (what their process had not read is gone), stall; an exporter that leaves; a drain deadline.
    Every message is read by a collector's process at most once (RoundRobin: once over both), and read,
    still held by the session, or counted as dropped — exactly."""
    subs = [SubreceiverStats("a"), SubreceiverStats("b")]
    s, _gone = session()
    s.configure(forwarding(mode, subs))
    outputs = list(s.queues)
    stream = [b"", b""]  # each output's current connection: what its kernel took
    done = [0, 0]        # how far the collector's process read that stream
    read: list[list[int]] = [[], []]
    sent = 0

    def collector_reads(i: int, upto: int) -> None:
        read[i] += [ident_of(m) for m in messages(stream[i][:upto])][len(messages(stream[i][:done[i]])):]
        done[i] = max(done[i], upto)

    def connected(q) -> None:
        q.life.window.largest = q.life.window.now = 65535  # the handshake's: its buffer is empty

    for q in outputs:
        connected(q)
    for op, i in steps:
        before = [q.state for q in outputs]
        q = outputs[i] if op != "deliver" else None
        if op == "deliver":
            if s.state is Lifecycle.OPEN:
                s.deliver([data_message(sent + n) for n in range(i)])
                sent += i
        elif op == "end":
            s.end()
        elif q.state is State.CLOSED:
            continue
        elif op == "write" and q.state in (State.UP, State.PROBATION):
            stream[i] += write(q)
        elif op == "kernel_ack" and q.state is not State.DOWN:
            q.acknowledged(len(stream[i]))
            if q.acks.acked > done[i]:  # its kernel holds it, unread: the window it offers shrinks
                q.life.observe(0, q.acks.acked, 0)
            q.check_settled()
        elif op == "read" and q.state is not State.DOWN:
            collector_reads(i, q.acks.acked)
            if q.life.observe(0, q.acks.acked, 65535) is not None or not q.life.unread:
                q.read_all()
            q.check_settled()
        elif op == "up" and q.state is State.DOWN:
            up(q)
            stream[i], done[i] = b"", 0
            connected(q)
            q.came_up()
        elif op in ("refused", "fin", "reset") and q.state is not State.DOWN:
            if op == "fin":
                collector_reads(i, q.acks.acked)
            lose(q, op, q.life.unread_fate(clean=op == "fin"))  # only a FIN says its process read everything
            stream[i], done[i] = b"", 0
            q.went_down()
            q.check_settled()
        elif op == "stall" and q.state is State.UP:
            stall(q)
            q.went_down()
        elif op == "deadline" and s.state is Lifecycle.DRAINING:
            q.close(DRAIN_DEADLINE)
        for n, out in enumerate(outputs):  # closed now: what its kernel held unread it reads, unless reset
            if out.state is State.CLOSED and before[n] is not State.CLOSED and not out.transport.aborted:
                collector_reads(n, len(stream[n]) if before[n] is not State.DOWN else 0)
    for n, out in enumerate(outputs):  # still connected: its process reads what its kernel holds
        if out.state is not State.CLOSED and out.state is not State.DOWN:
            collector_reads(n, out.acks.acked)
    if mode is Mode.ROUND_ROBIN:
        together = read[0] + read[1]
        held = held_ids(outputs[0]) | held_ids(outputs[1])
        assert len(together) == len(set(together)), "a message read twice"
        assert not set(together) & held
        assert len(together) + len(held) + subs[0].drops + subs[1].drops == sent
    else:
        for i, q in enumerate(outputs):
            assert len(read[i]) == len(set(read[i])), "a message read twice by one collector"
            assert len(read[i]) + len(held_ids(q)) + subs[i].drops == sent, i


def test_past_the_drain_limit_the_first_sessions_to_leave_are_closed_counted():
    from ipfix_balancer.core.session import over_drain_limit
    sessions = []
    for _ in range(5):
        s, _gone = session(Outputs())
        s.configure(forwarding(Mode.ALL, [SubreceiverStats("a")]))
        s.deliver([data_message(1)])
        sessions.append(s)
    open_one = sessions.pop(2)  # still open: never counted against the limit
    for s in reversed(sessions):  # they leave in this order
        s.end()
    assert over_drain_limit(sessions + [open_one], 4) == []
    assert over_drain_limit(sessions + [open_one], 2) == [sessions[3], sessions[2]]
    dropped = over_drain_limit(sessions, 3)[0].abandon("drain_limit")
    assert dropped == 1 and sessions[3].state is Lifecycle.GONE


def test_a_subreceiver_added_by_a_reload_takes_what_waits_at_one_that_is_down():
    """A new output that is up as soon as it is made (UDP) tells the dispatcher at once: RoundRobin moves to it
    what waits at an output that is down, as for any output coming up."""
    a, b = SubreceiverStats("a"), SubreceiverStats("b")
    s, _ = session()
    s.configure(forwarding(Mode.ROUND_ROBIN, [a]))
    (qa,) = s.queues
    lose(qa, "connection_lost")
    s.deliver([data_message(i) for i in range(4)])
    assert len(qa.pending) == 4
    s.configure(forwarding(Mode.ROUND_ROBIN, [a, b]))
    qa, qb = s.queues
    assert (len(qa.pending), [ident_of(e[0]) for e in qb.pending]) == (0, [0, 1, 2, 3])
