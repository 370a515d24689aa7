"""Dispatchers without sockets: batch dispatch equals message-by-message dispatch; RoundRobin skips
outputs that are down or full and moves a failed output's queue; templates reach every output."""

from hypothesis import given, settings, strategies as st

from ipfix_balancer.core.dispatch import Replicate, RoundRobin
from ipfix_balancer.core.sendqueue import Budget, SendQueue, State, SubreceiverStats
from ipfix_balancer.core.templates import EMPTY

from fakes import FakeTransport
from test_sendqueue import data_message, ident_of


def queues(n: int, states=None, limit: int = 1_000_000) -> list[SendQueue]:
    out = []
    for i in range(n):
        q = SendQueue(SubreceiverStats(f"c{i}"), limit=limit, rewrite_seq=True, current_snapshot=lambda: EMPTY)
        q.transport = FakeTransport()
        q.state = states[i] if states else State.UP
        out.append(q)
    return out


def contents(qs) -> list[list[int]]:
    return [[ident_of(e[0]) for e in q.pending] for q in qs]


def entries(sizes):
    return [(data_message(i, size), 7, 1, EMPTY) for i, size in enumerate(sizes)]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=5),
       st.lists(st.integers(min_value=24, max_value=3000), max_size=40),
       st.lists(st.sampled_from([State.UP, State.DOWN, State.CONNECTING]), min_size=5, max_size=5),
       st.integers(min_value=3000, max_value=200_000),
       st.integers(min_value=0, max_value=4))
def test_dispatch_many_equals_dispatch_one_by_one(n, sizes, states, limit, start):
    batch, single = queues(n, states, limit), queues(n, states, limit)
    a, b = RoundRobin(batch), RoundRobin(single)
    a._next = b._next = start % n
    items = entries(sizes)
    a.dispatch_many(items, sum(sizes))
    for msg, odid, nrec, snap in items:
        b.dispatch(msg, odid, nrec, None, snap)
    assert contents(batch) == contents(single)
    assert [q.stats.drops for q in batch] == [q.stats.drops for q in single]
    assert a._next == b._next


def test_round_robin_rotates_and_skips_outputs_that_are_down_or_full():
    qs = queues(3, [State.UP, State.DOWN, State.UP], limit=120)
    rr = RoundRobin(qs)
    for msg, odid, nrec, snap in entries([40] * 4):
        rr.dispatch(msg, odid, nrec, None, snap)
    assert contents(qs) == [[0, 2], [], [1, 3]]
    qs[0].enqueue((data_message(9, 40), 7, 1, EMPTY))  # 0 has no room for another 40 bytes now
    msg, odid, nrec, snap = entries([40])[0]
    rr.dispatch(msg, odid, nrec, None, snap)
    assert contents(qs)[2] == [1, 3, 0]


def test_round_robin_queues_on_a_down_output_when_none_is_up():
    qs = queues(2, [State.DOWN, State.CONNECTING])
    rr = RoundRobin(qs)
    for msg, odid, nrec, snap in entries([40] * 3):
        rr.dispatch(msg, odid, nrec, None, snap)
    assert contents(qs) == [[0, 2], [1]]  # waiting for a connection, nothing dropped


def test_round_robin_moves_a_failed_outputs_queue_to_live_ones():
    qs = queues(3, [State.DOWN, State.UP, State.UP])
    for e in entries([40] * 4):
        qs[0].enqueue(e)
    RoundRobin(qs).on_down(qs[0])
    assert contents(qs) == [[], [0, 2], [1, 3]]


def test_round_robin_keeps_the_queue_when_nothing_else_is_up():
    qs = queues(2, [State.DOWN, State.DOWN])
    for e in entries([40] * 2):
        qs[0].enqueue(e)
    RoundRobin(qs).on_down(qs[0])
    assert contents(qs) == [[0, 1], []]


def test_templates_reach_every_output_data_only_the_chosen_one():
    qs = queues(3)
    rr = RoundRobin(qs)
    msg = data_message(5, 60)
    tmpl = data_message(6, 30)  # stands for the template-only copy
    rr.dispatch(msg, 7, 2, tmpl, EMPTY)
    assert contents(qs) == [[5], [6], [6]]
    assert [e[2] for q in qs for e in q.pending] == [2, 0, 0]  # the copies carry no records


def test_replicate_gives_every_output_everything():
    qs = queues(3, [State.UP, State.DOWN, State.UP])
    rep = Replicate(qs)
    items = entries([40] * 3)
    rep.dispatch_many(items[:2], 80)
    msg, odid, nrec, snap = items[2]
    rep.dispatch(msg, odid, nrec, None, snap)
    assert contents(qs) == [[0, 1, 2]] * 3


def budgeted(n: int, budget, states=None, limit: int = 1_000_000) -> list[SendQueue]:
    qs = queues(n, states, limit)
    for q in qs:  # as a handler builds them: every queue shares the one budget
        q.budget = budget
        budget.queues.add(q)
    return qs


def test_all_at_the_memory_budget_drops_the_oldest_of_the_largest_queue():
    """Two collectors down, one up and drained: the down ones fill; at the handler-wide budget the largest
    loses its oldest messages (reason memory_budget), the total stays bounded, the newest are kept."""
    budget = Budget(10_000)
    qs = budgeted(2, budget, [State.DOWN, State.DOWN])
    small = queues(1, [State.DOWN])[0]
    small.budget = budget
    budget.queues.add(small)
    small.enqueue(entries([100])[0])
    replicate = Replicate(qs)
    for e in entries([100] * 200):
        replicate.dispatch(e[0], e[1], e[2], None, EMPTY)
    assert budget.used == sum(q.pending_bytes for q in qs + [small]) <= 10_000
    assert contents(qs)[0][-1] == contents(qs)[1][-1] == 199, "the newest message is kept"
    assert small.pending_bytes == 100, "the largest queues shed, not the small one"
    for q in qs:
        dropped = 200 - len(q.pending)
        assert dropped > 0 and q.stats.drops == q.stats.drops_by_reason["memory_budget"] == dropped
    for q in qs:  # closing returns the bytes to the budget
        q.close()
    assert budget.used == 100


def test_round_robin_at_the_memory_budget_skips_outputs_that_are_not_up():
    """A down output's queue only grows: under the budget it holds messages for its connection, at the
    budget it takes no more and the output that is up gets them (dropping its own oldest when full)."""
    budget = Budget(800)
    down, up = budgeted(2, budget, [State.DOWN, State.UP], limit=500)
    rr = RoundRobin([down, up])
    for e in entries([100] * 40):
        rr.dispatch(e[0], e[1], e[2], None, EMPTY)
    assert len(up.pending) == 5 and contents([up])[0][-1] == 39, "the up output has the newest"
    assert len(down.pending) == 3, "the down output filled only up to the budget"
    assert budget.used == 800


def test_a_full_live_output_is_flushed_before_a_stalled_one_is_chosen():
    """Two reads per turn can outgrow a small queue: the live output's kernel may take some first, rather
    than the message waiting at a collector that does not read."""
    live, stalled = queues(2, [State.UP, State.STALLED], limit=100)
    rr = RoundRobin([live, stalled])

    class Writes(FakeTransport):
        def flush(self):  # the kernel takes everything queued
            super().flush()
            live.take_pending()
    live.transport = Writes()
    for msg, odid, nrec, snap in entries([60, 60]):
        rr.dispatch(msg, odid, nrec, None, snap)
    assert live.transport.flushed == 1 and contents([live, stalled]) == [[1], []]
