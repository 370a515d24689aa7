"""Who holds a port: an operator told "address already in use" wants to know which process to look at."""

from __future__ import annotations

import errno
import ipaddress

import psutil

_WILDCARDS = ("0.0.0.0", "::")


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
