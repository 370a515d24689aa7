"""The charts' history: rates from cumulative counters, fixed buckets over the window, worst state per bucket,
bounded memory, subjects forgotten when they stop reporting. A fake clock: plain numbers."""

from ipfix_balancer.core.history import History

T0 = 1_800_000_000.0  # a multiple of every step used here


def test_counters_become_rates_and_gauges_stay_as_they_are():
    h = History(window=60, step=10)
    h.record("r", T0, counters={"msgs": 0}, gauges={"queued": 5})
    h.record("r", T0 + 2, counters={"msgs": 200}, gauges={"queued": 9})
    h.record("r", T0 + 4, counters={"msgs": 600}, gauges={"queued": 1})
    chart = h.chart("r", T0 + 4, ["msgs", "queued"])
    assert chart.lines["msgs"][-1] == 150.0  # mean of 100/s and 200/s; the first sample has no rate
    assert chart.lines["queued"][-1] == 5.0
    assert h.chart("r", T0 + 4, ["queued"], peak=True).lines["queued"][-1] == 9
    assert chart.lines["msgs"][:-1] == [None] * 5 and len(chart.times) == 6
    assert chart.times[-1] == T0 and chart.times[0] == T0 - 50


def test_rates_use_the_time_the_counters_were_measured():
    h = History(window=60, step=10)
    h.record("r", T0, counters={"msgs": 0}, at=T0 - 0.5)
    h.record("r", T0 + 2, counters={"msgs": 100}, at=T0 + 0.5)  # the documents were 1 s apart
    assert h.chart("r", T0 + 2, ["msgs"]).lines["msgs"][-1] == 100.0
    h.record("r", T0 + 4, counters={"msgs": 100}, at=T0 + 0.5)  # the same document read again: no rate
    assert h.chart("r", T0 + 4, ["msgs"]).lines["msgs"][-1] == 100.0


def test_a_counter_that_went_back_gives_no_rate_and_a_new_one_counts_from_zero():
    h = History(window=60, step=10)
    h.record("r", T0, counters={"msgs": 500})
    h.record("r", T0 + 1, counters={"msgs": 10, "drops:full": 4})  # restarted; a first drop reason
    chart = h.chart("r", T0 + 1, ["msgs", "drops:full"])
    assert chart.lines["msgs"][-1] is None and chart.lines["drops:full"][-1] == 4.0
    h.record("r", T0 + 2, counters={"msgs": 30, "drops:full": 4})
    assert h.chart("r", T0 + 2, ["msgs"]).lines["msgs"][-1] == 20.0
    assert h.metrics("r", "drops:") == ["drops:full"]


def test_a_bucket_shows_the_worst_state_it_saw():
    h = History(window=60, step=10)
    h.record("s", T0, state="up")
    h.record("s", T0 + 3, state="down")
    h.record("s", T0 + 6, state="up")
    h.record("s", T0 + 10, state="stalled")
    assert h.chart("s", T0 + 10, []).states[-2:] == ["down", "stalled"]


def test_memory_is_one_window_of_buckets_and_silent_subjects_are_forgotten():
    h = History(window=60, step=10)
    for i in range(1000):
        h.record("r", T0 + i, gauges={"q": i})
    assert len(h._subjects["r"].numbers) == 6 and len(h._subjects["r"].metrics["q"][0]) == 6
    chart = h.chart("r", T0 + 999, ["q"], peak=True)
    assert chart.lines["q"] == [949, 959, 969, 979, 989, 999]
    h.record("gone", T0 + 999, gauges={"q": 1})
    h.expire(T0 + 999 + 59)
    assert sorted(h.keys()) == ["gone", "r"]
    h.expire(T0 + 999 + 71)
    assert h.keys() == []


def test_a_sample_from_before_the_current_bucket_is_ignored():
    h = History(window=60, step=10)
    h.record("r", T0 + 15, gauges={"q": 1})
    h.record("r", T0 + 5, gauges={"q": 7})  # the wall clock stepped back
    assert h.chart("r", T0 + 15, ["q"]).lines["q"][-2:] == [None, 1.0]


def test_a_chart_covers_back_to_the_oldest_sample_at_least_the_least_span_at_most_the_window():
    h = History(window=600, step=10)
    assert h.span("r", T0, least=60) == 60  # nothing yet
    h.record("r", T0, gauges={"q": 1})
    assert h.span("r", T0 + 30, least=60) == 60
    assert h.span("r", T0 + 200, least=60) == 210  # 21 buckets: the oldest sample's to now's
    assert h.span("r", T0 + 5000, least=60) == 600
    chart = h.chart("r", T0 + 200, ["q"], span=210)
    assert len(chart.times) == 21 and chart.times[-1] == T0 + 200 and chart.times[0] == T0
    assert chart.lines["q"][0] == 1


def test_a_metric_no_longer_sampled_leaves_the_chart_when_its_buckets_are_reused():
    h = History(window=60, step=10)
    h.record("r", T0, gauges={"drops:old": 1, "q": 1})
    assert h.metrics("r", "drops:") == ["drops:old"]
    for i in range(1, 7):
        h.record("r", T0 + 10 * i, gauges={"q": 1})
    assert h.metrics("r", "drops:") == [] and h.chart("r", T0 + 60, ["q"]).lines["q"] == [1.0] * 6
