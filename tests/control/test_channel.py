"""control/channel.py: the supervisor-handler channel carries whole messages with descriptors, and says
plainly when the peer is gone or sent garbage."""
import os
import socket

import pytest

from ipfix_balancer.control import channel


def test_a_message_arrives_whole_with_its_descriptors():
    mine, theirs = channel.pair()
    r, w = os.pipe()
    with mine, theirs:
        channel.send(mine, {"receiver": "x" * 100_000, "handover": True}, (w,))
        doc, fds = channel.receive(theirs)
        assert doc == {"receiver": "x" * 100_000, "handover": True} and len(fds) == 1
        os.write(fds[0], b"through the passed descriptor")
        assert os.read(r, 100) == b"through the passed descriptor"
    for fd in (r, w, *fds):
        os.close(fd)


def test_end_of_file_means_the_peer_is_gone():
    mine, theirs = channel.pair()
    mine.close()
    with theirs:
        assert channel.receive(theirs) is None


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]"])
def test_garbage_is_an_error_not_a_crash(payload):
    mine, theirs = channel.pair()
    with mine, theirs:
        mine.send(payload)
        with pytest.raises(channel.ChannelError):
            channel.receive(theirs)
        channel.send(mine, {"ok": 1})
        assert channel.receive(theirs) == ({"ok": 1}, [])  # the channel stays usable


def test_handover_pair_is_a_byte_stream():
    a, b = channel.handover_pair()
    with a, b:
        assert a.type == socket.SOCK_STREAM and b.family == socket.AF_UNIX
