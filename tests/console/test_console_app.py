"""The console app without a browser or a balancer (Starlette's TestClient): CSRF, and what Apply writes."""
import json
import os
import re
import time
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
    assert "Queue size per subreceiver (bytes): IPFIX_FULLFLOW_QUEUE_BYTES[0]=&#39;12&#39;: expected an integer &gt;= 65536" in answer.text
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
    events = re.findall(r'class="event">([^<]*)</td>', page)
    assert events == ["Traceback (most recent call last):", "handler_started"]  # newest first
    assert "subreceivers=[&#39;127.0.0.1/9901/tcp&#39;, &#39;127.0.0.1/9902/tcp&#39;]" in page
    assert "2023-11-14 22:13:20" in page
    errors = client.get("/logs?level=error").text
    assert re.findall(r'class="event">([^<]*)</td>', errors) == ["Traceback (most recent call last):"]

    monkeypatch.undo()  # not under systemd: the log ring in the run dir
    (client.path.parent / "run" / "log.jsonl").write_text(json.dumps({"level": "info", "event": "from_ring"}) + "\n")
    assert re.findall(r'class="event">([^<]*)</td>', client.get("/logs").text) == ["from_ring"]


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


def test_apply_and_delete_redirect_so_a_refresh_submits_nothing_and_the_outcome_shows_once(client):
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    answer = client.post("/receivers/apply", data={**edit, "stream": "FULLFLOW", "BALANCER": "All", "PORT": "1600"},
                         follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/receivers")
    page = client.get("/receivers").text
    assert "written, but not applied: supervisor is not running" in page
    assert "written, but not applied" not in client.get("/receivers").text  # a refresh: the table alone
    digest = form_of(client.get("/receivers/FULLFLOW/0/edit").text)["digest"]
    answer = client.post("/receivers/FULLFLOW/0/delete", data={"csrf": edit["csrf"], "digest": digest},
                         follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/receivers")
    assert "IPFIX_FULLFLOW" not in client.path.read_text()


def test_delete_names_the_receivers_it_renumbers_and_their_dump_names(client):
    client.path.write_text(
        "IPFIX_FULLFLOW_PORT[0]=1500\nIPFIX_FULLFLOW_PORT[1]=1600\nIPFIX_FULLFLOW_DPI_ID[1]=-1\n"
        "IPFIX_FULLFLOW_PORT[2]=1700\nIPFIX_FULLFLOW_DPI_ID[2]=7\nIPFIX_FULLFLOW_PORT[3]=1800\n"
        "IPFIX_FULLFLOW_PORT[4]=1900\nIPFIX_FULLFLOW_BALANCER[4]=All\nIPFIX_FULLFLOW_BALANCER_SUB[4]=10.0.0.1/1\n"
        "IPFIX_CLICKSTREAM_PORT[0]=1501\n")
    page = client.get("/receivers").text
    confirms = dict(re.findall(r'action="/receivers/(\w+/\d)/delete" class="inline"\s+data-confirm="([^"]*)"', page))
    first = confirms["FULLFLOW/0"].replace("&#10;", "\n")
    assert "fullflow[1]: DPI ID 1 becomes 0; its dump files are named fullflow_0_… instead of fullflow_1_…" in first
    assert "fullflow[3]: DPI ID 3 becomes 2; its dump files are named fullflow_2_… instead of fullflow_3_…" in first
    assert "fullflow[2]" not in first and "clickstream" not in first  # a set DPI ID, another stream: unchanged
    assert first.endswith("\n- fullflow[4]: DPI ID 4 becomes 3")  # it forwards: no dump file to rename
    assert "renumbers" not in confirms["FULLFLOW/4"] and "renumbers" not in confirms["CLICKSTREAM/0"]


def test_every_receiver_setting_has_a_field_with_a_written_label_and_the_manuals_receiver_types():
    from ipfix_balancer.config import receiver_params
    from ipfix_balancer.console import fields
    assert sorted(f.param for f in fields.FIELDS) == sorted(receiver_params())
    assert all(f.label != f.param.replace("_", " ").capitalize() for f in fields.MORE)
    assert [title for _, title in fields.stream_choices()] == ["Netflow", "Clickstream", "DNS flow"]


def test_logs_search_finds_a_value_in_any_field_and_download_gives_the_matching_lines(client):
    ring = client.path.parent / "run" / "log.jsonl"
    ring.write_text("".join(json.dumps(d) + "\n" for d in (
        {"level": "info", "event": "handler_started", "stream": "FULLFLOW", "listen": "0.0.0.0/1500/tcp"},
        {"level": "warning", "event": "subreceiver_down", "stream": "FULLFLOW", "endpoint": "10.0.0.9/9920/tcp"},
        {"level": "info", "event": "handler_started", "stream": "DNSFLOW", "listen": "0.0.0.0/1502/tcp"})))
    page = client.get("/logs?q=10.0.0.9/9920").text
    assert re.findall(r'class="event">([^<]*)</td>', page) == ["subreceiver_down"]
    assert re.findall(r'class="event">([^<]*)</td>', client.get("/logs?q=HANDLER_STARTED&stream=DNSFLOW").text) \
        == ["handler_started"]
    assert 'href="/logs/download?stream=&amp;level=&amp;q=10.0.0.9/9920"' in page
    got = client.get("/logs/download?q=handler_started")
    assert got.headers["content-disposition"].startswith('attachment; filename="ipfix-balancer-logs-')
    assert [json.loads(line)["listen"] for line in got.text.splitlines()] == ["0.0.0.0/1500/tcp", "0.0.0.0/1502/tcp"]


def handler_doc(t: float, msgs_in: int, sub_state: str) -> dict:
    from ipfix_balancer.control.status import (ExporterSessionStatus, HandlerStatus, ListenStatus,
                                               SubreceiverStatus)
    sub = SubreceiverStatus("10.0.0.1/1/tcp", sub_state, 1, msgs_in, msgs_in * 100, 3, 4096,
                            last_error="connection refused" if sub_state == "down" else "",
                            drops_by_reason={"connection_lost": 3})
    return HandlerStatus(stream="FULLFLOW", index=0, name="fullflow[0]", pid=os.getpid(), started=t - 90, time=t,
                         listen=ListenStatus("tcp", "0.0.0.0", 1500, True), mode="All", dpi_id=0, cpu=None,
                         msgs_in=msgs_in, bytes_in=msgs_in * 100, malformed=0, malformed_by_reason={},
                         unknown_template=0, connections=1, connections_total=1, drops=3, subreceivers=[sub],
                         drops_by_reason={"connection_lost": 3}, draining=2, draining_bytes=2048,
                         sessions=[ExporterSessionStatus("192.0.2.7:40000", t - 65, [1, 5], 1234)]).to_dict()


def test_a_receivers_page_charts_its_history_and_lists_its_exporter_sessions(client):
    from ipfix_balancer.control import rundir
    from ipfix_balancer.control import status as status_mod
    console = client.app.state.console
    run = str(client.path.parent / "run")
    now = time.time() - 5  # the looks are in the past of the page's "now"
    for i, state in enumerate(("up", "up", "down")):  # three looks, 2 s apart: 100 messages/s
        rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 0), handler_doc(now + 2 * i, 200 * i, state))
        console.sample(status_mod.collect(run), now + 2 * i)
    page = client.get("/receivers/FULLFLOW/0?part=live").text
    points = dict(re.findall(r'data-metric="([^"]+)" data-points="(\d+)"', page))
    assert int(points["msgs_in"]) >= 1 and int(points["bytes_out"]) >= 1 and int(points["drops:connection_lost"]) >= 1
    assert "in: 100 msg/s" in page and 'class="state st-down"' in page  # the collector down in the band
    assert re.search(r'192\.0\.2\.7:40000</td>\s*<td data-label="Since \(UTC\)">[^<]+</td>\s*'
                     r'<td data-label="For">1 min \d+ s</td>\s*<td data-label="Messages">1234</td>\s*'
                     r'<td data-label="ODIDs">1, 5</td>', page)
    status = client.get("/status?part=table").text
    assert re.search(r'data-label="State" class="state-down">down</td>', status)
    assert "connection refused" in status and "connection_lost: 3" in status
    assert "<figcaption>fullflow[0]: Messages/s</figcaption>" in status  # the overview chart
    assert '<td data-label="Exporter sessions">1 <span class="hint">(+2 draining, 2.0 KiB)</span></td>' in status
