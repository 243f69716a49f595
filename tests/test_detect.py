"""Detection of a causal LM outside the registry from its module tree (workers.adapters.detect_family):
it agrees with the registry on every registry family; unregistered transformers families are
indexed through the user's path and compared with a direct computation from their named
parameters; what is not a causal LM, or has no MLP Needle can find, is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sqlalchemy import select
from torch import nn
from transformers import AutoConfig, MambaConfig, T5Config

from app import queries
from app.arrays import FLOAT32, INT32, unpack
from app.config import Settings
from app.db import engine_for, session_scope
from app.errors import NeedleError
from app.schema import Neuron
from needle.cli import index_model
from tests.tinymodels import (
    HEADS,
    HIDDEN,
    LAYERS,
    MLP,
    MOE_FAMILIES,
    POSITIONS,
    TINY_FAMILIES,
    build_unsupported,
    random_model,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
)
from workers.adapters import FAMILIES, Adapter, adapter_for
from workers.detect import detect_family
from workers.inspect import format_inspection, inspect_model
from workers.loading import load_model

# Transformers causal LMs outside the registry, and where each keeps a neuron's input row and output
# column and its final norm, by checkpoint name (written here, not read from the detection):
# (input weight, how its rows are the neurons', output weight, final norm, whether it scales by 1 + w,
# the MLP's output norm before the residual add)
UNREGISTERED = {
    "nemotron": ("mlp.up_proj.weight", "rows", "mlp.down_proj.weight", "model.norm", True, None),
    "persimmon": ("mlp.dense_h_to_4h.weight", "rows", "mlp.dense_4h_to_h.weight", "model.final_layernorm", False, None),
    "glm": ("mlp.gate_up_proj.weight", "second-half", "mlp.down_proj.weight", "model.norm", False, None),
    "exaone4": ("mlp.up_proj.weight", "rows", "mlp.down_proj.weight", "model.norm", False,
                "post_feedforward_layernorm"),
}


def unregistered_config(model_type: str, tokenizer, **extra):
    return AutoConfig.for_model(model_type, **{
        "vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False, **extra,
    })  # fmt: skip


def build_unregistered(model_type: str, path):
    tokenizer = tiny_tokenizer("sentencepiece")
    return save_tiny(unregistered_config(model_type, tokenizer), tokenizer, path)


def test_the_unregistered_families_are_outside_the_registry():
    assert not set(UNREGISTERED) & set(FAMILIES)
    # every registry family has a tiny model below
    assert {tiny_model_type(f) for f in TINY_FAMILIES + MOE_FAMILIES} == set(FAMILIES)


def tiny_model_type(family: str) -> str:
    return "opt" if family == "opt_proj" else family


def module_at(model, path: str | None):
    """The module at a dotted path, or None (the registry names OPT's project_out where a model has none)."""
    try:
        return model.get_submodule(path) if path else None
    except AttributeError:
        return None


# ---- the registry's families, detected ----------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES + MOE_FAMILIES)
def test_detection_agrees_with_the_registry(family):
    model = tiny_model(family)
    registry = adapter_for(model)
    assert not registry.spec.detected
    spec = detect_family(model)
    assert spec.detected and spec.name == registry.spec.name
    detected = Adapter(model, spec)

    # the same modules: each block's input, gate, output and post-MLP norm, the final norm, the projection
    for layer, block in enumerate(model.get_submodule(registry.spec.layers)):
        assert model.get_submodule(spec.layers)[layer] is block
        for part in ("mlp_in", "mlp_gate", "mlp_out", "mlp_post_norm", "moe_block"):
            want, got = getattr(registry.spec, part), getattr(spec, part)
            assert (want is None) == (got is None), part
            if want is not None:
                assert block.get_submodule(got) is block.get_submodule(want), (layer, part)
        assert detected.out_projection(layer) is registry.out_projection(layer)
    for part in ("final_norm", "project_out"):
        want, got = getattr(registry.spec, part), getattr(spec, part)
        assert module_at(model, got) is module_at(model, want), part
    assert (spec.kind, spec.norm_plus_one, spec.softcap, spec.logit_scale, spec.logit_scale_divides) == (
        registry.spec.kind, registry.spec.norm_plus_one, registry.spec.softcap, registry.spec.logit_scale,
        registry.spec.logit_scale_divides)

    # the same weights and head
    assert (detected.n_layers, detected.d_model, detected.d_mlp, detected.vocab_size) == (
        registry.n_layers, registry.d_model, registry.d_mlp, registry.vocab_size)
    for layer in range(registry.n_layers):
        assert torch.equal(detected.input_weights(layer), registry.input_weights(layer))
        assert torch.equal(detected.output_weights(layer), registry.output_weights(layer))
    assert torch.equal(detected.unembedding(), registry.unembedding())
    for read in ("final_norm_scale", "head_bias"):
        want, got = getattr(registry, read)(), getattr(detected, read)()
        assert (want is None and got is None) or torch.equal(got, want), read
    assert (detected.logit_softcap, detected.logit_scale) == (registry.logit_softcap, registry.logit_scale)

    # the same activations at every site, and the same clamp
    ids = torch.randint(0, registry.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    sites = [(layer, site) for layer in range(registry.n_layers) for site in ("mlp", "mlp_out", "resid_post")]
    with torch.no_grad():
        with registry.read_sites(sites) as want:
            base = model(ids).logits
        with detected.read_sites(sites) as got:
            model(ids)
        for key in sites:
            assert torch.equal(got[key], want[key]), key
        assert want[(0, "mlp")].shape == (2, 7, registry.d_mlp)
        with registry.clamp(1, 5, 3.0):
            clamped = model(ids).logits
        with detected.clamp(1, 5, 3.0), detected.read_activations(1) as acts:
            assert torch.equal(model(ids).logits, clamped)
    assert torch.all(acts[1][..., 5] == 3.0)
    assert not torch.allclose(clamped, base)


# ---- families outside the registry, end to end ---------------------------------------------------


# mixtures of experts outside the registry whose experts transformers keeps as Mixtral's: (the MoE
# block's path in a layer, the config fields that make it tiny and sparse in every layer)
UNREGISTERED_MOE = {
    "phimoe": ("mlp", {"num_local_experts": 4, "intermediate_size": 16}),
    "glm4_moe": ("mlp", {"n_routed_experts": 4, "moe_intermediate_size": 16, "first_k_dense_replace": 0,
                         "n_group": 1, "topk_group": 1, "n_shared_experts": 1}),
    "granitemoe": ("block_sparse_moe", {"num_local_experts": 4, "intermediate_size": 16}),
}


@pytest.mark.parametrize("model_type", sorted(UNREGISTERED_MOE))
def test_an_unregistered_mixture_of_experts_is_detected_and_indexed(model_type, db_url, tmp_path):
    block, sizes = UNREGISTERED_MOE[model_type]
    assert model_type not in FAMILIES
    tokenizer = tiny_tokenizer("sentencepiece")
    path = save_tiny(unregistered_config(model_type, tokenizer, num_experts_per_tok=2, **sizes), tokenizer,
                     tmp_path / model_type)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    adapter, model = loaded.adapter, loaded.model
    assert adapter.spec.detected and adapter.spec.kind == "experts" and adapter.spec.moe_block == block
    assert (adapter.n_experts, adapter.d_expert, adapter.d_mlp) == (4, 16, 64)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # transformers' own forward
    params = {name: p.detach() for name, p in reference.named_parameters()}
    ids = torch.randint(0, adapter.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapter.read_activations([0, 1]) as acts:
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    for layer in (0, 1):
        up = params[f"model.layers.{layer}.{block}.experts.gate_up_proj"]
        down = params[f"model.layers.{layer}.{block}.experts.down_proj"]
        torch.testing.assert_close(adapter.input_weights(layer), up[:, 16:].reshape(64, -1))
        torch.testing.assert_close(adapter.output_weights(layer), down.transpose(1, 2).reshape(64, -1))
        # each token's activations: 2 experts' worth, 0 for the experts not routed to
        routed = adapter.routed(layer).view(2, 9, 4)
        assert (routed.sum(-1) == 2).all()
        assert torch.equal(acts[layer].view(2, 9, 4, 16).abs().sum(-1) > 0, routed)

    settings = Settings(database_url=db_url)
    index_model(settings, str(path), "moe", device="cpu", quiet=True)  # its clamp sweeps run too
    with session_scope(engine_for(db_url)) as s:
        stored = queries.get_model(s, "moe")
        assert stored.family == f"{model_type} (detected)" and stored.info["experts"]["count"] == 4
        rows = s.scalars(select(Neuron).where(Neuron.model_id == stored.id).order_by(Neuron.layer, Neuron.neuron)).all()
    w_u = params["lm_head.weight"].double()
    for row in rows:
        e, i = divmod(row.neuron, 16)
        up = params[f"model.layers.{row.layer}.{block}.experts.gate_up_proj"][e, 16 + i].double()
        probs = torch.softmax(w_u @ up, dim=-1)
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), torch.topk(probs, 20).values.numpy(), rtol=1e-4,
                                   atol=1e-7)


@torch.no_grad()
def direct_decodings(path, model_type: str):
    """softmax(W_U . w_in) and W_U . w_out per layer, in float64, from the checkpoint's named parameters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = dict(model.named_parameters())
    w_u = params["lm_head.weight"].double()
    w_in_name, how, w_out_name, *_ = UNREGISTERED[model_type]
    result = []
    for layer in range(LAYERS):
        w_in = params[f"model.layers.{layer}.{w_in_name}"].double()
        if how == "second-half":  # [gate; up]
            w_in = w_in[MLP:]
        w_out = params[f"model.layers.{layer}.{w_out_name}"].double().T
        result.append((torch.softmax(w_in @ w_u.T, dim=-1), w_out @ w_u.T))
    return result


@pytest.mark.parametrize("model_type", sorted(UNREGISTERED))
def test_an_unregistered_family_is_indexed_and_says_it_was_detected(model_type, db_url, tmp_path, capsys):
    path = build_unregistered(model_type, tmp_path / model_type)
    capsys.readouterr()
    index_model(Settings(database_url=db_url), str(path), "m")  # its clamp stage's sweeps run too
    said = capsys.readouterr().err
    assert f"model_type {model_type!r} is not in Needle's registry" in said and "detected" in said

    with session_scope(engine_for(db_url)) as s:
        model = queries.get_model(s, "m")
        assert model.family == f"{model_type} (detected)"
        assert (model.n_layers, model.d_model, model.d_mlp) == (LAYERS, HIDDEN, MLP)
        rows = s.scalars(select(Neuron).where(Neuron.model_id == model.id).order_by(Neuron.layer, Neuron.neuron)).all()
    direct = direct_decodings(path, model_type)
    assert len(rows) == LAYERS * MLP
    for row in rows:
        probs, out = direct[row.layer][0][row.neuron], direct[row.layer][1][row.neuron]
        ids = unpack(row.in_ids, INT32)
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), probs[ids].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), torch.topk(probs, 20).values.numpy(), rtol=1e-4,
                                   atol=1e-7)
        pos_ids = unpack(row.out_pos_ids, INT32)
        np.testing.assert_allclose(unpack(row.out_pos_logits, FLOAT32), out[pos_ids].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(unpack(row.out_pos_logits, FLOAT32), torch.topk(out, 10).values.numpy(),
                                   rtol=1e-4, atol=1e-5)

    # the model page's family says it too
    from fastapi.testclient import TestClient

    from app.main import create_app

    page = TestClient(create_app(Settings(database_url=db_url))).get("/m.json").json()
    assert page["family"] == f"{model_type} (detected)"


@pytest.mark.parametrize("model_type", sorted(UNREGISTERED))
def test_a_clamp_through_the_detected_path_changes_the_logits_as_computed(model_type, tmp_path):
    """Clamping the last layer's neuron n from v1 to v2 adds (v2 - v1) * w_out[n] to the MLP's output
    (through the post-MLP norm where there is one), and nothing else changes before the final norm."""
    path = build_unregistered(model_type, tmp_path / model_type)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    adapter, model = loaded.adapter, loaded.model
    assert adapter.spec.detected and adapter.family == model_type
    _, _, w_out_name, final_norm, _, post_norm = UNREGISTERED[model_type]
    layer, neuron, v1, v2 = LAYERS - 1, 7, 1.0, 6.0
    block = model.get_submodule(f"model.layers.{layer}")
    norm = model.get_submodule(final_norm)
    w_out = dict(model.named_parameters())[f"model.layers.{layer}.{w_out_name}"][:, neuron]
    ids = torch.tensor([[3, 17, 42, 5, 99]])
    seen: dict[str, torch.Tensor] = {}
    handles = [norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0])),
               block.get_submodule(w_out_name.removesuffix(".weight")).register_forward_hook(
                   lambda m, args, out: seen.__setitem__("mlp", out))]
    try:
        with torch.no_grad():
            base = model(ids).logits
            with adapter.clamp(layer, neuron, v1):
                model(ids)
            h1, mlp1 = seen["h"], seen["mlp"]
            with adapter.clamp(layer, neuron, v2), adapter.read_activations(layer) as acts:
                clamped = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        mlp2 = mlp1 + (v2 - v1) * w_out
        if post_norm:
            after = block.get_submodule(post_norm)
            h2 = h1 - after(mlp1) + after(mlp2)
        else:
            h2 = h1 + (v2 - v1) * w_out
        expected = model.lm_head(norm(h2))
    assert torch.all(acts[layer][..., neuron] == v2)
    torch.testing.assert_close(clamped, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(clamped, base, atol=1e-3)


def test_a_one_plus_w_norm_is_read_from_its_code(tmp_path):
    """Nemotron's LayerNorm1P scales by (1 + w): the detected adapter's final norm scale, checked against
    the norm's own output."""
    path = build_unregistered("nemotron", tmp_path / "nemotron")
    loaded = load_model(str(path), device="cpu", dtype="float32")
    adapter, model = loaded.adapter, loaded.model
    norm = model.get_submodule("model.norm")
    assert adapter.spec.norm_plus_one
    torch.testing.assert_close(adapter.final_norm_scale(), 1 + norm.weight)
    h = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
    by_hand = torch.nn.functional.layer_norm(h, (HIDDEN,), weight=adapter.final_norm_scale(), bias=norm.bias,
                                             eps=norm.eps)
    torch.testing.assert_close(norm(h), by_hand)
    assert not detect_family(random_model(unregistered_config("persimmon", tiny_tokenizer("sentencepiece")))).norm_plus_one


def test_inspect_says_what_was_detected(tmp_path):
    path = build_unregistered("exaone4", tmp_path / "exaone4")
    info = inspect_model(str(path), device="cpu", dtype="float32")
    adapter = load_model(str(path), device="cpu", dtype="float32").adapter
    assert info["detected"] is True and info["family"] == "exaone4"
    assert (info["layers"], info["d_model"], info["d_mlp"]) == (adapter.n_layers, adapter.d_model, adapter.d_mlp)
    assert info["mlp"] | {"activation": None} == {
        "kind": "gated", "gated": True, "activation": None, "input": "model.layers.0.mlp.up_proj",
        "gate": "model.layers.0.mlp.gate_proj", "output": "model.layers.0.mlp.down_proj",
        "output_norm": "model.layers.0.post_feedforward_layernorm", "decoded": "the up_proj rows"}
    assert info["final_norm"]["path"] == "model.norm"
    text = format_inspection(info)
    assert "family exaone4 (detected)" in text and "detected from the module tree" in text


# ---- what is refused -----------------------------------------------------------------------------


def run_inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "needle.cli", "inspect", str(path)], capture_output=True, text=True,
                          env={**os.environ, "NEEDLE_DATABASE_URL": "sqlite:////nonexistent/needle.sqlite"},
                          timeout=120)


def one_line(fn, *args) -> str:
    with pytest.raises(NeedleError) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_encoder_and_an_encoder_decoder_are_refused(tmp_path):
    bert = build_unsupported(tmp_path / "bert")
    message = one_line(load_model, str(bert))
    assert "'bert'" in message and "an encoder (a masked LM)" in message and "causal" in message
    t5 = tmp_path / "t5"
    T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    message = one_line(load_model, str(t5))
    assert "'t5'" in message and "an encoder-decoder model" in message
    proc = run_inspect(t5)
    assert proc.returncode == 1 and "an encoder-decoder model" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unregistered_config_without_its_sizes_is_refused(tmp_path):
    path = build_unregistered("persimmon", tmp_path / "persimmon")
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    message = one_line(load_model, str(path))
    assert "lacks hidden_size" in message and "persimmon" in message


class Projection(nn.Module):
    """A linear map that is not an nn.Linear: detection does not take it for a projection."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight.T


def nemotron_model():
    return random_model(unregistered_config("nemotron", tiny_tokenizer("sentencepiece")))


def test_an_mlp_without_its_out_projection_names_the_missing_part():
    model = nemotron_model()
    for block in model.model.layers:
        block.mlp.down_proj = Projection(block.mlp.down_proj.weight.detach().clone())
    message = one_line(adapter_for, model)
    assert "could not detect the MLP of model_type 'nemotron'" in message
    assert f"block model.layers.0 has no module mapping {MLP} -> d_model {HIDDEN} (the MLP's out projection" in message


def test_blocks_that_differ_are_refused():
    model = nemotron_model()
    model.model.layers[1].mlp.down_proj = Projection(model.model.layers[1].mlp.down_proj.weight.detach().clone())
    message = one_line(detect_family, model)
    assert "model.layers.1.mlp.down_proj differs from model.layers.0.mlp.down_proj" in message


def test_two_inputs_neither_named_gate_cannot_be_told_apart():
    # LFM2's feed_forward has w1, w3 (gate and up) and w2: nothing in the shapes or names says which is the gate
    model = random_model(unregistered_config("lfm2", tiny_tokenizer("sentencepiece"), block_auto_adjust_ff_dim=False))
    message = one_line(detect_family, model)
    assert f"model.layers.0.feed_forward has two modules mapping d_model {HIDDEN} -> {MLP} (w1, w3)" in message
    assert "gate cannot be told from its up projection" in message


def test_a_list_of_blocks_must_be_found():
    model = nemotron_model()
    model.config.num_hidden_layers = 3
    message = one_line(detect_family, model)
    assert "found no list of 3 blocks" in message


def test_inspect_on_a_model_without_an_mlp_is_a_clear_error(tmp_path):
    path = tmp_path / "mamba"
    MambaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                state_size=4).save_pretrained(path)
    proc = run_inspect(path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "could not detect the MLP of model_type 'mamba'" in proc.stderr
    assert "block backbone.layers.0" in proc.stderr
