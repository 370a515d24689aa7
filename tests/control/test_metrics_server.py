"""control/metrics.py: the samples of a status document, and the server on a real loopback port (Prometheus
text, /healthz, the bearer token, the connection cap)."""
import http.client
import socket
import time

import pytest

from ipfix_balancer.control import metrics
from ipfix_balancer.control.metrics import HandlerView, MetricsServer, MetricsSnapshot, counter_samples, gauge_samples

from test_status import handler

SUB = (("subreceiver", "10.0.0.2/9920/tcp"),)


def test_every_subreceiver_is_labelled_by_its_subreceiver_name():
    doc = handler()
    counters = counter_samples(doc)
    assert counters["ipfix_balancer_messages_sent", SUB] == 993
    assert counters["ipfix_balancer_dropped_messages", SUB + (("reason", "stalled"),)] == 2
    assert counters["ipfix_balancer_malformed", (("reason", "bad version"),)] == 1
    gauges = {(name, labels): value for name, labels, value in gauge_samples(doc)}
    assert gauges["ipfix_balancer_subreceiver_up", SUB] == 1
    assert gauges["ipfix_balancer_subreceiver_up", (("subreceiver", "10.0.0.3/9920/tcp"),)] == 0
    assert gauges["ipfix_balancer_queue_bytes", (("subreceiver", "10.0.0.3/9920/tcp"),)] == 3000


@pytest.fixture
def serve():
    servers = []

    def start(snapshot: MetricsSnapshot, token: str = "") -> int:
        server = MetricsServer("127.0.0.1", 0, socket.AF_INET, lambda: snapshot, token)
        servers.append(server)
        return server.httpd.server_address[1]
    start.servers = servers
    yield start
    for server in servers:
        server.close()


def get(port: int, path: str, headers=None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def fresh_snapshot() -> MetricsSnapshot:
    now = time.monotonic()
    doc = handler(beat=now)
    view = HandlerView("fullflow[0]", "FULLFLOW", 0, doc, 2, counter_samples(doc))
    return MetricsSnapshot(now, time.time(), 15, (view,))


def test_metrics_are_served_in_the_prometheus_text_format(serve):
    status, text = get(serve(fresh_snapshot()), "/metrics")
    assert status == 200
    assert ('ipfix_balancer_messages_sent_total{receiver="0",stream="fullflow",subreceiver="10.0.0.2/9920/tcp"} 993.0'
            in text)
    assert 'ipfix_balancer_handler_restarts_total{receiver="0",stream="fullflow"} 2.0' in text
    assert 'ipfix_balancer_handler_up{receiver="0",stream="fullflow"} 1.0' in text


def test_healthz_answers_by_the_snapshot_and_anything_else_is_not_found(serve):
    assert get(serve(fresh_snapshot()), "/healthz") == (200, "fullflow[0] pid 4242 ok\n")
    stale = MetricsSnapshot(time.monotonic() - 60, time.time() - 60, 15, fresh_snapshot().handlers)
    status, text = get(serve(stale), "/healthz")
    assert status == 503 and "supervisor: has not looked at the handlers" in text
    assert get(serve(fresh_snapshot()), "/other")[0] == 404


def test_a_token_guards_the_metrics_not_the_health_check(serve):
    port = serve(fresh_snapshot(), token="s3cret")
    assert get(port, "/metrics")[0] == 401
    assert get(port, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(port, "/metrics", {"Authorization": "Bearer s3cret"})[0] == 200
    assert get(port, "/healthz")[0] == 200


def test_connections_over_the_cap_are_closed_and_the_server_still_answers(serve, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)
    port = serve(fresh_snapshot())
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # hold both slots
    slots = serve.servers[0].httpd.slots
    try:
        until(lambda: slots._value == 0)  # the server took them (a semaphore has no public count)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as over:
            over.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert over.recv(100) == b""  # closed at accept, unanswered
    finally:
        for s in idle:
            s.close()
    until(lambda: slots._value == 2)  # their threads saw the close
    assert get(port, "/healthz")[0] == 200


def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_token_is_the_first_line_of_its_file_and_an_empty_file_holds_none(tmp_path):
    path = tmp_path / "token"
    path.write_text("  s3cret \nsecond line\n")
    assert metrics.read_token(str(path)) == "s3cret"
    path.write_text("\n")
    with pytest.raises(ValueError):
        metrics.read_token(str(path))


def test_the_service_restarts_the_server_only_when_its_endpoint_or_token_changed(tmp_path):
    from fakes import Log
    from ipfixkit import free_port
    from ipfix_balancer.config import Endpoint
    log, token = Log(), tmp_path / "token"
    service = metrics.MetricsService(fresh_snapshot, log)
    endpoint = Endpoint("127.0.0.1", free_port(), "tcp")
    try:
        service.serve(endpoint, None)
        first = service.server
        service.serve(endpoint, None)  # a reload that changed nothing of it
        assert service.server is first and get(endpoint.port, "/metrics")[0] == 200
        token.write_text("s3cret\n")
        service.serve(endpoint, str(token))
        assert service.server is not first and get(endpoint.port, "/metrics")[0] == 401
        token.write_text("")  # a token file without a token: no metrics rather than metrics to anyone
        service.serve(endpoint, str(token))
        assert service.server is None and log.named("metrics_failed")
        service.serve(None, None)
        assert service.server is None
        assert [e["token"] for e in log.named("metrics_serving")] == [False, True]
    finally:
        service.close()
