"""The worker loop: claim a job, run its stage, store its results, repeat.

Heartbeats come from a thread of their own, so a long computation never starves them. A
job's results and its "done" mark commit in one transaction, and only while this worker
still holds the job; a job that was taken back (stale heartbeat) is not written twice.

The database may go away (a restart, a network cut): every database step of the loop is
retried until it is back (waits of 1, 2, 4 ... up to 15 s, each logged), and a job's writes
replace what an earlier attempt of the same job stored, so repeating one is harmless. A
database that is there but cannot store (a full disk, read-only: app.db.StorageError) is not
waited for: the worker stops with that error, the job in hand going back to the queue.
SIGTERM (`needle worker`) gives the job in hand back to the queue, uncounted, and exits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from app import queries
from app.config import Settings
from app.db import StorageError, session_scope
from app.errors import NeedleError
from workers.stages import STAGES, JobContext, ModelSpec, work_units

log = logging.getLogger("needle.worker")


class JobLost(RuntimeError):
    """The job was taken back from this worker (its heartbeats were late)."""


DB_RETRY_MAX_WAIT = 15.0


def database_down(exc: BaseException) -> bool:
    """Whether exc means the database could not be reached (worth waiting for), rather than a bad query."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def with_database(fn, what: str, stopping: threading.Event | None = None):
    """fn(), retried while the database is unreachable."""
    wait = 1.0
    while True:
        try:
            return fn()
        except DBAPIError as exc:
            if not database_down(exc):
                raise
            log.warning("database unreachable while %s (%s); retrying in %.0f s", what,
                        str(exc.orig or exc).strip().splitlines()[0], wait)
        if stopping is not None and stopping.is_set():
            raise JobLost(f"stopped while waiting for the database ({what})")
        time.sleep(wait)
        wait = min(wait * 2, DB_RETRY_MAX_WAIT)


class ModelCache:
    """Loaded models by (source, device, dtype, memory caps): a worker loads each model once."""

    def __init__(self):
        self._models: dict[tuple, object] = {}
        self.loads = 0  # models loaded from disk so far

    @staticmethod
    def _key(spec: ModelSpec) -> tuple:
        return spec.source, spec.device, spec.dtype, tuple(sorted((spec.max_memory or {}).items()))

    def put(self, spec: ModelSpec, loaded) -> None:
        self._models[self._key(spec)] = loaded

    def get(self, spec: ModelSpec):
        key = self._key(spec)
        if key not in self._models:
            from workers.loading import load_model

            self._models[key] = load_model(spec.source, device=spec.device, dtype=spec.dtype,
                                           max_memory=spec.max_memory)
            self.loads += 1
        return self._models[key]


class JobProgress(Protocol):
    """What a worker reports a job's progress to: Progress below, or the CLI's bars."""

    def advance(self, n: int) -> None: ...
    def set_total(self, total: int) -> None: ...
    def phase(self, label: str, total: int, unit: str, share: float) -> None: ...
    def fraction(self) -> float | None: ...
    def close(self) -> None: ...


class Progress:
    """Progress of one job, counted in the stage's unit ("neuron", "tok", "layer", ...: see
    workers.stages.work_units); the default prints nothing. The CLI passes tqdm bars."""

    def __init__(self, desc: str, total: int, unit: str):
        self.desc, self.total, self.done = desc, total, 0  # unit: the CLI's bars show it
        self.base, self.share = 0.0, 1.0  # this count covers [base, base + share] of the job

    def advance(self, n: int) -> None:
        self.done += n

    def set_total(self, total: int) -> None:
        self.total = total

    def fraction(self) -> float | None:
        """How much of the job is done (the /-/jobs page's bar), or None before its size is known."""
        if not self.total:
            return self.base or None
        return self.base + self.share * min(1.0, self.done / self.total)

    def phase(self, label: str, total: int, unit: str, share: float) -> None:
        """The next `share` of the job is `total` units of `unit` (a stage whose parts count
        different things, such as the probes: corpus tokens, then features fitted)."""
        self.base = self.fraction() or 0.0
        self.total, self.done, self.share = total, 0, share

    def close(self) -> None:
        pass


@dataclass
class RunSummary:
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


class Heartbeat(threading.Thread):
    def __init__(self, engine: Engine, job_id: int, worker: str, every: float, progress: JobProgress):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.engine, self.job_id, self.worker, self.every, self.progress = engine, job_id, worker, every, progress
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            frac = self.progress.fraction()
            try:
                with session_scope(self.engine) as s:
                    if not queries.heartbeat(s, self.job_id, self.worker, frac):
                        self.lost = True
                        return
            except StorageError as exc:  # the job's own write meets it too, and stops the worker
                log.warning("heartbeat for job %s failed: %s", self.job_id, exc.message)
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next tick
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=self.every + 5)


class Worker:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        name: str | None = None,
        cache: ModelCache | None = None,
        only_model_id: int | None = None,
        progress_factory: Callable[[str, int, str], JobProgress] = Progress,  # (desc, total, unit)
        device: str | None = None,
        max_memory: dict[str, int] | None = None,
        on_wait: Callable[[str], None] | None = None,  # told, with until_idle, which job it waits for
    ):
        self.engine, self.settings = engine, settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.cache = cache or ModelCache()
        self.only_model_id = only_model_id
        self.progress_factory = progress_factory
        self.stopping = threading.Event()
        self.device = device  # load every model here instead of on the device it was indexed with
        self.max_memory = max_memory  # and with these caps (--max-memory) instead of the model's own
        self.on_wait = on_wait
        self._waited: set[tuple[int, str | None]] = set()  # (job, worker) pairs already told of

    def run(self, *, until_idle: bool, poll_seconds: float = 1.0) -> RunSummary:
        """Work until stopped; with until_idle, return once no job can run any more."""
        summary = RunSummary()
        while not self.stopping.is_set():
            claimed = with_database(self._claim, "claiming a job")
            if claimed is None:
                if until_idle and not with_database(self._more_to_come, "looking for jobs"):
                    break
                if until_idle and self.on_wait is not None:
                    for line in with_database(self._waits_for, "looking for jobs"):
                        self.on_wait(line)
                self.stopping.wait(poll_seconds)
                continue
            ctx, desc = claimed
            error = self.run_job(ctx, desc)
            if error is None:
                summary.done.append(ctx.job_id)
            else:
                summary.failed[ctx.job_id] = error
        return summary

    def _claim(self) -> tuple[JobContext, str] | None:
        with session_scope(self.engine) as s:
            queries.requeue_stale(s, self.settings.stale_seconds)
            job = queries.claim_job(s, self.name, self.only_model_id)
            if job is None:
                return None
            model = queries.get_model_by_id(s, job.model_id)
            assert model is not None  # a job's model_id is a foreign key
            spec = ModelSpec.of(model)
            if self.device is not None:
                spec.device = self.device
            if self.max_memory is not None:
                spec.max_memory = self.max_memory
            ctx = JobContext(
                job_id=job.id, stage=job.stage, key=job.key, params=dict(job.params), model=spec,
                load=self.cache.get, batch_size=self.settings.decode_batch_size,
                examples_batch_tokens=self.settings.examples_batch_tokens,
                clamp_batch_rows=self.settings.clamp_batch_rows, read=self._read,
            )
            return ctx, f"{spec.name} {job.stage} {job.key}"

    def _read(self, fn):
        """fn(session) in a short session of its own: a stage's reads, none held while it computes."""

        def read():
            with session_scope(self.engine) as s:
                return fn(s)

        return with_database(read, "reading for a job")

    def _finish(self, job_id: int, write) -> None:
        """The job's results and its done mark, in one transaction; retried while the database
        is unreachable. A commit whose reply was lost is recognised on the retry."""

        def attempt():
            with session_scope(self.engine) as s:
                if queries.job_done_by(s, job_id, self.name):
                    return  # an earlier try committed, and only its reply was lost
                write(s)
                if not queries.finish_job(s, job_id, self.name):
                    raise JobLost(f"job {job_id} was taken back from {self.name}")

        with_database(attempt, f"storing job {job_id}")

    def _more_to_come(self) -> bool:
        """Whether any job may still become runnable (queued or running, and nothing failed)."""
        with session_scope(self.engine) as s:
            return queries.pending_jobs(s, self.only_model_id) > 0 and not queries.failed_jobs(s, self.only_model_id)

    def _waits_for(self) -> list[str]:
        """A line for each job another worker holds that was not told of yet: whose it is, how
        long ago it last heartbeat, and when it goes back to the queue without one."""
        with session_scope(self.engine) as s:
            now = queries.utcnow()
            held = [(job.id, job.worker, f"{model} {job.stage} {job.key}", job.heartbeat_at)
                    for job, model in queries.running_jobs(s, self.only_model_id)]
        lines = []
        for job_id, worker, desc, beat_at in held:
            if (job_id, worker) in self._waited:
                continue
            self._waited.add((job_id, worker))
            beat = (f"whose last heartbeat was {(now - beat_at).total_seconds():.0f} s ago" if beat_at
                    else "which has sent no heartbeat")
            lines.append(f"waiting for job {job_id} ({desc}), claimed by worker {worker} {beat}; a job goes back "
                         f"to the queue after {self.settings.stale_seconds:g} s without one (NEEDLE_STALE_SECONDS)")
        return lines

    def run_job(self, ctx: JobContext, desc: str) -> str | None:
        """Run one claimed job; returns None when done, else the error recorded."""
        ctx.total, unit = work_units(ctx.stage, ctx.params, ctx.model)
        progress = self.progress_factory(desc, ctx.total, unit)
        ctx.advance, ctx.set_total, ctx.phase = progress.advance, progress.set_total, progress.phase
        beat = Heartbeat(self.engine, ctx.job_id, self.name, self.settings.heartbeat_seconds, progress)
        beat.start()
        try:
            write = STAGES[ctx.stage](ctx)
            beat.stop()
            if beat.lost:
                raise JobLost(f"job {ctx.job_id} was taken back from {self.name}")
            self._finish(ctx.job_id, write)
            return None
        except JobLost as exc:
            log.warning("%s", exc)
            return str(exc)
        except (KeyboardInterrupt, SystemExit, StorageError):
            self._release(ctx.job_id)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job
            user_error = isinstance(exc, NeedleError)
            if isinstance(exc, NeedleError):
                message = exc.message + (f" ({exc.hint})" if exc.hint else "")
            else:
                message = f"{type(exc).__name__}: {exc}"
            if not user_error:
                log.error("job %s (%s) failed:\n%s", ctx.job_id, desc, traceback.format_exc())
            def record():
                with session_scope(self.engine) as s:
                    # a user error (bad model, bad input) will not mend by itself: no retry
                    queries.fail_job(s, ctx.job_id, self.name, message, retry=not user_error,
                                     backoff_s=self.settings.retry_backoff_seconds)

            with_database(record, f"recording the failure of job {ctx.job_id}")
            return message
        finally:
            beat.stop()
            progress.close()

    def _release(self, job_id: int) -> None:
        """Give the job in hand back to the queue; if the database is down, its heartbeats stop
        and it goes back once stale."""
        try:
            with session_scope(self.engine) as s:
                queries.release_job(s, job_id, self.name)
            log.warning("released job %s", job_id)
        except (DBAPIError, StorageError):
            log.warning("could not release job %s (database unreachable or read-only): it goes back to the "
                        "queue once its heartbeats are stale", job_id)
