"""What the attacks need: the attacker user, and what root observes of the balancer's sockets."""
import contextlib
import hashlib
import os
import pwd
import signal
import subprocess
import textwrap

ATTACKER = "ipfixsec-attacker"


class Attacker:
    def __init__(self, name: str):
        self.name = name
        self.uid = pwd.getpwnam(name).pw_uid

    def command(self, code: str) -> list[str]:
        return ["runuser", "-u", self.name, "--", "/usr/bin/python3", "-c", textwrap.dedent(code)]

    def run(self, code: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``code`` as the attacker; its stdout is the test's evidence."""
        return subprocess.run(self.command(code), capture_output=True, text=True, timeout=timeout, cwd="/")

    def start(self, code: str) -> subprocess.Popen:
        """Run ``code`` in the background, in its own process group: ``stop`` kills all of it (runuser
        does not pass SIGKILL on to its child)."""
        return subprocess.Popen(self.command(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd="/", start_new_session=True)

    @staticmethod
    def stop(proc: subprocess.Popen) -> str:
        """Kill a background attack; its stdout."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate(10)[0]


def legacy_handover_name(run_dir) -> str:
    """The abstract socket name the handover used to listen on (computable by anyone)."""
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
    return f"\0fast_ipfix_balancer/{digest}/fullflow/0"


def named_unix_sockets(pid: int) -> list[str]:
    """Names (paths or @abstract) of the unix sockets process ``pid`` holds: empty when it has none."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    names = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes:
                names.append(fields[7])
    return names
