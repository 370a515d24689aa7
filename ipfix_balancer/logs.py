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
import time
from typing import Any, Protocol

import structlog

#: syslog priorities for the ``<N>`` prefix journald understands.
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
RING_ENV = "IPFIX_BALANCER_LOG_RING"
RING_BYTES = 1 << 20
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Log(Protocol):
    """What the product asks of a logger: one event and its fields per call. ``setup``'s structlog logger is
    one, as are the tests' fakes (tests/fakes.py)."""

    def debug(self, event: str, **fields: Any) -> object: ...
    def info(self, event: str, **fields: Any) -> object: ...
    def warning(self, event: str, **fields: Any) -> object: ...
    def error(self, event: str, **fields: Any) -> object: ...


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


class Throttle:
    """At most one line per (event, source) per ``interval`` seconds: the one mechanism against log floods.

    Anything that can repeat per message, per connection or per retry goes through here (a junk datagram
    flood must not cost the legitimate traffic its CPU, nor the journal its disk). The first line of a
    window is written at once; the ones after it within the window are only counted, and the next line
    written for that (event, source) carries ``suppressed=N``. ``source`` is what an operator acts on:
    a peer host, a subreceiver, or "" for the listener itself.

    On top of that, one event writes at most PER_EVENT lines per ``interval`` from all sources together (junk
    from 2,000 sources is not 2,000 lines): the lines held back by that cap are counted, and the next line of
    the event carries ``suppressed_overall=N``.
    """

    MAX_KEYS = 4096  # a flood from many sources must not grow this table without bound
    PER_EVENT = 20  # lines of one event per interval, all sources together

    def __init__(self, log, interval: float = 60.0, clock=time.monotonic):
        self.log = log
        self.interval = interval
        self.clock = clock
        self._windows: dict[tuple[str, str], list] = {}  # (event, source) -> [window end, suppressed]
        self._events: dict[str, list] = {}  # event -> [window end, lines written, held back by PER_EVENT]

    def info(self, event: str, source: str, **fields) -> bool:
        return self._emit(self.log.info, event, source, fields)

    def warning(self, event: str, source: str, **fields) -> bool:
        return self._emit(self.log.warning, event, source, fields)

    def error(self, event: str, source: str, **fields) -> bool:
        return self._emit(self.log.error, event, source, fields)

    def _emit(self, method, event: str, source: str, fields: dict) -> bool:
        """Write the line, or count it; True when written."""
        now = self.clock()
        key = (event, source)
        window = self._windows.get(key)
        if window is not None and now < window[0]:
            window[1] += 1
            return False
        overall = self._events.get(event)
        if overall is None or now >= overall[0]:
            overall = self._events[event] = [now + self.interval, 0, overall[2] if overall else 0]
        if overall[1] >= self.PER_EVENT:  # this source's window is not started: it is heard once the cap lifts
            overall[2] += 1
            return False
        overall[1] += 1
        if window is None and len(self._windows) >= self.MAX_KEYS:
            self._prune(now)
        suppressed = window[1] if window is not None else 0
        self._windows[key] = [now + self.interval, 0]
        if suppressed:
            fields["suppressed"] = suppressed
        if overall[2]:
            fields["suppressed_overall"], overall[2] = overall[2], 0
        method(event, **fields)
        return True

    def _prune(self, now: float) -> None:
        """Forget windows that ended (their suppressed counts with them: the flood is over); if every one
        is current, start afresh rather than grow."""
        windows = self._windows
        for key in [k for k, w in windows.items() if w[0] <= now]:
            del windows[key]
        if len(windows) >= self.MAX_KEYS:
            windows.clear()
