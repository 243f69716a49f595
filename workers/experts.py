"""Mixtures of experts as transformers 5 keeps them (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, and
the families detection finds in that layout): every expert's gate_up_proj [E, 2F, d_model] (gate
first) and down_proj [E, d_model, F] in one experts module, called with the router's top-k expert
indices and weights.

Needle runs such a module through its own forward (transformers' eager one), which passes every
routed token's neuron activations [tokens, E * F] through an ExpertActs module between the
experts' input and output projections: the Adapter reads and clamps them there with the same
hooks as a dense MLP's out projection.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from app.errors import NeedleError


class ExpertActs(nn.Module):
    """Where a mixture of experts' neuron activations pass, [tokens, E * F], expert by expert
    (neuron e * F + i is neuron i of expert e): Needle's forward of the experts module
    (`_experts_forward`) calls it between the experts' input and output projections, so the
    hooks that read and clamp a dense MLP's out projection read and clamp the experts the
    same way. A token's entries for an expert it was not routed to are 0 (the expert did not
    run on it); `routed` holds the latest pass's routing, [tokens, E] bool."""

    def __init__(self) -> None:
        super().__init__()
        self.routed: torch.Tensor | None = None

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return acts


def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts forward (Mixtral, Qwen-MoE, OLMoE), with every routed
    token's activations [tokens, E * F] passed through `self.needle_acts` (ExpertActs) before
    the down projections. Each expert's output is weighted by the router as there, so a
    replaced activation changes the output only on the tokens routed to its expert."""
    n_experts, width = int(self.num_experts), int(self.intermediate_dim)
    tokens = hidden_states.shape[0]
    valid = top_k_index < n_experts  # an index of E means "no expert" (expert parallelism)
    index = torch.where(valid, top_k_index, 0)
    weights = top_k_weights.new_zeros(tokens, n_experts).scatter_add_(1, index, torch.where(valid, top_k_weights, 0))
    routed = torch.zeros(tokens, n_experts, dtype=torch.int32, device=hidden_states.device)
    routed = routed.scatter_add_(1, index, valid.to(torch.int32)) > 0
    acts = hidden_states.new_zeros(tokens, n_experts, width)
    hit = [(e, routed[:, e].nonzero()[:, 0]) for e in routed.any(0).nonzero()[:, 0].tolist()]
    for e, token in hit:
        gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
        acts[token, e] = self.act_fn(gate) * up
    probe = self.needle_acts
    probe.routed = routed
    acts = probe(acts.view(tokens, n_experts * width)).view(tokens, n_experts, width)
    out = torch.zeros_like(hidden_states)
    for e, token in hit:
        down = nn.functional.linear(acts[token, e], self.down_proj[e]) * weights[token, e, None]
        out.index_add_(0, token, down.to(out.dtype))
    return out


def expert_acts(experts: nn.Module, where: str) -> ExpertActs:
    """The ExpertActs of an experts module, installed with Needle's forward on first use."""
    probe = getattr(experts, "needle_acts", None)
    if isinstance(probe, ExpertActs):
        return probe
    parts = (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None))
    if not all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in parts) or not hasattr(experts, "act_fn"):
        raise NeedleError(
            f"{where} is not a mixture of experts as Needle reads them (gate_up_proj [E, 2F, d] and down_proj "
            "[E, d, F]): a model whose layers mix dense and MoE MLPs, or stores its experts otherwise, is not supported"
        )
    probe = ExpertActs()
    experts.add_module("needle_acts", probe)
    if hasattr(experts, "_old_forward"):  # accelerate's hook wraps forward (a device map): its inner one
        experts._old_forward = _experts_forward.__get__(experts)
    else:
        experts.forward = _experts_forward.__get__(experts)
    return probe


def fused_experts(module: nn.Module, d_model: int) -> bool:
    """An experts module as transformers 5 keeps Mixtral's, which Needle's experts forward runs: every
    expert's gate_up_proj [E, 2F, d_model] (gate first) and down_proj [E, d_model, F], no bias, act(gate) * up,
    called with the router's top-k indices and weights."""
    from transformers.integrations import moe

    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == down.dim() == 3):
        return False
    n, width = getattr(module, "num_experts", None), getattr(module, "intermediate_dim", None)
    layout = (getattr(module, "has_gate", True), getattr(module, "has_bias", False), getattr(module, "is_transposed", False),
              getattr(module, "is_concatenated", True), getattr(module, "has_post_expert_norm", False))
    try:
        takes = set(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return False
    return (isinstance(n, int) and isinstance(width, int) and tuple(up.shape) == (n, 2 * width, d_model)
            and tuple(down.shape) == (n, d_model, width) and layout == (True, False, False, True, False)
            and hasattr(module, "act_fn") and {"top_k_index", "top_k_weights"} <= takes
            and getattr(type(module), "_apply_gate", moe._default_apply_gate) is moe._default_apply_gate)
