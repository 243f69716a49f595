"""LM-head decoding of MLP neuron weights (Davies 2025) and the token search index.

For each neuron, with W_U the unembedding [vocab x d_model]:
- input side: p = softmax(W_U . w_in) (w_in: the neuron's input weights, the up_proj row for
  gated MLPs; times the final norm's weight with decode_norm="final"). Kept: the top tokens
  with p and the normalised score s = p / mean(top-100 p).
- output side: the direct logit effect W_U . w_out (raw logits, no bias, no norm): the most
  promoted and most suppressed tokens.
- search index: for every vocabulary token, the top-k neurons by s, merged batch by batch
  (a running top-k over the columns of the [batch x vocab] score matrix).

Neurons go through in batches: the [neurons x vocab] matrix is never held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

TOP_IN = 20  # input-weight tokens kept per neuron
TOP_OUT = 10  # promoted / suppressed tokens kept per neuron
NORMALISER_K = 100  # s = p / mean of the neuron's top-100 p
SEARCH_K = 50  # neurons kept per vocabulary token


@dataclass
class LayerDecoding:
    """One layer's decodings, numpy arrays with one row per neuron."""

    layer: int
    in_ids: np.ndarray  # [n, TOP_IN] int
    in_probs: np.ndarray  # [n, TOP_IN]
    in_scores: np.ndarray  # [n, TOP_IN]
    mean_top100: np.ndarray  # [n]
    out_pos_ids: np.ndarray  # [n, TOP_OUT], most promoted first
    out_pos_logits: np.ndarray
    out_neg_ids: np.ndarray  # [n, TOP_OUT], most suppressed first
    out_neg_logits: np.ndarray


class RunningTopK:
    """For every column (vocabulary token), the k best (score, row id) pairs seen so far.

    Until k rows have been seen, batches are merged densely. After that each column's k-th
    best score is a threshold: a batch adds only its entries above it to a buffer of
    candidates (a few per column, fewer as more rows are seen), and the buffer is merged
    into the [k x columns] table by one sort when it grows past k entries per column, and
    at the end. The result equals a top-k over all rows at once.
    """

    def __init__(self, k: int, n_cols: int, device: torch.device):
        self.k, self.n_cols = k, n_cols
        self.scores = torch.full((k, n_cols), -torch.inf, device=device)
        self.ids = torch.full((k, n_cols), -1, dtype=torch.long, device=device)
        self.rows_seen = 0
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0

    def update(self, scores: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Merge a [batch x columns] block whose rows have ids row_ids [batch]."""
        if self.rows_seen < self.k:
            self._merge_dense(scores, row_ids)
        else:
            rows, cols = torch.nonzero(scores > self.scores[-1], as_tuple=True)
            if rows.numel():
                self._buffer.append((scores[rows, cols], row_ids[rows], cols))
                self._buffered += rows.numel()
                if self._buffered > self.k * self.n_cols:
                    self._compact()
        self.rows_seen += scores.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([k x columns] scores, [k x columns] row ids), best first; id -1 where fewer than k rows."""
        self._compact()
        return self.scores, self.ids

    def _merge_dense(self, scores: torch.Tensor, row_ids: torch.Tensor) -> None:
        cat_scores = torch.cat([self.scores, scores], dim=0)
        cat_ids = torch.cat([self.ids, row_ids[:, None].expand(-1, scores.shape[1])], dim=0)
        top = cat_scores.topk(self.k, dim=0)
        self.scores, self.ids = top.values, cat_ids.gather(0, top.indices)

    def _compact(self) -> None:
        if not self._buffer:
            return
        device = self.scores.device
        table_cols = torch.arange(self.n_cols, device=device).repeat(self.k)
        s = torch.cat([self.scores.flatten(), *(b[0] for b in self._buffer)])
        i = torch.cat([self.ids.flatten(), *(b[1] for b in self._buffer)])
        c = torch.cat([table_cols, *(b[2] for b in self._buffer)])
        self._buffer, self._buffered = [], 0
        # group by column, best score first within a column
        order = torch.argsort(s, descending=True, stable=True)
        order = order[torch.argsort(c[order], stable=True)]
        s, i, c = s[order], i[order], c[order]
        counts = torch.bincount(c, minlength=self.n_cols)
        rank = torch.arange(len(c), device=device) - (torch.cumsum(counts, 0) - counts)[c]
        keep = rank < self.k
        self.scores[rank[keep], c[keep]] = s[keep]
        self.ids[rank[keep], c[keep]] = i[keep]


def compute_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Matmuls run in the weights' dtype on a GPU and in float32 on the CPU."""
    return weight_dtype if device.type == "cuda" else torch.float32


def decode_layers(
    adapter,
    layers: Sequence[int],
    *,
    decode_norm: str = "none",
    batch_size: int = 512,
    search: RunningTopK | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[LayerDecoding]:
    """Decode every neuron of `layers`, yielding one LayerDecoding per layer.

    If `search` is given it is updated with every neuron's scores, neuron ids being
    layer * d_mlp + neuron. `progress(n)` is called after each batch of n neurons.
    """
    with torch.no_grad():
        w_u = adapter.unembedding()
        device = w_u.device
        cdtype = compute_dtype(w_u.dtype, device)
        w_u_t = w_u.to(cdtype).T
        bias = adapter.head_bias()
        bias = bias.float() if bias is not None else None
        softcap = adapter.logit_softcap
        scale = adapter.final_norm_scale() if decode_norm == "final" else None
        if decode_norm == "final" and scale is None:
            raise ValueError("decode_norm='final' but the model has no final norm weight")
        scale = scale.to(cdtype) if scale is not None else None
        vocab = w_u.shape[0]
        k_norm = min(NORMALISER_K, vocab)
        k_in, k_out = min(TOP_IN, vocab), min(TOP_OUT, vocab)
        d_mlp = adapter.d_mlp

        for layer in layers:
            w_in_all = adapter.input_weights(layer)
            w_out_all = adapter.output_weights(layer)
            parts: dict[str, list[torch.Tensor]] = {f: [] for f in LayerDecoding.__dataclass_fields__ if f != "layer"}
            for start in range(0, d_mlp, batch_size):
                stop = min(start + batch_size, d_mlp)
                w_in = w_in_all[start:stop].to(cdtype)
                if scale is not None:
                    w_in = w_in * scale
                logits = (w_in @ w_u_t).float()
                if bias is not None:
                    logits += bias
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                probs = torch.softmax(logits, dim=-1)
                del logits
                top = probs.topk(k_norm, dim=-1)
                mean100 = top.values.mean(dim=-1)
                parts["in_ids"].append(top.indices[:, :k_in])
                parts["in_probs"].append(top.values[:, :k_in])
                parts["in_scores"].append(top.values[:, :k_in] / mean100[:, None])
                parts["mean_top100"].append(mean100)
                if search is not None:
                    scores = probs.div_(mean100[:, None])
                    ids = torch.arange(start, stop, device=device) + layer * d_mlp
                    search.update(scores, ids)
                del probs

                direct = (w_out_all[start:stop].to(cdtype) @ w_u_t).float()
                pos = direct.topk(k_out, dim=-1)
                neg = direct.topk(k_out, dim=-1, largest=False)
                parts["out_pos_ids"].append(pos.indices)
                parts["out_pos_logits"].append(pos.values)
                parts["out_neg_ids"].append(neg.indices)
                parts["out_neg_logits"].append(neg.values)
                del direct
                if progress is not None:
                    progress(stop - start)
            yield LayerDecoding(
                layer=layer, **{f: torch.cat(ts).cpu().numpy() for f, ts in parts.items()}
            )


def merge_search_parts(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int = SEARCH_K
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard [vocab x k] (scores, global neuron ids, probs) into the top k per
    token, best first. Entries with id -1 (a shard with fewer than k neurons) sort last."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    probs = np.concatenate([p[2] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    k = min(k, scores.shape[1])
    # best score first; ties go to the lower neuron id, so any sharding merges the same
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(scores), take(ids), take(probs)
