"""One handler process per receiver: the composition root of the data plane. It wires and runs; the
decisions and the steps live in the rooms.

It builds the loop, the listener (``net.listener``), one ``core.session.ExporterSession`` per exporter with a
``net.connector.Connector`` per output, and the recorder, and runs the process's life: start (or take
over, ``net.handover``), the supervisor's messages and signals, live reconfiguration, stop and drain, the
exit status (``control.exits``). Every loss is counted in one ``core.ledger.LossLedger``; ODIDs shared with
conflicting templates are found by ``core.odid``; the status document is built and written by
``control.status.HandlerStatusWriter`` from the records the parts report.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import signal
import socket
import time

from .config.model import Mode, ReceiverConfig, live_change_impossible
from .control import channel, rundir
from .control.exits import Exit
from .control.ports import bind, listen_failure
from .control.privileges import raise_fd_limit
from .control.rundir import DRAIN_TIMEOUT
from .control.signals import Wakeup, set_process_name
from .control.status import STATUS_PERIOD, ExporterSessionStatus, HandlerStatusWriter
from .core.framing import FramingError
from .core.ledger import LossLedger, held
from .core.odid import SharedOdids
from .core.records import Loss
from .core.sendqueue import DRAIN_LIMIT, Budget, SendQueue, State, SubreceiverStats
from .core.session import Counters, ExporterSession, Forwarding, Lifecycle, over_drain_limit
from .core.templates import TemplateLimit, TemplatePool
from .logs import Throttle
from .net import handover
from .net.connector import Connector
from .net.listener import ListenerDeps, TcpListener, UdpListener, kernel_drops, peer_host
from .net.loop import READ, Loop

TEMPLATE_MEMORY_SHARE = 8  # the templates of all sessions together may take MEMORY_BYTES / 8


class ListenError(Exception):
    """The receiver's socket cannot be bound: an operator's problem (port in use, address not here), said
    in one line, not a crash."""


class Handler:
    """Wires one receiver's parts together and runs them until stopped (see the module docstring)."""

    def __init__(self, rc: ReceiverConfig, run_dir: str, log, control: socket.socket | None = None):
        self.rc = rc
        self.control = control  # the supervisor's private channel (control/channel.py)
        self.successor: handover.Successor | None = None  # while one is announced
        self.log = log
        self.throttle = Throttle(log)  # every line that can repeat per message, connection or retry
        self.loop = Loop()
        self.ledger = LossLedger(rc.forwarding.subreceivers)
        self.budget = Budget(rc.limits.memory_bytes)  # shared by every send queue of this handler
        self.template_pool = TemplatePool(rc.limits.memory_bytes // TEMPLATE_MEMORY_SHARE)  # every session's
        self.recorder = None
        self.sessions: dict[ExporterSession, float] = {}  # session -> when it was opened, for the status
        self.counters = Counters()
        self.odids: SharedOdids[ExporterSession] = SharedOdids(lambda s, odid: s.tracker.snapshot.domain(odid))
        self.listener: TcpListener | UdpListener | None = None
        self.status: HandlerStatusWriter | None = HandlerStatusWriter(
            rundir.handler_status_path(run_dir, rc.stream, rc.index), log)  # None once handed over
        self._stop_at: float | None = None  # the drain deadline, once stopping (handed over, or asked to)

    @property
    def stopping(self) -> bool:
        return self._stop_at is not None

    @property
    def listening(self) -> bool:
        return self.listener is not None and not self.stopping

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
            state, fds = taken
            handover.adopt(state, fds, self._listen)
            self.log.info("took_over", sessions=len(state["sessions"]), from_pid=state["pid"])
        if self.control is not None:
            self.loop.watch(self.control, READ, self._on_control)
        wakeup = Wakeup((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self.loop.watch(wakeup.sock, READ, lambda _mask: self._on_signals(wakeup.take()))
        self.loop.every(STATUS_PERIOD, self.write_status)
        self.write_status()
        listen = f"{rc.listen.bind}/{rc.listen.port}/{rc.listen.port_type}"
        if not rc.limits.allow and not ipaddress.ip_address(rc.listen.bind).is_loopback:
            self.log.warning("anyone_may_export", listen=listen,
                             hint=f"set IPFIX_{rc.stream}_ALLOW[{rc.index}] to the exporters' addresses")
        self.log.info("handler_started", listen=listen, mode=rc.forwarding.mode.value,
                      subreceivers=[str(e) for e in rc.forwarding.subreceivers], dpi_id=rc.recording.dpi_id)

    def _listen(self, sock: socket.socket) -> TcpListener | UdpListener:
        cls = TcpListener if self.rc.listen.port_type == "tcp" else UdpListener
        deps = ListenerDeps(self.loop, self.log, self.throttle, self._open_session, self.count_malformed)
        self.listener = cls(deps, sock, self.rc.limits)
        if cls is UdpListener:  # the kernel's count from here on: a handed-over socket has a past
            self.ledger.kernel_drops(kernel_drops(sock) or 0)
        return self.listener

    def _new_recorder(self, rc: ReceiverConfig):
        from .recording.recorder import Recorder  # recording pulls in file handling only where it is used
        return Recorder(self.loop, rc, self.log)

    # -- sessions ------------------------------------------------------------------------------
    def _forwarding(self) -> Forwarding:
        fw = self.rc.forwarding
        refresh = fw.template_refresh if fw.sub_proto == "udp" else 0.0
        return Forwarding(fw.mode, self.ledger.subreceivers, fw.queue_bytes, refresh, self.recorder,
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
        self.sessions[session] = time.time()
        self.counters.connections_total += 1
        return session

    def _templates_announced(self, session: ExporterSession, odid: int) -> None:
        if self.rc.forwarding.mode is Mode.DISABLED:
            return
        other = self.odids.announced(session, session.peer, odid)
        if other is not None:
            self.log.warning("odid_shared_with_other_templates", odid=odid, sessions=[other, session.peer],
                             remedy="give each exporter its own ODID: collectors that key templates by source "
                                    "address and ODID cannot tell these sessions apart")

    def _make_output(self, stats: SubreceiverStats, source: tuple | None = None, **settings) -> SendQueue:
        queue = SendQueue(stats, budget=self.budget, **settings)
        Connector(self.loop, queue, self.log, self.throttle, source)
        return queue

    def _session_gone(self, session: ExporterSession) -> None:
        session.tracker.release()
        self.sessions.pop(session, None)
        if self.listener is not None:
            self.listener.forget(session)

    def _open(self) -> list[ExporterSession]:
        return [s for s in self.sessions if s.state is Lifecycle.OPEN]

    def count_malformed(self, error: FramingError, peer: str) -> None:
        """A message the listener could not frame: counted, logged (throttled per exporter host)."""
        total = self.ledger.refused(error.reason)
        self.throttle.warning("malformed_ipfix", peer_host(peer), peer=peer, reason=error.reason, detail=error.detail,
                              action=self._refusal_action(), malformed_total=total)

    def _session_refused(self, session: ExporterSession, error: FramingError, first: bool) -> None:
        """A message of ``session`` was refused: counted each time, logged once per session and reason (a
        session repeating itself must not flood the log)."""
        total = self.ledger.refused(error.reason)
        if not first:
            return
        if isinstance(error, TemplateLimit):
            event, action = "template_limit", self._refusal_action()
        else:
            event, action = "malformed_ipfix", "message dropped, session continues"
        self.log.warning(event, peer=session.peer, reason=error.reason, detail=error.detail, action=action,
                         malformed_total=total, logged="once per session and reason")

    def _refusal_action(self) -> str:
        return "session closed" if self.rc.listen.port_type == "tcp" else "datagram dropped"

    # -- the supervisor's messages, signals, handover ------------------------------------------------
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
            self.loop.close_socket(self.control)
            self.control = None
            self.stop()
            return
        doc, fds = got
        if "receiver" in doc:
            self._apply_settings(doc["receiver"])
        if doc.get("handover") and fds and not self.stopping and self.successor is None:
            self.successor = handover.Successor(self.loop, fds.pop(0), self._on_handover)
        for fd in fds:  # nothing else is expected with a message
            os.close(fd)

    def _on_handover(self, conn: socket.socket) -> None:
        """Our successor wrote: if it asks for our sockets, hand everything over, then drain and exit."""
        self.successor = None
        if handover.give(conn, self.listener, _templates, self.log, self._retire_recorder):
            self.status = None  # the status file is the successor's now
            self._stop_at = time.monotonic() + DRAIN_TIMEOUT

    def _on_signals(self, signals: list[int]) -> None:
        for sig in signals:
            if sig != signal.SIGHUP:
                self.stop()
            elif self.recorder is not None:
                self.recorder.rotate(reason="hup")

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
        self.ledger.subscribe(rc.forwarding.subreceivers)  # removed ones' outputs drain, then close
        if self.recorder is not None and (rc.forwarding.mode is not Mode.DISABLED
                                          or self.recorder.rc.recording != rc.recording):
            self._retire_recorder()
        if rc.forwarding.mode is Mode.DISABLED and self.recorder is None:
            self.recorder = self._new_recorder(rc)
        forwarding = self._forwarding()
        for session in self._open():
            session.configure(forwarding)
        self.log.info("reconfigured", mode=rc.forwarding.mode.value,
                      subreceivers=[str(e) for e in rc.forwarding.subreceivers], sessions=len(self.sessions))

    def _retire_recorder(self) -> None:
        """Complete the recorder's file (before another recorder, or a successor, takes the directory)."""
        if self.recorder is not None:
            self.recorder.close()
            self.ledger.recorder_closed(self.recorder.drops)
            self.recorder = None

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop: no new sessions, forward what was received, flush queues (bounded)."""
        if self.stopping:
            return
        self.log.info("handler_stopping", sessions=len(self.sessions))
        if self.successor is not None:
            self.successor.cancel()
            self.successor = None
        self.listener.stop(drain=True)
        self._stop_at = time.monotonic() + DRAIN_TIMEOUT

    def _done(self) -> bool:
        if not self.stopping:
            return False
        pending = any(not q.idle for s in self.sessions for q in s.queues if q.state is not State.CLOSED)
        return not pending or time.monotonic() >= self._stop_at

    def run(self, predecessor: socket.socket | None = None) -> Exit:
        self.start(predecessor)
        self.loop.run(until=self._done)
        return self._finish()

    def _finish(self) -> Exit:
        """Close what is left (counted); exit non-zero when anything was lost over the handler's life."""
        lost_before = self._loss().drops
        for session in list(self.sessions):
            for queue in list(session.queues):
                queue.close()
        if self.recorder is not None:
            self.recorder.close()
        loss = self._loss()
        if loss.drops:
            self.log.error("handler_stopped_with_loss", unsent_messages=loss.drops - lost_before,
                           drain_timeout=DRAIN_TIMEOUT, drops=loss.drops, drops_by_reason=loss.drops_by_reason)
        self.write_status()
        self.log.info("handler_stopped", msgs_in=self.counters.msgs_in, drops=loss.drops)
        return Exit.FAILED if loss.drops else Exit.OK

    # -- status --------------------------------------------------------------------------------
    def _loss(self) -> Loss:
        return self.ledger.loss(self.recorder.drops if self.recorder is not None else 0)

    def write_status(self) -> None:
        """Publish the status document (not once handed over: the file is the successor's then)."""
        if self.status is None:
            return
        listener = self.listener
        if isinstance(listener, UdpListener) and listener.sock.fileno() >= 0:
            self.ledger.kernel_drops(kernel_drops(listener.sock))  # docs/operations.md "Metrics"
        self._bound_draining()
        open_sessions = self._open()
        self.status.write(
            self.rc, listening=self.listening, msgs_in=self.counters.msgs_in, bytes_in=self.counters.bytes_in,
            unknown_template=self.counters.unknown_template + sum(s.tracker.unknown_template for s in open_sessions),
            loss=self._loss(), sent=self.ledger.sent(), held=held(self.sessions, self.budget),
            subreceivers=[s.status() for s in self.ledger.subreceivers],
            recorder=None if self.recorder is None else self.recorder.status(),
            sessions=(ExporterSessionStatus(s.peer, self.sessions[s], sorted(s.tracker.snapshot.odids()), s.msgs_in)
                      for s in open_sessions),
            connections=len(open_sessions), connections_total=self.counters.connections_total,
            limited=dict(listener.limited) if listener is not None else {})

    def _bound_draining(self) -> None:
        """Sessions whose exporter left hold descriptors while they drain: at most MAX_SESSIONS of them. Past
        that the ones that left first are closed, what they hold counted (``drain_limit``): a flood of short
        sessions while collectors are away must not hold the handler's descriptors."""
        excess = over_drain_limit(self.sessions, self.rc.limits.max_sessions)
        if excess:
            lost = sum(s.abandon(DRAIN_LIMIT) for s in excess)
            self.throttle.error("drain_limit", "drain_limit", sessions_closed=len(excess), unsent_messages=lost,
                                max_sessions=self.rc.limits.max_sessions)


def _templates(session: ExporterSession) -> list:
    """The template messages of ``session``, for its successor to replay to new outputs."""
    return session.tracker.snapshot.messages(lambda _odid: 0, 0)


def main(control_fd: int, run_dir: str, log_format: str) -> Exit:
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
        return Exit.INTERNAL_ERROR
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
        log.error("listen_failed", reason=str(exc), exit_code=int(Exit.CANNOT_LISTEN))
        return Exit.CANNOT_LISTEN
    except Exception:
        # An internal error must be loud and restartable: one traceback, non-zero exit.
        log.exception("handler_crashed")
        return Exit.INTERNAL_ERROR
