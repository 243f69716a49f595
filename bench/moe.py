"""Benchmark: what reading a mixture of experts costs, against transformers' own forward.

    python bench/moe.py                         # CPU: a small Mixtral shape, random weights, float32
    python bench/moe.py --device cuda --dtype bfloat16 --shape mixtral-small

Needle runs an MoE's experts through its own forward (workers/experts.py: transformers' eager
one, with every routed token's activations [tokens, E * F] passed where the hooks read them). On
the same random-weight model (two copies of the same weights) and the same windows, timed
alternately, repeat by repeat:

- transformers: the model's forward, `model(input_ids=batch, use_cache=False)`, its experts
  as transformers runs them (eager), under torch.inference_mode;
- needle forward: the same forward with Needle's experts forward bound (the Adapter built), no
  hook: what the dense [tokens, E * F] activations cost by themselves;
- examples stage: `workers.examples.collect` over every layer, as the examples job runs it
  (its estimate pass, the accumulators with each token's routing), on the same windows.

tokens/s are from the median time over `--repeats`; each ratio is the median of the per-repeat
ratios. There is no goal yet: the figures are what the MoE path costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name, sync  # noqa: E402  (bench/machine.py)

from workers import examples  # noqa: E402
from workers.adapters import adapter_for  # noqa: E402
from workers.loading import resolve_device, resolve_dtype  # noqa: E402

SHAPES = {
    # a small Mixtral: 8 experts of 512 neurons, 2 per token (4,096 neurons a layer)
    "mixtral-small": {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 8000,
                      "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8,
                      "num_experts_per_tok": 2},
    "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 64, "vocab_size": 1000,
             "num_attention_heads": 2, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def forward_all(model, windows: torch.Tensor, batch: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for b0 in range(0, len(windows), batch):
            model(input_ids=windows[b0 : b0 + batch].to(device), use_cache=False)
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    theirs = build(args.shape, device, dtype)
    ours = copy.deepcopy(theirs)
    adapter = adapter_for(ours)  # binds Needle's experts forward to `ours` only
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.tokens // args.context, args.context),
                            generator=gen)
    tokens = windows.numel()
    batch = max(1, args.batch_tokens // args.context)
    layers = list(range(adapter.n_layers))
    forward_all(theirs, windows[:batch], batch, device)  # warm-up
    forward_all(ours, windows[:batch], batch, device)
    times: dict[str, list[float]] = {"transformers": [], "needle_forward": [], "examples_stage": []}
    for _ in range(args.repeats):
        times["transformers"].append(forward_all(theirs, windows, batch, device))
        times["needle_forward"].append(forward_all(ours, windows, batch, device))
        sync(device)
        start = time.perf_counter()
        examples.collect(ours, adapter, layers, windows, None, batch_tokens=args.batch_tokens, device=device)
        sync(device)
        times["examples_stage"].append(time.perf_counter() - start)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ratios = {
        "needle_forward_over_transformers": statistics.median(
            t / n for t, n in zip(times["transformers"], times["needle_forward"], strict=True)),
        "examples_stage_over_transformers": statistics.median(
            t / s for t, s in zip(times["transformers"], times["examples_stage"], strict=True)),
    }
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    result = {"shape": args.shape, "experts": adapter.n_experts, "expert_width": adapter.d_expert,
              "neurons_per_layer": adapter.d_mlp, "layers": adapter.n_layers, "tokens": tokens,
              "dtype": str(dtype).removeprefix("torch."), "device": machine, "tokens_per_s": tps, "ratio": ratios,
              "repeats": args.repeats}
    print(f"{args.shape}: {adapter.n_layers} layers x {adapter.n_experts} experts x {adapter.d_expert} neurons, "
          f"{tokens:,} tokens, {result['dtype']} on {machine}")
    for name, value in tps.items():
        print(f"  {name:>16}: {value:,.0f} tokens/s")
    print(f"  Needle's experts forward / transformers': {ratios['needle_forward_over_transformers']:.0%}; "
          f"examples stage / transformers' forward: {ratios['examples_stage_over_transformers']:.0%}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
