"""One builder per page. Each returns the page's data as a plain, JSON-ready dict: the HTML
page, its .json twin and its htmx fragment all render from it.

Builders take path segments and query values as the user typed them and raise NotFound
(404) for a model, layer or neuron that does not exist, NeedleError (400) for bad input.
"""

from __future__ import annotations

import math
import random
import re
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app import baselines, clamping, compare, examples, queries, scans, urls
from app.arrays import FLOAT32, INT32, unpack
from app.bases import SITE_TEXT, Basis, neuron_basis, sae_basis
from app.errors import NeedleError, NotFound
from app.fastpage import token_texts
from app.plots import STRIP_POINTS
from app.schema import DEVICE_MAP_AUTO, Job, Model, Sae
from app.search import add_decoding_ranks, firing_units, matching_tokens, number, ranked_neurons, tokenize_query
from app.tokens import from_visible
from app.unitarrays import unpack_decoding

DIGITS = re.compile(r"[0-9]+")
MAX_DIGITS = 18  # a longer number in a path is out of range, not read
MAX_QUERY_CHARS = 200
LAYER_ROW_TOKENS = 5
DECODE_NORMS = {
    "none": "Input weights decoded as they are, as in Davies (2025): p = softmax(W_U · w_in), no final norm.",
    "final": "Input weights multiplied elementwise by the final norm's weight (Gemma: 1 + w) before the LM head: "
    "p = softmax(W_U · (γ ⊙ w_in)). The norm's centring and scaling by the input's RMS are not applied.",
}
SORT_LABELS = {
    "score": "best score first",
    "-score": "lowest score first",
    "neuron": "neuron index",
    "frequency": "most frequent first",
    "-frequency": "least frequent first",
    "max": "highest max activation first",
}


# ---------------------------------------------------------------- shared pieces


def device_text(device: str, max_memory: dict | None = None) -> str:
    """Where a model's stages run, for its page: the device, or the device map and its caps."""
    if device != DEVICE_MAP_AUTO:
        return device
    caps = ", ".join(f"{place} {size / 2**30:.3g} GiB" for place, size in (max_memory or {}).items()
                     if isinstance(size, (int, float)))
    return "a device map (auto: spread over the GPUs, CPU memory and disk" + (f"; at most {caps}" if caps else "") + ")"


def _model(session: Session, name: str) -> Model:
    # without its tokenizer JSON (megabytes for a large vocabulary), loaded if a page reads it
    if name == "-":  # /-/... is the app's own: no model is named "-"
        raise NotFound("There is no such page.", hint="The models list at / links to every model and page.")
    model = queries.get_model(session, name, tokenizer=False)
    if model is None:
        hint = "The API's schema is at /-/openapi.json." if name == "openapi" else "The models list shows the models indexed here."
        raise NotFound(f"There is no model named {_cut(name)!r}.", hint=hint)
    return model


def _cut(text: str, limit: int = 60) -> str:
    """Input echoed in an error message: at most `limit` characters of it."""
    return text if len(text) <= limit else text[:limit] + "…"


def _index(text: str, what: str, model: Model, count: int) -> int:
    """A layer or neuron number from a path segment: a non-negative integer below count."""
    if not DIGITS.fullmatch(text):
        raise NotFound(
            f"{what.capitalize()} {_cut(text)!r} is not a {what} number: {what}s are numbered 0 to {count - 1}.",
            hint=f"The {what} is a number, as in /{model.name}/0/0 (the jump box on model and layer pages takes both).",
        )
    value = int(text) if len(text) <= MAX_DIGITS else None  # int() refuses numbers of over 4,300 digits
    if value is None or value >= count:
        shown = value if value is not None else text[:MAX_DIGITS] + "…"
        raise NotFound(f"Model {model.name!r} has no {what} {shown}: its {what}s are numbered 0 to {count - 1}.")
    return value


def _token(token_id: int, text: dict[int, str], **values) -> dict:
    return {"token": text.get(int(token_id)), "token_id": int(token_id), **values}


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 1) if start and end else None


_LAYERS_KEY = re.compile(r"layers:(\d+)-(\d+)(?:/shard:(\d+)-of-(\d+))?")


def part_label(key: str) -> str:
    """A job's key as a person reads it: "layers:0-4" (a half-open range) is "layers 0–3",
    "layers:0-4/shard:1-of-2" is "layers 0–3, shard 1 of 2", "run:7" is "request 7"."""
    m = _LAYERS_KEY.fullmatch(key)
    if m:
        start, last = int(m[1]), int(m[2]) - 1
        label = f"layer {start}" if last == start else f"layers {start}–{last}"
        return label + (f", shard {m[3]} of {m[4]}" if m[3] else "")
    if key.startswith("run:") and key[4:].isdigit():
        return f"request {key[4:]}"
    return key


def _job(job: Job) -> dict:
    return {
        "stage": job.stage,
        "key": job.key,
        "part": part_label(job.key),
        "state": job.state,
        "progress": number(job.progress or 0.0),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "error": job.error,
        "started_at": queries.utc_text(job.started_at),
        "finished_at": queries.utc_text(job.finished_at),
        "seconds": _seconds(job.started_at, job.finished_at) if job.state == "done" else None,
        "eta_seconds": _eta(job),
    }


def _eta(job: Job) -> float | None:
    """Seconds left for a running job, from its progress at its last heartbeat, which wrote it
    (None when it cannot tell yet): counted down between heartbeats, not up."""
    if job.state != "running" or not job.started_at or not job.progress or job.progress <= 0:
        return None
    beat = job.heartbeat_at or job.started_at
    elapsed = max((beat - job.started_at).total_seconds(), 0)
    since = max((queries.utcnow() - beat).total_seconds(), 0)
    return round(max(elapsed * (1 - job.progress) / job.progress - since, 0), 1)


def _stage_state(states: set[str]) -> str:
    for state in ("failed", "running", "queued"):
        if state in states:
            return state
    return "done"


def _stages(jobs: list[Job]) -> list[dict]:
    """Per stage: overall state, jobs done, the time taken (first start to last finish) and,
    while unfinished, what is left of it (_left)."""
    by_stage: dict[str, list[Job]] = {}
    for job in jobs:
        by_stage.setdefault(job.stage, []).append(job)
    schedule = _schedule(jobs)
    out = []
    for stage, group in by_stage.items():
        state = _stage_state({j.state for j in group})
        starts = [j.started_at for j in group if j.started_at]
        ends = [j.finished_at for j in group if j.finished_at]
        out.append(
            {
                "stage": stage,
                "state": state,
                "jobs": len(group),
                "done": sum(j.state == "done" for j in group),
                "started_at": queries.utc_text(min(starts, default=None)),
                "finished_at": queries.utc_text(max(ends, default=None)) if state == "done" else None,
                "seconds": _seconds(min(starts, default=None), max(ends, default=None)) if state == "done" else None,
                **_left(group, state, schedule),
            }
        )
    return out


def _schedule(jobs: list[Job]) -> dict[int, dict]:
    """Per unfinished job: seconds until it starts and until it is done (None where not known),
    and the job ahead of it, as one worker takes a model's jobs: the running ones first, from
    their progress so far (_eta), then the queued ones in the order workers claim them. A
    queued job's length is only known once it runs, so the ones behind it have no times yet."""
    running = [j for j in jobs if j.state == "running"]
    out: dict[int, dict] = {}
    for job in running:
        out[job.id] = {"starts_in": 0.0, "done_in": _eta(job), "after": None}
    etas = [out[j.id]["done_in"] for j in running]
    clock = min(etas) if running and None not in etas else None  # no job running: no worker to say when
    ahead = running[-1] if running else None
    for job in (j for j in jobs if j.state == "queued"):  # jobs_for_model: in id order, as claimed
        out[job.id] = {"starts_in": clock, "done_in": None, "after": ahead.stage if ahead else None}
        clock, ahead = None, job
    return out


def _about(seconds: float) -> str:
    if seconds < 5:
        return "a few seconds"
    return f"about {math.ceil(seconds)} s" if seconds < 60 else f"about {round(seconds / 60)} min"


def _left(group: list[Job], state: str, schedule: dict[int, dict]) -> dict:
    """What is left of one stage (its jobs, `group`): seconds until it is done and until it
    starts (None where not known), and the same in words, e.g. "running, 35% done, about 2 min
    left" or "queued, starts in about 40 s"; all None once it is done."""
    if state == "done":
        return {"left": None, "eta_seconds": None, "starts_in_seconds": None}
    if state == "failed":
        error = next((j.error for j in group if j.state == "failed" and j.error), None)
        return {"left": "failed" + (f": {error}" if error else ""), "eta_seconds": None, "starts_in_seconds": None}
    unfinished = [schedule[j.id] for j in group if j.id in schedule]
    done_in = [u["done_in"] for u in unfinished]
    eta = max(done_in) if done_in and None not in done_in else None
    starts_in = unfinished[0]["starts_in"] if unfinished else None
    if state == "running":
        progress = sum(1.0 if j.state == "done" else j.progress or 0.0 for j in group) / len(group)
        words = f"running, {100 * progress:.0f}% done" + (f", {_about(eta)} left" if eta is not None else "")
    elif starts_in is not None:
        words = f"queued, starts in {_about(starts_in)}"
    else:
        after = unfinished[0]["after"] if unfinished else None
        words = "queued" + (f", after {after}" if after else "")
    return {"left": words, "eta_seconds": eta, "starts_in_seconds": starts_in}


# The evidence a neuron page shows that a later stage computes: its field, the stage, and its name in words.
EVIDENCE = (("examples", "examples", "Activation examples"), ("features", "probes", "Sparse probes"),
            ("clamp_curves", "clamp", "Precomputed clamp curves"))


# ... and an SAE's latent page
SAE_EVIDENCE = (("examples", "sae_examples", "Activation examples"),)


def _pending(stages: list[dict], evidence: tuple = EVIDENCE) -> dict:
    """Evidence not computed yet, by the field of the neuron page it fills ("examples",
    "features", "clamp_curves"): its stage's state and what is left of it, and a line that says so.
    Evidence whose stage is done, or was never queued (a model indexed without a corpus), is not here."""
    by_stage = {s["stage"]: s for s in stages}
    out = {}
    for field, stage, label in evidence:
        s = by_stage.get(stage)
        if s is None or s["state"] == "done":
            continue
        failed = s["state"] == "failed"
        message = (f"{label} could not be computed: the {stage} stage {s['left']}." if failed
                   else f"{label} not computed yet: {s['left']}.")
        out[field] = {"stage": stage, "state": s["state"], "left": s["left"], "eta_seconds": s["eta_seconds"],
                      "starts_in_seconds": s["starts_in_seconds"], "message": message}
    return out


def _status(jobs: dict[str, int], stored: int) -> str:
    if jobs.get("failed"):
        return "failed"
    if jobs.get("running") or jobs.get("queued"):
        return "indexing"
    return "ready" if stored else "empty"


# ---------------------------------------------------------------- pages


def models_page(session: Session) -> dict:
    stored = queries.neuron_counts_by_model(session)
    jobs = queries.job_states_by_model(session)
    return {
        "url": urls.models_url(),
        "json_url": urls.models_url(fmt=urls.JSON),
        "models": [
            {
                "name": m.name,
                "url": urls.model_url(m.name),
                "json_url": urls.model_url(m.name, fmt=urls.JSON),
                "source": m.source,
                "family": m.family,
                "architecture": m.architecture,
                "n_layers": m.n_layers,
                "d_mlp": m.d_mlp,
                "neurons": m.n_layers * m.d_mlp,
                "neurons_stored": stored.get(m.id, 0),
                "jobs": jobs.get(m.id, {}),
                "status": _status(jobs.get(m.id, {}), stored.get(m.id, 0)),
            }
            for m in queries.list_models(session)
        ],
    }


def model_page(session: Session, name: str) -> dict:
    model = _model(session, name)
    summaries = {s["layer"]: s for s in queries.layer_summaries(session, model.id)}
    rule = examples.firing_rule(model)
    firing = queries.activation_layer_summaries(session, model.id, relative=rule.relative)
    jobs = queries.jobs_for_model(session, model.id)
    stages = _stages(jobs)
    layers: list[dict[str, Any]] = []
    for layer in range(model.n_layers):
        summary = summaries.get(layer, {})
        fired = firing.get(layer)
        layers.append(
            {
                "layer": layer,
                "url": urls.layer_url(model.name, layer),
                "neurons": summary.get("neurons", 0),
                "max_score": number(summary["max_score"]) if summary else None,
                "mean_score": number(summary["mean_score"]) if summary else None,
                # neurons that never fired (activation > 0) on the examples corpus; None before that stage ran
                "dead": fired["dead"] if fired else None,
                "mean_frequency": number(fired["mean_frequency"]) if fired and fired["mean_frequency"] is not None else None,
            }
        )
    return {
        "model": model.name,
        "url": urls.model_url(model.name),
        "json_url": urls.model_url(model.name, fmt=urls.JSON),
        "source": model.source,
        "family": model.family,
        "architecture": model.architecture,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "d_mlp": model.d_mlp,
        "vocab_size": model.vocab_size,
        "device": model.device,
        "device_text": device_text(model.device, (model.info or {}).get("max_memory")),
        "dtype": model.dtype,
        "decode_norm": model.decode_norm,
        "decode_norm_text": DECODE_NORMS.get(model.decode_norm, model.decode_norm),
        "has_tokenizer": bool(model.tokenizer_json),
        "info": model.info or {},
        "created_at": queries.utc_text(model.created_at),
        "updated_at": queries.utc_text(model.updated_at),
        "neurons": model.n_layers * model.d_mlp,
        "neurons_stored": sum(layer["neurons"] for layer in layers),
        "layers": layers,
        # layers with no activation rows yet have no dead count
        "dead_neurons": sum(layer["dead"] or 0 for layer in layers) if firing else None,
        # what "fires" and "dead" mean for this model's activation function (app/examples.firing_rule)
        "firing_rule": rule.text,
        "dead_rule": rule.dead_text,
        "examples_run": examples.run_info(queries.example_run(session, model.id)),
        "stages": stages,
        "stages_done": [s["stage"] for s in stages if s["state"] == "done"],
        "stages_left": [s["stage"] for s in stages if s["state"] != "done"],
        "pending": _pending(stages),
        "jobs": [_job(j) for j in jobs],
        "jobs_pending": any(j.state in ("queued", "running") for j in jobs),
        "saes": [_sae_summary(model, x) for x in queries.list_saes(session, model.id)],
        "saes_url": urls.saes_url(model.name),
        "scan_url": urls.scan_form_url(model.name),
        "compare_with": [{"model": other, "url": urls.compare_url(model.name, other)}
                         for other in queries.model_names(session) if other != model.name],
    }


def _page_number(page: str | None) -> int:
    if page is None:
        return 1
    if DIGITS.fullmatch(page) and len(page) <= 9 and int(page) >= 1:  # a 5,000-digit page is no number
        return int(page)
    raise NeedleError(f"Page {page[:MAX_QUERY_CHARS]!r} is not a page number: pages are numbered from 1.")


def _units_list(session: Session, model: Model, basis: Basis, layer: int, *, page: str | None, sort: str | None,
                page_size: int, page_url) -> dict:
    """A page of one layer's units of a basis (a layer's neurons, an SAE's latents), sorted:
    what the layer page and the SAE page list. page_url(n, sort, fmt) is the list's own address."""
    sort = sort or urls.DEFAULT_LAYER_SORT
    if sort not in SORT_LABELS:
        raise NeedleError(f"Unknown sort {_cut(sort)!r}: use one of {', '.join(SORT_LABELS)}.")
    rule = examples.firing_rule(model, latents=not basis.is_neurons)
    # by frequency as the rule counts it: a SiLU or GELU model's neurons by the share above 1/5 of their max
    stored_sort = sort.replace("frequency", "frequency_above") if rule.relative and "frequency" in sort else sort
    page_number = _page_number(page)
    summary = queries.layer_summary(session, model.id, layer, basis.id)
    pages = max(1, math.ceil(summary["neurons"] / page_size))
    if page_number > pages:
        where = f"layer {layer}" if basis.is_neurons else f"SAE {basis.sae!r}"
        raise NeedleError(f"Page {page_number} is out of range: {where} has {pages} page(s) of {basis.unit}s.")

    pairs = queries.layer_neurons(session, model.id, layer, stored_sort, (page_number - 1) * page_size, page_size,
                                  basis.id)
    rows = [n for n, _ in pairs]
    stats = {n.neuron: a for n, a in pairs}
    decodings = {row.neuron: unpack_decoding(row) for row in rows}
    top_ids = {n: d["in_ids"][:LAYER_ROW_TOKENS] for n, d in decodings.items()}
    top_scores = {n: d["in_scores"][:LAYER_ROW_TOKENS] for n, d in decodings.items()}
    text = queries.tokens_by_ids(
        session, model.id, [t for ids in top_ids.values() for t in ids] + [r.top_token_id for r in rows]
    )
    return {
        "url": page_url(page_number),
        "json_url": page_url(page_number, fmt=urls.JSON),
        "sort": sort,
        "sorts": [
            {"sort": s, "label": label.replace("neuron", basis.unit), "url": page_url(1, s), "current": s == sort}
            for s, label in SORT_LABELS.items()
        ],
        "page": page_number,
        "pages": pages,
        "page_size": page_size,
        f"{basis.unit}s_stored": summary["neurons"],
        "has_activations": any(a is not None for a in stats.values()),
        "firing_rule": rule.text,
        "max_score": number(summary["max_score"]) if summary["max_score"] is not None else None,
        "prev_page_url": page_url(page_number - 1 if page_number > 1 else None),
        "next_page_url": page_url(page_number + 1 if page_number < pages else None),
        f"{basis.unit}s": [
            {
                basis.unit: row.neuron,
                "url": urls.neuron_url(model.name, layer, row.neuron, sae=basis.sae),
                "top_token": _token(row.top_token_id, text),
                "top_score": number(row.top_score),
                "top_prob": number(row.top_prob),
                "frequency": number(rule.frequency(stat)) if (stat := stats[row.neuron]) is not None else None,
                "max_activation": number(stat.max_act) if stat is not None else None,
                "tokens": [
                    _token(t, text, score=number(s)) for t, s in zip(top_ids[row.neuron], top_scores[row.neuron])
                ],
            }
            for row in rows
        ],
    }


def layer_page(
    session: Session, name: str, layer_text: str, *, page: str | None, sort: str | None, page_size: int
) -> dict:
    model = _model(session, name)
    layer = _index(layer_text, "layer", model, model.n_layers)

    def page_url(n: int | None, s: str | None = None, fmt: str | None = None) -> str | None:
        return None if n is None else urls.layer_url(model.name, layer, page=n, sort=s or sort or urls.DEFAULT_LAYER_SORT,
                                                     fmt=fmt)

    return {
        "model": model.name,
        "layer": layer,
        "n_layers": model.n_layers,
        "d_mlp": model.d_mlp,
        **_units_list(session, model, neuron_basis(model.d_mlp), layer, page=page, sort=sort, page_size=page_size,
                      page_url=page_url),
        "prev_layer_url": urls.layer_url(model.name, layer - 1) if layer > 0 else None,
        "next_layer_url": urls.layer_url(model.name, layer + 1) if layer + 1 < model.n_layers else None,
        "saes": [_sae_summary(model, x) for x in queries.list_saes(session, model.id) if x.layer == layer],
        "experts": _layer_experts(session, model, layer),
    }


def _layer_experts(session: Session, model: Model, layer: int) -> list[dict] | None:
    """A mixture of experts' layer: each expert's neurons and its share of the corpus's tokens
    (None for a dense MLP; shares None before the examples stage)."""
    stored = _expert(model, 0, None, None)  # the stored experts, checked
    if stored is None:
        return None
    width = stored["width"]
    run = queries.example_run(session, model.id)
    routed = queries.expert_tokens(session, model.id, layer, width) if run is not None else {}
    return [
        {
            "expert": e,
            "first": e * width,
            "url": urls.neuron_url(model.name, layer, e * width),
            "routed_tokens": routed.get(e),
            "routed_share": number(routed[e] / run.n_tokens) if e in routed and run and run.n_tokens else None,
        }
        for e in range(model.d_mlp // width)
    ]


# ---------------------------------------------------------------- sparse autoencoders

DENSE_FREQUENCY = 0.1  # a latent that fires on more than 10% of tokens is dense
DENSITY_BINS = (-8, 0, 0.5)  # log10 firing frequency from 1e-8 to 1, in half-decades; "dead" apart


def _site_text(site: str, layer: int) -> str:
    return SITE_TEXT.get(site, site).replace("blocks.L.", f"blocks.{layer}.")


TRAINING_FIGURES = (  # what an SAE page says of its training, in this order (the JSON has all it stored)
    ("corpus_description", "corpus"), ("corpus_tokens", "corpus tokens"), ("epochs", "epochs"),
    ("steps", "steps"), ("batch_size", "batch size"), ("lr", "learning rate"), ("seed", "seed"),
    ("k", "k"), ("dead_latents", "dead latents at the end"), ("explained_variance", "variance explained (last steps)"),
    ("seconds", "seconds"), ("activations_per_second", "activations per second"), ("device", "device"),
)


def _training_facts(training) -> list[dict]:
    if not isinstance(training, dict):
        return []
    out = []
    for key, label in TRAINING_FIGURES:
        value = training.get(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        if value is not None:
            out.append({"label": label, "value": str(value)})
    return out


def _sae(session: Session, model: Model, name: str) -> Sae:
    row = queries.get_sae(session, model.id, name)
    if row is None:
        names = [x.name for x in queries.list_saes(session, model.id)]
        raise NotFound(f"Model {model.name!r} has no SAE named {_cut(name)!r}.",
                       hint=f"Its SAEs: {', '.join(names)}." if names else
                       f"Train one: needle sae train {model.name} --layer L (or import one with needle sae import).")
    return row


def _sae_summary(model: Model, row: Sae) -> dict:
    quality = _quality(row.quality) or {}
    return {
        "name": row.name, "url": urls.sae_url(model.name, row.name), "json_url": urls.sae_url(model.name, row.name, fmt=urls.JSON),
        "layer": row.layer, "site": row.site, "architecture": row.architecture, "d_in": row.d_in, "d_sae": row.d_sae,
        "source": row.source,
        "l0": number(quality["l0"]) if quality.get("l0") is not None else None,
        "variance_explained": number(quality["variance_explained"]) if quality.get("variance_explained") is not None else None,
        "ce_recovered": number(quality["ce_recovered"]) if quality.get("ce_recovered") is not None else None,
    }


QUALITY_FIGURES = ("tokens", "l0", "variance_explained", "mse", "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_recovered")


def _quality(stored) -> dict | None:
    """An SAE's stored quality figures, each a finite number or None (a stored row that is not
    must not take its page down)."""
    if not isinstance(stored, dict):
        return None
    return {k: number(v) if isinstance(v, (int, float)) and math.isfinite(v) else None for k in QUALITY_FIGURES
            for v in [stored.get(k)]}


def saes_page(session: Session, name: str) -> dict:
    model = _model(session, name)
    return {"model": model.name, "url": urls.saes_url(model.name), "json_url": urls.saes_url(model.name, fmt=urls.JSON),
            "saes": [_sae_summary(model, x) for x in queries.list_saes(session, model.id)],
            "pending": _pending(_stages(queries.jobs_for_model(session, model.id)))}


def _density(frequencies: list[float]) -> dict:
    """The latents' firing frequencies on the examples corpus: dead (never fired) and dense (over
    DENSE_FREQUENCY) shares, and the histogram of log10 frequency of the rest."""
    freq = [f for f in frequencies if f is not None and math.isfinite(f)]
    dead = sum(1 for f in freq if f <= 0)
    lo, hi, step = DENSITY_BINS
    edges = [lo + i * step for i in range(int((hi - lo) / step) + 1)]
    counts = [0] * (len(edges) - 1)
    for f in freq:
        if f > 0:
            at = min(len(counts) - 1, max(0, int((math.log10(f) - lo) // step)))
            counts[at] += 1
    n = max(len(freq), 1)
    fired = [i for i, c in enumerate(counts) if c]  # the bins from the first to the last that holds a latent
    if fired:
        edges, counts = edges[fired[0] : fired[-1] + 2], counts[fired[0] : fired[-1] + 1]
    return {
        "latents": len(freq),
        "dead": dead, "dead_share": dead / n if freq else None,
        "dense": sum(1 for f in freq if f > DENSE_FREQUENCY),
        "dense_share": sum(1 for f in freq if f > DENSE_FREQUENCY) / n if freq else None,
        "dense_above": DENSE_FREQUENCY,
        "log10_edges": edges, "counts": counts,
    }


def sae_page(session: Session, name: str, sae_name: str, *, page: str | None, sort: str | None, page_size: int) -> dict:
    model = _model(session, name)
    row = _sae(session, model, sae_name)
    basis = sae_basis(row)

    def page_url(n: int | None, s: str | None = None, fmt: str | None = None) -> str | None:
        return None if n is None else urls.sae_url(model.name, row.name, page=n, sort=s or sort or urls.DEFAULT_LAYER_SORT,
                                                   fmt=fmt)

    stages = _stages(_sae_jobs(queries.jobs_for_model(session, model.id), row.id))
    return {
        "model": model.name,
        "sae": row.name,
        "layer": row.layer,
        "site": row.site,
        "site_text": _site_text(row.site, row.layer),
        "input_side": _input_side(row.site),
        "architecture": row.architecture,
        "d_in": row.d_in,
        "d_sae": row.d_sae,
        "source": row.source,
        "k": (row.cfg or {}).get("k") if isinstance(row.cfg, dict) else None,
        "cfg": row.cfg,
        "training": row.training if isinstance(row.training, dict) else None,
        "_training_facts": _training_facts(row.training),
        "quality": _quality(row.quality),
        "density": _density(queries.unit_frequencies(session, model.id, basis.id)),
        "n_layers": model.n_layers,
        "random_url": urls.random_latent_url(model.name, row.name),
        "stages": stages,
        "pending": _pending(stages, SAE_EVIDENCE),
        **_units_list(session, model, basis, row.layer, page=page, sort=sort, page_size=page_size, page_url=page_url),
    }


def neuron_page(session: Session, name: str, layer_text: str, neuron_text: str, *, text_max_chars: int = 2000,
                live: bool = True, clamp_prompt_max_chars: int = 2000, base_url: str = "", arrays: bool = True) -> dict:
    """base_url: the site's public address, for the absolute "permalink" (copy button, Open Graph).
    arrays: the examples' per-token lists, for the JSON twin and the embed card (the page itself
    draws its contexts from the stored arrays: examples.neuron_activations)."""
    model = _model(session, name)
    layer = _index(layer_text, "layer", model, model.n_layers)
    index = _index(neuron_text, "neuron", model, model.d_mlp)
    return _unit_page(session, model, neuron_basis(model.d_mlp), layer, index, text_max_chars=text_max_chars,
                      live=live, clamp_prompt_max_chars=clamp_prompt_max_chars, base_url=base_url, arrays=arrays)


def latent_page(session: Session, name: str, sae_name: str, latent_text: str, *, text_max_chars: int = 2000,
                live: bool = True, clamp_prompt_max_chars: int = 2000, base_url: str = "", arrays: bool = True) -> dict:
    """A latent of an SAE: the neuron page's evidence, where it applies, and the SAE it belongs to."""
    model = _model(session, name)
    row = _sae(session, model, sae_name)
    index = _index(latent_text, "latent", model, row.d_sae)
    data = _unit_page(session, model, sae_basis(row), row.layer, index, text_max_chars=text_max_chars, live=live,
                      clamp_prompt_max_chars=clamp_prompt_max_chars, base_url=base_url, arrays=arrays)
    data.update(sae=row.name, latent=index, site=row.site, site_text=_site_text(row.site, row.layer),
                architecture=row.architecture, d_sae=row.d_sae, sae_url=urls.sae_url(model.name, row.name),
                input_side=_input_side(row.site))
    return data


def _sae_jobs(jobs: list, sae_id: int) -> list:
    """An SAE's jobs among a model's: keyed "sae:ID", its sharded examples' "sae:ID/..."."""
    key = f"sae:{sae_id}"
    return [j for j in jobs if j.key == key or j.key.startswith(key + "/")]


def _input_side(site: str) -> str:
    """Which of a latent's directions its input-side decoding reads through W_U: the encoder's
    where that lives in the residual stream; an mlp-site SAE's decoder, mapped there by W_out."""
    return "decoder" if site == "mlp" else "encoder"


def _links(session: Session, model: Model, basis: Basis, layer: int, index: int) -> list[dict]:
    """Superposition made visible: for a latent of an mlp-site SAE, the neurons its decoder
    direction weighs most on; for a neuron, per SAE on its layer's neurons, the latents whose
    decoder directions weigh most on it. Signed weights, largest |weight| first."""
    rows = queries.unit_links(session, model.id, layer, index, basis.id)
    if not rows:
        return []
    names = {x.id: x.name for x in queries.list_saes(session, model.id)}
    out = []
    for row in rows:
        sae = None if row.other == queries.NEURONS else names.get(row.other)
        if row.other != queries.NEURONS and sae is None:
            continue
        kind = "neuron" if sae is None else "latent"
        ids, weights = unpack(row.ids, INT32).tolist(), unpack(row.weights, FLOAT32).tolist()
        out.append({"kind": kind, "sae": sae, "units": [
            {kind: i, "layer": layer, "weight": number(w), "url": urls.neuron_url(model.name, layer, i, sae=sae)}
            for i, w in zip(ids, weights)]})
    return out


def _expert(model: Model, neuron: int, stats: dict | None, run: dict | None) -> dict | None:
    """A mixture of experts' neuron N: neuron N % F of expert N // F (F the experts' width), with
    the share of the corpus's tokens routed to its expert (None before the examples stage)."""
    experts = (model.info or {}).get("experts")
    if not isinstance(experts, dict):
        return None
    width = experts.get("width")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    routed = stats["tokens"] if stats else None
    total = run["tokens"] if run else None
    return {
        "expert": neuron // width,
        "index": neuron % width,
        "experts": experts.get("count"),
        "width": width,
        "per_token": experts.get("per_token"),
        "routed_tokens": routed,
        "routed_share": number(routed / total) if routed is not None and total else None,
        "note": "Its evidence (examples, statistics, histogram) counts only the tokens routed to its expert; "
                "a clamp sets it on those tokens, where the expert runs, weighted by the router as the "
                "expert's whole output is. Its per-token activations show 0 where the expert did not run.",
    }


def _unit_page(session: Session, model: Model, basis: Basis, layer: int, index: int, *, text_max_chars: int,
               live: bool, clamp_prompt_max_chars: int, base_url: str, arrays: bool) -> dict:
    """What a unit's page shows, for a neuron or a latent (basis)."""
    row, activations, run_row, previous, following = queries.neuron_page_rows(session, model.id, layer, index, basis.id)
    jobs = queries.jobs_for_model(session, model.id)
    if basis.is_neurons:
        stages = _stages(jobs)
        pending = _pending(stages)
        decode_stage = "decode"
    else:
        stages = _stages(_sae_jobs(jobs, basis.id))
        pending = _pending(stages, SAE_EVIDENCE)
        decode_stage = "sae_decode"
    unit = basis.unit
    if row is None:
        decode = next((s for s in stages if s["stage"] == decode_stage and s["state"] != "done"), None)
        what = f"Neuron {index} of layer {layer}" if basis.is_neurons else f"Latent {index} of SAE {basis.sae!r}"
        raise NotFound(
            f"{what} of {model.name!r} has not been decoded yet"
            + (f": {decode_stage} {decode['left']}." if decode else "."),
            hint="The model page shows the indexing jobs and their progress.",
        )
    dec = unpack_decoding(row)
    text = token_texts(session, model)  # the vocabulary, held in memory (app/fastpage.py)
    unit_features = queries.features_of_neuron(session, model.id, layer, index, basis.id)
    feature_counts = {f.name: f.counts for f in queries.list_features(session, model.id)} if unit_features else {}
    run = examples.run_info(run_row)
    firing = examples.neuron_activations(session, model, activations if run_row else None,
                                         run_row.context if run_row else 0, arrays=arrays, latents=not basis.is_neurons)

    def link(pos: tuple[int, int] | None) -> dict | None:
        if pos is None:
            return None
        return {"layer": pos[0], unit: pos[1], "url": urls.neuron_url(model.name, *pos, sae=basis.sae)}

    expert = _expert(model, index, firing["stats"], run) if basis.is_neurons else None

    return {
        "model": model.name,
        "unit": unit,
        "layer": layer,
        unit: index,
        # for the templates only (json_response drops "_" keys): every block, rendered alone or not, sees them
        "_latent_page": not basis.is_neurons,
        "_index": index,
        "_name": f"neuron {index}" if basis.is_neurons else f"SAE {basis.sae} latent {index}",
        "url": urls.neuron_url(model.name, layer, index, sae=basis.sae),
        "json_url": urls.neuron_url(model.name, layer, index, fmt=urls.JSON, sae=basis.sae),
        "permalink": urls.absolute_url(base_url, urls.neuron_url(model.name, layer, index, sae=basis.sae)),
        "embed_card_url": urls.embed_url(model.name, layer, index, sae=basis.sae),
        "random_url": urls.random_neuron_url(model.name) if basis.sae is None else urls.random_latent_url(model.name, basis.sae),
        "n_layers": model.n_layers,
        "d_mlp": model.d_mlp,
        "decode_norm": model.decode_norm,
        "decode_norm_text": DECODE_NORMS.get(model.decode_norm, model.decode_norm),
        "top_token": _token(row.top_token_id, text),
        "top_prob": number(row.top_prob),
        "top_score": number(row.top_score),
        "mean_top100": number(row.mean_top100),
        # the baseline a decoding's probabilities read against: a flat decoding gives every token 1/V
        "uniform_prob": number(1 / model.vocab_size) if model.vocab_size else None,
        "top_prob_over_uniform": number(row.top_prob * model.vocab_size) if model.vocab_size else None,
        # how peaked the whole decoding is: its entropy in bits against a flat one's, log2 V
        "entropy_bits": number(row.entropy / math.log(2)) if row.entropy is not None and math.isfinite(row.entropy) else None,
        "max_entropy_bits": number(math.log2(model.vocab_size)) if model.vocab_size else None,
        "input_tokens": [
            _token(t, text, prob=number(p), score=number(s))
            for t, p, s in zip(dec["in_ids"], dec["in_probs"], dec["in_scores"])
        ],
        "output_tokens": {
            "promoted": [
                _token(t, text, logit=number(v)) for t, v in zip(dec["out_pos_ids"], dec["out_pos_logits"])
            ],
            "suppressed": [
                _token(t, text, logit=number(v)) for t, v in zip(dec["out_neg_ids"], dec["out_neg_logits"])
            ],
        },
        "previous": link(previous),
        "next": link(following),
        # a mixture of experts' neuron: its expert, how often the router picks it, what its evidence counts
        "expert": expert,
        **firing,
        "examples_run": run,
        # the examples, features and clamp curves whose stage has not finished, each with a line that says so
        "pending": pending,
        "colour_scale": examples.colour_scale(stats["max"], stats["min"]) if (stats := firing["stats"]) else None,
        "features": [
            {
                "feature": f.feature,
                "url": urls.feature_url(model.name, f.feature),
                "rank": f.rank + 1,
                "mean_dif": number(f.mean_dif),
                "f1": number(f.f1),
                "precision": number(f.precision),
                "recall": number(f.recall),
                "chance_f1": _chance_f1(feature_counts.get(f.feature)),
                "f1_interval": _f1_interval(feature_counts.get(f.feature), f.precision, f.recall),
            }
            for f in unit_features
        ],
        "links": _links(session, model, basis, layer, index),
        "text_form_url": urls.text_form_url(model.name, layer, index, sae=basis.sae),
        "text_max_chars": text_max_chars,
        **clamping.neuron_section(
            session, model, layer, index, text.get(row.top_token_id), activations,
            live=live, prompt_max_chars=clamp_prompt_max_chars, basis=basis, top_prompt=firing["_top_prompt"],
        ),
    }


def random_neuron_target(session: Session, name: str, fmt: str | None = None, rng: random.Random | None = None) -> str:
    """Where /{model}/random sends the browser: a random decoded neuron's permalink."""
    model = _model(session, name)
    pick = queries.random_neuron(session, model.id, rng)
    if pick is None:
        raise NotFound(f"Model {model.name!r} has no decoded neurons yet.", hint="Its model page shows the jobs.")
    return urls.neuron_url(model.name, *pick, fmt=fmt)


def random_latent_target(session: Session, name: str, sae_name: str, fmt: str | None = None,
                         rng: random.Random | None = None) -> str:
    """Where /{model}/sae/{sae}/random sends the browser: a random decoded latent's permalink."""
    model = _model(session, name)
    row = _sae(session, model, sae_name)
    pick = queries.random_neuron(session, model.id, rng, basis=row.id)
    if pick is None:
        raise NotFound(f"SAE {row.name!r} has no decoded latents yet.", hint="Its page shows its jobs.")
    return urls.neuron_url(model.name, *pick, fmt=fmt, sae=row.name)


def jump_target(session: Session, name: str, layer_text: str | None, neuron_text: str | None) -> str:
    """Where the jump box (GET /{model}/jump?layer=L&neuron=N) sends the browser: the neuron's
    permalink, or with no neuron number the layer's page. A missing or malformed number is a 400,
    one out of range a 404, each naming the valid range."""
    model = _model(session, name)
    ranges = f"layers are numbered 0 to {model.n_layers - 1} and neurons 0 to {model.d_mlp - 1}"
    numbers: list[int] = []
    for text, what, count in ((layer_text, "layer", model.n_layers), (neuron_text, "neuron", model.d_mlp)):
        text = (text or "").strip()
        if not text and what == "neuron":
            return urls.layer_url(model.name, numbers[0])
        if not text:
            raise NeedleError(f"Give a {what} number to jump to: in {model.name!r}, {ranges}.")
        if not DIGITS.fullmatch(text):
            raise NeedleError(f"{what.capitalize()} {text[:MAX_QUERY_CHARS]!r} is not a {what} number: "
                              f"in {model.name!r}, {ranges}.")
        numbers.append(_index(text, what, model, count))
    return urls.neuron_url(model.name, numbers[0], numbers[1])


def search_page(session: Session, name: str, token: str | None) -> dict:
    model = _model(session, name)
    if not token:
        raise NeedleError(
            "Give a token to search for, for example ?token=dog.",
            hint="Search finds the neurons whose input weights decode most strongly to one token.",
        )
    if len(token) > MAX_QUERY_CHARS:
        raise NeedleError(f"The search query is {len(token)} characters long; the limit is {MAX_QUERY_CHARS}.")

    matches = matching_tokens(session, model.id, token)
    meant = from_visible(token)  # a chip copied from a page: "␣dog" is " dog", "↵" a newline
    if not matches and meant != token:
        matches = matching_tokens(session, model.id, meant)
    method = "token"
    tokenized: list[dict] | None = None
    ids = [m.token_id for m in matches]
    text = {m.token_id: m.token for m in matches}
    if not matches:
        pieces = tokenize_query(model, meant)
        if pieces:
            method = "tokenized"
            ids = list(dict.fromkeys(pieces))
            text = queries.tokens_by_ids(session, model.id, ids)
            tokenized = [_token(t, text) for t in pieces]

    index_rows = queries.token_index_rows(session, model.id, ids) if ids else {}
    results = ranked_neurons(model.name, index_rows, text)
    neuron_ids = queries.units_in_ids(session, model.id, [(r["layer"], r["neuron"]) for r in results])
    add_decoding_ranks(results, neuron_ids)
    latents: list[dict] = []
    saes = {x.id: x.name for x in queries.list_saes(session, model.id)}
    if ids and saes:
        by_basis: dict[int, dict[int, Any]] = {}
        for row in queries.token_index_rows_of_bases(session, model.id, ids):
            if row.basis in saes:
                by_basis.setdefault(row.basis, {})[row.token_id] = row
        for basis, rows in by_basis.items():
            found = ranked_neurons(model.name, rows, text, sae=saes[basis])
            add_decoding_ranks(found, queries.units_in_ids(session, model.id, [(r["layer"], r["latent"]) for r in found],
                                                           basis=basis))
            latents.extend(found)
        latents.sort(key=lambda r: (-(r["score"] or 0.0), r["sae"], r["latent"]))
    run = queries.example_run(session, model.id)
    data: dict[str, Any] = {
        "model": model.name,
        "query": token,
        "url": urls.search_url(model.name, token),
        "json_url": urls.search_url(model.name, token, fmt=urls.JSON),
        "method": method,
        "matches": [_token(t, text) for t in ids],
        "index_ready": bool(index_rows) or queries.has_token_index(session, model.id),
        "results": results,
        # the latents of the model's SAEs, found the same way (an mlp-site SAE's by its decoder direction)
        "latents": latents,
        # search by what fires: the units whose top contexts peak on the token (app/search.firing_units)
        "firing": firing_units(model.name, queries.firing_index_rows(session, model.id, ids), text, saes) if ids else [],
        "firing_ready": run is not None,
        "top_k": (run.settings or {}).get("top_k") if run is not None else None,
        # the score-by-layer strip (Davies 2025, Figure 2): the best results, x = layer, y = score
        "score_strip": {
            "n_layers": model.n_layers,
            "points": [{k: r[k] for k in ("layer", "neuron", "score", "url")} for r in results[:STRIP_POINTS]],
        },
    }
    if tokenized is not None:
        data["tokenized"] = tokenized
        data["groups"] = []
        for t in ids:
            own_rows = {t: index_rows[t]} if t in index_rows else {}
            group = ranked_neurons(model.name, own_rows, text)
            add_decoding_ranks(group, neuron_ids)  # a group's units are among the results
            data["groups"].append({**_token(t, text), "results": group})
    return data


# ---------------------------------------------------------------- a user's own text


def _text_target(session: Session, name: str, layer_text: str, neuron_text: str,
                 sae: str | None = None) -> tuple[Model, Basis, int, int]:
    """The unit a live request addresses: (model, basis, layer, index); with `sae`, a latent of
    that SAE (layer_text is then unused: the SAE fixes the layer)."""
    model = _model(session, name)
    if sae is None:
        return (model, neuron_basis(model.d_mlp), _index(layer_text, "layer", model, model.n_layers),
                _index(neuron_text, "neuron", model, model.d_mlp))
    row = _sae(session, model, sae)
    return model, sae_basis(row), row.layer, _index(neuron_text, "latent", model, row.d_sae)


def _unit_params(basis: Basis) -> dict:
    """What a live request's job carries of its unit's basis (nothing for a neuron)."""
    return {} if basis.is_neurons else {"sae": basis.id, "sae_name": basis.sae}


def start_text_run(
    session: Session, name: str, layer_text: str, neuron_text: str, text: str | None, *, max_chars: int,
    live: bool = True, sae: str | None = None,
) -> dict:
    """Queue a user's text for a worker: this unit's activation on each of its tokens."""
    clamping.require_live(live)
    model, basis, layer, neuron = _text_target(session, name, layer_text, neuron_text, sae)
    text = _user_text(text, max_chars)
    run = queries.create_text_run(session, model.id, layer, neuron, text, basis=basis.id)
    job = queries.enqueue_job(
        session, model.id, queries.TEXT_STAGE, f"run:{run.id}",
        {"run": run.id, "layer": layer, "neuron": neuron, "text": text, **_unit_params(basis)}, max_attempts=1,
    )
    return examples.text_run(session, model, run, job,
                             queries.neuron_activations(session, model.id, layer, neuron, basis.id), sae=basis.sae)


def _user_text(text: str | None, max_chars: int) -> str:
    """A user's posted text, its line ends made "\n": an error if empty or over max_chars."""
    text = (text or "").replace("\r\n", "\n")
    if not text.strip():
        raise NeedleError("There is no text to run.", hint="Type some text into the box, then press Run.")
    if len(text) > max_chars:
        raise NeedleError(
            f"The text is {len(text)} characters long; the limit is {max_chars}.",
            hint="Shorten it: the activations of a few sentences are easiest to read.",
        )
    return text


# ---------------------------------------------------------------- what fires on your text (every unit)


def scan_form_page(session: Session, name: str, *, live: bool = True, max_chars: int = 2000) -> dict:
    """The form of "what fires on your text", with what the results mean."""
    model = _model(session, name)
    form_url = urls.scan_form_url(model.name)
    return {"model": model.name, "form_url": form_url, "live": live, "text_max_chars": max_chars,
            "relative": scans.RELATIVE, "saes": [x.name for x in queries.list_saes(session, model.id)],
            "_form": {"live": live, "form_url": form_url, "text": "", "text_max_chars": max_chars}}


def start_scan(session: Session, name: str, text: str | None, *, max_chars: int, live: bool = True) -> dict:
    """Queue a user's text for a worker: every unit's activation on each of its tokens."""
    clamping.require_live(live)
    model = _model(session, name)
    text = _user_text(text, max_chars)
    scan = queries.create_text_scan(session, model.id, text)
    job = queries.enqueue_job(session, model.id, queries.SCAN_STAGE, f"run:{scan.id}", {"scan": scan.id, "text": text},
                              max_attempts=1)
    return scans.scan_data(session, model, scan, job)


def scan_page(session: Session, name: str, scan_text: str, *, live: bool = True, max_chars: int = 2000) -> dict:
    """A scan's page: its result (or its state) and the form again, filled with its text."""
    model = _model(session, name)
    scan_id = clamping.row_id(scan_text)
    scan = queries.get_text_scan(session, scan_id) if scan_id is not None else None
    if scan is None or scan.model_id != model.id:
        raise NotFound(f"There is no text run {_cut(scan_text)!r} of {model.name!r}.",
                       hint=f"Run a text at {urls.scan_form_url(model.name)}.")
    data = scans.scan_data(session, model, scan, queries.scan_job(session, model.id, scan.id))
    data["_form"] = {"live": live, "form_url": data["form_url"], "text": scan.text, "text_max_chars": max_chars}
    return data


def text_run_page(session: Session, name: str, layer_text: str, neuron_text: str, run_text: str, *,
                  live: bool = True, max_chars: int = 2000, sae: str | None = None) -> dict:
    """A text run's page; "_again": the text form filled with its text (HTML only)."""
    model, basis, layer, neuron = _text_target(session, name, layer_text, neuron_text, sae)
    run_id = clamping.row_id(run_text)
    run = queries.get_text_run(session, run_id) if run_id is not None else None
    if run is None or run.model_id != model.id or (run.basis, run.layer, run.neuron) != (basis.id, layer, neuron):
        raise NotFound(f"There is no text run {_cut(run_text)!r} for {basis.unit} {layer}/{neuron} of {model.name!r}.")
    job = queries.text_job(session, model.id, run.id)
    data = examples.text_run(session, model, run, job,
                             queries.neuron_activations(session, model.id, layer, neuron, basis.id), sae=basis.sae)
    data["_again"] = {"live": live, "text_url": data["run"]["form_url"], "text": run.text, "label_id": "again-title",
                      "text_max_chars": max_chars}
    return data


# ---------------------------------------------------------------- clamp curves and generations


def _clamp_context(model: Model, basis: Basis, layer: int, neuron: int) -> dict:
    context = {"model": model.name, "unit": basis.unit, "layer": layer, "neuron": neuron,
               "neuron_url": urls.neuron_url(model.name, layer, neuron, sae=basis.sae)}
    if not basis.is_neurons:
        context.update(sae=basis.sae, latent=context.pop("neuron"))
    return {**context, **urls.unit_labels(basis.sae, layer, neuron)}


def start_clamp(session: Session, name: str, layer_text: str, neuron_text: str, form: dict, *, live: bool,
                prompt_max_chars: int, sae: str | None = None) -> dict:
    model, basis, layer, neuron = _text_target(session, name, layer_text, neuron_text, sae)
    curve = clamping.start_clamp(session, model, layer, neuron, form, live=live, prompt_max_chars=prompt_max_chars,
                                 basis=basis)
    return {**_clamp_context(model, basis, layer, neuron), "curve": curve}


def clamp_page(session: Session, name: str, layer_text: str, neuron_text: str, curve_text: str, *,
               live: bool = True, sae: str | None = None) -> dict:
    """A clamp curve's page; "_again": the sweep form filled with this curve's settings (HTML only)."""
    model, basis, layer, neuron = _text_target(session, name, layer_text, neuron_text, sae)
    curve = clamping.clamp_page(session, model, layer, neuron, curve_text, basis=basis)
    return {**_clamp_context(model, basis, layer, neuron), "curve": curve,
            "_again": clamping.again_form(model, layer, neuron, live=live, curve=curve, sae=basis.sae)}


def start_generation(session: Session, name: str, layer_text: str, neuron_text: str, form: dict, *, live: bool,
                     prompt_max_chars: int, sae: str | None = None) -> dict:
    model, basis, layer, neuron = _text_target(session, name, layer_text, neuron_text, sae)
    gen = clamping.start_generation(session, model, layer, neuron, form, live=live, prompt_max_chars=prompt_max_chars,
                                    basis=basis)
    return {**_clamp_context(model, basis, layer, neuron), "generation": gen}


def generation_page(session: Session, name: str, layer_text: str, neuron_text: str, gen_text: str, *,
                    live: bool = True, sae: str | None = None) -> dict:
    """A clamped generation's page; "_again": the generate form filled with its prompt, value,
    length and seed (HTML only)."""
    model, basis, layer, neuron = _text_target(session, name, layer_text, neuron_text, sae)
    generation = clamping.generation_page(session, model, layer, neuron, gen_text, basis=basis)
    return {**_clamp_context(model, basis, layer, neuron), "generation": generation,
            "_again": clamping.again_form(model, layer, neuron, live=live, generation=generation, sae=basis.sae)}


# ---------------------------------------------------------------- sparse probes


PROBE_METHOD = [
    "Sparse probing after Gurnee et al. (2023), Finding Neurons in a Haystack. Activations are read where a neuron "
    "is defined (the input of the MLP's output projection). Token-level features probe single tokens; "
    "sequence-level features aggregate each sequence's activations (mean for context features, max for span "
    "features).",
    "{split} Neurons are ranked by mean difference |mean(positive) − mean(negative)| on train.",
    "k = 1: a class-balanced logistic regression on the top-ranked neuron alone; the 30 top-ranked neurons each get "
    "such a single-neuron probe. Fast sweep: for each k, an L2 logistic probe on the top-k neurons. Precision, "
    "recall and F1 are on the held-out 30%.",
]


PROBE_SPLITS = {  # what the split and scaling were, by the probes' method (workers/probes.py METHODS)
    "needle": "Needle's method: samples are split 70/30 into train and test, stratified (each class keeps its share), "
              "with seed 0; each neuron is divided by its train standard deviation (std 1, so C = 1 means what it "
              "means in scikit-learn).",
    "paper": "The paper's code's settings (`needle probe --method paper`), for comparison with its published figures: "
             "scikit-learn's `train_test_split(test_size=0.3, random_state=1)`, shuffled and not stratified, and each "
             "neuron divided by 10 × max(train std, 0.001), i.e. scaled to std 0.1 (the L2 penalty weighs 100 times more).",
}


def probe_method(settings: dict | None) -> tuple[str, list[str]]:
    """The probes' method (needle or paper; probes stored before it was recorded are Needle's) and its description."""
    method = (settings or {}).get("method") or "needle"
    split = PROBE_SPLITS.get(method, f"Method {method!r}.")
    return method, [line.replace("{split}", split) for line in PROBE_METHOD]


def _chance_f1(counts) -> float | None:
    counts = counts if isinstance(counts, dict) else {}
    value = baselines.chance_f1(counts.get("test_pos"), counts.get("test_neg"))
    return None if value is None else number(value)


def _f1_interval(counts, precision, recall) -> list[float | None] | None:
    """A probe's bootstrap 95% interval of its test F1 on a small test set (app/baselines.py)."""
    counts = counts if isinstance(counts, dict) else {}
    interval = baselines.f1_interval(precision, recall, counts.get("test_pos"), counts.get("test_neg"))
    return None if interval is None else [number(x) for x in interval]


def _feature_summary(model: Model, f) -> dict:
    return {
        "feature": f.name,
        "url": urls.feature_url(model.name, f.name),
        "json_url": urls.feature_url(model.name, f.name, fmt=urls.JSON),
        "kind": f.kind,
        "aggregation": f.aggregation,
        "source": f.source,
        "description": f.description,
        "counts": f.counts or {},
        # the F1 of predicting every test example positive: what a probe's F1 reads against
        "chance_f1": _chance_f1(f.counts),
        "status": f.status,
        "reason": f.reason,
        "best": None
        if f.best_layer is None
        else {
            "layer": f.best_layer,
            "neuron": f.best_neuron,
            "f1": number(f.best_f1),
            "url": urls.neuron_url(model.name, f.best_layer, f.best_neuron),
        },
    }


def features_page(session: Session, name: str, q: str | None = None) -> dict:
    model = _model(session, name)
    if q is not None and len(q) > MAX_QUERY_CHARS:
        raise NeedleError(f"The feature search is {len(q)} characters long; the limit is {MAX_QUERY_CHARS}.")
    run = queries.probe_run(session, model.id)
    return {
        "model": model.name,
        "query": q or None,
        "url": urls.features_url(model.name, q),
        "json_url": urls.features_url(model.name, q, fmt=urls.JSON),
        "probed": run is not None,
        "pending": _pending(_stages(queries.jobs_for_model(session, model.id))).get("features"),
        "specs": run.specs if run else [],
        "description": run.description if run else None,
        "features": [_feature_summary(model, f) for f in queries.list_features(session, model.id, q)],
    }


def feature_page(session: Session, name: str, feature: str) -> dict:
    model = _model(session, name)
    row = queries.get_feature(session, model.id, feature)
    if row is None:
        raise NotFound(
            f"Model {model.name!r} has no feature named {_cut(feature)!r}.",
            hint="The features list shows the features probed in this model.",
        )
    run = queries.probe_run(session, model.id)
    method, method_text = probe_method(run.settings if run else None)
    layers: list[dict[str, Any]] = []
    for fl in queries.feature_layers(session, model.id, feature):
        layers.append(
            {
                "layer": fl.layer,
                "best": {
                    "neuron": fl.best_neuron,
                    "f1": number(fl.best_f1),
                    "f1_interval": _f1_interval(row.counts, fl.best_precision, fl.best_recall),
                    "precision": number(fl.best_precision),
                    "recall": number(fl.best_recall),
                    "url": urls.neuron_url(model.name, fl.layer, fl.best_neuron),
                },
                "top_neurons": [
                    {**t, "url": urls.neuron_url(model.name, fl.layer, t["neuron"])} for t in fl.top_neurons
                ],
                "curve": fl.curve,
                "pruned_curve": fl.pruned_curve,
            }
        )
    best_neuron: dict[int, dict] = {la["layer"]: la["best"] for la in layers}
    saes = []
    for x in queries.list_saes(session, model.id):
        for fl in queries.feature_layers(session, model.id, feature, basis=x.id):
            saes.append({
                "sae": x.name, "sae_url": urls.sae_url(model.name, x.name), "layer": fl.layer, "site": x.site,
                "best": {"latent": fl.best_neuron, "f1": number(fl.best_f1), "precision": number(fl.best_precision),
                         "recall": number(fl.best_recall),
                         "f1_interval": _f1_interval(row.counts, fl.best_precision, fl.best_recall),
                         "url": urls.neuron_url(model.name, fl.layer, fl.best_neuron, sae=x.name)},
                "top_latents": [{**{("latent" if k == "neuron" else k): v for k, v in t.items()},
                                 "url": urls.neuron_url(model.name, fl.layer, t["neuron"], sae=x.name)}
                                for t in fl.top_neurons],
                "neuron_best": {k: best_neuron[fl.layer][k] for k in ("neuron", "f1", "url")}
                if fl.layer in best_neuron else None,
                "curve": fl.curve,
                "pruned_curve": fl.pruned_curve,
            })
    return {
        **_feature_summary(model, row),
        "model": model.name,
        # each SAE's latents probed as the neurons are: the best single latent beside its layer's best neuron
        "saes": saes,
        "url": urls.feature_url(model.name, feature),
        "json_url": urls.feature_url(model.name, feature, fmt=urls.JSON),
        "features_url": urls.features_url(model.name),
        "settings": run.settings if run else {},
        "probe_method": method,
        "method": method_text,
        "layers": layers,
    }


# ---------------------------------------------------------------- two models compared (/-/compare/{a}/{b})


def compare_page(session: Session, a: str, b: str) -> dict:
    return compare.comparison_data(session, _model(session, a), _model(session, b))


def compare_unit_page(session: Session, a: str, b: str, layer_text: str, neuron_text: str) -> dict:
    ma, mb = _model(session, a), _model(session, b)
    compare.check_two(ma, mb)
    differences = compare.shape_differences(ma, mb)
    if differences:
        raise NotFound(f"{ma.name!r} and {mb.name!r} have no neurons in common: " + "; ".join(differences) + ".",
                       hint=f"Their features compare at {urls.compare_url(ma.name, mb.name)}.")
    layer = _index(layer_text, "layer", ma, ma.n_layers)
    neuron = _index(neuron_text, "neuron", ma, ma.d_mlp)
    data = compare.unit_data(session, ma, mb, layer, neuron)
    # the HTML shows each side as its embed card
    data["_cards"] = [neuron_page(session, m.name, str(layer), str(neuron)) if side["decoded"] else None
                      for side, m in zip(data["sides"], (ma, mb), strict=True)]
    return data


# ---------------------------------------------------------------- the jobs list (/-/jobs and `needle jobs`)


JOBS_PAGE_SIZE = 200
LIVE_REQUESTS: dict[str, tuple[str, Any]] = {  # a live request's stage: what it is, and the page that shows it
    queries.TEXT_STAGE: ("your text", urls.text_run_url),
    queries.CLAMP_STAGE: ("clamp sweep", urls.clamp_url),
    queries.GENERATE_STAGE: ("clamped generation", urls.generation_url),
    queries.SCAN_STAGE: ("what fires on your text", None),  # the model's, not a unit's: urls.scan_url
}
JOBS_ORDER = ("Running jobs first, then queued ones, both in the order workers claim them (oldest first); "
              "then failed jobs, then done ones, both newest first.")


def _request_url(model: str, job: Job) -> str | None:
    """The page of the live request a job computes (its key is "run:ID"), None if it cannot tell."""
    params = job.params or {}
    run = job.key.removeprefix("run:")
    if not (run.isascii() and run.isdigit()):
        return None
    unit_url = LIVE_REQUESTS[job.stage][1]
    if unit_url is None:
        return urls.scan_url(model, int(run))
    layer, neuron, sae = params.get("layer"), params.get("neuron"), params.get("sae_name")
    if not isinstance(layer, int) or not isinstance(neuron, int):
        return None
    return unit_url(model, layer, neuron, int(run), sae=sae if isinstance(sae, str) else None)


def _listed_job(job: Job, model: str, now: datetime, stale_seconds: float | None) -> dict:
    live = job.stage in LIVE_REQUESTS
    waits = (job.run_after - now).total_seconds() if job.state == "queued" and job.run_after else 0.0
    age = (now - job.heartbeat_at).total_seconds() if job.state == "running" and job.heartbeat_at else None
    return {
        "id": job.id,
        "model": model,
        "model_url": urls.model_url(model),
        "kind": "live" if live else "index",
        "request": LIVE_REQUESTS[job.stage][0] if live else None,
        "request_url": _request_url(model, job) if live else None,
        **_job(job),
        "requires_stage": job.requires_stage,
        "created_at": queries.utc_text(job.created_at),
        # a queued job is claimed once run_after has passed: after a failed attempt it waits (backoff)
        "run_after": queries.utc_text(job.run_after) if job.state == "queued" else None,
        "waits_seconds": round(waits, 1) if waits > 0 else None,
        "heartbeat_at": queries.utc_text(job.heartbeat_at) if job.state == "running" else None,
        "heartbeat_age_seconds": round(max(age, 0.0), 1) if age is not None else None,
        # no heartbeat for longer than the setting: the worker is gone, and the job goes back to the queue
        "stale": age is not None and stale_seconds is not None and age > stale_seconds,
    }


def jobs_page(
    session: Session, *, model: str | None = None, state: str | None = None, page: str | None = None,
    page_size: int = JOBS_PAGE_SIZE, stale_seconds: float | None = None,
) -> dict:
    """Every job, live requests included, newest and active first (JOBS_ORDER), one page at a
    time; filtered by model name and state (an empty filter is no filter)."""
    model_row = None
    if model:
        model_row = queries.get_model(session, model)
        if model_row is None:
            names = [m.name for m in queries.list_models(session)]
            raise NotFound(
                f"There is no model named {model[:MAX_QUERY_CHARS]!r}.",
                hint=f"Models here: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}." if names
                else "No model has been indexed yet.",
            )
    state = state or None
    if state is not None and state not in queries.JOB_STATES:
        raise NeedleError(f"Unknown job state {state[:MAX_QUERY_CHARS]!r}: use one of {', '.join(queries.JOB_STATES)}.")
    if page is None or page == "":
        page_number = 1
    elif DIGITS.fullmatch(page) and len(page) <= 9 and int(page) >= 1:  # a 5,000-digit page is no number
        page_number = int(page)
    else:
        raise NeedleError(f"Page {page[:MAX_QUERY_CHARS]!r} is not a page number: pages are numbered from 1.")
    name = model_row.name if model_row else None
    model_id = model_row.id if model_row else None

    counts = queries.count_jobs_by_state(session, model_id)
    total = counts.get(state, 0) if state else sum(counts.values())
    pages = max(1, math.ceil(total / page_size))
    if page_number > pages:
        raise NeedleError(f"Page {page_number} is out of range: there are {pages} page(s) of these jobs.")
    now = queries.utcnow()
    rows = queries.list_jobs(session, model_id=model_id, state=state, offset=(page_number - 1) * page_size,
                             limit=page_size)

    def page_url(n: int | None, fmt: str | None = None) -> str | None:
        return None if n is None else urls.jobs_url(name, state, n, fmt)

    return {
        "url": page_url(page_number),
        "json_url": page_url(page_number, urls.JSON),
        "list_url": urls.jobs_list_url(name, state, page_number),
        "model": name,
        "state": state,
        "order": JOBS_ORDER,
        "counts": {s: counts.get(s, 0) for s in queries.JOB_STATES},
        "states": [
            {"state": s, "jobs": counts.get(s, 0), "url": urls.jobs_url(name, s), "current": s == state}
            for s in queries.JOB_STATES
        ],
        "all_states_url": urls.jobs_url(name),
        "models": [m.name for m in queries.list_models(session)],
        "total": total,
        "page": page_number,
        "pages": pages,
        "page_size": page_size,
        "prev_page_url": page_url(page_number - 1 if page_number > 1 else None),
        "next_page_url": page_url(page_number + 1 if page_number < pages else None),
        # the page polls itself while any job (of the model filtered on) is queued or running
        "jobs_pending": bool(counts.get("queued") or counts.get("running")),
        "jobs": [_listed_job(job, model_name, now, stale_seconds) for job, model_name in rows],
    }
