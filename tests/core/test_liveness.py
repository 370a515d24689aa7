"""core/liveness.py with a fake clock: silence on the monotonic clock, an unreadable document is no silence."""
from ipfix_balancer.core import liveness
from ipfix_balancer.core.liveness import UNREADABLE, hung, silence, stale

from fakes import FakeClock

HANG = 15.0


def test_silence_counts_from_the_start_until_the_first_heartbeat_then_from_the_latest():
    clock = FakeClock()
    started = clock.t
    assert silence(clock.advance(3), started, None) == 3
    assert hung(clock.advance(HANG - 3), started, None, HANG) is None  # exactly HANG_SECONDS: not yet
    assert hung(clock.advance(0.5), started, None, HANG) == HANG + 0.5
    beat = clock.advance(1)
    assert hung(clock.advance(HANG), started, beat, HANG) is None
    assert hung(clock.advance(1), started, beat, HANG) == HANG + 1


def test_a_document_that_could_not_be_read_is_never_silence():
    clock = FakeClock()
    started = clock.t
    for _ in range(10):
        assert silence(clock.advance(HANG), started, UNREADABLE) is None
        assert hung(clock.t, started, UNREADABLE, HANG) is None
    assert hung(clock.t, started, clock.advance(-1), HANG) is None  # readable again: judged on its beat
    assert repr(UNREADABLE) == "UNREADABLE"


def test_regular_heartbeats_are_never_silence_however_long():
    clock = FakeClock()
    started = clock.t
    for _ in range(600):
        beat = clock.advance(1.0)
        assert hung(beat + 0.9, started, beat, HANG) is None


def test_stale_after_three_periods():
    assert liveness.STALE_PERIODS == 3
    assert not stale(3.0, 1.0) and stale(3.01, 1.0) and not stale(5.9, 2.0)
