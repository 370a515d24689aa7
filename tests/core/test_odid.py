"""core/odid.py: two exporters defining one template id of one ODID differently are found, once per ODID."""

from ipfix_balancer.core.odid import SharedOdids


class FakeSession:
    def __init__(self, **domains):
        self.domains = {int(k[1:]): v for k, v in domains.items()}  # o7={256: b"..."} -> ODID 7


def shared() -> tuple[SharedOdids, list]:
    asked = []

    def templates(session, odid):
        asked.append((session, odid))
        return session.domains.get(odid)
    return SharedOdids(templates), asked


def test_conflicting_templates_of_one_odid_are_reported_once_with_the_other_peer():
    odids, _ = shared()
    a, b, c = FakeSession(o7={256: b"x"}), FakeSession(o7={256: b"y"}), FakeSession(o7={256: b"z"})
    assert odids.announced(a, "192.0.2.1:4000", 7) is None
    assert odids.announced(b, "192.0.2.2:4000", 7) == "192.0.2.1:4000"
    assert odids.announced(c, "192.0.2.3:4000", 7) is None  # told once per ODID
    assert odids.conflicting == {7}


def test_agreeing_or_disjoint_templates_are_no_conflict():
    odids, _ = shared()
    a = FakeSession(o7={256: b"x", 257: b"q"})
    assert odids.announced(a, "192.0.2.1:4000", 7) is None
    assert odids.announced(FakeSession(o7={256: b"x"}), "192.0.2.2:4000", 7) is None  # the same definition
    assert odids.announced(FakeSession(o7={300: b"y"}), "192.0.2.3:4000", 7) is None  # other template ids
    assert odids.announced(FakeSession(o8={256: b"y"}), "192.0.2.4:4000", 8) is None  # another ODID
    assert odids.conflicting == set()


def test_a_sessions_own_template_stream_is_not_compared():
    odids, asked = shared()
    a = FakeSession(o7={256: b"x"})
    for _ in range(3):
        odids.announced(a, "192.0.2.1:4000", 7)
    again = FakeSession(o7={256: b"y"})  # the same peer address (a UDP source evicted and back)
    assert odids.announced(again, "192.0.2.1:4000", 7) is None
    assert asked == [] and odids.conflicting == set()


def test_a_session_without_templates_for_the_odid_conflicts_with_nobody():
    odids, _ = shared()
    odids.announced(FakeSession(o7={256: b"x"}), "192.0.2.1:4000", 7)
    assert odids.announced(FakeSession(), "192.0.2.2:4000", 7) is None
