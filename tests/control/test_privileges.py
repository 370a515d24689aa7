"""control/privileges.py: which capabilities a configuration needs, when to drop to the service user, the drop
itself (as root, in a forked child), what that user cannot reach, and the descriptor limit."""

import os
import pwd
from types import SimpleNamespace

import pytest

from ipfix_balancer.control import privileges


def config(*receivers):
    return SimpleNamespace(receivers=[SimpleNamespace(listen=SimpleNamespace(port=port),
                                                      forwarding=SimpleNamespace(sub_source=source))
                                      for port, source in receivers])


def test_capabilities_are_only_what_the_configuration_needs():
    assert privileges.capabilities(config((1500, "balancer"))) == ()
    assert privileges.capabilities(config((1500, "balancer"), (514, "balancer"))) == ("CAP_NET_BIND_SERVICE",)
    assert privileges.capabilities(config((1500, "exporter"), (80, "balancer"))) == ("CAP_NET_BIND_SERVICE",
                                                                                    "CAP_NET_RAW")


@pytest.mark.parametrize("euid, env, expected", [
    (0, {}, "nobody"),
    (1000, {}, None),  # not root: nothing to drop
    (0, {"INVOCATION_ID": "x"}, None),  # under systemd the unit chooses the user
    (0, {"IPFIX_BALANCER_USER": ""}, None),  # asked to stay root
    (0, {"IPFIX_BALANCER_USER": "no-such-user-here"}, None),
], ids=["root", "not root", "systemd", "empty", "missing user"])
def test_the_service_user_is_dropped_to_only_by_root_outside_a_unit(euid, env, expected, monkeypatch):
    monkeypatch.setattr(privileges.os, "geteuid", lambda: euid)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setenv("IPFIX_BALANCER_USER", "nobody")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    user = privileges.service_user()
    assert (user.pw_name if user else None) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_drop_becomes_the_user_with_ambient_capabilities_and_owns_new_directories(tmp_path):
    nobody = pwd.getpwnam("nobody")
    run_dir, existing = tmp_path / "run", tmp_path / "existing"
    existing.mkdir()
    tmp_path.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # the child drops; the test process stays root
        try:
            privileges.drop(nobody, ("CAP_NET_BIND_SERVICE",), [str(run_dir), str(existing)])
            with open("/proc/self/status") as f:
                caps = dict(line.split(":\t") for line in f if line.startswith("Cap"))
            ok = (os.getuid(), os.getgid(), os.getgroups()) == (nobody.pw_uid, nobody.pw_gid, []) \
                and int(caps["CapAmb"], 16) == 1 << privileges.CAP_NET_BIND_SERVICE
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (run_dir.stat().st_uid, oct(run_dir.stat().st_mode & 0o777)) == (nobody.pw_uid, "0o750")
    assert existing.stat().st_uid == 0  # left as it was


def test_out_of_reach_names_what_the_user_may_not_use(tmp_path, monkeypatch):
    env = tmp_path / "balancer.env"
    env.write_text("")
    assert privileges.out_of_reach(str(env), str(tmp_path)) is None
    denied = {str(tmp_path / "run")}
    monkeypatch.setattr(privileges.os, "access", lambda path, _mode: path not in denied)
    assert privileges.out_of_reach(str(env), str(tmp_path / "run")) == f"may not write the run directory {tmp_path}/run"


def test_the_descriptor_limit_is_raised_to_the_hard_one_when_it_may_be(monkeypatch):
    limits, set_to = [(1024, 524288)], []

    def setrlimit(_which, value):
        set_to.append(value)
        if value[0] > 100_000_000:
            raise ValueError("above nr_open")
    monkeypatch.setattr(privileges.resource, "getrlimit", lambda _which: limits[0])
    monkeypatch.setattr(privileges.resource, "setrlimit", setrlimit)
    privileges.raise_fd_limit()
    limits[0] = (4096, 4096)  # already at the limit: nothing to do
    privileges.raise_fd_limit()
    limits[0] = (1024, 1 << 40)  # refused: the soft limit stays, no exception
    privileges.raise_fd_limit()
    assert set_to == [(524288, 524288), (1 << 40, 1 << 40)]
