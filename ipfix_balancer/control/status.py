"""Status documents: what each process publishes in the run directory, and ``ipfix-balancer status``.

The supervisor and every handler rewrite their document as JSON (see ``rundir``); ``collect`` reads them
back, adds what it observes of each handler process, and ``render`` prints the operator's table. The
dataclasses are the contract: their fields are the JSON keys, and ``to_dict``/``from_dict`` the only
translation. ``from_dict`` takes known keys only, so a document written by another release (during a
restart in place for an upgrade) still reads.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from ..core import liveness
from ..core.records import Held, Loss, SubreceiverStatus
from . import rundir
from .signals import SUPERVISOR_NAME

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from ..config.model import ReceiverConfig
    from ..logs import Log

_Doc = TypeVar("_Doc", bound="DataclassInstance")


def _known(cls: type[_Doc], doc: dict[str, Any], **nested: Any) -> _Doc:
    """cls from the keys of doc that are its fields, with nested documents already converted."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in doc.items() if k in names and k not in nested}, **nested)


#: the old name of a subreceiver's ``subreceiver`` key, still written for tools that read it: deprecated,
#: to be dropped in the release after next (README "Status")
DEPRECATED_ENDPOINT = "endpoint"


def _subreceiver(doc: dict[str, Any]) -> SubreceiverStatus:
    """A subreceiver's entry; one written by an older release names it ``endpoint`` only."""
    if "subreceiver" not in doc and DEPRECATED_ENDPOINT in doc:
        doc = {**doc, "subreceiver": doc[DEPRECATED_ENDPOINT]}
    return _known(SubreceiverStatus, doc)


def _subreceiver_dict(sub: SubreceiverStatus) -> dict[str, Any]:
    doc = dataclasses.asdict(sub)
    return {"subreceiver": sub.subreceiver, DEPRECATED_ENDPOINT: sub.subreceiver, **doc}


@dataclasses.dataclass
class ExportTargetStatus:
    """One DUMP_INSERT_PROCESSES target of a recorder."""
    target: str
    state: str  # idle | connecting | sending | draining | down | closed
    pending: int  # dumps not yet delivered
    sent: int
    error: str = ""

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ExportTargetStatus:
        return _known(cls, doc)


@dataclasses.dataclass
class RecorderStatus:
    """A recording handler's current file, rotation, spool and export targets."""
    dpi_id: int
    dir: str
    file: str
    file_bytes: int
    buffered_bytes: int
    file_msgs: int
    file_flows: int
    file_age_s: float
    next_rotation_s: float | None
    rotate_seconds: int
    max_flows: int
    rotations: int
    files_completed: int
    last_file: str
    recovered_files: int
    spool_files: int
    spool_bytes: int
    spool_limit: int
    evicted_files: int
    template_switches: int
    drops: int
    error: str
    errors: int
    exports: list[ExportTargetStatus] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RecorderStatus:
        return _known(cls, doc, exports=[ExportTargetStatus.from_dict(t) for t in doc.get("exports", [])])


@dataclasses.dataclass
class ListenStatus:
    proto: str
    bind: str
    port: int
    listening: bool


@dataclasses.dataclass
class ExporterSessionStatus:
    """One open exporter session (at most SESSIONS_LISTED per document, so its size stays bounded)."""
    peer: str
    since: float  # when this handler process opened or took it over (epoch seconds)
    odids: list[int]  # the observation domains it has templates for
    msgs_in: int = 0  # since then


SESSIONS_LISTED = 100


@dataclasses.dataclass
class HandlerStatus:
    """The document a handler publishes every second."""
    stream: str
    index: int
    name: str
    pid: int
    started: float
    time: float
    listen: ListenStatus
    mode: str
    dpi_id: int
    cpu: int | None
    msgs_in: int
    bytes_in: int
    malformed: int
    malformed_by_reason: dict[str, int]
    unknown_template: int
    connections: int
    connections_total: int
    drops: int
    subreceivers: list[SubreceiverStatus]
    recorder: RecorderStatus | None = None  # recording handlers only
    period: float = 1.0  # seconds between two documents: the heartbeat
    cpu_percent: float = 0.0  # over the last period (100 = one core)
    rates: dict[str, float] = dataclasses.field(default_factory=dict)  # RATES per second over the last period
    drop_records: int = 0
    drops_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    drop_records_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    limited: dict[str, int] = dataclasses.field(default_factory=dict)  # sessions refused/closed by a limit, by reason
    queued_bytes: int = 0  # every send queue together, with the copies kept until acknowledged (MEMORY_BYTES)
    memory_bytes: float = 0  # MEMORY_BYTES (core.records.Held): an int in a handler
    rcvbuf_overflow: int = 0  # UDP: datagrams the kernel dropped on the listening socket (buffer full)
    draining: int = 0  # sessions whose exporter left, their outputs still delivering (DRAIN_SECONDS)
    draining_bytes: int = 0  # what those still hold
    queued_msgs: int = 0  # messages every output holds, queued or not yet acknowledged: lost if the process dies
    queued_records: int = 0  # the data records in them
    beat: float | None = None  # time.monotonic() at writing: the heartbeat (core/liveness.py); None: older handler

    def age(self, mono: float, wall: float) -> float:
        """Seconds since the document was written, on the monotonic clock (no wall-clock step moves it);
        by the wall clock only for a document of a handler from before ``beat``."""
        return wall - self.time if self.beat is None else mono - self.beat
    sessions: list[ExporterSessionStatus] = dataclasses.field(default_factory=list)  # the first SESSIONS_LISTED

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["subreceivers"] = [_subreceiver_dict(s) for s in self.subreceivers]
        if self.recorder is None:
            del doc["recorder"]
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> HandlerStatus:
        recorder = doc.get("recorder")
        return _known(cls, doc, listen=_known(ListenStatus, doc["listen"]),
                      subreceivers=[_subreceiver(s) for s in doc.get("subreceivers", [])],
                      sessions=[_known(ExporterSessionStatus, s) for s in doc.get("sessions", [])],
                      recorder=None if recorder is None else RecorderStatus.from_dict(recorder))


RATES = ("msgs_in", "bytes_in", "msgs_out", "bytes_out")


class PeriodRates:
    """Per-second rates of cumulative counters between two calls. A handler feeds it its counters and its
    CPU seconds at every status write, so each document carries rates and %CPU of the last period and
    ``status`` needs no sampling of its own (a reader's two quick samples would measure nothing)."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, float]] | None = None

    def update(self, now: float, counters: dict[str, float]) -> dict[str, float]:
        last, self._last = self._last, (now, counters)
        if last is None or now <= last[0]:
            return dict.fromkeys(counters, 0.0)
        elapsed = now - last[0]
        # never negative: a subreceiver removed by a reload takes its counters out of the sum
        return {k: max(0.0, (v - last[1].get(k, 0)) / elapsed) for k, v in counters.items()}


STATUS_PERIOD = 1.0  # seconds between two handler documents: the heartbeat


class HandlerStatusWriter:
    """Builds a handler's document from the typed records its parts report, and writes it (every
    STATUS_PERIOD). Rates and %CPU are over the period since the last write. Status is for operators, never
    a reason to drop traffic: a failed write is logged once per episode; at the descriptor limit, where the
    status matters most, a descriptor kept in reserve is lent for the write."""

    def __init__(self, path: str, log: Log) -> None:
        self.path = path
        self.log = log
        self.started = time.time()
        self._rates = PeriodRates()
        self._failing = False
        self._reserve_fd: int | None = os.open(os.devnull, os.O_RDONLY)

    def write(self, rc: ReceiverConfig, *, listening: bool, msgs_in: int, bytes_in: int, unknown_template: int,
              loss: Loss, sent: tuple[int, int], held: Held, subreceivers: list[SubreceiverStatus],
              recorder: RecorderStatus | None, sessions: Iterable[ExporterSessionStatus], connections: int,
              connections_total: int, limited: dict[str, int]) -> None:
        """``sent``: messages and bytes handed to subreceivers; ``sessions``: the open ones (the first
        SESSIONS_LISTED are listed)."""
        cpu = os.times()
        beat = time.monotonic()
        rates = self._rates.update(beat, {"cpu": cpu.user + cpu.system, "msgs_in": msgs_in, "bytes_in": bytes_in,
                                          "msgs_out": sent[0], "bytes_out": sent[1]})
        doc = HandlerStatus(
            stream=rc.stream, index=rc.index, name=rc.name, pid=os.getpid(), started=self.started, time=time.time(),
            beat=beat, listen=ListenStatus(proto=rc.listen.port_type, bind=rc.listen.bind, port=rc.listen.port,
                                           listening=listening),
            mode=rc.forwarding.mode.value, dpi_id=rc.recording.dpi_id, cpu=rc.taskset, msgs_in=msgs_in,
            bytes_in=bytes_in, malformed=loss.malformed, malformed_by_reason=loss.malformed_by_reason,
            unknown_template=unknown_template, connections=connections, connections_total=connections_total,
            drops=loss.drops, drop_records=loss.drop_records, drops_by_reason=loss.drops_by_reason,
            drop_records_by_reason=loss.drop_records_by_reason, limited=limited, queued_bytes=held.queued_bytes,
            memory_bytes=held.memory_bytes, rcvbuf_overflow=loss.rcvbuf_overflow, draining=held.draining,
            draining_bytes=held.draining_bytes, queued_msgs=held.queued_msgs, queued_records=held.queued_records,
            subreceivers=subreceivers, recorder=recorder, period=STATUS_PERIOD,
            cpu_percent=round(100 * rates.pop("cpu"), 1), rates=rates,
            sessions=list(itertools.islice(sessions, SESSIONS_LISTED)))
        try:
            self._write(doc.to_dict())
        except OSError as exc:
            if not self._failing:
                self.log.error("status_write_failed", path=self.path, reason=str(exc))
            self._failing = True
        else:
            self._failing = False

    def _write(self, doc: dict[str, Any]) -> None:
        try:
            rundir.write_json(self.path, doc)
        except OSError as exc:
            if exc.errno != errno.EMFILE or self._reserve_fd is None:
                raise
            os.close(self._reserve_fd)
            try:
                rundir.write_json(self.path, doc)
            finally:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY)


@dataclasses.dataclass
class SupervisedHandler:
    name: str
    stream: str
    index: int
    pid: int | None  # None while waiting for a restart
    restarts: int
    killed_msgs: int = 0  # lost with processes of it the supervisor killed (hung) or that crashed
    killed_records: int = 0


@dataclasses.dataclass
class SupervisorStatus:
    """The document the supervisor rewrites whenever it starts a handler or reloads."""
    pid: int
    config: str
    handlers: list[SupervisedHandler]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SupervisorStatus:
        return _known(cls, doc, handlers=[_known(SupervisedHandler, h) for h in doc.get("handlers", [])])


def write_supervisor_status(run_dir: str, doc: SupervisorStatus) -> None:
    rundir.write_json(rundir.supervisor_status_path(run_dir), doc.to_dict())


def read_supervisor_status(run_dir: str) -> SupervisorStatus | None:
    doc = rundir.read_json(rundir.supervisor_status_path(run_dir))
    try:
        return None if doc is None else SupervisorStatus.from_dict(doc)
    except (TypeError, KeyError):
        return None


def supervisor_pid(run_dir: str) -> int | None:
    """The running supervisor's pid, or None. It is the process holding the run dir's supervisor lock and
    named like a supervisor: ``supervisor.pid`` is not believed (stale, or forged to make root signal a
    process of the forger's choice)."""
    pid = rundir.lock_holder(run_dir)
    try:
        return pid if pid is not None and psutil.Process(pid).name() == SUPERVISOR_NAME else None
    except psutil.Error:
        return None


# -- ipfix-balancer status -------------------------------------------------------------------------
@dataclasses.dataclass
class HandlerReport:
    """A handler's own document plus what ``status`` observes of its process (None: could not tell).
    ``stale``: the document is older than liveness.STALE_PERIODS of its periods (a hung or stopped handler)."""
    doc: HandlerStatus
    alive: bool
    uptime: float
    psr: int | None = None
    rss: int | None = None
    stale: bool = False
    restarts: int | None = None  # from the supervisor's document
    killed: tuple[int, int] = (0, 0)  # from the supervisor's document: messages, records lost with killed processes

    def to_dict(self) -> dict[str, Any]:
        observed = {"psr": self.psr, "rss": self.rss, "restarts": self.restarts,
                    "handler_killed": list(self.killed) if self.killed[0] else None}
        return {**self.doc.to_dict(), "alive": self.alive, "stale": self.stale,
                **{k: v for k, v in observed.items() if v is not None}, "uptime": self.uptime}


@dataclasses.dataclass
class StatusReport:
    """Everything ``status`` shows (``--json`` prints ``to_dict()``)."""
    running: bool
    supervisor_pid: int | None
    config: str | None
    run_dir: str
    handlers: list[HandlerReport]

    def to_dict(self) -> dict[str, Any]:
        return {"running": self.running, "supervisor_pid": self.supervisor_pid, "config": self.config,
                "run_dir": self.run_dir, "handlers": [h.to_dict() for h in self.handlers]}


def collect(run_dir: str) -> StatusReport:
    """Supervisor facts, and each handler's document plus process facts."""
    pid = supervisor_pid(run_dir)
    sup = read_supervisor_status(run_dir)
    supervised = {} if sup is None else {h.name: h for h in sup.handlers}
    handlers = []
    for doc in read_handler_documents(run_dir):
        report = _observe(doc)
        if doc.name in supervised:
            report.restarts = supervised[doc.name].restarts
            report.killed = (supervised[doc.name].killed_msgs, supervised[doc.name].killed_records)
        handlers.append(report)
    return StatusReport(running=pid is not None, supervisor_pid=pid, config=None if sup is None else sup.config,
                        run_dir=run_dir, handlers=handlers)


def load_handler_document(path: str) -> HandlerStatus | None:
    """The handler document at path; None when missing, empty or not a handler document; OSError when it
    could not be read (``rundir.load_json``)."""
    try:
        return HandlerStatus.from_dict(rundir.load_json(path) or {})
    except (TypeError, KeyError, AttributeError):
        return None


def read_handler_document(path: str) -> HandlerStatus | None:
    """The handler document at path; None when it is not there or could not be read."""
    try:
        return load_handler_document(path)
    except OSError:
        return None


def read_handler_documents(run_dir: str) -> list[HandlerStatus]:
    """Every handler's latest document, sorted by file name; unreadable ones are left out."""
    return [doc for path in rundir.handler_status_paths(run_dir) if (doc := read_handler_document(path)) is not None]


def is_stale(doc: HandlerStatus, mono: float, wall: float) -> bool:
    return liveness.stale(doc.age(mono, wall), doc.period)


def _observe(doc: HandlerStatus) -> HandlerReport:
    now = time.time()
    report = HandlerReport(doc, alive=False, uptime=now - doc.started, stale=is_stale(doc, time.monotonic(), now))
    try:
        proc = psutil.Process(doc.pid)
        with proc.oneshot():
            report.psr = proc.cpu_num()
            report.rss = proc.memory_info().rss
        report.alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        pass
    return report


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}T"


# Shown on the recorder's summary line (or its own lines); every other field goes on the detail line.
_RECORDER_SUMMARY = {"dpi_id", "file", "file_bytes", "file_flows", "file_msgs", "next_rotation_s",
                     "files_completed", "spool_files", "spool_bytes", "error", "exports"}


def _render_recorder(rec: RecorderStatus) -> list[str]:
    """A recording handler: current file, rotation, spool, an error if any, then one line per export target."""
    nxt = rec.next_rotation_s
    line = (f"    recorder: dpi_id={rec.dpi_id} file={rec.file or '-'} bytes={_size(rec.file_bytes)} "
            f"flows={rec.file_flows} msgs={rec.file_msgs} next_rotation={'-' if nxt is None else f'{nxt:.0f}s'} "
            f"completed={rec.files_completed} spool={rec.spool_files} files/{_size(rec.spool_bytes)}")
    rest = " ".join(f"{f.name}={getattr(rec, f.name)}" for f in dataclasses.fields(rec)
                    if f.name not in _RECORDER_SUMMARY)
    lines = [line, f"      {rest}"]
    if rec.error:
        lines.append(f"      ERROR: {rec.error}")
    for t in rec.exports:
        lines.append(f"    => export {t.target:<26}{t.state:<11} pending={t.pending} sent={t.sent}"
                     + (f" error={t.error!r}" if t.error else ""))
    return lines


def _reasons(sub: SubreceiverStatus) -> str:
    """`` (reason=messages/records ...)`` after a drop count, so no loss reads as an unexplained number."""
    parts = [f"{r}={n}/{sub.drop_records_by_reason.get(r, 0)}" for r, n in sorted(sub.drops_by_reason.items())]
    return f" ({' '.join(parts)} msgs/records)" if parts else ""


def render(report: StatusReport) -> str:
    """A table an operator reads at a glance: one block per handler, one line per subreceiver."""
    running = f"running, pid {report.supervisor_pid}" if report.running else "NOT RUNNING"
    lines = [f"supervisor: {running}   config: {report.config or '-'}   run dir: {report.run_dir}"]
    head = f"{'HANDLER':<16}{'PID':>8}{'CPU':>5}{'%CPU':>6}{'RSS':>7}  {'LISTEN':<10}{'MODE':<11}" \
           f"{'MSGS IN':>11}{'MSG/S':>9}{'MB/S IN':>8}{'MB/S OUT':>9}{'DROPS':>8}{'MALFORMED':>10}{'CONN':>5}" \
           f"{'RESTARTS':>9}  UPTIME"
    lines.append(head)
    for h in report.handlers:
        d = h.doc
        state = "" if h.alive else "  (not running)"
        if h.alive and h.stale:
            state = f"  STALE: no status for {d.age(time.monotonic(), time.time()):.0f}s"
        psr = "-" if h.psr is None else h.psr
        rate = {k: d.rates.get(k, 0.0) for k in RATES}
        lines.append(
            f"{d.name:<16}{d.pid:>8}{psr:>5}{d.cpu_percent:>6.1f}{_size(h.rss or 0):>7}  "
            f"{d.listen.proto + '/' + str(d.listen.port):<10}{d.mode:<11}{d.msgs_in:>11}{rate['msgs_in']:>9.0f}"
            f"{rate['bytes_in'] / 1e6:>8.1f}{rate['bytes_out'] / 1e6:>9.1f}{d.drops:>8}{d.malformed:>10}"
            f"{d.connections:>5}{'-' if h.restarts is None else h.restarts:>9}  {int(h.uptime)}s{state}")
        for sub in d.subreceivers:
            lines.append(f"    -> {sub.subreceiver:<28}{sub.state:<8} msgs_out={sub.msgs_out} "
                         f"bytes_out={sub.bytes_out} drops={sub.drops}{_reasons(sub)} queued={_size(sub.queued_bytes)}"
                         + (f" resent={sub.resent}" if sub.resent else "")
                         + (f" error={sub.last_error!r}" if sub.last_error else ""))
        if d.rcvbuf_overflow:  # docs/operations.md "Metrics": lost before the handler could read them
            lines.append(f"    rcvbuf_overflow: {d.rcvbuf_overflow} datagrams dropped by the kernel")
        if d.draining:
            lines.append(f"    draining: {d.draining} session(s) whose exporter left, {_size(d.draining_bytes)} held")
        if h.killed[0]:
            lines.append(f"    handler_killed: {h.killed[0]}/{h.killed[1]} msgs/records lost with killed processes")
        if d.limited:  # README "Hostile input": sessions refused or closed by a limit
            lines.append("    limited: " + " ".join(f"{k}={v}" for k, v in sorted(d.limited.items())))
        if d.recorder is not None:
            lines.extend(_render_recorder(d.recorder))
    if not report.handlers:
        lines.append("(no handler status files)")
    return "\n".join(lines)
