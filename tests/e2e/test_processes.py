"""Processes as operators see them: CPU pinning, names, and internal errors that end in a restart."""

import json
import os
import signal
import textwrap

import psutil

from ipfixkit import REPO_ROOT, TcpExporter, TcpSink, free_port, make_stream, run_cli


def test_handlers_are_pinned_and_named(balancer):
    ff, cs = free_port(), free_port()
    with TcpSink() as sink:
        bal = balancer(f"""
            IPFIX_FULLFLOW_PORT[0]={ff}
            IPFIX_FULLFLOW_BIND[0]=127.0.0.1
            IPFIX_FULLFLOW_BALANCER[0]=RoundRobin
            IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}
            IPFIX_FULLFLOW_BALANCER_TASKSET[0]=1
            IPFIX_CLICKSTREAM_PORT[0]={cs}
            IPFIX_CLICKSTREAM_BIND[0]=127.0.0.1
            IPFIX_CLICKSTREAM_BALANCER[0]=All
            IPFIX_CLICKSTREAM_BALANCER_SUB[0]=127.0.0.1/{sink.port}
            IPFIX_CLICKSTREAM_TASKSET[0]=0
            """)
        bal.wait_ready()
        full = psutil.Process(bal.handler_pid("fullflow[0]"))
        click = psutil.Process(bal.handler_pid("clickstream[0]"))
        assert full.cpu_affinity() == [1] and click.cpu_affinity() == [0]
        # what `ps -ax -o %cpu,psr,comm | grep ipfix` shows
        assert (full.name(), click.name(), psutil.Process(bal.pid).name()) == \
            ("ipfix-fullflow", "ipfix-click", "ipfix-balancer")
        doc = json.loads(run_cli("status", "--json", "--run-dir", str(bal.run_dir)).stdout)
        psr = {h["name"]: h["psr"] for h in doc["handlers"]}
        assert psr == {"fullflow[0]": 1, "clickstream[0]": 0}


FAULT = '''
"""Test-only fault injection, loaded by every Python process of the balancer through PYTHONPATH: the
template tracker raises on ODID 666, an "impossible" internal error in the middle of the data path."""
import ipfix_balancer.core.templates as templates

_inspect = templates.TemplateTracker.inspect


def inspect(self, msg):
    result = _inspect(self, msg)
    if result[0] == 666:
        raise RuntimeError("injected internal error")
    return result


templates.TemplateTracker.inspect = inspect
'''


def test_internal_error_is_logged_once_and_the_handler_exits_nonzero_and_restarts(balancer, tmp_path):
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(textwrap.dedent(FAULT))
    port = free_port()
    with TcpSink() as sink:
        bal = balancer(f"""
            IPFIX_FULLFLOW_PORT[0]={port}
            IPFIX_FULLFLOW_BIND[0]=127.0.0.1
            IPFIX_FULLFLOW_BALANCER[0]=RoundRobin
            IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}
            """, env={"PYTHONPATH": f"{fault}:{REPO_ROOT}"})
        bal.wait_ready()
        first = bal.handler_pid("fullflow[0]")
        with TcpExporter(port) as exporter:
            exporter.send(make_stream(3, odid=666))
            died = bal.wait_log("handler_died")
        crash = [line for line in bal.logs() if line.get("event") == "handler_crashed"]
        assert len(crash) == 1 and "injected internal error" in crash[0]["exception"]
        assert "Traceback" in crash[0]["exception"]
        assert died["exit_code"] == 70 and died["handler"] == "fullflow[0]"
        bal.wait_status("fullflow[0]", lambda s: s["pid"] != first and s["listen"]["listening"], timeout=20)
        stream = make_stream(5, odid=1)
        with TcpExporter(port) as exporter:
            exporter.send(stream)
        assert sink.wait_messages(len(stream), timeout=15)


def test_ctrl_c_stops_everything_quietly(balancer):
    """A terminal's Ctrl-C is SIGINT to the foreground process group: only the supervisor is in it, and it
    stops the handlers and the console in order. No "Aborted!", no error line, exit 0."""
    port, console = free_port(), free_port()
    bal = balancer(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
                   f"IPFIX_FULLFLOW_BALANCER[0]=All\nIPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{free_port()}\n"
                   f"IPFIX_BALANCER_CONSOLE=127.0.0.1/{console}\n")
    bal.wait_ready()
    bal.wait_log("console_started")
    children = psutil.Process(bal.pid).children()
    assert sorted(c.name() for c in children) == ["ipfix-console", "ipfix-fullflow"]  # `ps -o comm | grep ipfix`
    assert all(os.getpgid(c.pid) != bal.pid for c in children)
    os.killpg(bal.pid, signal.SIGINT)
    assert bal.proc.wait(30) == 0, bal.log_tail()
    assert "Aborted!" not in bal.log_text()
    assert [line for line in bal.logs() if line.get("level") == "error"] == []
    assert bal.wait_log("supervisor_stopped")["clean"] is True
