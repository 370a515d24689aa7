"""GET /metrics (parsed with prometheus_client's own parser) against what an exporter sent, across a handler
crash and a restart in place; GET /healthz."""

import os
import signal
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ipfixkit import TcpSink, forwarding_env, free_port, make_stream, run_cli, tcp_send, wait_until


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}"""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_match_what_the_exporter_sent_and_never_go_backwards(balancer):
    port, metrics = free_port(), free_port()
    with TcpSink() as a, TcpSink() as b:
        bal = balancer(forwarding_env(port, [a, b], extra=f"IPFIX_BALANCER_METRICS=127.0.0.1/{metrics}\n"))
        bal.wait_ready()
        ff = (("receiver", "0"), ("stream", "fullflow"))
        sub = {s: ff + (("subreceiver", f"127.0.0.1/{s.port}/tcp"),) for s in (a, b)}
        received = ("ipfix_balancer_messages_received_total", ff)

        first = make_stream(40, target_size=1400)
        tcp_send(port, first)
        m = wait_until(lambda: (s := scrape(metrics)).get(received) == len(first) and s, "first batch in /metrics", bal)
        assert m["ipfix_balancer_bytes_received_total", ff] == sum(map(len, first))
        assert wait_until(lambda: a.wait_quiet() and b.wait_quiet(), "sinks quiet", bal)
        m = wait_until(lambda: (s := scrape(metrics))["ipfix_balancer_messages_sent_total", sub[a]]
                       + s["ipfix_balancer_messages_sent_total", sub[b]] == a.message_count + b.message_count and s,
                       "sent counters", bal)
        for s in (a, b):
            assert m["ipfix_balancer_messages_sent_total", sub[s]] == s.message_count > 0
            assert m["ipfix_balancer_bytes_sent_total", sub[s]] == s.bytes_received
            assert m["ipfix_balancer_subreceiver_up", sub[s]] in (0, 1)
            assert m["ipfix_balancer_queue_bytes", sub[s]] == 0
        assert m["ipfix_balancer_handler_restarts_total", ff] == 0 and m["ipfix_balancer_handler_up", ff] == 1
        assert m["ipfix_balancer_exporter_sessions", ff] == 0
        tcp_send(port, [b"\x00\x09\x00\x10" + bytes(12)])   # NetFlow v9, not IPFIX: counted, session closed
        malformed = ("ipfix_balancer_malformed_total", tuple(sorted(ff + (("reason", "bad_version"),))))
        m = wait_until(lambda: (s := scrape(metrics)).get(malformed) == 1 and s, "malformed by reason", bal)
        assert m[received] == len(first)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == f"fullflow[0] pid {bal.handler_pid('fullflow[0]')} ok\n".encode()

        # a crash: the new process counts from 0, the exported counters carry on
        crashed = bal.handler_pid("fullflow[0]")
        os.kill(crashed, signal.SIGKILL)
        bal.wait_status("fullflow[0]", lambda s: s["pid"] != crashed and s["listen"]["listening"], timeout=20)
        second = make_stream(10, target_size=200)
        tcp_send(port, second)
        total = len(first) + len(second)
        m = wait_until(lambda: (s := scrape(metrics)).get(received) == total and s, "counters carried over", bal)
        assert m["ipfix_balancer_bytes_received_total", ff] == sum(map(len, first + second))
        assert m["ipfix_balancer_handler_restarts_total", ff] == 1

        # a restart in place: a new supervisor process image and new handlers, the counters still carry on
        before = bal.handler_pid("fullflow[0]")
        assert run_cli("restart", "--config", bal.config_path, "--run-dir", bal.run_dir).returncode == 0
        bal.wait_status("fullflow[0]", lambda s: s["pid"] != before and s["listen"]["listening"], timeout=20)
        third = make_stream(5, target_size=200)
        tcp_send(port, third)
        m = wait_until(lambda: (s := scrape(metrics)).get(received) == total + len(third) and s, "after restart", bal)
        assert m["ipfix_balancer_handler_restarts_total", ff] == 1 == bal.supervisor()["handlers"][0]["restarts"]
        assert m["ipfix_balancer_messages_sent_total", sub[a]] + m["ipfix_balancer_messages_sent_total", sub[b]] \
            >= total + len(third)
