"""Listening sockets: binding a receiver's, checking it can be bound before a reload stops the handler that
would be replaced, and who holds a port (an operator told "address already in use" wants to know which
process to look at)."""

from __future__ import annotations

import errno
import ipaddress
import socket

import psutil

_WILDCARDS = ("0.0.0.0", "::")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value: Python 3.11 does not name it


def bind(port_type: str, host: str, port: int, rcvbuf: int = 0) -> socket.socket:
    """A receiver's listening socket, non-blocking; ``rcvbuf``: a UDP socket's receive buffer (RCVBUF_BYTES;
    0 leaves the kernel's default, enough for a check that it can be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if port_type == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_DGRAM and rcvbuf:
            set_rcvbuf(sock, rcvbuf)
        sock.bind((host, port))
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """Ask for a big receive buffer (UDP bursts: what arrives while the handler is busy waits there); as
    root, beyond net.core.rmem_max. (The kernel doubles the value for its bookkeeping.)"""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def bind_failure(port_type: str, host: str, port: int) -> str | None:
    """None when a handler could bind this socket now, else listen_failure's line. The socket is bound and
    closed at once: a port taken in between still fails in the handler, as before."""
    try:
        bind(port_type, host, port).close()
    except OSError as exc:
        return listen_failure(port_type, host, port, exc)
    return None


def port_holder(proto: str, host: str, port: int) -> str | None:
    """``pid N (name)`` of a process bound to ``proto`` port ``port`` on ``host`` or a wildcard address, or
    None when none is found (another user's sockets show no pid unless we run as root)."""
    try:
        sockets = psutil.net_connections(kind=proto)
    except (psutil.Error, OSError):
        return None
    for s in sockets:
        if (s.pid is None or not s.laddr or s.laddr.port != port
                or (proto == "tcp" and s.status != psutil.CONN_LISTEN)):
            continue
        if s.laddr.ip in _WILDCARDS or host in _WILDCARDS or _same_ip(s.laddr.ip, host):
            try:
                name = psutil.Process(s.pid).name()
            except psutil.Error:
                name = "?"
            return f"pid {s.pid} ({name})"
    return None


def _same_ip(a: str, b: str) -> bool:
    """Equal addresses, also when one is the IPv4-mapped IPv6 form of the other (dual-stack sockets)."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return (getattr(ia, "ipv4_mapped", None) or ia) == (getattr(ib, "ipv4_mapped", None) or ib)


def listen_failure(proto: str, host: str, port: int, exc: OSError) -> str:
    """One plain line for a failed bind, naming the holder of a port in use when it can be found."""
    where = f"{proto} [{host}]:{port}" if ":" in host else f"{proto} {host}:{port}"
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno == errno.EADDRINUSE:
        holder = port_holder(proto, host, port)
        reason = f"address already in use by {holder}" if holder else "address already in use"
    return f"cannot listen on {where}: {reason}"
