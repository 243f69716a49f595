"""Running a model's queued jobs in this process, with progress bars (`needle index`, `needle sae`)."""

from __future__ import annotations

import sys

from app.config import Settings
from app.errors import NeedleError


def say(line: str) -> None:
    """A line for the user beside the progress bars (on stderr, so that stdout stays the command's output)."""
    print(line, file=sys.stderr, flush=True)


SCALED_TOTAL = 10_000  # a bar counting this many or more writes 12.3k, not 12345


class TqdmProgress:
    """A progress bar per job, on stderr, in the unit its stage counts; the counting itself (and
    the fraction the /-/jobs page shows) is workers/worker.py Progress's. A stage in phases
    (the probes: forward, then fit) gets a bar per phase."""

    def __init__(self, desc: str, total: int, unit: str):
        from workers.worker import Progress

        self.count = Progress(desc, total, unit)
        self.bar = self._bar(desc, total, unit)

    @staticmethod
    def _bar(desc: str, total: int, unit: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=total >= SCALED_TOTAL, leave=True,
                    dynamic_ncols=True)

    def fraction(self) -> float | None:
        return self.count.fraction()

    def advance(self, n: int) -> None:
        self.count.advance(n)
        self.bar.update(n)

    def set_total(self, total: int) -> None:
        self.count.set_total(total)
        self.bar.total = total
        self.bar.unit_scale = total >= SCALED_TOTAL  # 262k tok, not 262144 tok
        self.bar.refresh()

    def phase(self, label: str, total: int, unit: str, share: float) -> None:
        desc = f"{self.count.desc} ({label})"
        if self.count.base == 0 and self.count.done == 0:  # the job's first count: this bar becomes it
            self.count.phase(label, total, unit, share)
            self.bar.set_description_str(desc, refresh=False)
            self.bar.unit = unit
            self.set_total(total)
            return
        self.close()
        self.count.phase(label, total, unit, share)
        self.bar = self._bar(desc, total, unit)

    def close(self) -> None:
        if self.count.done < self.count.total:
            self.bar.update(self.count.total - self.count.done)
            self.count.done = self.count.total
        self.bar.close()


def work_until_idle(engine, settings: Settings, spec, loaded, model_id: int, *, what: str, quiet: bool = False) -> None:
    """Run the model's queued jobs here until none is left (`loaded` is the model, already in
    memory); a NeedleError naming each job that failed."""
    from app import queries
    from app.db import session_scope
    from workers.worker import ModelCache, Progress, Worker

    cache = ModelCache()
    cache.put(spec, loaded)
    worker = Worker(
        engine, settings, cache=cache, only_model_id=model_id,
        progress_factory=Progress if quiet else TqdmProgress, on_wait=None if quiet else say,
    )
    worker.run(until_idle=True, poll_seconds=0.5)
    with session_scope(engine) as s:
        failed = queries.failed_jobs(s, model_id)
        if failed:
            errors = "; ".join(f"{j.stage} {j.key}: {j.error}" for j in failed)
            raise NeedleError(f"{what} failed: {errors}", status=500)
