"""The exporter side of a handler: the listening socket, accepted TCP connections, UDP demultiplexing.

Each exporter session becomes a ``core.session.ExporterSession``; these classes only move bytes from
sockets into it (TCP through a ``core.framing.StreamFramer``, UDP one datagram per message).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import time
from typing import Any, Callable

from ..config.model import Limits
from ..control.ports import set_rcvbuf
from ..core.admission import Admission, Rate, source_of
from ..core.framing import DatagramReader, DatagramSlots, FramingError, StreamFramer, all_whole, check_datagram
from ..core.session import ExporterSession
from ..core.templates import TemplateTracker
from ..logs import Throttle
from . import handover, mmsg
from .loop import READ, Loop

UDP_SESSION_IDLE = 300.0   # seconds without a datagram before a UDP exporter session is closed
UDP_EXPIRY_PERIOD = 30.0   # how often idle UDP sessions are looked for
UDP_BATCH = 256            # datagrams read per readiness event, so TCP sessions and timers get turns
UDP_SLOTS = 64             # datagrams per recvmmsg: the slots of one chunk (core.framing.DatagramSlots)
ACCEPT_BATCH = 64          # connections accepted per readiness event
ACCEPT_RETRY = 0.5         # seconds between attempts to accept again while at the descriptor limit
IDLE_SWEEP = 1.0           # how often TCP exporter connections are looked at for quiet (chunk release, timeout)
VERDICTS = 4096            # allowlist verdicts remembered per source address
#: accept() errors that mean "no descriptor or memory now": pause instead of spinning on a readable listener
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DRAIN_READS = 4096         # reads at stop before an exporter connection is closed anyway

#: ``open_session(key, peer, templates=()) -> ExporterSession``
SessionOpener = Callable[..., ExporterSession]
#: ``count_malformed(error, peer)``
MalformedCounter = Callable[[FramingError, str], None]


@dataclasses.dataclass(frozen=True)
class ListenerDeps:
    """What a listener uses but does not own, injected as one value (goflow2's habit): the handler builds it
    once for every listener it opens (the first, and one adopted in a handover); a test builds it from fakes."""
    loop: Loop
    log: Any  # the structlog logger (``logs.setup``): events said once, not per peer
    throttle: Throttle  # events that can repeat per peer or per datagram
    open_session: SessionOpener
    count_malformed: MalformedCounter


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped on ``sock`` (receive buffer full, mostly): the drops column of its line
    in /proc/net/udp or udp6, found by the socket's inode. None where that cannot be read."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)  # the column names
                for line in f:
                    fields = line.split()
                    if fields[9] == inode:
                        return int(fields[-1])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def peer_name(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_host(peer: str) -> str:
    """The address part of ``peer_name``: what an operator blocks or allows (the port changes per session)."""
    host = peer.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


class TcpExporter:
    """One exporter's TCP connection: socket -> framer -> session."""

    def __init__(self, listener: TcpListener, sock: socket.socket, session: ExporterSession, tail: bytes = b""):
        self.listener = listener
        self.loop = listener.loop
        self.sock = sock
        self.session = session
        self.deps = listener.deps
        self.framer = StreamFramer(tail=tail)
        self.open = True
        self._room = 0       # the size of the buffer of the last read
        self.active = False  # read since the last idle sweep (its chunk is kept)
        self.delivered = False  # a whole message since the last idle sweep, told to the admission
        self.loop.watch(sock, READ, self._on_readable)

    def _on_readable(self, _mask) -> None:
        # A read that filled its buffer leaves more waiting: a second read in the same turn halves the
        # per-turn cost (the select, one flush and one acknowledgement check per output) of a busy exporter;
        # 8% less CPU per message in scripts/bench. More reads per turn cost more in cache than they save.
        if self.read() == self._room:
            self.read()

    def read(self) -> int | None:
        """Read once and forward every whole message. Returns the bytes read, None when nothing was
        there, 0 when the session ended (closed by the exporter, reset, or not IPFIX)."""
        if not self.open:
            return 0
        self.active = True
        error = None
        buf = self.framer.get_buffer()
        self._room = len(buf)
        try:
            n = self.sock.recv_into(buf)
        except BlockingIOError:
            return None
        except OSError as exc:  # reset by the exporter: an ordinary end of session
            n, error = 0, exc
        if n:
            messages, error = self.framer.feed(n)
            if messages:
                if not self.delivered:  # the first since the last sweep: told at once, so that a new
                    self.delivered = True  # exporter is not taken for a silent one at the cap
                    self.listener.admission.delivered(self, time.monotonic())
                _, refused = self.session.deliver(messages)  # over a template limit: counted and logged already
                if refused is not None:
                    self.close(reason=str(refused))
                    return 0
            if error is None:
                return n
        if isinstance(error, FramingError):
            self.deps.count_malformed(error, self.session.peer)
        elif self.framer.pending:
            self.deps.throttle.warning("exporter_truncated", peer_host(self.session.peer), peer=self.session.peer,
                                       bytes=self.framer.pending)
        self.close(reason=str(error) if error else "closed by exporter")
        return 0

    def close(self, reason: str) -> None:
        if not self.open:
            return
        self.open = False
        self.loop.close_socket(self.sock)
        self.framer.release()
        self.listener.closed(self)
        self.deps.throttle.info("exporter_disconnected", peer_host(self.session.peer), peer=self.session.peer,
                                reason=reason)
        self.session.end()

    def drain(self) -> None:
        """At stop: forward what the kernel already holds for us, then close (the exporter reconnects)."""
        for _ in range(DRAIN_READS):
            n = self.read()
            if n == 0:
                return
            if n is None:
                break
        self.close(reason="balancer stopping")

    def detach(self) -> tuple[socket.socket, bytes]:
        """Handover: stop reading; the socket and the part of a message already read go to a successor."""
        self.open = False
        self.loop.unwatch(self.sock)
        self.listener.closed(self)
        return self.sock, self.framer.tail


class Listener:
    """The listening socket of a receiver; subclasses turn what arrives on it into exporter sessions."""

    def __init__(self, deps: ListenerDeps, sock: socket.socket, limits: Limits):
        self.deps = deps
        self.loop = deps.loop  # the one dependency every method uses
        self.sock = sock
        self.limits = limits
        self.limited: dict[str, int] = {}  # sessions refused or closed by a limit, by reason (status)
        self._verdicts: dict[str, bool] = {}  # source address -> allowed
        self.admission = Admission(limits.max_sessions, limits.max_sessions_per_source)
        self.loop.watch(sock, READ, self._on_readable)

    def _on_readable(self, _mask) -> None:
        raise NotImplementedError

    def set_limits(self, limits: Limits) -> None:
        self.limits = limits
        self.admission.max_sessions = limits.max_sessions
        self.admission.max_per_source = limits.max_sessions_per_source
        self._verdicts.clear()

    def _allowed(self, host: str) -> bool:
        """ALLOW, remembered per address: a refused source may send a datagram flood."""
        verdict = self._verdicts.get(host)
        if verdict is None:
            if len(self._verdicts) >= VERDICTS:
                self._verdicts.clear()
            verdict = self._verdicts[host] = self.limits.allows(host)
        return verdict

    def _limit(self, reason: str, peer: str, action: str) -> None:
        """Count a session refused or closed by a limit; logged once per source and reason per interval."""
        self.limited[reason] = count = self.limited.get(reason, 0) + 1
        self.deps.throttle.warning("exporter_limited", f"{peer_host(peer)} {reason}", peer=peer, reason=reason,
                              action=action, count=count)

    def _make_room(self, host: str, peer: str, now: float, refused: str) -> list[tuple[Any, str]] | None:
        """A new session from ``host`` at the caps (``core.admission``): None when it is refused (counted, with
        the action ``refused``), else the sessions to close for it, each with its reason."""
        reason, evict = self.admission.admit(source_of(host), now)
        if reason is not None:
            self._limit(reason, peer, refused)
            return None
        return [(key, "evicted_silent" if self.admission.never_delivered(key) else "evicted_idle") for key in evict]

    def forget(self, session: ExporterSession) -> None:
        """``session`` is gone (its outputs drained). A UDP session left the address table when it ended."""


class TcpListener(Listener):
    """Accepts exporter connections; each gets a session and a ``TcpExporter``."""

    def __init__(self, deps: ListenerDeps, sock: socket.socket, limits: Limits):
        self.exporters: dict[ExporterSession, TcpExporter] = {}
        self._handed: list[TcpExporter] = []
        self._retry = None       # while paused at the descriptor limit: the timer that accepts again
        self._paused_at = 0.0    # when the current pause episode began (0: not paused)
        super().__init__(deps, sock, limits)
        self.loop.every(IDLE_SWEEP, self._sweep)

    def adopt(self, sock: socket.socket, peer: str, tail: bytes, templates) -> None:
        """An exporter connection handed over by a predecessor: it had delivered (no first-message deadline)."""
        sock.setblocking(False)
        exporter = self._add(sock, peer, tail, templates)
        self.admission.delivered(exporter, time.monotonic())

    def _add(self, sock: socket.socket, peer: str, tail: bytes = b"", templates=()) -> TcpExporter:
        session = self.deps.open_session(sock, peer, templates)
        exporter = self.exporters[session] = TcpExporter(self, sock, session, tail)
        self.admission.add(exporter, source_of(peer_host(peer)), time.monotonic())
        return exporter

    def closed(self, exporter: TcpExporter) -> None:
        """An exporter connection closed (or left with a handover): it no longer counts against the caps."""
        self.admission.remove(exporter)

    def _admit(self, host: str, peer: str) -> bool:
        """May a new connection from ``host`` be served? At a cap, a session that never delivered a whole
        message, else one idle for IDLE_EVICT_SECONDS, is closed to make room (``core.admission``)."""
        if not self._allowed(host):
            self._limit("not_allowed", peer, "connection refused")
            return False
        room = self._make_room(host, peer, time.monotonic(), "connection refused")
        if room is None:
            return False
        for exporter, why in room:
            self._limit(why, exporter.session.peer, f"connection closed for a new one from {host}")
            exporter.close(reason=f"{why}: room for a new exporter")
        return True

    def _on_readable(self, _mask) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                if self._paused_at:  # caught up with the backlog: the episode is over
                    self.deps.log.info("accept_resumed", paused_seconds=round(time.monotonic() - self._paused_at, 1),
                                  connections=len(self.admission))
                    self._paused_at = 0.0
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                else:  # e.g. ECONNABORTED: that one connection is gone, the next may come
                    self.deps.throttle.error("accept_failed", "", error=str(exc))
                return
            peer = peer_name(addr)
            if not self._admit(addr[0], peer):
                conn.close()
                continue
            conn.setblocking(False)
            self.deps.throttle.info("exporter_connected", peer_host(peer), peer=peer)
            self._add(conn, peer)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors (or memory): a readable listener would make the loop spin, so stop watching it
        and try again on a timer; the sessions we have keep flowing. Logged once per episode, which lasts
        until the backlog of waiting connections is accepted."""
        self.loop.unwatch(self.sock)
        self._retry = self.loop.call_later(ACCEPT_RETRY, self._resume)
        if not self._paused_at:
            self._paused_at = time.monotonic()
            self.limited["fd_limit"] = self.limited.get("fd_limit", 0) + 1
            self.deps.log.warning("accept_paused", reason=exc.strerror or str(exc), connections=len(self.admission),
                             sessions=len(self.exporters), retry_every=ACCEPT_RETRY)

    def _resume(self) -> None:
        self._retry = None
        self.loop.watch(self.sock, READ, self._on_readable)

    def _stop_accepting(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.loop.unwatch(self.sock)

    def _sweep(self) -> None:
        """Every IDLE_SWEEP: a connection that read nothing since the last sweep lets go of its chunk; one
        that has not delivered a whole message FIRST_MESSAGE_SECONDS after it opened, or none for
        IDLE_TIMEOUT, is closed (bytes that never make a message keep no slot)."""
        now, admission = time.monotonic(), self.admission
        for exporter in list(self.exporters.values()):
            if not exporter.open:
                continue
            exporter.delivered = False
            if exporter.active:
                exporter.active = False
            else:
                exporter.framer.release()
        for exporter in admission.overdue(now):
            self._limit("first_message_deadline", exporter.session.peer, "connection closed")
            exporter.close(reason="no whole message in time")
        timeout = self.limits.idle_timeout
        for exporter in admission.idle(now, timeout):
            self._limit("idle_timeout", exporter.session.peer, "connection closed")
            exporter.close(reason=f"no whole message for {timeout} s")

    def forget(self, session: ExporterSession) -> None:
        self.exporters.pop(session, None)

    def stop(self, drain: bool) -> None:
        """Stop accepting; with ``drain`` forward what the exporters already sent, then close them."""
        self._stop_accepting()
        self.sock.close()
        if drain:
            for exporter in list(self.exporters.values()):
                exporter.drain()

    def handover_items(self, fds: list[int]) -> list[tuple[ExporterSession, dict]]:
        """Detach every open exporter connection for a successor; appends their descriptors to ``fds``."""
        self._stop_accepting()
        items = []
        for session, exporter in self.exporters.items():
            if not exporter.open:
                continue
            sock, tail = exporter.detach()
            self._handed.append(exporter)
            items.append((session, {"peer": session.peer, "fd": len(fds), "tail": handover.encode(tail)}))
            fds.append(sock.fileno())
        return items

    def release_handed_over(self) -> None:
        """After the handover our copies of the descriptors go; the connections live on in the successor,
        and our sessions only deliver what they still hold."""
        for exporter in self._handed:
            exporter.sock.close()
            exporter.session.end()
        self._handed = []
        self.sock.close()


class UdpListener(Listener):
    """Reads datagrams and hands each run of them from one exporter address+port to its session.

    With ``mmsg`` (Linux): one ``recvmmsg`` reads up to UDP_SLOTS datagrams into the slots of a
    ``DatagramSlots``; elsewhere one ``recvfrom_into`` per datagram, packed into a ``DatagramReader``."""

    def __init__(self, deps: ListenerDeps, sock: socket.socket, limits: Limits):
        self.sessions: dict[tuple, ExporterSession] = {}
        self._names: dict[bytes, tuple] = {}  # raw source address (recvmmsg) -> address as Python gives it
        self.new_sessions = Rate()  # spoofed source ports must not open outputs to collectors at wire speed
        super().__init__(deps, sock, limits)
        self.receiver = mmsg.Receiver(self.sock, DatagramSlots(count=UDP_SLOTS)) if mmsg.AVAILABLE else None
        self.reader = DatagramReader() if self.receiver is None else None
        self.loop.every(UDP_EXPIRY_PERIOD, self._expire)

    def adopt(self, addr: tuple, peer: str, templates) -> None:
        self.sessions[addr] = self.deps.open_session(addr, peer, templates)
        now = time.monotonic()
        self.admission.add(addr, source_of(addr[0]), now)
        self.admission.delivered(addr, now)

    def set_limits(self, limits: Limits) -> None:
        if limits.rcvbuf_bytes != self.limits.rcvbuf_bytes:
            set_rcvbuf(self.sock, limits.rcvbuf_bytes)
        super().set_limits(limits)

    def _on_readable(self, _mask) -> None:
        if self.receiver is None:
            self._read_singly()
            return
        receive, names, deliver = self.receiver.receive, self._names, self._deliver
        slots = self.receiver.slots
        for _ in range(UDP_BATCH // UDP_SLOTS):
            try:
                msgs, sources = receive()
            except OSError as exc:
                self.deps.throttle.warning("udp_receive_failed", "", error=str(exc))
                return
            if not msgs:
                return
            if sources.count(sources[0]) == len(msgs):  # one source (the common case): no search for runs
                deliver(names.get(sources[0]) or self._name(sources[0]), msgs, slots.whole)
            else:
                self._deliver_runs(msgs, sources, slots.whole)
            if not self.receiver.more:  # the socket is empty
                return

    def _deliver_runs(self, msgs: list, sources: list, whole: bool) -> None:
        """Each run of datagrams from one source, in order, as one delivery (``whole``: every datagram of
        the read holds one whole message)."""
        names, count, start = self._names, len(msgs), 0
        while start < count:
            raw = sources[start]
            end = start + 1
            while end < count and sources[end] == raw:
                end += 1
            self._deliver(names.get(raw) or self._name(raw), msgs[start:end], whole)
            start = end

    def _name(self, raw: bytes) -> tuple:
        """A source address as Python gives it, remembered (bounded: a flood may come from many ports)."""
        names = self._names
        if len(names) >= VERDICTS:
            names.clear()
        addr = names[raw] = mmsg.parse_name(raw)
        return addr

    def _read_singly(self) -> None:
        reader, sock = self.reader, self.sock
        for _ in range(UDP_BATCH):
            try:
                n, addr = sock.recvfrom_into(reader.get_buffer())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.deps.throttle.warning("udp_receive_failed", "", error=str(exc))
                return
            self._deliver(addr, (reader.feed(n),))

    def _deliver(self, addr: tuple, msgs, whole: bool = False) -> None:
        """Datagrams from one source, in order: each must hold one whole message (``whole``: known already);
        the valid ones go to the session as one batch."""
        session = self.sessions.get(addr)
        if session is None and not self._allowed(addr[0]):
            for _ in msgs:
                self._limit("not_allowed", peer_name(addr), "datagram dropped")
            return
        good = msgs if whole or all_whole(msgs) else self._whole(addr, msgs)
        if not good:
            return
        # The clock per run, not per read: the idlest session at MAX_SESSIONS must be told apart in a batch.
        now = time.monotonic()
        opened = 0
        while session is None and opened < len(good):  # each datagram may open it, as if read alone
            session = self._new_session(addr, good[opened], now)
            opened += 1
        if session is None:
            return
        # Each datagram stands alone: one refused (over a template limit, counted) does not end the run, nor
        # make a run whose other datagrams were dispatched count as no activity.
        dispatched, _ = session.deliver(good[opened - 1:] if opened else good, stop=False)
        if dispatched:
            self.admission.delivered(addr, now)

    def _whole(self, addr: tuple, msgs) -> list:
        """The datagrams of a run that hold one whole message each; the others counted as malformed."""
        good = []
        for msg in msgs:
            try:
                check_datagram(msg)
            except FramingError as exc:
                self.deps.count_malformed(exc, peer_name(addr))
                continue
            good.append(msg)
        return good

    def _new_session(self, addr: tuple, msg, now: float) -> ExporterSession | None:
        """A session for a new source address+port whose datagram ``msg`` is a valid message (its sets
        parse), or None (the datagram is dropped, counted): at most UDP_NEW_PER_SECOND new ones a second,
        and at a cap one that never delivered a valid message, else one idle for IDLE_EVICT_SECONDS, makes
        room (``core.admission``): a flood from many source ports must not open outputs (descriptors,
        queues, connections to collectors) without bound, and a steady exporter that was there first keeps
        its session."""
        peer = peer_name(addr)
        if not self.new_sessions.take(now):
            self._limit("new_session_rate", peer, "datagram dropped")
            return None
        try:
            TemplateTracker().inspect(msg)  # on a scratch tracker: no outputs for a source that sent junk
        except FramingError as exc:
            self.deps.count_malformed(exc, peer)
            return None
        room = self._make_room(addr[0], peer, now, "datagram dropped")
        if room is None:
            return None
        for old, why in room:
            self._end(old, why, "session closed for a new one")
        session = self.sessions[addr] = self.deps.open_session(addr, peer)
        self.admission.add(addr, source_of(addr[0]), now)
        self.deps.throttle.info("exporter_connected", addr[0], peer=peer)
        return session

    def _end(self, addr: tuple, reason: str, action: str) -> None:
        session = self.sessions.pop(addr)
        self.admission.remove(addr)
        self._limit(reason, session.peer, action)
        session.end()

    def _expire(self) -> None:
        """Sessions without a valid message for UDP_SESSION_IDLE, or none FIRST_MESSAGE_SECONDS after the
        first datagram, end."""
        now = time.monotonic()
        for addr in self.admission.overdue(now):
            self._end(addr, "first_message_deadline", "session closed")
        for addr in self.admission.idle(now, UDP_SESSION_IDLE):
            self._end(addr, "idle_timeout", "session closed")

    def stop(self, drain: bool) -> None:
        self.loop.close_socket(self.sock)
        for session in list(self.sessions.values()):
            session.end()
        self.sessions.clear()

    def handover_items(self, _fds: list[int]) -> list[tuple[ExporterSession, dict]]:
        self.loop.unwatch(self.sock)
        return [(s, {"peer": s.peer, "addr": list(addr)}) for addr, s in self.sessions.items()]

    def release_handed_over(self) -> None:
        for session in list(self.sessions.values()):
            session.end()
        self.sessions.clear()
        self.sock.close()
