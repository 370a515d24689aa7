"""One handler process per receiver: listen, frame, track templates, dispatch, send.

Everything runs on one thread around ``loop.Loop``. The per-message path is: framer hands out a
memoryview, the session's template tracker returns (odid, data records, template part), the dispatcher
queues an entry on output sessions; after the turn each touched output is flushed with one vectored send.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from . import handover
from . import status as status_mod
from .config import Mode, ReceiverConfig
from .dispatch import All, RoundRobin
from .core.framing import DatagramReader, FramingError, StreamFramer, check_datagram
from .loop import READ, Loop
from .outputs import CLOSED, EndpointStats, Output
from .core.templates import TemplateTracker

UDP_SESSION_IDLE = 300.0   # seconds without a datagram before a UDP exporter session is closed
UDP_BATCH = 256            # datagrams read per readiness event, so TCP sessions and timers get turns
STATUS_PERIOD = 1.0
DRAIN_TIMEOUT = 10.0       # seconds to flush queues at stop and at session end while a collector is down
RCVBUF = 8 * 1024 * 1024


class Session:
    """One exporter session (a TCP connection, or a UDP exporter address+port) and its mirrors: one
    output session per subreceiver, so template scopes of different exporters never mix at a collector."""

    def __init__(self, handler: "Handler", peer: str, templates=()):
        self.handler = handler
        self.peer = peer
        self.tracker = TemplateTracker()
        for msg in templates:  # learnt by a predecessor (handover): known before any output connects
            self.tracker.inspect(msg)
        self.outputs: list[Output] = []  # every open output: the dispatcher's, and retired ones draining
        self.ended = self.gone = False
        self.last_seen = time.monotonic()
        self.dispatcher = None
        self.configure()

    def configure(self) -> None:
        """(Re)build the dispatcher from the handler's current settings, keeping what can be kept.

        An output to a subreceiver that stays keeps its connection and queue. A new subreceiver gets a new
        output, which replays the templates before any data. A removed one is flushed, then closed. A switch
        between RoundRobin and All starts new output sessions (sequence numbering differs between them),
        so a collector sees a fresh transport session rather than a jump in sequence numbers.
        """
        h, rc = self.handler, self.handler.rc
        old = self.dispatcher
        if rc.mode is Mode.DISABLED:
            self.dispatcher, active = h.recorder, []
        else:
            cls = RoundRobin if rc.mode is Mode.ROUND_ROBIN else All
            self.dispatcher = cls([])
            reusable = {} if not isinstance(old, cls) else {o.endpoint: o for o in old.outputs
                                                             if o.state is not CLOSED and not o.closing}
            refresh = rc.template_refresh if rc.sub_proto == "udp" else 0.0
            for stats in h.endpoints:
                out = reusable.pop(stats.endpoint, None)
                if out is None:
                    out = Output(h.loop, stats, limit=rc.queue_bytes, rewrite_seq=cls.rewrite_seq, log=h.log,
                                 current_snapshot=self._snapshot, refresh=refresh,
                                 on_down=self.dispatcher.on_down, on_drained=self._output_closed)
                else:
                    out.on_down, out.limit, out.refresh = self.dispatcher.on_down, rc.queue_bytes, refresh
                self.dispatcher.outputs.append(out)
            active = self.dispatcher.outputs
        for out in [o for o in self.outputs if o not in active]:
            out.close_when_drained()
        self.outputs = list(active) + [o for o in self.outputs if o not in active and o.state is not CLOSED]

    def _snapshot(self):
        return self.tracker.snapshot

    def deliver(self, messages) -> None:
        """The hot path: every whole message of one read. Runs of data-only messages are handed to the
        dispatcher as one batch; a message with template sets goes on its own, in order."""
        inspect, tracker, dispatcher = self.tracker.inspect, self.tracker, self.dispatcher
        many = getattr(dispatcher, "dispatch_many", None)
        snapshot = tracker.snapshot  # changes only with a message that carries template sets
        batch: list = []
        batch_size = size = 0
        for msg in messages:
            odid, nrec, tmpl = inspect(msg)
            n = len(msg)
            size += n
            if tmpl is None and many is not None:
                batch.append((msg, odid, nrec, snapshot))
                batch_size += n
                continue
            if batch:
                many(batch, batch_size)
                batch, batch_size = [], 0
            snapshot = tracker.snapshot
            dispatcher.dispatch(msg, odid, nrec, tmpl, snapshot)
        if batch:
            many(batch, batch_size)
        h = self.handler
        h.msgs_in += len(messages)
        h.bytes_in += size

    def end(self) -> None:
        """The exporter went away: flush its mirrors, then close them."""
        self.ended = True
        self.handler.unknown_template += self.tracker.unknown_template
        for out in list(self.outputs):
            out.close_when_drained()
        self._output_closed(None)

    def _output_closed(self, out: Output | None) -> None:
        if out in self.outputs:
            self.outputs.remove(out)
        if self.ended and not self.outputs and not self.gone:
            self.gone = True
            self.handler.session_gone(self)


class TcpSession(Session):
    def __init__(self, handler: "Handler", sock: socket.socket, peer: str, tail: bytes = b"", templates=()):
        super().__init__(handler, peer, templates)
        self.sock = sock
        self.framer = StreamFramer(tail=tail)
        handler.loop.watch(sock, READ, self.on_readable)

    def on_readable(self, _mask) -> None:
        self.read()

    def read(self) -> int | None:
        """Read once and forward every whole message. Returns the bytes read, None when nothing was
        there, 0 when the session ended (closed by the exporter, reset, or not IPFIX)."""
        error = None
        try:
            n = self.sock.recv_into(self.framer.get_buffer())
        except BlockingIOError:
            return None
        except OSError as exc:  # reset by the exporter: an ordinary end of session
            n, error = 0, exc
        if n:
            messages, error = self.framer.feed(n)
            if messages:
                self.deliver(messages)
            if error is None:
                return n
        h = self.handler
        if isinstance(error, FramingError):
            h.count_malformed(error, self.peer)
        elif self.framer.pending:
            h.log.warning("exporter_truncated", peer=self.peer, bytes=self.framer.pending)
        self.close(reason=str(error) if error else "closed by exporter")
        return 0

    def close(self, reason: str) -> None:
        self.handler.loop.unwatch(self.sock)
        self.sock.close()
        self.handler.connections -= 1
        self.handler.log.info("exporter_disconnected", peer=self.peer, reason=reason)
        self.end()

    def drain(self) -> None:
        """At stop: forward what the kernel already holds for us, then close (the exporter reconnects)."""
        for _ in range(4096):
            n = self.read()
            if n == 0:
                return
            if n is None:
                break
        self.close(reason="balancer stopping")


class Handler:
    def __init__(self, rc: ReceiverConfig, run_dir: str, log):
        self.rc = rc
        self.run_dir = run_dir
        self.log = log
        self.loop = Loop()
        self.endpoints = [EndpointStats(ep) for ep in rc.subreceivers]
        self.recorder = None
        self.sessions: dict[object, Session] = {}
        self.msgs_in = self.bytes_in = 0
        self.malformed: dict[str, int] = {}
        self.connections = self.connections_total = 0
        self.unknown_template = 0
        self.retired_drops = 0  # drops of recorders replaced by a reconfiguration
        self.retired_endpoints: list[EndpointStats] = []  # subreceivers removed by a reconfiguration
        self.started = time.time()
        self.listening = False
        self.handed_over = False
        self._status_error = False
        self.stopping = False
        self._stop_deadline = 0.0
        self.exit_code = 0
        self.status_path = os.path.join(run_dir, f"handler-{rc.stream.lower()}-{rc.index}.json")

    # -- setup ---------------------------------------------------------------------------------
    def start(self, takeover: bool = False) -> None:
        """Listen (or take the listening socket and exporter sessions over from the running handler of
        this receiver), then offer the same handover to a successor."""
        rc = self.rc
        addr = handover.address(self.run_dir, rc.stream, rc.index)
        taken = handover.take(addr) if takeover else None  # the predecessor has closed its recorder by then
        if rc.mode is Mode.DISABLED:
            from .recording.recorder import Recorder  # recording pulls in file handling only where it is used
            self.recorder = Recorder(self.loop, rc, self.log)
        if taken is None:
            if takeover:
                self.log.warning("takeover_unavailable", reason="no running handler to take over from")
            self.listener = self._bind()
        else:
            self._adopt(*taken)
        tcp = rc.port_type == "tcp"
        if tcp:
            self.loop.watch(self.listener, READ, self._on_accept)
        else:
            self.reader = DatagramReader()
            self.loop.watch(self.listener, READ, self._on_datagrams)
            self.loop.every(30.0, self._expire_udp_sessions)
        self.listening = True
        self.handover_server = handover.listen(addr)
        self.loop.watch(self.handover_server, READ, self._on_handover)
        self._install_signals()
        if os.path.exists(next_config_path(self.run_dir, rc)):
            self._load_next_config()  # settings sent while we started (SIGUSR2 was ignored until now)
        self.loop.every(STATUS_PERIOD, self.write_status)
        self.write_status()
        self.log.info("handler_started", listen=f"{rc.bind}/{rc.port}/{rc.port_type}", mode=rc.mode.value,
                      subreceivers=[str(e) for e in rc.subreceivers], dpi_id=rc.dpi_id)

    def _bind(self) -> socket.socket:
        rc = self.rc
        family = socket.AF_INET6 if ":" in rc.bind else socket.AF_INET
        kind = socket.SOCK_STREAM if rc.port_type == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_DGRAM:
            _set_rcvbuf(sock, RCVBUF)
        sock.bind((rc.bind, rc.port))
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        return sock

    # -- handover (restart without dropping exporters) ------------------------------------------
    def _adopt(self, state: dict, fds: list[int]) -> None:
        """Continue the predecessor's sockets: its listener, and each exporter session with the part
        of a message it had already read and the templates it had learnt (replayed to new outputs)."""
        socks = [socket.socket(fileno=fd) for fd in fds]
        for sock in socks:
            sock.setblocking(False)
        self.listener = socks[state["listener"]]
        for item in state["sessions"]:
            templates = [memoryview(handover.decode(m)) for m in item["templates"]]
            if "fd" in item:
                session = TcpSession(self, socks[item["fd"]], item["peer"], handover.decode(item["tail"]),
                                     templates)
                self.sessions[session.sock] = session
            else:
                self.sessions[tuple(item["addr"])] = Session(self, item["peer"], templates)
            self.connections += 1
            self.connections_total += 1
        self.log.info("took_over", sessions=len(state["sessions"]), from_pid=state["pid"])

    def _on_handover(self, _mask) -> None:
        """A successor asks for our sockets: stop reading, hand everything over, then drain and exit."""
        try:
            conn, _ = self.handover_server.accept()
        except BlockingIOError:
            return
        self.loop.unwatch(self.handover_server)
        self.handover_server.close()
        self.loop.unwatch(self.listener)
        fds, items = [self.listener.fileno()], []
        for key, session in self.sessions.items():
            if session.ended:
                continue
            item = {"peer": session.peer, "templates": [
                handover.encode(m) for m in session.tracker.snapshot.messages(lambda _odid: 0, 0)]}
            if isinstance(session, TcpSession):
                self.loop.unwatch(session.sock)
                item.update(fd=len(fds), tail=handover.encode(session.framer.tail))
                fds.append(session.sock.fileno())
            else:
                item["addr"] = list(key)
            items.append(item)
        if self.recorder is not None:  # complete our file before the successor opens the directory
            self.recorder.close()
            self.retired_drops += self.recorder.drops
            self.recorder = None
        with conn:
            handover.offer(conn, {"pid": os.getpid(), "listener": 0, "sessions": items}, fds)
        self.log.info("handed_over", sessions=len(items))
        self.handed_over = True  # the status file is the successor's now
        # Our copies of the descriptors go; the connections live on in the successor.
        for session in [s for s in self.sessions.values() if not s.ended]:
            if isinstance(session, TcpSession):
                session.sock.close()
            session.end()
        self.listener.close()
        self.listening = False
        self.connections = 0
        self.stopping = True
        self._stop_deadline = time.monotonic() + DRAIN_TIMEOUT

    def _install_signals(self) -> None:
        """Signals only set flags; a socketpair wakes the loop so they act within one turn."""
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        self._wake = (rsock, wsock)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self._signals: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, lambda signum, _frame: self._signals.append(signum))
        self.loop.watch(rsock, READ, self._on_wake)

    def _on_wake(self, _mask) -> None:
        try:
            self._wake[0].recv(4096)
        except BlockingIOError:
            pass
        signals, self._signals = self._signals, []
        for sig in signals:
            if sig == signal.SIGHUP:
                if self.recorder is not None:
                    self.recorder.rotate(reason="hup")
            elif sig == signal.SIGUSR2:
                self._load_next_config()
            else:
                self.stop()

    # -- live reconfiguration ------------------------------------------------------------------
    def _load_next_config(self) -> None:
        """The supervisor wrote new settings for this receiver next to the status file (SIGUSR2)."""
        try:
            with open(next_config_path(self.run_dir, self.rc)) as f:
                rc = ReceiverConfig.from_json(f.read())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self.log.error("reconfigure_failed", reason=str(exc))
            return
        if rc != self.rc:
            self.reconfigure(rc)

    def reconfigure(self, rc: ReceiverConfig) -> None:
        """Apply new settings without dropping exporter sessions: subreceivers, mode, subreceiver protocol,
        queue size, template refresh and recording settings. The listening socket and CPU cannot change
        in place (the supervisor starts a new handler for those)."""
        old = self.rc
        if live_change_impossible(old, rc):
            self.log.error("reconfigure_refused", reason="listen address, protocol or CPU changed")
            return
        self.rc = rc
        stats = {e.endpoint: e for e in self.endpoints}
        self.endpoints = [stats.pop(ep, None) or EndpointStats(ep) for ep in rc.subreceivers]
        self.retired_endpoints.extend(stats.values())  # their outputs drain, then close
        old_recorder = self.recorder
        if old_recorder is not None and (rc.mode is not Mode.DISABLED
                                         or _recording_settings(old_recorder.rc) != _recording_settings(rc)):
            old_recorder.close()  # completes the current file before a new recorder takes the directory
            self.retired_drops += old_recorder.drops
            self.recorder = None
        if rc.mode is Mode.DISABLED and self.recorder is None:
            from .recording.recorder import Recorder
            self.recorder = Recorder(self.loop, rc, self.log)
        for session in list(self.sessions.values()):
            if not session.ended:
                session.configure()
        self.log.info("reconfigured", mode=rc.mode.value, subreceivers=[str(e) for e in rc.subreceivers],
                      sessions=len(self.sessions))

    # -- traffic -------------------------------------------------------------------------------
    def _on_accept(self, _mask) -> None:
        for _ in range(64):
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the sessions we have
                self.log.error("accept_failed", error=str(exc))
                return
            conn.setblocking(False)
            peer = _peer(addr)
            self.connections += 1
            self.connections_total += 1
            self.log.info("exporter_connected", peer=peer)
            self.sessions[conn] = TcpSession(self, conn, peer)

    def _on_datagrams(self, _mask) -> None:
        reader, sock, sessions = self.reader, self.listener, self.sessions
        for _ in range(UDP_BATCH):
            try:
                n, addr = sock.recvfrom_into(reader.get_buffer())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.warning("udp_receive_failed", error=str(exc))
                return
            msg = reader.feed(n)
            try:
                check_datagram(msg)
            except FramingError as exc:
                self.count_malformed(exc, _peer(addr))
                continue
            session = sessions.get(addr)
            if session is None:
                session = sessions[addr] = Session(self, _peer(addr))
                self.connections += 1
                self.connections_total += 1
                self.log.info("exporter_connected", peer=session.peer)
            session.last_seen = time.monotonic()
            session.deliver((msg,))

    def _expire_udp_sessions(self) -> None:
        limit = time.monotonic() - UDP_SESSION_IDLE
        for addr, session in list(self.sessions.items()):
            if session.last_seen < limit and not isinstance(session, TcpSession):
                self.connections -= 1
                self.log.info("exporter_idle", peer=session.peer, idle_seconds=UDP_SESSION_IDLE)
                session.end()

    def count_malformed(self, error: FramingError, peer: str) -> None:
        self.malformed[error.reason] = self.malformed.get(error.reason, 0) + 1
        self.log.warning("malformed_ipfix", peer=peer, reason=error.reason, detail=error.detail,
                         action="session closed" if self.rc.port_type == "tcp" else "datagram dropped",
                         malformed_total=sum(self.malformed.values()))

    def session_gone(self, session: Session) -> None:
        for key, value in list(self.sessions.items()):
            if value is session:
                del self.sessions[key]

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop: no new sessions, forward what was received, flush queues (bounded)."""
        if self.stopping:
            return
        self.stopping = True
        self._stop_deadline = time.monotonic() + DRAIN_TIMEOUT
        self.log.info("handler_stopping", sessions=len(self.sessions))
        self.loop.unwatch(self.handover_server)
        self.handover_server.close()
        self.loop.unwatch(self.listener)
        self.listener.close()
        self.listening = False
        for session in list(self.sessions.values()):
            if session.ended:  # the exporter left already; its outputs are still draining
                continue
            if isinstance(session, TcpSession):
                session.drain()
            else:
                session.end()

    def _done(self) -> bool:
        if not self.stopping:
            return False
        pending = any(not o.idle for s in self.sessions.values() for o in s.outputs if o.state is not CLOSED)
        if pending and time.monotonic() < self._stop_deadline:
            return False
        return True

    def run(self, takeover: bool = False) -> int:
        self.start(takeover)
        self.loop.run(until=self._done)
        self._finish()
        return self.exit_code

    def _finish(self) -> None:
        lost_before = self.drops()
        for session in list(self.sessions.values()):
            for out in list(session.outputs):
                out.close()
        if self.recorder is not None:
            self.recorder.close()
        lost = self.drops() - lost_before
        if lost:
            self.log.error("handler_stopped_with_loss", unsent_messages=lost, drain_timeout=DRAIN_TIMEOUT)
            self.exit_code = 1
        self.write_status()
        self.log.info("handler_stopped", msgs_in=self.msgs_in, drops=self.drops())

    # -- status --------------------------------------------------------------------------------
    def drops(self) -> int:
        total = self.retired_drops + sum(e.drops for e in self.endpoints + self.retired_endpoints)
        if self.recorder is not None:
            total += self.recorder.drops
        return total

    def write_status(self) -> None:
        if self.handed_over:
            return
        rc = self.rc
        doc = {
            "stream": rc.stream, "index": rc.index, "name": rc.name, "pid": os.getpid(),
            "started": self.started, "time": time.time(),
            "listen": {"proto": rc.port_type, "bind": rc.bind, "port": rc.port, "listening": self.listening},
            "mode": rc.mode.value, "dpi_id": rc.dpi_id, "cpu": rc.taskset,
            "msgs_in": self.msgs_in, "bytes_in": self.bytes_in,
            "malformed": sum(self.malformed.values()), "malformed_by_reason": dict(self.malformed),
            "unknown_template": self.unknown_template + sum(s.tracker.unknown_template
                                                            for s in self.sessions.values() if not s.ended),
            "connections": self.connections, "connections_total": self.connections_total,
            "drops": self.drops(),
            "subreceivers": [e.snapshot() for e in self.endpoints],
        }
        if self.recorder is not None:
            doc["recorder"] = self.recorder.status()
        try:
            status_mod.write_json(self.status_path, doc)
        except OSError as exc:  # status is for operators: never a reason to drop traffic
            if not self._status_error:
                self.log.error("status_write_failed", path=self.status_path, reason=str(exc))
            self._status_error = True
        else:
            self._status_error = False


_RECORDING_FIELDS = ("rotate_minutes", "rotate_delay_seconds", "fw_max_queue_size", "dump_insert_processes",
                     "dpi_id", "dump_dir", "spool_bytes")


def _recording_settings(rc: ReceiverConfig) -> tuple:
    """What a recorder is built from: a change of anything else leaves the current dump file alone."""
    return tuple(getattr(rc, f) for f in _RECORDING_FIELDS)


def next_config_path(run_dir: str, rc: ReceiverConfig) -> str:
    return os.path.join(run_dir, f"handler-{rc.stream.lower()}-{rc.index}.next")


def live_change_impossible(old: ReceiverConfig, new: ReceiverConfig) -> bool:
    """True when the new settings need a new handler process (a new listening socket or CPU)."""
    return (old.stream, old.index, old.port_type, old.port, old.bind, old.taskset) != \
        (new.stream, new.index, new.port_type, new.port, new.bind, new.taskset)


def _peer(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """Ask for a big receive buffer (UDP bursts); as root, beyond net.core.rmem_max."""
    force = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value: Python 3.11 does not name it
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def set_process_name(name: str) -> None:
    """What ``ps -o comm`` shows (the kernel keeps 15 characters)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def main(receiver_json: str, run_dir: str, log_format: str, takeover: bool = False) -> int:
    """Entry point of ``ipfix-balancer handler``: set up the process, run, exit with the loop's verdict."""
    from . import logs
    rc = ReceiverConfig.from_json(receiver_json)
    log = logs.setup(log_format, stream=rc.stream, receiver=rc.index)
    set_process_name(rc.proc_name)
    if rc.taskset is not None:
        os.sched_setaffinity(0, {rc.taskset})
    os.makedirs(run_dir, exist_ok=True)
    handler = Handler(rc, run_dir, log)
    try:
        return handler.run(takeover)
    except Exception:
        # An internal error must be loud and restartable: one traceback, non-zero exit.
        log.exception("handler_crashed")
        return 70
