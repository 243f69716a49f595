"""The probes stage: run a feature dataset (workers/features.py) through the model once,
read every layer's neuron activations at the samples, and fit the sparse probes
(workers/probes.py) of every feature in every layer.

Token-level features read the activation at the sample's token; sequence-level features
aggregate a row's real tokens (mean, or max for span features). A BOS token is put in front
of each row when the tokenizer adds one, and left out, as in workers/examples.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workers import probes
from workers.devices import compute_device
from workers.examples import NEURON_UNITS, Units, forward_windows
from workers.features import Feature, ProbeDataset


def collect_activations(
    model, adapter, layers: list[int], dataset: ProbeDataset, bos_id: int | None, *, batch_tokens: int = 8192,
    progress: Callable[[int], None] = lambda n: None, units: Units = NEURON_UNITS,
) -> dict[int, torch.Tensor]:
    """Every layer's activations on every row of the dataset, float16 [rows, context, units], on the
    model's device: the neurons', or an SAE's latents' (units)."""
    device = compute_device(model)
    rows, context = dataset.windows.shape
    width = units.size(adapter)
    out = {layer: torch.zeros((rows, context, width), dtype=torch.float16, device=device) for layer in layers}
    step = max(1, batch_tokens // context)
    for start in range(0, rows, step):
        stop = min(start + step, rows)

        def keep(layer: int, acts: torch.Tensor, start: int = start, stop: int = stop) -> None:
            out[layer][start:stop] = acts.to(torch.float16)

        forward_windows(model, adapter, layers, dataset.windows[start:stop], bos_id, keep, device, units)
        progress(int(dataset.lengths[start:stop].sum()))
    return out


def samples(acts: torch.Tensor, feature: Feature, lengths: torch.Tensor) -> torch.Tensor:
    """One layer's activations at a feature's samples, float32 [n, d_mlp]."""
    window = feature.window.to(acts.device)
    if feature.kind == "token":
        return acts[window, feature.position.to(acts.device)].float()
    rows = acts[window].float()  # [n, context, d]
    real = torch.arange(rows.shape[1], device=acts.device)[None, :] < lengths.to(acts.device)[window][:, None]
    if feature.aggregation == "max":
        return rows.masked_fill(~real[:, :, None], float("-inf")).amax(dim=1)
    return (rows * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)


@dataclass
class FeatureResult:
    feature: Feature
    layers: dict[int, probes.LayerProbe] = field(default_factory=dict)
    skipped: str | None = None
    counts: dict = field(default_factory=dict)


def probe_features(acts: dict[int, torch.Tensor], dataset: ProbeDataset, *, seed: int | None = None,
                   progress: Callable[[int], None] = lambda n: None, method: str = "needle") -> list[FeatureResult]:
    """Every feature probed in every layer (probes.probe_layers; method "needle" or "paper", seed
    None: the method's own)."""
    results: list[FeatureResult] = []
    first_of: dict[bytes, FeatureResult] = {}  # features with the same samples and labels: one probe
    for feature in dataset.features:
        key = _labels_key(feature)
        same = first_of.get(key)
        if same is not None and same.skipped is None:  # (one not probed, say for too few positives, says why itself)
            results.append(FeatureResult(feature, counts=same.counts, skipped=(
                f"its labels are identical to those of {same.feature.name!r} on the same samples: one feature "
                f"here, reported as {same.feature.name!r}")))
            progress(1)
            continue
        xs = {layer: samples(a, feature, dataset.lengths) for layer, a in acts.items()}
        try:
            fitted = probes.probe_layers(xs, feature.label, seed=seed, method=method)
        except probes.TooFewPositives as exc:
            results.append(FeatureResult(feature, skipped=str(exc), counts=getattr(exc, "counts", {})))
        else:
            first = next(iter(fitted.values()))
            results.append(FeatureResult(feature, layers=fitted, counts=first.counts))
        first_of[key] = results[-1]
        progress(1)
    return results


def _labels_key(feature: Feature) -> bytes:
    """What a probe of a feature depends on: its samples (kind, aggregation, windows, positions) and labels."""
    parts = [feature.kind.encode(), feature.aggregation.encode()]
    parts += [t.detach().cpu().numpy().tobytes() for t in (feature.window, feature.position, feature.label)]
    return hashlib.sha256(b"\0".join(parts)).digest()


def result_rows(results: list[FeatureResult], basis: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Rows for features, feature_layers and neuron_features; of an SAE's latents with its basis
    (the features rows, of the neurons, are then not used)."""
    features, layers, neurons = [], [], []
    for r in results:
        f = r.feature
        best = None
        for layer, lp in sorted(r.layers.items()):
            top = [
                {k: s[k] for k in ("neuron", "mean_dif", "f1", "precision", "recall")} for s in lp.single
            ]
            layers.append(
                {
                    "basis": basis,
                    "feature": f.name,
                    "layer": layer,
                    "best_neuron": lp.best["neuron"],
                    "best_f1": lp.best["f1"],
                    "best_precision": lp.best["precision"],
                    "best_recall": lp.best["recall"],
                    "top_neurons": top,
                    "curve": lp.curve,
                    "pruned_curve": lp.pruned_curve,
                }
            )
            for rank, s in enumerate(top):
                neurons.append({"basis": basis, "layer": layer, "neuron": s["neuron"], "feature": f.name, "rank": rank,
                                "mean_dif": s["mean_dif"], "f1": s["f1"], "precision": s["precision"],
                                "recall": s["recall"]})
            if best is None or lp.best["f1"] > best[2]:
                best = (layer, lp.best["neuron"], lp.best["f1"])
        features.append(
            {
                "name": f.name,
                "kind": f.kind,
                "aggregation": f.aggregation,
                "source": f.source,
                "description": f.description,
                "counts": r.counts,
                "status": "skipped" if r.skipped else "probed",
                "reason": r.skipped,
                "best_layer": best[0] if best else None,
                "best_neuron": best[1] if best else None,
                "best_f1": best[2] if best else None,
            }
        )
    return features, layers, neurons
