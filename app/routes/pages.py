"""The pages and their .json twins (URLs as in DESIGN.md). Each route parses, calls one
builder from app.pagedata, and renders.

A model name may contain dots ("pythia-1.4b"), so a JSON twin is recognised by the
".json" suffix of the last path segment. Order matters: fixed paths (/-/..., random, jump,
search) come before the /{model}/{layer} pattern that would otherwise match them.
"""

from __future__ import annotations

import json
from typing import Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from app import openapi, pagedata, urls
from app.deps import SessionDep, SettingsDep
from app.errors import NeedleError
from app.rendering import (
    json_response,
    media_type,
    render_partial,
    respond,
    sends_json,
    wants_fragment,
)
from app.security import LIVE_GUARDS, storable_fields

router = APIRouter()


def split_format(segment: str) -> tuple[str, str | None]:
    """("pythia-1.4b.json") -> ("pythia-1.4b", "json"); a segment without the suffix is HTML."""
    if segment.endswith(".json"):
        return segment[: -len(".json")], urls.JSON
    return segment, None


def padded_numbers(*segments: str) -> tuple[int, ...] | None:
    """The numbers in path segments of which one or more is spelled with leading zeros ("03",
    "0102"), for a redirect to the canonical URL; None when each is spelled canonically, or
    when one is no number at all (the page's builder then says what is wrong: "+5", "٣" and
    "1_000" are no numbers here, as in the jump box)."""
    values = []
    for segment in segments:
        digits = segment.lstrip("0") or "0"
        if not pagedata.DIGITS.fullmatch(segment) or len(digits) > pagedata.MAX_DIGITS:
            return None
        values.append(int(digits))
    return tuple(values) if any(str(v) != s for v, s in zip(values, segments)) else None


def moved_to(request: Request, path: str) -> Response:
    """A permanent redirect to the canonical spelling of this page's URL, its query string kept."""
    query = request.url.query
    return RedirectResponse(f"{path}?{query}" if query else path, status_code=308)


def embed_card(embed: str | None) -> bool:
    """?embed=true: the neuron's card; false (or no embed): its page; anything else is a 400."""
    if embed is None or embed.lower() == "false":
        return False
    if embed.lower() == "true":
        return True
    raise NeedleError(f"embed must be true or false, not {embed[:40]!r}.",
                      hint="Add ?embed=true for the neuron's compact card (for an iframe), or leave embed out for its page.")


@router.get("/")
def models(request: Request, session: SessionDep) -> Response:
    return respond(request, "models.html", pagedata.models_page(session))


@router.get("/-/models.json")
def models_json(request: Request, session: SessionDep) -> Response:
    return respond(request, "models.html", pagedata.models_page(session), urls.JSON)


@router.get("/-/jobs")
def jobs(request: Request, session: SessionDep, settings: SettingsDep, model: str | None = None,
         state: str | None = None, page: str | None = None, fragment: Literal["list"] | None = None) -> Response:
    data = pagedata.jobs_page(session, model=model, state=state, page=page, stale_seconds=settings.stale_seconds)
    if fragment == "list":
        return render_partial("_jobs_list.html", data)  # the list polling itself
    return respond(request, "jobs.html", data)


@router.get("/-/jobs.json")
def jobs_json(request: Request, session: SessionDep, settings: SettingsDep, model: str | None = None,
              state: str | None = None, page: str | None = None) -> Response:
    data = pagedata.jobs_page(session, model=model, state=state, page=page, stale_seconds=settings.stale_seconds)
    return respond(request, "jobs.html", data, urls.JSON)


@router.get("/-/compare/{a}/{b}")
def compare(request: Request, a: str, b: str, session: SessionDep) -> Response:
    b, fmt = split_format(b)
    return respond(request, "compare.html", pagedata.compare_page(session, a, b), fmt)


@router.get("/-/compare/{a}/{b}/{layer}/{neuron}")
def compare_unit(request: Request, a: str, b: str, layer: str, neuron: str, session: SessionDep) -> Response:
    neuron, fmt = split_format(neuron)
    return respond(request, "compare_unit.html", pagedata.compare_unit_page(session, a, b, layer, neuron), fmt)


@router.get("/-/health")
def health() -> Response:
    """A liveness check: no database, a tiny JSON (bench/server.py's baseline endpoint)."""
    return JSONResponse({"status": "ok"})


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


@router.get("/{model}/jump")
def jump(model: str, session: SessionDep, layer: str | None = None, neuron: str | None = None) -> Response:
    """The jump box (a GET form with layer and neuron numbers): 303 to the neuron's permalink."""
    return RedirectResponse(pagedata.jump_target(session, model, layer, neuron), status_code=303)


@router.get("/{model}/search")
def search(request: Request, model: str, session: SessionDep, token: str | None = None) -> Response:
    return respond(request, "search.html", pagedata.search_page(session, model, token))


@router.get("/{model}/search.json")
def search_json(request: Request, model: str, session: SessionDep, token: str | None = None) -> Response:
    return respond(request, "search.html", pagedata.search_page(session, model, token), urls.JSON)


@router.get("/{model}/features")
def features(request: Request, model: str, session: SessionDep, q: str | None = None) -> Response:
    return respond(request, "features.html", pagedata.features_page(session, model, q))


@router.get("/{model}/features.json")
def features_json(request: Request, model: str, session: SessionDep, q: str | None = None) -> Response:
    return respond(request, "features.html", pagedata.features_page(session, model, q), urls.JSON)


@router.get("/{model}/features/{feature}")
def feature(request: Request, model: str, feature: str, session: SessionDep) -> Response:
    feature, fmt = split_format(feature)
    return respond(request, "feature.html", pagedata.feature_page(session, model, feature), fmt)


@router.get("/{model}/sae")
def saes(request: Request, model: str, session: SessionDep) -> Response:
    return respond(request, "saes.html", pagedata.saes_page(session, model))


@router.get("/{model}/sae.json")
def saes_json(request: Request, model: str, session: SessionDep) -> Response:
    return respond(request, "saes.html", pagedata.saes_page(session, model), urls.JSON)


@router.get("/{model}/sae/{sae}")
def sae(request: Request, model: str, sae: str, session: SessionDep, settings: SettingsDep, page: str | None = None,
        sort: str | None = None) -> Response:
    sae, fmt = split_format(sae)
    data = pagedata.sae_page(session, model, sae, page=page, sort=sort, page_size=settings.page_size)
    return respond(request, "sae.html", data, fmt)


@router.get("/{model}/text")
def scan_form(request: Request, model: str, session: SessionDep, settings: SettingsDep) -> Response:
    """What fires on your text: the form."""
    data = pagedata.scan_form_page(session, model, live=settings.live_requests, max_chars=settings.text_max_chars)
    return respond(request, "scan.html", data)


@router.get("/{model}/text.json")
def scan_form_json(request: Request, model: str, session: SessionDep, settings: SettingsDep) -> Response:
    data = pagedata.scan_form_page(session, model, live=settings.live_requests, max_chars=settings.text_max_chars)
    return respond(request, "scan.html", data, urls.JSON)


@router.post("/{model}/text", dependencies=LIVE_GUARDS, openapi_extra=openapi.SCAN_REQUEST)
async def start_scan(request: Request, model: str, session: SessionDep, settings: SettingsDep) -> Response:
    """Queue the posted text (a form field or JSON "text") for every unit of the model."""
    text = await posted_text(request)
    data = pagedata.start_scan(session, model, text, max_chars=settings.text_max_chars, live=settings.live_requests)
    session.commit()
    return _accepted(request, data, "_scan_panel.html", data["url"])


@router.get("/{model}/text/{scan}")
def scan(request: Request, model: str, scan: str, session: SessionDep, settings: SettingsDep) -> Response:
    """A text run for every unit: its result, or (htmx) the panel that polls itself while it waits."""
    scan, fmt = split_format(scan)
    if (canonical := padded_numbers(scan)) is not None:
        return moved_to(request, urls.scan_url(model, *canonical, fmt=fmt))
    data = pagedata.scan_page(session, model, scan, live=settings.live_requests, max_chars=settings.text_max_chars)
    if wants_fragment(request) and fmt is None:
        return render_partial("_scan_panel.html", data)
    return respond(request, "scan.html", data, fmt)


@router.get("/{model}/sae/{sae}/random")
def random_latent(model: str, sae: str, session: SessionDep) -> Response:
    return _no_store(RedirectResponse(pagedata.random_latent_target(session, model, sae), status_code=302))


@router.get("/{model}/sae/{sae}/random.json")
def random_latent_json(model: str, sae: str, session: SessionDep) -> Response:
    return _no_store(RedirectResponse(pagedata.random_latent_target(session, model, sae, urls.JSON), status_code=302))


@router.get("/{model}/sae/{sae}/{latent}")
def latent(request: Request, model: str, sae: str, latent: str, session: SessionDep, settings: SettingsDep,
           embed: str | None = None) -> Response:
    """A latent's permalink; ?embed=true: its compact card, as for a neuron."""
    latent, fmt = split_format(latent)
    if (canonical := padded_numbers(latent)) is not None:
        return moved_to(request, urls.neuron_url(model, 0, *canonical, fmt=fmt, sae=sae))
    card = embed_card(embed)
    data = pagedata.latent_page(session, model, sae, latent, text_max_chars=settings.text_max_chars,
                                live=settings.live_requests, clamp_prompt_max_chars=settings.clamp_prompt_max_chars,
                                base_url=settings.public_url or str(request.base_url), arrays=fmt == urls.JSON or card)
    return _unit_response(request, data, card, fmt)


def _unit_response(request: Request, data: dict, card: bool, fmt: str | None) -> Response:
    if card and fmt is None:
        response = respond(request, "neuron_card.html", data)
        response.headers["X-Needle-Embed"] = "1"
        return response
    return respond(request, "neuron.html", data, fmt)


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
    if (canonical := padded_numbers(layer)) is not None:
        return moved_to(request, urls.layer_url(model, *canonical, fmt=fmt))
    data = pagedata.layer_page(session, model, layer, page=page, sort=sort, page_size=settings.page_size)
    return respond(request, "layer.html", data, fmt)


@router.get("/{model}/{layer}/{neuron}")
def neuron(request: Request, model: str, layer: str, neuron: str, session: SessionDep, settings: SettingsDep,
           embed: str | None = None) -> Response:
    """The neuron's permalink; ?embed=true: its compact card, for an iframe (the X-Needle-Embed
    header tells app/security.py to let any site frame it)."""
    neuron, fmt = split_format(neuron)
    if (canonical := padded_numbers(layer, neuron)) is not None:
        return moved_to(request, urls.neuron_url(model, *canonical, fmt=fmt))
    card = embed_card(embed)
    data = pagedata.neuron_page(session, model, layer, neuron, text_max_chars=settings.text_max_chars,
                                live=settings.live_requests, clamp_prompt_max_chars=settings.clamp_prompt_max_chars,
                                base_url=settings.public_url or str(request.base_url),
                                arrays=fmt == urls.JSON or card)  # the page draws its tokens from the stored arrays
    return _unit_response(request, data, card, fmt)


@router.post("/{model}/{layer}/{neuron}/text", dependencies=LIVE_GUARDS, openapi_extra=openapi.TEXT_REQUEST)
async def start_text(request: Request, model: str, layer: str, neuron: str, session: SessionDep, settings: SettingsDep) -> Response:
    """Queue the posted text (a form field or JSON "text"); htmx gets the polling panel,
    a JSON client the run's data, a plain form post a redirect to the run's page."""
    return await _start_text(request, model, layer, neuron, session, settings)


@router.post("/{model}/sae/{sae}/{latent}/text", dependencies=LIVE_GUARDS, openapi_extra=openapi.TEXT_REQUEST)
async def start_latent_text(request: Request, model: str, sae: str, latent: str, session: SessionDep,
                            settings: SettingsDep) -> Response:
    """As for a neuron: the latent's activation on each token of the posted text."""
    return await _start_text(request, model, "", latent, session, settings, sae=sae)


async def _start_text(request: Request, model: str, layer: str, neuron: str, session, settings,
                      sae: str | None = None) -> Response:
    text = await posted_text(request)
    data = pagedata.start_text_run(session, model, layer, neuron, text, max_chars=settings.text_max_chars,
                                   live=settings.live_requests, sae=sae)
    session.commit()
    if wants_fragment(request):
        return render_partial("_text_panel.html", data)
    if sends_json(request):
        return json_response(data, 202)
    return RedirectResponse(data["run"]["url"], status_code=303)


@router.get("/{model}/{layer}/{neuron}/text/{run}")
def text_run(request: Request, model: str, layer: str, neuron: str, run: str, session: SessionDep,
             settings: SettingsDep) -> Response:
    run, fmt = split_format(run)
    if (canonical := padded_numbers(layer, neuron, run)) is not None:
        return moved_to(request, urls.text_run_url(model, *canonical, fmt=fmt))
    return _text_run(request, model, layer, neuron, run, fmt, session, settings)


@router.get("/{model}/sae/{sae}/{latent}/text/{run}")
def latent_text_run(request: Request, model: str, sae: str, latent: str, run: str, session: SessionDep,
                    settings: SettingsDep) -> Response:
    run, fmt = split_format(run)
    if (canonical := padded_numbers(latent, run)) is not None:
        return moved_to(request, urls.text_run_url(model, 0, *canonical, fmt=fmt, sae=sae))
    return _text_run(request, model, "", latent, run, fmt, session, settings, sae=sae)


def _text_run(request: Request, model: str, layer: str, neuron: str, run: str, fmt: str | None, session, settings,
              sae: str | None = None) -> Response:
    data = pagedata.text_run_page(session, model, layer, neuron, run, live=settings.live_requests,
                                  max_chars=settings.text_max_chars, sae=sae)
    if wants_fragment(request) and fmt is None:
        return render_partial("_text_panel.html", data)
    return respond(request, "text_run.html", data, fmt)


def _accepted(request: Request, data: dict, partial: str, url: str) -> Response:
    """A live request was queued: htmx gets the polling panel, JSON the data (202), a form a redirect."""
    if wants_fragment(request):
        return render_partial(partial, data)
    if sends_json(request):
        return json_response(data, 202)
    return RedirectResponse(url, status_code=303)


@router.post("/{model}/{layer}/{neuron}/clamp", dependencies=LIVE_GUARDS, openapi_extra=openapi.CLAMP_REQUEST)
async def start_clamp(request: Request, model: str, layer: str, neuron: str, session: SessionDep, settings: SettingsDep) -> Response:
    """Queue a clamp curve: form fields or JSON {prompt, token, start, stop, count, positions}."""
    return await _start_clamp(request, model, layer, neuron, session, settings)


@router.post("/{model}/sae/{sae}/{latent}/clamp", dependencies=LIVE_GUARDS, openapi_extra=openapi.CLAMP_REQUEST)
async def start_latent_clamp(request: Request, model: str, sae: str, latent: str, session: SessionDep,
                             settings: SettingsDep) -> Response:
    """Queue a clamp curve of a latent (steering: x' = x + (v - f(x)) d at its SAE's site), as for a neuron."""
    return await _start_clamp(request, model, "", latent, session, settings, sae=sae)


async def _start_clamp(request: Request, model: str, layer: str, neuron: str, session, settings,
                       sae: str | None = None) -> Response:
    form = await posted_form(request)
    data = pagedata.start_clamp(session, model, layer, neuron, form, live=settings.live_requests,
                                prompt_max_chars=settings.clamp_prompt_max_chars, sae=sae)
    session.commit()
    return _accepted(request, data, "_clamp_panel.html", data["curve"]["url"])


@router.get("/{model}/{layer}/{neuron}/clamp/{curve}")
def clamp_curve(request: Request, model: str, layer: str, neuron: str, curve: str, session: SessionDep,
                settings: SettingsDep) -> Response:
    curve, fmt = split_format(curve)
    if (canonical := padded_numbers(layer, neuron, curve)) is not None:
        return moved_to(request, urls.clamp_url(model, *canonical, fmt=fmt))
    return _clamp_curve(request, model, layer, neuron, curve, fmt, session, settings)


@router.get("/{model}/sae/{sae}/{latent}/clamp/{curve}")
def latent_clamp_curve(request: Request, model: str, sae: str, latent: str, curve: str, session: SessionDep,
                       settings: SettingsDep) -> Response:
    curve, fmt = split_format(curve)
    if (canonical := padded_numbers(latent, curve)) is not None:
        return moved_to(request, urls.clamp_url(model, 0, *canonical, fmt=fmt, sae=sae))
    return _clamp_curve(request, model, "", latent, curve, fmt, session, settings, sae=sae)


def _clamp_curve(request: Request, model: str, layer: str, neuron: str, curve: str, fmt: str | None, session,
                 settings, sae: str | None = None) -> Response:
    data = pagedata.clamp_page(session, model, layer, neuron, curve, live=settings.live_requests, sae=sae)
    if wants_fragment(request) and fmt is None:
        return render_partial("_clamp_panel.html", data)
    return respond(request, "clamp.html", data, fmt)


@router.post("/{model}/{layer}/{neuron}/generate", dependencies=LIVE_GUARDS,
             openapi_extra=openapi.GENERATE_REQUEST)
async def start_generation(request: Request, model: str, layer: str, neuron: str, session: SessionDep,
                           settings: SettingsDep) -> Response:
    """Queue a clamped generation: form fields or JSON {prompt, value, tokens, seed}."""
    return await _start_generation(request, model, layer, neuron, session, settings)


@router.post("/{model}/sae/{sae}/{latent}/generate", dependencies=LIVE_GUARDS,
             openapi_extra=openapi.GENERATE_REQUEST)
async def start_latent_generation(request: Request, model: str, sae: str, latent: str, session: SessionDep,
                                  settings: SettingsDep) -> Response:
    """Queue a generation with a latent clamped (steering), as for a neuron."""
    return await _start_generation(request, model, "", latent, session, settings, sae=sae)


async def _start_generation(request: Request, model: str, layer: str, neuron: str, session, settings,
                            sae: str | None = None) -> Response:
    form = await posted_form(request)
    data = pagedata.start_generation(session, model, layer, neuron, form, live=settings.live_requests,
                                     prompt_max_chars=settings.clamp_prompt_max_chars, sae=sae)
    session.commit()
    return _accepted(request, data, "_generation_panel.html", data["generation"]["url"])


@router.get("/{model}/{layer}/{neuron}/generate/{gen}")
def generation(request: Request, model: str, layer: str, neuron: str, gen: str, session: SessionDep,
               settings: SettingsDep) -> Response:
    gen, fmt = split_format(gen)
    if (canonical := padded_numbers(layer, neuron, gen)) is not None:
        return moved_to(request, urls.generation_url(model, *canonical, fmt=fmt))
    return _generation(request, model, layer, neuron, gen, fmt, session, settings)


@router.get("/{model}/sae/{sae}/{latent}/generate/{gen}")
def latent_generation(request: Request, model: str, sae: str, latent: str, gen: str, session: SessionDep,
                      settings: SettingsDep) -> Response:
    gen, fmt = split_format(gen)
    if (canonical := padded_numbers(latent, gen)) is not None:
        return moved_to(request, urls.generation_url(model, 0, *canonical, fmt=fmt, sae=sae))
    return _generation(request, model, "", latent, gen, fmt, session, settings, sae=sae)


def _generation(request: Request, model: str, layer: str, neuron: str, gen: str, fmt: str | None, session, settings,
                sae: str | None = None) -> Response:
    data = pagedata.generation_page(session, model, layer, neuron, gen, live=settings.live_requests, sae=sae)
    if wants_fragment(request) and fmt is None:
        return render_partial("_generation_panel.html", data)
    return respond(request, "generation.html", data, fmt)


# A live request's body: its text fields hold at most a few thousand characters (2,000 by default),
# which even percent-encoded as 4-byte characters stay far below this.
MAX_BODY_BYTES = 64 * 1024
FORM_TYPES = ("", "application/x-www-form-urlencoded")


async def _body(request: Request) -> bytes:
    """The request's body, read no further than MAX_BODY_BYTES (413 beyond)."""
    too_big = NeedleError(f"The request body is over {MAX_BODY_BYTES // 1024} KiB.", status=413,
                          hint="Texts and prompts are limited to a few thousand characters: send less.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def posted_form(request: Request, example: str = '{"prompt": "...", "token": " dog"}') -> dict:
    """The posted fields: a JSON object, or a form (each field's first value); anything else is
    a 415, a body over MAX_BODY_BYTES a 413."""
    is_json = sends_json(request)
    if not is_json and media_type(request) not in FORM_TYPES:
        raise NeedleError(f"A body of type {media_type(request)[:80]!r} cannot be read here.", status=415,
                          hint=f"Send a form (application/x-www-form-urlencoded) or JSON, e.g. {example}.")
    body = await _body(request)
    if is_json:
        try:
            value = json.loads(body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            value = None
        if not isinstance(value, dict):
            raise NeedleError("The body is not a JSON object.", hint=f"Send e.g. {example}.")
        return storable_fields(value)
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100, errors="strict")
    except UnicodeDecodeError:  # raw or percent-encoded bytes that are not UTF-8
        raise NeedleError("The form is not UTF-8 text.", hint="Send the form's fields encoded as UTF-8.") from None
    except ValueError:
        raise NeedleError("The form has over 100 fields.", hint="Send only the fields the form has.") from None
    return storable_fields({k: v[0] for k, v in fields.items()})


async def posted_text(request: Request) -> str | None:
    value = (await posted_form(request, example='{"text": "..."}')).get("text")
    if value is not None and not isinstance(value, str):
        raise NeedleError(f"The text must be a string, not the number {value!r}.", hint='Send e.g. {"text": "..."}.')
    return value


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response
