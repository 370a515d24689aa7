"""net/handover.py over a real socketpair: the request, the state document and the descriptors (SCM_RIGHTS,
past the kernel's per-message limit), and both handlers' steps around them."""

import os
import socket
import threading

import pytest

from fakes import Log
from ipfix_balancer.net import handover
from ipfix_balancer.net.loop import Loop


class FakeListener:
    """A listener as the handover sees it: a listening socket, exporter sessions to detach or adopt."""

    def __init__(self, sock, exporters=()):
        self.sock = sock
        self.exporters = list(exporters)  # (session, socket, peer, tail)
        self.adopted = []
        self.released = False

    def handover_items(self, fds):
        items = []
        for session, sock, peer, tail in self.exporters:
            items.append((session, {"peer": peer, "fd": len(fds), "tail": handover.encode(tail)}))
            fds.append(sock.fileno())
        return items

    def adopt(self, *args):
        self.adopted.append(args)

    def release_handed_over(self):
        self.released = True


def same_socket(a: socket.socket, fd: int) -> bool:
    return os.fstat(a.fileno()).st_ino == os.fstat(fd).st_ino


@pytest.fixture
def pair():
    old, new = socket.socketpair()
    with old, new:
        yield old, new


@pytest.mark.parametrize("said, reason", [(b"", "successor closed"), (b"?", "unexpected request")],
                         ids=["died", "noise"])
def test_a_successor_that_does_not_ask_gets_nothing_and_the_handler_keeps_serving(said, reason, pair):
    old, new = pair
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listening:
        listener, log = FakeListener(listening), Log()
        new.send(said) if said else new.close()
        assert handover.give(old, listener, lambda _s: [], log, lambda: pytest.fail("offered")) is False
        assert log.events == [("error", "handover_abandoned", {"reason": reason})]
        assert not listener.released and listening.fileno() >= 0 and old.fileno() == -1


def test_offer_and_take_carry_the_state_and_more_descriptors_than_one_message_may(pair):
    old, new = pair
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(handover._FDS_PER_MESSAGE + 5)]
    try:
        handover.offer(old, {"pid": 1, "listener": 0, "sessions": []}, [s.fileno() for s in socks])
        state, fds = handover.take(new, timeout=5)
        assert state == {"pid": 1, "listener": 0, "sessions": [], "fd_count": len(socks)}
        assert len(fds) == len(socks) and all(same_socket(s, fd) for s, fd in zip(socks, fds))
        for fd in fds:
            os.close(fd)
    finally:
        for s in socks:
            s.close()
    assert old.recv(1) == handover.REQUEST  # take asked first


def test_take_fails_when_the_predecessor_stops_midway(pair):
    old, new = pair
    old.sendall(handover._LENGTH.pack(100) + b"{")
    old.close()
    with pytest.raises(ConnectionError):
        handover.take(new, timeout=5)


def test_give_and_adopt_hand_every_session_over_with_its_tail_and_templates(pair):
    old, new = pair
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    exporter_a, exporter_b = socket.socketpair()
    sessions = {"s1": [b"\x00\x0a\x00\x10 template"], "s2": []}
    with listening, exporter_a, exporter_b:
        before = FakeListener(listening, [("s1", exporter_a, "192.0.2.1:4000", b"\x00\x0a\x00"),
                                          ("s2", exporter_b, "192.0.2.2:4000", b"")])
        taken = []
        successor = threading.Thread(target=lambda: taken.append(handover.take(new, timeout=5)))
        successor.start()
        log, order = Log(), []
        assert handover.give(old, before, lambda s: order.append(s) or sessions[s], log,
                             lambda: order.append("before offer"))
        successor.join(5)
        assert order == ["s1", "s2", "before offer"] and before.released
        assert log.events == [("info", "handed_over", {"sessions": 2})]
        state, fds = taken[0]
        assert state["pid"] == os.getpid() and state["listener"] == 0 and len(state["sessions"]) == 2
        after = []
        handover.adopt(state, fds, lambda sock: after.append(FakeListener(sock)) or after[-1])
        (listener,) = after
        assert same_socket(listening, listener.sock.fileno()) and not listener.sock.getblocking()
        (sock_a, peer_a, tail_a, templates_a), (sock_b, peer_b, tail_b, templates_b) = listener.adopted
        assert (peer_a, tail_a, [bytes(m) for m in templates_a]) == ("192.0.2.1:4000", b"\x00\x0a\x00",
                                                                      sessions["s1"])
        assert (peer_b, tail_b, templates_b) == ("192.0.2.2:4000", b"", [])
        assert same_socket(exporter_a, sock_a.fileno()) and same_socket(exporter_b, sock_b.fileno())
        for s in (listener.sock, sock_a, sock_b):
            s.close()


def test_a_successor_gone_after_asking_still_ends_the_handlers_serving(pair):
    old, new = pair
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listening:
        listener, log = FakeListener(listening), Log()
        new.send(handover.REQUEST)
        new.close()
        assert handover.give(old, listener, lambda _s: [], log, lambda: None)  # the sockets were detached
        assert [e for _, e, _ in log.events] == ["handover_failed"] and listener.released


def test_a_udp_session_is_adopted_by_its_address():
    listening = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    state = {"pid": 1, "listener": 0,
             "sessions": [{"peer": "192.0.2.1:4000", "addr": ["192.0.2.1", 4000], "templates": []}]}
    after = []
    handover.adopt(state, [os.dup(listening.fileno())], lambda sock: after.append(FakeListener(sock)) or after[-1])
    listening.close()
    assert after[0].adopted == [(("192.0.2.1", 4000), "192.0.2.1:4000", [])]
    after[0].sock.close()


def test_a_successor_is_watched_until_it_writes_or_is_cancelled(pair):
    ours, theirs = pair
    loop, ready = Loop(), []
    successor = handover.Successor(loop, os.dup(ours.fileno()), ready.append)
    theirs.send(handover.REQUEST)
    loop.run(until=lambda: ready)
    assert ready == [successor.sock] and ready[0].recv(1) == handover.REQUEST
    assert successor.sock not in loop._watched  # told once
    cancelled = handover.Successor(loop, os.dup(ours.fileno()), ready.append)
    cancelled.cancel()
    assert cancelled.sock.fileno() == -1 and cancelled.sock not in loop._watched
    successor.sock.close()
