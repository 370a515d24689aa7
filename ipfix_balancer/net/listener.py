"""The exporter side of a handler: the listening socket, accepted TCP connections, UDP demultiplexing.

Each exporter session becomes a ``core.session.ExporterSession``; these classes only move bytes from
sockets into it (TCP through a ``core.framing.StreamFramer``, UDP one datagram per message).
"""

from __future__ import annotations

import socket
import time
from typing import Callable

from ..core.framing import DatagramReader, FramingError, StreamFramer, check_datagram
from ..core.session import ExporterSession
from . import handover
from .loop import READ, Loop

UDP_SESSION_IDLE = 300.0   # seconds without a datagram before a UDP exporter session is closed
UDP_EXPIRY_PERIOD = 30.0   # how often idle UDP sessions are looked for
UDP_BATCH = 256            # datagrams read per readiness event, so TCP sessions and timers get turns
ACCEPT_BATCH = 64          # connections accepted per readiness event
DRAIN_READS = 4096         # reads at stop before an exporter connection is closed anyway
RCVBUF = 8 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value: Python 3.11 does not name it

#: ``open_session(key, peer, templates=()) -> ExporterSession``
SessionOpener = Callable[..., ExporterSession]
#: ``count_malformed(error, peer)``
MalformedCounter = Callable[[FramingError, str], None]


def bind(port_type: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if port_type == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if kind == socket.SOCK_DGRAM:
        _set_rcvbuf(sock, RCVBUF)
    sock.bind((host, port))
    sock.setblocking(False)
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """Ask for a big receive buffer (UDP bursts); as root, beyond net.core.rmem_max."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def peer_name(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TcpExporter:
    """One exporter's TCP connection: socket -> framer -> session."""

    def __init__(self, loop: Loop, sock: socket.socket, session: ExporterSession, log,
                 count_malformed: MalformedCounter, tail: bytes = b""):
        self.loop = loop
        self.sock = sock
        self.session = session
        self.log = log
        self.count_malformed = count_malformed
        self.framer = StreamFramer(tail=tail)
        self.open = True
        loop.watch(sock, READ, self._on_readable)

    def _on_readable(self, _mask) -> None:
        self.read()

    def read(self) -> int | None:
        """Read once and forward every whole message. Returns the bytes read, None when nothing was
        there, 0 when the session ended (closed by the exporter, reset, or not IPFIX)."""
        if not self.open:
            return 0
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
                refused = self.session.deliver(messages)  # over a template limit: counted and logged already
                if refused is not None:
                    self.close(reason=str(refused))
                    return 0
            if error is None:
                return n
        if isinstance(error, FramingError):
            self.count_malformed(error, self.session.peer)
        elif self.framer.pending:
            self.log.warning("exporter_truncated", peer=self.session.peer, bytes=self.framer.pending)
        self.close(reason=str(error) if error else "closed by exporter")
        return 0

    def close(self, reason: str) -> None:
        if not self.open:
            return
        self.open = False
        self.loop.unwatch(self.sock)
        self.sock.close()
        self.log.info("exporter_disconnected", peer=self.session.peer, reason=reason)
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
        return self.sock, self.framer.tail


class Listener:
    """The listening socket of a receiver; subclasses turn what arrives on it into exporter sessions."""

    def __init__(self, loop: Loop, sock: socket.socket, log, open_session: SessionOpener,
                 count_malformed: MalformedCounter):
        self.loop = loop
        self.sock = sock
        self.log = log
        self.open_session = open_session
        self.count_malformed = count_malformed
        loop.watch(sock, READ, self._on_readable)

    def _on_readable(self, _mask) -> None:
        raise NotImplementedError

    def forget(self, session: ExporterSession) -> None:
        """``session`` is gone (its outputs drained). A UDP session left the address table when it ended."""


class TcpListener(Listener):
    """Accepts exporter connections; each gets a session and a ``TcpExporter``."""

    def __init__(self, *args):
        self.exporters: dict[ExporterSession, TcpExporter] = {}
        self._handed: list[TcpExporter] = []
        super().__init__(*args)

    def adopt(self, sock: socket.socket, peer: str, tail: bytes, templates) -> None:
        """An exporter connection handed over by a predecessor."""
        sock.setblocking(False)
        self._add(sock, peer, tail, templates)

    def _add(self, sock: socket.socket, peer: str, tail: bytes = b"", templates=()) -> None:
        session = self.open_session(sock, peer, templates)
        self.exporters[session] = TcpExporter(self.loop, sock, session, self.log, self.count_malformed, tail)

    def _on_readable(self, _mask) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the sessions we have
                self.log.error("accept_failed", error=str(exc))
                return
            conn.setblocking(False)
            peer = peer_name(addr)
            self.log.info("exporter_connected", peer=peer)
            self._add(conn, peer)

    def forget(self, session: ExporterSession) -> None:
        self.exporters.pop(session, None)

    def stop(self, drain: bool) -> None:
        """Stop accepting; with ``drain`` forward what the exporters already sent, then close them."""
        self.loop.unwatch(self.sock)
        self.sock.close()
        if drain:
            for exporter in list(self.exporters.values()):
                exporter.drain()

    def handover_items(self, fds: list[int]) -> list[tuple[ExporterSession, dict]]:
        """Detach every open exporter connection for a successor; appends their descriptors to ``fds``."""
        self.loop.unwatch(self.sock)
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
    """Reads datagrams and hands each to the session of its exporter address+port."""

    def __init__(self, *args):
        self.reader = DatagramReader()
        self.sessions: dict[tuple, ExporterSession] = {}
        super().__init__(*args)
        self.loop.every(UDP_EXPIRY_PERIOD, self._expire)

    def adopt(self, addr: tuple, peer: str, templates) -> None:
        self.sessions[addr] = self.open_session(addr, peer, templates)

    def _on_readable(self, _mask) -> None:
        reader, sock, sessions = self.reader, self.sock, self.sessions
        now = time.monotonic()
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
                self.count_malformed(exc, peer_name(addr))
                continue
            session = sessions.get(addr)
            if session is None:
                session = sessions[addr] = self.open_session(addr, peer_name(addr))
                self.log.info("exporter_connected", peer=session.peer)
            session.last_seen = now
            session.deliver((msg,))

    def _expire(self) -> None:
        limit = time.monotonic() - UDP_SESSION_IDLE
        for addr, session in list(self.sessions.items()):
            if session.last_seen < limit:
                del self.sessions[addr]
                self.log.info("exporter_idle", peer=session.peer, idle_seconds=UDP_SESSION_IDLE)
                session.end()

    def stop(self, drain: bool) -> None:
        self.loop.unwatch(self.sock)
        self.sock.close()
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
