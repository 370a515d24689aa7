"""Recording mode (BALANCER=Disabled): the received stream is written to rotating dump files, and each
completed file is exported to the insert processes of DUMP_INSERT_PROCESSES.

Dump files
    RFC 5655 IPFIX files: a plain sequence of whole IPFIX messages, byte-identical to what the exporter sent,
    plus template messages the recorder writes itself so that **every file decodes on its own**. The file
    being written is ``<stream>_<dpi_id>_<startUTC>.part``; at rotation it is flushed, fsynced and renamed to
    ``<stream>_<dpi_id>_<startUTC>_<endUTC>.ipfix`` (UTC, ``YYYYmmddTHHMMSSZ``, so names sort by time; should a
    name exist already, e.g. several flow-count rotations in one second, ``_001``, ``_002``… is appended). A
    file is opened on the first message of a period, so an empty period leaves no file.

Templates at the head of a file (one template scope per ODID)
    A file is read like one transport session: a decoder keeps one template set per Observation Domain. The
    recorder therefore keeps, per file and per ODID, the templates "in effect" and writes the sending
    session's templates (``Snapshot.messages`` filtered to that ODID) **immediately before** a message whose
    session's templates for its ODID differ from those in effect:

    * the first message of each ODID in a file is preceded by its session's templates, so every data record
      in the file has its templates earlier in the same file. Those template messages carry the sequence
      number and export time of the message they precede (template records do not count in the sequence,
      RFC 7011 §3.1), so a decoder sees no sequence gap at the start of a file;
    * **two exporter sessions sharing an ODID** (e.g. two DPIs both exporting ODID 0 to one receiver): if their
      templates are equal nothing is written; if they differ, the recorder writes the sending session's
      templates again each time the sender changes ("the latest sender's templates are in effect"). A
      sequential decoder (libfixbuf, scapy, IPFIXcol2 reading the file) then applies the right templates to
      every record, at the cost of template messages in the middle of the file and sequence numbers that
      jump between the two exporters. This is logged once per ODID per file (``odid_shared_templates``) and
      counted in status (``template_switches``). Giving each exporter its own ODID avoids it.
    * A template message from the exporter is written as received (after the head when needed).

Rotation
    Every ``rotate_seconds`` (ROTATE_DELAY_SECONDS when > 0, else ROTATE_MINUTES), when FW_MAX_QUEUE_SIZE > 0
    data records (flows) have been written to the file (checked after each message: messages are never cut,
    so a file holds at least that many flows and less than one message more), and on SIGHUP (``rotate``).
    Every rotation starts a new period: the time-based timer restarts from it. A Fullflow recorder signals
    the supervisor (SIGUSR1 to its parent) after each rotation; the supervisor sends SIGHUP to the other
    recording handlers, which then rotate at the same moment.

Export (DUMP_INSERT_PROCESSES)
    Each completed file is sent to each target as its own IPFIX transport session: one TCP connection per
    file (delivered once every byte was acknowledged by the target's TCP stack, then the connection is
    closed), or one UDP datagram per message (best effort: no acknowledgement exists). Delivery is tracked
    per file and target with marker files next to the dump (``<file>.pending-<target>`` renamed to
    ``<file>.sent-<target>``), so it survives a restart; a target that is down gets its files, oldest first,
    when it is back (retry with backoff). A file is deleted once every target has it. Delivery is
    at-least-once: a transfer cut by a failure or a stop is repeated from the start of the file.
    Without targets, completed files stay on disk. SPOOL_BYTES (> 0) bounds the completed files kept in the
    directory: beyond it the oldest are deleted (logged with the targets that did not get them).

Disk errors
    A file that cannot be opened or written (disk full, unwritable or missing directory) is logged with the
    reason and shown in status (``error``); the handler keeps accepting, counts every message it could not
    write in ``drops``, and tries a new file at the next rotation (at the latest after RETRY_SECONDS). A file
    cut by a write error is truncated to its last whole message and completed as usual.

Crash safety
    Data reaches the file in whole-message flushes (buffer full, every FLUSH_PERIOD, at rotation). At start a
    leftover ``.part`` is never overwritten: its trailing partial message (if any) is cut off and it is
    renamed to a final name whose end time is its last modification time; then it is exported like any
    completed file.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import mmap
import os
import re
import socket
import struct
import termios
import time
from typing import Callable

from .config import ReceiverConfig
from .control.signals import notify_supervisor
from .control.status import ExportTargetStatus, RecorderStatus
from .core.wire import HEADER_LEN, MAX_MESSAGE, VERSION
from .net.loop import READ, WRITE, Loop

BUFFER_BYTES = 4 * 1024 * 1024   # write buffer: one write() per this many bytes
FLUSH_PERIOD = 1.0               # seconds: buffered messages reach the file (crash safety) at least this often
RETRY_SECONDS = 30.0             # after a disk error, try a new file at the next rotation or after this long
PART = ".part"
DUMP = ".ipfix"
PENDING = ".pending-"
SENT = ".sent-"

EXPORT_CHUNK = 1024 * 1024       # bytes read from a dump at a time for export
EXPORT_TURN_BYTES = 4 * 1024 * 1024   # TCP bytes sent per loop turn per target (traffic keeps its turns)
EXPORT_TURN_DATAGRAMS = 256      # UDP datagrams per loop turn per target
EXPORT_RETRY_FIRST = 1.0
EXPORT_RETRY_CAP = 30.0
EXPORT_STALL = 60.0              # seconds without acknowledgement progress before a TCP transfer is failed
UDP_MAX_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}

_VL = struct.Struct("!HH")       # version, length
_SEQ_TIME = struct.Struct("!II")  # export time, sequence number (offset 4)
_ODID = struct.Struct("!I")
_STAMP_RE = r"\d{8}T\d{6}Z"
_PART_RE = re.compile(rf"(?P<stem>.+_(?P<start>{_STAMP_RE}))(?:\.\d+)?\.part")
_MARKER_RE = re.compile(r"(?P<dump>.+\.ipfix)\.(?P<kind>pending|sent)-(?P<token>.+)")


def stamp(t: float) -> str:
    """UTC time as used in dump names: ``20240131T235959Z``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def parse_stamp(text: str) -> int:
    """The inverse of ``stamp``."""
    return calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ"))


def dump_name(stream: str, dpi_id: int, start: float, end: float) -> str:
    """The final name of a dump covering [start, end]."""
    return f"{stream.lower()}_{dpi_id}_{stamp(start)}_{stamp(end)}{DUMP}"


def target_token(endpoint) -> str:
    """A target as it appears in marker file names: ``10.0.0.2_9920_tcp``, ``[::1]_9920_udp``."""
    return str(endpoint).replace("/", "_")


def whole_messages(path: str) -> tuple[int, int]:
    """(bytes, messages) of the whole IPFIX messages at the start of the file at ``path``.

    Walks the message headers (version 10, length >= 16, inside the file) through an mmap, so only the pages
    holding headers are read; stops at the first header that is cut off or not IPFIX.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_LEN:
            return 0, 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            unpack = _VL.unpack_from
            pos = count = 0
            while size - pos >= HEADER_LEN:
                version, length = unpack(m, pos)
                if version != VERSION or length < HEADER_LEN or pos + length > size:
                    break
                pos += length
                count += 1
    return pos, count


class Recorder:
    """The dispatcher of a recording handler: every message of every exporter session goes to the current
    dump file (see the module docstring for the rules)."""

    def __init__(self, loop: Loop, rc: ReceiverConfig, log, *, clock: Callable[[], float] = time.time,
                 notify: Callable[[], None] | None = None, buffer_bytes: int = BUFFER_BYTES):
        self.loop = loop
        self.rc = rc
        self.clock = clock
        settings = rc.recording
        self.log = log.bind(dpi_id=settings.dpi_id)
        self.dir = settings.dump_dir
        self.prefix = f"{rc.stream.lower()}_{settings.dpi_id}"
        self.rotate_seconds = settings.rotate_seconds
        self.max_flows = settings.max_flows_per_file
        self._flow_limit = settings.max_flows_per_file or (1 << 62)
        self.spool_limit = settings.spool_bytes
        if notify is None and rc.stream == "FULLFLOW":
            notify = notify_supervisor
        self._notify = notify
        # current file: the buffer holds whole messages not yet written; file_* count the file plus buffer
        self._cap = max(buffer_bytes, 2 * MAX_MESSAGE)
        self._buf = bytearray(self._cap)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._fd: int | None = None
        self.part = ""                  # path of the open .part file
        self.file_msgs = self.file_flows = self.file_templates = 0
        self._flushed = self._flushed_msgs = self._flushed_flows = 0
        self._heads: dict = {}          # odid -> snapshot of the last message of that ODID in this file
        self._effective: dict = {}      # odid -> template dict in effect in this file
        self._equal: dict = {}          # odid -> template dicts known to equal the effective one
        self._warned: set = set()       # ODIDs logged as shared in this file
        self._broken: str | None = None  # why no file can be written until the next rotation/retry
        self._retry_at = 0.0
        self.error = ""
        self.errors = 0
        # period
        now = clock()
        self.period_start = self.file_start = now
        self.due = now + self.rotate_seconds if self.rotate_seconds else None
        self._timer = None
        # counters
        self.drops = 0
        self.rotations = self.files_completed = self.evicted_files = self.template_switches = 0
        self.recovered_files = 0
        self.last_file = ""
        self.closed = False
        # completed files kept in the directory: name -> size, oldest first
        self.completed: dict[str, int] = {}
        self.spool_bytes = 0
        self.targets = [_Target(self, ep) for ep in settings.dump_insert_processes]
        self._startup()
        self._schedule()
        loop.call_later(FLUSH_PERIOD, self._periodic_flush)
        self.log.info("recorder_started", dir=self.dir, rotate_seconds=self.rotate_seconds, max_flows=self.max_flows,
                      exports=[str(t.ep) for t in self.targets], spool_limit=self.spool_limit,
                      completed_files=len(self.completed), recovered_files=self.recovered_files,
                      waiting_exports={str(t.ep): len(t.queue) for t in self.targets})
        for t in self.targets:
            t.kick()

    # -- the hot path ----------------------------------------------------------------------------
    def dispatch(self, msg, odid: int, nrec: int, tmpl, snapshot) -> None:
        """Append one whole message to the current file (opened on the first message of a period)."""
        if self._heads.get(odid) is not snapshot and not self._scope(msg, odid, tmpl, snapshot):
            self.drops += 1
            return
        pos = self._pos
        end = pos + len(msg)
        if end > self._cap:
            if not self._flush():
                self.drops += 1
                return
            pos, end = 0, len(msg)
        self._view[pos:end] = msg
        self._pos = end
        self.file_msgs += 1
        flows = self.file_flows = self.file_flows + nrec
        if flows >= self._flow_limit:
            self.rotate(reason="flows")

    def dispatch_many(self, entries: list, _size: int) -> None:
        """A run of data-only entries (the session batches them for the forwarding dispatchers)."""
        dispatch = self.dispatch
        for msg, odid, nrec, snapshot in entries:
            dispatch(msg, odid, nrec, None, snapshot)

    def _scope(self, msg, odid: int, tmpl, snapshot) -> bool:
        """Slow path, taken when this message's snapshot is not the last one seen for its ODID in this file:
        open the file if needed, and write the sender's templates when they differ from those in effect."""
        if self._fd is None:
            if self.closed or (self._broken is not None and time.monotonic() < self._retry_at):
                return False
            if not self._open():
                return False
        self._heads[odid] = snapshot
        cur = snapshot.domain(odid)   # template id -> (set id, record) of the sender for this ODID
        if odid not in self._effective:
            self._effective[odid] = cur
            self._equal[odid] = [cur]
            return self._head(msg, odid, snapshot)
        equal = self._equal[odid]
        for known in equal:
            if known is cur:
                return True
        if not cur or cur == self._effective[odid]:
            # Same templates (another session with identical ones, or the sender changed another ODID).
            # A sender without templates for this ODID cannot be helped: its data is undecodable anyway.
            if cur and len(equal) < 16:
                equal.append(cur)
            return True
        if tmpl is None:
            # A session's own templates for an ODID only change with a template set in that ODID (tmpl is
            # not None then): a data-only message with other templates comes from another exporter session.
            self.template_switches += 1
            if odid not in self._warned:
                self._warned.add(odid)
                self.log.warning("odid_shared_templates", odid=odid, file=os.path.basename(self.part),
                                 action="exporter sessions share this ODID with different templates; the "
                                        "sender's templates are written before its messages")
        self._effective[odid] = cur
        self._equal[odid] = [cur]
        return self._head(msg, odid, snapshot)

    def _head(self, msg, odid: int, snapshot) -> bool:
        """Write the snapshot's templates of ``odid`` with the sequence number and export time of ``msg``."""
        if not len(snapshot):
            return True
        export_time, seq = _SEQ_TIME.unpack_from(msg, 4)
        key = _ODID.pack(odid)
        for m in snapshot.messages(lambda _odid: seq, export_time):
            if m[12:16] == key:
                if not self._put(m):
                    return False
                self.file_templates += 1
        return True

    def _put(self, data) -> bool:
        pos = self._pos
        end = pos + len(data)
        if end > self._cap:
            if not self._flush():
                return False
            pos, end = 0, len(data)
        self._view[pos:end] = data
        self._pos = end
        return True

    # -- files -----------------------------------------------------------------------------------
    def _open(self) -> bool:
        start = self.file_start
        base = f"{self.prefix}_{stamp(start)}"
        try:
            os.makedirs(self.dir, exist_ok=True)
            for i in range(1000):
                path = os.path.join(self.dir, f"{base}{PART}" if i == 0 else f"{base}.{i}{PART}")
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    break
                except FileExistsError:  # never overwrite a .part (one a recovery could not rename)
                    continue
            else:
                raise FileExistsError(errno.EEXIST, "1000 .part files with this start time exist", base)
        except OSError as exc:
            self._disk_error("dump_open_failed", exc, os.path.join(self.dir, f"{base}{PART}"))
            return False
        self._fd = fd
        self.part = path
        self.file_msgs = self.file_flows = self.file_templates = 0
        self._flushed = self._flushed_msgs = self._flushed_flows = 0
        self._pos = 0
        if self._broken is not None or self.error:
            self.log.info("dump_writable_again", file=os.path.basename(path), previous_error=self.error)
        self._broken = None
        self.error = ""
        return True

    def _flush(self) -> bool:
        """Write the buffer (whole messages). On an error the file is cut back to its last whole message,
        completed, and the buffered messages are counted as drops."""
        n = self._pos
        if not n:
            return True
        fd, view, done = self._fd, self._view, 0
        try:
            while done < n:
                done += os.write(fd, view[done:n])
        except OSError as exc:
            self._write_failed(exc)
            return False
        self._flushed += n
        self._pos = 0
        self._flushed_msgs = self.file_msgs
        self._flushed_flows = self.file_flows
        return True

    def _write_failed(self, exc: OSError) -> None:
        lost = self.file_msgs - self._flushed_msgs
        self.drops += lost
        self._pos = 0
        self.file_msgs, self.file_flows = self._flushed_msgs, self._flushed_flows
        try:
            os.ftruncate(self._fd, self._flushed)
        except OSError:
            pass  # the start-up recovery cuts a partial message off anyway
        part = self.part
        self._disk_error("dump_write_failed", exc, part, lost_messages=lost)
        now = self.clock()
        self._finish(now, "write error")
        self.file_start = now

    def _disk_error(self, event: str, exc: OSError, path: str, **extra) -> None:
        reason = f"{exc.strerror or exc}: {path}" if isinstance(exc, OSError) else str(exc)
        self.error = reason
        self.errors += 1
        self._broken = reason
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._heads = {}
        self.log.error(event, error=reason, errno=getattr(exc, "errno", None), **extra,
                       action="messages are counted as drops; a new file is tried at the next rotation "
                              f"(at the latest in {RETRY_SECONDS:.0f} s)")

    def _finish(self, end: float, reason: str) -> str | None:
        """Complete the current file: flush, fsync, rename to its final name. Returns the final name."""
        fd = self._fd
        if fd is None:
            return None
        self._flush()
        fd = self._fd  # a failed flush completes the file itself
        if fd is None:
            return None
        self._fd = None
        self._heads, self._effective, self._equal, self._warned = {}, {}, {}, set()
        part, self.part = self.part, ""
        size, msgs, flows = self._flushed, self.file_msgs, self.file_flows
        try:
            os.fsync(fd)
        except OSError as exc:
            self.log.error("dump_fsync_failed", file=os.path.basename(part), error=exc.strerror or str(exc))
        os.close(fd)
        if not size:
            _unlink(part)
            return None
        name = self._complete(part, _PART_RE.fullmatch(os.path.basename(part)).group("stem"),
                              max(end, self.file_start), size)
        if name is not None:
            self.files_completed += 1
            self.log.info("dump_completed", file=name, reason=reason, bytes=size, messages=msgs, flows=flows,
                          templates=self.file_templates, seconds=round(end - self.file_start, 3))
        return name

    def _complete(self, part: str, stem: str, end: float, size: int, register: bool = True) -> str | None:
        """Rename a finished .part to ``<stem>_<end>.ipfix`` (never over an existing file), marking it pending
        for every target first; register it for export and apply the spool limit (at start-up the directory
        scan registers it instead)."""
        base = f"{stem}_{stamp(end)}"
        name = base + DUMP
        i = 0
        while os.path.lexists(os.path.join(self.dir, name)) or name in self.completed:
            i += 1
            name = f"{base}_{i:03d}{DUMP}"
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
                _unlink(os.path.join(self.dir, name + PENDING + t.token))
            return None
        _fsync_dir(self.dir)
        self.last_file = name
        if not register:
            return name
        self.completed[name] = size
        self.spool_bytes += size
        for t in self.targets:
            t.add(name)
        self._enforce_spool()
        return name

    # -- rotation --------------------------------------------------------------------------------
    def rotate(self, reason: str = "hup") -> None:
        """Complete the current file (if any) and start a new period; the timer restarts from now."""
        if self.closed:
            return
        now = self.clock()
        self._finish(now, reason)
        self.period_start = self.file_start = now
        self.due = now + self.rotate_seconds if self.rotate_seconds else None
        self._broken = None
        self._heads = {}
        self.rotations += 1
        self._schedule()
        if self._notify is not None:
            self._notify()

    def poll_time(self) -> bool:
        """Rotate if the period is over (or the clock went back before its start). True if it rotated."""
        if self.due is None or self.closed:
            return False
        now = self.clock()
        if now >= self.due or now < self.period_start - 1.0:
            self.rotate(reason="time")
            return True
        self._schedule()
        return False

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.due is not None and not self.closed:
            self._timer = self.loop.call_later(max(0.0, self.due - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.poll_time()

    def _periodic_flush(self) -> None:
        """Buffered messages reach the file at least every FLUSH_PERIOD (what a crash can lose)."""
        if self.closed:
            return  # a reconfiguration may replace this recorder in the same loop: stop ticking
        if self._fd is not None and self._pos:
            self._flush()
        self.loop.call_later(FLUSH_PERIOD, self._periodic_flush)

    # -- sessions, stop ----------------------------------------------------------------------------
    def session_closed(self, session) -> None:
        """Nothing to do: a file only holds the templates of the sessions whose messages it holds."""

    def close(self) -> None:
        """Handler stop: complete the current file; transfers in progress are abandoned (files stay pending
        and are sent again from the start by the next run)."""
        if self.closed:
            return
        self._finish(self.clock(), "stop")
        self.closed = True
        self.due = None
        if self._timer is not None:
            self._timer.cancel()
        for t in self.targets:
            t.close()

    # -- start-up: leftovers, markers --------------------------------------------------------------
    def _startup(self) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
            names = os.listdir(self.dir)
        except OSError as exc:
            self.error = f"{exc.strerror or exc}: {self.dir}"
            self.errors += 1
            self.log.error("dump_dir_unusable", error=self.error,
                           action="messages are counted as drops until a file can be opened")
            return
        for name in sorted(n for n in names if n.endswith(PART)):
            self._recover(name)
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
                    st = os.stat(os.path.join(self.dir, name))
                except OSError:
                    continue
                dumps.append((st.st_mtime, name, st.st_size))
        dumps.sort()
        tokens = {t.token: t for t in self.targets}
        removed: dict[str, int] = {}
        for _, name, size in dumps:
            state = markers.pop(name, {"pending": set(), "sent": set()})
            for token in state["pending"] - tokens.keys():
                removed[token] = removed.get(token, 0) + 1
                _unlink(os.path.join(self.dir, name + PENDING + token))
            pending = state["pending"] & tokens.keys()
            if not pending and state["sent"]:
                self._delete(name, state["sent"])  # every (still configured) target has it
                continue
            for token in state["sent"] - tokens.keys():  # said all it could; runtime deletes know current targets
                _unlink(os.path.join(self.dir, name + SENT + token))
            self.completed[name] = size
            self.spool_bytes += size
            for token in sorted(pending):
                tokens[token].queue.append(name)
        for token, count in removed.items():
            self.log.warning("export_target_removed", target=token, files=count,
                             action="no longer in DUMP_INSERT_PROCESSES: these files are not sent to it")
        for name, state in markers.items():  # markers without a dump: rename interrupted, or deleted by hand
            self._delete(name, state["pending"] | state["sent"], dump=False)
        self._enforce_spool()

    def _recover(self, name: str) -> None:
        """A .part left by a run that died: keep its whole messages, give it a final name, export it."""
        path = os.path.join(self.dir, name)
        m = _PART_RE.fullmatch(name)
        if m is None:
            self.log.warning("dump_part_unknown", file=name, action="not a dump of this recorder; left alone")
            return
        try:
            st = os.stat(path)
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
            if good < size:
                os.truncate(path, good)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.log.error("dump_recovery_failed", file=name, error=exc.strerror or str(exc),
                           action="left as it is; never overwritten")
            return
        final = self._complete(path, m["stem"], max(mtime, parse_stamp(m["start"])), good,
                               register=False)
        if final is not None:
            self.recovered_files += 1
            self.log.warning("dump_recovered", part=name, file=final, bytes=good, messages=count,
                             cut_bytes=size - good)

    # -- spool, delivery -------------------------------------------------------------------------
    def _enforce_spool(self) -> None:
        limit = self.spool_limit
        while limit and self.spool_bytes > limit and self.completed:
            name = next(iter(self.completed))
            waiting = [str(t.ep) for t in self.targets if name in t.queue]
            size = self.completed[name]
            for t in self.targets:
                t.drop(name)
            self._delete(name, {t.token for t in self.targets})
            self.evicted_files += 1
            self.log.warning("dump_evicted", file=name, bytes=size, spool_bytes=self.spool_bytes, spool_limit=limit,
                             not_delivered_to=waiting)

    def _delete(self, name: str, tokens, dump: bool = True) -> None:
        if dump:
            _unlink(os.path.join(self.dir, name))
        for token in tokens:
            _unlink(os.path.join(self.dir, name + PENDING + token))
            _unlink(os.path.join(self.dir, name + SENT + token))
        size = self.completed.pop(name, None)
        if size is not None:
            self.spool_bytes -= size

    def _delivered(self, target: "_Target", name: str) -> None:
        marker = os.path.join(self.dir, name + PENDING + target.token)
        try:
            os.rename(marker, os.path.join(self.dir, name + SENT + target.token))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self.log.error("export_marker_failed", file=name, target=str(target.ep), error=exc.strerror)
        if not any(name in t.queue for t in self.targets):
            self._delete(name, {t.token for t in self.targets})

    def _vanished(self, name: str) -> None:
        """A dump was deleted by someone else: forget it everywhere."""
        self.log.warning("dump_missing", file=name, action="not exported: the file is gone")
        for t in self.targets:
            t.drop(name)
        self._delete(name, {t.token for t in self.targets}, dump=False)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> RecorderStatus:
        now = self.clock()
        open_ = self._fd is not None
        return RecorderStatus(
            dpi_id=self.rc.recording.dpi_id, dir=self.dir,
            file=os.path.basename(self.part) if open_ else "",
            file_bytes=self._flushed + self._pos if open_ else 0, buffered_bytes=self._pos if open_ else 0,
            file_msgs=self.file_msgs if open_ else 0, file_flows=self.file_flows if open_ else 0,
            file_age_s=round(now - self.file_start, 1) if open_ else 0,
            next_rotation_s=round(max(0.0, self.due - now), 1) if self.due is not None else None,
            rotate_seconds=self.rotate_seconds, max_flows=self.max_flows,
            rotations=self.rotations, files_completed=self.files_completed, last_file=self.last_file,
            recovered_files=self.recovered_files,
            spool_files=len(self.completed), spool_bytes=self.spool_bytes, spool_limit=self.spool_limit,
            evicted_files=self.evicted_files, template_switches=self.template_switches,
            drops=self.drops, error=self.error, errors=self.errors,
            exports=[ExportTargetStatus(target=str(t.ep), state=t.state, pending=len(t.queue), sent=t.files_sent,
                                        error=t.last_error) for t in self.targets])


class _Target:
    """Export of completed dumps to one insert process, one file at a time, oldest first."""

    def __init__(self, rec: Recorder, ep):
        self.rec = rec
        self.ep = ep
        self.token = target_token(ep)
        self.queue: list[str] = []       # dump names not yet delivered, oldest first; queue[0] is in transfer
        self.state = "idle"              # idle | connecting | sending | draining | down | closed
        self.sock: socket.socket | None = None
        self.fh = None
        self._data = b""
        self._off = 0
        self._timer = None
        self._backoff = EXPORT_RETRY_FIRST
        self._acked_at = 0.0
        self._outq = -1
        self._size = 0
        self.files_sent = 0
        self.bytes_sent = 0
        self.skipped = 0
        self.last_error = ""

    def add(self, name: str) -> None:
        self.queue.append(name)
        self.kick()

    def kick(self) -> None:
        if self.state == "idle" and self.queue and not self.rec.closed:
            self._start(self.queue[0])

    def drop(self, name: str) -> None:
        """Forget a dump (evicted or gone); a transfer of it in progress is abandoned."""
        if name not in self.queue:
            return
        if self.queue[0] == name and self.state in ("connecting", "sending", "draining"):
            self._cleanup()
            self.state = "idle"
            self.queue.remove(name)
            self.rec.loop.call_later(0, self.kick)
            return
        self.queue.remove(name)

    def close(self) -> None:
        self._cleanup()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state = "closed"

    # -- one transfer ----------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        path = os.path.join(self.rec.dir, name)
        try:
            self.fh = open(path, "rb", buffering=0)
            self._size = os.fstat(self.fh.fileno()).st_size
        except FileNotFoundError:
            self.rec._vanished(name)
            self.rec.loop.call_later(0, self.kick)
            return
        except OSError as exc:
            self._fail(exc)
            return
        self._data, self._off = b"", 0
        ep = self.ep
        tcp = ep.proto == "tcp"
        sock = socket.socket(ep.family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        sock.setblocking(False)
        self.sock = sock
        if tcp:
            err = sock.connect_ex((ep.host, ep.port))
            if err not in (0, errno.EINPROGRESS):
                self._fail(OSError(err, os.strerror(err)))
                return
            self.state = "connecting"
            self.rec.loop.watch(sock, WRITE, self._on_connect)
        else:
            try:
                sock.connect((ep.host, ep.port))
            except OSError as exc:
                self._fail(exc)
                return
            self.state = "sending"
            self.rec.loop.watch(sock, WRITE, self._on_udp)

    def _on_connect(self, _mask) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        self.state = "sending"
        self.rec.loop.watch(self.sock, READ | WRITE, self._on_tcp)

    def _on_tcp(self, mask: int) -> None:
        if mask & READ and not self._read():
            return
        if mask & WRITE and self.state == "sending":
            self._send_tcp()

    def _read(self) -> bool:
        """Insert processes send nothing back: EOF or junk is ignored, a reset fails the transfer."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError as exc:
            self._fail(exc)
            return False
        if not data:  # the peer closed its side (stop watching EOF); a reset, if it did not read all, shows on send
            if self.state == "sending":
                self.rec.loop.watch(self.sock, WRITE, self._on_tcp)
            else:
                self.rec.loop.unwatch(self.sock)
        return True

    def _send_tcp(self) -> None:
        sock = self.sock
        budget = EXPORT_TURN_BYTES
        while budget > 0:
            if self._off >= len(self._data):
                try:
                    self._data, self._off = self.fh.read(EXPORT_CHUNK), 0
                except OSError as exc:
                    self._fail(exc)
                    return
                if not self._data:
                    self._all_sent()
                    return
            try:
                n = sock.send(memoryview(self._data)[self._off:])
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._off += n
            budget -= n

    def _all_sent(self) -> None:
        """Everything is in the kernel: close our side, then wait until the target acknowledged it all."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)
            return
        self.state = "draining"
        self.rec.loop.watch(self.sock, READ, self._on_tcp)
        self._acked_at, self._outq = time.monotonic(), -1
        self._poll_acked()

    def _poll_acked(self) -> None:
        self._timer = None
        if self.state != "draining":
            return
        sock = self.sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        try:
            outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            outq = 0  # cannot tell: the kernel accepted everything, that has to do
        if outq == 0:
            self._success()
            return
        now = time.monotonic()
        if outq != self._outq:
            self._outq, self._acked_at = outq, now
        elif now - self._acked_at > EXPORT_STALL:
            self._fail(TimeoutError(errno.ETIMEDOUT, f"no acknowledgement for {EXPORT_STALL:.0f} s"))
            return
        self._timer = self.rec.loop.call_later(0.02, self._poll_acked)

    def _on_udp(self, _mask) -> None:
        sock, limit = self.sock, UDP_MAX_PAYLOAD.get(self.ep.family, 65507)
        for _ in range(EXPORT_TURN_DATAGRAMS):
            data, off = self._data, self._off
            if len(data) - off < HEADER_LEN or off + _VL.unpack_from(data, off)[1] > len(data):
                try:
                    more = self.fh.read(EXPORT_CHUNK)
                except OSError as exc:
                    self._fail(exc)
                    return
                if not more:
                    self._success()  # a cut-off tail cannot be in a completed dump; nothing is left
                    return
                data, off = self._data, self._off = data[off:] + more, 0
                continue
            length = _VL.unpack_from(data, off)[1]
            if length < HEADER_LEN:
                self._success()
                return
            if length > limit:
                self.skipped += 1
                self.rec.drops += 1
                self._off = off + length
                continue
            try:
                sock.send(memoryview(data)[off:off + length])
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._off = off + length

    # -- outcome ---------------------------------------------------------------------------------
    def _success(self) -> None:
        name = self.queue.pop(0)
        self._cleanup()
        self.state = "idle"
        self.files_sent += 1
        self.bytes_sent += self._size
        self._backoff = EXPORT_RETRY_FIRST
        if self.last_error:
            self.rec.log.info("export_target_up", target=str(self.ep))
            self.last_error = ""
        self.rec.log.info("dump_exported", file=name, target=str(self.ep), bytes=self._size, waiting=len(self.queue))
        self.rec._delivered(self, name)
        self.kick()

    def _fail(self, exc: BaseException) -> None:
        self._cleanup()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if reason != self.last_error:
            self.rec.log.warning("export_failed", target=str(self.ep), file=self.queue[0] if self.queue else "",
                                 reason=reason, waiting=len(self.queue), retry_in=self._backoff)
        self.last_error = reason
        self.state = "down"
        self._timer = self.rec.loop.call_later(self._backoff, self._retry)
        self._backoff = min(self._backoff * 2, EXPORT_RETRY_CAP)

    def _retry(self) -> None:
        self._timer = None
        if self.state == "down":
            self.state = "idle"
            self.kick()

    def _cleanup(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            self.rec.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self._data, self._off = b"", 0


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
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
