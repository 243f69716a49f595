"""workers/sae.py against sae_lens 6 itself: SAE folders written by sae_lens's own save methods,
read by load_sae and run by Needle's pure-torch encode/decode next to sae_lens's; Needle-trained
SAEs read back by sae_lens; training on planted directions. No mocks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from app.errors import NeedleError
from workers.sae import (
    ARCHITECTURES,
    SITES,
    hook_name,
    load_sae,
    normalize_architecture,
    parse_hook_name,
    sae_from_bytes,
    sae_to_bytes,
    save_sae,
    train_sae,
)

D_IN, D_SAE = 16, 48
HOOK = "blocks.2.hook_resid_post"


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)


# ---- SAEs written by sae_lens ----------------------------------------------------------------


def randomise(sae, seed: int = 0) -> None:
    """Every parameter random and non-zero, biases included; JumpReLU thresholds in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def cfg_kwargs(apply_b_dec: bool = True, hook: str | None = HOOK, **extra):
    metadata = SAEMetadata(hook_name=hook) if hook else SAEMetadata()
    return {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": apply_b_dec, "metadata": metadata, **extra}


def sae_lens_folder(tmp_path: Path, kind: str, apply_b_dec: bool = True) -> Path:
    """An SAE folder written by sae_lens: kind is standard, topk, topk_rescaled, jumprelu,
    batchtopk (save_inference_model of a BatchTopK training SAE) or batchtopk_checkpoint (its save_model)."""
    folder = tmp_path / kind
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(**cfg_kwargs(apply_b_dec)))
    elif kind in ("topk", "topk_rescaled"):
        sae = TopKSAE(TopKSAEConfig(**cfg_kwargs(apply_b_dec, k=5, rescale_acts_by_decoder_norm=kind == "topk_rescaled")))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**cfg_kwargs(apply_b_dec)))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**cfg_kwargs(apply_b_dec, k=4.0)))
        sae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    randomise(sae, seed=len(kind) + apply_b_dec)
    if kind == "batchtopk":
        sae.save_inference_model(folder)
    else:
        sae.save_model(folder)
    return folder


def inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, D_IN, generator=g) * 2  # [batch, seq, d_in]


def assert_same_function(ours, theirs) -> None:
    """Needle's encode and decode equal sae_lens's, on inputs where some latents fire and some do not."""
    x = inputs()
    f_theirs = theirs.encode(x)
    f_ours = ours.encode(x)
    assert f_ours.shape == (3, 7, D_SAE) and f_ours.dtype == torch.float32
    assert (f_theirs > 0).any() and (f_theirs == 0).any()
    close(f_ours, f_theirs)
    close(ours.decode(f_theirs), theirs.decode(f_theirs))
    codes = torch.rand(5, D_SAE) * (torch.rand(5, D_SAE) < 0.2)
    close(ours.decode(codes), theirs.decode(codes))


SAE_LENS_KINDS = ["standard", "topk", "topk_rescaled", "jumprelu", "batchtopk"]


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("kind", SAE_LENS_KINDS)
def test_sae_lens_files_load_and_run_as_in_sae_lens(tmp_path, kind, apply_b_dec):
    folder = sae_lens_folder(tmp_path, kind, apply_b_dec)
    theirs = SAE.load_from_disk(folder)
    ours = load_sae(folder)
    assert (ours.layer, ours.site, ours.hook_name) == (2, "resid_post", HOOK)
    assert ours.apply_b_dec_to_input is apply_b_dec
    assert ours.architecture == ("jumprelu" if kind == "batchtopk" else kind.removesuffix("_rescaled"))
    assert ours.training_architecture == ("batchtopk" if kind == "batchtopk" else ours.architecture)
    assert ours.cfg == json.loads((folder / "cfg.json").read_text())
    assert_same_function(ours, theirs)

    # float64 inputs are computed in float64, to the same values
    x = inputs(2).double()
    assert ours.encode(x).dtype == torch.float64
    close(ours.encode(x), theirs.encode(x))

    # written again by Needle, sae_lens reads the same SAE
    save_sae(ours, tmp_path / "again", extra={"model_name": "tiny"})
    again = SAE.load_from_disk(tmp_path / "again")
    assert type(again) is type(theirs)
    assert again.cfg.metadata.hook_name == HOOK and again.cfg.metadata.model_name == "tiny"
    assert_same_function(ours, again)


def test_batchtopk_training_checkpoint_converts_as_sae_lens_saves_it(tmp_path):
    """sae_lens's save_model of a BatchTopK training SAE (architecture batchtopk, topk_threshold, decoder
    norms not folded) reads as the JumpReLU SAE that its save_inference_model writes."""
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**cfg_kwargs(k=4.0)))
    sae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    randomise(sae, seed=5)
    sae.save_model(tmp_path / "checkpoint")
    sae.save_inference_model(tmp_path / "inference")
    assert json.loads((tmp_path / "checkpoint" / "cfg.json").read_text())["architecture"] == "batchtopk"
    ours = load_sae(tmp_path / "checkpoint")
    assert ours.architecture == "jumprelu" and ours.training_architecture == "batchtopk"
    assert_same_function(ours, SAE.load_from_disk(tmp_path / "inference"))


def test_pre_6_cfg_with_top_level_hook_name_loads_as_sae_lens_reads_it(tmp_path):
    """A cfg.json in sae_lens's pre-6.0 layout (no version, hook_point at the top level, topk as an
    activation_fn, normalize_activations false): sae_lens still reads it, and so does Needle."""
    for kind in ("standard", "topk"):
        folder = sae_lens_folder(tmp_path, kind)
        cfg = json.loads((folder / "cfg.json").read_text())
        old = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "float32", "device": "cpu",
               "hook_point": HOOK, "model_name": "gpt2", "normalize_activations": False, "apply_b_dec_to_input": True}
        if kind == "topk":
            old.update(activation_fn="topk", activation_fn_kwargs={"k": cfg["k"]})
        (folder / "cfg.json").write_text(json.dumps(old))
        theirs = SAE.load_from_disk(folder)
        ours = load_sae(folder)
        assert (ours.architecture, ours.k, ours.hook_name) == (kind, 5 if kind == "topk" else None, HOOK)
        assert_same_function(ours, theirs)
        save_sae(ours, tmp_path / f"{kind}_again")
        written = json.loads((tmp_path / f"{kind}_again" / "cfg.json").read_text())
        assert written["metadata"]["hook_name"] == HOOK and written["metadata"]["model_name"] == "gpt2"
        assert_same_function(ours, SAE.load_from_disk(tmp_path / f"{kind}_again"))


def test_load_accepts_the_cfg_or_weights_file_and_to_moves(tmp_path):
    folder = sae_lens_folder(tmp_path, "jumprelu")
    a, b = load_sae(folder / "cfg.json"), load_sae(str(folder / "sae_weights.safetensors"))
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.threshold, b.threshold)
    moved = a.to("cpu")
    assert moved is not a and torch.equal(moved.encode(inputs()), a.encode(inputs()))


# ---- Needle-trained SAEs ----------------------------------------------------------------------


def planted(d_in: int = 32, m: int = 64, active: int = 3, seed: int = 0):
    """m unit directions in d_in dimensions (m > d_in); each activation is the sum of `active` of them,
    chosen at random, with coefficients in [0.5, 1.5). Returns (directions, batches(n, size))."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d_in, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)

    def batches(n: int, size: int):
        for _ in range(n):
            which = torch.rand(size, m, generator=g).argsort(dim=-1)[:, :active]
            coefficients = torch.zeros(size, m).scatter_(1, which, torch.rand(size, active, generator=g) + 0.5)
            yield coefficients @ directions

    return directions, batches


def quick_train(architecture: str, steps: int = 30, seed: int = 0, data_seed: int = 0, **kwargs):
    _, batches = planted(d_in=D_IN, m=24, seed=data_seed)
    options = {"k": 3 if architecture in ("topk", "batchtopk") else None, "batch_size": 64, "lr": 3e-3,
               "device": "cpu", "layer": 4, "site": "mlp_out", **kwargs}
    return train_sae(batches(steps, options["batch_size"]), d_in=D_IN, d_sae=D_SAE, architecture=architecture,
                     steps=steps, seed=seed, **options)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trained_sae_saves_for_sae_lens(tmp_path, architecture):
    seen = []
    ours, figures = quick_train(architecture, progress=lambda step, figs: seen.append((step, figs)), progress_every=10)
    assert [step for step, _ in seen] == [10, 20, 30]
    assert {"loss", "l0", "mse", "explained_variance", "dead_latents", "current_lr"} <= set(seen[-1][1])
    assert figures["steps"] == 30 and figures["tokens"] == 30 * 64 and figures["activations_per_second"] > 0
    assert figures["loss"] == seen[-1][1]["loss"] and figures["l0"] > 0
    assert ours.architecture == ("jumprelu" if architecture == "batchtopk" else architecture)
    assert ours.training_architecture == architecture
    meta = ours.cfg["metadata"]
    assert (meta["hook_name"], meta["layer"], meta["site"]) == ("blocks.4.hook_mlp_out", 4, "mlp_out")
    assert meta["needle_training"]["steps"] == 30
    # decoder rows unit norm: the norms are folded into the encoder
    close(ours.W_dec.norm(dim=-1), torch.ones(D_SAE))

    save_sae(ours, tmp_path / "sae")
    theirs = SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.metadata.hook_name == "blocks.4.hook_mlp_out"
    assert theirs.cfg.metadata.training_architecture == architecture
    x = next(planted(d_in=D_IN, m=24, seed=9)[1](1, 50))
    close(ours.encode(x), theirs.encode(x))
    assert (ours.encode(x) > 0).any()
    close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)))

    back = load_sae(tmp_path / "sae")
    assert torch.equal(back.W_enc, ours.W_enc) and back.cfg == ours.cfg


def test_bytes_round_trip():
    ours, _ = quick_train("batchtopk", steps=10)
    cfg, weights = sae_to_bytes(ours, extra={"model_name": "tiny"})
    assert isinstance(weights, bytes) and json.loads(json.dumps(cfg)) == cfg
    back = sae_from_bytes(cfg, weights)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(ours, name)), name
    assert (back.architecture, back.layer, back.site, back.k) == (ours.architecture, ours.layer, ours.site, ours.k)
    assert back.cfg["metadata"]["model_name"] == "tiny"
    assert sae_to_bytes(back)[1] == weights


@pytest.mark.parametrize("architecture", ["batchtopk", "topk"])
def test_planted_directions_are_recovered(architecture):
    directions, batches = planted(d_in=32, m=64, active=3, seed=0)
    steps = 800
    ours, figures = train_sae(batches(steps, 256), d_in=32, d_sae=128, architecture=architecture, k=3, steps=steps,
                              batch_size=256, lr=3e-3, seed=0, device="cpu", layer=0, site="resid_post")
    decoder = ours.W_dec / ours.W_dec.norm(dim=-1, keepdim=True)
    best = (directions @ decoder.T).max(dim=1).values
    share = (best >= 0.9).float().mean().item()
    print(f"{architecture}: {share:.3f} of 64 planted directions at cosine >= 0.9, "
          f"{figures['seconds']:.2f} s, {figures['activations_per_second']:.0f} activations/s, "
          f"explained variance {figures['explained_variance']:.3f}")
    assert share >= 0.8
    assert abs(figures["l0"] - 3) < 0.5


def test_same_seed_same_weights():
    a, _ = quick_train("topk", steps=20, seed=7)
    b, _ = quick_train("topk", steps=20, seed=7)
    c, _ = quick_train("topk", steps=20, seed=8)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.W_enc, c.W_enc)


def test_training_stops_where_the_batches_end():
    _, batches = planted(d_in=D_IN, m=24)
    seen = []
    ours, figures = train_sae(batches(12, 32), d_in=D_IN, d_sae=D_SAE, architecture="relu", k=None, steps=50,
                              batch_size=32, lr=1e-3, seed=0, device="cpu", layer=0, site="mlp",
                              progress=lambda step, figs: seen.append(step), progress_every=5)
    assert (figures["steps"], figures["steps_planned"], figures["tokens"]) == (12, 50, 12 * 32)
    assert seen == [5, 10, 12]
    assert ours.architecture == "standard" and ours.hook_name == "blocks.0.mlp.hook_post"


# ---- names ------------------------------------------------------------------------------------


def test_hook_names_round_trip():
    assert SITES == ("mlp", "mlp_out", "resid_pre", "resid_post")
    names = [hook_name(3, site) for site in SITES]
    assert names == ["blocks.3.mlp.hook_post", "blocks.3.hook_mlp_out", "blocks.3.hook_resid_pre",
                     "blocks.3.hook_resid_post"]
    assert [parse_hook_name(name) for name in names] == [(3, site) for site in SITES]
    assert normalize_architecture("relu") == "standard"
    assert [normalize_architecture(a) for a in ARCHITECTURES] == list(ARCHITECTURES)


# ---- bad input --------------------------------------------------------------------------------


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(NeedleError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_bad_folders(tmp_path):
    one_line_error(lambda: load_sae(tmp_path / "nowhere"), "nowhere", "does not exist")
    folder = sae_lens_folder(tmp_path, "standard")
    (folder / "cfg.json").rename(tmp_path / "kept.json")
    one_line_error(lambda: load_sae(folder), str(folder / "cfg.json"), "is missing")
    (tmp_path / "kept.json").rename(folder / "cfg.json")
    (folder / "sae_weights.safetensors").rename(tmp_path / "kept.safetensors")
    one_line_error(lambda: load_sae(folder), "sae_weights.safetensors is missing")
    (folder / "sae_weights.safetensors").write_bytes(b"not safetensors")
    one_line_error(lambda: load_sae(folder), "sae_weights.safetensors is not a readable safetensors file")
    shutil.copy(tmp_path / "kept.safetensors", folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text("{not json")
    one_line_error(lambda: load_sae(folder), "cfg.json is not readable JSON")
    one_line_error(lambda: save_sae(load_sae(sae_lens_folder(tmp_path, "topk")), folder / "cfg.json"),
                   "is a file, not a folder")


def test_bad_cfgs(tmp_path):
    gated = tmp_path / "gated"
    sae = GatedSAE(GatedSAEConfig(**cfg_kwargs()))
    randomise(sae)
    sae.save_model(gated)
    one_line_error(lambda: load_sae(gated), "gated/cfg.json", "architecture 'gated' is not one Needle reads")

    pattern = tmp_path / "pattern"
    StandardSAE(StandardSAEConfig(**cfg_kwargs(hook="blocks.2.attn.hook_pattern"))).save_model(pattern)
    one_line_error(lambda: load_sae(pattern), "pattern/cfg.json", "'blocks.2.attn.hook_pattern' is not one Needle reads",
                   "blocks.L.mlp.hook_post, blocks.L.hook_mlp_out, blocks.L.hook_resid_pre or blocks.L.hook_resid_post")

    nohook = tmp_path / "nohook"
    StandardSAE(StandardSAEConfig(**cfg_kwargs(hook=None))).save_model(nohook)
    one_line_error(lambda: load_sae(nohook), "nohook/cfg.json names no hook (metadata.hook_name)")

    for normalize, hint in (("layer_norm", "at run time"), ("expected_average_only_in", "fold_activation_norm_scaling_factor")):
        folder = tmp_path / normalize
        StandardSAE(StandardSAEConfig(**cfg_kwargs(normalize_activations=normalize))).save_model(folder)
        one_line_error(lambda folder=folder: load_sae(folder), f"normalize_activations is '{normalize}'", hint)

    shapes = sae_lens_folder(tmp_path, "standard")
    edit_cfg(shapes, d_sae=40)
    one_line_error(lambda: load_sae(shapes), "W_enc has shape [16, 48]", "needs [16, 40]")
    edit_cfg(shapes, d_sae="48")
    one_line_error(lambda: load_sae(shapes), "d_sae must be a whole number 1 or more, not '48'")

    topk = sae_lens_folder(tmp_path, "topk")
    edit_cfg(topk, k=D_SAE + 1)
    one_line_error(lambda: load_sae(topk), "k must be a whole number from 1 to d_sae (48), not 49")

    jump = sae_lens_folder(tmp_path, "jumprelu")
    edit_cfg(jump, architecture="standard")
    one_line_error(lambda: load_sae(jump), "has tensor threshold, which a standard SAE does not have")
    standard = sae_lens_folder(tmp_path / "s", "standard")
    edit_cfg(standard, architecture="jumprelu")
    one_line_error(lambda: load_sae(standard), "has no tensor threshold, which a jumprelu SAE needs")

    cfg, weights = sae_to_bytes(load_sae(sae_lens_folder(tmp_path / "b", "topk")))
    one_line_error(lambda: sae_from_bytes(cfg, b"garbage"), "are not readable safetensors bytes")
    one_line_error(lambda: sae_from_bytes({**cfg, "d_in": 8}, weights), "the weights of the stored SAE: W_enc has shape")


def test_bad_names_and_training_arguments():
    one_line_error(lambda: parse_hook_name("blocks.x.hook_resid_post"), "'blocks.x.hook_resid_post'", "blocks.L.hook_mlp_out")
    one_line_error(lambda: parse_hook_name("blocks.1.attn.hook_z"), "is not one Needle reads")
    one_line_error(lambda: hook_name(1, "attn"), "Unknown site 'attn'", "mlp, mlp_out, resid_pre, resid_post")
    one_line_error(lambda: hook_name(-1, "mlp"), "layer must be a whole number")
    one_line_error(lambda: normalize_architecture("gated"), "Unknown SAE architecture 'gated'", "relu")
    one_line_error(lambda: quick_train("topk", k=None), "A topk SAE needs k")
    one_line_error(lambda: quick_train("batchtopk", k=D_SAE + 1), "from 1 to d_sae (48)")
    one_line_error(lambda: quick_train("standard", lr=0.0), "learning rate must be a number above 0")
    one_line_error(lambda: quick_train("standard", site="attn"), "Unknown site 'attn'")
    one_line_error(lambda: train_sae(iter([torch.zeros(4, D_IN + 1)]), d_in=D_IN, d_sae=D_SAE, architecture="standard",
                                     k=None, steps=1, batch_size=4, lr=1e-3, seed=0, device="cpu", layer=0, site="mlp"),
                   f"must be [n, {D_IN}] activations; got [4, {D_IN + 1}]")
    one_line_error(lambda: train_sae(iter([]), d_in=D_IN, d_sae=D_SAE, architecture="standard", k=None, steps=1,
                                     batch_size=4, lr=1e-3, seed=0, device="cpu", layer=0, site="mlp"),
                   "no activations to train")
    if not torch.cuda.is_available():
        one_line_error(lambda: quick_train("standard", device="cuda"), "Device 'cuda' is not available")
    sae = load_sae_from_training()
    one_line_error(lambda: sae.encode(torch.zeros(2, D_IN + 1)), f"reads vectors of {D_IN} values; these have {D_IN + 1}")
    one_line_error(lambda: sae.decode(torch.zeros(2, D_SAE - 1)), f"has {D_SAE} latents")


def load_sae_from_training():
    return quick_train("standard", steps=2)[0]


def test_reading_and_running_does_not_import_sae_lens(tmp_path):
    folder = sae_lens_folder(tmp_path, "topk")
    code = ("import sys; from workers.sae import load_sae; import torch; "
            f"s = load_sae({str(folder)!r}); s.decode(s.encode(torch.ones(2, {D_IN}))); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sae_lens', 'transformer_lens')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
