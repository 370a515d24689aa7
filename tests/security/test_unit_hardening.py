"""Issue 13, item 5: the rendered unit runs as the service user with the capabilities its configuration
needs, hardened until ``systemd-analyze security`` rates it under 3.0."""
import re
import shutil
import subprocess

import pytest

from ipfix_balancer import config, render


def exposure(unit_text: str, tmp_path) -> float:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; scripts/install-deps installs it)")
    path = tmp_path / render.UNIT
    path.write_text(unit_text)
    res = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(path)], capture_output=True,
                         text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


def test_shipped_unit_runs_as_the_service_user_without_capabilities_and_rates_under_3(tmp_path):
    text = render.unit()
    assert "User=ipfix-balancer\n" in text and "CapabilityBoundingSet=\n" in text
    assert not re.search(r"^AmbientCapabilities=", text, re.M)
    assert exposure(text, tmp_path) < 3.0


def test_a_port_below_1024_gets_only_net_bind_service(tmp_path):
    env = tmp_path / "low.env"
    env.write_text("IPFIX_FULLFLOW_PORT[0]=514\nIPFIX_CLICKSTREAM_PORT[0]=1501\n")
    caps = render.capabilities(config.load(str(env)))
    assert caps == ("CAP_NET_BIND_SERVICE",)
    text = render.unit(caps)
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in text and "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in text
    assert exposure(text, tmp_path) < 3.0
    env.write_text("IPFIX_FULLFLOW_PORT[0]=1500\n")
    assert render.capabilities(config.load(str(env))) == ()


def test_source_preservation_gets_net_raw_as_well(tmp_path):
    env = tmp_path / "raw.env"
    env.write_text("IPFIX_FULLFLOW_PORT[0]=1500\nIPFIX_FULLFLOW_PORT_TYPE[0]=udp\nIPFIX_FULLFLOW_BALANCER[0]=All\n"
                   "IPFIX_FULLFLOW_BALANCER_SUB[0]=10.0.0.2/9995\nIPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]=udp\n"
                   "IPFIX_FULLFLOW_BALANCER_SUB_SOURCE[0]=exporter\n")
    caps = render.capabilities(config.load(str(env)))
    assert caps == ("CAP_NET_RAW",)
    text = render.unit(caps)
    assert "AmbientCapabilities=CAP_NET_RAW\n" in text and "CapabilityBoundingSet=CAP_NET_RAW\n" in text
