"""``ipfix-balancer status`` under a short load: %CPU really measured, rates from counter deltas."""

import json
import threading

from ipfixkit import TcpExporter, TcpSink, forwarding_env, free_port, make_stream, run_cli, wait_until


def test_status_shows_cpu_and_rates_of_a_busy_handler(balancer):
    port = free_port()
    with TcpSink() as a, TcpSink() as b:
        bal = balancer(forwarding_env(port, [a, b]))
        bal.wait_ready()
        batch = make_stream(2000, target_size=1400)[1:]
        stop, sent = threading.Event(), []

        def load():
            with TcpExporter(port) as exporter:
                exporter.send(make_stream(0))   # the template
                while not stop.is_set():
                    exporter.send(batch)
                    sent.append(len(batch))

        sender = threading.Thread(target=load, daemon=True)
        sender.start()
        seen = {}
        try:
            def busy():
                doc = json.loads(run_cli("status", "--json", "--run-dir", str(bal.run_dir)).stdout)
                seen.update(doc["handlers"][0])
                return seen["cpu_percent"] >= 5 and seen["rates"]["msgs_in"] >= 1000 and seen["msgs_in"] > 20_000
            wait_until(busy, "a busy handler in status --json", timeout=30)
            table = run_cli("status", "--run-dir", str(bal.run_dir)).stdout
        finally:
            stop.set()
            sender.join(30)
        rates = seen["rates"]
        assert rates["bytes_in"] > 1000 * 1400 and rates["msgs_out"] > 0 and rates["bytes_out"] > 0
        assert seen["stale"] is False and seen["restarts"] == 0 and seen["alive"] is True
        line = table.splitlines()[2].split()
        assert line[0] == "fullflow[0]" and float(line[3]) > 0     # %CPU
        assert float(line[8]) > 0 and float(line[9]) > 0 and float(line[10]) > 0   # MSG/S, MB/S IN, MB/S OUT
        print(table)
        assert wait_until(lambda: a.message_count + b.message_count >= sum(sent) + 2, "delivery", timeout=30)
