"""Prometheus metrics (``GET /metrics``) and a health check (``GET /healthz``) from the handlers' status
documents, served by a thread of the supervisor.

The thread only formats the last ``MetricsSnapshot`` the supervisor's loop published (``health.Watch``): a scrape
reads no file, takes no lock the supervisor waits for and never reaches a handler, so neither the
supervisor nor the traffic can be held up by it. Counters are the handlers' counters plus what earlier
processes of the same handler had counted (``health.CounterCarry``), so they never go backwards across a
handler restart or a restart in place.

Anyone who can reach the port (every local user, on loopback) can connect: the server serves at most
MAX_CONNECTIONS at once, each with a bounded request and deadline, so connections held open can cost the
supervisor neither its descriptors nor its threads.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from .ports import listen_failure
from .status import HandlerStatus, is_stale

if TYPE_CHECKING:
    from io import BufferedIOBase
    from socket import socket as Socket
    from typing import TypeAlias
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from ..config.model import Endpoint
    from ..logs import Log

    Request: TypeAlias = Socket | tuple[bytes, Socket]  # socketserver's: a connection, or a datagram and socket

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels]  # (counter name without _total, labels)

# name: (help, label names beyond stream and receiver)
COUNTERS = {
    "ipfix_balancer_messages_received": ("IPFIX messages received from exporters", ()),
    "ipfix_balancer_bytes_received": ("Bytes of IPFIX messages received from exporters", ()),
    "ipfix_balancer_messages_sent": ("Messages handed to a subreceiver's connection", ("subreceiver",)),
    "ipfix_balancer_bytes_sent": ("Bytes handed to a subreceiver's connection", ("subreceiver",)),
    "ipfix_balancer_dropped_messages": ("Messages that did not reach a subreceiver (per copy) or the dump "
                                        "file, by reason", ("subreceiver", "reason")),
    "ipfix_balancer_dropped_records": ("Data records in the dropped messages, by reason", ("subreceiver", "reason")),
    "ipfix_balancer_malformed": ("Invalid IPFIX headers (TCP: session closed; UDP: datagram dropped)", ("reason",)),
    "ipfix_balancer_rcvbuf_overflow": ("UDP datagrams the kernel dropped on the listening socket before the "
                                       "handler read them (receive buffer full)", ()),
    "ipfix_balancer_recorder_files_written": ("Dump files completed", ()),
    "ipfix_balancer_recorder_files_exported": ("Dump files delivered to an export target", ("target",)),
}
GAUGES = {
    "ipfix_balancer_handler_up": ("1 when the handler runs and its status is fresh", ()),
    "ipfix_balancer_subreceiver_up": ("1 when at least one connection to the subreceiver is up", ("subreceiver",)),
    "ipfix_balancer_exporter_sessions": ("Open exporter sessions", ()),
    "ipfix_balancer_draining_sessions": ("Sessions whose exporter left, still delivering what they hold", ()),
    "ipfix_balancer_draining_bytes": ("Bytes held by sessions whose exporter left", ()),
    "ipfix_balancer_queue_bytes": ("Bytes queued for a subreceiver, not yet handed to the kernel", ("subreceiver",)),
    "ipfix_balancer_recorder_files_pending": ("Completed dump files not yet delivered to an export target",
                                              ("target",)),
    "ipfix_balancer_handler_cpu_percent": ("CPU use of the handler process over its last status period", ()),
}
RESTARTS = "ipfix_balancer_handler_restarts"
DROPPED, DROPPED_RECORDS = "ipfix_balancer_dropped_messages", "ipfix_balancer_dropped_records"


def counter_samples(doc: HandlerStatus) -> dict[Sample, float]:
    """The counters of one status document; stream and receiver labels are added when exported."""
    out: dict[Sample, float] = {("ipfix_balancer_messages_received", ()): doc.msgs_in,
                                ("ipfix_balancer_bytes_received", ()): doc.bytes_in}
    if doc.listen.proto == "udp":
        out["ipfix_balancer_rcvbuf_overflow", ()] = doc.rcvbuf_overflow
    for reason, n in doc.malformed_by_reason.items():
        out["ipfix_balancer_malformed", (("reason", reason),)] = n
    for sub in doc.subreceivers:
        s = (("subreceiver", sub.subreceiver),)
        out["ipfix_balancer_messages_sent", s] = sub.msgs_out
        out["ipfix_balancer_bytes_sent", s] = sub.bytes_out
        for reason, n in {**sub.drops_by_reason, **_rest(sub.drops, sub.drops_by_reason)}.items():
            out["ipfix_balancer_dropped_messages", s + (("reason", reason),)] = n
        for reason, n in sub.drop_records_by_reason.items():
            out[DROPPED_RECORDS, s + (("reason", reason),)] = n
    if doc.recorder is not None:
        rec = doc.recorder
        out["ipfix_balancer_recorder_files_written", ()] = rec.files_completed
        if rec.drops:
            out["ipfix_balancer_dropped_messages", (("subreceiver", "recorder"), ("reason", "recorder"))] = rec.drops
        for t in rec.exports:
            out["ipfix_balancer_recorder_files_exported", (("target", t.target),)] = t.sent
    return out


def _rest(total: int, by_reason: dict[str, int]) -> dict[str, int]:
    """Drops not broken down by reason (a handler of a release without reasons) still count."""
    rest = total - sum(by_reason.values())
    return {"unspecified": rest} if rest > 0 else {}


def gauge_samples(doc: HandlerStatus) -> Iterator[tuple[str, Labels, float]]:
    yield "ipfix_balancer_exporter_sessions", (), doc.connections
    yield "ipfix_balancer_draining_sessions", (), doc.draining
    yield "ipfix_balancer_draining_bytes", (), doc.draining_bytes
    yield "ipfix_balancer_handler_cpu_percent", (), doc.cpu_percent
    for sub in doc.subreceivers:
        s = (("subreceiver", sub.subreceiver),)
        yield "ipfix_balancer_subreceiver_up", s, 1 if sub.state == "up" else 0
        yield "ipfix_balancer_queue_bytes", s, sub.queued_bytes
    if doc.recorder is not None:
        for t in doc.recorder.exports:
            yield "ipfix_balancer_recorder_files_pending", (("target", t.target),), t.pending


@dataclasses.dataclass(frozen=True)
class HandlerView:
    """One supervised handler as the supervisor's loop last saw it."""
    name: str
    stream: str
    index: int
    doc: HandlerStatus | None  # written by its current process; None before its first document
    restarts: int
    counters: dict[Sample, float]  # carried over earlier processes of this handler

    def fresh(self, taken: MetricsSnapshot) -> bool:
        return self.doc is not None and not is_stale(self.doc, taken.mono, taken.wall)


@dataclasses.dataclass(frozen=True)
class MetricsSnapshot:
    """What the supervisor's loop saw at ``mono`` (its monotonic clock; ``wall``: the wall clock at the same
    moment, for documents of older handlers). Freshness is judged at that moment, so a supervisor busy for a
    few seconds (waiting for a replaced handler to drain) does not make every handler look stale; the
    supervisor itself is unhealthy when it has not looked for ``max_age`` seconds."""
    mono: float
    wall: float
    max_age: float
    handlers: tuple[HandlerView, ...] = ()


def health(snapshot: MetricsSnapshot, now: float) -> tuple[bool, str]:
    """(the supervisor turns and every handler runs with a fresh status, one line per handler); ``now`` on
    the monotonic clock."""
    lines = []
    for h in snapshot.handlers:
        if h.doc is None:
            lines.append(f"{h.name} not running")
        elif not h.fresh(snapshot):
            lines.append(f"{h.name} pid {h.doc.pid} STALE: no status for "
                         f"{h.doc.age(snapshot.mono, snapshot.wall):.0f}s")
        else:
            lines.append(f"{h.name} pid {h.doc.pid} ok")
    ok = all(h.fresh(snapshot) for h in snapshot.handlers)
    at = snapshot.mono
    if now - at > snapshot.max_age:
        ok = False
        lines.append(f"supervisor: has not looked at the handlers for {now - at:.0f}s")
    return ok, "\n".join(lines) + "\n"


class _Collector:
    """Builds every family at scrape time from the latest snapshot."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily]
        families = {name: CounterMetricFamily(name, text, labels=("stream", "receiver") + extra)
                    for name, (text, extra) in COUNTERS.items()}
        families[RESTARTS] = CounterMetricFamily(RESTARTS, "Times the supervisor started the handler again "
                                                 "(died, hung)", labels=("stream", "receiver"))
        families.update({name: GaugeMetricFamily(name, text, labels=("stream", "receiver") + extra)
                         for name, (text, extra) in GAUGES.items()})
        for h in snapshot.handlers:
            base = [h.stream.lower(), str(h.index)]
            for (name, labels), value in h.counters.items():
                families[name].add_metric(base + [v for _, v in labels], value)
            families[RESTARTS].add_metric(base, h.restarts)
            families["ipfix_balancer_handler_up"].add_metric(base, 1 if h.fresh(snapshot) else 0)
            if h.doc is not None:
                for name, labels, value in gauge_samples(h.doc):
                    families[name].add_metric(base + [v for _, v in labels], value)
        yield from families.values()


MAX_CONNECTIONS = 16  # served at once; more are closed at accept (a scraper needs one)
REQUEST_SECONDS = 5.0  # to send a whole request; also the timeout of each read and write
MAX_REQUEST = 8192  # bytes of request line and headers (a scrape sends a few hundred)


class _Bounded:
    """The request stream of one connection: at most MAX_REQUEST bytes, within REQUEST_SECONDS in all. Past
    either it reads as end-of-file, which ``http.server`` answers with 400 or a close: a connection that
    trickles or never finishes its request cannot hold a thread and a descriptor for long."""

    def __init__(self, raw: BufferedIOBase, deadline: float) -> None:
        self.raw, self.left, self.deadline = raw, MAX_REQUEST, deadline

    def _take(self, read: Callable[[int], bytes], size: int | None) -> bytes:
        n = 0 if time.monotonic() > self.deadline else self.left if size is None or size < 0 else min(size, self.left)
        data = read(n) if n else b""
        self.left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        return self._take(self.raw.readline, size)

    def read(self, size: int = -1) -> bytes:
        return self._take(self.raw.read, size)

    def close(self) -> None:
        self.raw.close()


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_SECONDS  # socket timeout of every read and write: an idle connection is closed

    def setup(self) -> None:
        super().setup()
        # http.server reads the request through readline, read and close only: _Bounded has those (typeshed
        # declares rfile a BufferedIOBase, which it is not)
        self.rfile = _Bounded(self.rfile, time.monotonic() + REQUEST_SECONDS)  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s would flood the journal
        pass


class _CappedServer(ThreadingWSGIServer):
    """At most MAX_CONNECTIONS connections served at once (each a thread and a descriptor of the
    supervisor); one over the cap is closed at once. An accept that fails (descriptors exhausted) waits a
    little instead of spinning on the listening socket."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[Socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)
            raise

    def process_request(self, request: Request, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread to give the slot back
            self.slots.release()
            raise

    def process_request_thread(self, request: Request, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def read_token(path: str) -> str:
    """The first line of IPFIX_BALANCER_METRICS_TOKEN_FILE (ValueError when there is none)."""
    with open(path) as f:
        token = f.readline().strip()
    if not token:
        raise ValueError("holds no token")
    return token


class MetricsServer:
    """``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (200 / 503) on host:port."""

    def __init__(self, host: str, port: int, family: int, snapshot: Callable[[], MetricsSnapshot], token: str = ""):
        """``token``: when set, ``GET /metrics`` answers 401 without ``Authorization: Bearer <token>``."""
        registry = CollectorRegistry()
        registry.register(_Collector(snapshot))
        metrics: WSGIApplication = make_wsgi_app(registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                ok, text = health(snapshot(), time.monotonic())
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [text.encode()]
            if path == "/metrics":
                given = environ.get("HTTP_AUTHORIZATION", "").encode()
                if token and not hmac.compare_digest(given, b"Bearer " + token.encode()):
                    start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                        ("WWW-Authenticate", "Bearer")])
                    return [b"IPFIX_BALANCER_METRICS_TOKEN_FILE is set: send its token as a bearer token\n"]
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"GET /metrics or /healthz\n"]

        server_class = type("MetricsHTTPServer", (_CappedServer,), {"address_family": family})
        self.httpd: _CappedServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MetricsService:
    """The supervisor's metrics server as configured: (re)started when IPFIX_BALANCER_METRICS or its token
    changed. A failure is logged, never fatal: metrics must not be the reason traffic is not forwarded. A
    token file that cannot be read serves no metrics (rather than metrics to anyone)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot], log: Log) -> None:
        self.snapshot = snapshot
        self.log = log
        self.server: MetricsServer | None = None
        self._asked: tuple[Endpoint | None, str] | None = None  # the endpoint and token the server was asked for

    def serve(self, endpoint: Endpoint | None, token_file: str | None) -> None:
        """``endpoint``: None for no metrics."""
        try:
            token = read_token(token_file) if endpoint is not None and token_file else ""
        except (OSError, ValueError) as exc:
            self.log.error("metrics_failed", reason=f"IPFIX_BALANCER_METRICS_TOKEN_FILE {token_file}: {exc}")
            endpoint, token = None, ""  # as when no metrics are configured: no server
        if (endpoint, token) == self._asked:
            return
        self.close()
        self._asked = (endpoint, token)
        if endpoint is None:
            return
        try:
            family = socket.AF_INET6 if endpoint.ip_version == 6 else socket.AF_INET
            self.server = MetricsServer(endpoint.host, endpoint.port, family, self.snapshot, token)
        except OSError as exc:
            self.log.error("metrics_failed", reason=listen_failure("tcp", endpoint.host, endpoint.port, exc))
            return
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.log.info("metrics_serving", url=f"http://{host}:{endpoint.port}/metrics", token=bool(token))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
