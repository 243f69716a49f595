"""A real uvicorn server for an app, in a background thread, on a free port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from bs4 import BeautifulSoup


@contextmanager
def running_server(app, timeout: float = 10.0, **options) -> Iterator[str]:
    """Serve app on 127.0.0.1 (port chosen by the OS) and yield its base URL. options: more
    uvicorn.Config settings (e.g. proxy_headers=False, as `needle serve` without NEEDLE_TRUST_PROXY)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def get_json(http: httpx.Client, path: str) -> dict:
    """GET path: a 200 with a JSON body, parsed."""
    r = http.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def get_soup(http: httpx.Client, path: str, **kwargs) -> BeautifulSoup:
    """GET path: a 200 with an HTML body, parsed."""
    r = http.get(path, **kwargs)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/html")
    return BeautifulSoup(r.text, "html.parser")


def cli_runner(monkeypatch, capsys, db_url: str):
    """needle.cli.main in this process on db_url: run(*args) -> (exit code, stdout, stderr).
    The caller clears get_settings' cache after use (app.config.get_settings.cache_clear)."""
    from app.config import get_settings
    from needle.cli import main

    monkeypatch.setenv("NEEDLE_DATABASE_URL", db_url)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    get_settings.cache_clear()

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
