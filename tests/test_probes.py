"""Sparse probes (workers/probes.py) on synthetic activations, checked against scikit-learn
fitting the same probes on the same split, normalisation and neuron subsets. No mocks."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from workers import probes

# ---- synthetic activations -------------------------------------------------------------------


def correlated_gaussians(n=3000, d=300, seed=0):
    """Neurons sharing 8 latent factors; the feature shifts 6 of them by different amounts."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) * 0.7 + rng.standard_normal((n, d))
    y = rng.random(n) < 0.3
    signal = [i for i in (5, 17, 40, 41, 90, 200) if i < d]
    x[np.ix_(y, signal)] += rng.uniform(0.3, 1.0, len(signal))
    return x.astype(np.float32), y


def sparse_relu(n=3000, d=300, seed=1):
    """ReLU-like activations, mostly zero; one strong and a few weak feature neurons."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) - 1.2
    y = rng.random(n) < 0.25
    x[y, 33] += 2.0
    x[np.ix_(y, [3, 8, 13, 21])] += 0.6
    return np.maximum(x, 0).astype(np.float32), y


def imbalanced_gelu(n=3000, d=300, seed=2):
    """About 10% positives, signal spread thinly over 20 neurons, GELU-shaped activations."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4)) @ rng.standard_normal((4, d)) * 0.5 + rng.standard_normal((n, d))
    y = rng.random(n) < 0.1
    signal = np.arange(0, d, 7)[:20]
    z[np.ix_(y, signal)] += rng.uniform(0.1, 0.7, len(signal))
    x = z * 0.5 * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z**3)))
    return x.astype(np.float32), y


def planted(n=2000, d=64, neuron=17, seed=3):
    """Noise, except one neuron that fires on the feature."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rng.random(n) < 0.2
    x[:, neuron] = np.where(y, 3.0, 0.0) + 0.5 * rng.standard_normal(n)
    return x.astype(np.float32), y


DATASETS = {"correlated_gaussians": correlated_gaussians, "sparse_relu": sparse_relu,
            "imbalanced_gelu": imbalanced_gelu}


# ---- the reference: scikit-learn on the same split ------------------------------------------


def normalised_split(x: np.ndarray, y: np.ndarray, seed: int):
    split = probes.split_indices(torch.from_numpy(y), seed)
    tr, te = split.train.numpy(), split.test.numpy()
    sd = x[tr].astype(np.float64).std(axis=0)
    sd[sd == 0] = 1.0
    return x[tr] / sd, y[tr], x[te] / sd, y[te]


def sklearn_f1(data, neurons, solver: str = "newton-cholesky") -> float:
    """Test F1 of sklearn's probe on these neurons. newton-cholesky minimises the same
    objective as the default lbfgs, to convergence rather than to lbfgs's looser stop, and
    faster at these sizes."""
    xtr, ytr, xte, yte = data
    model = LogisticRegression(class_weight="balanced", C=1.0, max_iter=5000, solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(xtr[:, neurons], ytr)
    return f1_score(yte, model.predict(xte[:, neurons]), zero_division=0)


def elastic_net(**kw) -> LogisticRegression:
    """sklearn's class-balanced elastic-net logistic regression (saga), before and after 1.8
    (which deprecated `penalty`: l1_ratio alone says it)."""
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    extra = {} if (major, minor) >= (1, 8) else {"penalty": "elasticnet"}
    return LogisticRegression(class_weight="balanced", solver="saga", **extra, **kw)


@pytest.fixture(scope="module")
def fitted():
    out = {}
    for name, make in DATASETS.items():
        x, y = make()
        out[name] = (x, y, probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y), seed=0))
    return out


# ---- tests ----------------------------------------------------------------------------------


def test_planted_neuron_is_found():
    x, y = planted()
    res = probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y))
    assert res.ranking[0]["neuron"] == 17
    assert res.best["neuron"] == 17 and res.best["f1"] >= 0.95
    assert res.single[0]["neuron"] == 17 and res.single[0]["f1"] == res.best["f1"]
    k1 = res.curve[0]
    assert k1["k"] == 1 and k1["neurons"] == [17] and k1["f1"] == res.best["f1"]
    assert res.pruned_curve[0]["neurons"] == [17] and res.pruned_curve[0]["f1"] >= 0.95
    # the mean difference of the planted neuron dwarfs the rest
    assert res.ranking[0]["mean_dif"] > 3 * res.ranking[1]["mean_dif"]


@pytest.mark.parametrize("name", list(DATASETS))
def test_agrees_with_sklearn(fitted, name):
    x, y, res = fitted[name]
    data = normalised_split(x, y, 0)
    assert [c["k"] for c in res.curve] == list(probes.KS)
    for c in res.curve:
        assert abs(sklearn_f1(data, c["neurons"]) - c["f1"]) <= 0.02, (name, c["k"])
    for s in res.single:
        assert abs(sklearn_f1(data, [s["neuron"]]) - s["f1"]) <= 0.02, (name, s["neuron"])
    for c in res.pruned_curve:  # the pruning sweep's L2 refits, on its own neuron sets
        assert abs(sklearn_f1(data, c["neurons"]) - c["f1"]) <= 0.02, (name, "pruned", c["k"])


@pytest.mark.parametrize("name", list(DATASETS))
def test_ranking_is_mean_difference(fitted, name):
    x, y, res = fitted[name]
    xtr, ytr, _, _ = normalised_split(x, y, 0)
    dif = np.abs(xtr[ytr].mean(0) - xtr[~ytr].mean(0))
    top = [r["neuron"] for r in res.ranking]
    assert len(top) == probes.TOP_NEURONS
    np.testing.assert_allclose([r["mean_dif"] for r in res.ranking], dif[top], rtol=1e-4, atol=1e-6)
    assert dif[top].min() >= np.sort(dif)[-probes.TOP_NEURONS] - 1e-5
    assert all(c["neurons"] == top[: c["k"]] or c["k"] > probes.TOP_NEURONS for c in res.curve)


@pytest.mark.parametrize("name", list(DATASETS))
def test_pruning_sweep_sets_are_nested(fitted, name):
    _, _, res = fitted[name]
    sets = [c["neurons"] for c in res.pruned_curve]
    assert [len(s) for s in sets] == list(probes.KS)
    assert all(len(set(s)) == len(s) for s in sets)
    for small, big in itertools.pairwise(sets):
        assert big[: len(small)] == small  # nested, and in one pruning order
    # it starts from the top neurons by mean difference
    assert set(sets[-1]) == set(res.curve[-1]["neurons"])
    assert res.pruned_curve[-1]["f1"] == res.curve[-1]["f1"]
    for c in res.pruned_curve:
        assert 0.0 <= c["enet_f1"] <= 1.0


def test_elastic_net_solver_matches_saga():
    """The pruning sweep's elastic net against scikit-learn's saga run to a tight tolerance."""
    x, y = imbalanced_gelu(n=1200, d=12, seed=5)
    xtr, ytr, _, _ = normalised_split(x, y, 0)
    mu = xtr.mean(0)
    for k in (12, 3):
        c_k, ratio = probes.pruning_penalty(k)
        ref = elastic_net(C=c_k, l1_ratio=ratio, max_iter=100000, tol=1e-10).fit(xtr[:, :k], ytr)
        a = torch.from_numpy(np.concatenate([np.ones((len(xtr), 1)), xtr[:, :k] - mu[:k]], axis=1)).float()
        n_pos = int(ytr.sum())
        sw = torch.from_numpy(np.where(ytr, len(ytr) / (2 * n_pos), len(ytr) / (2 * (len(ytr) - n_pos)))).float()
        w = probes._enet_newton(a[None], torch.from_numpy(ytr).float(), sw, l1=ratio / c_k, l2=(1 - ratio) / c_k)[0]
        np.testing.assert_allclose(w[1:].numpy(), ref.coef_[0], atol=2e-3)
        assert math.isclose(float(w[0]) - float(w[1:] @ torch.from_numpy(mu[:k]).float()), ref.intercept_[0],
                            abs_tol=5e-3)


def test_too_few_positives():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((500, 16)).astype(np.float32))
    y = torch.zeros(500, dtype=torch.bool)
    y[:26] = True  # 26 positives: 18 train, 8 test
    with pytest.raises(probes.TooFewPositives) as err:
        probes.probe_layer(x, y)
    assert isinstance(err.value, ValueError)
    assert err.value.counts == {"train_pos": 18, "train_neg": 332, "test_pos": 8, "test_neg": 142}
    with pytest.raises(probes.TooFewPositives):
        probes.probe_layer(x, ~y)  # too few negatives is no better
    y[:29] = True  # 29 positives: 20 train, just enough
    assert probes.probe_layer(x, y, prune=False).counts["train_pos"] == probes.MIN_TRAIN_POSITIVES


def test_split_is_stratified_and_seeded():
    y = torch.from_numpy(np.random.default_rng(0).random(1000) < 0.1)
    a, b, c = probes.split_indices(y, 0), probes.split_indices(y, 0), probes.split_indices(y, 1)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    n_pos = int(y.sum())
    assert a.counts["test_pos"] == math.floor(0.3 * n_pos + 0.5)
    assert a.counts["test_neg"] == math.floor(0.3 * (1000 - n_pos) + 0.5)
    assert sorted(a.train.tolist() + a.test.tolist()) == list(range(1000))


def test_deterministic_and_json_ready():
    x, y = correlated_gaussians(n=1500, d=80, seed=7)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    one, two = probes.probe_layer(X, Y, seed=4).to_dict(), probes.probe_layer(X, Y, seed=4).to_dict()
    assert one == two
    assert probes.probe_layer(X, Y, seed=5).counts == one["counts"]  # stratified: same counts ...
    text = json.dumps(one)  # ... and only JSON types inside

    def types(v):
        if isinstance(v, dict):
            return set().union(*(types(u) for u in v.values())) if v else set()
        if isinstance(v, list):
            return set().union(*(types(u) for u in v)) if v else set()
        return {type(v)}

    assert types(json.loads(text)) <= {int, float, str, bool}
    assert types(one) <= {int, float, str, bool}
    # d = 80 < 256: ks up to 64, then d itself
    assert [c["k"] for c in one["curve"]] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 80]


def test_layers_share_the_split_and_match_single_layers():
    x1, y = sparse_relu(n=1500, d=120, seed=11)
    x2 = np.roll(x1, 5, axis=1) * 2.0 + 0.1  # the same neurons, moved and rescaled
    Y = torch.from_numpy(y)
    both = probes.probe_layers({3: torch.from_numpy(x1), 7: torch.from_numpy(x2)}, Y, seed=2)
    assert list(both) == [3, 7]
    alone = probes.probe_layer(torch.from_numpy(x1), Y, seed=2)
    assert both[3].counts == both[7].counts == alone.counts
    assert [r["neuron"] for r in both[3].ranking] == [r["neuron"] for r in alone.ranking]
    assert [(r["neuron"] - 5) % 120 for r in both[7].ranking] == [r["neuron"] for r in alone.ranking]
    for a, b, c in zip(both[3].curve, both[7].curve, alone.curve):
        assert abs(a["f1"] - c["f1"]) < 1e-3 and abs(b["f1"] - c["f1"]) < 1e-3


def test_float16_input():
    x, y = sparse_relu(n=1500, d=120, seed=12)
    full = probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y), prune=False)
    half = probes.probe_layer(torch.from_numpy(x).half(), torch.from_numpy(y), prune=False)
    assert half.best["neuron"] == full.best["neuron"]
    assert max(abs(a["f1"] - b["f1"]) for a, b in zip(half.curve, full.curve)) <= 0.02
    assert half.pruned_curve == []


def test_constant_neurons_are_not_probed_into_noise():
    x, y = planted(n=1000, d=8, neuron=2, seed=9)
    x[:, 5] = 4.25  # constant: normalised by 1, mean difference 0, its probe predicts nothing
    res = probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y))
    const = next(s for s in res.single if s["neuron"] == 5)
    assert const["mean_dif"] == 0.0 and const["f1"] == 0.0 and res.ranking[-1]["neuron"] == 5
    assert [c["k"] for c in res.curve] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_features_with_identical_labels_are_probed_once_and_reported_as_one():
    """Two features with the same samples and labels are one feature: the second is reported
    under the first (not probed again); one whose labels differ is probed on its own."""
    from workers.features import Feature, ProbeDataset
    from workers.probing import probe_features

    gen = torch.Generator().manual_seed(0)
    n_windows, context, width = 40, 8, 16
    acts = torch.randn(n_windows, context, width, generator=gen)
    window = torch.arange(n_windows).repeat_interleave(context)
    position = torch.arange(context).repeat(n_windows)
    label = acts[window, position, 3] > 0.5
    acts[window[label], position[label], 3] += 2.0  # unit 3 carries the feature

    def feature(name: str, labels: torch.Tensor) -> Feature:
        return Feature(name, "token", "token", "test", name, window, position, labels)

    other = label.clone()
    other[:40] = ~other[:40]
    dataset = ProbeDataset(torch.zeros(n_windows, context, dtype=torch.int64), torch.full((n_windows,), context),
                           [feature("first", label), feature("again", label.clone()), feature("other", other)],
                           "test")
    results = {r.feature.name: r for r in probe_features({0: acts}, dataset)}
    assert results["first"].skipped is None and results["first"].layers[0].best["neuron"] == 3
    assert results["again"].skipped is not None and not results["again"].layers
    assert "identical to those of 'first'" in results["again"].skipped
    assert results["again"].counts == results["first"].counts
    assert results["other"].skipped is None and results["other"].layers


def test_paper_method_takes_the_paper_code_s_split_scaling_and_seed():
    """--method paper: scikit-learn's train_test_split(test_size=0.3, random_state=1) and neurons divided by
    10 * max(train std, 1e-3), as the paper's code (experiments/inner_loops.split_and_preprocess) does; each
    probe checked against scikit-learn's on that data."""
    from sklearn.model_selection import train_test_split

    x, y = imbalanced_gelu(n=2000, d=120, seed=5)
    x[:, 3] *= 1e-5  # a neuron of std below 1e-3: the floor applies
    res = probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y), method="paper")
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=1)
    split = probes.paper_split(torch.from_numpy(y))
    assert split.train.tolist() == sorted(idx_tr) and split.test.tolist() == sorted(idx_te)
    assert res.counts == split.counts and res.params["method"] == "paper" and res.params["seed"] == 1
    scale = 10 * np.maximum(x[idx_tr].astype(np.float64).std(axis=0), 1e-3)
    data = (x[idx_tr] / scale, y[idx_tr], x[idx_te] / scale, y[idx_te])
    xtr, ytr = data[0], data[1]
    dif = np.abs(xtr[ytr].mean(0) - xtr[~ytr].mean(0))
    assert [r["neuron"] for r in res.ranking] == list(np.argsort(-dif, kind="stable")[:30])
    for r in res.ranking:
        assert r["mean_dif"] == pytest.approx(dif[r["neuron"]], rel=1e-4)
    for c in res.curve:
        assert abs(sklearn_f1(data, c["neurons"]) - c["f1"]) <= 0.02, c["k"]
    for s in res.single:
        assert abs(sklearn_f1(data, [s["neuron"]]) - s["f1"]) <= 0.02, s["neuron"]
    # the other method differs in its split and its scale, so its probes do too
    ours = probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y))
    assert ours.counts != res.counts or [c["f1"] for c in ours.curve] != [c["f1"] for c in res.curve]
    with pytest.raises(ValueError, match="unknown probe method"):
        probes.probe_layer(torch.from_numpy(x), torch.from_numpy(y), method="sklearn")
