"""What the checks ask of this machine, behind one interface so tests can fake the machine.

Each method returns a fact and decides nothing; ``parse``, ``checks`` and ``derive`` decide (and word the
messages). ``LocalHost`` asks the kernel: ``/proc``, netlink (pyroute2, this network namespace), ``sysconf``,
``pathconf``, ``access``.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Host(Protocol):
    def cpus(self) -> frozenset[int]:
        """The CPUs a handler may be pinned to."""

    def memory_bytes(self) -> int | None:
        """Physical memory, or None when it cannot be told."""

    def has_cap_net_raw(self) -> bool:
        """CAP_NET_RAW in this process's effective capabilities (raw sockets, source preservation)."""

    def local_addresses(self) -> set[IPAddress]:
        """This host's interface addresses."""

    def local_broadcasts(self) -> set[IPAddress]:
        """The broadcast addresses of this host's IPv4 networks (empty when they cannot be told)."""

    def readable(self, path: str) -> bool:
        """Whether this user can read the file at ``path``."""

    def nearest_existing(self, path: str) -> tuple[str, bool]:
        """The deepest existing path at or above ``path`` (normalised), and whether it is a directory."""

    def name_limits(self, directory: str) -> tuple[int, int]:
        """The longest file name and the longest path the file system at ``directory`` allows, in bytes."""


class LocalHost:
    """The machine this process runs on."""

    def cpus(self) -> frozenset[int]:
        return frozenset(os.sched_getaffinity(0)) | frozenset(range(os.cpu_count() or 1))

    def memory_bytes(self) -> int | None:
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None

    def has_cap_net_raw(self) -> bool:
        try:
            with open("/proc/self/status") as f:
                caps = next(line for line in f if line.startswith("CapEff:"))
        except (OSError, StopIteration):
            return False
        return bool(int(caps.split()[1], 16) >> 13 & 1)  # CAP_NET_RAW is bit 13

    def local_addresses(self) -> set[IPAddress]:
        # read only when a subreceiver's port matches, which is rare; a failure is the caller's to report
        from pyroute2 import IPRoute   # netlink: the kernel's own list, for this network namespace
        with IPRoute() as ipr:
            return {ip for msg in ipr.get_addr()
                    if (ip := ip_or_none(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS") or "")) is not None}

    def local_broadcasts(self) -> set[IPAddress]:
        try:
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                return {ip for msg in ipr.get_addr(family=socket.AF_INET)
                        if (ip := ip_or_none(msg.get_attr("IFA_BROADCAST") or "")) is not None}
        except Exception:  # noqa: BLE001 - a check that cannot run must not stop the balancer
            return set()

    def readable(self, path: str) -> bool:
        return os.access(path, os.R_OK)

    def nearest_existing(self, path: str) -> tuple[str, bool]:
        existing = os.path.normpath(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        return existing, os.path.isdir(existing)

    def name_limits(self, directory: str) -> tuple[int, int]:
        try:
            return os.pathconf(directory, "PC_NAME_MAX"), os.pathconf(directory, "PC_PATH_MAX")
        except (OSError, ValueError):
            return 255, 4096


LOCAL = LocalHost()


def ip_or_none(text: str) -> IPAddress | None:
    """``text`` as an address, or None when it is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
