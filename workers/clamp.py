"""Does a neuron cause the output? Clamp sweeps and clamped generation (Davies 2025, section 3.2).

A clamp *replaces* the neuron's activation (the input feature of its layer's MLP output
projection) with a value; it does not add to it. It goes through the same forward-pre-hook
that reads activations (workers/adapters.py, `Adapter.clamp_rows`).

- **Sweep.** p(target | prompt) for the next token with the neuron clamped to each value. One
  batched forward pass for the whole sweep: each batch row carries one clamp value (and, when
  several neurons of a layer are swept with the same prompt, rows of different neurons share
  the pass). The blocks before the clamped layer see no clamp, so they run once, for one row.
  So does the clamped layer itself: its MLP output projection is linear, so clamping neuron n
  to v adds (v - a) * w_out[n] to the unclamped output (a: the neuron's own activation), and
  the rows part there (`Adapter.clamp_rows_shared`; a family that runs its MLP on flattened
  tokens, OPT, copies the row at the clamped block's input instead).
  Positions: every prompt position by default (Davies clamps the neuron for the whole forward
  pass), or the last position only. A BOS token the tokenizer puts in front is not part of the
  prompt and is never clamped. The baseline is one unclamped pass of the prompt: the neuron's
  activation at the last position and p(target) there. Clamped at the last position only, the
  curve passes through the baseline exactly; clamped everywhere, the baseline is the unclamped
  model's point, which the curve need not cross (the prompt's other positions change too).
- **Target.** One token (as typed, or as a page's chip shows it: ␣dog); text of several tokens is an
  error that names them (a curve is one next token's probability).
- **Generation.** The prompt continued for N tokens twice in one batch: row 0 with the neuron
  clamped at every position (the prompt's and each generated token's, "permanently clamped"
  as in Davies' Figure 4), row 1 unclamped. Greedy, or sampled at temperature 1 from a
  torch.Generator seeded with `seed`, with one uniform draw per step shared by both rows
  (inverse-CDF sampling): where the clamp leaves the next-token distribution as it was, the
  two rows draw the same token, so a difference is the clamp's and not the dice's. A row
  stops at EOS.
- **Latents.** The same sweeps and generations clamp an SAE's latent (`units`, workers/saestages.py
  LatentUnits): at the SAE's site, x' = x + (v - f(x)) d, f(x) the latent's activation and d its
  decoder direction, so the SAE's reconstruction error stays in (steering by a latent). Their
  rows run the whole model each (no shared prefix).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from app.clamping import (  # the inputs' rules, shared with the pages and the CLI
    DEFAULT_COUNT,
    DEFAULT_GENERATE_TOKENS,
    INDEX_COUNT,
    MAX_GENERATE_TOKENS,
    MAX_VALUES,
    default_values,
    parse_values,
    several_tokens,
    value_range,
    within_bound,
)
from app.errors import NeedleError
from app.tokens import from_visible
from workers.corpus import bos_prefix_id
from workers.devices import compute_device
from workers.loading import max_positions, token_texts

__all__ = [
    "DEFAULT_COUNT", "DEFAULT_GENERATE_TOKENS", "INDEX_COUNT", "INDEX_TOP", "MAX_GENERATE_TOKENS", "MAX_VALUES",
    "SweepItem", "curve_row", "default_prompt", "default_values", "encode_prompt", "generate", "parse_values",
    "resolve_target", "sweep", "sweep_many", "value_range",
]

TOP_TOKENS = 5
PROMPT_TOKENS = 16  # the default prompt: the first 16 tokens of the model's corpus
INDEX_TOP = 10  # `needle index` sweeps every neuron that is a top-10 search hit for its own top token


class NeuronUnits:
    """The units a sweep or generation clamps: a layer's MLP neurons, through the adapter's hooks."""

    shares_prefix = True  # clamp_rows_shared and expand_batch apply

    def __init__(self, adapter):
        self.adapter = adapter

    def check(self, index: int) -> None:
        self.adapter._neuron(index)

    def read(self, layers):
        return self.adapter.read_activations(layers)

    def clamp_rows(self, layer: int, rows: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, positions):
        return self.adapter.clamp_rows(layer, rows, indices, values, positions)


@dataclass
class SweepItem:
    """One curve of a multi-neuron sweep: a neuron, its target token and its clamp values."""

    layer: int
    neuron: int
    token_id: int
    values: list[float]


# ---- inputs -----------------------------------------------------------------------------------


def default_prompt(tokenizer, first_window: Sequence[int] | None) -> str:
    """A model's default clamp prompt: the text of the first PROMPT_TOKENS tokens of its corpus's
    first window (so it is in the language the model was indexed on), or "The" without one."""
    if first_window is not None and len(first_window):
        text = tokenizer.decode(list(first_window)[:PROMPT_TOKENS], skip_special_tokens=True)
        if text.strip():
            return text
    return "The"


def encode_prompt(loaded, prompt: str, extra_positions: int = 0) -> tuple[list[int], int | None]:
    """(prompt token ids, the BOS id put in front or None); a clear error when it does not fit."""
    if not prompt or not prompt.strip():
        raise NeedleError("The prompt is empty.", hint="Type a prompt for the model to continue.")
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise NeedleError("The prompt has no tokens.", hint="Type a prompt for the model to continue.")
    bos = bos_prefix_id(loaded.tokenizer)
    limit = max_positions(loaded.config)
    need = len(ids) + (bos is not None) + max(extra_positions - 1, 0)  # the last new token is never fed back
    if limit is not None and need > limit:
        what = f"{len(ids)} tokens" + (f" plus {extra_positions} to generate" if extra_positions else "")
        raise NeedleError(
            f"The prompt is {what}; this model reads at most {limit} positions"
            + (" (one of them the BOS token)." if bos is not None else "."),
            hint="Shorten the prompt" + (" or generate fewer tokens." if extra_positions else "."),
        )
    return ids, bos


def resolve_target(loaded, text: str | None, token_id: int | None) -> tuple[int, str, str | None]:
    """(token id, its text, a note or None). An id is used as it is; text must be one token (as
    typed, or as a page's chip shows it: ␣dog for " dog"). Text of several tokens is an error that
    names them: a curve is one next token's probability. (The note is kept for curves stored
    before, when such text was swept for its first token.)"""
    vocab = loaded.adapter.vocab_size
    if token_id is not None:
        if not 0 <= int(token_id) < vocab:
            raise NeedleError(f"There is no token id {token_id}: the vocabulary has ids 0 to {vocab - 1}.",
                              hint="Give the target as text instead.")
        return int(token_id), token_texts(loaded.tokenizer, [int(token_id)])[0], None
    if not text:
        raise NeedleError("There is no target token.", hint="Give the token whose probability to plot, e.g. ' dog'.")
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 and from_visible(text) != text:  # ␣dog␣house: the marks stand for spaces
        text = from_visible(text)
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise NeedleError(f"The target {text!r} has no tokens.", hint="Give a word or a token, e.g. ' dog'.")
    if len(ids) > 1:
        raise several_tokens(text, token_texts(loaded.tokenizer, list(ids)))
    return int(ids[0]), token_texts(loaded.tokenizer, [ids[0]])[0], None


# ---- the forward passes -------------------------------------------------------------------------


def _logits_kwargs(model) -> dict:
    """Ask for the last position's logits only, where the model's forward can (transformers >= 4.50)."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


def _device(loaded) -> torch.device:
    return compute_device(loaded.model)


def _last_probs(loaded, ids: torch.Tensor) -> torch.Tensor:
    """p(next token) [B, V] in float32 at the last position of ids [B, T]."""
    out = loaded.model(input_ids=ids, use_cache=False, **_logits_kwargs(loaded.model))
    return torch.softmax(out.logits[:, -1].float(), dim=-1)


def _top(probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    p, i = torch.topk(probs, min(k, probs.numel()))
    return list(zip(i.tolist(), p.tolist()))


def sweep_many(loaded, prompt: str, items: Sequence[SweepItem], *, last_only: bool = False,
               max_rows: int = 512, progress: Callable[[int], None] = lambda n: None,
               share_prefix: bool = True, units=None) -> list[dict]:
    """One curve per item, all with the same prompt. Rows are grouped by layer, and with
    share_prefix the blocks before the clamped layer, and its output projection, run once for
    all the rows of a batch (`Adapter.clamp_rows_shared`; `Adapter.expand_batch` for a family
    that flattens tokens): they see no clamp, so every row computes the same there.
    Returns, per item, the CLI's JSON shape:
    {values, probs, baseline {activation, prob}, token, token_id, top_tokens {low, high}}
    (top tokens: [{token, token_id, prob}] at the sweep's first and last value, its ends)."""
    ids, bos = encode_prompt(loaded, prompt)
    adapter = loaded.adapter
    units = units or NeuronUnits(adapter)
    share_prefix = share_prefix and units.shares_prefix and not adapter.spec.fixed_batch
    device = _device(loaded)
    seq = torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long, device=device)
    first = 1 if bos is not None else 0  # the prompt's first position: BOS is never clamped
    positions = slice(seq.numel() - 1, None) if last_only else slice(first, None)
    for item in items:
        units.check(item.neuron)
        if not 0 <= item.token_id < adapter.vocab_size:
            raise NeedleError(f"There is no token id {item.token_id}.", hint="Give the target as text instead.")
        if not 1 <= len(item.values) <= MAX_VALUES:
            raise NeedleError(f"A sweep has 1 to {MAX_VALUES} values; this one has {len(item.values)}.")
        if not all(math.isfinite(v) for v in item.values):
            raise NeedleError("Every clamp value must be a finite number.", hint="e.g. -50:50:41.")
        for v in item.values:
            within_bound(v)
    layers = sorted({it.layer for it in items})
    with torch.inference_mode():
        # the baseline: one unclamped pass, reading every swept layer
        with units.read(layers) as acts:
            base = _last_probs(loaded, seq[None])[0]
        base_act = {layer: acts[layer][0, -1].float().cpu() for layer in layers}
        probs: list[list[float]] = [[] for _ in items]
        ends: dict[tuple[int, str], list[tuple[int, float]]] = {}
        for layer in layers:  # a chunk's rows clamp one layer, so the blocks before it run for one row
            rows = [(i, j, v) for i, it in enumerate(items) if it.layer == layer for j, v in enumerate(it.values)]
            for start in range(0, len(rows), max_rows):
                chunk = rows[start : start + max_rows]
                neurons = torch.tensor([items[i].neuron for i, _, _ in chunk])
                values = torch.tensor([v for _, _, v in chunk], dtype=torch.float64)
                if share_prefix and not adapter.spec.flattens_tokens:
                    with adapter.clamp_rows_shared(layer, neurons, values, positions):
                        p = _last_probs(loaded, seq[None])
                else:
                    each = units.clamp_rows(layer, torch.arange(len(chunk)), neurons, values, positions)
                    if share_prefix:  # OPT: one row up to the clamped block, copied at its input
                        with adapter.expand_batch(layer, len(chunk)), each:
                            p = _last_probs(loaded, seq[None])
                    else:
                        with each:
                            p = _last_probs(loaded, seq[None].expand(len(chunk), -1))
                targets = torch.tensor([items[i].token_id for i, _, _ in chunk], device=p.device)
                got = p[torch.arange(len(chunk), device=p.device), targets].tolist()
                for r, (i, j, _) in enumerate(chunk):
                    probs[i].append(got[r])
                    if j == 0:
                        ends[(i, "low")] = _top(p[r], TOP_TOKENS)
                    if j == len(items[i].values) - 1:
                        ends[(i, "high")] = _top(p[r], TOP_TOKENS)
                progress(len(chunk))
    wanted = sorted({t for tops in ends.values() for t, _ in tops} | {it.token_id for it in items})
    text = dict(zip(wanted, token_texts(loaded.tokenizer, wanted)))
    out = []
    for i, it in enumerate(items):
        out.append({
            "layer": it.layer,
            "neuron": it.neuron,
            "values": [float(v) for v in it.values],
            "probs": probs[i],
            "baseline": {"activation": float(base_act[it.layer][it.neuron]), "prob": float(base[it.token_id])},
            "token": text[it.token_id],
            "token_id": it.token_id,
            "top_tokens": {
                end: [{"token": text[t], "token_id": t, "prob": pr} for t, pr in ends[(i, end)]] for end in ("low", "high")
            },
            "positions": "last" if last_only else "all",
            "prompt_tokens": len(ids),
        })
    return out


def sweep(loaded, layer: int, neuron: int, prompt: str, token_id: int, values: Sequence[float], *,
          last_only: bool = False, share_prefix: bool = True, units=None) -> dict:
    """One unit's curve: see sweep_many."""
    return sweep_many(loaded, prompt, [SweepItem(layer, neuron, token_id, list(values))], last_only=last_only,
                      share_prefix=share_prefix, units=units)[0]


def generate(loaded, layer: int, neuron: int, prompt: str, value: float, *, tokens: int = DEFAULT_GENERATE_TOKENS,
             seed: int | None = None, units=None) -> dict:
    """The prompt continued `tokens` tokens with the neuron clamped at `value`, beside the unclamped
    continuation, in one batch of two rows (see the module docstring). Returns {"clamped": {text,
    token_ids}, "unclamped": {text, token_ids}, "value", "tokens", "seed", "mode"}."""
    if not 1 <= tokens <= MAX_GENERATE_TOKENS:
        raise NeedleError(f"Generating {tokens} tokens is not allowed: use 1 to {MAX_GENERATE_TOKENS}.",
                          hint="e.g. --tokens 32.")
    if not math.isfinite(value):
        raise NeedleError("The clamp value must be a finite number.", hint="e.g. --value 20.")
    within_bound(value)
    units = units or NeuronUnits(loaded.adapter)
    units.check(neuron)
    ids, bos = encode_prompt(loaded, prompt, extra_positions=tokens)
    device = _device(loaded)
    seq = torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long, device=device)
    first = 1 if bos is not None else 0
    state = {"prompt_pass": True}

    def positions(length: int) -> slice:  # the prompt's pass: after BOS; a cached step: its one token
        return slice(first, None) if state["prompt_pass"] else slice(None)

    eos = loaded.tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    out_ids: list[list[int]] = [[], []]
    stopped = [False, False]
    with torch.inference_mode(), units.clamp_rows(
        layer, torch.tensor([0]), torch.tensor([neuron]), torch.tensor([float(value)], dtype=torch.float64), positions,
    ):
        past = None
        step = seq[None].expand(2, -1)
        for _ in range(tokens):
            out = loaded.model(input_ids=step, past_key_values=past, use_cache=True)
            state["prompt_pass"] = False
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            if gen is None:
                nxt = logits.argmax(-1).cpu()
            else:  # one uniform draw per step for both rows: where the clamp changes nothing, nor does the draw
                cdf = torch.softmax(logits.double(), -1).cumsum(-1).cpu()
                u = torch.rand(1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
                nxt = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)[:, 0]
            for r in range(2):
                if not stopped[r]:
                    t = int(nxt[r])
                    if eos is not None and t == eos:
                        stopped[r] = True
                    else:
                        out_ids[r].append(t)
            if all(stopped):
                break
            step = nxt.to(device)[:, None]
    def decode(t):
        return loaded.tokenizer.decode(t, skip_special_tokens=True)
    return {
        "value": float(value),
        "tokens": tokens,
        "seed": seed,
        "mode": "greedy" if seed is None else "sampled",
        "clamped": {"text": decode(out_ids[0]), "token_ids": out_ids[0]},
        "unclamped": {"text": decode(out_ids[1]), "token_ids": out_ids[1]},
    }


def curve_row(result: dict, prompt: str, target: str) -> dict:
    """A sweep result as the columns of a clamp_curves row."""
    return {
        "layer": result["layer"], "neuron": result["neuron"], "prompt": prompt, "target": target,
        "positions": result["positions"], "clamp_values": result["values"], "probs": result["probs"],
        "baseline": result["baseline"], "top_tokens": result["top_tokens"], "token_id": result["token_id"],
        "token": result["token"], "note": result.get("note"),
    }
