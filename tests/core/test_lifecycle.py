"""The output lifecycle without sockets or sleeps: every transition of the table, each illegal one, backoff,
stall and reset, probation and proof of reading, the drain deadline, all on a fake clock in milliseconds."""

import pytest

from ipfix_balancer.core.lifecycle import (
    BACKOFF_CAP, BACKOFF_FIRST, COUNT, DELIVERED, PROBE_MIN, PROOF_MIN, SUSPECT_CAP, TRANSITIONS, Action, Event,
    IllegalTransition,
    OutputLifecycle, State)

S = State
KiB = 1024


def connected(life: OutputLifecycle, now: float = 0.0, window: int = 65535) -> State:
    life.connecting()
    return life.connected(now, window)


def test_the_table_names_every_state_and_closes_from_all_but_closed():
    assert {s for s, _e in TRANSITIONS} | set(TRANSITIONS.values()) == set(State)
    assert all(TRANSITIONS[s, Event.CLOSE] is S.CLOSED for s in State if s is not S.CLOSED)
    assert (S.CLOSED, Event.CLOSE) not in TRANSITIONS


@pytest.mark.parametrize("state,event", [(s, e) for s in State for e in Event if (s, e) not in TRANSITIONS])
def test_every_transition_not_in_the_table_raises(state, event):
    life = OutputLifecycle(stall=1)
    life.state = state
    with pytest.raises(IllegalTransition):
        life._go(event)
    assert life.state is state


@pytest.mark.parametrize("pair", sorted(TRANSITIONS, key=lambda p: (p[0].value, p[1].value)),
                         ids=lambda p: f"{p[0].value}-{p[1].value}")
def test_every_transition_in_the_table_lands_where_it_says_and_is_mirrored(pair):
    seen = []
    life = OutputLifecycle(stall=1)
    life.on_state = seen.append
    life.state = pair[0]
    life._go(pair[1])
    assert life.state is TRANSITIONS[pair] and seen == [TRANSITIONS[pair]]


def test_a_healthy_first_connection_is_up_and_a_refused_one_backs_off_doubling_to_the_cap():
    life = OutputLifecycle(stall=5)
    assert connected(life) is S.UP
    life.lost(0.0)
    delays = []
    now = 0.0
    for _ in range(8):
        assert life.tick(now, False) == []
        now = life.next_deadline(False)
        assert life.tick(now, False) == [Action.CONNECT]
        life.connecting()
        delays.append(life.lost(now))  # refused again, from CONNECTING
    assert delays[0] == BACKOFF_FIRST * 2 and max(delays) == BACKOFF_CAP and delays == sorted(delays)
    assert life.state is S.DOWN


def test_a_hung_collector_over_60_simulated_seconds_is_probed_with_backoff_doubling_to_60_s():
    """Its kernel acknowledges a receive buffer, its process never reads: stalled after ``stall`` s, reset
    after another ``stall`` s, then each probe on probation, never up, the delay doubling to SUSPECT_CAP."""
    life = OutputLifecycle(stall=5, move_stalled=True)
    now, probes, resets, states = 0.0, 0, [], []
    connected(life, now)
    while now < 600:
        life.waiting(now)
        life.observe(now + 0.01, 256 * KiB, 0)  # its buffer fills at once: the window closes
        # polled every 0.5 s while bytes wait: no progress
        t = now + 0.5
        actions = []
        while Action.RESET not in actions:
            actions = life.tick(t, True)
            states.append(life.state)
            t += 0.5
        resets.append(t - 0.5)
        delay = life.lost(t - 0.5, stalled=True)
        assert life.state is S.DOWN
        now = life.next_deadline(False)
        assert now == pytest.approx(t - 0.5 + delay)
        assert life.tick(now, False) == [Action.CONNECT]
        assert connected(life, now) is S.PROBATION
        probes += 1
    gaps = [b - a for a, b in zip(resets, resets[1:])]
    assert S.UP not in states[10:], "never up again while it does not read"
    assert life.retry.delay == SUSPECT_CAP and max(gaps) <= SUSPECT_CAP + 2 * 5 + 1
    assert probes <= 16, "probes back off: a few per ten minutes, each costing at most a receive buffer"


def test_a_stalled_connection_that_reads_again_is_on_probation_until_it_shows_it():
    life = OutputLifecycle(stall=2, move_stalled=True)
    connected(life)
    life.observe(0.1, 100 * KiB, 200 * KiB)
    life.waiting(0.1)
    assert life.tick(2.05, True) == []
    assert life.tick(2.1, True) == [Action.STALLED] and life.state is S.STALLED
    assert life.observe(3.0, 150 * KiB, 10 * KiB) is None and life.state is S.PROBATION, "progress: probation"
    assert life.unread, "its window is below half the largest it advertised"
    assert life.observe(3.5, 160 * KiB, 200 * KiB) is Action.READ and life.state is S.UP, "window open again"
    assert life.retry.delay == BACKOFF_FIRST and not life.retry.suspect


def test_proof_by_volume_no_buffer_holds_that_much_unread():
    life = OutputLifecycle(stall=2)
    connected(life)
    assert life.observe(0.1, 64 * KiB, 64 * KiB) is None, "a window that never shrank proves nothing"
    life.observe(0.2, PROOF_MIN - 1, 0)
    assert not life.proven and life.unread
    assert life.observe(0.3, PROOF_MIN, 0) is Action.PROVEN and life.proven
    assert not life.unread, "a proven connection is judged by acknowledgements alone"
    assert life.observe(0.4, PROOF_MIN + 1, 0) is None


def test_the_handshakes_window_is_the_empty_buffer_a_full_one_shows_unread_from_the_first_look():
    life = OutputLifecycle(stall=2)
    connected(life, window=65535)
    assert not life.unread
    assert life.observe(0.1, 500 * KiB, 0) is None and life.unread, "filled before the first poll"
    assert life.observe(0.2, 500 * KiB, 300 * KiB) is Action.READ and life.window.largest == 300 * KiB


def test_probe_and_proof_scale_with_the_window():
    life = OutputLifecycle()
    assert life.probe_bytes == PROBE_MIN and life.proof_bytes == PROOF_MIN
    life.window.largest = 8 * 1024 * KiB
    assert life.probe_bytes == 16 * 1024 * KiB and life.proof_bytes == 32 * 1024 * KiB


def test_all_keeps_a_stalled_connection_roundrobin_resets_it_after_another_stall():
    for move, expect in ((False, []), (True, [Action.RESET])):
        life = OutputLifecycle(stall=1, move_stalled=move)
        connected(life)
        life.waiting(0)
        assert life.tick(1.0, True) == [Action.STALLED]
        assert life.tick(1.999, True) == []
        assert life.tick(2.0, True) == expect
        assert life.next_deadline(True) == (2.0 if move else None)


def test_a_collector_resetting_every_connection_is_probed_and_retried_at_most_every_5_s():
    """It accepts, its kernel acknowledges a buffer, then it resets: every connection after the first is on
    probation, and the backoff stays that of a collector that is down (it never stalled)."""
    life = OutputLifecycle(stall=5, move_stalled=True)
    now, states = 0.0, []
    for _ in range(20):
        states.append(connected(life, now))
        life.observe(now + 0.001, 100 * KiB, 0)  # its kernel took a buffer its process never read
        now = now + 0.002 + life.lost(now + 0.002)
        assert life.tick(now, False) == [Action.CONNECT]
    assert states[0] is S.UP and set(states[1:]) == {S.PROBATION}
    assert life.retry.delay == BACKOFF_CAP


def test_a_slow_reader_is_not_stalled_while_the_window_opens():
    life = OutputLifecycle(stall=1, move_stalled=True)
    connected(life)
    life.waiting(0)
    life.observe(0.1, 5000, 0)  # its buffer is full
    for i in range(1, 40):  # acknowledgements stop, but its process reads: the window opens, slowly
        life.observe(i * 0.5, 5000, 100 * i)
        assert life.tick(i * 0.5, True) == []
    assert life.state is S.UP


def test_drain_deadline_at_the_boundary_whatever_the_state():
    for state in (S.DOWN, S.CONNECTING, S.UP, S.PROBATION, S.STALLED):
        life = OutputLifecycle(stall=5)
        life.state = state
        life.exporter_left(10.0)
        life.exporter_left(20.0)  # once: a second leave does not extend it
        assert Action.CLOSE not in life.tick(609.999, False)
        assert life.next_deadline(False) <= 610.0
        assert life.tick(610.0, False) == [Action.CLOSE]
    life.close()
    assert life.state is S.CLOSED and life.tick(1e9, True) == []


def test_a_down_output_keeps_retrying_after_its_exporter_left():
    """The old transport reused one timer for the close deadline and the reconnect: a down output never
    retried once its exporter left. The lifecycle keeps both."""
    life = OutputLifecycle(stall=5)
    life.connecting()
    life.lost(0.0)
    life.exporter_left(0.0)
    assert life.next_deadline(False) == pytest.approx(BACKOFF_FIRST)
    assert life.tick(BACKOFF_FIRST, False) == [Action.CONNECT]


def test_udp_outputs_never_stall_and_come_back_on_probation_until_confirmed():
    life = OutputLifecycle(stall=5, stream=False)
    assert connected(life) is S.UP
    assert life.tick(100, True) == [] and life.next_deadline(True) is None
    life.lost(100)
    assert connected(life, 101) is S.PROBATION
    life.confirmed()
    assert life.state is S.UP and life.retry.delay == BACKOFF_FIRST


def test_a_collector_that_read_what_it_acknowledged_and_then_closed_comes_back_healthy():
    life = OutputLifecycle(stall=5)
    connected(life)
    assert life.observe(0.1, 1400, 64 * KiB) is None and not life.unread
    life.lost(0.2)
    assert connected(life, 0.4) is S.UP and life.retry.delay == BACKOFF_FIRST * 2


def test_a_window_that_grows_as_a_hung_kernel_takes_data_is_not_taken_for_reading():
    """On a new connection a kernel grows the window it offers as data arrives, whether its process reads or
    not: only a window that opens again after it shrank shows reading."""
    life = OutputLifecycle(stall=1, move_stalled=True)
    life.retry.suspect = True
    assert connected(life, window=65535) is S.PROBATION
    assert life.observe(0.01, 60 * KiB, 120 * KiB) is None and life.state is S.PROBATION
    assert life.observe(0.02, 200 * KiB, 0) is None and life.unread
    life.waiting(0.02)
    assert life.tick(1.02, True) == [Action.STALLED]


def test_what_an_ended_connection_means_for_what_its_collector_acknowledged():
    """FIN: its process read it (a process that closes with data unread makes its kernel reset). A reset,
    ours or the collector's: counted. A datagram socket acknowledges nothing."""
    tcp, udp = OutputLifecycle(stream=True), OutputLifecycle(stream=False)
    assert tcp.unread_fate(clean=True) == DELIVERED and tcp.unread_fate(clean=False) == COUNT
    assert udp.unread_fate(clean=False) == DELIVERED


def test_leaving_keeps_the_state_and_is_legal_until_closed():
    seen = []
    life = OutputLifecycle(stall=1)
    life.on_state = seen.append
    connected(life)
    life.leave()
    life.leave()  # once: a second leave is nothing new
    assert life.leaving and life.state is S.UP and seen == [S.CONNECTING, S.UP, S.UP]
    life.close()
    closed = OutputLifecycle()
    closed.close()
    with pytest.raises(IllegalTransition):
        closed.leave()
    assert not closed.leaving
