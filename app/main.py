"""The web server: create_app() builds the FastAPI app. Never imports torch, transformers
or workers, so it starts fast (a test checks its imports).

Run it with: uvicorn --factory app.main:create_app
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware

from app import openapi, security
from app.config import ROOT, Settings, get_settings
from app.db import engine_for
from app.routes import errors, pages


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET (link checkers and some link-preview bots send it;
    FastAPI routes GET alone). The server sends the headers only: uvicorn drops the body of an
    answer to HEAD, keeping its Content-Length."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # The app's own pages live under /-/ so they never clash with a model's name; no docs
    # UI, which would load its assets from a CDN.
    app = FastAPI(title="Needle", docs_url=None, redoc_url=None, openapi_url="/-/openapi.json")
    app.state.settings = settings
    app.state.engine = engine_for(settings.resolved_database_url())
    app.state.schema_checked = False
    # Mounted before the page routes, whose /{model}/{layer}/{neuron} would match it too.
    app.mount("/-/static", StaticFiles(directory=ROOT / "static"), name="static")
    app.include_router(pages.router)
    errors.install_error_handler(app)
    if settings.gzip_level > 0:  # NEEDLE_GZIP_LEVEL
        app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=settings.gzip_level)
    security.install(app, settings)  # after the error handler: its answers get the headers too
    app.add_middleware(HeadAsGet)
    openapi.install(app)
    return app
