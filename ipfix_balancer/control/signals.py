"""Signals between the processes, and how each process receives them.

Both the supervisor and the handlers handle signals the same way: a handler only records the signal,
and a socketpair registered with ``signal.set_wakeup_fd`` wakes the process's select (the supervisor's
poll, the handler's loop), so the signal is acted on within one turn, outside the signal handler.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Iterable

_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here, not in a forked child where loading is unsafe
SUPERVISOR_NAME = "ipfix-balancer"  # the supervisor's process name; handlers check it before signalling
CONSOLE_NAME = "ipfix-console"
ROTATED = signal.SIGUSR1            # recorder -> supervisor: the Fullflow recorder rotated


class Wakeup:
    """Records the given signals and makes ``sock`` readable when one arrives."""

    def __init__(self, signals: Iterable[int]):
        self.sock, self._wsock = socket.socketpair()  # _wsock is kept: closing it would end the wake-ups
        self.sock.setblocking(False)
        self._wsock.setblocking(False)
        self._pending: list[int] = []
        signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda signum, _frame: self._pending.append(signum))

    def take(self) -> list[int]:
        """The signals received since the last call, oldest first; empties the wake-up socket."""
        try:
            while self.sock.recv(4096):
                pass
        except BlockingIOError:
            pass
        signals, self._pending = self._pending, []
        return signals


def set_process_name(name: str) -> None:
    """What ``ps -o comm`` shows (the kernel keeps 15 characters). prctl, not a write to /proc/self/comm:
    after the drop from root to the service user the process is not dumpable, its /proc files belong to
    root, and the write fails; status, stop and reload find the supervisor by this name."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def notify_supervisor() -> None:
    """Tell the supervisor (our parent) that this Fullflow recorder rotated; it relays SIGHUP to the other
    recorders. Nothing is sent to a parent that is not the supervisor (tests, a handler started by hand):
    SIGUSR1 would kill most processes."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/comm") as f:
            if f.read().strip() != SUPERVISOR_NAME:
                return
        os.kill(ppid, ROTATED)
    except OSError:
        pass




def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In a child before exec: ask the kernel for ``sig`` when the parent dies (a SIGKILLed supervisor
    must not leave handlers holding the ports), then check the parent did not die before we asked.
    The setting survives exec (not for setuid programs)."""
    if _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)
