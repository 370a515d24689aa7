"""Status: handlers publish counters as JSON files in the run directory; ``status`` reads them.

Files are written to a temporary name and renamed, so a reader never sees half a document. No socket
between processes is needed, and a status read cannot disturb the data path.
"""

from __future__ import annotations

import glob
import json
import os
import time

import psutil

DEFAULT_RUN_DIR = "/run/fast_ipfix_balancer"
SUPERVISOR_FILE = "supervisor.json"
PID_FILE = "supervisor.pid"


def resolve_run_dir(cli_value: str | None) -> str:
    return cli_value or os.environ.get("IPFIX_BALANCER_RUN_DIR") or DEFAULT_RUN_DIR


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary name, then rename: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc))


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def supervisor_pid(run_dir: str) -> int | None:
    """The running supervisor's pid, or None (no pid file, or its process is gone)."""
    try:
        with open(os.path.join(run_dir, PID_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def collect(run_dir: str) -> dict:
    """Everything ``status`` shows: supervisor facts, and each handler's counters plus process facts."""
    pid = supervisor_pid(run_dir)
    sup = read_json(os.path.join(run_dir, SUPERVISOR_FILE)) or {}
    handlers = []
    for path in sorted(glob.glob(os.path.join(run_dir, "handler-*.json"))):
        doc = read_json(path)
        if not doc:
            continue
        doc["alive"] = False
        try:
            proc = psutil.Process(doc["pid"])
            with proc.oneshot():
                doc["psr"] = proc.cpu_num()
                doc["cpu_percent"] = proc.cpu_percent(interval=0.1)
                doc["rss"] = proc.memory_info().rss
            doc["alive"] = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, KeyError):
            pass
        doc["uptime"] = time.time() - doc.get("started", time.time())
        handlers.append(doc)
    return {"running": pid is not None, "supervisor_pid": pid, "config": sup.get("config"),
            "run_dir": run_dir, "handlers": handlers}


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}T"


def _render_recorder(rec: dict) -> list[str]:
    """A recording handler: current file, rotation, spool, an error if any, then one line per export target
    (keys ``export[<target>].<field>`` of the recorder's flat status)."""
    rec = dict(rec)
    targets: dict[str, dict] = {}
    for key in [k for k in rec if k.startswith("export[") and "]." in k]:
        target, field = key[len("export["):].split("].", 1)
        targets.setdefault(target, {})[field] = rec.pop(key)
    nxt = rec.pop("next_rotation_s", None)
    line = (f"    recorder: dpi_id={rec.pop('dpi_id', '-')} file={rec.pop('file', '') or '-'} "
            f"bytes={_size(rec.pop('file_bytes', 0))} flows={rec.pop('file_flows', 0)} "
            f"msgs={rec.pop('file_msgs', 0)} next_rotation={'-' if nxt is None else f'{nxt:.0f}s'} "
            f"completed={rec.pop('files_completed', 0)} spool={rec.pop('spool_files', 0)} files/"
            f"{_size(rec.pop('spool_bytes', 0))}")
    error = rec.pop("error", "")
    rest = " ".join(f"{k}={v}" for k, v in rec.items())
    lines = [line, f"      {rest}"] if rest else [line]
    if error:
        lines.append(f"      ERROR: {error}")
    for target, t in targets.items():
        lines.append(f"    => export {target:<26}{t.get('state', '-'):<11} pending={t.get('pending', 0)} "
                     f"sent={t.get('sent', 0)}" + (f" error={t['error']!r}" if t.get("error") else ""))
    return lines


def render(doc: dict) -> str:
    """A table an operator reads at a glance: one block per handler, one line per subreceiver."""
    lines = [f"supervisor: {'running, pid ' + str(doc['supervisor_pid']) if doc['running'] else 'NOT RUNNING'}"
             f"   config: {doc.get('config') or '-'}   run dir: {doc['run_dir']}"]
    head = f"{'HANDLER':<16}{'PID':>8}{'CPU':>5}{'%CPU':>6}{'RSS':>7}  {'LISTEN':<10}{'MODE':<11}" \
           f"{'MSGS IN':>11}{'DROPS':>8}{'MALFORMED':>10}{'CONN':>5}  UPTIME"
    lines.append(head)
    for h in doc["handlers"]:
        listen = h["listen"]
        state = "" if h["alive"] else "  (not running)"
        lines.append(
            f"{h['name']:<16}{h['pid']:>8}{h.get('psr', '-'):>5}{h.get('cpu_percent', 0):>6.1f}"
            f"{_size(h.get('rss', 0)):>7}  {listen['proto'] + '/' + str(listen['port']):<10}{h['mode']:<11}"
            f"{h['msgs_in']:>11}{h['drops']:>8}{h['malformed']:>10}{h['connections']:>5}  "
            f"{int(h['uptime'])}s{state}")
        for sub in h.get("subreceivers", []):
            lines.append(f"    -> {sub['endpoint']:<28}{sub['state']:<6} msgs_out={sub['msgs_out']} "
                         f"bytes_out={sub['bytes_out']} drops={sub['drops']} queued={_size(sub['queued_bytes'])}"
                         + (f" error={sub['last_error']!r}" if sub.get("last_error") else ""))
        rec = h.get("recorder")
        if rec:
            lines.extend(_render_recorder(rec))
    if not doc["handlers"]:
        lines.append("(no handler status files)")
    return "\n".join(lines)
