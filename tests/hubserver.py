"""A stand-in for the Hugging Face hub on 127.0.0.1 that counts the requests it gets.

Tests point huggingface_hub at it (point_hub_at in this process, hub_env for a subprocess) to check how many
requests the code under test makes (one probe, no retries; or none at all offline), the same with or without
network. Every request gets the same answer: a status (with headers), or with answer=False no answer at all
(the connection is held open until the client gives up, so the client's own time-out is what ends the wait).

Both also set HF_HUB_DISABLE_TELEMETRY: otherwise huggingface_hub asks {ENDPOINT}/api/agent-harnesses once a
process (unless a fresh copy is cached in HF_HOME) for its user-agent string, a request that is the library's,
not the code's, and would make the count depend on what ran before.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How long a request is held open with answer=False before the server hangs up anyway: a client with no
# time-out of its own then sees the connection dropped (not a time-out), and the test ends instead of hanging.
HOLD_LIMIT_S = 60.0


@dataclass
class CountingHub:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of each request, in order


@contextmanager
def counting_hub(
    status: int = 503, headers: dict[str, str] | None = None, answer: bool = True
) -> Iterator[CountingHub]:
    """Serve on 127.0.0.1 (port chosen by the OS) and yield a CountingHub whose .requests fills as requests come."""
    release = threading.Event()
    lock = threading.Lock()
    hub = CountingHub(url="")

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            with lock:
                hub.requests.append((self.command, self.path))
            if not answer:
                release.wait(HOLD_LIMIT_S)
                self.close_connection = True
                return
            body = b'{"error": "stand-in hub"}' if self.command != "HEAD" else b""
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _any

        def log_message(self, *args) -> None:  # no request lines on stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="counting-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def point_hub_at(monkeypatch, url: str, cache_dir) -> None:
    """Send this process's huggingface_hub requests to url, with an empty cache in cache_dir, not offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


def hub_env(url: str, home_dir) -> dict[str, str | None]:
    """Environment for a subprocess whose huggingface_hub talks to url (read at import), with an empty HF_HOME
    and cache under home_dir, not offline (None: remove the variable)."""
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home_dir),
        "HF_HUB_CACHE": os.path.join(home_dir, "hub"),
        "HF_HUB_OFFLINE": None,
        "HF_DATASETS_OFFLINE": None,
        "TRANSFORMERS_OFFLINE": None,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
