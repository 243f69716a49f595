"""Clamp sweeps and clamped generation (workers/clamp.py) on tiny models loaded as a user's are.

One tiny Llama and one tiny GPT-2 have a neuron whose output weights point along one token's
unembedding (tests/tinymodels.build_clamp_model), so what a clamp of it must do is known: the
token's probability rises with the clamp value to well above 0.5, and no other neuron does that.
Curves are checked against plain forward passes of the same model with a clamp hook of our own
on the MLP's output projection (written here, per family, not through the adapter), and
generations against a greedy loop written here (no cache, a full forward pass per token).
Every family of the adapter registry has its sweeps checked the same way on a tiny random model
(tests/tinymodels.build_tiny), with the hook on that family's own output projection.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from app.errors import NeedleError
from app.tokens import visible
from tests.tinymodels import (
    CLAMP_OUTPUT_SCALE,
    LINEAR_LAYOUT,
    MLP,
    MOE_FAMILIES,
    POSITIONS,
    TINY_FAMILIES,
    add_bos,
    build_clamp_model,
    build_tiny,
    tokenizer_style,
)
from workers import clamp
from workers.adapters import supported_model_types
from workers.clamp import SweepItem
from workers.corpus import bos_prefix_id
from workers.loading import load_model

ALIGNED = (0, 3)  # (layer, neuron) writing along W_U[" dog"]; layer 0, so clamping other positions matters
PIECE = {"llama": "▁dog", "gpt2": "Ġdog"}
PROMPT = "The cat sat on the mat and"  # 11 tokens in both tiny tokenizers
ONE_TOKEN = "dog"  # one token in both
WIDE = clamp.value_range(-100.0, 100.0, 11)  # far past every neuron's observed activation
TOL = 1e-6  # probabilities of the same model, batched differently


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> LoadedModel: the aligned Llama and GPT-2, and the Llama with a BOS-prepending tokenizer."""
    root = tmp_path_factory.mktemp("clamp")
    paths = {
        "llama": build_clamp_model(root / "llama", family="llama", layer=ALIGNED[0], neuron=ALIGNED[1]),
        "gpt2": build_clamp_model(root / "gpt2", family="gpt2", layer=ALIGNED[0], neuron=ALIGNED[1]),
        "llama_bos": build_clamp_model(root / "llama_bos", layer=ALIGNED[0], neuron=ALIGNED[1], bos=True),
    }
    return {name: load_model(str(path), device="cpu", dtype="float32") for name, path in paths.items()}


@pytest.fixture(params=["llama", "gpt2"])
def family(request):
    return request.param


def target(loaded) -> int:
    return loaded.tokenizer.convert_tokens_to_ids(PIECE[loaded.config.model_type])


def out_projection(model, layer: int) -> torch.nn.Module:
    """The module whose input is the layer's MLP activations, by the families' own names."""
    if model.config.model_type == "llama":
        return model.model.layers[layer].mlp.down_proj
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj
    raise ValueError(model.config.model_type)


def assert_no_hooks(loaded) -> None:
    for layer in range(loaded.adapter.n_layers):
        assert not out_projection(loaded.model, layer)._forward_pre_hooks, f"a hook was left on layer {layer}"


def prompt_ids(loaded, prompt: str) -> list[int]:
    """The prompt as the model reads it: the tokenizer's own encoding, BOS included where it adds one."""
    ids = loaded.tokenizer(prompt).input_ids
    bos = bos_prefix_id(loaded.tokenizer)
    assert (ids[0] == bos) if bos is not None else (loaded.tokenizer.bos_token_id not in ids)
    return ids


@torch.no_grad()
def reference_probs(loaded, ids: list[int], layer: int | None = None, neuron: int | None = None,
                    values=(None,), positions: slice = slice(None)) -> torch.Tensor:
    """p(next token) [len(values), V] in float64 at the last position: a plain forward pass, row j
    with the neuron set to values[j] at `positions` by a hook of our own (no clamp for layer None)."""
    model = loaded.model
    handle = None
    if layer is not None:
        vals = torch.tensor(values, dtype=torch.float32)

        def hook(module, args):
            acts = args[0].clone()
            acts[:, positions, neuron] = vals[:, None]
            return (acts,)

        handle = out_projection(model, layer).register_forward_pre_hook(hook)
    try:
        logits = model(input_ids=torch.tensor([ids] * len(values)), use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return torch.softmax(logits[:, -1].double(), dim=-1)


@torch.no_grad()
def observed(loaded, ids: list[int], layer: int, neuron: int) -> torch.Tensor:
    """The neuron's activations [T] over the prompt, read by a hook of our own."""
    got = []
    handle = out_projection(loaded.model, layer).register_forward_pre_hook(
        lambda m, args: got.append(args[0][0, :, neuron].clone())
    )
    try:
        loaded.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return got[0]


def assert_close(got, want, tol=TOL):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=tol), f"max |diff| {float((got - want).abs().max()):.3g}"


def log_gap(a, b) -> float:
    """max |log a - log b|: how far apart two curves are, small probabilities included."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a.log() - b.log()).abs().max())


def monotone(probs: list[float]) -> bool:
    return all(b >= a - TOL for a, b in itertools.pairwise(probs))


# ---------------------------------------------------------------- the model itself


def test_the_aligned_neuron_writes_along_its_tokens_unembedding(models, family):
    adapter = models[family].adapter
    layer, neuron = ALIGNED
    assert torch.equal(adapter.output_weights(layer)[neuron], CLAMP_OUTPUT_SCALE * adapter.unembedding()[target(models[family])])
    assert not torch.equal(adapter.output_weights(layer)[neuron + 1], adapter.output_weights(layer)[neuron])


# ---------------------------------------------------------------- sweeps


@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_p_token_rises_with_the_clamp_value(models, family, last_only):
    loaded = models[family]
    layer, neuron = ALIGNED
    acts = observed(loaded, prompt_ids(loaded, PROMPT), layer, neuron)
    assert float(acts.abs().max()) < 10  # so +-100 is far past what the neuron does on its own
    values = clamp.value_range(-100.0, 100.0, 41)
    res = clamp.sweep(loaded, layer, neuron, PROMPT, target(loaded), values, last_only=last_only)
    probs = res["probs"]
    assert len(probs) == len(values) and res["values"] == values
    assert monotone(probs), probs
    assert probs[-1] > 0.5 and probs[0] < 1e-3
    assert probs[-1] > 50 * res["baseline"]["prob"]
    assert res["positions"] == ("last" if last_only else "all")
    assert res["prompt_tokens"] == 11 and res["token_id"] == target(loaded) and res["token"] == " dog"
    high = res["top_tokens"]["high"]
    assert high[0]["token_id"] == target(loaded) and high[0]["prob"] == pytest.approx(probs[-1])
    assert len(high) == clamp.TOP_TOKENS and [t["prob"] for t in high] == sorted((t["prob"] for t in high), reverse=True)
    assert all(t["token_id"] != target(loaded) for t in res["top_tokens"]["low"])
    assert_no_hooks(loaded)


@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_only_the_aligned_neuron_pushes_its_token_past_one_half(models, family, last_only):
    """Every neuron of the model swept far past its range: p(token) > 0.5 for the aligned one only."""
    loaded = models[family]
    tid = target(loaded)
    items = [SweepItem(layer, n, tid, WIDE) for layer in range(loaded.adapter.n_layers) for n in range(MLP)]
    results = clamp.sweep_many(loaded, PROMPT, items, last_only=last_only)
    pushing = [(r["layer"], r["neuron"]) for r in results if max(r["probs"]) > 0.5]
    assert pushing == [ALIGNED]
    others = sorted(max(r["probs"]) for r in results if (r["layer"], r["neuron"]) != ALIGNED)
    assert others[-1] < 0.4


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_bos"])
def test_baseline_is_the_unclamped_models_probability(models, name):
    loaded = models[name]
    layer, neuron = ALIGNED
    tid = target(loaded)
    ids = prompt_ids(loaded, PROMPT)
    plain = reference_probs(loaded, ids)[0]
    first = clamp.sweep(loaded, layer, neuron, PROMPT, tid, WIDE, last_only=True)
    base = first["baseline"]
    assert base["prob"] == pytest.approx(float(plain[tid]), rel=1e-5, abs=1e-9)
    assert base["activation"] == pytest.approx(float(observed(loaded, ids, layer, neuron)[-1]), abs=1e-6)
    # the curve passes through the baseline: the baseline activation as one of the values
    values = sorted([*WIDE, base["activation"]])
    again = clamp.sweep(loaded, layer, neuron, PROMPT, tid, values, last_only=True)
    at = values.index(base["activation"])
    assert again["probs"][at] == pytest.approx(base["prob"], rel=1e-5, abs=1e-9)
    assert again["baseline"] == base
    assert monotone(again["probs"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_bos"])
def test_clamping_at_the_observed_activation_changes_nothing(models, name):
    """Last position only, at its own activation: the same next-token distribution as unclamped."""
    loaded = models[name]
    tid = target(loaded)
    ids = prompt_ids(loaded, PROMPT)
    plain = reference_probs(loaded, ids)[0]
    want_p, want_i = torch.topk(plain, clamp.TOP_TOKENS)
    for layer, neuron in (ALIGNED, (0, 20), (1, 7)):
        base = clamp.sweep(loaded, layer, neuron, PROMPT, tid, [0.0], last_only=True)["baseline"]
        res = clamp.sweep(loaded, layer, neuron, PROMPT, tid, [base["activation"]], last_only=True)
        assert res["probs"][0] == pytest.approx(float(plain[tid]), rel=1e-5, abs=1e-9)
        for end in ("low", "high"):
            top = res["top_tokens"][end]
            assert [t["token_id"] for t in top] == want_i.tolist()
            assert_close([t["prob"] for t in top], want_p)
        # and the whole distribution, through the adapter's clamp at the last position
        last = len(ids) - 1
        with torch.no_grad(), loaded.adapter.clamp_rows(layer, torch.tensor([0]), torch.tensor([neuron]),
                                                        torch.tensor([base["activation"]], dtype=torch.float64),
                                                        slice(last, None)):
            clamped = torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        assert_close(clamped, plain)
    assert_no_hooks(loaded)


def test_clamping_a_one_token_prompt_everywhere_at_its_activation_changes_nothing(models, family):
    loaded = models[family]
    ids = prompt_ids(loaded, ONE_TOKEN)
    assert len(ids) == 1
    plain = reference_probs(loaded, ids)[0]
    for layer, neuron in (ALIGNED, (1, 7)):
        base = clamp.sweep(loaded, layer, neuron, ONE_TOKEN, target(loaded), [0.0])["baseline"]
        res = clamp.sweep(loaded, layer, neuron, ONE_TOKEN, target(loaded), [base["activation"]])
        assert res["positions"] == "all" and res["prompt_tokens"] == 1
        assert res["probs"][0] == pytest.approx(base["prob"], rel=1e-5, abs=1e-9)
        assert [t["token_id"] for t in res["top_tokens"]["high"]] == torch.topk(plain, clamp.TOP_TOKENS).indices.tolist()
        with torch.no_grad(), loaded.adapter.clamp(layer, neuron, base["activation"]):
            clamped = torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        assert_close(clamped, plain)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sweeps_match_a_clamp_hook_of_our_own(models, name):
    """'all' sets every prompt position, 'last' the last one; for a layer-0 neuron they differ."""
    loaded = models[name]
    tid = target(loaded)
    ids = prompt_ids(loaded, PROMPT)
    values = clamp.value_range(-30.0, 30.0, 13)
    for layer, neuron in (ALIGNED, (0, 20)):
        every = clamp.sweep(loaded, layer, neuron, PROMPT, tid, values)
        last = clamp.sweep(loaded, layer, neuron, PROMPT, tid, values, last_only=True)
        assert_close(every["probs"], reference_probs(loaded, ids, layer, neuron, values, slice(None))[:, tid])
        assert_close(last["probs"], reference_probs(loaded, ids, layer, neuron, values, slice(-1, None))[:, tid])
        # earlier positions reach the last through layer 1's attention
        assert log_gap(every["probs"], last["probs"]) > 0.1
        assert every["baseline"] == last["baseline"]


def test_a_last_layer_clamp_at_earlier_positions_cannot_reach_the_last(models, family):
    loaded = models[family]
    values = clamp.value_range(-30.0, 30.0, 13)
    every = clamp.sweep(loaded, 1, 7, PROMPT, target(loaded), values)
    last = clamp.sweep(loaded, 1, 7, PROMPT, target(loaded), values, last_only=True)
    assert_close(every["probs"], last["probs"], tol=1e-9)
    assert max(every["probs"]) - min(every["probs"]) > 1e-4  # the clamp does something


@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_a_multi_neuron_sweep_equals_the_single_sweeps(models, last_only):
    loaded = models["llama_bos"]
    tid, cat = target(loaded), loaded.tokenizer.convert_tokens_to_ids("▁c")
    items = [
        SweepItem(*ALIGNED, tid, clamp.value_range(-20.0, 20.0, 9)),
        SweepItem(1, 7, cat, clamp.value_range(-5.0, 5.0, 4)),
        SweepItem(0, 20, tid, clamp.value_range(-50.0, 10.0, 11)),
        SweepItem(1, 3, tid, [2.5]),
        SweepItem(*ALIGNED, cat, clamp.value_range(0.0, 1.0, 3)),
    ]
    done = []
    many = clamp.sweep_many(loaded, PROMPT, items, last_only=last_only, max_rows=5, progress=done.append)
    assert sum(done) == 28 and max(done) == 5  # 28 rows in chunks of at most 5 (a chunk clamps one layer)
    assert len(many) == len(items)
    for item, got in zip(items, many):
        one = clamp.sweep(loaded, item.layer, item.neuron, PROMPT, item.token_id, item.values, last_only=last_only)
        assert (got["layer"], got["neuron"], got["token_id"], got["token"]) == (item.layer, item.neuron,
                                                                               one["token_id"], one["token"])
        assert got["values"] == one["values"] == item.values
        assert_close(got["probs"], one["probs"])
        assert got["baseline"]["activation"] == one["baseline"]["activation"]
        assert got["baseline"]["prob"] == pytest.approx(one["baseline"]["prob"], rel=1e-6)
        for end in ("low", "high"):
            assert [t["token_id"] for t in got["top_tokens"][end]] == [t["token_id"] for t in one["top_tokens"][end]]
        assert (got["positions"], got["prompt_tokens"]) == (one["positions"], one["prompt_tokens"])
    assert_no_hooks(loaded)


def test_bos_is_never_clamped(models):
    loaded = models["llama_bos"]
    tid = target(loaded)
    ids = prompt_ids(loaded, PROMPT)
    assert ids[0] == loaded.tokenizer.bos_token_id and len(ids) == 12
    values = clamp.value_range(-30.0, 30.0, 13)
    for layer, neuron in (ALIGNED, (0, 20)):
        res = clamp.sweep(loaded, layer, neuron, PROMPT, tid, values)
        assert res["prompt_tokens"] == 11
        after_bos = reference_probs(loaded, ids, layer, neuron, values, slice(1, None))[:, tid]
        with_bos = reference_probs(loaded, ids, layer, neuron, values, slice(None))[:, tid]
        assert_close(res["probs"], after_bos)
        assert log_gap(after_bos, with_bos) > 0.1  # clamping BOS too would show
        # the baseline reads the last position of the prompt with BOS in front
        assert res["baseline"]["prob"] == pytest.approx(float(reference_probs(loaded, ids)[0, tid]), rel=1e-5)
        assert res["baseline"]["activation"] == pytest.approx(float(observed(loaded, ids, layer, neuron)[-1]), abs=1e-6)


def test_a_one_token_prompt_after_bos_clamps_that_token_only(models):
    loaded = models["llama_bos"]
    ids = prompt_ids(loaded, ONE_TOKEN)
    assert len(ids) == 2
    values = [-10.0, 0.0, 10.0]
    every = clamp.sweep(loaded, *ALIGNED, ONE_TOKEN, target(loaded), values)
    last = clamp.sweep(loaded, *ALIGNED, ONE_TOKEN, target(loaded), values, last_only=True)
    assert_close(every["probs"], last["probs"], tol=1e-9)
    assert_close(every["probs"], reference_probs(loaded, ids, *ALIGNED, values, slice(1, None))[:, target(loaded)])


# ---------------------------------------------------------------- generation


@torch.no_grad()
def reference_greedy(loaded, prompt: str, tokens: int, clamp_at: tuple[int, int, float] | None = None) -> list[int]:
    """Greedy continuation by full forward passes (no cache), the neuron set by a hook of our own at
    every position but BOS."""
    ids = prompt_ids(loaded, prompt)
    start = 1 if bos_prefix_id(loaded.tokenizer) is not None else 0
    handle = None
    if clamp_at is not None:
        layer, neuron, value = clamp_at

        def hook(module, args):
            acts = args[0].clone()
            acts[:, start:, neuron] = value
            return (acts,)

        handle = out_projection(loaded.model, layer).register_forward_pre_hook(hook)
    out: list[int] = []
    try:
        for _ in range(tokens):
            t = int(loaded.model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
            if t == loaded.tokenizer.eos_token_id:
                break
            out.append(t)
    finally:
        if handle is not None:
            handle.remove()
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_bos"])
def test_greedy_generation_matches_a_loop_of_our_own(models, name):
    loaded = models[name]
    for layer, neuron, value in ((*ALIGNED, 3.0), (0, 20, -8.0), (1, 7, 5.0)):
        res = clamp.generate(loaded, layer, neuron, PROMPT, value, tokens=12)
        assert (res["mode"], res["seed"], res["value"], res["tokens"]) == ("greedy", None, value, 12)
        assert res["unclamped"]["token_ids"] == reference_greedy(loaded, PROMPT, 12)
        assert res["clamped"]["token_ids"] == reference_greedy(loaded, PROMPT, 12, (layer, neuron, value))
        assert res["clamped"]["text"] == loaded.tokenizer.decode(res["clamped"]["token_ids"], skip_special_tokens=True)
        assert clamp.generate(loaded, layer, neuron, PROMPT, value, tokens=12) == res  # deterministic
    assert_no_hooks(loaded)


def test_a_large_clamp_makes_the_model_say_its_token(models, family):
    loaded = models[family]
    tid = target(loaded)
    res = clamp.generate(loaded, *ALIGNED, PROMPT, 100.0, tokens=20)
    clamped, unclamped = res["clamped"]["token_ids"], res["unclamped"]["token_ids"]
    assert len(clamped) == 20 and clamped.count(tid) == 20
    assert unclamped.count(tid) <= 2
    assert res["clamped"]["text"].count("dog") == 20
    # at a large negative value the token never comes
    assert tid not in clamp.generate(loaded, *ALIGNED, PROMPT, -100.0, tokens=20, seed=1)["clamped"]["token_ids"]


def test_seeded_sampling_is_reproducible(models, family):
    loaded = models[family]
    runs = {seed: clamp.generate(loaded, *ALIGNED, PROMPT, 2.0, tokens=24, seed=seed) for seed in (0, 1, 2)}
    assert all(r["mode"] == "sampled" for r in runs.values())
    assert clamp.generate(loaded, *ALIGNED, PROMPT, 2.0, tokens=24, seed=1) == runs[1]
    for row in ("clamped", "unclamped"):
        assert len({tuple(r[row]["token_ids"]) for r in runs.values()}) == 3, f"the seeds gave the same {row} text"
    assert runs[0]["clamped"]["token_ids"] != runs[0]["unclamped"]["token_ids"]


def test_a_clamp_that_changes_nothing_gives_the_same_continuation(models):
    """A neuron with zero output weights: both rows see the same distribution at every step, so
    greedy and each seeded sample (one draw shared by the two rows) continue the same way."""
    loaded = models["llama_bos"]
    layer, neuron = 0, 9
    column = loaded.adapter.output_weights(layer)[neuron]  # a view of down_proj's column
    saved = column.clone()
    try:
        with torch.no_grad():
            column.zero_()
        assert not out_projection(loaded.model, layer).weight[:, neuron].any()
        for seed in (None, 0, 1, 2, 3):
            res = clamp.generate(loaded, layer, neuron, PROMPT, 50.0, tokens=24, seed=seed)
            assert res["clamped"] == res["unclamped"], seed
            assert len(res["clamped"]["token_ids"]) > 0
    finally:
        with torch.no_grad():
            column.copy_(saved)


def test_a_row_stops_at_eos(tmp_path):
    """With the neuron writing along EOS's unembedding and clamped high, the clamped row ends at once."""
    path = build_clamp_model(tmp_path / "eos", layer=ALIGNED[0], neuron=ALIGNED[1], token_id=2)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    assert loaded.tokenizer.eos_token_id == 2
    res = clamp.generate(loaded, *ALIGNED, PROMPT, 100.0, tokens=10)
    assert res["clamped"] == {"text": "", "token_ids": []}
    assert len(res["unclamped"]["token_ids"]) == 10 and 2 not in res["unclamped"]["token_ids"]


@pytest.mark.parametrize("tokens", [0, -1, 257, 1000])
def test_generating_too_few_or_too_many_tokens_is_refused(models, tokens):
    with pytest.raises(NeedleError, match=f"Generating {tokens} tokens is not allowed: use 1 to 256"):
        clamp.generate(models["llama"], *ALIGNED, PROMPT, 1.0, tokens=tokens)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_clamp_value_is_refused(models, value):
    with pytest.raises(NeedleError, match="finite"):
        clamp.generate(models["llama"], *ALIGNED, PROMPT, value, tokens=4)


def test_a_prompt_longer_than_the_model_reads_is_a_needle_error(models):
    words = " ".join(["dog"] * POSITIONS)  # POSITIONS tokens
    for name in ("llama", "gpt2"):
        loaded = models[name]
        assert len(loaded.tokenizer(words).input_ids) == POSITIONS
        assert len(clamp.sweep(loaded, *ALIGNED, words, target(loaded), [0.0, 1.0])["probs"]) == 2  # fits exactly
        with pytest.raises(NeedleError, match=f"The prompt is {POSITIONS + 1} tokens; this model reads at most {POSITIONS} positions"):
            clamp.sweep(loaded, *ALIGNED, words + " dog", target(loaded), [0.0, 1.0])
        with pytest.raises(NeedleError, match=f"{POSITIONS + 1} tokens plus 4 to generate; this model reads at most"):
            clamp.generate(loaded, *ALIGNED, words + " dog", 1.0, tokens=4)
        # the prompt fits, what is to be generated does not
        with pytest.raises(NeedleError, match="plus 8 to generate") as err:
            clamp.generate(loaded, *ALIGNED, " ".join(["dog"] * 60), 1.0, tokens=8)
        assert "generate fewer tokens" in str(err.value)
        with pytest.raises(NeedleError, match="plus 256 to generate"):
            clamp.generate(loaded, *ALIGNED, ONE_TOKEN, 1.0, tokens=256)
        assert_no_hooks(loaded)
    # BOS takes one of the positions
    with pytest.raises(NeedleError, match="one of them the BOS token"):
        clamp.sweep(models["llama_bos"], *ALIGNED, words, target(models["llama_bos"]), [0.0, 1.0])


def test_bad_sweep_arguments_are_needle_errors(models):
    loaded = models["llama"]
    tid = target(loaded)
    with pytest.raises(NeedleError, match="empty"):
        clamp.sweep(loaded, *ALIGNED, "  ", tid, [0.0])
    with pytest.raises(NeedleError, match="no neuron 64"):
        clamp.sweep(loaded, 0, MLP, PROMPT, tid, [0.0])
    with pytest.raises(NeedleError, match="no layer 2"):
        clamp.sweep(loaded, 2, 0, PROMPT, tid, [0.0])
    with pytest.raises(NeedleError, match="no token id"):
        clamp.sweep(loaded, *ALIGNED, PROMPT, loaded.adapter.vocab_size, [0.0])
    with pytest.raises(NeedleError, match="this one has 0"):
        clamp.sweep(loaded, *ALIGNED, PROMPT, tid, [])
    with pytest.raises(NeedleError, match="this one has 102"):
        clamp.sweep(loaded, *ALIGNED, PROMPT, tid, [0.0] * 102)
    with pytest.raises(NeedleError, match="no neuron 64"):
        clamp.generate(loaded, 0, MLP, PROMPT, 1.0, tokens=4)
    with pytest.raises(NeedleError, match="no layer 5"):
        clamp.generate(loaded, 5, 0, PROMPT, 1.0, tokens=4)
    assert_no_hooks(loaded)


# ---------------------------------------------------------------- inputs


def test_parse_values():
    values = clamp.parse_values("-5:5:11")
    assert values == [float(v) for v in range(-5, 6)]
    assert clamp.parse_values(" -0.5 : 1.5 : 5 ") == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert len(clamp.parse_values("-50:50:101")) == clamp.MAX_VALUES
    assert clamp.parse_values("0:1:2") == [0.0, 1.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("1:2", "is not START:STOP:COUNT"),
    ("1:2:3:4", "is not START:STOP:COUNT"),
    ("", "is not START:STOP:COUNT"),
    ("a:b:3", "a part that is not a number"),
    ("0:1:x", "a part that is not a number"),
    ("5:-5:3", "starts at 5, not below its end -5"),
    ("2:2:3", "starts at 2, not below its end 2"),
    ("0:1:1", "A sweep of 1 values is not allowed: use 2 to 101"),
    ("0:1:0", "A sweep of 0 values is not allowed"),
    ("0:1:102", "A sweep of 102 values is not allowed: use 2 to 101"),
    ("nan:1:3", "must be finite"),
    ("-inf:1:3", "must be finite"),
])  # fmt: skip
def test_bad_value_specs_say_what_was_wrong(spec, message):
    with pytest.raises(NeedleError) as err:
        clamp.parse_values(spec)
    assert message in err.value.message
    assert err.value.hint and "-50:50:41" in err.value.hint


def test_default_values():
    assert clamp.default_values(2.0) == clamp.value_range(-20.0, 20.0, 41)
    assert clamp.default_values(1.23456)[-1] == 12.3  # a readable range
    for unknown in (None, 0.0, float("nan"), float("inf"), -3.0):
        assert clamp.default_values(unknown) == clamp.value_range(-10.0, 10.0, 41)
    assert len(clamp.default_values(1.0, count=5)) == 5


def test_default_prompt(models):
    tok = models["llama"].tokenizer
    assert clamp.default_prompt(tok, None) == "The"
    assert clamp.default_prompt(tok, []) == "The"
    window = tok("The dog sat on the mat. A dog is a good friend, and the dog likes the park.",
                 add_special_tokens=False).input_ids
    assert len(window) > clamp.PROMPT_TOKENS
    assert clamp.default_prompt(tok, window) == tok.decode(window[: clamp.PROMPT_TOKENS])


def test_resolve_target(models):
    for name in ("llama", "gpt2", "llama_bos"):
        loaded = models[name]
        tid = target(loaded)
        assert clamp.resolve_target(loaded, " dog", None) == (tid, " dog", None)
        assert clamp.resolve_target(loaded, None, tid) == (tid, " dog", None)
        # as a page's chip shows it
        assert clamp.resolve_target(loaded, "␣dog", None) == (tid, " dog", None)
        # several tokens: an error that names them (as pages show tokens) and suggests the first
        ids = loaded.tokenizer("doghouse", add_special_tokens=False).input_ids
        pieces = clamp.token_texts(loaded.tokenizer, ids)
        assert len(ids) == 3
        with pytest.raises(NeedleError) as refused:
            clamp.resolve_target(loaded, "doghouse", None)
        assert f"'doghouse' is 3 tokens for this model ({', '.join(visible(p) for p in pieces)})" in refused.value.message
        assert repr(pieces[0]) in refused.value.hint
        vocab = loaded.adapter.vocab_size
        for bad in (vocab, -1, 10**9):
            with pytest.raises(NeedleError, match=f"There is no token id {bad}: the vocabulary has ids 0 to {vocab - 1}"):
                clamp.resolve_target(loaded, None, bad)
        for empty in (None, ""):
            with pytest.raises(NeedleError, match="no target token"):
                clamp.resolve_target(loaded, empty, None)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_sharing_the_blocks_before_the_clamp_changes_nothing(family, tmp_path):
    """Every family: running the blocks before the clamped layer once for all rows gives the
    sweep the plain batch gives (its masks and position embeddings broadcast over the rows)."""
    loaded = load_model(str(build_tiny(family, tmp_path / family)), device="cpu", dtype="float32")
    last = loaded.adapter.n_layers - 1
    items = [SweepItem(layer, neuron, 5, clamp.value_range(-30.0, 30.0, 7)) for layer in (0, last) for neuron in (1, 4)]
    for last_only in (False, True):
        shared = clamp.sweep_many(loaded, "def feed(dog):", items, last_only=last_only, share_prefix=True)
        plain = clamp.sweep_many(loaded, "def feed(dog):", items, last_only=last_only, share_prefix=False)
        for a, b in zip(shared, plain, strict=True):
            np.testing.assert_allclose(a["probs"], b["probs"], rtol=1e-5, atol=1e-8)
            assert [t["token_id"] for t in a["top_tokens"]["high"]] == [t["token_id"] for t in b["top_tokens"]["high"]]
        # and the clamp mattered: the ends of the sweep differ (a test that can fail)
        assert any(abs(r["probs"][0] - r["probs"][-1]) > 1e-6 for r in shared)


# ---------------------------------------------------------------- every family, against a hook of our own

# Where each family keeps its neurons, by the families' own module names (DESIGN.md, "What a
# neuron is"), written here and not read from workers/adapters.py. NEURON_AT: the MLP output
# projection, whose input feature i is neuron i: the activation after the nonlinearity and, for
# a gated MLP, after act(gate) * up. TOO_EARLY: (the module, feature offset) one step before it,
# the MLP's input projection (pre-activation; up_proj; the up half of Phi-3's fused gate_up_proj),
# where a clamp would be at the wrong point of the MLP.
GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm", "smollm3", "granite", "cohere")
NEURON_AT = {
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{}.fc2",
    "gptj": "transformer.h.{}.mlp.fc_out",
    **dict.fromkeys((*GATED, "phi3"), "model.layers.{}.mlp.down_proj"),
}
TOO_EARLY = {
    "gpt2": ("transformer.h.{}.mlp.c_fc", 0),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_h_to_4h", 0),
    "opt": ("model.decoder.layers.{}.fc1", 0),
    "gptj": ("transformer.h.{}.mlp.fc_in", 0),
    "phi3": ("model.layers.{}.mlp.gate_up_proj", MLP),  # [gate; up] on the output axis
    **dict.fromkeys(GATED, ("model.layers.{}.mlp.up_proj", 0)),
}
for _f, (_blocks, _in, _out, *_) in LINEAR_LAYOUT.items():
    NEURON_AT[_f], TOO_EARLY[_f] = f"{_blocks}.{{}}.{_out}", (f"{_blocks}.{{}}.{_in}", 0)

FAMILY_VALUES = clamp.value_range(-24.0, 24.0, 9)
FAMILY_NEURONS = ((0, 5), (0, 42), (1, 5), (1, 42))
F32_ATOL = 1e-5  # probabilities of one float32 model, computed two ways
# a clamp in the wrong place moves some compared probabilities by more than this (the sweeps agree with
# the hooks to about 3e-7; the tiny Gemma-2/3 soft-cap their logits at 3 and norm their MLP's output,
# so their curves are flat and move little)
SENSITIVE = 5 * F32_ATOL


@torch.no_grad()
def hooked_probs(model, ids: list[int], layer: int, neuron: int, values, positions: slice,
                 at: tuple[str, int] | None = None) -> torch.Tensor:
    """p(next token) [len(values), V] (float64) at the last position, from a plain forward pass of
    a batch of len(values) copies of ids in which row j has the neuron's activation replaced by
    values[j] at `positions`, by a forward-pre-hook of our own on its output projection. With
    at=(module path, offset), a forward hook on that module's output feature offset + neuron
    instead (a clamp in the wrong place, to show the comparison can fail)."""
    rows, length = len(values), len(ids)
    vals = torch.tensor(values, dtype=torch.float32)
    feature = neuron + (at[1] if at else 0)

    def overwrite(acts: torch.Tensor) -> torch.Tensor:
        out = acts.clone().reshape(rows, length, acts.shape[-1])  # OPT's MLP sees [rows * length, d]
        out[:, positions, feature] = vals[:, None].to(out.dtype)
        return out.reshape(acts.shape)

    if at is None:
        module = model.get_submodule(NEURON_AT[model.config.model_type].format(layer))
        assert module.weight.shape[0 if model.config.model_type == "gpt2" else 1] == MLP  # its input is the MLP
        handle = module.register_forward_pre_hook(lambda m, args: (overwrite(args[0]), *args[1:]))
    else:
        module = model.get_submodule(at[0].format(layer))
        handle = module.register_forward_hook(lambda m, args, output: overwrite(output))
    try:
        logits = model(input_ids=torch.tensor([ids] * rows), use_cache=False).logits
    finally:
        handle.remove()
    return torch.softmax(logits[:, -1].double(), dim=-1)


@torch.no_grad()
def unclamped(model, ids: list[int], layer: int, neuron: int) -> tuple[torch.Tensor, float]:
    """(p(next token) [V] float64, the neuron's activation at the last position), by a hook of our own."""
    seen = []
    module = model.get_submodule(NEURON_AT[model.config.model_type].format(layer))
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    finally:
        handle.remove()
    acts = seen[0].reshape(len(ids), -1)  # [1, T, d] or OPT's [T, d]
    return torch.softmax(logits[0, -1].double(), dim=-1), float(acts[-1, neuron])


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture
def one_thread():
    """Torch on one thread while inside: these models are tiny, and on a busy 2-core machine several
    threads spin against each other (the family test below takes ~4x as long)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bos", [False, True], ids=["plain", "bos"])
@pytest.mark.parametrize("name", [*(f for f in supported_model_types() if f not in MOE_FAMILIES), "opt_proj"])
def test_every_familys_sweep_matches_a_clamp_hook_of_our_own(name, bos, tmp_path, one_thread):
    """Every family in the adapter registry (and OPT with project_out), saved and loaded as a
    user's model is: the worker's sweep (sweep_many, as `needle index` calls it, several neurons
    of both layers at once) gives, for every clamp value, the target's probability that a plain
    forward pass with the neuron overwritten by a hook of our own gives, at every prompt position
    after BOS ("all") or at the last one ("last"), by each of the sweep's ways of batching. Each
    curve is checked to be one that a clamp of the wrong neuron, the wrong layer, the wrong point
    of the MLP or the wrong positions would miss."""
    path = build_tiny(name, tmp_path / name)
    if bos:
        add_bos(path)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    family = model.config.model_type
    assert family == name.removesuffix("_proj") and family in NEURON_AT, f"no reference hook for {family}"
    ids = tok(PROMPT).input_ids
    assert (ids[0] == tok.bos_token_id) is bos and len(ids) == 11 + bos
    first, last = int(bos), len(ids) - 1
    dog = tok.convert_tokens_to_ids("▁dog" if tokenizer_style(name) == "sentencepiece" else "Ġdog")
    n_layers = model.config.num_hidden_layers
    assert n_layers == 2 and {layer for layer, _ in FAMILY_NEURONS} == {0, n_layers - 1}
    baselines = {(layer, neuron): unclamped(model, ids, layer, neuron) for layer, neuron in FAMILY_NEURONS}
    caught: dict[str, float] = {}  # a wrong clamp -> how far it moves the compared probabilities at most

    for last_only in (False, True):
        positions = slice(last, None) if last_only else slice(first, None)
        want: dict[tuple[int, int, int], torch.Tensor] = {}  # (layer, neuron, token) -> p(token) per value
        ends: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, neuron in FAMILY_NEURONS:
            ref = hooked_probs(model, ids, layer, neuron, FAMILY_VALUES, positions)
            ends[(layer, neuron)] = (ref[0], ref[-1])
            # " dog", and the tokens the clamp makes likeliest at the sweep's ends (probabilities that move)
            targets = sorted({dog, int(ref[0].argmax()), int(ref[-1].argmax())})
            for t in targets:
                want[(layer, neuron, t)] = ref[:, t]
            # the comparison can fail: each of these clamps moves a compared probability past the tolerance
            other_layer = 1 - layer
            wrong = {
                "neuron": hooked_probs(model, ids, layer, (neuron + 1) % MLP, FAMILY_VALUES, positions),
                "layer": hooked_probs(model, ids, other_layer, neuron, FAMILY_VALUES, positions),
                "point": hooked_probs(model, ids, layer, neuron, FAMILY_VALUES, positions, at=TOO_EARLY[family]),
            }
            if layer == 0:  # a last-layer clamp at earlier positions cannot reach the last one
                wrong["positions"] = hooked_probs(model, ids, layer, neuron, FAMILY_VALUES,
                                                  slice(first, None) if last_only else slice(last, None))
                if bos and not last_only:
                    wrong["bos"] = hooked_probs(model, ids, layer, neuron, FAMILY_VALUES, slice(None))
            for what, alt in wrong.items():
                caught[what] = max(caught.get(what, 0.0), gap(alt[:, targets], ref[:, targets]))

        items = [SweepItem(layer, neuron, t, FAMILY_VALUES) for layer, neuron, t in want]
        # the worker's batching (the blocks before the clamped layer run once for all rows), the same in
        # chunks that split curves, and a plain batch of one row per value
        for share_prefix, max_rows in ((True, 512), (True, 16), (False, 512)):
            results = clamp.sweep_many(loaded, PROMPT, items, last_only=last_only, share_prefix=share_prefix,
                                       max_rows=max_rows)
            assert len(results) == len(items)
            for item, res in zip(items, results, strict=True):
                key = (item.layer, item.neuron, item.token_id)
                where = f"{name} {'last' if last_only else 'all'} share_prefix={share_prefix} rows={max_rows} {key}"
                assert (res["layer"], res["neuron"], res["token_id"]) == key, where
                assert res["values"] == FAMILY_VALUES and res["positions"] == ("last" if last_only else "all")
                assert res["prompt_tokens"] == 11, where
                np.testing.assert_allclose(res["probs"], want[key].numpy(), rtol=0, atol=F32_ATOL, err_msg=where)
                # the sweep's ends: the top tokens' probabilities are the distribution's at the first and last value
                for end, ref_end in zip(("low", "high"), ends[(item.layer, item.neuron)], strict=True):
                    top = res["top_tokens"][end]
                    got_p = [t["prob"] for t in top]
                    np.testing.assert_allclose(got_p, torch.topk(ref_end, clamp.TOP_TOKENS).values.numpy(), rtol=0,
                                               atol=F32_ATOL, err_msg=f"{where} {end}")
                    np.testing.assert_allclose(got_p, ref_end[[t["token_id"] for t in top]].numpy(), rtol=0,
                                               atol=F32_ATOL, err_msg=f"{where} {end}")
                # the baseline: the unclamped model, the neuron's activation at the last position
                plain, act = baselines[(item.layer, item.neuron)]
                assert res["baseline"]["prob"] == pytest.approx(float(plain[item.token_id]), abs=F32_ATOL), where
                assert res["baseline"]["activation"] == pytest.approx(act, abs=F32_ATOL), where
    left = [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not left, f"hooks left on {left}"
    # and the comparisons can fail: a sweep that clamped any of these would have missed a curve
    assert set(caught) == {"neuron", "layer", "point", "positions"} | ({"bos"} if bos else set())
    for what, moved in caught.items():
        assert moved > SENSITIVE, f"a clamp of the wrong {what} moves the curves by {moved:.2g} only"


def test_value_range_is_even_and_clean():
    """Evenly spaced from start to stop, both ends exact, each value to 15 significant digits: the
    JSON says 69.51, not 69.51000000000002."""
    values = clamp.value_range(-300.0, 300.0, 41)
    assert values[0] == -300.0 and values[-1] == 300.0 and len(values) == 41
    np.testing.assert_allclose(values, np.linspace(-300.0, 300.0, 41), rtol=1e-12, atol=1e-10)
    assert all(len(repr(v).lstrip("-").replace(".", "").strip("0")) <= 15 for v in values), values
    odd = clamp.value_range(-139.02, 139.02, 5)
    assert odd == [-139.02, -69.51, 0.0, 69.51, 139.02]
