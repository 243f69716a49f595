"""What fires on a user's text, as a page shows it: a stored text scan (app/schema.TextScan,
written by workers/scan.py) turned into the tokens with their top units and the text's top
units, each unit named (neuron or latent) and linked. A stored result that cannot be shown
makes the scan "broken", never the page."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import queries, urls
from app.arrays import INT32, unpack
from app.clamping import finite
from app.schema import Job, Model, TextScan
from app.search import number

RELATIVE = ("activation / the unit's max activation on the examples corpus: 1 is as strong as the unit "
            "ever fires there, so units of every layer and basis compare")


def _entries_ok(rows, n_units: int, with_pos: int | None) -> bool:
    width = 3 if with_pos is None else 4
    return isinstance(rows, list) and all(
        isinstance(r, list) and len(r) == width and isinstance(r[0], int) and 0 <= r[0] < n_units
        and finite(r[1]) and finite(r[2]) and (with_pos is None or (isinstance(r[3], int) and 0 <= r[3] < with_pos))
        for r in rows)


def result_problem(result, n_tokens: int) -> str | None:
    """What in a stored scan result cannot be shown, or None."""
    if not isinstance(result, dict):
        return "its result is not an object"
    units = result.get("units")
    if not (isinstance(units, list) and all(isinstance(u, list) and len(u) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in u) for u in units)):
        return "its units are not [basis, layer, index] triples"
    tokens = result.get("tokens")
    if not (isinstance(tokens, list) and len(tokens) == n_tokens
            and all(_entries_ok(t, len(units), None) for t in tokens)):
        return "its per-token units are malformed"
    if not _entries_ok(result.get("top"), len(units), n_tokens):
        return "its top units are malformed"
    return None


def scan_data(session: Session, model: Model, scan: TextScan, job: Job | None) -> dict:
    """A scan's page data (and its JSON): the text, its state and, once done, "tokens" (each
    with its top units) and "top_units"."""
    state = "done" if scan.result is not None else (job.state if job is not None else "queued")
    data: dict = {
        "model": model.name,
        "id": scan.id,
        "text": scan.text,
        "state": state,
        "error": job.error if job is not None and state == "failed" else None,
        "url": urls.scan_url(model.name, scan.id),
        "json_url": urls.scan_url(model.name, scan.id, fmt=urls.JSON),
        "form_url": urls.scan_form_url(model.name),
        "relative": RELATIVE,
        "tokens": [],
        "top_units": [],
        "tokens_left_out": 0,
        "broken": None,
    }
    if scan.result is None:
        return data
    try:
        token_ids = unpack(scan.token_ids, INT32).tolist() if scan.token_ids is not None else None
    except ValueError:
        token_ids = None
    problem = "its tokens are missing" if token_ids is None else result_problem(scan.result, len(token_ids))
    if problem is not None or token_ids is None:
        data.update(state="broken", broken=f"This text run cannot be shown: {problem}.")
        return data
    result = scan.result
    texts = queries.tokens_by_ids(session, model.id, token_ids)
    sae_names = {x.id: x.name for x in queries.list_saes(session, model.id)}

    def unit(basis: int, layer: int, index: int) -> dict | None:
        if basis == queries.NEURONS:
            return {"kind": "neuron", "layer": layer, "index": index, "sae": None,
                    "url": urls.neuron_url(model.name, layer, index)}
        sae = sae_names.get(basis)
        if sae is None:  # an SAE deleted since: its latents are left out
            return None
        return {"kind": "latent", "layer": layer, "index": index, "sae": sae,
                "url": urls.neuron_url(model.name, layer, index, sae=sae)}

    units = [unit(*u) for u in result["units"]]
    data["tokens"] = [
        {"token": texts.get(t), "token_id": t, "index": i,
         "units": [{**units[u], "activation": number(a), "relative": number(r)}
                   for u, a, r in rows if units[u] is not None]}
        for i, (t, rows) in enumerate(zip(token_ids, result["tokens"], strict=True))]
    data["top_units"] = [
        {**units[u], "activation": number(a), "relative": number(r), "token_index": p,
         "token": texts.get(token_ids[p]), "token_id": token_ids[p]}
        for u, a, r, p in result["top"] if units[u] is not None]
    data["tokens_left_out"] = max(0, (scan.n_tokens or 0) - len(token_ids))
    return data
