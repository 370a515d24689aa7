"""core/ledger.py: every loss of a handler counted once, in one place, removed subreceivers and replaced
recorders included."""

from ipfix_balancer.config import Endpoint
from ipfix_balancer.core.ledger import RECORDER, LossLedger, held
from ipfix_balancer.core.records import Held
from ipfix_balancer.core.sendqueue import Budget
from ipfix_balancer.core.session import Lifecycle

A, B, C = (Endpoint("10.0.0.1", 4739, "tcp"), Endpoint("10.0.0.2", 4739, "tcp"), Endpoint("10.0.0.3", 4739, "tcp"))


def test_an_untouched_ledger_reports_no_loss():
    loss = LossLedger([A, B]).loss()
    assert (loss.drops, loss.drop_records, loss.malformed, loss.rcvbuf_overflow) == (0, 0, 0, 0)
    assert loss.drops_by_reason == loss.drop_records_by_reason == loss.malformed_by_reason == {}


def test_drops_sum_over_subreceivers_by_reason_in_messages_and_records():
    ledger = LossLedger([A, B])
    a, b = ledger.subreceivers
    a.drop_counts("queue_full", 2, 20)
    b.drop_counts("queue_full", 1, 5)
    b.drop_counts("stalled", 3, 9)
    loss = ledger.loss()
    assert loss.drops == 6 and loss.drop_records == 34
    assert loss.drops_by_reason == {"queue_full": 3, "stalled": 3}
    assert loss.drop_records_by_reason == {"queue_full": 25, "stalled": 9}


def test_a_reload_keeps_the_counters_of_kept_subreceivers_and_the_losses_of_removed_ones():
    ledger = LossLedger([A, B])
    a, b = ledger.subreceivers
    a.drop_counts("connection_lost", 1, 1)
    b.drop_counts("drain_deadline", 4, 8)
    b.msgs_out = 10
    ledger.subscribe([B, C])
    assert ledger.subreceivers[0] is b and ledger.subreceivers[1].subreceiver == C
    assert ledger.outputs() == [b, ledger.subreceivers[1], a]  # A retired, its outputs still drain
    assert ledger.loss().drops_by_reason == {"connection_lost": 1, "drain_deadline": 4}
    ledger.subscribe([A])  # back: counted afresh, the retired counters stay in the sums
    assert ledger.subreceivers[0] is not a and ledger.loss().drops == 5


def test_recorder_losses_count_under_their_own_reason_the_current_and_the_replaced():
    ledger = LossLedger()
    ledger.recorder_closed(3)
    assert ledger.loss().drops_by_reason == {RECORDER: 3}
    loss = ledger.loss(recorder_drops=2)
    assert loss.drops == 5 and loss.drops_by_reason == {RECORDER: 5} and loss.drop_records == 0


def test_malformed_input_is_counted_once_per_message_by_reason():
    ledger = LossLedger()
    assert [ledger.refused("bad version"), ledger.refused("bad length"), ledger.refused("bad version")] == [1, 2, 3]
    loss = ledger.loss()
    assert loss.malformed == 3 and loss.malformed_by_reason == {"bad version": 2, "bad length": 1}
    assert loss.drops == 0  # refused input is not a delivery loss


def test_kernel_drops_count_from_the_first_reading_and_keep_the_last_when_unreadable():
    ledger = LossLedger()
    ledger.kernel_drops(40)  # a handed-over socket: its predecessor's drops are not ours
    ledger.kernel_drops(45)
    assert ledger.loss().rcvbuf_overflow == 5
    ledger.kernel_drops(None)  # closed or unreadable
    assert ledger.loss().rcvbuf_overflow == 5


def test_a_reported_loss_is_a_copy_not_a_view():
    ledger = LossLedger([A])
    ledger.refused("bad version")
    before = ledger.loss()
    ledger.refused("bad version")
    ledger.subreceivers[0].drop_counts("queue_full", 1, 1)
    assert before.malformed_by_reason == {"bad version": 1} and before.drops_by_reason == {}


def test_sent_sums_every_subreceiver_counted_removed_ones_too():
    ledger = LossLedger([A, B])
    ledger.subreceivers[0].msgs_out, ledger.subreceivers[0].bytes_out = 3, 300
    ledger.subreceivers[1].msgs_out, ledger.subreceivers[1].bytes_out = 1, 50
    ledger.subscribe([A])
    assert ledger.sent() == (4, 350)  # a reload must not make the rates go backwards


class FakeQueue:
    def __init__(self, msgs, records):
        self.counts = (msgs, records)

    def held_counts(self):
        return self.counts


class FakeSession:
    def __init__(self, state, queued_bytes, *queues):
        self.state, self.queued_bytes, self.queues = state, queued_bytes, list(queues)


def test_held_is_what_every_queue_holds_and_what_draining_sessions_still_owe():
    budget = Budget(1000)
    budget.used = 640
    sessions = [FakeSession(Lifecycle.OPEN, 500, FakeQueue(2, 20), FakeQueue(1, 10)),
                FakeSession(Lifecycle.DRAINING, 140, FakeQueue(3, 9)),
                FakeSession(Lifecycle.GONE, 0)]
    assert held(iter(sessions), budget) == Held(queued_bytes=640, memory_bytes=1000, queued_msgs=6,
                                                queued_records=39, draining=1, draining_bytes=140)
