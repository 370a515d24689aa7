"""Helpers of the recording tests (the log and clock fakes are tests/fakes.py): a receiver from .env keys, an
exporter session driving ``Recorder.dispatch`` as the handler does, and file listings."""
from __future__ import annotations

import os
import time

from ipfixkit import split_messages
from ipfix_balancer.config.parse import load_values
from ipfix_balancer.core.templates import TemplateTracker

T0 = 1_700_000_000.0   # 2023-11-14T22:13:20Z


def receiver(dump_dir, **keys):
    values = {"IPFIX_FULLFLOW_DUMP_DIR[0]": str(dump_dir)}
    values.update({f"IPFIX_FULLFLOW_{k}[0]": str(v) for k, v in keys.items()})
    (rc,) = load_values(values, cpus=range(64)).receivers
    return rc


class Exporter:
    """One exporter session as the handler drives it: a template tracker, then recorder.dispatch."""

    def __init__(self, rec):
        self.rec = rec
        self.tracker = TemplateTracker()

    def send(self, messages):
        for m in messages:
            view = memoryview(bytearray(m))  # like the framer: a view into a buffer the recorder must not keep
            odid, nrec, tmpl = self.tracker.inspect(view)
            self.rec.dispatch(view, odid, nrec, tmpl, self.tracker.snapshot)


def dumps(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".ipfix"))


def markers(path):
    return sorted(n for n in os.listdir(path) if ".pending-" in n or ".sent-" in n)


def read_messages(path):
    with open(path, "rb") as f:
        return split_messages(f.read())


def write_part(path, messages, tail=b"", mtime=None):
    path.write_bytes(b"".join(messages) + tail)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def run_loop(loop, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    loop.run(until=lambda: until() or time.monotonic() > deadline)
    assert until(), "condition not reached in time"
