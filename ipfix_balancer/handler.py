"""One handler process per receiver: the composition root of the data plane.

It builds the loop, the listener (``net.listener``), one ``core.session.ExporterSession`` per exporter with an
``net.connection.OutputConnection`` per output, and the recorder; and it handles what concerns the whole
process: handover to a successor, signals, live reconfiguration, stop and drain, the status document.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import os
import signal
import socket
import time

from .config.model import Mode, ReceiverConfig, live_change_impossible
from .control import channel, rundir
from .control.rundir import DRAIN_TIMEOUT
from .control.ports import bind, listen_failure
from .control.privileges import raise_fd_limit
from .control.signals import Wakeup, set_process_name
from .control.status import (SESSIONS_LISTED, ExporterSessionStatus, HandlerStatus, ListenStatus, PeriodRates,
                             SubreceiverStatus)
from .core.framing import FramingError
from .core.sendqueue import DRAIN_LIMIT, Budget, SendQueue, State, SubreceiverStats
from .core.session import Counters, ExporterSession, Forwarding, Lifecycle, over_drain_limit
from .core.templates import TemplateLimit, TemplatePool
from .logs import Throttle
from .net import handover
from .net.connection import OutputConnection
from .net.listener import TcpListener, UdpListener, kernel_drops, peer_host
from .net.loop import READ, Loop

STATUS_PERIOD = 1.0
EXIT_CANNOT_LISTEN = 75  # EX_TEMPFAIL: the port may be free later, the supervisor retries with backoff
TEMPLATE_MEMORY_SHARE = 8  # the templates of all sessions together may take MEMORY_BYTES / 8


class ListenError(Exception):
    """The receiver's socket cannot be bound: an operator's problem (port in use, address not here), said
    in one line, not a crash."""


class Handler:
    def __init__(self, rc: ReceiverConfig, run_dir: str, log, control: socket.socket | None = None):
        self.rc = rc
        self.control = control  # the supervisor's private channel (control/channel.py)
        self.handover_conn: socket.socket | None = None  # to the successor, while one is announced
        self.run_dir = run_dir
        self.log = log
        self.throttle = Throttle(log)  # every line that can repeat per message, connection or retry
        self.loop = Loop()
        self.subreceivers = [SubreceiverStats(ep) for ep in rc.forwarding.subreceivers]
        self.budget = Budget(rc.limits.memory_bytes)  # shared by every send queue of this handler
        self.template_pool = TemplatePool(rc.limits.memory_bytes // TEMPLATE_MEMORY_SHARE)  # every session's
        self.recorder = None
        self.sessions: set[ExporterSession] = set()
        self.opened: dict[ExporterSession, float] = {}  # session -> when it was opened, for the status
        self.counters = Counters()
        self.malformed: dict[str, int] = {}
        self.overflow = 0  # the UDP listening socket's kernel drops since this process has it, as last read
        self._overflow_base = 0  # ... and when it took the socket (a handed-over socket has a past)
        self.connections_total = 0
        self.retired_drops = 0  # drops of recorders replaced by a reconfiguration
        self.retired_subreceivers: list[SubreceiverStats] = []  # removed by a reconfiguration
        self.started = time.time()
        self.rates = PeriodRates()
        self.listener: TcpListener | UdpListener | None = None
        self.listening = False
        self.handed_over = False
        self._status_error = False
        self.stopping = False
        self._stop_deadline = 0.0
        self.exit_code = 0
        self.status_path = rundir.handler_status_path(run_dir, rc.stream, rc.index)
        self._odid_announcer: dict[int, ExporterSession] = {}  # odid -> the session that last announced templates
        self._odid_conflicts: set[int] = set()  # ODIDs logged as shared with conflicting templates
        self._reserve_fd: int | None = os.open(os.devnull, os.O_RDONLY)  # for the status at the descriptor limit

    # -- setup ---------------------------------------------------------------------------------
    def start(self, predecessor: socket.socket | None = None) -> None:
        """Listen (or take the listening socket and exporter sessions over from ``predecessor``, the
        handover socket the supervisor gave us), then wait for the supervisor's messages."""
        rc = self.rc
        taken = None
        if predecessor is not None:
            try:
                taken = handover.take(predecessor)  # the predecessor has closed its recorder by then
            except (OSError, ValueError) as exc:
                self.log.warning("takeover_unavailable", reason=str(exc) or type(exc).__name__)
        if rc.forwarding.mode is Mode.DISABLED:
            self.recorder = self._new_recorder(rc)
        if taken is None:
            lst = rc.listen
            try:
                sock = bind(lst.port_type, lst.bind, lst.port, rc.limits.rcvbuf_bytes)
            except OSError as exc:
                raise ListenError(listen_failure(lst.port_type, lst.bind, lst.port, exc)) from None
            self._listen(sock)
        else:
            self._adopt(*taken)
        self.listening = True
        if self.control is not None:
            self.loop.watch(self.control, READ, self._on_control)
        self._install_signals()
        self.loop.every(STATUS_PERIOD, self.write_status)
        self.write_status()
        if not rc.limits.allow and not ipaddress.ip_address(rc.listen.bind).is_loopback:
            self.log.warning("anyone_may_export", listen=f"{rc.listen.bind}/{rc.listen.port}/{rc.listen.port_type}",
                             hint=f"set IPFIX_{rc.stream}_ALLOW[{rc.index}] to the exporters' addresses")
        self.log.info("handler_started", listen=f"{rc.listen.bind}/{rc.listen.port}/{rc.listen.port_type}",
                      mode=rc.forwarding.mode.value, subreceivers=[str(e) for e in rc.forwarding.subreceivers],
                      dpi_id=rc.recording.dpi_id)

    def _listen(self, sock: socket.socket) -> None:
        cls = TcpListener if self.rc.listen.port_type == "tcp" else UdpListener
        self.listener = cls(self.loop, sock, self.log, self._open_session, self.count_malformed, self.rc.limits,
                            self.throttle)
        if cls is UdpListener:
            self._overflow_base = kernel_drops(sock) or 0

    def _new_recorder(self, rc: ReceiverConfig):
        from .recording.recorder import Recorder  # recording pulls in file handling only where it is used
        return Recorder(self.loop, rc, self.log)

    # -- sessions ------------------------------------------------------------------------------
    def _forwarding(self) -> Forwarding:
        fw = self.rc.forwarding
        refresh = fw.template_refresh if fw.sub_proto == "udp" else 0.0
        return Forwarding(fw.mode, self.subreceivers, fw.queue_bytes, refresh, self.recorder,
                          stall_seconds=fw.stall_seconds if fw.sub_proto == "tcp" else 0,
                          template_limits=self.rc.template_limits, drain_seconds=fw.drain_seconds)

    def _open_session(self, key, peer: str, templates=()) -> ExporterSession:
        make_output = self._make_output
        if self.rc.forwarding.sub_source == "exporter":  # UDP key: the exporter's address; TCP: its socket
            make_output = functools.partial(make_output, source=key if isinstance(key, tuple) else key.getpeername())
        session = ExporterSession(peer, self.counters, make_output, self._session_gone, templates,
                                  self._session_refused)
        session.configure(self._forwarding())
        session.on_templates = self._templates_announced
        session.tracker.pool = self.template_pool
        self.sessions.add(session)
        self.opened[session] = time.time()
        self.connections_total += 1
        return session

    def _templates_announced(self, session: ExporterSession, odid: int) -> None:
        """Collectors that scope templates by (source address, ODID), as nfcapd and nfacctd do, see every
        exporter behind the balancer as one: two sessions defining one template id of one ODID differently
        garble each other there. Logged once per ODID (the recorder handles its own files)."""
        if self.rc.forwarding.mode is Mode.DISABLED:
            return
        last = self._odid_announcer.get(odid)
        self._odid_announcer[odid] = session
        if last is None or last is session or last.peer == session.peer or odid in self._odid_conflicts:
            return  # compared only when the announcer changes: a session's own template stream costs O(1)
        mine = session.tracker.snapshot.domain(odid) or {}
        theirs = last.tracker.snapshot.domain(odid) or {}
        if any(theirs.get(tid, record) != record for tid, record in mine.items()):
            self._odid_conflicts.add(odid)
            self.log.warning("odid_shared_with_other_templates", odid=odid, sessions=[last.peer, session.peer],
                             remedy="give each exporter its own ODID: collectors that key templates by source "
                                    "address and ODID cannot tell these sessions apart")

    def _make_output(self, stats: SubreceiverStats, source: tuple | None = None, **settings) -> SendQueue:
        queue = SendQueue(stats, budget=self.budget, **settings)
        OutputConnection(self.loop, queue, self.log, self.throttle, source)
        return queue

    def _session_gone(self, session: ExporterSession) -> None:
        session.tracker.release()
        self.sessions.discard(session)
        self.opened.pop(session, None)
        if self.listener is not None:
            self.listener.forget(session)

    @property
    def connections(self) -> int:
        return sum(1 for s in self.sessions if s.state is Lifecycle.OPEN)

    def count_malformed(self, error: FramingError, peer: str) -> None:
        self.malformed[error.reason] = self.malformed.get(error.reason, 0) + 1
        self.throttle.warning("malformed_ipfix", peer_host(peer), peer=peer, reason=error.reason, detail=error.detail,
                         action="session closed" if self.rc.listen.port_type == "tcp" else "datagram dropped",
                         malformed_total=sum(self.malformed.values()))

    def _session_refused(self, session: ExporterSession, error: FramingError, first: bool) -> None:
        """A message of ``session`` was refused: counted each time, logged once per session and reason (a
        session repeating itself must not flood the log)."""
        self.malformed[error.reason] = self.malformed.get(error.reason, 0) + 1
        if not first:
            return
        if isinstance(error, TemplateLimit):
            event, action = "template_limit", ("session closed" if self.rc.listen.port_type == "tcp"
                                               else "datagram dropped")
        else:
            event, action = "malformed_ipfix", "message dropped, session continues"
        self.log.warning(event, peer=session.peer, reason=error.reason, detail=error.detail, action=action,
                         malformed_total=sum(self.malformed.values()), logged="once per session and reason")

    # -- handover (restart without dropping exporters) ------------------------------------------
    def _adopt(self, state: dict, fds: list[int]) -> None:
        """Continue the predecessor's sockets: its listener, and each exporter session with the part
        of a message it had already read and the templates it had learnt (replayed to new outputs)."""
        socks = [socket.socket(fileno=fd) for fd in fds]
        listener = socks[state["listener"]]
        listener.setblocking(False)
        self._listen(listener)
        for item in state["sessions"]:
            templates = [memoryview(handover.decode(m)) for m in item["templates"]]
            if "fd" in item:
                self.listener.adopt(socks[item["fd"]], item["peer"], handover.decode(item["tail"]), templates)
            else:
                self.listener.adopt(tuple(item["addr"]), item["peer"], templates)
        self.log.info("took_over", sessions=len(state["sessions"]), from_pid=state["pid"])

    def _on_control(self, _mask) -> None:
        """A message from the supervisor: new settings, or a successor to hand over to. End-of-file: the
        supervisor is gone (killed), and a handler without one must not keep the port."""
        try:
            got = channel.receive(self.control)
        except BlockingIOError:
            return
        except (OSError, channel.ChannelError) as exc:
            self.log.error("control_message_invalid", reason=str(exc))
            return
        if got is None:
            self.log.error("supervisor_gone", action="stopping")
            self._close_control()
            self.stop()
            return
        doc, fds = got
        if "receiver" in doc:
            self._apply_settings(doc["receiver"])
        if doc.get("handover") and fds and not self.stopping and self.handover_conn is None:
            self.handover_conn = socket.socket(fileno=fds.pop(0))
            self.handover_conn.setblocking(False)
            self.loop.watch(self.handover_conn, READ, self._on_handover)
        for fd in fds:  # nothing else is expected with a message
            os.close(fd)

    def _close_control(self) -> None:
        self.loop.unwatch(self.control)
        self.control.close()
        self.control = None

    def _on_handover(self, _mask) -> None:
        """Our successor asks for our sockets: stop reading, hand everything over, then drain and exit.
        Anything but the request (it died while starting) is logged and we keep serving."""
        conn = self._close_handover_conn()
        try:
            request = conn.recv(1)
        except OSError as exc:
            request = str(exc).encode()
        if request != handover.REQUEST:
            self.log.error("handover_abandoned", reason="successor closed" if not request else "unexpected request")
            conn.close()
            return
        fds = [self.listener.sock.fileno()]
        items = []
        for session, item in self.listener.handover_items(fds):
            item["templates"] = [handover.encode(m) for m in session.tracker.snapshot.messages(lambda _odid: 0, 0)]
            items.append(item)
        if self.recorder is not None:  # complete our file before the successor opens the directory
            self._retire_recorder()
        try:
            with conn:
                handover.offer(conn, {"pid": os.getpid(), "listener": 0, "sessions": items}, fds)
        except OSError as exc:  # the sockets are detached already: the supervisor's restart of it binds anew
            self.log.error("handover_failed", reason=str(exc), sessions=len(items))
        else:
            self.log.info("handed_over", sessions=len(items))
        self.handed_over = True  # the status file is the successor's now
        self.listener.release_handed_over()
        self.listening = False
        self._begin_stop()

    def _close_handover_conn(self) -> socket.socket | None:
        conn, self.handover_conn = self.handover_conn, None
        if conn is not None:
            self.loop.unwatch(conn)
        return conn

    def _install_signals(self) -> None:
        self._wakeup = Wakeup((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self.loop.watch(self._wakeup.sock, READ, self._on_wake)

    def _on_wake(self, _mask) -> None:
        for sig in self._wakeup.take():
            if sig == signal.SIGHUP:
                if self.recorder is not None:
                    self.recorder.rotate(reason="hup")
            else:
                self.stop()

    # -- live reconfiguration ------------------------------------------------------------------
    def _apply_settings(self, receiver_json: str) -> None:
        """New settings for this receiver from the supervisor (reload)."""
        try:
            rc = ReceiverConfig.from_json(receiver_json)
        except (ValueError, TypeError, KeyError) as exc:
            self.log.error("reconfigure_failed", reason=str(exc))
            return
        if rc != self.rc:
            self.reconfigure(rc)

    def reconfigure(self, rc: ReceiverConfig) -> None:
        """Apply new settings without dropping exporter sessions: subreceivers, mode, subreceiver protocol,
        queue size, template refresh and recording settings. The listening socket and CPU cannot change
        in place (the supervisor starts a new handler for those)."""
        if live_change_impossible(self.rc, rc):
            self.log.error("reconfigure_refused", reason="listen address, protocol or CPU changed")
            return
        self.rc = rc
        self.budget.limit = rc.limits.memory_bytes
        self.template_pool.limit = rc.limits.memory_bytes // TEMPLATE_MEMORY_SHARE
        if self.listener is not None:
            self.listener.set_limits(rc.limits)
        kept = {s.subreceiver: s for s in self.subreceivers}
        self.subreceivers = [kept.pop(ep, None) or SubreceiverStats(ep) for ep in rc.forwarding.subreceivers]
        self.retired_subreceivers.extend(kept.values())  # their outputs drain, then close
        if self.recorder is not None and (rc.forwarding.mode is not Mode.DISABLED
                                          or self.recorder.rc.recording != rc.recording):
            self._retire_recorder()  # completes the current file before a new recorder takes the directory
        if rc.forwarding.mode is Mode.DISABLED and self.recorder is None:
            self.recorder = self._new_recorder(rc)
        forwarding = self._forwarding()
        for session in self.sessions:
            if session.state is Lifecycle.OPEN:
                session.configure(forwarding)
        self.log.info("reconfigured", mode=rc.forwarding.mode.value,
                      subreceivers=[str(e) for e in rc.forwarding.subreceivers], sessions=len(self.sessions))

    def _retire_recorder(self) -> None:
        self.recorder.close()
        self.retired_drops += self.recorder.drops
        self.recorder = None

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop: no new sessions, forward what was received, flush queues (bounded)."""
        if self.stopping:
            return
        self.log.info("handler_stopping", sessions=len(self.sessions))
        conn = self._close_handover_conn()
        if conn is not None:
            conn.close()
        self.listener.stop(drain=True)
        self.listening = False
        self._begin_stop()

    def _begin_stop(self) -> None:
        self.stopping = True
        self._stop_deadline = time.monotonic() + DRAIN_TIMEOUT

    def _done(self) -> bool:
        if not self.stopping:
            return False
        pending = any(not q.idle for s in self.sessions for q in s.queues if q.state is not State.CLOSED)
        return not pending or time.monotonic() >= self._stop_deadline

    def run(self, predecessor: socket.socket | None = None) -> int:
        self.start(predecessor)
        self.loop.run(until=self._done)
        self._finish()
        return self.exit_code

    def _finish(self) -> None:
        """Close what is left (counted); exit non-zero when anything was lost over the handler's life."""
        lost_before = self.drops()
        for session in list(self.sessions):
            for queue in list(session.queues):
                queue.close()
        if self.recorder is not None:
            self.recorder.close()
        if self.drops():
            self.log.error("handler_stopped_with_loss", unsent_messages=self.drops() - lost_before,
                           drain_timeout=DRAIN_TIMEOUT, drops=self.drops(), drops_by_reason=self.drops_by_reason()[0])
            self.exit_code = 1
        self.write_status()
        self.log.info("handler_stopped", msgs_in=self.counters.msgs_in, drops=self.drops())

    # -- status --------------------------------------------------------------------------------
    def _rcvbuf_overflow(self) -> int:
        """The kernel's drops on the UDP listening socket since this process took it (a counter per
        process like the others, docs/operations.md "Metrics"); the last value read stays once the socket is closed."""
        listener = self.listener
        if isinstance(listener, UdpListener) and listener.sock.fileno() >= 0:
            n = kernel_drops(listener.sock)
            if n is not None:
                self.overflow = n - self._overflow_base
        return self.overflow

    def drops(self) -> int:
        total = self.retired_drops + sum(s.drops for s in self.subreceivers + self.retired_subreceivers)
        if self.recorder is not None:
            total += self.recorder.drops
        return total

    def drops_by_reason(self) -> tuple[dict[str, int], dict[str, int]]:
        """Messages and records lost, per reason, over every subreceiver (a recorder's drops: ``recorder``)."""
        msgs: dict[str, int] = {}
        records: dict[str, int] = {}
        for stats in self.subreceivers + self.retired_subreceivers:
            for total, part in ((msgs, stats.drops_by_reason), (records, stats.drop_records_by_reason)):
                for reason, n in part.items():
                    total[reason] = total.get(reason, 0) + n
        recorder = self.retired_drops + (self.recorder.drops if self.recorder is not None else 0)
        if recorder:
            msgs["recorder"] = recorder
        return msgs, records

    def write_status(self) -> None:
        if self.handed_over:
            return
        rc, counters = self.rc, self.counters
        cpu = os.times()
        outs = self.subreceivers + self.retired_subreceivers
        beat = time.monotonic()
        rates = self.rates.update(beat, {
            "cpu": cpu.user + cpu.system, "msgs_in": counters.msgs_in, "bytes_in": counters.bytes_in,
            "msgs_out": sum(s.msgs_out for s in outs), "bytes_out": sum(s.bytes_out for s in outs)})
        by_reason = self.drops_by_reason()
        draining = self._bound_draining()
        held = [q.held_counts() for s in self.sessions for q in s.queues]
        doc = HandlerStatus(
            stream=rc.stream, index=rc.index, name=rc.name, pid=os.getpid(), started=self.started, time=time.time(),
            beat=beat,
            listen=ListenStatus(proto=rc.listen.port_type, bind=rc.listen.bind, port=rc.listen.port,
                                listening=self.listening),
            mode=rc.forwarding.mode.value, dpi_id=rc.recording.dpi_id, cpu=rc.taskset,
            msgs_in=counters.msgs_in, bytes_in=counters.bytes_in,
            malformed=sum(self.malformed.values()), malformed_by_reason=dict(self.malformed),
            unknown_template=counters.unknown_template + sum(s.tracker.unknown_template for s in self.sessions
                                                             if s.state is Lifecycle.OPEN),
            connections=self.connections, connections_total=self.connections_total,
            drops=self.drops(), drop_records=sum(by_reason[1].values()),
            drops_by_reason=by_reason[0], drop_records_by_reason=by_reason[1],
            limited=dict(self.listener.limited) if self.listener is not None else {},
            queued_bytes=self.budget.used, memory_bytes=self.budget.limit, rcvbuf_overflow=self._rcvbuf_overflow(),
            draining=len(draining), draining_bytes=sum(s.queued_bytes for s in draining),
            queued_msgs=sum(m for m, _r in held), queued_records=sum(r for _m, r in held),
            subreceivers=[SubreceiverStatus(**s.status()) for s in self.subreceivers],
            recorder=None if self.recorder is None else self.recorder.status(),
            period=STATUS_PERIOD, cpu_percent=round(100 * rates.pop("cpu"), 1), rates=rates,
            sessions=list(itertools.islice((ExporterSessionStatus(s.peer, since, sorted(s.tracker.snapshot.odids()), s.msgs_in)
                                            for s, since in self.opened.items() if s.state is Lifecycle.OPEN),
                                           SESSIONS_LISTED)))
        try:
            self._write_status_file(doc.to_dict())
        except OSError as exc:  # status is for operators: never a reason to drop traffic
            if not self._status_error:
                self.log.error("status_write_failed", path=self.status_path, reason=str(exc))
            self._status_error = True
        else:
            self._status_error = False


    def _bound_draining(self) -> list[ExporterSession]:
        """Sessions whose exporter left hold descriptors while they drain: at most MAX_SESSIONS of them. Past
        that the ones that left first are closed, what they hold counted (``drain_limit``): a flood of short
        sessions while collectors are away must not hold the handler's descriptors. Returns those left."""
        excess = over_drain_limit(self.sessions, self.rc.limits.max_sessions)
        if excess:
            lost = sum(s.abandon(DRAIN_LIMIT) for s in excess)
            self.throttle.error("drain_limit", "drain_limit", sessions_closed=len(excess), unsent_messages=lost,
                                max_sessions=self.rc.limits.max_sessions)
        return [s for s in self.sessions if s.state is Lifecycle.DRAINING]

    def _write_status_file(self, doc: dict) -> None:
        """At the descriptor limit the status matters most: a descriptor kept in reserve is lent for the write."""
        try:
            rundir.write_json(self.status_path, doc)
        except OSError as exc:
            if exc.errno != errno.EMFILE or self._reserve_fd is None:
                raise
            os.close(self._reserve_fd)
            try:
                rundir.write_json(self.status_path, doc)
            finally:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY)


def main(control_fd: int, run_dir: str, log_format: str) -> int:
    """Entry point of ``ipfix-balancer handler``: read the settings (and, for a restart in place, the
    handover socket) from the supervisor's channel, set up the process, run, exit with the loop's verdict."""
    from . import logs
    control = socket.socket(fileno=control_fd)
    control.settimeout(30.0)
    try:
        doc, fds = channel.receive(control) or ({}, [])
        rc = ReceiverConfig.from_json(doc["receiver"])
    except (OSError, ValueError, TypeError, KeyError, channel.ChannelError) as exc:
        logs.setup(log_format, stream="handler").error("handler_not_started", reason=f"no settings from the "
                                                       f"supervisor: {exc!r}")
        return 70
    control.setblocking(False)
    predecessor = socket.socket(fileno=fds[0]) if doc.get("handover") and fds else None
    log = logs.setup(log_format, stream=rc.stream, receiver=rc.index)
    set_process_name(rc.proc_name)
    if rc.taskset is not None:
        os.sched_setaffinity(0, {rc.taskset})
    raise_fd_limit()
    handler = Handler(rc, run_dir, log, control)
    try:
        return handler.run(predecessor)
    except ListenError as exc:
        log.error("listen_failed", reason=str(exc), exit_code=EXIT_CANNOT_LISTEN)
        return EXIT_CANNOT_LISTEN
    except Exception:
        # An internal error must be loud and restartable: one traceback, non-zero exit.
        log.exception("handler_crashed")
        return 70
