"""Sparse autoencoders end to end, through the user's code paths, on SQLite and on Postgres:
`needle index`, then `needle sae train` (needle.sae.train) or `needle sae import` (the CLI's
main()), the jobs they run in-process, the stored rows, the pages over real HTTP and a live
latent clamp run by a real worker. What the stored figures should be is computed here
directly: the model run by plain torch hooks, SAEs run by sae_lens's own code.

1. Planted superposition: a tiny GPT-2 whose layer-0 MLP activations are, by construction,
   sparse non-negative combinations of 32 planted directions in its 16 neurons; an SAE trained
   by `needle sae train` finds most of them among its decoder directions.
2. An SAE saved by sae_lens and imported: the stored latent activations equal sae_lens's encode
   of the site's activations on the same corpus windows; its stored weights, written back by
   workers.sae.save_sae, load in sae_lens as the same SAE.
3. A latent clamp (workers.clamp.sweep with LatentUnits) equals a hand-written forward hook.
4. A latent's stored top window holds its max, and no window holds a larger one.
5. The SAE and latent pages, search and a live latent clamp over real HTTP.
6. Bad input to `needle sae import` / `needle sae train`: one clear error, nothing stored.
Also: `needle sae import --layer --site` of an SAE whose cfg.json names no hook, `needle sae
train` at a residual site, and `needle sae train` on a model indexed on a small corpus.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup
from sqlalchemy import func, select

from app import queries
from app.arrays import FLOAT32, INT32, unpack
from app.config import Settings
from app.db import engine_for, session_scope
from app.main import create_app
from app.schema import ExampleWindow, Job, Sae
from needle.cli import index_model
from tests.live_server import index_with_corpus, needle_in_process, running_server
from tests.tinymodels import TRAINING_TEXT, add_bos, build_tiny, tiny_tokenizer
from workers import clamp
from workers.corpus import load_corpus
from workers.loading import load_model
from workers.sae import sae_from_bytes, save_sae
from workers.saestages import LatentUnits
from workers.worker import Worker

TOL = 1e-5

# ---------------------------------------------------------------- shared helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and two threads on two busy cores spin-wait
    (an SAE training step is ~4 ms on one thread, 50-250 ms on two when another process runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_id(engine, name: str) -> int:
    with session_scope(engine) as s:
        return queries.get_model(s, name, tokenizer=False).id


def stored_sae(engine, model: str, name: str):
    """(the SAE's row fields, the stored SAE as Needle reads it)."""
    with session_scope(engine) as s:
        row = queries.get_sae(s, model_id(engine, model), name, weights=True)
        assert row is not None, name
        assert row.weights is not None, "the SAE has weights"
        fields = {k: getattr(row, k) for k in ("id", "name", "layer", "site", "architecture", "d_in", "d_sae",
                                                 "source", "cfg", "quality", "training", "weights")}
    return fields, sae_from_bytes(fields["cfg"], fields["weights"])


def sae_lens_copy(sae, folder: Path):
    """The stored SAE written by workers.sae.save_sae and read back by sae_lens itself."""
    from sae_lens import SAE

    save_sae(sae, folder)
    return SAE.load_from_disk(str(folder))


def windows_of(corpus: Path, tokenizer, context: int) -> torch.Tensor:
    """The corpus windows the examples stages read (workers.corpus's windowing of the same file)."""
    return load_corpus(str(corpus), tokenizer, context=context).windows


def bos_of(tokenizer) -> int | None:
    ids = tokenizer("a")["input_ids"]
    return ids[0] if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else None


def stored_examples(engine, name: str, basis: int, layer: int, latent: int) -> dict:
    """A latent's stored statistics and top windows (ids and maxima, best first, empty slots dropped)."""
    with session_scope(engine) as s:
        row = queries.neuron_activations(s, model_id(engine, name), layer, latent, basis)
        assert row is not None, (basis, layer, latent)
        windows = unpack(row.top_windows, INT32)
        maxima = unpack(row.top_max, FLOAT32)
        keep = windows >= 0
        return {"max": float(row.max_act), "min": float(row.min_act), "windows": windows[keep].tolist(),
                "top_max": maxima[keep].tolist()}


def stored_window_ids(engine, name: str, window: int) -> list[int]:
    with session_scope(engine) as s:
        row = s.get(ExampleWindow, (model_id(engine, name), window))
        assert row is not None, window
        return unpack(row.token_ids, INT32).tolist()


def counts(engine) -> tuple[int, int]:
    with session_scope(engine) as s:
        return (s.scalar(select(func.count()).select_from(Sae)), s.scalar(select(func.count()).select_from(Job)))


def window_maxima(acts_of_batch, windows: torch.Tensor, bos: int | None, batch: int = 64) -> torch.Tensor:
    """Each window's max of each latent, [windows, d_sae]: acts_of_batch(ids) -> latent activations
    [B, T(+BOS), d_sae] computed directly; the BOS position is left out, as the examples stage does."""
    out = []
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = windows[start : start + batch]
            if bos is not None:
                ids = torch.cat([torch.full((len(ids), 1), bos, dtype=ids.dtype), ids], dim=1)
            f = acts_of_batch(ids)
            f = f[:, 1:] if bos is not None else f
            out.append(f.amax(dim=1))
    return torch.cat(out)


def check_top_examples(engine, name: str, basis: int, layer: int, latents, maxima: torch.Tensor,
                       windows: torch.Tensor) -> None:
    """Each latent's stored top window is a corpus window whose direct max is the stored top-1 max,
    the stored max statistic equals it, and no window has a larger direct max."""
    for latent in latents:
        got = stored_examples(engine, name, basis, layer, latent)
        assert got["windows"], latent
        top = got["windows"][0]
        assert stored_window_ids(engine, name, top) == windows[top].tolist(), "the stored window is the corpus's"
        direct_top = float(maxima[top, latent])
        assert got["top_max"][0] == pytest.approx(direct_top, rel=1e-4, abs=1e-4), (latent, top)
        best = float(maxima[:, latent].max())
        assert direct_top == pytest.approx(best, rel=1e-4, abs=1e-4), f"latent {latent}: window {top} is not the top"
        assert got["max"] == pytest.approx(best, rel=1e-4, abs=1e-4), latent
        # the other stored windows hold their own maxima, in order
        for w, m in zip(got["windows"][1:4], got["top_max"][1:4]):
            assert m == pytest.approx(float(maxima[w, latent]), rel=1e-4, abs=1e-4), (latent, w)
        assert got["top_max"] == sorted(got["top_max"], reverse=True)


def assert_clear_error(result, phrase: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and phrase in lines[0], result.stderr


# ---------------------------------------------------------------- 1. planted superposition

M_FEATURES = 32  # planted directions
D_MODEL = 64
D_MLP = 16  # fewer neurons than planted directions
PLANTED_CONTEXT = 32
PLANTED_MAX_COSINE = 0.5  # no two planted directions closer than this: each is identifiable
PLANTED_SEED = 0
# over SAE seeds 0-9 of this setup the share ranged 0.75-0.97 (median 0.84; seed 0: 0.78), so the
# bound leaves a margin of two directions below the lowest
RECOVERY_BOUND = 0.7


def random_words(n: int, seed: int) -> str:
    """Words of random characters (ASCII, 2- and 3-byte UTF-8), so the byte-level tokenizer's byte
    tokens, not only the merges of TRAINING_TEXT, occur: many distinct tokens, each a different
    combination of planted features."""
    rng = random.Random(seed)
    printable = [chr(c) for c in range(33, 127)]
    words = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 5)):
            r = rng.random()
            if r < 0.4:
                chars.append(rng.choice(printable))
            elif r < 0.7:
                chars.append(chr(rng.randint(0xA0, 0x7FF)))
            else:
                c = rng.randint(0x800, 0xFFFD)
                chars.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0x4E00))
        words.append("".join(chars))
    return " ".join(words)


@dataclass
class Planted:
    path: Path
    corpus: Path
    directions: torch.Tensor  # [M, d_mlp] the planted p_f, unit norm, non-negative
    residual: torch.Tensor  # [M, d_model] the u_f, orthonormal, zero mean
    features: list[list[int]]  # each token's planted features
    eps: float


def planted_directions(gen: torch.Generator) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    while len(rows) < M_FEATURES:
        n = int(torch.randint(2, 5, (1,), generator=gen))
        p = torch.zeros(D_MLP)
        p[torch.randperm(D_MLP, generator=gen)[:n]] = torch.rand(n, generator=gen) + 0.2
        p = p / p.norm()
        if all(float(p @ q) <= PLANTED_MAX_COSINE for q in rows):
            rows.append(p)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    """A tiny GPT-2 (ReLU MLP) in which layer 0's MLP activations are relu(LN(e_t) W) =
    (1 / sqrt(|S_t| / 64 + eps)) * sum_{f in S_t} p_f: position embeddings 0, every attention
    output 0, token t's embedding sum_{f in S_t} u_f (u_f orthonormal, zero mean, so LN divides
    by sqrt(|S_t| / 64 + eps) only), c_fc = sum_f outer(u_f, p_f) with no bias, ln_2 the identity."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("planted") / "gpt2"
    tokenizer = tiny_tokenizer("byte_level")
    vocab = -(-len(tokenizer) // 64) * 64
    gen = torch.Generator().manual_seed(PLANTED_SEED)
    directions = planted_directions(gen)
    raw = torch.randn(D_MODEL, M_FEATURES, generator=gen)
    residual = torch.linalg.qr(raw - raw.mean(0, keepdim=True))[0].T.contiguous()  # rows orthonormal, zero mean
    features = [torch.randperm(M_FEATURES, generator=gen)[: int(torch.randint(1, 4, (1,), generator=gen))].tolist()
                for _ in range(vocab)]
    config = GPT2Config(vocab_size=vocab, n_positions=PLANTED_CONTEXT + 1, n_embd=D_MODEL, n_layer=2, n_head=2,
                        n_inner=D_MLP, activation_function="relu", bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(PLANTED_SEED)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(torch.stack([residual[s].sum(0) for s in features]))
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
        first = model.transformer.h[0]
        first.ln_2.weight.fill_(1.0)
        first.ln_2.bias.zero_()
        first.mlp.c_fc.weight.copy_(residual.T @ directions)  # Conv1D [64, 16]: sum_f outer(u_f, p_f)
        first.mlp.c_fc.bias.zero_()
    path.mkdir(parents=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    corpus = path.parent / "corpus.txt"
    corpus.write_text(TRAINING_TEXT * 5 + random_words(3000, PLANTED_SEED), encoding="utf-8")
    return Planted(path, corpus, directions, residual, features, config.layer_norm_epsilon)


@pytest.fixture(scope="module")
def planted_loaded(planted):
    return load_model(str(planted.path), device="cpu", dtype="float32")


def test_planted_model_is_sparse_superposition(planted, planted_loaded):
    """The construction itself: read_sites at (0, "mlp") is the formula, on every token of the corpus,
    and every planted feature occurs in the corpus."""
    assert bos_of(planted_loaded.tokenizer) is None
    assert (planted.residual.mean(1).abs() < 1e-6).all()
    torch.testing.assert_close(planted.residual @ planted.residual.T, torch.eye(M_FEATURES), atol=1e-5, rtol=0)
    assert (planted.directions >= 0).all()
    assert all(2 <= int((p > 0).sum()) <= 4 for p in planted.directions)
    windows = windows_of(planted.corpus, planted_loaded.tokenizer, PLANTED_CONTEXT)
    with torch.inference_mode(), planted_loaded.adapter.read_sites([(0, "mlp")]) as got:
        planted_loaded.model(input_ids=windows, use_cache=False)
    acts = got[(0, "mlp")]
    expected = torch.stack([planted.directions[s].sum(0) / math.sqrt(len(s) / D_MODEL + planted.eps)
                            for s in planted.features])[windows]
    torch.testing.assert_close(acts, expected, atol=1e-4, rtol=1e-5)
    seen = {f for t in windows.unique().tolist() for f in planted.features[t]}
    assert seen == set(range(M_FEATURES)), "every planted feature occurs in the corpus"
    assert int((acts > 0).sum(-1).max()) <= D_MLP and acts.shape[-1] == D_MLP < M_FEATURES


def own_mlp_site_hook(model, layer: int, fn):
    """A forward pre-hook on GPT-2's c_proj of `layer`: fn(acts) -> replacement (the neuron activations)."""
    def pre(module, args):
        return (fn(args[0]),)

    return model.transformer.h[layer].mlp.c_proj.register_forward_pre_hook(pre)


def test_planted_directions_are_recovered_by_needle_sae_train(db_url, planted, planted_loaded, tmp_path):
    from needle.sae import train

    settings = Settings(database_url=db_url)
    engine = engine_for(db_url)
    index_model(settings, str(planted.path), "planted", device="cpu", corpus=str(planted.corpus),
                context=PLANTED_CONTEXT, quiet=True)
    started = time.perf_counter()
    sae_id = train(settings, "planted", layer=0, site="mlp", latents=64, architecture="topk", k=3, tokens=20_000,
                   eval_tokens=1024, lr=5e-3, batch_size=256, epochs=20, sae_name="planted-sae", seed=0, quiet=True)
    seconds = time.perf_counter() - started
    row, sae = stored_sae(engine, "planted", "planted-sae")
    assert row["id"] == sae_id
    assert (row["layer"], row["site"], row["architecture"], row["d_in"], row["d_sae"]) == (0, "mlp", "topk", D_MLP, 64)
    assert row["source"] == "trained" and (sae.layer, sae.site, sae.k) == (0, "mlp", 3)
    assert row["training"]["steps"] == row["training"]["steps_planned"] > 1000
    assert row["quality"]["l0"] == pytest.approx(3, abs=0.5) and row["quality"]["variance_explained"] > 0.85
    with session_scope(engine) as s:
        jobs = {j.stage: j.state for j in queries.jobs_for_model(s, model_id(engine, "planted")) if j.key == f"sae:{sae_id}"}
    assert jobs == {"sae_train": "done", "sae_eval": "done", "sae_decode": "done", "sae_examples": "done"}

    decoder = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    best = (planted.directions @ decoder.T).max(dim=1).values
    share = float((best >= 0.9).float().mean())
    print(f"\nplanted recovery ({db_url.split(':')[0]}): {share:.3f} of {M_FEATURES} planted directions have a "
          f"decoder direction at cosine >= 0.9 (median best cosine {float(best.median()):.3f}); "
          f"train + eval + decode + examples {seconds:.1f} s, training {row['training']['seconds']:.1f} s "
          f"({row['training']['steps']} steps), variance explained {row['quality']['variance_explained']:.3f}")
    assert share >= RECOVERY_BOUND

    # 4. top examples equal a direct forward, sae_lens's encode of hand-hooked activations
    theirs = sae_lens_copy(sae, tmp_path / "planted-sae")
    model = planted_loaded.model
    windows = windows_of(planted.corpus, planted_loaded.tokenizer, PLANTED_CONTEXT)
    seen: dict[str, torch.Tensor] = {}

    def acts_of_batch(ids):
        def keep(x):
            seen["x"] = x
            return x

        handle = own_mlp_site_hook(model, 0, keep)
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        return theirs.encode(seen["x"].float())

    maxima = window_maxima(acts_of_batch, windows, None)
    alive = [i for i in maxima.amax(0).argsort(descending=True).tolist()[:6] if float(maxima[:, i].max()) > 0]
    assert len(alive) == 6
    check_top_examples(engine, "planted", sae_id, 0, alive, maxima, windows)

    # 3. a latent clamp (sweep with LatentUnits) equals a hand-written hook x + (v - f_i(x)) W_dec[i]
    latent = alive[0]
    m = float(maxima[:, latent].max())
    values = [-2 * m, 0.0, 0.5 * m, 3 * m, 8 * m]
    prompt = "The dog sat on the mat and"
    ids = torch.tensor([planted_loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]])

    def own_probs(v: float) -> torch.Tensor:
        def steer(x):
            f = theirs.encode(x.float())[..., latent]
            return (x.float() + (v - f)[..., None] * theirs.W_dec[latent].float()).to(x.dtype)

        handle = own_mlp_site_hook(model, 0, steer)
        try:
            with torch.no_grad():
                return torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
        finally:
            handle.remove()

    target = int(own_probs(values[-1]).argmax())
    direct = [float(own_probs(v)[target]) for v in values]
    swept = clamp.sweep(planted_loaded, 0, latent, prompt, target, values, units=LatentUnits(planted_loaded.adapter, sae))
    np.testing.assert_allclose(swept["probs"], direct, atol=TOL, rtol=0)
    assert max(direct) - min(direct) > 0.01, "the clamp moves p(target)"
    with torch.no_grad():
        unclamped = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
    assert swept["baseline"]["prob"] == pytest.approx(float(unclamped[target]), abs=TOL)
    # clamped at the last position only, the hook touches that position alone
    last = clamp.sweep(planted_loaded, 0, latent, prompt, target, values, last_only=True,
                       units=LatentUnits(planted_loaded.adapter, sae))
    assert last["positions"] == "last" and len(last["probs"]) == len(values)


# ---------------------------------------------------------------- 2. SAEs saved by sae_lens, imported

LLAMA = "tiny-llama"
LLAMA_CONTEXT = 16
LLAMA_CORPUS = TRAINING_TEXT * 4
MLP_HOOK = "blocks.1.mlp.hook_post"  # d_mlp 64
RESID_HOOK = "blocks.0.hook_resid_post"  # d_model 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("sae-llama") / "llama")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(str(llama_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llama_bos(tmp_path_factory):
    """The same kind of Llama whose tokenizer puts BOS in front, as Llama's own does."""
    path = add_bos(build_tiny("llama", tmp_path_factory.mktemp("sae-llama-bos") / "llama", seed=1))
    return path, load_model(str(path), device="cpu", dtype="float32")


def randomise(sae, seed: int) -> None:
    """Every parameter random and non-zero (biases included), as a trained SAE's would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def sae_lens_folder(folder: Path, kind: str, *, d_in: int, d_sae: int, hook: str | None, seed: int):
    """An SAE folder written by sae_lens's own save_model; returns (folder, the sae_lens SAE object)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook, model_name="tiny") if hook else SAEMetadata(model_name="tiny")
    common = {"d_in": d_in, "d_sae": d_sae, "metadata": metadata}
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(**common, k=4))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    randomise(sae, seed)
    sae.save_model(str(folder))
    assert (folder / "cfg.json").exists() and (folder / "sae_weights.safetensors").exists()
    return folder, sae.eval()


def own_site_hook(model, layer: int, site: str, fn):
    """A plain torch hook on a Llama's `site` of block `layer` (TransformerLens's hook points):
    fn(acts) -> the replacement. "mlp": down_proj's input; "mlp_out": the MLP's output;
    "resid_pre": the block's input; "resid_post": the block's output."""
    block = model.model.layers[layer]
    if site == "mlp":
        return block.mlp.down_proj.register_forward_pre_hook(lambda module, args: (fn(args[0]), *args[1:]))
    if site == "mlp_out":
        return block.mlp.register_forward_hook(lambda module, args, out: fn(out))
    if site == "resid_pre":
        def pre(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        return block.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    return block.register_forward_hook(post)


def llama_site(llama, layer: int, site: str):
    """acts_of_batch(ids) -> the site's activations [B, T, width], read by plain torch (not Needle's
    adapter): the residual sites from output_hidden_states, the MLP sites by own_site_hook."""
    model = llama.model

    def run(ids):
        if site in ("resid_pre", "resid_post"):
            at = layer if site == "resid_pre" else layer + 1
            assert at < len(model.model.layers), "the last hidden state is after the final norm"
            return model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[at]
        seen = {}

        def keep(x):
            seen["x"] = x
            return x

        handle = own_site_hook(model, layer, site, keep)
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        return seen["x"]

    return run


def own_clamp_probs(loaded, theirs, layer: int, site: str, latent: int, prompt: str, target: int,
                    values: list[float]) -> list[float]:
    """p(target) with the latent clamped by hand at every prompt position (BOS left alone):
    x' = x + (v - f_i(x)) W_dec[i], f_i by sae_lens's encode."""
    bos = bos_of(loaded.tokenizer)
    ids = ([bos] if bos is not None else []) + loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    skip = 1 if bos is not None else 0
    out = []
    for v in values:
        def steer(x, v=v):
            y = x.float().clone()
            f = theirs.encode(y[:, skip:])[..., latent]
            y[:, skip:] += (v - f)[..., None] * theirs.W_dec[latent].float()
            return y.to(x.dtype)

        handle = own_site_hook(loaded.model, layer, site, steer)
        try:
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits
        finally:
            handle.remove()
        out.append(float(torch.softmax(logits[0, -1].float(), -1)[target]))
    return out


@pytest.fixture
def llama_site_db(db_url, llama_dir, tmp_path):
    """The tiny Llama indexed on db_url as a user would: (settings, engine, corpus path)."""
    corpus = tmp_path / "corpus.txt"
    settings = index_with_corpus(db_url, llama_dir, LLAMA, LLAMA_CORPUS, LLAMA_CONTEXT, corpus)
    return settings, engine_for(db_url), corpus


# (sae_lens class, hook name, layer, site, d_in, d_sae, name)
IMPORTS = [
    ("standard", MLP_HOOK, 1, "mlp", 64, 96, "std-mlp"),
    ("topk", RESID_HOOK, 0, "resid_post", 32, 48, "topk-resid"),
    ("jumprelu", "blocks.1.hook_resid_pre", 1, "resid_pre", 32, 40, "jump-pre"),
    ("standard", "blocks.0.hook_mlp_out", 0, "mlp_out", 32, 24, "std-out"),
]


@pytest.mark.parametrize("with_bos", [False, True], ids=["no-bos", "bos"])
def test_imported_sae_lens_saes_store_sae_lens_activations(with_bos, db_url, llama_dir, llama, llama_bos, capsys,
                                                           monkeypatch, tmp_path):
    path, loaded = llama_bos if with_bos else (llama_dir, llama)
    bos = bos_of(loaded.tokenizer)
    assert (bos is not None) == with_bos
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LLAMA_CORPUS, encoding="utf-8")
    index_model(Settings(database_url=db_url), str(path), LLAMA, device="cpu", corpus=str(corpus),
                context=LLAMA_CONTEXT, quiet=True)
    engine = engine_for(db_url)
    windows = windows_of(corpus, loaded.tokenizer, LLAMA_CONTEXT)
    for seed, (kind, hook, layer, site, d_in, d_sae, name) in enumerate(IMPORTS):
        folder, theirs = sae_lens_folder(tmp_path / name, kind, d_in=d_in, d_sae=d_sae, hook=hook, seed=seed + 1)
        result = needle_in_process("sae", "import", LLAMA, str(folder), "--sae-name", name, db_url=db_url,
                                   capsys=capsys, monkeypatch=monkeypatch)
        assert result.returncode == 0, result.stderr
        assert f"/{LLAMA}/sae" in result.stdout
        row, ours = stored_sae(engine, LLAMA, name)
        assert (row["layer"], row["site"], row["d_in"], row["d_sae"]) == (layer, site, d_in, d_sae)
        assert row["architecture"] == kind and row["source"] == str(folder.resolve())
        assert row["quality"] is not None and row["quality"]["l0"] > 0 and row["training"] is None

        # every latent's stored max (statistic and top example) is sae_lens's encode on the same windows
        read = llama_site(loaded, layer, site)
        maxima = window_maxima(lambda ids, read=read, theirs=theirs: theirs.encode(read(ids).float()), windows, bos)
        with session_scope(engine) as s:
            mid = model_id(engine, LLAMA)
            rows = [queries.neuron_activations(s, mid, layer, i, row["id"]) for i in range(d_sae)]
            assert all(r is not None for r in rows), name
            stored_max = np.array([r.max_act for r in rows])
            top1 = np.array([unpack(r.top_max, FLOAT32)[0] for r in rows])
            top_windows = [int(unpack(r.top_windows, INT32)[0]) for r in rows]
            tokens = {int(r.tokens) for r in rows}
        direct = maxima.amax(0).numpy()
        assert (direct > 0).sum() >= d_sae // 2, f"{name}: most latents fire somewhere"
        np.testing.assert_allclose(stored_max, direct, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(top1, direct, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(maxima[top_windows, range(d_sae)].numpy(), direct, rtol=1e-4, atol=1e-4,
                                   err_msg=name)
        assert tokens == {windows.numel()}, "every corpus token, BOS left out"
        check_top_examples(engine, LLAMA, row["id"], layer, direct.argsort()[::-1][:5].tolist(), maxima, windows)

        # the stored weights, written back by save_sae, are the same SAE for sae_lens
        x = read(windows[:8]).float()
        again = sae_lens_copy(ours, tmp_path / f"{name}-again")
        assert type(again) is type(theirs)
        assert again.cfg.metadata.hook_name == hook
        torch.testing.assert_close(again.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        codes = theirs.encode(x)
        torch.testing.assert_close(again.decode(codes), theirs.decode(codes), atol=1e-5, rtol=1e-5)

        # 3. at every site, a latent clamp equals the hand-written hook
        latent = int(direct.argmax())
        values = [-3.0 * float(direct[latent]), 0.0, 2.0 * float(direct[latent]), 10.0 * float(direct[latent])]
        prompt = "The cat sat on the mat and"
        units = LatentUnits(loaded.adapter, ours)
        swept = clamp.sweep(loaded, layer, latent, prompt, 0, values, units=units)
        target = swept["top_tokens"]["high"][0]["token_id"]
        swept = clamp.sweep(loaded, layer, latent, prompt, target, values, units=units)
        own = own_clamp_probs(loaded, theirs, layer, site, latent, prompt, target, values)
        np.testing.assert_allclose(swept["probs"], own, atol=TOL, rtol=0, err_msg=name)
        assert max(own) > 1.5 * min(own), f"{name}: the clamp moves p(target)"

    result = needle_in_process("sae", "list", LLAMA, db_url=db_url, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0
    for line in ("std-mlp: layer 1 mlp, standard, 96 latents", "topk-resid: layer 0 resid_post, topk, 48 latents",
                 "jump-pre: layer 1 resid_pre, jumprelu, 40 latents", "std-out: layer 0 mlp_out, standard, 24 latents"):
        assert line in result.stdout, result.stdout


def test_import_of_an_sae_without_hook_name_takes_layer_and_site(llama_site_db, llama, db_url, capsys, monkeypatch,
                                                                  tmp_path):
    """`needle sae import --layer L --site S` is for an SAE whose cfg.json names no hook (the option's
    help: "where it reads, when its hook name does not say"): the SAE is stored at that site and its
    latents computed there."""
    _, engine, corpus = llama_site_db
    folder, theirs = sae_lens_folder(tmp_path / "no-hook", "standard", d_in=32, d_sae=24, hook=None, seed=11)
    assert not json.loads((folder / "cfg.json").read_text()).get("metadata", {}).get("hook_name")
    before = counts(engine)
    result = needle_in_process("sae", "import", LLAMA, str(folder), "--layer", "0", "--site", "mlp_out",
                               db_url=db_url, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert counts(engine)[0] == before[0] + 1
    row, ours = stored_sae(engine, LLAMA, "no-hook")
    assert (row["layer"], row["site"]) == (0, "mlp_out") and ours.hook_name == "blocks.0.hook_mlp_out"
    windows = windows_of(corpus, llama.tokenizer, LLAMA_CONTEXT)
    read = llama_site(llama, 0, "mlp_out")
    maxima = window_maxima(lambda ids: theirs.encode(read(ids).float()), windows, bos_of(llama.tokenizer))
    check_top_examples(engine, LLAMA, row["id"], 0, maxima.amax(0).argsort(descending=True)[:3].tolist(), maxima,
                       windows)


def test_cli_sae_train_at_a_residual_site(llama_site_db, llama, db_url, capsys, monkeypatch, tmp_path):
    """`needle sae train` itself (the CLI), at a residual site, on another corpus than the examples':
    the SAE is trained, evaluated, decoded and its examples computed on the examples corpus."""
    _, engine, corpus = llama_site_db
    result = needle_in_process("sae", "train", LLAMA, "--layer", "1", "--site", "resid_pre", "--latents", "64",
                               "--k", "4", "--arch", "batchtopk", "--corpus", "stdlib", "--tokens", "8192",
                               "--batch-size", "256", "--epochs", "2", db_url=db_url, capsys=capsys,
                               monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert f"/{LLAMA}/sae" in result.stdout
    row, ours = stored_sae(engine, LLAMA, "l1-resid-pre-64")
    assert (row["layer"], row["site"], row["d_in"], row["d_sae"], row["source"]) == (1, "resid_pre", 32, 64, "trained")
    assert row["architecture"] == "batchtopk" and ours.training_architecture == "batchtopk"
    assert row["training"]["corpus"] == "stdlib" and row["training"]["corpus_tokens"] == 8192
    assert row["training"]["steps"] == 64 and row["quality"]["l0"] > 0
    theirs = sae_lens_copy(ours, tmp_path / "trained")
    windows = windows_of(corpus, llama.tokenizer, LLAMA_CONTEXT)
    read = llama_site(llama, 1, "resid_pre")
    maxima = window_maxima(lambda ids: theirs.encode(read(ids).float()), windows, bos_of(llama.tokenizer))
    firing = [i for i in maxima.amax(0).argsort(descending=True)[:4].tolist() if float(maxima[:, i].max()) > 0]
    assert firing
    check_top_examples(engine, LLAMA, row["id"], 1, firing, maxima, windows)


def test_cli_sae_train_on_the_model_s_own_small_corpus(llama_site_db, llama, db_url, capsys, monkeypatch):
    """A model indexed on a small corpus (1,664 tokens here), then `needle sae train` with its
    defaults: the SAE trains on that corpus, a tenth of it held out for the quality figures (not the
    default 16,384 held-out tokens, which would leave nothing to train on). A batch bigger than what
    is left to train on is one clear error before anything is written."""
    _, engine, corpus = llama_site_db
    total = windows_of(corpus, llama.tokenizer, LLAMA_CONTEXT).numel()
    assert total < 16_384
    before = counts(engine)
    too_big = ("sae", "train", LLAMA, "--layer", "0", "--latents", "32", "--k", "4", "--batch-size", "4096")
    result = needle_in_process(*too_big, db_url=db_url, capsys=capsys, monkeypatch=monkeypatch)
    assert_clear_error(result, "fewer than one batch of 4,096")
    assert counts(engine) == before, "a refused train left an SAE or jobs behind"

    args = ("sae", "train", LLAMA, "--layer", "0", "--latents", "32", "--k", "4", "--batch-size", "256")
    result = needle_in_process(*args, db_url=db_url, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    row, _ = stored_sae(engine, LLAMA, "l0-mlp-32")
    training, quality = row["training"], row["quality"]
    assert training["corpus_tokens"] + training["held_out_tokens"] == total
    assert 0 < training["held_out_tokens"] <= total // 10
    assert quality is not None and quality["tokens"] > 0 and quality["l0"] > 0


# ---------------------------------------------------------------- 5. pages over real HTTP


def soup(r: httpx.Response) -> BeautifulSoup:
    assert r.status_code == 200, (r.request.url, r.status_code, r.text[:500])
    return BeautifulSoup(r.text, "html.parser")


def ok_json(http: httpx.Client, url: str) -> dict:
    r = http.get(url)
    assert r.status_code == 200, (url, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def test_sae_pages_search_and_live_latent_clamp(llama_site_db, llama, tmp_path):
    from needle.sae import import_folder

    settings, engine, _ = llama_site_db
    folder, theirs = sae_lens_folder(tmp_path / "pages", "standard", d_in=64, d_sae=96, hook=MLP_HOOK, seed=7)
    import_folder(settings, LLAMA, str(folder), sae_name="std", quiet=True)
    row, sae = stored_sae(engine, LLAMA, "std")
    base_url = f"/{LLAMA}/sae/std"
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        listing = ok_json(http, f"/{LLAMA}/sae.json")
        assert [x["name"] for x in listing["saes"]] == ["std"] and listing["saes"][0]["url"] == base_url
        assert soup(http.get(f"/{LLAMA}/sae")).find("a", href=base_url) is not None
        model = ok_json(http, f"/{LLAMA}.json")
        assert [x["name"] for x in model["saes"]] == ["std"]
        assert soup(http.get(f"/{LLAMA}")).find("a", href=base_url) is not None, "the model page lists the SAE"

        page = ok_json(http, f"{base_url}.json")
        assert {"quality", "density", "latents", "latents_stored", "site", "layer", "architecture"} <= set(page)
        assert (page["site"], page["layer"], page["architecture"], page["latents_stored"]) == ("mlp", 1, "standard", 96)
        assert page["quality"]["l0"] == pytest.approx(row["quality"]["l0"], rel=1e-5) and page["quality"]["l0"] > 0
        assert page["density"]["latents"] == 96
        assert len(page["latents"]) == 96 and all(x["url"].startswith(f"{base_url}/") for x in page["latents"])
        sae_html = soup(http.get(base_url))
        assert sae_html.find("a", href=page["latents"][0]["url"]) is not None
        # an mlp-site SAE's latents are decoded by their decoder directions (mapped by W_out), and say so
        assert page["input_side"] == "decoder"
        assert "Top decoder-direction tokens" in sae_html.select_one("table.neurons thead").get_text()

        stats = {i: stored_examples(engine, LLAMA, row["id"], 1, i)["max"] for i in range(96)}
        latent = max(stats, key=stats.get)
        data = ok_json(http, f"{base_url}/{latent}.json")
        keys = {"unit", "sae", "latent", "layer", "site", "examples", "interval_samples", "stats", "output_tokens",
                "input_tokens", "clamp_curves"}
        assert keys <= set(data), keys - set(data)
        assert (data["unit"], data["sae"], data["latent"], data["layer"], data["site"]) == ("latent", "std", latent, 1, "mlp")
        assert data["stats"]["max"] == pytest.approx(stats[latent], rel=1e-6)
        assert data["examples"] and data["examples"][0]["max_activation"] == pytest.approx(stats[latent], abs=1e-3)
        assert data["output_tokens"]["promoted"] and data["input_tokens"]
        html = soup(http.get(f"{base_url}/{latent}"))
        assert html.find("a", href=base_url) is not None, "the latent page links its SAE"
        # htmx navigation gets the title and content blocks alone, for the SAE's pages as for a neuron's
        for path, title in ((f"{base_url}/{latent}", f"Latent std/{latent} · {LLAMA}"), (base_url, None)):
            fragment = http.get(path, headers={"HX-Request": "true"})
            assert fragment.status_code == 200 and "<html" not in fragment.text, (path, fragment.text[:300])
            head = soup(fragment).find("title").get_text()
            assert title is None or head == f"{title} · Needle", head

        found = ok_json(http, f"/{LLAMA}/search.json?token=dog")
        assert found["latents"], "search finds latents"
        for hit in found["latents"][:10]:
            assert hit["kind"] == "latent" and hit["sae"] == "std" and 0 <= hit["latent"] < 96
            assert hit["url"] == f"{base_url}/{hit['latent']}"
            assert http.get(hit["url"]).status_code == 200
            own = ok_json(http, hit["url"] + ".json")
            assert own["latent"] == hit["latent"]
            ids = [t["token_id"] for t in own["input_tokens"]]  # the token's place in the latent's own decoding
            assert hit["decoding_rank"] == (ids.index(hit["token_id"]) + 1 if hit["token_id"] in ids else None)
            assert hit["decoding_kept"] == len(ids)
        assert all(r.get("kind") == "neuron" for r in found["results"])

        # a live clamp of the latent, run by a real worker
        prompt, dog = "The cat sat on the mat and", " dog"
        ask = {"prompt": prompt, "token": dog, "start": -20, "stop": 20, "count": 9}
        r = http.post(f"{base_url}/{latent}/clamp", json=ask)
        assert r.status_code == 202, r.text[:500]
        url = r.json()["curve"]["url"]
        assert url.startswith(f"{base_url}/{latent}/clamp/")
        r = http.post(f"{base_url}/{latent}/generate", json={"prompt": prompt, "value": 15, "tokens": 8, "seed": ""})
        assert r.status_code == 202, r.text[:500]
        gen_url = r.json()["generation"]["url"]
        assert gen_url.startswith(f"{base_url}/{latent}/generate/")
        text = "The dog sat on the mat. def feed(dog):"
        r = http.post(f"{base_url}/{latent}/text", json={"text": text})
        assert r.status_code == 202, r.text[:500]
        text_url = r.json()["run"]["url"]
        assert text_url.startswith(f"{base_url}/{latent}/text/")
        worker = Worker(engine, settings)
        thread = threading.Thread(target=worker.run, kwargs={"until_idle": True, "poll_seconds": 0.1}, daemon=True)
        thread.start()
        thread.join(120)
        assert not thread.is_alive(), "the worker did not go idle"
        curve = ok_json(http, url + ".json")["curve"]
        assert curve["state"] == "done" and curve["error"] is None, curve
        dog_id = llama.tokenizer(dog, add_special_tokens=False)["input_ids"]
        assert len(dog_id) == 1
        values = np.linspace(-20, 20, 9).tolist()
        direct = clamp.sweep(llama, 1, latent, prompt, dog_id[0], values, units=LatentUnits(llama.adapter, sae))
        np.testing.assert_allclose(curve["probs"], direct["probs"], atol=TOL, rtol=0)
        assert curve["baseline"] == pytest.approx(direct["baseline"], abs=TOL)
        assert max(direct["probs"]) > 2 * min(direct["probs"]), "the clamp moves p(' dog')"
        listed = ok_json(http, f"{base_url}/{latent}.json")["clamp_curves"]
        assert url in [c["url"] for c in listed]
        assert soup(http.get(url)).select_one("#clamp-result svg.clamp-curve") is not None

        # the clamped generation is workers.clamp.generate's with the latent's units
        gen = ok_json(http, gen_url + ".json")["generation"]
        assert gen["state"] == "done", gen
        expected = clamp.generate(llama, 1, latent, prompt, 15.0, tokens=8, units=LatentUnits(llama.adapter, sae))
        assert gen["clamped"] == expected["clamped"] and gen["unclamped"] == expected["unclamped"]
        # the text run holds the latent's activation on each token: sae_lens's encode of the site
        run = ok_json(http, text_url + ".json")
        assert (run["unit"], run["sae"], run["latent"]) == ("latent", "std", latent)
        result = run["run"]["result"]
        assert run["run"]["state"] == "done" and result is not None, run
        ids = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert result["token_ids"] == ids
        with torch.no_grad():
            own_acts = theirs.encode(llama_site(llama, 1, "mlp")(torch.tensor([ids])).float())[0, :, latent]
        assert (own_acts > 0).any()
        np.testing.assert_allclose(result["activations"], own_acts.numpy(), rtol=2e-3, atol=2e-3)

        # and the same curve by a hand-written hook with sae_lens's SAE: x + (v - f_i(x)) W_dec[i]
        ids = torch.tensor([llama.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        down = llama.model.model.layers[1].mlp.down_proj
        own = []
        for v in values:
            def steer(module, args, v=v):
                x = args[0].float()
                f = theirs.encode(x)[..., latent]
                return ((x + (v - f)[..., None] * theirs.W_dec[latent].float()).to(args[0].dtype),)

            handle = down.register_forward_pre_hook(steer)
            try:
                with torch.no_grad():
                    own.append(float(torch.softmax(llama.model(input_ids=ids).logits[0, -1].float(), -1)[dog_id[0]]))
            finally:
                handle.remove()
        np.testing.assert_allclose(curve["probs"], own, atol=TOL, rtol=0)


# ---------------------------------------------------------------- 6. bad input


def test_bad_sae_input_is_one_clear_error_and_stores_nothing(llama_site_db, db_url, capsys, monkeypatch, tmp_path):
    settings, engine, _ = llama_site_db

    def needle(*args):
        return needle_in_process(*args, db_url=db_url, capsys=capsys, monkeypatch=monkeypatch)

    good, _ = sae_lens_folder(tmp_path / "good", "standard", d_in=64, d_sae=32, hook=MLP_HOOK, seed=3)
    assert needle("sae", "import", LLAMA, str(good), "--sae-name", "taken").returncode == 0
    before = counts(engine)
    assert before[0] == 1

    empty = tmp_path / "no-cfg"
    empty.mkdir()
    (empty / "sae_weights.safetensors").write_bytes((good / "sae_weights.safetensors").read_bytes())
    narrow, _ = sae_lens_folder(tmp_path / "narrow", "standard", d_in=48, d_sae=32, hook=MLP_HOOK, seed=4)
    arch, _ = sae_lens_folder(tmp_path / "arch", "standard", d_in=64, d_sae=32, hook=MLP_HOOK, seed=5)
    cfg = json.loads((arch / "cfg.json").read_text())
    (arch / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated-banana"}))
    hook, _ = sae_lens_folder(tmp_path / "hook", "standard", d_in=64, d_sae=32, hook="blocks.1.attn.hook_z", seed=6)
    deep, _ = sae_lens_folder(tmp_path / "deep", "standard", d_in=64, d_sae=32, hook="blocks.7.mlp.hook_post", seed=7)

    cases = [
        (("sae", "import", LLAMA, str(empty)), "cfg.json is missing"),
        (("sae", "import", LLAMA, str(narrow)), "reads 48 values per token, but mlp"),
        (("sae", "import", LLAMA, str(arch)), "architecture 'gated-banana' is not one Needle reads"),
        (("sae", "import", LLAMA, str(hook)), "'blocks.1.attn.hook_z' is not one Needle reads"),
        (("sae", "import", LLAMA, str(deep)), "There is no layer 7"),
        (("sae", "import", LLAMA, str(good), "--sae-name", "taken"), "already has an SAE named 'taken'"),
        (("sae", "import", LLAMA, str(tmp_path / "nowhere")), "nowhere does not exist"),
        (("sae", "train", LLAMA, "--layer", "2"), "There is no layer 2"),
        (("sae", "train", LLAMA, "--layer", "9", "--site", "resid_post"), "There is no layer 9"),
        (("sae", "train", LLAMA, "--layer", "0", "--sae-name", "taken"), "already has an SAE named 'taken'"),
        (("sae", "train", "no-such-model", "--layer", "0"), "There is no model named 'no-such-model'"),
    ]
    for args, phrase in cases:
        result = needle(*args)
        assert_clear_error(result, phrase)
        assert result.stdout == "", (args, result.stdout)
        assert counts(engine) == before, args
