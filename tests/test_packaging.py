"""Packaging: the RPM that scripts/build-rpm makes, and what an operator does with it.

The RPM is built once per session (scripts/build-rpm into a temporary dist dir; about 15 s with a
warm pip cache) and its payload unpacked with ``rpm2cpio | cpio -idm`` into a temporary root. The
product is then run *from that tree* (its venv, its launcher, its scripts; no PYTHONPATH, working
directory outside the repo), so these tests exercise what ``yum install`` puts on a host.

Skipped as a whole only when rpmbuild is missing (Debian package ``rpm``; .ci/run installs it).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from ipfixkit import TcpSink, free_port, make_stream, tcp_send, wait_until

REPO = Path(__file__).resolve().parents[1]
APPDIR = "/opt/fast_ipfix_balancer"
UNIT = "fast_ipfix_balancer.service"
CONFIG = "/var/fast_ipfix_balancer/backend/.env"
SCRIPTS = ("ipfix-balancer-stop", "ipfix-balancer-restart", "ipfix-balancer-status")
PYTHON = "/usr/bin/python3.11"   # the distribution's interpreter the venv is built from and links to
MANPAGE = "/usr/share/man/man8/ipfix-balancer.8"
ENV_MANPAGE = "/usr/share/man/man5/ipfix-balancer.env.5"
COMPLETION = "/usr/share/bash-completion/completions/ipfix-balancer"

pytestmark = pytest.mark.skipif(
    shutil.which("rpmbuild") is None,
    reason="rpmbuild not installed (Debian package 'rpm'; .ci/run installs it): the RPM cannot be built")


def _run(cmd, *, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _rpm_q(rpm_file: Path, *args: str) -> str:
    res = _run(["rpm", "-qp", *args, str(rpm_file)])
    assert res.returncode == 0, res.stderr
    return res.stdout


# --------------------------------------------------------------------------------------------- #
# Session fixtures: build once, unpack once
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def rpm_file(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    res = _run([str(REPO / "scripts" / "build-rpm"), "-o", str(outdir)], timeout=900, cwd=REPO)
    assert res.returncode == 0, f"scripts/build-rpm failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    rpms = sorted(outdir.glob("fast_ipfix_balancer-*.rpm"))
    assert len(rpms) == 1, f"expected one RPM in {outdir}: {rpms}"
    assert res.stdout.strip().splitlines()[-1] == str(rpms[0])   # build-rpm prints the path
    return rpms[0]


@pytest.fixture(scope="session")
def root(rpm_file, tmp_path_factory) -> Path:
    """The RPM's payload unpacked into a temporary root."""
    for tool in ("rpm2cpio", "cpio"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian packages rpm, cpio): cannot unpack the payload")
    root = tmp_path_factory.mktemp("root")
    res = subprocess.run(f"rpm2cpio '{rpm_file}' | cpio -idm --quiet", shell=True, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return root


def _product_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment an operator's shell would have: the payload's /usr/bin first, no dev PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "IPFIX_BALANCER_", "JOURNAL_STREAM", "VIRTUAL_ENV"))}
    env["PATH"] = f"{root}/usr/bin:{env.get('PATH', '/usr/bin:/bin')}"
    env["IPFIX_BALANCER_USER"] = ""  # hermetic: root stays root where the RPM made the service user
    env.update(extra)
    return env


def _config_text(port: int, sink_port: int, *, click_port: int | None = None) -> str:
    lines = [
        "IPFIX_FULLFLOW_PORT_TYPE[0]=tcp",
        "IPFIX_FULLFLOW_BIND[0]=127.0.0.1",
        f"IPFIX_FULLFLOW_PORT[0]={port}",
        "IPFIX_FULLFLOW_BALANCER[0]=All",
        f"IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink_port}",
        "IPFIX_FULLFLOW_BALANCER_SUB_PROTO[0]=tcp",
    ]
    if click_port is not None:
        lines += [
            "IPFIX_CLICKSTREAM_PORT_TYPE[0]=udp",
            "IPFIX_CLICKSTREAM_BIND[0]=127.0.0.1",
            f"IPFIX_CLICKSTREAM_PORT[0]={click_port}",
            "IPFIX_CLICKSTREAM_BALANCER[0]=RoundRobin",
            f"IPFIX_CLICKSTREAM_BALANCER_SUB[0]=127.0.0.1/{sink_port}",
            "IPFIX_CLICKSTREAM_BALANCER_SUB_PROTO[0]=tcp",
        ]
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone: detached processes are reaped by init)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=5)


# --------------------------------------------------------------------------------------------- #
# The package itself
# --------------------------------------------------------------------------------------------- #


def test_rpm_name_version_arch(rpm_file):
    name, version, arch = _rpm_q(rpm_file, "--qf", "%{NAME} %{VERSION} %{ARCH}").split()
    assert name == "fast_ipfix_balancer"
    setup_version = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)
    assert version == setup_version
    # Native arch, not noarch: the venv vendors psutil's compiled extension.
    native = _run(["rpm", "--eval", "%{_arch}"]).stdout.strip()
    assert arch == native
    assert rpm_file.name == f"fast_ipfix_balancer-{version}-1.{arch}.rpm"


def test_rpm_file_list(rpm_file):
    files = set(_rpm_q(rpm_file, "-l").split("\n"))
    expected = {
        f"{APPDIR}/bin/python", f"{APPDIR}/bin/ipfix-balancer", f"{APPDIR}/pyvenv.cfg",
        "/usr/bin/ipfix-balancer", *(f"/usr/bin/{s}" for s in SCRIPTS),
        f"/usr/lib/systemd/system/{UNIT}", CONFIG,
        "/var/fast_ipfix_balancer/dump", "/var/fast_ipfix_balancer/dump/fullflow",
        "/var/fast_ipfix_balancer/dump/clickstream", "/var/fast_ipfix_balancer/dump/dnsflow",
    }
    assert expected <= files, f"missing: {sorted(expected - files)}"
    site = f"{APPDIR}/lib/python3.11/site-packages"
    assert any(f.startswith(f"{site}/ipfix_balancer/cli.py") for f in files)
    for dep in ("click", "dotenv", "psutil", "structlog", "jinja2", "pyroute2"):
        assert any(f.startswith(f"{site}/{dep}/") for f in files), f"dependency {dep} not in the venv"
    assert any(f.endswith(".pyc") and "/ipfix_balancer/__pycache__/" in f for f in files), "no bytecode"
    # Nothing outside the product's own places (no stray /usr/lib/python3*, no build paths).
    allowed = (APPDIR, "/usr/bin/ipfix-balancer", "/usr/lib/systemd/system/", "/var/fast_ipfix_balancer", MANPAGE,
               ENV_MANPAGE,
               COMPLETION)
    stray = [f for f in files if f and not f.startswith(allowed)]
    assert not stray, stray
    # The venv is not vendoring pip or test tooling, nor activate scripts, tools of its dependencies or headers.
    assert not any(f"{site}/pip/" in f or f"{site}/pytest/" in f for f in files)
    assert {f for f in files if f.startswith(f"{APPDIR}/bin/")} == {
        f"{APPDIR}/bin/{name}" for name in ("ipfix-balancer", "python", "python3", "python3.11")}
    assert not any(f.startswith(f"{APPDIR}/include") for f in files)


def test_rpm_requires_the_distribution_python(rpm_file):
    """The venv links to /usr/bin/python3.11: the package must pull that interpreter in (yum resolves the
    file dependency to the distribution's python3.11 package), and nothing from the build host."""
    requires = [r.strip() for r in _rpm_q(rpm_file, "--requires").splitlines()]
    assert PYTHON in requires, requires
    assert "python(abi) = 3.11" in requires, requires
    assert not [r for r in requires if ".pyenv" in r or r.startswith(("/root", "/home", APPDIR))], requires


def test_venv_links_to_the_distribution_python(rpm_file, root):
    venv = root / APPDIR.lstrip("/")
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    assert cfg["home"] == str(Path(PYTHON).parent), cfg
    assert cfg.get("executable", PYTHON) == PYTHON, cfg
    assert cfg["version"].startswith("3.11."), cfg
    assert cfg["include-system-site-packages"] == "false", cfg
    # bin/python -> python3.11 -> /usr/bin/python3.11: follow the links inside the payload, the last one
    # leaves it for the target's own interpreter.
    link, hops = venv / "bin" / "python", 0
    while link.is_symlink() and str(link).startswith(str(venv)) and hops < 10:
        target = os.readlink(link)
        link, hops = (Path(target) if os.path.isabs(target) else link.parent / target), hops + 1
    assert str(link) == PYTHON, f"{venv}/bin/python ends at {link}"
    rows = _rpm_q(rpm_file, "--qf", "[%{FILENAMES}\t%{FILELINKTOS}\n]").splitlines()
    links = dict(r.split("\t") for r in rows)
    assert links[f"{APPDIR}/bin/python3.11"] == PYTHON, links[f"{APPDIR}/bin/python3.11"]


def test_venv_holds_exactly_the_locked_dependencies(root):
    """The RPM installs requirements.lock with --require-hashes: the venv has those versions and nothing else
    (no pip, setuptools or test tools)."""
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M))
    locked = {_norm(k): v for k, v in locked.items()}
    site = root / APPDIR.lstrip("/") / "lib" / "python3.11" / "site-packages"
    installed = {}
    for d in site.glob("*.dist-info"):
        meta = (d / "METADATA").read_text(errors="replace")
        name = re.search(r"^Name: (.+)$", meta, re.M).group(1).strip()
        installed[_norm(name)] = re.search(r"^Version: (.+)$", meta, re.M).group(1).strip()
    setup_version = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.M).group(1)
    assert installed == {**locked, "fast-ipfix-balancer": setup_version}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_build_refuses_an_interpreter_that_is_not_the_distributions(tmp_path):
    """A pyenv/virtualenv/other-version interpreter would give a package that installs and cannot start."""
    import sys
    res = _run([str(REPO / "scripts" / "build-rpm"), "-o", str(tmp_path), "--python", sys.executable], cwd=REPO)
    assert res.returncode != 0
    assert "refusing to build" in res.stderr and "not /usr" in res.stderr, res.stderr
    assert not list(tmp_path.glob("*.rpm"))
    res = _run([str(REPO / "scripts" / "build-rpm"), "-o", str(tmp_path), "--python", "/usr/bin/python3.99"], cwd=REPO)
    assert res.returncode != 0 and "not found" in res.stderr, res.stderr
    # The spec itself checks too (plain rpmbuild -bb), with the same words.
    spec = (REPO / "rpm" / "fast_ipfix_balancer.spec").read_text()
    assert "cannot build this package" in spec and 'sys.base_prefix != "/usr"' in spec


def test_man_page_and_completion(rpm_file, root, tmp_path):
    files = _rpm_q(rpm_file, "-l").splitlines()
    assert any(f in (MANPAGE, MANPAGE + ".gz") for f in files), files
    assert COMPLETION in files
    man = next(p for p in (root / MANPAGE.lstrip("/"), root / (MANPAGE + ".gz").lstrip("/")) if p.exists())
    text = man.read_text() if man.suffix == ".8" else __import__("gzip").decompress(man.read_bytes()).decode()
    assert text.startswith(".\\\"") and ".TH IPFIX\\-BALANCER 8 " in text
    # Every visible click command is documented, with its options (the page is generated from them).
    for command in ("run", "check\\-config", "status", "stop", "reload", "restart"):
        assert f".SS {command}\n" in text, command
    assert "\\fB\\-\\-config\\fR" in text and "/var/fast_ipfix_balancer/backend/.env" in text
    if shutil.which("groff"):
        res = _run(["groff", "-man", "-Tutf8", "-ww", str(man)])
        assert res.returncode == 0 and res.stderr == "", res.stderr
    # ipfix-balancer.env(5): every .env key (tests/test_render.py checks the text)
    assert any(f in (ENV_MANPAGE, ENV_MANPAGE + ".gz") for f in files), files
    # Bash completion: click's script, asking the installed command itself.
    script = root / COMPLETION.lstrip("/")
    probe = (f"source '{script}'; COMP_WORDS=(ipfix-balancer check); COMP_CWORD=1; "
             "_ipfix_balancer_completion ipfix-balancer; printf '%s\\n' \"${COMPREPLY[@]}\"; "
             "COMP_WORDS=(ipfix-balancer run --log-format ''); COMP_CWORD=3; COMPREPLY=(); "
             "_ipfix_balancer_completion ipfix-balancer; printf '%s\\n' \"${COMPREPLY[@]}\"")
    res = _run(["bash", "-c", probe], env=_product_env(root), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["check-config", "text", "json"], res.stdout + res.stderr


def test_rpm_modes_and_links(rpm_file):
    rows = _rpm_q(rpm_file, "--qf", "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILELINKTOS}\n]").splitlines()
    info = {r.split("\t")[0]: r.split("\t")[1:] for r in rows}
    perms, target = info["/usr/bin/ipfix-balancer"]
    assert perms.startswith("l") and target == f"../..{APPDIR}/bin/ipfix-balancer"  # relative: works in any root
    for s in SCRIPTS:
        assert info[f"/usr/bin/{s}"][0] == "-rwxr-xr-x"
    assert info[f"/usr/lib/systemd/system/{UNIT}"][0] == "-rw-r--r--"


def test_config_is_noreplace(rpm_file, root):
    assert _rpm_q(rpm_file, "--configfiles").split() == [CONFIG]
    flags = dict(line.split("\t") for line in
                 _rpm_q(rpm_file, "--qf", "[%{FILENAMES}\t%{FILEFLAGS:fflags}\n]").splitlines())
    assert "c" in flags[CONFIG] and "n" in flags[CONFIG], f"{CONFIG} flags {flags[CONFIG]!r}: want config(noreplace)"
    # Only the operator's .env is config: code and unit are replaced on upgrade.
    assert [f for f, fl in flags.items() if "c" in fl] == [CONFIG]
    # The shipped file is the repo's example config, and it validates.
    assert (root / CONFIG.lstrip("/")).read_text() == (REPO / "etc" / "fast_ipfix_balancer.env").read_text()
    res = _run([str(root / "usr/bin/ipfix-balancer"), "check-config", "--config", str(root / CONFIG.lstrip("/"))],
               env=_product_env(root), cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK, 3 receiver(s)" in res.stdout


def test_scriptlets_do_the_systemd_dance(rpm_file):
    scripts = _rpm_q(rpm_file, "--scripts")
    sections = dict(re.findall(r"^(\w+) scriptlet \(using [^)]*\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.M | re.S))
    assert {"postinstall", "preuninstall", "postuninstall"} <= set(sections), scripts
    # Our shell here; with systemd-rpm-macros (RHEL/Fedora) the %systemd_* macros' expansion.
    assert UNIT in sections["postinstall"]
    assert re.search(r"systemctl.*(preset|enable)|systemd-update-helper install", sections["postinstall"])
    # Erase (not upgrade): stop and disable.
    assert re.search(r"systemctl.*(disable|stop)|systemd-update-helper remove", sections["preuninstall"])
    # Upgrade: restart a running service with the new code.
    assert "ipfix-balancer restart" in sections["postuninstall"]  # in place, exporters stay connected
    assert "try-restart" in sections["postuninstall"]
    for name, body in sections.items():   # every scriptlet tolerates hosts without systemd
        assert "|| :" in body or "|| true" in body, f"{name} may fail the transaction:\n{body}"
    res = _run(["sh", "-n", "-c", sections["postinstall"]])
    assert res.returncode == 0, res.stderr


def test_payload_has_no_build_paths(root):
    """The venv was built under the buildroot; nothing in it may still point there."""
    res = _run(["grep", "-rlI", "BUILDROOT", str(root / APPDIR.lstrip("/"))])
    assert res.stdout == "", f"files still naming the buildroot:\n{res.stdout}"
    venv = root / APPDIR.lstrip("/")
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and os.access(script, os.X_OK):
            first = script.read_bytes().split(b"\n", 1)[0]
            assert first in (b"#!/bin/sh", f"#!{APPDIR}/bin/python".encode()), f"{script.name}: {first!r}"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert f"-m venv --without-pip {APPDIR}" in cfg or "command" not in cfg


# --------------------------------------------------------------------------------------------- #
# The unit
# --------------------------------------------------------------------------------------------- #


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_settings(root):
    text = (REPO / "etc" / "systemd" / UNIT).read_text()
    assert (root / "usr/lib/systemd/system" / UNIT).read_text() == text
    s = _unit_settings(text)
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] in ("simple", "notify")
    assert one["ExecStart"] == "/usr/bin/ipfix-balancer run"
    assert one["ExecReload"] == "/usr/bin/ipfix-balancer reload --main-pid $MAINPID"  # waits for the outcome: a bad file fails
    assert one["Restart"] == "on-failure"
    assert one["KillMode"] == "mixed"      # SIGTERM to the supervisor only: it orchestrates the drain
    assert int(one["TimeoutStopSec"]) > 15  # handlers drain 10 s, the supervisor kills them after 15 s
    assert "IPFIXcol2" in one["SyslogIdentifier"]   # the manual's `journalctl -xe | grep IPFIXcol2`
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict"
    assert one["User"] == one["Group"] == "ipfix-balancer" and one["RuntimeDirectoryMode"] == "0750"
    rw = " ".join(s["ReadWritePaths"])
    assert "/var/fast_ipfix_balancer/dump" in rw and "/run/fast_ipfix_balancer" in rw
    assert one["RuntimeDirectory"] == "fast_ipfix_balancer"
    assert one["LimitNOFILE"] == "65536"
    assert f"IPFIX_BALANCER_CONFIG={CONFIG}" in s["Environment"]
    assert one["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(root, tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    # verify checks that ExecStart and ExecReload exist: point them at the payload's launcher (same unit otherwise).
    text = (root / "usr/lib/systemd/system" / UNIT).read_text()
    for setting in ("ExecStart", "ExecReload"):
        text = text.replace(f"{setting}=/usr/bin/ipfix-balancer ", f"{setting}={root}/usr/bin/ipfix-balancer ")
    unit = tmp_path / UNIT
    unit.write_text(text)
    res = _run([exe, "verify", str(unit)])
    out = res.stdout + res.stderr
    if res.returncode != 0 and re.search(r"Failed to (initialize|set up) manager|not been booted with systemd|"
                                         r"Operation not permitted", out) and UNIT not in out:
        pytest.skip(f"systemd-analyze verify cannot run in this container: {out.strip()}")
    assert res.returncode == 0, out
    assert UNIT not in out, f"systemd-analyze verify warns about the unit:\n{out}"


# --------------------------------------------------------------------------------------------- #
# Running the installed product
# --------------------------------------------------------------------------------------------- #


def test_installed_balancer_forwards_a_message(root, tmp_path):
    with TcpSink() as sink:
        port = free_port()
        cfg = tmp_path / "balancer.env"
        cfg.write_text(_config_text(port, sink.port))
        run_dir = tmp_path / "run"
        log = tmp_path / "balancer.log"
        cmd = [str(root / "usr/bin/ipfix-balancer"), "run", "--config", str(cfg), "--run-dir", str(run_dir),
               "--log-format", "json"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_product_env(root), cwd=tmp_path, start_new_session=True)
        try:
            status_file = run_dir / "handler-fullflow-0.json"

            def ready():
                assert proc.poll() is None, f"exited {proc.returncode}\n{log.read_text()}"
                st = _read_json(status_file)
                return st if st and st["listen"]["listening"] else None

            st = wait_until(ready, "the handler to listen", timeout=20, diag=log.read_text)
            # It is the payload's venv that runs, not the repo's editable install.
            venv_python = str(root / APPDIR.lstrip("/") / "bin" / "python")
            for pid in (proc.pid, st["pid"]):
                cmdline = psutil.Process(pid).cmdline()
                assert cmdline[0] == venv_python and cmdline[1:3] == ["-m", "ipfix_balancer"], cmdline
            assert psutil.Process(st["pid"]).name() == "ipfix-fullflow"   # what `ps -o comm` shows
            assert psutil.Process(proc.pid).name() == "ipfix-balancer"

            messages = make_stream(1, 5)
            tcp_send(port, messages)
            assert sink.wait_messages(len(messages), timeout=10), log.read_text()
            assert sink.messages() == messages   # All: byte-identical
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait(5)


def test_journal_format_from_installed_launcher(root, tmp_path):
    """Under systemd (JOURNAL_STREAM set) lines carry <N> priorities and no timestamp of their own."""
    cfg = tmp_path / "broken.env"
    cfg.write_text("IPFIX_FULLFLOW_PORT_TYPE[0]=sctp\nIPFIX_FULLFLOW_PORT[0]=1500\n")
    cmd = [str(root / "usr/bin/ipfix-balancer"), "run", "--config", str(cfg), "--run-dir", str(tmp_path / "run")]
    res = _run(cmd, env=_product_env(root, JOURNAL_STREAM="8:12345"), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines, res.stderr
    for line in lines:
        assert line.startswith("<3>"), line
        assert "timestamp" not in line and not re.search(r"\d{4}-\d\d-\d\dT\d\d:", line), line
    assert any("config_invalid" in line and "sctp" in line for line in lines), lines
    # Outside the journal: timestamps, no priority prefix.
    res = _run(cmd, env=_product_env(root), cwd=tmp_path)
    assert res.returncode == 2
    assert all(line.startswith("timestamp=") for line in res.stdout.splitlines()), res.stdout


# --------------------------------------------------------------------------------------------- #
# ipfix-balancer-stop / -restart / -status without systemd (pid-file fallback)
# --------------------------------------------------------------------------------------------- #


class Scripts:
    def __init__(self, root: Path, tmp_path: Path):
        self.root = root
        self.config = tmp_path / "balancer.env"
        self.run_dir = tmp_path / "run"
        self.log = tmp_path / "balancer.log"
        self.env = _product_env(
            root, IPFIX_BALANCER_BIN=str(root / "usr/bin/ipfix-balancer"), IPFIX_BALANCER_CONFIG=str(self.config),
            IPFIX_BALANCER_RUN_DIR=str(self.run_dir), IPFIX_BALANCER_LOG=str(self.log),
            IPFIX_BALANCER_NO_SYSTEMD="1", IPFIX_BALANCER_START_TIMEOUT="30")
        self.cwd = tmp_path

    def __call__(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run([str(self.root / "usr/bin" / name), *args], env=self.env, cwd=self.cwd, timeout=timeout)

    def supervisor_pid(self) -> int | None:
        try:
            pid = int((self.run_dir / "supervisor.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def handler_pids(self) -> dict[str, int]:
        doc = _read_json(self.run_dir / "supervisor.json") or {}
        return {h["name"]: h["pid"] for h in doc.get("handlers", [])}

    def listening(self) -> dict[str, int]:
        """name -> pid of every handler whose status file says it listens."""
        out = {}
        for path in self.run_dir.glob("handler-*.json"):
            st = _read_json(path)
            if st and st["listen"]["listening"] and _alive(st["pid"]):
                out[st["name"]] = st["pid"]
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


@pytest.fixture
def scripts(root, tmp_path):
    s = Scripts(root, tmp_path)
    yield s
    pid = s.supervisor_pid()
    if pid is not None:   # the scripts start it detached: clean up what a failed test left
        _kill_tree(pid)


def test_scripts_fail_clearly_without_the_binary(root, tmp_path):
    env = _product_env(root, IPFIX_BALANCER_BIN=str(tmp_path / "nope"))
    for name in SCRIPTS:
        res = _run([str(root / "usr/bin" / name)], env=env, cwd=tmp_path)
        assert res.returncode == 127 and "not found" in res.stderr, (name, res.stderr)


def test_restart_stop_status_fallback(scripts):
    with TcpSink() as sink:
        port, click_port = free_port(), free_port("udp")
        good = _config_text(port, sink.port, click_port=click_port)
        scripts.config.write_text(good)

        res = scripts("ipfix-balancer-status")
        assert res.returncode == 1 and "NOT RUNNING" in res.stdout, res.stdout + res.stderr
        res = scripts("ipfix-balancer-stop")
        assert res.returncode == 0 and "not running" in res.stdout, res.stdout + res.stderr

        # restart when nothing runs = start; it returns once every handler listens.
        res = scripts("ipfix-balancer-restart")
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{scripts.log_text()}"
        sup = scripts.supervisor_pid()
        assert sup is not None
        handlers = scripts.handler_pids()
        assert set(handlers) == {"fullflow[0]", "clickstream[0]"}
        assert scripts.listening() == handlers, scripts.log_text()
        assert psutil.Process(sup).name() == "ipfix-balancer"
        assert os.getsid(sup) == sup, "not detached into its own session"

        messages = make_stream(1, 5)
        tcp_send(port, messages)
        assert sink.wait_messages(len(messages), timeout=10), scripts.log_text()

        res = scripts("ipfix-balancer-status")
        assert res.returncode == 0 and f"running, pid {sup}" in res.stdout, res.stdout + res.stderr

        # A broken config: refused, nothing touched.
        scripts.config.write_text(good.replace("BALANCER[0]=All", "BALANCER[0]=Sometimes"))
        res = scripts("ipfix-balancer-restart")
        assert res.returncode != 0
        assert "not restarted; the running balancer keeps running" in res.stderr, res.stderr
        assert "Sometimes" in res.stderr, res.stderr   # the problem is printed
        assert scripts.supervisor_pid() == sup
        assert scripts.handler_pids() == handlers
        assert all(_alive(p) for p in handlers.values())

        # A good config: restart in place (the supervisor re-executes itself, same pid), handlers come
        # back with new pids and listen; the old ones hand their sockets over and exit.
        scripts.config.write_text(good)
        res = scripts("ipfix-balancer-restart")
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{scripts.log_text()}"
        new_sup = scripts.supervisor_pid()
        assert new_sup == sup
        new_handlers = scripts.handler_pids()
        assert set(new_handlers) == set(handlers)
        assert not set(new_handlers.values()) & set(handlers.values())
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in handlers.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in handlers.values())
        assert scripts.listening() == new_handlers

        more = make_stream(1, 5, first_serial=100)
        tcp_send(port, more)
        assert sink.wait_messages(len(messages) + len(more), timeout=10), scripts.log_text()

        res = scripts("ipfix-balancer-stop")
        assert res.returncode == 0 and f"stopped supervisor {new_sup}" in res.stdout, res.stdout + res.stderr
        assert scripts.supervisor_pid() is None
        assert not any(_alive(p) for p in new_handlers.values())
        res = scripts("ipfix-balancer-status")
        assert res.returncode == 1
        assert "supervisor_started" in scripts.log_text()   # output went to $IPFIX_BALANCER_LOG


FAKE_SYSTEMCTL = """#!/usr/bin/env bash
# Stands in for systemctl: records the call, and does to the balancer what systemd would.
echo "$*" >> "$FAKE_SYSTEMCTL_LOG"
case "$1" in
    show) echo loaded ;;
    start) setsid "$IPFIX_BALANCER_BIN" run >>"$IPFIX_BALANCER_LOG" 2>&1 </dev/null & ;;
    stop) "$IPFIX_BALANCER_BIN" stop >/dev/null 2>&1 || true ;;
    status) echo "fake-systemctl: fast_ipfix_balancer.service active (running)" ;;
esac
"""


def test_scripts_use_systemctl_when_systemd_runs_the_unit(scripts, tmp_path):
    """The systemd branch, with a recording systemctl (this container has no systemd as PID 1)."""
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    (fake_bin / "systemctl").write_text(FAKE_SYSTEMCTL)
    (fake_bin / "systemctl").chmod(0o755)
    (tmp_path / "systemd-system").mkdir()
    calls = tmp_path / "systemctl.calls"
    del scripts.env["IPFIX_BALANCER_NO_SYSTEMD"]
    scripts.env.update(IPFIX_BALANCER_SYSTEMD_DIR=str(tmp_path / "systemd-system"), FAKE_SYSTEMCTL_LOG=str(calls),
                       PATH=f"{fake_bin}:{scripts.env['PATH']}")

    def called() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    port = free_port()
    good = _config_text(port, free_port())
    scripts.config.write_text(good)
    res = scripts("ipfix-balancer-restart")
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{scripts.log_text()}"
    assert f"start {UNIT}" in called()
    sup = scripts.supervisor_pid()
    assert sup is not None and scripts.listening() == scripts.handler_pids()

    scripts.config.write_text(good.replace(f"PORT[0]={port}", "PORT[0]=99999"))
    before = len(called())
    res = scripts("ipfix-balancer-restart")
    assert res.returncode != 0 and "not restarted; the running balancer keeps running" in res.stderr
    assert called()[before:] == [], "systemctl called on a broken config"
    assert scripts.supervisor_pid() == sup

    res = scripts("ipfix-balancer-status")
    assert res.returncode == 0 and "fake-systemctl:" in res.stdout and f"running, pid {sup}" in res.stdout

    res = scripts("ipfix-balancer-stop")
    assert res.returncode == 0, res.stderr
    assert f"stop {UNIT}" in called()
    assert scripts.supervisor_pid() is None
