"""Every URL the app links to is built here (templates get these as globals).

Each page has a JSON twin: pass fmt="json". Query strings are only added for values that
differ from the page's defaults, so each page has one canonical address.

A unit's pages hang off its permalink: /{model}/{layer}/{neuron} for a neuron,
/{model}/sae/{sae}/{latent} for a latent of an SAE (whose layer the SAE fixes). Every unit URL
builder takes the unit as (model, layer, index) and `sae`, the SAE's name for a latent.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote, urlencode

JSON = "json"
DEFAULT_LAYER_SORT = "score"


@lru_cache(maxsize=4096)
def _quoted(text: str) -> str:
    return quote(text, safe="")


def _segment(value: object) -> str:
    """A path segment, percent-encoded; an int as it is (its digits need no quoting), a string
    through a cache (a search page links about 70 neurons of one model: quote() was a fifth of
    its server time)."""
    return str(value) if type(value) is int else _quoted(str(value))


def _path(*segments: object, fmt: str | None = None) -> str:
    path = "/" + "/".join([_segment(s) for s in segments])
    if fmt == JSON:
        path += ".json"
    elif fmt is not None:
        raise ValueError(f"unknown format {fmt!r}")
    return path


def _with_query(path: str, **params: object) -> str:
    query = {k: v for k, v in params.items() if v is not None}
    return f"{path}?{urlencode(query)}" if query else path


def models_url(fmt: str | None = None) -> str:
    return "/-/models.json" if fmt == JSON else "/"


def model_url(model: str, fmt: str | None = None) -> str:
    return _path(model, fmt=fmt)


def jobs_panel_url(model: str) -> str:
    """The model page's jobs panel alone, which polls this address while jobs are pending."""
    return _with_query(model_url(model), fragment="jobs")


def layer_url(model: str, layer: int, *, page: int = 1, sort: str = DEFAULT_LAYER_SORT, fmt: str | None = None) -> str:
    return _with_query(
        _path(model, layer, fmt=fmt),
        sort=None if sort == DEFAULT_LAYER_SORT else sort,
        page=None if page == 1 else page,
    )


def _unit(model: str, layer: int, neuron: int, sae: str | None) -> tuple:
    return (model, layer, neuron) if sae is None else (model, "sae", sae, neuron)


def unit_labels(sae: str | None, layer: int, index: int) -> dict:
    """A unit's names for the templates (HTML only): "_unit_label" ("neuron 7", "SAE s latent 7"),
    "_unit_title" ("Neuron 7", "SAE s · Latent 7") and "_unit_path" ("neuron 3/7", "latent s/7")."""
    if sae is None:
        return {"_unit_label": f"neuron {index}", "_unit_title": f"Neuron {index}", "_unit_path": f"neuron {layer}/{index}"}
    return {"_unit_label": f"SAE {sae} latent {index}", "_unit_title": f"SAE {sae} · Latent {index}",
            "_unit_path": f"latent {sae}/{index}"}


def neuron_url(model: str, layer: int, neuron: int, *, fmt: str | None = None, sae: str | None = None) -> str:
    """A unit's permalink: a neuron's, or with `sae` a latent's."""
    return _path(*_unit(model, layer, neuron, sae), fmt=fmt)


def text_form_url(model: str, layer: int, neuron: int, *, sae: str | None = None) -> str:
    """Where a unit page's "test your own text" form posts."""
    return _path(*_unit(model, layer, neuron, sae), "text")


def text_run_url(model: str, layer: int, neuron: int, run: int, *, fmt: str | None = None, sae: str | None = None) -> str:
    """A user's text run on a unit: its result, or a panel that polls itself while it waits."""
    return _path(*_unit(model, layer, neuron, sae), "text", run, fmt=fmt)


def clamp_form_url(model: str, layer: int, neuron: int, *, sae: str | None = None) -> str:
    """POST here to ask a worker for a clamp curve of the unit."""
    return _path(*_unit(model, layer, neuron, sae), "clamp")


def clamp_url(model: str, layer: int, neuron: int, curve: int, *, fmt: str | None = None, sae: str | None = None) -> str:
    """A stored clamp curve of a unit (or the panel that polls itself while a worker computes it)."""
    return _path(*_unit(model, layer, neuron, sae), "clamp", curve, fmt=fmt)


def generate_form_url(model: str, layer: int, neuron: int, *, sae: str | None = None) -> str:
    """POST here to ask a worker to continue a prompt with the unit clamped."""
    return _path(*_unit(model, layer, neuron, sae), "generate")


def generation_url(model: str, layer: int, neuron: int, gen: int, *, fmt: str | None = None,
                   sae: str | None = None) -> str:
    """A clamped generation beside the unclamped one (or its polling panel)."""
    return _path(*_unit(model, layer, neuron, sae), "generate", gen, fmt=fmt)


def saes_url(model: str, fmt: str | None = None) -> str:
    """A model's SAEs."""
    return _path(model, "sae", fmt=fmt)


def sae_url(model: str, sae: str, *, page: int = 1, sort: str = DEFAULT_LAYER_SORT, fmt: str | None = None) -> str:
    """An SAE: what it is, its quality, and its latents as a layer page lists neurons."""
    return _with_query(
        _path(model, "sae", sae, fmt=fmt),
        sort=None if sort == DEFAULT_LAYER_SORT else sort,
        page=None if page == 1 else page,
    )


def random_latent_url(model: str, sae: str, fmt: str | None = None) -> str:
    return _path(model, "sae", sae, "random", fmt=fmt)


def random_neuron_url(model: str, fmt: str | None = None) -> str:
    return _path(model, "random", fmt=fmt)


def jump_url(model: str) -> str:
    """Where the jump box (layer and neuron numbers, as a GET form) goes: it redirects to the neuron."""
    return _path(model, "jump")


def embed_url(model: str, layer: int, neuron: int, *, sae: str | None = None) -> str:
    """A unit's compact card, for an iframe."""
    return _with_query(neuron_url(model, layer, neuron, sae=sae), embed="true")


def absolute_url(base: str, path: str) -> str:
    """A path of this site on its public address: base is NEEDLE_PUBLIC_URL or the request's base URL."""
    return base.rstrip("/") + path


def scan_form_url(model: str, *, fmt: str | None = None) -> str:
    """What fires on your text: the form (GET) and where it posts (POST)."""
    return _path(model, "text", fmt=fmt)


def scan_url(model: str, scan: int, *, fmt: str | None = None) -> str:
    """A text run for every unit of a model: its result, or a panel that polls itself while it waits."""
    return _path(model, "text", scan, fmt=fmt)


def search_url(model: str, token: str | None = None, fmt: str | None = None) -> str:
    return _with_query(_path(model, "search", fmt=fmt), token=token)


def feature_url(model: str, feature: str, fmt: str | None = None) -> str:
    return _path(model, "features", feature, fmt=fmt)


def features_url(model: str, q: str | None = None, fmt: str | None = None) -> str:
    """A model's features list; with q, those whose name contains it."""
    return _with_query(_path(model, "features", fmt=fmt), q=q or None)


def jobs_url(model: str | None = None, state: str | None = None, page: int = 1, fmt: str | None = None) -> str:
    """Every job (all models, live requests included), filtered by model and state."""
    return _with_query("/-/jobs.json" if fmt == JSON else "/-/jobs", model=model or None, state=state or None,
                       page=None if page == 1 else page)


def jobs_list_url(model: str | None = None, state: str | None = None, page: int = 1) -> str:
    """The jobs page's list alone, which polls this address while jobs are pending."""
    return _with_query("/-/jobs", model=model or None, state=state or None, page=None if page == 1 else page,
                       fragment="list")


def compare_url(a: str, b: str, fmt: str | None = None) -> str:
    """Two models compared: /-/compare/{a}/{b}."""
    return _path("-", "compare", a, b, fmt=fmt)


def compare_unit_url(a: str, b: str, layer: int, neuron: int, fmt: str | None = None) -> str:
    """One neuron in two models, side by side."""
    return _path("-", "compare", a, b, layer, neuron, fmt=fmt)


def static_url(name: str) -> str:
    return "/-/static/" + quote(name)


def template_globals() -> dict:
    return {
        "models_url": models_url,
        "model_url": model_url,
        "jobs_panel_url": jobs_panel_url,
        "layer_url": layer_url,
        "neuron_url": neuron_url,
        "random_neuron_url": random_neuron_url,
        "jump_url": jump_url,
        "embed_url": embed_url,
        "text_form_url": text_form_url,
        "text_run_url": text_run_url,
        "clamp_form_url": clamp_form_url,
        "clamp_url": clamp_url,
        "generate_form_url": generate_form_url,
        "generation_url": generation_url,
        "saes_url": saes_url,
        "sae_url": sae_url,
        "random_latent_url": random_latent_url,
        "search_url": search_url,
        "feature_url": feature_url,
        "features_url": features_url,
        "static_url": static_url,
        "jobs_url": jobs_url,
        "jobs_list_url": jobs_list_url,
        "compare_url": compare_url,
        "compare_unit_url": compare_unit_url,
    }
