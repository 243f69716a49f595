"""The ceiling for bench/server.py --ceiling: Needle's own app (app.main.create_app, with its
middleware: security headers, HEAD as GET, the error handler), served by uvicorn as `needle
serve` serves it, where the neuron page and the search answer with fixed bytes held in memory: a
real page of each, fetched from the real server just before. No database, no rendering: what
those two pages would reach if nothing had to be computed for them, e.g. if every page were
rendered ahead of time and kept in memory.

    python bench/ceiling.py --port 8001 --neuron page.html --search search.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its workers.py would hide the workers package

from fastapi import Request  # noqa: E402 - at module level: FastAPI reads the routes' annotations here
from fastapi.responses import HTMLResponse  # noqa: E402


def ceiling_app(neuron_bytes: bytes, search_bytes: bytes):
    from app.config import get_settings
    from app.main import create_app

    app = create_app(get_settings())

    # FastAPI routes as the pages' own are (app/routes/pages.py): plain functions, run in the
    # thread pool, with the path's parameters, answering as app.rendering.respond does
    def neuron_page(request: Request, model: str, layer: str, neuron: str) -> HTMLResponse:
        return HTMLResponse(neuron_bytes, headers={"Vary": "HX-Request"})

    def search_page(request: Request, model: str, token: str | None = None) -> HTMLResponse:
        return HTMLResponse(search_bytes, headers={"Vary": "HX-Request"})

    routes = app.router.routes
    before = len(routes)
    app.router.add_api_route("/{model}/{layer}/{neuron}", neuron_page, methods=["GET"])
    app.router.add_api_route("/{model}/search", search_page, methods=["GET"])
    added = routes[before:]  # moved first, before the app's own routes of the same paths
    del routes[before:]
    routes[:0] = added
    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--neuron", type=Path, required=True, help="the neuron page's bytes")
    ap.add_argument("--search", type=Path, required=True, help="the search page's bytes")
    args = ap.parse_args()
    for path in (args.neuron, args.search):
        if not path.is_file():
            ap.error(f"{path} is not a file: give the bytes of a page saved from a running server")
    app = ceiling_app(args.neuron.read_bytes(), args.search.read_bytes())
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")  # as `needle serve` runs it


if __name__ == "__main__":
    main()
