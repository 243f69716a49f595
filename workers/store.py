"""Stage results into the schema, through app.queries. Each writer runs inside the
caller's transaction, so a job's results land whole or not at all."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy.orm import Session

from app import queries
from app.arrays import FLOAT32, INT32, pack, unpack
from workers.decode import LayerDecoding, merge_search_parts


def neuron_rows(dec: LayerDecoding) -> list[dict]:
    rows = []
    for i in range(len(dec.mean_top100)):
        rows.append(
            {
                "layer": dec.layer,
                "neuron": i,
                "top_token_id": int(dec.in_ids[i, 0]),
                "top_prob": float(dec.in_probs[i, 0]),
                "top_score": float(dec.in_scores[i, 0]),
                "mean_top100": float(dec.mean_top100[i]),
                "in_ids": pack(dec.in_ids[i], INT32),
                "in_probs": pack(dec.in_probs[i], FLOAT32),
                "in_scores": pack(dec.in_scores[i], FLOAT32),
                "out_pos_ids": pack(dec.out_pos_ids[i], INT32),
                "out_pos_logits": pack(dec.out_pos_logits[i], FLOAT32),
                "out_neg_ids": pack(dec.out_neg_ids[i], INT32),
                "out_neg_logits": pack(dec.out_neg_logits[i], FLOAT32),
            }
        )
    return rows


def write_decodings(session: Session, model_id: int, decodings: Sequence[LayerDecoding]) -> None:
    rows = [r for dec in decodings for r in neuron_rows(dec)]
    queries.replace_neurons(session, model_id, [d.layer for d in decodings], rows)


def write_search_part(
    session: Session, model_id: int, part: str, scores: np.ndarray, ids: np.ndarray, mean_top100: np.ndarray, d_mlp: int
) -> None:
    """scores, ids: [vocab x k] for one shard; mean_top100 indexed by global neuron id."""
    valid = ids >= 0
    probs = np.where(valid, scores * mean_top100[np.where(valid, ids, 0)], 0.0)
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
    scores, ids, probs = merge_search_parts(arrays)
    rows = []
    for t in range(vocab):
        keep = ids[t] >= 0
        rows.append(
            {
                "token_id": t,
                "layers": pack(ids[t][keep] // d_mlp, INT32),
                "neurons": pack(ids[t][keep] % d_mlp, INT32),
                "scores": pack(scores[t][keep], FLOAT32),
                "probs": pack(probs[t][keep], FLOAT32),
            }
        )
    queries.replace_token_index(session, model_id, rows)
    queries.delete_search_parts(session, model_id, keep=parts_expected)
    return vocab
