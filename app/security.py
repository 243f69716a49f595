"""Hardening for a public deployment. Pages are read-only; the only writes a page can make are
the live requests (your text, clamp sweeps, clamped generation), which are size-limited where
they are parsed (app/clamping.py, app/pagedata.py), switched off by NEEDLE_LIVE_REQUESTS=false,
and guarded here (LIVE_GUARDS): refused when another site's page sends them, rate-limited per
client, and capped for the whole site. Every response also carries the security headers below,
and text that no database can store (a NUL character, a lone surrogate) is a 400, not a 500.

A test asserts that every route that is not GET is a live request guarded by LIVE_RATE_LIMIT
(tests/test_hardening.py: by all of LIVE_GUARDS).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request

from app import queries
from app.config import Settings
from app.deps import SessionDep, SettingsDep
from app.errors import NeedleError, TooManyRequests
from app.routes.errors import handle_error
from app.tokens import is_text

# ---------------------------------------------------------------- headers

# Content-Security-Policy: everything from this server only. Scripts come from /-/static files
# (htmx.min.js, needle.js): no inline <script>, no on*="" handlers, no eval (base.html sets
# htmx's allowEval off to match). style-src-attr 'unsafe-inline' is the one exception, for
# style="" attributes only (never a <style> element): the templates set a number per element
# that no static stylesheet can hold (the activation colour --a of each token in a context, a
# score bar's width). They are numbers formatted on the server, and the attribute is escaped;
# a browser without CSP level 3 falls back to style-src 'self' and drops those colours.
# img-src data: is the empty favicon (base.html). frame-ancestors: see EMBED_HEADER below.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors {ancestors}"
)
# A response a route marks with this header (the neuron card, /{model}/{layer}/{neuron}?embed=true,
# made for iframes) may be framed by any site; every other answer by none (clickjacking).
EMBED_HEADER = b"x-needle-embed"


def security_headers(embed: bool) -> list[tuple[bytes, bytes]]:
    headers = {
        "Content-Security-Policy": CSP.format(ancestors="*" if embed else "'none'"),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
    if not embed:
        headers["X-Frame-Options"] = "DENY"  # for browsers that predate frame-ancestors
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


class SecurityHeaders:
    """ASGI middleware: the headers above on every answer (pages, JSON, errors, static files),
    unless the route set one of them itself; frameable only where the route set EMBED_HEADER."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in security_headers(EMBED_HEADER in present) if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------- text a database cannot hold

NUL_HINT = "Remove the NUL character (%00): no page, name or query contains one."


class RefuseNul:
    """ASGI middleware: an address with a NUL character (%00) is a 400 before any route runs.
    Postgres text cannot hold one (a query with it fails), and no name, token or query has one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ("\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
                                        or b"\x00" in scope.get("query_string", b"")):
            error = NeedleError("The address holds a NUL character.", hint=NUL_HINT)
            response = await handle_error(Request(scope), error)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def storable_fields(fields: dict) -> dict:
    """A live request's posted fields, refused (400) if a field is not text or a number (a JSON
    array, object or boolean), or if a text field holds what no database text column can store: a
    NUL character, or half of a surrogate pair (JSON "\\ud800")."""
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
            kind = "true or false" if isinstance(value, bool) else f"a JSON {type(value).__name__.replace('dict', 'object').replace('list', 'array')}"
            raise NeedleError(f"The field {str(name)[:40]!r} is {kind}; it must be text or a number.",
                              hint="Send each field as a string or a number.")
        if isinstance(value, str):
            if not is_text(value):
                raise NeedleError(f"The field {str(name)[:40]!r} is not valid text (it holds a lone surrogate).",
                                  hint="Send UTF-8 text.")
            if "\x00" in value:
                raise NeedleError(f"The field {str(name)[:40]!r} holds a NUL character.", hint=NUL_HINT)
    return fields


# ---------------------------------------------------------------- the live requests' rate limit


class RateLimiter:
    """A token bucket per client: `burst` requests at once, then `per_minute` a minute. In
    process memory (each server process counts alone); at most `max_clients` buckets, the
    least recently used dropped first (a dropped client starts again with a full bucket)."""

    def __init__(self, per_minute: float, burst: int, *, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0  # tokens a second
        self.burst = max(int(burst), 1)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Take one request from the client's bucket: 0.0 if allowed, else the seconds until it would be."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)  # most recently used last
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


def client_address(request: Request, trust_proxy: bool) -> str:
    """Who is asking: the peer's address, or, behind a reverse proxy trusted with
    NEEDLE_TRUST_PROXY=true, the last X-Forwarded-For entry (the one that proxy added; the
    entries before it are whatever the client sent, and cannot be trusted)."""
    if trust_proxy:
        hops = [h.strip() for line in request.headers.getlist("x-forwarded-for") for h in line.split(",")]
        hops = [h for h in hops if h]
        if hops:
            return hops[-1]
    return request.client.host if request.client else "unknown"


def limit_live_requests(request: Request, settings: SettingsDep) -> None:
    """A route dependency: a live request over the client's limit is a 429 with Retry-After,
    raised before the route reads its body, so nothing is stored or queued."""
    limiter: RateLimiter | None = getattr(request.app.state, "live_rate_limiter", None)
    if limiter is None or not settings.live_requests:  # no limit set; or switched off: the route says 403
        return
    wait = limiter.take(client_address(request, settings.trust_proxy))
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise TooManyRequests(
            f"Too many live requests from your address: this server allows {settings.live_rate_burst} at once "
            f"and {settings.live_rate_per_minute:g} a minute.",
            retry_after=seconds,
            hint=f"Try again in {seconds} second{'s' if seconds != 1 else ''}. Stored pages are not limited.",
        )


LIVE_RATE_LIMIT = Depends(limit_live_requests)


# ---------------------------------------------------------------- live requests from another site

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL or origin, lowercased and the port filled in; None
    for anything else (the "null" origin of a sandboxed frame or a file, a malformed address)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # a port that is no number, or out of range
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def _last(request: Request, header: str) -> str | None:
    """A header's last comma-separated entry (the one the nearest proxy added), or None."""
    entries = [e.strip() for line in request.headers.getlist(header) for e in line.split(",") if e.strip()]
    return entries[-1] if entries else None


def own_origins(request: Request, settings: Settings) -> set[tuple[str, str, int]]:
    """The origins this server is reached at: the address the request came to (behind a proxy
    trusted with NEEDLE_TRUST_PROXY=true, the scheme and host the proxy says in X-Forwarded-Proto
    and X-Forwarded-Host, when it sends them), and NEEDLE_PUBLIC_URL's."""
    scheme, host = request.url.scheme, request.url.netloc
    if settings.trust_proxy:
        scheme, host = _last(request, "x-forwarded-proto") or scheme, _last(request, "x-forwarded-host") or host
    found = {origin_of(f"{scheme}://{host}"), origin_of(settings.public_url) if settings.public_url else None}
    return {o for o in found if o is not None}


def refuse_other_sites(request: Request, settings: SettingsDep) -> None:
    """A route dependency: a live request whose Origin header (or, without one, its Referer) is
    another site than this server's is a 403, before anything is read, counted or stored: a page
    elsewhere cannot make its visitors' browsers queue work here (browsers send Origin with every
    POST). A request with neither header, as curl, scripts and the CLI send, is taken."""
    sent = request.headers.get("origin")
    if sent is None:
        sent = request.headers.get("referer")
    if sent is None or origin_of(sent) in own_origins(request, settings):
        return
    raise NeedleError(
        f"This live request came from another site ({sent[:100]!r}): this server takes live requests "
        "from its own pages only.", status=403,
        hint="Use the form on the neuron's page here (a script can send the request without an Origin header). "
        "To this server's operator: behind a proxy, set NEEDLE_PUBLIC_URL to the site's address.",
    )


# ---------------------------------------------------------------- the site's cap on queued live jobs

LIVE_QUEUE_RETRY_SECONDS = 30


def cap_live_queue(session: SessionDep, settings: SettingsDep) -> None:
    """A route dependency: with NEEDLE_LIVE_QUEUE_MAX live jobs queued or running (counted in the
    database, so across server processes), a live request is a 503 with Retry-After."""
    cap = settings.live_queue_max
    if cap and settings.live_requests and queries.pending_live_jobs(session) >= cap:
        raise NeedleError(
            f"This server is busy: {cap} live requests are already queued or running, as many as it takes.",
            status=503, headers={"Retry-After": str(LIVE_QUEUE_RETRY_SECONDS)},
            hint=f"Try again in {LIVE_QUEUE_RETRY_SECONDS} seconds. Stored pages are not affected.",
        )


# Every live request's guards, in this order: another site's request is refused before it costs
# its client a request of the rate limit, and the rate limit is checked before the database is.
LIVE_GUARDS = [Depends(refuse_other_sites), LIVE_RATE_LIMIT, Depends(cap_live_queue)]


def install(app: FastAPI, settings: Settings) -> None:
    """Security headers on every answer, and the live requests' limiter (none when
    NEEDLE_LIVE_RATE_PER_MINUTE=0)."""
    rate = settings.live_rate_per_minute
    app.state.live_rate_limiter = RateLimiter(rate, settings.live_rate_burst) if rate > 0 else None
    app.add_middleware(RefuseNul)
    app.add_middleware(SecurityHeaders)  # added last: the outermost, so every answer gets the headers
