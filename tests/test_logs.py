"""logs.Throttle: one line per (event, source) per interval, the next one carrying the count suppressed."""

from ipfix_balancer.logs import Throttle

from fakes import FakeClock, Log


def lines(log: Log) -> list:
    """What was written, without the level: (event, fields)."""
    return [(event, fields) for _level, event, fields in log.events]


def test_one_line_per_event_and_source_per_interval_then_the_count():
    log, clock = Log(), FakeClock()
    throttle = Throttle(log, interval=60, clock=clock)
    assert throttle.warning("malformed_ipfix", "10.0.0.1", reason="bad_version")
    for _ in range(999):
        assert not throttle.warning("malformed_ipfix", "10.0.0.1", reason="bad_version")
    assert throttle.warning("malformed_ipfix", "10.0.0.2", reason="bad_version"), "another source has its own window"
    assert throttle.warning("accept_failed", "10.0.0.1"), "another event has its own window"
    clock.advance(59.9)
    assert not throttle.warning("malformed_ipfix", "10.0.0.1", reason="bad_version")
    clock.advance(0.1)
    assert throttle.warning("malformed_ipfix", "10.0.0.1", reason="short")
    assert lines(log) == [
        ("malformed_ipfix", {"reason": "bad_version"}),
        ("malformed_ipfix", {"reason": "bad_version"}),
        ("accept_failed", {}),
        ("malformed_ipfix", {"reason": "short", "suppressed": 1000}),
    ]
    clock.advance(60)
    throttle.warning("malformed_ipfix", "10.0.0.1", reason="short")
    assert lines(log)[-1] == ("malformed_ipfix", {"reason": "short"}), "nothing suppressed: no count"


def test_the_window_table_stays_bounded_under_a_flood_of_sources():
    log, clock = Log(), FakeClock()
    throttle = Throttle(log, interval=60, clock=clock)
    for i in range(3 * Throttle.MAX_KEYS):
        throttle.info("exporter_connected", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        clock.advance(0.1)  # 7 minutes in all: every minute PER_EVENT new sources are heard
    assert len(throttle._windows) <= Throttle.MAX_KEYS
    assert len(lines(log)) <= (3 * Throttle.MAX_KEYS * 0.1 / 60 + 1) * Throttle.PER_EVENT


def test_one_event_from_many_sources_is_capped_overall_and_the_rest_counted():
    log, clock = Log(), FakeClock()
    throttle = Throttle(log, interval=60, clock=clock)
    for i in range(2000):  # junk from 2,000 sources within a minute
        throttle.warning("malformed_ipfix", f"10.0.{i >> 8}.{i & 255}", reason="bad_version")
    assert throttle.warning("accept_failed", ""), "another event has its own cap"
    assert len(lines(log)) == Throttle.PER_EVENT + 1
    clock.advance(60)
    throttle.warning("malformed_ipfix", "10.0.0.0", reason="bad_version")
    held_back = 2000 - Throttle.PER_EVENT
    assert lines(log)[-1] == ("malformed_ipfix", {"reason": "bad_version", "suppressed_overall": held_back})
    throttle.warning("malformed_ipfix", "10.0.0.1", reason="bad_version")
    assert lines(log)[-1] == ("malformed_ipfix", {"reason": "bad_version"}), "counted once"
