"""The lifecycle of one output, as a pure state machine: when to connect, when a connection is stalled, on
probation or healthy, when to give it up, when a leaving session's output must close.

The states and their transitions are data (``TRANSITIONS``, in the style of h11's ``_state.py``): a
transition not in the table raises ``IllegalTransition``. Events come in with the time (``now``, monotonic
seconds) and return what the transport must do (``Action``); the transport (``net.connector``) reads no
clock to decide anything and executes only. ``next_deadline`` says when it must call ``tick`` again.

Three rules carry the no-loss promise:

- *Backoff that remembers.* A connection that failed, stalled or was reset comes back with doubling delays
  (``BACKOFF_CAP``; ``SUSPECT_CAP`` once it stalled), and only a connection that has shown it reads resets
  the delay.
- *Proof of reading.* A collector's kernel acknowledges what its process never reads, up to its receive
  buffer. A connection is *proven* only when its collector acknowledged more than any receive buffer could
  hold (``proof_bytes``: ``PROOF_MIN``, or ``PROOF_FACTOR`` times the largest window it advertised), or when
  the window it advertises opens again after it shrank. Until then what it acknowledged may sit unread:
  the send queue keeps count of it (the acknowledged tail), counted as lost if a reset discards it; and a
  connection after a stall or reset is on ``PROBATION``: RoundRobin gives it at most a probe's worth.
- *Leaving is not losing.* When its exporter leaves, an output keeps reconnecting and delivering until its
  session is done or ``drain_seconds`` pass; only then does it close (what it still holds is counted).
"""

from __future__ import annotations

import enum
from typing import Callable


class State(enum.Enum):
    DOWN = "down"              # no connection; retrying with backoff
    CONNECTING = "connecting"
    UP = "up"                  # connected and healthy
    PROBATION = "probation"    # connected after a stall or a reset: not healthy until it shows it reads
    STALLED = "stalled"        # connected, but the collector has taken nothing for ``stall`` seconds
    CLOSED = "closed"          # final: nothing more will be sent


_UP = State.UP  # (a module global: an enum member lookup costs about 65 ns, this runs once per flush)


class Event(enum.Enum):
    CONNECT = "connect"        # a connection attempt starts
    CONNECTED = "connected"    # it is established; the output was healthy before
    PROBE = "probe"            # it is established; the output stalled or was reset before
    LOST = "lost"              # the connection failed, or we reset it
    STALL = "stall"            # nothing acknowledged for ``stall`` seconds while bytes wait
    PROGRESS = "progress"      # a stalled connection's collector took data again
    PROVEN = "proven"          # a connection on probation showed that its collector reads
    LEAVE = "leave"            # the exporter left: deliver what is held, then close (the state stays)
    CLOSE = "close"            # final


class Action(enum.Enum):
    CONNECT = "connect"        # open a new connection
    STALLED = "stalled"        # declare the output stalled (RoundRobin moves its queue)
    RESET = "reset"            # give the stalled connection up with a reset (then ``lost``)
    PROVEN = "proven"          # the collector reads: the queue may let go of what it acknowledged
    READ = "read"              # the collector read all it acknowledged so far (its window is open again)
    CLOSE = "close"            # the drain deadline passed: close, counting what is left (``drain_deadline``)


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.DOWN, E.CONNECT): S.CONNECTING,
    (S.CONNECTING, E.CONNECTED): S.UP,
    (S.CONNECTING, E.PROBE): S.PROBATION,
    (S.CONNECTING, E.LOST): S.DOWN,
    (S.UP, E.LOST): S.DOWN,
    (S.UP, E.STALL): S.STALLED,
    (S.PROBATION, E.PROVEN): S.UP,
    (S.PROBATION, E.LOST): S.DOWN,
    (S.PROBATION, E.STALL): S.STALLED,
    (S.STALLED, E.PROGRESS): S.PROBATION,
    (S.STALLED, E.LOST): S.DOWN,
    **{(state, E.LEAVE): state for state in State if state is not S.CLOSED},
    **{(state, E.CLOSE): S.CLOSED for state in State if state is not S.CLOSED},
}
del S, E


#: what an ended connection means for what its collector acknowledged and may not have read (the send
#: queue's acknowledged tail): read, or counted as lost
DELIVERED, COUNT = "delivered", "count"


class IllegalTransition(RuntimeError):
    """An event the current state does not allow: a bug in the caller, never a network condition."""


BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0     # a collector that is down: retried at least this often
SUSPECT_CAP = 60.0    # one that stalled: each retry may cost what its kernel takes unread
PROOF_MIN = 4 * 1024 * 1024  # acknowledged bytes that no collector's receive buffer holds unread
PROOF_FACTOR = 4             # ... or this many times the largest window the collector advertised
PROBE_MIN = 256 * 1024       # what a connection on probation may have outstanding before its window is known
DRAIN_SECONDS = 600.0        # default: how long a leaving session's outputs keep trying to deliver


class Retry:
    """When a DOWN output connects again, and whether that connection must first show that it reads."""

    __slots__ = ("delay", "at", "suspect", "stalled_before")

    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST  # the next delay after a failure (doubling, up to a cap)
        self.at: float | None = None  # DOWN: when to connect again
        self.suspect = False        # it failed or stalled since it last showed it reads: the next one probes
        self.stalled_before = False  # we reset it for a stall since it last showed it reads: long backoff


class Window:
    """The receive window the collector advertises on this connection: its reopening shows reading."""

    __slots__ = ("largest", "now", "shrunk", "proof_from")

    def __init__(self, largest: int = 0) -> None:
        self.largest = largest      # the largest it advertised (the handshake's: its buffer empty)
        self.now = largest          # the one it advertised last
        self.shrunk = False         # it fell below half the largest since it last showed it read
        self.proof_from = 0         # the acknowledged offset the proof counts from (a stall restarts it)


class OutputLifecycle:
    """The state of one output and the clock-driven decisions about it. ``stall``: seconds without progress
    before STALLED (0: never, as for UDP); ``move_stalled``: a stall is given up with a reset after another
    ``stall`` seconds (RoundRobin: its messages go to live outputs; All keeps waiting); ``stream``: TCP
    (acknowledgements and probation by bytes) or UDP (probation until a refusal check passes);
    ``drain_seconds``: how long a leaving output may keep delivering."""

    __slots__ = ("state", "stall", "move_stalled", "stream", "retry", "progress_at", "stalled_at", "window",
                 "acked", "proven", "leaving", "drain_seconds", "drain_until", "on_state")

    def __init__(self, *, stall: float = 0.0, move_stalled: bool = False, stream: bool = True,
                 drain_seconds: float = DRAIN_SECONDS):
        self.state = State.DOWN
        self.stall = stall
        self.move_stalled = move_stalled
        self.stream = stream
        self.retry = Retry()
        self.progress_at = 0.0      # when the acknowledged offset last advanced (or bytes began to wait)
        self.stalled_at = 0.0
        self.window = Window()
        self.acked = 0              # this connection's stream offset acknowledged so far
        self.proven = False         # this connection's collector acknowledged more than it could hold unread
        self.leaving = False        # the exporter left (LEAVE): closes once delivered, or at drain_until
        self.drain_seconds = drain_seconds
        self.drain_until: float | None = None  # the deadline for what is held, once the transport knows the time
        # called with each new state (the send queue mirrors it for its hot paths)
        self.on_state: Callable[[State], None] | None = None

    def _go(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise IllegalTransition(f"{event.value} in state {self.state.value}") from None
        if self.on_state is not None:
            self.on_state(self.state)

    @property
    def sending(self) -> bool:
        """The transport may write (UP, or PROBATION within its probe)."""
        return self.state is State.UP or self.state is State.PROBATION

    # -- events --------------------------------------------------------------------------------
    def connecting(self) -> None:
        self.retry.at = None
        self._go(Event.CONNECT)

    def connected(self, now: float, window: int = 0) -> State:
        """The connection is established: on probation if the output failed or stalled before it showed
        it reads (a hung collector's kernel accepts connections; a UDP socket connects whatever the peer
        does). ``window``: what the collector offered in the handshake, with its buffer empty (never scaled):
        what it offers again once its process has read everything. Returns the new state."""
        self.progress_at = now
        self.window = Window(window)
        self.acked = 0
        self.proven = False
        self._go(Event.PROBE if self.retry.suspect else Event.CONNECTED)
        return self.state

    def lost(self, now: float, *, stalled: bool = False) -> float:
        """The connection failed (``stalled``: we reset it for a stall). Returns the delay before the next
        attempt; the delay doubles each time, up to ``SUSPECT_CAP`` once the collector stalled."""
        retry = self.retry
        if stalled:
            retry.suspect = retry.stalled_before = True
        elif self.state is not State.CONNECTING and (self.unread or not self.stream):
            # It failed holding data it had not shown it read (a datagram socket shows nothing): the next
            # connection probes.
            retry.suspect = True
        self._go(Event.LOST)
        delay = retry.delay
        if stalled:
            delay = max(delay, self.stall)
        retry.at = now + delay
        retry.delay = min(delay * 2, SUSPECT_CAP if retry.stalled_before else BACKOFF_CAP)
        return delay

    def observe(self, now: float, acked: int, window: int | None = None) -> Action | None:
        """What the collector's TCP reports now: the stream acknowledged up to ``acked``, and (while the
        connection is not proven) the receive window it advertises. Progress is the offset advancing or the
        window opening again after it shrank (the collector's process read). Returns ``PROVEN`` once it
        acknowledged more than it could hold unread, or ``READ`` when its window, having shrunk below half the
        largest it advertised, is back above that: its process read what it had acknowledged. (A window that
        only grows proves nothing: a kernel grows it as data arrives, whether its process reads or not.)"""
        if self.proven and self.state is _UP:  # the hot path (once per flush): acknowledgements alone
            if acked > self.acked:
                self.acked, self.progress_at = acked, now
            return None
        progress = acked > self.acked
        win = self.window
        if window is not None:
            progress = progress or (win.shrunk and window > win.now)
            win.now = window
            if window > win.largest:
                win.largest = window
            if 2 * window < win.largest:
                win.shrunk = True
        self.acked = acked
        if not progress:
            return None
        self.progress_at = now
        if self.state is State.STALLED:  # it reads again, or only its kernel does: it must show which
            self._go(Event.PROGRESS)
            self.proven = False
            win.proof_from = acked
            return None
        if self.proven:
            return None
        if acked - win.proof_from >= self.proof_bytes:
            self.proven = True
            self._healthy()
            return Action.PROVEN
        if self.unread or not win.shrunk:
            return None
        win.shrunk = False
        self._healthy()  # its process read what it acknowledged: that shows it reads as well
        return Action.READ

    def _healthy(self) -> None:
        retry = self.retry
        retry.suspect = retry.stalled_before = False
        retry.delay = BACKOFF_FIRST
        if self.state is State.PROBATION:
            self._go(Event.PROVEN)

    @property
    def unread(self) -> bool:
        """Acknowledged data sits unread in the collector's buffer: its window is below half the largest it
        advertised (only while the connection is not proven; a proven one is judged by acknowledgements).
        Half, because a receiver announces a window that its process's reads reopen only once it at least
        doubles (Linux ``tcp_cleanup_rbuf``): less unread than that may never show as read."""
        return not self.proven and 2 * self.window.now < self.window.largest

    def unread_fate(self, clean: bool) -> str:
        """A connection ended: did its collector's process read what its TCP acknowledged? Yes when it closed
        cleanly (FIN): a process that closes or dies with data unread makes its kernel reset instead. After a
        reset (ours for a stall, or the collector's) what it acknowledged since it last showed it read is
        counted as lost, an upper bound. A datagram socket acknowledges nothing."""
        return DELIVERED if clean or not self.stream else COUNT

    def confirmed(self) -> None:
        """UDP: a refusal check after a datagram found none (the only proof a datagram socket gives)."""
        self.proven = True
        self._healthy()

    def waiting(self, now: float) -> None:
        """Bytes begin to wait for acknowledgement after none did: the stall clock starts now."""
        self.progress_at = now

    def leave(self) -> None:
        """The exporter left (or the subreceiver was removed): deliver what is held, then close."""
        if not self.leaving:
            self._go(Event.LEAVE)
            self.leaving = True

    def exporter_left(self, now: float) -> None:
        """The transport starts the drain deadline (once: a second leave does not extend it)."""
        if self.drain_until is None:
            self.drain_until = now + self.drain_seconds

    def close(self) -> None:
        if self.state is not State.CLOSED:
            self._go(Event.CLOSE)

    @property
    def proof_bytes(self) -> int:
        return max(PROOF_MIN, PROOF_FACTOR * self.window.largest)

    @property
    def unread_bound(self) -> int:
        """The most the collector's buffer can hold unread, an upper bound: Linux offers about half of a
        receive buffer as window, so three times the largest window it advertised (at least a probe's worth).
        What a reset may discard is counted up to this."""
        return max(PROBE_MIN, 3 * self.window.largest)

    @property
    def probe_bytes(self) -> int:
        """What a connection on probation may have queued and outstanding: about one receive buffer."""
        return max(PROBE_MIN, 2 * self.window.largest)

    # -- time ----------------------------------------------------------------------------------
    def tick(self, now: float, waiting: bool) -> list[Action]:
        """What is due at ``now``; ``waiting``: bytes are written and not yet acknowledged, or acknowledged
        and not yet read (``unread``)."""
        state = self.state
        if state is State.CLOSED:
            return []
        if self.drain_until is not None and now >= self.drain_until:
            return [Action.CLOSE]
        if state is State.DOWN:
            return [Action.CONNECT] if self.retry.at is not None and now >= self.retry.at else []
        if not self.stall or not self.stream:
            return []
        if self.sending and waiting and now - self.progress_at >= self.stall:
            self._go(Event.STALL)
            self.stalled_at = now
            return [Action.STALLED]
        if state is State.STALLED and self.move_stalled and now - self.stalled_at >= self.stall:
            return [Action.RESET]
        return []

    def next_deadline(self, waiting: bool) -> float | None:
        """The earliest time ``tick`` may have something to do (None: only an event can change anything).
        A transport that polls acknowledgements calls ``tick`` at least this soon."""
        times = []
        if self.drain_until is not None:
            times.append(self.drain_until)
        if self.state is State.DOWN and self.retry.at is not None:
            times.append(self.retry.at)
        elif self.stall and self.stream:
            if self.sending and waiting:
                times.append(self.progress_at + self.stall)
            elif self.state is State.STALLED and self.move_stalled:
                times.append(self.stalled_at + self.stall)
        return min(times) if times else None
