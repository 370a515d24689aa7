"""systemd's notify protocol (sd_notify(3)): one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

A few lines instead of compiled bindings. Without ``$NOTIFY_SOCKET`` (not under systemd, or a unit that is
not ``Type=notify``) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address  # '@': abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None
        usec = environ.get("WATCHDOG_USEC", "")
        for_us = environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        # sd_watchdog_enabled(3): ping at half the timeout, so one late turn does not get us killed
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and for_us else None
        self._next_ping = 0.0
        self._status = ""

    def send(self, *lines: str) -> bool:
        """Send one message; False when there is no systemd to tell or it cannot be reached."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000  # systemd >= 253 wants it with RELOADING=1
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, status: str) -> None:
        """STATUS= (what `systemctl status` shows), sent only when it changed."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 when half the watchdog timeout has passed since the last ping (``now``: monotonic)."""
        if self.watchdog_interval is not None and now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self.send("WATCHDOG=1")
