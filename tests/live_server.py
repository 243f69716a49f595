"""A real uvicorn server for an app, in a background thread, on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def needle_serve(db_url: str, *args: str, **env: str) -> Iterator[tuple[int, subprocess.Popen]]:
    """`python -m needle.cli serve ARGS` on a free port with NEEDLE_* settings (env, e.g.
    keep_alive_seconds="1"): yields (port, process) once it answers, stops it with SIGINT after
    and asserts it printed no traceback; proc.output holds what it printed."""
    port = free_port()
    environ = {**os.environ, "NEEDLE_DATABASE_URL": db_url, **{f"NEEDLE_{k.upper()}": v for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "needle.cli", "serve", "--port", str(port), *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer within 60 s"
            time.sleep(0.2)
        yield port, proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.output = proc.communicate(timeout=30)[0]  # type: ignore[attr-defined]
    assert "Traceback" not in proc.output, proc.output  # type: ignore[attr-defined]


def needle_in_process(*args: str, db_url: str, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`needle` run by its main() in this process (quicker than a new one, for the many bad-argument cases)."""
    from app.config import get_settings
    from needle.cli import main

    monkeypatch.setenv("NEEDLE_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        code = main(list(args))
    finally:
        get_settings.cache_clear()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def index_with_corpus(db_url: str, model_dir, name: str, corpus_text: str, context: int, corpus_path):
    """Index a model folder on db_url as a user would, its examples over corpus_text (written to
    corpus_path); the Settings returned have no live-request rate limit (tests that send many
    live requests; tests/test_security.py tests the limit)."""
    from app.config import Settings
    from needle.cli import index_model

    corpus_path.write_text(corpus_text, encoding="utf-8")
    settings = Settings(database_url=db_url, heartbeat_seconds=0.5, page_size=500, live_rate_per_minute=0)
    index_model(settings, str(model_dir), name, device="cpu", corpus=str(corpus_path), context=context, quiet=True)
    return settings
