"""Smoke test of the benchmark harness: ``scripts/bench --quick`` runs every case end to end against the real
balancer and loses nothing. No timing assertion: throughput is for the benchmark's table, not for tests."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"


def test_bench_quick_completes_without_loss():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"bench failed ({proc.returncode})\n{proc.stderr[-4000:]}"
    doc = json.loads(proc.stdout)
    rows = doc["rows"]
    assert {r["case"] for r in rows} == {"tcp-rr", "tcp-all", "udp-rr", "tcp-udp", "record"}
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["python"]
    ran = [r for r in rows if r["status"] != "skipped"]
    assert {r["case"] for r in ran} >= {"tcp-rr", "tcp-all", "udp-rr", "tcp-udp"}, proc.stderr[-4000:]
    for r in rows:
        if r["status"] == "skipped":  # only recording may be skipped (while recording mode is not in the tree)
            assert r["case"] == "record" and r["note"], r
            continue
        assert r["status"] == "ok", r
        copies = 3 if r["case"] == "tcp-all" else 1
        assert r["sent"] == r["messages"] == 20_000, r
        assert r["loss"] == 0, r
        if r["case"] != "record":
            assert r["delivered"] == r["messages"] * copies, r
            assert r["framing_errors"] == 0, r
        assert r["msgs_per_s"] > 0 and r["duration_s"] > 0, r
        assert r["handler_rss_peak_mb"] > 0, r
        assert r["handler_cpu"] is not None and r["generator_cpu"] is not None, r
    table = proc.stderr
    assert "msg/s" in table and "tcp-rr" in table  # the human table goes to stderr with --json
