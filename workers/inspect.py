"""`needle inspect MODEL`: what Needle finds in a model, before anything is computed or stored.

The model is built from its config on PyTorch's meta device (shapes, no weights, no memory) and
read through the same Adapter the stages use: its family (from the registry, or detected), layers, where each layer's MLP input,
gate and output projections are, the activation, the final norm and its quirks, the LM head
(tied or not, bias, soft-cap, logit scale), the neuron count, and the memory the model and each
stage need on the chosen device.

The memory figures are estimates from the shapes, stated per stage: what the stage holds at once
beyond the model, on the device it runs on, at the default batch sizes (decode: batches of 512
neurons; examples and probes: 8,192 tokens a batch, windows of 64, 32,768 probe tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from workers.adapters import Adapter, adapter_for
from workers.decode import SEARCH_K
from workers.devices import is_device_map
from workers.examples import BINS, HIST_BINS, PER_BIN, TOP_K
from workers.loading import (
    build_meta,
    dtype_name,
    fits,
    format_bytes,
    memory_places,
    read_config,
    resolve_device,
    resolve_dtype,
    weight_bytes,
)

DECODE_BATCH = 512
EXAMPLE_TOKENS = 8192
CONTEXT = 64
PROBE_TOKENS = 32_768
MIB = 2**20
DETECTED_NOTE = (
    "  detected from the module tree (its model_type is not in the registry): the parts above are where the "
    "shapes put the MLP; a (1 + w) final norm is read from the norm's code, head quirks from the config "
    "(final_logit_softcapping, logits_scaling, logit_scale); clamp sweeps run each row in full"
)


def _activation(config) -> str | None:
    for name in ("hidden_act", "hidden_activation", "activation_function", "activation"):
        value = getattr(config, name, None)
        if isinstance(value, str):
            return value
    return None


def _path(adapter: Adapter, part: str | None, layer: int = 0) -> str | None:
    return None if part is None else f"{adapter.spec.layers}.{layer}.{part}"


def _memory(adapter: Adapter, n_params: int, model_bytes: int, on_gpu: bool) -> dict[str, Any]:
    """Bytes each stage holds at once beyond the model, from the shapes (module docstring)."""
    v, n, layers = adapter.vocab_size, adapter.d_mlp, adapter.n_layers

    # decode: two [batch x vocab] float32 blocks, the running search table (vocab x k: scores and ids)
    decode = 2 * min(DECODE_BATCH, n) * v * 4 + v * SEARCH_K * 12
    # examples: every layer's accumulator (top contexts, their negatives for a gated MLP, the
    # reservoirs, float16 per token; counts) and one batch's activations of a layer in float32
    kept = (TOP_K * (2 if adapter.gated else 1) + BINS * PER_BIN) * CONTEXT * n * 2
    counts = n * (HIST_BINS * (BINS + 1) + HIST_BINS + BINS + 1) * 8
    examples = layers * (kept + counts) + 4 * EXAMPLE_TOKENS * n * 4
    # probes: every layer's activations on the probe tokens, float16
    probes = layers * PROBE_TOKENS * n * 2
    return {
        "parameters": n_params,
        "model_bytes": model_bytes,
        "stages_bytes": {"decode": decode, "examples": examples, "probes": probes},
        "device": "GPU" if on_gpu else "CPU",
        "note": "estimates from the shapes at the default batch sizes: what each stage holds at once beyond "
                "the model, on its device (the forward pass's own activations not counted)",
    }


def inspect_model(source: str, device: str = "auto", dtype: str = "auto",
                  max_memory: dict[str, int] | None = None) -> dict[str, Any]:
    """What Needle finds in the model at `source` (a folder or a hub id in the local cache), as a dict."""
    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    ref, local, _, config = read_config(source)
    model = build_meta(config, torch_dtype, source)
    # a missing MLP part is its NeedleError, naming the part; a model_type outside the registry is detected
    adapter = adapter_for(model)
    spec = adapter.spec
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = weight_bytes(model)
    places = memory_places(resolved_device, max_memory)
    head = model.get_output_embeddings()
    norm = model.get_submodule(spec.final_norm) if spec.final_norm else None
    moe = adapter.model.get_submodule(f"{spec.layers}.0.{spec.moe_block}") if spec.moe_block else None
    shared = getattr(moe, "shared_expert", None) is not None
    return {
        "source": ref if local else source,
        "model_type": config.model_type,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "family": spec.name,
        "detected": spec.detected,  # False: found in the registry (workers/adapters.py)
        "layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "d_mlp": adapter.d_mlp,
        "neurons": adapter.n_layers * adapter.d_mlp,
        "vocab_size": adapter.vocab_size,
        "mlp": {
            "kind": spec.kind,
            "gated": adapter.gated,
            "activation": _activation(config),
            "input": _path(adapter, spec.mlp_in),
            "gate": _path(adapter, spec.mlp_gate),
            "output": _path(adapter, spec.mlp_out),
            "output_norm": _path(adapter, spec.mlp_post_norm),
            "decoded": "the up_proj rows" if spec.kind == "gated" else
                       "the up half of gate_up_proj" if spec.kind == "fused_gate_up" else
                       "the up half of each expert's gate_up_proj" if spec.kind == "experts" else "the input projection's rows",
        },
        # a mixture of experts: neuron N of a layer is neuron N % width of expert N // width
        "experts": {"count": adapter.n_experts, "width": adapter.d_expert, "per_token": adapter.experts_per_token,
                    "router": _path(adapter, f"{spec.moe_block}.gate"),
                    # Qwen2-MoE's always-on expert beside the routed ones: its neurons are not units
                    "shared_expert": _path(adapter, f"{spec.moe_block}.shared_expert") if shared else None}
        if adapter.n_experts else None,
        "final_norm": {
            "path": spec.final_norm,
            "has_weight": getattr(norm, "weight", None) is not None,
            "plus_one": spec.norm_plus_one,
        },
        "head": {
            "tied": bool(getattr(config, "tie_word_embeddings", False)),
            "bias": getattr(head, "bias", None) is not None,
            "softcap": adapter.logit_softcap,
            "logit_scale": adapter.logit_scale,
            "project_out": spec.project_out,
        },
        "device": resolved_device,
        "dtype": dtype_name(torch_dtype),
        # a device map's stages combine what they read on its first GPU (where the embedding goes), if any
        "memory": _memory(adapter, n_params, model_bytes, resolved_device.startswith("cuda")
                          or (is_device_map(resolved_device) and torch.cuda.is_available())),
        # whether the weights fit where they would be loaded: the bytes free at each place (or its cap)
        "fits": {"fits": fits(model_bytes, places), "needed_bytes": model_bytes, "free_bytes": places},
    }


def format_inspection(info: dict[str, Any]) -> str:
    mib = lambda b: f"{b / MIB:,.0f} MiB"  # noqa: E731
    mlp, norm, head, mem = info["mlp"], info["final_norm"], info["head"], info["memory"]
    quirks = [q for q, on in (("LM-head bias", head["bias"]), (f"logit soft-cap {head['softcap']}", head["softcap"]),
                              (f"logit scale {head['logit_scale']}", head["logit_scale"]),
                              (f"projection {head['project_out']}", head["project_out"])) if on]
    lines = [
        f"{info['source']}: {info['architecture']} (model_type {info['model_type']!r}), "
        f"family {info['family']} ({'detected' if info['detected'] else 'in the registry'})",
        f"  {info['layers']} layers x {info['d_mlp']:,} MLP neurons = {info['neurons']:,} neurons; "
        f"d_model {info['d_model']:,}; vocabulary {info['vocab_size']:,}",
        f"  MLP ({mlp['kind']}{', gated' if mlp['gated'] and mlp['kind'] != 'gated' else ''}, "
        f"activation {mlp['activation']}): "
        f"input {mlp['input']}" + (f", gate {mlp['gate']}" if mlp["gate"] and mlp["gate"] != mlp["input"] else "")
        + f", output {mlp['output']}" + (f", then {mlp['output_norm']}" if mlp["output_norm"] else "")
        + f"; decoded: {mlp['decoded']}",
        *([f"  mixture of experts: {ex['count']} experts of {ex['width']:,} neurons ({ex['per_token']} per token, "
           f"router {ex['router']}); neuron N is neuron N % {ex['width']} of expert N // {ex['width']}"
           + (f"; the shared expert {ex['shared_expert']} is not read" if ex["shared_expert"] else "")]
          if (ex := info["experts"]) else []),
        f"  final norm {norm['path']}" + ("" if norm["has_weight"] else " (no weight)")
        + (" (multiplies by 1 + w)" if norm["plus_one"] else ""),
        f"  LM head: {'tied to the embedding' if head['tied'] else 'its own weights'}"
        + (f"; {', '.join(quirks)}" if quirks else ""),
        *([DETECTED_NOTE] if info["detected"] else []),
        f"  on {'a device map' if is_device_map(info['device']) else info['device']} as {info['dtype']}: the model {mib(mem['model_bytes'])} "
        f"({mem['parameters']:,} parameters); beyond it, decode {mib(mem['stages_bytes']['decode'])}, "
        f"examples {mib(mem['stages_bytes']['examples'])}, probes {mib(mem['stages_bytes']['probes'])} "
        "(estimates from the shapes)",
        _fit_line(info),
    ]
    return "\n".join(lines)


def _fit_line(info: dict[str, Any]) -> str:
    fit = info["fits"]
    where = ("the device map: " if is_device_map(info["device"]) else "") + ", ".join(
        f"{place} {format_bytes(free)}" for place, free in fit["free_bytes"].items())
    if fit["fits"]:
        return f"  fits: the weights take {format_bytes(fit['needed_bytes'])}; free: {where}"
    todo = "--max-memory caps, a smaller --dtype" if is_device_map(info["device"]) else \
        "--device-map auto, a smaller --dtype or another --device"
    return (f"  does not fit: the weights take {format_bytes(fit['needed_bytes'])}, and only {where} is free "
            f"(needle index would refuse it; try {todo})")
