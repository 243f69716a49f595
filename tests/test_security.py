"""Security (issue 7): pages are read-only and the live requests are the only writes, rate-limited
per client; every token string is escaped (hostile tokens on every page that shows tokens); every
answer carries a Content-Security-Policy and friends. Real HTTP against a real server and database
(SQLite and Postgres), filled through the project's own writers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest
from bs4 import BeautifulSoup
from fastapi.routing import APIRoute
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.routing import Mount

from app import security, urls
from app.config import Settings
from app.db import engine_for, session_scope
from app.main import create_app
from app.schema import ClampCurve, Generation, Job, TextRun
from app.tokens import in_context, visible
from tests.hostile import FEATURE, MODEL, MODEL_B, PLAIN, TEXTAREA, fill_hostile
from tests.live_server import running_server
from tests.synthetic import HOSTILE, HOSTILE_TOKENS, fill_synthetic

# a neuron's and a latent's live requests (test your own text, a clamp sweep, a clamped generation), and the model's
LIVE_PATHS = {
    f"{unit}/{kind}"
    for unit in ("/{model}/{layer}/{neuron}", "/{model}/sae/{sae}/{latent}")
    for kind in ("text", "clamp", "generate")
} | {"/{model}/text"}  # what fires on your text: every unit of the model
HTML_SPECIAL = set("<>&\"'")


# ---------------------------------------------------------------- 1. read-only: the live requests are the only writes


def routes_of(routes) -> list:
    """Every route of a route list, into included routers (FastAPI includes them lazily)."""
    out = []
    for route in routes:
        included = getattr(route, "original_router", None)
        out += routes_of(included.routes) if included is not None else [route]
    return out


def test_every_write_route_is_a_rate_limited_live_request(tmp_path):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'none.sqlite'}"))
    writes = {}
    for route in routes_of(app.routes):
        if isinstance(route, Mount):
            assert route.path == "/-/static", route.path  # static files: GET and HEAD only (405 otherwise)
            continue
        methods = set(getattr(route, "methods", None) or ()) - {"GET", "HEAD"}
        if methods:
            writes[route.path] = route
    assert set(writes) == LIVE_PATHS, "a non-GET route that is not a live request is a write path"
    for path, route in writes.items():
        assert isinstance(route, APIRoute) and route.methods == {"POST"}, path
        guards = [d.call for d in route.dependant.dependencies]
        assert security.limit_live_requests in guards, f"{path} is not rate-limited"


# ---------------------------------------------------------------- 2. the rate limiter itself


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    limiter = security.RateLimiter(per_minute=6, burst=3, clock=clock)  # one more every 10 s
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(10.0)
    assert limiter.take("b") == 0.0, "each client has its own bucket"
    clock.now += 4
    assert limiter.take("a") == pytest.approx(6.0), "a refused request takes nothing"
    clock.now += 6
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(10.0)
    clock.now += 3600
    takes = [limiter.take("a") for _ in range(4)]
    assert takes[:3] == [0.0, 0.0, 0.0] and takes[3] == pytest.approx(10.0), "the bucket holds at most the burst"


def test_token_bucket_forgets_the_least_recently_seen_clients():
    clock = Clock()
    limiter = security.RateLimiter(per_minute=1, burst=1, max_clients=3, clock=clock)
    for client in "abc":
        assert limiter.take(client) == 0.0
    assert limiter.take("a") > 0  # "a" is now the most recent
    assert limiter.take("d") == 0.0  # drops "b"
    assert len(limiter._buckets) == 3 and "b" not in limiter._buckets
    assert limiter.take("a") > 0 and limiter.take("c") > 0


def request_from(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", f.encode()) for f in forwarded]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 5000)})


def test_client_address_trusts_x_forwarded_for_only_when_told():
    assert security.client_address(request_from("10.0.0.1", "6.6.6.6"), trust_proxy=False) == "10.0.0.1"
    assert security.client_address(request_from("10.0.0.1"), trust_proxy=True) == "10.0.0.1"
    # the proxy appends the address it saw; what the client wrote before it is not trusted
    assert security.client_address(request_from("10.0.0.1", "6.6.6.6, 203.0.113.7"), trust_proxy=True) == "203.0.113.7"
    assert security.client_address(request_from("10.0.0.1", "6.6.6.6", "203.0.113.8 "), trust_proxy=True) == "203.0.113.8"


def test_needle_serve_lets_uvicorn_read_x_forwarded_for_only_when_trusted(sqlite_url, monkeypatch):
    import uvicorn

    from needle import cli

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.append(options["proxy_headers"]))
    for trust in (False, True):
        cli.serve(Settings(database_url=sqlite_url, trust_proxy=trust), "127.0.0.1", 0)
    assert seen == [False, True]


# ---------------------------------------------------------------- a site with hostile tokens everywhere


@dataclass
class Hostile:
    http: httpx.Client
    engine: object
    run: int  # a text run on 0/0, done
    failed_run: int  # a text run on 0/1 whose job failed with a hostile error
    curve: int  # a clamp curve on 0/0
    generation: int  # a clamped generation on 0/0


@pytest.fixture
def hostile(db_url):
    engine = engine_for(db_url)
    ids = fill_hostile(engine)
    app = create_app(Settings(database_url=db_url, live_rate_per_minute=0))
    with running_server(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        yield Hostile(http, engine, ids["run"], ids["failed_run"], ids["curve"], ids["generation"])


def inert(r: httpx.Response, *, status: int = 200) -> BeautifulSoup:
    """An HTML answer in which no hostile string became markup: none appears unescaped, and the
    parsed page has no handler attribute, inline script, <style> element or frame."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("text/html")
    for h in HOSTILE_TOKENS + [TEXTAREA]:
        if HTML_SPECIAL & set(h):
            assert h not in r.text, f"{h[:40]!r} is in the HTML unescaped"
    soup = BeautifulSoup(r.text, "html.parser")
    for tag in soup.find_all(True):
        handlers = [a for a in tag.attrs if a.lower().startswith("on")]
        assert not handlers, (tag.name, handlers)
        assert tag.name not in ("iframe", "object", "embed", "style"), tag.name
        if tag.name == "script":
            assert tag.get("src", "").startswith("/-/static/") and not (tag.string or "").strip(), str(tag)[:200]
        if tag.name == "svg":
            assert "plot" in tag.get("class", []), str(tag)[:200]
    return soup


# ---------------------------------------------------------------- 3. hostile tokens on every page that shows tokens


def test_neuron_pages_show_hostile_tokens_as_text(hostile):
    for i, token in enumerate(HOSTILE_TOKENS):
        soup = inert(hostile.http.get(urls.neuron_url(MODEL, 0, i)))
        assert soup.select_one("table.decoding code.tok").get_text() == visible(token)
        assert soup.select_one("p.summary code.tok").get_text() == visible(token)
        # the sweep form: the top token in an attribute, the prompt in a <textarea> that stays one
        form = soup.select("form.clamp-form")[0]
        assert form.select_one("input[name=token]")["value"] == visible(token)  # as its chip shows it
        # (after the newline the page writes at a <textarea>'s start, which a browser drops): the
        # neuron's top context up to its max token, hostile tokens and all, else the model's prompt
        data = hostile.http.get(urls.neuron_url(MODEL, 0, i, fmt="json")).json()
        prompt = data["clamp_form"]["prompt"]
        top = data["examples"][0] if data["examples"] else None
        assert prompt == ("".join(top["tokens"][: top["max_index"] + 1]) if top else TEXTAREA)
        assert form.select_one("textarea[name=prompt]").get_text() == "\n" + prompt
        assert len(soup.select("textarea")) == 3, "no textarea closed early or opened by a token"
        assert data["input_tokens"][0]["token"] == token
        # the htmx fragment of the same page
        inert(hostile.http.get(urls.neuron_url(MODEL, 0, i), headers={"HX-Request": "true"}))


def test_examples_clamp_curves_and_features_on_the_neuron_page(hostile):
    soup = inert(hostile.http.get(urls.neuron_url(MODEL, 0, 0)))
    data = hostile.http.get(urls.neuron_url(MODEL, 0, 0, fmt="json")).json()
    shown = [t.get_text() for t in soup.select("#firing ol.contexts .ctx-tokens .t")]
    stored = [t for ex in data["examples"] for t in ex["tokens"]]
    assert shown[: len(stored)] == [in_context(t) for t in stored]
    assert set(HOSTILE_TOKENS) <= set(stored)
    titles = [t["title"] for t in soup.select("#firing ol.contexts .ctx-tokens .t")][: len(stored)]
    assert all(title.startswith(visible(t)) for title, t in zip(titles, stored)), "hover titles hold the token as text"
    sources = {s.get_text() for s in soup.select(".ctx-source")}
    assert sources <= set(HOSTILE_TOKENS) and HOSTILE in sources
    curve = soup.select_one("#clamp .clamp-curve-box")
    assert curve.select_one("q.prompt").get_text() == TEXTAREA
    assert [c.get_text() for c in curve.select("table.tokens")[0].select("code.tok")] == [visible(t) for t in HOSTILE_TOKENS]
    assert data["clamp_curves"][0]["top_tokens"]["low"][0]["token"] == HOSTILE
    assert soup.select_one("#features a").get_text() == FEATURE


def test_layer_and_model_pages(hostile):
    soup = inert(hostile.http.get(urls.layer_url(MODEL, 0, sort="neuron")))
    cells = [td.get_text() for td in soup.select("table.neurons tbody td.tokens")]
    for i, token in enumerate(HOSTILE_TOKENS):
        assert visible(token) in cells[i]
    data = hostile.http.get(urls.layer_url(MODEL, 0, sort="neuron", fmt="json")).json()
    assert json.dumps(data).count("\\u202e") >= 1  # raw in JSON, escaped by the JSON encoder only
    soup = inert(hostile.http.get(urls.model_url(MODEL)))
    assert hostile.http.get(urls.model_url(MODEL, fmt="json")).json()["examples_run"]["corpus"] == HOSTILE


def test_search_for_hostile_tokens(hostile):
    for token in HOSTILE_TOKENS:
        r = hostile.http.get(urls.search_url(MODEL, token))
        if len(token) > 200:  # over the query limit: the error page, escaped too
            inert(r, status=400)
            assert hostile.http.get(urls.search_url(MODEL, token, fmt="json")).json()["ok"] is False
            continue
        soup = inert(r)
        assert soup.select_one("form.search input[name=token]")["value"] == token, "the query stays in its attribute"
        data = hostile.http.get(urls.search_url(MODEL, token, fmt="json")).json()
        assert data["query"] == token and data["results"][0]["token"] == token
        first = soup.select("table.results tbody tr")[0]
        assert visible(token) in first.get_text()


def test_features_pages(hostile):
    soup = inert(hostile.http.get(urls.features_url(MODEL)))
    text = soup.get_text()
    assert HOSTILE_TOKENS[2] in text and HOSTILE in text, "the run's description and specs, and the skip reason"
    for q in HOSTILE_TOKENS[:9]:  # the feature search echoes the query
        soup = inert(hostile.http.get(urls.features_url(MODEL, q)))
        assert soup.select_one("form.search input[name=q]")["value"] == q
        assert hostile.http.get(urls.features_url(MODEL, q, fmt="json")).json()["query"] == q
    soup = inert(hostile.http.get(urls.feature_url(MODEL, FEATURE)))
    assert HOSTILE_TOKENS[1] in soup.get_text() and soup.select_one("code").get_text() == HOSTILE_TOKENS[3]
    assert hostile.http.get(urls.feature_url(MODEL, FEATURE, fmt="json")).json()["source"] == HOSTILE_TOKENS[3]


def test_text_run_clamp_and_generation_pages(hostile):
    http = hostile.http
    for url in (urls.text_run_url(MODEL, 0, 0, hostile.run), urls.clamp_url(MODEL, 0, 0, hostile.curve),
                urls.generation_url(MODEL, 0, 0, hostile.generation), urls.text_run_url(MODEL, 0, 1, hostile.failed_run)):
        inert(http.get(url))
        inert(http.get(url, headers={"HX-Request": "true"}))  # the panel polling itself
    soup = inert(http.get(urls.text_run_url(MODEL, 0, 0, hostile.run)))
    assert soup.select_one("pre.your-text").get_text() == " ".join(HOSTILE_TOKENS)
    assert [t.get_text() for t in soup.select(".ctx-tokens .t")] == [in_context(t) for t in HOSTILE_TOKENS]
    data = http.get(urls.text_run_url(MODEL, 0, 0, hostile.run, fmt="json")).json()
    assert data["run"]["result"]["tokens"] == HOSTILE_TOKENS
    soup = inert(http.get(urls.text_run_url(MODEL, 0, 1, hostile.failed_run)))
    assert HOSTILE_TOKENS[1] in soup.select_one(".error-message").get_text()

    soup = inert(http.get(urls.clamp_url(MODEL, 0, 0, hostile.curve)))
    assert soup.select_one("q.prompt").get_text() == TEXTAREA
    assert HOSTILE_TOKENS[1] in soup.get_text()  # the note
    assert http.get(urls.clamp_url(MODEL, 0, 0, hostile.curve, fmt="json")).json()["curve"]["token"] == HOSTILE

    soup = inert(http.get(urls.generation_url(MODEL, 0, 0, hostile.generation)))
    # "\n" first: the newline written after <pre>, which a browser drops (html.parser keeps it)
    assert soup.select_one("pre.continuation.clamped").get_text() == "\n" + " ".join(HOSTILE_TOKENS)
    assert soup.select_one("q.prompt").get_text() == TEXTAREA
    data = http.get(urls.generation_url(MODEL, 0, 0, hostile.generation, fmt="json")).json()
    assert data["generation"]["clamped"]["text"] == " ".join(HOSTILE_TOKENS)


def test_jobs_page_and_error_pages(hostile):
    http = hostile.http
    soup = inert(http.get(urls.jobs_url()))
    assert HOSTILE_TOKENS[1] in soup.get_text(), "the failed job's error"
    for bad in (HOSTILE, TEXTAREA, HOSTILE_TOKENS[1]):
        inert(http.get(urls.jobs_url(state=bad)), status=400)
        inert(http.get(urls.jobs_url(model=bad)), status=404)
        inert(http.get(f"/{MODEL}/0/{bad.replace('/', '')}"), status=404)
        inert(http.get(urls.layer_url(MODEL, 0) + "?sort=" + httpx.QueryParams({"s": bad})["s"]), status=400)
        r = http.get(urls.jobs_url(state=bad, fmt="json"))
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")


def test_entities_stay_text(hostile):
    """A token that looks like entities is shown as those characters, not decoded into markup."""
    token = "&lt;b&gt;&amp;"
    r = hostile.http.get(urls.neuron_url(MODEL, 0, HOSTILE_TOKENS.index(token)))
    soup = inert(r)
    assert soup.select_one("table.decoding code.tok").get_text() == token
    assert "&amp;lt;b&amp;gt;&amp;amp;" in r.text


# ---------------------------------------------------------------- 4. live requests: rate-limited per client


GOOD = {
    "text": {"text": "w1 w2"},
    "clamp": {"prompt": "w1 w2", "token": "w3", "start": "-1", "stop": "1", "count": "5"},
    "generate": {"prompt": "w1 w2", "value": "1", "tokens": "4"},
}


def stored(engine) -> tuple[int, ...]:
    with session_scope(engine) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (TextRun, ClampCurve, Generation, Job))


def plain_site(db_url: str, **settings):
    """A server over a small synthetic model: (http client, engine)."""
    engine = engine_for(db_url)
    fill_synthetic(engine, MODEL, 1, 20, ["<unk>", *PLAIN], tokenizer=True)
    with running_server(create_app(Settings(database_url=db_url, **settings))) as base, \
            httpx.Client(base_url=base, timeout=20) as http:
        yield http, engine


@pytest.fixture
def limited(db_url):
    yield from plain_site(db_url, live_rate_per_minute=6, live_rate_burst=3)


@pytest.fixture
def unlimited(db_url):
    yield from plain_site(db_url, live_rate_per_minute=0)


def test_live_requests_over_the_limit_are_429_and_store_nothing(limited):
    http, engine = limited
    where = urls.neuron_url(MODEL, 0, 1)
    accepted = [http.post(f"{where}/{kind}", json=GOOD[kind]) for kind in ("text", "clamp", "generate")]
    assert [r.status_code for r in accepted] == [202, 202, 202], [r.text[:200] for r in accepted]
    before = stored(engine)
    # the burst is spent: every live request now waits, in each form a client can send it
    for kind in ("text", "clamp", "generate"):
        panel = {"HX-Request": "true", "HX-Target": f"{kind}-result"}
        for how in ({"json": GOOD[kind]}, {"data": GOOD[kind]}, {"data": GOOD[kind], "headers": {"HX-Request": "true"}},
                    {"data": GOOD[kind], "headers": panel}):
            r = http.post(f"{where}/{kind}", **how)
            assert r.status_code == 429, (kind, how.keys(), r.status_code, r.text[:300])
            assert 1 <= int(r.headers["retry-after"]) <= 10
            if "json" in how:
                body = r.json()
                assert body["ok"] is False and body["status"] == 429
                assert "Too many live requests" in body["error"] and "Try again in" in body["hint"]
            else:
                soup = BeautifulSoup(r.text, "html.parser")
                assert "Too many live requests" in soup.select_one(".error-message").get_text()
                assert "Try again in" in soup.select_one(".hint").get_text()
                if how.get("headers") == panel:  # htmx's panel: the error alone, in the panel's place
                    top = soup.find(True)
                    assert top.get("id") == f"{kind}-result" and "error-panel" in top["class"] and not soup.find("html")
                    assert "Error 429" in top.get_text()
    assert stored(engine) == before, "a refused live request stores nothing"
    # pages are not limited
    for _ in range(20):
        assert http.get(where).status_code == 200


def test_each_client_has_its_own_limit_behind_a_trusted_proxy(db_url):
    engine = engine_for(db_url)
    fill_synthetic(engine, MODEL, 1, 20, ["<unk>", *PLAIN], tokenizer=True)
    where = urls.neuron_url(MODEL, 0, 1) + "/text"

    def codes(http, client: str, n: int) -> list[int]:
        return [http.post(where, json=GOOD["text"], headers={"X-Forwarded-For": f"6.6.6.{i}, {client}"}).status_code
                for i in range(n)]

    # uvicorn applies X-Forwarded-For from 127.0.0.1 itself when `needle serve` lets it (proxy_headers)
    trusted = Settings(database_url=db_url, live_rate_per_minute=1, live_rate_burst=2, trust_proxy=True)
    for proxy_headers in (True, False):
        with running_server(create_app(trusted), proxy_headers=proxy_headers) as base, \
                httpx.Client(base_url=base, timeout=20) as http:
            assert codes(http, "203.0.113.1", 3) == [202, 202, 429], "a client cannot dodge it with its own header"
            assert codes(http, "203.0.113.2", 3) == [202, 202, 429], "another client behind the proxy"
    untrusted = Settings(database_url=db_url, live_rate_per_minute=1, live_rate_burst=2)
    with running_server(create_app(untrusted), proxy_headers=untrusted.trust_proxy) as base, \
            httpx.Client(base_url=base, timeout=20) as http:
        assert codes(http, "203.0.113.1", 2) + codes(http, "203.0.113.2", 1) == [202, 202, 429], "the header is ignored"


def test_an_htmx_error_panel_escapes_its_target(unlimited):
    """The panel echoes htmx's HX-Target header as its id: a hostile one stays an attribute value."""
    http, engine = unlimited
    before = stored(engine)
    hostile = '"><script>alert(1)</script><div id="x'
    r = http.post(f"{urls.neuron_url(MODEL, 0, 1)}/clamp", data={**GOOD["clamp"], "start": "5", "stop": "1"},
                  headers={"HX-Request": "true", "HX-Target": hostile})
    assert r.status_code == 400
    soup = BeautifulSoup(r.text, "html.parser")
    assert not soup.find("script") and len(soup.find_all(True, id=True)) == 1
    panel = soup.find(True)
    assert panel["id"] == hostile and "error-panel" in panel["class"]
    assert "not below its end 1" in panel.get_text()
    assert stored(engine) == before, "a refused sweep stores nothing"


def test_switched_off_live_requests_are_403_not_429(db_url):
    engine = engine_for(db_url)
    fill_synthetic(engine, MODEL, 1, 20, ["<unk>", *PLAIN], tokenizer=True)
    off = Settings(database_url=db_url, live_requests=False, live_rate_per_minute=1, live_rate_burst=1)
    with running_server(create_app(off)) as base, httpx.Client(base_url=base, timeout=20) as http:
        for _ in range(3):
            r = http.post(urls.neuron_url(MODEL, 0, 1) + "/text", json=GOOD["text"])
            assert r.status_code == 403 and "switched off" in r.json()["error"]


def test_text_no_database_can_store_is_a_400_not_a_500(unlimited):
    """Found by the fuzzing: Postgres text cannot hold a NUL character, and no database a lone
    surrogate; each was a 500 where it met a query or an insert."""
    http, engine = unlimited
    before = stored(engine)
    for path in (urls.search_url(MODEL, "a\x00b"), urls.search_url(MODEL, "a\x00b", fmt="json"),
                 urls.features_url(MODEL, "\x00"), urls.jobs_url(model="\x00", fmt="json"), "/a%00b", "/a%00b.json",
                 f"/{MODEL}/0/1%00"):
        r = http.get(path)
        assert r.status_code == 400 and "NUL" in r.text and "Traceback" not in r.text, (path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/json" if ".json" in path else "text/html"), path
    where = urls.neuron_url(MODEL, 0, 1)
    as_json = {"content-type": "application/json"}
    for body in ({"text": "a\x00b"}, {"text": "\ud800"}):
        # JSON as a client writes it ("\u0000", "\ud800"); a form body is decoded leniently, so a
        # lone surrogate cannot arrive that way
        hows = [{"content": json.dumps(body), "headers": as_json}] + ([{"data": body}] if "\x00" in body["text"] else [])
        for how in hows:
            r = http.post(f"{where}/text", **how)
            assert r.status_code == 400 and "Traceback" not in r.text, (body, how.keys(), r.status_code, r.text[:200])
    r = http.post(f"{where}/clamp", json={**GOOD["clamp"], "prompt": "a\x00"})
    assert r.status_code == 400 and "NUL" in r.json()["error"]
    assert stored(engine) == before


def test_neuron_page_while_a_clamp_curve_it_asked_for_is_queued(unlimited):
    """Found here: a curve waiting for a worker stored JSON null, not NULL, as its probabilities,
    so the neuron page listed it as finished and failed (500) on its missing baseline."""
    http, _ = unlimited
    where = urls.neuron_url(MODEL, 0, 1)
    assert http.post(f"{where}/clamp", json=GOOD["clamp"]).status_code == 202
    assert http.get(where).status_code == 200
    assert http.get(urls.neuron_url(MODEL, 0, 1, fmt="json")).json()["clamp_curves"] == []


# ---------------------------------------------------------------- 5. headers: CSP, framing, sniffing, referrer


def csp(r: httpx.Response) -> dict[str, str]:
    policy = r.headers["content-security-policy"]
    return {d.strip().split(" ", 1)[0]: d.strip().split(" ", 1)[1] for d in policy.split(";") if d.strip()}


def test_every_answer_sends_the_security_headers(hostile):
    http = hostile.http
    answers = {
        "page": http.get(urls.neuron_url(MODEL, 0, 0)),
        "json": http.get(urls.neuron_url(MODEL, 0, 0, fmt="json")),
        "fragment": http.get(urls.neuron_url(MODEL, 0, 0), headers={"HX-Request": "true"}),
        "404": http.get("/no-such-model"),
        "404 json": http.get("/no-such-model.json"),
        "405": http.post("/"),
        "static": http.get("/-/static/style.css"),
        "openapi": http.get("/-/openapi.json"),
        "redirect": http.get(urls.random_neuron_url(MODEL)),
    }
    for name, r in answers.items():
        policy = csp(r)
        assert policy["default-src"] == "'self'" and policy["script-src"] == "'self'", name
        assert policy["style-src"] == "'self'" and policy["img-src"] == "'self' data:", name
        assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'", name
        assert policy["frame-ancestors"] == "'none'" and r.headers["x-frame-options"] == "DENY", name
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["referrer-policy"] == "same-origin", name
    assert answers["static"].status_code == 200 and answers["405"].status_code == 405


def test_only_embed_pages_may_be_framed(hostile):
    """The neuron card (?embed=true) may be framed by any site; nothing else, whatever its query."""
    http = hostile.http
    for path in (urls.neuron_url(MODEL, 0, 0) + "?embed=true", urls.neuron_url(MODEL, 0, 0) + "?embed=TRUE"):
        r = http.get(path)
        assert r.status_code == 200 and csp(r)["frame-ancestors"] == "*" and "x-frame-options" not in r.headers, path
        assert csp(r)["script-src"] == "'self'" and r.headers["x-content-type-options"] == "nosniff"
        inert(r)
    for path in (urls.neuron_url(MODEL, 0, 0) + "?embed=false", urls.neuron_url(MODEL, 0, 0, fmt="json") + "?embed=true",
                 urls.layer_url(MODEL, 0) + "?embed=true", "/?embed=true", "/no-such-model?embed=true"):
        r = http.get(path)
        assert csp(r)["frame-ancestors"] == "'none'" and r.headers["x-frame-options"] == "DENY", path
    r = http.post(urls.neuron_url(MODEL, 0, 0) + "/text?embed=true", data={"text": "w1"})
    assert csp(r)["frame-ancestors"] == "'none'", "a live request is never frameable"


def test_pages_fit_the_policy_no_inline_script_or_style_element(hostile):
    """What the CSP forbids is not in the templates: no inline <script>, on*="" handler or
    <style> element (style="" attributes are allowed, style-src-attr), and every script and
    stylesheet is served from /-/static/. htmx is told not to eval or inject its own <style>."""
    http = hostile.http
    pages = ["/", urls.model_url(MODEL), urls.layer_url(MODEL, 0), urls.neuron_url(MODEL, 0, 0),
             urls.search_url(MODEL, "w1"), urls.features_url(MODEL), urls.feature_url(MODEL, FEATURE),
             urls.jobs_url(), urls.text_run_url(MODEL, 0, 0, hostile.run), urls.clamp_url(MODEL, 0, 0, hostile.curve),
             urls.generation_url(MODEL, 0, 0, hostile.generation), "/no-such-model"]
    for path in pages:
        r = http.get(path)
        assert r.status_code == (404 if path == "/no-such-model" else 200), (path, r.status_code)
        soup = BeautifulSoup(r.text, "html.parser")
        assert soup.select_one("main") is not None, path
        for tag in soup.find_all(True):
            assert not [a for a in tag.attrs if a.lower().startswith("on")], (path, tag.name)
            assert tag.name != "style", path
            if tag.name == "script":
                assert tag.get("src", "").startswith("/-/static/") and not (tag.string or "").strip(), path
            if tag.name == "link" and "stylesheet" in tag.get("rel", []):
                assert tag["href"].startswith("/-/static/"), path
            for attr in ("href", "src", "action", "hx-get", "hx-post"):
                assert not tag.get(attr, "").strip().lower().startswith("javascript:"), (path, tag.name)
        config = soup.select_one("meta[name=htmx-config]")
        assert config is not None, path
        assert json.loads(config["content"]) == {"allowEval": False, "includeIndicatorStyles": False}, path


def test_stylesheet_isolates_untrusted_text_and_holds_htmx_indicator_rules(hostile):
    css = hostile.http.get("/-/static/style.css").text
    assert "unicode-bidi: isolate" in css and "code.tok" in css.split("unicode-bidi: isolate")[0].rsplit("}", 1)[-1]
    assert ".htmx-indicator { opacity: 0" in css


def test_compare_pages(hostile):
    """Two models compared: hostile tokens in the changed lists and the side-by-side cards, and a
    stored comparison with a NaN cosine."""
    http = hostile.http
    soup = inert(http.get(urls.compare_url(MODEL, MODEL_B)))
    data = http.get(urls.compare_url(MODEL, MODEL_B, fmt="json")).json()
    assert data["state"] == "done" and data["changed"][0]["cosine"] is None, "the NaN cosine leads, shown as none"
    shown = {t.get_text() for t in soup.select("#changed code.tok")}
    assert shown & {visible(t) for t in HOSTILE_TOKENS}
    assert [r.select_one("td").get_text() for r in soup.select("table.compare-features tbody tr")] == [FEATURE]
    for i in range(3):
        soup = inert(http.get(urls.compare_unit_url(MODEL, MODEL_B, 0, i)))
        cards = soup.select("article.neuron-card")
        assert [c.select_one(".card-tokens code.tok").get_text() for c in cards] == [visible(HOSTILE_TOKENS[i])] * 2
