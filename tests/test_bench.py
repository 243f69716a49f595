"""bench/server.py end to end on a tiny SQLite database, a second or so of load per phase: it
fills the database with the project's own writers, serves it with `needle serve`, loads it from
its own process and reports every figure, the ceiling (bench/ceiling.py) included. It checks that
the benchmark runs and what it reports, never how fast anything is (speed is the benchmark's own
business: docs/benchmarks.md). It was broken once for a session without anyone noticing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--layers", "2", "--d-mlp", "64", "--vocab", "512", "--windows", "256", "--seconds", "0.5", "--rounds", "1",
         "--warmup", "0.2", "--serial-seconds", "0.2", "--open-seconds", "0.3", "--open-shares", "0.5",
         "--traffic-seconds", "0.5"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "server.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_bench_server_reports_every_figure_and_the_ceiling(tmp_path):
    run = bench("--sqlite", str(tmp_path / "bench.sqlite"), *SMALL, "--ceiling")
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["database"] == "sqlite" and out["data"]["neurons"] == 128 == out["data"]["neurons_with_examples"]
    res = out["results"]
    for kind in ("health", "neuron", "search"):
        r = res[kind]
        assert set(r["status_codes"]) == {"200"} and r["requests"] > 0, (kind, r)
        assert r["p50_ms"] <= r["p99_ms"] and r["rps"] > 0 and r["server_cpu_ms_per_request"] > 0
        assert r["one_connection"]["requests"] > 0
    assert res["neuron"]["body_bytes_mean"] > 50_000, "a whole neuron page: 45 highlighted contexts"
    for kind in ("neuron", "search"):
        (open_loop,) = res[kind]["open_loop"]
        assert open_loop["share_of_capacity"] == 0.5 and set(open_loop["codes"]) == {"200"}
        met = open_loop["p50_ms"] < 20 and open_loop["p99_ms"] < 100
        assert open_loop["latency_goals_met"] is met
        assert set(res[kind]["goals"]) == {"p50 < 20 ms", "p99 < 100 ms", "throughput >= 30% of health", "no errors"}
        assert res[kind]["goals"]["no errors"] is True
        traffic = res[kind]["traffic_goal"]  # requests arriving at the goal's fixed rate, whatever the capacity
        assert traffic["offered_rps"] == {"neuron": 25, "search": 50}[kind] and set(traffic["codes"]) == {"200"}
        assert traffic["requests"] > 0 and traffic["met"] is (traffic["p50_ms"] < 20 and traffic["p99_ms"] < 100)
    assert out["traffic_goal_met"] is all(res[k]["traffic_goal"]["met"] for k in ("neuron", "search"))
    assert out["goals_as_written_met"] is all(all(res[k]["goals"].values()) for k in ("neuron", "search"))
    ceiling = out["ceiling"]
    for kind in ("health", "neuron", "search"):
        assert set(ceiling[kind]["status_codes"]) == {"200"}, (kind, ceiling[kind])
    # one real page of each, answered from memory: about the size of the pages the real server sent
    for kind in ("neuron", "search"):
        assert 0.5 < ceiling[kind]["body_bytes_mean"] / res[kind]["body_bytes_mean"] < 2, kind
        assert ceiling[kind]["ratio_to_health"] > 0
    assert ceiling["pages"]["neuron"].startswith("/bench-1m/")
    assert "ceiling" in run.stderr and "the issue's goals as written (p50 < 20 ms" in run.stderr
    assert "the traffic goal (p50 < 20 ms, p99 < 100 ms with requests arriving at neuron 25/s, search 50/s)" in run.stderr
    # the database is kept and reused by the next run; without --ceiling there is no ceiling, and
    # --traffic-seconds 0 (after SMALL's) skips the traffic phase and its verdict
    again = bench("--sqlite", str(tmp_path / "bench.sqlite"), *SMALL, "--open-seconds", "0", "--serial-seconds", "0",
                  "--traffic-seconds", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout)
    assert out["setup_seconds"] == "reused" and "ceiling" not in out
    assert "traffic_goal_met" not in out and "traffic_goal" not in out["results"]["neuron"]
    assert "the traffic goal" not in again.stderr


def test_bench_server_refuses_bad_shares_with_a_clear_error(tmp_path):
    run = bench("--sqlite", str(tmp_path / "never.sqlite"), "--open-shares", "x,1")
    assert run.returncode == 2 and "'x,1' is not a list of numbers, e.g. 0.25,0.5,0.75" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "never.sqlite").exists()


def test_bench_ceiling_refuses_a_missing_page_file_with_a_clear_error(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<p>a page</p>")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ceiling.py"), "--port", "1", "--neuron", str(page),
                          "--search", str(tmp_path / "missing.html")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "missing.html is not a file" in run.stderr and "Traceback" not in run.stderr
