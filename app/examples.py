"""Page data for what makes a neuron fire: its top contexts, interval samples and activation
statistics (computed by workers/examples.py), and a user's own text run on it.

Every example has the JSON shape the neuron page's .json twin documents:
{"tokens": [str], "token_ids": [int], "activations": [float], "max_activation": float,
"max_index": int, "source": str}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app import queries, urls
from app.arrays import FLOAT32, INT32, unpack
from app.fastpage import PageSpans, TokenTexts, rounded_activations, token_texts
from app.schema import ExampleRun, Job, Model, NeuronActivations, TextRun
from app.unitarrays import unpack_examples, unpack_negatives

METHOD = [
    "Windows: the corpus's documents are tokenized, joined with the end-of-text token between them and cut into "
    "consecutive windows of {context} tokens; the last partial window is dropped.{bos}",
    "Top contexts: every window's max activation for this neuron, over one streaming pass that keeps the "
    "{top_k} best windows and their per-token activations (float16). Each window appears once; ties go to the "
    "earlier window.",
    "Interval samples: {bins} equal-width bins between 0 and the neuron's max (each bin holds (lo, hi]), a window "
    "belonging to the bin of its own max, {per_bin} windows drawn uniformly at random per bin (reservoir sampling by priority: the "
    "windows with the smallest hash of layer, neuron and window). The bins come from a first pass over "
    "{estimate_windows} evenly spaced windows that estimates each neuron's max; a window above the estimate "
    "falls in the last bin, whose upper edge is the true max. A bin's share is the fraction of this neuron's "
    "firing tokens (activation > 0) whose activation lies in it. Shown because top examples alone can mislead.",
    "Statistics over every token of the corpus: frequency is the share of tokens with activation > 0; "
    "'above threshold' is the share above the first interval edge (1/5 of the estimated max). The "
    "histogram has {hist_bins} equal bins over the estimated range widened by a quarter at each end (its end bins "
    "also hold anything beyond); empty bins at the ends are not drawn, and the outer edges are the true min and "
    "max, so the first and last bars can be narrower.",
]


SILENT_SHARE = 0.01  # a unit whose largest |activation| is under this share of its layer's median is silent
ZERO_WHEN_OFF = ("relu", "relu2", "relu6")  # activation functions whose units are exactly 0 when off


@dataclass(frozen=True)
class FiringRule:
    """When a unit fires and when it is dead, by what its activation function makes meaningful.
    relative: fires above 1/5 of its own max (the stored frequency_above), dead when silent;
    else fires above 0 (the stored frequency), dead when it never does."""

    relative: bool
    text: str
    dead_text: str

    def frequency(self, stats) -> float | None:
        """A stored activations row's (or stats dict's) firing frequency by this rule."""
        if stats is None:
            return None
        get = stats.get if isinstance(stats, dict) else lambda k: getattr(stats, k)
        return get("frequency_above") if self.relative else get("frequency")


def firing_rule(model: Model, latents: bool = False) -> FiringRule:
    """SAE latents and ReLU neurons are exactly 0 when off: they fire above 0, and a dead one never
    does. A SiLU or GELU neuron is almost never exactly 0 (a gated one, act(gate) x up, is above 0 on
    about half the tokens), so it fires above 1/5 of its own max on the corpus, and is dead when
    silent: its largest |activation| under 1% of its layer's median."""
    act = str((model.info or {}).get("hidden_act") or "").lower()
    if latents or act in ZERO_WHEN_OFF:
        what = "an SAE latent" if latents else f"a {act} neuron"
        return FiringRule(False, f"a unit fires on a token when its activation is above 0 ({what} is exactly 0 when off)",
                          "a dead unit never fires on the corpus")
    return FiringRule(
        True,
        f"a unit fires on a token when its activation is above 1/5 of its largest on the corpus (the first interval "
        f"edge, from the estimate pass): a {act or 'non-ReLU'} neuron is almost never exactly 0, so 'above 0' would read "
        "about half the tokens for most of them",
        f"a dead unit is silent: its largest |activation| on the corpus is under {SILENT_SHARE:.0%} of its layer's median",
    )


def _float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def run_info(run: ExampleRun | None) -> dict | None:
    if run is None:
        return None
    s = run.settings or {}
    bos = " Each window runs with the tokenizer's BOS token in front, left out of everything shown." if run.bos_prefix else ""
    method = [
        line.format(
            context=run.context, bos=bos, top_k=s.get("top_k"), bins=s.get("bins"), per_bin=s.get("per_bin"),
            estimate_windows=s.get("estimate_windows"), hist_bins=s.get("hist_bins"),
        )
        for line in METHOD
    ]
    return {
        "corpus": run.corpus,
        "description": run.description,
        "context": run.context,
        "windows": run.n_windows,
        "tokens": run.n_tokens,
        "documents": run.n_documents,
        "bos_prefix": run.bos_prefix,
        "settings": s,
        "computed_at": queries.utc_text(run.created_at),
        "method": method,
    }


def _example(token_ids: np.ndarray, acts: np.ndarray, text: dict[int, str], source: str, mark: int | None = None) -> dict:
    values = rounded_activations(acts)
    max_index = int(np.argmax(acts)) if mark is None else int(mark)
    ids = token_ids.tolist()
    return {
        "tokens": text.many(token_ids) if isinstance(text, TokenTexts) else [text.get(t) for t in ids],
        "token_ids": ids,
        "activations": values,
        "max_activation": values[max_index],
        "max_index": max_index,
        "source": source,
    }


def _prompt_upto(window_ids, pos: int, text) -> str | None:
    """A clamp prompt a person can read: a context's text up to (and with) its max token."""
    return "".join(text.get(int(t)) or "" for t in window_ids[: pos + 1]) or None


def top_context_prompt(session: Session, model: Model, row: NeuronActivations | None, context: int) -> str | None:
    """A unit's default clamp prompt: its top context on the examples corpus up to its max token,
    None where it has none (or never fired)."""
    if row is None:
        return None
    a = unpack_examples(row, context)
    windows, pos, top_max = a["top_windows"], a["top_pos"], a["top_max"]
    if not len(windows) or windows[0] < 0 or not top_max[0] > 0:
        return None
    stored = queries.example_windows(session, model.id, [int(windows[0])])
    win = stored.get(int(windows[0]))
    if win is None:
        return None
    return _prompt_upto(unpack(win.token_ids, INT32), int(pos[0]), token_texts(session, model))


def neuron_activations(session: Session, model: Model, row: NeuronActivations | None, context: int, *,
                       arrays: bool = True, latents: bool = False) -> dict:
    """The "examples", "interval_samples" and "stats" of a neuron page (empty when not computed).
    arrays=False leaves out each example's per-token lists (tokens, token_ids, activations: about
    2,900 of each), which the JSON twin and the embed card show; the page draws its tokens from
    the stored arrays instead (PageSpans, "_context_spans"), so building them was 11% of its
    server time under load for nothing."""
    if row is None:
        return {"examples": [], "interval_samples": [], "negative_examples": None, "stats": None, "peak_tokens": [],
                "_context_spans": None, "_top_prompt": None, "_negative_group": None}
    a = unpack_examples(row, context)
    neg = unpack_negatives(row, context)
    top_windows, top_pos, top_acts, top_max = a["top_windows"], a["top_pos"], a["top_acts"], a["top_max"]
    int_windows, int_pos, int_max, int_acts = a["int_windows"], a["int_pos"], a["int_max"], a["int_acts"]
    int_edges, int_counts = a["int_edges"], a["int_counts"]
    bins = len(int_counts)

    windows = queries.example_windows(session, model.id, [*top_windows.tolist(), *int_windows.ravel().tolist(),
                                                          *(neg["neg_windows"].tolist() if neg is not None else [])])
    ids = {w: unpack(win.token_ids, INT32) for w, win in windows.items()}
    text = token_texts(session, model)

    def example(window: int, acts: np.ndarray, pos: int, exact_max: float) -> dict:
        win = windows[window]
        if arrays:
            out = _example(ids[window], acts, text, win.source, mark=pos)
        else:
            out = {"max_index": int(pos), "source": win.source}
        out["max_activation"] = round(float(exact_max), 4)
        out["window"] = int(window)
        return out

    top = [k for k, w in enumerate(top_windows.tolist()) if w >= 0 and w in windows]
    examples = [example(int(top_windows[k]), top_acts[k], int(top_pos[k]), top_max[k]) for k in top]
    # the tokens its top contexts peak on (the token at each one's max, where it fires), most contexts first
    peaks: dict[int, int] = {}
    for k in top:
        window_ids = ids[int(top_windows[k])]
        if top_max[k] > 0 and 0 <= int(top_pos[k]) < len(window_ids):  # where it fires
            token_id = int(window_ids[int(top_pos[k])])
            peaks[token_id] = peaks.get(token_id, 0) + 1
    peak_tokens = [{"token": text.get(t), "token_id": t, "contexts": n}
                   for t, n in sorted(peaks.items(), key=lambda x: (-x[1], x[0]))]
    top_prompt = _prompt_upto(ids[int(top_windows[top[0]])], int(top_pos[top[0]]), text) \
        if top and top_max[top[0]] > 0 else None
    spans = [[(ids[int(top_windows[k])], top_acts[k], int(top_pos[k])) for k in top]]
    firing = int(int_counts.sum())
    intervals = []
    for b in range(bins):
        kept = [j for j, w in enumerate(int_windows[b].tolist()) if w >= 0 and w in windows]
        intervals.append(
            {
                "bin": [round(float(int_edges[b]), 4), round(float(int_edges[b + 1]), 4)],
                "share": round(float(int_counts[b]) / firing, 6) if firing else 0.0,
                "tokens": int(int_counts[b]),
                "examples": [example(int(int_windows[b, j]), int_acts[b, j], int(int_pos[b, j]), int_max[b, j]) for j in kept],
            }
        )
        spans.append([(ids[int(int_windows[b, j])], int_acts[b, j], int(int_pos[b, j])) for j in kept])
    # a gated MLP's neuron: its top negative contexts (windows whose min is below 0), most negative first
    negative_examples = None
    if neg is not None:
        kept = [k for k, w in enumerate(neg["neg_windows"].tolist()) if w >= 0 and w in windows and neg["neg_min"][k] < 0]
        negative_examples = []
        for k in kept:
            ex = example(int(neg["neg_windows"][k]), neg["neg_acts"][k], int(neg["neg_pos"][k]), neg["neg_min"][k])
            ex["min_activation"], ex["min_index"] = ex.pop("max_activation"), ex.pop("max_index")
            negative_examples.append(ex)
        spans.append([(ids[int(neg["neg_windows"][k])], neg["neg_acts"][k], int(neg["neg_pos"][k])) for k in kept])
    stats: dict[str, Any] = {
        "tokens": int(row.tokens),
        "frequency": float(row.frequency),
        "frequency_above": float(row.frequency_above),
        "threshold": None if row.threshold is None else _float(row.threshold),
        "mean": float(row.mean),
        "std": float(row.std),
        "min": float(row.min_act),
        "max": float(row.max_act),
        "histogram": histogram(a["hist_edges"], a["hist_counts"], float(row.min_act), float(row.max_act)),
    }
    # how often it fires and whether it is dead, as its activation function makes meaningful
    rule = firing_rule(model, latents)
    stats.update(firing_frequency=rule.frequency(stats), firing_rule=rule.text, firing_relative=rule.relative,
                 silent=row.silent)
    # "_context_spans": the HTML of every context's tokens, for the page's template (not in the JSON)
    spans_html = PageSpans(text, colour_scale(stats["max"], stats["min"]), spans)
    return {"examples": examples, "interval_samples": intervals, "negative_examples": negative_examples, "stats": stats,
            "peak_tokens": peak_tokens, "_context_spans": spans_html, "_top_prompt": top_prompt,
            "_negative_group": bins + 1 if negative_examples is not None else None}


def histogram(edges: np.ndarray, counts: np.ndarray, lo: float, hi: float) -> dict:
    """The stored histogram with its empty end bins dropped and its outer edges clipped to the
    true min and max (the stored range is the estimate, widened)."""
    filled = np.flatnonzero(counts)
    if len(filled) == 0:
        return {"edges": [], "counts": []}
    first, last = int(filled[0]), int(filled[-1])
    kept = [float(e) for e in edges[first : last + 2]]
    kept[0], kept[-1] = max(kept[0], lo), min(kept[-1], hi)
    if kept[-1] <= kept[0]:  # every token had one value
        kept = [lo, hi if hi > lo else lo + 1e-6]
    return {"edges": [round(e, 5) for e in kept], "counts": [int(c) for c in counts[first : last + 1]]}


def colour_scale(largest: float, smallest: float) -> dict[str, float]:
    """The highlight colours' scales of a neuron, one per sign: a positive activation's strength
    is a / its largest activation, a negative one's |a| / its largest negative magnitude. One
    scale for both (the largest magnitude) left a gated neuron's text nearly white wherever a
    rare large negative value set it. A sign the neuron never reached borrows the other's scale."""
    positive = largest if largest > 0 else -smallest
    negative = -smallest if smallest < 0 else largest
    return {"positive": max(positive, 1e-6), "negative": max(negative, 1e-6)}


# ---------------------------------------------------------------- a user's own text


def text_run(session: Session, model: Model, run: TextRun, job: Job | None, stats: NeuronActivations | None,
             sae: str | None = None) -> dict:
    """A text run's page data, shaped as a clamp curve's and a generation's are: where it belongs
    (model, layer, neuron) and the run itself under "run". Its colours use the neuron's corpus
    scale when there is one (so they compare with its examples), else the run's own largest magnitude."""
    state = job.state if job is not None else "queued"
    data = {
        "id": run.id,
        "text": run.text,
        "state": "done" if run.activations is not None else state,
        "error": job.error if job is not None and state == "failed" else None,
        "url": urls.text_run_url(model.name, run.layer, run.neuron, run.id, sae=sae),
        "json_url": urls.text_run_url(model.name, run.layer, run.neuron, run.id, fmt=urls.JSON, sae=sae),
        "form_url": urls.text_form_url(model.name, run.layer, run.neuron, sae=sae),
        "scale": colour_scale(stats.max_act, stats.min_act) if stats is not None else None,
        "scale_from_examples": stats is not None,
        "result": None,
        "tokens_left_out": 0,
    }
    if run.activations is not None and run.token_ids is not None:
        token_ids = unpack(run.token_ids, INT32)
        acts = unpack(run.activations, FLOAT32)
        text = queries.tokens_by_ids(session, model.id, token_ids.tolist())
        data["result"] = _example(token_ids, acts, text, "your text")
        # a text longer than the model reads: its first tokens ran, and the page says so
        data["tokens_left_out"] = max(0, (run.n_tokens or 0) - len(token_ids))
        if stats is None:
            data["scale"] = colour_scale(float(acts.max()), float(acts.min()))
    where = {"model": model.name, "unit": "neuron" if sae is None else "latent", "layer": run.layer,
             "neuron": run.neuron, "neuron_url": urls.neuron_url(model.name, run.layer, run.neuron, sae=sae)}
    if sae is not None:
        where.update(sae=sae, latent=where.pop("neuron"))
    return {**where, **urls.unit_labels(sae, run.layer, run.neuron), "run": data}
