"""Stage results into the schema, through app.queries. Each writer runs inside the
caller's transaction, so a job's results land whole or not at all."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sqlalchemy.orm import Session

from app import queries
from app.arrays import FLOAT32, INT32, pack, pack_rows, unpack
from app.examples import SILENT_SHARE
from app.unitarrays import DECODING, EXAMPLES, NEGATIVES, pack_units
from workers.corpus import Corpus
from workers.decode import LayerDecoding, merge_search_parts
from workers.examples import LayerExamples


def neuron_rows(dec: LayerDecoding) -> list[dict]:
    blobs = pack_units(DECODING, dec)
    top_ids, top_probs = dec.in_ids[:, 0].tolist(), dec.in_probs[:, 0].tolist()
    top_scores, means = dec.in_scores[:, 0].tolist(), dec.mean_top100.tolist()
    entropy = dec.entropy.tolist() if dec.entropy is not None else [None] * len(means)
    return [
        {
            "layer": dec.layer,
            "neuron": i,
            "top_token_id": top_ids[i],
            "top_prob": top_probs[i],
            "top_score": top_scores[i],
            "mean_top100": means[i],
            "entropy": entropy[i],
            **{field: rows[i] for field, rows in blobs.items()},
        }
        for i in range(len(means))
    ]


def write_decodings(session: Session, model_id: int, decodings: Sequence[LayerDecoding]) -> None:
    rows = [r for dec in decodings for r in neuron_rows(dec)]
    queries.replace_neurons(session, model_id, [d.layer for d in decodings], rows)


def search_probs(scores: np.ndarray, ids: np.ndarray, mean_top100: np.ndarray) -> np.ndarray:
    """A search part's probabilities: score x the unit's mean top-100 probability (0 in unfilled slots, id -1)."""
    valid = ids >= 0
    return np.where(valid, scores, 0.0) * mean_top100[np.where(valid, ids, 0)]


def write_search_part(
    session: Session, model_id: int, part: str, scores: np.ndarray, ids: np.ndarray, mean_top100: np.ndarray, d_mlp: int
) -> None:
    """scores, ids: [vocab x k] for one shard; mean_top100 indexed by global neuron id."""
    valid = ids >= 0
    probs = search_probs(scores, ids, mean_top100)
    queries.put_search_part(
        session,
        model_id,
        part,
        k=scores.shape[1],
        layers=pack(np.where(valid, ids // d_mlp, -1), INT32),
        neurons=pack(np.where(valid, ids % d_mlp, -1), INT32),
        scores=pack(np.where(valid, scores, 0.0), FLOAT32),
        probs=pack(probs, FLOAT32),
    )


def build_token_index(session: Session, model_id: int, d_mlp: int, vocab: int, parts_expected: Sequence[str]) -> int:
    """Merge the decode shards' search parts into token_index. Returns the number of tokens indexed."""
    parts = {p.part: p for p in queries.search_parts(session, model_id)}
    missing = sorted(set(parts_expected) - set(parts))
    if missing:
        raise RuntimeError(f"search parts missing for {missing}; their decode jobs must run first")
    arrays = []
    for name in parts_expected:
        p = parts[name]
        shape = (vocab, p.k)
        layers, neurons = unpack(p.layers, INT32, shape), unpack(p.neurons, INT32, shape)
        ids = np.where(layers >= 0, layers.astype(np.int64) * d_mlp + neurons, -1)
        arrays.append((unpack(p.scores, FLOAT32, shape), ids, unpack(p.probs, FLOAT32, shape)))
    write_token_index(session, model_id, arrays, d_mlp, vocab)
    queries.delete_search_parts(session, model_id, keep=parts_expected)
    return vocab


def write_token_index(session: Session, model_id: int, arrays: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      width: int, vocab: int, basis: int = queries.NEURONS) -> None:
    """A basis's token_index from its parts' [vocab x k] (scores, ids, probs), an id being
    layer * width + index within the layer."""
    scores, ids, probs = merge_search_parts(arrays)
    # padding (id -1, fewer units than k) sorts last, so each token keeps a prefix
    kept = (ids >= 0).sum(axis=1)
    columns = {
        "layers": pack_rows(ids // width, INT32, kept),
        "neurons": pack_rows(ids % width, INT32, kept),
        "scores": pack_rows(scores, FLOAT32, kept),
        "probs": pack_rows(probs, FLOAT32, kept),
    }
    rows = [{"token_id": t, **{name: blobs[t] for name, blobs in columns.items()}} for t in range(vocab)]
    queries.replace_token_index(session, model_id, rows, basis)


def activation_rows(res: LayerExamples) -> list[dict]:
    """One neuron_activations row per neuron of a layer, arrays packed once per layer."""
    n = len(res.max)
    # a mixture of experts' neuron counts the tokens routed to its expert (its statistics are over them)
    counted = [res.tokens] * n if res.unit_tokens is None else res.unit_tokens.tolist()
    tokens = np.maximum(res.tokens if res.unit_tokens is None else res.unit_tokens, 1)
    blobs = pack_units(EXAMPLES, res)
    if res.neg_windows is not None:  # a gated MLP's neurons: their top negative contexts too
        blobs.update(pack_units(NEGATIVES, res))
    freq = (res.positive / tokens).tolist()
    above = (res.above / tokens).tolist()
    thr = [None if np.isnan(t) else t for t in res.threshold.tolist()]
    mean, std, lo, hi = res.mean.tolist(), res.std.tolist(), res.min.tolist(), res.max.tolist()
    # silent: its largest |activation| under SILENT_SHARE of the layer's median one (dead, for SiLU and GELU)
    peak = np.maximum(np.abs(res.min.astype(np.float64)), np.abs(res.max.astype(np.float64)))
    silent = (peak < SILENT_SHARE * float(np.median(peak)) if n else peak > 0).tolist()
    return [
        {
            "layer": res.layer,
            "neuron": i,
            "tokens": counted[i],
            "frequency": freq[i],
            "frequency_above": above[i],
            "threshold": thr[i],
            "silent": silent[i],
            "mean": mean[i],
            "std": std[i],
            "min_act": lo[i],
            "max_act": hi[i],
            **{field: rows[i] for field, rows in blobs.items()},
        }
        for i in range(n)
    ]


def shown_windows(corpus: Corpus, results: Sequence[LayerExamples]) -> list[dict]:
    """The example_windows rows of the windows some unit of these results shows."""
    shown = np.unique(np.concatenate([np.concatenate([r.top_windows.ravel(), r.int_windows.ravel()]
                                                     + ([r.neg_windows.ravel()] if r.neg_windows is not None else []))
                                     for r in results]))
    shown = shown[shown >= 0]
    windows = corpus.windows[torch.from_numpy(shown.astype(np.int64))].numpy() if len(shown) else np.zeros((0, 0))
    return [
        {"window": int(w), "source": corpus.sources[int(w)], "token_ids": blob}
        for w, blob in zip(shown.tolist(), pack_rows(windows, INT32) if len(shown) else [])
    ]


FIRING_TOP = 50  # units kept per token in the firing index


def firing_rows(corpus: Corpus, results: Sequence[LayerExamples]) -> list[dict]:
    """The firing index of one basis: per vocabulary token, the units whose top contexts peak
    on it (the token at their max, where they fire: max > 0), ranked by how many of their top
    windows do, then by their highest activation there; FIRING_TOP per token."""
    token_ids, layers, units, acts = [], [], [], []
    windows = corpus.windows.numpy()
    for res in results:
        shown = (res.top_windows >= 0) & (res.top_max > 0)  # a window where the unit did not fire peaks nowhere
        unit, _ = np.nonzero(shown)
        token_ids.append(windows[res.top_windows[shown], res.top_pos[shown].astype(np.int64)])
        layers.append(np.full(len(unit), res.layer, dtype=np.int64))
        units.append(unit.astype(np.int64))
        acts.append(res.top_max[shown].astype(np.float32))
    if not units or not sum(len(u) for u in units):
        return []
    token, layer, unit, act = (np.concatenate(x) for x in (token_ids, layers, units, acts))
    # one entry per (token, layer, unit): its count of top windows and its highest activation
    order = np.lexsort((-act, unit, layer, token))
    token, layer, unit, act = token[order], layer[order], unit[order], act[order]
    first = np.ones(len(token), dtype=bool)
    first[1:] = (token[1:] != token[:-1]) | (layer[1:] != layer[:-1]) | (unit[1:] != unit[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(token)))
    token, layer, unit, act = token[starts], layer[starts], unit[starts], act[starts]  # act: the group's highest
    # per token: most windows first, then the highest activation, then layer and unit
    order = np.lexsort((unit, layer, -act, -counts, token))
    token, layer, unit, act, counts = token[order], layer[order], unit[order], act[order], counts[order]
    bounds = np.flatnonzero(np.diff(token)) + 1
    rows = []
    for lo, hi in zip(np.append(0, bounds), np.append(bounds, len(token))):
        hi = min(hi, lo + FIRING_TOP)
        rows.append({"token_id": int(token[lo]), "layers": pack(layer[lo:hi], INT32), "units": pack(unit[lo:hi], INT32),
                     "counts": pack(counts[lo:hi], INT32), "acts": pack(act[lo:hi], FLOAT32)})
    return rows


def write_examples(session: Session, model_id: int, run: dict, corpus: Corpus, results: Sequence[LayerExamples]) -> None:
    """Replace the model's examples: the run, the windows some neuron shows, every neuron's row
    (the firing index of the neurons with them; the SAEs' latents' go)."""
    rows = [row for res in results for row in activation_rows(res)]
    queries.replace_examples(session, model_id, run, shown_windows(corpus, results), rows)
    queries.replace_firing_index(session, model_id, queries.NEURONS, firing_rows(corpus, results))


def write_unit_examples(session: Session, model_id: int, basis: int, corpus: Corpus,
                        results: Sequence[LayerExamples]) -> None:
    """Replace one basis's examples (an SAE's latents) over the model's stored run: the windows
    they show that no neuron showed are added."""
    queries.add_example_windows(session, model_id, shown_windows(corpus, results))
    queries.replace_unit_activations(session, model_id, basis, [row for res in results for row in activation_rows(res)])
    queries.replace_firing_index(session, model_id, basis, firing_rows(corpus, results))
