"""Benchmark: what fires on a 2,000-character text against one forward pass over it.

    python bench/text.py                  # CPU: the demo model and its shipped SAE
    python bench/text.py --device cuda    # the same on a GPU
    python bench/text.py --no-sae         # the neurons only

The text is 2,000 characters of Python (the standard library's textwrap.py from its 2,000th
character on: the same text on every run of one Python), as a user would paste it; it runs as the job runs it (workers.scan: up to MAX_SCAN_TOKENS tokens, in
windows of the model's positions). Each unit's max on the corpus (the relative activation's
scale) comes from the examples stage run here beforehand over --tokens of the stdlib corpus,
neurons and the SAE's latents, as the stored maxima would.

What is timed, in the same run, alternating which goes first:

- scan: `workers.scan.scan(...)`, what the live job computes once it has read the maxima: the
  forward pass with every layer's neurons and the SAE's latents read, each unit's activation
  relative to its max, the top 10 per token and the text's top 20 merged over layers and bases.
- forward: the model's whole forward pass over the same windows, nothing read.
- forward_encode (with the SAE): the same, with a hook that encodes the SAE's site: the least
  any reading of the latents costs.

The times are medians over --repeats; the ratio is scan / forward. Goal (issue 22): the scan
within one forward pass plus 50% (ratio <= 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name, report, sync  # noqa: E402  (bench/machine.py)

from workers import examples
from workers.corpus import bos_prefix_id, load_corpus
from workers.loading import load_model
from workers.sae import load_sae
from workers.saestages import latent_units
from workers.scan import MAX_SCAN_TOKENS, maxima_by_layer, scan, text_windows, user_text_ids, window_tokens

DEMO_MODEL = ROOT / "assets" / "demo-model"
DEMO_SAE = ROOT / "assets" / "demo-sae"
GOAL = 1.5  # the scan within one forward pass plus 50%
SAE_BASIS = 1


def maxima_of(loaded, sae, tokens: int, device) -> list[tuple[int, int, int, float]]:
    """Each unit's max on the first `tokens` of the stdlib corpus, as the examples stage stores it."""
    corpus = load_corpus("stdlib", loaded.tokenizer, context=64, max_tokens=tokens)
    readers: list[examples.Reader] = [(list(range(loaded.adapter.n_layers)), examples.NEURON_UNITS)]
    if sae is not None:
        readers.append(([sae.layer], latent_units(sae)))
    results = examples.collect_readers(loaded.model, loaded.adapter, readers, corpus.windows,
                                       bos_prefix_id(loaded.tokenizer), device=device)
    out = []
    for r, per_layer in enumerate(results):
        for res in per_layer:
            out += [(0 if r == 0 else SAE_BASIS, res.layer, i, float(m)) for i, m in enumerate(res.max)]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=32_768, help="corpus tokens the maxima are taken over")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-sae", action="store_true", help="the neurons only")
    ap.add_argument("--json-out", help="also write the figures to this file (bench/gpu.sh)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    loaded = load_model(str(DEMO_MODEL), device=str(device), dtype="float32")
    sae = None if args.no_sae else load_sae(DEMO_SAE).to(device)
    rows = maxima_of(loaded, sae, args.tokens, device)
    maxima = maxima_by_layer(rows)
    # Python as a user pastes it, the same on every run: the standard library's textwrap.py, past its header
    text = Path(textwrap.__file__).read_text(encoding="utf-8")[2000:][: args.chars]
    ids, n_tokens, bos = user_text_ids(loaded, text, MAX_SCAN_TOKENS)
    saes = {} if sae is None else {SAE_BASIS: sae}
    # the same windows the scan reads
    batches = [x.to(device) for _, x in text_windows(ids, window_tokens(loaded))]
    if bos is not None:
        batches = [torch.cat([torch.full((x.shape[0], 1), bos, device=device), x], 1) for x in batches]

    def forward() -> None:
        with torch.inference_mode():
            for x in batches:
                loaded.model(input_ids=x, use_cache=False)

    def scanned() -> None:
        scan(loaded, ids, bos, maxima, saes)

    def forward_encode() -> None:
        assert sae is not None
        with torch.inference_mode(), loaded.adapter.site_hook(sae.layer, sae.site, lambda x: (sae.encode(x), None)[1]):
            for x in batches:
                loaded.model(input_ids=x, use_cache=False)

    sides = {"scan": scanned, "forward": forward}
    if sae is not None:
        sides["forward_encode"] = forward_encode
    for fn in sides.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            sync(str(device))
            t0 = time.perf_counter()
            sides[name]()
            sync(str(device))
            seconds[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in seconds.items()}
    out = {
        "machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device": str(device), "chars": len(text), "tokens": len(ids), "text_tokens": n_tokens,
        "units": len(rows), "sae": sae is not None, "repeats": args.repeats,
        "scan_ms": 1000 * med["scan"], "forward_ms": 1000 * med["forward"], "ratio": med["scan"] / med["forward"],
        "goal": GOAL, "goal_met": med["scan"] / med["forward"] <= GOAL,
    }
    if sae is not None:
        out.update(forward_encode_ms=1000 * med["forward_encode"], ratio_encode=med["scan"] / med["forward_encode"])
    print(f"machine: {out['machine']} ({device})")
    print(f"scan of {len(text)} characters ({len(ids)} tokens run of {n_tokens}; {len(rows):,} units"
          f"{' with the SAE' if sae is not None else ''}): {out['scan_ms']:.1f} ms; one forward pass "
          f"{out['forward_ms']:.1f} ms: ratio {out['ratio']:.2f} (goal <= {GOAL})"
          + (f"; forward + the SAE's encode {out['forward_encode_ms']:.1f} ms: ratio {out['ratio_encode']:.2f}"
             if sae is not None else ""))
    report(out, args.json_out)
    return out


if __name__ == "__main__":
    main()
