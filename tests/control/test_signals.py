"""control/signals.py: the wake-up helper with real signals, and the rotation notice to the supervisor."""
import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipfix_balancer.control import signals

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    signal.set_wakeup_fd(-1)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def readable(sock, timeout) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def test_a_signal_wakes_select_and_is_taken_once(restore_signals):
    wake = signals.Wakeup((signal.SIGUSR1, signal.SIGUSR2))
    assert not readable(wake.sock, 0) and wake.take() == []
    for sig in (signal.SIGUSR2, signal.SIGUSR1):
        os.kill(os.getpid(), sig)
        assert readable(wake.sock, 5)
        assert wake.take() == [sig]
        assert not readable(wake.sock, 0) and wake.take() == []


def _parent_sees_rotation(parent_name: str) -> bool:
    """Run a parent process named parent_name whose child calls notify_supervisor; True when the parent
    got the rotation signal from that child."""
    script = textwrap.dedent(f"""
        import signal, subprocess, sys
        from ipfix_balancer.control import signals
        signals.set_process_name({parent_name!r})
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signals.ROTATED}})
        subprocess.run([sys.executable, "-c",
                       "from ipfix_balancer.control import signals; signals.notify_supervisor()"],
                       check=True)
        info = signal.sigtimedwait({{signals.ROTATED}}, 0.5)
        print("rotated" if info is not None else "nothing")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "rotated"


def test_notify_supervisor_signals_only_a_parent_named_like_the_supervisor():
    assert _parent_sees_rotation(signals.SUPERVISOR_NAME)
    assert not _parent_sees_rotation("python-test")


def test_set_process_name_keeps_what_the_kernel_keeps():
    script = ("from ipfix_balancer.control import signals; signals.set_process_name('ipfix-clickstream-long'); "
              "print(open('/proc/self/comm').read().strip())")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "ipfix-clickstre"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_set_process_name_works_after_dropping_root():
    # After setuid the process is not dumpable and /proc/self/comm belongs to root: a write to it fails.
    script = ("import os; from ipfix_balancer.control import signals; os.setgid(65534); os.setuid(65534); "
              "signals.set_process_name('ipfix-balancer'); print(open('/proc/self/comm').read().strip())")
    out = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ipfix-balancer"
