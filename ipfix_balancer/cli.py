"""Command line: ``ipfix-balancer run | check-config | status | stop | reload`` (and the internal
``handler`` the supervisor spawns)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import click

from . import config as config_mod
from . import logs
from .control import privileges, rundir
from .control.exits import Exit
from .control import status as status_mod

_config_option = click.option(
    "--config", "config_path", default=None, metavar="PATH",
    help=f"the .env file (default: $IPFIX_BALANCER_CONFIG or {config_mod.DEFAULT_CONFIG_PATH})")
_run_dir_option = click.option(
    "--run-dir", default=None, metavar="DIR",
    help=f"status and pid files (default: $IPFIX_BALANCER_RUN_DIR or {rundir.DEFAULT_RUN_DIR})")
_log_format_option = click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                                  show_default=True, help="key=value lines or JSON lines on stdout")


def _load_or_exit(config_path: str | None, refusal: str) -> tuple[str, config_mod.Config]:
    """Load the config; on any problem print them all under ``refusal`` and exit 1."""
    path = config_mod.resolve_path(config_path)
    try:
        return path, config_mod.load(path)
    except config_mod.ConfigError as err:
        click.echo(f"{refusal}{path}: {len(err.problems)} problem(s):", err=True)
        for problem in _with_lines(path, err.problems):
            click.echo(f"  - {problem}", err=True)
        sys.exit(Exit.FAILED)


def _with_lines(path: str, messages) -> list[str]:
    """``line N: `` before each message about a key written on line N of the file."""
    lines = config_mod.key_lines(path)
    out = []
    for message in messages:
        key = re.match(r"IPFIX_\w+(\[[^\]=]*\])?", message)
        line = lines.get(key.group()) if key else None
        out.append(f"line {line}: {message}" if line else message)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fast_ipfix_balancer")
def main() -> None:
    """fast_ipfix_balancer: replicate, round-robin or record DPI IPFIX export, message by message."""


@main.command()
@_config_option
@_run_dir_option
@_log_format_option
@click.option("--adopt", is_flag=True, hidden=True, help="continue a supervisor that re-executed itself")
def run(config_path, run_dir, log_format, adopt) -> None:
    """Run the supervisor and one handler per receiver (foreground; systemd runs this)."""
    from .supervisor import Supervisor
    path = config_mod.resolve_path(config_path)
    run_dir = rundir.resolve_run_dir(run_dir)
    log = logs.setup(log_format, stream="supervisor")
    user = privileges.service_user()
    if user is not None:
        _drop_privileges(user, path, run_dir, log)
    try:  # the log ring lives in the run dir: only in one that is safe (the supervisor refuses the others)
        rundir.secure(run_dir)
    except rundir.RunDirError:
        pass
    else:
        os.environ[logs.RING_ENV] = rundir.log_ring_path(run_dir)  # for the console's Logs page; children inherit it
        log = logs.setup(log_format, stream="supervisor")
    sys.exit(Supervisor(path, run_dir, log_format, log, adopt=adopt).run())


def _drop_privileges(user, config_path: str, run_dir: str, log) -> None:
    """Root without a unit: become the service user, keeping what the configuration needs (README
    "Security"). A bad file is left for the supervisor to report."""
    from .supervisor import receivers
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError:
        cfg = None
    caps = () if cfg is None else privileges.capabilities(cfg)
    dumps = [] if cfg is None else [rc.recording.dump_dir for rc in receivers(cfg)
                                    if rc.forwarding.mode is config_mod.Mode.DISABLED]
    try:
        privileges.drop(user, caps, [run_dir, *dumps])
    except OSError as exc:
        log.error("not_started", reason=f"cannot become {user.pw_name}: {exc}")
        sys.exit(Exit.CANNOT_START)
    problem = privileges.out_of_reach(config_path, run_dir)
    if problem is not None:  # one line now, not a traceback from the first handler or file that fails
        log.error("not_started", reason=f"started as root, it runs as {user.pw_name}, who {problem}; install it "
                  f"where that user can read it (the RPM: /usr/bin/ipfix-balancer), or set IPFIX_BALANCER_USER= "
                  "(empty) to run as root")
        sys.exit(Exit.CANNOT_START)
    log.info("privileges_dropped", user=user.pw_name, capabilities=list(caps))


@main.command("check-config")
@_config_option
def check_config(config_path) -> None:
    """Validate the .env: print every problem at once; exit 1 if there is any."""
    path, cfg = _load_or_exit(config_path, "")
    for warning in _with_lines(path, cfg.warnings):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{path}: OK, {len(cfg.receivers)} receiver(s)")
    for rc in cfg.receivers:
        subs = ", ".join(str(e) for e in rc.forwarding.subreceivers) or "-"
        cpu = "-" if rc.taskset is None else rc.taskset
        click.echo(f"  {rc.name:<16} {rc.listen.port_type}/{rc.listen.port:<6} {rc.forwarding.mode.value:<10} "
                   f"cpu={cpu:<3} -> {subs}")
    if cfg.console is not None:
        c = cfg.console
        host = f"[{c.host}]" if ":" in c.host else c.host
        click.echo(f"  console          {'https' if c.tls_cert else 'http'}://{host}:{c.port}/ "
                   f"(token in {c.token_file})")


@main.command()
@_run_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(run_dir, as_json) -> None:
    """Show handlers, counters and subreceiver states; exit 1 when the supervisor is not running."""
    report = status_mod.collect(rundir.resolve_run_dir(run_dir))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else status_mod.render(report))
    sys.exit(Exit.OK if report.running else Exit.FAILED)


def _signal_supervisor(run_dir: str | None, sig: int) -> int:
    pid = status_mod.supervisor_pid(rundir.resolve_run_dir(run_dir))
    if pid is None:
        click.echo("ipfix-balancer: supervisor is not running", err=True)
        sys.exit(Exit.FAILED)
    os.kill(pid, sig)
    return pid


@main.command()
@_run_dir_option
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for the drain")
def stop(run_dir, timeout) -> None:
    """Stop the running supervisor gracefully (queues are flushed) and wait for it."""
    pid = _signal_supervisor(run_dir, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while status_mod.supervisor_pid(rundir.resolve_run_dir(run_dir)) == pid:
        if time.monotonic() > deadline:
            click.echo(f"ipfix-balancer: supervisor {pid} still running after {timeout}s", err=True)
            sys.exit(Exit.FAILED)
        time.sleep(0.1)
    click.echo(f"stopped supervisor {pid}")


@main.command()
@_run_dir_option
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait for the supervisor's outcome")
@click.option("--main-pid", type=int, default=None, hidden=True, help="the unit's $MAINPID (ExecReload)")
def reload(run_dir, timeout, main_pid) -> None:
    """Validate the file the running supervisor reads, ask it to apply it (SIGHUP) and print what it did:
    settings applied in place, handlers replaced, started or stopped. Exit 1 when refused (nothing changed)."""
    from .control import reload as reload_mod
    try:
        outcome = reload_mod.request(rundir.resolve_run_dir(run_dir), timeout, main_pid)
    except (reload_mod.NotRunning, TimeoutError) as exc:
        click.echo(f"ipfix-balancer: {exc}", err=True)
        sys.exit(Exit.FAILED)
    refused = outcome.result == reload_mod.REFUSED
    for line in outcome.lines():
        click.echo(line, err=refused)
    sys.exit(Exit.FAILED if refused else Exit.OK)


@main.command()
@_config_option
@_run_dir_option
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for the new handlers")
def restart(config_path, run_dir, timeout) -> None:
    """Restart in place without dropping exporters: new supervisor code and new handlers take the
    sockets over from the running ones. Refused (nothing changes) when the config is invalid: the file the
    running supervisor reads (it is the one the restarted supervisor reads again), --config only when its
    status names none."""
    run_dir = rundir.resolve_run_dir(run_dir)
    supervised = status_mod.read_supervisor_status(run_dir)
    if supervised is not None and supervised.config:
        config_path = supervised.config
    _path, cfg = _load_or_exit(config_path, "restart refused, the running balancer keeps running: ")
    before = {h.pid for h in supervised.handlers} if supervised is not None else set()
    pid = _signal_supervisor(run_dir, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handlers = status_mod.collect(run_dir).handlers
        fresh = [h.doc for h in handlers if h.doc.pid not in before and h.alive and h.doc.listen.listening]
        if len(fresh) >= len(cfg.receivers):
            click.echo(f"restarted in place: supervisor {pid}, handlers " + ", ".join(
                f"{h.name}={h.pid}" for h in fresh))
            return
        time.sleep(0.2)
    click.echo(f"ipfix-balancer: handlers not all back after {timeout}s; see the log", err=True)
    sys.exit(Exit.FAILED)


@main.command(hidden=True)
@click.option("--control-fd", type=int, required=True, help="the supervisor's channel (inherited descriptor)")
@_run_dir_option
@_log_format_option
def handler(control_fd, run_dir, log_format) -> None:
    """One receiver's handler process (spawned by the supervisor; its settings come over the channel)."""
    from .handler import main as handler_main
    sys.exit(handler_main(control_fd, rundir.resolve_run_dir(run_dir), log_format))


@main.command(hidden=True)
@click.option("--settings", "settings_json", required=True, help="config.Console as JSON")
@_config_option
@_run_dir_option
@_log_format_option
def console(settings_json, config_path, run_dir, log_format) -> None:
    """The web console process (spawned by the supervisor)."""
    from .console.main import main as console_main
    log = logs.setup(log_format, stream="console")
    sys.exit(console_main(settings_json, config_mod.resolve_path(config_path), rundir.resolve_run_dir(run_dir), log))
