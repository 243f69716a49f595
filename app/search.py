"""Search by token: which vocabulary entries a query names, how a longer query tokenizes,
and the neurons the search index ranks highest for those tokens.

Uses the `tokenizers` library only (no transformers), with the tokenizer JSON the model
was stored with.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from sqlalchemy.orm import Session

from app import queries, urls
from app.arrays import FLOAT32, INT32, unpack
from app.schema import Model, TokenIndex, Vocab
from app.tokens import search_key

log = logging.getLogger(__name__)

_tokenizers: dict[tuple[str, object], Any] = {}  # tokenizers.Tokenizer, imported on first use
_tokenizers_lock = threading.Lock()


def number(x) -> float | None:
    """A float for JSON: six significant digits, None for NaN or infinity."""
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def matching_tokens(session: Session, model_id: int, query: str) -> list[Vocab]:
    """Vocabulary entries the query names: the decoded token or raw piece equal to it, then
    those with the same search key (" dog", "Ġdog", "▁dog", "Dog", "DOG" for "dog")."""
    return queries.tokens_by_text_or_key(session, model_id, query, search_key(query))


def tokenize_query(model: Model, query: str) -> list[int] | None:
    """The query's token ids under the model's own tokenizer; None when there is none to use."""
    cache_key = (model.name, model.updated_at)
    with _tokenizers_lock:
        tokenizer = _tokenizers.get(cache_key)
    if tokenizer is None:
        if not model.tokenizer_json:  # read on a miss only: pages load the model without it (deferred)
            return None
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(model.tokenizer_json)
        except Exception:  # noqa: BLE001 - a bad stored tokenizer only disables this fallback
            log.exception("stored tokenizer of model %s could not be loaded", model.name)
            return None
        with _tokenizers_lock:
            if len(_tokenizers) >= 8:
                _tokenizers.clear()
            _tokenizers[cache_key] = tokenizer
    return list(tokenizer.encode(query, add_special_tokens=False).ids)


def ranked_neurons(model_name: str, index_rows: dict[int, TokenIndex], token_text: dict[int, str],
                   sae: str | None = None) -> list[dict]:
    """Merge the search-index rows of several tokens into one list, best score first, one
    entry per unit carrying the token it scored best on: the neurons' rows, or with `sae` the
    rows of that SAE's latents. Each entry says which kind of unit it is."""
    kind = "neuron" if sae is None else "latent"
    best: dict[tuple[int, int], dict] = {}
    for token_id, row in index_rows.items():
        columns = (  # as Python numbers: element-wise numpy scalars cost more than the rest of the loop
            unpack(row.layers, INT32).tolist(),
            unpack(row.neurons, INT32).tolist(),
            unpack(row.scores, FLOAT32).tolist(),
            unpack(row.probs, FLOAT32).tolist(),
        )
        for layer, neuron, score, prob in zip(*columns):
            if layer < 0 or neuron < 0 or not math.isfinite(score):
                continue  # padding in a short index row
            seen = best.get((layer, neuron))
            if seen is None or score > seen["_score"]:
                entry = {
                    "kind": kind,
                    "layer": layer,
                    kind: neuron,
                    "token": token_text.get(token_id),
                    "token_id": token_id,
                    "score": number(score),
                    "prob": number(prob),
                    "url": urls.neuron_url(model_name, layer, neuron, sae=sae),
                    "_score": score,
                }
                if sae is not None:
                    entry["sae"] = sae
                best[(layer, neuron)] = entry
    ranked = sorted(best.values(), key=lambda r: (-r["_score"], r["layer"], r[kind]))
    for r in ranked:
        del r["_score"]
    return ranked


def add_decoding_ranks(results: list[dict], in_ids: dict[tuple[int, int], bytes]) -> None:
    """Each result's `decoding_rank`: where its token stands in the unit's own decoding (1: the
    unit's top token), read from the unit's stored top tokens; None when it is below them (the
    page says "> {decoding_kept}") or the unit's row is not stored."""
    for r in results:
        blob = in_ids.get((r["layer"], r[r["kind"]]))
        ids = unpack(blob, INT32).tolist() if blob is not None and len(blob) % 4 == 0 else []
        r["decoding_rank"] = ids.index(r["token_id"]) + 1 if r["token_id"] in ids else None
        r["decoding_kept"] = len(ids)


FIRING_SHOWN = 30  # units a search lists by what fires


def firing_units(model_name: str, rows: list, token_text: dict[int, str], sae_names: dict[int, str]) -> list[dict]:
    """Search by what fires: the units whose top contexts peak on the query's tokens (firing
    index rows of every basis), most top windows first, then by activation; one entry per unit,
    on the token it peaks on most. A row of an SAE not in sae_names (deleted) is left out, and a
    row whose arrays do not match is skipped."""
    best: dict[tuple, dict] = {}
    for row in rows:
        sae = None if row.basis == queries.NEURONS else sae_names.get(row.basis)
        if row.basis != queries.NEURONS and sae is None:
            continue
        try:
            columns = [unpack(row.layers, INT32).tolist(), unpack(row.units, INT32).tolist(),
                       unpack(row.counts, INT32).tolist(), unpack(row.acts, FLOAT32).tolist()]
        except ValueError:
            continue
        if len({len(c) for c in columns}) != 1:
            continue
        kind = "neuron" if sae is None else "latent"
        for layer, unit, count, act in zip(*columns):
            key = (row.basis, layer, unit)
            seen = best.get(key)
            if seen is None or (count, act) > (seen["windows"], seen["_act"]):
                entry = {"kind": kind, "layer": layer, kind: unit, "windows": count, "activation": number(act),
                         "token": token_text.get(row.token_id), "token_id": row.token_id,
                         "url": urls.neuron_url(model_name, layer, unit, sae=sae), "_act": act}
                if sae is not None:
                    entry["sae"] = sae
                best[key] = entry
    ranked = sorted(best.values(), key=lambda r: (-r["windows"], -r["_act"], r["kind"], r["layer"]))
    for r in ranked:
        del r["_act"]
    return ranked[:FIRING_SHOWN]
