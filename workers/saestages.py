"""Sparse autoencoders as jobs: each SAE is one basis of units (its latents) at one site of one
layer, computed by the same machinery as the neurons.

- sae_train: reads the site's activations on a corpus, trains the SAE on them (workers/sae.py,
  SAELens's architectures and losses) and stores its weights in SAELens's format.
- sae_eval: its quality on held-out text: L0, the fraction of variance explained, and the
  next-token cross-entropy with the reconstruction spliced in at its site, against the clean
  model and against the site zero-ablated (CE loss recovered).
- sae_decode: every latent's decodings through the LM head (workers/decode.py) and the basis's
  token search index.
- sae_examples: every latent's top contexts, interval samples and statistics over the model's
  example windows (workers/examples.py, with the SAE's encoder as the units' reader).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from app import queries
from app.arrays import FLOAT32, INT32, pack_rows
from app.errors import NeedleError
from workers import examples, store
from workers.corpus import bos_prefix_id, load_corpus
from workers.decode import SEARCH_K, RunningTopK, decode_layers
from workers.devices import compute_device
from workers.sae import Sae, sae_from_bytes, sae_to_bytes, train_sae

SAE_TRAIN = "sae_train"
SAE_EVAL = "sae_eval"
SAE_DECODE = "sae_decode"
SAE_EXAMPLES = "sae_examples"  # one pass; or, for a model whose examples run is sharded, the merge of:
SAE_EXAMPLES_RANGE = "sae_examples_range"  # the estimate pass of the SAE's latents
SAE_EXAMPLES_PART = "sae_examples_part"  # the streaming pass over one corpus shard
SAE_STAGES = (SAE_TRAIN, SAE_EVAL, SAE_DECODE, SAE_EXAMPLES, SAE_EXAMPLES_RANGE, SAE_EXAMPLES_PART)

RESIDUAL_SITES = ("mlp_out", "resid_pre", "resid_post")  # where an SAE reads the residual stream's space


def sae_key(sae_id: int) -> str:
    """The key of an SAE's jobs (its sharded examples' range and part jobs: parts_prefix)."""
    return f"sae:{sae_id}"


def parts_prefix(sae_id: int) -> str:
    """How the keys of an SAE's sharded examples' range and part jobs, and of their stored parts, start."""
    return sae_key(sae_id) + "/"


def latent_units(sae: Sae) -> examples.Units:
    """An SAE's latents as the examples pass reads them: its encoder applied to its site."""
    return examples.Units(site=sae.site, encode=sae.encode, width=sae.d_sae)


# ---- the SAE a job works on ---------------------------------------------------------------------

_sae_cache: dict[tuple, Sae] = {}


def stored_sae(ctx, sae_id: int, device) -> Sae:
    """The SAE's stored weights, on `device`; a worker keeps the last one it read."""

    def read(session: Session) -> tuple[Any, ...]:
        row = queries.get_sae_by_id(session, sae_id, weights=True)
        if row is None:
            raise NeedleError(f"SAE {sae_id} is not in the database any more (deleted while its jobs were queued).")
        if row.weights is None:
            raise RuntimeError(f"SAE {row.name!r} has no weights yet: its sae_train job must run first")
        return row.cfg, row.weights, row.updated_at

    cfg, blob, updated = ctx.read(read)
    key = (sae_id, str(updated), str(device))
    if key not in _sae_cache:
        _sae_cache.clear()
        _sae_cache[key] = sae_from_bytes(cfg, blob).to(device)
    return _sae_cache[key]


def riding_latents(ctx, device) -> list[tuple[int, int, Sae]]:
    """The SAEs whose examples are queued over the very windows this examples job reads (the
    same corpus, tokens and context, in one pass) and whose weights are ready: (their job's id,
    the SAE's id, the SAE). The examples job reads their latents in its own forward passes and
    finishes those jobs when it stores its rows; an SAE still training is left to its own job."""
    p = ctx.params

    def read(session: Session) -> list[tuple[int, int]]:
        return [(j.id, j.params["sae"]) for j in queries.jobs_for_model(session, ctx.model.id)
                if j.stage == SAE_EXAMPLES and j.state == "queued" and "layer_ranges" not in j.params
                and all(j.params.get(k) == p.get(k) for k in ("corpus", "tokens", "context"))]

    out = []
    for job_id, sae_id in ctx.read(read) or []:
        try:
            sae = stored_sae(ctx, sae_id, device)
        except (RuntimeError, NeedleError):  # not trained yet, or deleted: its own job sees to it
            continue
        out.append((job_id, sae_id, sae))
    return out


class LatentWeights:
    """An SAE's latents seen as decode_layers sees neurons: their output weights are the decoder
    directions in the residual stream (an mlp-site SAE's decoder mapped through the MLP's out
    projection, W_dec . W_out), their input weights the encoder directions where the SAE reads
    the residual stream. An mlp-site SAE's encoder reads the neurons, not the residual stream, so
    there the input side decodes the decoder direction too (`input_side` says which)."""

    def __init__(self, adapter, sae: Sae):
        self.adapter, self.sae = adapter, sae
        self.d_mlp = sae.d_sae  # decode_layers' unit count
        self.vocab_size = adapter.vocab_size
        self.logit_softcap = adapter.logit_softcap
        self.logit_scale = adapter.logit_scale
        self.input_side = "encoder" if sae.site in RESIDUAL_SITES else "decoder"

    def output_weights(self, layer: int) -> torch.Tensor:
        w_dec = self.sae.W_dec.detach()
        if self.sae.site == "mlp":
            w_out = self.adapter.output_weights(layer)
            return w_dec.to(w_out.device, torch.float32) @ w_out.float()
        return w_dec

    def input_weights(self, layer: int) -> torch.Tensor:
        if self.input_side == "encoder":
            return self.sae.W_enc.detach().T
        return self.output_weights(layer)

    def unembedding(self) -> torch.Tensor:
        return self.adapter.unembedding()

    def head_bias(self):
        return self.adapter.head_bias()

    def final_norm_scale(self):
        return self.adapter.final_norm_scale()


class LatentUnits:
    """An SAE's latents as the units a sweep or generation clamps (workers/clamp.py): clamping
    latent i to v at the SAE's site sets x' = x + (v - f_i(x)) d_i there, f_i(x) its activation
    and d_i its decoder direction, so the reconstruction error stays in."""

    shares_prefix = False

    def __init__(self, adapter, sae: Sae):
        self.adapter, self.sae = adapter, sae

    def check(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.sae.d_sae:
            from app.errors import NotFound

            raise NotFound(f"no latent {index}: the SAE has latents 0 to {self.sae.d_sae - 1}")

    @contextlib.contextmanager
    def read(self, layers) -> Iterator[dict[int, torch.Tensor]]:
        """Yield {layer: latent activations [batch, seq, d_sae]} of the next forward pass."""
        got: dict[int, torch.Tensor] = {}

        def keep(acts: torch.Tensor) -> None:
            got[self.sae.layer] = self.sae.encode(acts.to(self.sae.W_dec.device).float())

        with self.adapter.site_hook(self.sae.layer, self.sae.site, keep):
            yield got

    def clamp_rows(self, layer: int, rows: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, positions):
        """Per batch row rows[j]: latent indices[j] clamped to values[j] at `positions` (as Adapter.clamp_rows)."""
        for index in indices.tolist():
            self.check(int(index))
        sae = self.sae

        def replace(acts: torch.Tensor) -> torch.Tensor:
            where = positions(acts.shape[1]) if callable(positions) else positions
            dev = sae.W_dec.device  # the SAE's, where a layer of a model spread over devices may not be
            pos = torch.arange(acts.shape[1], device=dev)[where]
            r, i = rows.to(dev), indices.to(dev)
            x = acts.to(dev).float()
            picked = x[r[:, None], pos[None, :]]  # [n, P, d_in]
            own = sae.encode(picked).gather(-1, i[:, None, None].expand(-1, len(pos), 1))[..., 0]  # [n, P]
            v = values.to(device=dev, dtype=torch.float32)
            out = x.clone()
            out[r[:, None], pos[None, :]] = picked + (v[:, None] - own)[..., None] * sae.W_dec[i].float()[:, None, :]
            return out.to(acts.device, acts.dtype)

        return self.adapter.site_hook(sae.layer, sae.site, replace, prepend=True)


def units_for(ctx, loaded) -> Any:
    """The units a live request of this job clamps or reads: an SAE's latents when its params name
    one ("sae"), else None (the neurons)."""
    sae_id = ctx.params.get("sae")
    if sae_id is None:
        return None
    return LatentUnits(loaded.adapter, stored_sae(ctx, sae_id, compute_device(loaded.model)))


# ---- reading a site ------------------------------------------------------------------------------


def site_activations(loaded, layer: int, site: str, windows: torch.Tensor, bos: int | None, batch_tokens: int,
                     progress) -> torch.Tensor:
    """The site's activations on every token of `windows` (BOS left out), [tokens, d_in] float32 on the CPU."""
    device = compute_device(loaded.model)
    per_batch = max(1, batch_tokens // windows.shape[1])
    parts: list[torch.Tensor] = []

    def keep(layer_: int, acts: torch.Tensor) -> None:
        parts.append(acts.reshape(-1, acts.shape[-1]).float().cpu())

    units = examples.Units(site=site, width=loaded.adapter.site_width(site))
    for start in range(0, windows.shape[0], per_batch):
        batch = windows[start : start + per_batch]
        examples.forward_windows(loaded.model, loaded.adapter, [layer], batch, bos, keep, device, units)
        progress(batch.numel())
    return torch.cat(parts) if parts else torch.zeros(0, loaded.adapter.site_width(site))


def shuffled_batches(acts: torch.Tensor, batch_size: int, steps: int, seed: int, device) -> Iterator[torch.Tensor]:
    """`steps` batches of rows of acts, each epoch in a fresh seeded order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(acts), generator=gen)
    at = 0
    for _ in range(steps):
        if at + batch_size > len(order):
            order, at = torch.randperm(len(acts), generator=gen), 0
        yield acts[order[at : at + batch_size]].to(device, non_blocking=True)
        at += batch_size


HELD_OUT_SHARE = 0.1  # at most this share of a training corpus's windows is held out for the quality figures


def _split(corpus, tokens: int | None, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows). The corpus was read up to tokens + eval_tokens: the
    windows after the first `tokens` are held out. A corpus shorter than that holds out the last
    eval_tokens' windows, but at most HELD_OUT_SHARE of them (at least one where there are two), so
    a small corpus still trains."""
    n, context = corpus.windows.shape
    wanted = max(1, eval_tokens // context) if eval_tokens else 0
    if tokens is not None and n >= tokens // context + wanted:
        held = n - tokens // context
    else:
        held = min(wanted, max(1, int(n * HELD_OUT_SHARE))) if n > 1 else 0
    return corpus.windows[: n - held], corpus.windows[n - held :]


def training_corpus(tokenizer, p: dict) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(corpus, training windows, held-out windows) of an sae_train job's params; a NeedleError when
    the training windows are fewer tokens than one batch (`needle sae train` calls it before any write)."""
    corpus = load_corpus(p["corpus"], tokenizer, context=p["context"],
                         max_tokens=None if p.get("tokens") is None else p["tokens"] + p["eval_tokens"])
    train, held = _split(corpus, p.get("tokens"), p["eval_tokens"])
    if train.numel() < p["batch_size"]:
        raise NeedleError(f"The corpus {p['corpus']!r} gave {train.numel():,} training tokens, "
                          f"fewer than one batch of {p['batch_size']:,}.",
                          hint="Give more --tokens, a bigger --corpus or a smaller --batch-size.")
    return corpus, train, held


# ---- stages --------------------------------------------------------------------------------------


def run_sae_train(ctx) -> Any:
    p = ctx.params
    loaded = ctx.load(ctx.model)
    device = compute_device(loaded.model)
    corpus, train, held = training_corpus(loaded.tokenizer, p)
    bos = bos_prefix_id(loaded.tokenizer)
    steps = max(1, math.ceil(train.numel() * p["epochs"] / p["batch_size"]))
    ctx.phase("reading activations", train.numel(), "tok", 0.2)
    started = time.perf_counter()
    acts = site_activations(loaded, p["layer"], p["site"], train, bos, ctx.examples_batch_tokens, ctx.advance)
    read_seconds = time.perf_counter() - started
    ctx.phase("training", steps, "step", 0.8)
    last = [0]

    def progress(step: int, figures: dict) -> None:
        ctx.advance(step - last[0])
        last[0] = step

    sae, figures = train_sae(
        shuffled_batches(acts, p["batch_size"], steps, p["seed"], device),
        d_in=acts.shape[1], d_sae=p["d_sae"], architecture=p["architecture"], k=p.get("k"), steps=steps,
        batch_size=p["batch_size"], lr=p["lr"], seed=p["seed"], device=device, layer=p["layer"], site=p["site"],
        progress=progress,
    )
    cfg, blob = sae_to_bytes(sae.to("cpu"))
    training = {  # figures: what train_sae reports (steps, activations trained on, losses, seconds, ...)
        **figures, "corpus": corpus.spec, "corpus_description": corpus.description, "context": p["context"],
        "corpus_tokens": int(train.numel()), "held_out_tokens": int(held.numel()), "epochs": p["epochs"],
        "batch_size": p["batch_size"], "lr": p["lr"], "seed": p["seed"], "k": p.get("k"),
        "read_seconds": round(read_seconds, 2), "device": str(device),
    }

    def write(session: Session) -> None:
        queries.save_sae_weights(session, p["sae"], cfg, blob, training)

    return write


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, tokens predicted) of a batch."""
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return float(loss), int(ids[:, 1:].numel())


def evaluate(loaded, sae: Sae, windows: torch.Tensor, bos: int | None, batch_tokens: int, progress) -> dict:
    """An SAE's quality on windows (see the module docstring). Variance explained is
    1 - sum |x - x_hat|^2 / sum |x - mean x|^2 over every token (BOS left out of it)."""
    model, adapter = loaded.model, loaded.adapter
    device = compute_device(model)
    per_batch = max(1, batch_tokens // windows.shape[1])
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_pred = 0
    l0_sum, n_tok, sq_err = 0.0, 0, 0.0
    x_sum: torch.Tensor | None = None
    x_sq = 0.0
    skip = 1 if bos is not None else 0
    for start in range(0, windows.shape[0], per_batch):
        ids = windows[start : start + per_batch].to(device)
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype, device=device), ids], dim=1)
        seen: dict[str, torch.Tensor] = {}

        def splice(acts: torch.Tensor, seen: dict[str, torch.Tensor] = seen) -> torch.Tensor:
            x = acts.float()
            f = sae.encode(x)
            x_hat = sae.decode(f)
            seen.update(x=x[:, skip:], f=f[:, skip:], x_hat=x_hat[:, skip:])
            return x_hat.to(acts.dtype)

        with torch.inference_mode():
            loss, n = cross_entropy(model(input_ids=ids, use_cache=False).logits, ids)
            ce["clean"] += loss
            n_pred += n
            with adapter.site_hook(sae.layer, sae.site, splice, prepend=True):
                ce["spliced"] += cross_entropy(model(input_ids=ids, use_cache=False).logits, ids)[0]
            with adapter.site_hook(sae.layer, sae.site, torch.zeros_like, prepend=True):
                ce["zero"] += cross_entropy(model(input_ids=ids, use_cache=False).logits, ids)[0]
        x, f, x_hat = seen["x"].reshape(-1, sae.d_in), seen["f"].reshape(-1, sae.d_sae), seen["x_hat"].reshape(-1, sae.d_in)
        l0_sum += float((f > 0).sum())
        n_tok += x.shape[0]
        sq_err += float(((x - x_hat) ** 2).sum())
        x_sum = x.sum(0).double() if x_sum is None else x_sum + x.sum(0).double()
        x_sq += float((x.double() ** 2).sum())
        progress(ids.numel())
    mean = (x_sum / max(n_tok, 1)) if x_sum is not None else torch.zeros(sae.d_in, dtype=torch.float64)
    total_var = x_sq - n_tok * float((mean**2).sum())
    clean, spliced, zero = (ce[k] / max(n_pred, 1) for k in ("clean", "spliced", "zero"))
    return {
        "tokens": n_tok,
        "l0": l0_sum / max(n_tok, 1),
        "variance_explained": 1 - sq_err / total_var if total_var > 0 else None,
        "mse": sq_err / max(n_tok * sae.d_in, 1),
        "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
        "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else None,
    }


def run_sae_eval(ctx) -> Any:
    p = ctx.params
    loaded = ctx.load(ctx.model)
    device = compute_device(loaded.model)
    sae = stored_sae(ctx, p["sae"], device)
    corpus = load_corpus(p["corpus"], loaded.tokenizer, context=p["context"],
                         max_tokens=None if p.get("tokens") is None else p["tokens"] + p["eval_tokens"])
    _, held = _split(corpus, p.get("tokens"), p["eval_tokens"])
    ctx.set_total(held.numel())
    started = time.perf_counter()
    quality = evaluate(loaded, sae, held, bos_prefix_id(loaded.tokenizer), ctx.examples_batch_tokens, ctx.advance)
    quality.update(corpus=corpus.spec, seconds=round(time.perf_counter() - started, 2))

    def write(session: Session) -> None:
        queries.save_sae_quality(session, p["sae"], quality)

    return write


LINKS = 10  # neurons listed per latent, latents per neuron


def unit_links(sae: Sae, sae_id: int, k: int = LINKS) -> list[dict]:
    """An mlp-site SAE's decoder W_dec [d_sae, d_mlp] read both ways: per latent the neurons its
    decoder direction weighs most on, per neuron the latents whose decoder directions weigh most
    on it; by |weight|, signed (unit_links rows)."""
    w = sae.W_dec.detach().float().cpu()
    rows = []
    for basis, other, matrix in ((sae_id, queries.NEURONS, w), (queries.NEURONS, sae_id, w.T)):
        top = matrix.abs().topk(min(k, matrix.shape[1]), dim=1).indices
        weights = matrix.gather(1, top)
        blobs_ids = pack_rows(top.numpy(), INT32)
        blobs_w = pack_rows(weights.numpy(), FLOAT32)
        rows += [{"basis": basis, "layer": sae.layer, "neuron": i, "other": other, "ids": blobs_ids[i],
                  "weights": blobs_w[i]} for i in range(matrix.shape[0])]
    return rows


def run_sae_decode(ctx) -> Any:
    p = ctx.params
    loaded = ctx.load(ctx.model)
    adapter = loaded.adapter
    device = adapter.unembedding().device
    sae = stored_sae(ctx, p["sae"], device)
    view = LatentWeights(adapter, sae)
    search = RunningTopK(SEARCH_K, adapter.vocab_size, device)
    ctx.set_total(sae.d_sae)
    decodings = list(decode_layers(view, [sae.layer], decode_norm=ctx.model.decode_norm, batch_size=ctx.batch_size,
                                   search=search, progress=ctx.advance))
    top_scores, top_ids = search.result()
    scores = top_scores.cpu().numpy()
    ids = top_ids.cpu().numpy().astype(np.int64)
    mean_top100 = np.zeros((sae.layer + 1) * sae.d_sae, dtype=np.float32)
    mean_top100[sae.layer * sae.d_sae :] = decodings[0].mean_top100
    probs = store.search_probs(scores, ids, mean_top100)

    links = unit_links(sae, p["sae"]) if sae.site == "mlp" else []

    def write(session: Session) -> None:
        rows = store.neuron_rows(decodings[0])
        queries.replace_neurons(session, ctx.model.id, [sae.layer], rows, basis=p["sae"])
        queries.replace_unit_links(session, ctx.model.id, p["sae"], links)
        store.write_token_index(session, ctx.model.id, [(scores, ids, probs)], sae.d_sae, adapter.vocab_size,
                                basis=p["sae"])

    return write


def run_sae_examples(ctx) -> Any:
    p = ctx.params
    loaded = ctx.load(ctx.model)
    device = compute_device(loaded.model)
    sae = stored_sae(ctx, p["sae"], device)
    corpus = load_corpus(p["corpus"], loaded.tokenizer, context=p["context"], max_tokens=p.get("tokens"))
    bos = bos_prefix_id(loaded.tokenizer)
    batch_tokens = ctx.examples_batch_tokens
    n_windows = corpus.windows.shape[0]
    ctx.set_total((len(examples.plan(n_windows, p["context"], batch_tokens).estimate_ids) + n_windows) * p["context"])
    units = latent_units(sae)
    results = examples.collect(loaded.model, loaded.adapter, [sae.layer], corpus.windows, bos,
                               batch_tokens=batch_tokens, progress=ctx.advance, units=units)
    return latent_examples_writer(ctx, corpus, results)


def latent_examples_writer(ctx, corpus, results: list, parts: list[str] | None = None) -> Any:
    """Store an SAE's latents' examples (one pass's, or its sharded run's merged, whose stored
    parts then go), if the model's examples run is still the one they were read over."""
    n_windows = corpus.windows.shape[0]

    def write(session: Session) -> None:
        run = queries.example_run(session, ctx.model.id)
        if run is None or run.n_windows != n_windows or run.corpus != corpus.spec:
            raise RuntimeError("the model's examples run changed while its SAE's examples were computed; run again")
        store.write_unit_examples(session, ctx.model.id, ctx.params["sae"], corpus, results)
        if parts:
            queries.delete_example_parts(session, ctx.model.id, parts)

    return write


SAE_RUNNERS = {
    SAE_TRAIN: run_sae_train,
    SAE_EVAL: run_sae_eval,
    SAE_DECODE: run_sae_decode,
    SAE_EXAMPLES: run_sae_examples,
}

