"""The unacknowledged log without a queue: a write is let go only once acknowledged whole; a failure gives
back what was not, counts what was let go under memory pressure, and, after a reset, the acknowledged tail
the collector may not have read."""

from ipfix_balancer.core.acklog import AckLog
from ipfix_balancer.core.lifecycle import COUNT, DELIVERED
from ipfix_balancer.core.sendqueue import SubreceiverStats


def entries(*idents, nrec=2):
    return [(bytes(40), 7, nrec, ident) for ident in idents]  # (the snapshot field names them here)


def log_with_two_writes() -> tuple[AckLog, SubreceiverStats]:
    """Write 1: messages 1, 2 (offsets 0..80); write 2: message 3 (80..120)."""
    stats = SubreceiverStats("collector")
    log = AckLog(stats)
    log.track = True
    assert log.keep(0, [40, 80], entries(1, 2)) == 80
    assert log.keep(80, [40], entries(3)) == 40
    log.sent_total = 120
    return log, stats


def test_a_write_is_let_go_when_acknowledged_whole():
    log, _ = log_with_two_writes()
    assert log.acknowledged(40, 0) == 0 and log.held == 120, "half a write acknowledged: all of it kept"
    assert log.acknowledged(80, 0) == 80 and log.held == 40 and log.outstanding == 40
    assert log.held_counts() == (1, 2)


def test_the_acknowledged_tail_keeps_at_most_the_unread_bound():
    log, _ = log_with_two_writes()
    log.acknowledged(120, 30)
    assert [end for end, _n, _r in log.tail] == [120], "write 1 ends before the last 30 bytes: not in the tail"
    log.read_all()
    assert not log.tail


def test_a_failure_gives_back_what_was_not_acknowledged():
    log, stats = log_with_two_writes()
    log.acknowledged(40, 1000)
    back = log.take("connection_lost", DELIVERED)
    assert [e[3] for e in back] == [2, 3] and stats.drops == 0, "message 1 arrived"
    assert log.release() == 120 and log.held == 0 and not log.unacked


def test_after_a_reset_what_was_acknowledged_and_maybe_unread_is_counted():
    log, stats = log_with_two_writes()
    log.acknowledged(80, 1000)  # write 1 acknowledged: now the tail
    back = log.take("stalled", COUNT)
    assert [e[3] for e in back] == [3]
    assert stats.drops_by_reason == {"stalled": 2} and stats.drop_records == 4


def test_what_was_let_go_cannot_be_sent_again_and_is_counted_if_the_connection_fails():
    log, stats = log_with_two_writes()
    assert log.let_go(1) == 80 and log.held == 40, "the oldest write, whole"
    assert log.held_counts() == (3, 6), "still held as counts"
    back = log.take("connection_lost", DELIVERED)
    assert [e[3] for e in back] == [3] and stats.drops_by_reason == {"connection_lost": 2}
