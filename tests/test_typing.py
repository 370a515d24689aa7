"""The type check: ``mypy`` (from the test environment) with setup.cfg's ``[mypy]``, strict on the modules listed
in its ``files``. A listed module that no longer type-checks fails here with mypy's own report."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def mypy(*args: str) -> subprocess.CompletedProcess:
    """mypy as the README runs it: from the repository, with its configuration."""
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=REPO, capture_output=True, text=True)


def test_listed_modules_pass_mypy_strict():
    res = mypy()
    assert res.returncode == 0, f"mypy (setup.cfg [mypy]) found errors:\n{res.stdout}{res.stderr}"
    assert "Success" in res.stdout


def test_the_check_is_strict(tmp_path):
    """What the configuration makes mypy refuse: a function without annotations, a bare generic, an ignore
    that ignores nothing (each would pass plain mypy)."""
    planted = tmp_path / "planted.py"
    planted.write_text("def untyped(x):\n    return x\n\n\n"
                       "def bare(x: list) -> int:\n    return len(x)\n\n\n"
                       "y: int = 1  # type: ignore[assignment]\n")
    res = mypy(str(planted))
    assert res.returncode == 1, res.stdout + res.stderr
    for code in ("no-untyped-def", "type-arg", "unused-ignore"):
        assert f"[{code}]" in res.stdout, res.stdout


def test_the_implementations_satisfy_their_protocols(tmp_path):
    """A Protocol is checked only where its implementation is typed: the supervisor's ``Child`` (read by
    ``health.Watch.turn``) and the structlog logger (``logs.setup``, every ``log`` parameter) are not yet, so
    this planted use is what fails when one of them drifts from its Protocol."""
    planted = tmp_path / "conformance.py"
    planted.write_text("from ipfix_balancer import logs, supervisor\n"
                       "from ipfix_balancer.control import health\n\n\n"
                       "def child(c: supervisor.Child) -> health.Child:\n    return c\n\n\n"
                       "def log() -> logs.Log:\n    return logs.setup()\n")
    res = mypy(str(planted))
    assert res.returncode == 0, res.stdout + res.stderr
