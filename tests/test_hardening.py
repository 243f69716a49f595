"""One request must never break a page: a live request's fields are checked for everything the
server computes from them before anything is stored; a stored row that cannot be shown is shown
as broken in its place, the rest of its page kept; live requests from another site are refused;
live jobs have a global cap; and `needle serve` closes idle and slow connections. Real HTTP
against a real server and database (SQLite and Postgres), filled through the project's writers;
the connection limits against a real `needle serve`."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from bs4 import BeautifulSoup
from sqlalchemy import func, select, text, update

from app import clamping, queries, urls
from app.config import Settings, get_settings
from app.db import engine_for, session_scope
from app.errors import NeedleError
from app.main import create_app
from app.schema import ClampCurve, Generation, Job, TextRun
from tests.hostile import MODEL, PLAIN
from tests.live_server import cli_runner, needle_serve, running_server
from tests.synthetic import fill_synthetic

WHERE = urls.neuron_url(MODEL, 0, 1)
GOOD = {
    "text": {"text": "w1 w2"},
    "clamp": {"prompt": "w1 w2", "token": "w3", "start": "-1", "stop": "1", "count": "5"},
    "generate": {"prompt": "w1 w2", "value": "1", "tokens": "4"},
}
KINDS = tuple(GOOD)


def strict_json(r: httpx.Response):
    """The answer's body as JSON that any parser reads: NaN and Infinity are no JSON."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in the JSON of {r.url}")

    return json.loads(r.text, parse_constant=refuse)


def stored(engine) -> tuple[int, ...]:
    with session_scope(engine) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (TextRun, ClampCurve, Generation, Job))


@contextmanager
def serving(db_url: str, **settings) -> Iterator[tuple[httpx.Client, str]]:
    """A real server on db_url: (http client, its base URL). proxy_headers as `needle serve` sets it."""
    config = Settings(database_url=db_url, **{"live_rate_per_minute": 0, **settings})
    with running_server(create_app(config), proxy_headers=config.trust_proxy) as base, \
            httpx.Client(base_url=base, timeout=20) as http:
        yield http, base


@pytest.fixture
def engine(db_url):
    engine = engine_for(db_url)
    fill_synthetic(engine, MODEL, 1, 20, ["<unk>", *PLAIN], tokenizer=True)
    return engine


@pytest.fixture
def site(db_url, engine):
    with serving(db_url) as (http, _):
        yield http, engine


# ---------------------------------------------------------------- 1. what a live request computes is checked first


def test_a_sweep_whose_values_overflow_is_a_400_that_stores_nothing(site):
    """-1e308..1e308 are finite, but the step between them is not: the sweep's values were
    NaN and Infinity, stored (SQLite) or refused by the database (Postgres) with a 500."""
    http, engine = site
    before = stored(engine)
    for start, stop, count in ((-1e308, 1e308, 101), (-1e308, 1e308, 2), (-2e6, 2e6, 5), (0, 1e300, 3)):
        body = {**GOOD["clamp"], "start": start, "stop": stop, "count": count}
        r = http.post(f"{WHERE}/clamp", json=body)
        assert r.status_code == 400, (start, stop, r.status_code, r.text[:300])
        error = strict_json(r)
        assert "1,000,000" in error["error"] and error["hint"], error
        r = http.post(f"{WHERE}/clamp", data={k: str(v) for k, v in body.items()})
        assert r.status_code == 400 and "1,000,000" in r.text and "Traceback" not in r.text
    for value in (1e308, -1.5e6):
        r = http.post(f"{WHERE}/generate", json={**GOOD["generate"], "value": value})
        assert r.status_code == 400 and "1,000,000" in strict_json(r)["error"], (value, r.status_code, r.text[:300])
    assert stored(engine) == before, "a refused request stores nothing"
    # the widest sweep allowed is taken, and its page and its neuron's page stay up
    r = http.post(f"{WHERE}/clamp", json={**GOOD["clamp"], "start": -1e6, "stop": 1e6, "count": 101})
    assert r.status_code == 202, r.text[:300]
    values = strict_json(r)["curve"]["values"]
    assert len(values) == 101 and values[0] == -1e6 and values[-1] == 1e6 and values[50] == 0
    assert http.post(f"{WHERE}/generate", json={**GOOD["generate"], "value": -1e6}).status_code == 202
    for path in (WHERE, urls.neuron_url(MODEL, 0, 1, fmt="json"), strict_json(r)["curve"]["url"],
                 strict_json(r)["curve"]["json_url"]):
        page = http.get(path)
        assert page.status_code == 200, (path, page.status_code, page.text[:300])
        if path.endswith(".json"):
            strict_json(page)


def test_the_default_sweep_stays_within_the_bound():
    """A neuron whose observed activation is huge still gets a default sweep the form takes."""
    values = clamping.default_values(1e300)
    assert values[0] == -clamping.MAX_ABS_VALUE and values[-1] == clamping.MAX_ABS_VALUE


def test_needle_clamp_and_generate_refuse_values_out_of_bounds(sqlite_url, monkeypatch, capsys):
    """The command line shares the pages' rules, and says so before it loads a model."""
    engine = engine_for(sqlite_url)
    fill_synthetic(engine, MODEL, 1, 20, ["<unk>", *PLAIN], tokenizer=True)
    before = stored(engine)
    run = cli_runner(monkeypatch, capsys, sqlite_url)
    try:
        for args in (["clamp", MODEL, "0", "1", "--values", "-1e308:1e308:101"],
                     ["clamp", MODEL, "0", "1", "--values", "0:5e6:3"],
                     ["generate", MODEL, "0", "1", "--value", "1e308"]):
            code, out, err = run(*args)
            assert code != 0 and "1,000,000" in err and "Traceback" not in err, (args, code, out, err)
    finally:
        get_settings.cache_clear()
    assert stored(engine) == before
    with pytest.raises(NeedleError, match="1,000,000"):
        clamping.parse_values("-1e308:1e308:101")


# ---------------------------------------------------------------- 1b. a stored row that cannot be shown


def set_raw_json(engine, table: str, row_id: int, column: str, raw: str) -> None:
    """Write JSON text into a row as an old version or a worker bug could have: as it is, unchecked."""
    value = "CAST(:v AS JSON)" if engine.dialect.name == "postgresql" else ":v"
    with session_scope(engine) as s:
        s.execute(text(f"UPDATE {table} SET {column} = {value} WHERE id = :id"), {"v": raw, "id": row_id})


TOP = [{"token": "w3", "token_id": 4, "prob": 0.25}]
FINISHED = {"token_id": 4, "token": "w3", "note": None, "probs": [0.1, 0.2, 0.4],
            "baseline": {"activation": 0.5, "prob": 0.3}, "top_tokens": {"low": TOP, "high": TOP}}
# (column, stored JSON text): 1e999 is valid JSON that reads back as Infinity on both databases
BROKEN_CURVES = [
    ("clamp_values", "[-1e999, 0, 1e999]"),
    ("probs", "[0.1, 1e999, 0.4]"),
    ("probs", '[0.1, "x", 0.4]'),
    ("probs", "[0.1, 0.2]"),
    ("baseline", '{"activation": 0.5}'),
    ("top_tokens", '{"low": [], "high": [{"token": "w3"}]}'),
    ("clamp_values", '"-1:1:3"'),
    ("source", None),
]
SQLITE_ONLY = [("clamp_values", "[NaN, 0, Infinity]"), ("probs", "[NaN, 0.2, 0.4]")]  # Postgres JSON refuses these


def test_a_stored_clamp_curve_that_cannot_be_shown_leaves_its_pages_up(site):
    http, engine = site
    cases = BROKEN_CURVES + (SQLITE_ONLY if engine.dialect.name == "sqlite" else [])
    with session_scope(engine) as s:
        model_id = queries.get_model(s, MODEL).id
        rows = [queries.add_clamp_curve(s, model_id, 0, 1, prompt="w1 w2", target="w3", positions="all",
                                        values=[-1.0, 0.0, 1.0], source="cli", result=FINISHED)
                for _ in range(len(cases) + 1)]
        good, broken = rows[0].id, [r.id for r in rows[1:]]
    for row_id, (column, raw) in zip(broken, cases):
        if column == "source":
            with session_scope(engine) as s:
                s.execute(update(ClampCurve).where(ClampCurve.id == row_id).values(source="zzz"))
        else:
            set_raw_json(engine, "clamp_curves", row_id, column, raw)

    r = http.get(WHERE)
    assert r.status_code == 200, r.text[:500]
    boxes = BeautifulSoup(r.text, "html.parser").select("#clamp .clamp-curve-box")
    assert len(boxes) == len(rows), "every stored curve has its place on the page"
    shown = {int(b.select_one("a[href*='/clamp/']")["href"].rsplit("/", 1)[1]): b for b in boxes}
    assert shown[good].select_one("svg.plot") is not None and not shown[good].select(".broken")
    for row_id in broken:
        assert shown[row_id].select_one("svg") is None, row_id
        assert "cannot be shown" in shown[row_id].select_one(".broken").get_text(), row_id

    page = strict_json(http.get(urls.neuron_url(MODEL, 0, 1, fmt="json")))
    curves = {c["id"]: c for c in page["clamp_curves"]}
    assert set(curves) == {good, *broken}
    assert curves[good]["broken"] is None and curves[good]["probs"] == FINISHED["probs"]
    for row_id in broken:
        assert "cannot be shown" in curves[row_id]["broken"] and curves[row_id]["state"] == "broken"
        assert curves[row_id]["values"] is None and curves[row_id]["probs"] is None
    for row_id in broken:  # each curve's own page, its panel (htmx) and its JSON
        path = urls.clamp_url(MODEL, 0, 1, row_id)
        for r in (http.get(path), http.get(path, headers={"HX-Request": "true"})):
            assert r.status_code == 200 and "cannot be shown" in r.text and "hx-trigger" not in r.text, (row_id, r.text[:300])
        r = http.get(urls.clamp_url(MODEL, 0, 1, row_id, fmt="json"))
        assert r.status_code == 200 and strict_json(r)["curve"]["state"] == "broken"


def test_a_queued_curve_with_broken_values_does_not_poll_forever(site):
    """What the overflowing sweep left on SQLite: a curve waiting for a worker, its values NaN."""
    http, engine = site
    r = http.post(f"{WHERE}/clamp", json=GOOD["clamp"])
    curve = strict_json(r)["curve"]
    set_raw_json(engine, "clamp_curves", curve["id"], "clamp_values", "[-1e999, 1e999]")
    for path in (WHERE, urls.neuron_url(MODEL, 0, 1, fmt="json"), curve["url"], curve["json_url"]):
        page = http.get(path)
        assert page.status_code == 200, (path, page.status_code, page.text[:300])
    assert strict_json(http.get(curve["json_url"]))["curve"]["state"] == "broken"
    assert "hx-trigger" not in http.get(curve["url"], headers={"HX-Request": "true"}).text


BROKEN_GENERATIONS = [
    ("clamped", '{"token_ids": [1]}'),
    ("unclamped", '"text"'),
    ("clamped", '{"text": 5, "token_ids": [1]}'),
]


def test_a_stored_generation_that_cannot_be_shown_leaves_its_page_up(site):
    http, engine = site
    result = {"clamped": {"text": " w1", "token_ids": [2]}, "unclamped": {"text": " w2", "token_ids": [3]}}
    with session_scope(engine) as s:
        model_id = queries.get_model(s, MODEL).id
        ids = [queries.add_generation(s, model_id, 0, 1, prompt="w1", value=1.0, tokens=1, seed=None, source="cli",
                                      result=result).id for _ in range(len(BROKEN_GENERATIONS) + 1)]
    for row_id, (column, raw) in zip(ids, BROKEN_GENERATIONS):
        set_raw_json(engine, "generations", row_id, column, raw)
    with session_scope(engine) as s:
        s.execute(update(Generation).where(Generation.id == ids[-1]).values(value=float("inf")))
    for row_id in ids:
        r = http.get(urls.generation_url(MODEL, 0, 1, row_id))
        assert r.status_code == 200 and "cannot be shown" in r.text and "hx-trigger" not in r.text, (row_id, r.text[:300])
        r = http.get(urls.generation_url(MODEL, 0, 1, row_id, fmt="json"))
        assert r.status_code == 200, (row_id, r.text[:300])
        gen = strict_json(r)["generation"]
        assert gen["state"] == "broken" and "cannot be shown" in gen["broken"]


# ---------------------------------------------------------------- 2. live requests from another site


def test_every_live_request_has_every_guard(tmp_path):
    from fastapi.routing import APIRoute

    from app import security

    def routes_of(routes) -> list:  # into included routers (FastAPI includes them lazily)
        return [r for route in routes for r in (routes_of(route.original_router.routes)
                                                if getattr(route, "original_router", None) else [route])]

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'none.sqlite'}"))
    posts = [r for r in routes_of(app.routes) if isinstance(r, APIRoute) and "POST" in r.methods]
    assert {r.path.rsplit("/", 1)[1] for r in posts} == set(KINDS)
    for route in posts:
        guards = [d.call for d in route.dependant.dependencies]
        assert guards[:3] == [security.refuse_other_sites, security.limit_live_requests, security.cap_live_queue], route.path



def post(http: httpx.Client, kind: str, how: str, headers: dict) -> httpx.Response:
    """A live request as a page's form (form), its htmx panel (htmx) or a script (json) sends it."""
    if how == "json":
        return http.post(f"{WHERE}/{kind}", json=GOOD[kind], headers=headers)
    extra = {"HX-Request": "true", "HX-Target": f"{kind}-result"} if how == "htmx" else {}
    return http.post(f"{WHERE}/{kind}", data=GOOD[kind], headers={**headers, **extra})


def test_live_requests_from_another_site_are_403_and_store_nothing(db_url, engine):
    with serving(db_url) as (http, base):
        before = stored(engine)
        port = base.rsplit(":", 1)[1]
        others = [{"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": f"http://localhost:{port}"},
                  {"Origin": "http://127.0.0.1"}, {"Origin": f"https://127.0.0.1:{port}"},
                  {"Referer": "https://evil.example/page"}, {"Referer": f"http://127.0.0.1:{int(port) + 1}/x"},
                  {"Origin": "https://evil.example", "Referer": f"{base}{WHERE}"}]
        for headers in others:
            for kind in KINDS:
                for how in ("json", "form", "htmx"):
                    r = post(http, kind, how, headers)
                    assert r.status_code == 403, (headers, kind, how, r.status_code, r.text[:300])
                    if how == "json":
                        body = strict_json(r)
                        assert body["ok"] is False and body["status"] == 403 and "another site" in body["error"]
                    else:
                        assert r.headers["content-type"].startswith("text/html")
                        soup = BeautifulSoup(r.text, "html.parser")
                        assert "another site" in soup.select_one(".error-message").get_text()
        assert stored(engine) == before, "a refused request stores nothing"
        # its own pages, and clients that send neither header (curl, scripts, the CLI), are taken
        for headers in ({"Origin": base}, {"Origin": base.upper().replace("HTTP", "http")}, {"Referer": f"{base}{WHERE}"},
                        {}):
            for kind in KINDS:
                r = post(http, kind, "json", headers)
                assert r.status_code == 202, (headers, kind, r.status_code, r.text[:300])


def test_the_public_address_and_a_trusted_proxy_count_as_this_site(db_url, engine):
    public = "https://needle.example.org"
    with serving(db_url, public_url=public + "/") as (http, base):
        for origin in (public, "https://needle.example.org:443", base):
            assert post(http, "text", "json", {"Origin": origin}).status_code == 202, origin
        assert post(http, "text", "json", {"Origin": "http://needle.example.org"}).status_code == 403
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "needle.example.org"}
    with serving(db_url, trust_proxy=True) as (http, base):
        assert post(http, "text", "json", {"Origin": public, **forwarded}).status_code == 202
        assert post(http, "text", "json", {"Origin": "https://evil.example", **forwarded}).status_code == 403
    with serving(db_url) as (http, base):  # not trusted: the headers are the client's own words
        assert post(http, "text", "json", {"Origin": public, **forwarded}).status_code == 403


# ---------------------------------------------------------------- 3. a global cap on queued live jobs


def test_live_jobs_beyond_the_cap_are_503_across_server_processes(db_url, engine):
    with session_scope(engine) as s:  # indexing jobs are not live requests: they do not count
        queries.enqueue_job(s, queries.get_model(s, MODEL).id, "decode", "all", {})
    with serving(db_url, live_queue_max=2) as (one, _), serving(db_url, live_queue_max=2) as (other, _):
        assert post(one, "text", "json", {}).status_code == 202
        assert post(other, "clamp", "json", {}).status_code == 202
        before = stored(engine)
        for http in (one, other):  # each server counts the other's jobs too: they are counted in the database
            for kind in KINDS:
                for how in ("json", "form", "htmx"):
                    r = post(http, kind, how, {})
                    assert r.status_code == 503, (kind, how, r.status_code, r.text[:300])
                    assert int(r.headers["retry-after"]) >= 1
                    message = strict_json(r)["error"] if how == "json" else r.text
                    assert "2 live requests" in message and "Traceback" not in message, message[:300]
        assert stored(engine) == before, "a refused request stores nothing"
        with session_scope(engine) as s:  # one finishes (or fails): room for one more
            job = s.scalar(select(Job).where(Job.stage == queries.TEXT_STAGE))
            job.state = "failed"
        assert post(other, "generate", "json", {}).status_code == 202
        assert post(one, "text", "json", {}).status_code == 503
    with serving(db_url, live_queue_max=0) as (http, _):  # 0: no cap
        assert post(http, "text", "json", {}).status_code == 202


# ---------------------------------------------------------------- 4. `needle serve` closes idle and slow connections


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)  # far beyond the server's limits below: a server that never closes fails the test
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer's head, its body (Content-Length bytes, if it says) read past."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-answer: {data[:200]!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lengths = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    while len(body) < sum(lengths):
        body += sock.recv(65536)
    return head


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed the connection (end of stream), with nothing more sent."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


REQUEST = b"GET /-/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize("processes", ["1", "2"])
def test_needle_serve_closes_idle_and_slow_connections(sqlite_url, processes):
    with needle_serve(sqlite_url, "--processes", processes, keep_alive_seconds="1", header_timeout_seconds="2") as (port, _):
        kept = connect(port)
        for _ in range(2):  # keep-alive: the connection serves the next request ...
            kept.sendall(REQUEST)
            assert read_answer(kept).startswith(b"HTTP/1.1 200")
        idle, slow = connect(port), connect(port)
        slow.sendall(REQUEST[:30])  # a request head that never ends
        assert closed_by_server(kept), "... and is closed once idle"
        assert closed_by_server(idle), "a connection that never sends a request is closed"
        assert closed_by_server(slow), "a request head that never ends is closed"
        big = connect(port)  # a request head that grows past 16 KiB (h11 checks the head it holds before its end)
        big.sendall(b"GET /-/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000)
        assert read_answer(big).startswith(b"HTTP/1.1 400"), "a request head over 16 KiB is refused"
        big.close()


def test_needle_serve_limits_connections(sqlite_url):
    with needle_serve(sqlite_url, max_connections="3", keep_alive_seconds="60") as (port, _):  # 3 served at once
        held = [connect(port) for _ in range(3)]
        for sock in held:
            sock.sendall(REQUEST)
            assert read_answer(sock).startswith(b"HTTP/1.1 200")
        extra = connect(port)
        extra.sendall(REQUEST)
        assert read_answer(extra).startswith(b"HTTP/1.1 503"), "beyond max_connections: 503"
        for sock in held + [extra]:
            sock.close()
