"""A synthetic model full of hostile strings, written with the project's own writers: its
vocabulary (tests/synthetic.HOSTILE_TOKENS, each the top input-weight token of neuron 0/i), its
activation examples and statistics, probes, a text run (done, and one failed), a clamp curve and
a clamped generation; and its twin of one shape (MODEL_B), compared with it. For the escaping
tests (tests/test_security.py) and the fuzzing (tests/test_fuzz.py)."""

from __future__ import annotations

import numpy as np

from app import queries
from app.arrays import FLOAT16, FLOAT32, INT16, INT32, INT64, UINT8, pack
from app.db import session_scope
from tests.synthetic import HOSTILE, HOSTILE_TOKENS, add_jobs, fill_synthetic

MODEL = "hostile-1.0"
MODEL_B = "hostile-2.0"  # its twin, compared with it
PLAIN = [f"w{i}" for i in range(20)]
VOCAB = ["<unk>", *PLAIN, *HOSTILE_TOKENS]
HOSTILE_IDS = {t: VOCAB.index(t) for t in HOSTILE_TOKENS}
N_LAYERS, D_MLP, CONTEXT = 2, len(HOSTILE_TOKENS) + 2, 6
# neuron (0, i) has hostile token i as its top input-weight token
PLANTED = {(0, i): t for i, t in enumerate(HOSTILE_TOKENS)}
TEXTAREA = "</textarea><script>alert(4)</script>"  # the model's clamp prompt, and the prompts stored
FEATURE = "hostile_feature"


def _activations_row(layer: int, neuron: int, windows: list[int], rng) -> dict:
    bins, per_bin = 5, 1
    top_acts = rng.uniform(-1, 3, size=(len(windows), CONTEXT))
    int_windows = np.array([windows[b % len(windows)] for b in range(bins)])
    int_acts = rng.uniform(0, 3, size=(bins, per_bin, CONTEXT))
    return {
        "layer": layer, "neuron": neuron, "tokens": 1000, "frequency": 0.4, "frequency_above": 0.1,
        "threshold": 0.5, "mean": 0.2, "std": 0.8, "min_act": -1.0, "max_act": 3.0,
        "top_windows": pack(windows, INT32), "top_max": pack(top_acts.max(axis=1), FLOAT32),
        "top_pos": pack(top_acts.argmax(axis=1), INT16), "top_acts": pack(top_acts, FLOAT16),
        "int_windows": pack(int_windows, INT32), "int_max": pack(int_acts.max(axis=2), FLOAT32),
        "int_pos": pack(int_acts.argmax(axis=2), INT16), "int_acts": pack(int_acts, FLOAT16),
        "int_edges": pack(np.linspace(0, 3, bins + 1), FLOAT32), "int_counts": pack([50, 20, 10, 5, 1], INT64),
        "hist_edges": pack(np.linspace(-1, 3, 9), FLOAT32), "hist_counts": pack([5, 10, 400, 300, 200, 60, 20, 5], INT64),
    }


def _probes(s, model_id: int) -> None:
    queries.replace_probes(
        s, model_id,
        {"specs": [HOSTILE], "description": HOSTILE_TOKENS[2], "settings": {}},
        [{"name": FEATURE, "kind": "token", "aggregation": "none", "source": HOSTILE_TOKENS[3],
          "description": HOSTILE_TOKENS[1], "counts": {"train_pos": 30, "train_neg": 70}, "status": "probed",
          "reason": None, "best_layer": 0, "best_neuron": 0, "best_f1": 0.9},
         {"name": "skipped_feature", "kind": "token", "aggregation": "none", "source": HOSTILE,
          "description": HOSTILE, "counts": {}, "status": "skipped", "reason": HOSTILE_TOKENS[2],
          "best_layer": None, "best_neuron": None, "best_f1": None}],
        [{"feature": FEATURE, "layer": 0, "best_neuron": 0, "best_f1": 0.9, "best_precision": 0.8,
          "best_recall": 0.95, "top_neurons": [{"neuron": n, "mean_dif": 1.0 - n / 10, "f1": 0.9, "precision": 0.8,
                                                "recall": 0.95} for n in range(3)],
          "curve": [{"k": 1, "f1": 0.9}, {"k": 2, "f1": 0.92}], "pruned_curve": [{"k": 1, "f1": 0.9}]}],
        [{"layer": 0, "neuron": 0, "feature": FEATURE, "rank": 0, "mean_dif": 1.0, "f1": 0.9, "precision": 0.8,
          "recall": 0.95}],
    )


def fill_hostile(engine) -> dict:
    """The model, its examples, probes, a text run, a clamp curve and a generation, all full of
    hostile strings, written with the project's writers."""
    syn = fill_synthetic(engine, MODEL, N_LAYERS, D_MLP, VOCAB, plant=PLANTED, tokenizer=True)
    add_jobs(engine, MODEL, finished=True)
    rng = np.random.default_rng(7)
    hostile_ids = [HOSTILE_IDS[t] for t in HOSTILE_TOKENS]
    # windows of CONTEXT tokens that together hold every hostile token
    windows = [hostile_ids[i : i + CONTEXT] for i in range(0, len(hostile_ids), CONTEXT)]
    windows[-1] = (windows[-1] + [1] * CONTEXT)[:CONTEXT]
    with session_scope(engine) as s:
        model = queries.get_model(s, MODEL)
        model.info = {**(model.info or {}), "clamp_prompt": TEXTAREA}  # the sweep form's <textarea>
        queries.replace_examples(
            s, syn.model_id,
            {"corpus": HOSTILE, "description": HOSTILE_TOKENS[1], "context": CONTEXT, "n_windows": len(windows),
             "n_tokens": 1000, "n_documents": 1, "bos_prefix": False,
             "settings": {"top_k": 2, "bins": 5, "per_bin": 1, "estimate_windows": 2, "hist_bins": 8}},
            [{"window": w, "source": HOSTILE_TOKENS[w % len(HOSTILE_TOKENS)], "token_ids": pack(ids, INT32)}
             for w, ids in enumerate(windows)],
            [_activations_row(layer, neuron, list(range(len(windows))), rng)
             for layer in range(N_LAYERS) for neuron in range(D_MLP)],
        )
        _probes(s, syn.model_id)
        run = queries.create_text_run(s, syn.model_id, 0, 0, " ".join(HOSTILE_TOKENS))
        queries.save_text_result(s, run.id, pack(hostile_ids, INT32), pack(rng.uniform(-1, 3, len(hostile_ids)), FLOAT32),
                                 len(hostile_ids))
        failed = queries.create_text_run(s, syn.model_id, 0, 1, TEXTAREA)
        job = queries.enqueue_job(s, syn.model_id, queries.TEXT_STAGE, f"run:{failed.id}",
                                  {"run": failed.id, "layer": 0, "neuron": 1, "text": TEXTAREA}, max_attempts=1)
        top = [{"token": t, "token_id": HOSTILE_IDS[t], "prob": 0.1} for t in HOSTILE_TOKENS]
        curve = queries.add_clamp_curve(
            s, syn.model_id, 0, 0, prompt=TEXTAREA, target=HOSTILE, positions="all", values=[-1.0, 0.0, 1.0],
            source="page", result={"token_id": HOSTILE_IDS[HOSTILE], "token": HOSTILE, "note": HOSTILE_TOKENS[1],
                                   "probs": [0.1, 0.2, 0.4], "baseline": {"activation": 0.5, "prob": 0.3},
                                   "top_tokens": {"low": top, "high": top[::-1]}},
        )
        gen = queries.add_generation(
            s, syn.model_id, 0, 0, prompt=TEXTAREA, value=2.0, tokens=4, seed=None, source="page",
            result={"clamped": {"text": " ".join(HOSTILE_TOKENS), "token_ids": hostile_ids},
                    "unclamped": {"text": HOSTILE_TOKENS[2], "token_ids": [1]}},
        )
        ids = {"run": run.id, "failed_run": failed.id, "curve": curve.id, "generation": gen.id, "job": job.id}
    with session_scope(engine) as s:
        claimed = queries.claim_job(s, "w", model_id=syn.model_id)
        assert claimed.id == ids["job"]
        queries.fail_job(s, claimed.id, "w", f"tokenizer said {HOSTILE_TOKENS[1]}", retry=False)
    # a second model of the same shape, probed on the same feature, and the two compared
    other = fill_synthetic(engine, MODEL_B, N_LAYERS, D_MLP, VOCAB, plant=PLANTED, tokenizer=True)
    n = N_LAYERS * D_MLP
    cosine = rng.uniform(-1, 1, n)
    cosine[0] = np.nan  # a neuron whose input weights are all zeros
    with session_scope(engine) as s:
        _probes(s, other.model_id)
        queries.put_comparison(s, syn.model_id, other.model_id, info={"top": 10, "a_updated": HOSTILE},
                               same=pack(rng.integers(0, 2, n), UINT8), overlap=pack(rng.integers(0, 11, n), UINT8),
                               cosine=pack(cosine, FLOAT32))
    return ids
