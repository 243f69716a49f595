"""Where a loaded model's modules are, for a model on one device or spread over several.

`needle index MODEL --device-map auto` loads a model with transformers' device_map="auto"
(accelerate): its blocks go to the GPUs, then to CPU memory, then to an offload folder on disk,
as the memory of each allows (`--max-memory` caps it per device). A module on "disk", and on a
GPU machine a module on "cpu", keeps its weights in an offload store: its parameters are on the
meta device, and accelerate's hook puts them in place for its forward pass only.

So that a stage works the same on such a model: inputs go to `compute_device(model)` (where the
embedding runs), results are combined there, and a weight is read with `parameter`, which reads
an offloaded one from its store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.errors import NeedleError
from app.schema import DEVICE_MAP_AUTO


def is_device_map(device: str | None) -> bool:
    return device == DEVICE_MAP_AUTO


def spread(model: Any) -> dict[str, Any]:
    """The model's device map {module: device} when it is spread over several places, else {}."""
    placed = getattr(model, "hf_device_map", None) or {}
    return dict(placed) if len(set(map(str, placed.values()))) > 1 else {}


def compute_device(model: Any) -> torch.device:
    """The device a forward pass's inputs go to, where a stage combines what it reads: the
    embedding's execution device for a model accelerate dispatched, else its parameters' device."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embedding, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return next(model.parameters()).device


def parameter(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """module's parameter `name` (detached), read from accelerate's offload store when the module
    is offloaded (its parameter on the meta device), in the parameter's dtype; None if it has none.
    A module of a model built on the meta device (no hook) gives its meta parameter: its shape."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        return None
    hook = getattr(module, "_hf_hook", None)
    if value.device.type != "meta" or hook is None:  # in place, or a model built on the meta device (shapes only)
        return value.detach()
    for h in getattr(hook, "hooks", None) or [hook]:
        store = getattr(h, "weights_map", None)
        if store is None:
            continue
        try:
            stored = store[name]
        except KeyError:
            continue
        return torch.as_tensor(stored).detach().to(value.dtype)
    raise NeedleError(f"the {name} of a {type(module).__name__} is on the meta device and in no offload store: "
                      "the model did not load completely; load it again")
