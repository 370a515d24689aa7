"""config/checks.py: what spans receivers (a shared port or dump directory, a forwarding circle) and the
warnings."""
from configkit import CPUS, FakeHost, one_problem, receiver
from ipfix_balancer.config.parse import load_values


def test_same_listening_port_names_both_keys():
    assert one_problem({"IPFIX_FULLFLOW_PORT[0]": "1501", "IPFIX_CLICKSTREAM_PORT_TYPE[0]": "tcp"}) == (
        "IPFIX_CLICKSTREAM_PORT[0] (default 1501): tcp port 1501 is already used by IPFIX_FULLFLOW_PORT[0]='1501'; "
        "expected a listening port unique to each receiver")
    msg = one_problem({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_PORT[0]": "1600"})
    assert "IPFIX_DNSFLOW_PORT[0]='1600'" in msg and "IPFIX_FULLFLOW_PORT[0]='1600'" in msg


def test_same_port_on_other_protocol_or_other_address_is_allowed():
    load_values({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_PORT[0]": "1600",
                 "IPFIX_DNSFLOW_PORT_TYPE[0]": "udp"}, cpus=CPUS)
    load_values({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_FULLFLOW_BIND[0]": "10.0.0.1",
                 "IPFIX_DNSFLOW_PORT[0]": "1600", "IPFIX_DNSFLOW_BIND[0]": "10.0.0.2"}, cpus=CPUS)
    assert "already used" in one_problem({"IPFIX_FULLFLOW_PORT[0]": "1600", "IPFIX_FULLFLOW_BIND[0]": "10.0.0.1",
                                          "IPFIX_DNSFLOW_PORT[0]": "1600"})


def test_recording_receivers_cannot_share_a_dump_dir():
    msg = one_problem({"IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_PORT[1]": "1600",
                       "IPFIX_FULLFLOW_DUMP_DIR[1]": "/var/fast_ipfix_balancer/dump/fullflow"})
    assert msg == ("IPFIX_FULLFLOW_DUMP_DIR[1]='/var/fast_ipfix_balancer/dump/fullflow': directory already used by "
                   "IPFIX_FULLFLOW_DUMP_DIR[0] (default /var/fast_ipfix_balancer/dump/fullflow/); expected a dump "
                   "directory of its own for each recording receiver")


def test_loop_detection_uses_local_interfaces_and_bind():
    host = FakeHost(addresses={"192.0.2.7"})
    sub = {"IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin"}
    assert "would loop" in one_problem({**sub, "IPFIX_FULLFLOW_BALANCER_SUB[0]": "192.0.2.7/1500"}, host=host)
    assert "would loop" in one_problem({"IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "192.0.2.7/1500/"}, host=host)
    assert "would loop" in one_problem({**sub, "IPFIX_FULLFLOW_BIND[0]": "::",
                                        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500"}, host=host)
    for values in ({"IPFIX_FULLFLOW_BALANCER_SUB[0]": "192.0.2.8/1500"},  # another host
                   {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500", "IPFIX_FULLFLOW_BALANCER_SUB_PROTO": "udp"},
                   {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1500", "IPFIX_FULLFLOW_BIND[0]": "10.0.0.1"},
                   {"IPFIX_FULLFLOW_BALANCER_SUB[0]": "[::1]/1500"}):  # 0.0.0.0 does not take IPv6
        receiver({**sub, **values}, host=host)


def test_receivers_forwarding_to_each_other_in_a_circle():
    values = {"IPFIX_FULLFLOW_BIND[0]": "127.0.0.1", "IPFIX_FULLFLOW_BALANCER[0]": "All",
              "IPFIX_FULLFLOW_BALANCER_SUB[0]": "127.0.0.1/1600",
              "IPFIX_FULLFLOW_PORT[1]": "1600", "IPFIX_FULLFLOW_BIND[1]": "127.0.0.1",
              "IPFIX_FULLFLOW_BALANCER[1]": "RoundRobin", "IPFIX_FULLFLOW_BALANCER_SUB[1]": "10.0.0.9/1,127.0.0.1/1500"}
    assert one_problem(values) == (
        "IPFIX_FULLFLOW_BALANCER_SUB[0]='127.0.0.1/1600': the receivers forward to each other in a circle "
        "(fullflow[0] -> fullflow[1] -> fullflow[0]); expected subreceivers that do not lead back to this receiver")
    # a chain is fine: fullflow[1] records what fullflow[0] forwards
    load_values({**values, "IPFIX_FULLFLOW_BALANCER[1]": "Disabled", "IPFIX_FULLFLOW_BALANCER_SUB[1]": ""}, cpus=CPUS)


def test_recording_keys_on_a_forwarding_receiver_are_a_warning():
    values = {"IPFIX_FULLFLOW_BALANCER[0]": "All", "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/1",
              "IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "5", "IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]": "10.0.0.3/2/tcp"}
    assert load_values(values, cpus=CPUS).warnings == (
        "IPFIX_FULLFLOW_ROTATE_MINUTES[0]='5', IPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]='10.0.0.3/2/tcp': "
        "fullflow[0] forwards (IPFIX_FULLFLOW_BALANCER[0]='All') and records nothing, so these keys have no "
        "effect; expected BALANCER=Disabled or BALANCER_AUTO=Enabled for recording",)
    auto = {**values, "IPFIX_FULLFLOW_BALANCER_AUTO[0]": "Enabled"}
    assert load_values(auto, cpus=CPUS).warnings == ()  # auto recorders


def test_a_port_below_1024_is_a_warning_naming_the_capability():
    (warning,) = load_values({"IPFIX_FULLFLOW_PORT[0]": "514"}, cpus=CPUS).warnings
    assert warning.startswith("IPFIX_FULLFLOW_PORT[0]='514': a port below 1024 needs CAP_NET_BIND_SERVICE, which "
                              "the shipped unit does not grant")


def test_clickstream_rotating_sooner_than_fullflow_is_a_warning():
    cfg = load_values({"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "15", "IPFIX_CLICKSTREAM_PORT_TYPE[0]": "tcp"}, cpus=CPUS)
    assert cfg.warnings == (
        "IPFIX_CLICKSTREAM_ROTATE_MINUTES[0] (default 12): Clickstream rotates every 720 s, sooner than "
        "fullflow[0] (900 s); expected Clickstream's rotation period >= Fullflow's, as the manual requires",)
    cfg = load_values({"IPFIX_FULLFLOW_PORT_TYPE[0]": "tcp", "IPFIX_CLICKSTREAM_ROTATE_DELAY_SECONDS[0]": "60"},
                      cpus=CPUS)
    assert cfg.warnings[0].startswith("IPFIX_CLICKSTREAM_ROTATE_DELAY_SECONDS[0]='60': Clickstream rotates every 60 s")
    # only recording receivers rotate
    assert load_values({"IPFIX_FULLFLOW_ROTATE_MINUTES[0]": "15", "IPFIX_CLICKSTREAM_BALANCER[0]": "All",
                        "IPFIX_CLICKSTREAM_BALANCER_SUB[0]": "10.0.0.2/1"}, cpus=CPUS).warnings == ()
