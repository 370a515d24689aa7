"""Checks across receivers: what no single key shows (a port or dump directory shared, a forwarding circle)
and the warnings about receivers that are valid but probably not what the operator meant.

Each check gets the receivers as ``parse`` built them, each with its keys (``parse.Keys``), so that a
problem is reported under the key exactly as the file wrote it.
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .host import Host
from .model import Endpoint, Mode, ReceiverConfig

if TYPE_CHECKING:
    from .parse import Keys

    Built = list[tuple[ReceiverConfig, Keys]]


def check_shared(built: Built, problems: list[str]) -> None:
    """Receivers must not share a listening socket, nor (when recording) a dump directory."""
    dirs: dict[str, str] = {}
    for i, (rc_a, ka) in enumerate(built):
        a = rc_a.listen
        for rc_b, kb in built[i + 1:]:
            b = rc_b.listen
            if (None not in (a.port, a.port_type, a.bind, b.bind) and (a.port_type, a.port) == (b.port_type, b.port)
                    and (a.bind == b.bind or ipaddress.ip_address(a.bind).is_unspecified
                         or ipaddress.ip_address(b.bind).is_unspecified)):
                problems.append(f"{kb.describe('PORT', b.port)}: {b.port_type} port {b.port} is already used by "
                                f"{ka.describe('PORT', a.port)}; expected a listening port unique to each receiver")
        if rc_a.forwarding.mode is Mode.DISABLED:
            dump_dir = rc_a.recording.dump_dir
            where = os.path.normpath(dump_dir)
            if where in dirs:
                problems.append(f"{ka.describe('DUMP_DIR', dump_dir)}: directory already used by {dirs[where]}; "
                                "expected a dump directory of its own for each recording receiver")
            dirs.setdefault(where, ka.describe("DUMP_DIR", dump_dir))


def check_cycles(built: Built, host: Host) -> None:
    """Receivers must not forward to each other in a circle (fullflow[0] -> fullflow[1] -> fullflow[0]): each
    message would go round for ever. Reported once per circle, on its first receiver."""
    complete = [rc for rc, _ in built if None not in (rc.listen.port, rc.listen.port_type, rc.listen.bind)]
    keys = {id(rc): r for rc, r in built}
    reaches = {id(a): [b for b in complete if b is not a and a.forwarding.mode in (Mode.ROUND_ROBIN, Mode.ALL)
                       and any(loops(e, b.listen.port_type, b.listen.port, b.listen.bind, host)
                               for e in a.forwarding.subreceivers)] for a in complete}
    order = {id(rc): i for i, rc in enumerate(complete)}
    for start in complete:
        path = _path_back(start, reaches)
        if path and min(order[id(rc)] for rc in path) == order[id(start)]:
            circle = " -> ".join(rc.name for rc in path + [start])
            keys[id(start)].fail("BALANCER_SUB", "subreceivers that do not lead back to this receiver",
                                 why=f"the receivers forward to each other in a circle ({circle})")


def _path_back(start: ReceiverConfig, reaches: dict) -> list[ReceiverConfig] | None:
    """The shortest forwarding path from ``start`` back to itself (breadth first), or None."""
    parents = {id(start): None}
    frontier = [start]
    while frontier:
        following = []
        for rc in frontier:
            for nxt in reaches[id(rc)]:
                if nxt is start:
                    path = [rc]
                    while parents[id(path[-1])] is not None:
                        path.append(parents[id(path[-1])])
                    return path[::-1]
                if id(nxt) not in parents:
                    parents[id(nxt)] = rc
                    following.append(nxt)
        frontier = following
    return None


def loops(e: Endpoint, proto: str, port: int, bind: str, host: Host) -> bool:
    """True when sending to e would reach the listening socket (proto, port, bind) of this host."""
    if (e.proto, e.port) != (proto, port):
        return False
    dst, listen = _unmapped(e.host), _unmapped(bind)
    if not listen.is_unspecified:
        return dst == listen
    # 0.0.0.0 accepts IPv4 only; :: is dual-stack on Linux.
    return (listen.version == 6 or dst.version == 4) and (
        dst.is_loopback or dst.is_unspecified or dst in host.local_addresses())


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a socket really talks to: ::ffff:a.b.c.d is IPv4 a.b.c.d (dual-stack sockets)."""
    ip = ipaddress.ip_address(host)
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def warnings(built: Built) -> list[str]:
    """Every warning, in the order operators know: rotation, datagrams, unused keys, privileged ports."""
    return [*_rotation_warnings(built), *_datagram_warnings(built), *_unused_warnings(built),
            *_privileged_port_warnings(built)]


def _rotation_warnings(built: Built) -> Iterator[str]:
    """The manual: Clickstream must rotate no sooner than Fullflow, whose rotation HUPs the others."""
    fullflow = {rc.index: rc for rc, _ in built if rc.stream == "FULLFLOW" and rc.forwarding.mode is Mode.DISABLED}
    for rc, r in built:
        ff = fullflow.get(rc.index)
        rec = rc.recording
        if (rc.stream == "CLICKSTREAM" and rc.forwarding.mode is Mode.DISABLED and ff
                and rec.rotate_seconds < ff.recording.rotate_seconds):
            param = "ROTATE_DELAY_SECONDS" if rec.rotate_delay_seconds > 0 else "ROTATE_MINUTES"
            yield (f"{r.describe(param, getattr(rec, param.lower()))}: Clickstream rotates every "
                   f"{rec.rotate_seconds} s, sooner than {ff.name} ({ff.recording.rotate_seconds} s); expected "
                   "Clickstream's rotation period >= Fullflow's, as the manual requires")


def _datagram_warnings(built: Built) -> Iterator[str]:
    """TCP carries IPFIX messages of up to 65,535 bytes; a UDP datagram at most 65,507 bytes of payload."""
    for rc, r in built:
        fw = rc.forwarding
        if rc.listen.port_type == "tcp" and fw.sub_proto == "udp" and fw.mode in (Mode.ROUND_ROBIN, Mode.ALL):
            yield (f"{r.describe('BALANCER_SUB_PROTO', 'tcp')}: {rc.name} receives TCP and forwards UDP; "
                   "exporters must keep messages under 65,507 bytes (larger ones cannot be sent as one datagram "
                   "and are dropped, counted as oversize)")


_RECORDING_PARAMS = ("ROTATE_MINUTES", "ROTATE_DELAY_SECONDS", "FW_MAX_QUEUE_SIZE", "DUMP_INSERT_PROCESSES",
                     "DUMP_DIR", "SPOOL_BYTES")


def _unused_warnings(built: Built) -> Iterator[str]:
    """Rotation and export keys on a receiver that records nothing: the operator expects files or inserts."""
    for rc, r in built:
        fw = rc.forwarding
        unused = [r.describe(p, None) for p in _RECORDING_PARAMS if r.value(p)]  # KEY='value', as written
        if unused and fw.mode is not Mode.DISABLED and not fw.balancer_auto:
            yield (f"{', '.join(unused)}: {rc.name} forwards ({r.describe('BALANCER', fw.mode.value)}) and records "
                   f"nothing, so {'this key has' if len(unused) == 1 else 'these keys have'} no effect; expected "
                   f"BALANCER=Disabled or BALANCER_AUTO=Enabled for recording")


def _privileged_port_warnings(built: Built) -> Iterator[str]:
    """The shipped unit runs without capabilities: a port below 1024 would fail to listen under it."""
    for rc, r in built:
        if rc.listen.port < 1024:
            yield (f"{r.describe('PORT', rc.listen.port)}: a port below 1024 needs CAP_NET_BIND_SERVICE, which the "
                   "shipped unit does not grant; render a unit that does (python -m ipfix_balancer.render unit "
                   "--config PATH) or add AmbientCapabilities= and CapabilityBoundingSet=CAP_NET_BIND_SERVICE in a "
                   "drop-in (systemctl edit fast_ipfix_balancer)")
