"""Local attacks run as a real unprivileged user (``runuser``) against a balancer run by root.

The attacker's code is stdlib-only and runs with the system ``python3``: it needs nothing of ours.
pytest's ``tmp_path`` sits under a root-only 0700 directory that the attacker cannot even reach, so
attack targets live in ``shared_dir``: a fresh 1777 directory in /tmp (what /tmp itself is).
"""
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from attack import ATTACKER, Attacker

from ipfixkit import Balancer


@pytest.fixture(scope="session")
def attacker() -> Attacker:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a user and runs the balancer as root")
    if not (shutil.which("useradd") and shutil.which("runuser") and os.path.exists("/usr/bin/python3")):
        pytest.skip("needs useradd, runuser and /usr/bin/python3")
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ATTACKER],
                       check=True, capture_output=True)
    return Attacker(ATTACKER)


@pytest.fixture
def shared_dir():
    path = Path(tempfile.mkdtemp(prefix="ipfix-sec-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def reachable_balancer(shared_dir):
    """Factory for balancers whose directory the attacker can traverse (0755, like /run), so an attack
    on the run dir fails for the balancer's reasons and not because pytest's tmp dir is private."""
    started = []

    def make(env_text: str, **kwargs) -> Balancer:
        workdir = shared_dir / f"balancer{len(started)}"
        workdir.mkdir(mode=0o755)
        b = Balancer(workdir, env_text, **kwargs)
        started.append(b)
        return b

    yield make
    for b in started:
        b.__exit__(None, None, None)


@pytest.fixture
def victim(tmp_path):
    """A root-only file the attacks try to overwrite or read through planted symlinks."""
    path = tmp_path / "victim"
    path.write_text("root secret\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def service_user(attacker) -> str:
    """A stand-in for the RPM's ipfix-balancer user (``IPFIX_BALANCER_USER`` names it)."""
    name = "ipfixsec-service"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
    return name
