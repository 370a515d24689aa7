"""The fakes the unit tests share, one per interface the product depends on: a log, a clock, a send queue's
transport, a socket that fails on cue, an exporter session. Each records what it was asked, so tests assert
outcomes; none has behaviour of its own beyond what a test scripts."""
from __future__ import annotations

import socket


class Log:
    """A structlog-style logger: ``events`` is a list of (level, event, fields)."""

    def __init__(self):
        self.events = []

    def bind(self, **_kw):
        return self

    def _add(self, level):
        return lambda event, **kw: self.events.append((level, event, kw))

    def __getattr__(self, level):
        if level in ("debug", "info", "warning", "error", "exception"):
            return self._add(level)
        raise AttributeError(level)

    def named(self, event):
        return [kw for _, e, kw in self.events if e == event]


class FakeClock:
    """A clock that moves only when told: pass it where the product takes ``clock=`` (or patch it in for
    ``time.monotonic``)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


class FakeTransport:
    """What a send queue's connection does, counted: ``core.sendqueue.SendQueue.transport``."""

    def __init__(self):
        self.woken = self.flushed = self.closed = self.draining = 0

    def wake(self):
        self.woken += 1

    def flush(self):
        self.flushed += 1

    def close_when_drained(self):
        self.draining += 1

    def close(self, abort=False):
        self.closed += 1
        self.aborted = abort

    aborted = False


class FakeSocket:
    """A real socket (so a selector can watch it) whose next calls of a method raise scripted errors:
    ``FakeSocket(sock).fail("accept", OSError(errno.EMFILE, ...))``. Every other call goes to the socket."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._failures: dict[str, list[BaseException]] = {}

    def fail(self, method: str, *errors: BaseException) -> FakeSocket:
        self._failures.setdefault(method, []).extend(errors)
        return self

    def __getattr__(self, name):
        real = getattr(self._sock, name)
        failures = self._failures.get(name)
        if not failures:
            return real

        def failing(*_args, **_kw):
            raise failures.pop(0)
        return failing


class FakeSession:
    """An exporter session (``core.session.ExporterSession``) that keeps what it is given: ``runs`` holds
    each delivery's messages as bytes; ``deliver`` reports the refusal ``refuse`` (None: accepted) and
    ``dispatched`` messages dispatched (None: all of them, or none when it refuses)."""

    def __init__(self, key, peer: str, templates=()):
        self.key, self.peer, self.templates = key, peer, templates
        self.runs: list[list[bytes]] = []
        self.stops: list[bool] = []
        self.refuse = None
        self.dispatched: int | None = None
        self.ended = False

    def deliver(self, msgs, stop: bool = True):
        self.runs.append([bytes(m) for m in msgs])
        self.stops.append(stop)
        if self.dispatched is not None:
            return self.dispatched, self.refuse
        return (0 if self.refuse else len(msgs)), self.refuse

    @property
    def messages(self) -> list[bytes]:
        return [m for run in self.runs for m in run]

    def end(self) -> None:
        self.ended = True
