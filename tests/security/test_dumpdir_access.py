"""Issue 13, item 3: names planted in a dump directory never make the recorder read, truncate or create a
file elsewhere, and a directory others can write is refused."""
import os
import signal
import stat
import time

from ipfixkit import TcpExporter, TcpSink, free_port, make_stream

from ipfix_balancer.recording.export import target_token

OLD = "fullflow_0_20240101T000000Z"


def recorder_env(port: int, dump_dir, targets: str) -> str:
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\nIPFIX_FULLFLOW_BALANCER[0]=Disabled\n"
            f"IPFIX_FULLFLOW_DUMP_DIR[0]={dump_dir}\nIPFIX_FULLFLOW_DUMP_INSERT_PROCESSES[0]={targets}\n")


def plant(dump, victim, elsewhere, token: str) -> None:
    """A leftover .part and a pending dump that are symlinks to the victim, a marker that points to where
    an empty file would be created, and a FIFO under a dump's name (opening it would block)."""
    os.symlink(victim, dump / f"{OLD}.part")
    os.symlink(victim, dump / f"{OLD}_20240101T000100Z.ipfix")
    os.symlink(elsewhere, dump / f"{OLD}_20240101T000100Z.ipfix.pending-{token}")
    os.mkfifo(dump / f"{OLD}_20240101T000200Z.ipfix")
    (dump / f"{OLD}_20240101T000200Z.ipfix.pending-{token}").touch()


def test_planted_names_in_the_dump_dir_are_ignored(balancer, shared_dir, victim):
    secret = make_stream(1)[0] + b"root secret"  # starts like a dump: a .part recovery would cut it
    victim.write_bytes(secret)
    dump = shared_dir / "dump"
    dump.mkdir(mode=0o755)
    elsewhere = shared_dir / "nologin"
    with TcpSink() as target:
        plant(dump, victim, elsewhere, target_token(target.endpoint))
        b = balancer(recorder_env(free_port(), dump, target.endpoint))
        b.wait_ready(30)
        b.wait_log("recorder_started", timeout=20)
        time.sleep(1.0)  # the recorder took stock and would be exporting by now
        assert victim.read_bytes() == secret, "nothing written or truncated through a symlink"
        assert target.bytes_received == 0, "no planted file's bytes reached the insert process"
        assert not elsewhere.exists()
        assert b.running and b.status("fullflow[0]")["listen"]["listening"]


def test_a_dump_dir_others_can_write_is_refused(balancer, shared_dir):
    dump = shared_dir / "open-dump"
    dump.mkdir()
    dump.chmod(0o1777)
    with TcpSink() as target:
        b = balancer(recorder_env(free_port(), dump, target.endpoint))
        b.wait_ready(30)
        line = b.wait_log("dump_dir_unusable", timeout=20)
        assert "not writable by group or others" in line["error"]
        assert os.listdir(dump) == []


def test_a_dump_dir_that_is_another_users_symlink_is_refused(attacker, balancer, shared_dir, tmp_path):
    """Issue 20: a DUMP_DIR that is a symlink a local user planted was followed: root wrote the recorded
    flows into a root-only 0700 directory the symlink named."""
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    link = shared_dir / "dump"
    assert attacker.run(f"import os; os.symlink({str(private)!r}, {str(link)!r})").returncode == 0
    with TcpSink() as target:
        port = free_port()
        b = balancer(recorder_env(port, link / "fullflow", target.endpoint))  # a component to create, too
        b.wait_ready(30)
        with TcpExporter(port) as exporter:
            exporter.send(make_stream(5, 2))
        line = b.wait_log("dump_dir_unusable", timeout=20)
        assert "a symlink of uid" in line["error"]
        time.sleep(1.0)
        assert os.listdir(private) == [], "nothing created through the symlink"
        assert b.running


def test_dump_files_are_not_readable_by_other_users(attacker, balancer, shared_dir):
    dump = shared_dir / "operator-dump"
    dump.mkdir(mode=0o755)  # an operator-made directory anyone may list
    with TcpSink(up=False) as target:  # down: the file stays in the directory
        port = free_port()
        b = balancer(recorder_env(port, dump, target.endpoint))
        b.wait_ready(30)
        with TcpExporter(port) as exporter:
            exporter.send(make_stream(5, 2))
        b.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 6)
        os.kill(b.handler_pid("fullflow[0]"), signal.SIGHUP)  # rotate: the file is completed
        b.wait_log("dump_completed", timeout=20)
        [name] = [n for n in os.listdir(dump) if n.endswith(".ipfix")]
        assert stat.S_IMODE(os.stat(dump / name).st_mode) == 0o640
        out = attacker.run(f"open({str(dump / name)!r}, 'rb').read(); print('READ')")
        assert "READ" not in out.stdout and "PermissionError" in out.stderr
