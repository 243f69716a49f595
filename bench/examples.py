"""Benchmark: the examples stage against the bare forward pass of the same model and batches.

    python bench/examples.py                                         # CPU: the bundled demo model, stdlib corpus
    python bench/examples.py --shape llama-8b --device cuda          # GPU: Llama-3-8B shape, random weights, bf16
    python bench/examples.py --shape tiny --device cpu --tokens 8192 # smoke run (seconds)

What is timed, on the same windows cut into the same batches (`--batch-tokens`):

- stage: `workers.examples.collect` exactly as the examples job runs it: the estimate pass
  (every stride-th window), the streaming pass with every layer's accumulator (top-k
  contexts, interval reservoirs, statistics), and `result()` of every layer to numpy.
- bare: the model's whole forward pass, `model(input_ids=batch, use_cache=False)` under
  torch.inference_mode, LM head included: the "bare forward pass" of the goal.
- truncated: `workers.examples.forward_windows` with a hook that does nothing: the forward
  the stage itself runs, stopped after the last MLP read (no LM head). stage / truncated is
  what the stage's own bookkeeping (estimate pass included) costs.

All three get the BOS token in front of each window when the tokenizer prefixes one (the
random shapes do, as Llama 3's tokenizer does), and all three count the corpus tokens only
(n_windows * context), so the stage's estimate pass is a cost, not extra throughput.
The baselines are interleaved with the stage batch by batch: after each batch of the stage's
streaming pass (from its progress callback, the device synchronised first) the same batch
runs through the bare and the truncated forward, in alternating order, and the time spent
there is taken out of the stage's wall time, so drift in the machine's speed falls on all
three alike. Per phase, tokens/s are from the median time over `--repeats`; the ratio is the
median of the per-repeat ratios. Model loading and the corpus's tokenization are timed
separately and are in no ratio. Peak memory: each phase run alone over the first
`--memory-batches` batches (the accumulators are of fixed size: the peak does not grow with
the corpus), as the process's peak resident memory beyond its size once the model and the
windows were loaded (freed heap handed back to the OS first) and, on CUDA,
torch.cuda.max_memory_allocated beyond what was allocated when the phase started.
Goals (the issue): stage >= 85% of bare tokens/s on a GPU, >= 70% on the CPU for the demo model.
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

from machine import cpu_name, reset_rss_peak, status_mb, sync, trim_heap  # noqa: E402  (bench/machine.py)

from workers import examples
from workers.adapters import adapter_for
from workers.loading import load_model, resolve_device, resolve_dtype

DEMO_MODEL = ROOT / "assets" / "demo-model"
PHASES = ("stage", "bare", "truncated")
GOALS = {"cuda": 0.85, "cpu": 0.70}  # stage tokens/s over bare forward tokens/s

# Random-weight Llama shapes (Llama 3 family: GQA with 8 KV heads, 128,256-token vocabulary).
SHAPES = {
    "llama-8b": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
    "llama-1b": {"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "vocab_size": 128256,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256, "vocab_size": 1000,
             "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": False},
}
# 5,120 windows of 64 tokens: enough that the estimate pass is at its floor of 1/20 of the corpus
DEFAULT_TOKENS = {"model": 262_144, "llama-8b": 327_680, "llama-1b": 327_680, "tiny": 8_192}


# ---- machine and memory ----------------------------------------------------------------------


# ---- model and windows -----------------------------------------------------------------------


def build_shape(shape: str, context: int, device: str, dtype: torch.dtype):
    """A LlamaForCausalLM of the given shape with random weights (normal(0, 0.02), norms at 1)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(2048, context + 1), bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    model.eval()
    model.requires_grad_(False)
    return model, cfg


def random_windows(n_windows: int, context: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n_windows, context), generator=gen, dtype=torch.int64)


def corpus_windows(spec: str, tokenizer, context: int, tokens: int) -> tuple[torch.Tensor, str, int | None]:
    """(windows, description, bos id) from workers.corpus; random ids if it cannot be imported."""
    try:
        from workers.corpus import bos_prefix_id, load_corpus
    except ImportError as exc:
        print(f"note: workers.corpus not importable ({exc}); using random token ids", file=sys.stderr)
        return random_windows(tokens // context, context, len(tokenizer)), "random ids", None
    corpus = load_corpus(spec, tokenizer, context=context, max_tokens=tokens)
    return corpus.windows, corpus.description, bos_prefix_id(tokenizer)


# ---- the three phases ------------------------------------------------------------------------


def with_bos(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos_id, dtype=ids.dtype, device=ids.device), ids], dim=1)


class Bench:
    def __init__(self, model, adapter, windows: torch.Tensor, bos_id: int | None, batch_tokens: int, device: str):
        self.model, self.adapter, self.windows, self.bos = model, adapter, windows, bos_id
        self.batch_tokens, self.device = batch_tokens, device
        self.layers = list(range(adapter.n_layers))
        n, context = windows.shape
        self.plan = examples.plan(n, context, batch_tokens)
        self.tokens = n * context

    def batches(self, windows: torch.Tensor) -> list[torch.Tensor]:
        size = self.plan.batch_windows
        return [windows[start : start + size] for start in range(0, windows.shape[0], size)]

    def bare_batch(self, batch: torch.Tensor) -> None:
        with torch.inference_mode():
            self.model(input_ids=with_bos(batch.to(self.device, non_blocking=True), self.bos), use_cache=False)

    def truncated_batch(self, batch: torch.Tensor) -> None:
        examples.forward_windows(self.model, self.adapter, self.layers, batch, self.bos, _nothing, self.device)

    def collect(self, windows: torch.Tensor, progress) -> None:
        results = examples.collect(self.model, self.adapter, self.layers, windows, self.bos,
                                   batch_tokens=self.batch_tokens, device=self.device, progress=progress)
        assert len(results) == len(self.layers) and results[0].tokens == windows.numel()
        del results

    def timed(self, fn, *args) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        fn(*args)
        sync(self.device)
        return time.perf_counter() - t0

    def interleaved(self, windows: torch.Tensor) -> dict[str, float]:
        """One run of the stage over `windows`, with the two baselines run on each batch right
        after the stage's own batch of the streaming pass (their order alternating). Time spent
        in the baselines is taken out of the stage's wall time."""
        context = windows.shape[1]
        estimate = len(examples.plan(windows.shape[0], context, self.batch_tokens).estimate_ids) * context
        batches = self.batches(windows)
        state = {"done": 0, "k": 0, "paused": 0.0, "bare": 0.0, "truncated": 0.0, "estimate_end": 0.0,
                 "last": 0.0}

        def progress(n: int) -> None:
            state["done"] += n
            if state["done"] <= estimate:  # the estimate pass: no baseline batch belongs here
                if state["done"] == estimate:
                    sync(self.device)
                    state["estimate_end"] = time.perf_counter()
                return
            sync(self.device)  # the stage's batch is finished before its time stops
            pause = time.perf_counter()
            batch = batches[state["k"]]
            order = ("bare", "truncated") if state["k"] % 2 == 0 else ("truncated", "bare")
            for name in order:
                state[name] += self.timed(getattr(self, f"{name}_batch"), batch)
            state["k"] += 1
            state["last"] = time.perf_counter()
            state["paused"] += state["last"] - pause

        sync(self.device)
        t0 = time.perf_counter()
        self.collect(windows, progress)
        sync(self.device)
        end = time.perf_counter()
        assert state["k"] == len(batches)
        stage = end - t0 - state["paused"]
        estimate_s, result_s = state["estimate_end"] - t0, end - state["last"]
        return {"stage": stage, "bare": state["bare"], "truncated": state["truncated"],
                "estimate_s": estimate_s, "streaming_s": stage - estimate_s - result_s, "result_s": result_s}

    def isolated(self, phase: str, windows: torch.Tensor, base_rss: float) -> dict[str, float]:
        """One phase alone over `windows`, for its peak memory."""
        trim_heap()
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            gpu_base = torch.cuda.memory_allocated()
        sync(self.device)
        reset_rss_peak()
        if phase == "stage":
            self.collect(windows, lambda n: None)
        else:
            for batch in self.batches(windows):
                getattr(self, f"{phase}_batch")(batch)
        sync(self.device)
        out = {"peak_rss_mb": status_mb("VmHWM") - base_rss}
        if cuda:
            out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
        return out


def _nothing(layer: int, acts: torch.Tensor) -> None:
    pass


# ---- --device-map auto -----------------------------------------------------------------------


def save_shape(shape: str, context: int, folder: Path) -> None:
    """The random-weight shape saved as a model folder (bfloat16 weights, a stand-in tokenizer), for load_model."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model, _ = build_shape(shape, context, "cpu", torch.bfloat16)
    model.save_pretrained(folder)
    del model
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(folder)


def device_map_case(args, device: str) -> None:
    """The examples stage on the model spread by --device-map auto (capped by --max-memory) against the
    same model on `device` alone, the same windows, timed alternately; tokens/s and their ratio."""
    import tempfile

    from workers.devices import DEVICE_MAP_AUTO, spread
    from workers.loading import parse_max_memory

    caps = parse_max_memory(args.max_memory)
    tokens = args.tokens or DEFAULT_TOKENS[args.shape]
    windows = random_windows(tokens // args.context, args.context, SHAPES[args.shape]["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="needle-bench-") as folder:
        t0 = time.perf_counter()
        save_shape(args.shape, args.context, Path(folder))
        save_s = time.perf_counter() - t0
        loads, runs = {}, {}
        for case, where, cap in (("one_device", device, None), ("device_map", DEVICE_MAP_AUTO, caps)):
            t0 = time.perf_counter()
            loads[case] = (load_model(folder, where, args.dtype, max_memory=cap), time.perf_counter() - t0)
            runs[case] = []
        placed = {str(v) for v in spread(loads["device_map"][0].model).values()}
        for r in range(args.repeats + 1):  # the first is a warm-up
            for case in (("one_device", "device_map") if r % 2 else ("device_map", "one_device")):
                loaded = loads[case][0]
                sync(device)
                t0 = time.perf_counter()
                examples.collect(loaded.model, loaded.adapter, list(range(loaded.adapter.n_layers)), windows, 1,
                                 batch_tokens=args.batch_tokens)
                sync(device)
                if r:
                    runs[case].append(time.perf_counter() - t0)
        dtype = loads["one_device"][0].dtype
    n = windows.numel()
    tps = {case: round(n / statistics.median(t)) for case, t in runs.items()}
    ratios = [a / b for a, b in zip(runs["one_device"], runs["device_map"], strict=True)]
    machine = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else \
        f"{cpu_name()}, {os.cpu_count()} cores"
    result = {
        "case": "device_map", "model": args.shape, "device": machine, "one_device": device, "dtype": dtype,
        "max_memory": args.max_memory, "device_map_places": sorted(placed), "threads": torch.get_num_threads(),
        "tokens": n, "context": args.context, "batch_tokens": args.batch_tokens, "repeats": args.repeats,
        "save_s": round(save_s, 2), "load_s": {case: round(v[1], 2) for case, v in loads.items()},
        "tokens_per_s": tps, "seconds_all": {case: [round(x, 3) for x in t] for case, t in runs.items()},
        "ratio_device_map_over_one_device": round(statistics.median(ratios), 3),
        "ratio_all": [round(x, 3) for x in ratios],
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"examples stage, {args.shape}: device map ({', '.join(sorted(placed))}; --max-memory {args.max_memory}) "
          f"{tps['device_map']:,} tokens/s = {result['ratio_device_map_over_one_device']:.0%} of one {device} "
          f"({tps['one_device']:,} tokens/s); median of {args.repeats} on {machine}")


# ---- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL), help="a model folder or hub id (default: the demo model)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight Llama shape instead of --model")
    ap.add_argument("--corpus", default="stdlib", help="corpus SPEC for --model (workers/corpus.py); 'random' for ids")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, ...")
    ap.add_argument("--tokens", type=int, help="corpus tokens (default: 262,144 for a model, per shape otherwise)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-batches", type=int, default=8,
                    help="batches each phase runs alone over, for its peak memory (it does not grow with the corpus)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    ap.add_argument("--json-out", type=Path, metavar="FILE",
                    help="also write the figures printed as JSON to FILE (bench/gpu.sh reads it)")
    ap.add_argument("--device-map", choices=["auto"],
                    help="with --shape: the stage on the model spread over the devices (capped by --max-memory) "
                    "against the same model on --device alone")
    ap.add_argument("--max-memory", default="", metavar="CAPS", help="caps for --device-map, e.g. cpu=1GiB or cuda:0=8GiB")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.device_map:
        if not args.shape:
            sys.exit("--device-map needs --shape")
        device_map_case(args, device)
        return
    dtype = resolve_dtype(args.dtype, device)
    tokens = args.tokens or DEFAULT_TOKENS[args.shape or "model"]

    t0 = time.perf_counter()
    if args.shape:
        model, cfg = build_shape(args.shape, args.context, device, dtype)
        adapter = adapter_for(model)
        load_s = time.perf_counter() - t0
        what = f"random-weight LlamaForCausalLM, shape {args.shape}"
        t0 = time.perf_counter()
        windows = random_windows(tokens // args.context, args.context, cfg.vocab_size)
        corpus, bos_id = "random token ids", cfg.bos_token_id
    else:
        loaded = load_model(args.model, device, args.dtype)
        model, adapter = loaded.model, loaded.adapter
        load_s = time.perf_counter() - t0
        what = f"{args.model} (loaded with workers.loading.load_model)"
        t0 = time.perf_counter()
        if args.corpus == "random":
            windows, corpus, bos_id = random_windows(tokens // args.context, args.context, adapter.vocab_size), \
                "random token ids", None
        else:
            windows, corpus, bos_id = corpus_windows(args.corpus, loaded.tokenizer, args.context, tokens)
    tokenize_s = time.perf_counter() - t0
    if windows.shape[0] == 0:
        sys.exit(f"--tokens {tokens} gives no window of {args.context} tokens")

    bench = Bench(model, adapter, windows, bos_id, args.batch_tokens, device)
    sync(device)
    trim_heap()
    base_rss = status_mb("VmRSS")
    gpu_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    machine = gpu_name or f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"model: {what}: {adapter.n_layers} layers x {adapter.d_mlp} neurons, d_model {adapter.d_model}, "
          f"vocab {adapter.vocab_size}, {str(dtype).removeprefix('torch.')} on {device}", file=sys.stderr)
    print(f"machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"corpus: {corpus}: {windows.shape[0]:,} windows x {args.context} = {bench.tokens:,} tokens "
          f"(bos {'prefixed' if bos_id is not None else 'none'}); batches of {bench.plan.batch_windows} windows; "
          f"estimate pass {len(bench.plan.estimate_ids):,} windows", file=sys.stderr)
    print(f"setup: load {load_s:.1f} s, corpus {tokenize_s:.1f} s, resident {base_rss:.0f} MB", file=sys.stderr)

    first = windows[: bench.plan.batch_windows]
    bench.interleaved(first)  # warm-up: allocator, kernels, cuBLAS handles
    runs: list[dict[str, float]] = []
    for r in range(args.repeats):
        got = bench.interleaved(windows)
        runs.append(got)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{p} {got[p]:.2f} s ({bench.tokens / got[p]:,.0f} tokens/s)" for p in PHASES
        ) + f"; stage/bare {got['bare'] / got['stage']:.0%}, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)

    memory_windows = windows[: args.memory_batches * bench.plan.batch_windows]
    memory = {p: bench.isolated(p, memory_windows, base_rss) for p in PHASES}
    print("peak memory beyond the model and windows, each phase alone over "
          f"{memory_windows.shape[0]:,} windows: " + ", ".join(
              f"{p} +{m['peak_rss_mb']:.0f} MB" + (f" (GPU +{m['gpu_peak_mb']:.0f} MB)" if "gpu_peak_mb" in m else "")
              for p, m in memory.items()), file=sys.stderr)

    med = {p: statistics.median(x[p] for x in runs) for p in PHASES}
    tps = {p: bench.tokens / med[p] for p in PHASES}
    ratios_bare = [x["bare"] / x["stage"] for x in runs]
    ratios_trunc = [x["truncated"] / x["stage"] for x in runs]
    ratio_bare, ratio_trunc = statistics.median(ratios_bare), statistics.median(ratios_trunc)
    goal = GOALS["cuda" if device.startswith("cuda") else "cpu"]
    result = {
        "model": args.shape or args.model,
        "device": machine,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "layers": adapter.n_layers,
        "d_mlp": adapter.d_mlp,
        "corpus": corpus,
        "tokens": bench.tokens,
        "context": args.context,
        "batch_tokens": args.batch_tokens,
        "estimate_windows": len(bench.plan.estimate_ids),
        "repeats": args.repeats,
        "load_s": round(load_s, 2),
        "corpus_s": round(tokenize_s, 2),
        "tokens_per_s": {p: round(tps[p]) for p in PHASES},
        "seconds_median": {p: round(med[p], 3) for p in PHASES},
        "seconds_all": {p: [round(x[p], 3) for x in runs] for p in PHASES},
        "ratio_stage_over_bare": round(ratio_bare, 3),
        "ratio_stage_over_bare_all": [round(x, 3) for x in ratios_bare],
        "ratio_stage_over_truncated": round(ratio_trunc, 3),
        "ratio_stage_over_truncated_all": [round(x, 3) for x in ratios_trunc],
        "stage_split_median_s": {
            k: round(statistics.median(x[k] for x in runs), 3) for k in ("estimate_s", "streaming_s", "result_s")
        },
        "memory_windows": memory_windows.shape[0],
        "peak_rss_beyond_model_mb": {p: round(m["peak_rss_mb"], 1) for p, m in memory.items()},
        "gpu_peak_beyond_start_mb": (
            {p: round(m["gpu_peak_mb"], 1) for p, m in memory.items()} if gpu_name else None
        ),
        "goal": goal,
        "goal_met": ratio_bare >= goal,
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    mem = f"peak +{result['peak_rss_beyond_model_mb']['stage']:.0f} MB resident"
    if gpu_name:
        mem += f", +{result['gpu_peak_beyond_start_mb']['stage']:.0f} MB GPU"
    print(f"examples stage: {tps['stage']:,.0f} tokens/s = {ratio_bare:.0%} of the bare forward "
          f"({tps['bare']:,.0f} tokens/s; goal >= {goal:.0%}: {'met' if ratio_bare >= goal else 'NOT met'}), "
          f"{ratio_trunc:.0%} of the truncated forward ({tps['truncated']:,.0f} tokens/s); {mem}; "
          f"median of {args.repeats} on {machine}")


if __name__ == "__main__":
    from app.errors import NeedleError

    try:
        main()
    except NeedleError as exc:
        sys.exit(f"error: {exc}")
