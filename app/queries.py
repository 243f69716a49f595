"""Every read and write of the store, named. Routes, page builders and workers call these;
nothing else holds SQL.

Per-unit reads and writes take `basis`: 0 (NEURONS) for the model's MLP neurons, an SAE's id for
its latents (app/schema.py). It defaults to the neurons, so a neuron's callers name no basis."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import cast

from sqlalchemy import (
    BindParameter,
    CursorResult,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    select,
    tuple_,
    union,
    update,
)
from sqlalchemy.orm import Session, aliased, defer
from sqlalchemy.sql import Select

from app.arrays import INT32, unpack
from app.schema import (
    ClampCurve,
    Comparison,
    ExamplePart,
    ExampleRun,
    ExampleWindow,
    Feature,
    FeatureLayer,
    FiringIndex,
    Generation,
    Job,
    Model,
    Neuron,
    NeuronActivations,
    NeuronFeature,
    ProbeRun,
    Sae,
    SearchPart,
    TextRun,
    TextScan,
    TokenIndex,
    UnitLinks,
    Vocab,
)

TEXT_STAGE = "text"  # the job stage of a user's own text run
CLAMP_STAGE = "clamp_run"  # ... of a clamp curve asked for on a neuron page
GENERATE_STAGE = "generation"  # ... of a clamped generation asked for on a neuron page
COMPARE_STAGE = "compare"  # two models of one shape compared neuron by neuron (a job of the first)
SCAN_STAGE = "scan"  # ... of "what fires on this text", every unit of a model at once
LIVE_STAGES = (TEXT_STAGE, CLAMP_STAGE, GENERATE_STAGE, SCAN_STAGE)  # users' live requests, shown on their own panels
NEURONS = 0  # the basis of a model's MLP neurons


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def utc_text(value: datetime | None) -> str | None:
    """A stored time (naive, UTC: utcnow) as the JSON and pages write it: ISO 8601 to the second,
    marked UTC with a Z."""
    return value.isoformat(timespec="seconds") + "Z" if value else None


# ---------------------------------------------------------------- models


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.name)))


def model_names(session: Session) -> list[str]:
    """Every model's name, by name (no row's tokenizer read)."""
    return list(session.scalars(select(Model.name).order_by(Model.name)))


@lru_cache(maxsize=2)
def _model_statement(tokenizer: bool):
    """get_model's statement, built once (bound parameter name): every page reads its model row,
    and building a statement anew cost more than the query. So are the other statements a page
    reads through on each request (neuron_page_rows, example_windows, clamp_curves_of_neuron,
    features_of_neuron)."""
    q = select(Model).where(Model.name == bindparam("name"))
    return q if tokenizer else q.options(defer(Model.tokenizer_json))


def get_model(session: Session, name: str, *, tokenizer: bool = True) -> Model | None:
    """tokenizer=False defers the tokenizer JSON (megabytes for a large vocabulary): it is then
    read from the database only if the row's tokenizer_json is used while the session is open."""
    return session.scalar(_model_statement(tokenizer), {"name": name})


def get_model_by_id(session: Session, model_id: int) -> Model | None:
    return session.get(Model, model_id)


def save_model(session: Session, name: str, **fields) -> Model:
    """Insert the model, or update its fields if the name exists."""
    now = utcnow()
    model = get_model(session, name)
    if model is None:
        model = Model(name=name, created_at=now, updated_at=now, **fields)
        session.add(model)
    else:
        for k, v in fields.items():
            setattr(model, k, v)
        model.updated_at = now
    session.flush()
    return model


def layer_counts(session: Session, model_id: int, basis: int = NEURONS) -> dict[int, int]:
    """Stored units per layer."""
    rows = session.execute(
        select(Neuron.layer, func.count()).where(Neuron.model_id == model_id, Neuron.basis == basis)
        .group_by(Neuron.layer)
    )
    return {layer: n for layer, n in rows}


def layer_summaries(session: Session, model_id: int, basis: int = NEURONS) -> list[dict]:
    """Per stored layer: unit count, best and mean top score."""
    rows = session.execute(
        select(Neuron.layer, func.count(), func.max(Neuron.top_score), func.avg(Neuron.top_score))
        .where(Neuron.model_id == model_id, Neuron.basis == basis)
        .group_by(Neuron.layer)
        .order_by(Neuron.layer)
    )
    return [
        {"layer": layer, "neurons": n, "max_score": float(mx), "mean_score": float(avg)}
        for layer, n, mx, avg in rows
    ]


def _insert_rows(session: Session, entity: type, model_id: int, rows: Sequence[dict], chunk: int = 5000) -> None:
    """Insert rows (dicts of column values) of one model into entity's table, chunk rows per statement."""
    table = cast(Table, entity.__table__)  # type: ignore[attr-defined]
    for i in range(0, len(rows), chunk):
        session.execute(table.insert(), [{"model_id": model_id, **r} for r in rows[i : i + chunk]])


# ---------------------------------------------------------------- vocabulary


def replace_vocab(session: Session, model_id: int, rows: Sequence[dict]) -> None:
    """rows: {"token_id", "token", "piece", "key"}."""
    session.execute(delete(Vocab).where(Vocab.model_id == model_id))
    _insert_rows(session, Vocab, model_id, rows, chunk=max(len(rows), 1))


def vocab_size_stored(session: Session, model_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Vocab).where(Vocab.model_id == model_id)) or 0


def tokens_by_ids(session: Session, model_id: int, token_ids: Iterable[int]) -> dict[int, str]:
    ids = sorted({int(t) for t in token_ids})
    out: dict[int, str] = {}
    for i in range(0, len(ids), 900):
        chunk = ids[i : i + 900]
        rows = session.execute(
            select(Vocab.token_id, Vocab.token).where(Vocab.model_id == model_id, Vocab.token_id.in_(chunk))
        )
        out.update({tid: tok for tid, tok in rows})
    return out


def tokens_by_key(session: Session, model_id: int, key: str) -> list[Vocab]:
    """Vocabulary entries whose search key (see app.tokens.search_key) equals key."""
    return list(
        session.scalars(select(Vocab).where(Vocab.model_id == model_id, Vocab.key == key).order_by(Vocab.token_id))
    )


def _vocab_where_any(*matches) -> Select:
    """The model's (bound parameter m) vocabulary entries that meet any of matches (a column and
    what it must match), best token id first: one indexed lookup per match, joined by UNION. As
    one WHERE with OR, SQLite read the model's whole vocabulary (50k rows: 7.6 ms a search) unless
    ANALYZE had run, which nothing runs for it; Postgres combines its indexes either way."""
    m: BindParameter[int] = bindparam("m")
    ids = union(*[select(Vocab.token_id).where(Vocab.model_id == m, match) for match in matches])
    return select(Vocab).where(Vocab.model_id == m, Vocab.token_id.in_(ids)).order_by(Vocab.token_id)


@lru_cache(maxsize=1)
def _tokens_by_text_statement() -> Select:
    texts: BindParameter[list[str]] = bindparam("texts", expanding=True)
    return _vocab_where_any(Vocab.token.in_(texts), Vocab.piece.in_(texts))


def tokens_by_text(session: Session, model_id: int, texts: Sequence[str]) -> list[Vocab]:
    """Vocabulary entries whose decoded token or raw piece is exactly one of texts."""
    return list(session.scalars(_tokens_by_text_statement(), {"m": model_id, "texts": list(texts)}))


@lru_cache(maxsize=1)
def _text_or_key_statement() -> Select:
    text: BindParameter[str] = bindparam("text")
    return _vocab_where_any(Vocab.token == text, Vocab.piece == text, Vocab.key == bindparam("key"))


def tokens_by_text_or_key(session: Session, model_id: int, text: str, key: str) -> list[Vocab]:
    """tokens_by_text(text) followed by the rest of tokens_by_key(key), in one query: search's lookup."""
    rows = list(session.scalars(_text_or_key_statement(), {"m": model_id, "text": text, "key": key}))
    exact = [r for r in rows if r.token == text or r.piece == text]
    return exact + [r for r in rows if not (r.token == text or r.piece == text)]


# ---------------------------------------------------------------- neurons


def replace_neurons(session: Session, model_id: int, layers: Sequence[int], rows: Sequence[dict],
                    basis: int = NEURONS) -> None:
    """Replace the stored decodings of these layers of a basis with rows, in the caller's transaction."""
    session.execute(delete(Neuron).where(Neuron.model_id == model_id, Neuron.basis == basis,
                                         Neuron.layer.in_(list(layers))))
    _insert_rows(session, Neuron, model_id, [{"basis": basis, **r} for r in rows])


def get_neuron(session: Session, model_id: int, layer: int, neuron: int, basis: int = NEURONS) -> Neuron | None:
    return session.get(Neuron, (model_id, basis, layer, neuron))


LAYER_SORTS = {
    "neuron": (Neuron.neuron.asc(),),
    "score": (Neuron.top_score.desc(), Neuron.neuron.asc()),
    "-score": (Neuron.top_score.asc(), Neuron.neuron.asc()),
    # neurons without activation statistics sort last (NULL is neither large nor small)
    "frequency": (NeuronActivations.frequency.is_(None), NeuronActivations.frequency.desc(), Neuron.neuron.asc()),
    "-frequency": (NeuronActivations.frequency.is_(None), NeuronActivations.frequency.asc(), Neuron.neuron.asc()),
    # the same by the share above 1/5 of each unit's max: a SiLU or GELU model's frequency (app.examples.firing_rule)
    "frequency_above": (NeuronActivations.frequency_above.is_(None), NeuronActivations.frequency_above.desc(),
                        Neuron.neuron.asc()),
    "-frequency_above": (NeuronActivations.frequency_above.is_(None), NeuronActivations.frequency_above.asc(),
                         Neuron.neuron.asc()),
    "max": (NeuronActivations.max_act.is_(None), NeuronActivations.max_act.desc(), Neuron.neuron.asc()),
}


def layer_neurons(
    session: Session, model_id: int, layer: int, sort: str, offset: int, limit: int, basis: int = NEURONS
) -> list[tuple[Neuron, NeuronActivations | None]]:
    """A page of a layer's units with their activation statistics (None where not computed)."""
    rows = session.execute(
        select(Neuron, NeuronActivations)
        .outerjoin(
            NeuronActivations,
            and_(
                NeuronActivations.model_id == Neuron.model_id,
                NeuronActivations.basis == Neuron.basis,
                NeuronActivations.layer == Neuron.layer,
                NeuronActivations.neuron == Neuron.neuron,
            ),
        )
        .where(Neuron.model_id == model_id, Neuron.basis == basis, Neuron.layer == layer)
        .order_by(*LAYER_SORTS[sort])
        .offset(offset)
        .limit(limit)
    )
    return [(n, a) for n, a in rows]


def random_neuron(session: Session, model_id: int, rng: random.Random | None = None,
                  basis: int = NEURONS) -> tuple[int, int] | None:
    counts = layer_counts(session, model_id, basis)
    if not counts:
        return None
    rng = rng or random.Random()
    total = sum(counts.values())
    pick = rng.randrange(total)
    for layer in sorted(counts):
        if pick < counts[layer]:
            row = session.execute(
                select(Neuron.layer, Neuron.neuron)
                .where(Neuron.model_id == model_id, Neuron.basis == basis, Neuron.layer == layer)
                .order_by(Neuron.neuron)
                .offset(pick)
                .limit(1)
            ).one()
            return int(row.layer), int(row.neuron)
        pick -= counts[layer]
    return None


# ---------------------------------------------------------------- search index


def put_search_part(session: Session, model_id: int, part: str, **arrays) -> None:
    session.execute(delete(SearchPart).where(SearchPart.model_id == model_id, SearchPart.part == part))
    session.add(SearchPart(model_id=model_id, part=part, **arrays))
    session.flush()


def search_parts(session: Session, model_id: int) -> list[SearchPart]:
    return list(session.scalars(select(SearchPart).where(SearchPart.model_id == model_id).order_by(SearchPart.part)))


def delete_search_parts(session: Session, model_id: int, keep: Iterable[str] = ()) -> None:
    session.execute(
        delete(SearchPart).where(SearchPart.model_id == model_id, SearchPart.part.not_in(list(keep)))
    )


def put_example_parts(session: Session, model_id: int, kind: str, part: str, rows: Sequence[dict]) -> None:
    """Store one part of a sharded examples run ({layer, meta, data} per layer), replacing
    what an earlier attempt of the same part stored: a retried job leaves the same rows."""
    session.execute(
        delete(ExamplePart).where(ExamplePart.model_id == model_id, ExamplePart.kind == kind, ExamplePart.part == part)
    )
    session.add_all(ExamplePart(model_id=model_id, kind=kind, part=part, **r) for r in rows)
    session.flush()


def example_parts(session: Session, model_id: int, kind: str, parts: Iterable[str] | None = None,
                  layer: int | None = None) -> list[ExamplePart]:
    q = select(ExamplePart).where(ExamplePart.model_id == model_id, ExamplePart.kind == kind)
    if parts is not None:
        q = q.where(ExamplePart.part.in_(list(parts)))
    if layer is not None:
        q = q.where(ExamplePart.layer == layer)
    return list(session.scalars(q.order_by(ExamplePart.part, ExamplePart.layer)))


def example_part_names(session: Session, model_id: int, kind: str) -> list[tuple[str, int]]:
    """(part, layer) of every stored row of a kind, without their data."""
    rows = session.execute(
        select(ExamplePart.part, ExamplePart.layer).where(ExamplePart.model_id == model_id, ExamplePart.kind == kind)
    )
    return [(p, la) for p, la in rows]


def delete_example_parts(session: Session, model_id: int, parts: Iterable[str] | None = None,
                         prefix: str | None = None) -> None:
    """A model's stored example parts: all of them, those named (parts), or those whose names
    start with prefix (an SAE's: "sae:ID/")."""
    q = delete(ExamplePart).where(ExamplePart.model_id == model_id)
    if parts is not None:
        q = q.where(ExamplePart.part.in_(list(parts)))
    if prefix is not None:
        q = q.where(ExamplePart.part.startswith(prefix, autoescape=True))
    session.execute(q)


def replace_token_index(session: Session, model_id: int, rows: Sequence[dict], basis: int = NEURONS) -> None:
    session.execute(delete(TokenIndex).where(TokenIndex.model_id == model_id, TokenIndex.basis == basis))
    _insert_rows(session, TokenIndex, model_id, [{"basis": basis, **r} for r in rows])


def token_index_rows(session: Session, model_id: int, token_ids: Iterable[int],
                     basis: int = NEURONS) -> dict[int, TokenIndex]:
    ids = sorted({int(t) for t in token_ids})
    rows = session.scalars(select(TokenIndex).where(TokenIndex.model_id == model_id, TokenIndex.basis == basis,
                                                    TokenIndex.token_id.in_(ids)))
    return {r.token_id: r for r in rows}


def token_index_rows_of_bases(session: Session, model_id: int, token_ids: Iterable[int]) -> list[TokenIndex]:
    """The token index rows of these tokens in every basis of the model (neurons and each SAE)."""
    ids = sorted({int(t) for t in token_ids})
    return list(session.scalars(select(TokenIndex).where(TokenIndex.model_id == model_id, TokenIndex.token_id.in_(ids))
                                .order_by(TokenIndex.basis, TokenIndex.token_id)))


def replace_firing_index(session: Session, model_id: int, basis: int, rows: Sequence[dict]) -> None:
    """Replace one basis's firing index (token_id, layers, units, counts, acts per row)."""
    session.execute(delete(FiringIndex).where(FiringIndex.model_id == model_id, FiringIndex.basis == basis))
    _insert_rows(session, FiringIndex, model_id, [{"basis": basis, **r} for r in rows])


def firing_index_rows(session: Session, model_id: int, token_ids: Iterable[int]) -> list[FiringIndex]:
    """The firing index rows of these tokens in every basis of the model."""
    ids = sorted({int(t) for t in token_ids})
    return list(session.scalars(select(FiringIndex).where(FiringIndex.model_id == model_id,
                                                          FiringIndex.token_id.in_(ids))
                                .order_by(FiringIndex.basis, FiringIndex.token_id)))


# ---------------------------------------------------------------- jobs


def enqueue_job(
    session: Session,
    model_id: int,
    stage: str,
    key: str,
    params: dict,
    *,
    requires_stage: str | None = None,
    max_attempts: int = 3,
    force: bool = False,
) -> Job:
    """Add a job unless the same (model, stage, key) exists. An existing job is reset to the
    queue when forced, or when it failed; a done job stays done otherwise."""
    now = utcnow()
    job = session.scalar(select(Job).where(Job.model_id == model_id, Job.stage == stage, Job.key == key))
    if job is None:
        job = Job(
            model_id=model_id,
            stage=stage,
            key=key,
            params=params,
            requires_stage=requires_stage,
            state="queued",
            attempts=0,
            max_attempts=max_attempts,
            progress=0.0,
            run_after=now,
            created_at=now,
        )
        session.add(job)
    elif force or job.state == "failed":
        job.params, job.requires_stage, job.max_attempts = params, requires_stage, max_attempts
        job.state, job.attempts, job.progress, job.error = "queued", 0, 0.0, None
        job.worker, job.heartbeat_at, job.started_at, job.finished_at = None, None, None, None
        job.run_after = now
    session.flush()
    return job


def jobs_for_model(session: Session, model_id: int) -> list[Job]:
    """A model's indexing jobs (users' live requests are shown on their own panels)."""
    return list(
        session.scalars(select(Job).where(Job.model_id == model_id, Job.stage.not_in(LIVE_STAGES)).order_by(Job.id))
    )


def get_job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def pending_jobs(session: Session, model_id: int | None = None) -> int:
    q = select(func.count()).select_from(Job).where(Job.state.in_(("queued", "running")))
    if model_id is not None:
        q = q.where(Job.model_id == model_id)
    return session.scalar(q) or 0


def running_jobs(session: Session, model_id: int | None = None) -> list[tuple[Job, str]]:
    """Jobs a worker holds, with their model's name, oldest first: what an idle worker waits for."""
    q = select(Job, Model.name).join(Model, Model.id == Job.model_id).where(Job.state == "running").order_by(Job.id)
    if model_id is not None:
        q = q.where(Job.model_id == model_id)
    return [(job, name) for job, name in session.execute(q)]


def failed_jobs(session: Session, model_id: int | None = None) -> list[Job]:
    """Failed indexing jobs (a user's live request that failed is shown on its own panel instead)."""
    q = select(Job).where(Job.state == "failed", Job.stage.not_in(LIVE_STAGES)).order_by(Job.id)
    if model_id is not None:
        q = q.where(Job.model_id == model_id)
    return list(session.scalars(q))


def claim_job(session: Session, worker: str, model_id: int | None = None) -> Job | None:
    """Claim the next runnable job in one statement (FOR UPDATE SKIP LOCKED on Postgres).

    Runnable: queued, its run_after passed, and no job of the same model in its
    requires_stage (one stage, or several comma-separated) left undone. A live request (someone
    waits for it on a page) comes before indexing work, then the oldest first.
    """
    now = utcnow()
    blocker = aliased(Job)
    candidate = (
        select(Job.id)
        .where(
            Job.state == "queued",
            Job.run_after <= now,
            ~exists().where(
                blocker.model_id == Job.model_id,
                # requires_stage holds one stage or several, comma-separated
                (literal(",") + Job.requires_stage + literal(",")).like(literal("%,") + blocker.stage + literal(",%")),
                blocker.state != "done",
            ),
        )
        .order_by(Job.stage.in_(LIVE_STAGES).desc(), Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if model_id is not None:
        candidate = candidate.where(Job.model_id == model_id)
    job_id = session.execute(
        update(Job)
        .where(Job.id == candidate.scalar_subquery(), Job.state == "queued")
        .values(
            state="running",
            worker=worker,
            attempts=Job.attempts + 1,
            heartbeat_at=now,
            started_at=now,
            finished_at=None,
            progress=0.0,
            error=None,
        )
        .returning(Job.id)
    ).scalar()
    if job_id is None:
        return None
    return session.get(Job, job_id, populate_existing=True)


def heartbeat(session: Session, job_id: int, worker: str, progress: float | None = None) -> bool:
    """Record that worker still holds job_id; False if it no longer does."""
    values: dict = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = float(progress)
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == "running").values(**values)
    )
    return cast(CursorResult, res).rowcount == 1


def finish_job(session: Session, job_id: int, worker: str) -> bool:
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.state == "running")
        .values(state="done", progress=1.0, finished_at=utcnow(), error=None)
    )
    return cast(CursorResult, res).rowcount == 1


def finish_queued_job(session: Session, job_id: int) -> bool:
    """Mark a queued job done, its work done by another job (an SAE's latents' examples, read in
    the model's examples pass); False if it is not queued any more (a worker took it)."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued")
        .values(state="done", progress=1.0, started_at=now, finished_at=now, error=None)
    )
    return cast(CursorResult, res).rowcount == 1


def job_done_by(session: Session, job_id: int, worker: str) -> bool:
    job = session.get(Job, job_id, populate_existing=True)
    return job is not None and job.state == "done" and job.worker == worker


def fail_job(session: Session, job_id: int, worker: str, error: str, *, retry: bool = True, backoff_s: float = 5.0) -> str:
    """Record a failure: back to the queue after a backoff while attempts remain, else failed."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.worker != worker or job.state != "running":
        return "lost"
    now = utcnow()
    job.error = error
    job.finished_at = now
    if retry and job.attempts < job.max_attempts:
        job.state = "queued"
        job.worker = None
        job.run_after = now + timedelta(seconds=backoff_s * (2 ** (job.attempts - 1)))
    else:
        job.state = "failed"
    session.flush()
    return job.state


def release_job(session: Session, job_id: int, worker: str) -> None:
    """Give a claimed job back to the queue untouched (its attempt is not counted)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.state == "running")
        .values(state="queued", worker=None, attempts=Job.attempts - 1, heartbeat_at=None)
    )


def requeue_stale(session: Session, stale_seconds: float) -> int:
    """Jobs whose worker stopped sending heartbeats go back to the queue (or fail when out of attempts)."""
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    stale = and_(Job.state == "running", Job.heartbeat_at < cutoff)
    failed = session.execute(
        update(Job)
        .where(stale, Job.attempts >= Job.max_attempts)
        .values(state="failed", error="worker stopped sending heartbeats", finished_at=utcnow())
    )
    queued = session.execute(
        update(Job)
        .where(stale, Job.attempts < Job.max_attempts)
        .values(state="queued", worker=None, heartbeat_at=None, error="worker stopped sending heartbeats")
    )
    return cast(CursorResult, failed).rowcount + cast(CursorResult, queued).rowcount


# ---------------------------------------------------------------- web pages (reads)


def neuron_counts_by_model(session: Session) -> dict[int, int]:
    """Stored neurons per model, for the models list."""
    rows = session.execute(select(Neuron.model_id, func.count()).where(Neuron.basis == NEURONS)
                           .group_by(Neuron.model_id))
    return {model_id: n for model_id, n in rows}


def job_states_by_model(session: Session) -> dict[int, dict[str, int]]:
    """Indexing jobs per model per state, for the models list (users' live requests left out)."""
    out: dict[int, dict[str, int]] = {}
    rows = session.execute(
        select(Job.model_id, Job.state, func.count())
        .where(Job.stage.not_in(LIVE_STAGES))
        .group_by(Job.model_id, Job.state)
    )
    for model_id, state, n in rows:
        out.setdefault(model_id, {})[state] = n
    return out


def layer_summary(session: Session, model_id: int, layer: int, basis: int = NEURONS) -> dict:
    """One layer: stored unit count and best top score (None when nothing is stored)."""
    n, best = session.execute(
        select(func.count(), func.max(Neuron.top_score)).where(Neuron.model_id == model_id, Neuron.basis == basis,
                                                               Neuron.layer == layer)
    ).one()
    return {"layer": layer, "neurons": n, "max_score": None if best is None else float(best)}


@lru_cache(maxsize=1)
def _neuron_page_statement():
    """neuron_page_rows' statement, built once (bound parameters m, b, l, n): building it anew on
    every page took longer than the query."""
    m: BindParameter[int] = bindparam("m")
    b: BindParameter[int] = bindparam("b")
    lay: BindParameter[int] = bindparam("l")
    n: BindParameter[int] = bindparam("n")
    key, at = tuple_(Neuron.layer, Neuron.neuron), tuple_(lay, n)

    def neighbour(column, before: bool):
        order = (Neuron.layer.desc(), Neuron.neuron.desc()) if before else (Neuron.layer, Neuron.neuron)
        return (
            select(column)
            .where(Neuron.model_id == m, Neuron.basis == b, (key < at) if before else (key > at))
            .order_by(*order)
            .limit(1)
            .scalar_subquery()
        )

    return (
        select(
            Neuron, NeuronActivations, ExampleRun,
            neighbour(Neuron.layer, True), neighbour(Neuron.neuron, True),
            neighbour(Neuron.layer, False), neighbour(Neuron.neuron, False),
        )
        .select_from(Neuron)
        .outerjoin(NeuronActivations, (NeuronActivations.model_id == Neuron.model_id)
                   & (NeuronActivations.basis == Neuron.basis)
                   & (NeuronActivations.layer == Neuron.layer) & (NeuronActivations.neuron == Neuron.neuron))
        .outerjoin(ExampleRun, ExampleRun.model_id == Neuron.model_id)
        .where(Neuron.model_id == m, Neuron.basis == b, Neuron.layer == lay, Neuron.neuron == n)
    )


def neuron_page_rows(session: Session, model_id: int, layer: int, neuron: int, basis: int = NEURONS):
    """What a neuron page reads about one neuron, in one round trip: (its decodings row, its
    activations row or None, the model's example run or None, the previous and the next stored
    neuron as (layer, neuron) or None, crossing layers). All None when the neuron is not stored.
    The neighbours are row-value comparisons, so the primary key's index starts at (layer, neuron)
    on both databases (an OR of the two cases made Postgres scan every neuron of the model before it)."""
    row = session.execute(_neuron_page_statement(), {"m": model_id, "b": basis, "l": layer, "n": neuron}).first()
    if row is None:
        return None, None, None, None, None
    n, activations, run, prev_layer, prev_neuron, next_layer, next_neuron = row
    previous = None if prev_layer is None else (int(prev_layer), int(prev_neuron))
    following = None if next_layer is None else (int(next_layer), int(next_neuron))
    return n, activations, run, previous, following


def has_token_index(session: Session, model_id: int, basis: int = NEURONS) -> bool:
    """Whether the search_index stage has written any token rows for the model's basis yet."""
    row = session.execute(select(TokenIndex.token_id).where(TokenIndex.model_id == model_id,
                                                            TokenIndex.basis == basis).limit(1)).first()
    return row is not None


# ---------------------------------------------------------------- activation examples


def replace_examples(
    session: Session, model_id: int, run: dict, windows: Sequence[dict], rows: Sequence[dict]
) -> None:
    """Replace a model's examples (run, windows, every neuron's activations) in the caller's
    transaction: a reader sees the old set or the new one, never a mix. Its SAEs' latents'
    activations point into the same windows, so they go too (their examples stage reads the
    new run's corpus)."""
    for table in (NeuronActivations, FiringIndex, ExampleWindow, ExampleRun):
        session.execute(delete(table).where(table.model_id == model_id))
    session.add(ExampleRun(model_id=model_id, created_at=utcnow(), **run))
    session.flush()
    _insert_rows(session, ExampleWindow, model_id, windows)
    add_activations(session, model_id, rows)


def add_activations(session: Session, model_id: int, rows: Sequence[dict]) -> None:
    """Insert neuron_activations rows (replace_examples' own insert; bench/server.py adds a large
    model's layers with it one transaction at a time). A row without `basis` is a neuron's."""
    _insert_rows(session, NeuronActivations, model_id, rows, chunk=2000)


def replace_unit_activations(session: Session, model_id: int, basis: int, rows: Sequence[dict]) -> None:
    """Replace one basis's activation rows (an SAE's latents, over the model's example windows)."""
    session.execute(delete(NeuronActivations).where(NeuronActivations.model_id == model_id,
                                                    NeuronActivations.basis == basis))
    _insert_rows(session, NeuronActivations, model_id, [{"basis": basis, **r} for r in rows], chunk=2000)


def unit_frequencies(session: Session, model_id: int, basis: int) -> list[float]:
    """Every unit's firing frequency on the examples corpus (its activations rows), of one basis."""
    return [float(f) for f in session.scalars(select(NeuronActivations.frequency).where(
        NeuronActivations.model_id == model_id, NeuronActivations.basis == basis))]


def add_example_windows(session: Session, model_id: int, windows: Sequence[dict]) -> None:
    """Store the windows of these ({window, source, token_ids}) that the model does not hold yet:
    an SAE's latents show windows of the same run that no neuron showed."""
    have = {int(w) for w in session.scalars(select(ExampleWindow.window).where(ExampleWindow.model_id == model_id))}
    _insert_rows(session, ExampleWindow, model_id, [w for w in windows if int(w["window"]) not in have])


def example_run(session: Session, model_id: int) -> ExampleRun | None:
    return session.get(ExampleRun, model_id)


def expert_tokens(session: Session, model_id: int, layer: int, width: int) -> dict[int, int]:
    """A mixture of experts' layer: {expert: the corpus tokens routed to it}, read from the
    examples row of each expert's first neuron (every neuron of an expert counts the same tokens)."""
    rows = session.execute(
        select(NeuronActivations.neuron, NeuronActivations.tokens).where(
            NeuronActivations.model_id == model_id, NeuronActivations.basis == NEURONS,
            NeuronActivations.layer == layer, NeuronActivations.neuron % width == 0)
    )
    return {int(neuron) // width: int(tokens) for neuron, tokens in rows}


def neuron_activations(session: Session, model_id: int, layer: int, neuron: int,
                       basis: int = NEURONS) -> NeuronActivations | None:
    return session.get(NeuronActivations, (model_id, basis, layer, neuron))


def example_windows(session: Session, model_id: int, window_ids: Iterable[int]) -> dict:
    """{window: row} of the windows asked for; a row has .window, .token_ids and .source
    (plain rows, not ORM objects: a neuron page reads 45 of them)."""
    ids = sorted({int(w) for w in window_ids if w >= 0})
    rows = session.execute(_windows_statement(), {"m": model_id, "ids": ids})
    return {r.window: r for r in rows}


@lru_cache(maxsize=1)
def _windows_statement():
    return (select(ExampleWindow.window, ExampleWindow.token_ids, ExampleWindow.source)
            .where(ExampleWindow.model_id == bindparam("m"), ExampleWindow.window.in_(bindparam("ids", expanding=True))))


def activation_layer_summaries(session: Session, model_id: int, basis: int = NEURONS,
                               relative: bool = False) -> dict[int, dict]:
    """Per layer: units with statistics, dead ones and the mean frequency; by app.examples.firing_rule:
    relative, the silent units and the share above 1/5 of each one's max; else the units that never
    fired above 0 and that share."""
    dead = func.sum(case((NeuronActivations.silent.is_(True), 1), else_=0)) if relative else \
        func.sum(case((NeuronActivations.frequency <= 0, 1), else_=0))
    frequency = NeuronActivations.frequency_above if relative else NeuronActivations.frequency
    rows = session.execute(
        select(NeuronActivations.layer, func.count(), dead, func.avg(frequency))
        .where(NeuronActivations.model_id == model_id, NeuronActivations.basis == basis)
        .group_by(NeuronActivations.layer)
    )
    return {
        layer: {"neurons": n, "dead": int(d or 0), "mean_frequency": float(f) if f is not None else None}
        for layer, n, d, f in rows
    }


# ---------------------------------------------------------------- text runs


def create_text_run(session: Session, model_id: int, layer: int, neuron: int, text: str,
                    basis: int = NEURONS) -> TextRun:
    run = TextRun(model_id=model_id, basis=basis, layer=layer, neuron=neuron, text=text, created_at=utcnow())
    session.add(run)
    session.flush()
    return run


def get_text_run(session: Session, run_id: int) -> TextRun | None:
    return session.get(TextRun, run_id)


def text_job(session: Session, model_id: int, run_id: int) -> Job | None:
    return live_job(session, model_id, TEXT_STAGE, run_id)


def live_job(session: Session, model_id: int, stage: str, run_id: int) -> Job | None:
    """The job of a live request (a text run, clamp curve or generation), keyed "run:ID"."""
    return session.scalar(select(Job).where(Job.model_id == model_id, Job.stage == stage, Job.key == f"run:{run_id}"))


def pending_live_jobs(session: Session) -> int:
    """Live requests' jobs queued or running, of every model (the site's cap on them: app/security.py)."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.state.in_(("queued", "running")), Job.stage.in_(LIVE_STAGES))) or 0


def save_text_result(session: Session, run_id: int, token_ids: bytes, activations: bytes, n_tokens: int) -> None:
    session.execute(update(TextRun).where(TextRun.id == run_id)
                    .values(token_ids=token_ids, activations=activations, n_tokens=n_tokens))


def create_text_scan(session: Session, model_id: int, text: str) -> TextScan:
    scan = TextScan(model_id=model_id, text=text, created_at=utcnow())
    session.add(scan)
    session.flush()
    return scan


def get_text_scan(session: Session, scan_id: int) -> TextScan | None:
    return session.get(TextScan, scan_id)


def scan_job(session: Session, model_id: int, scan_id: int) -> Job | None:
    return live_job(session, model_id, SCAN_STAGE, scan_id)


def save_scan_result(session: Session, scan_id: int, token_ids: bytes, result: dict, n_tokens: int) -> None:
    session.execute(update(TextScan).where(TextScan.id == scan_id)
                    .values(token_ids=token_ids, result=result, n_tokens=n_tokens))


def unit_maxima(session: Session, model_id: int) -> list[tuple[int, int, int, float]]:
    """(basis, layer, unit, max activation on the examples corpus) of every unit with examples."""
    rows = session.execute(select(NeuronActivations.basis, NeuronActivations.layer, NeuronActivations.neuron,
                                  NeuronActivations.max_act).where(NeuronActivations.model_id == model_id))
    return [(int(b), int(layer), int(n), float(m)) for b, layer, n, m in rows]


# ---------------------------------------------------------------- clamp curves and generations


CURVE_RESULT_FIELDS = ("token_id", "token", "note", "probs", "baseline", "top_tokens")


def add_clamp_curve(session: Session, model_id: int, layer: int, neuron: int, *, prompt: str, target: str,
                    positions: str, values: Sequence[float], source: str, result: dict | None = None,
                    basis: int = NEURONS) -> ClampCurve:
    """A clamp curve row: with `result` (the worker's dict) it is complete, else a worker fills it in."""
    curve = ClampCurve(model_id=model_id, basis=basis, layer=layer, neuron=neuron, prompt=prompt, target=target,
                       positions=positions, clamp_values=[float(v) for v in values], source=source,
                       created_at=utcnow())
    for name in CURVE_RESULT_FIELDS:
        setattr(curve, name, (result or {}).get(name))
    session.add(curve)
    session.flush()
    return curve


def save_clamp_result(session: Session, curve_id: int, result: dict) -> None:
    session.execute(update(ClampCurve).where(ClampCurve.id == curve_id).values(
        clamp_values=[float(v) for v in result["values"]], **{k: result.get(k) for k in CURVE_RESULT_FIELDS}
    ))


def get_clamp_curve(session: Session, curve_id: int) -> ClampCurve | None:
    return session.get(ClampCurve, curve_id)


def clamp_curves_of_neuron(session: Session, model_id: int, layer: int, neuron: int, limit: int = 20,
                           basis: int = NEURONS) -> list[ClampCurve]:
    """A neuron's finished curves: the one `needle index` stored first (the neuron's own top token,
    the curve its permalink stands for), then those of `needle clamp`, then those visitors asked
    for on its page, each kind newest first."""
    curves = session.scalars(_curves_statement(), {"m": model_id, "b": basis, "l": layer, "n": neuron, "limit": limit})
    return [c for c in curves if c.probs is not None]  # a row written before probs was none_as_null holds JSON null


@lru_cache(maxsize=1)
def _curves_statement():
    kind = case((ClampCurve.source == "index", 0), (ClampCurve.source == "cli", 1), else_=2)
    return (
        select(ClampCurve)
        .where(ClampCurve.model_id == bindparam("m"), ClampCurve.basis == bindparam("b"), ClampCurve.layer == bindparam("l"),
               ClampCurve.neuron == bindparam("n"), ClampCurve.probs.is_not(None))
        .order_by(kind, ClampCurve.id.desc())
        .limit(bindparam("limit"))
    )


def replace_index_curves(session: Session, model_id: int, curves: Sequence[dict], basis: int = NEURONS) -> None:
    """Replace a basis's precomputed curves (source "index") in the caller's transaction."""
    session.execute(delete(ClampCurve).where(ClampCurve.model_id == model_id, ClampCurve.basis == basis,
                                             ClampCurve.source == "index"))
    now = utcnow()
    _insert_rows(session, ClampCurve, model_id,
                 [{"source": "index", "created_at": now, "basis": basis, **c} for c in curves], chunk=1000)


def clamp_candidates(session: Session, model_id: int, top: int = 10) -> list[tuple[int, int, int]]:
    """(layer, neuron, token id): every neuron that is among the top `top` search hits for its own
    top decoded token, in layer and neuron order."""
    own = {(n.layer, n.neuron): n.top_token_id for n in session.execute(
        select(Neuron.layer, Neuron.neuron, Neuron.top_token_id).where(Neuron.model_id == model_id,
                                                                       Neuron.basis == NEURONS))}
    tokens = set(own.values())
    out = []
    for row in session.scalars(select(TokenIndex).where(TokenIndex.model_id == model_id, TokenIndex.basis == NEURONS)):
        if row.token_id not in tokens:
            continue
        layers, neurons = unpack(row.layers, INT32)[:top], unpack(row.neurons, INT32)[:top]
        for layer, neuron in zip(layers.tolist(), neurons.tolist()):
            if own.get((layer, neuron)) == row.token_id:
                out.append((layer, neuron, row.token_id))
    return sorted(out)


def neuron_max_abs(session: Session, model_id: int, basis: int = NEURONS) -> dict[tuple[int, int], float]:
    """Each unit's observed max |activation| on the examples corpus (empty without one)."""
    rows = session.execute(select(NeuronActivations.layer, NeuronActivations.neuron, NeuronActivations.max_act,
                                  NeuronActivations.min_act).where(NeuronActivations.model_id == model_id,
                                                                   NeuronActivations.basis == basis))
    return {(r.layer, r.neuron): max(abs(r.max_act), abs(r.min_act)) for r in rows}


def first_example_window(session: Session, model_id: int) -> ExampleWindow | None:
    return session.scalar(select(ExampleWindow).where(ExampleWindow.model_id == model_id)
                          .order_by(ExampleWindow.window).limit(1))


def add_generation(session: Session, model_id: int, layer: int, neuron: int, *, prompt: str, value: float,
                   tokens: int, seed: int | None, source: str, result: dict | None = None,
                   basis: int = NEURONS) -> Generation:
    gen = Generation(model_id=model_id, basis=basis, layer=layer, neuron=neuron, prompt=prompt, value=float(value),
                     tokens=tokens, seed=seed, source=source, created_at=utcnow(),
                     clamped=(result or {}).get("clamped"), unclamped=(result or {}).get("unclamped"))
    session.add(gen)
    session.flush()
    return gen


def save_generation_result(session: Session, gen_id: int, result: dict) -> None:
    session.execute(update(Generation).where(Generation.id == gen_id).values(
        clamped=result["clamped"], unclamped=result["unclamped"]))


def get_generation(session: Session, gen_id: int) -> Generation | None:
    return session.get(Generation, gen_id)


# ---------------------------------------------------------------- comparing two models


def layer_top_tokens(session: Session, model_id: int, layer: int) -> list[tuple[int, int, bytes]]:
    """One layer's neurons as (neuron, top input-weight token id, in_ids), by neuron."""
    return [(int(n), int(t), ids) for n, t, ids in session.execute(
        select(Neuron.neuron, Neuron.top_token_id, Neuron.in_ids)
        .where(Neuron.model_id == model_id, Neuron.basis == NEURONS, Neuron.layer == layer)
        .order_by(Neuron.neuron))]


def units_in_ids(session: Session, model_id: int, units: Iterable[tuple[int, int]],
                 basis: int = NEURONS) -> dict[tuple[int, int], bytes]:
    """The in_ids (top input-weight tokens, best first) of these (layer, index)s of a basis (those stored)."""
    units = list(units)
    if not units:
        return {}
    rows = session.execute(
        select(Neuron.layer, Neuron.neuron, Neuron.in_ids)
        .where(Neuron.model_id == model_id, Neuron.basis == basis, tuple_(Neuron.layer, Neuron.neuron).in_(units)))
    return {(int(layer), int(n)): ids for layer, n, ids in rows}


def vocab_pieces(session: Session, model_id: int) -> list[str]:
    """A model's vocabulary as the tokenizer's strings, by token id."""
    return list(session.scalars(select(Vocab.piece).where(Vocab.model_id == model_id).order_by(Vocab.token_id)))


def put_comparison(session: Session, model_a: int, model_b: int, **fields) -> None:
    session.execute(delete(Comparison).where(Comparison.model_a == model_a, Comparison.model_b == model_b))
    session.add(Comparison(model_a=model_a, model_b=model_b, created_at=utcnow(), **fields))
    session.flush()


def get_comparison(session: Session, model_a: int, model_b: int) -> Comparison | None:
    return session.get(Comparison, (model_a, model_b))


def compare_job(session: Session, model_a: int, model_b: int) -> Job | None:
    """The job that compares model_a with model_b (a job of model_a keyed by model_b's id)."""
    return session.scalars(select(Job).where(Job.model_id == model_a, Job.stage == COMPARE_STAGE,
                                             Job.key == str(model_b))).first()


def feature_layers_of_model(session: Session, model_id: int, basis: int = NEURONS) -> list[FeatureLayer]:
    """Every probed feature's per-layer results in a basis, by feature then layer."""
    return list(session.scalars(
        select(FeatureLayer).where(FeatureLayer.model_id == model_id, FeatureLayer.basis == basis)
        .order_by(FeatureLayer.feature, FeatureLayer.layer)))


# ---------------------------------------------------------------- sparse probes


def replace_probes(
    session: Session, model_id: int, run: dict, features: Sequence[dict], layers: Sequence[dict], neurons: Sequence[dict]
) -> None:
    """Replace a model's probe results in the caller's transaction (all features at once)."""
    for table in (NeuronFeature, FeatureLayer, Feature, ProbeRun):
        session.execute(delete(table).where(table.model_id == model_id))
    session.add(ProbeRun(model_id=model_id, created_at=utcnow(), **run))
    session.flush()
    for table, rows in ((Feature, features), (FeatureLayer, layers), (NeuronFeature, neurons)):
        _insert_rows(session, table, model_id, rows, chunk=2000)


def probe_run(session: Session, model_id: int) -> ProbeRun | None:
    return session.get(ProbeRun, model_id)


def list_features(session: Session, model_id: int, query: str | None = None) -> list[Feature]:
    """A model's features by name; with a query, those whose name contains it (case-insensitive)."""
    q = select(Feature).where(Feature.model_id == model_id).order_by(Feature.name)
    if query:
        escaped = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        q = q.where(func.lower(Feature.name).like(f"%{escaped}%", escape="\\"))
    return list(session.scalars(q))


def get_feature(session: Session, model_id: int, name: str) -> Feature | None:
    return session.get(Feature, (model_id, name))


def feature_layers(session: Session, model_id: int, name: str, basis: int = NEURONS) -> list[FeatureLayer]:
    return list(
        session.scalars(
            select(FeatureLayer)
            .where(FeatureLayer.model_id == model_id, FeatureLayer.basis == basis, FeatureLayer.feature == name)
            .order_by(FeatureLayer.layer)
        )
    )


def features_of_neuron(session: Session, model_id: int, layer: int, neuron: int,
                       basis: int = NEURONS) -> list[NeuronFeature]:
    """The features for which this unit is among the top by mean difference, best F1 first."""
    return list(session.scalars(_neuron_features_statement(), {"m": model_id, "b": basis, "l": layer, "n": neuron}))


@lru_cache(maxsize=1)
def _neuron_features_statement():
    return (
        select(NeuronFeature)
        .where(NeuronFeature.model_id == bindparam("m"), NeuronFeature.basis == bindparam("b"),
               NeuronFeature.layer == bindparam("l"),
               NeuronFeature.neuron == bindparam("n"))
        .order_by(NeuronFeature.f1.desc(), NeuronFeature.feature)
    )


# ---------------------------------------------------------------- sparse autoencoders


def add_sae(session: Session, model_id: int, **fields) -> Sae:
    """Register an SAE (its id is its basis); IntegrityError if the model has one of that name."""
    now = utcnow()
    sae = Sae(model_id=model_id, created_at=now, updated_at=now, **fields)
    session.add(sae)
    session.flush()
    return sae


def _sae_statement(weights: bool):
    q = select(Sae)
    return q if weights else q.options(defer(Sae.weights))


def get_sae(session: Session, model_id: int, name: str, *, weights: bool = False) -> Sae | None:
    return session.scalar(_sae_statement(weights).where(Sae.model_id == model_id, Sae.name == name))


def get_sae_by_id(session: Session, sae_id: int, *, weights: bool = False) -> Sae | None:
    return session.scalar(_sae_statement(weights).where(Sae.id == sae_id))


def list_saes(session: Session, model_id: int) -> list[Sae]:
    """A model's SAEs by layer, then site and name (weights left unread)."""
    return list(session.scalars(_sae_statement(False).where(Sae.model_id == model_id)
                                .order_by(Sae.layer, Sae.site, Sae.name)))


def save_sae_weights(session: Session, sae_id: int, cfg: dict, weights: bytes, training: dict | None = None) -> None:
    values: dict = {"cfg": cfg, "weights": weights, "updated_at": utcnow()}
    if training is not None:
        values["training"] = training
    session.execute(update(Sae).where(Sae.id == sae_id).values(**values))


def save_sae_quality(session: Session, sae_id: int, quality: dict) -> None:
    session.execute(update(Sae).where(Sae.id == sae_id).values(quality=quality, updated_at=utcnow()))


def delete_sae(session: Session, sae: Sae) -> None:
    """An SAE and every row of its basis."""
    for table in (Neuron, NeuronActivations, TokenIndex, FeatureLayer, NeuronFeature, ClampCurve, Generation, TextRun):
        session.execute(delete(table).where(table.model_id == sae.model_id, table.basis == sae.id))
    session.execute(delete(UnitLinks).where(UnitLinks.model_id == sae.model_id,
                                            (UnitLinks.basis == sae.id) | (UnitLinks.other == sae.id)))
    session.execute(delete(Sae).where(Sae.id == sae.id))


def replace_unit_links(session: Session, model_id: int, sae_id: int, rows: Sequence[dict]) -> None:
    """Replace the links between an SAE's latents and the neurons (rows of either direction)."""
    session.execute(delete(UnitLinks).where(UnitLinks.model_id == model_id,
                                            (UnitLinks.basis == sae_id) | (UnitLinks.other == sae_id)))
    _insert_rows(session, UnitLinks, model_id, rows)


def unit_links(session: Session, model_id: int, layer: int, neuron: int, basis: int = NEURONS) -> list[UnitLinks]:
    """A unit's links to the units of other bases, by the other basis."""
    return list(session.scalars(select(UnitLinks).where(
        UnitLinks.model_id == model_id, UnitLinks.basis == basis, UnitLinks.layer == layer, UnitLinks.neuron == neuron)
        .order_by(UnitLinks.other)))


# ---------------------------------------------------------------- jobs list: the /-/jobs page and `needle jobs`
# (every job, live requests included; the model page's panel shows a model's indexing jobs only)

JOB_STATES = ("running", "queued", "failed", "done")  # the list's order: active first


def _jobs_list_filter(model_id: int | None, state: str | None) -> list:
    where = []
    if model_id is not None:
        where.append(Job.model_id == model_id)
    if state is not None:
        where.append(Job.state == state)
    return where


def list_jobs(
    session: Session, *, model_id: int | None = None, state: str | None = None, offset: int = 0, limit: int = 200
) -> list[tuple[Job, str]]:
    """A page of jobs with their model's name: running, then queued (both in the order workers
    claim them, oldest first), then failed, then done (both newest first)."""
    rank = case({s: i for i, s in enumerate(JOB_STATES)}, value=Job.state, else_=len(JOB_STATES))
    within = case((Job.state.in_(("running", "queued")), Job.id), else_=-Job.id)
    rows = session.execute(
        select(Job, Model.name)
        .join(Model, Model.id == Job.model_id)
        .where(*_jobs_list_filter(model_id, state))
        .order_by(rank, within)
        .offset(offset)
        .limit(limit)
    )
    return [(job, name) for job, name in rows]


def count_jobs_by_state(session: Session, model_id: int | None = None) -> dict[str, int]:
    """Jobs per state (live requests included), of one model or of all."""
    rows = session.execute(
        select(Job.state, func.count()).where(*_jobs_list_filter(model_id, None)).group_by(Job.state)
    )
    return {state: n for state, n in rows}


# ---------------------------------------------------------------- end of the jobs list


# ---------------------------------------------------------------- export (`needle export`, needle/export.py)
# Reads in neuron ranges of one layer, so an export holds one batch at a time, whatever the model's size.


def vocab_tokens(session: Session, model_id: int) -> list[tuple[int, str]]:
    """(token id, token text) of a model's whole vocabulary, by id."""
    rows = session.execute(
        select(Vocab.token_id, Vocab.token).where(Vocab.model_id == model_id).order_by(Vocab.token_id)
    )
    return [(int(t), tok) for t, tok in rows]


def neurons_in_range(session: Session, model_id: int, layer: int, start: int, stop: int,
                     basis: int = NEURONS) -> list[Neuron]:
    """The stored decodings of units start..stop-1 of a layer, by index."""
    return list(session.scalars(
        select(Neuron)
        .where(Neuron.model_id == model_id, Neuron.basis == basis, Neuron.layer == layer, Neuron.neuron >= start, Neuron.neuron < stop)
        .order_by(Neuron.neuron)
    ))


def activations_in_range(session: Session, model_id: int, layer: int, start: int, stop: int,
                         basis: int = NEURONS) -> list[NeuronActivations]:
    """The stored activation examples and statistics of units start..stop-1 of a layer, by index."""
    return list(session.scalars(
        select(NeuronActivations)
        .where(NeuronActivations.model_id == model_id, NeuronActivations.basis == basis,
               NeuronActivations.layer == layer,
               NeuronActivations.neuron >= start, NeuronActivations.neuron < stop)
        .order_by(NeuronActivations.neuron)
    ))


def window_tokens(session: Session, model_id: int, window_ids: Iterable[int]) -> dict[int, tuple[bytes, str]]:
    """window -> (token ids blob, source) for any number of windows (900 per statement: databases cap
    a statement's parameters; plain rows, no ORM objects, as an export reads millions)."""
    ids = sorted({int(w) for w in window_ids if w >= 0})
    out: dict[int, tuple[bytes, str]] = {}
    for i in range(0, len(ids), 900):
        rows = session.execute(
            select(ExampleWindow.window, ExampleWindow.token_ids, ExampleWindow.source)
            .where(ExampleWindow.model_id == model_id, ExampleWindow.window.in_(ids[i : i + 900]))
        )
        out.update({w: (blob, source) for w, blob, source in rows})
    return out


def neuron_features_of_layer(session: Session, model_id: int, layer: int, basis: int = NEURONS) -> list[NeuronFeature]:
    """Every unit's feature memberships in a layer: by index, then best F1 first (as features_of_neuron)."""
    return list(session.scalars(
        select(NeuronFeature)
        .where(NeuronFeature.model_id == model_id, NeuronFeature.basis == basis, NeuronFeature.layer == layer)
        .order_by(NeuronFeature.neuron, NeuronFeature.f1.desc(), NeuronFeature.feature)
    ))


def feature_layers_in_range(session: Session, model_id: int, start: int, stop: int,
                            basis: int = NEURONS) -> list[FeatureLayer]:
    """Every feature's per-layer probes for layers start..stop-1, by feature then layer."""
    return list(session.scalars(
        select(FeatureLayer)
        .where(FeatureLayer.model_id == model_id, FeatureLayer.basis == basis,
               FeatureLayer.layer >= start, FeatureLayer.layer < stop)
        .order_by(FeatureLayer.feature, FeatureLayer.layer)
    ))
