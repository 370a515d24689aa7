"""Exit statuses: part of the contract with systemd (``RestartPreventExitStatus=2 3`` in the unit), the
supervisor (which restarts a handler that exits non-zero) and scripts calling the CLI. One enum, so a
status is named where it is returned and documented once (README "Change without loss", ``man 8``)."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1  # a handler lost messages; a supervisor's handler did not stop cleanly; a CLI command failed
    CONFIG_INVALID = 2  # the supervisor refuses a bad file: restarting cannot help (systemd does not)
    CANNOT_START = 3  # the run dir is unsafe, taken by another supervisor, or privileges cannot be dropped
    INTERNAL_ERROR = 70  # EX_SOFTWARE: a handler crashed or got no settings; restarted with backoff
    CANNOT_LISTEN = 75  # EX_TEMPFAIL: the port may be free later, the supervisor retries with backoff
