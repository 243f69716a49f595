"""The stages a worker runs as jobs, and the job plan of `needle index`.

A stage computes with no database session open and returns a writer: a function that
stores its results in the session the worker opens to finish the job, so results and the
job's "done" commit together (and a job run twice leaves the same rows).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from app import queries
from app.arrays import FLOAT32, INT32, pack
from app.errors import NeedleError
from app.schema import Model
from workers import compare, examples, saestages, scan, store
from workers.corpus import bos_prefix_id, load_corpus
from workers.decode import SEARCH_K, RunningTopK, decode_layers
from workers.devices import compute_device
from workers.loading import LoadedModel, max_positions

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
    max_memory: dict[str, int] | None = None  # --max-memory's caps of a model on a device map (its info)

    @classmethod
    def of(cls, m: Model) -> ModelSpec:
        fields = {f: getattr(m, f) for f in cls.__dataclass_fields__ if f != "max_memory"}
        return cls(**fields, max_memory=(m.info or {}).get("max_memory"))


@dataclass
class JobContext:
    job_id: int
    stage: str
    key: str
    params: dict
    model: ModelSpec
    load: Callable[[ModelSpec], LoadedModel]  # cached per worker
    batch_size: int = 512
    total: int = 0  # units of work, for progress
    advance: Callable[[int], None] = field(default=lambda n: None)
    # set_total(n): once a stage knows its size, in its unit (work_units: "tok", "layer", ...)
    set_total: Callable[[int], None] = field(default=lambda n: None)
    # phase(label, total, unit, share): the next `share` of the job counts `total` of another unit
    phase: Callable[[str, int, str, float], None] = field(default=lambda label, total, unit, share: None)
    examples_batch_tokens: int = 8192
    clamp_batch_rows: int = 512
    read: Callable[[Callable[[Session], Any]], Any] = field(default=lambda fn: None)  # fn(session) in a short read


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


def run_examples(ctx: JobContext) -> Writer:
    """Top contexts, interval samples and statistics of every neuron, from one pass over the
    corpus; or, for a sharded run (params "shards" and "layer_ranges"), the merge of its parts."""
    if "layer_ranges" in ctx.params:
        return merge_examples(ctx)
    loaded = ctx.load(ctx.model)
    p = ctx.params
    check_context(loaded, p["context"])
    corpus = load_corpus(p["corpus"], loaded.tokenizer, context=p["context"], max_tokens=p.get("tokens"))
    bos = bos_prefix_id(loaded.tokenizer)
    n_windows = corpus.windows.shape[0]
    batch_tokens = p.get("batch_tokens") or ctx.examples_batch_tokens
    estimate = examples.plan(n_windows, p["context"], batch_tokens).estimate_ids
    ctx.set_total((len(estimate) + n_windows) * p["context"])
    # the SAEs whose latents' examples wait for these windows are read in the same forward passes
    riders = saestages.riding_latents(ctx, compute_device(loaded.model))
    readers: list[examples.Reader] = [(list(range(ctx.model.n_layers)), examples.NEURON_UNITS)]
    readers += [([sae.layer], saestages.latent_units(sae)) for _, _, sae in riders]
    started = time.perf_counter()
    results, *latents = examples.collect_readers(loaded.model, loaded.adapter, readers, corpus.windows, bos,
                                                 batch_tokens=batch_tokens, progress=ctx.advance)
    seconds = time.perf_counter() - started
    run = examples_run(corpus, p["context"], bos is not None, batch_tokens, seconds, str(loaded.device))

    def write(session: Session) -> None:
        store.write_examples(session, ctx.model.id, run, corpus, results)
        for (job_id, sae_id, _), rows in zip(riders, latents, strict=True):
            if queries.finish_queued_job(session, job_id):  # not taken by a worker meanwhile
                store.write_unit_examples(session, ctx.model.id, sae_id, corpus, rows)

    return write


# ---- sharded examples: layer range x corpus shard ---------------------------------------------
#
# examples_range (one job per layer range): the estimate pass of that range's layers, stored.
# examples_part (range x shard, after every range): the streaming pass over one corpus shard,
#   its accumulators stored. Shards start on the one-machine pass's batch boundaries
#   (examples.shard_bounds), so the merge below reproduces that pass.
# examples (the merge, after every part): folds each layer's shards together and writes the
#   same rows as one examples job would, then deletes the parts.

TOKENS = "tok"  # the unit of progress of a pass over a corpus
EXAMPLES_RANGE_STAGE = "examples_range"
EXAMPLES_PART_STAGE = "examples_part"
SHARDING_KEYS = ("shards", "layer_ranges", "batch_tokens")  # how a run is split, not what it computes


NEURON_PARTS = "layers:"  # how the neurons' range and part keys start (an SAE's: "sae:ID/layers:")


def layers_key(start: int, stop: int) -> str:
    return f"{NEURON_PARTS}{start}-{stop}"


def shard_key(start: int, stop: int, shard: int, shards: int) -> str:
    return f"{layers_key(start, stop)}/shard:{shard + 1}-of-{shards}"


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    return buf.getvalue()


def _unnpz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_corpus_cache: dict[tuple, Any] = {}


def _examples_corpus(ctx: JobContext, loaded):
    """The run's corpus; a worker keeps the last one it read, as the shards of one run all read the same."""
    p = ctx.params
    check_context(loaded, p["context"])
    stat = os.stat(p["corpus"]) if os.path.exists(p["corpus"]) else None
    key = (p["corpus"], stat and (stat.st_mtime_ns, stat.st_size), ctx.model.source, p["context"], p.get("tokens"))
    if key not in _corpus_cache:
        _corpus_cache.clear()
        _corpus_cache[key] = load_corpus(p["corpus"], loaded.tokenizer, context=p["context"], max_tokens=p.get("tokens"))
    return _corpus_cache[key]


def _reader(ctx: JobContext, loaded) -> tuple[examples.Units, str]:
    """The units a sharded-examples job reads, and the prefix of its jobs' and parts' keys: the
    neurons (""), or, with params "sae", that SAE's latents at its site ("sae:ID/"). The range,
    part and merge code below is the same for both."""
    sae_id = ctx.params.get("sae")
    if sae_id is None:
        return examples.NEURON_UNITS, ""
    sae = saestages.stored_sae(ctx, sae_id, compute_device(loaded.model))
    return saestages.latent_units(sae), saestages.parts_prefix(sae_id)


def run_examples_range(ctx: JobContext) -> Writer:
    """The estimate pass of one layer range: each unit's min and max over the estimate sample."""
    loaded = ctx.load(ctx.model)
    p = ctx.params
    units, _ = _reader(ctx, loaded)
    corpus = _examples_corpus(ctx, loaded)
    start, stop = p["layers"]
    plan_ = examples.plan(corpus.windows.shape[0], p["context"], p["batch_tokens"])
    ctx.set_total(len(plan_.estimate_ids) * p["context"])
    ranges = examples.estimate_range(
        loaded.model, loaded.adapter, list(range(start, stop)), corpus.windows, bos_prefix_id(loaded.tokenizer),
        plan_, compute_device(loaded.model), ctx.advance, units,
    )
    rows = [{"layer": layer, "meta": {"windows": len(plan_.estimate_ids)},
             "data": _npz({"min": lo.cpu().numpy(), "max": hi.cpu().numpy()})} for layer, (lo, hi) in ranges.items()]

    def write(session: Session) -> None:
        queries.put_example_parts(session, ctx.model.id, "range", ctx.key, rows)

    return write


def _stored_ranges(ctx: JobContext, layers: list[int], prefix: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    range_key = prefix + layers_key(layers[0], layers[-1] + 1)
    got = ctx.read(lambda s: [(r.layer, _unnpz(r.data)) for r in queries.example_parts(s, ctx.model.id, "range", [range_key])])
    ranges = {layer: (torch.from_numpy(a["min"]), torch.from_numpy(a["max"])) for layer, a in got}
    missing = sorted(set(layers) - set(ranges))
    if missing:
        raise RuntimeError(f"the estimated ranges of layers {missing} are not stored; their examples_range job must run first")
    return ranges


def run_examples_part(ctx: JobContext) -> Writer:
    """One corpus shard's streaming pass over one layer range, its accumulators stored."""
    loaded = ctx.load(ctx.model)
    p = ctx.params
    units, prefix = _reader(ctx, loaded)
    corpus = _examples_corpus(ctx, loaded)
    start, stop = p["layers"]
    layers = list(range(start, stop))
    ranges = _stored_ranges(ctx, layers, prefix)
    w0, w1 = examples.shard_bounds(corpus.windows.shape[0], p["context"], p["batch_tokens"], p["shards"])[p["shard"]]
    ctx.set_total(max(1, (w1 - w0) * p["context"]))
    started = time.perf_counter()
    accs = examples.accumulate(
        loaded.model, loaded.adapter, layers, corpus.windows, bos_prefix_id(loaded.tokenizer), ranges,
        start=w0, stop=w1, batch_tokens=p["batch_tokens"], progress=ctx.advance, units=units,
    )
    meta = {"shard": p["shard"], "windows": [w0, w1], "seconds": round(time.perf_counter() - started, 3),
            "device": str(loaded.device)}
    rows = [{"layer": layer, "meta": meta, "data": _npz(acc.state())} for layer, acc in accs.items()]

    def write(session: Session) -> None:
        queries.put_example_parts(session, ctx.model.id, "shard", ctx.key, rows)

    return write


def merge_examples(ctx: JobContext) -> Writer:
    """The examples stage of a sharded run: every layer's shards merged into the rows one
    pass would have written (the neurons', or an SAE's latents' for its sae_examples)."""
    loaded = ctx.load(ctx.model)
    p = ctx.params
    units, prefix = _reader(ctx, loaded)
    corpus = _examples_corpus(ctx, loaded)
    shards = p["shards"]
    device = compute_device(loaded.model)
    ctx.set_total(sum(stop - start for start, stop in p["layer_ranges"]))
    results, seconds, devices, parts = [], {}, set(), []
    for start, stop in p["layer_ranges"]:
        layers = list(range(start, stop))
        ranges = _stored_ranges(ctx, layers, prefix)
        keys = [prefix + shard_key(start, stop, i, shards) for i in range(shards)]
        parts += [prefix + layers_key(start, stop), *keys]
        for layer in layers:
            def stored_shards(s: Session, layer: int = layer, keys: list[str] = keys) -> list:
                return [(r.meta, _unnpz(r.data)) for r in queries.example_parts(s, ctx.model.id, "shard", keys, layer)]

            rows = ctx.read(stored_shards)
            found = {meta["shard"] for meta, _ in rows}
            if found != set(range(shards)):
                missing = [keys[i] for i in range(shards) if i not in found]
                raise RuntimeError(f"layer {layer}: the shards {missing} are not stored; their examples_part jobs must run first")
            rows.sort(key=lambda r: r[0]["shard"])  # a fixed order for the float sums
            for meta, _ in rows:
                seconds[(start, meta["shard"])] = meta["seconds"]
                devices.add(meta["device"])
            acc = examples.LayerAccumulator(layer, units.size(loaded.adapter), p["context"], device, *ranges[layer],
                                            negatives=units.reads_negatives(loaded.adapter))
            acc.merge([state for _, state in rows])
            results.append(acc.result())
            del rows, acc
            ctx.advance(1)
    if prefix:  # an SAE's latents, over the model's run's windows
        return saestages.latent_examples_writer(ctx, corpus, results, parts)
    run = examples_run(corpus, p["context"], bos_prefix_id(loaded.tokenizer) is not None, p["batch_tokens"],
                       sum(seconds.values()), ", ".join(sorted(devices)),
                       shards=shards, layer_ranges=p["layer_ranges"])

    def write(session: Session) -> None:
        store.write_examples(session, ctx.model.id, run, corpus, results)
        queries.delete_example_parts(session, ctx.model.id, parts)

    return write


def run_sae_examples(ctx: JobContext) -> Writer:
    """An SAE's latents' examples: one pass, or the merge of its sharded run's parts."""
    return merge_examples(ctx) if "layer_ranges" in ctx.params else saestages.run_sae_examples(ctx)


def examples_run(corpus, context: int, bos_prefix: bool, batch_tokens: int, seconds: float, device: str,
                 **sharding) -> dict:
    """The example_runs row of a run. A sharded run's seconds are its shards' streaming
    passes summed over machines."""
    n_windows = corpus.windows.shape[0]
    return {
        "corpus": corpus.spec,
        "description": corpus.description,
        "context": context,
        "n_windows": n_windows,
        "n_tokens": corpus.n_tokens,
        "n_documents": corpus.n_documents,
        "bos_prefix": bos_prefix,
        "settings": {
            "top_k": examples.TOP_K, "bins": examples.BINS, "per_bin": examples.PER_BIN,
            "hist_bins": examples.HIST_BINS,
            "estimate_windows": len(examples.plan(n_windows, context, batch_tokens).estimate_ids),
            "batch_tokens": batch_tokens, **sharding,
            "seconds": round(seconds, 2), "tokens_per_second": round(corpus.n_tokens / max(seconds, 1e-9)),
            "device": device,
        },
    }


def check_context(loaded, context: int) -> None:
    """A window (with a BOS in front, when the tokenizer adds one) must fit the model's positions."""
    limit = max_positions(loaded.config)
    need = context + (1 if bos_prefix_id(loaded.tokenizer) is not None else 0)
    if limit is not None and need > limit:
        raise NeedleError(
            f"--context {context} does not fit this model: it reads at most {limit} positions"
            + (" (one of them the BOS token)." if need > context else "."),
            hint=f"Use --context {limit - (need - context)} or less.",
        )


def run_text(ctx: JobContext) -> Writer:
    """A user's own text: one neuron's activation on each of its tokens."""
    loaded = ctx.load(ctx.model)
    run_id, layer, neuron, text = ctx.params["run"], ctx.params["layer"], ctx.params["neuron"], ctx.params["text"]
    ids, n_tokens, bos = scan.user_text_ids(loaded, text)  # the model reads no more; the page says what was left out
    windows = torch.tensor([ids], dtype=torch.int64)
    got: dict[int, torch.Tensor] = {}

    def read(at: int, acts: torch.Tensor) -> None:
        got[at] = acts[0, :, neuron].float().cpu()

    device = compute_device(loaded.model)
    units = examples.NEURON_UNITS
    if ctx.params.get("sae") is not None:  # a latent: its SAE's encoder at its site
        sae = saestages.stored_sae(ctx, ctx.params["sae"], device)
        units = saestages.latent_units(sae)
    examples.forward_windows(loaded.model, loaded.adapter, [layer], windows, bos, read, device, units)
    token_blob, act_blob = pack(ids, INT32), pack(got[layer].numpy(), FLOAT32)

    def write(session: Session) -> None:
        queries.save_text_result(session, run_id, token_blob, act_blob, n_tokens)

    return write


def run_probes(ctx: JobContext) -> Writer:
    """Sparse probes of every feature of the dataset in every layer (Gurnee et al. 2023)."""
    from workers import probing
    from workers.features import load_features

    loaded = ctx.load(ctx.model)
    p = ctx.params
    check_context(loaded, p["context"])
    dataset = load_features(
        p["features"], loaded.tokenizer, context=p["context"], max_tokens=p["tokens"], corpus=p["corpus"]
    )
    # progress: the forward pass in corpus tokens, then fitting (as long, give or take) in features
    ctx.phase("forward", int(dataset.lengths.sum()), TOKENS, 0.5)
    started = time.perf_counter()
    acts = probing.collect_activations(
        loaded.model, loaded.adapter, list(range(ctx.model.n_layers)), dataset, bos_prefix_id(loaded.tokenizer),
        batch_tokens=ctx.examples_batch_tokens, progress=ctx.advance,
    )
    ctx.phase("fit", len(dataset.features), "feature", 0.5)
    method = p.get("method", "needle")  # workers/probes.py METHODS
    results = probing.probe_features(acts, dataset, progress=ctx.advance, method=method)
    del acts
    features, layers, neurons = probing.result_rows(results)
    # the same probes over each trained SAE's latents, at its layer: is a feature sparser in that basis?
    device = compute_device(loaded.model)
    for sae_id in ctx.read(lambda s: [x.id for x in queries.list_saes(s, ctx.model.id)]):
        try:
            sae = saestages.stored_sae(ctx, sae_id, device)
        except (RuntimeError, NeedleError):  # not trained yet, or deleted: its jobs probe it again later
            continue
        latents = probing.collect_activations(
            loaded.model, loaded.adapter, [sae.layer], dataset, bos_prefix_id(loaded.tokenizer),
            batch_tokens=ctx.examples_batch_tokens, units=saestages.latent_units(sae),
        )
        _, sae_layers, sae_units = probing.result_rows(probing.probe_features(latents, dataset, method=method),
                                                       basis=sae_id)
        del latents
        layers += sae_layers
        neurons += sae_units
    run = {
        "specs": list(p["features"]),
        "description": dataset.description,
        "settings": {
            "context": p["context"], "tokens": p["tokens"], "corpus": p["corpus"], "rows": int(dataset.windows.shape[0]),
            "seconds": round(time.perf_counter() - started, 2), "device": str(loaded.device),
            "method": method,
        },
    }

    def write(session: Session) -> None:
        queries.replace_probes(session, ctx.model.id, run, features, layers, neurons)

    return write


def run_clamp(ctx: JobContext) -> Writer:
    """`needle index`: a clamp curve for every neuron that is a top-10 search hit for its own top
    token, with the model's default prompt (Davies 2025's validation of a decoded neuron)."""
    from workers import clamp

    loaded = ctx.load(ctx.model)
    p = ctx.params
    top = p.get("top", clamp.INDEX_TOP)

    def read(session: Session):
        return queries.clamp_candidates(session, ctx.model.id, top), queries.neuron_max_abs(session, ctx.model.id)

    candidates, max_abs = ctx.read(read)
    items = [clamp.SweepItem(layer, neuron, token_id, clamp.default_values(max_abs.get((layer, neuron)), p["count"]))
             for layer, neuron, token_id in candidates]
    ctx.set_total(max(1, sum(len(it.values) for it in items)))  # a clamped forward row each
    results = clamp.sweep_many(loaded, p["prompt"], items, last_only=p.get("positions") == "last",
                               max_rows=ctx.clamp_batch_rows, progress=ctx.advance) if items else []
    rows = [clamp.curve_row(r, p["prompt"], r["token"]) for r in results]

    def write(session: Session) -> None:
        queries.replace_index_curves(session, ctx.model.id, rows)

    return write


def run_clamp_live(ctx: JobContext) -> Writer:
    """A clamp curve asked for on a neuron page."""
    from workers import clamp

    loaded = ctx.load(ctx.model)
    p = ctx.params
    token_id, _, note = clamp.resolve_target(loaded, p["target"], p.get("token_id"))
    result = clamp.sweep(loaded, p["layer"], p["neuron"], p["prompt"], token_id, p["values"],
                         last_only=p.get("positions") == "last", units=saestages.units_for(ctx, loaded))
    result["note"] = note

    def write(session: Session) -> None:
        queries.save_clamp_result(session, p["curve"], result)

    return write


def run_generation_live(ctx: JobContext) -> Writer:
    """A clamped generation asked for on a neuron page."""
    from workers import clamp

    loaded = ctx.load(ctx.model)
    p = ctx.params
    result = clamp.generate(loaded, p["layer"], p["neuron"], p["prompt"], p["value"], tokens=p["tokens"], seed=p.get("seed"),
                            units=saestages.units_for(ctx, loaded))

    def write(session: Session) -> None:
        queries.save_generation_result(session, p["generation"], result)

    return write


STAGES: dict[str, Callable[[JobContext], Writer]] = {
    "decode": run_decode,
    "search_index": run_search_index,
    "examples": run_examples,
    EXAMPLES_RANGE_STAGE: run_examples_range,
    EXAMPLES_PART_STAGE: run_examples_part,
    "probes": run_probes,
    "clamp": run_clamp,
    queries.TEXT_STAGE: run_text,
    queries.CLAMP_STAGE: run_clamp_live,
    queries.GENERATE_STAGE: run_generation_live,
    queries.SCAN_STAGE: scan.run_scan,
    queries.COMPARE_STAGE: compare.run_compare,
    **saestages.SAE_RUNNERS,
    saestages.SAE_EXAMPLES: run_sae_examples,
    saestages.SAE_EXAMPLES_RANGE: run_examples_range,
    saestages.SAE_EXAMPLES_PART: run_examples_part,
}


def work_units(stage: str, params: dict, model: ModelSpec) -> tuple[int, str]:
    """A job's size and its unit, as known before it runs: a stage that learns its size as it
    goes (reading its corpus, say) says it again with ctx.set_total(n), in that unit."""
    if stage == "decode":
        start, stop = params["layers"]
        return (stop - start) * model.d_mlp, "neuron"
    if stage in ("examples", saestages.SAE_EXAMPLES) and "layer_ranges" in params:  # a merge, a layer at a time
        return sum(stop - start for start, stop in params["layer_ranges"]), "layer"
    if stage in ("examples", EXAMPLES_RANGE_STAGE, EXAMPLES_PART_STAGE, saestages.SAE_EXAMPLES_RANGE,
                 saestages.SAE_EXAMPLES_PART, "probes"):
        return params.get("tokens") or 0, TOKENS  # set exactly once the corpus is read
    if stage == "clamp":
        return 0, "value"  # set once the neurons to sweep are known
    if stage in (saestages.SAE_EXAMPLES, saestages.SAE_EVAL, saestages.SAE_TRAIN):
        return params.get("tokens") or 0, TOKENS  # set exactly once the corpus is read
    if stage == saestages.SAE_DECODE:
        return 0, "latent"
    if stage == queries.COMPARE_STAGE:
        return model.n_layers, "layer"
    return 1, "step"


def plan_index(
    session: Session, model: Model, *, force: bool, layers_per_job: int, max_attempts: int,
    examples_params: dict | None = None,
    probe_params: dict | None = None,
    force_probes: bool = False,
    clamp_params: dict | None = None,
) -> list:
    """Enqueue the decode shards (layer ranges), the search-index merge that waits for them and,
    with a corpus, the examples stage; with feature datasets, the probes stage (force_probes
    recomputes that one alone); with clamp_params, the clamp curves, after the search index
    and the examples (whose max activations set their ranges)."""
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
    sharded = examples_params is not None and "layer_ranges" in examples_params
    if examples_params is not None:
        plan_examples_parts(session, model, examples_params if sharded else None, force=force, max_attempts=max_attempts)
    for stage, params in (("examples", examples_params), ("probes", probe_params), ("clamp", clamp_params)):
        if params is None:
            continue
        forced = force or (force_probes and stage == "probes")
        needs = None
        if stage == "clamp":  # after the search index, and after the examples, whose max activations set its values
            needs = "search_index,examples" if examples_params is not None else "search_index"
        elif stage == "examples" and sharded:
            needs = EXAMPLES_PART_STAGE
        job = queries.enqueue_job(session, model.id, stage, "all", params, requires_stage=needs,
                                  max_attempts=max_attempts, force=forced)
        if job.state == "done" and unsharded(job.params) != unsharded(params):
            job = queries.enqueue_job(session, model.id, stage, "all", params, requires_stage=needs,
                                      max_attempts=max_attempts, force=True)
        if stage == "examples" and job.state == "queued":
            # new windows replace the old, and the latents' rows with them: their SAEs' examples run again
            for sae in queries.list_saes(session, model.id):
                plan_sae_examples(session, model.id, sae.id, sae.layer, params, max_attempts=max_attempts)
    return queries.jobs_for_model(session, model.id)


def unsharded(params: dict) -> dict:
    """A stage's params without how it is split: what its results depend on."""
    return {k: v for k, v in params.items() if k not in SHARDING_KEYS}


def examples_params_for(corpus: str, tokens: int | None, context: int, *, n_layers: int, layers_per_job: int,
                        shards: int, batch_tokens: int) -> dict:
    """The examples job's params: one pass (one layer range, one shard), or the merge of a
    sharded run over layer ranges of layers_per_job x `shards` corpus shards."""
    params: dict[str, Any] = {"corpus": corpus, "tokens": tokens, "context": context}
    ranges = [[a, min(a + layers_per_job, n_layers)] for a in range(0, n_layers, layers_per_job)]
    if shards > 1 or len(ranges) > 1:
        params.update(shards=shards, layer_ranges=ranges, batch_tokens=batch_tokens)
    return params


def plan_examples_parts(session: Session, model: Model, params: dict | None, *, force: bool, max_attempts: int) -> None:
    """Enqueue a sharded run's range and part jobs (params None: the run is not sharded), and
    drop the model's range and part jobs of any other split, with their stored parts."""
    keep: set[tuple[str, str]] = set()
    if params is not None:
        base = {k: params[k] for k in ("corpus", "tokens", "context", "batch_tokens")}
        for start, stop in params["layer_ranges"]:
            key = layers_key(start, stop)
            keep.add((EXAMPLES_RANGE_STAGE, key))
            queries.enqueue_job(session, model.id, EXAMPLES_RANGE_STAGE, key, {**base, "layers": [start, stop]},
                                max_attempts=max_attempts, force=force)
            for i in range(params["shards"]):
                key = shard_key(start, stop, i, params["shards"])
                keep.add((EXAMPLES_PART_STAGE, key))
                queries.enqueue_job(
                    session, model.id, EXAMPLES_PART_STAGE, key,
                    {**base, "layers": [start, stop], "shard": i, "shards": params["shards"]},
                    requires_stage=EXAMPLES_RANGE_STAGE, max_attempts=max_attempts, force=force,
                )
    stale = [j for j in queries.jobs_for_model(session, model.id)
             if j.stage in (EXAMPLES_RANGE_STAGE, EXAMPLES_PART_STAGE) and (j.stage, j.key) not in keep]
    for job in stale:
        session.delete(job)
    if stale or force:  # the neurons' parts (an SAE's, "sae:ID/...", go with its own plan)
        queries.delete_example_parts(session, model.id, prefix=NEURON_PARTS)
    session.flush()


def plan_sae(session: Session, model_id: int, sae_id: int, layer: int, *, train_params: dict | None,
             eval_params: dict, examples_params: dict | None, max_attempts: int) -> None:
    """Enqueue an SAE's jobs: training (when Needle trains it), then its evaluation, decodings
    and (when the model has an examples run: examples_params, that run's job params) examples."""
    key = saestages.sae_key(sae_id)
    train = saestages.SAE_TRAIN
    after_train = train if train_params is not None else None
    if train_params is not None:
        queries.enqueue_job(session, model_id, train, key, {"sae": sae_id, **train_params},
                            max_attempts=max_attempts, force=True)
    queries.enqueue_job(session, model_id, saestages.SAE_DECODE, key, {"sae": sae_id}, requires_stage=after_train,
                        max_attempts=max_attempts, force=True)
    queries.enqueue_job(session, model_id, saestages.SAE_EVAL, key, {"sae": sae_id, **eval_params},
                        requires_stage=after_train, max_attempts=max_attempts, force=True)
    probes = next((j for j in queries.jobs_for_model(session, model_id) if j.stage == "probes" and j.key == "all"), None)
    if probes is not None:  # the model's features are probed again, over this SAE's latents too
        queries.enqueue_job(session, model_id, "probes", "all", probes.params, requires_stage=train,
                            max_attempts=max_attempts, force=True)
    if examples_params is not None:
        plan_sae_examples(session, model_id, sae_id, layer, examples_params, max_attempts=max_attempts)


def plan_sae_examples(session: Session, model_id: int, sae_id: int, layer: int, examples_params: dict, *,
                      max_attempts: int) -> None:
    """Enqueue an SAE's examples over the windows of the model's examples run (examples_params:
    that run's job params): one job; or, where that run is split into corpus shards, split the
    same way: the estimate pass (sae_examples_range), a streaming pass per shard
    (sae_examples_part), then sae_examples merges them, as the neurons' run does."""
    key, prefix = saestages.sae_key(sae_id), saestages.parts_prefix(sae_id)
    base = {"sae": sae_id, **{k: examples_params.get(k) for k in ("corpus", "tokens", "context")}}
    # another SAE's training too: one stage name holds every SAE's jobs
    needs = f"examples,{saestages.SAE_TRAIN}"
    split = (saestages.SAE_EXAMPLES_RANGE, saestages.SAE_EXAMPLES_PART)
    for job in queries.jobs_for_model(session, model_id):  # an earlier split of this SAE's examples
        if job.stage in split and job.key.startswith(prefix):
            session.delete(job)
    queries.delete_example_parts(session, model_id, prefix=prefix)
    shards = examples_params.get("shards") or 1
    if shards == 1:
        queries.enqueue_job(session, model_id, saestages.SAE_EXAMPLES, key, base, requires_stage=needs,
                            max_attempts=max_attempts, force=True)
        return
    sharded = {**base, "batch_tokens": examples_params["batch_tokens"]}
    start, stop = layer, layer + 1
    queries.enqueue_job(session, model_id, saestages.SAE_EXAMPLES_RANGE, prefix + layers_key(start, stop),
                        {**sharded, "layers": [start, stop]}, requires_stage=needs, max_attempts=max_attempts,
                        force=True)
    for i in range(shards):
        queries.enqueue_job(session, model_id, saestages.SAE_EXAMPLES_PART, prefix + shard_key(start, stop, i, shards),
                            {**sharded, "layers": [start, stop], "shard": i, "shards": shards},
                            requires_stage=saestages.SAE_EXAMPLES_RANGE, max_attempts=max_attempts, force=True)
    queries.enqueue_job(session, model_id, saestages.SAE_EXAMPLES, key,
                        {**sharded, "shards": shards, "layer_ranges": [[start, stop]]},
                        requires_stage=f"{needs},{saestages.SAE_EXAMPLES_PART}", max_attempts=max_attempts, force=True)
    session.flush()
