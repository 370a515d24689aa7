"""net/listener.py on real loopback sockets: what reaches each exporter session (byte for byte, however the
bytes are cut), what is counted and logged when a peer leaves, sends junk, is refused by ALLOW or a cap, or
stays silent; accept at the descriptor limit; the UDP path with recvmmsg and without; stop and handover.
Time is a fake clock patched in for the listener's ``time.monotonic``; the loop keeps the real one."""

import errno
import os
import socket
import struct
import types

import pytest

from ipfix_balancer.config import Limits
from ipfix_balancer.core.admission import FIRST_MESSAGE_SECONDS, IDLE_EVICT_SECONDS, SILENT_GRACE, Rate
from ipfix_balancer.logs import Throttle
from ipfix_balancer.net import handover
from ipfix_balancer.net import listener as listener_module
from ipfix_balancer.net.listener import (UDP_SESSION_IDLE, ListenerDeps, TcpListener, UdpListener, kernel_drops,
                                         peer_host, peer_name)
from ipfix_balancer.net.loop import Loop

from fakes import FakeClock, FakeSession, FakeSocket, Log
from recording.recordkit import run_loop
from test_mmsg import message, udp


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(listener_module, "time", types.SimpleNamespace(monotonic=clock))
    return clock


class Harness:
    """A listener with fake sessions: ``sessions`` in the order opened, ``malformed`` as (reason, peer)."""

    def __init__(self, kind, sock, limits: Limits = Limits()):
        self.sessions: list[FakeSession] = []
        self.malformed: list[tuple[str, str]] = []
        self.refuse = None  # what every new session's deliver returns
        self.log = Log()
        self.loop = Loop()
        deps = ListenerDeps(self.loop, self.log, Throttle(self.log), self._open,
                            lambda err, peer: self.malformed.append((err.reason, peer)))
        self.lst = kind(deps, sock, limits)

    def _open(self, key, peer, templates=()):
        session = FakeSession(key, peer, templates)
        session.refuse = self.refuse
        self.sessions.append(session)
        return session

    def run(self, until, timeout: float = 5.0) -> None:
        run_loop(self.loop, until, timeout)

    def events(self, name: str) -> list[dict]:
        return self.log.named(name)


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def tcp(limits: Limits = Limits(), sock=None) -> Harness:
    return Harness(TcpListener, sock or listening(), limits)


def connect(h: Harness) -> socket.socket:
    c = socket.create_connection(h.lst.sock.getsockname())
    c.settimeout(5)
    return c


def closed_by_balancer(c: socket.socket) -> bool:
    """The balancer closed its end: the exporter reads end of stream (or a reset, had it unread bytes)."""
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True


def reset(c: socket.socket) -> None:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


MESSAGES = [message(i, 60 + i * 37) for i in range(20)]
STREAM = b"".join(MESSAGES)


# -- TCP ------------------------------------------------------------------------------------------------------
def test_an_accepted_connection_delivers_whole_messages_however_the_bytes_are_cut():
    h = tcp()
    c = connect(h)
    c.sendall(STREAM[:len(MESSAGES[0]) + 10])  # one message and the start of the next
    h.run(lambda: h.sessions and h.sessions[0].messages)
    (session,) = h.sessions
    assert session.messages == MESSAGES[:1], "only whole messages"
    c.sendall(STREAM[len(MESSAGES[0]) + 10:])
    h.run(lambda: len(session.messages) == len(MESSAGES))
    assert session.messages == MESSAGES
    assert session.peer == f"127.0.0.1:{c.getsockname()[1]}" == peer_name(c.getsockname())
    assert h.events("exporter_connected") == [{"peer": session.peer}]
    assert len(h.lst.admission) == 1 and not session.ended and h.malformed == []


def test_a_peer_that_connects_and_closes_ends_its_session_and_frees_its_slot():
    h = tcp()
    connect(h).close()
    h.run(lambda: h.sessions and h.sessions[0].ended)
    assert h.sessions[0].messages == [] and len(h.lst.admission) == 0
    assert h.events("exporter_disconnected") == [{"peer": h.sessions[0].peer, "reason": "closed by exporter"}]
    assert h.events("exporter_truncated") == [] and h.malformed == []


def test_a_peer_that_leaves_mid_message_delivers_the_whole_ones_and_the_rest_is_logged():
    h = tcp()
    c = connect(h)
    c.sendall(MESSAGES[0] + MESSAGES[1][:30])
    c.close()
    h.run(lambda: h.sessions and h.sessions[0].ended)
    assert h.sessions[0].messages == MESSAGES[:1]
    (truncated,) = h.events("exporter_truncated")
    assert truncated["bytes"] == 30


def test_a_reset_is_an_ordinary_end_of_session():
    h = tcp()
    c = connect(h)
    c.sendall(MESSAGES[0])
    h.run(lambda: h.sessions and h.sessions[0].messages)
    reset(c)
    h.run(lambda: h.sessions[0].ended)
    (line,) = h.events("exporter_disconnected")
    assert line["reason"] == str(ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)))
    assert h.malformed == [] and h.events("exporter_truncated") == []


def test_bytes_that_are_not_ipfix_are_counted_and_end_only_that_session():
    h = tcp()
    good, bad = connect(h), connect(h)
    h.run(lambda: len(h.sessions) == 2)
    bad.sendall(struct.pack("!HH", 9, 100) + bytes(96))  # NetFlow v9, not IPFIX
    h.run(lambda: h.sessions[1].ended)
    assert h.malformed == [("bad_version", h.sessions[1].peer)] and closed_by_balancer(bad)
    good.sendall(STREAM)
    h.run(lambda: len(h.sessions[0].messages) == len(MESSAGES))
    assert not h.sessions[0].ended and len(h.lst.admission) == 1


def test_a_session_that_refuses_a_message_is_closed_with_the_reason():
    h = tcp()
    h.refuse = "too many templates"
    c = connect(h)
    c.sendall(MESSAGES[0] + MESSAGES[1])
    h.run(lambda: h.sessions and h.sessions[0].ended)
    assert h.events("exporter_disconnected")[0]["reason"] == "too many templates" and closed_by_balancer(c)
    assert h.sessions[0].runs == [MESSAGES[:2]], "the run was offered once; nothing after the refusal"


def test_a_source_outside_allow_is_refused_without_a_session():
    h = tcp(Limits(allow=("10.0.0.0/8",)))
    c = connect(h)
    h.run(lambda: h.lst.limited)
    assert h.lst.limited == {"not_allowed": 1} and h.sessions == [] and closed_by_balancer(c)
    (line,) = h.events("exporter_limited")
    assert line["reason"] == "not_allowed" and line["action"] == "connection refused"


def test_at_the_per_source_cap_a_silent_session_makes_room_once_it_had_its_grace(clock):
    h = tcp(Limits(max_sessions_per_source=1))
    first = connect(h)
    h.run(lambda: h.sessions)
    second = connect(h)  # within SILENT_GRACE of the first: the first has not had its turn yet
    h.run(lambda: h.lst.limited)
    assert h.lst.limited == {"max_sessions_per_source": 1} and closed_by_balancer(second)
    clock.advance(SILENT_GRACE)
    third = connect(h)
    h.run(lambda: len(h.sessions) == 2)
    assert h.lst.limited == {"max_sessions_per_source": 1, "evicted_silent": 1}
    assert h.sessions[0].ended and closed_by_balancer(first) and not h.sessions[1].ended
    third.sendall(MESSAGES[0])
    h.run(lambda: h.sessions[1].messages)
    clock.advance(SILENT_GRACE)
    connect(h)  # the one there delivered a message just now: it keeps its slot
    h.run(lambda: h.lst.limited["max_sessions_per_source"] == 2)
    assert len(h.sessions) == 2 and not h.sessions[1].ended


def test_at_the_session_cap_a_connection_idle_long_enough_makes_room(clock):
    h = tcp(Limits(max_sessions=1))
    first = connect(h)
    first.sendall(MESSAGES[0])
    h.run(lambda: h.sessions and h.sessions[0].messages)
    clock.advance(IDLE_EVICT_SECONDS - 1)
    refused = connect(h)
    h.run(lambda: h.lst.limited)
    assert h.lst.limited == {"max_sessions": 1} and closed_by_balancer(refused)
    clock.advance(1)
    connect(h)
    h.run(lambda: len(h.sessions) == 2)
    assert h.lst.limited == {"max_sessions": 1, "evicted_idle": 1} and closed_by_balancer(first)
    assert h.events("exporter_disconnected")[0]["reason"] == "evicted_idle: room for a new exporter"


def test_the_sweep_closes_a_connection_without_a_first_message_then_one_idle_too_long(clock):
    h = tcp(Limits(idle_timeout=30))
    silent, talking = connect(h), connect(h)
    talking.sendall(MESSAGES[0])
    h.run(lambda: len(h.sessions) == 2 and h.sessions[1].messages)
    clock.advance(FIRST_MESSAGE_SECONDS + 1)
    h.lst._sweep()
    assert h.sessions[0].ended and closed_by_balancer(silent) and not h.sessions[1].ended
    assert h.lst.limited == {"first_message_deadline": 1}
    talking.sendall(MESSAGES[1])  # 11 s after its first: the idle time counts from here
    h.run(lambda: len(h.sessions[1].messages) == 2)
    clock.advance(29)
    h.lst._sweep()
    assert not h.sessions[1].ended
    clock.advance(1)
    h.lst._sweep()
    assert h.sessions[1].ended and closed_by_balancer(talking)
    assert h.lst.limited == {"first_message_deadline": 1, "idle_timeout": 1}
    assert len(h.lst.admission) == 0


def test_at_the_descriptor_limit_accept_pauses_then_takes_the_waiting_connection():
    lsock = listening()
    too_many = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    h = tcp(sock=FakeSocket(lsock).fail("accept", too_many, too_many))  # two attempts, 0.5 s apart
    connect(h)
    h.run(lambda: h.sessions)
    assert h.lst.limited == {"fd_limit": 1}, "one episode"
    (paused,) = h.events("accept_paused")
    assert paused["reason"] == os.strerror(errno.EMFILE)
    assert len(h.events("accept_resumed")) == 1


def test_a_connection_aborted_before_accept_is_logged_and_the_next_one_served():
    h = tcp(sock=FakeSocket(listening()).fail("accept", OSError(errno.ECONNABORTED, "aborted")))
    connect(h)
    h.run(lambda: h.sessions)
    assert [e["error"] for e in h.events("accept_failed")] == ["[Errno 103] aborted"]
    assert h.lst.limited == {}


def test_stop_with_drain_forwards_what_the_kernel_holds_then_closes():
    h = tcp()
    c = connect(h)
    h.run(lambda: h.sessions)
    c.sendall(STREAM)
    address = h.lst.sock.getsockname()
    h.lst.stop(drain=True)
    (session,) = h.sessions
    assert session.messages == MESSAGES and session.ended and closed_by_balancer(c)
    assert h.events("exporter_disconnected")[0]["reason"] == "balancer stopping"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address)


def test_a_handover_moves_a_connection_mid_message_to_a_successor(clock):
    old = tcp()
    c = connect(old)
    c.sendall(MESSAGES[0] + MESSAGES[1][:40])
    old.run(lambda: old.sessions and old.sessions[0].messages)
    fds: list[int] = []
    ((session, item),) = old.lst.handover_items(fds)
    assert session is old.sessions[0] and item["peer"] == session.peer and item["fd"] == 0
    assert handover.decode(item["tail"]) == MESSAGES[1][:40]
    new = tcp()
    new.lst.adopt(socket.socket(fileno=os.dup(fds[0])), item["peer"], handover.decode(item["tail"]), "templates")
    old.lst.release_handed_over()
    assert session.ended and old.lst.sock.fileno() == -1
    clock.advance(FIRST_MESSAGE_SECONDS + 1)
    new.lst._sweep()
    assert not new.sessions[0].ended, "an adopted connection had delivered: no first-message deadline"
    c.sendall(MESSAGES[1][40:] + MESSAGES[2])
    new.run(lambda: len(new.sessions[0].messages) == 2)
    assert new.sessions[0].messages == MESSAGES[1:3] and new.sessions[0].templates == "templates"
    assert session.messages == MESSAGES[:1], "the predecessor read nothing after the handover"


# -- UDP ------------------------------------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["recvmmsg", "recvfrom"])
def batched(request, monkeypatch):
    """Both receive paths: recvmmsg into slots, and one recvfrom_into per datagram where it is missing."""
    monkeypatch.setattr(listener_module.mmsg, "AVAILABLE", request.param and listener_module.mmsg.AVAILABLE)
    if request.param and not listener_module.mmsg.AVAILABLE:
        pytest.skip("no recvmmsg in this C library")
    return request.param


def udp_listener(limits: Limits = Limits(), sock=None) -> Harness:
    return Harness(UdpListener, sock or udp(), limits)


def send(h: Harness, src: socket.socket, *datagrams: bytes) -> None:
    for d in datagrams:
        src.sendto(d, h.lst.sock.getsockname())


def by_source(h: Harness) -> dict:
    return {s.key: s.messages for s in h.sessions}


def bad_set(ident: int) -> bytes:
    """A header that is right, a set that claims more bytes than the message holds."""
    return struct.pack("!HHIII", 10, 40, 0, ident, 1) + struct.pack("!HH", 256, 200) + bytes(20)


def test_only_a_valid_message_opens_a_udp_session_junk_is_counted(batched):
    h = udp_listener()
    a, b = udp(), udp()
    send(h, b, b"\x00\x0a\x00", message(1)[:-1], bad_set(2))  # short, length mismatch, bad set
    send(h, a, message(3), message(4))
    h.run(lambda: h.sessions and len(h.sessions[0].messages) == 2)
    peer_b = peer_name(b.getsockname())
    assert h.malformed == [("short_datagram", peer_b), ("length_mismatch", peer_b), ("set_past_end", peer_b)]
    assert by_source(h) == {a.getsockname(): [message(3), message(4)]}
    send(h, b, message(5))
    h.run(lambda: len(h.sessions) == 2)
    assert by_source(h)[b.getsockname()] == [message(5)] and len(h.lst.admission) == 2
    assert all(stop is False for s in h.sessions for stop in s.stops), "each datagram stands alone"


def test_datagrams_larger_than_a_slot_arrive_whole_and_in_order(batched):
    h = udp_listener()
    src = udp()
    sizes = [100, 2049, 9000, 60000, 24, 1500]
    msgs = [message(i, n) for i, n in enumerate(sizes)]
    send(h, src, *msgs)
    h.run(lambda: h.sessions and len(h.sessions[0].messages) == len(msgs))
    assert h.sessions[0].messages == msgs and h.malformed == []


def test_a_udp_source_outside_allow_is_dropped_and_counted_per_datagram(batched):
    h = udp_listener(Limits(allow=("10.0.0.0/8",)))
    send(h, udp(), message(1), message(2), message(3))
    h.run(lambda: h.lst.limited.get("not_allowed") == 3)
    assert h.sessions == []


def test_new_udp_sessions_are_rate_limited(clock, batched):
    h = udp_listener()
    h.lst.new_sessions = Rate(per_second=2)
    sources = [udp() for _ in range(3)]
    for src in sources:
        send(h, src, message(1))
    h.run(lambda: len(h.sessions) == 2 and h.lst.limited)
    assert h.lst.limited == {"new_session_rate": 1}
    clock.advance(1)
    send(h, sources[2], message(2))
    h.run(lambda: len(h.sessions) == 3)
    assert by_source(h)[sources[2].getsockname()] == [message(2)]


def test_an_idle_udp_session_expires_and_the_next_datagram_opens_a_new_one(clock, batched):
    h = udp_listener()
    src = udp()
    send(h, src, message(1))
    h.run(lambda: h.sessions)
    clock.advance(UDP_SESSION_IDLE - 1)
    h.lst._expire()
    assert not h.sessions[0].ended
    clock.advance(1)
    h.lst._expire()
    assert h.sessions[0].ended and h.lst.limited == {"idle_timeout": 1} and len(h.lst.admission) == 0
    send(h, src, message(2))
    h.run(lambda: len(h.sessions) == 2)
    assert h.sessions[1].messages == [message(2)]


def test_a_udp_run_with_a_datagram_over_a_template_limit_is_activity_when_others_went_on(clock, batched):
    """A steady exporter whose runs each hold one datagram refused over a template limit is sending valid data:
    it must not expire as idle (nor be evicted as idle at a cap). A run refused whole is no activity."""
    h = udp_listener()
    src = udp()
    send(h, src, message(1))
    h.run(lambda: h.sessions)
    (session,) = h.sessions
    session.refuse, session.dispatched = "templates_max", 1
    clock.advance(UDP_SESSION_IDLE - 1)
    send(h, src, message(2))
    h.run(lambda: len(session.messages) == 2)
    clock.advance(1)
    h.lst._expire()
    assert not session.ended and src.getsockname() in h.lst.admission
    session.dispatched = 0
    clock.advance(UDP_SESSION_IDLE - 1)
    send(h, src, message(3))
    h.run(lambda: len(session.messages) == 3)
    clock.advance(1)
    h.lst._expire()
    assert session.ended and h.lst.limited == {"idle_timeout": 1}


def test_at_the_udp_session_cap_a_new_source_is_dropped_until_a_session_is_idle_long_enough(clock, batched):
    h = udp_listener(Limits(max_sessions=1))
    a, b = udp(), udp()
    send(h, a, message(1))
    h.run(lambda: h.sessions)
    send(h, b, message(2))
    h.run(lambda: h.lst.limited)
    assert h.lst.limited == {"max_sessions": 1} and len(h.sessions) == 1
    (line,) = h.events("exporter_limited")
    assert line["action"] == "datagram dropped" and line["peer"] == peer_name(b.getsockname())
    clock.advance(IDLE_EVICT_SECONDS)
    send(h, b, message(3))
    h.run(lambda: len(h.sessions) == 2)
    assert h.lst.limited == {"max_sessions": 1, "evicted_idle": 1} and h.sessions[0].ended
    assert by_source(h)[b.getsockname()] == [message(3)] and len(h.lst.admission) == 1
    assert h.events("exporter_limited")[-1]["action"] == "session closed for a new one"


def test_a_failed_receive_is_logged_and_the_next_readable_event_reads_again(monkeypatch):
    monkeypatch.setattr(listener_module.mmsg, "AVAILABLE", False)
    h = udp_listener(sock=FakeSocket(udp()).fail("recvfrom_into", OSError(errno.ENOBUFS, "No buffer space")))
    send(h, udp(), message(1))
    h.run(lambda: h.sessions)
    assert [e["error"] for e in h.events("udp_receive_failed")] == ["[Errno 105] No buffer space"]
    assert h.sessions[0].messages == [message(1)]


@pytest.mark.skipif(not listener_module.mmsg.AVAILABLE, reason="no recvmmsg in this C library")
def test_a_failed_recvmmsg_is_logged_and_the_next_readable_event_reads_again():
    h = udp_listener()
    receive = h.lst.receiver.receive
    failures = [OSError(errno.ENOMEM, "Cannot allocate memory")]

    def failing_once():
        if failures:
            raise failures.pop()
        return receive()
    h.lst.receiver.receive = failing_once
    send(h, udp(), message(1))
    h.run(lambda: h.sessions)
    assert [e["error"] for e in h.events("udp_receive_failed")] == ["[Errno 12] Cannot allocate memory"]
    assert h.sessions[0].messages == [message(1)]


def test_udp_stop_ends_every_session_and_a_handover_lists_their_addresses(clock):
    h = udp_listener()
    a, b = udp(), udp()
    send(h, a, message(1))
    send(h, b, message(2))
    h.run(lambda: len(h.sessions) == 2)
    items = h.lst.handover_items([])
    assert sorted((item["peer"], tuple(item["addr"])) for _, item in items) == \
        sorted((peer_name(s.getsockname()), s.getsockname()) for s in (a, b))
    new = udp_listener()
    for session, item in items:
        new.lst.adopt(tuple(item["addr"]), item["peer"], session.key)
    h.lst.release_handed_over()
    assert all(s.ended for s in h.sessions) and h.lst.sessions == {}
    clock.advance(FIRST_MESSAGE_SECONDS + 1)
    new.lst._expire()
    assert not any(s.ended for s in new.sessions), "an adopted session had delivered"
    new.lst.stop(drain=True)
    assert all(s.ended for s in new.sessions) and new.lst.sessions == {} and new.lst.sock.fileno() == -1


def test_kernel_drops_reads_the_drops_column_of_a_udp_socket():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rx.bind(("127.0.0.1", 0))
    if kernel_drops(rx) is None:
        pytest.skip("no /proc/net/udp here")
    assert kernel_drops(rx) == 0
    tx = udp()
    for i in range(200):  # never read: the small buffer overflows
        tx.sendto(message(i, 1000), rx.getsockname())
    assert kernel_drops(rx) > 0
    assert kernel_drops(listening()) is None, "a TCP socket has no line there"


def test_peer_names_and_hosts():
    assert peer_name(("10.0.0.1", 4739)) == "10.0.0.1:4739" and peer_host("10.0.0.1:4739") == "10.0.0.1"
    assert peer_name(("fe80::1%eth0", 4739, 0, 2)) == "[fe80::1%eth0]:4739"
    assert peer_host("[fe80::1%eth0]:4739") == "fe80::1%eth0"
