"""Who the balancer runs as: the service user, with only the capabilities its configuration needs.

Under systemd the unit sets the user (docs/operations.md "Security"). ``ipfix-balancer run`` started by root by hand
drops to the same user itself when it exists, keeping the needed capabilities as *ambient* ones so that
they survive the exec of every handler and of the supervisor's own re-execution.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.model import Config

SERVICE_USER = "ipfix-balancer"  # created by the RPM; $IPFIX_BALANCER_USER overrides, empty: never drop
CAP_NET_BIND_SERVICE = 10
CAP_NET_RAW = 13
_CAP_NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_RAW: "CAP_NET_RAW"}
_PR_SET_KEEPCAPS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 8, 47, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


def capabilities(config: Config) -> tuple[str, ...]:
    """What a configuration needs beyond an ordinary user: CAP_NET_BIND_SERVICE for a port < 1024,
    CAP_NET_RAW for source-address preservation (BALANCER_SUB_SOURCE=exporter writes raw IPv4 datagrams)."""
    needs = {"CAP_NET_BIND_SERVICE": any(rc.listen.port < 1024 for rc in config.receivers),
             "CAP_NET_RAW": any(rc.forwarding.sub_source == "exporter" for rc in config.receivers)}
    return tuple(cap for cap, needed in needs.items() if needed)


def service_user() -> pwd.struct_passwd | None:
    """The user to drop to: only when we are root outside a unit (systemd sets INVOCATION_ID; the unit
    chooses the user there) and the user exists."""
    name = os.environ.get("IPFIX_BALANCER_USER", SERVICE_USER)
    if os.geteuid() != 0 or not name or os.environ.get("INVOCATION_ID"):
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def drop(user: pwd.struct_passwd, caps: tuple[str, ...], own: list[str]) -> None:
    """Become ``user`` keeping ``caps`` (ambient). ``own``: directories made for it first if missing
    (the run dir, dump dirs); existing ones are left as they are."""
    for path in own:
        if not os.path.lexists(path):
            os.makedirs(path, 0o750)
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    numbers = [n for n, name in _CAP_NAMES.items() if name in caps]
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    mask = sum(1 << n for n in numbers)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(mask, mask, mask, 0, 0, 0)  # effective, permitted, inheritable (x2 words)
    _check(_libc.capset(header, data), "capset")
    for n in numbers:
        _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, n, 0, 0), "PR_CAP_AMBIENT_RAISE")


def out_of_reach(config_path: str, run_dir: str) -> str | None:
    """After ``drop``: what the service user cannot reach of what the balancer needs (the interpreter the
    handlers are started with, the package, the .env, the run dir), as "may not ... PATH"; None when all is
    in reach. A virtualenv under /root, or a checkout in a private home, is the usual case."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path, mode, what in ((sys.executable, os.X_OK, "run the interpreter"),
                             (package, os.R_OK | os.X_OK, "read the package"),
                             (config_path, os.R_OK, "read the configuration"),
                             (run_dir, os.W_OK | os.X_OK, "write the run directory")):
        if not os.access(path, mode):
            return f"may not {what} {path}"
    return None


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed")


def raise_fd_limit() -> None:
    """Use all the descriptors we may (the soft limit is often 1024 or 256 while the hard one is far
    higher): a handler needs one per exporter session and subreceiver, and the supervisor must not run out
    while someone holds connections to its metrics port."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. a hard limit above fs.nr_open: keep the soft one
            pass
