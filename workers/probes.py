"""Sparse probes (Gurnee et al. 2023, "Finding Neurons in a Haystack"): which neurons of a
layer encode a labelled binary feature, and how well k of them predict it.

Pure tensors in, JSON-ready results out: no database, no model. `probe_layer(X, y)` takes
one layer's activations X [n, d] (any float dtype; computed in float32 on X's device, or
`device`) and labels y [n] (bool); `probe_layers({layer: X}, y)` does several layers of the
same samples at once, with one train/test split shared by all of them.

Method, following the paper's code (github.com/wesg52/sparse-probing-paper,
experiments/inner_loops.py) where it is explicit; the choices where it is not, or where
Needle departs from it, are marked "choice".

- Split: 70% train, 30% test, fixed by `seed`. Choice: stratified (each class is permuted
  by a torch.Generator seeded with `seed` and floor(0.3 * n_class + 0.5) of it goes to the
  test set), so rare features keep their share of positives in both halves; the paper's
  `train_test_split` is not stratified. The split depends only on y and seed, never on the
  device, so every layer and every machine gets the same one.
- Fewer than MIN_TRAIN_POSITIVES (20) train positives, or as few train negatives, raises
  TooFewPositives (a ValueError) carrying the counts: the caller reports "not probed".
- Normalisation: each neuron is divided by its train standard deviation (population std,
  ddof 0); a neuron with std 0 (to float32 resolution: std <= 1e-6 * |mean|) is divided by
  1, gets mean difference 0, and its one-neuron probe predicts negative everywhere (with
  balanced weights a constant probe is a tie). Choice: the paper divides by 10 * max(std,
  1e-3), i.e. scales neurons to std 0.1, which makes the L2 penalty 100 times stronger
  relative to the data; Needle uses std 1 (as sklearn's StandardScaler would), so C = 1
  means what it means in scikit-learn. Inside the solvers each neuron is also centred on
  its train mean; with an unpenalised intercept this changes no probe's predictions, only
  the conditioning.
- Ranking: mean difference, |mean(train positives) - mean(train negatives)| of the
  normalised neuron, descending (the paper's `mean_dif`, its default selection method);
  ties keep the lower neuron index first. `ranking` holds the top 30.
- Probes are class-balanced logistic regressions, as scikit-learn's
  LogisticRegression(class_weight="balanced", C=1.0) defines them: minimise
  sum_i s_i * logloss_i + ||w||^2 / (2C) with s_i = n / (2 * n_class(i)) and the intercept
  unpenalised; predict positive when p > 0.5. They are solved to convergence, batched on
  X's device: Newton's method with the Hessian recomputed only when progress slows and
  L-BFGS corrections in between, a backtracking line search, Cholesky solves in float64
  (the paper ran saga for 200-250 epochs). Test precision, recall and F1 (0 where
  undefined, as sklearn's zero_division).
- `single`: a one-neuron probe for each of the top 30 neurons by mean difference (the
  paper's `enumerate_monosemantic`). `best` is the k = 1 probe: the top neuron by mean
  difference, chosen on train data only. Choice: not the single probe with the best test
  F1, which would select on the test set; `single` lists all 30 so a page can show them.
- `curve`, the fast sweep (the paper's `fast_heuristic_sparsity_sweep`): for each k in KS,
  an L2 probe on the top-k neurons by mean difference. KS = 1..8, 10, 12, 16, 32, ..., 256
  (the paper's `make_k_list` with max_k 256); ks above d are dropped and d itself is added
  when d < 256 (as make_k_list does). Its k = 1 entry is `best`.
- `pruned_curve`, the iterative pruning sweep (the paper's `telescopic_sparsity_sweep`):
  from the largest k down, fit an elastic-net probe on the current neurons, re-rank them by
  |coefficient| and keep the top next-smaller k. The penalty follows the paper's schedule:
  C = k / 20, l1_ratio = clip(exp(-k / 20), 0.1, 0.9) (sklearn's form:
  C * sum_i s_i * logloss_i + (1 - l1_ratio) / 2 * ||w||^2 + l1_ratio * ||w||_1). Solved
  to convergence by an orthant-wise Newton method (see _enet_newton), batched over layers,
  started from the L2 probe on the same neurons at the largest k and from the previous k's
  coefficients after that (the paper: saga, max_iter 1000). Choice: ties in |coefficient| (exact zeros)
  keep the previous order, and only the current neurons can be kept (the paper's argsort
  over all neurons could pick a zero-score neuron outside the support). Choice: each k
  reports the test precision/recall/F1 of an L2 probe (C = 1) refit on the kept neurons, so
  the two curves differ only in how the neurons were chosen; the elastic-net probe's own
  figures (what the paper plotted) are there too, as enet_f1, enet_precision, enet_recall.
  `neurons` lists the kept neurons by their final pruning order (most important first);
  the sets are nested.

method="paper" takes the paper's code's own settings instead, so that its published figures
can be compared: its split, scikit-learn's train_test_split(test_size=0.3, random_state=seed)
(shuffled, not stratified: numpy's RandomState(seed).permutation(n), the first ceil(0.3 n) to
the test set) with its default seed 1 (utils.default_argument_parser), and its normalisation,
each neuron divided by 10 * max(train std, 1e-3) (neurons at std 0.1: the L2 penalty weighs
100 times more against the data). The rest is as above: the same objective (balanced L2
logistic regression, C = 1) solved to convergence, where the paper ran saga for 200-250 epochs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

KS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 128, 256)
MIN_TRAIN_POSITIVES = 20
TOP_NEURONS = 30
TEST_FRACTION = 0.3
C = 1.0
METHODS = ("needle", "paper")
PAPER_SEED = 1  # the paper's code's default --seed
PAPER_STD_SCALE, PAPER_STD_FLOOR = 10.0, 1e-3  # it divides each neuron by 10 * max(std, 1e-3)
SMALL_K = 16  # ks up to this are fitted together as one padded, masked batch

_NEWTON_MAX_ITER = 50
_NEWTON_TOL = 1e-8  # stop when every probe's Newton decrement^2 / 2 < this * n_train
_ARMIJO = 1e-4
_REFRESH = 0.25  # Newton: a new Hessian when the decrement fell by less than this factor
_LBFGS_MEMORY = 8
_SLOPE_TOL = 1e-3  # the full step is taken if the slope at its end is <= this * the decrement^2
_MAX_HALVINGS = 20
_ROW_CUT = 1e-4  # a Hessian leaves out rows whose curvature is below this * the largest
_ENET_HALVINGS = 14  # the elastic net's line search gives up below t = 2^-13: converged
_BATCH_ELEMENTS = 2**27  # layers are probed together while n_train * (k_max + 1) * layers stays under this


class TooFewPositives(ValueError):
    """Too few train positives (or negatives) to probe: `counts` says how many there were."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        which = "positives" if counts["train_pos"] < MIN_TRAIN_POSITIVES else "negatives"
        super().__init__(
            f"too few train {which} to probe: {counts['train_pos']} positive and {counts['train_neg']} negative "
            f"train examples ({MIN_TRAIN_POSITIVES} of each needed)"
        )


@dataclass
class LayerProbe:
    """One feature x one layer. Every field holds only python ints, floats, lists and dicts."""

    ranking: list[dict]  # top 30 by mean difference: {neuron, mean_dif}
    single: list[dict]  # the same 30: {neuron, mean_dif, f1, precision, recall}
    best: dict  # the k = 1 probe on the top neuron: {neuron, f1, precision, recall}
    curve: list[dict]  # fast sweep, per k: {k, f1, precision, recall, neurons}
    pruned_curve: list[dict]  # pruning sweep, per k: the same plus enet_f1, enet_precision, enet_recall
    counts: dict  # {train_pos, train_neg, test_pos, test_neg}
    d: int = 0  # neurons in the layer
    params: dict = field(default_factory=dict)  # the method's settings, for the page

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    train: torch.Tensor  # int64 indices, ascending (CPU)
    test: torch.Tensor
    y_train: torch.Tensor  # bool (CPU)
    y_test: torch.Tensor
    counts: dict[str, int]


def split_indices(y: torch.Tensor, seed: int = 0) -> Split:
    """The stratified 70/30 split of the module docstring (depends on y and seed only)."""
    y = torch.as_tensor(y).detach().to("cpu").bool().reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    train_parts, test_parts = [], []
    for cls in (True, False):
        idx = torch.nonzero(y == cls).reshape(-1)
        perm = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = math.floor(TEST_FRACTION * idx.numel() + 0.5)
        test_parts.append(perm[:n_test])
        train_parts.append(perm[n_test:])
    return _split(y, torch.cat(train_parts), torch.cat(test_parts))


def paper_split(y: torch.Tensor, seed: int = PAPER_SEED) -> Split:
    """The paper's split: scikit-learn's train_test_split(test_size=0.3, random_state=seed),
    written out (numpy's RandomState permutation, the first ceil(0.3 n) to the test set)."""
    import numpy as np

    y = torch.as_tensor(y).detach().to("cpu").bool().reshape(-1)
    n = y.numel()
    perm = torch.from_numpy(np.random.RandomState(int(seed)).permutation(n))
    n_test = math.ceil(TEST_FRACTION * n)
    return _split(y, perm[n_test:], perm[:n_test])


def _split(y: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> Split:
    train, test = torch.sort(train).values, torch.sort(test).values
    y_train, y_test = y[train], y[test]
    counts = {"train_pos": int(y_train.sum()), "train_neg": int((~y_train).sum()),
              "test_pos": int(y_test.sum()), "test_neg": int((~y_test).sum())}
    return Split(train, test, y_train, y_test, counts)


def effective_ks(d: int, ks: Sequence[int] = KS) -> list[int]:
    """The ks of a layer of d neurons: those <= d, plus d itself when d is below the largest."""
    out = sorted({int(k) for k in ks if 1 <= k <= d})
    if ks and d < max(ks) and d not in out:
        out.append(d)
    return out


def pruning_penalty(k: int) -> tuple[float, float]:
    """(C, l1_ratio) of the pruning sweep's elastic net at k (the paper's schedule)."""
    return k / 20.0, min(max(math.exp(-k / 20.0), 0.1), 0.9)


# ---- entry points ---------------------------------------------------------------------------


def probe_layer(X: torch.Tensor, y: torch.Tensor, *, seed: int | None = None, ks: Sequence[int] = KS, device=None,
                prune: bool = True, method: str = "needle") -> LayerProbe:
    """Probe one layer: X [n, d] activations, y [n] bool labels. See the module docstring."""
    return probe_layers({0: X}, y, seed=seed, ks=ks, device=device, prune=prune, method=method)[0]


def probe_layers(Xs: Mapping[int, torch.Tensor], y: torch.Tensor, *, seed: int | None = None, ks: Sequence[int] = KS,
                 device=None, prune: bool = True, method: str = "needle") -> dict[int, LayerProbe]:
    """Probe several layers of the same n samples with one shared split: {layer: X [n, d]}.
    Layers of the same width are batched together. `prune=False` skips the pruning sweep
    (its `pruned_curve` is then empty). method "needle" or "paper" (the module docstring);
    seed None: 0 for Needle's, the paper's 1 for the paper's."""
    if not Xs:
        return {}
    if not ks:
        raise ValueError("no k to probe: ks is empty")
    if method not in METHODS:
        raise ValueError(f"unknown probe method {method!r}: one of {', '.join(METHODS)}")
    paper = method == "paper"
    if seed is None:
        seed = PAPER_SEED if paper else 0
    y = torch.as_tensor(y).reshape(-1)
    n = y.numel()
    for layer, X in Xs.items():
        if X.dim() != 2 or X.shape[0] != n:
            raise ValueError(f"layer {layer}: activations of shape {tuple(X.shape)} for {n} labels (want [n, d])")
    split = paper_split(y, seed) if paper else split_indices(y, seed)
    c = split.counts
    if c["train_pos"] < MIN_TRAIN_POSITIVES or c["train_neg"] < MIN_TRAIN_POSITIVES:
        raise TooFewPositives(dict(c))
    out: dict[int, LayerProbe] = {}
    by_width: dict[int, list[int]] = {}
    for layer, X in Xs.items():
        by_width.setdefault(X.shape[1], []).append(layer)
    for d, layers in by_width.items():
        ks_d = effective_ks(d, ks)
        per = max(1, _BATCH_ELEMENTS // max(1, c["train_pos"] + c["train_neg"]) // (max(ks_d) + 1))
        for start in range(0, len(layers), per):
            chunk = layers[start : start + per]
            dev = torch.device(device) if device is not None else Xs[chunk[0]].device
            out.update(zip(chunk, _probe_batch([Xs[la] for la in chunk], split, ks_d, dev, prune, paper, seed)))
    return {layer: out[layer] for layer in Xs}


# ---- the batch of layers --------------------------------------------------------------------


def _column_stats(X: torch.Tensor, train: torch.Tensor, pos: torch.Tensor, rows: int = 1024, paper: bool = False):
    """Per neuron over the train rows: (mean, std with 0 -> 1, mean difference of the
    normalised neuron, whether it is constant), float32. With `paper`, the std returned (what
    each neuron is divided by) is the paper's 10 * max(std, 1e-3).

    The sums are matmuls with weight vectors that are zero on test rows, over blocks of rows
    (cache-sized; a float16 X is converted block by block), of each neuron minus a shift (its
    mean over the first 64 train rows), so a large offset costs no precision and a constant
    neuron comes out exactly constant. A neuron whose variance is still small against its
    squared shifted mean, where E[x^2] - mean^2 would cancel, is redone in two passes."""
    n, d = X.shape
    w = torch.zeros(4, n, dtype=torch.float32, device=X.device)
    w[0, train] = 1.0 / train.numel()
    w[1, train[pos]] = 1.0 / int(pos.sum())
    w[2, train[~pos]] = 1.0 / int((~pos).sum())
    shift = X.index_select(0, train[:64]).float().mean(0)
    mom = torch.zeros(4, d, dtype=torch.float32, device=X.device)  # means of x - shift: all, pos, neg; mean square
    for r0 in range(0, n, rows):
        xb = X[r0 : r0 + rows].float() - shift
        wb = w[:, r0 : r0 + rows]
        mom[:3] += wb[:3] @ xb
        mom[3] += wb[0] @ (xb * xb)
    m0 = mom[0]
    var = mom[3] - m0 * m0
    shaky = var <= 1e-3 * m0 * m0
    if bool(shaky.any()):
        cols = torch.nonzero(shaky).reshape(-1)
        xs = X.index_select(1, cols).index_select(0, train).float() - shift[cols]
        var[cols] = ((xs - m0[cols]) ** 2).mean(0)
    mu = shift + m0
    sd = var.clamp(min=0).sqrt()
    # constant on the train rows (to float32 resolution): scaled by 1, mean difference 0
    const = sd <= 1e-6 * mu.abs()
    if paper:
        sd = PAPER_STD_SCALE * sd.clamp(min=PAPER_STD_FLOOR)
    sd = torch.where(const, torch.ones_like(sd), sd)
    dif = torch.where(const, torch.zeros_like(sd), (mom[1] - mom[2]).abs() / sd)
    return mu, sd, dif, const


def _design(X: torch.Tensor, cols: torch.Tensor, rows: tuple[torch.Tensor, ...], mu: torch.Tensor,
            sd: torch.Tensor, const: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
    """Fill each out [len(rows), len(cols) + 1]: a column of ones, then the chosen neurons at
    its rows, centred and scaled (a constant neuron's column is exactly 0)."""
    scale = torch.where(const[cols], torch.zeros_like(sd[cols]), 1.0 / sd[cols])
    xk = X.index_select(1, cols)
    for r, out in zip(rows, outs, strict=True):
        out[:, 0] = 1.0
        x = out[:, 1:]
        x.copy_(xk.index_select(0, r))
        x.sub_(mu[cols]).mul_(scale)


def _probe_batch(Xs: list[torch.Tensor], split: Split, ks: list[int], device: torch.device,
                 prune: bool, paper: bool = False, seed: int = 0) -> list[LayerProbe]:
    L = len(Xs)
    d = Xs[0].shape[1]
    K = max(ks)
    T = min(TOP_NEURONS, d)
    Kd = max(K, T)  # neurons in the designs: the sweeps' and the single probes'
    tr, te = split.train.to(device), split.test.to(device)
    y_tr_b = split.y_train.to(device)
    y_tr = y_tr_b.float()
    y_te = split.y_test.to(device)
    n_pos, n_neg = split.counts["train_pos"], split.counts["train_neg"]
    n_tr = n_pos + n_neg
    sw = torch.where(y_tr_b, n_tr / (2.0 * n_pos), n_tr / (2.0 * n_neg))  # sklearn's "balanced"

    A_tr = torch.empty(L, tr.numel(), Kd + 1, dtype=torch.float32, device=device)
    A_te = torch.empty(L, te.numel(), Kd + 1, dtype=torch.float32, device=device)
    orders, difs = [], []
    for li, X in enumerate(Xs):
        X = X.to(device)
        mu, sd, dif, const = _column_stats(X, tr, y_tr_b, paper=paper)
        order = torch.sort(dif, descending=True, stable=True).indices
        top = order[:Kd]
        orders.append(top)
        difs.append(dif[order[:T]])
        _design(X, top, (tr, te), mu, sd, const, (A_tr[li], A_te[li]))
    order_t = torch.stack(orders)
    dif_t = torch.stack(difs)
    lam = 1.0 / C

    # single-neuron probes on the top T neurons, [L * T] of them at once
    x_tr = A_tr[:, :, 1 : T + 1].transpose(1, 2).reshape(L * T, -1)
    x_te = A_te[:, :, 1 : T + 1].transpose(1, 2).reshape(L * T, -1)
    b1, w1 = _newton_1d(x_tr, y_tr, sw, lam)
    # a constant neuron's probe is a constant, which the balanced weights leave at a tie: negative
    b1 = torch.where((x_tr == 0).all(-1), torch.zeros_like(b1), b1)
    single_m = _metrics(b1.unsqueeze(-1) + w1.unsqueeze(-1) * x_te, y_te).reshape(3, L, T)

    # fast sweep: top-k prefixes of the mean-difference order
    curve_m, w_top = _prefix_sweep(A_tr, A_te, y_tr, sw, y_te, ks, lam, first=single_m[:, :, 0])

    pruned_l: list = []
    enet_l: list = []
    porder_l: list = []
    if prune:
        A_tr, A_te = A_tr[:, :, : K + 1], A_te[:, :, : K + 1]
        pruned_order, enet_m = _pruning_sweep(A_tr, A_te, y_tr, sw, y_te, ks, w_top)
        idx = torch.cat([torch.zeros(L, 1, dtype=torch.long, device=device), pruned_order + 1], dim=1)
        P_tr = torch.gather(A_tr, 2, idx.unsqueeze(1).expand(L, A_tr.shape[1], idx.shape[1]))
        P_te = torch.gather(A_te, 2, idx.unsqueeze(1).expand(L, A_te.shape[1], idx.shape[1]))
        # the largest k keeps every neuron: the same set as the fast sweep's largest k
        pruned_m, _ = _prefix_sweep(P_tr, P_te, y_tr, sw, y_te, ks[:-1], lam)
        pruned_m = torch.cat([pruned_m, curve_m[:, :, -1:]], dim=2)
        pruned_order = torch.gather(order_t[:, :K], 1, pruned_order)
        pruned_l, enet_l, porder_l = pruned_m.cpu().tolist(), enet_m.cpu().tolist(), pruned_order.cpu().tolist()

    # one transfer of everything to the CPU, then python lists
    orders_l = order_t.cpu().tolist()
    difs_l = dif_t.double().cpu().tolist()
    single_l = single_m.cpu().tolist()
    curve_l = curve_m.cpu().tolist()

    results = []
    for li in range(L):
        ranking = [{"neuron": orders_l[li][j], "mean_dif": difs_l[li][j]} for j in range(T)]
        single = [{"neuron": orders_l[li][j], "mean_dif": difs_l[li][j], "f1": single_l[2][li][j],
                   "precision": single_l[0][li][j], "recall": single_l[1][li][j]} for j in range(T)]
        best = {k: single[0][k] for k in ("neuron", "f1", "precision", "recall")}
        curve = [{"k": k, "f1": curve_l[2][li][i], "precision": curve_l[0][li][i], "recall": curve_l[1][li][i],
                  "neurons": orders_l[li][:k]} for i, k in enumerate(ks)]
        pruned = []
        if prune:
            pruned = [{"k": k, "f1": pruned_l[2][li][i], "precision": pruned_l[0][li][i],
                       "recall": pruned_l[1][li][i], "neurons": porder_l[li][:k],
                       "enet_f1": enet_l[2][li][i], "enet_precision": enet_l[0][li][i],
                       "enet_recall": enet_l[1][li][i]} for i, k in enumerate(ks)]
        results.append(LayerProbe(
            ranking=ranking, single=single, best=best, curve=curve, pruned_curve=pruned,
            counts=dict(split.counts), d=d,
            params={"method": "paper" if paper else "needle", "seed": seed,
                    "normalisation": "x / (10 * max(train std, 1e-3))" if paper else "x / train std",
                    "split": "train_test_split(test_size=0.3, random_state=seed)" if paper else "stratified 70/30",
                    "selection": "mean_dif", "C": C, "test_fraction": TEST_FRACTION, "stratified": not paper,
                    "class_weight": "balanced", "ks": list(ks), "top_neurons": T,
                    "pruning": "elastic net, C = k/20, l1_ratio = clip(exp(-k/20), 0.1, 0.9); "
                               "metrics of an L2 (C = 1) refit on the kept neurons"},
        ))
    return results


def _scores(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Decision values: A [B, n, P], W [B, G, P] -> [B, G, n]."""
    return torch.matmul(W, A.transpose(1, 2))


def _metrics(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[3, ...]: precision, recall, F1 of `z > 0` against y (bool [n]) along the last dim; 0 where
    undefined (no predicted or no true positives), as sklearn's zero_division does."""
    pred = (z > 0).double()
    yf = y.double()
    tp = (pred * yf).sum(-1)
    n_pred = pred.sum(-1)
    n_true = yf.sum()
    precision = torch.where(n_pred > 0, tp / n_pred.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(n_true > 0, tp / n_true.clamp(min=1), torch.zeros_like(tp))
    denom = n_pred + n_true
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return torch.stack([precision, recall, f1])


def _prefix_sweep(A_tr, A_te, y_tr, sw, y_te, ks: list[int], lam: float, first=None):
    """L2 probes on column prefixes: for each k, columns 0..k of A (ones + the first k
    neurons). Returns [3, L, len(ks)] (precision, recall, F1 on test). ks up to SMALL_K are
    fitted as one masked batch, larger ones one k at a time, each warm-started from the
    previous k's solution. `first` [3, L], if given, is used for k = 1 instead of a fit.
    Also returns the largest k's coefficients [L, k + 1] (None if that k was not fitted)."""
    L = A_tr.shape[0]
    out = torch.zeros(3, L, len(ks), dtype=torch.float64, device=A_tr.device)
    small = [i for i, k in enumerate(ks) if k <= SMALL_K and not (k == 1 and first is not None)]
    if first is not None and ks and ks[0] == 1:
        out[:, :, 0] = first
    w_prev = None
    if small:
        sks = [ks[i] for i in small]
        P = max(sks) + 1
        mask = torch.zeros(len(sks), P, dtype=torch.bool, device=A_tr.device)
        for g, k in enumerate(sks):
            mask[g, : k + 1] = True
        mask = mask.unsqueeze(0).expand(L, len(sks), P)
        W = _newton_l2(A_tr[:, :, :P], y_tr, sw, lam, mask=mask)
        out[:, :, small] = _metrics(_scores(A_te[:, :, :P], W), y_te)
        w_prev = W[:, -1, : sks[-1] + 1]  # the largest small k
    for i, k in enumerate(ks):
        if k <= SMALL_K:
            continue
        W0 = torch.zeros(L, 1, k + 1, dtype=A_tr.dtype, device=A_tr.device)
        if w_prev is not None:
            W0[:, 0, : w_prev.shape[1]] = w_prev[:, : k + 1]
        W = _newton_l2(A_tr[:, :, : k + 1], y_tr, sw, lam, W0=W0)
        out[:, :, i] = _metrics(_scores(A_te[:, :, : k + 1], W), y_te)[:, :, 0]
        w_prev = W[:, 0]
    return out, w_prev


def _pruning_sweep(A_tr, A_te, y_tr, sw, y_te, ks: list[int], w_top: torch.Tensor | None = None):
    """The elastic-net pruning sweep, batched over layers. Returns (order [L, K] of column
    indices into A's neurons (0-based) such that order[:, :k] is the set kept at k, most
    important first; the elastic-net probes' own test metrics [3, L, len(ks)]). `w_top`, the
    L2 probe on all K neurons, starts the first fit (any start gives the same optimum)."""
    L, _, P = A_tr.shape
    K = P - 1
    dev = A_tr.device
    order = torch.arange(K, device=dev).unsqueeze(0).expand(L, K).clone()  # current order, mean-dif order
    enet_m = torch.zeros(3, L, len(ks), dtype=torch.float64, device=dev)
    W = w_top if w_top is not None and w_top.shape[1] == P else None
    for i in range(len(ks) - 1, -1, -1):
        k = ks[i]
        cols = torch.cat([torch.zeros(L, 1, dtype=torch.long, device=dev), order[:, :k] + 1], dim=1)
        a_tr = torch.gather(A_tr, 2, cols.unsqueeze(1).expand(L, A_tr.shape[1], k + 1))
        a_te = torch.gather(A_te, 2, cols.unsqueeze(1).expand(L, A_te.shape[1], k + 1))
        c_k, ratio = pruning_penalty(k)
        W0 = None if W is None else W[:, : k + 1]
        W = _enet_newton(a_tr, y_tr, sw, l1=ratio / c_k, l2=(1 - ratio) / c_k, W0=W0)
        enet_m[:, :, i] = _metrics(_scores(a_te, W.unsqueeze(1)), y_te)[:, :, 0]
        # re-rank the k current neurons by |coef|, ties keeping their current order
        mag = W[:, 1:].abs()
        rerank = torch.sort(mag, dim=1, descending=True, stable=True).indices
        order[:, :k] = torch.gather(order[:, :k], 1, rerank)
        W = torch.cat([W[:, :1], torch.gather(W[:, 1:], 1, rerank)], dim=1)
    return order, enet_m


# ---- solvers --------------------------------------------------------------------------------


def _penalty_mask(P: int, dtype, device) -> torch.Tensor:
    pen = torch.ones(P, dtype=dtype, device=device)
    pen[0] = 0.0  # the intercept is not penalised
    return pen


def _data_loss(z: torch.Tensor, y: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """sum_i s_i * logloss(z_i, y_i) along the last dim, summed in float64."""
    return (sw * (torch.nn.functional.softplus(z) - y * z)).double().sum(-1)


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of SPD H [..., P, P] in float64, with jitter if a factorisation fails."""
    Hd = H.double()
    chol, info = torch.linalg.cholesky_ex(Hd)
    if bool((info != 0).any()):
        eye = torch.eye(H.shape[-1], dtype=Hd.dtype, device=Hd.device)
        scale = Hd.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1.0)[..., None, None]
        for jitter in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
            chol, info = torch.linalg.cholesky_ex(Hd + jitter * scale * eye)
            if not bool((info != 0).any()):
                break
    return chol


def _chol_solve(H: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """H^-1 g for SPD H [..., P, P], in float64."""
    return torch.cholesky_solve(g.double().unsqueeze(-1), _cholesky(H)).squeeze(-1).to(g.dtype)


def _hessian(A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """A^T diag(D) A for A [B, n, P], D [B, n] >= 0, leaving out the rows whose curvature is
    below _ROW_CUT * the largest (a well-classified sample: p (1 - p) < 2.5e-5). Near-separable
    features leave most rows there, and a Hessian costs n * P^2: the rows kept are gathered
    when they are under half of n. The result is a preconditioner only (the gradient, the
    objective and so the optimum use every row): its error is below _ROW_CUT * D_max * n
    per unit direction, and it never exceeds the true Hessian, so the decrement it gives
    (the convergence test) is never smaller than the true one."""
    B, n, P = A.shape
    keep = D > _ROW_CUT * D.amax(-1, keepdim=True)
    m = int(keep.sum(-1).max())
    if m <= n // 2 and P > 32:
        rows = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :m]  # kept rows first
        D = torch.gather(D * keep, 1, rows)  # padding rows get D = 0
        A = torch.gather(A, 1, rows.unsqueeze(-1).expand(B, m, P))
    return torch.bmm((A * D.unsqueeze(-1)).transpose(1, 2), A)


def _newton_l2(A: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, lam: float, mask: torch.Tensor | None = None,
               W0: torch.Tensor | None = None) -> torch.Tensor:
    """Batched L2 logistic regression: Newton's method with lazy Hessians and L-BFGS
    corrections in between, and a backtracking (Armijo) line search.

    A [B, n, P] designs (column 0 the intercept's ones), y [n] in {0, 1}, sw [n] sample
    weights, lam = 1/C on columns 1.. ; G probes can share each design: mask [B, G, P] (True
    = the probe uses the column; column 0 always) and W0 [B, G, P]. With neither, G = 1.
    Minimises sum_i sw_i * logloss_i + lam/2 * ||w[1:]||^2 per probe; returns W [B, G, P].

    A Hessian costs n * P^2, a gradient n * P: after a Newton step the Hessian is kept as
    the base of an L-BFGS inverse-Hessian (the last _LBFGS_MEMORY steps), and recomputed only
    when that stops making fast progress (the largest decrement fell by less than a factor
    _REFRESH). The full step is taken where the slope along it at its end is <= _SLOPE_TOL *
    the decrement^2 (the objective is convex: it then did not rise along the step, and no
    function value is needed); elsewhere, Armijo backtracking. Converged when every probe's
    decrement^2 / 2 (the predicted decrease of the objective) is below _NEWTON_TOL * n, or
    when its line search finds no decrease (float32 resolution)."""
    B, _, P = A.shape
    dt, dev = A.dtype, A.device
    if mask is None:
        G = 1 if W0 is None else W0.shape[1]
        m = torch.ones(B, G, P, dtype=dt, device=dev)
    else:
        m = mask.to(dt)
        G = m.shape[1]
    W = torch.zeros(B, G, P, dtype=dt, device=dev) if W0 is None else (W0.to(dt) * m)
    pen = _penalty_mask(P, dt, dev) * lam
    At = A.transpose(1, 2)  # [B, P, n]
    eye = torch.eye(P, dtype=dt, device=dev)
    tol = _NEWTON_TOL * float(sw.sum())
    # G probes sharing a narrow design: the products of column pairs [B, n, P * P], once
    AA = (A.unsqueeze(-1) * A.unsqueeze(-2)).reshape(B, -1, P * P) if G > 1 and P <= 32 else None

    def objective(z, w):
        return _data_loss(z, y, sw) + 0.5 * (pen * w * w).sum(-1, dtype=torch.float64)

    def gradient(z, w):
        return (torch.matmul(sw * (torch.sigmoid(z) - y), A) + pen * w) * m  # [B, G, P]

    z = _scores(A, W)  # [B, G, n]
    g = gradient(z, W)
    stuck = torch.zeros(B, G, dtype=torch.bool, device=dev)  # no decrease found: converged
    chol = None
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s.y) per step
    dec_prev = math.inf
    for _ in range(_NEWTON_MAX_ITER):
        if chol is None:
            p = torch.sigmoid(z)
            D = sw * p * (1 - p)  # [B, G, n]
            if AA is not None:  # many small probes sharing A: each Hessian is D_g @ AA
                H = torch.bmm(D, AA).reshape(B, G, P, P)
            elif G == 1:
                H = _hessian(A, D[:, 0]).unsqueeze(1)
            else:
                AtD = At.unsqueeze(1) * D.unsqueeze(2)  # [B, G, P, n]
                H = torch.bmm(AtD.reshape(B, G * P, -1), A).reshape(B, G, P, P)
            H = H + torch.diag_embed(pen.expand(B, G, P))
            H = H * (m.unsqueeze(-1) * m.unsqueeze(-2)) + eye * (1 - m).unsqueeze(-1)
            chol = _cholesky(H)
            hist = []
        step = -_lbfgs_direction(g, chol, hist) * m
        dec = -(g * step).sum(-1, dtype=torch.float64)  # decrement^2 in the metric in use
        active = (dec >= 2 * tol) & ~stuck  # the others have converged and stay where they are
        if not bool(active.any()):
            break
        dec_max = float(dec[active].max())
        step = step * active.unsqueeze(-1)
        Az = _scores(A, step)
        z1, W1 = z + Az, W + step
        g1 = gradient(z1, W1)
        slope = (g1 * step).sum(-1, dtype=torch.float64)
        bad = active & (slope > _SLOPE_TOL * dec)
        full = not bool(bad.any())
        if not full:
            t, _, _ = _armijo(_along(objective, z, Az, W, step), objective(z, W), dec, dt, bad)
            stuck |= t == 0  # no decrease along a descent direction: float32 resolution
            tt = t.to(dt).unsqueeze(-1)
            z1, W1 = z + tt * Az, W + tt * step
            g1 = gradient(z1, W1)
        s_k, y_k = W1 - W, g1 - g
        W, z, g = W1, z1, g1
        if dec_max > _REFRESH * dec_prev:
            chol = None  # slow progress: a fresh Hessian at the new point
        else:
            sy = (s_k * y_k).sum(-1, keepdim=True)
            rho = torch.where(sy > 0, 1.0 / sy.clamp(min=1e-30), torch.zeros_like(sy))
            hist = (hist + [(s_k, y_k, rho)])[-_LBFGS_MEMORY:]
        dec_prev = dec_max
    return W


def _newton_1d(x: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, lam: float):
    """Batched one-neuron L2 logistic regressions: x [B, n] (one neuron each), the rest as
    _newton_l2. Exact Newton steps (2 x 2 Hessians in closed form; the five sums they and
    the gradient need come from one batched matmul against [1, x, x^2]); the full step is
    taken where the slope at its end is <= _SLOPE_TOL * the decrement^2, elsewhere Armijo
    backtracking. Returns (intercepts [B], weights [B])."""
    B = x.shape[0]
    dev = x.device
    b = torch.zeros(B, dtype=x.dtype, device=dev)
    w = torch.zeros_like(b)
    tol = _NEWTON_TOL * float(sw.sum())
    swy = sw * y
    V = torch.stack([torch.ones_like(x), x, x * x], dim=1).transpose(1, 2)  # [B, n, 3], n-contiguous
    U = torch.empty(B, 2, x.shape[1], dtype=x.dtype, device=dev)  # weighted residuals, curvatures

    def sums(z, w_):
        """(gradient (gb, gw), Hessian (hbb, hbw, hww)) at decision values z [B, n]."""
        p = torch.sigmoid(z)
        sp = torch.mul(p, sw, out=U[:, 1])
        torch.sub(sp, swy, out=U[:, 0])
        sp.addcmul_(sp, p, value=-1.0)  # sw * p * (1 - p)
        S = torch.bmm(U, V)  # [B, 2, 3]
        return (S[:, 0, 0], S[:, 0, 1] + lam * w_), (S[:, 1, 0], S[:, 1, 1], S[:, 1, 2] + lam)

    def objective(z, w_):  # w_ [B, 1]
        return _data_loss(z, y, sw) + 0.5 * lam * (w_ * w_).sum(-1, dtype=torch.float64)

    z = torch.zeros_like(x)
    (gb, gw), (hbb, hbw, hww) = sums(z, w)
    stuck = torch.zeros(B, dtype=torch.bool, device=dev)  # no decrease found: converged
    for _ in range(_NEWTON_MAX_ITER):
        det = (hbb * hww - hbw * hbw).clamp(min=1e-30)
        db = -(hww * gb - hbw * gw) / det
        dw = -(hbb * gw - hbw * gb) / det
        dec = -(gb * db + gw * dw).double()
        active = (dec >= 2 * tol) & ~stuck
        if not bool(active.any()):
            break
        db = torch.where(active, db, torch.zeros_like(db))
        dw = torch.where(active, dw, torch.zeros_like(dw))
        dz = torch.addcmul(db.unsqueeze(-1), dw.unsqueeze(-1), x)
        z1, w1 = z + dz, w + dw
        (gb1, gw1), hess = sums(z1, w1)
        bad = active & ((db * gb1 + dw * gw1).double() > _SLOPE_TOL * dec)
        if bool(bad.any()):
            t, _, _ = _armijo(_along(objective, z, dz, w.unsqueeze(-1), dw.unsqueeze(-1)), objective(z, w.unsqueeze(-1)),
                              dec, x.dtype, bad)
            stuck |= t == 0
            t = t.to(x.dtype)
            db, dw = t * db, t * dw
            z1, w1 = z + t.unsqueeze(-1) * dz, w + dw
            (gb1, gw1), hess = sums(z1, w1)
        b, w, z, gb, gw = b + db, w1, z1, gb1, gw1
        hbb, hbw, hww = hess
    return b, w


def _lbfgs_direction(g: torch.Tensor, chol: torch.Tensor, hist) -> torch.Tensor:
    """H^-1 g by the L-BFGS two-loop recursion with the Cholesky-factored Hessian as the base."""
    q = g
    alphas = []
    for s, yv, rho in reversed(hist):
        a = rho * (s * q).sum(-1, keepdim=True)
        q = q - a * yv
        alphas.append(a)
    r = torch.cholesky_solve(q.double().unsqueeze(-1), chol).squeeze(-1).to(g.dtype)
    for (s, yv, rho), a in zip(hist, reversed(alphas)):
        b = rho * (yv * r).sum(-1, keepdim=True)
        r = r + s * (a - b)
    return r


def _along(objective, z: torch.Tensor, dz: torch.Tensor, w: torch.Tensor, dw: torch.Tensor):
    """t [..., 1] -> the objective at (z + t * dz, w + t * dw)."""
    return lambda t: objective(z + t * dz, w + t * dw)


def _armijo(objective, f: torch.Tensor, dec: torch.Tensor, dt, which: torch.Tensor):
    """Backtracking from t = 1 until objective(t) <= f - _ARMIJO * t * dec, for the probes in
    `which` (bool); the others get t = 1. Returns (t (0 where no decrease was found), the
    objective at t, whether every probe took the full step)."""
    t = torch.ones_like(f)
    done = ~which
    f_new = f
    full = True
    for _ in range(_MAX_HALVINGS):
        cand = objective(t.to(dt).unsqueeze(-1))
        ok = (cand <= f - _ARMIJO * t * dec) & ~done
        f_new = torch.where(ok, cand, f_new)
        done |= ok
        if bool(done.all()):
            break
        full = False
        t = torch.where(done, t, t * 0.5)
    return torch.where(done, t, torch.zeros_like(t)), f_new, full


def _enet_newton(A: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, l1: float, l2: float,
                 W0: torch.Tensor | None = None) -> torch.Tensor:
    """Batched elastic-net logistic regression by an orthant-wise Newton method.

    A [B, n, P] (column 0 the ones), y [n], sw [n]; minimises
    sum_i sw_i * logloss_i + l2/2 * ||w[1:]||^2 + l1 * ||w[1:]||_1. Each step: the
    pseudo-gradient of the objective (the l1 term's one-sided derivative pointing downhill;
    0 for a zero coefficient held there by the penalty), a Newton direction on the free
    coefficients (nonzero, or zero with a nonzero pseudo-gradient) with the smooth part's
    Hessian, where a zero coefficient may only move downhill (against its pseudo-gradient, as
    in OWL-QN), then a backtracking line search that projects onto the orthant of the start
    (a coefficient that would cross zero stops at zero). Directions are computed for all
    probes, steps taken only by those not yet converged; a probe whose line search finds no
    decrease (float32 resolution) is taken as converged. The Hessian is recomputed when
    progress slows or the line search backtracked. Converged when every probe's predicted
    decrease is below _NEWTON_TOL * n. Returns W [B, P]."""
    B, _, P = A.shape
    dt, dev = A.dtype, A.device
    pen = _penalty_mask(P, dt, dev) > 0
    lam1 = l1 * pen.to(dt)
    lam2 = l2 * pen.to(dt)
    At = A.transpose(1, 2)
    eye = torch.eye(P, dtype=dt, device=dev)
    W = torch.zeros(B, P, dtype=dt, device=dev) if W0 is None else W0.to(dt).clone()
    tol = _NEWTON_TOL * float(sw.sum())

    def scores(w):
        return torch.matmul(A, w.unsqueeze(-1)).squeeze(-1)

    def objective(z, w):
        return _data_loss(z, y, sw) + (0.5 * lam2 * w * w + lam1 * w.abs()).sum(-1, dtype=torch.float64)

    z = scores(W)
    f = objective(z, W)
    H = None
    dec_prev = math.inf
    stuck = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(_NEWTON_MAX_ITER):
        p = torch.sigmoid(z)
        g = torch.matmul(At, (sw * (p - y)).unsqueeze(-1)).squeeze(-1) + lam2 * W
        zero = W == 0
        pg = torch.where(W > 0, g + lam1, torch.where(W < 0, g - lam1, torch.zeros_like(g)))
        pg = torch.where(zero & (g + lam1 < 0), g + lam1, pg)
        pg = torch.where(zero & (g - lam1 > 0), g - lam1, pg)
        pg = torch.where(pen, pg, g)
        free = (~zero | (pg != 0) | ~pen).to(dt)
        orthant = torch.where(zero, -torch.sign(pg), torch.sign(W))
        if H is None:
            D = sw * p * (1 - p)
            H = torch.matmul(At * D.unsqueeze(1), A) + torch.diag_embed(lam2.expand(B, P))
        Hm = H * (free.unsqueeze(-1) * free.unsqueeze(-2)) + eye * (1 - free).unsqueeze(-1)
        step = -_chol_solve(Hm, pg * free) * free
        step = torch.where(pen & zero & (torch.sign(step) != -torch.sign(pg)), torch.zeros_like(step), step)
        dec = -(pg * step).sum(-1, dtype=torch.float64)
        active = (dec >= 2 * tol) & ~stuck  # the others are converged: they stay where they are
        if not bool(active.any()):
            break
        dec_max = float(dec[active].max())
        t = torch.ones(B, dtype=torch.float64, device=dev)
        done = ~active
        W_new, z_new, f_new = W, z, f
        full = True
        for _h in range(_ENET_HALVINGS):
            Wt = W + t.to(dt).unsqueeze(-1) * step
            Wt = torch.where(pen & (torch.sign(Wt) != orthant), torch.zeros_like(Wt), Wt)
            zt = scores(Wt)
            ft = objective(zt, Wt)
            ok = (ft <= f + _ARMIJO * (pg * (Wt - W)).sum(-1, dtype=torch.float64)) & ~done
            W_new = torch.where(ok.unsqueeze(-1), Wt, W_new)
            z_new = torch.where(ok.unsqueeze(-1), zt, z_new)
            f_new = torch.where(ok, ft, f_new)
            done |= ok
            if bool(done.all()):
                break
            full = False
            t = torch.where(done, t, t * 0.5)
        stuck |= ~done  # no decrease found along the step (float32 resolution): converged
        W, z, f = W_new, z_new, f_new
        if not full or dec_max > _REFRESH * dec_prev:
            H = None
        dec_prev = dec_max
    return W
