"""Train Needle's demo model: a small Llama-architecture causal LM on the Python standard library.

Seeded and reproducible on one Python version: the corpus is the interpreter's own stdlib
sources (sorted file list, tests and site-packages left out), the tokenizer is a byte-level
BPE trained with the `tokenizers` library, and the training loop draws its batches from a
seeded generator. Held out: every file whose path hashes (crc32) to 0 mod 20.

    python -m workers.demo_model --out assets/demo-model

writes config.json, model.safetensors (float16), tokenizer files and training.json (the
held-out loss beside a unigram baseline, quoted in the README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path

VOCAB_SIZE = 4096
SEQ_LEN = 128
SEED = 1234


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's Python sources (under root, default the running Python's), sorted,
    without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    # os.walk, pruned: site-packages is not read at all (with torch installed it holds tens of
    # thousands of files, and a pip install beside us adds and removes folders in it), and a
    # folder that vanishes while we walk is passed over
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(path: Path) -> bool:
    root = Path(sysconfig.get_paths()["stdlib"])
    return zlib.crc32(path.relative_to(root).as_posix().encode()) % 20 == 0


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_all(tok, texts: list[str]):
    import torch

    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def unigram_loss(train_ids, test_ids) -> float:
    """Cross-entropy of the held-out tokens under add-one unigram frequencies of train."""
    import torch

    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[test_ids].mean())


def heldout_loss(model, test_ids, batches: int = 40, batch_size: int = 16) -> float:
    import torch

    n = (len(test_ids) - 1) // SEQ_LEN
    starts = torch.arange(min(n, batches * batch_size)) * SEQ_LEN
    losses = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            s = starts[i : i + batch_size]
            x = torch.stack([test_ids[j : j + SEQ_LEN] for j in s.tolist()])
            losses.append(float(model(input_ids=x, labels=x).loss))
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/demo-model")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    torch.manual_seed(SEED)
    if args.threads:
        torch.set_num_threads(args.threads)
    files = stdlib_files()
    train_files = [p for p in files if not is_held_out(p)]
    test_files = [p for p in files if is_held_out(p)]
    train_texts, test_texts = read_texts(train_files), read_texts(test_files)
    tok = train_tokenizer(train_texts)
    train_ids, test_ids = encode_all(tok, train_texts), encode_all(tok, test_texts)
    print(f"train tokens {len(train_ids):,}  held-out tokens {len(test_ids):,}", flush=True)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (args.batch_size,), generator=gen)
        x = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:7.1f}s", flush=True)

    test_loss = heldout_loss(model, test_ids)
    base = unigram_loss(train_ids, test_ids)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    report = {
        "architecture": "LlamaForCausalLM",
        "parameters": n_params,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(test_ids),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "seed": SEED,
        "heldout_loss": round(test_loss, 4),
        "unigram_loss": round(base, 4),
        "train_seconds": round(time.time() - t0, 1),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
