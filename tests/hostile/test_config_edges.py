"""Config edge cases (issue 11 item 9, docs/configuration.md "Configuration errors"): a bad file on reload (SIGHUP) or
restart in place (SIGUSR2) is refused and logged; the balancer keeps running with the same processes."""

import signal

from ipfixkit import TcpExporter, TcpSink, extract_serials, free_port, make_stream, wait_until


def env(port: int, sink, extra: str = "") -> str:
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]=All\nIPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}\n{extra}")


def test_reload_and_restart_with_a_5000_digit_number_keep_the_service_running(balancer):
    port = free_port()
    with TcpSink() as sink:
        bal = balancer(env(port, sink))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        stream = make_stream(20, records_per_message=2)
        with TcpExporter(port) as exporter:
            exporter.send(stream[:11])
            bal.write_config(env(port, sink, f"IPFIX_FULLFLOW_QUEUE_BYTES[0]={'7' * 5000}\n"))
            bal.reload()
            refused = bal.wait_log("reload_refused")
            bal.send_signal(signal.SIGUSR2)  # restart in place with the same bad file
            restart = bal.wait_log("restart_refused")
            exporter.send(stream[11:])
            wait_until(lambda: len(extract_serials(sink.messages())) == 40, "all records", bal)
        assert bal.running and bal.handler_pid("fullflow[0]") == pid
        assert refused["problem"] == restart["problem"] == (
            f"IPFIX_FULLFLOW_QUEUE_BYTES[0]={'7' * 100!r}... (5000 characters): 5000 digits; expected an integer "
            ">= 65536 (bytes)")
        assert "Traceback" not in bal.log_text()
