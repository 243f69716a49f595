"""Benchmark: LM-head decoding of every MLP neuron against the bare matmuls of the same shapes.

    python bench/decode.py                     # CPU, GPT-2-small shape (12 x 3072, d 768, vocab 50257)
    python bench/decode.py --shape llama-8b --device cuda --dtype bfloat16   # on a GPU

Builds the model from a transformers config with random weights and decodes it through
the same adapter and decode code that `needle index` uses (search index included). The
baseline, measured in the same run (layer by layer, in turn with the decode), is the two
matmuls per batch that decoding cannot avoid (W_in . W_U^T and W_out . W_U^T) written
into a preallocated buffer, with nothing else. Prints both times, their ratio
and the peak memory beyond the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import reset_rss_peak, status_mb, sync  # noqa: E402  (bench/machine.py)

from workers.adapters import adapter_for  # noqa: E402
from workers.decode import SEARCH_K, RunningTopK, compute_dtype, decode_layers  # noqa: E402

SHAPES = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257, n_positions=64)),
    "llama-8b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=64)),
    "tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=2, n_inner=256, vocab_size=1000, n_positions=64)),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    family, kw = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        cfg, cls = GPT2Config(**kw), GPT2LMHeadModel
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    # Build on the meta device and fill only what decoding reads, so an 8B shape fits anywhere.
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def interleaved(adapter, batch: int, device: str) -> tuple[float, float]:
    """(decode seconds, bare-matmul seconds), measured layer by layer in turn so that any
    drift in the machine's speed falls on both alike. The decode keeps one search index
    across all layers, as a decode job does."""
    w_u = adapter.unembedding()
    cd = compute_dtype(w_u.dtype, w_u.device)
    w_u_t = w_u.to(cd).T
    # bare-matmul outputs go into a preallocated buffer: the strictest baseline
    out = torch.empty(min(batch, adapter.d_mlp), adapter.vocab_size, dtype=cd, device=w_u.device)
    search = RunningTopK(SEARCH_K, adapter.vocab_size, w_u.device)
    t_decode = t_bare = 0.0
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            sync(device)
            t0 = time.perf_counter()
            for _ in decode_layers(adapter, [layer], batch_size=batch, search=search):
                pass
            if layer == adapter.n_layers - 1:
                search.result()
            sync(device)
            t1 = time.perf_counter()
            w_in, w_out = adapter.input_weights(layer), adapter.output_weights(layer)
            for s in range(0, adapter.d_mlp, batch):
                n = min(batch, adapter.d_mlp - s)
                torch.matmul(w_in[s : s + batch].to(cd), w_u_t, out=out[:n])
                torch.matmul(w_out[s : s + batch].to(cd), w_u_t, out=out[:n])
            sync(device)
            t_decode += t1 - t0
            t_bare += time.perf_counter() - t1
    return t_decode, t_bare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json-out", type=Path, metavar="FILE",
                    help="also write the figures printed as JSON to FILE (bench/gpu.sh reads it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.shape, args.device, getattr(torch, args.dtype))
    adapter = adapter_for(model)
    sync(args.device)
    weights_mb = status_mb("VmRSS")
    # Warm up both paths on one layer's first batch.
    for _ in decode_layers(adapter, [0], batch_size=args.batch):
        break
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    reset_rss_peak()
    t_decode, t_bare = interleaved(adapter, args.batch, args.device)
    peak_mb = status_mb("VmHWM") - weights_mb
    gpu_peak_mb = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20 if args.device.startswith("cuda") else None
    neurons = adapter.n_layers * adapter.d_mlp
    result = {
        "shape": args.shape,
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "neurons": neurons,
        "vocab": adapter.vocab_size,
        "batch": args.batch,
        "decode_s": round(t_decode, 3),
        "bare_matmuls_s": round(t_bare, 3),
        "ratio": round(t_decode / t_bare, 3),
        "neurons_per_s": round(neurons / t_decode),
        "peak_mem_beyond_weights_mb": round(peak_mb, 1),
        "gpu_peak_beyond_weights_mb": round(gpu_peak_mb, 1) if gpu_peak_mb is not None else None,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
