"""Benchmark: worker processes on one Postgres (issue 6).

    python bench/workers.py                          # the demo model: 1, 2 and 4 workers, then claim latency
    python bench/workers.py --tokens 16384 --workers 1,2 --claims 50   # smoke run
    python bench/workers.py --skip-throughput        # the claim latency only

Needs a Postgres it may create databases on: --admin-url, default NEEDLE_TEST_POSTGRES_URL or
postgresql+psycopg://postgres@127.0.0.1:5432/postgres. Each phase gets a fresh database,
dropped at the end.

1. Throughput. The demo model (assets/demo-model) registered with `needle index --queue`'s
   own code on the stdlib corpus (`--tokens`, context 64), its examples stage sharded into
   `--layers-per-job` layer ranges x `--shards` corpus shards (workers/stages.py: one
   estimate job per range, one job per range x shard, one merge), and nothing else of the
   model queued (decoding and clamp curves are other stages). For each worker count N, the
   same job set in a fresh database is run by N `needle worker --until-idle` processes
   started together, each with one torch thread (OMP_NUM_THREADS=1), so N workers can use
   at most N cores. Timed: from the first job's claim to the merge's finish (the jobs'
   own started_at/finished_at in the database), so process start is not in it; each
   worker's model load is, inside its first job. Throughput = corpus tokens / that time;
   scaling = throughput / throughput of one worker, measured in the same run. Also the
   shards' phase alone (first examples_part claimed to last finished), the part that runs
   in parallel: the estimate job before it and the merge after it run on one worker. The
   machine's core count bounds it.
2. Claim latency. `queries.claim_job` (one UPDATE ... WHERE id = (SELECT ... FOR UPDATE
   SKIP LOCKED)), timed in this process over `--claims` claims with `--queued` (10,000)
   jobs queued over 10 models, each claimed job then released (the queue keeps its
   length); against the same
   claims with 10 jobs queued (the baseline, same run). p50 and p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, select, text  # noqa: E402

from app import queries  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import engine_for, session_scope, upgrade  # noqa: E402
from app.schema import Job  # noqa: E402

DEMO_MODEL = ROOT / "assets" / "demo-model"
EXAMPLE_STAGES = ("examples_range", "examples_part", "examples")


class Databases:
    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        self.names: list[str] = []

    def new(self) -> str:
        name = f"needle_bench_{uuid.uuid4().hex[:10]}"
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        url = self.admin_url.rsplit("/", 1)[0] + "/" + name
        upgrade(engine_for(url))
        return url

    def drop_all(self) -> None:
        for name in self.names:
            engine_for(self.admin_url.rsplit("/", 1)[0] + "/" + name).dispose()
            with self.admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def queue_examples(url: str, args) -> None:
    """The demo model's sharded examples stage, and nothing else of it, in the queue."""
    from needle.cli import index_model

    settings = Settings(database_url=url, examples_batch_tokens=args.batch_tokens)
    index_model(settings, str(DEMO_MODEL), "demo", device="cpu", corpus="stdlib", tokens=args.tokens, context=64,
                layers_per_job=args.layers_per_job, corpus_shards=args.shards, queue_only=True, quiet=True)
    with session_scope(engine_for(url)) as s:
        for job in s.scalars(select(Job)):
            if job.stage not in EXAMPLE_STAGES:
                s.delete(job)


def run_workers(url: str, n: int, logdir: Path) -> dict:
    env = {**os.environ, "NEEDLE_DATABASE_URL": url, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "NEEDLE_HEARTBEAT_SECONDS": "1"}
    needle = shutil.which("needle")
    argv = [needle, "worker", "--until-idle"] if needle else [sys.executable, "-m", "needle.cli", "worker", "--until-idle"]
    procs = []
    for i in range(n):
        log = (logdir / f"w{n}-{i}.log").open("w")
        procs.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed:\n{Path(log.name).read_text()[-3000:]}")
    with session_scope(engine_for(url)) as s:
        jobs = list(s.scalars(select(Job)))
        bad = [j for j in jobs if j.state != "done"]
        if bad:
            raise SystemExit(f"jobs not done: {[(j.stage, j.key, j.state, j.error) for j in bad]}")
        start = min(j.started_at for j in jobs)
        end = max(j.finished_at for j in jobs)
        parts = [j for j in jobs if j.stage == "examples_part"]
        p_start, p_end = min(j.started_at for j in parts), max(j.finished_at for j in parts)
        run = queries.example_run(s, queries.get_model(s, "demo").id)
        workers = {j.worker for j in jobs}
        by_stage = {st: round(sum((j.finished_at - j.started_at).total_seconds() for j in jobs if j.stage == st), 2)
                    for st in EXAMPLE_STAGES}
        return {"workers": n, "seconds": round((end - start).total_seconds(), 2), "tokens": run.n_tokens,
                "parts_seconds": round((p_end - p_start).total_seconds(), 2),
                "jobs": len(jobs), "distinct_workers": len(workers), "job_seconds_by_stage": by_stage}


def claim_latency(url: str, queued: int, claims: int) -> list[float]:
    """Milliseconds per claim_job with `queued` jobs queued over 10 models (each claimed job is
    then released, so the queue keeps its length)."""
    engine = engine_for(url)
    with session_scope(engine) as s:
        ids = []
        for m in range(10):
            model = queries.save_model(
                s, f"m{m}", tokenizer_json="{}", info={}, source="bench", family="gpt2", architecture="bench",
                n_layers=1, d_model=1, d_mlp=1, vocab_size=1, device="cpu", dtype="float32", decode_norm="none")
            ids.append(model.id)
    rows = [{"model_id": ids[i % 10], "stage": "decode", "key": f"k{i}", "params": {}, "state": "queued",
             "attempts": 0, "max_attempts": 3, "progress": 0.0, "run_after": queries.utcnow(),
             "created_at": queries.utcnow()} for i in range(queued)]
    with engine.begin() as c:
        for i in range(0, len(rows), 2000):
            c.execute(Job.__table__.insert(), rows[i : i + 2000])
        c.execute(text("ANALYZE jobs"))
    times = []
    for i in range(claims):
        t0 = time.perf_counter()
        with session_scope(engine) as s:
            job = queries.claim_job(s, f"bench:{i}")
        times.append((time.perf_counter() - t0) * 1000)
        assert job is not None
        with session_scope(engine) as s:  # back to the queue: it stays `queued` jobs long
            queries.release_job(s, job.id, f"bench:{i}")
    return times


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--admin-url", default=os.environ.get(
        "NEEDLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    ap.add_argument("--tokens", type=int, default=131_072, help="corpus tokens of the examples stage")
    ap.add_argument("--shards", type=int, default=8, help="corpus shards")
    ap.add_argument("--layers-per-job", type=int, default=4, help="layers per range (the demo has 4)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--claims", type=int, default=200)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()

    dbs = Databases(args.admin_url)
    out: dict = {"cores": os.cpu_count()}
    try:
        if not args.skip_throughput:
            logdir = Path(tempfile.mkdtemp(prefix="needle-bench-workers-"))
            runs = []
            for n in [int(x) for x in args.workers.split(",")]:
                url = dbs.new()
                queue_examples(url, args)
                runs.append(run_workers(url, n, logdir))
                r = runs[-1]
                r["tokens_per_second"] = round(r["tokens"] / r["seconds"])
                r["scaling"] = round(r["tokens_per_second"] / runs[0]["tokens_per_second"], 2)
                r["parts_tokens_per_second"] = round(r["tokens"] / r["parts_seconds"])
                r["parts_scaling"] = round(r["parts_tokens_per_second"] / runs[0]["parts_tokens_per_second"], 2)
                print(f"{n} worker(s): {r['tokens']:,} tokens in {r['seconds']} s = {r['tokens_per_second']:,} tokens/s, "
                      f"{r['scaling']}x one worker; the shards' phase alone {r['parts_seconds']} s = "
                      f"{r['parts_tokens_per_second']:,} tokens/s, {r['parts_scaling']}x "
                      f"({r['jobs']} jobs, {r['distinct_workers']} workers took some)", file=sys.stderr)
            out["throughput"] = runs
            out["shards"], out["layers_per_job"] = args.shards, args.layers_per_job
        base = claim_latency(dbs.new(), 10, args.claims)
        full = claim_latency(dbs.new(), args.queued, args.claims)
        out["claim_ms"] = {
            "queued": args.queued, "claims": args.claims,
            "p50": round(pct(full, 0.5), 3), "p99": round(pct(full, 0.99), 3),
            "baseline_10_queued_p50": round(pct(base, 0.5), 3), "baseline_10_queued_p99": round(pct(base, 0.99), 3),
            "ratio_p50": round(pct(full, 0.5) / pct(base, 0.5), 2),
        }
        c = out["claim_ms"]
        print(f"claim latency with {args.queued:,} jobs queued: p50 {c['p50']} ms, p99 {c['p99']} ms "
              f"(10 queued: p50 {c['baseline_10_queued_p50']} ms; ratio {c['ratio_p50']}x)", file=sys.stderr)
    finally:
        dbs.drop_all()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
