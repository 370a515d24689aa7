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


def test_an_entry_is_checked_field_by_field(tmp_path):
    """``core.entry.Entry`` is a precise tuple and its indexes are constants mypy reads: an entry built in the
    wrong order, or a field used as another, fails the check (a bare ``tuple`` alias let both through)."""
    planted = tmp_path / "entries.py"
    planted.write_text("from ipfix_balancer.core.entry import MSG, NREC, Entry\n"
                       "from ipfix_balancer.core.sendqueue import SendQueue\n\n\n"
                       "def swapped(queue: SendQueue, entry: Entry) -> None:\n"
                       "    queue.enqueue((entry[NREC], entry[MSG], entry[NREC], entry[3]))\n\n\n"
                       "def size(entry: Entry) -> int:\n    return len(entry[NREC])\n")
    res = mypy(str(planted))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "entries.py:6: error: Argument 1 to \"enqueue\"" in res.stdout, res.stdout
    assert "entries.py:10: error: Argument 1 to \"len\"" in res.stdout, res.stdout
    assert res.stdout.count("error:") == 2, res.stdout
