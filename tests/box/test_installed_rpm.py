"""The RPM as installed, under a real systemd: what an operator does, in a throw-away Debian 12 booted with
systemd as PID 1 (scripts/systemd-box).

The package is built from this checkout (scripts/build-rpm) and installed with rpm; the manual's example
configuration (etc/manual-example.env, without its CPU pinning) runs with the console on. The box's end of
its veth pair has the manual's DPI host address (10.19.3.2/24); the other end is moved into a network
namespace made here with the manual's collector addresses (10.19.3.21-24), where the collectors listen
and the exporters connect from: nothing of it is in the main namespace, nothing leaves the machine.

One box per module: the tests run in file order on the same installed service, as an operator would
(start, traffic, restart, reload, watchdog, console, stop); each asserts what it starts from. The only
change to what the RPM installs is a drop-in with a short WatchdogSec, so the watchdog test waits seconds,
not a minute. The cached Debian root is made once per machine (scripts/install-deps makes it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from ipfixkit import InNs, TcpExporter, TcpSink, extract_serials, link_up, make_stream, manual_receivers, \
    wait_until

REPO = Path(__file__).resolve().parents[2]
BOX = REPO / "scripts" / "systemd-box"
UNIT = "fast_ipfix_balancer"
CONFIG = "/var/fast_ipfix_balancer/backend/.env"
BAL_ADDR = "10.19.3.2"
COLLECTOR_ADDRS = ("10.19.3.21", "10.19.3.22", "10.19.3.23", "10.19.3.24")
WATCHDOG_SEC = 3

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="booting a container needs root")


def _manual_config() -> str:
    """The manual's example as written, less its CPUs 61-63 (this machine has 2), with the console on."""
    text = (REPO / "etc" / "manual-example.env").read_text()
    return ("".join(line for line in text.splitlines(keepends=True) if "_BALANCER_TASKSET[" not in line)
            + "IPFIX_BALANCER_CONSOLE=127.0.0.1/8480\n")


class Box:
    """A booted box: commands run in it as root (nsenter into all its namespaces)."""

    def __init__(self, state: Path, netns, col: str):
        self.state, self.netns, self.col = state, netns, col
        self.sinks: dict[str, list[TcpSink]] = {}
        self.next_serial = 0

    def sh(self, script: str, *, input: str | bytes | None = None, check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BOX), "exec", str(self.state), "sh", "-c", script], input=input,
                              capture_output=True, timeout=timeout, text=not isinstance(input, bytes))
        if check and done.returncode != 0:
            tail = subprocess.run([str(BOX), "exec", str(self.state), "journalctl", "-n", "30", "--no-pager"],
                                  capture_output=True, text=True, timeout=60).stdout
            raise AssertionError(f"{script}: exit {done.returncode}\n{done.stdout}\n{done.stderr}\n"
                                 f"--- journal (tail) ---\n{tail}")
        return done

    def out(self, script: str) -> str:
        done = self.sh(script)
        return done.stdout if isinstance(done.stdout, str) else done.stdout.decode()

    def show(self, prop: str) -> str:
        return self.out(f"systemctl show -p {prop} --value {UNIT}").strip()

    def journal(self) -> str:
        return self.out(f"journalctl -u {UNIT} --no-pager -o cat")

    def status(self) -> dict:
        return json.loads(self.out("ipfix-balancer status --json"))

    def handler(self, name: str) -> dict:
        return next(h for h in self.status()["handlers"] if h["name"] == name)

    def wait_handler(self, name: str, predicate) -> dict:
        """The handler's status once predicate(status) holds (documents are written once a second)."""
        def matched():
            h = self.handler(name)
            return h if predicate(h) else None
        return wait_until(matched, f"{name}'s status", timeout=20, diag=lambda: json.dumps(self.handler(name)))

    def in_col(self) -> InNs:
        """Sockets made in this block belong to the collectors' namespace."""
        return InNs(self.netns, self.col)

    def export(self, stream: str, port: int, n: int, exporter: TcpExporter | None = None) -> list[int]:
        """Send n data messages of 3 records (and the template) to the receiver on port; the serials sent."""
        first = self.next_serial
        self.next_serial += n * 3
        template, *data = make_stream(n, 3, first_serial=first)
        if exporter is None:
            with self.in_col(), TcpExporter(port, host=BAL_ADDR) as exporter:
                exporter.send([template] + data)
        else:
            exporter.send([template] + data)
        return list(range(first, first + n * 3))

    def delivered(self, stream: str, serials: list[int]) -> list[int]:
        """The given serials as the stream's collectors received them (all of them, in order of value)."""
        wanted = set(serials)

        def got():
            found = sorted(s for sink in self.sinks[stream] for s in extract_serials(sink.messages()) if s in wanted)
            return found if len(found) >= len(wanted) else None
        wait_until(got, f"{stream}: {len(wanted)} records at the collectors", timeout=30, diag=self.journal)
        for sink in self.sinks[stream]:
            sink.wait_quiet(0.3)
        return sorted(s for sink in self.sinks[stream] for s in extract_serials(sink.messages()) if s in wanted)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    for tool in ("systemd-nspawn", "debootstrap", "rpmbuild", "nsenter", "unshare"):
        assert shutil.which(tool), f"{tool} not found: scripts/install-deps installs it"
    from pyroute2 import IPRoute, netns
    tmp = tmp_path_factory.mktemp("box")
    built = subprocess.run([str(REPO / "scripts" / "build-rpm"), "-o", str(tmp / "dist")], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    rpm = Path(built.stdout.split()[-1])
    state = tmp / "state"
    booted = subprocess.run([str(BOX), "boot", str(state)], capture_output=True, text=True, timeout=300)
    assert booted.returncode == 0, booted.stderr
    col = f"ipfixbox-qoe{os.getpid() % 100000}"
    b = Box(state, netns, col)
    try:
        netns.create(col)
        veth = (state / "veth").read_text().strip()
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=veth)[0], net_ns_fd=col)
        link_up(col, veth, COLLECTOR_ADDRS)
        b.sh(f"ip link set lo up && ip addr add {BAL_ADDR}/24 dev host0 && ip link set host0 up")
        b.sh("cat > /root/balancer.rpm", input=rpm.read_bytes())
        b.sh("rpm -i --nodeps --force-debian /root/balancer.rpm")
        b.sh(f"cat > {CONFIG}", input=_manual_config())
        b.sh(f"mkdir -p /etc/systemd/system/{UNIT}.service.d && "
             f"printf '[Service]\\nWatchdogSec={WATCHDOG_SEC}\\n' > /etc/systemd/system/{UNIT}.service.d/test.conf "
             "&& systemctl daemon-reload")
        with b.in_col():
            for stream, (_port, subs) in manual_receivers(_manual_config()).items():
                b.sinks[stream] = [TcpSink(port, host=host).__enter__() for host, port in subs]
        yield b
    finally:
        for sinks in b.sinks.values():
            for sink in sinks:
                sink.__exit__(None, None, None)
        subprocess.run([str(BOX), "stop", str(state)], capture_output=True, timeout=60)
        if col in netns.listnetns():
            netns.remove(col)


def test_systemctl_start_waits_for_ready_and_every_record_reaches_the_manuals_collectors(box):
    start = time.monotonic()
    box.sh(f"systemctl start {UNIT}")
    took = time.monotonic() - start
    # Type=notify: start returns once the supervisor said READY=1, i.e. when every handler listens.
    assert box.show("Type") == "notify" and box.show("ActiveState") == "active", box.journal()
    assert all(h["listen"]["listening"] for h in box.status()["handlers"])
    assert box.show("StatusText").startswith("3/3 handlers healthy"), box.show("StatusText")
    assert took < 20
    for stream, (port, subs) in manual_receivers(_manual_config()).items():
        sent = box.export(stream, port, 12)
        assert box.delivered(stream, sent) == sent, f"{stream}: every record exactly once"
    for name in ("fullflow[0]", "clickstream[0]", "dnsflow[0]"):
        h = box.wait_handler(name, lambda h: h["msgs_in"] == 13)
        assert h["drops"] == 0, h
        assert sum(s["msgs_out"] for s in h["subreceivers"]) == 12 + len(h["subreceivers"]), h  # data + templates
    names = set(box.out("ps -eo comm").split())
    assert {"ipfix-balancer", "ipfix-fullflow", "ipfix-click", "ipfix-dnsflow", "ipfix-console"} <= names


def test_the_manuals_journal_command_shows_the_balancers_lines(box):
    lines = box.out("journalctl -xe --no-pager | grep IPFIXcol2").splitlines()
    assert any("event='handler_started'" in line and "stream='FULLFLOW'" in line for line in lines), lines[-5:]
    assert any("event='supervisor_started'" in line for line in lines)


def test_ipfix_balancer_restart_keeps_the_exporter_connected(box):
    port, _ = manual_receivers(_manual_config())["FULLFLOW"]
    main_pid = box.show("MainPID")
    old = box.handler("fullflow[0]")["pid"]
    with box.in_col():
        exporter = TcpExporter(port, host=BAL_ADDR)
    with exporter:
        before = box.export("FULLFLOW", port, 6, exporter)
        box.delivered("FULLFLOW", before)
        done = box.sh("ipfix-balancer-restart")
        assert "restarted in place" in done.stdout, done.stdout
        after = box.export("FULLFLOW", port, 6, exporter)
        assert box.delivered("FULLFLOW", after) == after
        new = box.wait_handler("fullflow[0]", lambda h: h["pid"] != old and h["msgs_in"] > 0)
    assert new["connections_total"] == 1, new  # the same exporter connection, adopted
    assert box.show("MainPID") == main_pid and box.show("NRestarts") == "0"  # systemd saw no restart


def test_systemctl_reload_applies_a_good_file_and_refuses_a_bad_one_or_an_unbindable_port(box):
    good = _manual_config()
    dns_port, _ = manual_receivers(good)["DNSFLOW"]
    dns = box.handler("dnsflow[0]")["pid"]
    box.sh(f"cat > {CONFIG}", input=good.replace("IPFIX_DNSFLOW_BALANCER[0]=RoundRobin", "IPFIX_DNSFLOW_BALANCER[0]=All"))
    box.sh(f"systemctl reload {UNIT}")
    assert box.wait_handler("dnsflow[0]", lambda h: h["mode"] == "All")["pid"] == dns
    sent = box.export("DNSFLOW", dns_port, 4)
    assert box.delivered("DNSFLOW", sent) == sorted(sent * 2), "All: each collector has every record"

    box.sh(f"cat > {CONFIG}", input=good.replace("IPFIX_DNSFLOW_PORT[0]=1101", "IPFIX_DNSFLOW_PORT[0]=notaport"))
    assert box.sh(f"systemctl reload {UNIT}", check=False).returncode != 0
    assert box.show("ActiveState") == "active"
    assert "expected a port number 1..65535" in box.journal()

    # The console listens on 127.0.0.1:8480: a receiver moved to port 8480 cannot bind it.
    box.sh(f"cat > {CONFIG}", input=good.replace("IPFIX_DNSFLOW_PORT[0]=1101", "IPFIX_DNSFLOW_PORT[0]=8480"))
    assert box.sh(f"systemctl reload {UNIT}", check=False).returncode != 0
    assert "dnsflow[0]: cannot listen on tcp 0.0.0.0:8480: address already in use" in box.journal()
    assert box.handler("dnsflow[0]")["pid"] == dns, "the old handler keeps serving"
    sent = box.export("DNSFLOW", dns_port, 4)
    assert box.delivered("DNSFLOW", sent) == sorted(sent * 2), "the running configuration (All) serves on"

    box.sh(f"cat > {CONFIG}", input=good)
    box.sh(f"systemctl reload {UNIT}")
    box.wait_handler("dnsflow[0]", lambda h: h["mode"] == "RoundRobin")


def test_the_watchdog_replaces_a_stopped_supervisor(box):
    main_pid = box.show("MainPID")
    box.sh(f"kill -STOP {main_pid}")
    wait_until(lambda: box.show("MainPID") not in ("0", main_pid) and box.show("ActiveState") == "active",
               "systemd to replace the stopped supervisor", timeout=WATCHDOG_SEC + 40, diag=box.journal)
    wait_until(lambda: all(h["listen"]["listening"] for h in box.status()["handlers"]) or None,
               "the new handlers to listen", timeout=30, diag=box.journal)
    assert "Watchdog timeout" in box.out(f"journalctl -u {UNIT} --no-pager")
    assert box.show("NRestarts") == "1"
    port, _ = manual_receivers(_manual_config())["CLICKSTREAM"]
    sent = box.export("CLICKSTREAM", port, 4)
    assert box.delivered("CLICKSTREAM", sent) == sent


CONSOLE_CLIENT = textwrap.dedent('''
    # Run in the box by its own python3: log in with the token file's token, then Apply one change.
    import http.cookiejar, re, sys, urllib.parse, urllib.request
    token = open(sys.argv[1]).read().strip()
    web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    url = "http://127.0.0.1:8480"
    def fields(page):
        return dict(re.findall(r'name="(\\w+)" value="([^"]*)"', page))
    def post(path, data):
        return web.open(url + path, urllib.parse.urlencode(data).encode(), timeout=30).read().decode()
    page = post("/login", {"csrf": fields(web.open(url + "/login", timeout=30).read().decode())["csrf"],
                           "token": token})
    assert "Receiver" in page, page
    form = fields(web.open(url + "/receivers/CLICKSTREAM/0/edit", timeout=30).read().decode())
    print(post("/receivers/apply", {**form, "stream": "CLICKSTREAM", "PORT_TYPE": "tcp", "BALANCER": "All",
                                    "BALANCER_SUB_PROTO": "tcp", "BALANCER_AUTO": "Disabled"}))
''')


def test_console_token_login_and_apply_work_under_the_shipped_unit(box):
    token_file = "/var/fast_ipfix_balancer/backend/console.token"
    assert re.fullmatch(r"[\w-]{40,}\n", box.out(f"cat {token_file}"))  # the README's `sudo cat`
    assert box.out(f"stat -c %a {token_file}").strip() == "600"
    page = box.out(f"python3 - {token_file} <<'EOF'\n{CONSOLE_CLIENT}\nEOF")
    assert "applied in place: clickstream[0]" in page, page[-2000:]
    assert "IPFIX_CLICKSTREAM_BALANCER[0]=All" in box.out(f"cat {CONFIG}")
    box.wait_handler("clickstream[0]", lambda h: h["mode"] == "All")
    port, _ = manual_receivers(_manual_config())["CLICKSTREAM"]
    sent = box.export("CLICKSTREAM", port, 4)
    assert box.delivered("CLICKSTREAM", sent) == sorted(sent * 2)


def test_systemd_analyze_security_rates_the_unit_below_2(box):
    text = box.out(f"systemd-analyze security {UNIT} --no-pager")
    level = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", text).group(1))
    assert level < 2.0, text[-3000:]


def test_systemctl_stop_is_clean(box):
    box.sh(f"systemctl stop {UNIT}")
    assert (box.show("ActiveState"), box.show("Result"), box.show("ExecMainStatus")) == ("inactive", "success", "0")
    assert "event='supervisor_stopped'" in box.journal() and "clean=True" in box.journal()
    assert box.sh("pgrep -u ipfix-balancer", check=False).returncode == 1, "nothing of the service is left"


def test_root_outside_systemd_drops_to_the_service_user_and_is_found_stopped_and_reloaded(box):
    """The README's fallback: root runs it by hand where the RPM made the service user."""
    env = "IPFIX_BALANCER_NO_SYSTEMD=1 IPFIX_BALANCER_LOG=/root/balancer.log"
    box.sh(f"{env} ipfix-balancer-restart")
    status = box.status()  # exit 0: it is found
    pid = status["supervisor_pid"]
    assert status["running"] and len(status["handlers"]) == 3, status
    assert box.out(f"ps -o user:20=,comm= -p {pid}").split() == ["ipfix-balancer", "ipfix-balancer"]
    assert "reloaded" in box.out("ipfix-balancer reload")
    box.sh("ipfix-balancer-stop")
    assert box.sh(f"kill -0 {pid}", check=False).returncode != 0
    assert box.sh("ipfix-balancer status", check=False).returncode == 1
