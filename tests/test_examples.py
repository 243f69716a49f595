"""The examples stage end to end: top contexts, interval samples and activation statistics.

Tiny models saved with save_pretrained and loaded through the user's code path, a corpus
written here, indexed into SQLite and Postgres, and compared with a direct forward pass
written here (a hook of our own on each MLP's output projection, float32) and a
brute-force computation over every window in float64. One Llama has neurons set by hand
to fire on one token only (tests/tinymodels.build_detector), so what the stage must
store for them is known exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from sqlalchemy import text

from app import queries
from app.arrays import FLOAT16, FLOAT32, INT16, INT32, INT64, unpack
from app.config import Settings
from app.db import engine_for, session_scope
from app.errors import NeedleError
from needle.cli import index_model
from tests.tinymodels import POSITIONS, build_detector, build_tiny
from workers import examples
from workers.examples import BINS, HIST_BINS, HIST_MARGIN, PER_BIN, TOP_K

CONTEXT = 16
N_WINDOWS = 40
X_PIECE = "▁house"  # the token the detector fires on; the corpus words below never make it otherwise
DETECTOR = (1, 5)  # (layer, neuron) that fires on X_PIECE only
BOS_DETECTOR = (0, 7)  # (layer, neuron) that fires on BOS only
WORDS = ["the", "dog", "is", "in", "and", "lazy", "print", "with", "not", "return", "self", "for", "if",
         "import", "name", "main", "def", "your", "day"]  # fmt: skip
# window -> positions of "house" in the corpus of the module fixture; window 9 has two
X_AT = {1: [3], 4: [0], 9: [2, 11], 10: [15], 22: [7], 30: [9], 37: [13]}
# the corpus that replaces it in the --force tests
X_AT_OTHER = {0: [5], 3: [1, 2], 17: [15]}

EXAMPLE_TABLES = ("example_runs", "example_windows", "neuron_activations")
ALL_TABLES = ("models", "vocab", "neurons", "token_index", "search_parts", "jobs", *EXAMPLE_TABLES, "text_runs")


# ---------------------------------------------------------------- corpus and model


def corpus_words(n_windows: int, x_at: dict[int, list[int]], *, seed: int, tail: int = 5) -> list[str]:
    """Words, one token each: n_windows windows of CONTEXT, "house" where x_at says, and a
    partial window of `tail` words after them (with a "house" in it, which must count nowhere)."""
    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_windows * CONTEXT + tail)]
    for w, positions in x_at.items():
        for p in positions:
            words[w * CONTEXT + p] = "house"
    if tail:
        words[n_windows * CONTEXT + tail // 2] = "house"
    return words


def write_corpus(path, words: list[str]):
    path.write_text(" ".join(words), encoding="utf-8")
    return path


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def expected_windows(tokenizer, words: list[str], n_windows: int) -> torch.Tensor:
    ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
    assert len(ids) == len(words), "every corpus word is one token"
    return torch.tensor(ids[: n_windows * CONTEXT], dtype=torch.int64).view(n_windows, CONTEXT)


def out_projections(model) -> list[torch.nn.Module]:
    """The modules whose input is each layer's MLP activations, by the families' own names."""
    if model.config.model_type == "llama":
        return [block.mlp.down_proj for block in model.model.layers]
    if model.config.model_type == "gpt2":
        return [block.mlp.c_proj for block in model.transformer.h]
    raise ValueError(model.config.model_type)


@torch.no_grad()
def direct_acts(path, windows: torch.Tensor, bos_id: int | None = None) -> list[np.ndarray]:
    """Per layer, float64 [n_windows, context, d_mlp]: a plain float32 forward of each window
    (BOS in front when given, its position dropped), read by a pre-hook on the output projection."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = windows
    if bos_id is not None:
        ids = torch.cat([torch.full((len(windows), 1), bos_id, dtype=torch.int64), windows], dim=1)
    got: dict[int, torch.Tensor] = {}
    handles = [
        proj.register_forward_pre_hook(lambda m, args, layer=layer: got.__setitem__(layer, args[0].detach().clone()))
        for layer, proj in enumerate(out_projections(model))
    ]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    start = 1 if bos_id is not None else 0
    return [got[layer][:, start:].double().numpy() for layer in range(len(got))]


# ---------------------------------------------------------------- reading what was stored


def stored(row, context: int) -> dict:
    """A neuron_activations row's arrays, shaped."""
    return {
        "top_windows": unpack(row.top_windows, INT32),
        "top_max": unpack(row.top_max, FLOAT32),
        "top_pos": unpack(row.top_pos, INT16),
        "top_acts": unpack(row.top_acts, FLOAT16, (TOP_K, context)),
        "int_windows": unpack(row.int_windows, INT32, (BINS, PER_BIN)),
        "int_max": unpack(row.int_max, FLOAT32, (BINS, PER_BIN)),
        "int_pos": unpack(row.int_pos, INT16, (BINS, PER_BIN)),
        "int_acts": unpack(row.int_acts, FLOAT16, (BINS, PER_BIN, context)),
        "int_edges": unpack(row.int_edges, FLOAT32),
        "int_counts": unpack(row.int_counts, INT64),
        "hist_edges": unpack(row.hist_edges, FLOAT32),
        "hist_counts": unpack(row.hist_counts, INT64),
        **({} if row.neg_windows is None else {
            "neg_windows": unpack(row.neg_windows, INT32),
            "neg_min": unpack(row.neg_min, FLOAT32),
            "neg_pos": unpack(row.neg_pos, INT16),
            "neg_acts": unpack(row.neg_acts, FLOAT16, (TOP_K, context)),
        }),
    }


def as_arrays(res: examples.LayerExamples, neuron: int) -> dict:
    """The same arrays from a LayerExamples, for tests that call examples.collect."""
    return {
        "top_windows": res.top_windows[neuron], "top_max": res.top_max[neuron], "top_pos": res.top_pos[neuron],
        "top_acts": res.top_acts[neuron], "int_windows": res.int_windows[neuron], "int_max": res.int_max[neuron],
        "int_pos": res.int_pos[neuron], "int_acts": res.int_acts[neuron], "int_edges": res.int_edges[neuron],
        "int_counts": res.int_counts[neuron], "hist_edges": res.hist_edges[neuron],
        "hist_counts": res.hist_counts[neuron],
        **({} if res.neg_windows is None else {
            "neg_windows": res.neg_windows[neuron], "neg_min": res.neg_min[neuron], "neg_pos": res.neg_pos[neuron],
            "neg_acts": res.neg_acts[neuron]}),
    }  # fmt: skip


def load_rows(url: str, name: str):
    with session_scope(engine_for(url)) as s:
        model = queries.get_model(s, name)
        run = queries.example_run(s, model.id)
        rows = {}
        for layer in range(model.n_layers):
            for n in range(model.d_mlp):
                row = queries.neuron_activations(s, model.id, layer, n)
                s.expunge(row)
                rows[layer, n] = row
        shown = {w for row in rows.values() for w in stored(row, run.context)["top_windows"].tolist()}
        shown |= {w for row in rows.values() for w in stored(row, run.context)["int_windows"].ravel().tolist()}
        wins = {w: unpack(r.token_ids, INT32) for w, r in queries.example_windows(s, model.id, shown).items()}
        s.expunge(run)
        return model.id, run, rows, wins


def dump(url: str, tables=ALL_TABLES) -> dict:
    """Every row of the tables, to show that something changed nothing."""
    out = {}
    with engine_for(url).connect() as c:
        for table in tables:
            out[table] = sorted(map(tuple, c.execute(text(f"select * from {table}")).fetchall()), key=repr)
    return out


def activation_rows(url: str, name: str) -> list[tuple]:
    """A model's neuron_activations rows without the model id (to compare models and databases)."""
    with engine_for(url).connect() as c:
        model_id = c.execute(text("select id from models where name = :n"), {"n": name}).scalar_one()
        rows = c.execute(
            text("select * from neuron_activations where model_id = :m order by layer, neuron"), {"m": model_id}
        ).mappings().all()
    return [tuple(v for k, v in r.items() if k != "model_id") for r in rows]


# ---------------------------------------------------------------- brute force


def window_bins(wmax: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The interval bin of each window's max, [W, N] (-1: did not fire)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.clip(np.ceil(wmax / width[None, :]) - 1, 0, BINS - 1)  # bin k holds ((k)w, (k+1)w]
    return np.where(wmax > 0, b, -1).astype(np.int64)


def check_against_brute_force(arr: dict, row_stats: dict, acts: np.ndarray, est_ids: np.ndarray, neuron: int,
                              *, tol: float = 1e-4) -> dict:
    """Check one neuron's stored arrays and statistics against a float64 computation over every
    window; acts: [W, T] float64 direct activations of that neuron. Returns what was exercised."""
    w, t = acts.shape
    flat = acts.ravel()
    wmax = acts.max(axis=1)
    scale = max(1.0, float(np.abs(flat).max()))
    atol = tol * scale
    near_zero = int((np.abs(flat) <= atol).sum())

    # statistics over every token
    assert row_stats["tokens"] == w * t
    np.testing.assert_allclose(row_stats["mean"], flat.mean(), rtol=1e-5, atol=atol * 1e-2)
    np.testing.assert_allclose(row_stats["std"], flat.std(), rtol=1e-4, atol=atol * 1e-2)
    np.testing.assert_allclose(row_stats["min_act"], flat.min(), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(row_stats["max_act"], flat.max(), rtol=1e-5, atol=atol)
    positive = round(row_stats["frequency"] * w * t)
    assert abs(positive - int((flat > 0).sum())) <= near_zero
    assert int(arr["hist_counts"].sum()) == w * t
    assert int(arr["int_counts"].sum()) == positive, "interval counts are the firing tokens"

    # the estimate: the evenly spaced sample's max sets the interval width, its min and max the histogram
    est = acts[est_ids].ravel()
    est_min, est_max = est.min(), est.max()
    edges = arr["int_edges"]
    if est_max > atol:
        width = est_max / BINS
        np.testing.assert_allclose(edges[:BINS], width * np.arange(BINS), rtol=1e-5, atol=atol)
        np.testing.assert_allclose(row_stats["threshold"], width, rtol=1e-5, atol=atol)
        ib = np.where(flat > 0, np.clip(np.ceil(flat / width) - 1, 0, BINS - 1), -1)
        brute_int = np.bincount(ib[ib >= 0].astype(np.int64), minlength=BINS)
        near_edge = int(sum((np.abs(flat - e) <= atol).sum() for e in edges[: BINS + 1]))
        assert np.abs(arr["int_counts"] - brute_int).sum() <= 2 * near_edge + near_zero
    np.testing.assert_allclose(edges[BINS], max(flat.max(), edges[BINS - 1]), rtol=1e-5, atol=atol)
    hedges = arr["hist_edges"]
    margin = HIST_MARGIN * max(est_max - est_min, 1e-6)
    np.testing.assert_allclose(hedges[0], min(flat.min(), est_min - margin), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(hedges[-1], max(flat.max(), est_max + margin), rtol=1e-5, atol=atol)
    est_span = max(est_max - est_min, 1e-6)
    lo, span = est_min - HIST_MARGIN * est_span, est_span * (1 + 2 * HIST_MARGIN)
    np.testing.assert_allclose(hedges[1:-1], lo + span * np.arange(1, HIST_BINS) / HIST_BINS, rtol=1e-5, atol=atol)
    hb = np.clip(np.floor((flat - lo) * HIST_BINS / span), 0, HIST_BINS - 1).astype(np.int64)
    brute_hist = np.bincount(hb, minlength=HIST_BINS)
    near_hist = int(sum((np.abs(flat - e) <= atol).sum() for e in hedges[1:-1]))
    assert np.abs(arr["hist_counts"] - brute_hist).sum() <= 2 * near_hist

    # top windows: the best by max, earlier window first on ties, each with its own activations
    k = min(TOP_K, w)
    top = arr["top_windows"]
    assert (top[k:] == -1).all()
    top = top[:k]
    assert len(set(top.tolist())) == k, "a window appears at most once"
    order = sorted(range(w), key=lambda i: (-wmax[i], i))
    np.testing.assert_allclose(arr["top_max"][:k], wmax[order[:k]], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(arr["top_max"][:k], wmax[top], rtol=1e-5, atol=atol)
    assert (np.diff(arr["top_max"][:k]) <= 0).all(), "best first"
    if k < w and wmax[order[k - 1]] - wmax[order[k]] > 2 * atol:  # no near-tie at the cut
        assert set(top.tolist()) == set(order[:k])
    for slot, win in enumerate(top.tolist()):
        np.testing.assert_allclose(arr["top_acts"][slot].astype(np.float64), acts[win], rtol=2e-3, atol=atol)
        pos = int(arr["top_pos"][slot])
        assert acts[win, pos] >= wmax[win] - atol, "the max index points at the max"
        if wmax[win] > 0:
            np.testing.assert_allclose(arr["top_max"][slot], arr["top_acts"][slot][pos], rtol=1e-3)

    # top negative contexts (a gated MLP's neurons): the most negative windows by their min, earlier first on ties
    if "neg_windows" in arr:
        wmin = acts.min(axis=1)
        neg = arr["neg_windows"]
        assert (neg[k:] == -1).all()
        neg = neg[:k]
        assert len(set(neg.tolist())) == k, "a window appears at most once"
        by_min = sorted(range(w), key=lambda i: (wmin[i], i))
        np.testing.assert_allclose(arr["neg_min"][:k], wmin[by_min[:k]], rtol=1e-5, atol=atol)
        np.testing.assert_allclose(arr["neg_min"][:k], wmin[neg], rtol=1e-5, atol=atol)
        assert (np.diff(arr["neg_min"][:k]) >= 0).all(), "most negative first"
        if k < w and wmin[by_min[k]] - wmin[by_min[k - 1]] > 2 * atol:
            assert set(neg.tolist()) == set(by_min[:k])
        for slot, win in enumerate(neg.tolist()):
            np.testing.assert_allclose(arr["neg_acts"][slot].astype(np.float64), acts[win], rtol=2e-3, atol=atol)
            assert acts[win, int(arr["neg_pos"][slot])] <= wmin[win] + atol, "the min index points at the min"

    # interval samples: each bin's windows have their max in the bin; a bin with at most PER_BIN
    # windows holds them all; otherwise the PER_BIN with the smallest priority
    exercised = {"whole_bins": 0, "sampled_bins": 0}
    if est_max > atol:
        bins = window_bins(wmax[:, None], np.array([edges[1]]))[:, 0]
        borderline = any((np.abs(wmax - e) <= atol).any() for e in edges[:BINS])
        for b in range(BINS):
            got = arr["int_windows"][b]
            valid = got >= 0
            assert (got[~valid] == -1).all() and valid[: valid.sum()].all(), "filled slots first"
            got = got[valid]
            assert len(set(got.tolist())) == len(got), "no window repeats in a bin"
            lo, hi = edges[b], edges[b + 1]
            for slot, win in enumerate(got.tolist()):
                m = float(arr["int_max"][b, slot])
                np.testing.assert_allclose(m, wmax[win], rtol=1e-5, atol=atol)
                assert lo - atol <= m <= hi + atol
                np.testing.assert_allclose(arr["int_acts"][b, slot].astype(np.float64), acts[win], rtol=2e-3, atol=atol)
                assert acts[win, int(arr["int_pos"][b, slot])] >= wmax[win] - atol
            if borderline:
                continue
            members = np.flatnonzero(bins == b)
            if len(members) <= PER_BIN:
                assert sorted(got.tolist()) == members.tolist()
                exercised["whole_bins"] += 1
            else:
                assert len(got) == PER_BIN
                prio = examples.priority(row_stats["layer"], torch.tensor([neuron]), torch.from_numpy(members))[:, 0]
                keys = sorted(zip(prio.tolist(), members.tolist()))
                assert sorted(got.tolist()) == sorted(m for _, m in keys[:PER_BIN])
                exercised["sampled_bins"] += 1
    return exercised


def row_stats(row) -> dict:
    return {k: getattr(row, k) for k in ("layer", "tokens", "frequency", "threshold", "mean", "std", "min_act", "max_act")}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A tiny Llama whose DETECTOR neuron fires on "▁house" only, and a corpus file for it."""
    root = tmp_path_factory.mktemp("detector")
    path = build_detector(root / "model", {DETECTOR: X_PIECE})
    words = corpus_words(N_WINDOWS, X_AT, seed=0)
    corpus = write_corpus(root / "corpus.txt", words)
    other_words = corpus_words(24, X_AT_OTHER, seed=1, tail=0)
    other = write_corpus(root / "other.txt", other_words)
    return {"path": path, "corpus": corpus, "words": words, "other": other, "other_words": other_words}


@pytest.fixture(scope="module")
def indexed(detector, tmp_path_factory, _sqlite_template):
    """The detector model indexed with its corpus into SQLite, in small batches (3 windows each)."""
    path = tmp_path_factory.mktemp("indexed") / "needle.sqlite"
    shutil.copy(_sqlite_template, path)
    url = f"sqlite:///{path}"
    settings = Settings(database_url=url, examples_batch_tokens=3 * CONTEXT)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT, quiet=True)
    return url


# ---------------------------------------------------------------- 1. a neuron that fires on one token


def test_detector_neuron_shows_exactly_the_windows_holding_its_token(detector, indexed):
    _, run, rows, wins = load_rows(indexed, "det")
    windows = expected_windows(tokenizer_of(detector["path"]), detector["words"], N_WINDOWS)
    x_id = tokenizer_of(detector["path"]).convert_tokens_to_ids(X_PIECE)
    is_x = (windows == x_id).numpy()
    assert sorted(np.flatnonzero(is_x.any(axis=1)).tolist()) == sorted(X_AT)

    assert (run.corpus, run.context, run.n_windows, run.n_tokens) == (str(detector["corpus"]), CONTEXT, N_WINDOWS, N_WINDOWS * CONTEXT)
    assert run.n_documents == 1 and run.bos_prefix is False
    assert run.settings["top_k"] == TOP_K and run.settings["batch_tokens"] == 3 * CONTEXT

    row = rows[DETECTOR]
    arr = stored(row, CONTEXT)
    acts = direct_acts(detector["path"], windows)[DETECTOR[0]][:, :, DETECTOR[1]]
    assert (acts[is_x] > 0).all() and (acts[~is_x] == 0).all(), "the model fires on X only"

    # the windows that hold X, best first, then the rest (max 0) earliest first
    n_x = len(X_AT)
    wmax = acts.max(axis=1)
    x_order = sorted(X_AT, key=lambda w: (-wmax[w], w))
    top = arr["top_windows"].tolist()
    assert top[:n_x] == x_order
    assert top[n_x:] == [w for w in range(N_WINDOWS) if w not in X_AT][: TOP_K - n_x]
    assert (arr["top_max"][n_x:] == 0).all() and (arr["top_acts"][n_x:] == 0).all()
    for slot, w in enumerate(x_order):
        pos = int(arr["top_pos"][slot])
        assert is_x[w, pos], f"window {w}: the max is at an X token"
        assert pos == int(acts[w].argmax())
        np.testing.assert_allclose(arr["top_max"][slot], acts[w, pos], rtol=1e-5)
        np.testing.assert_allclose(arr["top_acts"][slot].astype(np.float64), acts[w], rtol=1e-3)
        assert (arr["top_acts"][slot][~is_x[w]] == 0).all() and (arr["top_acts"][slot][is_x[w]] > 0).all()
        assert (wins[w] == windows[w].numpy()).all(), "example_windows holds the window's tokens"

    # statistics: it fires on the X tokens of the windows (not the one in the dropped tail)
    n_x_tokens = int(is_x.sum())
    assert n_x_tokens == sum(map(len, X_AT.values()))
    assert row.frequency == n_x_tokens / (N_WINDOWS * CONTEXT)
    assert int(arr["int_counts"].sum()) == n_x_tokens
    assert row.min_act == 0.0
    np.testing.assert_allclose(row.max_act, acts.max(), rtol=1e-5)
    np.testing.assert_allclose(arr["int_edges"][BINS], row.max_act, rtol=1e-6)

    # interval samples: every window that holds X, in the bin of its max; none without X
    sampled = arr["int_windows"][arr["int_windows"] >= 0]
    assert sorted(sampled.tolist()) == sorted(X_AT)
    width = arr["int_edges"][1]
    for b in range(BINS):
        members = sorted(w for w in X_AT if min(max(int(np.ceil(wmax[w] / width)) - 1, 0), BINS - 1) == b)
        got = arr["int_windows"][b]
        assert sorted(got[got >= 0].tolist()) == members


def test_layer_summaries_and_sorts_see_the_detector(detector, indexed):
    model_id, _, _, _ = load_rows(indexed, "det")
    windows = expected_windows(tokenizer_of(detector["path"]), detector["words"], N_WINDOWS)
    acts = [a.reshape(-1, a.shape[-1]) for a in direct_acts(detector["path"], windows)]  # our own forward
    d_mlp = acts[0].shape[1]
    assert d_mlp == 64 and len(acts[0]) == N_WINDOWS * CONTEXT
    with session_scope(engine_for(indexed)) as s:
        summaries = queries.activation_layer_summaries(s, model_id)
        assert set(summaries) == {0, 1} and all(v["neurons"] == d_mlp for v in summaries.values())
        for layer, summary in summaries.items():
            a = acts[layer]
            freqs = (a > 0).mean(axis=0)
            # a token within float noise of 0 (not exactly 0) may fall on either side in the stage's forward
            unsure = ((a != 0) & (np.abs(a) <= 1e-5)).sum(axis=0)
            assert summary["dead"] == int((freqs <= 0).sum())
            assert abs(summary["mean_frequency"] - freqs.mean()) <= unsure.sum() / a.size + 1e-12
        # the detector's layer: it fires on the 8 X tokens only, the rarest neuron, none dead
        det_freqs = (acts[DETECTOR[0]] > 0).mean(axis=0)
        assert det_freqs[DETECTOR[1]] == sum(map(len, X_AT.values())) / (N_WINDOWS * CONTEXT)
        assert int(det_freqs.argmin()) == DETECTOR[1] and (np.delete(det_freqs, DETECTOR[1]) > 0.1).all()
        rarest = queries.layer_neurons(s, model_id, DETECTOR[0], "-frequency", 0, d_mlp)
        assert len(rarest) == d_mlp and rarest[0][0].neuron == DETECTOR[1] == rarest[0][1].neuron
        # by max: every neuron of the layer once, in the order of its direct max (the detector at its rank)
        by_max = queries.layer_neurons(s, model_id, DETECTOR[0], "max", 0, d_mlp)
        assert len(by_max) == d_mlp
        assert sorted(n.neuron for n, _ in by_max) == list(range(d_mlp))
        assert all(a is not None and a.neuron == n.neuron for n, a in by_max)
        direct_max = acts[DETECTOR[0]].max(axis=0)
        maxes = [a.max_act for _, a in by_max]
        assert maxes == sorted(maxes, reverse=True)
        np.testing.assert_allclose(maxes, np.sort(direct_max)[::-1], rtol=1e-5)
        np.testing.assert_allclose(maxes, direct_max[[n.neuron for n, _ in by_max]], rtol=1e-5)
        det_rank = [n.neuron for n, _ in by_max].index(DETECTOR[1])
        assert det_rank == int((direct_max > direct_max[DETECTOR[1]]).sum())


# ---------------------------------------------------------------- 2. stored = a direct forward pass


def test_stored_activations_equal_a_direct_forward_and_brute_force_stats(detector, indexed):
    _, run, rows, wins = load_rows(indexed, "det")
    windows = expected_windows(tokenizer_of(detector["path"]), detector["words"], N_WINDOWS)
    # the stored windows are the corpus's own, and rebuilt from them the forward pass agrees
    for w, ids in wins.items():
        assert (ids == windows[w].numpy()).all()
    shown = sorted(wins)
    from_db = direct_acts(detector["path"], torch.tensor(np.stack([wins[w] for w in shown]), dtype=torch.int64))
    everything = direct_acts(detector["path"], windows)
    for layer in range(len(everything)):
        np.testing.assert_allclose(from_db[layer], everything[layer][shown], rtol=1e-4, atol=1e-4)

    # the documented estimate sample: every stride-th window, 1/20 of the corpus but at least 256
    # windows; 40 windows are fewer than 256, so the estimate pass reads every window
    est_ids = np.arange(N_WINDOWS)
    assert run.settings["estimate_windows"] == N_WINDOWS
    seen = {"whole_bins": 0, "sampled_bins": 0}
    assert all(row.neg_windows is not None for row in rows.values()), "a gated MLP's neurons keep negative contexts"
    for (layer, neuron), row in rows.items():
        got = check_against_brute_force(stored(row, CONTEXT), row_stats(row), everything[layer][:, :, neuron], est_ids, neuron)
        for k in seen:
            seen[k] += got[k]
    # the interval-sample checks ran for most of the 128 neurons' 5 bins (not skipped as borderline)
    assert seen["whole_bins"] + seen["sampled_bins"] >= BINS * len(rows) // 2, seen
    assert seen["whole_bins"] > 0 and seen["sampled_bins"] > 0, seen


def test_a_gated_neuron_s_page_shows_its_top_negative_contexts(detector, indexed):
    """The neuron page (and its JSON) of a gated MLP's neuron lists its top negative contexts, most
    negative first, each marked at its min token: the stored windows, checked against a direct forward."""
    import httpx
    from bs4 import BeautifulSoup

    from app.main import create_app
    from tests.live_server import running_server

    _, _, rows, wins = load_rows(indexed, "det")
    everything = direct_acts(detector["path"], expected_windows(tokenizer_of(detector["path"]), detector["words"],
                                                                N_WINDOWS))
    layer, neuron = min(rows, key=lambda u: rows[u].min_act)  # the neuron that goes most negative
    acts = everything[layer][:, :, neuron]
    with running_server(create_app(Settings(database_url=indexed))) as base, httpx.Client(base_url=base, timeout=30) as http:
        data = http.get(f"/det/{layer}/{neuron}.json").json()
        negatives = data["negative_examples"]
        assert negatives and len(negatives) <= TOP_K
        mins = [ex["min_activation"] for ex in negatives]
        assert mins == sorted(mins) and all(m < 0 for m in mins)
        np.testing.assert_allclose(mins[0], acts.min(), rtol=1e-4)
        for ex in negatives:
            np.testing.assert_allclose(ex["min_activation"], acts[ex["window"]].min(), rtol=1e-4, atol=1e-4)
            assert ex["min_index"] == int(np.argmin(ex["activations"]))
            assert ex["token_ids"] == wins[ex["window"]].tolist()
        page = BeautifulSoup(http.get(f"/det/{layer}/{neuron}").text, "html.parser")
        items = page.select("ol.contexts.negative li")
        assert len(items) == len(negatives)
        assert [li.select_one(".ctx-max").get_text() for li in items] == [f"min {m:.4g}" for m in mins]
        marked = items[0].select(".ctx-tokens .t.max")
        assert len(marked) == 1, "the min token is marked"
        # the detector neuron never goes below 0: its list says so
        empty = BeautifulSoup(http.get(f"/det/{DETECTOR[0]}/{DETECTOR[1]}").text, "html.parser")
        assert "never went below 0" in empty.select_one("#negative-contexts").find_next("p", class_="empty").get_text()


def test_firing_and_dead_as_a_silu_model_s_neurons_make_them_meaningful(detector, indexed):
    """A SiLU (gated) model: a neuron fires above 1/5 of its max, and a dead one is silent (its largest
    |activation| under 1% of its layer's median), checked against a direct forward; the model page,
    the layer page's frequency column and sort and the neuron page use that rule. The same model
    stored as a ReLU one counts above 0 and never-fired units instead."""
    import httpx
    from sqlalchemy import select, update

    from app.main import create_app
    from app.schema import Model
    from tests.live_server import running_server

    _, _, rows, _ = load_rows(indexed, "det")
    everything = direct_acts(detector["path"], expected_windows(tokenizer_of(detector["path"]), detector["words"],
                                                                N_WINDOWS))
    for layer, acts in enumerate(everything):
        peak = np.abs(acts).max(axis=(0, 1))  # [neurons]
        silent = peak < 0.01 * np.median(peak)
        for n in range(len(peak)):
            if abs(peak[n] - 0.01 * np.median(peak)) > 1e-4 * max(1.0, peak.max()):  # no near-tie at the cut
                assert rows[(layer, n)].silent == bool(silent[n]), (layer, n)
    dead = {la: sum(bool(rows[(la, n)].silent) for n in range(D)) for la in range(len(everything)) for D in
            [everything[la].shape[2]]}
    with running_server(create_app(Settings(database_url=indexed))) as base, httpx.Client(base_url=base, timeout=30) as http:
        model = http.get("/det.json").json()
        assert "1/5 of its largest" in model["firing_rule"] and "silent" in model["dead_rule"]
        for la in model["layers"]:
            assert la["dead"] == dead[la["layer"]]
            above = [rows[(la["layer"], n)].frequency_above for n in range(everything[0].shape[2])]
            assert la["mean_frequency"] == pytest.approx(float(np.mean(above)), rel=1e-5)
        layer = http.get(f"/det/{DETECTOR[0]}.json?sort=frequency").json()
        shown = [u["frequency"] for u in layer["neurons"]]
        assert shown == sorted(shown, reverse=True)
        assert shown[0] == pytest.approx(max(rows[(DETECTOR[0], n)].frequency_above
                                             for n in range(everything[0].shape[2])), rel=1e-5)
        unit = http.get(f"/det/{DETECTOR[0]}/{DETECTOR[1]}.json").json()
        assert unit["stats"]["firing_frequency"] == unit["stats"]["frequency_above"] and unit["stats"]["firing_relative"]
        with engine_for(indexed).begin() as c:
            info = c.execute(select(Model.info).where(Model.name == "det")).scalar_one()
            assert info["hidden_act"] == "silu"
            c.execute(update(Model).where(Model.name == "det").values(info={**info, "hidden_act": "relu"}))
        try:
            model = http.get("/det.json").json()
            assert "above 0" in model["firing_rule"] and "never fires" in model["dead_rule"]
            for la in model["layers"]:
                assert la["dead"] == sum(rows[(la["layer"], n)].frequency <= 0 for n in range(everything[0].shape[2]))
            unit = http.get(f"/det/{DETECTOR[0]}/{DETECTOR[1]}.json").json()
            assert unit["stats"]["firing_frequency"] == unit["stats"]["frequency"]
        finally:
            with engine_for(indexed).begin() as c:
                c.execute(update(Model).where(Model.name == "det").values(info=info))


def test_a_neuron_that_does_almost_nothing_is_silent(tmp_path):
    """workers/store.activation_rows marks silent the units whose largest |activation| is under 1% of their
    layer's median: a Llama neuron whose up_proj row is scaled by 1e-4 is, checked against a direct forward."""
    from transformers import AutoModelForCausalLM

    from workers.loading import load_model
    from workers.store import activation_rows

    path = build_tiny("llama", tmp_path / "m", seed=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[9].mul_(1e-4)
    model.save_pretrained(path)
    loaded = load_model(str(path), device="cpu")
    windows = torch.randint(0, 200, (30, 12), generator=torch.Generator().manual_seed(1))
    results = examples.collect(loaded.model, loaded.adapter, [0, 1], windows, None)
    acts = direct_acts(path, windows)
    for res in results:
        peak = np.abs(acts[res.layer]).max(axis=(0, 1))
        silent = [r["silent"] for r in activation_rows(res)]
        assert silent == (peak < 0.01 * np.median(peak)).tolist()
    assert [r["silent"] for r in activation_rows(results[1])].index(True) == 9
    assert sum(r["silent"] for res in results for r in activation_rows(res)) == 1


# ---------------------------------------------------------------- 3. interval samples, batch size


@pytest.fixture(scope="module")
def gpt2_collect(tmp_path_factory):
    """A tiny GPT-2 over 600 windows of 8 random tokens (so the estimate pass reads every 2nd
    window), collected with two batch sizes (23 windows a batch, and all at once)."""
    from workers.loading import load_model

    path = build_tiny("gpt2", tmp_path_factory.mktemp("gpt2") / "m", seed=3)
    loaded = load_model(str(path), device="cpu")
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, loaded.adapter.vocab_size - 1, (600, 8), generator=gen)
    layers = list(range(loaded.adapter.n_layers))
    runs = {
        bt: examples.collect(loaded.model, loaded.adapter, layers, windows, None, batch_tokens=bt)
        for bt in (23 * 8, 8192)
    }
    return path, windows, runs


def test_interval_samples_and_statistics_against_brute_force(gpt2_collect):
    path, windows, runs = gpt2_collect
    results = runs[8192]
    est_ids = examples.plan(len(windows), windows.shape[1], 8192).estimate_ids.numpy()
    assert np.array_equal(est_ids, np.arange(0, 600, 2)), "every 2nd window of 600"
    acts = direct_acts(path, windows)
    seen = {"whole_bins": 0, "sampled_bins": 0}
    above_estimate = 0
    for res in results:
        assert res.neg_windows is None, "a GELU MLP's neurons keep no negative contexts"
        for n in range(len(res.max)):
            a = acts[res.layer][:, :, n]
            stats = {"layer": res.layer, "tokens": res.tokens, "frequency": res.positive[n] / res.tokens,
                     "threshold": res.threshold[n], "mean": res.mean[n], "std": res.std[n], "min_act": res.min[n],
                     "max_act": res.max[n]}  # fmt: skip
            got = check_against_brute_force(as_arrays(res, n), stats, a, est_ids, n)
            for k in seen:
                seen[k] += got[k]
            above_estimate += a.max() > a[est_ids].max()
            np.testing.assert_allclose(res.above[n], (a > res.threshold[n]).sum(), atol=(np.abs(a - res.threshold[n]) < 1e-4).sum())
    # the cases the checks are about did occur
    assert seen["whole_bins"] > 0 and seen["sampled_bins"] > 0, seen
    assert above_estimate > 0, "some neuron's true max lies outside the estimate sample"


def test_results_do_not_depend_on_the_batch_size(gpt2_collect):
    _, _, runs = gpt2_collect
    base = runs[8192]
    for bt, results in runs.items():
        for a, b in zip(base, results, strict=True):
            for name in ("top_windows", "top_pos", "int_windows", "int_counts", "hist_counts", "positive", "above"):
                assert np.array_equal(getattr(a, name), getattr(b, name)), f"{name} with batch_tokens {bt}"
            assert a.tokens == b.tokens
            filled = a.int_windows >= 0
            assert np.array_equal(a.int_pos[filled], b.int_pos[filled])
            for name in ("top_max", "top_acts", "threshold", "mean", "std", "min", "max", "int_edges", "hist_edges"):
                np.testing.assert_allclose(
                    getattr(a, name).astype(np.float64), getattr(b, name).astype(np.float64), rtol=1e-5, atol=1e-5,
                    err_msg=f"{name} with batch_tokens {bt}",
                )
            for name in ("int_max", "int_acts"):
                np.testing.assert_allclose(
                    getattr(a, name)[filled].astype(np.float64), getattr(b, name)[filled].astype(np.float64),
                    rtol=1e-5, atol=1e-5, err_msg=f"{name} with batch_tokens {bt}",
                )


def test_empty_interval_slots_hold_nothing(gpt2_collect):
    """A bin with fewer than PER_BIN windows has -1 in its free slots, and nothing else there:
    zeros, not some other window's values (which would depend on the batch size)."""
    _, _, runs = gpt2_collect
    for bt, results in runs.items():
        for res in results:
            empty = res.int_windows < 0
            assert empty.any()
            assert (res.int_max[empty] == 0).all(), f"int_max of empty slots, batch_tokens {bt}"
            assert (res.int_pos[empty] == 0).all(), f"int_pos of empty slots, batch_tokens {bt}"
            assert (res.int_acts[empty] == 0).all(), f"int_acts of empty slots, batch_tokens {bt}"


def test_every_window_of_a_tiny_corpus_is_a_top_example(gpt2_collect):
    """Fewer windows than TOP_K: every window is there, once, and the rest of the slots are -1."""
    from workers.loading import load_model

    path = gpt2_collect[0]
    loaded = load_model(str(path), device="cpu")
    windows = torch.randint(0, 300, (6, 5), generator=torch.Generator().manual_seed(1))
    results = examples.collect(loaded.model, loaded.adapter, [0, 1], windows, None, batch_tokens=10)
    acts = direct_acts(path, windows)
    for res in results:
        assert res.tokens == 30
        for n in range(len(res.max)):
            assert sorted(res.top_windows[n][:6].tolist()) == list(range(6))
            assert (res.top_windows[n][6:] == -1).all()
            check_against_brute_force(as_arrays(res, n), {
                "layer": res.layer, "tokens": res.tokens, "frequency": res.positive[n] / res.tokens,
                "threshold": res.threshold[n], "mean": res.mean[n], "std": res.std[n], "min_act": res.min[n],
                "max_act": res.max[n]}, acts[res.layer][:, :, n], np.arange(6), n)  # fmt: skip


# ---------------------------------------------------------------- 4. a tokenizer that prefixes BOS


def test_bos_is_run_in_front_and_left_out(tmp_path, sqlite_url):
    path = build_detector(tmp_path / "m", {DETECTOR: X_PIECE, BOS_DETECTOR: "<s>"}, bos=True)
    tok = tokenizer_of(path)
    assert tok("the dog").input_ids[0] == tok.bos_token_id == 1
    words = corpus_words(12, {2: [4]}, seed=5)
    corpus = write_corpus(tmp_path / "c.txt", words)
    settings = Settings(database_url=sqlite_url)
    # the window and its BOS must fit the model's positions
    before = dump(sqlite_url)
    with pytest.raises(NeedleError, match="BOS") as info:
        index_model(settings, str(path), "bos", corpus=str(corpus), context=POSITIONS, quiet=True)
    assert f"--context {POSITIONS - 1}" in info.value.hint
    assert dump(sqlite_url) == before
    index_model(settings, str(path), "bos", corpus=str(corpus), context=CONTEXT, quiet=True)
    _, run, rows, wins = load_rows(sqlite_url, "bos")
    assert run.bos_prefix is True

    windows = expected_windows(tok, words, 12)
    assert not (windows == tok.bos_token_id).any()
    for w, ids in wins.items():
        assert (ids == windows[w].numpy()).all(), "windows are stored without the BOS"
    with_bos = direct_acts(path, windows, bos_id=tok.bos_token_id)
    without = direct_acts(path, windows)
    assert not np.allclose(with_bos[1], without[1], atol=1e-3), "BOS in front changes what the model computes"
    est_ids = np.arange(12)
    for (layer, neuron), row in rows.items():
        check_against_brute_force(stored(row, CONTEXT), row_stats(row), with_bos[layer][:, :, neuron], est_ids, neuron)

    # the BOS detector fires at the BOS position only, which is left out of everything
    on_bos = direct_acts(path, torch.tensor([[tok.bos_token_id]]))[BOS_DETECTOR[0]][0, 0, BOS_DETECTOR[1]]
    assert on_bos > 0
    assert (with_bos[BOS_DETECTOR[0]][:, :, BOS_DETECTOR[1]] == 0).all()
    bos_row = rows[BOS_DETECTOR]
    assert bos_row.frequency == 0 and bos_row.max_act == 0 and bos_row.min_act == 0
    arr = stored(bos_row, CONTEXT)
    assert (arr["top_acts"] == 0).all() and (arr["int_windows"] == -1).all()
    # ... while the X detector still sees its token at the right position
    det = stored(rows[DETECTOR], CONTEXT)
    assert det["top_windows"][0] == 2 and det["top_pos"][0] == 4
    assert rows[DETECTOR].frequency == 1 / (12 * CONTEXT)


# ---------------------------------------------------------------- 5. databases, re-runs, --force


def test_reindex_is_idempotent_and_another_corpus_needs_force(detector, indexed, db_url):
    settings = Settings(database_url=db_url, examples_batch_tokens=3 * CONTEXT)  # as the fixture
    path, corpus, other = str(detector["path"]), str(detector["corpus"]), str(detector["other"])
    index_model(settings, path, "det", corpus=corpus, context=CONTEXT, quiet=True)
    first = dump(db_url)
    # the same rows on SQLite and Postgres
    assert activation_rows(db_url, "det") == activation_rows(indexed, "det")

    index_model(settings, path, "det", corpus=corpus, context=CONTEXT, quiet=True)
    again = dump(db_url)
    for table in (*EXAMPLE_TABLES, "neurons", "token_index", "vocab", "jobs"):
        assert again[table] == first[table], table

    with pytest.raises(NeedleError, match="--force") as info:
        index_model(settings, path, "det", corpus=other, context=CONTEXT, quiet=True)
    assert "--force" in info.value.hint and corpus in info.value.message
    assert dump(db_url) == again
    with pytest.raises(NeedleError, match="--force"):
        index_model(settings, path, "det", corpus=corpus, context=CONTEXT // 2, quiet=True)
    assert dump(db_url) == again

    index_model(settings, path, "det", corpus=other, context=CONTEXT, force=True, quiet=True)
    _, run, rows, _ = load_rows(db_url, "det")
    assert run.corpus == other and run.n_windows == 24
    det = stored(rows[DETECTOR], CONTEXT)
    assert sorted(det["top_windows"][: len(X_AT_OTHER)].tolist()) == sorted(X_AT_OTHER)
    assert rows[DETECTOR].frequency == 4 / (24 * CONTEXT)

    # back to the first corpus with --force: the same rows as the first time
    index_model(settings, path, "det", corpus=corpus, context=CONTEXT, force=True, quiet=True)
    assert activation_rows(db_url, "det") == activation_rows(indexed, "det")
    after = dump(db_url, ("example_windows",))
    assert after["example_windows"] == first["example_windows"]


# ---------------------------------------------------------------- 6. a crash keeps the previous examples


def test_a_crash_while_storing_keeps_the_previous_examples(detector, db_url, monkeypatch):
    """The writer fails after some of its work (an exception between layers, or the database
    refusing a row in the middle of the insert): the examples stored before stay, byte for byte."""
    from workers import store

    settings = Settings(database_url=db_url, max_attempts=1)
    path, corpus, other = str(detector["path"]), str(detector["corpus"]), str(detector["other"])
    index_model(settings, path, "det", corpus=corpus, context=CONTEXT, quiet=True)
    before = dump(db_url, EXAMPLE_TABLES)
    real = store.activation_rows

    for how in ("raise", "database"):
        calls = []

        def failing(res, how=how, calls=calls):
            calls.append(res.layer)
            rows = real(res)
            if len(calls) > 1:
                if how == "raise":
                    raise RuntimeError("disk full")
                rows[3]["tokens"] = None  # NOT NULL: the database refuses it, after the deletes and the windows
            return rows

        monkeypatch.setattr(store, "activation_rows", failing)
        with pytest.raises(NeedleError, match="examples"):
            index_model(settings, path, "det", corpus=other, context=CONTEXT, force=True, quiet=True)
        assert calls == [0, 1], how
        assert dump(db_url, EXAMPLE_TABLES) == before, how
        with session_scope(engine_for(db_url)) as s:
            model = queries.get_model(s, "det")
            jobs = {j.stage: j for j in queries.jobs_for_model(s, model.id)}
            assert jobs["examples"].state == "failed"
            assert queries.example_run(s, model.id).corpus == corpus

    # a later run completes the job
    monkeypatch.setattr(store, "activation_rows", real)
    index_model(settings, path, "det", corpus=other, context=CONTEXT, quiet=True)
    _, run, _, _ = load_rows(db_url, "det")
    assert run.corpus == other


# ---------------------------------------------------------------- 7. bad input on the command line


def needle(*args: str, db_url: str) -> subprocess.Popen:
    """`python -m needle.cli ARGS`, started (the cases below run side by side)."""
    environ = {**os.environ, "NEEDLE_DATABASE_URL": db_url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "needle.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environ,
    )


BAD_INPUT = {
    "empty": (lambda d: d / "empty.txt", lambda p: p.write_text(""), [], ["no text"]),
    "binary": (lambda d: d / "data.bin", lambda p: p.write_bytes(b"\x00\x01\x02dog\xff" * 50), [], ["not a text file"]),
    "short": (lambda d: d / "short.txt", lambda p: p.write_text("the dog is in the house"), [], ["fewer than one window"]),
    "hf-missing": (lambda d: "hf:needle-tests/no-such-dataset", None, [], ["no-such-dataset"]),
    "context-too-long": (lambda d: d / "ok.txt", lambda p: p.write_text("the dog " * 200), ["--context", str(POSITIONS + 1)],
                         [f"--context {POSITIONS}", "positions"]),
    "tokens-below-context": (lambda d: d / "ok.txt", lambda p: p.write_text("the dog " * 200), ["--tokens", "8"],
                             ["--tokens 8", "--context"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_input_runs(detector, tmp_path_factory, _sqlite_template):
    """Each BAD_INPUT case run as `needle index ... --corpus SPEC` on its own copy of a SQLite
    database that already holds the detector model with its examples; all at once, for speed.
    Per case: (return code, stderr, the database's rows before, its rows after)."""
    root = tmp_path_factory.mktemp("cli")
    seed = root / "seed.sqlite"
    shutil.copy(_sqlite_template, seed)
    index_model(Settings(database_url=f"sqlite:///{seed}"), str(detector["path"]), "det",
                corpus=str(detector["corpus"]), context=CONTEXT, quiet=True)  # fmt: skip
    started = {}
    for case, (where, make, extra, _) in BAD_INPUT.items():
        folder = root / case
        folder.mkdir()
        shutil.copy(seed, folder / "needle.sqlite")
        url = f"sqlite:///{folder / 'needle.sqlite'}"
        spec = where(folder)
        if make is not None:
            make(spec)
        args = ["index", str(detector["path"]), "--name", "new", "--corpus", str(spec), "--context", str(CONTEXT), *extra]
        started[case] = (url, dump(url), needle(*args, db_url=url))
    runs = {}
    try:
        for case, (url, before, proc) in started.items():
            _, err = proc.communicate(timeout=240)
            runs[case] = (proc.returncode, err, before, dump(url))
    finally:
        for _, _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_corpus_input_is_one_clear_line_and_changes_nothing(case, bad_input_runs):
    returncode, stderr, before, after = bad_input_runs[case]
    assert returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for phrase in BAD_INPUT[case][3]:
        assert phrase.lower() in stderr.lower(), stderr
    changed = [table for table in ALL_TABLES if after[table] != before[table]]
    assert not changed, f"the failed command changed {changed}: {stderr}"
