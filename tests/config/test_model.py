"""config/model.py: the JSON hand-over to the handler, and which change needs a new handler."""
import json

import pytest

from configkit import BASE, CPUS, ETC, receiver
from ipfix_balancer.config.model import Endpoint, ReceiverConfig, live_change_impossible
from ipfix_balancer.config.parse import load


def test_json_round_trip():
    for rc in load(str(ETC / "manual-example.env"), cpus=CPUS).receivers + (receiver({
            "IPFIX_FULLFLOW_BIND[0]": "::", "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "[::1]/1/udp, 10.0.0.1/2/",
            "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled"}),):
        back = ReceiverConfig.from_json(rc.to_json())
        assert back == rc
        endpoints = (back.forwarding.subreceivers, back.recording.dump_insert_processes)
        assert all(isinstance(group, tuple) for group in endpoints)
        assert all(isinstance(e, Endpoint) for group in endpoints for e in group)
        assert back.forwarding.mode is rc.forwarding.mode


def test_json_is_nested_by_settings_group():
    doc = json.loads(receiver(BASE).to_json())
    assert set(doc) == {"stream", "index", "taskset", "listen", "forwarding", "recording", "template_limits", "limits"}
    assert doc["listen"] == {"port_type": "tcp", "bind": "0.0.0.0", "port": 1500}
    assert doc["forwarding"]["mode"] == "RoundRobin" and doc["recording"]["max_flows_per_file"] == 0


def test_from_json_reads_the_flat_form_of_earlier_releases():
    # what a supervisor before the settings groups wrote into supervisor.adopt.json
    flat = {"stream": "FULLFLOW", "index": 0, "port_type": "tcp", "port": 1500, "bind": "0.0.0.0",
            "mode": "RoundRobin", "subreceivers": [{"host": "10.0.0.2", "port": 9920, "proto": "tcp"}],
            "sub_proto": "tcp", "taskset": None, "rotate_minutes": 10, "rotate_delay_seconds": 0,
            "fw_max_queue_size": 0, "dump_insert_processes": [], "dpi_id": 0, "queue_bytes": 67108864,
            "template_refresh": 60, "dump_dir": "/var/fast_ipfix_balancer/dump/fullflow/", "balancer_auto": False,
            "spool_bytes": 0}
    assert ReceiverConfig.from_json(json.dumps(flat)) == receiver(BASE)


@pytest.mark.parametrize("change", [{"IPFIX_FULLFLOW_PORT[0]": "1600"}, {"IPFIX_FULLFLOW_PORT_TYPE[0]": "udp"},
                                    {"IPFIX_FULLFLOW_BIND[0]": "127.0.0.1"}, {"IPFIX_FULLFLOW_TASKSET[0]": "1"}])
def test_listen_or_cpu_change_needs_a_new_handler(change):
    assert live_change_impossible(receiver(BASE), receiver({**BASE, **change}))


@pytest.mark.parametrize("change", [{"IPFIX_FULLFLOW_BALANCER[0]": "All"}, {"IPFIX_FULLFLOW_QUEUE_BYTES[0]": "65536"},
                                    {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.3/9920"},
                                    {"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "1"}, {"IPFIX_FULLFLOW_DPI_ID[0]": "5"}])
def test_forwarding_and_recording_change_in_place(change):
    old, new = receiver(BASE), receiver({**BASE, **change})
    assert old != new and not live_change_impossible(old, new)


def test_recording_settings_change_only_with_recording_keys():
    old = receiver(BASE)
    assert receiver({**BASE, "IPFIX_FULLFLOW_BALANCER[0]": "All"}).recording == old.recording
    for key, value in [("FW_MAX_QUEUE_SIZE", "10"), ("SPOOL_BYTES", "1"), ("DUMP_DIR", "/d"),
                       ("DUMP_INSERT_PROCESSES", "10.0.0.9/9/tcp"), ("ROTATE_DELAY_SECONDS", "5")]:
        assert receiver({**BASE, f"IPFIX_FULLFLOW_{key}[0]": value}).recording != old.recording, key
