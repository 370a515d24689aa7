"""The send queue without sockets: partial writes, connection loss at every point, acknowledgement tracking,
stall, drop-oldest, drops by reason, template replay, sequence rewrite, and the accounting property (every
message delivered once, queued, or counted)."""

import errno
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ipfix_balancer.core.sequencer import Sequencer
from ipfix_balancer.core.sendqueue import DELIVERED, OVERSIZE, Budget, SendQueue, State, SubreceiverStats
from ipfix_balancer.core.templates import EMPTY, TemplateTracker
from ipfix_balancer.core.wire import HEADER, walk

from fakes import FakeTransport

ODID = 7


def up(queue: SendQueue, now: int = 0, probation: bool = False) -> None:
    """What a transport does when a connection is established: the lifecycle first, then the queue."""
    queue.life.retry.suspect = probation
    if queue.state is not State.DOWN:
        queue.life.lost(now)
    queue.life.connecting()
    queue.life.connected(now)
    queue.connection_up(now)


def lose(queue: SendQueue, reason: str, acked=DELIVERED):
    """What a transport does when a connection fails: the queue takes back, the lifecycle goes DOWN."""
    got = queue.connection_lost(reason, acked)
    if queue.state is not State.DOWN:
        queue.life.lost(0)
    return got


def stall(queue: SendQueue, reason: str = "stalled") -> bool:
    queue.life.waiting(0)
    queue.life.stall = queue.life.stall or 1
    assert queue.life.tick(10, True)
    return queue.stalled(reason)


def data_message(ident: int, size: int = 40, odid: int = ODID) -> memoryview:
    """A data-only message; its body starts with ``ident`` so it can be recognised after a seq rewrite."""
    body = struct.pack("!HHI", 256, size - 16, ident) + b"\xab" * (size - 24)
    return memoryview(bytearray(HEADER.pack(10, size, 1700000000, 999, odid) + body))


def entry(ident: int, size: int = 40, nrec: int = 2):
    return (data_message(ident, size), ODID, nrec, EMPTY)


def ident_of(msg) -> int:
    return struct.unpack_from("!I", msg, 20)[0]


def make_queue(limit: int = 10_000, rewrite_seq: bool = True, snapshot=EMPTY, track_acks: bool = False):
    stats = SubreceiverStats("collector")
    queue = SendQueue(stats, limit=limit, rewrite_seq=rewrite_seq, current_snapshot=lambda: snapshot)
    queue.transport = FakeTransport()
    queue.acks.track = track_acks
    return queue, stats


def write(queue: SendQueue, budget: int | None = None) -> bytes:
    """One sendmsg that takes at most ``budget`` bytes (all when None): the bytes the collector gets."""
    bufs = queue.stream.next_iovec()
    data = b"".join(bytes(b) for b in bufs)
    taken = data if budget is None else data[:budget]
    if bufs:
        queue.stream.written(len(taken))
    return taken


def datagrams(queue: SendQueue) -> list[bytes]:
    """Send everything queued as datagrams, one message each."""
    out: list[bytes] = []
    assert queue.datagrams.send(lambda data: out.append(bytes(data)))
    return out


def messages(stream: bytes) -> list[bytes]:
    out = []
    walk(stream, 0, len(stream), lambda m: out.append(bytes(m)))
    return out


def test_enqueue_wakes_the_transport_once_per_turn_when_up():
    queue, _ = make_queue()
    queue.enqueue(entry(1))
    assert queue.transport.woken == 0  # down: nothing to wake
    up(queue, 0)
    queue.enqueue(entry(2))
    queue.enqueue_many([entry(3), entry(4)], 80)
    assert queue.transport.woken == 1
    write(queue)
    queue.flushing()  # what the transport's flush does
    queue.enqueue(entry(5))
    assert queue.transport.woken == 2


def three_queued(track_acks: bool = False):
    """An up queue holding messages 0, 1, 2 (40 bytes, 2 records each)."""
    queue, stats = make_queue(track_acks=track_acks)
    up(queue, 0)
    for i in range(3):
        queue.enqueue(entry(i))
    return queue, stats


@pytest.mark.parametrize("cut", range(0, 121))
def test_partial_write_at_every_byte_boundary(cut):
    queue, stats = three_queued()
    first = write(queue, cut)
    rest = write(queue)
    got = messages(first + rest)
    assert [ident_of(m) for m in got] == [0, 1, 2]
    assert [struct.unpack_from("!I", m, 8)[0] for m in got] == [0, 2, 4]  # 2 records each, gap-free
    assert queue.idle and queue.pending_bytes == 0
    assert (stats.msgs_out, stats.bytes_out, stats.drops) == (3, 120, 0)


@pytest.mark.parametrize("cut", range(0, 120))
def test_connection_loss_at_every_point_of_a_batch(cut):
    """Without acknowledgement tracking (UDP), what the kernel took whole counts as delivered; a message
    cut in the middle is queued again whole (the collector drops a partial message with its connection)."""
    queue, stats = three_queued()
    sent = write(queue, cut)
    resent, news = lose(queue, "reset")
    assert news and queue.state is State.DOWN and stats.last_error == "reset"
    whole = len(messages(sent))
    assert resent == 0 == stats.resent
    assert [ident_of(e[0]) for e in queue.pending] == list(range(whole, 3))
    assert queue.pending_bytes == sum(len(e[0]) for e in queue.pending)
    assert stats.msgs_out == whole and stats.drops == 0


def test_acknowledged_offsets_at_every_byte_boundary_and_loss_at_every_point():
    """Written up to ``cut``, acknowledged up to ``ack`` <= cut, then the connection fails: exactly the
    messages not acknowledged whole come back, in order, and go out again, numbered for the new connection."""
    for cut in range(0, 121):
        for ack in range(0, cut + 1):
            queue, stats = three_queued(track_acks=True)
            write(queue, cut)
            queue.acknowledged(ack)
            resent, _ = lose(queue, "reset")
            first = ack // 40  # the first message not acknowledged whole
            assert [ident_of(e[0]) for e in queue.pending] == list(range(first, 3)), (cut, ack)
            assert resent == cut // 40 - first == stats.resent, (cut, ack)  # written whole, not acknowledged
            assert queue.pending_bytes == 40 * (3 - first) and stats.drops == 0
            up(queue, 0)
            got = messages(write(queue))
            assert [ident_of(m) for m in got] == list(range(first, 3))
            assert [struct.unpack_from("!I", m, 8)[0] for m in got] == [2 * i for i in range(len(got))]


def test_acknowledged_forgets_whole_write_batches_only():
    queue, _ = three_queued(track_acks=True)
    write(queue, 50)
    write(queue)
    assert len(queue.acks.unacked) == 2
    queue.acknowledged(79)  # the first batch (message 0) is acknowledged, message 1 is not whole
    assert len(queue.acks.unacked) == 1
    queue.acknowledged(120)
    assert not queue.acks.unacked and queue.acks.acked == 120


@pytest.mark.parametrize("cut", [0, 20, 40, 60])
def test_stall_takes_back_the_committed_messages_not_started_and_their_numbers(cut):
    queue, stats = three_queued(track_acks=True)
    queue.enqueue(entry(3))
    first = write(queue, cut)
    assert stall(queue) and queue.state is State.STALLED and stats.last_error == "stalled"
    assert not queue.stalled("stalled"), "news once"
    started = -(-cut // 40)  # messages the kernel began to take
    assert [ident_of(e[0]) for e in queue.pending] == list(range(started, 4))
    assert [ident_of(e[0]) for e in queue.stream.entries] == ([started - 1] if cut % 40 else [])
    assert queue.pending_bytes == 160 - cut
    queue.confirm()  # the collector reads again: the cut message's rest, then the others, gap-free
    got = messages(first + write(queue))
    assert [ident_of(m) for m in got] == [0, 1, 2, 3]
    assert [struct.unpack_from("!I", m, 8)[0] for m in got] == [0, 2, 4, 6]


def test_close_of_a_stalled_queue_counts_the_unacknowledged_and_resets():
    queue, stats = three_queued(track_acks=True)
    queue.enqueue(entry(3, nrec=5))
    write(queue, 80)
    queue.acknowledged(40)
    stall(queue)
    assert queue.close() == 3  # message 1 (written, not acknowledged), 2 and 3 (queued)
    # and message 0: acknowledged, but the reset discards it if the stalled collector never read it
    assert stats.drops_by_reason == {"stalled": 4} and stats.drop_records_by_reason == {"stalled": 11}
    assert stats.drops == 4 and stats.drop_records == 11 and queue.transport.aborted


def test_drops_by_reason_in_messages_and_records_sum_to_the_totals():
    queue, stats = make_queue(limit=100)
    for i in range(4):
        queue.enqueue(entry(i, nrec=3))
    lose(queue, "refused")
    queue.close()
    assert stats.drops_by_reason == {"queue_full": 2, "connection_lost": 2}
    assert stats.drop_records_by_reason == {"queue_full": 6, "connection_lost": 6}
    assert (stats.drops, stats.drop_records) == (4, 12)
    doc = stats.status()
    assert doc.drops_by_reason == stats.drops_by_reason and doc.drop_records == 12


def test_a_stalled_queue_drops_its_oldest_as_stalled():
    queue, stats = make_queue(limit=100)
    up(queue, 0)
    stall(queue)
    for i in range(3):
        queue.enqueue(entry(i))
    assert stats.drops_by_reason == {"stalled": 1} and stats.status().state == "stalled"


def test_an_oversize_datagram_is_dropped_and_the_next_goes_out():
    queue, stats = three_queued()

    def too_big(data):
        raise OSError(errno.EMSGSIZE, "Message too long")
    with pytest.raises(OSError):
        queue.datagrams.send(too_big)
    assert len(queue.pending) == 3, "a message leaves the queue only once sent"
    queue.drop_first(OVERSIZE)
    assert [ident_of(d) for d in datagrams(queue)] == [1, 2]
    assert stats.drops_by_reason == {"oversize": 1} and queue.pending_bytes == 0


def test_a_refusal_counts_the_datagram_that_drew_it():
    queue, stats = three_queued()
    queue.datagrams.send(lambda data: None, 1)
    queue.refused()
    lose(queue, "Connection refused")
    assert stats.drops_by_reason == {"refused": 1} and stats.drop_records == 2
    assert [ident_of(e[0]) for e in queue.pending] == [1, 2]


def test_a_connection_on_probation_is_news_only_when_confirmed():
    queue, stats = make_queue()
    assert lose(queue, "refused")[1]
    up(queue, 0, probation=True)
    assert queue.state is State.PROBATION and stats.last_error == "refused"
    assert not lose(queue, "refused")[1], "a retry that fails again is no news"
    up(queue, 0, probation=True)
    assert queue.confirm() and stats.last_error == ""
    assert lose(queue, "refused")[1]


def test_drop_oldest_when_full_and_bound_holds():
    queue, stats = make_queue(limit=100)
    for i in range(5):
        queue.enqueue(entry(i))
    assert [ident_of(e[0]) for e in queue.pending] == [3, 4]
    assert stats.drops == 3 and queue.pending_bytes == 80 <= queue.limit


def test_full_queue_asks_the_transport_to_flush_first_when_up():
    queue, _ = make_queue(limit=100)
    up(queue, 0)
    queue.enqueue(entry(0))
    queue.enqueue(entry(1))
    queue.enqueue(entry(2))
    assert queue.transport.flushed == 1


def test_take_pending_hands_over_everything_unsent():
    queue, _ = make_queue()
    for i in range(3):
        queue.enqueue(entry(i))
    taken = queue.take_pending()
    assert [ident_of(e[0]) for e in taken] == [0, 1, 2]
    assert queue.pending_bytes == 0 and queue.idle


def template_session():
    """A tracker that learnt one template (id 256, two 4-byte fields) for ODID 7."""
    tracker = TemplateTracker()
    tset = struct.pack("!HHHHHHHH", 2, 16, 256, 2, 8, 4, 12, 4)
    tracker.inspect(memoryview(HEADER.pack(10, 16 + len(tset), 1, 0, ODID) + tset))
    return tracker


def test_reconnect_replays_the_templates_of_the_head_entry_first():
    tracker = template_session()
    queue, _ = make_queue(snapshot=tracker.snapshot)
    queue.enqueue((data_message(1), ODID, 2, tracker.snapshot))
    up(queue, 1234)
    got = messages(write(queue))
    assert len(got) == 2
    version, length, export_time, seq, odid = HEADER.unpack_from(got[0])
    assert (odid, seq, export_time) == (ODID, 0, 1234)
    assert got[0][16:] == struct.pack("!HHHHHHHH", 2, 16, 256, 2, 8, 4, 12, 4)
    assert ident_of(got[1]) == 1


def test_a_queue_holding_the_whole_session_replays_nothing_on_first_connect():
    queue, _ = make_queue(snapshot=EMPTY)  # created before any template: the queue will carry them
    up(queue, 0)
    assert not queue.pending


def test_byte_identical_mode_keeps_the_exporters_numbers_and_refresh_follows_them():
    tracker = template_session()
    queue, _ = make_queue(rewrite_seq=False, snapshot=tracker.snapshot)
    queue.enqueue((data_message(1), ODID, 2, tracker.snapshot))
    up(queue, 0)
    template, data = datagrams(queue)
    assert struct.unpack_from("!I", template, 8)[0] == 999  # the templates carry the next message's number
    assert struct.unpack_from("!I", data, 8)[0] == 999
    queue.refresh_templates(5)
    (refresh,) = datagrams(queue)
    assert struct.unpack_from("!I", refresh, 8)[0] == 1001  # the exporter's 999 + 2 records


def test_template_messages_are_never_rewritten_in_place():
    """A template message may be shared by several outputs: its sequence number goes in a copied header."""
    queue, _ = make_queue()
    up(queue, 0)
    queue.enqueue(entry(0, nrec=3))
    shared = bytes(data_message(9))
    queue.enqueue((memoryview(shared), ODID, 0, EMPTY))
    got = messages(write(queue))
    assert struct.unpack_from("!I", got[1], 8)[0] == 3
    assert struct.unpack_from("!I", shared, 8)[0] == 999


def test_datagrams_one_message_each_with_the_same_rewrite():
    queue, stats = three_queued()
    sent = datagrams(queue)
    assert [len(d) for d in sent] == [40] * 3
    assert [struct.unpack_from("!I", d, 8)[0] for d in sent] == [0, 2, 4] and stats.msgs_out == 3


def test_close_counts_what_was_left_and_is_final():
    closed = []
    stats = SubreceiverStats("collector")
    queue = SendQueue(stats, limit=10_000, rewrite_seq=True, current_snapshot=lambda: EMPTY,
                      on_closed=closed.append)
    queue.transport = FakeTransport()
    up(queue, 0)
    for i in range(3):
        queue.enqueue(entry(i))
    write(queue, 50)  # one whole, one cut, one queued
    assert queue.close() == 2
    assert stats.drops == 2 and closed == [queue] and queue.state is State.CLOSED
    assert queue.close() == 0 and closed == [queue] and queue.transport.closed == 1
    assert queue not in stats.queues


def test_close_when_drained_closes_at_once_when_idle_else_asks_the_transport():
    queue, _ = make_queue()
    queue.enqueue(entry(0))
    queue.close_when_drained()
    assert queue.transport.draining == 1 and queue.state is not State.CLOSED
    idle, _ = make_queue()
    idle.close_when_drained()
    assert idle.state is State.CLOSED


def test_news_of_a_failure_once_per_state_change():
    queue, _ = make_queue()
    assert lose(queue, "refused")[1]           # first error
    assert not lose(queue, "refused")[1]       # still failing: no news
    up(queue, 0)
    assert queue.confirm()                     # recovered: news
    assert lose(queue, "reset")[1]             # was up: news


# -- the accounting property ------------------------------------------------------------------------
ops = st.lists(st.one_of(
    st.tuples(st.just("enqueue"), st.integers(min_value=17, max_value=200)),
    st.tuples(st.just("write"), st.integers(min_value=0, max_value=600)),
    st.tuples(st.just("lose"), st.just(0)),
    st.tuples(st.just("up"), st.just(0)),
    st.tuples(st.just("ack"), st.integers(min_value=0, max_value=600)),
    st.tuples(st.just("stall"), st.just(0)),
    st.tuples(st.just("pressure"), st.integers(min_value=1, max_value=600)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(min_value=100, max_value=1000), st.booleans(), st.booleans())
def test_every_message_is_delivered_once_queued_or_counted(steps, limit, rewrite, track):
    """With acknowledgement tracking, a collector gets only what its TCP acknowledged before a failure
    (the rest of what was written is sent again, or, when memory pressure made the queue let it go, counted
    as lost); without, everything written."""
    queue, stats = make_queue(limit=limit, rewrite_seq=rewrite, track_acks=track)
    sent_ids: list[int] = []
    connections: list[bytes] = []   # what each collector connection received
    current = None

    def received() -> bytes:
        return current[:queue.acks.acked] if track else current

    for n, (op, arg) in enumerate(steps):
        if op == "enqueue":
            queue.enqueue(entry(n, size=max(24, arg)))
            sent_ids.append(n)
        elif op == "write" and queue.state is State.UP:
            current += write(queue, arg)
        elif op == "ack" and current is not None:
            queue.acknowledged(min(len(current), queue.acks.acked + arg))
        elif op == "pressure":
            queue.let_go(arg)
        elif op == "stall" and queue.state is State.UP:
            queue.stalled("stalled")
            queue.confirm()
        elif op == "lose" and current is not None:
            connections.append(received())  # before: a lost connection's stream offsets start again at 0
            lose(queue, "reset")
            current = None
        elif op == "up" and queue.state is not State.UP:
            up(queue, 0)
            current = b""
        queued = sum(len(e[0]) for e in queue.pending) + (sum(len(b) for b in queue.stream.bufs))
        kept = sum(ends[-1] for _base, ends, entries in queue.acks.unacked if isinstance(entries, list))
        assert queue.pending_bytes == queued and queue.acks.held == kept
        assert queue.budget.used == queued + kept, "the handler-wide budget tracks every byte"
        # the bound: the limit, plus the newest message, twice (committed bytes cannot be dropped: a committed
        # batch may reach the limit plus its newest message, and one more newest message comes on top)
        assert queue.pending_bytes <= limit + 2 * 200
    if current is not None:
        queue.acknowledged(len(current))  # the end: the last collector read everything written
        connections.append(current)
    delivered = [ident_of(m) for c in connections for m in messages(c)]
    still = [ident_of(e[0]) for e in queue.pending] + [ident_of(e[0]) for e in queue.stream.entries]
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    assert not set(delivered) & set(still)
    let_go_lost = stats.drops_by_reason.get("connection_lost", 0)  # (only let_go counts that reason here)
    assert len(delivered) == stats.msgs_out - stats.resent - let_go_lost
    # what is neither delivered nor still held was counted as dropped, exactly
    gone = set(sent_ids) - set(delivered) - set(still)
    assert len(gone) == stats.drops


def test_close_of_an_output_not_yet_shown_to_work_counts_the_unacknowledged_and_resets():
    """After a stall, a new connection to the same collector is tentative: closing it must not leave
    unacknowledged messages to a kernel that may never deliver them, uncounted."""
    queue, stats = make_queue(track_acks=True)
    up(queue, 0, probation=True)
    for i in range(2):
        queue.enqueue(entry(i))
    write(queue)
    assert queue.close() == 2 and stats.drops_by_reason == {"stalled": 2} and queue.transport.aborted
    confirmed, stats = three_queued(track_acks=True)
    write(confirmed)
    assert confirmed.close() == 0 and not confirmed.transport.aborted, "a working connection delivers on close"


def test_memory_pressure_lets_go_of_kept_copies_before_dropping_anything():
    """The budget counts written messages kept until acknowledged; when it runs out, the kept copies go first
    (nothing is lost by that), unsent messages only after them."""
    budget = Budget(10_000)
    held, stats = make_queue(track_acks=True)
    held.budget = budget
    budget.queues.add(held)
    up(held, 0)
    for i in range(5):
        held.enqueue(entry(i, size=1000))
    write(held)  # 5,000 bytes written, not acknowledged
    assert held.acks.held == 5000 and budget.used == 5000
    waiting, waiting_stats = make_queue(limit=100_000)
    waiting.budget = budget
    budget.queues.add(waiting)
    for i in range(6):
        waiting.enqueue(entry(10 + i, size=1000))  # down: queued, 11,000 bytes in all
    assert budget.used <= 10_000
    assert waiting_stats.drops == 0 and stats.drops == 0, "letting go of copies loses nothing"
    assert held.acks.held < 5000 and len(waiting.pending) == 6
    held.acknowledged(2000)
    resent, _ = lose(held, "reset")
    # the two acknowledged arrived; of the three others, the ones let go are counted, the rest sent again
    assert resent + stats.drops_by_reason.get("connection_lost", 0) == 3 and stats.drops_by_reason
    assert stats.drop_records == 2 * stats.drops and held.acks.held == 0
    assert budget.used == held.pending_bytes + waiting.pending_bytes


class BatchSender:
    """A sendmmsg: takes at most ``takes[i]`` datagrams on call i (then as many as asked); an exception in
    ``takes`` is raised (the kernel took none)."""

    def __init__(self, *takes):
        self.takes = list(takes)
        self.out: list[bytes] = []
        self.calls: list[int] = []

    def __call__(self, bufs) -> int:
        self.calls.append(len(bufs))
        take = self.takes.pop(0) if self.takes else len(bufs)
        if isinstance(take, BaseException):
            raise take
        take = min(take, len(bufs))
        self.out += [bytes(b) for b in bufs[:take]]
        return take


def mixed_queue(rewrite: bool, mixed: bool = True):
    """Data messages of two ODIDs with a shared template message between them; or (not ``mixed``) of one
    ODID only, the run numbered in C-level steps."""
    queue, stats = make_queue(rewrite_seq=rewrite)
    up(queue, 0)
    for i in range(7):
        odid = ODID + i % 2 if mixed else ODID
        queue.enqueue((data_message(i, odid=odid), odid, 1 + i % 3, EMPTY))
        if i == 3 and mixed:
            queue.enqueue((memoryview(bytes(data_message(99))), ODID, 0, EMPTY))
    return queue, stats


@pytest.mark.parametrize("rewrite", [True, False])
@pytest.mark.parametrize("mixed", [True, False])
@given(takes=st.lists(st.integers(1, 5), max_size=8), batch=st.integers(1, 9))
def test_batched_datagrams_are_the_one_by_one_datagrams_whatever_the_kernel_takes_per_call(rewrite, mixed, takes,
                                                                                           batch):
    """Short counts (the kernel took fewer than asked) change nothing: the same datagrams, numbered the
    same, each sent once; the counters as for one-by-one sends."""
    expected_queue, expected_stats = mixed_queue(rewrite, mixed)
    expected = datagrams(expected_queue)
    queue, stats = mixed_queue(rewrite, mixed)
    send = BatchSender(*takes)
    assert queue.datagrams.send_batch(send, batch)
    assert send.out == expected and max(send.calls) <= batch
    assert (stats.msgs_out, stats.bytes_out, queue.pending_bytes, queue.acks.sent_total) == \
           (expected_stats.msgs_out, expected_stats.bytes_out, 0, expected_queue.acks.sent_total)
    assert queue.next_sequence(ODID) == expected_queue.next_sequence(ODID)


def test_a_batch_is_numbered_once_however_many_calls_the_kernel_takes_it_in(monkeypatch):
    queue, _stats = mixed_queue(rewrite=True, mixed=False)
    numbered = []
    number = Sequencer.number_datagrams
    monkeypatch.setattr(Sequencer, "number_datagrams", lambda self, entries: numbered.append(len(entries))
                        or number(self, entries))
    send = BatchSender(1, 2, 1)
    assert queue.datagrams.send_batch(send, 64)
    assert send.calls == [7, 6, 4, 3] and numbered == [7], "one numbering for the four calls"
    assert [struct.unpack_from("!I", d, 8)[0] for d in send.out] == [0, 1, 3, 6, 7, 9, 12]


def test_a_full_kernel_mid_batch_keeps_the_rest_queued_and_their_numbers_untaken():
    queue, stats = three_queued()
    send = BatchSender(1, BlockingIOError())
    assert not queue.datagrams.send_batch(send, 64), "the kernel is full: wait for room"
    assert [ident_of(e[0]) for e in queue.pending] == [1, 2] and stats.msgs_out == 1
    assert queue.datagrams.send_batch(send, 64)
    assert [struct.unpack_from("!I", d, 8)[0] for d in send.out] == [0, 2, 4], "numbers as if sent at once"


def test_an_oversize_datagram_mid_batch_is_first_when_its_error_comes():
    queue, stats = three_queued()
    send = BatchSender(1, OSError(errno.EMSGSIZE, "Message too long"))
    with pytest.raises(OSError):
        queue.datagrams.send_batch(send, 64)
    assert [ident_of(e[0]) for e in queue.pending] == [1, 2], "sent ones left, the oversize one is first"
    queue.drop_first(OVERSIZE)
    assert queue.datagrams.send_batch(send, 64)
    assert [ident_of(d) for d in send.out] == [0, 2] and stats.drops_by_reason == {"oversize": 1}


def test_a_refusal_counts_what_the_last_batched_send_took_and_leaves_the_rest_for_re_dispatch():
    """The refusal of one datagram of a call says the port was closed for the call: all of it is lost."""
    queue, stats = make_queue()
    up(queue, 0)
    for i in range(5):
        queue.enqueue(entry(i))
    send = BatchSender(1, 2, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    with pytest.raises(ConnectionRefusedError):
        queue.datagrams.send_batch(send, 64)
    queue.refused()
    lose(queue, "Connection refused")
    assert stats.drops_by_reason == {"refused": 2} and stats.drop_records == 4 and stats.msgs_out == 3
    assert [ident_of(e[0]) for e in queue.pending] == [3, 4]


def test_a_refusal_after_a_one_by_one_send_counts_that_datagram_only():
    queue, stats = three_queued()
    queue.datagrams.send_batch(BatchSender(2), 64)
    lose(queue, "Network is unreachable")
    up(queue, 0, probation=True)
    queue.enqueue(entry(7, nrec=5))
    sent = []
    queue.datagrams.send(sent.append, 1)  # a returning output sends one alone
    queue.refused()
    assert len(sent) == 1 and stats.drops_by_reason == {"refused": 1} and stats.drop_records == 5



def test_net_and_the_session_change_a_queue_only_through_its_methods():
    """No store into a send queue's (or its parts') attributes from ``net/`` or ``core/session.py``: the
    queue's state changes through its methods, and its lifecycle's through the transition table."""
    import ast
    import pathlib

    import ipfix_balancer

    root = pathlib.Path(ipfix_balancer.__file__).parent
    stores = []
    for path in [*sorted((root / "net").glob("*.py")), root / "core" / "session.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                owner = ast.unparse(node.value)
                if owner.split(".")[-1] in ("queue", "q", "life", "acks", "stream", "datagrams") or \
                        ".queue." in f".{owner}.":
                    stores.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert stores == []


def test_a_transport_attaches_as_a_stream_or_as_datagrams():
    queue, _ = make_queue()
    queue.attach(FakeTransport(), stream=False)
    assert not queue.acks.track and not queue.life.stream
    up(queue)
    queue.enqueue(entry(1))
    write(queue)
    assert queue.acks.held == 0 and not queue.acks.unacked, "a datagram socket keeps nothing"
    queue.reconfigure(limit=5, refresh=30.0, stall=2.0, drain_seconds=9.0)
    assert (queue.limit, queue.refresh, queue.life.stall, queue.life.drain_seconds) == (5, 30.0, 2.0, 9.0)


def test_leaving_goes_through_the_lifecycle_and_a_closed_queue_ignores_it():
    queue, _ = make_queue()
    up(queue)
    queue.close_when_drained()
    assert queue.closing and queue.life.leaving and queue.transport.draining == 1
    queue.close()
    queue.close_when_drained()  # (IllegalTransition if it reached the lifecycle)
    assert queue.state is State.CLOSED and queue.transport.draining == 1
