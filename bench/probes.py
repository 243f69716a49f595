"""Benchmark: Needle's sparse probes (workers/probes.py) against scikit-learn fitting the same probes.

    python bench/probes.py                                   # the demo: all built-in features x all layers (= --demo)
    python bench/probes.py --synthetic 14 4 8000 768         # synthetic: 14 features x 4 layers x 8000 samples x 768
    python bench/probes.py --synthetic 2 4 8000 768          # smoke run
    python bench/probes.py --device cuda                     # on a GPU

The demo (the default): assets/demo-model loaded with workers.loading.load_model, the dataset
of every built-in feature spec as `needle demo` builds it (load_features(["text", "python"],
context 64, 16,384 tokens per spec, corpus stdlib)), every layer's activations from one
workers.probing.collect_activations (BOS as workers.corpus.bos_prefix_id says), and each
feature's per-layer samples from workers.probing.samples: what the probes stage does before
it fits. Loading, the dataset and the activations are timed apart and are in no ratio.
Features with fewer than 20 train positives (or negatives) are skipped, as the stage skips
them (probes.TooFewPositives), and listed.

For each feature (its own samples and labels, every layer's activations), measured in the
same run, feature by feature, in alternating order so that drift in the machine's speed
falls on all alike:

- ours: `probes.probe_layers(Xs, y, prune=False)`, everything it does for all layers at
  once: the split, per-neuron statistics, the mean-difference ranking, the 30 single-neuron
  probes, the fast sweep over k, every test metric, the move to python lists; and again with
  `prune=True` (adds the elastic-net pruning sweep and its L2 refits).
- sklearn: `LogisticRegression(class_weight="balanced", C=1.0)` fitted on the same
  normalised train rows (divided by the train std, as ours) and the same neuron subsets (the
  30 single neurons, the top-k for each k of the sweep), with `predict` on the test rows;
  only fit + predict are timed (the split, the normalisation, the subset copies and the F1
  are not), so the baseline is a lower bound. Solvers: lbfgs (sklearn's default) and
  newton-cholesky (its fastest for this shape); max_iter 1000. sklearn's BLAS runs on
  `--sklearn-threads` (default 1): on the 2-core development machine its fits are this
  small that a second BLAS thread made lbfgs 3-4 times slower, not faster, so one thread is
  the stricter baseline; torch keeps `--threads`.
- pruning: the paper's iterative pruning with sklearn's saga elastic net (C = k/20,
  l1_ratio = clip(exp(-k/20), 0.1, 0.9), max_iter 1000 as in the paper's code), from the top
  256 by mean difference down, re-ranking by |coefficient|, on the first `--prune-pairs`
  (feature, layer) pairs only (about 3 s a pair here), against our pruning time per pair
  (prune=True minus prune=False, per layer).

Agreement: the largest |F1 difference| between our probes and each sklearn solver's, over
every probe (single and sweep); for pruning, how often the kept sets are identical and, where
they are, the largest |F1 difference| of the elastic-net probes. Peak memory: the process's
peak resident memory during our runs beyond its size before them, and on a GPU
torch.cuda.max_memory_allocated beyond what was allocated before. Goal (the issue): ours
>= 10x faster than scikit-learn's LogisticRegression fitting the same probes, at equal F1
(within 0.02), against the fastest solver timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name, reset_rss_peak, status_mb, sync  # bench/machine.py

from workers import probes

GOAL = 10.0  # ours >= 10x faster than sklearn ...
F1_TOLERANCE = 0.02  # ... at equal F1 (within 0.02)


# ---- machine and memory ----------------------------------------------------------------------


# ---- data --------------------------------------------------------------------------------------


def synthetic_feature(f: int, n_layers: int, n: int, d: int, dtype: torch.dtype, device: str):
    """One feature's dataset: labels [n] and, per layer, activations [n, d] shaped like an MLP's
    (GELU of correlated pre-activations: 32 shared factors plus noise). The positive share
    varies by feature (3% to 40%); the feature is carried by a few neurons per layer, by one
    dominant neuron in some layers (a 'monosemantic' one) and spread thinly in others."""
    rng = np.random.default_rng(1000 + f)
    rate = [0.03, 0.05, 0.1, 0.2, 0.3, 0.4][f % 6]
    y = rng.random(n) < rate
    xs = {}
    for layer in range(n_layers):
        g = torch.Generator().manual_seed(10_000 * f + layer)
        z = torch.randn(n, 32, generator=g) @ (torch.randn(32, d, generator=g) * 0.4) + torch.randn(n, d, generator=g)
        z -= 1.0  # mostly below zero, as MLP pre-activations are
        signal = rng.choice(d, size=12, replace=False)
        strength = rng.uniform(0.05, 0.6, size=12)
        if (f + layer) % 3 == 0:
            strength[0] = rng.uniform(1.5, 3.0)  # one neuron that nearly is the feature
        z[torch.from_numpy(y)] += torch.zeros(d).index_put_((torch.from_numpy(signal),), torch.from_numpy(strength).float())
        xs[layer] = torch.nn.functional.gelu(z).to(dtype).to(device)
    return f"synthetic-{f}", xs, torch.from_numpy(y).to(device)


DEMO_MODEL = ROOT / "assets" / "demo-model"
DEMO_SPECS = ["text", "python"]  # every built-in feature spec (`needle demo` probes these)
DEMO_CONTEXT = 64
DEMO_TOKENS = 16_384  # app/config.py demo_probe_tokens
DEMO_CORPUS = "stdlib"


def demo_features(device: str, setup: dict):
    """The demo model's built-in features, each as (name, {layer: activations [n, d_mlp]},
    labels [n] bool), built as the probes stage builds them (workers/stages.run_probes):
    load_features, one collect_activations over every layer, then probing.samples per
    feature and layer. The setup times (load, dataset, activations) go into `setup` and into
    no ratio."""
    from workers import probing
    from workers.corpus import bos_prefix_id
    from workers.features import load_features
    from workers.loading import load_model

    t0 = time.perf_counter()
    loaded = load_model(str(DEMO_MODEL), device=device)
    setup["load_model_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    dataset = load_features(DEMO_SPECS, loaded.tokenizer, context=DEMO_CONTEXT, max_tokens=DEMO_TOKENS,
                            corpus=DEMO_CORPUS)
    setup["dataset_s"] = round(time.perf_counter() - t0, 2)
    layers = list(range(loaded.adapter.n_layers))
    t0 = time.perf_counter()
    acts = probing.collect_activations(loaded.model, loaded.adapter, layers, dataset, bos_prefix_id(loaded.tokenizer))
    sync(device)
    setup["activations_s"] = round(time.perf_counter() - t0, 2)
    setup["rows"] = int(dataset.windows.shape[0])
    setup["tokens"] = int(dataset.lengths.sum())
    setup["layers"] = len(layers)
    setup["d_mlp"] = int(loaded.adapter.d_mlp)
    setup["features"] = len(dataset.features)
    print(f"demo: {setup['features']} features over {setup['rows']} windows ({setup['tokens']:,} tokens), "
          f"{len(layers)} layers x {setup['d_mlp']} neurons; load {setup['load_model_s']} s, dataset "
          f"{setup['dataset_s']} s, activations {setup['activations_s']} s (not timed against sklearn)",
          file=sys.stderr)
    for feature in dataset.features:
        xs = {layer: probing.samples(a, feature, dataset.lengths) for layer, a in acts.items()}
        yield feature.name, xs, feature.label.to(device)


# ---- the baselines -----------------------------------------------------------------------------


def sklearn_model(solver: str, **kw):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(class_weight="balanced", C=1.0, solver=solver, max_iter=1000, **kw)


def elastic_net(c: float, ratio: float):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    extra = {} if (major, minor) >= (1, 8) else {"penalty": "elasticnet"}
    return LogisticRegression(class_weight="balanced", C=c, l1_ratio=ratio, solver="saga", max_iter=1000, **extra)


def f1(y_true: np.ndarray, pred: np.ndarray) -> float:
    tp = int((pred & y_true).sum())
    denom = int(pred.sum()) + int(y_true.sum())
    return 2 * tp / denom if denom else 0.0


def normalised(x: torch.Tensor, split) -> tuple[np.ndarray, np.ndarray]:
    xn = x.float().cpu().numpy()
    tr, te = xn[split.train.numpy()], xn[split.test.numpy()]
    sd = tr.std(axis=0)
    sd[sd == 0] = 1.0
    return tr / sd, te / sd


def sklearn_layer(solver: str, xtr, ytr, xte, yte, subsets: list[list[int]]) -> tuple[float, list[float]]:
    """Fit + predict of every subset; (seconds, F1 per subset)."""
    seconds, f1s = 0.0, []
    for cols in subsets:
        a, b = np.ascontiguousarray(xtr[:, cols]), np.ascontiguousarray(xte[:, cols])
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pred = sklearn_model(solver).fit(a, ytr).predict(b)
        seconds += time.perf_counter() - t0
        f1s.append(f1(yte, pred.astype(bool)))
    return seconds, f1s


def sklearn_pruning(xtr, ytr, xte, yte, top: list[int], ks: list[int]):
    """The paper's telescopic sweep with saga; (seconds, kept sets per k ascending, enet F1 per
    k, how many of the fits stopped at max_iter rather than converging)."""
    cur = np.asarray(top)
    sets, f1s, seconds, capped = {}, {}, 0.0, 0
    for k in sorted(ks, reverse=True):
        cur = cur[:k]
        c, ratio = probes.pruning_penalty(k)
        a, b = np.ascontiguousarray(xtr[:, cur]), np.ascontiguousarray(xte[:, cur])
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = elastic_net(c, ratio).fit(a, ytr)
            pred = model.predict(b)
        seconds += time.perf_counter() - t0
        capped += int(model.n_iter_[0] >= model.max_iter)
        f1s[k] = f1(yte, pred.astype(bool))
        cur = cur[np.argsort(-np.abs(model.coef_[0]), kind="stable")]
        sets[k] = sorted(cur.tolist())
    return seconds, [sets[k] for k in ks], [f1s[k] for k in ks], capped


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = ap.add_mutually_exclusive_group()
    data.add_argument("--demo", action="store_true",
                      help="the demo model's built-in features x all its layers (the default)")
    data.add_argument("--synthetic", nargs=4, type=int, metavar=("F", "L", "N", "D"),
                      help="synthetic data instead: features, layers, samples per feature, neurons per layer "
                           "(e.g. 14 4 8000 768)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (ours; sklearn runs on the CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="activations' dtype")
    ap.add_argument("--solvers", default="lbfgs,newton-cholesky", help="sklearn solvers to time, comma-separated")
    ap.add_argument("--prune-pairs", type=int, default=4,
                    help="(feature, layer) pairs for the saga pruning baseline (0: none; -1: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--sklearn-threads", type=int, default=1,
                    help="BLAS threads for sklearn (default 1: faster than 2 for fits this small here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, metavar="FILE",
                    help="also write the figures printed as JSON to FILE (bench/gpu.sh reads it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from threadpoolctl import threadpool_limits

    # sklearn's thread pools are limited only while it runs: torch shares the OpenMP pool, and
    # a global limit would hold torch to it too
    device, dtype = args.device, getattr(torch, args.dtype)
    solvers = [s for s in args.solvers.split(",") if s]
    demo = args.synthetic is None
    setup: dict = {}
    if demo:
        if args.dtype != "float32":
            sys.exit("--dtype applies to --synthetic only: the demo's samples are float32, as in the stage")
        features = demo_features(device, setup)
        data = (f"demo: {'+'.join(DEMO_SPECS)} features, {DEMO_TOKENS:,} tokens per spec, context {DEMO_CONTEXT}, "
                f"corpus {DEMO_CORPUS}")
    else:
        F, L, n, d = args.synthetic
        features = (synthetic_feature(f, L, n, d, dtype, device) for f in range(F))
        data = f"synthetic {F} features x {L} layers x {n} samples x {d} neurons"

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    machine = gpu or f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; torch {torch.__version__}, {threads} threads; sklearn {args.sklearn_threads} BLAS "
          f"threads; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)

    ours_fast = ours_full = 0.0
    base = {s: 0.0 for s in solvers}
    per_feature_ratio = {s: [] for s in solvers}
    dF1 = {s: [] for s in solvers}
    prune_pairs_done, prune_ours, prune_sk = 0, 0.0, 0.0
    prune_same, prune_total, prune_dF1, prune_jaccard, prune_capped = 0, 0, [], [], 0
    peak_rss, gpu_peak = 0.0, 0.0
    probes_fitted, layers_done, features_done, skipped, sample_counts = 0, 0, 0, [], []
    warmed = False
    fi = -1
    for name, xs, y in features:
        counts = probes.split_indices(y.cpu(), args.seed).counts
        if min(counts["train_pos"], counts["train_neg"]) < probes.MIN_TRAIN_POSITIVES:
            exc = probes.TooFewPositives(dict(counts))
            skipped.append(f"{name}: {exc}")
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        fi += 1
        if not warmed:  # allocator, kernels, BLAS handles
            probes.probe_layers(xs, y, seed=args.seed)
            warmed = True
        # ours, both ways, timed with the peak memory
        sync(device)
        rss0 = status_mb("VmRSS")
        reset_rss_peak()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            g0 = torch.cuda.memory_allocated()
        try:
            t0 = time.perf_counter()
            probes.probe_layers(xs, y, seed=args.seed, prune=False)
            sync(device)
            t_fast = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = probes.probe_layers(xs, y, seed=args.seed, prune=True)
            sync(device)
            t_full = time.perf_counter() - t0
        except probes.TooFewPositives as exc:
            skipped.append(f"{name}: {exc}")
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        peak_rss = max(peak_rss, status_mb("VmHWM") - rss0)
        if gpu:
            gpu_peak = max(gpu_peak, (torch.cuda.max_memory_allocated() - g0) / 2**20)
        ours_fast += t_fast
        ours_full += t_full
        features_done += 1

        split = probes.split_indices(y.cpu(), args.seed)
        ytr, yte = split.y_train.numpy(), split.y_test.numpy()
        t_base = {s: 0.0 for s in solvers}
        order = solvers if fi % 2 == 0 else solvers[::-1]
        for layer, lp in res.items():
            xtr, xte = normalised(xs[layer], split)
            subsets = [[s["neuron"]] for s in lp.single] + [c["neurons"] for c in lp.curve]
            ours_f1 = [s["f1"] for s in lp.single] + [c["f1"] for c in lp.curve]
            for s in order:
                with threadpool_limits(args.sklearn_threads):
                    sec, f1s = sklearn_layer(s, xtr, ytr, xte, yte, subsets)
                t_base[s] += sec
                dF1[s].extend(abs(a - b) for a, b in zip(f1s, ours_f1))
            probes_fitted += len(subsets)
            layers_done += 1
            if args.prune_pairs < 0 or prune_pairs_done < args.prune_pairs:
                ks = [c["k"] for c in lp.pruned_curve]
                with threadpool_limits(args.sklearn_threads):
                    sec, sets, f1s, capped = sklearn_pruning(xtr, ytr, xte, yte, lp.curve[-1]["neurons"], ks)
                prune_capped += capped
                prune_sk += sec
                prune_ours += (t_full - t_fast) / len(res)
                prune_pairs_done += 1
                for c, kept, f in zip(lp.pruned_curve, sets, f1s):
                    prune_total += 1
                    prune_jaccard.append(len(set(c["neurons"]) & set(kept)) / len(set(c["neurons"]) | set(kept)))
                    if sorted(c["neurons"]) == kept:
                        prune_same += 1
                        prune_dF1.append(abs(c["enet_f1"] - f))
        counts = next(iter(res.values())).counts
        pos = counts["train_pos"] + counts["test_pos"]
        sample_counts.append(int(y.numel()))
        for s in solvers:
            base[s] += t_base[s]
            per_feature_ratio[s].append(t_base[s] / t_fast)
        print(f"{name}: ours {t_fast:.3f} s (with pruning {t_full:.3f} s); sklearn " + ", ".join(
            f"{s} {t_base[s]:.2f} s ({t_base[s] / t_fast:.1f}x)" for s in solvers) +
            f"; positives {pos}; load {os.getloadavg()[0]:.2f}",
            file=sys.stderr)

    if not features_done:
        sys.exit("no feature could be probed: " + "; ".join(skipped))
    ratio = {s: base[s] / ours_fast for s in solvers}
    result = {
        "data": data,
        "setup_not_timed_against_sklearn": setup or None,
        "dtype": args.dtype,
        "device": machine,
        "threads": threads,
        "sklearn_threads": args.sklearn_threads,
        "features": features_done,
        "layers_probed": layers_done,
        "skipped": skipped,
        "probes_per_layer": probes_fitted // max(layers_done, 1),
        "samples_per_feature": sample_counts,
        "ours_s": round(ours_fast, 3),
        "ours_with_pruning_s": round(ours_full, 3),
        "sklearn_s": {s: round(base[s], 3) for s in solvers},
        "ratio": {s: round(ratio[s], 2) for s in solvers},
        "ratio_per_feature_median": {s: round(statistics.median(per_feature_ratio[s]), 2) for s in solvers},
        "max_abs_dF1": {s: round(max(dF1[s]), 4) for s in solvers},
        "mean_abs_dF1": {s: round(statistics.fmean(dF1[s]), 5) for s in solvers},
        "pruning": {
            "pairs": prune_pairs_done,
            "ours_s_per_pair": round(prune_ours / prune_pairs_done, 3) if prune_pairs_done else None,
            "sklearn_saga_s_per_pair": round(prune_sk / prune_pairs_done, 3) if prune_pairs_done else None,
            "ratio": round(prune_sk / prune_ours, 1) if prune_pairs_done and prune_ours > 0 else None,
            "kept_sets_identical": f"{prune_same}/{prune_total}",
            "kept_sets_mean_jaccard": round(statistics.fmean(prune_jaccard), 3) if prune_jaccard else None,
            "max_abs_dF1_where_identical": round(max(prune_dF1), 4) if prune_dF1 else None,
            "saga_fits_stopped_at_max_iter": f"{prune_capped}/{prune_total}",
        },
        "peak_rss_beyond_start_mb": round(peak_rss, 1),
        "gpu_peak_beyond_start_mb": round(gpu_peak, 1) if gpu else None,
        "goal": GOAL,
        "goal_met": {s: ratio[s] >= GOAL and max(dF1[s]) <= F1_TOLERANCE for s in solvers},
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    best = min(solvers, key=lambda s: base[s])
    met = ratio[best] >= GOAL and max(dF1[best]) <= F1_TOLERANCE
    if setup:
        print(f"setup (in no ratio): load model {setup['load_model_s']} s, dataset {setup['dataset_s']} s, activations "
              f"{setup['activations_s']} s ({setup['rows']} windows, {setup['tokens']:,} tokens, {setup['layers']} layers)")
    if skipped:
        print(f"skipped {len(skipped)}: " + "; ".join(skipped))
    print(f"sparse probes: {features_done} features, {layers_done} feature-layers in {ours_fast:.2f} s ({ours_full:.2f} s with pruning); "
          f"sklearn " + ", ".join(f"{s} {base[s]:.1f} s = {ratio[s]:.1f}x" for s in solvers) +
          f"; max |dF1| {max(max(v) for v in dF1.values()):.4f} (goal >= {GOAL:.0f}x faster at equal F1, within "
          f"{F1_TOLERANCE}, against the fastest, {best}: {'met' if met else 'NOT met'}); peak +{peak_rss:.0f} MB resident"
          + (f", +{gpu_peak:.0f} MB GPU" if gpu else "") + f"; {machine}, {threads} threads "
          f"(sklearn {args.sklearn_threads})")
    if prune_pairs_done:
        print(f"pruning sweep: ours {prune_ours / prune_pairs_done:.3f} s per feature-layer, sklearn saga "
              f"{prune_sk / prune_pairs_done:.2f} s = {prune_sk / max(prune_ours, 1e-9):.0f}x; kept sets identical "
              f"{prune_same}/{prune_total} (mean Jaccard {statistics.fmean(prune_jaccard):.2f}); saga stopped at "
              f"max_iter in {prune_capped}/{prune_total} fits" + (f", max |dF1| there {max(prune_dF1):.4f}" if prune_dF1 else ""))


if __name__ == "__main__":
    main()
