"""Batched UDP calls (net/mmsg.py) on real loopback sockets, and the UDP listener with and without them:
what arrives, from whom, in which order, byte for byte; what a short or failed sendmmsg reports."""

import errno
import socket
import struct

import pytest

from ipfix_balancer.config import Limits
from ipfix_balancer.core.framing import DatagramSlots
from ipfix_balancer.logs import Throttle
from ipfix_balancer.net import listener as listener_module
from ipfix_balancer.net import mmsg
from ipfix_balancer.net.listener import ListenerDeps, UdpListener
from ipfix_balancer.net.loop import Loop

from fakes import FakeSession, Log

pytestmark = pytest.mark.skipif(not mmsg.AVAILABLE, reason="no recvmmsg/sendmmsg in this C library")


def udp(family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def message(ident: int, size: int = 100) -> bytes:
    """An IPFIX message of ``size`` bytes (one data set) that says which it is."""
    return struct.pack("!HHIII", 10, size, 0, ident, 1) + struct.pack("!HHI", 256, size - 16, ident) \
        + bytes([ident % 251]) * (size - 24)


def test_receive_takes_a_burst_with_each_datagrams_source_in_order():
    rx, a, b = udp(), udp(), udp()
    sent = []
    for i in range(150):  # runs of different lengths from two sources
        src = a if (i // 7) % 2 else b
        data = message(i, 30 + i * 13 % 3000)
        src.sendto(data, rx.getsockname())
        sent.append((src.getsockname(), data))
    receiver = mmsg.Receiver(rx, DatagramSlots(slot=2048, count=64))
    got, calls = [], 0
    while True:
        views, sources = receiver.receive()
        calls += 1
        got += [(mmsg.parse_name(s), bytes(v)) for s, v in zip(sources, views)]
        if not receiver.more:
            break
    assert got == sent
    assert calls <= 4, "64 slots a call (a chunk's free slots)"
    assert receiver.receive() == ([], []) and not receiver.more


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_receive_tells_one_source_from_two_whose_names_differ_only_in_the_port(family, host):
    """A batch from one source comes out with that source for every datagram (compared as whole name slots),
    and one datagram from a second port in the middle of it is told apart."""
    rx, a, b = udp(family, host), udp(family, host), udp(family, host)
    for i in range(40):
        (b if i == 20 else a).sendto(message(i), rx.getsockname())
    receiver = mmsg.Receiver(rx, DatagramSlots(count=64, keep=1))
    views, sources = receiver.receive()
    assert [mmsg.parse_name(s) for s in sources] == [b.getsockname() if i == 20 else a.getsockname()
                                                      for i in range(40)]
    for i in range(30):
        a.sendto(message(i), rx.getsockname())
    views, sources = receiver.receive()  # the chunk's 24 free slots, then a new chunk
    more = receiver.receive()
    assert len(views) + len(more[0]) == 30
    assert {mmsg.parse_name(s) for s in sources + more[1]} == {a.getsockname()}


def test_receive_gives_ipv6_sources_as_recvfrom_does():
    rx, tx = udp(socket.AF_INET6, "::1"), udp(socket.AF_INET6, "::1")
    tx.sendto(b"x" * 20, rx.getsockname())
    views, sources = mmsg.Receiver(rx, DatagramSlots(count=4, keep=1)).receive()
    tx.sendto(b"y", rx.getsockname())
    assert [bytes(v) for v in views] == [b"x" * 20]
    assert mmsg.parse_name(sources[0]) == rx.recvfrom(10)[1] == tx.getsockname()


def send_all(sender: mmsg.Sender, bufs) -> list[int]:
    """Call ``send`` until everything went, as the send queue does: what each call took."""
    taken = []
    while sum(taken) < len(bufs):
        taken.append(sender.send(bufs[sum(taken):]))
    return taken


def test_send_takes_views_bytes_and_read_only_buffers_each_as_one_datagram():
    rx, tx = udp(), udp()
    tx.connect(rx.getsockname())
    chunk = bytearray(message(1, 1400) + message(2, 9000))
    bufs = [memoryview(chunk)[:1400], memoryview(chunk)[1400:], message(3), memoryview(message(4))]
    assert sum(send_all(mmsg.Sender(tx, 8), bufs)) == 4
    assert [rx.recv(65536) for _ in bufs] == [bytes(b) for b in bufs]


@pytest.mark.parametrize("gso", [True, False])
def test_runs_of_one_size_go_as_one_segmentation_send_and_arrive_as_the_same_datagrams(gso):
    """Without segmentation offload (here: UDP checksums off, which it needs) the same datagrams go
    through sendmmsg."""
    rx, tx = udp(), udp()
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    tx.connect(rx.getsockname())
    if not gso:
        tx.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK: the kernel refuses to segment
    sizes = [1400] * 50 + [700] + [1400] * 3 + [100, 200, 300] + [8000] * 10 + [20000] * 4 + [60] * 2
    bufs = [message(i, n) for i, n in enumerate(sizes)]
    sender = mmsg.Sender(tx, 64)
    taken = send_all(sender, bufs)
    assert [rx.recv(65536) for _ in bufs] == bufs
    if gso:  # 46 x 1,400 B fill a packet, a shorter one may end a run, 8 x 8,000 B or 3 x 20,000 B fill one
        assert taken == [46, 5, 4, 2, 8, 2, 3, 2, 1]
    else:
        assert sender._gso_max == 0 and len(taken) <= 3


def test_gso_runs_and_starts():
    assert mmsg.gso_run([1400] * 70, 65507) == 46
    assert mmsg.gso_run([100] * 70, 65507) == 64, "at most 64 segments"
    assert mmsg.gso_run([100, 100, 50, 100], 65507) == 3, "a shorter one ends a run"
    assert mmsg.gso_run([100, 200, 200], 65507) == 0 and mmsg.gso_run([100], 65507) == 0
    assert mmsg.gso_run([100, 50], 65507) == 2
    assert mmsg.gso_run([2000, 2000], 1500) == 0, "beyond what the kernel would segment"
    assert mmsg.gso_start([1, 2, 3, 3, 3], 65507) == 2 and mmsg.gso_start([1, 2, 3], 65507) == 3
    assert mmsg.gso_start([1, 2000, 2000], 1500) == 3


def test_an_oversize_datagram_mid_batch_ends_the_call_and_the_next_call_raises_it():
    rx, tx = udp(), udp()
    tx.connect(rx.getsockname())
    sender = mmsg.Sender(tx, 8)
    bufs = [message(1), bytes(65508), message(2)]  # one byte more than a UDP/IPv4 datagram carries
    assert sender.send(bufs) == 1
    with pytest.raises(OSError) as exc:
        sender.send(bufs[1:])
    assert exc.value.errno == errno.EMSGSIZE
    assert sender.send(bufs[2:]) == 1
    assert [rx.recv(65536) for _ in range(2)] == [bufs[0], bufs[2]]


@pytest.mark.parametrize("sizes", [[100, 200] * 4, [100] * 8], ids=["sendmmsg", "gso"])
def test_a_refusal_shows_even_when_a_short_count_swallowed_it(sizes):
    """Loopback reports the refusal of datagram 1 at once; in a batch, datagram 2's send consumes it and
    the count is short. The next call sends one datagram alone, so the refusal shows one datagram later.
    A segmentation send is all or nothing: the next call shows it."""
    gone = udp()
    port = gone.getsockname()
    gone.close()
    tx = udp()
    tx.connect(port)
    sender = mmsg.Sender(tx, 8)
    bufs = [message(i, n) for i, n in enumerate(sizes)] * 3  # a stream of datagrams, 8 per call at most
    sent = 0
    with pytest.raises(ConnectionRefusedError):
        while sent < len(bufs):
            sent += sender.send(bufs[sent:])
    assert sent <= (3 if sizes[0] != sizes[1] else 8), f"{sent} went to a closed port unnoticed"


@pytest.mark.parametrize("batched", [True, False])
def test_the_udp_listener_hands_each_run_from_one_source_to_its_session_as_one_batch(monkeypatch, batched):
    monkeypatch.setattr(listener_module.mmsg, "AVAILABLE", batched)
    rx, a, b = udp(), udp(), udp()
    sessions, malformed = {}, []

    def open_session(addr, peer, templates=()):
        sessions[addr] = FakeSession(addr, peer, templates)
        return sessions[addr]
    log = Log()
    deps = ListenerDeps(Loop(), log, Throttle(log), open_session,
                        lambda err, peer: malformed.append((err.reason, peer)))
    lst = UdpListener(deps, rx, Limits())
    assert (lst.receiver is not None) is batched
    sent = {a.getsockname(): [], b.getsockname(): []}
    for i in range(100):
        src = a if i % 10 < 6 else b  # runs of 6 from a, 4 from b
        data = message(i) if i != 33 else message(i)[:-1]  # one datagram shorter than its header says
        src.sendto(data, rx.getsockname())
        if i != 33:
            sent[src.getsockname()].append(data)
    lst._on_readable(0)
    assert {addr: s.messages for addr, s in sessions.items()} == sent
    assert not any(stop for s in sessions.values() for stop in s.stops), \
        "UDP datagrams stand alone: a refused one does not end the run"
    assert malformed == [("length_mismatch", "127.0.0.1:%d" % a.getsockname()[1])]
    runs = [len(run) for s in sessions.values() for run in s.runs]
    if batched:  # 20 runs; one more where a read (64 slots) ends within one
        assert len(runs) <= 21 and max(runs) == 6
    else:
        assert runs == [1] * 99
