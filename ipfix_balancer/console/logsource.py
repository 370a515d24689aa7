"""Where the Logs page reads: the service's journal under systemd, otherwise the log ring in the run directory
(``logs.py`` appends every process's lines there). Both give the same structured lines, oldest first."""

from __future__ import annotations

import ast
import datetime
import json
import os
import re
import subprocess

# One key=value pair of logs.py's text format: values are Python reprs (strings, numbers, lists, None).
_PAIR = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\[[^\]]*\]|\{[^}]*\}|\S+)")
_LEVEL = {0: "critical", 1: "critical", 2: "critical", 3: "error", 4: "warning", 5: "info", 6: "info", 7: "debug"}


def stdout_is_journal() -> bool:
    """systemd's own test: JOURNAL_STREAM names our stdout (a variable inherited by a process whose
    output goes elsewhere, e.g. a test run inside a service, does not count)."""
    try:
        dev, ino = (int(n) for n in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(1)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def recent(run_dir_ring: str, limit: int) -> tuple[str, list[dict]]:
    """(source, lines): the journal of this service run when systemd started it (``INVOCATION_ID``, our
    stdout is the journal) and journalctl answers, else the log ring."""
    invocation = os.environ.get("INVOCATION_ID")
    if invocation and stdout_is_journal():
        lines = journal(invocation, limit)
        if lines is not None:
            return "journal", lines
    return "log ring", ring(run_dir_ring)


def ring(path: str) -> list[dict]:
    docs = []
    for part in (path + ".1", path):
        try:
            with open(part, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        docs.append(json.loads(line))
                    except ValueError:
                        continue
        except OSError:
            pass
    return docs


def journal(invocation: str, limit: int) -> list[dict] | None:
    """The last ``limit`` journal entries of this service run, or None when journalctl cannot tell."""
    try:
        done = subprocess.run(["journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--output=json", "--lines",
                               str(limit), "--no-pager", "--quiet"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    docs = []
    for line in done.stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = entry.get("MESSAGE")
        message = message if isinstance(message, str) else bytes(message or []).decode(errors="replace")
        doc = parse(message) or {"level": _LEVEL.get(int(entry.get("PRIORITY", 6)), "info"), "event": message}
        if "__REALTIME_TIMESTAMP" in entry:  # under systemd, logs.py leaves the time to the journal
            doc.setdefault("timestamp", datetime.datetime.fromtimestamp(
                int(entry["__REALTIME_TIMESTAMP"]) / 1e6, datetime.timezone.utc).isoformat())
        docs.append(doc)
    return docs


def parse(message: str) -> dict | None:
    """A line of logs.py (JSON, or key=value with Python reprs) as a dict; None for anything else (a
    traceback line, output of a library)."""
    if message.startswith("{"):
        try:
            doc = json.loads(message)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and "event" in doc else None
    pairs = _PAIR.findall(message)
    if not pairs or not any(key == "event" for key, _ in pairs):
        return None
    return {key: _value(text) for key, text in pairs}


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
