"""The web console in a real browser (Debian's chromium driven by playwright) against a real balancer:
login, the receiver table, the manual's three cases done in the form, refusals, delete, logs, status.

Each page's screenshot is saved to $CONSOLE_SCREENSHOTS (set it to docs/console to refresh the README's
"Console" section), else to a temporary directory: a test run leaves the tree as it was."""
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ipfixkit import TcpExporter, TcpSink, extract_serials, free_port, make_stream, wait_until

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "ipfix-balancer-console")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium not installed "
                                "(scripts/install-deps installs it)")

HEADER = """\
# The operator's header: this comment must survive every edit.

# Fullflow to the first collector
IPFIX_FULLFLOW_PORT[0]={port}
IPFIX_FULLFLOW_BIND[0]=127.0.0.1
IPFIX_FULLFLOW_BALANCER[0]=RoundRobin
IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink}
NOT_OURS=kept as it is

# The console
IPFIX_BALANCER_CONSOLE=127.0.0.1/{console}
IPFIX_BALANCER_CONSOLE_TOKEN_FILE={token}
"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


class Console:
    """A balancer with its console, and a browser page on it."""

    def __init__(self, balancer, browser, tmp_path, sink, more: str = ""):
        self.port, self.console_port = free_port(), free_port()
        self.token_path = tmp_path / "console.token"
        self.bal = balancer(HEADER.format(port=self.port, sink=sink.port, console=self.console_port,
                                          token=self.token_path) + more)
        self.bal.wait_ready()
        self.url = f"http://127.0.0.1:{self.console_port}"
        wait_until(lambda: self._http_status("/login") == 200, "the console to listen", self.bal)
        self.context = browser.new_context(viewport={"width": 1500, "height": 800})
        self.context.set_default_timeout(15_000)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.answer = True  # Delete asks first: the answer given, each question kept
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept() if self.answer else dialog.dismiss()

    def _http_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def login(self) -> None:
        self.page.goto(self.url + "/login")
        self.page.get_by_label("Token").fill(self.token_path.read_text().strip())
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_url("**/receivers")

    def row(self, name: str):
        return self.page.locator(f'tr[data-receiver="{name}"]')

    def fill(self, fields: dict[str, str]) -> None:
        for label, value in fields.items():
            control = self.page.get_by_label(label, exact=True)
            if control.evaluate("e => e.tagName") == "SELECT":
                control.select_option(label=value)
            else:
                control.fill(value)

    def apply(self) -> None:
        self.page.get_by_role("button", name="Apply").click()
        self.page.wait_for_load_state()

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(balancer, browser, tmp_path):
    with TcpSink() as sink:
        c = Console(balancer, browser, tmp_path, sink)
        c.sink = sink
        yield c
        c.close()


def test_login_wrong_token_refused_right_token_accepted_and_nothing_served_without_a_session(console):
    for path in ("/receivers", "/receivers/table", "/status", "/status?part=table", "/logs?part=table",
                 "/receivers/FULLFLOW/0/edit"):
        page = console.page.goto(console.url + path)
        assert page.url.endswith("/login"), path  # redirected: no configuration, status or log without login
        assert "IPFIX_FULLFLOW" not in console.page.content() and "handler" not in console.page.content()
    assert console.token_path.stat().st_mode & 0o777 == 0o600
    console.page.get_by_label("Token").fill("wrong-token")
    started = time.monotonic()
    console.page.get_by_role("button", name="Log in").click()
    assert console.page.get_by_role("alert").inner_text() == "Wrong token."
    assert time.monotonic() - started >= 0.9  # the delay after a wrong token
    assert console.page.url.endswith("/login")
    console.shot("login")
    console.login()
    cookie = next(c for c in console.context.cookies() if c["name"] == "ipfix_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    row = console.row("fullflow[0]")
    pid = console.bal.handler_pid("fullflow[0]")
    assert row.locator(".port").inner_text() == str(console.port)
    assert f"up, pid {pid}" in row.inner_text()
    assert f"127.0.0.1/{console.sink.port}/tcp" in row.inner_text()


def test_the_manuals_three_cases_in_the_form_start_receivers_without_touching_the_running_one(console, tmp_path):
    """Replication (All), Load Balancing (RoundRobin) and Recording (Disabled), each added with the manual's
    fields; each new receiver listens and forwards (or records) while fullflow[0] keeps its pid."""
    console.login()
    pid = console.bal.handler_pid("fullflow[0]")
    before = console.bal.config_path.read_text()
    ports = {"All": free_port(), "RoundRobin": free_port(), "Disabled": free_port()}
    dump_dir = tmp_path / "dumps"
    with TcpSink() as a, TcpSink() as b, TcpSink() as c, TcpSink() as d:
        cases = [("Clickstream", "All", [a, b]), ("DNS flow", "RoundRobin", [c, d]), ("Netflow", "Disabled", [])]
        for title, mode, sinks in cases:
            console.page.get_by_role("button", name="+ Add receiver").click()
            console.fill({"Receiver type": title, "Port type": "tcp", "Port": str(ports[mode]), "Balancer": mode,
                          "Balancer subreceivers": ",".join(f"127.0.0.1/{s.port}" for s in sinks),
                          "Balancer subreceivers type": "tcp", "Balancer auto": "Disabled",
                          "Rotate in minutes": "0", "Rotate in seconds": "0", "Rotate by flows": "0", "Export": "",
                          "DPI ID": "-1"})
            console.page.get_by_text("More").click()  # the collapsed settings the manual's form lacks
            console.fill({"Bind address": "127.0.0.1"})
            if mode == "Disabled":
                console.fill({"Dump directory": str(dump_dir)})
                console.shot("form")
            console.apply()
            outcome = console.page.get_by_role("status").inner_text()
            assert "handlers started:" in outcome, console.page.content()

        console.bal.wait_ready()  # the outcome says a handler was started, not that it listens yet
        stream = make_stream(40, records_per_message=2)
        for port in ports.values():
            with TcpExporter(port) as exporter:
                exporter.send(stream)
        assert a.wait_messages(41) and b.wait_messages(41)  # All: every message to both
        assert c.wait_messages(10) and d.wait_messages(10)
        assert c.wait_quiet() and d.wait_quiet()
        assert sorted(extract_serials(c.messages()) + extract_serials(d.messages())) == list(range(80))
        assert extract_serials(a.messages()) == extract_serials(b.messages()) == list(range(80))
        console.bal.wait_status("fullflow[1]", lambda s: s["recorder"]["file_msgs"] == 41)
        console.page.goto(console.url + "/receivers")  # the table joined with the live state of all four
        wait_until(lambda: console.page.locator("td.up").count() == 4, "four handlers up in the table", console.bal)
        console.shot("receivers")
    assert console.bal.handler_pid("fullflow[0]") == pid, "the running handler must not be restarted"
    after = console.bal.config_path.read_text()
    assert after.startswith(before), "existing lines (comments, order, unmanaged keys) are kept"
    assert "IPFIX_CLICKSTREAM_BALANCER[0]=All\n" in after and f"IPFIX_FULLFLOW_DUMP_DIR[1]={dump_dir}\n" in after


def test_refusals_edit_delete_logs_and_status(console):
    console.login()
    path = console.bal.config_path
    pid = console.bal.handler_pid("fullflow[0]")
    console.row("fullflow[0]").get_by_role("link", name="Edit").click()

    original = path.read_bytes()  # an invalid Port: refused next to the field, nothing written
    console.fill({"Port": "notaport"})
    console.apply()
    error = console.page.locator("#port-error")
    assert error.inner_text() == "Port: IPFIX_FULLFLOW_PORT[0]='notaport': expected a port number 1..65535"
    port = console.page.get_by_label("Port", exact=True)  # announced and focused, for a screen reader too
    assert error.get_attribute("role") == "alert" and port.get_attribute("aria-invalid") == "true"
    assert "port-error" in port.get_attribute("aria-describedby")
    assert console.page.evaluate("document.activeElement.id") == "port"
    console.shot("form-error")
    assert path.read_bytes() == original

    with TcpSink() as second:  # a good edit: only that line changes, comments survive, applied in place
        console.fill({"Port": str(console.port),
                      "Balancer subreceivers": f"127.0.0.1/{console.sink.port},127.0.0.1/{second.port}"})
        console.apply()
        assert console.page.get_by_role("status").inner_text().splitlines()[1] == "applied in place: fullflow[0]"
        assert path.read_bytes() == original.replace(
            f"SUB[0]=127.0.0.1/{console.sink.port}\n".encode(),
            f"SUB[0]=127.0.0.1/{console.sink.port},127.0.0.1/{second.port}\n".encode())
        assert (path.parent / (path.name + ".previous")).read_bytes() == original
        assert console.bal.handler_pid("fullflow[0]") == pid
        applied = path.read_bytes()  # Post/Redirect/Get: a refresh shows the table, submits and writes nothing
        assert console.page.url == console.url + "/receivers"
        console.page.reload()
        assert console.page.get_by_role("status").count() == 0 and path.read_bytes() == applied

    console.row("fullflow[0]").get_by_role("link", name="Edit").click()  # changed on disk meanwhile
    edited = path.read_bytes() + b"# an operator's edit in a shell\n"
    path.write_bytes(edited)
    console.fill({"Rotate in minutes": "5"})
    console.apply()
    assert "changed on disk since this form was loaded" in console.page.get_by_role("alert").first.inner_text()
    assert path.read_bytes() == edited

    console.page.goto(console.url + "/receivers")
    console.row("fullflow[0]").get_by_role("button", name="Delete").click()
    console.page.wait_for_load_state()
    assert "handlers stopped: fullflow[0]" in console.page.get_by_role("status").inner_text()
    assert console.row("fullflow[0]").count() == 0
    wait_until(lambda: not any(h["name"] == "fullflow[0]" for h in console.bal.supervisor()["handlers"]),
               "fullflow[0] to stop", console.bal)
    with pytest.raises(OSError):
        TcpExporter(console.port, timeout=2)
    assert b"# an operator's edit in a shell\n" in path.read_bytes() and b"NOT_OURS=kept" in path.read_bytes()

    console.page.get_by_role("link", name="Logs").click()
    console.page.wait_for_url("**/logs")
    assert console.page.get_by_role("heading").inner_text() == "IPFIX-balancer Logs"
    events = console.page.locator("td.event")
    assert "handler_started" in events.all_inner_texts()
    console.shot("logs")
    console.page.get_by_label("Level").select_option("error")
    console.page.get_by_role("button", name="Filter").click()
    console.page.wait_for_url("**level=error")
    assert "handler_started" not in console.page.locator("td.event").all_inner_texts()

    console.page.get_by_label("Level").select_option("")
    console.page.get_by_label("Search").fill("RELOADED")  # found in any field, whatever the case
    console.page.get_by_role("button", name="Filter").click()
    console.page.wait_for_url("**q=RELOADED&*")
    assert set(console.page.locator("td.event").all_inner_texts()) == {"reloaded"}
    assert any("removed=['fullflow[0]']" in t for t in console.page.locator("td.details").all_inner_texts())

    console.page.get_by_role("link", name="Status").click()
    assert "running" in console.page.locator("p.supervisor").inner_text()
    assert all((SHOTS / f"{n}.png").stat().st_size > 1000 for n in ("logs", "form-error"))


def overflow(page) -> int:
    """How far the document is wider than the viewport (0: no horizontal scrolling)."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_charts_fill_with_traffic_a_collector_going_down_shows_at_once_and_pages_fit_1280_and_420_px(
        balancer, browser, tmp_path):
    """A receiver's page charts its traffic; stopping its collector turns the subreceiver down in the table
    and on the chart's state band within the refresh; no page scrolls sideways at 1,280 or 420 px; Delete
    names the receivers it renumbers before anything happens."""
    with TcpSink() as sink, TcpSink() as other:
        more = "".join(f"IPFIX_FULLFLOW_PORT[{i}]={free_port()}\nIPFIX_FULLFLOW_BIND[{i}]=127.0.0.1\n"
                       f"IPFIX_FULLFLOW_BALANCER[{i}]=All\nIPFIX_FULLFLOW_BALANCER_SUB[{i}]=127.0.0.1/{other.port}\n"
                       for i in (1, 2))
        console = Console(balancer, browser, tmp_path, sink, more)
        try:
            console.login()
            page = console.page
            with TcpExporter(console.port) as exporter:
                exporter.send(make_stream(200, records_per_message=2), delay=0.005)
                assert sink.wait_messages(201)
                page.goto(console.url + "/receivers/FULLFLOW/0")
                line = page.locator('[data-chart="fullflow[0]"] path[data-metric="msgs_in"]')
                wait_until(lambda: int(line.get_attribute("data-points")) >= 1, "a rate on the chart", console.bal)
                session = page.locator("table.sessions td.addr")
                wait_until(lambda: session.count() == 1, "the exporter session listed", console.bal)
                assert session.inner_text() == f"127.0.0.1:{exporter.local_port}"
                assert page.locator("table.sessions td[data-label=ODIDs]").inner_text() == "1"
                count = page.locator("table.sessions td[data-label=Messages]")
                wait_until(lambda: count.inner_text() == "201", "the session's 201 messages", console.bal)
                assert page.locator("tr[data-subreceiver] td[data-label=State]").inner_text() == "up"

                sink.down()
                started = time.monotonic()
                exporter.send(make_stream(20, first_serial=400, with_template=False), delay=0.01)  # the balancer finds out by writing
                state = page.locator("tr[data-subreceiver] td[data-label=State]")
                band = page.locator(f'[data-chart="fullflow[0] 127.0.0.1/{sink.port}/tcp"] rect.st-down')
                wait_until(lambda: state.inner_text() == "down" and band.count() > 0,
                           "the collector down in the table and on the chart", console.bal, timeout=15)
                # the status document (1 s), a sample (2 s) and the page's refresh (3 s), with slack
                assert time.monotonic() - started < 9
                console.shot("receiver-collector-down")

            for width in (1280, 420):
                page.set_viewport_size({"width": width, "height": 900})
                for path, name in (("/receivers", "receivers"), ("/receivers/FULLFLOW/0", "receiver"),
                                   ("/status", "status"), ("/logs", "logs"), ("/receivers/FULLFLOW/1/edit", "form")):
                    page.goto(console.url + path)
                    assert overflow(page) <= 0, f"{path} at {width} px scrolls sideways by {overflow(page)} px"
                    if (name, width) in (("receivers", 420), ("status", 1280)):
                        console.shot(name if width == 1280 else f"{name}-{width}")

            page.set_viewport_size({"width": 1280, "height": 900})
            page.goto(console.url + "/receivers")
            before = console.bal.config_path.read_bytes()
            console.answer = False
            console.row("fullflow[0]").get_by_role("button", name="Delete").click()
            question = console.dialogs[-1]
            assert question.startswith("Delete Netflow [0] (fullflow[0])? Its handler stops")
            assert "renumbers:\n- fullflow[1]: DPI ID 1 becomes 0\n- fullflow[2]: DPI ID 2 becomes 1" in question
            assert console.bal.config_path.read_bytes() == before  # cancelled: nothing written
        finally:
            console.close()
