"""The compare stage: two models of one shape compared neuron by neuron (Davies 2025, 3.3).

A job of model A keyed by model B's id. Per layer, from the stored decodings of both: whether a
neuron's top input-weight token is the same token id, and how many of its top TOP decoded tokens
the two share; from both models' weights: the cosine of the neuron's input weights (the up_proj
row for gated MLPs, as decoded). app/compare.py shows the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from app import compare, queries
from app.arrays import FLOAT32, INT32, UINT8, pack, unpack
from app.errors import NeedleError

TOP = compare.TOP
ROWS = 4096  # input-weight rows compared at a time


def top_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, how many of the ids in a's row are in b's ([n, k] each; ids within a row are distinct)."""
    return (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)


def layer_tops(rows: list[tuple[int, int, bytes]], d_mlp: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(top token id [d_mlp], top TOP ids [d_mlp, TOP], -1 where fewer are kept) from stored rows."""
    if len(rows) != d_mlp:
        raise NeedleError(f"{what} has {len(rows)} of its {d_mlp} neurons decoded.", hint="Run needle index on it first.")
    top = np.array([t for _, t, _ in rows], dtype=np.int64)
    # one decode wrote every row with the same number of tokens (TOP_IN, or the vocabulary if smaller)
    stored = unpack(b"".join(blob for _, _, blob in rows), INT32).reshape(d_mlp, -1)[:, :TOP]
    ids = np.full((d_mlp, TOP), -1, dtype=np.int64)
    ids[:, :stored.shape[1]] = stored
    return top, ids


def input_cosines(wa: torch.Tensor, wb: torch.Tensor) -> np.ndarray:
    """Row by row cosine of two [d_mlp, d_model] weight matrices (NaN where a row is all zeros)."""
    out = np.empty(wa.shape[0], dtype=np.float32)
    device = wa.device
    for start in range(0, wa.shape[0], ROWS):
        x = wa[start:start + ROWS].float()
        y = wb[start:start + ROWS].to(device).float()
        dot = (x * y).sum(dim=1)
        norms = x.norm(dim=1) * y.norm(dim=1)
        cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.nan)
        out[start:start + ROWS] = cos.clamp(-1, 1).cpu().numpy()
    return out


def run_compare(ctx) -> Any:
    b_id = int(ctx.params["b"])
    spec_type = type(ctx.model)

    def read_models(session: Session):
        a, b = queries.get_model_by_id(session, ctx.model.id), queries.get_model_by_id(session, b_id)
        if a is None or b is None:
            raise NeedleError("A model of this comparison was deleted.", hint="Register both and run needle compare again.")
        compare.check_comparable(session, a, b)
        return spec_type.of(b), compare.model_stamp(a), compare.model_stamp(b), b.name

    spec_b, a_updated, b_updated, b_name = ctx.read(read_models)
    a_model, b_model = ctx.load(ctx.model), ctx.load(spec_b)
    n_layers, d_mlp = ctx.model.n_layers, ctx.model.d_mlp
    same = np.zeros(n_layers * d_mlp, dtype=np.uint8)
    overlap = np.zeros(n_layers * d_mlp, dtype=np.uint8)
    cosine = np.zeros(n_layers * d_mlp, dtype=np.float32)
    ctx.set_total(n_layers)
    with torch.no_grad():
        for layer in range(n_layers):
            rows_a, rows_b = ctx.read(lambda s, layer=layer: (
                queries.layer_top_tokens(s, ctx.model.id, layer), queries.layer_top_tokens(s, b_id, layer)))
            top_a, ids_a = layer_tops(rows_a, d_mlp, ctx.model.name)
            top_b, ids_b = layer_tops(rows_b, d_mlp, b_name)
            at = slice(layer * d_mlp, (layer + 1) * d_mlp)
            same[at] = top_a == top_b
            overlap[at] = top_overlap(np.where(ids_a < 0, -1, ids_a), np.where(ids_b < 0, -2, ids_b))
            cosine[at] = input_cosines(a_model.adapter.input_weights(layer), b_model.adapter.input_weights(layer))
            ctx.advance(1)
    info = {"top": TOP, "a_updated": a_updated, "b_updated": b_updated}
    blobs = {"same": pack(same, UINT8), "overlap": pack(overlap, UINT8), "cosine": pack(cosine, FLOAT32)}

    def write(session: Session) -> None:
        queries.put_comparison(session, ctx.model.id, b_id, info=info, **blobs)

    return write
