"""Issue 13, items 2 and 4: the run directory, pid files and signals, and orphans after a SIGKILL."""
import os
import signal
import socket
import subprocess
import time

import psutil

from ipfixkit import TcpSink, free_port, run_cli, wait_until


def env(port: int, sink) -> str:
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER_SUB[0]=127.0.0.1/{sink.port}\n")


def test_run_dir_planted_by_another_user_is_refused(attacker, shared_dir, victim, tmp_path):
    planted = shared_dir / "run"
    out = attacker.run(f"""
        import os
        os.mkdir({str(planted)!r}, 0o755)
        for name in ("supervisor.pid", "supervisor.json", "supervisor.lock", "handler-fullflow-0.json"):
            os.symlink({str(victim)!r}, os.path.join({str(planted)!r}, name))
        print("planted")
        """)
    assert out.stdout.strip() == "planted", out.stderr
    with TcpSink() as sink:
        config = tmp_path / "balancer.env"
        config.write_text(env(free_port(), sink))
        result = run_cli("run", "--config", config, "--run-dir", planted, "--log-format", "json")
    assert result.returncode == 3
    assert f"owned by uid {attacker.uid}" in result.stdout and "refusing it" in result.stdout
    assert victim.read_text() == "root secret\n" and victim.stat().st_mode & 0o777 == 0o600


def test_run_dir_writable_by_others_is_refused(shared_dir, tmp_path):
    loose = shared_dir / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    (tmp_path / "balancer.env").write_text("IPFIX_FULLFLOW_PORT[0]=1\n")
    result = run_cli("run", "--config", tmp_path / "balancer.env", "--run-dir", loose, "--log-format", "json")
    assert result.returncode == 3 and "writable by group or others (mode 0777)" in result.stdout
    assert os.listdir(loose) == []


def test_run_dir_is_private_and_its_files_are_replaced_not_followed(attacker, reachable_balancer, victim):
    with TcpSink() as sink:
        bal = reachable_balancer(env(free_port(), sink), start=False)
        bal.run_dir.mkdir(mode=0o700)
        for name in ("supervisor.pid", "supervisor.json", "handler-fullflow-0.json"):
            (bal.run_dir / name).symlink_to(victim)  # as if planted earlier, by whoever
        bal.start()
        # the planted links answer "not JSON" until the balancer has replaced them: wait for that first
        wait_until(lambda: not any((bal.run_dir / n).is_symlink() for n in ("supervisor.json",
                                                                            "handler-fullflow-0.json")),
                   "the planted status links replaced", bal)
        bal.wait_ready()
        assert bal.run_dir.stat().st_mode & 0o777 == 0o700
        assert victim.read_text() == "root secret\n"
        assert not any((bal.run_dir / n).is_symlink() for n in ("supervisor.pid", "supervisor.json"))
        out = attacker.run(f"""
            import os
            try:
                os.symlink("/etc/passwd", {str(bal.run_dir / "supervisor.adopt.json")!r})
                print("PLANTED")
            except OSError as exc:
                print(type(exc).__name__)
            """).stdout
        assert out.strip() == "PermissionError"


def test_forged_pid_file_never_gets_a_victim_signalled(reachable_balancer):
    with TcpSink() as sink, subprocess.Popen(["sleep", "60"]) as victim:
        try:
            bal = reachable_balancer(env(free_port(), sink))
            bal.wait_ready()
            (bal.run_dir / "supervisor.pid").write_text(f"{victim.pid}\n")
            result = run_cli("stop", "--run-dir", bal.run_dir)
            assert result.returncode == 0 and f"stopped supervisor {bal.pid}" in result.stdout, result.stderr
            assert bal.wait_exit() == 0, "the real supervisor got the SIGTERM"
            (bal.run_dir / "supervisor.pid").write_text(f"{victim.pid}\n")  # and with none running
            result = run_cli("stop", "--run-dir", bal.run_dir)
            assert result.returncode == 1 and "not running" in result.stderr
            assert victim.poll() is None, "the process named in the forged file was not signalled"
        finally:
            victim.kill()


def test_supervisor_sigkill_frees_the_port_and_a_fresh_run_starts(balancer):
    port = free_port()
    with TcpSink() as sink:
        bal = balancer(env(port, sink))
        bal.wait_ready()
        handler = bal.handler_pid("fullflow[0]")
        os.kill(bal.pid, signal.SIGKILL)
        bal.proc.wait(5)
        killed = time.monotonic()
        wait_until(lambda: not psutil.pid_exists(handler) or psutil.Process(handler).status() == psutil.STATUS_ZOMBIE,
                   "the orphaned handler exits", timeout=5)
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # the port is free
        probe.close()
        assert time.monotonic() - killed < 5
        bal.start()
        bal.wait_ready()
        assert bal.handler_pid("fullflow[0]") != handler


def test_one_supervisor_per_run_dir(balancer, tmp_path):
    with TcpSink() as sink:
        bal = balancer(env(free_port(), sink))
        bal.wait_ready()
        result = run_cli("run", "--config", bal.config_path, "--run-dir", bal.run_dir, "--log-format", "json")
        assert result.returncode == 3 and "a supervisor already runs" in result.stdout
        assert f'"other_pid": {bal.pid}' in result.stdout
        assert bal.running


def test_a_port_held_by_another_process_is_reported_with_its_pid_and_name(balancer):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    with holder, TcpSink() as sink:
        bal = balancer(env(holder.getsockname()[1], sink))
        line = bal.wait_log("listen_failed", timeout=20)
        assert f"in use by pid {os.getpid()} ({psutil.Process().name()})" in line["reason"]
