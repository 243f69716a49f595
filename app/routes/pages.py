"""The pages and their .json twins (URLs as in DESIGN.md). Each route parses, calls one
builder from app.pagedata, and renders.

A model name may contain dots ("pythia-1.4b"), so a JSON twin is recognised by the
".json" suffix of the last path segment. Order matters: fixed paths (/-/..., random,
search) come before the /{model}/{layer} pattern that would otherwise match them.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from app import pagedata, urls
from app.deps import SessionDep, SettingsDep
from app.rendering import render_partial, respond

router = APIRouter()


def split_format(segment: str) -> tuple[str, str | None]:
    """("pythia-1.4b.json") -> ("pythia-1.4b", "json"); a segment without the suffix is HTML."""
    if segment.endswith(".json"):
        return segment[: -len(".json")], urls.JSON
    return segment, None


@router.get("/")
def models(request: Request, session: SessionDep) -> Response:
    return respond(request, "models.html", pagedata.models_page(session))


@router.get("/-/models.json")
def models_json(request: Request, session: SessionDep) -> Response:
    return respond(request, "models.html", pagedata.models_page(session), urls.JSON)


@router.get("/{model}")
def model(request: Request, model: str, session: SessionDep, fragment: Literal["jobs"] | None = None) -> Response:
    name, fmt = split_format(model)
    data = pagedata.model_page(session, name)
    if fragment == "jobs" and fmt is None:
        # Once nothing is pending the page reloads, to show what the jobs computed.
        return render_partial("_jobs_panel.html", data, {} if data["jobs_pending"] else {"HX-Refresh": "true"})
    return respond(request, "model.html", data, fmt)


@router.get("/{model}/random")
def random_neuron(model: str, session: SessionDep) -> Response:
    return _no_store(RedirectResponse(pagedata.random_neuron_target(session, model), status_code=302))


@router.get("/{model}/random.json")
def random_neuron_json(model: str, session: SessionDep) -> Response:
    return _no_store(RedirectResponse(pagedata.random_neuron_target(session, model, urls.JSON), status_code=302))


@router.get("/{model}/search")
def search(request: Request, model: str, session: SessionDep, token: str | None = None) -> Response:
    return respond(request, "search.html", pagedata.search_page(session, model, token))


@router.get("/{model}/search.json")
def search_json(request: Request, model: str, session: SessionDep, token: str | None = None) -> Response:
    return respond(request, "search.html", pagedata.search_page(session, model, token), urls.JSON)


@router.get("/{model}/{layer}")
def layer(
    request: Request,
    model: str,
    layer: str,
    session: SessionDep,
    settings: SettingsDep,
    page: str | None = None,
    sort: str | None = None,
) -> Response:
    layer, fmt = split_format(layer)
    data = pagedata.layer_page(session, model, layer, page=page, sort=sort, page_size=settings.page_size)
    return respond(request, "layer.html", data, fmt)


@router.get("/{model}/{layer}/{neuron}")
def neuron(request: Request, model: str, layer: str, neuron: str, session: SessionDep) -> Response:
    neuron, fmt = split_format(neuron)
    return respond(request, "neuron.html", pagedata.neuron_page(session, model, layer, neuron), fmt)


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response
