"""The event loop: no event for an object unwatched or closed earlier in the same turn; timers; batching."""

import socket

from ipfix_balancer.net.loop import READ, Loop


def readable_pair():
    a, b = socket.socketpair()
    a.send(b"x")
    return a, b


def one_turn():
    """An ``until`` for Loop.run that allows exactly one turn."""
    turns = []
    return lambda: bool(turns) or turns.append(1)


def test_no_stale_event_after_an_earlier_callback_closed_the_socket():
    """Two sockets ready in one batch; the first callback closes the other: its event must not run
    (in a handler this was an exporter leaving while its collector closed the mirror: AttributeError)."""
    loop = Loop()
    (_, b1), (_, b2) = readable_pair(), readable_pair()
    calls = []

    def on_ready(mine, other):
        calls.append(mine)
        loop.unwatch(other)
        other.close()

    loop.watch(b1, READ, lambda _mask: on_ready(b1, b2))
    loop.watch(b2, READ, lambda _mask: on_ready(b2, b1))
    loop.run(until=one_turn())
    assert len(calls) == 1


def test_after_turn_runs_once_per_key_and_timers_fire():
    loop = Loop()
    ran = []
    loop.after_turn(1, lambda: ran.append("a"))
    loop.after_turn(1, lambda: ran.append("b"))  # replaces: one flush per output per turn
    loop.call_later(0.01, lambda: ran.append("t"))
    cancelled = loop.call_later(0.0, lambda: ran.append("never"))
    cancelled.cancel()
    loop.run(until=lambda: "t" in ran)
    assert ran == ["b", "t"]
