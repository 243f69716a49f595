"""The stages a worker runs as jobs, and the job plan of `needle index`.

A stage computes with no database session open and returns a writer: a function that
stores its results in the session the worker opens to finish the job, so results and the
job's "done" commit together (and a job run twice leaves the same rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.orm import Session

from app import queries
from app.schema import Model
from workers import store
from workers.decode import SEARCH_K, RunningTopK, decode_layers

Writer = Callable[[Session], None]


@dataclass
class ModelSpec:
    """What a stage needs to know of a registered model (a detached copy of its row)."""

    id: int
    name: str
    source: str
    device: str
    dtype: str
    decode_norm: str
    n_layers: int
    d_mlp: int
    vocab_size: int

    @classmethod
    def of(cls, m: Model) -> ModelSpec:
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__})


@dataclass
class JobContext:
    job_id: int
    stage: str
    key: str
    params: dict
    model: ModelSpec
    load: Callable[[ModelSpec], object]  # -> workers.loading.LoadedModel, cached per worker
    batch_size: int = 512
    total: int = 0  # units of work, for progress
    advance: Callable[[int], None] = field(default=lambda n: None)


def decode_part_key(start: int, stop: int) -> str:
    return f"layers:{start}-{stop}"


def run_decode(ctx: JobContext) -> Writer:
    start, stop = ctx.params["layers"]
    loaded = ctx.load(ctx.model)
    adapter = loaded.adapter
    device = adapter.unembedding().device
    search = RunningTopK(SEARCH_K, adapter.vocab_size, device)
    decodings = list(
        decode_layers(
            adapter,
            range(start, stop),
            decode_norm=ctx.model.decode_norm,
            batch_size=ctx.batch_size,
            search=search,
            progress=ctx.advance,
        )
    )
    mean_top100 = np.zeros(ctx.model.n_layers * ctx.model.d_mlp, dtype=np.float32)
    for dec in decodings:
        mean_top100[dec.layer * ctx.model.d_mlp : (dec.layer + 1) * ctx.model.d_mlp] = dec.mean_top100
    top_scores, top_ids = search.result()
    part_scores = top_scores.cpu().numpy()
    part_ids = top_ids.cpu().numpy().astype(np.int64)

    def write(session: Session) -> None:
        store.write_decodings(session, ctx.model.id, decodings)
        store.write_search_part(
            session, ctx.model.id, ctx.key, part_scores, part_ids, mean_top100, ctx.model.d_mlp
        )

    return write


def run_search_index(ctx: JobContext) -> Writer:
    def write(session: Session) -> None:
        store.build_token_index(session, ctx.model.id, ctx.model.d_mlp, ctx.model.vocab_size, ctx.params["parts"])

    return write


STAGES: dict[str, Callable[[JobContext], Writer]] = {
    "decode": run_decode,
    "search_index": run_search_index,
}


def work_units(stage: str, params: dict, model: ModelSpec) -> int:
    if stage == "decode":
        start, stop = params["layers"]
        return (stop - start) * model.d_mlp
    return 1


def plan_index(session: Session, model: Model, *, force: bool, layers_per_job: int, max_attempts: int) -> list:
    """Enqueue the decode shards (layer ranges) and the search-index merge that waits for them."""
    parts = []
    for start in range(0, model.n_layers, layers_per_job):
        stop = min(start + layers_per_job, model.n_layers)
        key = decode_part_key(start, stop)
        parts.append(key)
        queries.enqueue_job(
            session, model.id, "decode", key, {"layers": [start, stop]}, max_attempts=max_attempts, force=force
        )
    merge = queries.enqueue_job(
        session, model.id, "search_index", "all", {"parts": parts},
        requires_stage="decode", max_attempts=max_attempts, force=force,
    )
    if merge.state == "done" and merge.params.get("parts") != parts:
        queries.enqueue_job(
            session, model.id, "search_index", "all", {"parts": parts},
            requires_stage="decode", max_attempts=max_attempts, force=True,
        )
    return queries.jobs_for_model(session, model.id)
