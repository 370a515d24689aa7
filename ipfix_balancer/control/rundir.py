"""Every name in the run directory, the one place where supervisor, handlers and ``status`` meet.

Documents are written to a temporary name and renamed, so a reader never sees half of one. No socket
between processes is needed, and a status read cannot disturb the data path.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

DEFAULT_RUN_DIR = "/run/fast_ipfix_balancer"
DRAIN_TIMEOUT = 10.0  # seconds a handler flushes queues at stop and at session end while a collector is down

_SUPERVISOR_PID = "supervisor.pid"
_SUPERVISOR_STATUS = "supervisor.json"
_SUPERVISOR_ADOPT = "supervisor.adopt.json"  # handlers running when the supervisor re-executed itself
_SUPERVISOR_CARRY = "supervisor.carry.json"  # counters and restarts a re-executed supervisor continues
_HANDLER_PREFIX = "handler-"
_RELOAD_OUTCOME = "reload.json"  # the supervisor's answer to the last reload (SIGHUP), numbered
_LOG_RING = "log.jsonl"  # recent log lines of every process, for the console (bounded: two files)


def resolve_run_dir(cli_value: str | None) -> str:
    """--run-dir wins over $IPFIX_BALANCER_RUN_DIR, which wins over the appliance default."""
    return cli_value or os.environ.get("IPFIX_BALANCER_RUN_DIR") or DEFAULT_RUN_DIR


def supervisor_pid_path(run_dir: str) -> str:
    return os.path.join(run_dir, _SUPERVISOR_PID)


def supervisor_status_path(run_dir: str) -> str:
    return os.path.join(run_dir, _SUPERVISOR_STATUS)


def adopt_path(run_dir: str) -> str:
    return os.path.join(run_dir, _SUPERVISOR_ADOPT)


def supervisor_carry_path(run_dir: str) -> str:
    return os.path.join(run_dir, _SUPERVISOR_CARRY)


def reload_outcome_path(run_dir: str) -> str:
    return os.path.join(run_dir, _RELOAD_OUTCOME)


def log_ring_path(run_dir: str) -> str:
    """The current file of the log ring; the older half is this name + ``.1``."""
    return os.path.join(run_dir, _LOG_RING)


def _handler_stem(run_dir: str, stream: str, index: int) -> str:
    return os.path.join(run_dir, f"{_HANDLER_PREFIX}{stream.lower()}-{index}")


def handler_status_path(run_dir: str, stream: str, index: int) -> str:
    """``handler-<stream>-<index>.json``: the handler's counters, rewritten every second."""
    return _handler_stem(run_dir, stream, index) + ".json"


def next_config_path(run_dir: str, stream: str, index: int) -> str:
    """``handler-<stream>-<index>.next``: new settings for a running handler, announced by SIGUSR2."""
    return _handler_stem(run_dir, stream, index) + ".next"


def handler_status_paths(run_dir: str) -> list[str]:
    """Every handler status file, sorted by name."""
    return sorted(glob.glob(handler_status_path(glob.escape(run_dir), "*", "*")))


def handler_files(run_dir: str) -> list[str]:
    """Every file a handler leaves in the run directory (status, settings, temporaries)."""
    return [os.path.join(run_dir, name) for name in os.listdir(run_dir) if name.startswith(_HANDLER_PREFIX)]


def handover_address(run_dir: str, stream: str, index: int) -> str:
    """Where a running handler offers its sockets to its successor. Abstract unix namespace: no file to go
    stale, no 108-byte path limit to hit with a deep run dir."""
    digest = hashlib.sha1(run_dir.encode()).hexdigest()[:16]
    return f"\0fast_ipfix_balancer/{digest}/{stream.lower()}/{index}"


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary name, then rename: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc))


def read_json(path: str) -> dict | None:
    """The document at path, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
