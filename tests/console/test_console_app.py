"""The console app without a browser or a balancer (Starlette's TestClient): CSRF, and what Apply writes."""
import dataclasses
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
from ipfix_balancer.console import app as app_mod
from ipfix_balancer.console.app import LOGIN_FORM_SECONDS, MAX_BODY, ConsoleState, make_app

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


def cards_tables(page: str) -> dict[str, tuple[list[str], list[list[str]], list[str]]]:
    """Each ``table.cards`` of a page by kind: its header cells, each row's data-labels, its colspans."""
    tables = {}
    for kind, head, body in re.findall(r'<table class="cards (\w+)">\s*<thead>(.*?)</thead>(.*?)</table>', page, re.S):
        labels = [re.findall(r'<td data-label="([^"]+)"', row) for row in re.findall(r"<tr[ >].*?</tr>", body, re.S)]
        tables[kind] = (re.findall(r"<th>(.*?)</th>", head), labels, re.findall(r'colspan="(\d+)"', body))
    return tables


def test_every_status_table_labels_its_cells_with_its_columns_and_says_when_it_is_empty(client):
    """The header comes from a list of columns, each cell names its column (data-label, the narrow-screen
    card): they must agree, and the one row of an empty table spans every column."""
    from ipfix_balancer.control import rundir
    from ipfix_balancer.control.status import ExportTargetStatus, RecorderStatus
    run = str(client.path.parent / "run")
    empty = cards_tables(client.get("/status?part=table").text)
    assert empty["handlers"][1:] == ([[]], ["14"]) and len(empty["handlers"][0]) == 14
    doc = handler_doc(time.time(), 10, "down")
    doc["recorder"] = dataclasses.asdict(RecorderStatus(
        0, "/d", "f.ipfix", 4096, 0, 3, 7, 1.0, 30.0, 600, 0, 1, 2, "", 0, 3, 8192, 0, 0, 0, 1, "", 0,
        exports=[ExportTargetStatus("10.0.0.2/9920/tcp", "down", 2, 5, "refused")]))
    rundir.write_json(rundir.handler_status_path(run, "FULLFLOW", 0), doc)
    pages = {url: cards_tables(client.get(url).text)
             for url in ("/status?part=table", "/receivers/FULLFLOW/0?part=live", "/receivers/table")}
    kinds = {(url, kind) for url, tables in pages.items() for kind in tables}
    assert {kind for _, kind in kinds} == {"handlers", "subreceivers", "recorders", "exports", "sessions", "receivers"}
    for url, tables in pages.items():
        for kind, (columns, rows, spans) in tables.items():
            assert rows and not spans, (url, kind)
            for labels in rows:  # the receivers table's last column (actions) is a set of buttons, unlabelled
                assert labels == (columns[:-1] if kind == "receivers" else columns), (url, kind)
    assert "Receiver" in pages["/status?part=table"]["exports"][0]
    assert "Receiver" not in pages["/receivers/FULLFLOW/0?part=live"]["exports"][0]


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


# -- issue 20: hostile input before and after login ----------------------------------------------------------
class Lines(Log):
    def __init__(self):
        self.lines = []

    def warning(self, event, **kw):
        self.lines.append(event)

    info = warning


def fresh_app(tmp_path, log=None):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / ".env"
    path.write_text(ENV)
    (tmp_path / "run").mkdir(exist_ok=True)
    return make_app(ConsoleState(Console("127.0.0.1", 1, "", "", str(tmp_path / "token")), str(path),
                                 str(tmp_path / "run"), "secret", log or Log()))


def fresh_client(tmp_path, log=None) -> TestClient:
    return TestClient(fresh_app(tmp_path, log), base_url="http://127.0.0.1")


def login_csrf(c: TestClient) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)


def test_a_body_over_the_limit_is_refused_before_it_is_read(client):
    big = b"token=" + b"x" * MAX_BODY
    assert client.post("/login", content=big, headers={"content-type": "application/x-www-form-urlencoded"}
                       ).status_code == 413
    assert client.post("/login", content=b"", headers={"content-length": "9" * 20}).status_code == 413

    def streamed():  # no Content-Length: chunked, cut off once past the limit
        for _ in range(MAX_BODY // 1024 + 10):
            yield b"x" * 1024
    assert client.post("/login", content=streamed(),
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
    assert client.post("/receivers/apply", content=streamed(),
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
    assert client.get("/receivers").status_code == 200  # still logged in, still serving


def test_anonymous_visitors_make_no_session_and_cannot_log_the_operator_out(client, tmp_path):
    state = client.app.state.console
    assert len(state.sessions) == 1
    with TestClient(client.app, base_url="http://127.0.0.1") as anonymous:  # the same console, no cookie
        for _ in range(200):
            page = anonymous.get("/login")
            assert page.status_code == 200 and "set-cookie" not in page.headers
    assert len(state.sessions) == 1
    assert client.get("/receivers", follow_redirects=False).status_code == 200


def test_a_stale_or_forged_login_form_is_sent_back(client, monkeypatch):
    state = client.app.state.console
    old = state.login_csrf(time.time() - LOGIN_FORM_SECONDS - 1)
    for csrf in ("", "1.2", old, "9" * 5000 + ".x"):
        answer = client.post("/login", data={"csrf": csrf, "token": "secret"}, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/login"


def test_failed_logins_are_throttled_per_address_and_logged_through_the_throttle(tmp_path, monkeypatch):
    monkeypatch.setattr(app_mod, "WRONG_TOKEN_DELAY", 0.0)
    log = Lines()
    with fresh_client(tmp_path, log) as c:
        csrf = login_csrf(c)
        codes = [c.post("/login", data={"csrf": csrf, "token": f"guess{i}"}).status_code for i in range(200)]
        assert codes == [401] * 5 + [429] * 195
        # the right token is not even compared while the address is throttled
        assert c.post("/login", data={"csrf": csrf, "token": "secret"}).status_code == 429
    assert log.lines == ["console_login_failed", "console_login_throttled"], "one line per event per minute"


def test_the_overall_limit_holds_against_many_addresses(tmp_path, monkeypatch):
    monkeypatch.setattr(app_mod, "WRONG_TOKEN_DELAY", 0.0)
    app, codes = fresh_app(tmp_path), []
    for i in range(10):  # 10 addresses, 3 guesses each: past 20 failures everyone waits
        with TestClient(app, base_url="http://127.0.0.1", client=(f"192.0.2.{i}", 1)) as c:
            csrf = login_csrf(c)
            codes += [c.post("/login", data={"csrf": csrf, "token": "guess"}).status_code for _ in range(3)]
    assert codes == [401] * 20 + [429] * 10


def test_no_input_makes_an_http_500(client):
    edit = form_of(client.get("/receivers/FULLFLOW/0/edit").text)
    huge = "9" * 5000
    assert client.get(f"/receivers/FULLFLOW/{huge}/edit").status_code == 404
    assert client.post(f"/receivers/FULLFLOW/{huge}/delete", data={"csrf": edit["csrf"]}).status_code == 404
    answer = client.post("/receivers/apply", data={**edit, "stream": "FULLFLOW", "index": huge})
    assert answer.status_code < 500
    for name in [n for n in edit if n not in ("csrf", "digest")]:
        for value in (huge, "-" + huge, "\x00", "é" * 3000):
            answer = client.post("/receivers/apply", data={**edit, "stream": "FULLFLOW", name: value})
            assert answer.status_code < 500, (name, value[:10], answer.status_code)
    assert client.path.read_text() == ENV
