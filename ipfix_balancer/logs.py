"""Structured logging: one line per event on stdout, key=value or JSON.

Every line carries the process context (``stream``, ``receiver``, ``pid``) bound once at start, so a
grep in ``journalctl`` always tells which handler spoke. When stdout is the journal (``JOURNAL_STREAM``
is set by systemd) the timestamp is dropped (journald adds its own) and the line starts with the
syslog priority prefix ``<N>`` so ``journalctl -p err`` works.

Every process the supervisor starts also appends a JSON copy of each line to the log ring in the run
directory (``$IPFIX_BALANCER_LOG_RING``, set by ``run``), which the console's Logs page reads: one file
that is renamed to ``<ring>.1`` when it passes RING_BYTES, so the ring holds at most twice that.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

import structlog

#: syslog priorities for the ``<N>`` prefix journald understands.
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
RING_ENV = "IPFIX_BALANCER_LOG_RING"
RING_BYTES = 1 << 20
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _journal_prefix(_logger, method: str, line: str) -> str:
    return f"<{_PRIORITY.get(method, 6)}>{line}"


def _ring_tee(path: str):
    """A processor appending the event as one JSON line to the ring. One O_APPEND write per line, so the
    lines of concurrent processes never interleave; any error is ignored: logging must not stop a process."""
    def tee(_logger, _method: str, event_dict: dict) -> dict:
        doc = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), **event_dict}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, (json.dumps(doc, default=str) + "\n").encode())
                if os.fstat(fd).st_size > RING_BYTES:
                    os.replace(path, path + ".1")
            finally:
                os.close(fd)
        except OSError:
            pass
        return event_dict
    return tee


def setup(fmt: str = "text", level: str = "info", **context) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound to ``context``."""
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    processors: list = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(structlog.processors.format_exc_info)
    if os.environ.get(RING_ENV):
        processors.append(_ring_tee(os.environ[RING_ENV]))
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
