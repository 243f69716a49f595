"""Detection of a causal LM outside the registry from its module tree (`detect_family`): its blocks,
its MLP's projections (or its experts), its final norm and its head's quirks, checked as the
registry's families are; `adapter_for` falls back to it for a model_type the registry lacks."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.errors import NeedleError
from workers.adapters import (
    SIZES_MLP_4X,
    Family,
    InputKind,
    as_index,
    config_field,
    lookup_path,
    sizes_missing,
    unsupported,
)
from workers.experts import fused_experts

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def detection_missing_sizes(config: Mapping) -> list[str]:
    """missing_sizes for a config.json (a dict) of a model to detect: the sizes every family gives
    (hidden_size, num_hidden_layers, vocab_size); detect_family reads the MLP's width from the model."""
    return sizes_missing(detectable_model_type(config), SIZES_MLP_4X, config)


# ---- detection: a causal LM outside the registry ----------------------------------------------

# the config fields that may give the MLP's width: a hint that picks the MLP among candidates
_MLP_WIDTHS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
# a norm that multiplies by (1 + w), as its forward's code says: Gemma's "(1.0 + self.weight", Nemotron's
# "self.weight + 1.0"
_PLUS_ONE = re.compile(r"\(\s*1(?:\.0*)?\s*\+\s*self\.weight\b|\bself\.weight\s*\+\s*1(?:\.0*)?(?![\w.])")


def detectable_model_type(config: Any) -> str:
    """The model_type of a config (or config.json dict) that detect_family may read: one transformers
    builds as a causal decoder LM. NeedleError saying what it is otherwise (unknown to transformers,
    an encoder-decoder, an encoder)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config_field(config, "model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise unsupported(config, ", which transformers does not know" if model_type else "")
    if config_field(config, "is_encoder_decoder"):
        raise unsupported(config, ", an encoder-decoder model: Needle reads causal (decoder-only) language models")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise unsupported(config, ", which transformers has no causal LM (AutoModelForCausalLM) class for: "
                           "Needle reads causal (decoder-only) language models")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config_field(config, "is_decoder"):
        raise unsupported(config, ", an encoder (a masked LM): Needle reads causal (decoder-only) language models")
    return model_type


def detect_family(model: PreTrainedModel) -> Family:
    """The Family of a causal LM outside the registry, found in its module tree (only shapes are read:
    a model on the meta device will do). The blocks are the nn.ModuleList of config.num_hidden_layers
    identical modules; the MLP, in block 0, an out projection (nn.Linear or Conv1D) mapping d_mlp ->
    d_model beside its input projection(s) mapping d_model -> d_mlp: one (linear, conv1d), two of which
    one is named gate (gated), or one of 2 x d_mlp named gate first (fused_gate_up); the final norm, the
    last norm outside the blocks before the LM head; d_model, the LM head's width (or, through OPT's
    project_out, hidden_size). Every block must have the same parts with the same shapes. NeedleError
    naming the part that was not found. adapter_for binds it as it binds a registry family."""
    model_type = detectable_model_type(model.config)
    try:
        return _detect(model, model_type)
    except NeedleError as exc:
        raise NeedleError(
            f"could not detect the MLP of model_type {model_type!r} (it is not in Needle's registry): {exc.message}",
            hint="Needle reads causal LMs whose blocks hold an MLP: an out projection (nn.Linear or Conv1D) mapping "
            "d_mlp -> d_model beside the input projection(s) mapping d_model -> d_mlp.",
        ) from None


def _detect(model: PreTrainedModel, model_type: str) -> Family:
    config = model.config
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    if head is None or head_weight is None:
        raise NeedleError(
            "model has no LM head (get_output_embeddings() is None); pass a causal LM, not a base model"
        )
    layers, blocks = _detect_blocks(model)
    d_model, project_out = _detect_width(model, layers, int(head_weight.shape[1]))
    kind, mlp_in, mlp_gate, mlp_out = _detect_mlp(blocks[0], f"{layers}.0", d_model, config)
    post_norm = next((name for name, module in blocks[0].named_modules() if _post_mlp_norm(name, module, d_model)),
                     None)
    _check_same_parts(blocks, layers, [mlp_in, mlp_gate, mlp_out, post_norm])
    final_norm = _detect_final_norm(model, layers, head, d_model)
    scale = next((name for name in ("logits_scaling", "logit_scale") if _positive(getattr(config, name, None))), None)
    return Family(
        model_type,
        layers=layers,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        kind=kind,
        final_norm=final_norm,
        mlp_gate=mlp_gate,
        norm_plus_one=final_norm is not None and _adds_one(model.get_submodule(final_norm)),
        softcap=_positive(getattr(config, "final_logit_softcapping", None)),
        project_out=project_out,
        # whether the blocks run their MLP on flattened tokens, or share one row's blocks over a
        # sweep's batch, cannot be read from the shapes: the ways that hold for every family
        # (reshape what comes flat; run a sweep's rows as a plain batch)
        flattens_tokens=True,
        fixed_batch=True,
        moe_block=mlp_out.rpartition(".")[0] if kind == "experts" else None,
        sizes=SIZES_MLP_4X,  # the MLP's width is read from the model
        mlp_post_norm=post_norm,
        logit_scale=scale,
        logit_scale_divides=scale == "logits_scaling",  # Granite divides, Cohere multiplies
        detected=True,
    )


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _maps(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of an nn.Linear or a transformers Conv1D (which stores [in, out]); None for others."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _detect_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the blocks: the nn.ModuleList of config.num_hidden_layers modules of one class
    (the outermost, the one with the most parameters if several)."""
    n = as_index(getattr(model.config, "num_hidden_layers", None))
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1]
    if n is not None:
        lists = [(name, module) for name, module in lists if len(module) == n]
    elif lists:
        longest = max(len(module) for _, module in lists)
        lists = [(name, module) for name, module in lists if len(module) == longest]
    lists = [(name, module) for name, module in lists if not any(_inside(name, other) for other, _ in lists
                                                                  if other != name)]
    if not lists:
        what = f"{n} blocks" if n is not None else "blocks"
        raise NeedleError(
            f"found no list of {what} in the model (an nn.ModuleList of config.num_hidden_layers modules of one "
            "class): Needle cannot tell where its layers are; it reads causal LMs built of repeated blocks"
        )
    return max(lists, key=lambda entry: sum(p.numel() for p in entry[1].parameters()))


def _detect_width(model: nn.Module, layers: str, d_head: int) -> tuple[int, str | None]:
    """(d_model, the path of a projection from it to the LM head's width, or None)."""
    hidden = as_index(getattr(model.config, "hidden_size", None))
    if hidden is None or hidden == d_head:
        return d_head, None
    projections = [name for name, module in model.named_modules()
                   if not _inside(name, layers) and _maps(module) == (hidden, d_head)]
    if not projections:
        raise NeedleError(
            f"the LM head reads {d_head} features but hidden_size is {hidden}, and the model has no module "
            f"mapping {hidden} -> {d_head} outside its blocks (a projection to the head, as OPT's project_out)"
        )
    return hidden, projections[-1]


def _detect_mlp(block: nn.Module, where: str, d_model: int, config: Any) -> tuple[InputKind, str, str | None, str]:
    """(kind, mlp_in, mlp_gate, mlp_out) of one block, paths from the block."""
    fused = [name for name, module in block.named_modules() if fused_experts(module, d_model)]
    if len(fused) == 1:  # a mixture of experts in transformers' fused layout (the registry's MoE families')
        return "experts", fused[0], fused[0], fused[0]
    experts = [name for name, _ in block.named_modules() if "expert" in name.lower() or "router" in name.lower()]
    if experts:
        raise NeedleError(
            f"block {where} is a mixture of experts ({where}.{experts[0]}) whose experts are not kept as "
            "transformers keeps Mixtral's (gate_up_proj [E, 2F, d], down_proj [E, d, F], act(gate) * up): "
            "detection reads those and dense MLPs"
        )
    hint = next((w for w in (as_index(getattr(config, name, None)) for name in _MLP_WIDTHS) if w), None)
    candidates = []  # (out path, its parent's path, d_mlp, the parent's modules mapping d_model -> d_mlp or 2 d_mlp)
    for name, module in block.named_modules():
        shape = _maps(module)
        if shape is None or shape[1] != d_model or shape[0] == d_model:
            continue
        parent, _, _ = name.rpartition(".")
        width = shape[0]
        inputs = [(child, sizes[1]) for child, sibling in block.get_submodule(parent).named_children()
                  if isinstance(sibling, nn.Linear) == isinstance(module, nn.Linear) and (sizes := _maps(sibling)) in ((d_model, width), (d_model, 2 * width))]
        candidates.append((name, parent, width, inputs))
    if not candidates:
        raise NeedleError(
            f"block {where} has no module mapping {hint or 'd_mlp'} -> d_model {d_model} (the MLP's out projection, "
            "an nn.Linear or Conv1D): Needle cannot find its MLP"
        )
    paired = [c for c in candidates if c[3]]
    if not paired:
        name, _, width, _ = candidates[0]
        raise NeedleError(
            f"block {where}: {where}.{name} maps {width} -> d_model {d_model}, but no module beside it maps d_model "
            f"{d_model} -> {width} (the MLP's input projection): Needle cannot find its MLP"
        )

    def rank(candidate: tuple) -> tuple[bool, bool]:  # the config's MLP width, then not attention
        name = candidate[0].lower()
        return candidate[2] == hint, "attn" not in name and "attention" not in name

    best = [c for c in paired if rank(c) == max(map(rank, paired))]
    if len(best) > 1:
        raise NeedleError(
            f"block {where} has several modules that could be the MLP's out projection "
            f"({', '.join(where + '.' + c[0] for c in best)}): Needle cannot tell which"
        )
    out, parent, width, inputs = best[0]
    prefix = parent + "." if parent else ""
    conv1d = not isinstance(block.get_submodule(out), nn.Linear)
    plain = [child for child, size in inputs if size == width]
    fused = [child for child, size in inputs if size == 2 * width]
    parts = f"{where}.{parent or ''}".rstrip(".")
    if len(plain) == 1 and not fused:
        return ("conv1d" if conv1d else "linear"), prefix + plain[0], None, out
    if conv1d:
        raise NeedleError(f"block {where}: {parts} has Conv1D input projections Needle cannot tell apart "
                          f"({', '.join(plain + fused)})")
    if len(plain) == 2 and not fused:
        gates = [child for child in plain if "gate" in child.lower()]
        if len(gates) != 1:
            raise NeedleError(
                f"block {where}: {parts} has two modules mapping d_model {d_model} -> {width} ({', '.join(plain)}), "
                "a gated MLP whose gate cannot be told from its up projection (neither or both is named gate)"
            )
        up = next(child for child in plain if child != gates[0])
        return "gated", prefix + up, prefix + gates[0], out
    if len(fused) == 1 and not plain:
        name = fused[0].lower()
        if "gate" not in name or ("up" in name and name.index("up") < name.index("gate")):
            raise NeedleError(
                f"block {where}: {parts}.{fused[0]} maps d_model {d_model} -> 2 x {width}, a fused gate and up "
                "projection whose name does not say that the gate is its first half (as gate_up_proj does)"
            )
        return "fused_gate_up", prefix + fused[0], prefix + fused[0], out
    raise NeedleError(
        f"block {where}: {parts} has {len(inputs)} modules mapping d_model {d_model} -> {width} or {2 * width} "
        f"({', '.join(child for child, _ in inputs)}): Needle cannot tell the MLP's input projection"
    )
def _norm_like(module: nn.Module, d_model: int) -> bool:
    """A leaf module that is a norm: its class says so (OLMo's have no weight), or it holds one weight of [d_model]."""
    if next(module.children(), None) is not None or _maps(module) is not None or isinstance(module, nn.Embedding):
        return False
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape) == (d_model,)
    return "norm" in type(module).__name__.lower()


def _post_mlp_norm(name: str, module: nn.Module, d_model: int) -> bool:
    """Gemma-2's post_feedforward_layernorm, GLM-4's post_mlp_layernorm: a norm of the MLP's output, by name."""
    last = name.rpartition(".")[2].lower()
    return "post" in last and any(k in last for k in ("feedforward", "mlp", "ffn")) and _norm_like(module, d_model)


def _check_same_parts(blocks: nn.ModuleList, layers: str, paths: list[str | None]) -> None:
    """Every block has block 0's parts, of the same class and shape (one d_mlp for the whole model)."""
    def shape(module: nn.Module) -> tuple:
        weight = getattr(module, "weight", None)
        return type(module), tuple(weight.shape) if isinstance(weight, torch.Tensor) else None

    for path in filter(None, paths):
        first = shape(blocks[0].get_submodule(path))
        for index, block in enumerate(blocks):
            module = lookup_path(block, path)
            if not isinstance(module, nn.Module):
                raise NeedleError(f"block {layers}.{index} has no {path}, which block {layers}.0 has: "
                                  "detection reads models whose blocks have the same parts")
            if shape(module) != first:
                raise NeedleError(f"{layers}.{index}.{path} differs from {layers}.0.{path} in class or shape: "
                                  "detection reads models whose blocks have the same MLP")


def _detect_final_norm(model: nn.Module, layers: str, head: nn.Module, d_model: int) -> str | None:
    """The last norm outside the blocks before the LM head in module order (not an embedding's norm), or None."""
    found = None
    for name, module in model.named_modules():
        if module is head:
            break
        if not _inside(name, layers) and "emb" not in name.lower() and _norm_like(module, d_model):
            found = name
    return found


def _adds_one(norm: nn.Module) -> bool:
    """Whether a norm multiplies by (1 + w), as its forward's code says (Gemma's and Nemotron's norms do)."""
    try:
        source = inspect.getsource(type(norm).forward)
    except (OSError, TypeError):
        return False
    return _PLUS_ONE.search(source) is not None
