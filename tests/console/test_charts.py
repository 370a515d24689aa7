"""The console's SVG charts: lines broken at gaps, a lone bucket still drawn, the axis top, words for a screen
reader, the state band in runs."""
import re

from ipfix_balancer.console import charts
from ipfix_balancer.core.history import History

T0 = 1_800_000_000.0


def test_a_line_breaks_where_no_sample_was_taken_and_a_lone_bucket_is_a_dot():
    d, lone = charts._path([1.0, 2.0, None, 3.0, None], top=4.0)
    assert d.count("M") == 2 and d.count("L") == 1  # two pieces: buckets 0-1, then 3 alone
    assert lone == [(charts.LEFT + charts.PLOT_W * 3 / 4, charts.TOP + charts.PLOT_H / 4)]


def test_the_axis_top_is_a_round_number_at_or_above_the_highest_value():
    assert [charts._ceiling(v) for v in (0, 0.3, 1, 7, 12, 480, 501)] == [1.0, 1.0, 1, 10, 20, 500, 1000]


def test_a_chart_says_its_latest_values_and_shows_states_as_runs():
    h = History(window=3600, step=20)
    for i, state in enumerate(("up", "up", "up", "down", "down")):
        h.record("r", T0 + 20 * i, counters={"msgs_in": 1000 * i, "drops:queue_full": 10 * i}, state=state)
    svg = "".join(charts.charts(h, "r", charts.HANDLER, T0 + 80))
    assert 'aria-label="Messages/s: in now 50, highest 50; out now -, highest 0"' in svg
    assert "in: 50 msg/s" in svg and "queue_full: 0.5 msg/s" in svg
    assert len(re.findall(r'class="state st-up"', svg)) == 4 and len(re.findall(r'class="state st-down"', svg)) == 4
    assert "-10 min" in svg  # a young history: ten minutes, not an almost empty hour
