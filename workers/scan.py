"""What fires on a user's text: every unit of a model at once (the neurons of every layer and
the latents of every SAE with examples), in one forward pass over the text (a text longer than
the model's positions in windows of them, each read on its own, as the examples corpus is).

Units are ranked by their activation relative to their own max on the examples corpus
(activation / max_act), so that a unit that fires at half its strongest is comparable across
layers and bases whatever their scales. A unit that never fired on the corpus (max_act <= 0)
has no scale and is left out. Per token the top TOP_PER_TOKEN units; over the text the top
TOP_OF_TEXT units by their highest relative activation, with the token where it is.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from app import queries
from app.arrays import INT32, pack
from app.errors import NeedleError
from workers import examples, saestages
from workers.corpus import bos_prefix_id
from workers.devices import compute_device
from workers.loading import max_positions

MAX_TEXT_TOKENS = 512  # a user's own text on one unit: the tokens a live request runs at most
MAX_SCAN_TOKENS = 2048  # ... for every unit: read in windows of the model's positions, each on its own
TOP_PER_TOKEN = 10
TOP_OF_TEXT = 20
NEURONS = queries.NEURONS


def window_tokens(loaded) -> int:
    """The most tokens of a user's text the model reads in one pass (its positions, less a BOS)."""
    bos = bos_prefix_id(loaded.tokenizer)
    return min(MAX_TEXT_TOKENS, (max_positions(loaded.config) or MAX_TEXT_TOKENS) - (bos is not None))


def user_text_ids(loaded, text: str, limit: int | None = None) -> tuple[list[int], int, int | None]:
    """A user's text as the model reads it: (the token ids run, the whole text's token count,
    the BOS id prefixed or None). A text longer than `limit` (default: one pass, window_tokens)
    runs its first tokens."""
    bos = bos_prefix_id(loaded.tokenizer)
    all_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = all_ids[: window_tokens(loaded) if limit is None else limit]
    if not ids:
        raise NeedleError("The text has no tokens.", hint="Type some text to run.")
    return ids, len(all_ids), bos


def text_windows(ids: list[int], width: int) -> list[tuple[int, torch.Tensor]]:
    """A text's token ids as the model reads them, windows of `width` each read on its own: the
    whole windows in one batch, the rest in a second; (the first token's index, the batch [B, T])."""
    full = len(ids) // width * width
    return [(start, torch.tensor(ids[start:stop], dtype=torch.int64).view(-1, min(width, stop - start)))
            for start, stop in ((0, full), (full, len(ids))) if stop > start]


class _Best:
    """The running top-k of (relative, activation, unit) per row, merged over layers and bases."""

    def __init__(self, rows: int, k: int):
        self.k = k
        self.rel = torch.full((rows, 0), -torch.inf)
        self.act = torch.zeros(rows, 0)
        self.unit = torch.zeros(rows, 0, dtype=torch.int64)
        self.pos = torch.zeros(rows, 0, dtype=torch.int64)

    def add(self, rel: torch.Tensor, act: torch.Tensor, unit: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        rel = torch.cat([self.rel, rel], 1)
        act = torch.cat([self.act, act], 1)
        unit = torch.cat([self.unit, unit], 1)
        pos = torch.cat([self.pos, pos if pos is not None else torch.zeros_like(unit)], 1)
        top = rel.topk(min(self.k, rel.shape[1]), dim=1).indices
        self.rel, self.act, self.unit, self.pos = (x.gather(1, top) for x in (rel, act, unit, pos))


def maxima_by_layer(rows: list[tuple[int, int, int, float]]) -> dict[tuple[int, int], np.ndarray]:
    """(basis, layer, unit, max) rows grouped: per (basis, layer), each unit's max by its index
    (0 where a unit has no row)."""
    if not rows:
        return {}
    a = np.asarray(rows, dtype=np.float64)
    a = a[np.lexsort((a[:, 2], a[:, 1], a[:, 0]))]
    cuts = np.flatnonzero((np.diff(a[:, 0]) != 0) | (np.diff(a[:, 1]) != 0)) + 1
    out = {}
    for part in np.split(a, cuts):
        index = part[:, 2].astype(np.int64)
        values = np.zeros(int(index.max()) + 1)
        values[index] = part[:, 3]
        out[(int(part[0, 0]), int(part[0, 1]))] = values
    return out


def scan(loaded, ids: list[int], bos: int | None, maxima: dict[tuple[int, int], np.ndarray],
         saes: dict[int, Any]) -> dict:
    """Every unit's activation on each token, relative to its corpus max; the result as stored
    (app/schema.TextScan.result). maxima: per (basis, layer) each unit's max (maxima_by_layer);
    saes: the SAEs (by basis id) whose latents to read."""
    maxima = {key: m for key, m in maxima.items() if key[0] == NEURONS or key[0] in saes}
    if not maxima:
        raise NeedleError("What fires on a text needs each unit's max activation on the examples corpus, "
                          "and this model has none yet.",
                          hint="Index the model with --corpus (or wait for its examples stage), then run the text again.")
    readers: list[examples.Reader] = []
    bases: list[int] = []
    neuron_layers = sorted(layer for basis, layer in maxima if basis == NEURONS)
    if neuron_layers:
        readers.append((neuron_layers, examples.NEURON_UNITS))
        bases.append(NEURONS)
    for basis, sae in saes.items():
        if (basis, sae.layer) in maxima:
            readers.append(([sae.layer], saestages.latent_units(sae)))
            bases.append(basis)
    # one numbering of every unit read: (basis, layer) blocks one after the other
    scale: dict[tuple[int, int], torch.Tensor] = {}
    offsets: dict[tuple[int, int], int] = {}
    total = 0
    for r, (layers, spec) in enumerate(readers):
        width = spec.size(loaded.adapter)
        for layer in layers:
            key = (bases[r], layer)
            top = torch.zeros(width, dtype=torch.float64)
            known = torch.from_numpy(maxima[key][:width])
            top[: len(known)] = known
            scale[key] = torch.where(top > 0, 1.0 / top, 0.0).float()
            offsets[key] = total
            total += width
    starts = sorted((offset, key) for key, offset in offsets.items())

    def unit_of(number: int) -> list[int]:
        offset, (basis, layer) = starts[bisect.bisect_right(starts, (number, (math.inf, math.inf))) - 1]
        return [basis, layer, number - offset]

    of_text = _Best(1, TOP_OF_TEXT)
    passes: list[_Best] = []
    device = compute_device(loaded.model)
    for start, windows in text_windows(ids, window_tokens(loaded)):
        per_token = _Best(windows.numel(), TOP_PER_TOKEN)

        def read(r: int, layer: int, acts: torch.Tensor, per_token: _Best = per_token, start: int = start) -> None:
            key = (bases[r], layer)
            act = acts.reshape(-1, acts.shape[-1]).float().cpu()  # [tokens of the pass, N], in text order
            inv = scale[key]
            rel = torch.where(inv > 0, act * inv, -torch.inf)
            index = torch.arange(act.shape[1]) + offsets[key]
            k = min(TOP_PER_TOKEN, act.shape[1])
            top = rel.topk(k, dim=1).indices
            per_token.add(rel.gather(1, top), act.gather(1, top), index[top])
            best, at = rel.max(0)  # each unit's best token
            k = min(TOP_OF_TEXT, act.shape[1])
            top = best.topk(k).indices
            of_text.add(best[top][None], act[at[top], top][None], index[top][None], (at[top] + start)[None])

        examples.forward_readers(loaded.model, loaded.adapter, readers, windows, bos, read, device)
        passes.append(per_token)
    per_token = _Best(0, TOP_PER_TOKEN)
    per_token.rel, per_token.act, per_token.unit, per_token.pos = (
        torch.cat([getattr(p, name) for p in passes]) for name in ("rel", "act", "unit", "pos"))
    # the stored result names only the units it lists
    listed = sorted({int(u) for u in per_token.unit[torch.isfinite(per_token.rel)].tolist()}
                    | {int(u) for u in of_text.unit[torch.isfinite(of_text.rel)].tolist()})
    number = {u: i for i, u in enumerate(listed)}

    def entries(best: _Best, with_pos: bool) -> list[list[list]]:
        """Per row, its units as stored: [unit, activation, relative(, token)], the unscaled left out."""
        return [[[number[u], a, r, *([p] if with_pos else [])] for r, a, u, p in zip(*row) if math.isfinite(r)]
                for row in zip(best.rel.tolist(), best.act.tolist(), best.unit.tolist(), best.pos.tolist())]

    return {
        "units": [unit_of(u) for u in listed],
        "tokens": entries(per_token, False),
        "top": entries(of_text, True)[0],
    }


def run_scan(ctx) -> Any:
    """A live request: what fires on the user's text, every unit of the model at once."""
    loaded = ctx.load(ctx.model)
    scan_id, text = ctx.params["scan"], ctx.params["text"]
    ids, n_tokens, bos = user_text_ids(loaded, text, MAX_SCAN_TOKENS)
    device = compute_device(loaded.model)

    def read(session: Session) -> tuple[list, list[int]]:
        return queries.unit_maxima(session, ctx.model.id), [x.id for x in queries.list_saes(session, ctx.model.id)]

    rows, sae_ids = ctx.read(read)
    maxima = maxima_by_layer(rows)
    saes = {}
    for sae_id in sae_ids:
        try:
            saes[sae_id] = saestages.stored_sae(ctx, sae_id, device)
        except (RuntimeError, NeedleError):  # still training, or deleted: its latents are left out
            continue
    result = scan(loaded, ids, bos, maxima, saes)
    token_blob = pack(ids, INT32)

    def write(session: Session) -> None:
        queries.save_scan_result(session, scan_id, token_blob, result, n_tokens)

    return write
