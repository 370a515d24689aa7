"""``ipfix-balancer reload`` and the console's Apply: ask the running supervisor to reload, wait for its answer.

SIGHUP carries no reply, so the supervisor numbers each reload and writes its outcome to the run directory
(``rundir.reload_outcome_path``); a requester notes the number before signalling and waits for a larger one.
Two requests that overlap may both read the later outcome: it covers the file as both left it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import typing

import psutil

from ..config.parse import ConfigError, load
from . import rundir
from .status import read_supervisor_status, supervisor_pid

APPLIED, REFUSED = "applied", "refused"


@dataclasses.dataclass
class Outcome:
    """What one reload did. Names are handler names (``fullflow[0]``)."""
    generation: int
    result: str  # applied | refused
    config: str
    reconfigured: list[str] = dataclasses.field(default_factory=list)  # new settings applied in place
    restarted: list[str] = dataclasses.field(default_factory=list)  # handler replaced (socket or CPU changed)
    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)  # why it was refused

    def lines(self) -> list[str]:
        """The outcome as an operator reads it, one line per kind of change."""
        if self.result == REFUSED:
            return [f"reload refused, the running configuration stays: {self.config}: "
                    f"{len(self.problems)} problem(s):"] + [f"  - {p}" for p in self.problems]
        parts = [(self.reconfigured, "applied in place"), (self.restarted, "handlers replaced"),
                 (self.added, "handlers started"), (self.removed, "handlers stopped")]
        out = [f"{what}: {', '.join(names)}" for names, what in parts if names]
        return [f"reloaded {self.config}"] + (out or ["no change"])


_FIELDS = typing.get_type_hints(Outcome)


def read_outcome(run_dir: str) -> Outcome | None:
    """The last reload's outcome; None when there is none, or it does not read as one (a field missing or of
    another type: it would break the numbering and the ``reload`` output)."""
    doc = rundir.read_json(rundir.reload_outcome_path(run_dir))
    if doc is None:
        return None
    # known keys only: the document may come from another release (restart in place for an upgrade)
    known = {k: v for k, v in doc.items() if k in _FIELDS}
    if not all(rundir.conforms(v, _FIELDS[k]) for k, v in known.items()):
        return None
    try:
        return Outcome(**known)
    except TypeError:  # a field without a default is missing
        return None


def write_outcome(run_dir: str, outcome: Outcome) -> None:
    rundir.write_json(rundir.reload_outcome_path(run_dir), dataclasses.asdict(outcome))


class NotRunning(Exception):
    """No supervisor runs with this run directory."""


def _supervisor(run_dir: str, main_pid: int | None) -> int | None:
    """The running supervisor's pid. ``main_pid``: systemd's $MAINPID for ExecReload, which runs in a user
    namespace of its own (PrivateUsers=) where ProtectProc=invisible hides the supervisor's /proc entry,
    so its name cannot be read; the lock in /proc/locks still proves it."""
    if main_pid is not None:
        return main_pid if rundir.lock_holder(run_dir) == main_pid else None
    return supervisor_pid(run_dir)


def running_config(run_dir: str, main_pid: int | None = None) -> str:
    """The .env the running supervisor reads: what a reload applies, whatever the requester's default."""
    sup = read_supervisor_status(run_dir)
    pid = _supervisor(run_dir, main_pid)
    if pid is None or sup is None:
        raise NotRunning(f"supervisor is not running (run dir {run_dir})")
    if os.path.isabs(sup.config):
        return sup.config
    try:  # `run --config x.env` from some directory: relative to the supervisor's, not ours
        return os.path.join(psutil.Process(pid).cwd(), sup.config)
    except psutil.Error:
        return sup.config


def request(run_dir: str, timeout: float = 60.0, main_pid: int | None = None) -> Outcome:
    """Validate the running supervisor's file, SIGHUP it and return its outcome.

    A file that does not validate is refused here, without a signal. Raises NotRunning, or TimeoutError
    when no outcome arrives in time (a reload that stops handlers may take DRAIN_TIMEOUT + 5 s)."""
    path = running_config(run_dir, main_pid)
    try:
        load(path)
    except ConfigError as err:
        return Outcome(generation=-1, result=REFUSED, config=path, problems=err.problems)
    before = read_outcome(run_dir)
    generation = -1 if before is None else before.generation
    pid = _supervisor(run_dir, main_pid)
    if pid is None:
        raise NotRunning(f"supervisor is not running (run dir {run_dir})")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = read_outcome(run_dir)
        if outcome is not None and outcome.generation > generation:
            return outcome
        time.sleep(0.1)
    raise TimeoutError(f"no reload outcome from supervisor {pid} after {timeout:.0f}s; see the log")
