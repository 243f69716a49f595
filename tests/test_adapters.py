"""The adapters against the model itself: weights read straight from the saved safetensors file
by their checkpoint names, activations recomputed by hand from the MLP's input, logits
recomputed from the adapter's unembedding, and clamping checked on real forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tinymodels import GEMMA_FAMILIES, LINEAR_LAYOUT, MLP, TINY_FAMILIES, build_tiny
from transformers import AutoModel, BertConfig
from transformers.activations import ACT2FN

from app.errors import NeedleError
from workers.adapters import adapter_for, family_for_config, supported_model_types
from workers.loading import load_model

GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm", "smollm3", "granite", "cohere")
OPT = ("opt", "opt_proj")
LAYER_NORM = ("gpt2", "gpt_neox", "gptj", "opt", "opt_proj", "stablelm", "gpt_neo", "phi", "gpt_bigcode", "starcoder2",
              "falcon", "bloom")

# Checkpoint names, written out per family (the adapter's registry is not consulted).
BLOCK = {
    "gpt2": "transformer.h.{L}",
    "gpt_neox": "gpt_neox.layers.{L}",
    "gptj": "transformer.h.{L}",
    "phi3": "model.layers.{L}",
    "opt": "model.decoder.layers.{L}",
    "opt_proj": "model.decoder.layers.{L}",
    **{f: "model.layers.{L}" for f in GATED},
}
MLP_IN = {"gpt2": "mlp.c_fc", "gpt_neox": "mlp.dense_h_to_4h", "gptj": "mlp.fc_in", "phi3": "mlp.gate_up_proj",
          "opt": "fc1", "opt_proj": "fc1", **{f: "mlp.up_proj" for f in GATED}}  # fmt: skip
MLP_OUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "gptj": "mlp.fc_out", "phi3": "mlp.down_proj",
           "opt": "fc2", "opt_proj": "fc2", **{f: "mlp.down_proj" for f in GATED}}  # fmt: skip
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm", "gptj": "transformer.ln_f",
              "opt": "model.decoder.final_layer_norm", "opt_proj": "model.decoder.final_layer_norm",
              "phi3": "model.norm", **{f: "model.norm" for f in GATED}}  # fmt: skip
EMBEDDING = {"gpt2": "transformer.wte", "gpt_neox": "gpt_neox.embed_in", "gptj": "transformer.wte",
             "opt": "model.decoder.embed_tokens", "opt_proj": "model.decoder.embed_tokens",
             "phi3": "model.embed_tokens", **{f: "model.embed_tokens" for f in GATED}}  # fmt: skip
ACTIVATION_ATTR = {"gpt2": "activation_function", "gptj": "activation_function", "opt": "activation_function",
                   "opt_proj": "activation_function", "gpt_neox": "hidden_act", "phi3": "hidden_act",
                   "llama": "hidden_act", "mistral": "hidden_act", "qwen2": "hidden_act", "qwen3": "hidden_act",
                   "gemma": "hidden_act",  # GemmaMLP reads hidden_act; Gemma-2/3 read hidden_activation
                   "gemma2": "hidden_activation", "gemma3_text": "hidden_activation",
                   **dict.fromkeys(("olmo", "olmo2", "stablelm", "smollm3", "granite", "cohere"), "hidden_act")}  # fmt: skip

for _f, (_blocks, _in, _out, _final, _embed, _act) in LINEAR_LAYOUT.items():
    BLOCK[_f], MLP_IN[_f], MLP_OUT[_f], FINAL_NORM[_f], EMBEDDING[_f], ACTIVATION_ATTR[_f] = (
        _blocks + ".{L}", _in, _out, _final, _embed, _act)

PROMPTS = ["the dog sat on the mat", "def feed(dog):\n    return"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (LoadedModel, tensors of its saved model.safetensors), built and loaded once per module."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            path = build_tiny(family, root / family)
            cache[family] = (load_model(str(path), device="cpu"), load_file(str(path / "model.safetensors")))
        return cache[family]

    return get


def batch(loaded):
    tok = loaded.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, ids))
    ids = [i + [tok.eos_token_id] * (width - len(i)) for i in ids]  # pad right; attention sees all (causal)
    return torch.tensor(ids)


def w(tensors, family, layer, name):
    return tensors[f"{BLOCK[family].format(L=layer)}.{name}"]


def direct_input_weights(family, tensors, layer):
    weight = w(tensors, family, layer, MLP_IN[family] + ".weight")
    if family == "gpt2":
        return weight.T  # Conv1D: [in, out]
    if family == "phi3":
        return weight[MLP:]  # [gate; up]
    return weight


def direct_output_weights(family, tensors, layer):
    weight = w(tensors, family, layer, MLP_OUT[family] + ".weight")
    return weight if family == "gpt2" else weight.T


def direct_unembedding(family, tensors):
    head_key = "embed_out.weight" if family == "gpt_neox" else "lm_head.weight"  # Pythia's checkpoint name
    head = tensors.get(head_key, tensors[EMBEDDING[family] + ".weight"])  # tied heads are saved once
    if family == "opt_proj":
        head = head @ tensors["model.decoder.project_out.weight"]
    return head


def direct_activations(family, config, tensors, layer, x):
    """The neuron activations computed by hand from the MLP input x."""
    act = ACT2FN[getattr(config, ACTIVATION_ATTR[family])] if ACTIVATION_ATTR[family] else ACT2FN["gelu_pytorch_tanh"]
    w_in = w(tensors, family, layer, MLP_IN[family] + ".weight")
    if family == "gpt2":
        return act(x @ w_in + w(tensors, family, layer, "mlp.c_fc.bias"))
    if family in GATED:
        gate = x @ w(tensors, family, layer, "mlp.gate_proj.weight").T
        return act(gate) * (x @ w_in.T)
    if family == "phi3":
        gate_up = x @ w_in.T
        return act(gate_up[..., :MLP]) * gate_up[..., MLP:]
    bias = tensors.get(f"{BLOCK[family].format(L=layer)}.{MLP_IN[family]}.bias")  # Falcon's have none
    return act(x @ w_in.T + (0 if bias is None else bias))


def mlp_input_module(family, model, layer):
    block = model.get_submodule(BLOCK[family].format(L=layer))
    return block.get_submodule("fc1") if family in OPT else block.mlp


def test_registry_lists_every_family():
    assert supported_model_types() == sorted(
        ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "gptj"]
        + ["phi3", "olmo", "olmo2", "stablelm", "smollm3", "gpt_neo", "phi", "gpt_bigcode", "starcoder2", "falcon", "bloom"]
        + ["granite", "cohere", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
    )


def test_unknown_config_names_it_and_the_supported_ones():
    with pytest.raises(NeedleError) as err:
        family_for_config(BertConfig())
    message = str(err.value)
    assert "'bert'" in message and "gpt2" in message and "llama" in message and "phi3" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_weights_match_the_checkpoint(tiny, family):
    loaded, tensors = tiny(family)
    adapter = loaded.adapter
    assert adapter.family == ("opt" if family == "opt_proj" else family)
    d_model = MLP // 4 if family == "bloom" else 32  # BLOOM's MLP is 4 x d_model
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp) == (2, d_model, MLP)
    for layer in range(adapter.n_layers):
        w_in, w_out = adapter.input_weights(layer), adapter.output_weights(layer)
        assert w_in.shape == w_out.shape == (MLP, d_model)
        assert torch.equal(w_in, direct_input_weights(family, tensors, layer))
        assert torch.equal(w_out, direct_output_weights(family, tensors, layer))
        assert not w_in.requires_grad and not w_out.requires_grad
    w_u = adapter.unembedding()
    torch.testing.assert_close(w_u, direct_unembedding(family, tensors), rtol=1e-6, atol=1e-6)
    assert w_u.shape == (adapter.vocab_size, d_model)
    assert adapter.vocab_size == loaded.model.config.vocab_size

    scale = tensors.get(FINAL_NORM[family] + ".weight")
    if family == "olmo":  # OLMo's LayerNorms have no weight: nothing to scale by
        assert scale is None and adapter.final_norm_scale() is None
    else:
        torch.testing.assert_close(adapter.final_norm_scale(), 1 + scale if family in GEMMA_FAMILIES else scale)
    bias = adapter.head_bias()
    if family in ("gptj", "phi"):  # their LM heads have a bias
        assert torch.equal(bias, tensors["lm_head.bias"])
    else:
        assert bias is None
    assert adapter.logit_softcap == (3.0 if family in ("gemma2", "gemma3_text") else None)


def test_weights_are_views_not_copies(tiny):
    loaded, _ = tiny("llama")
    adapter = loaded.adapter
    up = loaded.model.model.layers[1].mlp.up_proj.weight
    assert adapter.input_weights(1).data_ptr() == up.data_ptr()
    assert adapter.unembedding().data_ptr() == loaded.model.lm_head.weight.data_ptr()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_activations_are_what_the_output_projection_multiplies(tiny, family):
    loaded, tensors = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    mlp_inputs, mlp_outputs = {}, {}
    handles = []
    for layer in range(adapter.n_layers):
        handles.append(
            mlp_input_module(family, model, layer).register_forward_pre_hook(
                lambda m, args, layer=layer: mlp_inputs.__setitem__(layer, args[0].detach().clone())
            )
        )
        handles.append(
            model.get_submodule(f"{BLOCK[family].format(L=layer)}.{MLP_OUT[family]}").register_forward_hook(
                lambda m, args, out, layer=layer: mlp_outputs.__setitem__(layer, out.detach().clone())
            )
        )
    try:
        with adapter.read_activations([0, 1]) as acts:
            model(ids)
    finally:
        for handle in handles:
            handle.remove()

    for layer in range(adapter.n_layers):
        assert acts[layer].shape == (*ids.shape, MLP)
        x = mlp_inputs[layer].reshape(*ids.shape, -1)  # OPT runs its MLP on [batch * seq, d]
        expected = direct_activations(family, model.config, tensors, layer, x)
        torch.testing.assert_close(acts[layer], expected, rtol=1e-4, atol=1e-5)
        # row i of output_weights is what neuron i writes
        out_bias = tensors.get(f"{BLOCK[family].format(L=layer)}.{MLP_OUT[family]}.bias", 0)
        written = acts[layer] @ adapter.output_weights(layer) + out_bias
        torch.testing.assert_close(written, mlp_outputs[layer].reshape(written.shape), rtol=1e-4, atol=1e-5)
    assert not adapter.out_projection(0)._forward_pre_hooks  # hooks are removed on exit


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unembedding_norm_bias_and_softcap_give_the_logits(tiny, family):
    """softcap(norm(h) * scale @ W_U.T + head_bias), from the adapter's parts, equals the model's logits."""
    loaded, tensors = tiny(family)
    adapter, model, config = loaded.adapter, loaded.model, loaded.model.config
    ids = batch(loaded)
    seen = {}
    norm = model.get_submodule(FINAL_NORM[family])
    handle = norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].detach().clone()))
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    h = seen["h"]
    if family == "olmo":  # a LayerNorm without weight or bias
        normed = F.layer_norm(h, (h.shape[-1],), eps=1e-5)
    elif family == "cohere":  # a LayerNorm without bias
        normed = F.layer_norm(h, (h.shape[-1],), eps=config.layer_norm_eps) * adapter.final_norm_scale()
    elif family in LAYER_NORM:
        eps = getattr(config, "layer_norm_epsilon", None) or getattr(config, "layer_norm_eps", None) or 1e-5
        normed = F.layer_norm(h, (h.shape[-1],), eps=eps) * adapter.final_norm_scale()
        normed = normed + tensors[FINAL_NORM[family] + ".bias"]
    else:
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * adapter.final_norm_scale()
    expected = normed @ adapter.unembedding().T
    if adapter.head_bias() is not None:
        expected = expected + adapter.head_bias()
    if family == "granite":  # the head's own temperature, from the config as transformers names it
        expected = expected / config.logits_scaling
    if family == "cohere":
        expected = expected * config.logit_scale
    assert adapter.logit_scale == (1 / config.logits_scaling if family == "granite"
                                   else config.logit_scale if family == "cohere" else None)
    if adapter.logit_softcap:
        expected = adapter.logit_softcap * torch.tanh(expected / adapter.logit_softcap)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_clamp_replaces_exactly_one_neuron(tiny, family):
    loaded, _ = tiny(family)
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)
    neuron = 5
    with adapter.read_activations(0) as base:
        base_logits = model(ids).logits
    base = base[0]

    with adapter.clamp(0, neuron, 3.0), adapter.read_activations([0]) as acts:
        clamped_logits = model(ids).logits
    assert torch.all(acts[0][..., neuron] == 3.0)
    others = [i for i in range(adapter.d_mlp) if i != neuron]
    assert torch.equal(acts[0][..., others], base[..., others])
    assert not torch.allclose(clamped_logits, base_logits)

    # replace, not add: clamping a neuron to the value it already has changes nothing
    with adapter.clamp(0, neuron, base[..., neuron]):
        same_logits = model(ids).logits
    torch.testing.assert_close(same_logits, base_logits, rtol=0, atol=1e-6)

    # per-position values broadcast over [batch, seq]; [seq] broadcasts over the batch
    per_position = torch.arange(ids.numel(), dtype=torch.float32).reshape(ids.shape)
    with adapter.clamp(1, neuron, per_position), adapter.read_activations(1) as acts:
        model(ids)
    assert torch.equal(acts[1][..., neuron], per_position)
    with adapter.clamp(1, neuron, per_position[0]), adapter.read_activations(1) as acts:
        model(ids)
    assert torch.equal(acts[1][..., neuron], per_position[0].expand(ids.shape))

    # hooks gone on exit: the model is back to its own output
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    assert not adapter.out_projection(0)._forward_pre_hooks and not adapter.out_projection(1)._forward_pre_hooks


def test_clamp_and_read_reject_missing_layers_and_neurons(tiny):
    adapter = tiny("gpt2")[0].adapter
    with pytest.raises(NeedleError, match="no layer 2"):
        with adapter.clamp(2, 0, 1.0):
            pass
    with pytest.raises(NeedleError, match="no neuron 64"):
        with adapter.clamp(0, 64, 1.0):
            pass
    with pytest.raises(NeedleError, match="no layer -1"):
        adapter.input_weights(-1)
    with pytest.raises(NeedleError):
        with adapter.read_activations([0, 7]):
            pass
    assert torch.equal(adapter.input_weights(torch.tensor(1)), adapter.input_weights(1))  # int-likes are fine


def test_clamp_during_generation(tiny):
    loaded, _ = tiny("llama")
    adapter, model = loaded.adapter, loaded.model
    ids = batch(loaded)[:1]
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    with adapter.clamp(1, 3, 50.0), adapter.read_activations(1) as acts:
        clamped = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    assert torch.all(acts[1][..., 3] == 50.0)  # the last (cached, one-token) step was clamped too
    assert acts[1].shape[1] == 1
    assert not torch.equal(plain, clamped)


def test_a_base_model_without_lm_head_layout_is_refused(tiny, tmp_path):
    path = build_tiny("gpt2", tmp_path / "gpt2")
    base = AutoModel.from_pretrained(path)  # GPT2Model: blocks at .h, not .transformer.h
    with pytest.raises(NeedleError, match="model has no MLP"):
        adapter_for(base)


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    path = build_tiny("phi3", tmp_path / "phi3")
    loaded = load_model(str(path), device="cpu", dtype="bfloat16")
    adapter = loaded.adapter
    assert loaded.dtype == "bfloat16"
    assert adapter.input_weights(0).dtype == torch.bfloat16
    assert adapter.unembedding().dtype == torch.bfloat16
    with adapter.read_activations(0) as acts:
        loaded.model(torch.tensor([[5, 6, 7]]))
    assert acts[0].dtype == torch.bfloat16 and acts[0].shape == (1, 3, MLP)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "opt", "gemma2"])
def test_auto_device_on_a_gpu(tmp_path, family):
    loaded = load_model(str(build_tiny(family, tmp_path / family)))
    adapter = loaded.adapter
    assert loaded.device == "cuda" and loaded.dtype in ("bfloat16", "float16")
    weights = (adapter.input_weights(0), adapter.output_weights(1), adapter.unembedding(), adapter.final_norm_scale())
    for tensor in weights:
        assert tensor.is_cuda and tensor.dtype == getattr(torch, loaded.dtype)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device="cuda")
    with adapter.clamp(0, 2, 4.0), adapter.read_activations([0, 1]) as acts:
        loaded.model(ids)
    assert acts[0].is_cuda and acts[0].shape == (2, 4, MLP)
    assert torch.all(acts[0][..., 2] == 4.0)
