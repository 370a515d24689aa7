"""The README's first two commands, as a new user on a fresh Debian 12 runs them.

Command 1 runs in a copy of the repository (tracked files and new ones, no .venv) with the
distribution's python3 first on PATH (PATH=/usr/bin:/bin, no virtualenv, no PYTHON* variables): its
install part must make ./.venv from /usr/bin/python3 (whose own pip refuses to install, PEP 668); its
run part must start the three handlers of the shipped example. The balancer runs in a fresh network
namespace (``unshare --net``), so the example's fixed ports 1500/1501/1101 never collide with anything
on this machine; nothing is sent anywhere.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRO_PYTHON = "/usr/bin/python3"


def _readme_commands() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    commands = re.findall(r"^# (\d)\. .*\n(.+)$", block, re.M)
    assert [n for n, _ in commands] == ["1", "2"], block
    return commands[0][1].strip(), commands[1][1].strip()


def test_ci_runs_exactly_readme_command_2():
    _, command2 = _readme_commands()
    lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[-1] == command2
    assert command2.startswith("scripts/install-deps && ") and ".venv/bin/python -m pytest" in command2


def test_readme_command_1_uses_the_venv_and_no_shared_tmp():
    command1, _ = _readme_commands()
    install, run = command1.rsplit(" && ", 1)
    assert "/tmp" not in command1
    assert run.startswith(".venv/bin/ipfix-balancer run --config etc/fast_ipfix_balancer.env --run-dir "), run
    assert "pip install" not in install or ".venv" in install   # never the system pip (PEP 668)


def _copy_repo(dest: Path) -> None:
    """The checkout as a new user has it: tracked and new files (a plain copy outside git), no .venv or run dir."""
    skip = (".venv/", "run/", "dist/", "build/", ".git/")
    res = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         capture_output=True)
    if res.returncode == 0:
        files = [f for f in res.stdout.decode().split("\0") if f]
    else:
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() or p.is_symlink()]
        files = [f for f in files if "__pycache__" not in f and ".egg-info" not in f and "/.pytest_cache" not in f
                 and not f.startswith((".pytest_cache/", ".hypothesis/"))]
    for f in files:
        src = REPO / f
        if not src.exists() or f.startswith(skip):
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f, follow_symlinks=False)


def _fresh_user_env(home: Path) -> dict[str, str]:
    """A login shell's environment on stock Debian: the distribution's python3 first, no venv active."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYENV", "CONDA", "IPFIX_BALANCER_", "_IPFIX"))}
    env["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin"
    env["HOME"] = str(home)
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))  # offline-friendly
    # Hermetic: where the RPM made the service user, root would drop to it, who cannot read tmp_path.
    env["IPFIX_BALANCER_USER"] = ""
    return env


@pytest.mark.skipif(not os.path.exists(DISTRO_PYTHON), reason=f"{DISTRO_PYTHON} (Debian's python3) not installed")
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare to run the example's fixed ports in a private network namespace")
def test_readme_command_1_on_the_distribution_python(tmp_path):
    command1, _ = _readme_commands()
    install, run = command1.rsplit(" && ", 1)
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    (tmp_path / "home").mkdir()
    env = _fresh_user_env(tmp_path / "home")
    # The distribution's python3 is first on PATH, and its own pip refuses (the reason for the venv).
    which = subprocess.run(["bash", "-c", "command -v python3"], env=env, capture_output=True, text=True)
    assert which.stdout.strip() == DISTRO_PYTHON
    refused = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "click"], env=env, cwd=repo,
                             capture_output=True, text=True, timeout=120)
    if refused.returncode == 0:
        pytest.fail("the system pip installed into the distribution's python: not a stock Debian python3")

    res = subprocess.run(["bash", "-c", install], env=env, cwd=repo, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"install part failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    cfg = (repo / ".venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg, cfg
    assert os.path.realpath(repo / ".venv" / "bin" / "python") == os.path.realpath(DISTRO_PYTHON)

    log = tmp_path / "balancer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "--net", "bash", "-c", f"ip link set lo up && exec {run}"], env=env,
                                cwd=repo, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if text.count("handler_started") >= 3 or proc.poll() is not None:
                break
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert proc.poll() is None, f"exited {proc.returncode}:\n{text}"
        started = re.findall(r"event=handler_started.*", text) or [l for l in text.splitlines() if "handler_started" in l]
        assert len(started) == 3, text
        for port in ("1500", "1501", "1101"):
            assert any(port in line for line in started), (port, started)
        assert (repo / "run" / "supervisor.pid").exists(), sorted(p.name for p in (repo / "run").iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
