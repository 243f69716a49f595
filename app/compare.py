"""Two models compared, as a page shows it (/-/compare/{a}/{b}, `needle compare`).

Two models of one shape and vocabulary (a base model and its fine-tune), neuron by neuron, as
Davies (2025, section 3.3) compares Llama 3.1 8B with its Instruct model: the share of neurons
whose top input-weight token is the same, overall and per layer; the neurons that changed most,
by the cosine of their input weights in the two models and by how many of their top decoded
tokens the two share; one neuron in both, side by side. The worker's compare stage
(workers/compare.py) computes these into `comparisons`; what cannot be compared is named.

Models of any shapes probed on the same features (Gurnee et al. 2023's scaling study): a
feature x model table of the best single-neuron F1 and the smallest k whose k-sparse probe
reaches 90% of the best F1 of any k, read from the stored probes.
"""

from __future__ import annotations

import math

import numpy as np
from sqlalchemy.orm import Session

from app import queries, urls
from app.arrays import FLOAT32, INT32, UINT8, unpack
from app.errors import NeedleError
from app.schema import Comparison, FeatureLayer, Job, Model
from app.search import number
from app.unitarrays import unpack_decoding

TOP = 10  # the top input-weight tokens whose overlap is counted
CHANGED = 50  # neurons listed as changed most, by each measure
SHOWN_TOKENS = 5  # tokens shown per model in those lists
K_SHARE = 0.9  # the smallest k reaching this share of the best k-sparse F1
UNCHANGED = 1 - 1e-6  # a cosine this close to 1, with the same top tokens, is a neuron left as it was
METHOD = (
    "Agreement: the share of neurons whose top input-weight token (p = softmax(W_U · w_in), Davies 2025) is the "
    f"same token id in both models. Changed by weights: the lowest cosine between a neuron's input weights in the "
    f"two models. Changed by tokens: the fewest of the top {TOP} decoded tokens in common, then the lowest cosine. "
    f"Neither list shows a neuron left as it was: cosine {UNCHANGED} or more, the same top token and all top {TOP} "
    "tokens in common."
)
FEATURES_METHOD = (
    "Per feature and model: the best single-neuron probe's F1 over all layers (the neuron and layer named), the best "
    f"F1 of the fast k-sparse sweep over all k and layers, and the smallest k whose probe reaches {K_SHARE:.0%} of "
    "that best F1 (with its layer)."
)


def shape_differences(a: Model, b: Model) -> list[str]:
    """What keeps two models from being compared neuron by neuron, read from their rows."""
    out = []
    for field, what in (("n_layers", "layers"), ("d_mlp", "neurons per layer"), ("vocab_size", "vocabulary tokens")):
        x, y = getattr(a, field), getattr(b, field)
        if x != y:
            out.append(f"{what}: {a.name} has {x:,}, {b.name} has {y:,}")
    if a.decode_norm != b.decode_norm:
        out.append(f"decodings: {a.name} was decoded with --decode-norm {a.decode_norm}, "
                   f"{b.name} with --decode-norm {b.decode_norm}")
    return out


def vocabulary_difference(session: Session, a: Model, b: Model) -> str | None:
    """The first token whose text differs between two vocabularies of one size, or None."""
    pa, pb = queries.vocab_pieces(session, a.id), queries.vocab_pieces(session, b.id)
    if len(pa) != len(pb):
        return f"vocabulary: {a.name} has {len(pa):,} tokens stored, {b.name} {len(pb):,}"
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        if x != y:
            return f"vocabulary: token {i} is {x!r} in {a.name} and {y!r} in {b.name}"
    return None


def decoding_gaps(session: Session, models: tuple[Model, ...]) -> list[str]:
    """The models whose neurons are not all decoded yet."""
    out = []
    for m in models:
        counts = queries.layer_counts(session, m.id)
        stored = sum(counts.values())
        if stored < m.n_layers * m.d_mlp:
            out.append(f"{m.name} has {stored:,} of its {m.n_layers * m.d_mlp:,} neurons decoded")
    return out


def check_two(a: Model, b: Model) -> None:
    """NeedleError when both are the same model: a comparison is of two."""
    if a.id == b.id:
        raise NeedleError(f"Both models are {a.name!r}.", hint="Name two different models: needle compare BASE TUNED.")


def check_comparable(session: Session, a: Model, b: Model) -> None:
    """NeedleError naming what differs, when a and b cannot be compared neuron by neuron."""
    check_two(a, b)
    problems = shape_differences(a, b)
    if not problems:
        problems = [p for p in (vocabulary_difference(session, a, b),) if p] + decoding_gaps(session, (a, b))
    if problems:
        raise NeedleError(
            f"{a.name!r} and {b.name!r} cannot be compared neuron by neuron: " + "; ".join(problems) + ".",
            hint="Neuron by neuron needs one shape, one vocabulary and finished decodings (needle index). "
                 "Models of any shapes still compare by their probed features: /-/compare/A/B shows that table.")


def model_stamp(m: Model) -> str | None:
    """When a model was last registered or indexed, to the microsecond: a comparison keeps both."""
    return m.updated_at.isoformat() if m.updated_at else None


def stale(row: Comparison, a: Model, b: Model) -> bool:
    """Whether either model was indexed again after the comparison was computed."""
    info = row.info or {}
    return info.get("a_updated") != model_stamp(a) or info.get("b_updated") != model_stamp(b)


def _arrays(row: Comparison, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        same, overlap, cosine = unpack(row.same, UINT8), unpack(row.overlap, UINT8), unpack(row.cosine, FLOAT32)
    except (TypeError, ValueError):
        return None
    if not (len(same) == len(overlap) == len(cosine) == n):
        return None
    return same, overlap, cosine


def _token_lists(session: Session, model: Model, units: list[tuple[int, int]]) -> dict[tuple[int, int], list[dict]]:
    blobs = queries.units_in_ids(session, model.id, units)
    ids = {u: unpack(blob, INT32)[:SHOWN_TOKENS].tolist() for u, blob in blobs.items()}
    texts = queries.tokens_by_ids(session, model.id, {t for v in ids.values() for t in v})
    return {u: [{"token": texts.get(t), "token_id": t} for t in v] for u, v in ids.items()}


def _changed(session: Session, a: Model, b: Model, order: np.ndarray, same, overlap, cosine) -> list[dict]:
    """The first CHANGED neurons of `order` (flat indices of neurons that changed), with their figures and tokens."""
    d = a.d_mlp
    units = [(int(i) // d, int(i) % d) for i in order[:CHANGED]]
    ta, tb = _token_lists(session, a, units), _token_lists(session, b, units)
    return [{"layer": layer, "neuron": n, "cosine": number(cosine[layer * d + n]),
             "overlap": int(overlap[layer * d + n]), "same_top": bool(same[layer * d + n]),
             "a_tokens": ta.get((layer, n), []), "b_tokens": tb.get((layer, n), []),
             "url": urls.compare_unit_url(a.name, b.name, layer, n)} for layer, n in units]


def _neuron_data(session: Session, a: Model, b: Model, row: Comparison | None, job: Job | None) -> dict:
    """The neuron-by-neuron part: its state, and once computed the agreement and the changed lists."""
    problems = shape_differences(a, b)
    data: dict = {"comparable": not problems, "differences": problems, "state": "not computed", "error": None,
                  "stale": False, "agreement": None, "same": None, "neurons": a.n_layers * a.d_mlp if not problems else None,
                  "mean_cosine": None, "unchanged": None, "layers": [], "changed": [], "changed_tokens": [],
                  "computed_at": None}
    if problems:
        data["state"] = "not comparable"
        return data
    if row is None:
        if job is not None:
            data["state"] = job.state if job.state != "done" else "not computed"
            data["error"] = job.error if job.state == "failed" else None
        return data
    arrays = _arrays(row, a.n_layers * a.d_mlp)
    if arrays is None:
        data.update(state="broken", error="The stored comparison cannot be shown: its arrays do not fit the models. "
                                          "Run needle compare again.")
        return data
    same, overlap, cosine = arrays
    data.update(state="done", stale=stale(row, a, b), computed_at=queries.utc_text(row.created_at))
    if job is not None and job.state in ("queued", "running"):
        data["state"] = job.state  # computing again: the stored figures show meanwhile
    d = a.d_mlp
    finite = np.isfinite(cosine)
    data["same"] = int(same.sum())
    unchanged = (cosine >= UNCHANGED) & (overlap == TOP) & (same == 1)  # a NaN cosine is changed
    data["unchanged"] = int(unchanged.sum())
    data["agreement"] = number(same.mean())
    data["mean_cosine"] = number(cosine[finite].mean()) if finite.any() else None
    for layer in range(a.n_layers):
        s, c = same[layer * d:(layer + 1) * d], cosine[layer * d:(layer + 1) * d]
        ok = np.isfinite(c)
        data["layers"].append({"layer": layer, "agreement": number(s.mean()), "same": int(s.sum()), "neurons": d,
                               "mean_cosine": number(c[ok].mean()) if ok.any() else None})
    # NaN cosines (a zero weight vector) sort as changed most: nothing of the neuron is left
    by_cosine = np.lexsort((np.arange(len(cosine)), np.where(finite, cosine, -math.inf)))
    by_tokens = np.lexsort((np.arange(len(cosine)), np.where(finite, cosine, -math.inf), overlap))
    by_cosine, by_tokens = by_cosine[~unchanged[by_cosine]], by_tokens[~unchanged[by_tokens]]
    data["changed"] = _changed(session, a, b, by_cosine, same, overlap, cosine)
    data["changed_tokens"] = _changed(session, a, b, by_tokens, same, overlap, cosine)
    return data


def _feature_figures(model: Model, layers: list[FeatureLayer], best: dict) -> dict:
    """One model's figures for one feature: best single neuron, best k-sparse F1, smallest k at K_SHARE of it."""
    points = [(p["k"], p["f1"], fl.layer) for fl in layers for p in (fl.curve if isinstance(fl.curve, list) else [])
              if isinstance(p, dict) and isinstance(p.get("k"), int) and isinstance(p.get("f1"), int | float)
              and math.isfinite(p["f1"])]  # a stored point that is not one is left out
    top = max((f1 for _, f1, _ in points), default=None)
    k90 = min(((k, layer) for k, f1, layer in points if top is not None and f1 >= K_SHARE * top), default=None)
    return {
        "best_f1": number(best["f1"]) if best.get("f1") is not None else None,
        "best_layer": best.get("layer"), "best_neuron": best.get("neuron"),
        "best_url": urls.neuron_url(model.name, best["layer"], best["neuron"])
        if best.get("layer") is not None and best.get("neuron") is not None else None,
        "sparse_f1": number(top) if top is not None else None,
        "k90": k90[0] if k90 else None, "k90_layer": k90[1] if k90 else None,
        "url": urls.feature_url(model.name, best["name"]),
    }


def _features_of(session: Session, model: Model) -> dict[str, dict]:
    probed = {f.name: f for f in queries.list_features(session, model.id) if f.status == "probed"}
    by_feature: dict[str, list[FeatureLayer]] = {}
    for fl in queries.feature_layers_of_model(session, model.id):
        by_feature.setdefault(fl.feature, []).append(fl)
    return {name: _feature_figures(model, by_feature.get(name, []), {
        "name": name, "f1": f.best_f1, "layer": f.best_layer, "neuron": f.best_neuron}) for name, f in probed.items()}


def features_data(session: Session, a: Model, b: Model) -> dict:
    """The feature x model table of the features probed in both."""
    fa, fb = _features_of(session, a), _features_of(session, b)
    common = sorted(set(fa) & set(fb))
    note = None
    if not common:
        note = (f"No feature is probed in both models ({a.name}: {len(fa)} probed, {b.name}: {len(fb)}). "
                f"Probe the same features in both: needle probe MODEL --features SPEC.")
    return {"rows": [{"feature": name, "a": fa[name], "b": fb[name]} for name in common],
            "only_a": sorted(set(fa) - set(fb)), "only_b": sorted(set(fb) - set(fa)), "note": note,
            "method": FEATURES_METHOD}


def _model_summary(m: Model) -> dict:
    return {"name": m.name, "url": urls.model_url(m.name), "family": m.family, "architecture": m.architecture,
            "n_layers": m.n_layers, "d_mlp": m.d_mlp, "vocab_size": m.vocab_size}


def comparison_data(session: Session, a: Model, b: Model) -> dict:
    """/-/compare/{a}/{b}'s data (and its JSON, and `needle compare --json`)."""
    check_two(a, b)
    row = queries.get_comparison(session, a.id, b.id)
    job = queries.compare_job(session, a.id, b.id)
    return {
        "a": a.name, "b": b.name,
        "models": [_model_summary(a), _model_summary(b)],
        "url": urls.compare_url(a.name, b.name), "json_url": urls.compare_url(a.name, b.name, fmt=urls.JSON),
        "swapped_url": urls.compare_url(b.name, a.name),
        "command": f"needle compare {a.name} {b.name}",
        "method": METHOD, "top": TOP,
        **_neuron_data(session, a, b, row, job),
        "features": features_data(session, a, b),
    }


def _unit_side(session: Session, model: Model, layer: int, neuron: int) -> dict:
    stored = queries.get_neuron(session, model.id, layer, neuron)
    tokens: list[dict] = []
    if stored is not None:
        try:
            dec = unpack_decoding(stored)
            ids, probs = dec["in_ids"][:TOP].tolist(), dec["in_probs"][:TOP].tolist()
        except ValueError:
            ids, probs = [], []
        texts = queries.tokens_by_ids(session, model.id, ids)
        tokens = [{"token": texts.get(t), "token_id": t, "prob": number(p)} for t, p in zip(ids, probs, strict=False)]
    return {"model": model.name, "tokens": tokens, "decoded": stored is not None,
            "url": urls.neuron_url(model.name, layer, neuron), "json_url": urls.neuron_url(model.name, layer, neuron, fmt=urls.JSON),
            "embed_url": urls.embed_url(model.name, layer, neuron)}


def unit_data(session: Session, a: Model, b: Model, layer: int, neuron: int) -> dict:
    """One neuron in both models, side by side: its top tokens in each and what the comparison measured."""
    row = queries.get_comparison(session, a.id, b.id)
    arrays = _arrays(row, a.n_layers * a.d_mlp) if row is not None and not shape_differences(a, b) else None
    figures: dict = {"same_top": None, "overlap": None, "cosine": None}
    if arrays is not None:
        i = layer * a.d_mlp + neuron
        figures = {"same_top": bool(arrays[0][i]), "overlap": int(arrays[1][i]), "cosine": number(arrays[2][i])}
    return {"a": a.name, "b": b.name, "layer": layer, "neuron": neuron, **figures, "top": TOP,
            "computed": arrays is not None, "command": f"needle compare {a.name} {b.name}",
            "compare_url": urls.compare_url(a.name, b.name),
            "url": urls.compare_unit_url(a.name, b.name, layer, neuron),
            "json_url": urls.compare_unit_url(a.name, b.name, layer, neuron, fmt=urls.JSON),
            "sides": [_unit_side(session, a, layer, neuron), _unit_side(session, b, layer, neuron)]}
