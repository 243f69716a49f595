"""Load a Hugging Face causal LM and its tokenizer from a local folder or a hub id; device, dtype, vocabulary.

The architecture is checked from config.json before any weights are read, so an unsupported
model fails in a second with the list of supported families; a causal LM outside them goes on,
and its MLP is detected from the built model (workers.adapters.detect_family). A hub id is looked up in the
local Hugging Face cache first; only if it is not there is the hub asked, once, with a short
timeout and no retries, so that a machine without network fails fast with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from app.errors import NeedleError
from app.tokens import byte_names, search_key
from workers.adapters import Adapter, adapter_for, family_for_config, missing_sizes, registry_family
from workers.detect import detectable_model_type, detection_missing_sizes
from workers.devices import is_device_map

HUB_PROBE_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json", "spiece.model", "vocab.txt")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: Adapter
    config: Any
    source: str  # a local folder's resolved path, or the hub id as given
    device: str  # a device, or DEVICE_MAP_AUTO: spread over the devices by accelerate
    dtype: str
    offload: Any = None  # the offload folder of a model spread onto disk (removed with this object)


# ---- device and dtype ------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" if a GPU is available, else "cpu"; "cuda"/"cuda:N" are checked to exist;
    DEVICE_MAP_AUTO (--device-map auto) stays as it is."""
    name = (device or "auto").strip().lower()
    if is_device_map(name):
        return name
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise NeedleError(
                f"device {device!r} was asked for but no CUDA GPU is available here; use --device cpu or auto"
            )
        if name != "cuda":
            index = name.removeprefix("cuda:")
            count = torch.cuda.device_count()
            if not index.isdigit() or int(index) >= count:
                raise NeedleError(f"no GPU {device!r}: this machine has cuda:0 to cuda:{count - 1}")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise NeedleError("device 'mps' was asked for but Apple's MPS backend is not available here; use cpu")
        return name
    raise NeedleError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU that supports it, else float16 on GPU; float32 off GPU. Or an explicit name."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        if device.startswith("cuda") or (is_device_map(device) and torch.cuda.is_available()):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name in _DTYPES:
        return _DTYPES[name]
    raise NeedleError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- memory ------------------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GIB = 2**30


def parse_max_memory(text: str | None) -> dict[str, int]:
    """--max-memory "cpu=2GiB,cuda:0=20GiB,disk=0" as {place: bytes}: a cap per place ("cpu",
    "cuda:N" ("cuda" is cuda:0), "disk": the offload folder). NeedleError for anything else."""
    caps: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        place, _, size = part.partition("=")
        place = place.strip().lower()
        place = "cuda:0" if place == "cuda" else place
        match = _SIZE.fullmatch(size.strip())
        if not (place in ("cpu", "disk") or re.fullmatch(r"cuda:\d+", place)) or not match:
            raise NeedleError(
                f"--max-memory {part.strip()!r} is not PLACE=SIZE",
                hint="Give caps such as cpu=2GiB,cuda:0=20GiB,disk=0 (places cpu, cuda:N, disk; sizes in B, MB, GB, MiB, GiB).",
            )
        caps[place] = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    return caps


def format_bytes(n: float) -> str:
    """GiB from 1 GiB up, else MiB (KiB under 1 MiB): "13.5 GiB", "0.2 MiB"."""
    if n >= GIB:
        return f"{n / GIB:,.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**10:,.1f} KiB"


def _memory_available_cpu() -> int:
    """The system memory available to a new process: /proc/meminfo's MemAvailable (Linux), else
    the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _memory_available(place: str) -> int:
    if place == "cpu":
        return _memory_available_cpu()
    if place == "disk":
        return shutil.disk_usage(tempfile.gettempdir()).free
    if place.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(place))[0])
    return 0  # mps: unknown here


def memory_places(device: str, caps: dict[str, int] | None = None) -> dict[str, int]:
    """The bytes each place a model loaded on `device` may use: what is free there, or its cap
    if lower. One device: that device. DEVICE_MAP_AUTO: every GPU, the CPU and the disk."""
    caps = caps or {}
    if is_device_map(device):
        places = [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu", "disk"]
    else:
        places = ["cuda:0" if device == "cuda" else device]
    out = {}
    for place in places:
        free = _memory_available(place) if caps.get(place, 1) > 0 else 0
        out[place] = min(free, caps[place]) if place in caps else free
    return out


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_meta(config, torch_dtype: torch.dtype, source: str):
    """The model built from its config on PyTorch's meta device: its shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001
        raise NeedleError(f"could not build {source} from its config: {_first_line(exc)}") from None


def fits(needed: int, places: dict[str, int]) -> bool:
    return needed <= sum(places.values())


def check_fits(source: str, needed: int, torch_dtype: torch.dtype, device: str, places: dict[str, int]) -> None:
    """Refuse a model whose weights do not fit where it is to be loaded, with the figures."""
    if fits(needed, places):
        return
    have = sum(places.values())
    if is_device_map(device):
        where = "the device map (" + ", ".join(f"{p} {format_bytes(b)}" for p, b in places.items()) + ")"
        todo = "Raise or drop the --max-memory caps, use a smaller --dtype (bfloat16, float16), or a machine with more memory."
    else:
        where = next(iter(places))
        todo = "Use --device-map auto (spread it over the GPUs, CPU memory and disk), a smaller --dtype (bfloat16, float16) or another --device."
    raise NeedleError(
        f"{source} needs {format_bytes(needed)} for its weights as {dtype_name(torch_dtype)}, "
        f"and {where} has {format_bytes(have)} free: it does not fit, so nothing was loaded.",
        hint=todo,
    )


# ---- where the model is ------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    if source in (".", "..", "~") or source.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in source for sep in separators) and not _HUB_ID.fullmatch(source)


def _locate(source: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local). Raises for missing folders and bad names."""
    source = source.strip()
    if not source:
        raise NeedleError("no model given: pass a local model folder or a Hugging Face hub id (owner/name)")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NeedleError(f"{source} is a file, not a model folder: pass the folder that holds config.json")
        return str(path.resolve()), True
    if _looks_like_path(source):
        raise NeedleError(f"no such folder: {source}")
    if not _HUB_ID.fullmatch(source):
        raise NeedleError(f"{source!r} is neither an existing folder nor a Hugging Face hub id (owner/name)")
    return source, False


def local_path(source: str) -> str:
    """A local file or folder as its resolved path (the same place, however it is named); anything
    else (a hub id, a built-in name) as given."""
    try:
        path = Path(source.strip()).expanduser()
        return str(path.resolve()) if path.exists() else source
    except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop, a NUL byte
        return source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _not_reachable(repo: str, why: str) -> NeedleError:
    return NeedleError(
        f"could not load {repo!r} from the Hugging Face hub ({why}); "
        f"download it where there is network (hf download {repo} --local-dir DIR) and pass the local folder"
    )


def _hub_config_path(repo: str) -> tuple[str, bool]:
    """config.json of a hub model: from the cache if there (then everything loads offline), else one quick probe."""
    from huggingface_hub import constants, errors, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import get_hf_file_metadata

    try:
        cached = try_to_load_from_cache(repo, "config.json")
    except (ValueError, errors.HFValidationError) as exc:
        raise NeedleError(f"{repo!r} is not a valid Hugging Face hub id: {_first_line(exc)}") from None
    if isinstance(cached, str):
        return cached, True
    if constants.HF_HUB_OFFLINE:
        raise _not_reachable(repo, "it is not in the local cache and HF_HUB_OFFLINE is set")
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=HUB_PROBE_TIMEOUT_S, retry_on_errors=False)
    except errors.GatedRepoError:
        raise NeedleError(
            f"{repo!r} is gated on the Hugging Face hub: accept its licence on the hub and log in (hf auth login)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise NeedleError(
            f"no model {repo!r} on the Hugging Face hub (or it is private: log in with hf auth login)"
        ) from None
    except errors.EntryNotFoundError:
        raise NeedleError(
            f"{repo!r} on the Hugging Face hub has no config.json: it is not a transformers model"
        ) from None
    except Exception as exc:  # noqa: BLE001 - DNS failure, refused connection, timeout, proxy: all "unreachable"
        raise _not_reachable(repo, f"no connection: {_first_line(exc)}") from None
    try:
        return hf_hub_download(repo, "config.json"), False
    except Exception as exc:  # noqa: BLE001
        raise _not_reachable(repo, _first_line(exc)) from None


def _read_config_json(path: Path | str, source: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NeedleError(
            f"{source} is not a model folder: it has no config.json "
            "(pass the folder a model was saved to with save_pretrained)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeedleError(f"config.json of {source} is not valid JSON: {_first_line(exc)}") from None
    except RecursionError:
        raise NeedleError(f"config.json of {source} is JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise NeedleError(f"config.json of {source} is not a JSON object")
    return data


# ---- loading -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bar or load report on stderr (missing weights become our own error);
    the hub's download bars stay as they were."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
        if not hub_bars:
            hub_utils.disable_progress_bars()


def read_config(source: str) -> tuple[str, bool, bool, Any]:
    """A model's config, checked before any weights are read: (where it is, whether that is a local
    folder, whether to stay offline, the transformers config). NeedleError for what is neither a
    registry family nor a causal LM whose MLP can be detected once built, or for a config.json
    that lacks the family's sizes."""
    from transformers import AutoConfig

    ref, local = _locate(source)
    config_path: Path | str
    if local:
        config_path, offline = Path(ref) / "config.json", True
    else:
        config_path, offline = _hub_config_path(ref)
    data = _read_config_json(config_path, source)
    # a registry family, or a causal LM whose MLP detect_family is to find once it is built;
    # anything else -> error before any weights
    family = registry_family(data)
    name = family.name if family is not None else detectable_model_type(data)
    missing = missing_sizes(family, data) if family is not None else detection_missing_sizes(data)
    if missing:  # transformers would build its default model of the family: billions of parameters
        raise NeedleError(
            f"{config_path} lacks {', '.join(missing)}: the sizes of a {name} model, which transformers "
            "would otherwise take from its default model (billions of parameters); add them as whole numbers"
        )
    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001
        raise NeedleError(f"could not read the config of {source}: {_first_line(exc)}") from None
    if family is not None:
        family_for_config(config)
    else:
        detectable_model_type(config)  # now with transformers' defaults: an encoder-decoder says so here
    return ref, local, offline, config


def load_model(source: str, device: str = "auto", dtype: str = "auto", max_memory: dict[str, int] | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode without gradients, and bind its Adapter.

    The weights are read in `dtype` straight onto `device` (never a float32 copy first, never
    a copy on the CPU first), or with device=DEVICE_MAP_AUTO spread by accelerate over the GPUs,
    the CPU and an offload folder on disk, each up to its cap in `max_memory` ({place: bytes},
    parse_max_memory). A model whose weights do not fit there is refused before any is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)
    ref, local, offline, config = read_config(source)
    places = memory_places(resolved_device, max_memory)
    check_fits(source, weight_bytes(build_meta(config, torch_dtype, source)), torch_dtype, resolved_device, places)
    kwargs = {"local_files_only": offline}
    no_tokenizer = NeedleError(
        f"could not load a tokenizer from {source}: it has no tokenizer files "
        f"({', '.join(_TOKENIZER_FILES[:3])}, ...); save the tokenizer beside the model (tokenizer.save_pretrained)"
    )
    if local and not any((Path(ref) / name).is_file() for name in _TOKENIZER_FILES):
        raise no_tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise NeedleError(f"could not load a tokenizer from {source}: {_first_line(exc)}") from None
    if len(tokenizer) <= len(getattr(tokenizer, "added_tokens_decoder", {})):  # transformers 5 builds an empty one
        raise no_tokenizer
    placing, offload = _placing(resolved_device, max_memory or {}, places)
    try:
        with _quiet_transformers():
            model, info = cast(tuple[Any, dict], AutoModelForCausalLM.from_pretrained(
                ref, config=config, dtype=torch_dtype, output_loading_info=True, **placing, **kwargs
            ))
    except torch.OutOfMemoryError:
        raise NeedleError(
            f"out of memory loading {source} on {resolved_device} as {dtype_name(torch_dtype)}; "
            "try a smaller dtype (float16), --device-map auto or another device"
        ) from None
    except OSError as exc:
        raise NeedleError(
            f"could not load model weights from {source} (is there a model.safetensors or pytorch_model.bin?): "
            f"{_first_line(exc)}"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise NeedleError(f"could not load the model from {source}: {_first_line(exc)}") from None
    model.eval()
    model.requires_grad_(False)
    adapter = adapter_for(model)
    _check_nothing_read_is_random(adapter, info.get("missing_keys") or (), source)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        config=config,
        source=ref if local else source,
        device=resolved_device,
        dtype=dtype_name(torch_dtype),
        offload=offload,
    )


def _placing(device: str, caps: dict[str, int], places: dict[str, int]) -> tuple[dict[str, Any], Any]:
    """from_pretrained's placement arguments, and the offload folder (a TemporaryDirectory) if any.
    One device: device_map is that device, so each weight is read onto it in its dtype. The map:
    accelerate's own view of what is free (90% of a GPU's free memory, say), lowered to the caps."""
    if not is_device_map(device):
        return {"device_map": device}, None
    from accelerate.utils import get_max_memory

    budget: dict[Any, Any] = dict(get_max_memory())
    for place, cap in caps.items():
        key: Any = int(place.removeprefix("cuda:")) if place.startswith("cuda:") else place
        if key in budget:
            budget[key] = min(int(budget[key]), cap)
    budget.pop("disk", None)
    offload = tempfile.TemporaryDirectory(prefix="needle-offload-") if places.get("disk", 0) > 0 else None
    placing: dict[str, Any] = {"device_map": "auto", "max_memory": budget}
    if offload is not None:
        placing["offload_folder"] = offload.name
    return placing, offload


def _check_nothing_read_is_random(adapter: Adapter, missing_keys, source: str) -> None:
    """transformers fills weights missing from a checkpoint with random values; refuse if Needle would read them."""
    if not missing_keys:
        return
    names = {id(module): name for name, module in adapter.model.named_modules()}
    for part, modules in adapter.read_modules().items():
        prefixes = tuple(names[id(m)] + "." for m in modules if id(m) in names)
        lacking = sorted(k for k in missing_keys if k.startswith(prefixes))
        if lacking:
            what = "MLP weights" if part == "mlp" else "LM head weights"
            raise NeedleError(
                f"model has no {what} in {source}: the checkpoint lacks {len(lacking)} of them "
                f"(e.g. {lacking[0]}), which transformers would fill with random values; pass a complete checkpoint"
            )


# ---- vocabulary ------------------------------------------------------------------------------


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: the printable stand-in character -> its byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _piece_style(tokenizer) -> str:
    """"byte_level" (Ġ pieces), "metaspace" (▁ pieces) or "other", from the fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for part in ("decoder", "pre_tokenizer", "normalizer"):
        component = getattr(backend, part, None) if backend is not None else None
        if component is None:
            continue
        try:
            state = component.__getstate__()
            text = state.decode("utf-8") if isinstance(state, bytes) else str(state)
        except Exception:  # noqa: BLE001
            continue
        if "ByteLevel" in text:
            return "byte_level"
        if "Metaspace" in text or "▁" in text:
            return "metaspace"
    return "other"


def _byte_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # part of a multi-byte character: show the bytes
        return byte_names(data)


def _token_text(tokenizer, piece: str, style: str, byte_decoder: dict[str, int]) -> str:
    match = _BYTE_PIECE.fullmatch(piece)
    if match:  # sentencepiece byte fallback
        byte = int(match.group(1), 16)
        return chr(byte) if byte < 0x80 else piece
    if style == "metaspace" or (style == "other" and "▁" in piece):
        return piece.replace("▁", " ")
    if style == "byte_level" and all(ch in byte_decoder for ch in piece):
        return _byte_text(bytes(byte_decoder[ch] for ch in piece))
    try:
        text = tokenizer.convert_tokens_to_string([piece])
    except Exception:  # noqa: BLE001
        return piece
    return text if isinstance(text, str) and text else piece


def vocabulary(tokenizer, vocab_size: int) -> list[dict]:
    """One row per token id 0..vocab_size-1: {"token_id", "token", "piece", "key"}.

    token is the text the token stands for, leading space kept (Ġdog and ▁dog -> " dog",
    <0x0A> -> "\\n"); ids past the tokenizer (padding rows of W_U) are "<unused:ID>".
    """
    known = min(len(tokenizer), vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(known))) if known else []
    added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    style = _piece_style(tokenizer)
    byte_decoder = _byte_level_decoder() if style == "byte_level" else {}
    rows = []
    for token_id in range(vocab_size):
        piece = pieces[token_id] if token_id < known else None
        if token_id in added:
            piece = token = added[token_id]
        elif piece is None:
            piece = token = f"<unused:{token_id}>"
        else:
            token = _token_text(tokenizer, piece, style, byte_decoder)
        # Postgres text cannot hold NUL: the byte 0 token is shown by its byte value
        token, piece = token.replace("\x00", "<0x00>"), (piece or token).replace("\x00", "<0x00>")
        rows.append({"token_id": token_id, "token": token, "piece": piece, "key": search_key(token)})
    return rows


def max_positions(config) -> int | None:
    """The most positions the model reads (None when its config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """The text of a few token ids, as `vocabulary` writes it (leading space kept)."""
    style = _piece_style(tokenizer)
    byte_decoder = _byte_level_decoder() if style == "byte_level" else {}
    added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    out = []
    for token_id in token_ids:
        if token_id in added:
            out.append(added[token_id])
            continue
        piece = tokenizer.convert_ids_to_tokens(int(token_id)) if 0 <= token_id < len(tokenizer) else None
        text = f"<unused:{token_id}>" if piece is None else _token_text(tokenizer, piece, style, byte_decoder)
        out.append(text.replace("\x00", "<0x00>"))
    return out


def tokenizer_json(tokenizer) -> str | None:
    """The fast tokenizer's tokenizer.json text, or None for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None
