"""The console's .env editor: nothing of the operator's file changes except the values edited."""
import os
import stat
from pathlib import Path

import pytest

from ipfix_balancer import config
from ipfix_balancer.console import envfile
from ipfix_balancer.console.envfile import EnvFile

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "etc").glob("*.env"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_round_trips_byte_for_byte(path):
    text = path.read_text()
    env = EnvFile(text)
    assert env.text() == text
    for (stream, index), values in env.receivers().items():  # setting what is there changes nothing
        env.set_receiver(stream, index, values)
    assert env.text() == text


def test_shipped_example_receivers_are_read_by_param_whatever_the_key_spelling():
    env = EnvFile("IPFIX_FULLFLOW_PORT=1500\nIPFIX_FULLFLOW_TASKSET[0]=1\nOTHER=x\nIPFIX_DNSFLOW_PORT[2]=9\n")
    assert env.receivers() == {("FULLFLOW", 0): {"PORT": "1500", "BALANCER_TASKSET": "1"},
                               ("DNSFLOW", 2): {"PORT": "9"}}
    assert env.next_index("DNSFLOW") == 3 and env.next_index("CLICKSTREAM") == 0


SAMPLE = """\
# operator's header

# the Fullflow collector
IPFIX_FULLFLOW_PORT=1500
IPFIX_FULLFLOW_BALANCER[0]=RoundRobin   # inline
IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/9901
SOMETHING_ELSE=kept

# Clickstream
IPFIX_CLICKSTREAM_PORT[0]=1501
IPFIX_BALANCER_CONSOLE=127.0.0.1/8480
"""


def test_an_edit_changes_only_the_edited_lines_and_keeps_comments_and_order():
    env = EnvFile(SAMPLE)
    env.set_receiver("FULLFLOW", 0, {"PORT": "1500", "BALANCER": "RoundRobin",
                                     "BALANCER_SUB": "127.0.0.1/9901,127.0.0.1/9902", "BALANCER_SUB_PROTO": "udp",
                                     "QUEUE_BYTES": ""})
    assert env.text() == SAMPLE.replace(
        "IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/9901\n",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/9901,127.0.0.1/9902\nIPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]=udp\n")


def test_an_emptied_value_removes_the_key_but_not_the_blank_lines_and_comments_around_it():
    env = EnvFile(SAMPLE)
    env.set_receiver("CLICKSTREAM", 0, {"PORT": ""})
    assert env.text() == SAMPLE.replace("IPFIX_CLICKSTREAM_PORT[0]=1501\n", "")
    assert "# Clickstream\n" in env.text()


def test_a_new_receiver_goes_to_the_end_under_a_comment_and_a_delete_removes_only_its_keys():
    env = EnvFile(SAMPLE.rstrip("\n"))  # no newline at the end: one is added before the new lines
    env.set_receiver("DNSFLOW", 0, {"PORT": "1101", "BALANCER": "All", "BALANCER_SUB": "10.0.0.1/1, 10.0.0.2/2",
                                    "DPI_ID": ""})
    added = ("\n\n# DNS flow receiver [0] (added in the console)\nIPFIX_DNSFLOW_PORT[0]=1101\n"
             "IPFIX_DNSFLOW_BALANCER[0]=All\nIPFIX_DNSFLOW_BALANCER_SUB[0]='10.0.0.1/1, 10.0.0.2/2'\n")
    assert env.text() == SAMPLE.rstrip("\n") + added
    parsed = config.load_text(env.text(), "/x/.env", cpus={0})
    assert [str(e) for e in parsed.receivers[-1].forwarding.subreceivers] == ["10.0.0.1/1/tcp", "10.0.0.2/2/tcp"]
    env.delete_receiver("FULLFLOW", 0)
    assert env.text() == (SAMPLE.rstrip("\n") + added).replace(
        "IPFIX_FULLFLOW_PORT=1500\nIPFIX_FULLFLOW_BALANCER[0]=RoundRobin   # inline\n"
        "IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/9901\n", "")


def test_write_atomic_keeps_mode_and_the_previous_version(tmp_path):
    path = tmp_path / ".env"
    path.write_text(SAMPLE)
    os.chmod(path, 0o640)
    envfile.write_atomic(str(path), "NEW=1\n", SAMPLE)
    assert path.read_text() == "NEW=1\n" and (tmp_path / ".env.previous").read_text() == SAMPLE
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env", ".env.previous"]  # no temporary left
    assert envfile.digest("a") != envfile.digest("b")


def test_the_form_has_a_field_for_every_receiver_param_and_the_manuals_labels():
    from ipfix_balancer.console import fields
    assert {f.param for f in fields.FIELDS} == set(config.receiver_params())
    assert [f.label for f in fields.MANUAL] == [
        "Port type", "Port", "Rotate in minutes", "Rotate in seconds", "Rotate by flows", "Export", "DPI ID",
        "Balancer", "Balancer subreceivers", "Balancer subreceivers type", "Balancer auto"]
