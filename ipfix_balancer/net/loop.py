"""A minimal single-threaded event loop: selectors for sockets, a heap for timers, nothing else.

A handler owns one loop; asyncio would cost a coroutine switch per read and hide the batching the data
path relies on (read a big chunk, dispatch every message in it, then one send per destination).
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from typing import Callable

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def cancel(timer: Timer | None) -> None:
    """Cancel ``timer`` if there is one (a timer slot holds None when nothing is pending)."""
    if timer is not None:
        timer.cancel()


class Loop:
    def __init__(self):
        self._selector = selectors.DefaultSelector()
        # What is registered, known without asking the selector: its lookup of an unregistered socket
        # formats a KeyError with repr(socket), and UDP outputs are (un)watched on every flush.
        self._watched: set = set()
        self._timers: list = []
        self._seq = itertools.count()
        self._after_turn: dict[int, Callable[[], None]] = {}
        self.running = False

    # -- sockets -------------------------------------------------------------------------------
    def watch(self, sock, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(mask)`` when ``sock`` is ready for ``events``; replaces an earlier watch."""
        if sock in self._watched:
            self._selector.modify(sock, events, callback)
            return
        try:
            self._selector.register(sock, events, callback)
        except KeyError:  # its descriptor is registered through another object: replace that watch
            self._selector.modify(sock, events, callback)
        self._watched.add(sock)

    def unwatch(self, sock) -> None:
        if sock not in self._watched:
            return
        self._watched.discard(sock)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):  # a closed socket
            pass

    def close_socket(self, sock) -> None:
        """Stop watching ``sock`` and close it: unregistered first, while its descriptor is still its own."""
        self.unwatch(sock)
        sock.close()

    # -- time ----------------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def every(self, period: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` every ``period`` seconds for the life of the loop."""
        def tick():
            callback()
            self.call_later(period, tick)
        self.call_later(period, tick)

    def after_turn(self, key: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` once after the current batch of events (deduplicated by ``key``).

        This is the batching point: every message read in one turn is queued first, then each destination
        is flushed once with a single vectored send.
        """
        self._after_turn[key] = callback

    # -- running -------------------------------------------------------------------------------
    def run(self, until: Callable[[], bool]) -> None:
        """Run until ``until()`` is true (checked every turn)."""
        self.running = True
        timers = self._timers
        select = self._selector.select
        fd_map = self._selector.get_map()
        while not until():
            timeout = 1.0
            if self._after_turn:
                timeout = 0
            elif timers:
                timeout = max(0.0, min(timeout, timers[0][0] - time.monotonic()))
            for key, mask in select(timeout):
                # A callback earlier in this batch may have closed or unwatched this object: its event is
                # stale (and its fd number may already belong to a new socket).
                if fd_map.get(key.fd) is key:
                    key.data(mask)
            while self._after_turn:
                pending, self._after_turn = self._after_turn, {}
                for callback in pending.values():
                    callback()
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if not timer.cancelled:
                    timer.callback()
        self.running = False

    def close(self) -> None:
        self._selector.close()
