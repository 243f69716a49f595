"""Per-family access to a causal LM's MLP neurons: their weights, the unembedding, read and clamp.

Neuron i of layer L is input feature i of that layer's MLP output projection: its activation
is what the output projection multiplies by column i. It is read with a forward-pre-hook on
the output projection and clamped by replacing that feature in the same hook. Its input
weights are the row that produces it (a column of GPT-2's Conv1D, the up_proj row for a
gated MLP, as in Davies et al.).

One `Family` per supported `config.model_type` says where each family keeps these modules;
`adapter_for(model)` binds one to a loaded model. A causal LM outside the registry gets a Family
that `detect_family` finds in its module tree (marked `detected`).

Beyond the neurons, each layer L has four *sites* (SITES) that can be read and replaced, named as
in sparse-autoencoder work (TransformerLens's hook names in brackets):

- "mlp": the neuron activations above, [batch, seq, d_mlp] (blocks.L.mlp.hook_post);
- "mlp_out": what the MLP adds to the residual stream, [batch, seq, d_model] (blocks.L.hook_mlp_out):
  the out projection's output, or for a family that normalises the MLP output before the
  residual add (Gemma-2/3's post_feedforward_layernorm) that norm's output, as TransformerLens
  puts its ln2_post before hook_mlp_out;
- "resid_pre": the residual stream entering block L, [batch, seq, d_model] (blocks.L.hook_resid_pre);
- "resid_post": the residual stream leaving block L, before any final norm, [batch, seq, d_model]
  (blocks.L.hook_resid_post).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from app.bases import SITES
from app.errors import NeedleError, NotFound
from workers.devices import compute_device, parameter
from workers.experts import ExpertActs, expert_acts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

InputKind = Literal["conv1d", "linear", "gated", "fused_gate_up", "experts"]

# The config fields that size a model. transformers fills one that config.json lacks from its
# default model of the family (a Llama without them has 7 billion parameters).
SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
SIZES_MLP_4X = ("hidden_size", "num_hidden_layers", "vocab_size")  # the MLP width defaults to 4 * hidden_size


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its MLP, final norm and unembedding.

    Paths are dotted attribute paths: `layers` from the CausalLM to the list of blocks,
    `mlp_in` / `mlp_gate` / `mlp_out` / `mlp_post_norm` from a block, `final_norm` / `project_out`
    from the CausalLM.
    """

    name: str
    layers: str
    mlp_in: str
    mlp_out: str
    kind: InputKind
    final_norm: str | None
    mlp_gate: str | None = None
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w)
    softcap: bool = False  # Gemma-2/3: logits = c * tanh(logits / c), c = final_logit_softcapping
    project_out: str | None = None  # OPT-350m: hidden -> word_embed_proj_dim before lm_head
    flattens_tokens: bool = False  # OPT runs its MLP on [batch * seq, d]
    sizes: tuple[str, ...] = SIZES  # the config fields a model of the family must give (missing_sizes)
    mlp_post_norm: str | None = None  # Gemma-2/3 normalise the MLP output before the residual add
    # GPT-BigCode reshapes its last hidden state to the input's batch, BLOOM builds its ALiBi bias
    # for it: a sweep's rows cannot share one row's blocks before the clamp there (clamp.sweep_many
    # runs them as a plain batch)
    fixed_batch: bool = False
    # the LM head's own temperature, a config field: Granite divides the logits by logits_scaling,
    # Cohere multiplies them by logit_scale
    logit_scale: str | None = None
    logit_scale_divides: bool = False
    # a mixture of experts (kind "experts"): mlp_in, mlp_gate and mlp_out all name the experts
    # module (every expert's gate_up_proj [E, 2F, d_model] and down_proj [E, d_model, F]), and
    # this the block whose output is what the MLP adds to the residual stream (router included)
    moe_block: str | None = None
    # found by detect_family from the module tree of a model outside the registry (name: its model_type)
    detected: bool = False


def _gated(name: str, **extra: Any) -> Family:
    """A Llama-style block: model.layers.L.mlp's up_proj, gate_proj and down_proj (what `extra` does not change)."""
    where = {"layers": "model.layers", "mlp_in": "mlp.up_proj", "mlp_gate": "mlp.gate_proj", "mlp_out": "mlp.down_proj",
             "kind": "gated", "final_norm": "model.norm"}
    return Family(name, **{**where, **extra})


def _experts(name: str) -> Family:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: a router picks top-k of E experts per token, each
    a SwiGLU MLP of width F, stored fused as transformers 5 keeps them."""
    return _gated(
        name,
        mlp_in="mlp.experts",
        mlp_gate="mlp.experts",
        mlp_out="mlp.experts",
        kind="experts",
        moe_block="mlp",
        flattens_tokens=True,  # the experts run on [batch * seq, d]
        fixed_batch=True,  # the MoE block views its input flat: a sweep's rows cannot be an expanded view
        sizes=("hidden_size", "num_hidden_layers", "vocab_size"),
    )


def _families() -> dict[str, Family]:
    from transformers import CONFIG_MAPPING

    families = [
        Family("gpt2", "transformer.h", "mlp.c_fc", "mlp.c_proj", "conv1d", "transformer.ln_f", sizes=SIZES_MLP_4X),
        Family(
            "gpt_neox",
            "gpt_neox.layers",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
            "linear",
            "gpt_neox.final_layer_norm",
        ),
        _gated("llama"),
        _gated("mistral"),
        _gated("qwen2"),
        _gated("qwen3"),
        _gated("gemma", norm_plus_one=True),
        _gated("gemma2", norm_plus_one=True, softcap=True, mlp_post_norm="post_feedforward_layernorm"),
        _gated("gemma3_text", norm_plus_one=True, softcap=True, mlp_post_norm="post_feedforward_layernorm"),
        _gated("olmo"),  # its norms are LayerNorms without weights: no final norm scale to apply
        _gated("olmo2", mlp_post_norm="post_feedforward_layernorm"),
        _gated("stablelm"),
        _gated("smollm3"),
        _gated("granite", logit_scale="logits_scaling", logit_scale_divides=True),
        # Cohere: LayerNorms without bias, attention and MLP side by side, logits times logit_scale
        _gated("cohere", logit_scale="logit_scale"),
        Family(
            "opt",
            "model.decoder.layers",
            "fc1",
            "fc2",
            "linear",
            "model.decoder.final_layer_norm",
            project_out="model.decoder.project_out",
            flattens_tokens=True,
            sizes=("hidden_size", "num_hidden_layers", "ffn_dim", "vocab_size"),
        ),
        Family("gptj", "transformer.h", "mlp.fc_in", "mlp.fc_out", "linear", "transformer.ln_f", sizes=SIZES_MLP_4X),
        # GPT-Neo (the TinyStories models), Phi-1/1.5/2, StarCoder(2), Falcon, BLOOM: one input
        # projection, an activation, one output projection, all Linear
        Family("gpt_neo", "transformer.h", "mlp.c_fc", "mlp.c_proj", "linear", "transformer.ln_f", sizes=SIZES_MLP_4X),
        Family("phi", "model.layers", "mlp.fc1", "mlp.fc2", "linear", "model.final_layernorm"),
        Family("gpt_bigcode", "transformer.h", "mlp.c_fc", "mlp.c_proj", "linear", "transformer.ln_f", sizes=SIZES_MLP_4X,
               fixed_batch=True),
        Family("starcoder2", "model.layers", "mlp.c_fc", "mlp.c_proj", "linear", "model.norm"),
        Family("falcon", "transformer.h", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "linear", "transformer.ln_f",
               sizes=SIZES_MLP_4X),
        Family("bloom", "transformer.h", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "linear", "transformer.ln_f",
               sizes=SIZES_MLP_4X, fixed_batch=True),
        _experts("mixtral"),
        _experts("qwen2_moe"),  # its shared expert's neurons are not units (README)
        _experts("qwen3_moe"),
        _experts("olmoe"),
        Family(
            "phi3",
            "model.layers",
            "mlp.gate_up_proj",
            "mlp.down_proj",
            "fused_gate_up",
            "model.norm",
            mlp_gate="mlp.gate_up_proj",
        ),
    ]
    return {f.name: f for f in families if f.name in CONFIG_MAPPING}


FAMILIES: dict[str, Family] = _families()


def supported_model_types() -> list[str]:
    """The config.model_type values Needle can read neurons of, sorted."""
    return sorted(FAMILIES)


def family_for_config(config: Any) -> Family:
    """The Family of a transformers config (or a config.json dict); NeedleError if unsupported."""
    family = registry_family(config)
    if family is not None:
        return family
    raise unsupported(config)


def registry_family(config: Any) -> Family | None:
    """The registry's Family of a transformers config (or a config.json dict), or None."""
    model_type = config_field(config, "model_type")
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def config_field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def unsupported(config: Any, why: str = "") -> NeedleError:
    model_type, architectures = config_field(config, "model_type"), config_field(config, "architectures")
    what = f"model_type {model_type!r}" if model_type else "a config without model_type"
    if architectures:
        what += f" ({', '.join(map(str, architectures))})"
    return NeedleError(
        f"unsupported architecture: {what}{why}; Needle supports the model types {', '.join(supported_model_types())}, "
        "and detects the MLP of other causal LMs transformers builds"
    )


def missing_sizes(family: Family, config: Mapping) -> list[str]:
    """The size fields of `family` that a config.json (as a dict) does not give as a whole number,
    each named as the family's config.json names it (GPT-2's n_embd for hidden_size)."""
    return sizes_missing(family.name, family.sizes, config)


def sizes_missing(model_type: str, sizes: tuple[str, ...], config: Mapping) -> list[str]:
    from transformers import CONFIG_MAPPING

    aliases = CONFIG_MAPPING[model_type].attribute_map
    missing = []
    for field in sizes:
        name = aliases.get(field, field)
        value = config.get(name, config.get(field))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            missing.append(name)
    return missing


def lookup_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def as_index(value: Any) -> int | None:
    """An int from an int-like (numpy and 0-d torch integers too); None for anything else, bools included."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def adapter_for(model: PreTrainedModel) -> Adapter:
    """An Adapter for a loaded Hugging Face causal LM: its registry family, or for a model_type outside
    the registry the family detect_family finds. NeedleError if it is not a causal LM or its MLP is missing."""
    from workers.detect import detect_family  # (detection builds on this module's Family)

    return Adapter(model, registry_family(model.config) or detect_family(model))


class Adapter:
    """Neuron access for one loaded model. Weights come back as detached views on the model's device and dtype."""

    def __init__(self, model: PreTrainedModel, spec: Family):
        self.model = model
        self.spec = spec
        self.device: torch.device = compute_device(model)  # where the weights it reads are combined
        self.family: str = spec.name
        # a gated MLP (act(gate) * up): its neurons are as often negative as positive
        self.gated: bool = spec.kind in ("gated", "fused_gate_up", "experts")
        blocks = lookup_path(model, spec.layers)
        if not isinstance(blocks, (nn.ModuleList, list, tuple)) or len(blocks) == 0:
            raise NeedleError(
                f"model has no MLP layers at {spec.layers} as the {spec.name} family keeps them; "
                "pass a causal LM (…ForCausalLM) of that family"
            )
        self._blocks = list(blocks)
        self._in: list[nn.Module] = []
        self._gate: list[nn.Module] = []
        self._out: list[nn.Module] = []
        for index, block in enumerate(self._blocks):
            for path in (spec.mlp_in, spec.mlp_gate, spec.mlp_out, spec.mlp_post_norm):
                if path is not None and lookup_path(block, path) is None:
                    if spec.kind == "experts":
                        raise NeedleError(
                            f"layer {index} of this {spec.name} model has no experts ({spec.layers}.{index}.{path}): "
                            "its MLP is dense; Needle reads mixture-of-experts models whose every layer routes to "
                            "experts (set decoder_sparse_step 1 and no mlp_only_layers)"
                        )
                    raise NeedleError(
                        f"model has no MLP module {spec.layers}.{index}.{path}, which the {spec.name} family "
                        "must have; the checkpoint does not match its config"
                    )
            self._in.append(lookup_path(block, spec.mlp_in))
            if spec.mlp_gate is not None and spec.mlp_gate != spec.mlp_in:
                self._gate.append(lookup_path(block, spec.mlp_gate))
            self._out.append(lookup_path(block, spec.mlp_out))
        # a mixture of experts: E experts of F neurons each per layer, neuron e * F + i being
        # neuron i of expert e; their activations pass through each layer's ExpertActs
        self.n_experts: int | None = None
        self.d_expert: int | None = None
        self.experts_per_token: int | None = None
        self._experts: list[nn.Module] = []
        if spec.kind == "experts":
            self._experts = self._out
            self._out = [expert_acts(m, f"{spec.layers}.{i}.{spec.mlp_out}") for i, m in enumerate(self._experts)]
            first: Any = self._experts[0]
            self.n_experts, self.d_expert = int(first.num_experts), int(first.intermediate_dim)
            top_k = getattr(model.config, "num_experts_per_tok", None)
            self.experts_per_token = int(top_k) if isinstance(top_k, int) else None
        # the module whose output is the "mlp_out" site
        site_out = spec.mlp_post_norm or spec.moe_block
        self._mlp_out: list[nn.Module] = [
            lookup_path(block, site_out) if site_out else out for block, out in zip(self._blocks, self._out, strict=True)
        ]
        self.n_layers: int = len(self._blocks)
        w_out = self.output_weights(0)
        self.d_mlp: int = int(w_out.shape[0])
        self.d_model: int = int(w_out.shape[1])
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise NeedleError(
                "model has no LM head (get_output_embeddings() is None); pass a causal LM, not a base model"
            )
        self._head = head
        self._project_out = lookup_path(model, spec.project_out) if spec.project_out else None
        self._unembedding: torch.Tensor | None = None
        self.vocab_size: int = int(self.unembedding().shape[0])
        cap = getattr(model.config, "final_logit_softcapping", None) if spec.softcap else None
        self.logit_softcap: float | None = float(cap) if cap else None
        scale = getattr(model.config, spec.logit_scale, None) if spec.logit_scale else None
        # what the head's logits are multiplied by (None: 1)
        self.logit_scale: float | None = (1.0 / float(scale) if spec.logit_scale_divides else float(scale)) if scale else None

    def __repr__(self) -> str:
        return (
            f"Adapter({self.family}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_mlp={self.d_mlp}, vocab_size={self.vocab_size})"
        )

    # ---- weights ---------------------------------------------------------------------------

    def _weight(self, module: nn.Module, name: str = "weight") -> torch.Tensor | None:
        """A module's weight on the adapter's device (from accelerate's offload store when offloaded)."""
        weight = parameter(module, name)
        return None if weight is None else weight.to(self.device)

    def _layer(self, layer: int) -> int:
        index = as_index(layer)
        if index is None or not 0 <= index < len(self._blocks):
            raise NotFound(f"no layer {layer}: the model has layers 0 to {len(self._blocks) - 1}")
        return index

    def _neuron(self, neuron: int) -> int:
        index = as_index(neuron)
        if index is None or not 0 <= index < self.d_mlp:
            raise NotFound(f"no neuron {neuron}: each layer has neurons 0 to {self.d_mlp - 1}")
        return index

    def _neurons(self, neurons: torch.Tensor) -> None:
        """NotFound for the first neuron index of a tensor that is out of range."""
        bad = neurons[(neurons < 0) | (neurons >= self.d_mlp)]
        if bad.numel():
            self._neuron(int(bad[0]))

    def input_weights(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: row i is the input weight vector of neuron i (the up_proj row for gated MLPs)."""
        if self._experts:  # each expert's up half of gate_up_proj [E, 2F, d], experts one after another
            fused = cast(torch.Tensor, self._weight(self._experts[self._layer(layer)], "gate_up_proj"))
            return fused[:, fused.shape[1] // 2 :].reshape(-1, fused.shape[2])
        weight = cast(torch.Tensor, self._weight(self._in[self._layer(layer)]))
        if self.spec.kind == "conv1d":  # Conv1D stores [in, out]
            return weight.T
        if self.spec.kind == "fused_gate_up":  # [gate; up] stacked on the output axis
            return weight[weight.shape[0] // 2 :]
        return weight

    def output_weights(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: row i is the direction neuron i writes to the residual stream."""
        if self._experts:  # down_proj [E, d, F] -> [E * F, d]
            down = cast(torch.Tensor, self._weight(self._experts[self._layer(layer)], "down_proj"))
            return down.transpose(1, 2).reshape(-1, down.shape[1])
        weight = cast(torch.Tensor, self._weight(self._out[self._layer(layer)]))
        return weight if self.spec.kind == "conv1d" else weight.T

    def out_projection(self, layer: int) -> nn.Module:
        """The module whose forward input is the neuron activations [..., d_mlp]."""
        return self._out[self._layer(layer)]

    def unembedding(self) -> torch.Tensor:
        """[V, d_model]: the LM head (composed with OPT's project_out), one row per token id."""
        if self._unembedding is None:
            weight = cast(torch.Tensor, self._weight(self._head))
            if self._project_out is not None:
                with torch.no_grad():
                    weight = weight @ cast(torch.Tensor, self._weight(self._project_out))
            self._unembedding = weight
        return self._unembedding

    def head_bias(self) -> torch.Tensor | None:
        """[V]: the LM head's bias (GPT-J), or None."""
        return self._weight(self._head, "bias")

    def final_norm_scale(self) -> torch.Tensor | None:
        """[d_model]: the final norm's multiplicative weight ((1 + w) for Gemma), or None if there is none."""
        norm = lookup_path(self.model, self.spec.final_norm) if self.spec.final_norm else None
        weight = self._weight(norm) if norm is not None else None
        if weight is None:
            return None
        if self.spec.norm_plus_one:
            return (1.0 + weight.float()).to(weight.dtype)
        return weight

    def read_modules(self) -> dict[str, list[nn.Module]]:
        """The modules whose weights the adapter reads, {"mlp": [...], "head": [...]}: a checkpoint must have them."""
        head = [self._head] + ([self._project_out] if self._project_out is not None else [])
        return {"mlp": self._experts or [*self._in, *self._gate, *self._out], "head": head}

    def routed(self, layer: int) -> torch.Tensor | None:
        """A mixture of experts: which experts the latest forward pass routed each token to at
        `layer`, [batch * seq, E] bool (None before any pass, and for a dense MLP)."""
        return cast(ExpertActs, self._out[self._layer(layer)]).routed if self._experts else None

    def expert_of(self, neuron: int) -> tuple[int, int] | None:
        """(expert, index within it) of a mixture of experts' neuron; None for a dense MLP."""
        return None if self.d_expert is None else divmod(self._neuron(neuron), self.d_expert)

    # ---- hooks -----------------------------------------------------------------------------

    def _token_shape(self, layer: int, handles: list) -> Callable[[torch.Tensor], torch.Tensor]:
        """For a family that runs its MLP on flattened tokens [batch * seq, d] (OPT): a pre-hook on the
        block (added to handles) notes [batch, seq], and the function returned gives a tensor of the
        block's MLP back that shape [batch, seq, d]; for the others it returns its input."""
        lead: dict[str, torch.Size] = {}
        if self.spec.flattens_tokens:

            def note_shape(module, args, kwargs):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if hidden is not None:
                    lead["shape"] = hidden.shape[:-1]

            handles.append(self._blocks[layer].register_forward_pre_hook(note_shape, with_kwargs=True))

        def as_tokens(x: torch.Tensor) -> torch.Tensor:
            shape = lead.get("shape")
            if x.dim() == 2 and shape is not None and shape.numel() == x.shape[0]:
                return x.reshape(*shape, x.shape[-1])
            return x

        return as_tokens

    @contextlib.contextmanager
    def _neuron_hook(
        self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None], *, prepend: bool = False
    ) -> Iterator[None]:
        """Call fn(acts [batch, seq, d_mlp]) in a pre-hook on the out projection; a returned tensor replaces them."""
        handles: list = []
        as_tokens = self._token_shape(layer, handles)

        def pre_hook(module, args):
            acts = args[0]
            replaced = fn(as_tokens(acts))
            if replaced is None:
                return None
            return (replaced.reshape(acts.shape), *args[1:])

        handles.append(self._out[layer].register_forward_pre_hook(pre_hook, prepend=prepend))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def read_activations(self, layers: int | Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Yield a dict layer -> activations [batch, seq, d_mlp] of the latest forward pass (detached copies).

        Clamps are applied before reads, so a read sees what the output projection multiplies.
        """
        wanted = [layers] if isinstance(layers, int) else list(layers)
        captured: dict[int, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            for layer in dict.fromkeys(self._layer(layer) for layer in wanted):

                def capture(acts: torch.Tensor, layer: int = layer) -> None:
                    captured[layer] = acts.detach().clone()

                stack.enter_context(self._neuron_hook(layer, capture))
            yield captured

    @contextlib.contextmanager
    def on_activations(self, layers: Iterable[int], fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
        """Call fn(layer, acts [batch, seq, d_mlp]) as each layer's activations are produced, with no copy:
        a streaming reader keeps no layer longer than it needs."""
        with contextlib.ExitStack() as stack:
            for layer in dict.fromkeys(self._layer(layer) for layer in layers):

                def call(acts: torch.Tensor, layer: int = layer) -> None:
                    fn(layer, acts)

                stack.enter_context(self._neuron_hook(layer, call))
            yield

    @contextlib.contextmanager
    def clamp(self, layer: int, neuron: int, values: float | torch.Tensor) -> Iterator[None]:
        """Replace neuron's activation by `values` (broadcastable over [batch, seq]) while inside."""
        layer, neuron = self._layer(layer), self._neuron(neuron)

        def replace(acts: torch.Tensor) -> torch.Tensor:
            value = torch.as_tensor(values, dtype=acts.dtype, device=acts.device)
            out = acts.clone()
            out[..., neuron] = torch.broadcast_to(value, acts.shape[:-1])
            return out

        with self._neuron_hook(layer, replace, prepend=True):
            yield

    @contextlib.contextmanager
    def clamp_rows(self, layer: int, rows: torch.Tensor, neurons: torch.Tensor, values: torch.Tensor,
                   positions: Callable[[int], slice] | slice = slice(None)) -> Iterator[None]:
        """Per batch row, replace one neuron's activation: row rows[j] gets neuron neurons[j] set to
        values[j] at `positions` (a slice of the sequence, or a function of the sequence length
        giving one, so a cached generation step can differ from the prompt's pass). One hook for
        many clamps: a sweep puts one clamp value, or one neuron, in each row."""
        layer = self._layer(layer)
        self._neurons(neurons)

        def replace(acts: torch.Tensor) -> torch.Tensor:
            where = positions(acts.shape[1]) if callable(positions) else positions
            pos = torch.arange(acts.shape[1], device=acts.device)[where]
            out = acts.clone()
            r, n = rows.to(acts.device), neurons.to(acts.device)
            v = values.to(device=acts.device, dtype=acts.dtype)
            out[r[:, None], pos[None, :], n[:, None]] = v[:, None].expand(len(r), len(pos))
            return out

        with self._neuron_hook(layer, replace, prepend=True):
            yield

    @contextlib.contextmanager
    def expand_batch(self, layer: int, size: int) -> Iterator[None]:
        """Run the blocks before `layer` once and give block `layer` `size` copies of their output:
        the rows of a sweep share everything before their first clamp, so that part is computed for
        one row. (The masks and position embeddings made for one row broadcast over the copies.)"""
        layer = self._layer(layer)

        def pre_hook(module, args, kwargs):
            if args:
                hidden = args[0]
                return (hidden.expand(size, *hidden.shape[1:]), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden.expand(size, *hidden.shape[1:])}

        handle = self._blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def clamp_rows_shared(self, layer: int, neurons: torch.Tensor, values: torch.Tensor,
                          positions: slice = slice(None)) -> Iterator[dict]:
        """A sweep on one shared row: the forward pass enters `layer` with batch 1 (the blocks
        before it see no clamp), and the MLP output projection's output comes back as one row
        per clamp: row j is the unclamped output plus (values[j] - a) * w_out[neurons[j]] at
        `positions`, a being the neuron's own activation there. The projection is linear, so
        that is exactly what clamping its input would give, without running the layer once per
        row; the residual add broadcasts the rest of the batch-1 block over the rows. Yields a
        dict that holds the shared activations [1, seq, d_mlp] as "acts" after the pass."""
        layer = self._layer(layer)
        self._neurons(neurons)
        if self.spec.flattens_tokens:
            raise NeedleError(f"the {self.family} family runs its MLP on flattened tokens: use clamp_rows")
        seen: dict[str, torch.Tensor] = {}
        module = self._out[layer]

        def read(module, args):
            seen["acts"] = args[0]

        def widen(module, args, output):
            acts = seen["acts"]  # [1, T, d_mlp]
            n = neurons.to(acts.device)
            pos = torch.arange(acts.shape[1], device=acts.device)[positions]
            own = acts[0][:, n].T.float()  # [rows, T]: the neuron's activation at each position
            coef = torch.zeros_like(own)
            coef[:, pos] = values.to(device=acts.device, dtype=torch.float32)[:, None] - own[:, pos]
            w_out = self.output_weights(layer)
            w = w_out[n.to(w_out.device)].to(output.device).float()  # [rows, d_model]
            return (output.float() + coef[:, :, None] * w[:, None, :]).to(output.dtype)

        handles = [module.register_forward_pre_hook(read, prepend=True), module.register_forward_hook(widen)]
        try:
            yield seen
        finally:
            for handle in handles:
                handle.remove()

    # ---- sites -----------------------------------------------------------------------------

    def _site(self, site: str) -> str:
        if not isinstance(site, str) or site not in SITES:
            raise NeedleError(f"unknown site {site!r}: a site is one of {', '.join(SITES)}")
        return site

    def _layer_sites(self, layer_sites: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
        """The distinct (layer, site) pairs of `layer_sites`, checked, in order."""
        pairs = []
        for entry in layer_sites:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise NeedleError(f"{entry!r} is not a (layer, site) pair; pass pairs such as (0, 'resid_post')")
            pairs.append((self._layer(entry[0]), self._site(entry[1])))
        return list(dict.fromkeys(pairs))

    def site_width(self, site: str) -> int:
        """The width of a site's activations: d_mlp for "mlp", d_model for the others."""
        return self.d_mlp if self._site(site) == "mlp" else self.d_model

    @contextlib.contextmanager
    def site_hook(
        self, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None], *, prepend: bool = False
    ) -> Iterator[None]:
        """Call fn(acts [batch, seq, site_width(site)]) as the forward pass produces the site of `layer`;
        a returned tensor (cast to the site's dtype) replaces it. Replacements go in with prepend=True,
        so the readers of the same site see the replaced value."""
        layer, site = self._layer(layer), self._site(site)

        def call(acts: torch.Tensor) -> torch.Tensor | None:
            replaced = fn(acts)
            return None if replaced is None else replaced.to(device=acts.device, dtype=acts.dtype)

        if site == "mlp":
            with self._neuron_hook(layer, call, prepend=prepend):
                yield
            return
        block = self._blocks[layer]
        handles = []
        if site == "resid_pre":

            def pre_hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                replaced = call(hidden)
                if replaced is None:
                    return None
                if args:
                    return (replaced, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": replaced}

            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend))
        elif site == "resid_post":

            def post_hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                replaced = call(hidden)
                if replaced is None:
                    return None
                return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

            handles.append(block.register_forward_hook(post_hook, prepend=prepend))
        else:  # mlp_out
            as_tokens = self._token_shape(layer, handles)

            def out_hook(module, args, output):
                replaced = call(as_tokens(output))
                return None if replaced is None else replaced.reshape(output.shape)

            handles.append(self._mlp_out[layer].register_forward_hook(out_hook, prepend=prepend))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def read_sites(self, layer_sites: Iterable[tuple[int, str]]) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
        """Yield a dict (layer, site) -> activations [batch, seq, width] of the latest forward pass
        (detached copies). Replacements made with site_hook(prepend=True) are seen by these reads."""
        captured: dict[tuple[int, str], torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            for key in self._layer_sites(layer_sites):

                def capture(acts: torch.Tensor, key: tuple[int, str] = key) -> None:
                    captured[key] = acts.detach().clone()

                stack.enter_context(self.site_hook(*key, capture))
            yield captured

    @contextlib.contextmanager
    def on_sites(
        self, layer_sites: Iterable[tuple[int, str]], fn: Callable[[int, str, torch.Tensor], None]
    ) -> Iterator[None]:
        """Call fn(layer, site, acts [batch, seq, width]) as each site's activations are produced, with no copy."""
        with contextlib.ExitStack() as stack:
            for layer, site in self._layer_sites(layer_sites):

                def call(acts: torch.Tensor, layer: int = layer, site: str = site) -> None:
                    fn(layer, site, acts)

                stack.enter_context(self.site_hook(layer, site, call))
            yield
