"""The dispatcher of a recording handler: every message goes to the current dump file; rotation; status."""

from __future__ import annotations

import os
import time
from typing import Callable

from ..config.model import ReceiverConfig
from ..control.signals import notify_supervisor
from ..control.status import RecorderStatus
from ..core.filescope import FileScope
from ..net.loop import Loop, cancel
from .dumpfile import BUFFER_BYTES, PART, PART_RE, DumpWriter, WriteFailed, dump_prefix, dump_stem
from .export import ExportTarget
from .spool import Spool

FLUSH_PERIOD = 1.0               # seconds: buffered messages reach the file (crash safety) at least this often
RETRY_SECONDS = 30.0             # after a disk error, try a new file at the next rotation or after this long
NO_FLOW_LIMIT = 1 << 62


class Recorder:
    """The dispatcher of a recording handler: every message of every exporter session goes to the current
    dump file (docs/configuration.md "Recording mode"). It decides when a file starts and ends; ``FileScope`` says which
    templates go before a message, ``DumpWriter`` writes, ``Spool`` keeps the completed files and
    ``ExportTarget`` sends them."""

    def __init__(self, loop: Loop, rc: ReceiverConfig, log, *, clock: Callable[[], float] = time.time,
                 notify: Callable[[], None] | None = None, buffer_bytes: int = BUFFER_BYTES):
        self.loop = loop
        self.rc = rc
        self.clock = clock
        settings = rc.recording
        self.log = log.bind(dpi_id=settings.dpi_id)
        self.dir = settings.dump_dir
        self.prefix = dump_prefix(rc.stream, settings.dpi_id)
        self.rotate_seconds = settings.rotate_seconds
        self.max_flows = settings.max_flows_per_file
        self._flow_limit = settings.max_flows_per_file or NO_FLOW_LIMIT
        if notify is None and rc.stream == "FULLFLOW":
            notify = notify_supervisor
        self._notify = notify
        self._writer = DumpWriter(self.dir, self.log, buffer_bytes)
        self._scope = FileScope()
        self._heads = self._scope.heads  # the hot path's one lookup (cleared in place with the scope)
        self._broken: str | None = None  # why no file can be written until the next rotation/retry
        self._retry_at = 0.0
        self.error = ""
        self.errors = 0
        # period
        now = clock()
        self.period_start = self.file_start = now
        self.due = now + self.rotate_seconds if self.rotate_seconds else None
        self._named_until = now  # the end in the newest dump name: no later name starts before it
        self._timer = None
        # counters
        self.drops = 0
        self.rotations = self.files_completed = self.template_switches = 0
        self.closed = False
        self.targets = [self._target(ep) for ep in settings.dump_insert_processes]
        self.spool = Spool(self.dir, self.targets, self.log, settings.spool_bytes)
        try:
            self.spool.load()
        except OSError as exc:
            self.error = f"{exc.strerror or exc}: {self.dir}"
            self.errors += 1
            self.log.error("dump_dir_unusable", error=self.error,
                           action="messages are counted as drops until a file can be opened")
        self._schedule()
        loop.call_later(FLUSH_PERIOD, self._periodic_flush)
        self.log.info("recorder_started", dir=self.dir, rotate_seconds=self.rotate_seconds, max_flows=self.max_flows,
                      exports=[str(t.ep) for t in self.targets], spool_limit=self.spool.limit,
                      completed_files=len(self.spool.completed), recovered_files=self.spool.recovered_files,
                      waiting_exports={str(t.ep): len(t.queue) for t in self.targets})
        for t in self.targets:
            t.kick()

    def _target(self, ep) -> ExportTarget:
        """An export target whose outcomes reach the spool (markers, deletion) and the drop count."""
        def delivered(name: str) -> None:
            self.spool.delivered(target, name)

        def dropped(count: int) -> None:
            self.drops += count

        target = ExportTarget(self.loop, self.dir, ep, self.log, on_delivered=delivered,
                              on_vanished=lambda name: self.spool.vanished(name), on_drop=dropped)
        return target

    # -- the hot path ----------------------------------------------------------------------------
    def dispatch(self, msg, odid: int, nrec: int, tmpl, snapshot) -> None:
        """Append one whole message to the current file (opened on the first message of a period)."""
        if self._heads.get(odid) is not snapshot and not self._enter(msg, odid, tmpl, snapshot):
            self.drops += 1
            return
        w = self._writer  # DumpWriter's inline append (see its docstring): no call per message
        pos = w.pos
        end = pos + len(msg)
        if end > w.cap:
            if not self._flush():
                self.drops += 1
                return
            pos, end = 0, len(msg)
        w.view[pos:end] = msg
        w.pos = end
        w.msgs += 1
        flows = w.flows = w.flows + nrec
        if flows >= self._flow_limit:
            self.rotate(reason="flows")

    def dispatch_many(self, entries: list, _size: int) -> None:
        """A run of data-only entries (the session batches them for the forwarding dispatchers)."""
        dispatch = self.dispatch
        for msg, odid, nrec, snapshot in entries:
            dispatch(msg, odid, nrec, None, snapshot)

    def _enter(self, msg, odid: int, tmpl, snapshot) -> bool:
        """Slow path, taken when this message's snapshot is not the last one seen for its ODID in this file:
        open the file if needed, and write what FileScope puts before the message."""
        if self._writer.fd is None:
            if self.closed or (self._broken is not None and time.monotonic() < self._retry_at):
                return False
            if not self._open():
                return False
        head = self._scope.enter(msg, odid, tmpl, snapshot)
        if head.switched:
            self.template_switches += 1
            if head.first_switch:
                self.log.warning("odid_shared_templates", odid=odid, file=os.path.basename(self._writer.path),
                                 action="exporter sessions share this ODID with different templates; the "
                                        "sender's templates are written before its messages")
        w = self._writer
        for m in head.messages:
            if w.pos + len(m) > w.cap and not self._flush():
                return False
            w.append(m)
            w.templates += 1
        return True

    # -- files -----------------------------------------------------------------------------------
    def _open(self) -> bool:
        # After the wall clock stepped back, names keep the newest name's time (same-second suffixes
        # _001… keep them in order) until the clock passes it again: sorted by name is sorted by time.
        self.file_start = max(self.file_start, self._named_until)
        base = dump_stem(self.prefix, self.file_start)
        try:
            path = self._writer.open(base)
        except OSError as exc:
            self._disk_error("dump_open_failed", exc, os.path.join(self.dir, base + PART))
            return False
        if self._broken is not None or self.error:
            self.log.info("dump_writable_again", file=os.path.basename(path), previous_error=self.error)
        self._broken = None
        self.error = ""
        return True

    def _flush(self) -> bool:
        """Write the buffer. On an error the file is cut back to its last whole message, completed, and the
        buffered messages are counted as drops."""
        try:
            self._writer.flush()
        except WriteFailed as failure:
            self.drops += failure.lost
            self._disk_error("dump_write_failed", failure.cause, self._writer.path, lost_messages=failure.lost)
            now = self.clock()
            self._finish(now, "write error")
            self.file_start = now
            return False
        return True

    def _disk_error(self, event: str, exc: OSError, path: str, **extra) -> None:
        reason = f"{exc.strerror or exc}: {path}" if isinstance(exc, OSError) else str(exc)
        self.error = reason
        self.errors += 1
        self._broken = reason
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._heads.clear()
        self.log.error(event, error=reason, errno=getattr(exc, "errno", None), **extra,
                       action="messages are counted as drops; a new file is tried at the next rotation "
                              f"(at the latest in {RETRY_SECONDS:.0f} s)")

    def _finish(self, end: float, reason: str) -> str | None:
        """Complete the current file: flush, fsync, rename to its final name. Returns the final name."""
        w = self._writer
        if w.fd is None:
            return None
        self._flush()
        if w.fd is None:  # a failed flush completes the file itself
            return None
        self._scope.reset()
        size = w.close()
        if not size:
            return None
        self._named_until = max(end, self.file_start)
        name = self.spool.complete(w.path, PART_RE.fullmatch(os.path.basename(w.path)).group("stem"),
                                   self._named_until, size)
        if name is not None:
            self.files_completed += 1
            self.log.info("dump_completed", file=name, reason=reason, bytes=size, messages=w.msgs, flows=w.flows,
                          templates=w.templates, seconds=round(end - self.file_start, 3))
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
        self._heads.clear()
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
        cancel(self._timer)
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
        if self._writer.fd is not None and self._writer.pos:
            self._flush()
        self.loop.call_later(FLUSH_PERIOD, self._periodic_flush)

    def close(self) -> None:
        """Handler stop: complete the current file; transfers in progress are abandoned (files stay pending
        and are sent again from the start by the next run)."""
        if self.closed:
            return
        self._finish(self.clock(), "stop")
        self.closed = True
        self.due = None
        cancel(self._timer)
        for t in self.targets:
            t.close()

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> RecorderStatus:
        now = self.clock()
        w = self._writer
        open_ = w.fd is not None
        spool = self.spool
        return RecorderStatus(
            dpi_id=self.rc.recording.dpi_id, dir=self.dir,
            file=os.path.basename(w.path) if open_ else "",
            file_bytes=w.flushed + w.pos if open_ else 0, buffered_bytes=w.pos if open_ else 0,
            file_msgs=w.msgs if open_ else 0, file_flows=w.flows if open_ else 0,
            file_age_s=round(now - self.file_start, 1) if open_ else 0,
            next_rotation_s=round(max(0.0, self.due - now), 1) if self.due is not None else None,
            rotate_seconds=self.rotate_seconds, max_flows=self.max_flows,
            rotations=self.rotations, files_completed=self.files_completed, last_file=spool.last_file,
            recovered_files=spool.recovered_files,
            spool_files=len(spool.completed), spool_bytes=spool.bytes, spool_limit=spool.limit,
            evicted_files=spool.evicted_files, template_switches=self.template_switches,
            drops=self.drops, error=self.error, errors=self.errors,
            exports=[t.status() for t in self.targets])
