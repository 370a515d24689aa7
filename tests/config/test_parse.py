"""config/parse.py: the manual's example, every per-key validation message, defaults, and the .env file."""
import pickle

import pytest

from configkit import BASE, CPUS, ETC, FakeHost, one_problem, problems, receiver
from ipfix_balancer.config import parse
from ipfix_balancer.config.model import Config, Endpoint, ForwardingSettings, Listen, Mode, ReceiverConfig, Recording
from ipfix_balancer.config.parse import ConfigError, load, load_values, resolve_path


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


def test_defaults():
    cfg = load_values({"IPFIX_FULLFLOW_PORT_TYPE[0]": "tcp", "IPFIX_CLICKSTREAM_BALANCER": "Disabled",
                       "IPFIX_DNSFLOW_DPI_ID[0]": "-1"}, cpus=CPUS, host=FakeHost())  # memory: 1 GiB or more
    full, click, dns = cfg.receivers
    assert full == ReceiverConfig(
        stream="FULLFLOW", index=0, taskset=None, listen=Listen(port_type="tcp", bind="0.0.0.0", port=1500),
        forwarding=ForwardingSettings(mode=Mode.DISABLED, subreceivers=(), sub_proto="tcp", queue_bytes=67108864,
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
    cfg = load_values({"IPFIX_DNSFLOW_PORT[0]": "2000", "IPFIX_FULLFLOW_PORT[3]": "2003",
                       "IPFIX_FULLFLOW_PORT[1]": "2001"}, cpus=CPUS)
    assert [r.name for r in cfg.receivers] == ["fullflow[1]", "fullflow[3]", "dnsflow[0]"]


def test_index_above_zero_gets_own_dump_dir_proc_name_and_position_dpi_id():
    cfg = load_values({"IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_PORT[1]": "1600",
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
    assert load_values({}, path="/e.env", cpus=CPUS).warnings == (
        "/e.env: no IPFIX_<STREAM>_<PARAM>[i] keys; no receiver is configured",)


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
    assert rc.forwarding.subreceivers[0].ip_version == 6
    assert rc.recording.dump_insert_processes == (Endpoint("2001:db8::7", 3440, "udp"),)
    assert (str(Endpoint("10.0.0.2", 9920, "tcp")), Endpoint("10.0.0.2", 9920, "tcp").ip_version) == (
        "10.0.0.2/9920/tcp", 4)


def test_taskset_alias():
    assert receiver({"IPFIX_FULLFLOW_TASKSET[0]": "3"}).taskset == 3
    assert receiver({"IPFIX_FULLFLOW_TASKSET[0]": "3", "IPFIX_FULLFLOW_BALANCER_TASKSET[0]": "3"}).taskset == 3
    msg = one_problem({"IPFIX_FULLFLOW_BALANCER_TASKSET[0]": "3", "IPFIX_FULLFLOW_TASKSET[0]": "4"})
    assert msg == ("IPFIX_FULLFLOW_TASKSET[0]='4': conflicts with IPFIX_FULLFLOW_BALANCER_TASKSET[0]='3', which "
                   "sets the same parameter; expected only one of them")


def test_index_zero_written_two_ways_with_different_values():
    msg = one_problem({"IPFIX_FULLFLOW_PORT": "1500", "IPFIX_FULLFLOW_PORT[0]": "1600"})
    assert msg.startswith("IPFIX_FULLFLOW_PORT[0]='1600': conflicts with IPFIX_FULLFLOW_PORT='1500'")


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


def test_taskset_defaults_to_the_hosts_cpus():
    host = FakeHost(cpus={0, 1, 2, 3})
    assert receiver({"IPFIX_FULLFLOW_TASKSET[0]": "3"}, cpus=None, host=host).taskset == 3
    assert one_problem({"IPFIX_FULLFLOW_TASKSET[0]": "4"}, cpus=None, host=host).endswith(
        "expected a CPU this host has (0-3)")


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


def test_subreceiver_equal_to_own_listening_socket_would_loop():
    assert one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500"}) == (
        "IPFIX_FULLFLOW_BALANCER_SUB[0]='127.0.0.1/1500': item '127.0.0.1/1500/tcp': this receiver listens there "
        "(tcp 0.0.0.0 port 1500), it would loop; expected an address other than the receiver's own")


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_values({"IPFIX_FULLFLOW_PORT[0]": "70000", "IPFIX_FULLFLOW_BALANCER[0]": "Fast",
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
        load_values({f"IPFIX_FULLFLOW_{k}[0]": "-9" for k in keys}, cpus=CPUS)
    assert [p.split("=")[0] for p in err.value.problems] == [f"IPFIX_FULLFLOW_{k}[0]" for k in keys]


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
    assert resolve_path(None) == parse.DEFAULT_CONFIG_PATH == "/var/fast_ipfix_balancer/backend/.env"
    monkeypatch.setenv("IPFIX_BALANCER_CONFIG", "/env.env")
    assert resolve_path(None) == "/env.env"
    assert resolve_path("/cli.env") == "/cli.env"


def test_template_limits_keys_defaults_and_bounds():
    from ipfix_balancer.config import TemplateLimits
    assert receiver(BASE).template_limits == TemplateLimits(4096, 256, 1024 * 1024)
    limits = receiver({**BASE, "IPFIX_FULLFLOW_TEMPLATES_MAX[0]": "10", "IPFIX_FULLFLOW_ODIDS_MAX[0]": "2",
                       "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]": "70000"}).template_limits
    assert limits == TemplateLimits(10, 2, 70000)
    assert ReceiverConfig.from_json(receiver({**BASE, "IPFIX_FULLFLOW_ODIDS_MAX[0]": "2"}).to_json()
                                    ).template_limits.odids_max == 2
    with pytest.raises(ConfigError) as info:
        load_values({**BASE, "IPFIX_FULLFLOW_TEMPLATES_MAX[0]": "65281", "IPFIX_FULLFLOW_ODIDS_MAX[0]": "0",
                     "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]": "100"}, cpus=range(4))
    assert info.value.problems == [
        "IPFIX_FULLFLOW_TEMPLATES_MAX[0]='65281': expected an integer 1..65280 (templates per exporter session and "
        "ODID)",
        "IPFIX_FULLFLOW_ODIDS_MAX[0]='0': expected an integer >= 1 (ODIDs with templates per exporter session)",
        "IPFIX_FULLFLOW_TEMPLATE_BYTES_MAX[0]='100': expected an integer >= 65536 (bytes of templates per exporter "
        "session)"]


def test_global_keys_metrics_and_hang_seconds():
    assert (load_values({}).metrics, load_values({}).hang_seconds) == (None, 15)
    cfg = load_values({"IPFIX_BALANCER_METRICS": "[::1]/9464", "IPFIX_BALANCER_HANG_SECONDS": "30"})
    assert (cfg.metrics, cfg.hang_seconds) == (Endpoint("::1", 9464, "tcp"), 30)
    assert load_values({"IPFIX_BALANCER_METRICS": ""}).metrics is None
    with pytest.raises(ConfigError) as err:
        load_values({"IPFIX_BALANCER_METRICS": "127.0.0.1/1,127.0.0.1/2", "IPFIX_BALANCER_HANG_SECONDS": "0",
                     "IPFIX_BALANCER_METRIC": "127.0.0.1/9464"})
    assert err.value.problems == [
        "IPFIX_BALANCER_METRIC='127.0.0.1/9464': unknown key; expected IPFIX_<FULLFLOW|CLICKSTREAM|DNSFLOW>_<PARAM>[<i>]"
        " (did you mean IPFIX_BALANCER_METRICS?)",
        "IPFIX_BALANCER_METRICS='127.0.0.1/1,127.0.0.1/2': expected one host/port, e.g. 127.0.0.1/9464 (empty: no metrics)",
        "IPFIX_BALANCER_HANG_SECONDS='0': expected an integer >= 2 (seconds without a status heartbeat before a handler "
        "is replaced)"]


def test_metrics_token_file_must_be_readable(tmp_path):
    token = tmp_path / "metrics.token"
    assert load_values({}).metrics_token_file == ""
    with pytest.raises(ConfigError) as err:
        load_values({"IPFIX_BALANCER_METRICS_TOKEN_FILE": str(token)})
    assert err.value.problems == [f"IPFIX_BALANCER_METRICS_TOKEN_FILE={str(token)!r}: not a file this user can read"]
    token.write_text("s3cret\n")
    assert load_values({"IPFIX_BALANCER_METRICS_TOKEN_FILE": f" {token} "}).metrics_token_file == str(token)


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
    monkeypatch.setattr(parse, "load_values", boom)
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


def test_broadcast_subreceivers_and_export_targets_are_refused():
    host = FakeHost(broadcasts={"192.0.2.255"})
    for key, item in (("BALANCER_SUB", "255.255.255.255/9995"), ("BALANCER_SUB", "192.0.2.255/9995"),
                      ("DUMP_INSERT_PROCESSES", "192.0.2.255/9995/udp")):
        msg = one_problem({"IPFIX_FULLFLOW_BALANCER[0]": "All", f"IPFIX_FULLFLOW_{key}[0]": item,
                           **({} if key == "BALANCER_SUB" else {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/1"})},
                          host=host)
        assert "is a broadcast address" in msg and item.split("/")[0] in msg
    receiver({"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "192.0.3.255/9995"}, host=host)


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


# --- what the host says (a fake host) -------------------------------------------------------------------------

def test_files_named_by_keys_must_be_readable_by_this_user():
    values = {"IPFIX_BALANCER_METRICS_TOKEN_FILE": "/etc/m.token", "IPFIX_BALANCER_CONSOLE": "10.0.0.1/8480",
              "IPFIX_BALANCER_CONSOLE_TLS_CERT": "/etc/c.pem", "IPFIX_BALANCER_CONSOLE_TLS_KEY": "/etc/k.pem"}
    assert problems(values, host=FakeHost(readable={"/etc/c.pem"})) == [
        "IPFIX_BALANCER_METRICS_TOKEN_FILE='/etc/m.token': not a file this user can read",
        "IPFIX_BALANCER_CONSOLE_TLS_KEY='/etc/k.pem': expected a readable PEM file"]
    cfg = load_values(values, host=FakeHost(readable={"/etc/m.token", "/etc/c.pem", "/etc/k.pem"}))
    assert (cfg.metrics_token_file, cfg.console.tls_key) == ("/etc/m.token", "/etc/k.pem")


def test_source_preservation_needs_cap_net_raw():
    values = {"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920",
              "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]": "udp", "IPFIX_FULLFLOW_BALANCER_SUB_SOURCE[0]": "exporter"}
    assert one_problem(values, host=FakeHost(cap_net_raw=False)).endswith(
        ": this process lacks CAP_NET_RAW (run as root, or grant it: AmbientCapabilities=CAP_NET_RAW in the service "
        "unit); expected balancer, or exporter with UDP IPv4 subreceivers, an IPv4 BIND and CAP_NET_RAW")
    assert receiver(values, host=FakeHost(cap_net_raw=True)).forwarding.sub_source == "exporter"


def test_dump_dir_is_checked_against_the_hosts_file_system():
    host = FakeHost(files={"/srv/blocked"}, name_max=14, path_max=64)
    assert one_problem({"IPFIX_FULLFLOW_DUMP_DIR[0]": "/srv/blocked/dump/"}, host=host) == (
        "IPFIX_FULLFLOW_DUMP_DIR[0]='/srv/blocked/dump/': '/srv/blocked' exists and is not a directory; expected a "
        "directory path the recorder can create")
    assert one_problem({"IPFIX_FULLFLOW_DUMP_DIR[0]": "/srv/fifteen-letters/"}, host=host).endswith(
        ": component 'fifteen-letters' is 15 bytes, the file system allows 14; expected a directory path the "
        "recorder can create")
    assert "so its files' paths could exceed 64 bytes" in one_problem(
        {"IPFIX_FULLFLOW_DUMP_DIR[0]": "/srv/" + "/".join(["d" * 10] * 5) + "/"}, host=host)
    assert receiver({"IPFIX_FULLFLOW_DUMP_DIR[0]": "/srv/dump/"}, host=host).recording.dump_dir == "/srv/dump/"
