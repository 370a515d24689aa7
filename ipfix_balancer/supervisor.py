"""The supervisor: owns configuration and handler lifetimes, never touches traffic.

It spawns one ``ipfix-balancer handler`` process per receiver (the receiver's config is handed over as
JSON, so a handler never re-reads a file that may have changed since it was validated), restarts a
handler that dies (with backoff), passes SIGTERM/SIGINT on for a graceful stop, re-reads the config on
SIGHUP (numbering each reload and writing its outcome for ``ipfix-balancer reload``), and relays a
Fullflow recorder's rotation (SIGUSR1 from it) as SIGHUP to the other recorders. When configured, it also
runs the web console's process (``console/``) and restarts it like a handler.

SIGUSR2 restarts everything in place, for an upgrade or ``ipfix-balancer-restart``: the supervisor
re-executes itself (same pid, so systemd sees no restart) and each new handler takes the listening socket
and the exporter connections over from its predecessor (``handover.py``).

Each handler gets a private channel (``control/channel.py``): its settings, new settings on reload, and
the handover socket to its successor travel there, so nothing of it is visible or reachable by name. The
channels and the run-dir lock survive the re-execution as inherited descriptors.

Each turn of its loop it also reads the handlers' status documents (``control.health``): a handler whose
heartbeat stopped is replaced, systemd hears READY/STATUS/WATCHDOG (``control.sdnotify``), and the metrics
thread (``control.metrics``) serves what was read.

It imports only ``control`` (the run-directory contract) and ``config``: never data-plane code.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import psutil

from .config.derive import auto_receivers
from .config.model import Config, Console, Mode, ReceiverConfig, live_change_impossible
from .config.parse import ConfigError, load
from .control import channel, rundir
from .control import reload as reload_outcome
from .control.exits import Exit
from .control.health import Watch
from .control.metrics import MetricsService
from .control.ports import bind_failure
from .control.privileges import raise_fd_limit
from .control.sdnotify import Notifier
from .control.signals import ROTATED, SUPERVISOR_NAME, Wakeup, die_with_parent, set_process_name
from .control.status import SupervisedHandler, SupervisorStatus, write_supervisor_status

_ADOPTED = {"pid": int, "receiver": str, "control_fd": int | None}  # an entry of "handlers", as _reexec writes it
# an entry of "retiring": [pid, control_fd]; a version before the channel left bare pids: its handlers are
# stopped, not taken over (their handover socket had no access check), and exporters reconnect once
_RETIRING = int | tuple[int, int]
_UNUSABLE = (ValueError, TypeError, KeyError, AttributeError, OSError, OverflowError)  # an entry that cannot be adopted
RESTART_FIRST = 1.0
RESTART_CAP = 30.0
STABLE_AFTER = 60.0  # a handler that ran this long is restarted without accumulated backoff
READY_DEADLINE = 30.0  # READY=1 at the latest this long after the start (systemd's start timeout is 90 s)


def _inherited(fd: int) -> socket.socket:
    """A channel descriptor that survived the re-execution; not to be inherited by the handlers (OSError when
    it is no socket: then left as it was)."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


def _channel(pid: int, fd: int | None, ours: set[int]) -> socket.socket | None:
    """The channel of the predecessor's handler ``pid`` (None: a version before the channel left none).
    ValueError when pid is not a process of ours (never signalled then), OSError when fd is no socket."""
    if pid not in ours:
        raise ValueError(f"pid {pid} is not a process of this supervisor")
    return None if fd is None else _inherited(fd)


def _child_pids() -> set[int]:
    """Our child processes: right after a re-execution, the handlers of the supervisor before it."""
    return {p.pid for p in psutil.Process().children()}


def receivers(config: Config) -> tuple[ReceiverConfig, ...]:
    """The handlers to run: the configured receivers plus the balancer-auto recorders they imply."""
    return tuple(config.receivers) + tuple(auto_receivers(config))


def _child_setup(parent_pid: int) -> None:
    """In the child before exec: die with the supervisor; and SIGHUP (rotation relay) is ignored until
    the handler installs its own handlers, so one arriving while it starts (imports take a while) does
    not kill it: its default action is to terminate, and SIG_IGN survives exec. SIGUSR2 (new settings,
    before the channel) stays ignored: a supervisor of an earlier version may still send it. A process
    group of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches the supervisor only,
    which stops the children in order, instead of interrupting them mid-import ("Aborted!")."""
    os.setpgid(0, 0)
    die_with_parent(parent_pid)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Child:
    """One handler process and its restart bookkeeping."""

    def __init__(self, rc: ReceiverConfig):
        self.rc = rc
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None  # our end of its channel
        self.started = 0.0
        self.restarts = 0
        self.killed = (0, 0)  # messages and records lost with processes of it that were killed
        self.backoff = RESTART_FIRST
        self.restart_at: float | None = None
        self.retiring = False  # being stopped on purpose (reload, shutdown): do not restart
        self.predecessor: int | None = None  # the handler it takes the sockets over from (restart in place)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def name(self) -> str:
        return self.rc.name

    def status(self) -> SupervisedHandler:
        return SupervisedHandler(name=self.rc.name, stream=self.rc.stream, index=self.rc.index, pid=self.pid,
                                 restarts=self.restarts, killed_msgs=self.killed[0], killed_records=self.killed[1])


class ConsoleChild(Child):
    """The web console process (IPFIX_BALANCER_CONSOLE): restarted like a handler; it never sees traffic,
    and the supervisor's loop never serves a web request."""

    def __init__(self, settings: Console):
        super().__init__(None)
        self.settings = settings

    @property
    def name(self) -> str:
        return "console"


class Supervisor:
    """One handler process per receiver (see the module docstring).

    Signals are handled in the poll loop, between turns. Stopping handlers waits for them there
    (``_stop_pid``, and ``reload`` through ``_stop_children``: up to DRAIN_TIMEOUT + 5 s): meanwhile
    further signals queue up and dead handlers are reaped late. That is acceptable for process control,
    which has nothing else to do, and keeps the order of events simple."""

    def __init__(self, config_path: str, run_dir: str, log_format: str, log, adopt: bool = False):
        self.adopt = adopt
        self.retiring: dict[int, socket.socket | None] = {}  # predecessors' handlers (reaped by pid) -> channel
        self.lock_fd: int | None = None
        self.config_path = config_path
        self.run_dir = run_dir
        self.log_format = log_format
        self.log = log
        self.children: dict[str, Child] = {}
        self.console: ConsoleChild | None = None
        self.config: Config | None = None
        self.stopping = False
        self.watch: Watch | None = None  # heartbeats, readiness, counters for metrics (control/health.py)
        self.notify = Notifier()
        self.ready_sent = False
        self.started_at = time.monotonic()
        self.metrics = MetricsService(lambda: self.watch.snapshot, log)
        self.unreadable: set[str] = set()  # handlers whose status document could not be read last turn

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.config = load(self.config_path)
        except ConfigError as err:
            for problem in err.problems:
                self.log.error("config_invalid", config=self.config_path, problem=problem)
            self.log.error("not_started", reason=f"{len(err.problems)} configuration problem(s)")
            return Exit.CONFIG_INVALID
        try:
            rundir.secure(self.run_dir)
            predecessors = self._read_adopt_file() if self.adopt else {}
            if self.lock_fd is None:
                self.lock_fd = rundir.lock(self.run_dir)
        except rundir.RunDirError as err:
            self.log.error("not_started", reason=str(err))
            return Exit.CANNOT_START
        if self.lock_fd is None:
            self.log.error("not_started", reason=f"a supervisor already runs with run dir {self.run_dir}",
                           other_pid=rundir.lock_holder(self.run_dir))
            return Exit.CANNOT_START
        if not predecessors:  # stale handler files from an earlier run would mislead status
            for path in rundir.handler_files(self.run_dir):
                os.unlink(path)
        set_process_name(SUPERVISOR_NAME)
        raise_fd_limit()
        rundir.write_atomic(rundir.supervisor_pid_path(self.run_dir), f"{os.getpid()}\n")
        self.watch = Watch(self.run_dir, self.config.hang_seconds)
        restarts = self.watch.load(self.log) if self.adopt else {}
        wake = Wakeup((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, ROTATED, signal.SIGUSR2, signal.SIGCHLD))
        for warning in self.config.warnings:
            self.log.warning("config_warning", problem=warning)
        self.log.info("supervisor_started", config=self.config_path, receivers=len(self.config.receivers))
        self._start_handlers(predecessors)
        for name, n in restarts.items():  # restarts before a restart in place still count
            if name in self.children:
                self.children[name].restarts = n
        self._write_status()  # also with no receivers: reload and the console's Apply look for it
        self.metrics.serve(self.config.metrics, self.config.metrics_token_file)
        self._set_console(self.config.console)
        try:
            while not self.stopping:
                select.select([wake.sock], [], [], 0.5)
                try:
                    self._handle_signals(wake.take())
                    self._reap()
                    self._watch_handlers()
                except Exception:  # a supervisor that exits takes every handler with it: log, go on
                    self.log.exception("supervisor_turn_failed")
        finally:
            self.notify.send("STOPPING=1")
            self.metrics.close()
            code = self._shutdown()
            try:
                os.unlink(rundir.supervisor_pid_path(self.run_dir))
            except OSError:
                pass
        return code

    def _handle_signals(self, signals: list[int]) -> None:
        for sig in signals:
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.log.info("supervisor_stopping", signal=signal.Signals(sig).name)
                self.stopping = True
            elif sig == signal.SIGHUP:
                self.notify.reloading()
                self.reload()
                self.notify.ready(self.watch.summary())
            elif sig == ROTATED:
                self._sync_rotation()
            elif sig == signal.SIGUSR2:
                self._reexec()

    # -- restart in place ----------------------------------------------------------------------
    def _reexec(self) -> None:
        """Become a new supervisor (new code, new config) without dropping a single exporter."""
        try:
            load(self.config_path)
        except ConfigError as err:
            for problem in err.problems:
                self.log.error("restart_refused", config=self.config_path, problem=problem)
            return
        self._set_console(None)  # it holds its port: the new supervisor starts its own
        running = {name: {"pid": c.pid, "receiver": c.rc.to_json(), "control_fd": c.control.fileno()}
                   for name, c in self.children.items() if c.pid is not None}
        retiring = [[pid, sock.fileno()] for pid, sock in self.retiring.items()]
        for fd in [self.lock_fd] + [item["control_fd"] for item in running.values()] + [fd for _, fd in retiring]:
            os.set_inheritable(fd, True)  # the lock and the channels outlive exec: same pid, same holder
        rundir.write_json(rundir.adopt_path(self.run_dir),
                          {"handlers": running, "retiring": retiring, "lock_fd": self.lock_fd})
        self.watch.save({name: c.restarts for name, c in self.children.items()})
        self.log.info("supervisor_reexec", handlers=len(running))
        signal.set_wakeup_fd(-1)
        os.execv(sys.executable, [sys.executable, "-m", "ipfix_balancer", "run", "--config", self.config_path,
                                  "--run-dir", self.run_dir, "--log-format", self.log_format, "--adopt"])

    def _read_adopt_file(self) -> dict:
        """What the supervisor before the exec left: its lock, and the handlers with their channels.

        It wrote the file just before the exec, so anything else there (a bug, another release, someone who
        can write the run dir) is logged and left out, and the supervisor starts all the same: the lock is
        looked for among the inherited descriptors, and a process of ours that no usable entry accounts for
        is stopped before any handler starts (it may hold a receiver's port)."""
        path = rundir.adopt_path(self.run_dir)
        doc, ignored = rundir.read_json(path), []
        if os.path.exists(path):
            os.unlink(path)
            if doc is None:
                ignored.append("the whole file: not a readable JSON object")
        doc = doc or {}
        noted = doc.get("lock_fd")
        self.lock_fd = rundir.inherited_lock(self.run_dir, noted)
        if self.lock_fd != noted:
            ignored.append(f"lock_fd: {json.dumps(noted)[:80]} is not this process's lock on "
                           f"{rundir.lock_path(self.run_dir)}; " + ("it is taken afresh" if self.lock_fd is None
                                                                   else f"found as descriptor {self.lock_fd}"))
        if self.lock_fd is not None:
            os.set_inheritable(self.lock_fd, False)
        ours = _child_pids()
        handlers, bad = rundir.entries(doc, "handlers", _ADOPTED)
        ignored += bad
        predecessors = {}
        for name, item in handlers.items():
            try:
                rc = ReceiverConfig.from_json(item["receiver"])
                predecessors[name] = (item["pid"], rc, _channel(item["pid"], item.get("control_fd"), ours))
            except _UNUSABLE as exc:
                ignored.append(f"handlers: {name}: {type(exc).__name__}: {exc}")
        retiring = doc.get("retiring", [])
        if not isinstance(retiring, list):
            ignored.append(f"retiring: not a JSON array: {json.dumps(retiring)[:80]}")
            retiring = []
        for entry in retiring:
            try:
                if not rundir.conforms(entry, _RETIRING):
                    raise ValueError("not a pid, nor [pid, control_fd]")
                pid, fd = (entry, None) if isinstance(entry, int) else entry
                self.retiring[pid] = _channel(pid, fd, ours)
            except _UNUSABLE as exc:
                ignored.append(f"retiring: {json.dumps(entry)[:80]}: {type(exc).__name__}: {exc}")
        for reason in ignored:
            self.log.error("adopt_entry_ignored", reason=reason)
        adopted = {pid for pid, _rc, _control in predecessors.values()}
        for pid in sorted(ours - adopted - self.retiring.keys()):
            self.log.error("adopt_stray_stopped", handler_pid=pid, reason="no usable entry of the adopt file names it")
            self._stop_pid(pid, None)
        return predecessors

    def _start_handlers(self, predecessors: dict) -> None:
        """Start a handler per receiver. A receiver whose predecessor still listens on the same socket
        takes it over; predecessors of receivers that changed their socket or went away are stopped."""
        for rc in receivers(self.config):
            pid, old_rc, control = predecessors.pop(rc.name, (None, None, None))
            if control is not None and not live_change_impossible(old_rc, rc):
                self.retiring[pid] = control  # kept open until it exits: end-of-file would stop it early
                child = Child(rc)
                child.predecessor = pid
                self._spawn_successor(child)
                continue
            if pid is not None:
                self._stop_pid(pid, control)
            self._spawn(Child(rc))
        for pid, _rc, control in predecessors.values():
            self._stop_pid(pid, control)

    def _spawn_successor(self, child: Child) -> None:
        """Start ``child`` to take the sockets over from its predecessor, which is still running (also
        when an earlier successor died before taking them). The two ends of one socketpair: only these
        two handlers can ever meet there."""
        pair = self._pair_for(child, channel.handover_pair)
        if pair is None:
            return
        theirs, successor = pair
        with theirs, successor:
            try:
                channel.send(self.retiring[child.predecessor], {"handover": True}, (theirs.fileno(),))
            except OSError:  # it is exiting: the successor binds the port itself
                self._spawn(child)
                return
            self._spawn(child, successor)

    def _stop_pid(self, pid: int, control: socket.socket | None) -> None:
        """Stop a predecessor's handler and wait for it (it holds a port a new handler may need). Blocks
        (polling every 50 ms) for up to DRAIN_TIMEOUT + 5 s; it runs only while starting."""
        if control is not None:
            control.close()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + rundir.DRAIN_TIMEOUT + 5
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    # -- handlers ------------------------------------------------------------------------------
    def _spawn(self, child: Child, predecessor: socket.socket | None = None) -> None:
        """Start a handler; its settings (and the handover socket to ``predecessor``'s handler) go over
        its channel, not on its command line."""
        rc = child.rc
        pair = self._pair_for(child, channel.pair)
        if pair is None:
            return
        mine, theirs = pair
        with theirs:
            cmd = [sys.executable, "-m", "ipfix_balancer", "handler", "--control-fd", str(theirs.fileno()),
                   "--run-dir", self.run_dir, "--log-format", self.log_format]
            parent = os.getpid()
            try:
                child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                              preexec_fn=lambda: _child_setup(parent))
            except (OSError, subprocess.SubprocessError) as exc:
                mine.close()
                self._start_failed(child, exc)
                return
        try:
            channel.send(mine, {"receiver": rc.to_json(), "handover": predecessor is not None},
                         () if predecessor is None else (predecessor.fileno(),))
        except OSError as exc:  # it would wait for settings that never come
            mine.close()
            child.proc.kill()
            child.proc.wait()
            self._start_failed(child, exc)
            return
        child.control = mine
        child.started = time.monotonic()
        child.restart_at = None
        self.log.info("handler_spawned", handler=rc.name, handler_pid=child.proc.pid, cpu=rc.taskset)
        self._write_status()

    def _set_console(self, settings: Console | None) -> None:
        """Start, stop or replace the console process when its settings differ from the running one's."""
        if self.console is not None and self.console.settings == settings:
            return
        if self.console is not None:
            self._stop_children([self.console], 5.0)
            self.console = None
        if settings is not None:
            self.console = ConsoleChild(settings)
            self._spawn_console()

    def _spawn_console(self) -> None:
        child, parent = self.console, os.getpid()
        try:
            child.proc = subprocess.Popen(
                [sys.executable, "-m", "ipfix_balancer", "console", "--settings", child.settings.to_json(),
                 "--config", self.config_path, "--run-dir", self.run_dir, "--log-format", self.log_format],
                stdin=subprocess.DEVNULL, preexec_fn=lambda: _child_setup(parent))
        except (OSError, subprocess.SubprocessError) as exc:
            self._start_failed(child, exc)
            return
        child.started = time.monotonic()
        child.restart_at = None
        self.log.info("console_spawned", console_pid=child.proc.pid, host=child.settings.host,
                      port=child.settings.port)

    def _pair_for(self, child: Child, make) -> tuple[socket.socket, socket.socket] | None:
        """``child`` is ours from now on (so ``_reap`` retries it); ``make()``'s socketpair for starting it,
        or None when there is none to be had (no descriptor left: ``_start_failed``)."""
        self.children[child.name] = child
        try:
            return make()
        except OSError as exc:
            self._start_failed(child, exc)
            return None

    def _start_failed(self, child: Child, exc: Exception) -> None:
        """A handler (or the console) could not be started: out of descriptors or processes, say. Logged and
        retried with the backoff of a handler that died (``_reap``), never fatal to the supervisor."""
        child.proc = None
        child.restart_at = time.monotonic() + child.backoff
        self.log.error("handler_start_failed", handler=child.name, reason=str(exc), restart_in=child.backoff,
                       restarts=child.restarts)
        child.backoff = min(child.backoff * 2, RESTART_CAP)
        if child is not self.console:
            self._write_status()

    def _children(self) -> list[Child]:
        return list(self.children.values()) + ([self.console] if self.console is not None else [])

    def _reap(self) -> None:
        for pid in list(self.retiring):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True
            control = self.retiring.pop(pid) if done else None
            if control is not None:
                control.close()
        now = time.monotonic()
        for child in self._children():
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                child.proc = None
                if child.control is not None:  # the console has none
                    child.control.close()
                if child.retiring:
                    continue
                if now - child.started > STABLE_AFTER:
                    child.backoff = RESTART_FIRST
                child.restart_at = now + child.backoff
                self.log.error("handler_died", handler=child.name, exit_code=code,
                               restart_in=child.backoff, restarts=child.restarts)
                if code < 0 and child is not self.console:  # killed: no drain, no count of its own
                    msgs, records = self.watch.killed(child.name)
                    child.killed = (child.killed[0] + msgs, child.killed[1] + records)
                    if msgs:
                        self.log.error("handler_killed_with_loss", handler=child.name, lost_messages=msgs,
                                       lost_records=records, reason="handler_killed",
                                       detail="what its last status said its queues held")
                child.backoff = min(child.backoff * 2, RESTART_CAP)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                if child is self.console:
                    self._spawn_console()
                elif child.predecessor in self.retiring:
                    self._spawn_successor(child)
                else:
                    self._spawn(child)

    def _stop_children(self, children: list[Child], timeout: float) -> bool:
        """SIGTERM, wait for the graceful drain, SIGKILL what is left. True when all exited cleanly.
        Blocks for up to ``timeout``."""
        clean = True
        for child in children:
            child.retiring = True
            if child.pid is not None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.proc is None:
                continue
            try:
                code = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.error("handler_kill", handler=child.name, reason="did not stop in time")
                child.proc.kill()
                code = child.proc.wait()
            if child is self.console and code in (0, -signal.SIGTERM):
                pass  # uvicorn re-raises the SIGTERM it handled: the console stopped as asked
            elif code != 0:
                clean = False
                self.log.error("handler_exit", handler=child.name, exit_code=code)
            child.proc = None
            if child.control is not None:
                child.control.close()
        return clean

    def _shutdown(self) -> int:
        self._set_console(None)  # first: no edits while handlers stop; its exit status says nothing about traffic
        clean = self._stop_children(list(self.children.values()), rundir.DRAIN_TIMEOUT + 5)
        self.log.info("supervisor_stopped", clean=clean)
        return Exit.OK if clean else Exit.FAILED

    # -- reload / rotation ---------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config and apply it. A bad file, or a new listening socket that cannot be bound,
        changes nothing. A receiver whose listening socket and CPU stay is reconfigured in place (its
        exporters stay connected); otherwise its handler is replaced, and the old one is waited for (up to
        DRAIN_TIMEOUT + 5 s) before the new one binds."""
        previous = reload_outcome.read_outcome(self.run_dir)  # numbering continues across a restart in place
        outcome = reload_outcome.Outcome(generation=1 + (previous.generation if previous else 0),
                                         result=reload_outcome.APPLIED, config=self.config_path)
        try:
            new = load(self.config_path)
        except ConfigError as err:
            for problem in err.problems:
                self.log.error("reload_refused", config=self.config_path, problem=problem)
            outcome.result, outcome.problems = reload_outcome.REFUSED, err.problems
            self._write_reload_outcome(outcome)
            return False
        old = {rc.name: rc for rc in receivers(self.config)}
        fresh = {rc.name: rc for rc in receivers(new)}
        changed = [n for n in old if n in fresh and fresh[n] != old[n]]
        in_place = [n for n in changed if not live_change_impossible(old[n], fresh[n])
                    and self.children.get(n) is not None and self.children[n].pid is not None]
        replaced = [n for n in changed if n not in in_place]
        removed = [n for n in old if n not in fresh]
        added = [n for n in fresh if n not in old]
        # Transactional: a new socket that cannot be bound refuses the whole reload before any handler is
        # stopped. Sockets our handlers hold now are freed by the reload itself, so they are not probed.
        held = {rc.listen for rc in old.values()}
        unbindable = [f"{n}: {failure}" for n in replaced + added if fresh[n].listen not in held
                      and (failure := bind_failure(fresh[n].listen.port_type, fresh[n].listen.bind,
                                                   fresh[n].listen.port))]
        if unbindable:
            for problem in unbindable:
                self.log.error("reload_refused", config=self.config_path, problem=problem)
            outcome.result, outcome.problems = reload_outcome.REFUSED, unbindable
            self._write_reload_outcome(outcome)
            return False
        for name in in_place:
            child = self.children[name]
            child.rc = fresh[name]  # also what a restart after a crash will use
            try:
                channel.send(child.control, {"receiver": child.rc.to_json()})
            except OSError as exc:  # it is dying: the restart after its death uses the new settings
                self.log.error("reconfigure_not_sent", handler=name, reason=str(exc))
        # Free the ports of removed and replaced receivers before binding them again.
        self._stop_children([self.children[n] for n in removed + replaced if n in self.children],
                            rundir.DRAIN_TIMEOUT + 5)
        for name in removed:
            self.children.pop(name, None)
            self.watch.carry.forget(name)
        for name in replaced + added:
            self._spawn(Child(fresh[name]))
        self.config = new
        self.watch.hang_seconds = new.hang_seconds
        self.metrics.serve(self.config.metrics, self.config.metrics_token_file)
        self._set_console(new.console)
        self.log.info("reloaded", reconfigured=in_place, restarted=replaced, removed=removed, added=added)
        self._write_status()
        outcome.reconfigured, outcome.restarted, outcome.added, outcome.removed = in_place, replaced, added, removed
        self._write_reload_outcome(outcome)
        return True

    # -- liveness and metrics ------------------------------------------------------------------
    def _watch_handlers(self) -> None:
        """Replace hung handlers, tell systemd (READY=1 once all listen, STATUS=, WATCHDOG=1 while healthy)."""
        now = time.monotonic()
        hung = self.watch.turn(self.children.values(), now)
        for name in self.watch.unreadable.keys() - self.unreadable:  # once per episode
            self.log.error("status_unreadable", handler=name, reason=self.watch.unreadable[name],
                           effect="not taken for silence: liveness is judged again once it can be read")
        self.unreadable = set(self.watch.unreadable)
        for child, silent in hung:
            # SIGKILL: a stopped or hung process handles no SIGTERM; _reap restarts it with the usual backoff
            self.log.error("handler_hung", handler=child.rc.name, handler_pid=child.pid, silent_s=round(silent, 1),
                           reason=f"no status heartbeat for {silent:.0f}s (HANG_SECONDS={self.watch.hang_seconds}); "
                                  "killed, to be restarted")
            child.proc.kill()
        summary = self.watch.summary()
        waiting = self.watch.not_listening()
        if not self.ready_sent and (not waiting or now - self.started_at > READY_DEADLINE):
            # One receiver that cannot listen (port in use) must not fail the start of the others: after the
            # deadline systemd gets READY=1 anyway, and the operator the names.
            if waiting:
                self.log.error("not_all_listening", handlers=waiting, after_s=READY_DEADLINE)
            self.ready_sent = True
            self.notify.ready(summary)
        self.notify.status(summary)
        if not hung:
            self.notify.watchdog(now)

    def _write_reload_outcome(self, outcome: reload_outcome.Outcome) -> None:
        """For ``ipfix-balancer reload`` and the console, which wait for it after their SIGHUP."""
        try:
            reload_outcome.write_outcome(self.run_dir, outcome)
        except OSError as exc:
            self.log.error("reload_outcome_write_failed", run_dir=self.run_dir, reason=str(exc))

    def _sync_rotation(self) -> None:
        """The Fullflow recorder rotated: rotate the other recorders at the same moment (manual: HUP)."""
        for child in self.children.values():
            if child.rc.forwarding.mode is Mode.DISABLED and child.rc.stream != "FULLFLOW" and child.pid is not None:
                child.proc.send_signal(signal.SIGHUP)

    def _write_status(self) -> None:
        try:
            write_supervisor_status(self.run_dir, SupervisorStatus(
                pid=os.getpid(), config=self.config_path, handlers=[c.status() for c in self.children.values()]))
        except OSError as exc:  # status is for operators: never a reason to stop supervising
            self.log.error("status_write_failed", run_dir=self.run_dir, reason=str(exc))
