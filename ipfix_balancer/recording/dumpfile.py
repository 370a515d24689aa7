"""The dump file being written: names, the write buffer of whole messages, flush, truncation on error, fsync.

Data reaches the file in whole-message flushes; a write error cuts the file back to its last whole message.
"""

from __future__ import annotations

import calendar
import errno
import os
import re
import stat
import time

from ..core.wire import MAX_MESSAGE

BUFFER_BYTES = 4 * 1024 * 1024   # write buffer: one write() per this many bytes
PART = ".part"
DUMP = ".ipfix"
_STAMP_RE = r"\d{8}T\d{6}Z"
PART_RE = re.compile(rf"(?P<stem>.+_(?P<start>{_STAMP_RE}))(?:\.\d+)?\.part")
MAX_PART_SUFFIX = 1000           # .part names tried per start time (a leftover .part is never overwritten)


def stamp(t: float) -> str:
    """UTC time as used in dump names: ``20240131T235959Z``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def parse_stamp(text: str) -> int:
    """The inverse of ``stamp``."""
    return calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ"))


def dump_prefix(stream: str, dpi_id: int) -> str:
    """What every dump name of a stream and DPI ID starts with."""
    return f"{stream.lower()}_{dpi_id}_"


def dump_stem(prefix: str, start: float) -> str:
    """A dump's name while it is written (``<stem>.part``): ``dump_prefix`` and the start time."""
    return f"{prefix}{stamp(start)}"


def dump_name(stem: str, end: float, taken: int = 0) -> str:
    """The final name of the dump ``stem`` ending at ``end``; ``taken`` > 0 when that name is already taken
    (``_001``…), so that a clock stepped back or a same-second rotation never overwrites a dump."""
    return f"{stem}_{stamp(end)}{f'_{taken:03d}' if taken else ''}{DUMP}"


class WriteFailed(Exception):
    """A flush failed: the file was cut back to its last whole message; ``lost`` buffered messages are gone."""

    def __init__(self, cause: OSError, lost: int):
        super().__init__(str(cause))
        self.cause = cause
        self.lost = lost


class DumpWriter:
    """One ``.part`` file at a time (``path``, ``fd``) and a write buffer reused from file to file.

    ``msgs``, ``flows`` and ``templates`` count the file plus the buffer; ``flushed`` is the size on disk.
    Hot path contract: ``Recorder.dispatch`` appends a message inline (``view[pos:end] = msg``, ``pos``,
    ``msgs``, ``flows``) after checking ``pos + len(msg) <= cap``, and calls ``flush`` first otherwise: no call
    per message. Every other write goes through ``append``.
    """

    def __init__(self, directory: str, log, buffer_bytes: int = BUFFER_BYTES):
        self.dir = directory
        self.log = log
        self.cap = max(buffer_bytes, 2 * MAX_MESSAGE)
        self.view = memoryview(bytearray(self.cap))
        self.pos = 0
        self.fd: int | None = None
        self.path = ""
        self.msgs = self.flows = self.templates = 0
        self.flushed = self._flushed_msgs = self._flushed_flows = 0

    def open(self, base: str) -> str:
        """Create ``<base>.part`` (or ``<base>.1.part``…: an existing .part is never overwritten) in the
        directory, made if missing. Returns its path; raises OSError."""
        make_safe_dir(self.dir)
        for i in range(MAX_PART_SUFFIX):
            path = os.path.join(self.dir, f"{base}{PART}" if i == 0 else f"{base}.{i}{PART}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
                break
            except FileExistsError:  # never overwrite a .part (one a recovery could not rename)
                continue
        else:
            raise FileExistsError(errno.EEXIST, f"{MAX_PART_SUFFIX} .part files with this start time exist", base)
        self.fd, self.path = fd, path
        self.msgs = self.flows = self.templates = 0
        self.flushed = self._flushed_msgs = self._flushed_flows = 0
        self.pos = 0
        return path

    def append(self, data) -> None:
        """Copy ``data`` into the buffer; the caller made room (``pos + len(data) <= cap``)."""
        pos = self.pos
        end = pos + len(data)
        self.view[pos:end] = data
        self.pos = end

    def flush(self) -> None:
        """Write the buffer (whole messages). On an error the file is cut back to its last whole message and
        the buffered messages are forgotten: raises WriteFailed. The file stays open."""
        n = self.pos
        if not n:
            return
        fd, view, done = self.fd, self.view, 0
        try:
            while done < n:
                done += os.write(fd, view[done:n])
        except OSError as exc:
            lost = self.msgs - self._flushed_msgs
            self.pos = 0
            self.msgs, self.flows = self._flushed_msgs, self._flushed_flows
            try:
                os.ftruncate(fd, self.flushed)
            except OSError:
                pass  # the start-up recovery cuts a partial message off anyway
            raise WriteFailed(exc, lost) from exc
        self.flushed += n
        self.pos = 0
        self._flushed_msgs = self.msgs
        self._flushed_flows = self.flows

    def close(self) -> int:
        """fsync and close the file (flushed by the caller; the buffer is dropped). An empty file is deleted.
        Returns the size on disk; ``path`` and the counters stay readable until the next ``open``."""
        fd, self.fd = self.fd, None
        self.pos = 0
        try:
            os.fsync(fd)
        except OSError as exc:
            self.log.error("dump_fsync_failed", file=os.path.basename(self.path), error=exc.strerror or str(exc))
        os.close(fd)
        if not self.flushed:
            unlink(self.path)
        return self.flushed


def make_safe_dir(path: str) -> None:
    """Make the dump directory (and missing parents) 0750 if missing; refuse (PermissionError) it when a
    component on the way is a symlink another user owns (it could point anywhere root may write), when it
    is itself a symlink or not a directory, when group or others may write it, or when it belongs to a user
    other than us or root: they could plant names there (symlinks, FIFOs) for the recorder to open."""
    def refuse(why: str, where: str):
        raise PermissionError(errno.EPERM, f"{why}: refused", where)

    full, me = os.path.abspath(path), os.geteuid()
    parts = full.split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        component = os.sep + os.path.join(*parts[:i])
        try:
            st = os.lstat(component)
        except FileNotFoundError:
            try:
                os.mkdir(component, 0o750)  # never through a symlink at this name: EEXIST
            except FileExistsError:
                pass
            st = os.lstat(component)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, me):
            refuse(f"a symlink of uid {st.st_uid}", component)
    if not stat.S_ISDIR(st.st_mode):
        refuse("not a directory (a symlink?)", full)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, me):
        refuse(f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o} (must belong to this user or root, "
               "not writable by group or others)", full)


def open_regular(path: str, flags: int, mode: int = 0o640) -> int:
    """``os.open`` that never follows a symlink (ELOOP) and accepts only a regular file: a FIFO, device or
    directory planted under a dump's name is refused (EINVAL) without blocking on it."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
