"""config/derive.py: the recorders BALANCER_AUTO implies, and the defaults that depend on the host."""
import pytest

from configkit import BASE, FakeHost, receiver
from ipfix_balancer.config.derive import auto_receivers, default_memory_bytes
from ipfix_balancer.config.model import Endpoint, Listen, Mode
from ipfix_balancer.config.parse import load_values


def auto_config(host, **extra):
    values = {
        "IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1600,10.255.255.1/1601,127.0.0.2/1602,127.0.0.1/1603",
        "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled", "IPFIX_FULLFLOW_DUMP_DIR[0]": "/d/ff",
        "IPFIX_FULLFLOW_ROTATE_DELAY_SECONDS[0]": "30", "IPFIX_FULLFLOW_DPI_ID[0]": "4",
        "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.9/9/tcp",
        "IPFIX_FULLFLOW_PORT[100]": "1700", "IPFIX_FULLFLOW_DUMP_DIR[100]": "/d/other",
    }
    values.update(extra)
    return load_values(values, cpus=range(4), host=host)


def test_auto_receivers_for_local_subreceivers():
    host = FakeHost()
    cfg = auto_config(host, **{"IPFIX_FULLFLOW_PORT[1]": "1603", "IPFIX_FULLFLOW_BIND[1]": "0.0.0.0"})
    autos = auto_receivers(cfg, host)
    # 10.255.255.1 is not local; 1603 is already a configured receiver's port; index 100 is taken
    assert [(a.name, a.listen) for a in autos] == [
        ("fullflow[101]", Listen("tcp", "127.0.0.1", 1600)), ("fullflow[102]", Listen("tcp", "127.0.0.2", 1602))]
    a = autos[0]
    fw, rec = a.forwarding, a.recording
    assert (fw.mode, fw.subreceivers, fw.balancer_auto, a.taskset) == (Mode.DISABLED, (), False, None)
    assert (rec.dump_dir, rec.rotate_seconds, rec.dpi_id) == ("/d/ff/auto-1600/", 30, 4)
    assert rec.dump_insert_processes == (Endpoint("10.0.0.9", 9, "tcp"),)


def test_auto_receivers_use_sub_proto_and_host_addresses():
    host = FakeHost(addresses={"10.255.255.1"})
    cfg = auto_config(host, **{"IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "udp"})
    assert [a.listen for a in auto_receivers(cfg, host)] == [
        Listen("udp", "127.0.0.1", 1600), Listen("udp", "10.255.255.1", 1601), Listen("udp", "127.0.0.2", 1602),
        Listen("udp", "127.0.0.1", 1603)]


def test_no_auto_receivers_unless_enabled_on_a_balancing_receiver():
    host = FakeHost(addresses={"10.255.255.1"})
    assert auto_receivers(auto_config(host, **{"IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Disabled"}), host) == []
    assert auto_receivers(load_values({"IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled"}, cpus=range(4), host=host),
                          host) == []


@pytest.mark.parametrize("memory, expected", [(None, 1 << 30), (16 << 30, 1 << 30), (2 << 30, 512 << 20)])
def test_memory_bytes_defaults_to_a_quarter_of_a_small_hosts_memory(memory, expected):
    assert default_memory_bytes(FakeHost(memory=memory)) == expected
    assert receiver(BASE, host=FakeHost(memory=memory)).limits.memory_bytes == expected
    assert receiver({**BASE, "IPFIX_FULLFLOW_MEMORY_BYTES[0]": "8388608"},
                    host=FakeHost(memory=memory)).limits.memory_bytes == 8388608


def test_the_host_is_asked_for_addresses_only_when_a_subreceiver_may_be_local():
    host = FakeHost()
    cfg = load_values({**BASE, "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled"}, cpus=range(4), host=host)
    host.asked.clear()
    assert auto_receivers(cfg, host) == [] and host.asked == ["local_addresses"]  # 10.0.0.2: is it ours?
    host.asked.clear()
    loopback = load_values({**BASE, "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled",
                            "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/9920"}, cpus=range(4), host=host)
    assert len(auto_receivers(loopback, host)) == 1 and "local_addresses" not in host.asked
