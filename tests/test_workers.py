"""Many worker processes on one Postgres (issue 6): the result of several workers equals one
worker's, a worker killed with SIGKILL mid-job loses nothing, workers ride out a Postgres
restart, SIGTERM gives the job back, and a job that always fails ends failed after N
attempts with its error shown.

Real `needle worker` processes (the installed command, on the user's code path) against a
real Postgres; the job sets are queued with `needle index --queue`'s own code
(index_model(queue_only=True)) on the detector Llama of tests/test_examples.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from app import queries
from app.config import Settings
from app.db import engine_for, session_scope
from app.schema import Job
from needle.cli import index_model
from tests.test_examples import (
    CONTEXT,
    DETECTOR,
    X_AT,
    X_PIECE,
    corpus_words,
    write_corpus,
)
from tests.tinymodels import build_detector

N_WINDOWS = 600
SLOW_WINDOWS = 2000
# the workers' settings: quick heartbeats, timeouts and retries; and one window per examples
# batch, which a one-job examples run reads from the worker's own settings (a sharded run
# carries its batch size in its jobs), so the slow job set takes seconds, not a blink
FAST = {"NEEDLE_HEARTBEAT_SECONDS": "0.2", "NEEDLE_STALE_SECONDS": "2", "NEEDLE_RETRY_BACKOFF_SECONDS": "0.2",
        "NEEDLE_EXAMPLES_BATCH_TOKENS": str(CONTEXT)}


@pytest.fixture(scope="module")
def model_and_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    path = build_detector(root / "model", {DETECTOR: X_PIECE})
    corpus = write_corpus(root / "corpus.txt", corpus_words(N_WINDOWS, X_AT, seed=0))
    slow = write_corpus(root / "slow.txt", corpus_words(SLOW_WINDOWS, X_AT, seed=2))
    return {"path": str(path), "corpus": str(corpus), "slow": str(slow)}


def queue(url: str, model: str, corpus: str, *, batch_windows: int, layers_per_job: int = 1, shards: int = 1,
          name: str = "det") -> None:
    settings = Settings(database_url=url, examples_batch_tokens=batch_windows * CONTEXT)
    index_model(settings, model, name, corpus=corpus, context=CONTEXT, layers_per_job=layers_per_job,
                corpus_shards=shards, queue_only=True, quiet=True)


def start_worker(url: str, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, "NEEDLE_DATABASE_URL": url, **FAST, **(env or {})}
    needle = shutil.which("needle") or sys.executable
    argv = [needle, "worker", *extra] if needle != sys.executable else [needle, "-m", "needle.cli", "worker", *extra]
    return subprocess.Popen(argv, env=environ, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> None:
    for proc, log in zip(procs, logs, strict=True):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"worker did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        assert proc.returncode == 0, log.read_text()[-3000:]


def jobs(url: str) -> list[dict]:
    with session_scope(engine_for(url)) as s:
        return [{"id": j.id, "stage": j.stage, "key": j.key, "state": j.state, "attempts": j.attempts,
                 "worker": j.worker, "error": j.error, "progress": j.progress}
                for j in s.scalars(select(Job).order_by(Job.id))]


def wait_for(cond, timeout: float, what: str, poll: float = 0.05, url: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}; the jobs: {jobs(url) if url else ''}")


RESULT_TABLES = {
    "neurons": "layer, neuron",
    "token_index": "token_id",
    "neuron_activations": "layer, neuron",
    "example_windows": '"window"',
    "vocab": "token_id",
}


def results(url: str) -> dict[str, list[tuple]]:
    """Every result row of the model (ids and times left out), to compare databases."""
    out = {}
    with engine_for(url).connect() as c:
        for table, order in RESULT_TABLES.items():
            rows = c.execute(text(f"select * from {table} order by {order}")).mappings().all()
            out[table] = [tuple(v for k, v in r.items() if k != "model_id") for r in rows]
        curves = c.execute(text("select layer, neuron, prompt, token_id, clamp_values, probs, baseline, top_tokens "
                                "from clamp_curves order by layer, neuron")).all()
        out["clamp_curves"] = [tuple(json.dumps(v) if isinstance(v, (dict, list)) else v for v in r) for r in curves]
        run = c.execute(text("select corpus, context, n_windows, n_tokens, settings from example_runs")).one()
        settings = run.settings if isinstance(run.settings, dict) else json.loads(run.settings)
        out["example_runs"] = [(*run[:4], {k: v for k, v in settings.items()
                                           if k not in ("seconds", "tokens_per_second")})]
        out["parts_left"] = c.execute(text("select count(*) from example_parts")).scalar_one()
    return out


def check_complete(url: str, got: dict) -> None:
    with session_scope(engine_for(url)) as s:
        model = queries.get_model(s, "det")
        n = model.n_layers * model.d_mlp
    assert len(got["neurons"]) == len(got["neuron_activations"]) == n
    assert len({r[:2] for r in got["neuron_activations"]}) == n  # no neuron twice
    assert got["parts_left"] == 0
    assert all(j["state"] == "done" for j in jobs(url)), jobs(url)


def one_worker_run(url: str, model: str, corpus: str, log: Path, **plan) -> dict:
    """Queue the job set in url, run it with one worker, check it is complete: its result rows."""
    queue(url, model, corpus, **plan)
    wait_all([start_worker(url, log, "--until-idle")], [log])
    got = results(url)
    check_complete(url, got)
    # every job of the set needs the model: the worker loaded it once
    n_jobs = len(jobs(url))
    assert n_jobs >= 4 and f"{n_jobs} done, 0 failed attempts, models loaded: 1" in log.read_text()
    return got


@pytest.fixture(scope="module")
def one_worker_result(model_and_corpora, tmp_path_factory, pg_databases_module):
    """The sharded job set (2 layer ranges x 3 corpus shards) run by a single worker."""
    return one_worker_run(pg_databases_module.new(), model_and_corpora["path"], model_and_corpora["corpus"],
                          tmp_path_factory.mktemp("one") / "worker.log", batch_windows=4, shards=3)


def test_several_workers_give_exactly_the_one_worker_result(model_and_corpora, one_worker_result, pg_databases,
                                                            tmp_path):
    pg_url = pg_databases.new()
    queue(pg_url, model_and_corpora["path"], model_and_corpora["corpus"], batch_windows=4, shards=3)
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [start_worker(pg_url, log, "--until-idle") for log in logs]
    wait_all(procs, logs)
    got = results(pg_url)
    check_complete(pg_url, got)
    # the jobs really were shared: more than one worker ran some
    workers = {j["worker"].rsplit(":", 2)[1] for j in jobs(pg_url)}
    assert len(workers) >= 2, jobs(pg_url)
    assert got.keys() == one_worker_result.keys()
    for table in got:
        assert got[table] == one_worker_result[table], table


@pytest.fixture(scope="module")
def slow_reference(model_and_corpora, tmp_path_factory, pg_databases_module):
    """The slow job set (one examples job of 2,000 one-window batches) run by one worker, undisturbed."""
    return one_worker_run(pg_databases_module.new(), model_and_corpora["path"], model_and_corpora["slow"],
                          tmp_path_factory.mktemp("reference") / "worker.log", batch_windows=1, layers_per_job=0)


def half_done(url: str, stage: str = "examples"):
    return [j for j in jobs(url) if j["stage"] == stage and j["state"] == "running" and 0.1 <= j["progress"] <= 0.9]


def test_a_worker_killed_mid_job_loses_nothing(model_and_corpora, slow_reference, pg_databases, tmp_path):
    """SIGKILL while the examples job is half done: its heartbeats stop, another worker takes
    the job back after stale_seconds and finishes it; the rows are complete, with no
    duplicates, and equal an undisturbed run's."""
    url = pg_databases.new()
    queue(url, model_and_corpora["path"], model_and_corpora["slow"], batch_windows=1, layers_per_job=0)
    first = start_worker(url, tmp_path / "first.log")
    victim = wait_for(lambda: half_done(url), 120, "the examples job to be half done", url=url)[0]
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert next(j for j in jobs(url) if j["id"] == victim["id"])["state"] == "running"  # nothing was released
    second_log = tmp_path / "second.log"
    wait_all([start_worker(url, second_log, "--until-idle")], [second_log])
    job = next(j for j in jobs(url) if j["id"] == victim["id"])
    assert job["state"] == "done" and job["attempts"] == 2 and job["worker"] != victim["worker"]
    got = results(url)
    check_complete(url, got)
    for table in got:
        assert got[table] == slow_reference[table], table


def postgres_cluster() -> list[str] | None:
    """The pg_ctlcluster command that restarts the local Postgres, where this machine has one we may restart."""
    conf = Path("/etc/postgresql")
    if shutil.which("pg_ctlcluster") is None or not conf.is_dir() or os.geteuid() != 0:
        return None
    versions = sorted(p.name for p in conf.iterdir() if (p / "main").is_dir())
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"] if versions else None


def test_workers_ride_out_a_postgres_restart(model_and_corpora, slow_reference, pg_databases, tmp_path):
    """Postgres restarts while two workers hold jobs: the workers wait for it (heartbeats and
    the final write are retried), reconnect and finish, and the rows equal an undisturbed run's."""
    restart = postgres_cluster()
    if restart is None:
        if os.environ.get("NEEDLE_REQUIRE_POSTGRES") == "1":
            pytest.fail("this test restarts the local Postgres with pg_ctlcluster, as root; it cannot here")
        pytest.skip("no local Postgres cluster this test may restart (pg_ctlcluster, as root)")
    url = pg_databases.new()
    queue(url, model_and_corpora["path"], model_and_corpora["slow"], batch_windows=1, layers_per_job=0)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_worker(url, log, "--until-idle") for log in logs]
    wait_for(lambda: half_done(url), 120, "the examples job to be half done", url=url)
    subprocess.run(restart, check=True, capture_output=True, timeout=120)
    wait_all(procs, logs)
    # the restart was felt (a heartbeat, or a claim/read/write, met the database down) and ridden out
    felt = [t for t in (log.read_text() for log in logs) if "database unreachable" in t or "heartbeat for job" in t]
    assert felt, [log.read_text()[-2000:] for log in logs]
    got = results(url)
    check_complete(url, got)
    for table in got:
        assert got[table] == slow_reference[table], table


def test_sigterm_gives_the_job_in_hand_back(model_and_corpora, pg_databases, tmp_path):
    url = pg_databases.new()
    queue(url, model_and_corpora["path"], model_and_corpora["slow"], batch_windows=1, layers_per_job=0)
    log = tmp_path / "worker.log"
    proc = start_worker(url, log)
    victim = wait_for(lambda: half_done(url), 120, "the examples job to be half done", url=url)[0]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "terminated" in log.read_text()
    job = next(j for j in jobs(url) if j["id"] == victim["id"])
    # back in the queue at once, the attempt not counted
    assert job["state"] == "queued" and job["worker"] is None and job["attempts"] == 0


def test_a_job_that_always_fails_ends_failed_after_n_attempts(model_and_corpora, pg_databases, tmp_path):
    """A merge whose shards are not there fails each time: it is retried with backoff, then
    marked failed with its error, which `needle jobs` shows."""
    url = pg_databases.new()
    queue(url, model_and_corpora["path"], model_and_corpora["corpus"], batch_windows=4)
    with session_scope(engine_for(url)) as s:
        model = queries.get_model(s, "det")
        queries.enqueue_job(s, model.id, "search_index", "orphan", {"parts": ["layers:7-9"]}, max_attempts=3)
    log = tmp_path / "worker.log"
    started = time.monotonic()
    wait_all([start_worker(url, log, "--until-idle")], [log])
    job = next(j for j in jobs(url) if j["key"] == "orphan")
    assert job["state"] == "failed" and job["attempts"] == 3
    assert "search parts missing" in job["error"] and "layers:7-9" in job["error"]
    assert time.monotonic() - started >= 0.2 + 0.4  # the backoff: 0.2 s, then 0.4 s
    shown = subprocess.run([shutil.which("needle") or "needle", "jobs", "--state", "failed"], capture_output=True,
                           text=True, env={**os.environ, "NEEDLE_DATABASE_URL": url}, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "search parts missing" in shown.stdout and "3/3" in shown.stdout


def test_worker_device_that_is_not_there_is_a_clear_error(sqlite_url, monkeypatch, capsys):
    import torch

    from app.config import get_settings
    from needle.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one (torch's, not ours)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("NEEDLE_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert main(["worker", "--device", "cuda:0", "--until-idle"]) == 1
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--device cpu" in err and "Traceback" not in err
