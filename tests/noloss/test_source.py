"""BALANCER_SUB_SOURCE=exporter: UDP datagrams leave with the exporter's address and port, so collectors that
scope templates by (source address, ODID) — nfcapd and nfacctd, Debian's packages — decode two exporters
that share ODID 0 with different layouts of template 1024. Exporters bind 127.0.0.2 and 127.0.0.3."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from ipfixkit import REPO_ROOT, FULLFLOW_FIELDS, UdpSink, extract_serials, free_port, make_stream, product_env, \
    wait_until
from ipfix_balancer import config
from ipfix_balancer.config.host import LocalHost

HANDLER = "fullflow[0]"
ODID, TEMPLATE = 0, 1024
LAYOUTS = {"127.0.0.2": FULLFLOW_FIELDS, "127.0.0.3": FULLFLOW_FIELDS[::-1]}  # same id, other field order
MESSAGES, RPM = 100, 10


def env(port: int, subs: list[int], source: str, mode: str = "All") -> str:
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\nIPFIX_FULLFLOW_PORT_TYPE[0]=udp\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]=udp\n"
            f"IPFIX_FULLFLOW_BALANCER_SUB[0]={','.join(f'127.0.0.1/{p}' for p in subs)}\n"
            f"IPFIX_FULLFLOW_BALANCER_SUB_SOURCE[0]={source}\n")


def export(port: int, paced: bool = True) -> dict[str, list[int]]:
    """Both exporters send their template, then their data messages in turns (as live exporters would);
    returns the serials (octetDeltaCount) each sent. Unpaced, the handler reads and sends them in batches."""
    sent, streams, socks = {}, [], []
    for i, (host, fields) in enumerate(LAYOUTS.items()):
        first = i * MESSAGES * RPM + 1
        streams.append(make_stream(MESSAGES, RPM, odid=ODID, template_id=TEMPLATE, fields=fields, first_serial=first))
        sent[host] = list(range(first, first + MESSAGES * RPM))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        socks.append(sock)
    for n, messages in enumerate(zip(*streams)):
        for sock, msg in zip(socks, messages):
            sock.sendto(msg, ("127.0.0.1", port))
        if paced and n % 10 == 0:
            time.sleep(0.01)  # paced: no socket buffer on the way overflows
    for sock in socks:
        sock.close()
    return sent


@pytest.mark.parametrize("paced", [True, False])
def test_datagrams_carry_each_exporters_address_and_port(balancer, paced):
    port = free_port("udp")
    with UdpSink() as sink:
        bal = balancer(env(port, [sink.port], "exporter", "RoundRobin"))
        bal.wait_ready()
        sent = export(port, paced)
        assert sink.wait_messages(2 * (MESSAGES + 1), timeout=30)
        assert sink.wait_quiet(0.3, timeout=30)
    by_source: dict[str, list[int]] = {}
    for (host, _port), datagram in zip(sink.peers, sink.datagrams):
        by_source.setdefault(host, []).append(datagram)
    assert set(by_source) == set(LAYOUTS)
    for host, fields in LAYOUTS.items():
        assert extract_serials(by_source[host], TEMPLATE, fields) == sent[host]
    assert len({p for _h, p in sink.peers}) == 2  # and each exporter's port
    assert sorted(sink.datagrams) == sorted(sink.messages()), "one message per datagram"


def test_source_preservation_is_refused_without_cap_net_raw_or_for_tcp(monkeypatch):
    values = {"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920",
              "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "udp", "IPFIX_FULLFLOW_BALANCER_SUB_SOURCE[0]": "exporter"}
    monkeypatch.setattr(LocalHost, "has_cap_net_raw", lambda _self: False)
    with pytest.raises(config.ConfigError) as err:
        config.load_values(values, cpus={0})
    assert "lacks CAP_NET_RAW" in str(err.value)
    monkeypatch.setattr(LocalHost, "has_cap_net_raw", lambda _self: True)
    assert config.load_values(values, cpus={0}).receivers[0].forwarding.sub_source == "exporter"
    with pytest.raises(config.ConfigError) as err:
        config.load_values({**values, "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "tcp"}, cpus={0})
    assert "a TCP connection cannot carry another host's address" in str(err.value)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_check_config_without_cap_net_raw_says_so(tmp_path):
    path = tmp_path / "b.env"
    path.write_text(env(free_port("udp"), [9920], "exporter"))
    res = subprocess.run(["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", "--", sys.executable, "-m",
                          "ipfix_balancer", "check-config", "--config", str(path)],
                         capture_output=True, text=True, env=product_env(), cwd=REPO_ROOT, timeout=60)
    assert res.returncode == 1 and "lacks CAP_NET_RAW" in res.stdout + res.stderr, res.stdout + res.stderr


# -- nfcapd and nfacctd ---------------------------------------------------------------------------
def nfacctd_config(tmp_path, port: int) -> str:
    path = tmp_path / "nfacctd.conf"
    path.write_text(f"nfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\nplugins: print\n"
                    "aggregate: peer_src_ip\nprint_output: csv\nprint_refresh_time: 1\n"
                    f"print_output_file: {tmp_path}/nfacctd-%s.csv\nprint_output_file_append: true\n"
                    "nfacctd_time_new: true\n")
    return str(path)


def nfacctd_totals(tmp_path) -> dict[str, tuple[int, int]]:
    """peer -> (packets, bytes) summed over every print interval; each record carries 1 packet."""
    totals: dict[str, list[int]] = {}
    for path in tmp_path.glob("nfacctd-*.csv"):
        lines = path.read_text().splitlines()
        head = lines[0].split(",") if lines else []
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("PEER_SRC_IP") is None:
                continue
            total = totals.setdefault(row["PEER_SRC_IP"], [0, 0])
            total[0] += int(row["PACKETS"])
            total[1] += int(row["BYTES"])
    return {peer: tuple(t) for peer, t in totals.items()}


def nfdump_records(flowdir) -> list[tuple[str, int, int]]:
    """(exporter address, bytes, destination port) of every record nfcapd stored."""
    res = subprocess.run(["nfdump", "-R", str(flowdir), "-q", "-N", "-o", "fmt:%ra,%byt,%dp"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = []
    for line in res.stdout.splitlines():
        router, byt, dport = (f.strip() for f in line.split(","))
        out.append((router, int(byt), int(dport)))
    return out


@pytest.mark.skipif(not (shutil.which("nfcapd") and shutil.which("nfacctd")), reason="needs nfdump and pmacct")
@pytest.mark.parametrize("source", ["exporter", "balancer"])
def test_nfcapd_and_nfacctd_decode_two_exporters_sharing_an_odid(balancer, tmp_path, source):
    port, ncap, nacct = free_port("udp"), free_port("udp"), free_port("udp")
    flowdir = tmp_path / "nfcapd"
    flowdir.mkdir()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    nfcapd = subprocess.Popen(["nfcapd", "-b", "127.0.0.1", "-p", str(ncap), "-w", str(flowdir), "-t", "3600"], **quiet)
    nfacctd = subprocess.Popen(["nfacctd", "-f", nfacctd_config(tmp_path, nacct)], **quiet)  # forks its plugin
    try:
        bal = balancer(env(port, [ncap, nacct], source))
        bal.wait_ready()
        wait_until(lambda: {ncap, nacct} <= {c.laddr.port for c in psutil.net_connections("udp4")},
                   "the collectors to bind", bal)
        sent = export(port)
        bal.wait_status(HANDLER, lambda s: s["msgs_in"] == 2 * (MESSAGES + 1) and
                        all(sub["queued_bytes"] == 0 for sub in s["subreceivers"]), timeout=30)
        time.sleep(3.0)  # nfacctd prints every second
        nfcapd.send_signal(signal.SIGTERM)  # writes its file
        nfcapd.wait(20)
    finally:
        nfcapd.kill()
        os.killpg(nfacctd.pid, signal.SIGKILL)  # its core ignores SIGTERM while a plugin runs
        nfacctd.wait()
    records = nfdump_records(flowdir)
    accounted = nfacctd_totals(tmp_path)
    expected_nfdump = sorted((host, serial, 443) for host, serials in sent.items() for serial in serials)
    expected_nfacctd = {host: (len(serials), sum(serials)) for host, serials in sent.items()}
    if source == "exporter":
        assert sorted(records) == expected_nfdump, "nfcapd decodes every record of both exporters"
        assert accounted == expected_nfacctd, "nfacctd too"
    else:  # the limitation this option removes: one source, two layouts of one template, one address
        decoded = {(byt, dport) for _router, byt, dport in records}
        right = decoded & {(serial, 443) for serials in sent.values() for serial in serials}
        assert len(right) <= MESSAGES * RPM, "one exporter's records decoded with the other's template"
        assert set(accounted) == {"127.0.0.1"} and accounted["127.0.0.1"] != (2 * MESSAGES * RPM, sum(
            sum(serials) for serials in sent.values()))
