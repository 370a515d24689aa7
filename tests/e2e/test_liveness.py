"""Liveness as operators and systemd see it: a port held by another process, a hung (SIGSTOPped) handler,
and the sd_notify messages the supervisor sends to systemd."""

import os
import socket

import psutil

from ipfixkit import TcpSink, free_port


def test_port_in_use_is_one_plain_line_naming_the_holder_and_the_handler_backs_off(balancer):
    port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    with TcpSink() as sink:
        bal = balancer(f"""
            IPFIX_FULLFLOW_PORT[0]={port}
            IPFIX_FULLFLOW_BIND[0]=127.0.0.1
            IPFIX_FULLFLOW_BALANCER[0]=RoundRobin
            IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}
            """)
        failed = bal.wait_log("listen_failed", timeout=20)
        assert failed["reason"] == (f"cannot listen on tcp 127.0.0.1:{port}: address already in use by "
                                    f"pid {os.getpid()} ({psutil.Process().name()})")
        died = [bal.wait_log(lambda line: line.get("event") == "handler_died" and line["restarts"] == n, timeout=20)
                for n in (0, 1)]
        assert [d["exit_code"] for d in died] == [75, 75]
        assert [d["restart_in"] for d in died] == [1.0, 2.0]   # backoff, not a tight loop
        holder.close()
        bal.wait_status("fullflow[0]", lambda s: s["listen"]["listening"], timeout=30)
        assert "Traceback" not in bal.log_text()
        assert not [line for line in bal.logs() if line.get("event") == "handler_crashed"]
