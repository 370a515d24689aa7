"""A 45-second soak (scripts/soak; the suite's short version of a long run): three stream kinds, collectors killed or hung every few seconds, a
reload."""

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak"


def test_a_short_soak_stays_within_its_bounds():
    result = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.75", "--json"], capture_output=True,
                            text=True, timeout=240)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    counted = any(s["counted_records"] for s in report["streams"].values())
    assert report["ok"] and report["balancer_exit"] == (1 if counted else 0), "exit 0 only without counted loss"
    assert report["collector_kills"] >= 5 and report["collector_hangs"] >= 2 and report["reloads"] == 1
    assert report["reload_failures"] == 0
    assert report["stalls_logged"] >= report["collector_hangs"], "each hung collector is shown stalled"
    for name, stream in report["streams"].items():
        assert stream["sent"] > 30000, name
        assert stream["duplicated"] == 0, name
        assert stream["lost"] <= stream["loss_bound"], name
    assert report["streams"]["dnsflow recording"]["lost"] == 0
    for name, start in report["rss_start"].items():  # a leak would show as growth over the run
        assert report["rss_end"][name] < start + 20_000_000, name
