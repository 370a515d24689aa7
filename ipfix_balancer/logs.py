"""Structured logging: one line per event on stdout, key=value or JSON.

Every line carries the process context (``stream``, ``receiver``, ``pid``) bound once at start, so a
grep in ``journalctl`` always tells which handler spoke. When stdout is the journal (``JOURNAL_STREAM``
is set by systemd) the timestamp is dropped (journald adds its own) and the line starts with the
syslog priority prefix ``<N>`` so ``journalctl -p err`` works.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

#: syslog priorities for the ``<N>`` prefix journald understands.
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _journal_prefix(_logger, method: str, line: str) -> str:
    return f"<{_PRIORITY.get(method, 6)}>{line}"


def setup(fmt: str = "text", level: str = "info", **context) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound to ``context``."""
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    processors: list = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(structlog.processors.format_exc_info)
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event", "stream", "receiver", "pid"], drop_missing=True))
    if journal:
        processors.append(_journal_prefix)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),  # one write per line: handlers share stdout
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(pid=os.getpid(), **context)
    return structlog.get_logger()
