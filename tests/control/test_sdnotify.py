"""control/sdnotify.py against a real AF_UNIX datagram socket standing in for systemd's."""

import os
import socket

import pytest

from ipfix_balancer.control.sdnotify import Notifier


@pytest.fixture
def systemd(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    with sock:
        yield sock


def received(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_more(sock) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2)
    return False


def test_ready_status_and_reloading_arrive_as_one_datagram_each(systemd, tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    n.ready("2 handlers listening")
    assert received(systemd) == ["READY=1", "STATUS=2 handlers listening"]
    n.status("2 handlers listening")  # unchanged: not sent again
    n.status("1 of 2 handlers listening")
    assert received(systemd) == ["STATUS=1 of 2 handlers listening"]
    n.reloading()
    reload, usec = received(systemd)
    assert reload == "RELOADING=1" and usec.startswith("MONOTONIC_USEC=") and int(usec.split("=")[1]) > 0
    assert nothing_more(systemd)


def test_the_watchdog_is_pinged_at_half_its_timeout(systemd, tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "10000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 5.0
    for now in (100.0, 102.0, 104.9, 105.0):
        n.watchdog(now)
    assert [received(systemd), received(systemd)] == [["WATCHDOG=1"], ["WATCHDOG=1"]] and nothing_more(systemd)


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}],
                         ids=["unset", "zero", "another process's"])
def test_no_watchdog_unless_it_is_set_and_ours(env, systemd, tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), **env})
    n.watchdog(100.0)
    assert n.watchdog_interval is None and nothing_more(systemd)


def test_an_abstract_socket_address_is_used_as_such():
    name = f"ipfix-balancer-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert received(sock) == ["READY=1"]


def test_without_systemd_or_when_it_is_gone_nothing_is_sent_and_nothing_fails(tmp_path):
    assert not Notifier({}).send("READY=1") and Notifier({}).sock is None
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert gone.send("READY=1") is False
    gone.ready("x")  # must not raise
