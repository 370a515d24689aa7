"""The ``make`` fixture of the recording tests (helpers: recordkit.py)."""
from __future__ import annotations

import pytest

from fakes import FakeClock, Log
from recordkit import T0, receiver
from ipfix_balancer.net.loop import Loop
from ipfix_balancer.recording.recorder import Recorder


@pytest.fixture
def make(tmp_path):
    """``make(**keys) -> (recorder, clock, log, notified)``; every recorder is closed at teardown."""
    made = []

    def factory(dump_dir=None, clock=None, loop=None, **keys):
        clock = clock or FakeClock(T0)
        log = Log()
        notified = []
        rc = receiver(dump_dir or tmp_path / "dump", **keys)
        rec = Recorder(loop or Loop(), rc, log, clock=clock, notify=lambda: notified.append(clock()))
        made.append(rec)
        return rec, clock, log, notified

    yield factory
    for rec in made:
        rec.close()
