"""An output's connector and connection with a fake socket, a fake loop and a fake clock: what is written,
what is counted, what the lifecycle is told; failures go through the one funnel, deferred from inside a
flush. Also the recorder's ExportTarget: callbacks tolerate a closed object; a socket that cannot be
created (EMFILE at the descriptor limit) is an outage with backoff, not a crash."""

import errno
import socket
import struct

import pytest

from ipfix_balancer.config import Endpoint
from ipfix_balancer.core.lifecycle import BACKOFF_FIRST, State
from ipfix_balancer.core.sendqueue import SendQueue, SubreceiverStats
from ipfix_balancer.core.templates import EMPTY
from ipfix_balancer.core.wire import HEADER, SEQUENCE, U32
from ipfix_balancer.logs import Throttle
from ipfix_balancer.net import connection, connector
from ipfix_balancer.net.connector import PROGRESS_CHECK, Connector
from ipfix_balancer.net.loop import READ, WRITE, Loop
from ipfix_balancer.recording import export
from ipfix_balancer.recording.export import ExportTarget

from fakes import FakeClock, Log

ODID = 7


class FakeTimer:
    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


class FakeLoop:
    """What a connector asks of the loop, recorded; time is the fake clock's."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.watched: dict = {}   # socket -> (events, callback)
        self.timers: list[FakeTimer] = []
        self.turn: dict = {}

    def watch(self, sock, events, callback):
        self.watched[sock] = (events, callback)

    def unwatch(self, sock):
        self.watched.pop(sock, None)

    def close_socket(self, sock):
        self.unwatch(sock)
        sock.close()

    def call_later(self, delay, callback):
        timer = FakeTimer(self.clock.t + delay, callback)
        self.timers.append(timer)
        return timer

    def after_turn(self, key, callback):
        self.turn[key] = callback

    def end_turn(self):
        while self.turn:
            pending, self.turn = self.turn, {}
            for callback in pending.values():
                callback()

    def advance(self, seconds: float):
        """Move the clock, running each timer due on the way, in time order."""
        end = self.clock.t + seconds
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.when <= end), key=lambda t: t.when)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.clock.t = max(self.clock.t, timer.when)
            timer.callback()
        self.clock.t = end

    def event(self, sock, mask):
        self.watched[sock][1](mask)


class ScriptedSocket:
    """A socket without a descriptor whose kernel takes ``room`` bytes per send; ``outq``: bytes not yet
    acknowledged (SIOCOUTQ); ``window``: what the peer advertises (TCP_INFO)."""

    def __init__(self, family=socket.AF_INET, kind=socket.SOCK_STREAM, *_args):
        self.family, self.kind = family, kind
        self.room = 1 << 30
        self.stream = bytearray()
        self.datagrams: list[bytes] = []
        self.outq = 0
        self.window = 65535
        self.error = 0
        self.incoming = None
        self.send_error: OSError | None = None
        self.options: dict = {}
        self.closed = False
        made.append(self)

    def setblocking(self, _flag):
        pass

    def setsockopt(self, level, name, value):
        self.options[level, name] = value

    def getsockopt(self, level, name, size=None):
        if (level, name) == (socket.SOL_SOCKET, socket.SO_ERROR):
            error, self.error = self.error, 0
            return error
        info = bytearray(size)
        struct.pack_into("I", info, 228, self.window)
        return bytes(info)

    def connect_ex(self, _address):
        return errno.EINPROGRESS

    def connect(self, _address):
        pass

    def sendmsg(self, bufs):
        if self.send_error is not None:
            raise self.send_error
        data = b"".join(bytes(b) for b in bufs)[:self.room]
        if not data:
            raise BlockingIOError
        self.stream += data
        self.outq += len(data)
        return len(data)

    def send(self, data):
        if self.send_error is not None:
            raise self.send_error
        self.datagrams.append(bytes(data))
        return len(data)

    def recv(self, _size):
        if self.incoming is None:
            raise BlockingIOError
        return self.incoming

    def close(self):
        self.closed = True


made: list[ScriptedSocket] = []


@pytest.fixture
def fake(monkeypatch):
    made.clear()
    monkeypatch.setattr(connector.socket, "socket", ScriptedSocket)
    monkeypatch.setattr(connection, "unsent_bytes", lambda sock: sock.outq)
    monkeypatch.setattr(connector.mmsg, "AVAILABLE", False)
    clock = FakeClock()
    return FakeLoop(clock), clock


def message(ident: int, size: int = 40) -> memoryview:
    body = struct.pack("!HHI", 256, size - 16, ident) + b"\xab" * (size - 24)
    return memoryview(bytearray(HEADER.pack(10, size, 1700000000, 999, ODID) + body))


def output(fake, proto="tcp", rewrite_seq=True, stall=0.0, move_stalled=False, host="127.0.0.1",
           **kw) -> Connector:
    loop, clock = fake
    queue = SendQueue(SubreceiverStats(Endpoint(host, 4739, proto)), limit=1 << 20,
                      rewrite_seq=rewrite_seq, current_snapshot=lambda: EMPTY, stall=stall,
                      move_stalled=move_stalled, **kw)
    log = Log()
    return Connector(loop, queue, log, Throttle(log), clock=clock)


def connected(fake, **kw) -> tuple[Connector, ScriptedSocket]:
    """A TCP output whose handshake completed."""
    out = output(fake, **kw)
    sock = made[-1]
    fake[0].event(sock, WRITE)  # the connect finished
    return out, sock


def send(out: Connector, *idents: int, size: int = 40) -> None:
    for ident in idents:
        out.queue.enqueue((message(ident, size), ODID, 2, EMPTY))
    out.loop.end_turn()


def sequences(stream: bytes, size: int = 40) -> list[int]:
    return [U32.unpack_from(stream, i + SEQUENCE)[0] for i in range(0, len(stream), size)]


def test_a_tcp_output_connects_without_blocking_and_is_up_when_the_handshake_completes(fake):
    out = output(fake)
    sock = made[-1]
    assert (sock.family, sock.kind) == (socket.AF_INET, socket.SOCK_STREAM)
    assert out.queue.state is State.CONNECTING and fake[0].watched[sock][0] == WRITE
    assert sock.options[socket.IPPROTO_TCP, socket.TCP_NODELAY] == 1
    fake[0].event(sock, WRITE)
    assert out.queue.state is State.UP and out.life.window.largest == 65535
    assert fake[0].watched[sock][0] == READ, "up and idle: it watches for the collector closing"


def test_what_is_queued_is_written_in_one_sendmsg_renumbered_and_counted(fake):
    out, sock = connected(fake)
    send(out, 1, 2, 3)
    assert sequences(sock.stream) == [0, 2, 4], "the connection's own numbering: two records each"
    stats = out.queue.stats
    assert (stats.msgs_out, stats.bytes_out) == (3, 120) and out.queue.pending_bytes == 0
    assert out.queue.acks.held == 120, "written, not acknowledged: kept for a re-send"


def test_a_partial_write_waits_for_room_then_resumes_where_it_stopped(fake):
    out, sock = connected(fake, rewrite_seq=False)
    sock.room = 50
    send(out, 1, 2, 3)
    assert len(sock.stream) == 50 and fake[0].watched[sock][0] == READ | WRITE
    sock.room = 1 << 30
    fake[0].event(sock, WRITE)
    assert bytes(sock.stream) == b"".join(bytes(message(i)) for i in (1, 2, 3)), "byte-identical (All)"
    assert fake[0].watched[sock][0] == READ


def test_the_poll_releases_what_the_collector_acknowledged(fake):
    out, sock = connected(fake)
    send(out, 1, 2, 3)
    sock.outq = 40  # its TCP acknowledged the first two messages
    fake[0].advance(PROGRESS_CHECK)
    acks = out.queue.acks
    assert acks.acked == 80 and acks.held == 120, "a write is let go whole"
    sock.outq = 0
    fake[0].advance(PROGRESS_CHECK)
    assert acks.acked == 120 and acks.held == 0 and not acks.unacked and out.queue.budget.used == 0
    assert not [t for t in fake[0].timers if not t.cancelled], "nothing waits: no poll"


def test_a_stalled_collector_is_declared_then_reset_and_its_messages_come_back(fake):
    out, sock = connected(fake, stall=2.0, move_stalled=True)
    send(out, 1, 2, 3)  # nothing is ever acknowledged
    fake[0].advance(2.5)
    queue = out.queue
    assert queue.state is State.STALLED and out.log.named("subreceiver_stalled")
    fake[0].advance(2.5)
    assert sock.options[socket.SOL_SOCKET, socket.SO_LINGER] == struct.pack("ii", 1, 0), "a reset, not a FIN"
    assert sock.closed and queue.state is State.DOWN and out.conn is None
    assert [m[0][20:24] for m in queue.pending] == [struct.pack("!I", i) for i in (1, 2, 3)], "sent again"
    assert queue.stats.resent == 3 and queue.stats.drops == 0


def test_a_collector_that_closes_cleanly_gets_what_it_did_not_acknowledge_again_after_the_backoff(fake):
    out, sock = connected(fake)
    send(out, 1, 2)
    sock.outq = 40
    sock.incoming = b""
    fake[0].event(sock, READ)
    queue = out.queue
    assert queue.state is State.DOWN and sock.closed and queue.stats.resent == 1 and len(queue.pending) == 1
    (down,) = out.log.named("subreceiver_down")
    assert down["reason"] == "closed by subreceiver" and down["retry_in"] == BACKOFF_FIRST
    fake[0].advance(BACKOFF_FIRST)
    assert queue.state is State.CONNECTING and made[-1] is not sock


def test_a_write_error_inside_a_flush_is_handled_after_the_loop_turn(fake):
    out, sock = connected(fake)
    sock.send_error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    out.queue.enqueue((message(1), ODID, 2, EMPTY))
    out.flush()  # as core does, from inside enqueue or a dispatcher's choice
    assert out.queue.state is State.UP and not sock.closed, "not re-entrantly"
    fake[0].end_turn()
    assert out.queue.state is State.DOWN and sock.closed
    assert out.queue.stats.last_error == "Connection reset by peer" and len(out.queue.pending) == 1


def test_a_udp_output_sends_one_datagram_per_message_at_once(fake):
    out = output(fake, proto="udp")
    sock = made[-1]
    assert out.queue.state is State.UP and sock.kind == socket.SOCK_DGRAM
    send(out, 1, 2)
    assert len(sock.datagrams) == 2 and sequences(b"".join(sock.datagrams)) == [0, 2], "each renumbered"
    assert out.queue.stats.msgs_out == 2 and out.queue.acks.held == 0, "a datagram is not kept"


def test_an_ipv6_subreceiver_gets_an_ipv6_socket(fake):
    output(fake, proto="udp", host="::1")
    assert (made[-1].family, made[-1].kind) == (socket.AF_INET6, socket.SOCK_DGRAM)


def test_a_refused_udp_datagram_is_counted_and_the_output_comes_back_on_probation(fake):
    out = output(fake, proto="udp")
    sock = made[-1]
    send(out, 1)
    sock.send_error = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    send(out, 2)
    queue = out.queue
    assert queue.state is State.DOWN and queue.stats.drops_by_reason == {"refused": 1}
    assert len(queue.pending) == 1, "the refused send left message 2 queued"
    fake[0].advance(BACKOFF_FIRST)
    probe = made[-1]
    assert queue.state is State.PROBATION and len(probe.datagrams) == 1, "one datagram until the check"
    fake[0].advance(connection.UDP_CONFIRM)
    assert queue.state is State.UP and out.log.named("subreceiver_up")


def test_the_drain_deadline_closes_what_could_not_be_delivered(fake):
    out = output(fake, drain_seconds=30.0)
    sock = made[-1]
    sock.error = errno.ECONNREFUSED
    fake[0].event(sock, WRITE)  # the handshake failed: down, retrying
    send(out, 1, 2)
    out.queue.close_when_drained()
    fake[0].advance(29.0)
    assert out.queue.state is not State.CLOSED
    fake[0].advance(1.0)
    assert out.queue.state is State.CLOSED and out.closed
    assert out.queue.stats.drops_by_reason == {"drain_deadline": 2}
    (line,) = out.log.named("subreceiver_drain_deadline")
    assert line["unsent_messages"] == 2


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_callbacks_of_a_closed_output_do_nothing(proto):
    queue = SendQueue(SubreceiverStats(Endpoint("127.0.0.1", 9, proto)), limit=1 << 20, rewrite_seq=False,
                      current_snapshot=lambda: EMPTY)
    log = Log()
    out = Connector(Loop(), queue, log, Throttle(log))
    conn = out.conn
    out.close()
    assert out.conn is None and conn.sock is None
    out._on_connect(WRITE)
    conn.on_event(READ | WRITE)
    out.flush()
    assert queue.stats.msgs_out == 0 and not log.events


def no_socket(*_args, **_kw):
    raise OSError(errno.EMFILE, "Too many open files")


def test_an_output_without_a_descriptor_goes_down_and_retries(fake, monkeypatch):
    monkeypatch.setattr(connector.socket, "socket", no_socket)
    out = output(fake)
    assert out.queue.state is State.DOWN and out.queue.stats.last_error == "Too many open files"
    (timer,) = [t for t in fake[0].timers if not t.cancelled]
    assert timer.when == fake[1].t + BACKOFF_FIRST, "a retry is scheduled"
    (line,) = out.log.named("subreceiver_down")
    assert line["reason"] == "Too many open files"


def target(directory: str = "/nonexistent") -> ExportTarget:
    return ExportTarget(Loop(), directory, Endpoint("127.0.0.1", 9, "tcp"), Log(), on_delivered=print,
                        on_vanished=print, on_drop=print)


def test_callbacks_of_an_export_target_without_a_transfer_do_nothing():
    t = target()
    t._on_connect(WRITE)
    t._on_tcp(READ | WRITE)
    t._on_udp(WRITE)
    assert t.state is export.State.IDLE


def test_an_export_target_without_a_descriptor_goes_down(monkeypatch, tmp_path):
    (tmp_path / "a.ipfix").write_bytes(b"")
    t = target(str(tmp_path))
    monkeypatch.setattr(export.socket, "socket", no_socket)
    t.add("a.ipfix")
    assert t.state is export.State.DOWN and t.last_error == "Too many open files" and t.fh is None
