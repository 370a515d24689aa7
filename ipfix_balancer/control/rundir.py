"""Every name in the run directory, the one place where supervisor, handlers and ``status`` meet.

Documents are written to a temporary name and renamed, so a reader never sees half of one. No socket
between processes is needed, and a status read cannot disturb the data path.

The directory is trusted only when it is ours: owned by the effective user, not writable by group or
others (``secure``). Even so, every write refuses to follow a symlink and uses an unpredictable temporary
name. One supervisor per directory: it holds ``supervisor.lock`` (flock) for its whole life, across its
re-execution, and a pid read from ``supervisor.pid`` is believed only when that process holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import stat
import tempfile
import types
import typing
from typing import Any, Callable

DEFAULT_RUN_DIR = "/run/fast_ipfix_balancer"
DRAIN_TIMEOUT = 10.0  # seconds a handler flushes queues at stop and at session end while a collector is down

_HANDLER_PREFIX = "handler-"


def resolve_run_dir(cli_value: str | None) -> str:
    """--run-dir wins over $IPFIX_BALANCER_RUN_DIR, which wins over the appliance default."""
    return cli_value or os.environ.get("IPFIX_BALANCER_RUN_DIR") or DEFAULT_RUN_DIR


def _named(name: str) -> Callable[[str], str]:
    """The path of the file ``name`` in a given run directory: one function per fixed name below."""
    def path(run_dir: str) -> str:
        return os.path.join(run_dir, name)
    return path


supervisor_pid_path = _named("supervisor.pid")
supervisor_status_path = _named("supervisor.json")
lock_path = _named("supervisor.lock")
adopt_path = _named("supervisor.adopt.json")  # handlers running when the supervisor re-executed itself
supervisor_carry_path = _named("supervisor.carry.json")  # counters and restarts a re-executed supervisor continues
reload_outcome_path = _named("reload.json")  # the supervisor's answer to the last reload (SIGHUP), numbered
#: recent log lines of every process, for the console: the current file; the older half is this name + ``.1``
log_ring_path = _named("log.jsonl")


def _handler_stem(run_dir: str, stream: str, index: int | str) -> str:
    return os.path.join(run_dir, f"{_HANDLER_PREFIX}{stream.lower()}-{index}")


def handler_status_path(run_dir: str, stream: str, index: int | str) -> str:
    """``handler-<stream>-<index>.json``: the handler's counters, rewritten every second (a str index: a glob)."""
    return _handler_stem(run_dir, stream, index) + ".json"


def handler_status_paths(run_dir: str) -> list[str]:
    """Every handler status file, sorted by name."""
    return sorted(glob.glob(handler_status_path(glob.escape(run_dir), "*", "*")))


def handler_files(run_dir: str) -> list[str]:
    """Every file a handler leaves in the run directory (status, and temporaries: ``.handler-…``)."""
    return [os.path.join(run_dir, name) for name in os.listdir(run_dir)
            if name.lstrip(".").startswith(_HANDLER_PREFIX)]


class RunDirError(Exception):
    """The run directory cannot be trusted or used; the message says why and what to do."""


def unsafe_reason(st: os.stat_result, what: str) -> str | None:
    """Why a directory (lstat result) must not be trusted by this process, or None: it must be a real
    directory owned by the effective user, not writable by group or others (``what`` names it)."""
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory (a symlink or a file)"
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def secure(run_dir: str) -> None:
    """Create the run directory 0700 if missing, then refuse it unless it is safe (``unsafe_reason``)."""
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RunDirError(f"cannot create run dir {run_dir}: {exc.strerror}") from None
    reason = unsafe_reason(os.lstat(run_dir), f"run dir {run_dir}")
    if reason is not None:
        raise RunDirError(f"{reason}: refusing it (use a directory only this user can write, e.g. mode 0700)")


def lock(run_dir: str) -> int | None:
    """Take the supervisor lock of ``run_dir``: its descriptor, or None when another supervisor holds it."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # ELOOP: a symlink planted there
        raise RunDirError(f"cannot open {lock_path(run_dir)}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def inherited_lock(run_dir: str, noted: Any) -> int | None:
    """The lock this process held before it re-executed itself: descriptor ``noted`` (what the adopt file
    says) when that is the lock file, else any of our descriptors on it (a wrong note loses nothing: the
    descriptor was inherited all the same); None when there is none or the lock is not ours."""
    try:
        lock_st = os.stat(lock_path(run_dir), follow_symlinks=False)
    except FileNotFoundError:
        return None
    candidates: list[int] = [noted] if conforms(noted, int) else []
    for fd in candidates + sorted(int(name) for name in os.listdir("/proc/self/fd")):
        try:
            if os.path.samestat(os.fstat(fd), lock_st):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: fails if it is not
                return fd
        except (OSError, OverflowError):  # not open (listdir's own), or locked by another descriptor
            continue
    return None


def lock_holder(run_dir: str) -> int | None:
    """The pid holding the supervisor lock (from /proc/locks), or None when nobody does."""
    try:
        st = os.stat(lock_path(run_dir), follow_symlinks=False)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 8108 fe:00:2148071 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            return int(fields[4])
    return None


def write_atomic(path: str, text: str) -> None:
    """Write to an unpredictable temporary name (created exclusively, never through a symlink), then
    rename over ``path`` (a symlink there is replaced, not followed): readers see the old file or the new
    one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
    try:
        os.fchmod(fd, 0o640)  # the service group may read status (the directory decides who gets in)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, doc: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(doc))


def load_json(path: str) -> dict[str, Any] | None:
    """The document at path, or None when it is missing or not a JSON object (malformed, or another JSON
    value: the run dir is a hostile input path, and every reader indexes it as an object). Any other failure
    to read it (EMFILE, EACCES, ELOOP: a symlink) raises OSError: "could not look" must never pass for
    "nothing there"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with open(fd) as f:
        try:
            doc = json.load(f)
        except ValueError:
            return None
    return doc if isinstance(doc, dict) else None


def read_json(path: str) -> dict[str, Any] | None:
    """The document at path, or None when it is missing, not a JSON object or unreadable (for readers to whom
    all mean "nothing to show")."""
    try:
        return load_json(path)
    except OSError:
        return None


def conforms(value: Any, kind: Any) -> bool:
    """Whether ``value``, read from a run-dir document, is of type ``kind``: a class (a float may be any
    number; a bool is never a number), a union, ``list[T]``, ``tuple[...]`` (a JSON array of that length),
    or a dict of key -> type (an object with those keys; a missing key reads as None). Readers check what
    they use: a document may come from another release, a bug, or anyone who can write the run dir."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if isinstance(kind, dict):
        return isinstance(value, dict) and all(conforms(value.get(k), t) for k, t in kind.items())
    if origin is types.UnionType:
        return any(conforms(value, t) for t in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, list) and len(value) == len(args) and all(map(conforms, value, args))
    return (isinstance(value, (int, float) if kind is float else kind)
            and (kind is bool or not isinstance(value, bool)))


def entries(doc: dict[str, Any], key: str, kind: Any) -> tuple[dict[str, Any], list[str]]:
    """``doc[key]``, an object of named entries (none when missing): those of type ``kind`` (``conforms``),
    and why each of the others, or the whole, is left out (for the log)."""
    section = doc.get(key, {})
    if not isinstance(section, dict):
        return {}, [f"{key}: not a JSON object: {json.dumps(section)[:80]}"]
    kept = {name: v for name, v in section.items() if conforms(v, kind)}
    return kept, [f"{key}: {name}: not as this release writes it: {json.dumps(v)[:80]}"
                  for name, v in section.items() if name not in kept]
