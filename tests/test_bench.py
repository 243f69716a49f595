"""The benchmarks run end to end and report every figure; never how fast anything is (speed is
the benchmarks' own business: docs/benchmarks.md). bench/server.py on a tiny SQLite database, a
second or so of load per phase: it fills the database with the project's own writers, serves it
with `needle serve`, loads it from its own process and reports every figure, the ceiling
(bench/ceiling.py) included. bench/gpu.sh, the GPU check, on tiny shapes on the CPU with the
Python running the tests: every benchmark's figures in one table, and a failed one marked."""

from __future__ import annotations

import json
import re
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


BENCHMARKS = ["decode", "examples", "examples-map", "probes", "clamp", "sae", "text"]


def gpu_sh(tmp_path, python: str, *args: str) -> subprocess.CompletedProcess:
    """bench/gpu.sh on tiny shapes on the CPU, with `python` and nothing installed."""
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--small", "--python", python,
                           "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)


def table(stdout: str) -> dict[str, list[str]]:
    """The printed table's rows: benchmark -> its other cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["benchmark", "case", "ours", "baseline", "ratio", "goal", "run"], rows
    return {row[0]: row[1:] for row in rows[1:]}


def test_bench_gpu_sh_small_runs_every_benchmark_and_prints_one_table_of_figures(tmp_path):
    run = gpu_sh(tmp_path, sys.executable)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = table(run.stdout)
    assert list(rows) == BENCHMARKS
    number = re.compile(r"\d[\d,]*(\.\d+)?")
    for name, (case, ours, baseline, ratio, goal, status) in rows.items():
        assert case and number.search(ours) and number.search(baseline), (name, case, ours, baseline)
        assert re.search(r"/ \w+ \d[\d.]*(%|x)?$", ratio), (name, ratio)  # e.g. "stage / bare 88%"
        assert goal.endswith("met") and status.startswith("ok, "), (name, goal, status)
    out = tmp_path / "out"
    assert (out / "table.md").read_text() in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["small"] is True and results["device"] == "cpu"
    for name in BENCHMARKS:
        got = results["benchmarks"][name]
        assert got["ok"] is True and got["exit"] == 0 and got["result"], name
        assert (out / f"{name}.log").stat().st_size > 0
    assert results["benchmarks"]["examples"]["result"]["tokens_per_s"]["stage"] > 0


def test_bench_gpu_sh_prints_the_table_when_benchmarks_fail_and_exits_non_zero(tmp_path):
    # a Python that runs everything but the benchmarks: decode hangs past its limit, the others fail
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
case "$1" in
  bench/decode.py) exec sleep 60 ;;
  bench/*.py) echo "$1: made to fail by the test" >&2; exit 3 ;;
esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    run = gpu_sh(tmp_path, str(python), "--timeout", "1")
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    rows = table(run.stdout)
    assert list(rows) == BENCHMARKS
    assert rows["decode"][-1] == "TIMED OUT after 1 s"
    for name in BENCHMARKS[1:]:
        assert rows[name][-1] == "FAILED (exit 3)" and str(tmp_path / "out" / f"{name}.log") in rows[name][0]
    assert "bench/probes.py: made to fail by the test" in run.stdout  # the failed one's log, shown
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not any(b["ok"] for b in results["benchmarks"].values())


def test_bench_gpu_sh_refuses_bad_arguments_with_a_clear_error(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--python", sys.executable],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--device cpu runs the small shapes only: add --small" in run.stderr
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--small", "--timeout", "soon"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--timeout 'soon' is not a number of seconds" in run.stderr
    assert not run.stdout  # refused before installing or running anything
