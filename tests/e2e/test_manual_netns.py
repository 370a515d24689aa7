"""The vendor manual's own example (etc/manual-example.env), run as written on the manual's addresses.

Two network namespaces made with pyroute2 and joined by a veth pair stand for the manual's hosts: the DPI
host ("bal", 10.19.3.2/24, where the balancer and the exporter run) and the QoE collectors ("col", with the
manual's collector addresses 10.19.3.21-24/24, where one TCP sink listens on every BALANCER_SUB of the
example). Nothing leaves the two namespaces: the main namespace never gets a 10.19.3.x address or route.

The example is used verbatim except for its three BALANCER_TASKSET lines (CPUs 61-63, which this machine
lacks; validation would refuse them). In "col" the same file is refused as a loop: there the collectors'
addresses are the host's own (config.host.LocalHost asks netlink through pyroute2, in that namespace).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ipfixkit import InNs, TcpExporter, TcpSink, link_up, make_stream, manual_receivers, product_env, set_ids, \
    status_filename, wait_until

REPO = Path(__file__).resolve().parents[2]
MANUAL = REPO / "etc" / "manual-example.env"
BAL_ADDR = "10.19.3.2"
COLLECTOR_ADDRS = ("10.19.3.21", "10.19.3.22", "10.19.3.23", "10.19.3.24")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2's ip (scripts/install-deps)")


@pytest.fixture
def namespaces():
    pyroute2 = pytest.importorskip("pyroute2")
    from pyroute2 import IPRoute, netns
    tag = f"{os.getpid() % 100000}"
    bal, col = f"ipfixbal-dpi{tag}", f"ipfixbal-qoe{tag}"
    veth_bal, veth_col = f"ipfb{tag}", f"ipfc{tag}"
    try:
        netns.create(bal)
        netns.create(col)
    except OSError as err:
        for name in (bal, col):
            if name in netns.listnetns():
                netns.remove(name)
        pytest.skip(f"cannot create network namespaces here: {err}")
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=veth_bal, kind="veth", peer=veth_col)
            ipr.link("set", index=ipr.link_lookup(ifname=veth_bal)[0], net_ns_fd=bal)
            ipr.link("set", index=ipr.link_lookup(ifname=veth_col)[0], net_ns_fd=col)
        link_up(bal, veth_bal, (BAL_ADDR,))
        link_up(col, veth_col, COLLECTOR_ADDRS)
        yield bal, col, netns
    finally:
        for name in (bal, col):   # removing a namespace removes its end of the veth pair, and so the pair
            if name in netns.listnetns():
                netns.remove(name)
    with IPRoute() as ipr:
        assert not [a for a in ipr.get_addr() if (a.get_attr("IFA_ADDRESS") or "").startswith("10.19.3.")]


def _no_seq(msg: bytes) -> bytes:
    return msg[:8] + msg[12:]


def test_manual_example_delivers_to_the_manuals_collectors(namespaces, tmp_path):
    bal, col, netns = namespaces
    text = MANUAL.read_text()
    receivers = manual_receivers(text)
    config = tmp_path / "manual.env"
    config.write_text("".join(line for line in text.splitlines(keepends=True) if "_BALANCER_TASKSET[" not in line))
    assert {h for _, subs in receivers.values() for h, _ in subs} <= set(COLLECTOR_ADDRS)

    # Seen from the collectors' host the same file loops back onto its own listeners: refused.
    res = subprocess.run(["ip", "netns", "exec", col, sys.executable, "-m", "ipfix_balancer", "check-config",
                          "--config", str(config)], capture_output=True, text=True, env=product_env(), timeout=60)
    assert res.returncode == 1 and "10.19.3.21" in res.stderr and "it would loop" in res.stderr, res.stderr

    with InNs(netns, col):
        sinks = {stream: [TcpSink(port, host=host) for host, port in subs] for stream, (_, subs) in receivers.items()}
        for group in sinks.values():
            for sink in group:
                sink.__enter__()
    run_dir, log = tmp_path / "run", tmp_path / "balancer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", bal, sys.executable, "-m", "ipfix_balancer", "run",
                                 "--config", str(config), "--run-dir", str(run_dir), "--log-format", "json"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=product_env(),
                                cwd=tmp_path, start_new_session=True)
    try:
        def listening():
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
            import json
            docs = []
            for stream in receivers:
                try:
                    docs.append(json.loads((run_dir / status_filename(f"{stream.lower()}[0]")).read_text()))
                except (OSError, ValueError):
                    return None
            return all(d["listen"]["listening"] for d in docs) or None

        wait_until(listening, "the manual's three handlers to listen", timeout=30, diag=log.read_text)
        n = 12
        sent = {}
        for odid, (stream, (port, subs)) in enumerate(receivers.items(), start=1):
            template, *data = make_stream(n, 3, odid=odid)
            sent[stream] = (template, data)
            with InNs(netns, bal), TcpExporter(port, host="127.0.0.1") as exporter:
                exporter.send([template])
                # RoundRobin: the template reaches every collector; then every connection is up.
                wait_until(lambda: all(s.message_count >= 1 for s in sinks[stream]) or None,
                           f"{stream}'s template at {len(subs)} collectors", timeout=20, diag=log.read_text)
                exporter.send(data)
                wait_until(lambda: sum(s.message_count for s in sinks[stream]) >= len(subs) + n or None,
                           f"{stream}'s {n} data messages", timeout=20, diag=log.read_text)
        for stream, (template, data) in sent.items():
            group = sinks[stream]
            wanted = {_no_seq(m) for m in data}
            got = []
            for sink in group:
                messages = sink.messages()
                assert messages[0] == template, f"{stream} {sink.host}/{sink.port}: template not first"
                assert all(set_ids(m) == [256] for m in messages[1:])
                assert len(messages) - 1 == n // len(group), (stream, sink.port, len(messages))   # its share
                got += [_no_seq(m) for m in messages[1:]]
            assert sorted(got) == sorted(wanted), f"{stream}: delivered data differs from what was sent"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for group in sinks.values():
            for sink in group:
                sink.__exit__(None, None, None)
