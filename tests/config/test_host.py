"""config/host.py: what LocalHost tells of this machine, and that the fake the other config tests use answers
the same questions."""
import errno
import inspect
import io

import pytest

from configkit import FakeHost
from ipfix_balancer.config import host as host_mod
from ipfix_balancer.config.host import Host, LocalHost


def test_the_fake_host_answers_every_question_of_the_interface():
    asked = {name for name, _ in inspect.getmembers(Host, inspect.isfunction) if not name.startswith("_")}
    assert asked == {"cpus", "memory_bytes", "has_cap_net_raw", "local_addresses", "local_broadcasts", "readable",
                     "nearest_existing", "name_limits"}
    for implementation in (LocalHost, FakeHost):
        for name in asked:
            assert (inspect.signature(getattr(implementation, name)).parameters.keys()
                    == inspect.signature(getattr(Host, name)).parameters.keys()), (implementation, name)


def test_cpus_are_the_affinity_and_every_counted_cpu(monkeypatch):
    monkeypatch.setattr(host_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(host_mod.os, "cpu_count", lambda: 4)
    assert LocalHost().cpus() == {0, 1, 2, 3}


def test_memory_is_told_or_none(monkeypatch):
    assert LocalHost().memory_bytes() > 0

    def unknown(_name):
        raise ValueError("unknown")
    monkeypatch.setattr(host_mod.os, "sysconf", unknown)
    assert LocalHost().memory_bytes() is None


@pytest.mark.parametrize("status, expected", [("CapEff:\t0000000000002000\n", True),
                                              ("CapEff:\t000001ffffffdfff\n", False), ("Name:\tx\n", False)])
def test_cap_net_raw_is_bit_13_of_the_effective_capabilities(monkeypatch, status, expected):
    monkeypatch.setattr(host_mod, "open", lambda _path: io.StringIO(f"Name:\tpython\n{status}"), raising=False)
    assert LocalHost().has_cap_net_raw() is expected


def test_without_proc_no_cap_net_raw(monkeypatch):
    def missing(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
    monkeypatch.setattr(host_mod, "open", missing, raising=False)
    assert LocalHost().has_cap_net_raw() is False


def test_broadcasts_are_empty_when_netlink_fails(monkeypatch):
    import pyroute2

    def refused():
        raise PermissionError(errno.EPERM, "netlink refused")
    monkeypatch.setattr(pyroute2, "IPRoute", refused)
    assert LocalHost().local_broadcasts() == set()
    with pytest.raises(PermissionError):  # loop checks must not pass silently: load_text reports it
        LocalHost().local_addresses()


def test_addresses_include_loopback():
    import ipaddress
    assert ipaddress.ip_address("127.0.0.1") in LocalHost().local_addresses()


def test_files_and_directories(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    local = LocalHost()
    assert local.nearest_existing(f"{tmp_path}/new/dir/") == (str(tmp_path), True)
    assert local.nearest_existing(f"{tmp_path}/afile/sub") == (str(tmp_path / "afile"), False)
    assert local.readable(str(tmp_path / "afile")) and not local.readable(str(tmp_path / "missing"))
    name_max, path_max = local.name_limits(str(tmp_path))
    assert 14 <= name_max < path_max

    def unsupported(_path, _name):
        raise OSError(errno.EINVAL, "not supported")
    monkeypatch.setattr(host_mod.os, "pathconf", unsupported)
    assert local.name_limits(str(tmp_path)) == (255, 4096)
