"""app/unitarrays.py: a layer's arrays packed by the store's writers, written to the database,
read back and unpacked give every unit its own arrays back, in their shapes, on SQLite and Postgres."""

from __future__ import annotations

import numpy as np

from app import queries
from app.db import engine_for, session_scope
from app.unitarrays import DECODING, EXAMPLES, unpack_decoding, unpack_examples
from workers.decode import LayerDecoding
from workers.examples import LayerExamples
from workers.store import activation_rows, write_decodings

UNITS, LAYER = 3, 1
K = 2  # fewer tokens than a decoding keeps (a vocabulary smaller than TOP_IN)
TOP_K, BINS, PER_BIN, CONTEXT, HIST_BINS = 4, 3, 2, 5, 6


def model_id(engine) -> int:
    with session_scope(engine) as s:
        return queries.save_model(
            s, "tiny", source="synthetic:tiny", family="gpt2", architecture="GPT2LMHeadModel", n_layers=2,
            d_model=8, d_mlp=UNITS, vocab_size=16, device="cpu", dtype="float32", decode_norm="none",
        ).id


def decoding(rng) -> LayerDecoding:
    def floats():
        return rng.normal(size=(UNITS, K)).astype(np.float32)

    def ids():
        return rng.integers(0, 16, size=(UNITS, K))  # int64, as the decode stage gives them

    return LayerDecoding(layer=LAYER, in_ids=ids(), in_probs=floats(), in_scores=floats(),
                         mean_top100=rng.random(UNITS), out_pos_ids=ids(), out_pos_logits=floats(),
                         out_neg_ids=ids(), out_neg_logits=floats())


def examples(rng) -> LayerExamples:
    top_windows = rng.integers(0, 100, size=(UNITS, TOP_K)).astype(np.int32)
    top_windows[1, 2:] = -1  # a corpus with fewer windows than top_k
    int_windows = rng.integers(0, 100, size=(UNITS, BINS, PER_BIN)).astype(np.int32)
    int_windows[0, 1, 1:] = -1  # a bin with fewer windows than per_bin
    int_windows[2, 2, :] = -1  # and one with none
    int_counts = rng.integers(1, 50, size=(UNITS, BINS))
    int_counts[2, 2] = 0
    return LayerExamples(
        layer=LAYER, top_windows=top_windows,
        top_max=rng.normal(size=(UNITS, TOP_K)).astype(np.float32),
        top_pos=rng.integers(0, CONTEXT, size=(UNITS, TOP_K)),
        top_acts=rng.normal(size=(UNITS, TOP_K, CONTEXT)).astype(np.float16),
        int_windows=int_windows,
        int_max=rng.normal(size=(UNITS, BINS, PER_BIN)).astype(np.float32),
        int_pos=rng.integers(0, CONTEXT, size=(UNITS, BINS, PER_BIN)),
        int_acts=rng.normal(size=(UNITS, BINS, PER_BIN, CONTEXT)).astype(np.float16),
        int_edges=np.sort(rng.random((UNITS, BINS + 1)), axis=1).astype(np.float32),
        int_counts=int_counts, tokens=1000,
        positive=rng.integers(0, 1000, UNITS), above=rng.integers(0, 100, UNITS),
        threshold=np.array([0.1, np.nan, 0.3], np.float32), mean=rng.random(UNITS), std=rng.random(UNITS),
        min=-rng.random(UNITS).astype(np.float32), max=rng.random(UNITS).astype(np.float32),
        hist_edges=np.sort(rng.random((UNITS, HIST_BINS + 1)), axis=1).astype(np.float32),
        hist_counts=rng.integers(0, 50, size=(UNITS, HIST_BINS)),
    )


def test_decoding_round_trip(db_url):
    engine = engine_for(db_url)
    mid = model_id(engine)
    dec = decoding(np.random.default_rng(0))
    with session_scope(engine) as s:
        write_decodings(s, mid, [dec])
    with session_scope(engine) as s:
        rows = queries.neurons_in_range(s, mid, LAYER, 0, UNITS)
        assert [r.neuron for r in rows] == list(range(UNITS))
        for i, row in enumerate(rows):
            got = unpack_decoding(row)
            assert set(got) == set(DECODING)
            for name, dtype in DECODING.items():
                assert got[name].dtype == dtype and got[name].shape == (K,)
                np.testing.assert_array_equal(got[name], getattr(dec, name)[i])


def test_examples_round_trip(db_url):
    engine = engine_for(db_url)
    mid = model_id(engine)
    res = examples(np.random.default_rng(1))
    with session_scope(engine) as s:
        queries.add_activations(s, mid, activation_rows(res))
    with session_scope(engine) as s:
        rows = queries.activations_in_range(s, mid, LAYER, 0, UNITS)
        assert [r.neuron for r in rows] == list(range(UNITS))
        for i, row in enumerate(rows):
            got = unpack_examples(row, CONTEXT)
            assert set(got) == set(EXAMPLES)
            for name, dtype in EXAMPLES.items():
                want = getattr(res, name)[i]
                assert got[name].dtype == dtype and got[name].shape == want.shape, name
                np.testing.assert_array_equal(got[name], want)
        assert (unpack_examples(rows[1], CONTEXT)["top_windows"][2:] == -1).all()
        assert (unpack_examples(rows[2], CONTEXT)["int_windows"][2] == -1).all()


def test_empty_examples_row():
    """A row with no windows and no bins unpacks to empty arrays of the right rank."""
    from app.schema import NeuronActivations

    empty = {name: b"" for name in EXAMPLES}
    got = unpack_examples(NeuronActivations(**empty), CONTEXT)
    assert got["top_acts"].shape == (0, CONTEXT) and got["int_windows"].shape == (0, 0)
    assert got["int_acts"].shape == (0, 0, CONTEXT)
