"""The OpenAPI description at /-/openapi.json (what tests/test_fuzz.py fuzzes with schemathesis).

FastAPI describes the routes as declared; two things it cannot see are added here:
- the JSON twins: a page whose path ends in a parameter ("/{model}/{layer}/{neuron}") also
  answers with its data as JSON when ".json" ends the last segment (app/routes/pages.py
  split_format), so each such GET route gets a "{...}.json" path of its own;
- the live requests' bodies (a JSON object or a form), which the routes parse themselves:
  the routes pass the *_REQUEST dicts below as openapi_extra.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI

_NUMBER = {"anyOf": [{"type": "number"}, {"type": "string"}]}  # a form sends numbers as text
_INTEGER = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
_ERROR = {
    "type": "object",
    "properties": {"ok": {"const": False}, "error": {"type": "string"}, "status": {"type": "integer"},
                   "hint": {"type": "string"}},
    "required": ["ok", "error", "status"],
}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _queued(key: str) -> dict:
    """The 202 body of a live request: the shape the three share (where it belongs, and the
    request itself under `key`), which its .json twin also has."""
    request = {"type": "object", "required": ["id", "state", "url", "json_url"],
               "properties": {"id": {"type": "integer"}, "state": {"enum": ["queued", "running", "done", "failed"]},
                              "url": {"type": "string"}, "json_url": {"type": "string"}}}
    return {"type": "object", "required": ["model", "layer", "neuron", "neuron_url", key],
            "properties": {"model": {"type": "string"}, "layer": {"type": "integer"}, "neuron": {"type": "integer"},
                           "neuron_url": {"type": "string"}, key: request}}


def _live_request(description: str, fields: dict, required: list[str], key: str, queued: dict | None = None) -> dict:
    """A live request's body and answers; queued: the 202 body's schema, if not _queued(key)'s."""
    schema = {"type": "object", "properties": fields, "required": required}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": schema}, "application/x-www-form-urlencoded": {"schema": schema}},
        },
        "responses": {
            "202": {"description": f"Queued for a worker (a JSON body): where it belongs, and the request under {key!r} "
                                   "with its permalink",
                    "content": {"application/json": {"schema": queued or _queued(key)}}},
            "303": {"description": "Queued (a form): redirect to the request's page"},
            "400": _error("The fields are not valid, or are over the size limits"),
            "403": _error("Live requests are switched off on this server (NEEDLE_LIVE_REQUESTS=false), or this one "
                          "came from another site's page (its Origin or Referer header)"),
            "404": _error("No such model, layer or neuron"),
            "429": _error("Over this client's rate limit: try again after the Retry-After header's seconds"),
            "503": _error("As many live requests as the server takes are queued or running (NEEDLE_LIVE_QUEUE_MAX): "
                          "try again after the Retry-After header's seconds"),
        },
    }


_SCAN_UNIT = {"type": "object", "required": ["kind", "layer", "index", "sae", "activation", "relative", "url"],
              "properties": {"kind": {"enum": ["neuron", "latent"]}, "layer": {"type": "integer"},
                             "index": {"type": "integer"}, "sae": {"type": ["string", "null"]},
                             "activation": {"type": ["number", "null"]}, "relative": {"type": ["number", "null"]},
                             "url": {"type": "string"}}}
SCAN_REQUEST = _live_request(
    "Your text, run through the model for every unit at once: what fires on each token", {"text": {"type": "string"}},
    ["text"], "scan",
    {"type": "object", "required": ["model", "id", "text", "state", "url", "json_url", "tokens", "top_units"],
     "properties": {"model": {"type": "string"}, "id": {"type": "integer"}, "text": {"type": "string"},
                    "state": {"enum": ["queued", "running", "done", "failed", "broken"]}, "url": {"type": "string"},
                    "json_url": {"type": "string"},
                    "tokens": {"type": "array", "items": {"type": "object", "properties": {
                        "units": {"type": "array", "items": _SCAN_UNIT}}}},
                    "top_units": {"type": "array", "items": _SCAN_UNIT}}},
)
TEXT_REQUEST = _live_request("Your text, run through the model on this neuron", {"text": {"type": "string"}}, ["text"],
                             "run")
CLAMP_REQUEST = _live_request(
    "A clamp sweep: p(token | prompt) as the neuron is clamped to COUNT values from START to STOP",
    {"prompt": {"type": "string"}, "token": {"type": "string"}, "start": _NUMBER, "stop": _NUMBER, "count": _INTEGER,
     "positions": {"enum": ["all", "last"]}},
    ["prompt", "token", "start", "stop", "count"],
    "curve",
)
GENERATE_REQUEST = _live_request(
    "A generation with the neuron clamped at VALUE, beside the unclamped one (greedy without a seed)",
    {"prompt": {"type": "string"}, "value": _NUMBER, "tokens": _INTEGER, "seed": _INTEGER},
    ["prompt", "value", "tokens"],
    "generation",
)


def add_json_twins(schema: dict) -> dict:
    """Give each GET path ending in a parameter a ".json" twin path (in place)."""
    paths = schema.setdefault("paths", {})
    for path, item in list(paths.items()):
        page = item.get("get")
        if page is None or not path.endswith("}") or path + ".json" in paths:
            continue
        twin = copy.deepcopy(page)
        twin["operationId"] = f"{page.get('operationId', path)}_json"
        twin["summary"] = f"{page.get('summary', path)} (JSON)"
        # the HTML page's ?fragment= (an htmx panel) has no JSON twin
        twin["parameters"] = [p for p in page.get("parameters", []) if p.get("name") != "fragment"]
        twin["responses"] = {
            "200": {"description": "The page's data", "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": _error("A parameter is not valid"),
            "404": _error("No such thing"),
            **{k: v for k, v in page.get("responses", {}).items() if k == "422"},
        }
        paths[path + ".json"] = {"get": twin}
    return schema


def install(app: FastAPI) -> None:
    build = app.openapi  # FastAPI's own: builds the schema once and keeps it in app.openapi_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_json_twins(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
