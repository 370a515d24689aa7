"""The completed dumps of one directory (docs/configuration.md "Recording mode": "Export", "Crash safety"): inventory, oldest
first; delivery markers ``<file>.pending-<target>`` / ``<file>.sent-<target>``; recovery of a leftover ``.part``;
eviction beyond SPOOL_BYTES.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
from typing import TYPE_CHECKING

from ..core.wire import HEADER_LEN, walk
from .dumpfile import DUMP, PART, PART_RE, dump_name, fsync_dir, make_safe_dir, open_regular, parse_stamp, unlink

if TYPE_CHECKING:  # the spool uses a target's token, ep, queue, add and drop
    from .export import ExportTarget

PENDING = ".pending-"
SENT = ".sent-"
_MARKER_RE = re.compile(r"(?P<dump>.+\.ipfix)\.(?P<kind>pending|sent)-(?P<token>.+)")


def whole_messages(path: str) -> tuple[int, int]:
    """(bytes, messages) of the whole IPFIX messages at the start of the file at ``path``.

    Walks the message headers (``wire.walk``) through an mmap, so only the pages holding headers are read;
    stops at the first header that is cut off or not IPFIX.
    """
    count = 0

    def one(_msg) -> None:
        nonlocal count
        count += 1

    with open(open_regular(path, os.O_RDONLY), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_LEN:
            return 0, 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
            pos, _error = walk(view, 0, size, one)
    return pos, count


def _touch(path: str) -> None:
    os.close(open_regular(path, os.O_WRONLY | os.O_CREAT))


class Spool:
    """Completed dumps kept in ``directory`` (``completed``: name -> size, oldest first) and their delivery to
    ``targets``: a file is deleted once every target has it, or evicted (oldest first) beyond ``limit`` bytes
    (0: no limit)."""

    def __init__(self, directory: str, targets: list[ExportTarget], log, limit: int):
        self.dir = directory
        self.targets = targets
        self.log = log
        self.limit = limit
        self.completed: dict[str, int] = {}
        self.bytes = 0
        self.evicted_files = 0
        self.recovered_files = 0
        self.last_file = ""

    def _tokens(self) -> set[str]:
        return {t.token for t in self.targets}

    # -- start-up: leftovers, markers --------------------------------------------------------------
    def load(self) -> None:
        """Recover leftover ``.part`` files, then take stock of the dumps and markers: queue each dump for the
        targets it is pending for, delete what every target has, forget markers of removed targets and of
        missing dumps. Only regular files count: anything else under a dump's name is ignored. Raises
        OSError when the directory cannot be made or listed, or others may write it."""
        make_safe_dir(self.dir)
        for name in sorted(n for n in os.listdir(self.dir) if n.endswith(PART)):
            self.recover(name)
        names = os.listdir(self.dir)
        markers: dict[str, dict[str, set]] = {}
        for name in names:
            m = _MARKER_RE.fullmatch(name)
            if m:
                markers.setdefault(m["dump"], {"pending": set(), "sent": set()})[m["kind"]].add(m["token"])
        dumps = []
        for name in names:
            if name.endswith(DUMP):
                try:
                    st = os.lstat(os.path.join(self.dir, name))
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                dumps.append((st.st_mtime, name, st.st_size))
        dumps.sort()
        tokens = {t.token: t for t in self.targets}
        removed: dict[str, int] = {}
        for _, name, size in dumps:
            state = markers.pop(name, {"pending": set(), "sent": set()})
            for token in state["pending"] - tokens.keys():
                removed[token] = removed.get(token, 0) + 1
                unlink(os.path.join(self.dir, name + PENDING + token))
            pending = state["pending"] & tokens.keys()
            if not pending and state["sent"]:
                self.delete(name, state["sent"])  # every (still configured) target has it
                continue
            for token in state["sent"] - tokens.keys():  # said all it could; runtime deletes know current targets
                unlink(os.path.join(self.dir, name + SENT + token))
            self.completed[name] = size
            self.bytes += size
            for token in sorted(pending):
                tokens[token].queue.append(name)
        for token, count in removed.items():
            self.log.warning("export_target_removed", target=token, files=count,
                             action="no longer in DUMP_INSERT_PROCESSES: these files are not sent to it")
        for name, state in markers.items():  # markers without a dump: rename interrupted, or deleted by hand
            self.delete(name, state["pending"] | state["sent"], dump=False)
        self.enforce_limit()

    def recover(self, name: str) -> None:
        """A .part left by a run that died: keep its whole messages, give it a final name (``load`` then
        registers it for export)."""
        path = os.path.join(self.dir, name)
        m = PART_RE.fullmatch(name)
        if m is None:
            self.log.warning("dump_part_unknown", file=name, action="not a dump of this recorder; left alone")
            return
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                self.log.warning("dump_part_unknown", file=name, action="not a regular file; left alone")
                return
            size, mtime = st.st_size, st.st_mtime  # the last write: before the truncation below changes it
            good, count = whole_messages(path)
            if good == 0:
                if size:
                    os.rename(path, path + ".corrupt")
                    self.log.error("dump_part_corrupt", file=name, bytes=size,
                                   action=f"renamed to {name}.corrupt: it does not start with an IPFIX message")
                else:
                    os.unlink(path)
                return
            fd = open_regular(path, os.O_WRONLY)
            try:
                if good < size:
                    os.ftruncate(fd, good)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.log.error("dump_recovery_failed", file=name, error=exc.strerror or str(exc),
                           action="left as it is; never overwritten")
            return
        final = self.complete(path, m["stem"], max(mtime, parse_stamp(m["start"])), good, register=False)
        if final is not None:
            self.recovered_files += 1
            self.log.warning("dump_recovered", part=name, file=final, bytes=good, messages=count,
                             cut_bytes=size - good)

    # -- a completed file --------------------------------------------------------------------------
    def complete(self, part: str, stem: str, end: float, size: int, register: bool = True) -> str | None:
        """Rename a finished .part to ``<stem>_<end>.ipfix`` (never over an existing file; ``_001``… when the
        name is taken), marking it pending for every target first; register it for export and apply the limit
        (at start-up ``load`` registers it instead). Returns the final name, None if it could not be renamed."""
        name, taken = dump_name(stem, end), 0
        while os.path.lexists(os.path.join(self.dir, name)) or name in self.completed:
            taken += 1
            name = dump_name(stem, end, taken)
        for t in self.targets:
            try:
                _touch(os.path.join(self.dir, name + PENDING + t.token))
            except OSError as exc:
                self.log.error("export_marker_failed", file=name, target=str(t.ep), error=exc.strerror,
                               action="exported now, but not after a restart")
        try:
            os.rename(part, os.path.join(self.dir, name))
        except OSError as exc:
            self.log.error("dump_rename_failed", file=os.path.basename(part), error=exc.strerror,
                           action="left as .part; recovered at the next start")
            for t in self.targets:
                unlink(os.path.join(self.dir, name + PENDING + t.token))
            return None
        fsync_dir(self.dir)
        self.last_file = name
        if not register:
            return name
        self.completed[name] = size
        self.bytes += size
        for t in self.targets:
            t.add(name)
        self.enforce_limit()
        return name

    def enforce_limit(self) -> None:
        limit = self.limit
        while limit and self.bytes > limit and self.completed:
            name = next(iter(self.completed))
            waiting = [str(t.ep) for t in self.targets if name in t.queue]
            size = self.completed[name]
            for t in self.targets:
                t.drop(name)
            self.delete(name, self._tokens())
            self.evicted_files += 1
            self.log.warning("dump_evicted", file=name, bytes=size, spool_bytes=self.bytes, spool_limit=limit,
                             not_delivered_to=waiting)

    def delete(self, name: str, tokens, dump: bool = True) -> None:
        if dump:
            unlink(os.path.join(self.dir, name))
        for token in tokens:
            unlink(os.path.join(self.dir, name + PENDING + token))
            unlink(os.path.join(self.dir, name + SENT + token))
        size = self.completed.pop(name, None)
        if size is not None:
            self.bytes -= size

    # -- export outcomes (ExportTarget callbacks) ----------------------------------------------------
    def delivered(self, target: ExportTarget, name: str) -> None:
        """``target`` has ``name``: its marker becomes ``sent``; the file goes once every target has it."""
        marker = os.path.join(self.dir, name + PENDING + target.token)
        try:
            os.rename(marker, os.path.join(self.dir, name + SENT + target.token))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.log.error("export_marker_failed", file=name, target=str(target.ep), error=exc.strerror)
        if not any(name in t.queue for t in self.targets):
            self.delete(name, self._tokens())

    def vanished(self, name: str) -> None:
        """A dump was deleted by someone else: forget it everywhere."""
        self.log.warning("dump_missing", file=name, action="not exported: the file is gone")
        for t in self.targets:
            t.drop(name)
        self.delete(name, self._tokens(), dump=False)
