"""The console app without a browser or a balancer (Starlette's TestClient): CSRF, and what Apply writes."""
import json
import os
import re
import warnings

import pytest

with warnings.catch_warnings():  # starlette prefers httpx2 now; httpx is still supported
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from ipfix_balancer.config import Console
from ipfix_balancer.console import logsource
from ipfix_balancer.console.app import ConsoleState, make_app

ENV = "# keep me\nIPFIX_FULLFLOW_PORT[0]=1500\nIPFIX_FULLFLOW_BALANCER[0]=All\nIPFIX_FULLFLOW_BALANCER_SUB[0]=10.0.0.1/1\n"


class Log:
    def info(self, *a, **kw):
        pass

    warning = info


@pytest.fixture
def client(tmp_path):
    path = tmp_path / ".env"
    path.write_text(ENV)
    (tmp_path / "run").mkdir()
    state = ConsoleState(Console("127.0.0.1", 1, "", "", str(tmp_path / "token")), str(path), str(tmp_path / "run"),
                         "secret", Log())
    with TestClient(make_app(state), base_url="http://127.0.0.1") as c:
        page = c.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert c.post("/login", data={"csrf": csrf, "token": "secret"}, follow_redirects=False).status_code == 303
        c.path = path
        yield c


def form_of(page: str) -> dict[str, str]:
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', page))


def test_a_post_without_the_sessions_csrf_token_is_refused_and_writes_nothing(client):
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    for csrf in ("", "forged"):
        answer = client.post("/receivers/apply", data={**edit, "csrf": csrf, "stream": "FULLFLOW", "PORT": "2000"})
        assert answer.status_code == 403
    assert client.post("/receivers/FULLFLOW/0/delete", data={"digest": edit["digest"]}).status_code == 403
    assert client.path.read_text() == ENV


def test_changing_the_receiver_type_moves_its_keys_to_the_new_stream(client):
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    answer = client.post("/receivers/apply", data={**edit, "stream": "DNSFLOW", "PORT_TYPE": "tcp",
                                                   "BALANCER": "All", "BALANCER_SUB_PROTO": "tcp",
                                                   "BALANCER_AUTO": "Disabled"})
    assert "written, but not applied: supervisor is not running" in answer.text  # no balancer in this test
    assert client.path.read_text() == (
        "# keep me\n\n# DNS flow receiver [0] (added in the console)\nIPFIX_DNSFLOW_PORT_TYPE[0]=tcp\n"
        "IPFIX_DNSFLOW_PORT[0]=1500\nIPFIX_DNSFLOW_BALANCER[0]=All\nIPFIX_DNSFLOW_BALANCER_SUB[0]=10.0.0.1/1\n"
        "IPFIX_DNSFLOW_BALANCER_SUB_PROTO[0]=tcp\nIPFIX_DNSFLOW_BALANCER_AUTO[0]=Disabled\n")


def test_a_problem_of_a_more_field_opens_more_and_names_the_field(client):
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    answer = client.post("/receivers/apply", data={**edit, "stream": "FULLFLOW", "BALANCER": "All",
                                                   "QUEUE_BYTES": "12"})
    assert answer.status_code == 422
    assert "<details open>" in answer.text
    assert "Queue bytes: IPFIX_FULLFLOW_QUEUE_BYTES[0]=&#39;12&#39;: expected an integer &gt;= 65536" in answer.text
    assert client.path.read_text() == ENV


JOURNAL = [  # what journalctl --output=json gives for logs.py's text lines under systemd, and a traceback line
    {"MESSAGE": "level='info' event='handler_started' stream='FULLFLOW' receiver=0 pid=7 "
                "subreceivers=['127.0.0.1/9901/tcp', '127.0.0.1/9902/tcp'] dpi_id=0",
     "PRIORITY": "6", "__REALTIME_TIMESTAMP": "1700000000000000"},
    {"MESSAGE": "Traceback (most recent call last):", "PRIORITY": "3", "__REALTIME_TIMESTAMP": "1700000001000000"},
]


def test_under_systemd_the_logs_page_reads_the_services_journal(client, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "journalctl"
    fake.parent.mkdir()
    (tmp_path / "journal.json").write_text("".join(json.dumps(line) + "\n" for line in JOURNAL))
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\ncat {tmp_path / 'journal.json'}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("INVOCATION_ID", "0123abcd")
    monkeypatch.setattr(logsource, "stdout_is_journal", lambda: True)
    page = client.get("/logs").text
    assert "from the journal" in page
    assert (tmp_path / "args").read_text().split()[0] == "_SYSTEMD_INVOCATION_ID=0123abcd"
    events = re.findall(r'<td class="event">([^<]*)</td>', page)
    assert events == ["Traceback (most recent call last):", "handler_started"]  # newest first
    assert "subreceivers=[&#39;127.0.0.1/9901/tcp&#39;, &#39;127.0.0.1/9902/tcp&#39;]" in page
    assert "2023-11-14 22:13:20" in page
    errors = client.get("/logs?level=error").text
    assert re.findall(r'<td class="event">([^<]*)</td>', errors) == ["Traceback (most recent call last):"]

    monkeypatch.undo()  # not under systemd: the log ring in the run dir
    (client.path.parent / "run" / "log.jsonl").write_text(json.dumps({"level": "info", "event": "from_ring"}) + "\n")
    assert re.findall(r'<td class="event">([^<]*)</td>', client.get("/logs").text) == ["from_ring"]


def test_the_journal_counts_only_when_journal_stream_names_our_stdout(monkeypatch):
    st = os.fstat(1)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logsource.stdout_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited, output elsewhere
    assert not logsource.stdout_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logsource.stdout_is_journal()


def test_a_refused_type_change_keeps_the_form_on_the_receiver_being_edited(client):
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    answer = client.post("/receivers/apply", data={**edit, "stream": "CLICKSTREAM", "BALANCER": "All",
                                                   "PORT": "x"})
    assert answer.status_code == 422 and "Port: IPFIX_CLICKSTREAM_PORT[0]=&#39;x&#39;" in answer.text
    again = form_of(answer.text)
    assert (again["original_stream"], again["index"]) == ("FULLFLOW", "0")
    answer = client.post("/receivers/apply", data={**again, "stream": "CLICKSTREAM", "BALANCER": "All",
                                                   "PORT": "1501"})
    assert "IPFIX_CLICKSTREAM_PORT[0]=1501\n" in client.path.read_text()
    assert "FULLFLOW" not in client.path.read_text()


def test_an_apply_the_supervisor_refuses_restores_the_file_and_shows_why(client, monkeypatch):
    """Transactional Apply: a new port another process holds is refused by the supervisor after the file
    was written; the file goes back to the running configuration and the page says so."""
    from ipfix_balancer.console import app as app_mod
    problem = "fullflow[0]: cannot listen on tcp 0.0.0.0:2000: address already in use by pid 7 (nc)"
    monkeypatch.setattr(app_mod.reload_mod, "request", lambda run_dir: app_mod.reload_mod.Outcome(
        generation=3, result="refused", config=str(client.path), problems=[problem]))
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    answer = client.post("/receivers/apply", data={**edit, "stream": "FULLFLOW", "PORT": "2000", "PORT_TYPE": "tcp",
                                                   "BALANCER": "All", "BALANCER_SUB_PROTO": "tcp",
                                                   "BALANCER_AUTO": "Disabled"})
    assert "reload refused, the running configuration stays" in answer.text
    assert problem in answer.text
    assert "was restored to the running configuration" in answer.text
    assert client.path.read_text() == ENV
    assert "IPFIX_FULLFLOW_PORT[0]=2000" in (client.path.parent / ".env.previous").read_text()


def test_apply_checks_a_subreceiver_on_the_listening_port_off_the_event_loop(client):
    """The manual's example sends Fullflow from port 1500 to collectors' port 1500: the checker then asks
    netlink whether the collector is this host (a loop), and pyroute2 refuses inside a running event loop."""
    client.path.write_text(ENV.replace("10.0.0.1/1", "10.0.0.1/1500"))
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    answer = client.post("/receivers/apply", data={**edit, "stream": "FULLFLOW", "PORT_TYPE": "tcp",
                                                   "BALANCER": "RoundRobin", "BALANCER_SUB_PROTO": "tcp",
                                                   "BALANCER_AUTO": "Disabled"})
    assert answer.status_code == 200, answer.text
    assert "cannot check the configuration" not in answer.text
    assert "IPFIX_FULLFLOW_BALANCER[0]=RoundRobin" in client.path.read_text()
