"""core/admission.py with a fake clock: evictions at the caps, the first-message deadline, idleness in whole
messages, sources as an operator blocks them, the rate of new UDP sessions."""
from ipfix_balancer.core.admission import (FIRST_MESSAGE_SECONDS, IDLE_EVICT_SECONDS, SILENT_GRACE, Admission,
                                           FailureThrottle, Rate,
                                           source_of)


def filled(n: int, per_source: int = 100, source: str = "10.0.0.1", now: float = 0.0) -> Admission:
    adm = Admission(max_sessions=n, max_per_source=per_source)
    for i in range(n):
        adm.add(f"s{i}", source, now + i * 0.001)
    return adm


def test_sources_are_ipv4_addresses_and_ipv6_64s():
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("not-an-address") == "not-an-address"


def test_below_the_caps_everyone_is_admitted():
    adm = Admission(max_sessions=3, max_per_source=2)
    assert adm.admit("a", 0.0) == (None, [])
    adm.add("x", "a", 0.0)
    assert adm.admit("a", 0.0) == (None, [])
    assert len(adm) == 1 and "x" in adm


def test_at_the_cap_the_oldest_silent_session_goes_first_then_the_idlest_then_a_refusal():
    adm = filled(4)
    adm.delivered("s0", 1.0)
    adm.delivered("s2", 1.0)
    assert adm.admit("10.0.0.2", 2.0) == (None, ["s1"])  # never delivered, and older than s3
    adm.remove("s1")
    adm.add("new", "10.0.0.2", 2.0)
    assert adm.admit("10.0.0.2", 2.0) == (None, ["s3"])
    adm.remove("s3")
    adm.add("new2", "10.0.0.2", 2.0)
    adm.delivered("new", 2.0)
    adm.delivered("new2", 2.0)
    # everyone delivered lately: refused, however many try
    assert adm.admit("10.0.0.3", 1.0 + IDLE_EVICT_SECONDS - 0.1) == ("max_sessions", [])
    adm.delivered("s0", 5.0)
    # s2 has been quiet for IDLE_EVICT_SECONDS: it makes room; the longest quiet first
    assert adm.admit("10.0.0.3", 1.0 + IDLE_EVICT_SECONDS + 1) == (None, ["s2"])


def test_a_session_just_accepted_is_not_taken_for_a_silent_one():
    adm = filled(2, now=10.0)
    assert adm.admit("10.0.0.2", 10.0 + SILENT_GRACE - 0.01) == ("max_sessions", [])
    assert adm.admit("10.0.0.2", 10.0 + SILENT_GRACE) == (None, ["s0"])


def test_the_per_source_cap_evicts_only_that_sources_silent_sessions():
    adm = Admission(max_sessions=100, max_per_source=2)
    adm.add("exporter", "10.0.0.1", 0.0)
    adm.delivered("exporter", 0.5)
    adm.add("trickler", "10.0.0.1", 1.0)
    adm.add("other", "10.0.0.9", 0.0)  # silent, but another source's
    assert adm.admit("10.0.0.1", 2.0) == (None, ["trickler"])
    adm.remove("trickler")
    adm.add("second", "10.0.0.1", 2.0)
    adm.delivered("second", 2.0)
    assert adm.admit("10.0.0.1", 3.0) == ("max_sessions_per_source", [])


def test_a_trickle_of_bytes_is_no_activity_a_whole_message_is():
    clock = 0.0
    adm = Admission(max_sessions=10, max_per_source=10)
    adm.add("trickler", "a", clock)
    adm.add("exporter", "b", clock)
    for _ in range(int(FIRST_MESSAGE_SECONDS)):  # the exporter delivers every second; the trickler never does
        clock += 1.0
        adm.delivered("exporter", clock)
    assert adm.overdue(clock) == []
    assert adm.overdue(clock + 0.5) == ["trickler"]
    assert adm.idle(clock + 0.5, 600) == []
    assert adm.idle(clock + 600, 600) == ["trickler", "exporter"]
    assert adm.idle(clock + 599.9, 600) == ["trickler"]  # silent since it opened
    assert adm.idle(clock + 10 ** 6, 0) == []  # IDLE_TIMEOUT=0: never
    assert adm.never_delivered("trickler") and not adm.never_delivered("exporter")


def test_remove_frees_the_source_and_forgets_unknown_keys():
    adm = Admission(max_sessions=10, max_per_source=1)
    adm.add("x", "a", 0.0)
    adm.delivered("x", 0.0)
    assert adm.admit("a", 1.0) == ("max_sessions_per_source", [])
    adm.remove("x")
    adm.remove("x")
    adm.delivered("x", 2.0)
    assert adm.admit("a", 1.0) == (None, []) and len(adm) == 0


def test_new_session_rate_is_a_token_bucket():
    rate = Rate(per_second=4)
    assert sum(rate.take(100.0) for _ in range(50)) == 4  # the burst
    assert not rate.take(100.125)
    assert rate.take(100.25)  # one token per 0.25 s
    assert not rate.take(100.25)
    assert sum(rate.take(200.0) for _ in range(50)) == 4  # refilled, never beyond the burst


def test_failed_attempts_are_throttled_per_address_and_overall():
    throttle = FailureThrottle(per_address=3, overall=5, window=60.0)
    for t in range(3):
        assert not throttle.blocked("a", t)
        throttle.failed("a", t)
    assert throttle.blocked("a", 3.0) and not throttle.blocked("b", 3.0)
    throttle.failed("b", 4.0)
    throttle.failed("c", 5.0)
    assert throttle.blocked("d", 5.0), "5 failures in all: everyone waits"
    assert not throttle.blocked("d", 60.0)  # the first failure left the window
    assert not throttle.blocked("a", 61.0)  # a: one failure left in the window
    for t in range(100):
        throttle.failed("e", 100.0 + t * 0.01)
    assert len(throttle._failures) == 5, "bounded by the overall limit"
