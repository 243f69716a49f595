"""What makes a neuron fire: max-activating contexts, interval samples and activation
statistics, from one streaming pass over a corpus.

Method (the neuron page quotes it):

- The corpus is cut into windows of `context` tokens (workers/corpus.py). Batches of
  windows run through the model once; a pre-hook on each layer's MLP output projection
  hands every layer's activations [batch, context, d_mlp] to that layer's accumulator,
  on the model's device, and the forward pass stops after the last layer read (the LM
  head is not needed).
- Top contexts: for each window and neuron, the window's max. A running top-k per neuron
  (k = 20) keeps the best windows with their per-token activations (float16), so no second
  pass is needed. A window's key is (max, earlier window first), so ties resolve the same
  way whatever the batch size, and a window appears at most once per neuron.
- Interval samples: 5 equal-width bins between 0 and the neuron's max; a window belongs to
  the bin of its own max. The max comes from a first pass over an evenly spaced sample of
  the windows (every `stride`-th, 1/20 of the corpus and at least 256 windows); a window
  above the estimate falls in the last bin, whose upper edge becomes the true max. Each bin
  keeps 5 windows drawn uniformly at random by priority sampling (a reservoir sample: the
  5 windows with the smallest hash of (layer, neuron, window)), so the draw is the same
  whatever the batch size or device. Each bin's share is the fraction of this neuron's
  firing tokens (activation > 0) whose activation falls in that bin.
- Statistics over every token: frequency (share of tokens with activation > 0), the share
  above the threshold (the first interval edge, 1/5 of the estimated max), mean, std, min,
  max, and a 48-bin histogram over the estimated range widened by a quarter of it at each
  end; its end bins also hold anything beyond that (their outer edges are then the true min
  and max). The page drops empty bins at either end and clips the outer edges to the true
  min and max.
- Top negative contexts, for the neurons of gated MLPs (SwiGLU, GeGLU: silu(gate) * up is as
  often negative as positive): the same running top-k over each window's min, most negative
  first (key (-min, earlier window first)), kept beside the top contexts. Not read for other
  MLPs (a GELU's least value is about -0.17 of its input scale) or for SAE latents (never
  negative).
- When the tokenizer prefixes its own BOS token, each window is run with it in front and
  the BOS position is left out of everything.
- A mixture of experts' neuron is read on the tokens routed to its expert only: a window
  counts for its top contexts, samples and negatives by its routed tokens (one with none is
  left out), its max and min are over them, and every statistic (frequency, mean, histogram,
  min, max) is over them, `tokens` being their count. Its stored per-token activations keep 0
  where the expert did not run.

The same pass serves any basis of units (`Units`): the neurons read as above, or a sparse
autoencoder's latents, its encoder applied to the activations read at its site of its layer
(workers/sae.py); every figure above is then a latent's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from workers.devices import compute_device

TOP_K = 20
BINS = 5
PER_BIN = 5
HIST_BINS = 48
HIST_MARGIN = 0.25  # the histogram reaches this share of the estimated range beyond each end
ESTIMATE_FRACTION = 20  # the first pass reads every 20th window
ESTIMATE_MIN_WINDOWS = 256
MIN_KEY = -(2**63)  # below every real key (a real key needs a NaN max to reach it)
EMPTY_KEY = 2**63 - 1  # above every real priority key
MASK32 = 0xFFFFFFFF
HASH_MOD = 2**31 - 1


class StopForward(Exception):
    """Raised from the last hook read: the rest of the forward pass is not needed."""


@dataclass(frozen=True)
class Units:
    """What a pass reads at each layer: the MLP neurons (site "mlp", no encoder), or an SAE's
    latents: `encode` applied to the activations at `site` ([..., d_in] -> [..., width])."""

    site: str = "mlp"
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    width: int | None = None  # None: the adapter's d_mlp

    def size(self, adapter) -> int:
        return adapter.d_mlp if self.width is None else self.width

    def reads_negatives(self, adapter) -> bool:
        """Whether the pass keeps the top negative contexts: for a gated MLP's neurons only."""
        return self.encode is None and adapter.gated

    def reads_routing(self, adapter) -> bool:
        """Whether each unit is read on the tokens routed to it only: a mixture of experts' neurons."""
        return self.encode is None and adapter.n_experts is not None


NEURON_UNITS = Units()


@dataclass
class Plan:
    """How a run reads the corpus: batches of windows and the estimate sample."""

    batch_windows: int
    estimate_ids: torch.Tensor  # window ids of the first pass


def plan(n_windows: int, context: int, batch_tokens: int) -> Plan:
    stride = max(1, min(ESTIMATE_FRACTION, n_windows // ESTIMATE_MIN_WINDOWS))
    return Plan(max(1, batch_tokens // context), torch.arange(0, n_windows, stride))


def ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 whose order is the floats' order (for composite sort keys)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def priority(layer: int, neurons: torch.Tensor, window_ids: torch.Tensor) -> torch.Tensor:
    """A hash in [0, 2^31) of (layer, neuron, window): uniform enough to draw samples by, the
    same on every device (int64 arithmetic that never overflows)."""
    x = (window_ids[:, None] * 1_000_003 + neurons[None, :] * 7_919 + layer * 104_729 + 12_345) % HASH_MOD
    for _ in range(3):
        x = (x * 48_271) % HASH_MOD
        x = x ^ (x >> 13)
        x = (x * 69_621) % HASH_MOD
    return x


@dataclass
class LayerExamples:
    """One layer's results, as numpy arrays on the CPU, neurons first."""

    layer: int
    top_windows: np.ndarray  # int32 [N, K], -1 where the corpus had fewer windows
    top_max: np.ndarray  # float32 [N, K]
    top_pos: np.ndarray  # int16 [N, K] index of the max token in its window
    top_acts: np.ndarray  # float16 [N, K, T]
    int_windows: np.ndarray  # int32 [N, BINS, PER_BIN], -1 where a bin had fewer windows
    int_max: np.ndarray  # float32 [N, BINS, PER_BIN]
    int_pos: np.ndarray  # int16 [N, BINS, PER_BIN]
    int_acts: np.ndarray  # float16 [N, BINS, PER_BIN, T]
    int_edges: np.ndarray  # float32 [N, BINS + 1]
    int_counts: np.ndarray  # int64 [N, BINS] firing tokens per bin
    tokens: int
    positive: np.ndarray  # int64 [N] tokens with activation > 0
    above: np.ndarray  # int64 [N] tokens above the threshold
    threshold: np.ndarray  # float32 [N]
    mean: np.ndarray  # float64 [N]
    std: np.ndarray  # float64 [N]
    min: np.ndarray  # float32 [N]
    max: np.ndarray  # float32 [N]
    hist_edges: np.ndarray  # float32 [N, HIST_BINS + 1]
    hist_counts: np.ndarray  # int64 [N, HIST_BINS]
    # the top negative contexts (gated MLPs' neurons), as the top_* fields, by each window's min
    # (most negative first); None where they are not read
    neg_windows: np.ndarray | None = None  # int32 [N, K]
    neg_min: np.ndarray | None = None  # float32 [N, K]
    neg_pos: np.ndarray | None = None  # int16 [N, K] index of the min token in its window
    neg_acts: np.ndarray | None = None  # float16 [N, K, T]
    # a mixture of experts' neurons: the tokens routed to each one's expert, what its statistics count
    unit_tokens: np.ndarray | None = None  # int64 [N]


def merge_top(key: torch.Tensor, pos: torch.Tensor, kept: torch.Tensor, new_key: torch.Tensor,
              acts: torch.Tensor, *, lowest: bool = False,
              search: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A running top-k of windows per unit: the k best of the kept (key, pos, kept acts [k, T, N])
    and a batch's windows (new_key [B, N], acts [B, T, N]) by key. A new window's pos is the
    index of its max (lowest: its min) over its tokens, found on the k windows gathered, not on
    the whole batch (an arg-reduction over [B, T, N] cost more than the rest of the merge).
    `search` (acts with the tokens not to be found set to -inf, or +inf for lowest) is where
    the index is looked for, when not acts."""
    k, t, n = kept.shape
    merged_key, idx = torch.cat([key, new_key]).topk(k, dim=0)
    from_new = idx >= k
    old_i = idx.clamp(max=k - 1)
    new_i = (idx - k).clamp(min=0)
    gathered = acts.gather(0, new_i[:, None, :].expand(k, t, n))
    looked = gathered if search is None else search.gather(0, new_i[:, None, :].expand(k, t, n))
    # (max/min with indices: their kernel is several times faster than argmax/argmin over a middle dimension)
    new_pos = (looked.min(dim=1) if lowest else looked.max(dim=1)).indices
    pos = torch.where(from_new, new_pos, pos.gather(0, old_i))
    kept = torch.where(from_new[:, None, :], gathered.to(torch.float16),
                       kept.gather(0, old_i[:, None, :].expand(k, t, n)))
    return merged_key, pos, kept


def key_windows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A top-k key's (valid, window id or -1, value): the inverse of (ordered_bits(value) << 32) | (MASK32 - window)."""
    valid = key != MIN_KEY
    windows = torch.where(valid, MASK32 - (key & MASK32), -1)
    bits = (key >> 32).to(torch.int64)
    bits = torch.where(bits < 0, -(bits + 1) | (-(2**31)), bits)
    return valid, windows, bits.to(torch.int32).view(torch.float32)


class LayerAccumulator:
    """Streaming top-k, interval reservoirs and statistics for one layer, on its device."""

    def __init__(self, layer: int, d_mlp: int, context: int, device, est_min: torch.Tensor, est_max: torch.Tensor,
                 negatives: bool = False, routing: bool = False):
        self.layer, self.n, self.t, self.device = layer, d_mlp, context, device
        n, t = d_mlp, context
        self.neurons = torch.arange(n, device=device)
        self.top_key = torch.full((TOP_K, n), MIN_KEY, dtype=torch.int64, device=device)
        self.top_pos = torch.zeros((TOP_K, n), dtype=torch.int64, device=device)
        self.top_acts = torch.zeros((TOP_K, t, n), dtype=torch.float16, device=device)
        self.negatives = negatives
        if negatives:  # the same running top-k over -min
            self.neg_key = self.top_key.clone()
            self.neg_pos = self.top_pos.clone()
            self.neg_acts = self.top_acts.clone()
        self.res_key = torch.full((BINS, PER_BIN, n), EMPTY_KEY, dtype=torch.int64, device=device)
        self.res_max = torch.zeros((BINS, PER_BIN, n), dtype=torch.float32, device=device)
        self.res_pos = torch.zeros((BINS, PER_BIN, n), dtype=torch.int64, device=device)
        self.res_acts = torch.zeros((BINS, PER_BIN, t, n), dtype=torch.float16, device=device)
        est_max = est_max.float().to(device)
        est_min = torch.minimum(est_min.float().to(device), est_max)
        # interval bin width; a neuron that never fired in the estimate puts every firing window in bin 0
        self.width = torch.where(est_max > 0, est_max / BINS, torch.full_like(est_max, math.inf))
        # 1 / width; for the unfired, a tiny factor that maps any positive activation (above ~1e-15) to bin 1
        self.inv_width = torch.where(est_max > 0, BINS / est_max, torch.full_like(est_max, 1e-30))
        est_span = torch.clamp(est_max - est_min, min=1e-6)
        self.hist_lo = est_min - HIST_MARGIN * est_span
        span = est_span * (1 + 2 * HIST_MARGIN)
        self.hist_scale = HIST_BINS / span
        self.hist_span = span
        self.tokens = 0
        self.routing = routing  # update() gets each token's routing: counts are per unit
        if routing:
            self.unit_tokens = torch.zeros(n, dtype=torch.int64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(n, dtype=torch.float64, device=device)
        self.min = torch.full((n,), math.inf, device=device)
        self.max = torch.full((n,), -math.inf, device=device)
        self.int_counts = torch.zeros((n, BINS + 1), dtype=torch.int64, device=device)
        self.hist_counts = torch.zeros((n, HIST_BINS), dtype=torch.int64, device=device)
        self.offsets_joint = (self.neurons * (HIST_BINS * (BINS + 1))).float()[None, :]
        self.joint_float_exact = n * HIST_BINS * (BINS + 1) < 2**24  # integers float32 holds exactly
        if n * HIST_BINS * (BINS + 1) >= 2**31:
            raise ValueError(f"{n} neurons in one layer is more than the joint histogram's int32 index can count")

    def update(self, acts: torch.Tensor, window_ids: torch.Tensor, routed: torch.Tensor | None = None) -> None:
        """acts [B, T, N] in the model's dtype; window_ids [B] int64 on the device; routed [B, T, N]
        bool, whether each token was routed to each unit's expert (an accumulator made with routing)."""
        b = acts.shape[0]
        n, t = self.n, self.t
        high = low = acts
        if self.routing:  # a token not routed to a unit's expert is none of its evidence
            assert routed is not None
            high, low = acts.masked_fill(~routed, -math.inf), acts.masked_fill(~routed, math.inf)
            seen = routed.any(dim=1)  # [B, N] windows with a routed token
        # each window's max (no arg: where it lies is found for the windows kept, below)
        wmax = high.amax(dim=1).float()  # [B, N]

        # ---- top-k windows by their max; earlier window first on ties
        later = (MASK32 - window_ids)[:, None]
        key = (ordered_bits(wmax) << 32) | later
        if self.routing:
            key = torch.where(seen, key, MIN_KEY)
        self.top_key, self.top_pos, self.top_acts = merge_top(self.top_key, self.top_pos, self.top_acts, key, acts,
                                                              search=high if self.routing else None)
        if self.negatives:  # ... and by their min, most negative first
            nkey = (ordered_bits(-low.amin(dim=1).float()) << 32) | later
            if self.routing:
                nkey = torch.where(seen, nkey, MIN_KEY)
            self.neg_key, self.neg_pos, self.neg_acts = merge_top(self.neg_key, self.neg_pos, self.neg_acts, nkey, acts,
                                                                  lowest=True, search=low if self.routing else None)

        # ---- interval reservoirs: per bin, the PER_BIN windows with the smallest priority
        fired = wmax > 0
        bins = torch.clamp(torch.ceil(wmax * self.inv_width) - 1, 0, BINS - 1).to(torch.int64)
        pkey = (priority(self.layer, self.neurons, window_ids) << 32) | window_ids[:, None]
        which = torch.arange(BINS, device=self.device)[:, None, None]
        cand = torch.where(fired[None] & (bins[None] == which), pkey[None], EMPTY_KEY)  # [BINS, B, N]
        neg_key, ridx = torch.cat([self.res_key, cand], dim=1).topk(PER_BIN, dim=1, largest=False)
        r_new = ridx >= PER_BIN
        r_old = ridx.clamp(max=PER_BIN - 1)
        r_newi = (ridx - PER_BIN).clamp(min=0)  # [BINS, S, N] window index in batch
        flat_new = r_newi.reshape(BINS * PER_BIN, n)
        picked = acts.gather(0, flat_new[:, None, :].expand(BINS * PER_BIN, t, n))
        looked = high.gather(0, flat_new[:, None, :].expand(BINS * PER_BIN, t, n)) if self.routing else picked
        self.res_max = torch.where(r_new, wmax.gather(0, flat_new).view(BINS, PER_BIN, n), self.res_max.gather(1, r_old))
        self.res_pos = torch.where(r_new, looked.max(dim=1).indices.view(BINS, PER_BIN, n), self.res_pos.gather(1, r_old))
        self.res_acts = torch.where(
            r_new[:, :, None, :],
            picked.to(torch.float16).view(BINS, PER_BIN, t, n),
            self.res_acts.gather(1, r_old[:, :, None, :].expand(BINS, PER_BIN, t, n)),
        )
        self.res_key = neg_key

        # ---- statistics over every token, in as few passes over [B*T, N] as will do
        flat = acts.reshape(b * t, n)
        if flat.dtype != torch.float32:
            flat = flat.float()
        self.tokens += b * t
        # (a token not routed has activation 0: it adds nothing to the sums)
        self.sum += flat.sum(0).double()
        self.sumsq += (flat * flat).sum(0).double()
        torch.minimum(self.min, (low.reshape(b * t, n).float() if self.routing else flat).amin(0), out=self.min)
        torch.maximum(self.max, wmax.amax(0), out=self.max)
        # one bincount for both: histogram bin h and interval bin i (0: not firing, k: ((k-1)w, kw])
        joint = torch.sub(flat, self.hist_lo).mul_(self.hist_scale).floor_().clamp_(0, HIST_BINS - 1)
        joint.mul_(BINS + 1).add_(torch.mul(flat, self.inv_width).ceil_().clamp_(0, BINS))
        # int32 indices: converting to them is ~10x cheaper than to int64 on a CPU, and bincount takes them
        if self.joint_float_exact:
            index = joint.add_(self.offsets_joint).to(torch.int32)
        else:
            index = joint.to(torch.int32).add_(self.offsets_joint.to(torch.int32))
        size = n * HIST_BINS * (BINS + 1)
        if routed is not None:  # (self.routing) a token not routed counts in one more bin, dropped
            flat_routed = routed.reshape(b * t, n)
            self.unit_tokens += flat_routed.sum(0)
            index = index.masked_fill_(~flat_routed, size)
            counts = torch.bincount(index.view(-1), minlength=size + 1)[:size].view(n, HIST_BINS, BINS + 1)
        else:
            counts = torch.bincount(index.view(-1), minlength=size).view(n, HIST_BINS, BINS + 1)
        self.hist_counts += counts.sum(2)
        self.int_counts += counts.sum(1)

    STATE = ("top_key", "top_pos", "top_acts", "res_key", "res_max", "res_pos", "res_acts",
             "sum", "sumsq", "min", "max", "int_counts", "hist_counts")
    NEG_STATE = ("neg_key", "neg_pos", "neg_acts")

    def state(self) -> dict[str, np.ndarray]:
        """Everything update() accumulated, as CPU arrays: a corpus shard's part of a sharded run."""
        names = self.STATE + (self.NEG_STATE if self.negatives else ()) + (("unit_tokens",) if self.routing else ())
        out = {name: getattr(self, name).cpu().numpy() for name in names}
        out["tokens"] = np.asarray(self.tokens, dtype=np.int64)
        return out

    def merge(self, states: list[dict[str, np.ndarray]]) -> None:
        """Fold the states of corpus shards (made with the same estimated ranges) into this
        fresh accumulator, exactly as if one pass had read all their windows: the top-k and
        the reservoirs keep the best keys of the union (window ids are distinct across
        shards, so there are no ties to break differently), counts and histograms add, min
        and max fold. Sums add in shard order (float64)."""
        if not states:
            return
        dev = self.device

        def cat(name: str, dim: int) -> torch.Tensor:
            return torch.cat([torch.from_numpy(st[name]).to(dev) for st in [self.state(), *states]], dim=dim)

        key = cat("top_key", 0)
        self.top_key, idx = key.topk(TOP_K, dim=0)
        t, n = self.t, self.n
        self.top_pos = cat("top_pos", 0).gather(0, idx)
        self.top_acts = cat("top_acts", 0).gather(0, idx[:, None, :].expand(TOP_K, t, n))
        if self.negatives:
            self.neg_key, idx = cat("neg_key", 0).topk(TOP_K, dim=0)
            self.neg_pos = cat("neg_pos", 0).gather(0, idx)
            self.neg_acts = cat("neg_acts", 0).gather(0, idx[:, None, :].expand(TOP_K, t, n))
        rkey = cat("res_key", 1)
        self.res_key, ridx = rkey.topk(PER_BIN, dim=1, largest=False)
        self.res_max = cat("res_max", 1).gather(1, ridx)
        self.res_pos = cat("res_pos", 1).gather(1, ridx)
        self.res_acts = cat("res_acts", 1).gather(1, ridx[:, :, None, :].expand(BINS, PER_BIN, t, n))
        for st in states:
            self.tokens += int(st["tokens"])
            self.sum += torch.from_numpy(st["sum"]).to(dev)
            self.sumsq += torch.from_numpy(st["sumsq"]).to(dev)
            torch.minimum(self.min, torch.from_numpy(st["min"]).to(dev), out=self.min)
            torch.maximum(self.max, torch.from_numpy(st["max"]).to(dev), out=self.max)
            self.int_counts += torch.from_numpy(st["int_counts"]).to(dev)
            self.hist_counts += torch.from_numpy(st["hist_counts"]).to(dev)
            if self.routing:
                self.unit_tokens += torch.from_numpy(st["unit_tokens"]).to(dev)

    def result(self) -> LayerExamples:
        def cpu(x: torch.Tensor) -> np.ndarray:
            return x.cpu().numpy()

        valid, top_windows, top_max = key_windows(self.top_key)
        rvalid = self.res_key != EMPTY_KEY
        res_windows = torch.where(rvalid, self.res_key & MASK32, -1)
        # an empty slot (a bin with fewer windows) holds zeros, not whatever a batch left there
        res_max = torch.where(rvalid, self.res_max, 0.0)
        res_pos = torch.where(rvalid, self.res_pos, 0)
        res_acts = torch.where(rvalid[:, :, None, :], self.res_acts, torch.zeros((), dtype=self.res_acts.dtype))

        true_max, true_min = self.max, self.min
        if self.routing:  # a unit whose expert no token was routed to: 0, not +-inf
            never = self.unit_tokens == 0
            true_max, true_min = true_max.masked_fill(never, 0.0), true_min.masked_fill(never, 0.0)
        estimated = torch.isfinite(self.width)
        edges = torch.where(estimated, self.width, 0.0)[:, None] * torch.arange(BINS + 1, device=self.device)[None, :]
        edges[:, BINS] = torch.maximum(edges[:, BINS], true_max)
        # a neuron that did not fire in the estimate: everything fired is in bin 0, [0, true max]
        edges[~estimated, 1:] = torch.clamp(true_max[~estimated], min=0)[:, None]
        hist_edges = self.hist_lo[:, None] + self.hist_span[:, None] * torch.arange(
            HIST_BINS + 1, device=self.device
        )[None, :] / HIST_BINS
        hist_edges[:, 0] = torch.minimum(hist_edges[:, 0], true_min)
        hist_edges[:, HIST_BINS] = torch.maximum(hist_edges[:, HIST_BINS], true_max)
        tokens = self.unit_tokens.clamp(min=1) if self.routing else max(self.tokens, 1)
        mean = self.sum / tokens
        var = torch.clamp(self.sumsq / tokens - mean * mean, min=0)
        positive = self.int_counts[:, 1:].sum(1)
        # a neuron that did not fire in the estimate has no threshold (NaN): nothing counts as above it
        threshold = torch.where(estimated, self.width, math.nan)

        return LayerExamples(
            layer=self.layer,
            top_windows=cpu(top_windows.T).astype(np.int32),
            top_max=cpu(torch.where(valid, top_max, 0.0).T).astype(np.float32),
            top_pos=cpu(self.top_pos.T).astype(np.int16),
            top_acts=cpu(self.top_acts.permute(2, 0, 1)),
            int_windows=cpu(res_windows.permute(2, 0, 1)).astype(np.int32),
            int_max=cpu(res_max.permute(2, 0, 1)).astype(np.float32),
            int_pos=cpu(res_pos.permute(2, 0, 1)).astype(np.int16),
            int_acts=cpu(res_acts.permute(3, 0, 1, 2)),
            int_edges=cpu(edges).astype(np.float32),
            int_counts=cpu(self.int_counts[:, 1:]),
            tokens=self.tokens,
            positive=cpu(positive),
            above=cpu(self.int_counts[:, 2:].sum(1)),  # activation > the first interval edge
            threshold=cpu(threshold).astype(np.float32),
            mean=cpu(mean),
            std=cpu(var.sqrt()),
            min=cpu(true_min).astype(np.float32),
            max=cpu(true_max).astype(np.float32),
            hist_edges=cpu(hist_edges).astype(np.float32),
            hist_counts=cpu(self.hist_counts),
            **(self._negatives(cpu) if self.negatives else {}),
            unit_tokens=cpu(self.unit_tokens) if self.routing else None,
        )

    def _negatives(self, cpu) -> dict[str, np.ndarray]:
        valid, windows, neg = key_windows(self.neg_key)
        return {"neg_windows": cpu(windows.T).astype(np.int32),
                "neg_min": cpu(torch.where(valid, -neg, 0.0).T).astype(np.float32),
                "neg_pos": cpu(self.neg_pos.T).astype(np.int16),
                "neg_acts": cpu(self.neg_acts.permute(2, 0, 1))}


def forward_windows(model, adapter, layers: list[int], windows: torch.Tensor, bos_id: int | None,
                    fn: Callable[[int, torch.Tensor], None], device, units: Units = NEURON_UNITS) -> None:
    """One forward pass over windows [B, T]; fn(layer, acts [B, T, N]) per layer, BOS left out
    (N: the units' count, their activations as `units` reads them). The pass stops after the
    last layer read."""
    forward_readers(model, adapter, [(layers, units)], windows, bos_id, lambda r, layer, acts: fn(layer, acts), device)


Reader = tuple[list[int], Units]  # the layers a pass reads, and the units it reads at each


def forward_readers(model, adapter, readers: list[Reader], windows: torch.Tensor, bos_id: int | None,
                    fn: Callable[[int, int, torch.Tensor], None], device) -> None:
    """One forward pass over windows [B, T] for several readers (the neurons of some layers, an
    SAE's latents at its site...): fn(r, layer, acts [B, T, N_r]) for reader r at each of its
    layers, BOS left out. The pass stops once every site read has been read."""
    ids = windows.to(device, non_blocking=True)
    if bos_id is not None:
        ids = torch.cat([torch.full((ids.shape[0], 1), bos_id, dtype=ids.dtype, device=device), ids], dim=1)
    at: dict[tuple[int, str], list[int]] = {}
    for r, (layers, units) in enumerate(readers):
        for layer in layers:
            at.setdefault((layer, units.site), []).append(r)
    left = [len(at)]

    def read(layer: int, site: str, acts: torch.Tensor) -> None:
        acts = acts[:, 1:] if bos_id is not None else acts
        acts = acts.to(device)  # a layer of a model spread over devices: read where the readers are
        for r in at[(layer, site)]:
            encode = readers[r][1].encode
            fn(r, layer, acts if encode is None else encode(acts))
        left[0] -= 1
        if left[0] == 0:
            raise StopForward

    if all(site == "mlp" for _, site in at):
        reading = adapter.on_activations([layer for layer, _ in at], lambda layer, acts: read(layer, "mlp", acts))
    else:
        reading = adapter.on_sites(list(at), read)
    with torch.inference_mode(), reading:
        try:
            model(input_ids=ids, use_cache=False)
        except StopForward:
            pass


def routed_units(adapter, layer: int, acts: torch.Tensor, bos: bool) -> torch.Tensor:
    """[B, T, N] bool: whether each token of the latest pass (BOS left out) was routed to each
    neuron's expert at `layer` (a mixture of experts; acts [B, T, N] its neurons' activations)."""
    routed = adapter.routed(layer)  # [B * (T + bos), E]
    b, t, n = acts.shape
    routed = routed.view(b, t + bos, -1)[:, int(bos):]
    return routed[..., None].expand(b, t, routed.shape[-1], n // routed.shape[-1]).reshape(b, t, n)


def batches(ids: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def estimate_range(model, adapter, layers, windows, bos_id, plan_: Plan, device,
                   progress: Callable[[int], None] = lambda n: None,
                   units: Units = NEURON_UNITS) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The first pass: each unit's min and max over the estimate sample."""
    return estimate_ranges(model, adapter, [(layers, units)], windows, bos_id, plan_, device, progress)[0]


def estimate_ranges(model, adapter, readers: list[Reader], windows, bos_id, plan_: Plan, device,
                    progress: Callable[[int], None] = lambda n: None) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """estimate_range for several readers in the same forward passes: one result per reader."""
    lo: list[dict[int, torch.Tensor]] = [{} for _ in readers]
    hi: list[dict[int, torch.Tensor]] = [{} for _ in readers]

    def read(r: int, layer: int, acts: torch.Tensor) -> None:
        flat = acts.reshape(-1, acts.shape[-1])
        a_min, a_max = flat.amin(dim=0), flat.amax(dim=0)  # on the CPU, 10x faster than aminmax(dim=0)
        lo[r][layer] = torch.minimum(lo[r][layer], a_min.float()) if layer in lo[r] else a_min.float()
        hi[r][layer] = torch.maximum(hi[r][layer], a_max.float()) if layer in hi[r] else a_max.float()

    for ids in batches(plan_.estimate_ids, plan_.batch_windows):
        forward_readers(model, adapter, readers, windows[ids], bos_id, read, device)
        progress(len(ids) * windows.shape[1])
    return [{layer: (lo[r][layer], hi[r][layer]) for layer in layers} for r, (layers, _) in enumerate(readers)]


def shard_bounds(n_windows: int, context: int, batch_tokens: int, shards: int) -> list[tuple[int, int]]:
    """The window ranges [start, stop) of `shards` corpus shards. They start on batch
    boundaries of the one-machine pass (multiples of its batch of windows), so every shard
    runs exactly the batches that pass runs, and the merge gives its very numbers. A shard
    is empty when there are fewer batches than shards."""
    per_batch = plan(n_windows, context, batch_tokens).batch_windows
    n_batches = math.ceil(n_windows / per_batch)
    cuts = [min(n_windows, (i * n_batches // shards) * per_batch) for i in range(shards + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(shards)]


def accumulate(model, adapter, layers: list[int], windows: torch.Tensor, bos_id: int | None,
               ranges: dict[int, tuple[torch.Tensor, torch.Tensor]], *, start: int = 0, stop: int | None = None,
               batch_tokens: int = 8192, device=None,
               progress: Callable[[int], None] = lambda n: None,
               units: Units = NEURON_UNITS) -> dict[int, LayerAccumulator]:
    """The streaming pass over windows[start:stop] (window ids stay global), in the batches
    of the whole corpus's pass."""
    return accumulate_readers(model, adapter, [(layers, units)], windows, bos_id, [ranges], start=start, stop=stop,
                              batch_tokens=batch_tokens, device=device, progress=progress)[0]


def accumulate_readers(model, adapter, readers: list[Reader], windows: torch.Tensor, bos_id: int | None,
                       ranges: list[dict[int, tuple[torch.Tensor, torch.Tensor]]], *, start: int = 0,
                       stop: int | None = None, batch_tokens: int = 8192, device=None,
                       progress: Callable[[int], None] = lambda n: None) -> list[dict[int, LayerAccumulator]]:
    """accumulate for several readers in the same forward passes: one result per reader."""
    device = device or compute_device(model)
    n_windows, context = windows.shape
    stop = n_windows if stop is None else stop
    per_batch = plan(n_windows, context, batch_tokens).batch_windows
    accs = [{layer: LayerAccumulator(layer, units.size(adapter), context, device, *ranges[r][layer],
                                     negatives=units.reads_negatives(adapter), routing=units.reads_routing(adapter))
             for layer in layers}
            for r, (layers, units) in enumerate(readers)]
    all_ids = torch.arange(n_windows, device=device)
    for b0 in range(start, stop, per_batch):
        b1 = min(b0 + per_batch, stop)
        ids = all_ids[b0:b1]

        def add(r: int, layer: int, acts: torch.Tensor, ids: torch.Tensor = ids) -> None:
            acc = accs[r][layer]
            acc.update(acts, ids, routed_units(adapter, layer, acts, bos_id is not None) if acc.routing else None)

        forward_readers(model, adapter, readers, windows[b0:b1], bos_id, add, device)
        progress((b1 - b0) * context)
    return accs


def collect(model, adapter, layers: list[int], windows: torch.Tensor, bos_id: int | None, *,
            batch_tokens: int = 8192, device=None,
            progress: Callable[[int], None] = lambda n: None, units: Units = NEURON_UNITS) -> list[LayerExamples]:
    """The whole stage's compute on one machine: the estimate pass, then the streaming pass
    over every window."""
    return collect_readers(model, adapter, [(layers, units)], windows, bos_id, batch_tokens=batch_tokens,
                           device=device, progress=progress)[0]


def collect_readers(model, adapter, readers: list[Reader], windows: torch.Tensor, bos_id: int | None, *,
                    batch_tokens: int = 8192, device=None,
                    progress: Callable[[int], None] = lambda n: None) -> list[list[LayerExamples]]:
    """collect for several readers (the neurons, and SAEs' latents) in the same forward passes:
    per reader, what collect gives it alone."""
    device = device or compute_device(model)
    n_windows, context = windows.shape
    plan_ = plan(n_windows, context, batch_tokens)
    ranges = estimate_ranges(model, adapter, readers, windows, bos_id, plan_, device, progress)
    accs = accumulate_readers(model, adapter, readers, windows, bos_id, ranges, batch_tokens=batch_tokens,
                              device=device, progress=progress)
    return [[accs[r][layer].result() for layer in layers] for r, (layers, _) in enumerate(readers)]
