"""The adapter's sites (mlp, mlp_out, resid_pre, resid_post) against the model itself: reads checked
against the hidden states transformers returns, the neuron activations and the out projection
computed by hand; replacements checked against plain torch hooks written here, with module paths
spelled out per family (the adapter's registry is not consulted)."""

from __future__ import annotations

import pytest
import torch
from tinymodels import LINEAR_LAYOUT, TINY_FAMILIES, build_tiny

from app.errors import NeedleError, NotFound
from workers.adapters import SITES
from workers.loading import load_model

GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm", "smollm3", "granite", "cohere")
POST_NORM = ("gemma2", "gemma3_text", "olmo2")  # RMSNorm the MLP output before the residual add
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h", "phi3": "model.layers",
          "opt": "model.decoder.layers", "opt_proj": "model.decoder.layers", **{f: "model.layers" for f in GATED}}  # fmt: skip
MLP_OUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "gptj": "mlp.fc_out", "phi3": "mlp.down_proj",
           "opt": "fc2", "opt_proj": "fc2", **{f: "mlp.down_proj" for f in GATED}}  # fmt: skip
FINAL = {"gpt2": ["transformer.ln_f"], "gpt_neox": ["gpt_neox.final_layer_norm"], "gptj": ["transformer.ln_f"],
         "opt": ["model.decoder.final_layer_norm"],
         "opt_proj": ["model.decoder.final_layer_norm", "model.decoder.project_out"],
         "phi3": ["model.norm"], **{f: ["model.norm"] for f in GATED}}  # fmt: skip

for _f, (_blocks, _in, _out, _final, _, _) in LINEAR_LAYOUT.items():
    BLOCKS[_f], MLP_OUT[_f], FINAL[_f] = _blocks, _out, [_final]

PROMPTS = ["the dog sat on the mat", "def feed(dog):\n    return"]
LAYERS = (0, 1)
ALL_SITES = [(layer, site) for layer in LAYERS for site in SITES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> LoadedModel, built and loaded once per module."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(str(build_tiny(family, root / family)), device="cpu")
        return cache[family]

    return get


def batch(loaded):
    tok = loaded.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, ids))
    return torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i in ids])


def block(family, model, layer):
    return model.get_submodule(BLOCKS[family])[layer]


def out_projection(family, model, layer):
    return block(family, model, layer).get_submodule(MLP_OUT[family])


def mlp_out_module(family, model, layer):
    """The module whose output is added to the residual stream as the MLP's contribution."""
    b = block(family, model, layer)
    return b.post_feedforward_layernorm if family in POST_NORM else b.get_submodule(MLP_OUT[family])


@pytest.fixture
def hooks():
    """Register plain torch hooks through this list; they are removed after the test."""
    handles: list = []
    yield handles
    for handle in handles:
        handle.remove()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_resid_sites_are_the_hidden_states(tiny, family, hooks):
    loaded = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    last = adapter.n_layers - 1
    block_out = {}
    hooks.append(
        block(family, model, last).register_forward_hook(  # (GPT-Neo's and BLOOM's blocks return a tuple)
            lambda m, a, out: block_out.__setitem__("h", (out[0] if isinstance(out, tuple) else out).detach()))
    )
    pairs = [(layer, site) for layer in LAYERS for site in ("resid_pre", "resid_post")]
    with adapter.read_sites(pairs) as acts:
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == adapter.n_layers + 1
    for layer in LAYERS:
        assert acts[(layer, "resid_pre")].shape == (*ids.shape, adapter.d_model)
        assert torch.equal(acts[(layer, "resid_pre")], hidden[layer])
        assert acts[(layer, "resid_pre")].data_ptr() != hidden[layer].data_ptr()  # a copy
        if layer < last:
            assert torch.equal(acts[(layer, "resid_post")], hidden[layer + 1])
    # the last hidden state has the final norm (and OPT's project_out) applied; resid_post is before it
    assert torch.equal(acts[(last, "resid_post")], block_out["h"])
    normed = acts[(last, "resid_post")]
    with torch.no_grad():
        for path in FINAL[family]:
            normed = model.get_submodule(path)(normed)
    assert torch.equal(normed, hidden[-1])
    assert not torch.equal(acts[(last, "resid_post")], hidden[-1])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mlp_sites_are_the_neurons_and_what_they_write(tiny, family):
    loaded = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    pairs = [(layer, site) for layer in LAYERS for site in ("mlp", "mlp_out")]
    with adapter.read_sites(pairs) as acts, adapter.read_activations(LAYERS) as neurons:
        model(ids)
    for layer in LAYERS:
        assert acts[(layer, "mlp")].shape == (*ids.shape, adapter.site_width("mlp")) == (*ids.shape, adapter.d_mlp)
        assert acts[(layer, "mlp_out")].shape == (*ids.shape, adapter.site_width("mlp_out"))
        assert torch.equal(acts[(layer, "mlp")], neurons[layer])
        bias = out_projection(family, model, layer).bias
        written = neurons[layer] @ adapter.output_weights(layer) + (0 if bias is None else bias.detach())
        if family in POST_NORM:  # RMSNorm: x / rms(x) * w (Gemma: * (1 + w)), in float32
            weight = block(family, model, layer).post_feedforward_layernorm.weight.detach()
            rms = torch.rsqrt(written.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
            written = written * rms * (weight if family == "olmo2" else 1 + weight)
        torch.testing.assert_close(acts[(layer, "mlp_out")], written, rtol=1e-4, atol=1e-5)


def plain_add(family, model, layer, site, delta, hooks):
    """Add delta [batch, seq, width] at a site with a plain torch hook on the module that computes it."""
    if site == "resid_pre":
        hooks.append(block(family, model, layer).register_forward_pre_hook(lambda m, a: (a[0] + delta, *a[1:])))
    elif site == "resid_post":
        hooks.append(block(family, model, layer).register_forward_hook(
            lambda m, a, out: (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta))
    elif site == "mlp_out":  # OPT runs its MLP on [batch * seq, d]
        hooks.append(
            mlp_out_module(family, model, layer).register_forward_hook(lambda m, a, out: out + delta.reshape(out.shape))
        )
    else:
        hooks.append(
            out_projection(family, model, layer).register_forward_pre_hook(
                lambda m, a: (a[0] + delta.reshape(a[0].shape), *a[1:])
            )
        )


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_replacing_a_site_runs_the_rest_of_the_model_on_it(tiny, family, site, hooks):
    """Replacing a site by its clean value plus delta gives the logits that adding delta with a plain
    torch hook gives; delta is nonzero at one token only, so the tokens before it are unchanged."""
    loaded = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    width = adapter.site_width(site)
    with adapter.read_sites([(layer, site) for layer in LAYERS]) as clean:
        base = model(ids).logits
    for layer in LAYERS:
        delta = torch.zeros(*ids.shape, width)
        delta[1, 2] = torch.randn(width, generator=gen(layer))
        steered_value = clean[(layer, site)] + delta
        with adapter.site_hook(layer, site, lambda acts, v=steered_value: v, prepend=True):
            steered = model(ids).logits
        plain_add(family, model, layer, site, delta, hooks)
        expected = model(ids).logits
        hooks.pop().remove()
        torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(steered[1, 2:], base[1, 2:], atol=1e-3)
        torch.testing.assert_close(steered[:, :2], base[:, :2], rtol=0, atol=1e-6)
        torch.testing.assert_close(steered[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)  # hooks gone on exit


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_replacing_a_site_by_its_own_value_changes_nothing(tiny, family):
    loaded = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    with adapter.read_sites(ALL_SITES) as clean:
        base = model(ids).logits
    for layer, site in ALL_SITES:
        value = clean[(layer, site)]
        with adapter.site_hook(layer, site, lambda acts, v=value: v):
            same = model(ids).logits
        torch.testing.assert_close(same, base, rtol=0, atol=1e-5)
        shift = 0.5 * torch.randn(adapter.site_width(site), generator=gen())
        with adapter.site_hook(layer, site, lambda acts, v=value + shift: v):
            moved = model(ids).logits
        assert not torch.allclose(moved, base, atol=1e-3), (layer, site)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_a_replacement_is_seen_by_reads_of_its_site_only(tiny, family, hooks):
    """Reads entered before a replacement (prepend=True) still see the replaced value at its site and
    downstream of it; a read of resid_post 0 is not the replaced resid_pre 1."""
    loaded = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    with adapter.read_sites(ALL_SITES) as clean:
        model(ids)
    shift = torch.randn(adapter.d_model, generator=gen(3))
    neuron_shift = torch.randn(adapter.d_mlp, generator=gen(4))
    with (
        adapter.read_sites(ALL_SITES) as acts,
        adapter.site_hook(1, "resid_pre", lambda a: a + shift, prepend=True),
        adapter.site_hook(0, "mlp_out", lambda a: a + shift, prepend=True),
        adapter.site_hook(1, "mlp", lambda a: a + neuron_shift, prepend=True),
    ):
        steered = model(ids).logits
    torch.testing.assert_close(acts[(0, "mlp_out")], clean[(0, "mlp_out")] + shift)
    torch.testing.assert_close(acts[(0, "resid_post")], clean[(0, "resid_post")] + shift, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts[(1, "resid_pre")], acts[(0, "resid_post")] + shift)
    assert torch.equal(acts[(0, "mlp")], clean[(0, "mlp")])  # upstream of every replacement
    assert torch.equal(acts[(0, "resid_pre")], clean[(0, "resid_pre")])

    # the same three additions made with plain torch hooks
    expected_resid_pre = acts[(0, "resid_post")] + shift
    plain_add(family, model, 0, "mlp_out", shift.expand(*ids.shape, -1), hooks)
    plain_add(family, model, 1, "resid_pre", shift, hooks)
    plain_add(family, model, 1, "mlp", neuron_shift.expand(*ids.shape, -1), hooks)
    with adapter.read_sites([(1, "resid_pre"), (1, "mlp")]) as plain_acts:
        expected = model(ids).logits
    torch.testing.assert_close(plain_acts[(1, "resid_pre")], expected_resid_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts[(1, "mlp")], plain_acts[(1, "mlp")], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "opt"])
def test_on_sites_streams_in_forward_order(tiny, family):
    loaded = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    seen: list = []
    with adapter.read_sites(ALL_SITES) as acts, adapter.on_sites(reversed(ALL_SITES), lambda *call: seen.append(call)):
        model(ids)
    order = ("resid_pre", "mlp", "mlp_out", "resid_post")
    assert [(layer, site) for layer, site, _ in seen] == [(layer, site) for layer in LAYERS for site in order]
    for layer, site, value in seen:
        assert torch.equal(value, acts[(layer, site)])


def test_steering_a_site_during_generation(tiny):
    loaded = tiny("opt")
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)[:1]
    pad = loaded.tokenizer.eos_token_id
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    shift = 5 * torch.randn(adapter.d_model, generator=gen(5))
    with (
        adapter.site_hook(1, "mlp_out", lambda a: a + shift, prepend=True),
        adapter.read_sites([(1, "mlp_out")]) as acts,
    ):
        steered = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert acts[(1, "mlp_out")].shape == (1, 1, adapter.d_model)  # the last, cached, one-token step
    assert not torch.equal(plain, steered)


def test_a_replacement_takes_the_sites_dtype(tmp_path):
    loaded = load_model(str(build_tiny("phi3", tmp_path / "phi3")), device="cpu", dtype="bfloat16")
    adapter = loaded.adapter
    ids = torch.tensor([[5, 6, 7]])
    with adapter.read_sites([(0, "resid_post"), (1, "mlp")]) as acts:
        base = loaded.model(ids).logits
    with (
        adapter.site_hook(0, "resid_post", lambda a: a.float() + 1.0, prepend=True),
        adapter.read_sites([(0, "resid_post")]) as steered,
    ):
        moved = loaded.model(ids).logits
    assert acts[(0, "resid_post")].dtype == steered[(0, "resid_post")].dtype == torch.bfloat16
    assert acts[(1, "mlp")].dtype == torch.bfloat16
    assert not torch.equal(moved, base)


def test_unknown_sites_layers_and_entries_are_refused(tiny):
    adapter = tiny("gpt2").adapter
    assert [adapter.site_width(site) for site in SITES] == [adapter.d_mlp] + [adapter.d_model] * 3
    for bad in ("resid_mid", "MLP", None):
        with pytest.raises(NeedleError) as err:
            adapter.site_width(bad)
        message = str(err.value)
        assert repr(bad) in message and all(site in message for site in SITES) and "\n" not in message
    with pytest.raises(NeedleError, match="resid_mid"):
        with adapter.site_hook(0, "resid_mid", lambda a: None):
            pass
    with pytest.raises(NotFound, match="no layer 2"):
        with adapter.site_hook(2, "resid_post", lambda a: None):
            pass
    with pytest.raises(NotFound, match="no layer -1"):
        with adapter.read_sites([(0, "mlp"), (-1, "mlp")]):
            pass
    with pytest.raises(NeedleError, match="attn_out"):
        with adapter.on_sites([(0, "attn_out")], lambda *a: None):
            pass
    with pytest.raises(NeedleError, match=r"\(layer, site\) pair"):
        with adapter.read_sites([0]):  # type: ignore[list-item]
            pass
    blocks = adapter.model.transformer.h
    counts = [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]
    with adapter.read_sites([(0, "resid_pre"), (1, "resid_post")]):
        assert [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks] != counts
    assert [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks] == counts  # removed on exit
    with adapter.read_sites([(torch.tensor(1), "mlp")]) as acts:  # int-likes are fine
        adapter.model(torch.tensor([[5, 6, 7]]))
    assert list(acts) == [(1, "mlp")] and type(next(iter(acts))[0]) is int
