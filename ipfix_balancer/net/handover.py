"""Handing a running handler's sockets to its successor, so a restart or an upgrade is invisible to
exporters: no reconnect, no message lost.

The old handler listens on an abstract unix socket named after the run directory and the receiver. A new
handler for the same receiver connects to it; the old one stops accepting and reading, and sends its
listening socket and every exporter connection (SCM_RIGHTS), with per session the bytes of a message it
had begun to read and the session's templates. It then flushes its output queues and exits. Meanwhile
the kernel keeps buffering what the exporters send, and the new handler reads on from there.
"""

from __future__ import annotations

import base64
import json
import socket
import struct

_LENGTH = struct.Struct("!I")
_FDS_PER_MESSAGE = 250  # the kernel takes at most 253 descriptors in one SCM_RIGHTS message


def listen(addr: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(addr)
    server.listen(1)
    server.setblocking(False)
    return server


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


def take(addr: str, timeout: float = 30.0) -> tuple[dict, list[int]] | None:
    """Ask the handler listening at ``addr`` for its sockets; None when no handler is there."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(addr)
    except (ConnectionRefusedError, FileNotFoundError):
        conn.close()
        return None
    with conn:
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
