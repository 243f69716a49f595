"""Benchmark: a clamp sweep as one batched forward pass against one forward pass per clamp value.

    python bench/clamp.py                         # CPU: the demo model, 41 values, torch's default threads
    python bench/clamp.py --threads 1             # the same on one torch thread
    python bench/clamp.py --sizes                 # also 11, 41 and 101 values (3 repeats each), to show scaling
    python bench/clamp.py --device cuda           # on a GPU

The setting is the product's default sweep: assets/demo-model loaded with
workers.loading.load_model; the prompt is `workers.clamp.default_prompt` of the first window of
the stdlib corpus (load_corpus("stdlib", context=64, max_tokens=64)), i.e. the text of its first
16 tokens (`--prompt` overrides); the values are `workers.clamp.default_values(max_abs)`, 41 of
them from -10x to +10x the neuron's max |activation| (here over that first 64-token window, a
stand-in for the examples stage's figure; `--max-abs` overrides); the neuron is layer 3, neuron
123 (`--layer`, `--neuron`); the target token is the unclamped model's top next token
(`--token-id` overrides). The neuron is clamped at every prompt position, as the sweep does by
default (`--last-only`: the last position only).

What is timed, in the same run, alternating which goes first:

- ours: `workers.clamp.sweep(...)`, the whole function as the clamp job calls it: encoding the
  prompt, the unclamped baseline pass (reading the neuron's activation), the one batched pass
  with one clamp value per row (Adapter.clamp_rows), p(target) per row, the top tokens at both
  ends and their texts.
- sequential: one forward pass per clamp value, batch size 1, the neuron clamped through the
  same hook (Adapter.clamp_rows, same positions), under torch.inference_mode, the last
  position's logits only where the model can (workers.clamp._logits_kwargs, as ours), softmax
  and p(target); the prompt encoded once. No baseline pass and no top tokens, so it is a lower
  bound on a sequential sweep that returned what ours returns.

Both run once to warm up, then `--repeats` times each; the times are medians, the ratio is
sequential / ours of the medians (the per-repeat ratios' range is printed too). Agreement:
the largest |p_ours - p_sequential| over the values. Peak memory: each alone, the process's
peak resident memory beyond its size before (freed heap handed back to the OS first) and,
on a GPU, torch.cuda.max_memory_allocated beyond what was allocated before.
Goal (issue 5): ours >= 5x faster than the sequential passes on the CPU for the demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench/machine.py
from machine import cpu_name, reset_rss_peak, status_mb, sync, trim_heap

from workers import clamp
from workers.corpus import load_corpus
from workers.loading import load_model, resolve_device

DEMO_MODEL = ROOT / "assets" / "demo-model"
GOAL = 5.0  # ours >= 5x faster than one pass per value (CPU, demo model)
SIZES = (11, 41, 101)


def first_window(tokenizer, spec: str, context: int) -> list[int]:
    corpus = load_corpus(spec, tokenizer, context=context, max_tokens=context)
    return corpus.windows[0].tolist()


def positions_of(loaded, prompt: str, last_only: bool) -> tuple[torch.Tensor, slice]:
    """(the token ids the sweep runs, BOS in front when the tokenizer prefixes one; the
    clamped positions), as workers.clamp.sweep_many builds them."""
    ids, bos = clamp.encode_prompt(loaded, prompt)
    seq = torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long, device=clamp._device(loaded))
    first = 1 if bos is not None else 0
    return seq, (slice(seq.numel() - 1, None) if last_only else slice(first, None))


def sequential(loaded, layer: int, neuron: int, prompt: str, token_id: int, values, *,
               last_only: bool = False) -> list[float]:
    """p(target) for each value, one batch-1 forward pass per value."""
    model, adapter = loaded.model, loaded.adapter
    seq, positions = positions_of(loaded, prompt, last_only)
    kwargs = clamp._logits_kwargs(model)
    row, which = torch.tensor([0]), torch.tensor([neuron])
    probs = []
    with torch.inference_mode():
        for v in values:
            with adapter.clamp_rows(layer, row, which, torch.tensor([float(v)], dtype=torch.float64), positions):
                out = model(input_ids=seq[None], use_cache=False, **kwargs)
            probs.append(float(torch.softmax(out.logits[0, -1].float(), dim=-1)[token_id]))
    return probs


def ours(loaded, layer, neuron, prompt, token_id, values, *, last_only=False) -> list[float]:
    return clamp.sweep(loaded, layer, neuron, prompt, token_id, values, last_only=last_only)["probs"]


def timed(device: str, fn, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    got = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, got


def compare(device: str, repeats: int, call_args: tuple, last_only: bool) -> dict:
    """Warm both up, then `repeats` rounds of each, the order alternating round by round."""
    runs: dict[str, list[float]] = {"ours": [], "sequential": []}
    fns = {"ours": ours, "sequential": sequential}
    got = {name: fn(*call_args, last_only=last_only) for name, fn in fns.items()}  # warm-up
    for r in range(repeats):
        order = ("ours", "sequential") if r % 2 == 0 else ("sequential", "ours")
        for name in order:
            t, got[name] = timed(device, fns[name], *call_args, last_only=last_only)
            runs[name].append(t)
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    ratios = [s / o for s, o in zip(runs["sequential"], runs["ours"])]
    diff = max(abs(a - b) for a, b in zip(got["ours"], got["sequential"]))
    return {"runs": runs, "median": med, "ratio": med["sequential"] / med["ours"], "ratios": ratios,
            "max_abs_diff": diff, "probs": got}


def peak_memory(device: str, fn, call_args: tuple, last_only: bool, base_rss: float) -> dict[str, float]:
    trim_heap()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    sync(device)
    reset_rss_peak()
    fn(*call_args, last_only=last_only)
    sync(device)
    out = {"peak_rss_mb": status_mb("VmHWM") - base_rss}
    if cuda:
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL), help="a model folder or hub id (default: the demo model)")
    ap.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, ...")
    ap.add_argument("--corpus", default="stdlib", help="corpus SPEC whose first window gives the default prompt")
    ap.add_argument("--prompt", help="the prompt (default: the product's default prompt for the model)")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--neuron", type=int, default=123)
    ap.add_argument("--token-id", type=int, help="target token id (default: the unclamped model's top next token)")
    ap.add_argument("--count", type=int, default=clamp.DEFAULT_COUNT, help="clamp values in the sweep (default 41)")
    ap.add_argument("--max-abs", type=float,
                    help="the neuron's max |activation| for default_values (default: over the corpus's first window)")
    ap.add_argument("--last-only", action="store_true", help="clamp the last position only")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sizes", action="store_true", help=f"also time sweeps of {', '.join(map(str, SIZES))} values")
    ap.add_argument("--sizes-repeats", type=int, default=3, help="repeats per size for --sizes (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    ap.add_argument("--json-out", type=Path, metavar="FILE",
                    help="also write the figures printed as JSON to FILE (bench/gpu.sh reads it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = resolve_device(args.device)

    t0 = time.perf_counter()
    loaded = load_model(args.model, device, args.dtype)
    load_s = time.perf_counter() - t0
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    window = first_window(tokenizer, args.corpus, context=64)
    prompt = args.prompt if args.prompt is not None else clamp.default_prompt(tokenizer, window)
    seq, _ = positions_of(loaded, prompt, args.last_only)
    prompt_tokens = len(clamp.encode_prompt(loaded, prompt)[0])

    with torch.inference_mode():
        with adapter.read_activations([args.layer]) as acts:
            win = torch.tensor(window, dtype=torch.long, device=seq.device)[None]
            loaded.model(input_ids=win, use_cache=False)
        window_max_abs = float(acts[adapter._layer(args.layer)][0, :, args.neuron].abs().max())
        logits = loaded.model(input_ids=seq[None], use_cache=False).logits[0, -1].float()
    max_abs = args.max_abs if args.max_abs is not None else window_max_abs
    token_id = args.token_id if args.token_id is not None else int(logits.argmax())
    token_id, token_text, _ = clamp.resolve_target(loaded, None, token_id)
    values = clamp.default_values(max_abs, args.count)

    sync(device)
    trim_heap()
    base_rss = status_mb("VmRSS")
    gpu_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    machine = gpu_name or f"{cpu_name()}, {os.cpu_count()} cores"
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    print(f"model: {args.model}: {adapter.n_layers} layers x {adapter.d_mlp} neurons, d_model {adapter.d_model}, "
          f"vocab {adapter.vocab_size}, {dtype} on {device}; loaded in {load_s:.1f} s", file=sys.stderr)
    print(f"machine: {machine}; torch {torch.__version__}, {threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"sweep: layer {args.layer} neuron {args.neuron}, {len(values)} values {values[0]:g}..{values[-1]:g} "
          f"(max |activation| {max_abs:.3g}), target {token_text!r} (id {token_id}), "
          f"{'last position' if args.last_only else 'every position'}; prompt {prompt_tokens} tokens "
          f"({seq.numel()} positions): {prompt!r}", file=sys.stderr)

    call_args = (loaded, args.layer, args.neuron, prompt, token_id, values)
    got = compare(device, args.repeats, call_args, args.last_only)
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}: ours {got['runs']['ours'][r] * 1e3:.1f} ms, sequential "
              f"{got['runs']['sequential'][r] * 1e3:.1f} ms ({got['ratios'][r]:.1f}x)", file=sys.stderr)
    memory = {name: peak_memory(device, fn, call_args, args.last_only, base_rss)
              for name, fn in (("ours", ours), ("sequential", sequential))}

    sizes = {}
    if args.sizes:
        for n in SIZES:
            vals = clamp.default_values(max_abs, n)
            size_args = (loaded, args.layer, args.neuron, prompt, token_id, vals)
            s = compare(device, args.sizes_repeats, size_args, args.last_only)
            sizes[n] = s
            print(f"{n} values: ours {s['median']['ours'] * 1e3:.1f} ms, sequential "
                  f"{s['median']['sequential'] * 1e3:.1f} ms ({s['ratio']:.1f}x), max |dp| {s['max_abs_diff']:.1e}; "
                  f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)

    med, ratio = got["median"], got["ratio"]
    result = {
        "model": args.model,
        "device": machine,
        "dtype": dtype,
        "threads": threads,
        "layer": args.layer,
        "neuron": args.neuron,
        "prompt": prompt,
        "prompt_tokens": prompt_tokens,
        "positions": "last" if args.last_only else "all",
        "token_id": token_id,
        "token": token_text,
        "values": len(values),
        "value_range": [values[0], values[-1]],
        "max_abs": max_abs,
        "repeats": args.repeats,
        "load_s": round(load_s, 2),
        "ms_median": {k: round(v * 1e3, 2) for k, v in med.items()},
        "ms_all": {k: [round(t * 1e3, 2) for t in ts] for k, ts in got["runs"].items()},
        "ratio_sequential_over_ours": round(ratio, 2),
        "ratio_per_repeat": [round(x, 2) for x in got["ratios"]],
        "max_abs_prob_diff": got["max_abs_diff"],
        "peak_rss_beyond_model_mb": {k: round(m["peak_rss_mb"], 1) for k, m in memory.items()},
        "gpu_peak_beyond_start_mb": (
            {k: round(m["gpu_peak_mb"], 1) for k, m in memory.items()} if gpu_name else None
        ),
        "sizes": {
            str(n): {"ms_median": {k: round(v * 1e3, 2) for k, v in s["median"].items()},
                     "ratio_sequential_over_ours": round(s["ratio"], 2), "max_abs_prob_diff": s["max_abs_diff"]}
            for n, s in sizes.items()
        } or None,
        "goal": GOAL,
        "goal_met": ratio >= GOAL,
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    mem = (f"peak +{result['peak_rss_beyond_model_mb']['ours']:.0f} MB resident "
           f"(sequential +{result['peak_rss_beyond_model_mb']['sequential']:.0f} MB)")
    if gpu_name:
        mem += f", +{result['gpu_peak_beyond_start_mb']['ours']:.0f} MB GPU"
    print(f"clamp sweep of {len(values)} values: {med['ours'] * 1e3:.1f} ms batched vs "
          f"{med['sequential'] * 1e3:.1f} ms sequential = {ratio:.1f}x "
          f"(goal >= {GOAL:g}x: {'PASS' if ratio >= GOAL else 'FAIL'}; per repeat "
          f"{min(got['ratios']):.1f}-{max(got['ratios']):.1f}x); max |p_ours - p_sequential| "
          f"{got['max_abs_diff']:.1e}; prompt {prompt_tokens} tokens; {mem}; median of {args.repeats} on {machine}, "
          f"{threads} threads")


if __name__ == "__main__":
    from app.errors import NeedleError

    try:
        main()
    except NeedleError as exc:
        sys.exit(f"error: {exc}")
