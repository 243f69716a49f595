"""Sparse autoencoders (SAEs) on one site of one layer: read, write, run and train them.

An SAE (Bricken et al. 2023, "Towards Monosemanticity", as replicated in paper 002) maps an
activation x [d_in] to a wider, sparse code f [d_sae] and back:

    f = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)        x_hat = f @ W_dec + b_dec

Each latent i is a unit of its own, with decoder direction W_dec[i]. Needle reads and writes
SAEs in SAELens's folder format (cfg.json + sae_weights.safetensors) and runs them in pure
torch, so the server and the examples stage never import sae_lens (whose import takes about
7 s); only `train_sae` imports it.

Architectures (`act` above), each computed exactly as sae_lens 6's inference SAE computes it:

- "standard": ReLU.
- "topk": keep the k largest pre-activations of each input, ReLU them, zero the rest. With
  cfg `rescale_acts_by_decoder_norm` the pre-activations are first multiplied by the decoder
  row norms, and decode divides by them again (sae_lens's TopKSAE).
- "jumprelu": ReLU where the pre-activation exceeds a per-latent threshold, 0 elsewhere.
- "batchtopk": trained with a batch-level top-k; sae_lens 6 saves it for inference as a
  JumpReLU SAE (decoder norms folded into the encoder, every latent's threshold = the
  running top-k threshold), so an SAE trained as batchtopk *is* a "jumprelu" `Sae` with
  cfg metadata.training_architecture "batchtopk". A sae_lens batchtopk training checkpoint
  (cfg architecture "batchtopk", tensor `topk_threshold`) is converted on load exactly as
  sae_lens's `save_inference_model` converts it.

`normalize_activations`: only "none" is read. sae_lens's "expected_average_only_in" needs a
scaling factor that the folder does not hold (sae_lens's own disk loader then silently
skips it), and "layer_norm" / "constant_norm_rescale" make decode depend on the last encoded
input; both are refused with a one-line NeedleError that says what to do. An SAE trained
by `train_sae` always says "none": its input scaling is folded into the weights.

Sites and hook names follow TransformerLens (see workers/adapters.py): "mlp" is
blocks.L.mlp.hook_post, "mlp_out" blocks.L.hook_mlp_out, "resid_pre" blocks.L.hook_resid_pre,
"resid_post" blocks.L.hook_resid_post.

Training (`train_sae`) uses sae_lens's own training SAE classes and their
`training_forward_pass` losses, in a small loop of Needle's that mirrors sae_lens's
`SAETrainer._train_step` (Adam with betas (0.9, 0.999), gradient norm clipped to 1, the
same lr and coefficient schedulers, the same dead-latent mask). Choice: Needle's loop rather
than `SAETrainer` itself, although `SAETrainer` would take Needle's batches as its
`data_provider` (any iterator of [batch, d_in] tensors), because
- `fit()` reports through wandb and a tqdm bar only, while Needle's stages report through a
  `progress` callback (and its module imports wandb);
- `fit()` ends with a StopIteration from inside if the batches run out early; Needle's loop
  stops there and returns what it has;
- for a normalised input it estimates the scaling factor from batches it draws and throws
  away (1000 by default), while Needle reuses the batches it measures for training;
- its checkpoints, sparsity logs and evaluator hooks are not needed here.
Stepping `SAETrainer.step()` from Needle's loop would avoid the first two, but it leaves the
step counter to the caller and is not a documented interface; the loop it replaces is short.
The training recipe, per architecture:
- Inputs are scaled so their mean norm is sqrt(d_in) (sae_lens's "expected_average_only_in",
  the factor estimated on the first batches) and the factor folded into the weights at the
  end (sae_lens's `fold_activation_norm_scaling_factor`), so one learning rate and one
  sparsity coefficient fit every site and model.
- lr: linear warm-up over the first 5% of steps, constant, linear decay to 0 over the last
  20% (sae_lens's scheduler; the decay as its docs recommend, after Anthropic).
- Decoder rows: not renormalised during training. sae_lens 6's sparsity terms account for
  the decoder norms, so growing a decoder row cannot buy a smaller penalty (the standard L1
  penalty weights each latent by its decoder norm; topk and batchtopk select on
  pre-activations times decoder norms; jumprelu's tanh penalty weights by decoder norm).
  As in sae_lens, the norms are folded into the encoder at the end
  (`fold_W_dec_norm`, or the folding in `save_inference_model` for topk/batchtopk): every
  trained SAE has unit-norm decoder rows and the same function.
- "standard": L1 penalty, coefficient `l1_coefficient` (default 5, for the scaled inputs),
  warmed up linearly over the first 5% of steps; decoder init 0.1 (Anthropic's April 2024
  update, sae_lens's defaults). Dead latents: choice: none resampled. Bricken et al.
  resample them (paper 002 notes the method's complexity and its own simpler version's
  weakness); sae_lens 6 has no resampling and relies on the norm-weighted penalty, the
  small decoder init and the coefficient warm-up, which Needle follows. The number of
  dead latents at the end is reported (`dead_latents`).
- "topk" / "batchtopk": k active latents per input (on average over the batch for
  batchtopk); dead latents get sae_lens's auxiliary loss (Gao et al. 2024: the top
  d_in / 2 dead latents reconstruct the residual). A latent is dead when it has not fired
  for `dead_window` steps: min(1000, max(10, steps // 10)).
- "jumprelu": Anthropic's setup as sae_lens's docs give it: tanh sparsity penalty
  (coefficient `l1_coefficient`, default 5, warmed up over the whole run), bandwidth 2,
  initial threshold 0.1, pre-activation loss 3e-6 on dead latents.
- Seeded: the initial weights come from `seed` (drawn on the CPU, then moved), and every
  step is deterministic, so the same seed and batches give the same weights on one device.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from app.errors import NeedleError
from workers.adapters import SITES

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
ARCHITECTURE_ALIASES = {"relu": "standard"}

CFG_FILENAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME

_HOOK_SUFFIX = {
    "mlp": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
}
_SITE_OF_SUFFIX = {suffix: site for site, suffix in _HOOK_SUFFIX.items()}
_HOOK_RE = re.compile(r"blocks\.(\d+)\.(mlp\.hook_post|hook_mlp_out|hook_resid_pre|hook_resid_post)")
_HOOK_FORMS = "blocks.L.mlp.hook_post, blocks.L.hook_mlp_out, blocks.L.hook_resid_pre or blocks.L.hook_resid_post"

# cfg keys sae_lens moves from the top level into metadata when it reads a pre-6.0 cfg.json
_PRE6_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "prepend_bos",
                       "context_size", "dataset_path", "neuronpedia_id", "sae_lens_training_version")


def normalize_architecture(name: str) -> str:
    """"relu" -> "standard"; an architecture of ARCHITECTURES as is; anything else a NeedleError."""
    arch = ARCHITECTURE_ALIASES.get(name, name)
    if arch not in ARCHITECTURES:
        raise NeedleError(f"Unknown SAE architecture {name!r}.",
                          hint="Use standard (or relu), topk, batchtopk or jumprelu.")
    return arch


def hook_name(layer: int, site: str) -> str:
    """The TransformerLens hook name of `site` in block `layer`, e.g. (3, "mlp") -> blocks.3.mlp.hook_post."""
    if site not in _HOOK_SUFFIX:
        raise NeedleError(f"Unknown site {site!r}.", hint=f"Use one of {', '.join(SITES)}.")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise NeedleError(f"The layer must be a whole number 0 or more, not {layer!r}.")
    return f"blocks.{layer}.{_HOOK_SUFFIX[site]}"


def parse_hook_name(name: str) -> tuple[int, str]:
    """(layer, site) of a hook name of the four forms `hook_name` writes; a NeedleError otherwise."""
    match = _HOOK_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise NeedleError(f"Hook name {name!r} is not one Needle reads.",
                          hint=f"Use {_HOOK_FORMS} (L a layer number).")
    return int(match.group(1)), _SITE_OF_SUFFIX[match.group(2)]


@dataclass
class Sae:
    """An inference SAE. Weights are float32 (float64 if the file's are), on one device.

    `threshold` is set for "jumprelu" only, `k` for "topk" only; `rescale_acts_by_decoder_norm`
    (topk only) is sae_lens's TopKSAE option of that name. `cfg` is the cfg.json as read, or
    as `save_sae` would write it for an SAE that `train_sae` made.
    """

    architecture: str  # "standard", "topk" or "jumprelu" (a batchtopk-trained SAE is "jumprelu")
    d_in: int
    d_sae: int
    layer: int
    site: str
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None  # [d_sae], jumprelu
    k: int | None  # topk
    apply_b_dec_to_input: bool
    cfg: dict[str, Any] = field(default_factory=dict)
    rescale_acts_by_decoder_norm: bool = False

    @property
    def hook_name(self) -> str:
        return hook_name(self.layer, self.site)

    @property
    def training_architecture(self) -> str:
        """What the SAE was trained as: cfg metadata.training_architecture if given, else `architecture`."""
        meta = self.cfg.get("metadata")
        trained = meta.get("training_architecture") if isinstance(meta, dict) else None
        return trained if isinstance(trained, str) else self.architecture

    def _weights(self, like: torch.Tensor) -> tuple[torch.dtype, Callable[[torch.Tensor], torch.Tensor]]:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return dtype, lambda w: w.to(device=like.device, dtype=dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae], in float32 (float64 for float64 x) on x's device."""
        if x.shape[-1] != self.d_in:
            raise NeedleError(f"The SAE reads vectors of {self.d_in} values; these have {x.shape[-1]}.")
        dtype, w = self._weights(x)
        sae_in = x.to(dtype)
        if self.apply_b_dec_to_input:
            sae_in = sae_in - w(self.b_dec)
        hidden_pre = sae_in @ w(self.W_enc) + w(self.b_enc)
        if self.architecture == "standard":
            return hidden_pre.relu()
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return hidden_pre.relu() * (hidden_pre > w(self.threshold)).to(dtype)
        assert self.k is not None
        if self.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * w(self.W_dec).norm(dim=-1)
        values, indices = torch.topk(hidden_pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> [..., d_in], in float32 (float64 for float64 f) on f's device."""
        if f.shape[-1] != self.d_sae:
            raise NeedleError(f"The SAE has {self.d_sae} latents; these codes have {f.shape[-1]}.")
        dtype, w = self._weights(f)
        W_dec = w(self.W_dec)
        f = f.to(dtype)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f * (1 / W_dec.norm(dim=-1))
        return f @ W_dec + w(self.b_dec)

    def to(self, device: str | torch.device) -> Sae:
        """A copy with the weights on `device`."""
        return dataclasses.replace(
            self, W_enc=self.W_enc.to(device), b_enc=self.b_enc.to(device), W_dec=self.W_dec.to(device),
            b_dec=self.b_dec.to(device), threshold=None if self.threshold is None else self.threshold.to(device))


# ---- reading ----------------------------------------------------------------------------------


def _major_version(cfg: Mapping[str, Any]) -> int | None:
    version = cfg.get("sae_lens_version")
    meta = cfg.get("metadata")
    if not version and isinstance(meta, dict):
        version = meta.get("sae_lens_version")
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else None


def _positive_int(cfg: Mapping[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NeedleError(f"{where}: {key} must be a whole number 1 or more, not {value!r}.",
                          hint="Give the SAE's sizes in cfg.json as sae_lens writes them.")
    return value


def _sae_from_parts(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where_cfg: str,
                    where_weights: str, hook: tuple[int, str] | None = None) -> Sae:
    """Validate a cfg.json dict and its tensors as sae_lens 6's SAE.load_from_disk reads them, into a Sae.

    `hook` (layer, site) says where the SAE reads when its cfg names no hook, or overrides the one it names.
    """
    if not isinstance(cfg, Mapping):
        raise NeedleError(f"{where_cfg} is not a JSON object.", hint="Write cfg.json as sae_lens does.")
    pre6 = (_major_version(cfg) or 0) < 6  # sae_lens reads these with its pre-6.0 defaults
    meta = cfg.get("metadata")
    meta = meta if isinstance(meta, dict) else {}

    arch = cfg.get("architecture", "standard" if pre6 else None)
    k_value = cfg.get("k", 100)  # sae_lens's TopKSAEConfig default
    if pre6 and cfg.get("activation_fn") == "topk":
        kwargs = cfg.get("activation_fn_kwargs")
        if isinstance(kwargs, dict) and kwargs.get("k") is not None:
            arch, k_value = "topk", kwargs["k"]
    if arch not in ARCHITECTURES:
        raise NeedleError(f"{where_cfg}: architecture {arch!r} is not one Needle reads.",
                          hint="Needle reads sae_lens's standard, topk, jumprelu and batchtopk SAEs.")
    d_in = _positive_int(cfg, "d_in", where_cfg)
    d_sae = _positive_int(cfg, "d_sae", where_cfg)

    normalize = cfg.get("normalize_activations", "none")
    if pre6 and normalize in (None, False):
        normalize = "none"
    elif pre6 and normalize is True:
        normalize = "expected_average_only_in"
    if normalize != "none":
        hint = ("It scales inputs at run time, which Needle does not do: use an SAE trained with 'none'."
                if normalize in ("layer_norm", "constant_norm_rescale") else
                "Fold the scaling into the weights first (sae_lens: sae.fold_activation_norm_scaling_factor(factor), "
                "then save_model), which sets it to 'none'.")
        raise NeedleError(f"{where_cfg}: normalize_activations is {normalize!r}; Needle reads SAEs with 'none'.",
                          hint=hint)
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise NeedleError(f"{where_cfg}: reshape_activations is {cfg.get('reshape_activations')!r}; "
                          "Needle reads SAEs with 'none'.", hint=f"Use an SAE on {_HOOK_FORMS}.")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise NeedleError(f"{where_cfg}: apply_b_dec_to_input must be true or false, not {apply_b_dec!r}.")

    name = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if hook is not None:
        layer, site = hook
    elif not name:
        raise NeedleError(f"{where_cfg} names no hook (metadata.hook_name).",
                          hint=f"Add \"metadata\": {{\"hook_name\": ...}} with one of {_HOOK_FORMS}, "
                               "or give the layer and site (needle sae import ... --layer L --site S).")
    else:
        try:
            layer, site = parse_hook_name(name)
        except NeedleError as exc:
            raise NeedleError(f"{where_cfg}: {exc.message}", hint=exc.hint) from None

    # the tensors: the names sae_lens's state dict has for the architecture
    tensors = dict(tensors)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise NeedleError(f"{where_weights} has a scaling_factor that is not all ones, which sae_lens 6 no longer reads.",
                          hint="Fold it into W_dec and b_dec and save the SAE again.")
    if arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold").float())
    wanted = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        wanted["threshold"] = (d_sae,)
    if arch == "batchtopk":
        wanted["topk_threshold"] = ()
    missing = [key for key in wanted if key not in tensors]
    if missing:
        raise NeedleError(f"{where_weights} has no tensor {', '.join(missing)}, which a {arch} SAE needs.",
                          hint="Save the SAE with sae_lens (save_model or save_inference_model).")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise NeedleError(f"{where_weights} has tensor {', '.join(extra)}, which a {arch} SAE does not have.",
                          hint="Check the cfg.json's architecture against the weights.")
    for key, shape in wanted.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            sizes = f"d_in {d_in}, d_sae {d_sae}"
            raise NeedleError(f"{where_weights}: {key} has shape {list(got)}, but {where_cfg} ({sizes}) needs {list(shape)}.",
                              hint="The weights and cfg.json come from different SAEs, or the cfg.json's sizes are wrong.")
        if not tensors[key].is_floating_point() or not bool(torch.isfinite(tensors[key]).all()):
            raise NeedleError(f"{where_weights}: {key} is not all finite numbers.", hint="Use a trained, saved SAE.")

    dtype = torch.float64 if tensors["W_enc"].dtype == torch.float64 else torch.float32
    t = {key: value.detach().to(device="cpu", dtype=dtype).contiguous() for key, value in tensors.items()}
    k: int | None = None
    threshold: torch.Tensor | None = t.get("threshold")
    rescale = False
    if arch == "topk":
        if isinstance(k_value, bool) or not isinstance(k_value, int) or not 1 <= k_value <= d_sae:
            raise NeedleError(f"{where_cfg}: k must be a whole number from 1 to d_sae ({d_sae}), not {k_value!r}.")
        k = k_value
        rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    elif arch == "batchtopk":
        # as BatchTopKTrainingSAE.process_state_dict_for_saving_inference: fold the decoder norms
        # (TopKTrainingSAE's _fold_norm_topk) and make the top-k threshold every latent's JumpReLU threshold
        if cfg.get("rescale_acts_by_decoder_norm", True):
            norm = t["W_dec"].norm(dim=-1).clamp(min=1e-8)
            t["b_enc"] = t["b_enc"] * norm
            t["W_dec"] = t["W_dec"] / norm.unsqueeze(1)
            t["W_enc"] = t["W_enc"] * norm.unsqueeze(1).T
        threshold = torch.ones_like(t["b_enc"]) * t.pop("topk_threshold").item()
        arch = "jumprelu"
    return Sae(architecture=arch, d_in=d_in, d_sae=d_sae, layer=layer, site=site, W_enc=t["W_enc"],
               b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"], threshold=threshold, k=k,
               apply_b_dec_to_input=apply_b_dec, cfg=dict(cfg), rescale_acts_by_decoder_norm=rescale)


def load_sae(path: str | Path, *, hook: tuple[int, str] | None = None) -> Sae:
    """Read an SAE folder in SAELens's format (cfg.json + sae_weights.safetensors) on the CPU.

    Accepts what sae_lens 6's SAE.load_from_disk accepts for the four architectures, including
    pre-6.0 cfg.json files (top-level hook_name / hook_point, activation_fn "topk"), plus
    sae_lens batchtopk training checkpoints. `hook` (layer, site) replaces the cfg's hook name, or
    stands for it where the cfg names none. Every problem is a one-line NeedleError naming the file.
    """
    folder = Path(path)
    if folder.is_file() and folder.name in (CFG_FILENAME, WEIGHTS_FILENAME):
        folder = folder.parent
    if not folder.exists():
        raise NeedleError(f"SAE folder {folder} does not exist.",
                          hint=f"Give the folder that holds {CFG_FILENAME} and {WEIGHTS_FILENAME}.")
    if not folder.is_dir():
        raise NeedleError(f"{folder} is a file, not an SAE folder.",
                          hint=f"Give the folder that holds {CFG_FILENAME} and {WEIGHTS_FILENAME}.")
    cfg_path, weights_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise NeedleError(f"{needed} is missing.",
                              hint=f"An SAE folder in SAELens's format holds {CFG_FILENAME} and {WEIGHTS_FILENAME}, "
                                   "as sae_lens's save_model writes them.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise NeedleError(f"{cfg_path} is not readable JSON ({reason}).",
                          hint="Write cfg.json as sae_lens's save_model does.") from None
    try:
        tensors = st_load_file(weights_path, device="cpu")
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise NeedleError(f"{weights_path} is not a readable safetensors file ({reason}).",
                          hint="Save the weights with sae_lens's save_model.") from None
    return _sae_from_parts(cfg, tensors, str(cfg_path), str(weights_path), hook)


def sae_from_bytes(cfg: dict[str, Any], weights: bytes, *, source: str = "the stored SAE") -> Sae:
    """An SAE from its cfg.json dict and the bytes of its sae_weights.safetensors (as `sae_to_bytes` gives them)."""
    try:
        tensors = st_load(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise NeedleError(f"The weights of {source} are not readable safetensors bytes ({reason}).") from None
    return _sae_from_parts(cfg, tensors, f"the cfg of {source}", f"the weights of {source}")


# ---- writing ----------------------------------------------------------------------------------


def _sae_lens_version() -> str:
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"


# the cfg.json "dtype" of weights stored in these dtypes (anything else is written as float32)
STORED_DTYPES = {torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cfg_to_write(sae: Sae, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cfg.json that sae_lens 6's SAE.load_from_disk reads as this SAE.

    Metadata of the SAE's own cfg is kept (a pre-6.0 cfg's top-level hook_name, model_name, ...
    move into it, as sae_lens moves them); `extra` is added to it; hook_name is the SAE's.
    """
    old = sae.cfg
    meta: dict[str, Any] = dict(old["metadata"]) if isinstance(old.get("metadata"), dict) else {}
    if (_major_version(old) or 0) < 6:
        for key in _PRE6_METADATA_KEYS:
            if key in old and key not in meta:
                meta[key] = old[key]
        meta["sae_lens_version"] = _sae_lens_version()
    if old.get("architecture") == "batchtopk":
        meta.setdefault("training_architecture", "batchtopk")
    meta.update(extra or {})
    meta["hook_name"] = sae.hook_name
    meta.setdefault("sae_lens_version", _sae_lens_version())
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": STORED_DTYPES.get(sae.W_enc.dtype, "float32"),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = sae.rescale_acts_by_decoder_norm
    try:
        result: dict[str, Any] = json.loads(json.dumps(cfg, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise NeedleError(f"The SAE's cfg cannot be written as JSON ({exc}).",
                          hint="Give extra metadata as JSON values (strings, numbers, lists, dicts).") from None
    return result


def _tensors_to_write(sae: Sae) -> dict[str, torch.Tensor]:
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.architecture == "jumprelu":
        if sae.threshold is None:
            raise NeedleError("A jumprelu SAE needs a threshold.")
        tensors["threshold"] = sae.threshold
    return {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}


def sae_to_bytes(sae: Sae, *, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], bytes]:
    """(cfg.json dict, sae_weights.safetensors bytes), as `save_sae` would write them."""
    return _cfg_to_write(sae, extra), st_save(_tensors_to_write(sae))


def save_sae(sae: Sae, path: str | Path, *, extra: dict[str, Any] | None = None) -> None:
    """Write `sae` as a folder in SAELens's format, which sae_lens 6's SAE.load_from_disk reads.

    `extra` goes into cfg.json's metadata (e.g. {"model_name": ...}, which sae_lens reads too).
    Each file is written to a temporary name and renamed into place.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NeedleError(f"{folder} is a file, not a folder.", hint="Give a folder to write the SAE into.")
    cfg, weights = sae_to_bytes(sae, extra=extra)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in ((WEIGHTS_FILENAME, weights), (CFG_FILENAME, json.dumps(cfg, indent=2).encode())):
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
    except OSError as exc:
        raise NeedleError(f"Cannot write the SAE to {folder} ({exc.strerror or exc}).",
                          hint="Give a folder you can write to.") from None


# ---- training ---------------------------------------------------------------------------------


def dead_window(steps: int) -> int:
    """How many steps a latent may go without firing before it counts as dead (the mask that
    switches on the auxiliary loss): a tenth of the training, from 10 to 1,000 steps."""
    return min(1000, max(10, steps // 10))


def train_sae(batches: Iterator[torch.Tensor], *, d_in: int, d_sae: int, architecture: str, k: int | None,
              steps: int, batch_size: int, lr: float, seed: int, device: str | torch.device, layer: int,
              site: str, l1_coefficient: float | None = None,
              progress: Callable[[int, dict[str, float]], None] | None = None,
              progress_every: int | None = None) -> tuple[Sae, dict[str, Any]]:
    """Train an SAE on `batches` (shuffled [n, d_in] activations of `site` in `layer`) for `steps` steps.

    The recipe is in the module docstring. `k` is required for topk and batchtopk (active latents
    per input); `l1_coefficient` is the sparsity coefficient of standard (L1) and jumprelu (tanh
    penalty), default 5. `batch_size` is recorded (each batch may have any number of rows).
    `progress(step, figures)` is called every `progress_every` steps (default steps // 100, at
    least 1) and after the last, with the means over the steps since the last call: "loss",
    "mse" (squared error per input, summed over d_in, in the scaled units where the mean input
    norm is sqrt(d_in)), "l0" (active latents per input), "explained_variance", each loss term
    of sae_lens by its name, "dead_latents" and "current_lr"; an exception it raises stops the
    training. If `batches` ends early, training stops there (figures "steps" < "steps_planned"),
    with the lr schedule cut short.

    Returns the inference Sae on the CPU (unit-norm decoder rows; a batchtopk SAE as "jumprelu";
    cfg metadata with hook_name, layer, site and the training settings) and the training figures:
    steps, steps_planned, tokens, seconds, activations_per_second, the final losses (the last
    progress window's means), dead_latents, dead_window, scaling_factor.
    """
    arch = normalize_architecture(architecture)
    hook = hook_name(layer, site)
    for name, value in (("d_in", d_in), ("d_sae", d_sae), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NeedleError(f"{name} must be a whole number 1 or more, not {value!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise NeedleError(f"The learning rate must be a number above 0, not {lr!r}.", hint="e.g. 3e-4.")
    if arch in ("topk", "batchtopk"):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
            raise NeedleError(f"A {arch} SAE needs k, the active latents per input, from 1 to d_sae ({d_sae}); "
                              f"got {k!r}.", hint="e.g. k 32.")
    coefficient = 5.0 if l1_coefficient is None else l1_coefficient
    if not (isinstance(coefficient, (int, float)) and math.isfinite(coefficient) and coefficient >= 0):
        raise NeedleError(f"The sparsity coefficient must be a number 0 or more, not {l1_coefficient!r}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise NeedleError(f"Unknown device {device!r} ({exc}).", hint="e.g. cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeedleError(f"Device {device!r} is not available: this torch sees no CUDA GPU.", hint="Train on cpu.")

    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainCoefficientConfig, TrainingSAE, TrainStepInput
    from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler

    warm_up = steps // 20
    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu"}
    tsae: TrainingSAE[Any]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "standard":
            tsae = StandardTrainingSAE(StandardTrainingSAEConfig(
                **common, l1_coefficient=coefficient, l1_warm_up_steps=warm_up))
        elif arch == "topk":
            assert k is not None
            tsae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=k))
        elif arch == "batchtopk":
            assert k is not None
            tsae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=float(k)))
        else:
            tsae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
                **common, l0_coefficient=coefficient, l0_warm_up_steps=steps, jumprelu_sparsity_loss_mode="tanh",
                jumprelu_bandwidth=2.0, jumprelu_init_threshold=0.1, pre_act_loss_coefficient=3e-6))
    tsae.to(dev)
    tsae.train()

    def check(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != d_in or x.shape[0] < 1:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise NeedleError(f"A training batch must be [n, {d_in}] activations; got {shape}.")
        return x.to(device=dev, dtype=torch.float32)

    # the input scale, as sae_lens's ActivationScaler estimates it: mean norm sqrt(d_in)
    source = iter(batches)
    first = [check(x) for x in itertools.islice(source, min(steps, 8))]
    if not first:
        raise NeedleError("There are no activations to train the SAE on.")
    mean_norm = torch.cat([x.norm(dim=-1) for x in first]).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise NeedleError(f"The training activations have mean norm {mean_norm}; the SAE cannot learn from them.",
                          hint="Check the site and the corpus.")
    scale = math.sqrt(d_in) / mean_norm
    stream = itertools.chain(first, (check(x) for x in source))

    params = list(tsae.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    scheduler = get_lr_scheduler("constant", optimizer, training_steps=steps, lr=lr, warm_up_steps=warm_up,
                                 decay_steps=steps // 5, lr_end=lr, num_cycles=1)
    coefficients: dict[str, CoefficientScheduler] = {}
    for name, spec in tsae.get_coefficients().items():
        if not isinstance(spec, TrainCoefficientConfig):
            spec = TrainCoefficientConfig(value=spec, warm_up_steps=0)
        coefficients[name] = CoefficientScheduler(warm_up_steps=spec.warm_up_steps, final_value=spec.value)

    window = dead_window(steps)
    since_fired = torch.zeros(d_sae, device=dev)
    every = progress_every if progress_every and progress_every > 0 else max(1, steps // 100)
    sums: dict[str, torch.Tensor] = {}
    in_window = 0
    last: dict[str, float] = {}
    tokens = 0
    done = 0
    start = time.perf_counter()
    for step in range(steps):
        x = next(stream, None)
        if x is None:
            break
        x = x * scale
        dead = since_fired > window
        out = tsae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={name: c.value for name, c in coefficients.items()},
            dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
            fired = acts.bool()
            since_fired += 1
            since_fired[fired.any(0)] = 0
            errors = (out.sae_out - x).pow(2).sum(-1)
            variance = (x - x.mean(0)).pow(2).sum(-1).mean()
            figures = {"loss": out.loss.detach(), "l0": fired.sum(-1).float().mean(),
                       "explained_variance": 1 - errors.mean() / variance.clamp(min=1e-12)}
            for name, value in out.losses.items():
                figures["mse" if name == "mse_loss" else name] = value.detach()
            for name, value in figures.items():
                sums[name] = sums[name] + value if name in sums else value.clone()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        for c in coefficients.values():
            c.step()
        tokens += x.shape[0]
        done = step + 1
        in_window += 1
        if done % every == 0 or done == steps:
            last = _report(sums, in_window, since_fired > window, optimizer, done, progress)
            sums, in_window = {}, 0
    if in_window:  # the batches ended early
        last = _report(sums, in_window, since_fired > window, optimizer, done, progress)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        tsae.eval()
        tsae.fold_activation_norm_scaling_factor(scale)
        if arch in ("standard", "jumprelu"):
            tsae.fold_W_dec_norm()
        state = {key: value.detach().clone() for key, value in tsae.state_dict().items()}
        tsae.process_state_dict_for_saving_inference(state)
        cfg = tsae.cfg.get_inference_sae_cfg_dict()
    dead_latents = int((since_fired > window).sum().item())
    training: dict[str, Any] = {"steps": done, "steps_planned": steps, "batch_size": batch_size, "tokens": tokens,
                                "lr": lr, "seed": seed, "scaling_factor": scale, "dead_window": window}
    if arch in ("topk", "batchtopk"):
        training["k"] = k
    else:
        training["l1_coefficient" if arch == "standard" else "l0_coefficient"] = coefficient
    cfg["device"] = "cpu"
    cfg["metadata"] = {**cfg.get("metadata", {}), "hook_name": hook, "layer": layer, "site": site,
                       "needle_training": training}
    cfg = json.loads(json.dumps(cfg, default=str))
    sae = _sae_from_parts(cfg, {key: value.to("cpu") for key, value in state.items()},
                          "the trained SAE's cfg", "the trained SAE's weights")
    sae.cfg = _cfg_to_write(sae, None)
    figures_out: dict[str, Any] = {
        **training, "architecture": arch, "seconds": seconds,
        "activations_per_second": tokens / seconds if seconds > 0 else 0.0,
        **{name: value for name, value in last.items() if name != "current_lr"}, "dead_latents": dead_latents,
    }
    return sae, figures_out


def _report(sums: Mapping[str, torch.Tensor], n: int, dead: torch.Tensor, optimizer: torch.optim.Optimizer,
            step: int, progress: Callable[[int, dict[str, float]], None] | None) -> dict[str, float]:
    """The means of the figures over the last n steps, with the dead latents and the lr; passed to `progress`."""
    figures = {name: float(value.item()) / n for name, value in sums.items()}
    figures["dead_latents"] = float(dead.sum().item())
    figures["current_lr"] = float(optimizer.param_groups[0]["lr"])
    if progress is not None:
        progress(step, dict(figures))
    return figures
