"""The private channel between the supervisor and one handler.

The supervisor makes a socketpair per handler and the handler inherits its end as a descriptor: no name in
any namespace, so no other process can connect, read, squat or forge. Over it the supervisor sends the
receiver's settings (at start and on reload: never in ``argv``, which every user sees in ``ps``) and, for a
restart in place, one end of a fresh socketpair whose other end goes to the successor: the handover socket
(``net/handover.py``). Only the supervisor can introduce the two handlers to each other.

When the supervisor is gone the channel reads end-of-file: the handler stops instead of lingering as an
orphan that keeps the port.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_MESSAGE = 1 << 20  # settings are a few KB; a longer message is refused, not cut


class ChannelError(Exception):
    """The peer sent something that is not a channel message."""


def pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, handler end). SEQPACKET: one send is one message, with its descriptors."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def handover_pair() -> tuple[socket.socket, socket.socket]:
    """(predecessor end, successor end) of a handover: a byte stream (``net/handover.py`` frames it)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def send(sock: socket.socket, doc: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [json.dumps(doc).encode()], list(fds))


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors that came with it; None at end-of-file (the peer is gone)."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            socket.close(fd)
        raise ChannelError("message too long")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ChannelError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ChannelError("not a JSON object")
    return doc, fds
