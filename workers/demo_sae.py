"""Train the demo's SAE: a BatchTopK sparse autoencoder on layer 2's MLP neurons of the demo
model (assets/demo-model), by the same code `needle sae train` runs, saved in SAELens's format.

    python -m workers.demo_sae --out assets/demo-sae

Seeded: the activations are read from the first TOKENS tokens of the Python standard library
(workers/corpus.py "stdlib", its files by path), shuffled and trained on for EPOCHS
epochs; its quality is measured on the HELD_OUT tokens that follow them. The weights are stored
in float16 (cfg.json says so; Needle and sae_lens compute in float32), and cfg.json's metadata
holds how it was trained and its quality.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

LAYER = 2
SITE = "mlp"
EXPANSION = 4
K = 32
TOKENS = 262_144
HELD_OUT = 16_384
CONTEXT = 64
EPOCHS = 2
BATCH = 1024
LR = 4e-4
SEED = 0


def main(argv: list[str] | None = None) -> None:
    import torch

    from workers.corpus import bos_prefix_id, load_corpus
    from workers.loading import load_model
    from workers.sae import save_sae, train_sae
    from workers.saestages import evaluate, shuffled_batches, site_activations

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo-model"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(SEED)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    corpus = load_corpus("stdlib", loaded.tokenizer, context=CONTEXT, max_tokens=TOKENS + HELD_OUT)
    held = HELD_OUT // CONTEXT
    train, test = corpus.windows[:-held], corpus.windows[-held:]
    bos = bos_prefix_id(loaded.tokenizer)
    started = time.perf_counter()
    acts = site_activations(loaded, LAYER, SITE, train, bos, 8192, lambda n: None)
    d_in = acts.shape[1]
    steps = math.ceil(acts.shape[0] * EPOCHS / BATCH)

    def progress(step: int, figures: dict) -> None:
        if step % 50 == 0 or step == steps:
            print(f"step {step}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)

    sae, figures = train_sae(shuffled_batches(acts, BATCH, steps, SEED, "cpu"), d_in=d_in, d_sae=EXPANSION * d_in,
                             architecture="batchtopk", k=K, steps=steps, batch_size=BATCH, lr=LR, seed=SEED,
                             device="cpu", layer=LAYER, site=SITE, progress=progress)
    quality = evaluate(loaded, sae, test, bos, 8192, lambda n: None)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        value = getattr(sae, name)
        if value is not None:
            setattr(sae, name, value.to(torch.float16))
    save_sae(sae, args.out, extra={
        "model_name": "needle-demo-model",
        "needle_training": {"corpus": corpus.description, "tokens": int(train.numel()), "epochs": EPOCHS,
                            "batch_size": BATCH, "lr": LR, "seed": SEED, "k": K, **figures,
                            "seconds": round(time.perf_counter() - started, 1)},
        "needle_quality": quality,
    })
    print(f"saved {args.out}: {sae.d_sae} latents; L0 {quality['l0']:.1f}, variance explained "
          f"{quality['variance_explained']:.3f}, CE loss recovered {quality['ce_recovered']:.3f}")


if __name__ == "__main__":
    main()
