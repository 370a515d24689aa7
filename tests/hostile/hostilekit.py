"""Attacks on a handler, a well-behaved exporter that measures its delay, and process figures.

Shared by ``tests/hostile`` (small sizes, assertions) and ``scripts/hostile`` (heavy sizes, a table): an
attack is a function of the balancer's port and a size.
"""

from __future__ import annotations

import contextlib
import functools
import errno
import os
import selectors
import signal
import socket
import struct
import threading
import time

import psutil

from ipfixkit import LOOPBACK, MESSAGE_HEADER, Balancer, make_stream

HEADER = MESSAGE_HEADER


def env(port: int, subs: list[int], *, proto: str = "tcp", sub_proto: str = "tcp", mode: str = "All",
        extra: str = "") -> str:
    """One fullflow receiver on 127.0.0.1:``port`` forwarding to the collectors on ``subs``."""
    sub = ",".join(f"127.0.0.1/{p}" for p in subs)
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_PORT_TYPE[0]={proto}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB[0]={sub}\n"
            f"IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]={sub_proto}\n{extra}")


class LimitedBalancer(Balancer):
    """The balancer with RLIMIT_NOFILE lowered to ``nofile`` for it and its handlers."""

    def __init__(self, *args, nofile: int, **kw):
        self.nofile = nofile
        super().__init__(*args, **kw)

    @property
    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}", *super().command]


# -- the handler process ------------------------------------------------------------------------------
class Process:
    """RSS and CPU of one handler process, sampled by ``sample()`` (the peak is what was seen)."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.pid = pid
        self.rss_start = self.rss_peak = self.rss
        self._cpu0 = self.cpu

    @property
    def rss(self) -> int:
        return self.proc.memory_info().rss

    @property
    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def sample(self) -> int:
        rss = self.rss
        self.rss_peak = max(self.rss_peak, rss)
        return rss

    def cpu_since_start(self) -> float:
        return self.cpu - self._cpu0

    @property
    def alive(self) -> bool:
        return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE


@contextlib.contextmanager
def stopped(pid: int):
    """The process is stopped (SIGSTOP) for the block, then continued: what happens meanwhile is one batch
    of events for it. Waits until it is really stopped, so that it fetched no event of the block before."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, f"process {pid} did not stop"
            time.sleep(0.01)
        yield
        time.sleep(0.2)  # loopback delivery of the last closes
    finally:
        os.kill(pid, signal.SIGCONT)


def sampling(proc: Process, stop: threading.Event, period: float = 0.05) -> threading.Thread:
    """A thread sampling ``proc`` until ``stop`` is set (the peak RSS of an attack)."""
    def run():
        while not stop.wait(period):
            with contextlib.suppress(psutil.Error):
                proc.sample()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# -- the well-behaved exporter ---------------------------------------------------------------------------
class Probe:
    """A well-behaved exporter and the collector it is mirrored to: one small message every ``period`` on
    its own TCP session; the collector (one selector thread, any number of mirror connections) notes when
    each of its messages arrives. ``worst_delay`` and ``missing`` are what an attack did to it."""

    ODID = 0x7E57

    def __init__(self, period: float = 0.02):
        self.period = period
        self.server = socket.create_server((LOOPBACK, 0), backlog=1024)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.sent: dict[int, float] = {}
        self.arrived: dict[int, float] = {}
        self.connections = 0
        self.messages = 0  # of every session mirrored here
        self._stop = threading.Event()
        self._drop = threading.Event()  # set: the collector closes every mirror connection, then clears it
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        self._sender: threading.Thread | None = None

    # collector
    def _collect(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, bytearray] = {}
        while not self._stop.is_set():
            if self._drop.is_set():
                for conn in buffers:
                    sel.unregister(conn)
                    conn.close()
                buffers.clear()
                self._drop.clear()
            for key, _ in sel.select(0.02):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self.server.accept()
                        conn.setblocking(False)
                        buffers[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ, True)
                        self.connections += 1
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    del buffers[conn]
                    continue
                self._parse(buffers[conn], data, time.monotonic())
        for conn in buffers:
            conn.close()
        sel.close()

    def _parse(self, buf: bytearray, data: bytes, now: float) -> None:
        buf += data
        pos = 0
        while len(buf) - pos >= HEADER.size:
            _, length, _, seq, odid = HEADER.unpack_from(buf, pos)
            if length < HEADER.size or len(buf) - pos < length:
                break
            self.messages += 1
            if odid == self.ODID and length > 40:  # a data message (the template message is shorter)
                self.arrived.setdefault(seq, now)
            pos += length
        del buf[:pos]

    def close_mirrors(self) -> None:
        """The collector closes every connection it has (as a collector restarting would)."""
        self._drop.set()
        while self._drop.is_set():
            time.sleep(0.01)

    # exporter
    def start(self, port: int, proto: str = "tcp") -> Probe:
        """Send to the balancer on ``port`` until ``stop``: on a TCP connection, or as datagrams from one port."""
        if proto == "tcp":
            sock = socket.create_connection((LOOPBACK, port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((LOOPBACK, port))
        messages = make_stream(20_000, 1, odid=self.ODID)  # 400 s at 20 ms
        sock.sendall(messages[0])

        def send():
            with sock:
                for msg in messages[1:]:
                    if self._sending_stop.wait(self.period):
                        return
                    seq = HEADER.unpack_from(msg)[3]
                    self.sent[seq] = time.monotonic()
                    sock.sendall(msg)

        self._sending_stop = threading.Event()
        self._sender = threading.Thread(target=send, daemon=True)
        self._sender.start()
        return self

    def stop_sending(self) -> None:
        self._sending_stop.set()
        self._sender.join(10)

    def missing(self) -> int:
        return len(set(self.sent) - set(self.arrived))

    def wait_delivered(self, timeout: float = 20) -> bool:
        """Stop sending; True when every message sent arrived within ``timeout``."""
        self.stop_sending()
        deadline = time.monotonic() + timeout
        while self.missing() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.missing()

    @property
    def worst_delay(self) -> float:
        """Seconds: the longest a message took (a missing one counts from its send time until now)."""
        now = time.monotonic()
        return max((self.arrived.get(seq, now) - t for seq, t in list(self.sent.items())), default=0.0)

    def close(self) -> None:
        if self._sender is not None:
            self.stop_sending()
        self._stop.set()
        self._collector.join(10)
        self.server.close()


# -- attacks ------------------------------------------------------------------------------------------
def connect(port: int, source: str = LOOPBACK, wait: bool = True) -> socket.socket | None:
    """One TCP connection to the balancer from ``source``; None when this process is out of descriptors.
    Without ``wait`` the handshake is left to the kernel: a handler whose backlog is full (it stopped
    accepting) would make a blocking connect time out."""
    try:
        sock = socket.socket()
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            return None
        raise
    sock.bind((source, 0))
    if wait:
        sock.connect((LOOPBACK, port))
    else:
        sock.setblocking(False)
        sock.connect_ex((LOOPBACK, port))
    return sock


def short_sessions(port: int, n: int) -> None:
    """``n`` sessions one after another: connect, one message, close."""
    message = make_stream(1, 1, odid=3)
    payload = b"".join(message)
    for _ in range(n):
        with socket.create_connection((LOOPBACK, port)) as sock:
            sock.sendall(payload)


def idle_connections(port: int, n: int, source: str = LOOPBACK, wait: bool = True) -> list[socket.socket]:
    """``n`` connections that send nothing (the caller closes them)."""
    return [s for s in (connect(port, source, wait) for _ in range(n)) if s is not None]


def trickle(socks: list[socket.socket], rounds: int, pause: float) -> None:
    """Each connection sends the header of a big message one byte per round: a message never completes."""
    head = HEADER.pack(10, 60000, 0, 0, 1)
    for i in range(rounds):
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.send(head[i % len(head):i % len(head) + 1])
        time.sleep(pause)


def health_checks(port: int, n: int) -> None:
    """Connect and close at once, ``n`` times (a load balancer's health check)."""
    for _ in range(n):
        socket.create_connection((LOOPBACK, port)).close()


def junk_datagrams(port: int, n: int, src_port: int = 0) -> None:
    """``n`` datagrams that are not IPFIX, from one source port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, src_port))
        for i in range(n):
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                s.sendto(b"junk" * (1 + i % 8), (LOOPBACK, port))


def udp_source_ports(port: int, n: int) -> None:
    """One valid message from each of ``n`` source ports: ``n`` UDP exporter sessions."""
    msgs = make_stream(1, 1, odid=5)
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for msg in msgs:
                s.sendto(msg, (LOOPBACK, port))


def template_bomb(port: int, n: int) -> None:
    """One session defining ``n`` new template ids, one tiny message each (RFC 7011 §3.4.1)."""
    out = bytearray()
    for i in range(n):
        tid = 256 + i % 65000
        odid = i // 65000
        body = struct.pack("!HHHHHH", 2, 12, tid, 1, 8, 4)  # template set: one field, sourceIPv4Address
        out += HEADER.pack(10, HEADER.size + len(body), 0, 0, odid) + body
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.sendall(out)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.settimeout(30)
            sock.recv(1)


@functools.lru_cache(maxsize=4)
def _burst(nbytes: int) -> bytes:
    return b"".join(make_stream(nbytes // 8000, target_size=8000, odid=4))


def short_burst(port: int, nbytes: int) -> None:
    """One session sending ``nbytes`` of 8000-byte data messages as fast as it can, then leaving."""
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.sendall(_burst(nbytes))
