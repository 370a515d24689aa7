"""Files the product ships, rendered by ``python -m ipfix_balancer.render`` (Jinja2 templates in
ipfix_balancer/skel/, click's commands), and the hash-pinned lock files every install uses."""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipfix_balancer import render

REPO = Path(__file__).resolve().parents[1]


def _fix(name: str) -> str:
    return f"edit ipfix_balancer/skel/ or render.py, then: .venv/bin/python -m ipfix_balancer.render {name} > FILE"


def test_repo_unit_is_the_rendered_template():
    assert (REPO / "etc" / "systemd" / render.UNIT).read_text() == render.unit(), _fix("unit")


def test_repo_env_is_the_rendered_template():
    assert (REPO / "etc" / "fast_ipfix_balancer.env").read_text() == render.env(), _fix("env")


def test_shipped_env_is_the_manual_example_on_loopback():
    """The template's data is the manual's example: same keys, ports, modes, protocols, CPUs (commented out),
    the same number of collectors per stream, each on loopback instead of 10.19.3.x."""
    def keys(text: str) -> dict[str, str]:
        return dict(re.findall(r"^#?(IPFIX_\w+\[0\])=(.*)$", text, re.M))
    manual = keys((REPO / "etc" / "manual-example.env").read_text())
    shipped = keys(render.env())
    for key, value in manual.items():
        if key.endswith("_BALANCER_SUB[0]"):
            assert len(shipped[key].split(",")) == len(value.split(",")), key
            assert all(s.startswith("127.0.0.1/") for s in shipped[key].split(",")), shipped[key]
        else:
            assert shipped[key] == value, key
    assert re.search(r"^#IPFIX_FULLFLOW_BALANCER_TASKSET\[0\]=61$", render.env(), re.M)   # commented out


def test_unit_paths_are_the_products_defaults():
    from ipfix_balancer import config
    text = render.unit()
    assert f"Environment=IPFIX_BALANCER_CONFIG={config.DEFAULT_CONFIG_PATH}\n" in text
    assert "ExecStart=/usr/bin/ipfix-balancer run\n" in text
    # the console's Apply and token need the .env's directory (docs/operations.md "Console")
    assert (f"ReadWritePaths=-{config.DUMP_ROOT} -{os.path.dirname(config.DEFAULT_CONFIG_PATH)} "
            "/run/fast_ipfix_balancer\n") in text
    assert "{{" not in text and "{%" not in text


def test_env_man_page_has_an_entry_for_every_key():
    from ipfix_balancer.config import parse
    text = render.envman(date="2026-01-01")
    assert '.TH IPFIX\\-BALANCER.ENV 5 "2026-01-01" "fast_ipfix_balancer ' in text
    entries = [line for i, line in enumerate(text.splitlines()) if text.splitlines()[i - 1] == ".TP"]
    for param in parse.receiver_params():   # (BALANCER_TASKSET's entry adds "(alias TASKSET)")
        assert any(e.startswith(f"\\fBIPFIX_<STREAM>_{param}[i]\\fR") for e in entries), param
    for key in [*parse._GLOBALS, *parse._CONSOLE_KEYS]:
        assert f"\\fB{key}\\fR" in entries, key
    if shutil.which("groff"):
        done = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=text, capture_output=True, text=True)
        assert done.returncode == 0 and done.stderr == "", done.stderr


def test_man_page_documents_every_visible_command():
    from ipfix_balancer.cli import main
    text = render.man(date="2026-01-01")
    assert '.TH IPFIX\\-BALANCER 8 "2026-01-01" "fast_ipfix_balancer ' in text
    visible = [name for name, cmd in main.commands.items() if not cmd.hidden]
    assert visible
    for name in visible:
        assert f".SS {name.replace('-', chr(92) + '-')}\n" in text, name
        for param in main.commands[name].params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and not getattr(param, "hidden", False):
                    assert "\\fB" + opt.replace("-", "\\-") + "\\fR" in text, (name, opt)
    assert "handler" not in [line[4:] for line in text.splitlines() if line.startswith(".SS ")]   # hidden


def test_render_command_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ipfix_balancer.render", "all", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(render.FILES.values())
    assert (tmp_path / "ipfix-balancer").read_text().startswith("_ipfix_balancer_completion()")
    res = subprocess.run([sys.executable, "-m", "ipfix_balancer.render", "unit", "env"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2 and "--out-dir" in res.stderr


# --------------------------------------------------------------------------------------------- #
# Lock files
# --------------------------------------------------------------------------------------------- #


def _pins(path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file; every requirement must be one."""
    out = {}
    text = path.read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        lines = [l.strip() for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
        if not lines:
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", lines[0])
        assert m, f"{path.name}: not an exact pin: {lines[0]!r}"
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        assert hashes, f"{path.name}: {m.group(1)} has no hash"
        out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(2), hashes)
    return out


def _requirement_names(spec_lines: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", l.strip()).group(0)).lower()
            for l in spec_lines.splitlines() if l.strip()}


def test_lock_files_pin_every_declared_dependency_with_hashes():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    runtime = _requirement_names(cfg["options"]["install_requires"])
    test = _requirement_names(cfg["options.extras_require"]["test"])
    lock, test_lock, build_lock = (_pins(REPO / n) for n in
                                   ("requirements.lock", "requirements-test.lock", "requirements-build.lock"))
    assert runtime <= set(lock), runtime - set(lock)
    assert (runtime | test) <= set(test_lock), (runtime | test) - set(test_lock)
    # The tests run exactly what the RPM ships.
    for name, pin in lock.items():
        assert test_lock[name][0] == pin[0], f"{name}: {test_lock[name][0]} in the test lock, {pin[0]} shipped"
    assert {"setuptools", "wheel"} <= set(build_lock)
    # pyproject's build requirements are satisfied by the pinned backend.
    assert re.search(r'requires = \["setuptools>=61", "wheel"\]', (REPO / "pyproject.toml").read_text())


def test_this_venv_runs_the_locked_versions():
    """Under the repository's .venv (README command 2, .ci/run) the installed versions are the lock's."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not running in {REPO / '.venv'} (sys.prefix {sys.prefix})")
    from importlib.metadata import version
    for name, (pinned, _hashes) in _pins(REPO / "requirements-test.lock").items():
        assert version(name) == pinned, name
