"""Handing a running handler's sockets to its successor, so a restart or an upgrade is invisible to
exporters: no reconnect, no message lost.

The supervisor gives the old handler and its successor the two ends of one socketpair (``control/channel.py``):
there is no named socket another process could reach. When the successor is ready it sends one request
byte; the old one stops accepting and reading, and sends its listening socket and every exporter connection
(SCM_RIGHTS), with per session the bytes of a message it had begun to read and the session's templates. It
then flushes its output queues and exits. Meanwhile the kernel keeps buffering what the exporters send, and
the new handler reads on from there.

``give`` is the old handler's part and ``adopt`` the successor's (after ``take``); ``offer`` and ``take`` are
the wire between them. The handler only decides when: on the supervisor's message, and at start.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Protocol

from .loop import READ, Loop

_LENGTH = struct.Struct("!I")
_FDS_PER_MESSAGE = 250  # the kernel takes at most 253 descriptors in one SCM_RIGHTS message


REQUEST = b"T"


class Listener(Protocol):
    """What the handover needs of ``net.listener``'s listeners."""
    sock: socket.socket

    def handover_items(self, fds: list[int]) -> list[tuple[object, dict]]: ...

    def adopt(self, *args) -> None: ...

    def release_handed_over(self) -> None: ...


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(text: str) -> bytes:
    return base64.b64decode(text)


def offer(conn: socket.socket, state: dict, fds: list[int]) -> None:
    """Send the state document, then the descriptors it refers to by position."""
    conn.setblocking(True)
    doc = json.dumps({**state, "fd_count": len(fds)}).encode()
    conn.sendall(_LENGTH.pack(len(doc)) + doc)
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(conn, [b"F"], fds[i:i + _FDS_PER_MESSAGE])


def take(conn: socket.socket, timeout: float = 30.0) -> tuple[dict, list[int]]:
    """Ask the predecessor at the other end of ``conn`` for its sockets (OSError, ValueError: it failed)."""
    conn.settimeout(timeout)
    with conn:
        conn.sendall(REQUEST)
        size = _LENGTH.unpack(_recv_exactly(conn, _LENGTH.size))[0]
        state = json.loads(_recv_exactly(conn, size))
        fds: list[int] = []
        while len(fds) < state["fd_count"]:
            _msg, got, _flags, _addr = socket.recv_fds(conn, 1, _FDS_PER_MESSAGE)
            if not got:
                raise ConnectionError("handover ended before all sockets arrived")
            fds.extend(got)
    return state, fds


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("handover ended early")
        buf += chunk
    return bytes(buf)


# -- the old handler's side ------------------------------------------------------------------------
class Successor:
    """Our end of the handover socket to a successor the supervisor announced: watched until the successor
    writes (``on_ready(sock)``, then ``give``), or ``cancel``led (we stop first)."""

    def __init__(self, loop: Loop, fd: int, on_ready: Callable[[socket.socket], None]):
        self.loop = loop
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        loop.watch(self.sock, READ, lambda _mask: on_ready(self._unwatched()))

    def _unwatched(self) -> socket.socket:
        self.loop.unwatch(self.sock)
        return self.sock

    def cancel(self) -> None:
        self._unwatched().close()


def give(conn: socket.socket, listener: Listener, templates: Callable[[object], Iterable[bytes]], log,
         before_offer: Callable[[], None]) -> bool:
    """Our successor wrote on ``conn``: if it asks for our sockets, stop ``listener`` reading, detach its
    exporter connections and send them (per session its peer, the part of a message already read and
    ``templates(session)``), ``before_offer()`` run first (a recorder completes its file before the
    successor opens the directory). True when handed over, or when sending failed with the sockets already
    detached (the supervisor's restart of the successor binds anew): either way this handler only drains
    now. False when the successor did not ask (it died while starting): logged, and we keep serving."""
    try:
        request = conn.recv(1)
    except OSError as exc:
        request = str(exc).encode()
    if request != REQUEST:
        log.error("handover_abandoned", reason="successor closed" if not request else "unexpected request")
        conn.close()
        return False
    fds = [listener.sock.fileno()]
    items = []
    for session, item in listener.handover_items(fds):
        item["templates"] = [encode(m) for m in templates(session)]
        items.append(item)
    before_offer()
    try:
        with conn:
            offer(conn, {"pid": os.getpid(), "listener": 0, "sessions": items}, fds)
    except OSError as exc:
        log.error("handover_failed", reason=str(exc), sessions=len(items))
    else:
        log.info("handed_over", sessions=len(items))
    listener.release_handed_over()
    return True


# -- the successor's side --------------------------------------------------------------------------
def adopt(state: dict, fds: list[int], listen: Callable[[socket.socket], Listener]) -> None:
    """Continue the predecessor's sockets from what ``take`` returned: ``listen`` gets its listening socket
    and returns the listener that adopts each exporter session, with the part of a message the predecessor
    had already read and the templates it had learnt (replayed to new outputs)."""
    socks = [socket.socket(fileno=fd) for fd in fds]
    sock = socks[state["listener"]]
    sock.setblocking(False)
    listener = listen(sock)
    for item in state["sessions"]:
        templates = [memoryview(decode(m)) for m in item["templates"]]
        if "fd" in item:
            listener.adopt(socks[item["fd"]], item["peer"], decode(item["tail"]), templates)
        else:
            listener.adopt(tuple(item["addr"]), item["peer"], templates)
