"""How `needle serve` runs uvicorn: its connection limits (settings in app/config.py).

uvicorn closes a keep-alive connection that is idle after an answer (timeout_keep_alive), but
sets no deadline for a request head: a connection that sends nothing, or a header a byte at a
time, stays open for ever, each one a socket and a file descriptor. RequestHeadTimeout, uvicorn's
h11 protocol with such a deadline, closes it.
"""

from __future__ import annotations

import asyncio
import functools

from uvicorn.protocols.http.h11_impl import H11Protocol

from app.config import Settings


class RequestHeadTimeout(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request head: header_timeout seconds from
    the connection opening, or from the first byte of a request after an answer (while idle
    before it, uvicorn's keep-alive timeout applies). A connection whose request head has not
    arrived whole by then is closed."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.await_head()

    def data_received(self, data: bytes) -> None:
        if self.head_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self.await_head()  # a new request head begins
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.cancel_head_deadline()  # its head came; until the next one begins, the keep-alive timeout applies

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_deadline()
        super().connection_lost(exc)

    def await_head(self) -> None:
        waiting = self.cycle  # the request before the awaited one (None: none yet)

        def expire() -> None:
            self.head_deadline = None
            if self.cycle is waiting and not self.transport.is_closing():  # no new request head arrived
                self.transport.close()

        self.cancel_head_deadline()
        self.head_deadline = self.loop.call_later(self.header_timeout, expire)

    def cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn.run's and uvicorn.Config's options for the connections, from the settings. The
    protocol is a partial of a module-level class, so `--processes` can hand it to its processes."""
    return {
        "http": functools.partial(RequestHeadTimeout, header_timeout=settings.header_timeout_seconds),
        "timeout_keep_alive": settings.keep_alive_seconds,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # uvicorn answers 503 once the open connections, this one included, reach limit_concurrency
        "limit_concurrency": settings.max_connections + 1 if settings.max_connections else None,
    }
