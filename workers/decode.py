"""LM-head decoding of MLP neuron weights (Davies 2025) and the token search index.

For each neuron, with W_U the unembedding [vocab x d_model]:
- input side: p = softmax(W_U . w_in) (w_in: the neuron's input weights, the up_proj row for
  gated MLPs; times the final norm's weight with decode_norm="final"). Kept: the top tokens
  with p and the normalised score s = p / mean(top-100 p).
  Also the decoding's entropy H = -sum p log p (in nats; pages show bits against log2 V), from
  the logits at hand: H = log Z - E_p[logit], log Z = logit_top - log p_top.
  A head's own scale (Granite, Cohere) and soft-cap (Gemma-2/3) are applied, as the head applies them.
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
    entropy: np.ndarray | None = None  # [n] nats, of the whole input-side decoding


class RunningTopK:
    """For every column (vocabulary token), the k best (score, row id) pairs seen so far.

    The table is [columns x k], best first. Until DENSE_ROWS (at least k) rows have been
    seen, batches are merged densely. After that each column's k-th best score is a
    threshold: a batch adds only its entries above it to a buffer of candidates (many per
    column at first, then fewer as more rows are seen). The buffer is merged when it holds k entries per column on
    average or MAX_PENDING for one column, and at the end: candidates are grouped by
    column with one integer sort, scattered into a padded [columns x width] block, and
    each row of [table | block] keeps its top k. The result equals a top-k over all rows.
    """

    MAX_PENDING = 256
    # Rows merged densely before switching to thresholds: early thresholds are loose, and a
    # dense merge is cheaper than buffering millions of candidates.
    DENSE_ROWS = 2048

    def __init__(self, k: int, n_cols: int, device: torch.device):
        self.k, self.n_cols, self.device = k, n_cols, device
        self.scores = torch.full((n_cols, k), -torch.inf, device=device)
        self.ids = torch.full((n_cols, k), -1, dtype=torch.int32, device=device)
        self._threshold = self.scores[:, -1].contiguous()
        self._mask: torch.Tensor | None = None
        self.rows_seen = 0
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._pending = torch.zeros(n_cols, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Merge a [batch x columns] block whose rows have ids row_ids [batch]."""
        row_ids = row_ids.to(torch.int32)
        if self.rows_seen < max(self.k, self.DENSE_ROWS):
            self._merge(scores.T, row_ids[None, :].expand(self.n_cols, -1))
        else:
            if self._mask is None or self._mask.shape[0] < scores.shape[0]:
                self._mask = torch.empty(scores.shape, dtype=torch.bool, device=self.device)
            mask = torch.gt(scores, self._threshold, out=self._mask[: scores.shape[0]])
            flat = torch.nonzero(mask.view(-1)).squeeze(1)
            if flat.numel():
                rows, cols = flat // self.n_cols, flat % self.n_cols
                self._buffer.append((scores.reshape(-1)[flat], row_ids[rows], cols))
                self._buffered += flat.numel()
                self._pending += torch.bincount(cols, minlength=self.n_cols)
                if self._buffered > self.k * self.n_cols or int(self._pending.max()) > self.MAX_PENDING:
                    self._compact()
        self.rows_seen += scores.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([columns x k] scores, [columns x k] row ids), best first; id -1 where fewer than k rows."""
        self._compact()
        return self.scores, self.ids

    def _merge(self, block_scores: torch.Tensor, block_ids: torch.Tensor) -> None:
        """Keep the top k of every row of [table | block] ([columns x width] blocks)."""
        cat_scores = torch.cat([self.scores, block_scores], dim=1)
        top = cat_scores.topk(self.k, dim=1)
        self.scores = top.values
        self.ids = torch.cat([self.ids, block_ids], dim=1).gather(1, top.indices)
        self._threshold = self.scores[:, -1].contiguous()

    def _compact(self) -> None:
        if not self._buffer:
            return
        s = torch.cat([b[0] for b in self._buffer])
        i = torch.cat([b[1] for b in self._buffer])
        c = torch.cat([b[2] for b in self._buffer])
        counts = self._pending
        self._buffer, self._buffered = [], 0
        self._pending = torch.zeros_like(counts)
        order = torch.argsort(c, stable=True)
        s, i, c = s[order], i[order], c[order]
        rank = torch.arange(len(c), device=self.device) - (torch.cumsum(counts, 0) - counts)[c]
        width = int(counts.max())
        block_scores = torch.full((self.n_cols, width), -torch.inf, device=self.device)
        block_ids = torch.full((self.n_cols, width), -1, dtype=torch.int32, device=self.device)
        block_scores[c, rank] = s
        block_ids[c, rank] = i
        self._merge(block_scores, block_ids)


def rowwise_topk(x: torch.Tensor, k: int, *, largest: bool = True, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) for a wide [rows x n] matrix, through chunk maxima.

    The k-th best entry of a row lies in one of the k chunks with the best maxima (any
    chunk with a better maximum holds a better entry, and there are fewer than k of
    those), so only those chunks and the ragged tail are searched: one pass over the
    row instead of a selection over all of it. Same values as torch.topk, best first.
    """
    rows, n = x.shape
    n_chunks = n // chunk
    if n_chunks < 4 * k:
        return x.topk(k, dim=-1, largest=largest)
    body = x[:, : n_chunks * chunk].unflatten(1, (n_chunks, chunk))
    bests = body.amax(dim=-1) if largest else body.amin(dim=-1)
    chunks = bests.topk(k, dim=-1, largest=largest).indices
    offsets = torch.arange(chunk, device=x.device)
    candidates = (chunks[:, :, None] * chunk + offsets).flatten(1)
    if n_chunks * chunk < n:
        tail = torch.arange(n_chunks * chunk, n, device=x.device).expand(rows, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    top = x.gather(1, candidates).topk(k, dim=-1, largest=largest)
    return top.values, candidates.gather(1, top.indices)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a @ b as float32, into `out` when given."""
    if out is None:
        return (a @ b).float()
    return torch.matmul(a, b, out=out)


def _softmax(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dimension, into `out` when given."""
    if out is None:
        return torch.softmax(x, dim=-1)
    try:
        return torch.ops.aten._softmax.out(x, -1, False, out=out)
    except (AttributeError, RuntimeError):  # an aten without the out= variant
        return out.copy_(torch.softmax(x, dim=-1))


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
        logit_scale = getattr(adapter, "logit_scale", None)  # Granite's and Cohere's head temperature
        scale = adapter.final_norm_scale() if decode_norm == "final" else None
        if decode_norm == "final" and scale is None:
            raise ValueError("decode_norm='final' but the model has no final norm weight")
        scale = scale.to(cdtype) if scale is not None else None
        vocab = w_u.shape[0]
        k_norm = min(NORMALISER_K, vocab)
        k_in, k_out = min(TOP_IN, vocab), min(TOP_OUT, vocab)
        d_mlp = adapter.d_mlp

        # On the CPU the [batch x vocab] blocks live in two buffers reused by every batch:
        # fresh 100 MB tensors would be mapped and page-faulted in anew each time.
        buffers = None
        if device.type == "cpu":
            rows = min(batch_size, d_mlp)
            buffers = (torch.empty(rows, vocab), torch.empty(rows, vocab))

        for layer in layers:
            w_in_all = adapter.input_weights(layer)
            w_out_all = adapter.output_weights(layer)
            parts: dict[str, list[torch.Tensor]] = {f: [] for f in LayerDecoding.__dataclass_fields__ if f != "layer"}
            for start in range(0, d_mlp, batch_size):
                stop = min(start + batch_size, d_mlp)
                n = stop - start
                w_in = w_in_all[start:stop].to(cdtype)
                if scale is not None:
                    w_in = w_in * scale
                logits = _matmul(w_in, w_u_t, buffers[0][:n] if buffers else None)
                if bias is not None:
                    logits += bias
                if logit_scale:
                    logits.mul_(logit_scale)
                if softcap:
                    logits.div_(softcap).tanh_().mul_(softcap)
                probs = _softmax(logits, buffers[1][:n] if buffers else None)
                top_p, top_ids = rowwise_topk(probs, k_norm)
                mean100 = top_p.mean(dim=-1)
                # H = log Z - E_p[logit]; log Z from the top token (p_top > 0: its log is finite). The
                # logits are not needed after this: p * logit is written over them (in their CPU buffer,
                # a third of the time of a batched dot product) and summed
                log_z = logits.gather(1, top_ids[:, :1]).squeeze(1) - top_p[:, 0].log()
                expected = logits.mul_(probs).sum(dim=1)
                parts["entropy"].append((log_z - expected).clamp_min(0.0))
                del logits
                parts["in_ids"].append(top_ids[:, :k_in])
                parts["in_probs"].append(top_p[:, :k_in])
                parts["in_scores"].append(top_p[:, :k_in] / mean100[:, None])
                parts["mean_top100"].append(mean100)
                if search is not None:
                    scores = probs.div_(mean100[:, None])
                    ids = torch.arange(start, stop, device=device) + layer * d_mlp
                    search.update(scores, ids)
                del probs

                direct = _matmul(w_out_all[start:stop].to(cdtype), w_u_t, buffers[0][:n] if buffers else None)
                pos_logits, pos_ids = rowwise_topk(direct, k_out)
                neg_logits, neg_ids = rowwise_topk(direct, k_out, largest=False)
                parts["out_pos_ids"].append(pos_ids)
                parts["out_pos_logits"].append(pos_logits)
                parts["out_neg_ids"].append(neg_ids)
                parts["out_neg_logits"].append(neg_logits)
                del direct
                if progress is not None:
                    progress(n)
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
