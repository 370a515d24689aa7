"""Template replay without a queue: a new connection gets the templates valid for its next message, unless
the queue still holds the whole session; a refresh re-announces the current templates."""

import struct

from ipfix_balancer.core.replay import TemplateReplay
from ipfix_balancer.core.templates import EMPTY, TemplateTracker
from ipfix_balancer.core.wire import HEADER, SEQUENCE, U32

ODID = 7


def tracker_with(fields: int) -> TemplateTracker:
    tracker = TemplateTracker()
    tset = struct.pack("!HHHH", 2, 8 + 4 * fields, 256, fields) + b"".join(
        struct.pack("!HH", 8 + i, 4) for i in range(fields))
    tracker.inspect(memoryview(HEADER.pack(10, 16 + len(tset), 1, 0, ODID) + tset))
    return tracker


def test_a_session_without_templates_yet_replays_nothing_on_its_first_connection_only():
    tracker = TemplateTracker()
    replay = TemplateReplay(lambda: tracker.snapshot)
    assert replay.complete
    tracker.inspect(tracker_with(1).snapshot.messages(lambda odid: 0, 0)[0])
    assert replay.on_connection(None, lambda odid: 0, 0) == [], "the queue carries them itself"
    (entry,) = replay.on_connection(None, lambda odid: 0, 0)
    assert entry[1:3] == (ODID, 0), "the next connection gets them"


def test_a_dropped_message_means_the_queue_no_longer_holds_the_whole_session():
    tracker = TemplateTracker()
    replay = TemplateReplay(lambda: tracker.snapshot)
    tracker.inspect(tracker_with(1).snapshot.messages(lambda odid: 0, 0)[0])
    replay.incomplete()
    assert len(replay.on_connection(None, lambda odid: 0, 0)) == 1


def test_the_replay_uses_the_head_entrys_templates_numbered_now():
    old, new = tracker_with(1).snapshot, tracker_with(2).snapshot
    replay = TemplateReplay(lambda: new)
    (entry,) = replay.on_connection((b"", ODID, 2, old), lambda odid: 41, 1234)
    msg, odid, nrec, snapshot = entry
    assert snapshot is old and (odid, nrec) == (ODID, 0) and U32.unpack_from(msg, SEQUENCE)[0] == 41
    assert bytes(msg) == bytes(old.messages(lambda odid: 41, 1234)[0])


def test_a_refresh_announces_the_current_templates():
    current = tracker_with(2).snapshot
    replay = TemplateReplay(lambda: current, refresh=30)
    (entry,) = replay.refreshed(lambda odid: 5, 0)
    assert entry[3] is current and U32.unpack_from(entry[0], SEQUENCE)[0] == 5
    assert list(TemplateReplay(lambda: EMPTY).refreshed(lambda odid: 5, 0)) == []
