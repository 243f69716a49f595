"""The one error handler: NeedleError, FastAPI's 404/405/422 and unexpected exceptions all
become an HTML error page, or {"ok": false, "error": ..., "status": ...} for a .json path or a
request that sent JSON (a live request from a script).
Never a stack trace; an unexpected exception is logged and answered with a generic 500."""

from __future__ import annotations

import logging
from html import escape

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from app.errors import NeedleError
from app.rendering import environment, sends_json

log = logging.getLogger("needle.web")


def _describe(request: Request, exc: Exception) -> tuple[int, str, str | None]:
    """(status, message, hint) for any exception."""
    if isinstance(exc, NeedleError):
        return exc.status, exc.message, exc.hint
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        return 422, f"The request is not valid: {problems}.", None
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return 404, f"There is no page at {request.url.path}.", "The models list is at /."
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            if "GET" not in allowed and "POST" in allowed:  # a live request's address: your text, clamp, generate
                return 405, (f"{request.method} is not allowed at {request.url.path}: it takes the form's fields "
                             "(or JSON) sent with POST."), "Use the form on the neuron's page."
            message = f"{request.method} is not allowed at {request.url.path}; Needle's pages are read with GET."
            return 405, message, None
        return exc.status_code, str(exc.detail), None
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return 500, "Something went wrong on the server; the error was logged.", None


def is_json_path(request: Request) -> bool:
    return request.url.path.rstrip("/").endswith(".json")


def wants_json(request: Request) -> bool:
    """A .json path, or a body sent as JSON: the error is JSON too (a form post gets the HTML page)."""
    return is_json_path(request) or sends_json(request)


async def handle_error(request: Request, exc: Exception) -> Response:
    status, message, hint = _describe(request, exc)
    headers = getattr(exc, "headers", None) if isinstance(exc, (HTTPException, NeedleError)) else None
    if wants_json(request):
        body = {"ok": False, "error": message, "status": status}
        if hint:
            body["hint"] = hint
        return JSONResponse(body, status_code=status, headers=headers)
    # an htmx panel (your text, a clamp sweep, a generation): the error takes the panel's place,
    # keeping its id so the form can be sent again (static/needle.js lets htmx swap an error in)
    target = request.headers.get("HX-Target") if request.headers.get("HX-Request") == "true" else None
    try:
        page = environment().get_template("_error_panel.html" if target else "error.html")
        context = {}
        if status == 400 and isinstance(request.scope.get("path_params", {}).get("model"), str):
            # a bad request to a model's page (a search with no token, say): the model's header
            # search box and breadcrumb, and the search form again on a search, so it is no dead end
            context["model"] = request.scope["path_params"]["model"]
            context["search_form"] = request.url.path.endswith("/search")
            context["query"] = request.query_params.get("token", "")[:200]
        html = page.render(status=status, error=message, hint=hint, target=target, **context)
    except Exception:  # noqa: BLE001 - the error page itself must not fail
        log.exception("error page could not be rendered")
        html = f"<!doctype html><title>Error {status}</title><h1>Error {status}</h1><p>{escape(message)}</p>"
    return HTMLResponse(html, status_code=status, headers=headers)


class AnswerUnexpectedErrors:
    """ASGI middleware: an exception no handler took becomes the generic 500 page here, so it
    does not reach the server, which would log it a second time and drop the connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracking_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except Exception as exc:
            if started:
                raise  # too late to answer with an error page
            response = await handle_error(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handler(app: FastAPI) -> None:
    for exc_type in (NeedleError, HTTPException, RequestValidationError):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(AnswerUnexpectedErrors)
