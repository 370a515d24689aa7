"""config.py: the manual's example, every validation message, defaults and the JSON hand-over."""
import json
import pickle
import socket
from pathlib import Path

import pytest

from ipfix_balancer import config
from ipfix_balancer.config import (Config, ConfigError, Endpoint, Forwarding, Listen, Mode, ReceiverConfig, Recording,
                                   load, parse, resolve_path)

ETC = Path(__file__).resolve().parent.parent / "etc"
CPUS = range(64)


def problems(values, cpus=CPUS):
    """The problems parse() reports for values (which must be invalid)."""
    with pytest.raises(ConfigError) as err:
        parse(values, cpus=cpus)
    return err.value.problems


def one_problem(values, cpus=CPUS):
    found = problems(values, cpus)
    assert len(found) == 1, found
    return found[0]


def receiver(values, cpus=CPUS):
    (rc,) = parse(values, cpus=cpus).receivers
    return rc


# --- the manual's example and the shipped file ---------------------------------------------------------------

def test_manual_example_parses_to_three_receivers():
    cfg = load(str(ETC / "manual-example.env"), cpus=CPUS)
    assert isinstance(cfg, Config) and cfg.warnings == ()
    full, click, dns = cfg.receivers
    assert [(r.stream, r.index, r.listen.port, r.listen.port_type, r.forwarding.mode, r.forwarding.sub_proto,
             r.taskset) for r in cfg.receivers] == [
        ("FULLFLOW", 0, 1500, "tcp", Mode.ROUND_ROBIN, "tcp", 61),
        ("CLICKSTREAM", 0, 1501, "tcp", Mode.ROUND_ROBIN, "tcp", 62),
        ("DNSFLOW", 0, 1101, "tcp", Mode.ROUND_ROBIN, "tcp", 63),
    ]
    assert full.forwarding.subreceivers == (Endpoint("10.19.3.21", 1500, "tcp"), Endpoint("10.19.3.23", 1600, "tcp"),
                                 Endpoint("10.19.3.24", 1600, "tcp"))
    assert click.forwarding.subreceivers == (Endpoint("10.19.3.21", 1501, "tcp"), Endpoint("10.19.3.23", 1601, "tcp"))
    assert dns.forwarding.subreceivers == (Endpoint("10.19.3.21", 1101, "tcp"), Endpoint("10.19.3.23", 2101, "tcp"))
    assert (full.name, full.proc_name) == ("fullflow[0]", "ipfix-fullflow")


def test_manual_example_on_a_two_cpu_host_reports_the_three_tasksets():
    with pytest.raises(ConfigError) as err:
        load(str(ETC / "manual-example.env"), cpus={0, 1})
    assert err.value.problems == [
        f"IPFIX_{s}_BALANCER_TASKSET[0]='{cpu}': expected a CPU this host has (0-1)"
        for s, cpu in (("FULLFLOW", 61), ("CLICKSTREAM", 62), ("DNSFLOW", 63))
    ]


def test_shipped_example_runs_on_any_host():
    cfg = load(str(ETC / "fast_ipfix_balancer.env"), cpus={0})
    assert [(r.stream, r.listen.port, r.forwarding.mode, r.taskset) for r in cfg.receivers] == [
        ("FULLFLOW", 1500, Mode.ROUND_ROBIN, None), ("CLICKSTREAM", 1501, Mode.ROUND_ROBIN, None),
        ("DNSFLOW", 1101, Mode.ROUND_ROBIN, None)]
    assert all(e.host == "127.0.0.1" for r in cfg.receivers for e in r.forwarding.subreceivers)
    assert cfg.metrics == Endpoint("127.0.0.1", 9464, "tcp")


# --- defaults ------------------------------------------------------------------------------------------------

def test_defaults():
    cfg = parse({"IPFIX_FULLFLOW_PORT_TYPE[0]": "tcp", "IPFIX_CLICKSTREAM_BALANCER": "Disabled",
                 "IPFIX_DNSFLOW_DPI_ID[0]": "-1"}, cpus=CPUS)
    full, click, dns = cfg.receivers
    assert full == ReceiverConfig(
        stream="FULLFLOW", index=0, taskset=None, listen=Listen(port_type="tcp", bind="0.0.0.0", port=1500),
        forwarding=Forwarding(mode=Mode.DISABLED, subreceivers=(), sub_proto="tcp", queue_bytes=67108864,
                              template_refresh=60, balancer_auto=False),
        recording=Recording(rotate_minutes=10, rotate_delay_seconds=0, max_flows_per_file=0,
                            dump_insert_processes=(), dpi_id=0, dump_dir="/var/fast_ipfix_balancer/dump/fullflow/",
                            spool_bytes=0))
    rec = click.recording
    assert (click.listen.port, rec.rotate_minutes, rec.rotate_seconds, rec.dump_dir) == (
        1501, 12, 720, "/var/fast_ipfix_balancer/dump/clickstream/")
    assert (dns.listen.port, dns.recording.rotate_minutes, dns.recording.dpi_id) == (1502, 10, 0)
    assert cfg.path == "<memory>" and cfg.warnings == ()


def test_receivers_exist_only_when_named_and_are_sorted():
    cfg = parse({"IPFIX_DNSFLOW_PORT[0]": "2000", "IPFIX_FULLFLOW_PORT[3]": "2003",
                 "IPFIX_FULLFLOW_PORT[1]": "2001"}, cpus=CPUS)
    assert [r.name for r in cfg.receivers] == ["fullflow[1]", "fullflow[3]", "dnsflow[0]"]


def test_index_above_zero_gets_own_dump_dir_proc_name_and_position_dpi_id():
    cfg = parse({"IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_PORT[1]": "1600",
                 "IPFIX_FULLFLOW_PORT[2]": "1700", "IPFIX_FULLFLOW_DPI_ID[2]": "7"}, cpus=CPUS)
    f0, f1, f2 = cfg.receivers
    assert f1.recording.dump_dir == "/var/fast_ipfix_balancer/dump/fullflow/1/"
    assert f1.proc_name == "ipfix-fullflow1"
    assert (f0.recording.dpi_id, f1.recording.dpi_id, f2.recording.dpi_id) == (0, 1, 7)


def test_key_without_index_means_index_zero():
    rc = receiver({"IPFIX_FULLFLOW_PORT": "1600"})
    assert (rc.index, rc.listen.port) == (0, 1600)


def test_empty_value_means_default():
    rc = receiver({"IPFIX_FULLFLOW_PORT[0]": "", "IPFIX_FULLFLOW_BALANCER_TASKSET[0]": None})
    assert (rc.listen.port, rc.taskset) == (1500, None)


def test_rotate_delay_seconds_overrides_minutes():
    assert receiver({"IPFIX_FULLFLOW_ROTATE_DELAY_SECONDS[0]": "30"}).recording.rotate_seconds == 30


def test_other_keys_and_environment_variables_are_ignored():
    rc = receiver({"PATH": "/bin", "IPFIX_BALANCER_CONFIG": "/x.env", "IPFIX_BALANCER_RUN_DIR": "/run/x",
                   "IPFIX_FULLFLOW_PORT[0]": "1500"})
    assert rc.listen.port == 1500


def test_empty_config_warns():
    assert parse({}, path="/e.env", cpus=CPUS).warnings == (
        "/e.env: no IPFIX_<STREAM>_<PARAM>[i] keys; no receiver is configured",)


# --- value syntax --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("word, mode", [("roundrobin", Mode.ROUND_ROBIN), ("ALL", Mode.ALL),
                                        ("disabled", Mode.DISABLED), ("RoundRobin", Mode.ROUND_ROBIN)])
def test_balancer_is_case_insensitive(word, mode):
    assert receiver({"IPFIX_FULLFLOW_BALANCER[0]": word,
                     "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920"}).forwarding.mode \
        is mode


def test_protocols_and_switches_are_case_insensitive():
    rc = receiver({"IPFIX_FULLFLOW_PORT_TYPE[0]": "UDP", "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "Udp",
                   "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920", "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "ENABLED",
                   "IPFIX_FULLFLOW_BALANCER[0]": "all"})
    assert (rc.listen.port_type, rc.forwarding.sub_proto, rc.forwarding.balancer_auto) == ("udp", "udp", True)
    assert rc.forwarding.subreceivers == (Endpoint("10.0.0.2", 9920, "udp"),)


def test_address_lists_allow_spaces_and_a_trailing_comma():
    rc = receiver({"IPFIX_FULLFLOW_BALANCER[0]": "All",
                   "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920, 10.0.0.3/3440 ,",
                   "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.2/9920/tcp, 10.0.0.3/3440/, 10.0.0.4/5/UDP"})
    assert rc.forwarding.subreceivers == (Endpoint("10.0.0.2", 9920, "tcp"), Endpoint("10.0.0.3", 3440, "tcp"))
    assert rc.recording.dump_insert_processes == (Endpoint("10.0.0.2", 9920, "tcp"), Endpoint("10.0.0.3", 3440, "tcp"),
                                        Endpoint("10.0.0.4", 5, "udp"))


def test_ipv6_in_brackets():
    rc = receiver({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BIND[0]": "::",
                   "IPFIX_FULLFLOW_BALANCER_SUB[0]": "[::1]/9920, [2001:DB8:0::5]/9921",
                   "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "[2001:db8::7]/3440/udp"})
    assert rc.listen.bind == "::"
    assert rc.forwarding.subreceivers == (Endpoint("::1", 9920, "tcp"), Endpoint("2001:db8::5", 9921, "tcp"))
    assert [str(e) for e in rc.forwarding.subreceivers] == ["[::1]/9920/tcp", "[2001:db8::5]/9921/tcp"]
    assert rc.forwarding.subreceivers[0].family == socket.AF_INET6
    assert rc.recording.dump_insert_processes == (Endpoint("2001:db8::7", 3440, "udp"),)
    assert (str(Endpoint("10.0.0.2", 9920, "tcp")), Endpoint("10.0.0.2", 9920, "tcp").family) == (
        "10.0.0.2/9920/tcp", socket.AF_INET)


def test_taskset_alias():
    assert receiver({"IPFIX_FULLFLOW_TASKSET[0]": "3"}).taskset == 3
    assert receiver({"IPFIX_FULLFLOW_TASKSET[0]": "3", "IPFIX_FULLFLOW_BALANCER_TASKSET[0]": "3"}).taskset == 3
    msg = one_problem({"IPFIX_FULLFLOW_BALANCER_TASKSET[0]": "3", "IPFIX_FULLFLOW_TASKSET[0]": "4"})
    assert msg == ("IPFIX_FULLFLOW_TASKSET[0]='4': conflicts with IPFIX_FULLFLOW_BALANCER_TASKSET[0]='3', which "
                   "sets the same parameter; expected only one of them")


def test_index_zero_written_two_ways_with_different_values():
    msg = one_problem({"IPFIX_FULLFLOW_PORT": "1500", "IPFIX_FULLFLOW_PORT[0]": "1600"})
    assert msg.startswith("IPFIX_FULLFLOW_PORT[0]='1600': conflicts with IPFIX_FULLFLOW_PORT='1500'")


# --- one test per validation case: key as written, bad value, expectation -------------------------------------

def test_unknown_key_suggests_the_right_one():
    msg = one_problem({"IPFIX_FULLFLOW_PROT[0]": "1500"})
    assert msg.startswith("IPFIX_FULLFLOW_PROT[0]='1500': unknown key; expected IPFIX_<FULLFLOW|CLICKSTREAM|DNSFLOW>")
    assert "did you mean IPFIX_FULLFLOW_PORT[0]?" in msg


@pytest.mark.parametrize("key", ["IPFIX_FULFLOW_PORT[0]", "ipfix_fullflow_port[0]", "IPFIX_FULLFLOW_PORT[a]",
                                 "IPFIX_FULLFLOW_PORT[0]x", "IPFIX_SOMETHING"])
def test_unknown_keys_are_errors_not_defaults(key):
    msg = one_problem({key: "1500"})
    assert msg.startswith(f"{key}='1500': unknown key; expected ")


def test_non_integer():
    assert one_problem({"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "ten"}) == (
        "IPFIX_FULLFLOW_ROTATE_MINUTES[0]='ten': expected an integer >= 0 (minutes)")


@pytest.mark.parametrize("value", ["70000", "0", "-1", "1_500", "15.0"])
def test_port_out_of_range(value):
    assert one_problem({"IPFIX_FULLFLOW_PORT[0]": value}) == (
        f"IPFIX_FULLFLOW_PORT[0]={value!r}: expected a port number 1..65535")


def test_port_required_above_index_zero():
    assert one_problem({"IPFIX_FULLFLOW_BIND[2]": "0.0.0.0"}) == (
        "IPFIX_FULLFLOW_PORT[2] is required for receiver fullflow[2]: expected a port number 1..65535 "
        "(only index 0 has a default port)")


def test_same_listening_port_names_both_keys():
    assert one_problem({"IPFIX_FULLFLOW_PORT[0]": "1501", "IPFIX_CLICKSTREAM_PORT_TYPE[0]": "tcp"}) == (
        "IPFIX_CLICKSTREAM_PORT[0] (default 1501): tcp port 1501 is already used by IPFIX_FULLFLOW_PORT[0]='1501'; "
        "expected a listening port unique to each receiver")
    msg = one_problem({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_PORT[0]": "1600"})
    assert "IPFIX_DNSFLOW_PORT[0]='1600'" in msg and "IPFIX_FULLFLOW_PORT[0]='1600'" in msg


def test_same_port_on_other_protocol_or_other_address_is_allowed():
    parse({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_PORT_TYPE[0]": "udp"},
          cpus=CPUS)
    parse({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_FULLFLOW_BIND[0]": "10.0.0.1",
           "IPFIX_DNSFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_BIND[0]": "10.0.0.2"}, cpus=CPUS)
    assert "already used" in one_problem({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_FULLFLOW_BIND[0]": "10.0.0.1",
                                          "IPFIX_DNSFLOW_PORT[0]": "1600"})


@pytest.mark.parametrize("mode", ["RoundRobin", "All"])
def test_balancing_without_subreceivers(mode):
    assert one_problem({"IPFIX_FULLFLOW_BALANCER[0]": mode, "IPFIX_FULLFLOW_BALANCER_SUB[0]": " , "}) == (
        f"IPFIX_FULLFLOW_BALANCER_SUB[0]=',': IPFIX_FULLFLOW_BALANCER[0] is {mode}; "
        "expected at least one subreceiver host/port, e.g. 10.0.0.2/9920")


def test_balancing_without_subreceiver_key():
    msg = one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All"})
    assert msg.startswith("IPFIX_FULLFLOW_BALANCER_SUB[0]='': IPFIX_FULLFLOW_BALANCER[0] is All; expected at least")


@pytest.mark.parametrize("item, why", [
    ("10.0.0.2", ""),
    ("10.0.0.2/9920/tcp", ": the protocol goes in IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0] (host/port/proto is the "
                          "syntax of DUMP_INSERT_PROCESSES)"),
    ("10.0.0.2/99999", ": port '99999' is not a port number 1..65535"),
    ("10.0.0.2/x", ": port 'x' is not a port number 1..65535"),
    ("::1/9920", ": IPv6 hosts go in brackets, IPv4 hosts do not"),
    ("[10.0.0.2]/9920", ": IPv6 hosts go in brackets, IPv4 hosts do not"),
    ("10.0.0.256/9920", ": '10.0.0.256' is not a valid IP address"),
    ("collector-1/9920", ": 'collector-1' is not an IP address (hostnames are not resolved: the balancer must not "
                         "depend on DNS at start)"),
])
def test_bad_subreceiver_item(item, why):
    value = f"10.0.0.9/1, {item}"
    expected = "host/port, e.g. 10.0.0.2/9920 or [::1]/9920"
    assert one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": value}) == (
        f"IPFIX_FULLFLOW_BALANCER_SUB[0]={value!r}: item {item!r}{why}{';' if why else ':'} expected {expected}")


def test_hostname_is_an_error_with_a_clear_message():
    msg = one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "qoe1.example/1500"})
    assert msg == ("IPFIX_FULLFLOW_BALANCER_SUB[0]='qoe1.example/1500': item 'qoe1.example/1500': 'qoe1.example' "
                   "is not an IP address (hostnames are not resolved: the balancer must not depend on DNS at start); "
                   "expected host/port, e.g. 10.0.0.2/9920 or [::1]/9920")


def test_bad_export_item():
    assert one_problem({"IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.2/9920/sctp"}) == (
        "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]='10.0.0.2/9920/sctp': item '10.0.0.2/9920/sctp': proto 'sctp' is "
        "not tcp or udp; expected host/port/proto, e.g. 10.0.0.2/9920/tcp or [::1]/9920/udp (empty proto = tcp)")


def test_bad_bind():
    assert one_problem({"IPFIX_FULLFLOW_BIND[0]": "localhost"}) == (
        "IPFIX_FULLFLOW_BIND[0]='localhost': 'localhost' is not an IP address (hostnames are not resolved: the "
        "balancer must not depend on DNS at start); expected an IP address such as 0.0.0.0 or ::")
    assert one_problem({"IPFIX_FULLFLOW_BIND[0]": "10.0.0.300"}) == (
        "IPFIX_FULLFLOW_BIND[0]='10.0.0.300': '10.0.0.300' is not a valid IP address; expected an IP address "
        "such as 0.0.0.0 or ::")


def test_duplicate_subreceiver():
    value = "10.0.0.2/9920, 10.0.0.3/1, 10.0.0.2/9920"
    assert one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": value}) == (
        f"IPFIX_FULLFLOW_BALANCER_SUB[0]={value!r}: item '10.0.0.2/9920': listed twice; expected each address once")


def test_duplicate_export_counts_the_default_proto():
    msg = one_problem({"IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.2/1/, 10.0.0.2/1/TCP"})
    assert "item '10.0.0.2/1/TCP': listed twice" in msg


def test_taskset_outside_the_cpus():
    assert one_problem({"IPFIX_FULLFLOW_TASKSET[0]": "8"}, cpus={0, 1, 2, 3, 6}) == (
        "IPFIX_FULLFLOW_TASKSET[0]='8': expected a CPU this host has (0-3,6)")
    assert one_problem({"IPFIX_FULLFLOW_TASKSET[0]": "0-3"}) == (
        "IPFIX_FULLFLOW_TASKSET[0]='0-3': expected a CPU number >= 0")


def test_taskset_defaults_to_this_hosts_cpus(monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(config.os, "cpu_count", lambda: 4)
    assert receiver({"IPFIX_FULLFLOW_TASKSET[0]": "3"}, cpus=None).taskset == 3
    assert one_problem({"IPFIX_FULLFLOW_TASKSET[0]": "4"}, cpus=None).endswith("expected a CPU this host has (0-3)")


@pytest.mark.parametrize("param, value, expected", [
    ("ROTATE_MINUTES", "-1", "an integer >= 0 (minutes)"),
    ("ROTATE_DELAY_SECONDS", "-5", "an integer >= 0 (seconds; 0 = use ROTATE_MINUTES)"),
    ("FW_MAX_QUEUE_SIZE", "-1", "an integer >= 0 (flows; 0 = off)"),
    ("DPI_ID", "-2", "an integer -1..4294967295 (-1 = the receiver's position in its stream)"),
    ("QUEUE_BYTES", "65535", "an integer >= 65536 (bytes)"),
    ("TEMPLATE_REFRESH", "0", "an integer >= 1 (seconds)"),
])
def test_number_below_its_minimum(param, value, expected):
    assert one_problem({f"IPFIX_CLICKSTREAM_{param}[0]": value}) == (
        f"IPFIX_CLICKSTREAM_{param}[0]={value!r}: expected {expected}")


@pytest.mark.parametrize("param, value, allowed", [
    ("BALANCER", "round-robin", "RoundRobin, All, Disabled"),
    ("PORT_TYPE", "sctp", "tcp, udp"),
    ("BALANCER_SUB_PROTO", "tpc", "tcp, udp"),
    ("BALANCER_AUTO", "yes", "Enabled, Disabled"),
])
def test_bad_word_lists_the_allowed_values(param, value, allowed):
    assert one_problem({f"IPFIX_DNSFLOW_{param}[0]": value}) == (
        f"IPFIX_DNSFLOW_{param}[0]={value!r}: expected one of {allowed} (any case)")


def test_spool_bytes_defaults_to_no_limit_and_is_validated():
    assert receiver({"IPFIX_FULLFLOW_PORT[0]": "1500"}).recording.spool_bytes == 0
    rc = receiver({"IPFIX_FULLFLOW_SPOOL_BYTES[0]": "1073741824"})
    assert rc.recording.spool_bytes == 1 << 30 and ReceiverConfig.from_json(rc.to_json()) == rc
    assert one_problem({"IPFIX_FULLFLOW_SPOOL_BYTES[0]": "-1"}) == (
        "IPFIX_FULLFLOW_SPOOL_BYTES[0]='-1': expected an integer >= 0 (bytes of completed dump files kept; "
        "0 = no limit)")
    assert one_problem({"IPFIX_FULLFLOW_SPOOL_BYTES[0]": "1G"}).startswith("IPFIX_FULLFLOW_SPOOL_BYTES[0]='1G': ")


def test_relative_dump_dir():
    assert one_problem({"IPFIX_FULLFLOW_DUMP_DIR[0]": "dump/ff"}) == (
        "IPFIX_FULLFLOW_DUMP_DIR[0]='dump/ff': expected an absolute directory path")


def test_recording_receivers_cannot_share_a_dump_dir():
    msg = one_problem({"IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_PORT[1]": "1600",
                       "IPFIX_FULLFLOW_DUMP_DIR[1]": "/var/fast_ipfix_balancer/dump/fullflow"})
    assert msg == ("IPFIX_FULLFLOW_DUMP_DIR[1]='/var/fast_ipfix_balancer/dump/fullflow': directory already used by "
                   "IPFIX_FULLFLOW_DUMP_DIR[0] (default /var/fast_ipfix_balancer/dump/fullflow/); expected a dump "
                   "directory of its own for each recording receiver")


def test_subreceiver_equal_to_own_listening_socket_would_loop():
    assert one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500"}) == (
        "IPFIX_FULLFLOW_BALANCER_SUB[0]='127.0.0.1/1500': item '127.0.0.1/1500/tcp': this receiver listens there "
        "(tcp 0.0.0.0 port 1500), it would loop; expected an address other than the receiver's own")


def test_loop_detection_uses_local_interfaces_and_bind(monkeypatch):
    import ipaddress
    monkeypatch.setattr(config, "local_addresses", lambda: {ipaddress.ip_address("192.0.2.7")})
    sub = {"IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin"}
    assert "would loop" in one_problem({**sub, "IPFIX_FULLFLOW_BALANCER_SUB[0]": "192.0.2.7/1500"})
    assert "would loop" in one_problem({"IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "192.0.2.7/1500/"})
    assert "would loop" in one_problem({**sub, "IPFIX_FULLFLOW_BIND[0]": "::",
                                        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500"})
    for values in ({"IPFIX_FULLFLOW_BALANCER_SUB[0]": "192.0.2.8/1500"},  # another host
                   {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500", "IPFIX_FULLFLOW_BALANCER_SUB_PROTO": "udp"},
                   {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500", "IPFIX_FULLFLOW_BIND[0]": "10.0.0.1"},
                   {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "[::1]/1500"}):  # 0.0.0.0 does not take IPv6
        receiver({**sub, **values})


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse({"IPFIX_FULLFLOW_PORT[0]": "70000", "IPFIX_FULLFLOW_BALANCER[0]": "Fast",
               "IPFIX_CLICKSTREAM_QUEUE_BYTES[0]": "1", "IPFIX_DNSFLOW_PROT[0]": "1",
               "IPFIX_DNSFLOW_BALANCER[0]": "All", "IPFIX_DNSFLOW_TASKSET[0]": "99"}, cpus={0})
    found = err.value.problems
    assert len(found) == 6, found
    for key in ("FULLFLOW_PORT[0]='70000'", "FULLFLOW_BALANCER[0]='Fast'", "CLICKSTREAM_QUEUE_BYTES[0]='1'",
                "DNSFLOW_PROT[0]='1'", "DNSFLOW_BALANCER_SUB[0]=''", "DNSFLOW_TASKSET[0]='99'"):
        assert sum(key in p for p in found) == 1, key
    assert str(err.value) == "\n".join(found)
    assert pickle.loads(pickle.dumps(err.value)).problems == found


def test_problems_of_one_receiver_are_listed_in_key_order():
    keys = ["PORT", "PORT_TYPE", "ROTATE_MINUTES", "ROTATE_DELAY_SECONDS", "FW_MAX_QUEUE_SIZE", "QUEUE_BYTES",
            "TEMPLATE_REFRESH", "BALANCER_AUTO", "SPOOL_BYTES"]
    with pytest.raises(ConfigError) as err:
        parse({f"IPFIX_FULLFLOW_{k}[0]": "-9" for k in keys}, cpus=CPUS)
    assert [p.split("=")[0] for p in err.value.problems] == [f"IPFIX_FULLFLOW_{k}[0]" for k in keys]


def test_recording_keys_on_a_forwarding_receiver_are_a_warning():
    values = {"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/1",
              "IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "5", "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.3/2/tcp"}
    assert parse(values, cpus=CPUS).warnings == (
        "IPFIX_FULLFLOW_ROTATE_MINUTES[0]='5', IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]='10.0.0.3/2/tcp': "
        "fullflow[0] forwards (IPFIX_FULLFLOW_BALANCER[0]='All') and records nothing, so these keys have no "
        "effect; expected BALANCER=Disabled or BALANCER_AUTO=Enabled for recording",)
    assert parse({**values, "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled"}, cpus=CPUS).warnings == ()  # auto recorders


def test_a_port_below_1024_is_a_warning_naming_the_capability():
    (warning,) = parse({"IPFIX_FULLFLOW_PORT[0]": "514"}, cpus=CPUS).warnings
    assert warning.startswith("IPFIX_FULLFLOW_PORT[0]='514': a port below 1024 needs CAP_NET_BIND_SERVICE, which "
                              "the shipped unit does not grant")


def test_clickstream_rotating_sooner_than_fullflow_is_a_warning():
    cfg = parse({"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "15", "IPFIX_CLICKSTREAM_PORT_TYPE[0]": "tcp"}, cpus=CPUS)
    assert cfg.warnings == (
        "IPFIX_CLICKSTREAM_ROTATE_MINUTES[0] (default 12): Clickstream rotates every 720 s, sooner than "
        "fullflow[0] (900 s); expected Clickstream's rotation period >= Fullflow's, as the manual requires",)
    cfg = parse({"IPFIX_FULLFLOW_PORT_TYPE[0]": "tcp", "IPFIX_CLICKSTREAM_ROTATE_DELAY_SECONDS[0]": "60"}, cpus=CPUS)
    assert cfg.warnings[0].startswith("IPFIX_CLICKSTREAM_ROTATE_DELAY_SECONDS[0]='60': Clickstream rotates every 60 s")
    # only recording receivers rotate
    assert parse({"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "15", "IPFIX_CLICKSTREAM_BALANCER[0]": "All",
                  "IPFIX_CLICKSTREAM_BALANCER_SUB[0]": "10.0.0.2/1"}, cpus=CPUS).warnings == ()


# --- hand-over, file and path -------------------------------------------------------------------------------

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


def test_load_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "missing.env")
    with pytest.raises(ConfigError) as err:
        load(path)
    (msg,) = err.value.problems
    assert msg.startswith(f"{path}: cannot read the configuration file (No such file or directory)")


def test_load_reports_unparseable_lines_and_repeated_keys_with_other_problems(tmp_path):
    path = tmp_path / "bad.env"
    path.write_text("IPFIX_FULLFLOW_PORT[0]=1500\nthis is not a line\n"
                    "IPFIX_FULLFLOW_PORT[0]=1600\nIPFIX_FULLFLOW_PORT_TYPE[0]=sctp\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), cpus=CPUS)
    assert err.value.problems == [
        f"{path}:2: 'this is not a line': cannot parse this line; expected KEY=value",
        f"{path}:3: IPFIX_FULLFLOW_PORT[0]='1600': already set to '1500' on line 1; expected each key once",
        "IPFIX_FULLFLOW_PORT_TYPE[0]='sctp': expected one of tcp, udp (any case)",
    ]


def test_load_does_not_interpolate_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_DIR", "/elsewhere")
    path = tmp_path / "x.env"
    path.write_text("IPFIX_FULLFLOW_DUMP_DIR[0]=/d/${SOME_DIR}\n")
    assert load(str(path), cpus=CPUS).receivers[0].recording.dump_dir == "/d/${SOME_DIR}"


def test_resolve_path_precedence(monkeypatch):
    monkeypatch.delenv("IPFIX_BALANCER_CONFIG", raising=False)
    assert resolve_path(None) == config.DEFAULT_CONFIG_PATH == "/var/fast_ipfix_balancer/backend/.env"
    monkeypatch.setenv("IPFIX_BALANCER_CONFIG", "/env.env")
    assert resolve_path(None) == "/env.env"
    assert resolve_path("/cli.env") == "/cli.env"


# --- which change needs a new handler ---------------------------------------------------------------------

BASE = {"IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920"}


@pytest.mark.parametrize("change", [{"IPFIX_FULLFLOW_PORT[0]": "1600"}, {"IPFIX_FULLFLOW_PORT_TYPE[0]": "udp"},
                                    {"IPFIX_FULLFLOW_BIND[0]": "127.0.0.1"}, {"IPFIX_FULLFLOW_TASKSET[0]": "1"}])
def test_listen_or_cpu_change_needs_a_new_handler(change):
    assert config.live_change_impossible(receiver(BASE), receiver({**BASE, **change}))


@pytest.mark.parametrize("change", [{"IPFIX_FULLFLOW_BALANCER[0]": "All"}, {"IPFIX_FULLFLOW_QUEUE_BYTES[0]": "65536"},
                                    {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.3/9920"},
                                    {"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "1"}, {"IPFIX_FULLFLOW_DPI_ID[0]": "5"}])
def test_forwarding_and_recording_change_in_place(change):
    old, new = receiver(BASE), receiver({**BASE, **change})
    assert old != new and not config.live_change_impossible(old, new)


def test_recording_settings_change_only_with_recording_keys():
    old = receiver(BASE)
    assert receiver({**BASE, "IPFIX_FULLFLOW_BALANCER[0]": "All"}).recording == old.recording
    for key, value in [("FW_MAX_QUEUE_SIZE", "10"), ("SPOOL_BYTES", "1"), ("DUMP_DIR", "/d"),
                       ("DUMP_INSERT_PROCESSES", "10.0.0.9/9/tcp"), ("ROTATE_DELAY_SECONDS", "5")]:
        assert receiver({**BASE, f"IPFIX_FULLFLOW_{key}[0]": value}).recording != old.recording, key


def test_template_limits_keys_defaults_and_bounds():
    from ipfix_balancer.config import TemplateLimits
    assert receiver(BASE).template_limits == TemplateLimits(4096, 256, 1024 * 1024)
    limits = receiver({**BASE, "IPFIX_FULLFLOW_TEMPLATES_MAX[0]": "10", "IPFIX_FULLFLOW_ODIDS_MAX[0]": "2",
                       "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]": "70000"}).template_limits
    assert limits == TemplateLimits(10, 2, 70000)
    assert ReceiverConfig.from_json(receiver({**BASE, "IPFIX_FULLFLOW_ODIDS_MAX[0]": "2"}).to_json()
                                    ).template_limits.odids_max == 2
    with pytest.raises(ConfigError) as info:
        parse({**BASE, "IPFIX_FULLFLOW_TEMPLATES_MAX[0]": "65281", "IPFIX_FULLFLOW_ODIDS_MAX[0]": "0",
               "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]": "100"}, cpus=range(4))
    assert info.value.problems == [
        "IPFIX_FULLFLOW_TEMPLATES_MAX[0]='65281': expected an integer 1..65280 (templates per exporter session and "
        "ODID)",
        "IPFIX_FULLFLOW_ODIDS_MAX[0]='0': expected an integer >= 1 (ODIDs with templates per exporter session)",
        "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]='100': expected an integer >= 65536 (bytes of templates per exporter "
        "session)"]


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


# --- balancer auto -----------------------------------------------------------------------------------------

def auto_config(**extra):
    values = {
        "IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1600,10.255.255.1/1601,127.0.0.2/1602,127.0.0.1/1603",
        "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled", "IPFIX_FULLFLOW_DUMP_DIR[0]": "/d/ff",
        "IPFIX_FULLFLOW_ROTATE_DELAY_SECONDS[0]": "30", "IPFIX_FULLFLOW_DPI_ID[0]": "4",
        "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.9/9/tcp",
        "IPFIX_FULLFLOW_PORT[100]": "1700", "IPFIX_FULLFLOW_DUMP_DIR[100]": "/d/other",
    }
    values.update(extra)
    return parse(values, cpus=range(4))


def test_auto_receivers_for_local_subreceivers(monkeypatch):
    monkeypatch.setattr(config, "local_addresses", lambda: set())
    cfg = auto_config(**{"IPFIX_FULLFLOW_PORT[1]": "1603", "IPFIX_FULLFLOW_BIND[1]": "0.0.0.0"})
    autos = config.auto_receivers(cfg)
    # 10.255.255.1 is not local; 1603 is already a configured receiver's port; index 100 is taken
    assert [(a.name, a.listen) for a in autos] == [
        ("fullflow[101]", Listen("tcp", "127.0.0.1", 1600)), ("fullflow[102]", Listen("tcp", "127.0.0.2", 1602))]
    a = autos[0]
    fw, rec = a.forwarding, a.recording
    assert (fw.mode, fw.subreceivers, fw.balancer_auto, a.taskset) == (Mode.DISABLED, (), False, None)
    assert (rec.dump_dir, rec.rotate_seconds, rec.dpi_id) == ("/d/ff/auto-1600/", 30, 4)
    assert rec.dump_insert_processes == (Endpoint("10.0.0.9", 9, "tcp"),)


def test_auto_receivers_use_sub_proto_and_host_addresses(monkeypatch):
    import ipaddress
    monkeypatch.setattr(config, "local_addresses", lambda: {ipaddress.ip_address("10.255.255.1")})
    cfg = auto_config(**{"IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "udp"})
    assert [a.listen for a in config.auto_receivers(cfg)] == [
        Listen("udp", "127.0.0.1", 1600), Listen("udp", "10.255.255.1", 1601), Listen("udp", "127.0.0.2", 1602),
        Listen("udp", "127.0.0.1", 1603)]


def test_no_auto_receivers_unless_enabled_on_a_balancing_receiver():
    assert config.auto_receivers(auto_config(**{"IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Disabled"})) == []
    assert config.auto_receivers(parse({"IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled"}, cpus=range(4))) == []


def test_global_keys_metrics_and_hang_seconds():
    assert (config.parse({}).metrics, config.parse({}).hang_seconds) == (None, 15)
    cfg = config.parse({"IPFIX_BALANCER_METRICS": "[::1]/9464", "IPFIX_BALANCER_HANG_SECONDS": "30"})
    assert (cfg.metrics, cfg.hang_seconds) == (Endpoint("::1", 9464, "tcp"), 30)
    assert config.parse({"IPFIX_BALANCER_METRICS": ""}).metrics is None
    with pytest.raises(ConfigError) as err:
        config.parse({"IPFIX_BALANCER_METRICS": "127.0.0.1/1,127.0.0.1/2", "IPFIX_BALANCER_HANG_SECONDS": "0",
                      "IPFIX_BALANCER_METRIC": "127.0.0.1/9464"})
    assert err.value.problems == [
        "IPFIX_BALANCER_METRIC='127.0.0.1/9464': unknown key; expected IPFIX_<FULLFLOW|CLICKSTREAM|DNSFLOW>_<PARAM>[<i>]"
        " (did you mean IPFIX_BALANCER_METRICS?)",
        "IPFIX_BALANCER_METRICS='127.0.0.1/1,127.0.0.1/2': expected one host/port, e.g. 127.0.0.1/9464 (empty: no metrics)",
        "IPFIX_BALANCER_HANG_SECONDS='0': expected an integer >= 2 (seconds without a status heartbeat before a handler "
        "is replaced)"]


# --- hostile and odd files (issue 11 item 9) ---------------------------------------------------------------

def test_a_number_of_5000_digits_is_a_problem_quoted_short(tmp_path):
    path = tmp_path / "big.env"
    path.write_text(f"IPFIX_FULLFLOW_QUEUE_BYTES[0]={'9' * 5000}\nIPFIX_FULLFLOW_PORT[{'1' * 5000}]=1\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), cpus=CPUS)
    index, queue = err.value.problems
    assert queue == (f"IPFIX_FULLFLOW_QUEUE_BYTES[0]={'9' * 100!r}... (5000 characters): 5000 digits; expected an "
                     "integer >= 65536 (bytes)")
    assert index.startswith(f"IPFIX_FULLFLOW_PORT[{'1' * 80}... (5021 characters)='1': unknown key;")
    assert "the index must be a number of at most 9 digits" in index
    assert max(len(p) for p in err.value.problems) < 400


def test_any_exception_while_checking_is_a_config_error(tmp_path, monkeypatch):
    def boom(*_args):
        raise RecursionError("deep")
    monkeypatch.setattr(config, "parse", boom)
    path = tmp_path / "x.env"
    path.write_text("IPFIX_FULLFLOW_PORT[0]=1500\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), cpus=CPUS)
    assert err.value.problems == [f"{path}: cannot check the configuration (RecursionError: 'deep'); expected a "
                                  "valid .env file"]


def test_a_line_without_equals_is_refused_and_dotenv_stays_silent(tmp_path, capfd, caplog):
    path = tmp_path / "x.env"
    path.write_text("IPFIX_FULLFLOW_PORT[0]=1500\nIPFIX_FULLFLOW_BALANCER\nOTHER\n'unterminated=\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), cpus=CPUS)
    assert err.value.problems == [f"{path}:{n}: {text!r}: cannot parse this line; expected KEY=value"
                                  for n, text in ((2, "IPFIX_FULLFLOW_BALANCER"), (3, "OTHER"),
                                                  (4, "'unterminated="))]
    out, errout = capfd.readouterr()
    assert (out, errout, caplog.records) == ("", "", [])  # python-dotenv's own warnings never show


def test_subreceiver_as_ipv4_mapped_ipv6_own_socket_would_loop():
    assert "would loop" in one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BIND[0]": "127.0.0.1",
                                        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "[::ffff:127.0.0.1]/1500"})
    assert "would loop" in one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All",
                                        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "[::ffff:127.0.0.1]/1500"})


def test_receivers_forwarding_to_each_other_in_a_circle():
    values = {"IPFIX_FULLFLOW_BIND[0]": "127.0.0.1", "IPFIX_FULLFLOW_BALANCER[0]": "All",
              "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1600",
              "IPFIX_FULLFLOW_PORT[1]": "1600", "IPFIX_FULLFLOW_BIND[1]": "127.0.0.1",
              "IPFIX_FULLFLOW_BALANCER[1]": "RoundRobin", "IPFIX_FULLFLOW_BALANCER_SUB[1]": "10.0.0.9/1,127.0.0.1/1500"}
    assert one_problem(values) == (
        "IPFIX_FULLFLOW_BALANCER_SUB[0]='127.0.0.1/1600': the receivers forward to each other in a circle "
        "(fullflow[0] -> fullflow[1] -> fullflow[0]); expected subreceivers that do not lead back to this receiver")
    # a chain is fine: fullflow[1] records what fullflow[0] forwards
    parse({**values, "IPFIX_FULLFLOW_BALANCER[1]": "Disabled", "IPFIX_FULLFLOW_BALANCER_SUB[1]": ""}, cpus=CPUS)


def test_broadcast_subreceivers_and_export_targets_are_refused(monkeypatch):
    import ipaddress
    monkeypatch.setattr(config, "local_broadcasts", lambda: {ipaddress.ip_address("192.0.2.255")})
    for key, item in (("BALANCER_SUB", "255.255.255.255/9995"), ("BALANCER_SUB", "192.0.2.255/9995"),
                      ("DUMP_INSERT_PROCESSES", "192.0.2.255/9995/udp")):
        msg = one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", f"IPFIX_FULLFLOW_{key}[0]": item,
                           **({} if key == "BALANCER_SUB" else {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/1"})})
        assert "is a broadcast address" in msg and item.split("/")[0] in msg
    receiver({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "192.0.3.255/9995"})


def test_values_that_could_only_fail_at_run_time(tmp_path):
    (tmp_path / "afile").write_text("")
    assert one_problem({"IPFIX_FULLFLOW_DPI_ID[0]": "1" * 300}).endswith(
        "300 digits; expected an integer -1..4294967295 (-1 = the receiver's position in its stream)")
    assert one_problem({"IPFIX_FULLFLOW_DPI_ID[0]": "4294967296"}).startswith("IPFIX_FULLFLOW_DPI_ID[0]='4294967296'")
    long = one_problem({"IPFIX_FULLFLOW_DUMP_DIR[0]": f"{tmp_path}/{'x' * 300}/"})
    assert f"component {'x' * 100!r}... (300 characters) is 300 bytes, the file system allows 255" in long
    for where in (f"{tmp_path}/afile", f"{tmp_path}/afile/sub/"):
        assert one_problem({"IPFIX_FULLFLOW_DUMP_DIR[0]": where}) == (
            f"IPFIX_FULLFLOW_DUMP_DIR[0]={where!r}: {str(tmp_path / 'afile')!r} exists and is not a directory; "
            "expected a directory path the recorder can create")
    deep = f"{tmp_path}/" + "d" * 200 + "/" + "/".join(["e" * 250] * 16)
    assert one_problem({"IPFIX_FULLFLOW_DUMP_DIR[0]": deep}).endswith(
        f"it is {len(deep)} bytes long, so its files' paths could exceed 4096 bytes; expected a directory path the "
        "recorder can create")
    assert receiver({"IPFIX_FULLFLOW_DUMP_DIR[0]": f"{tmp_path}/new/dir/"}).recording.dump_dir


def test_hostile_input_limits_parse_with_defaults_a_dpi_never_meets():
    limits = receiver(BASE).limits
    assert limits.allow == () and limits.allows("192.0.2.7"), "empty ALLOW: anyone"
    assert (limits.idle_timeout, limits.max_sessions, limits.max_sessions_per_source) == (600, 1000, 100)
    assert 0 < limits.memory_bytes <= 1024 ** 3
    limits = receiver({**BASE, "IPFIX_FULLFLOW_ALLOW[0]": " 10.0.0.1, 10.1.0.0/16 ,[2001:db8::]/32,10.0.0.1",
                       "IPFIX_FULLFLOW_IDLE_TIMEOUT[0]": "0", "IPFIX_FULLFLOW_MAX_SESSIONS[0]": "20",
                       "IPFIX_FULLFLOW_MAX_SESSIONS_PER_SOURCE[0]": "4",
                       "IPFIX_FULLFLOW_MEMORY_BYTES[0]": "8388608"}).limits
    assert limits.allow == ("10.0.0.1/32", "10.1.0.0/16", "2001:db8::/32")
    assert (limits.idle_timeout, limits.max_sessions, limits.max_sessions_per_source, limits.memory_bytes) == \
        (0, 20, 4, 8388608)
    assert limits.allows("10.1.200.3") and limits.allows("2001:db8::5") and limits.allows("::ffff:10.0.0.1")
    assert not limits.allows("10.0.0.2") and not limits.allows("2001:db9::1")
    rc = receiver({**BASE, "IPFIX_FULLFLOW_ALLOW[0]": "10.0.0.0/8"})
    assert ReceiverConfig.from_json(rc.to_json()) == rc
    mapped = receiver({**BASE, "IPFIX_FULLFLOW_ALLOW[0]": "::ffff:10.0.0.0/104, ::ffff:192.0.2.7"}).limits
    assert mapped.allows("10.9.8.7") and mapped.allows("::ffff:10.0.0.1") and mapped.allows("192.0.2.7")
    assert not mapped.allows("11.0.0.1") and not mapped.allows("192.0.2.8")


def test_hostile_input_limits_refuse_bad_values():
    found = problems({**BASE, "IPFIX_FULLFLOW_ALLOW[0]": "10.0.0.1,dpi.example", "IPFIX_FULLFLOW_MAX_SESSIONS[0]": "0",
                      "IPFIX_FULLFLOW_MEMORY_BYTES[0]": "1000"})
    assert len(found) == 3
    assert "item 'dpi.example'" in found[0] and "MAX_SESSIONS[0]='0'" in found[1] and "MEMORY_BYTES" in found[2]
