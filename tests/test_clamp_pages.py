"""Clamp curves and clamped generation as a person reaches them (issue 5): the curves `needle
index` precomputes, the neuron page's sweep and generate forms run by a real worker, their
permalinks and JSON twins, bad input, the live-requests switch, the issue's limits, and the
`needle clamp` / `needle generate` commands. Real HTTP against a real server, on SQLite and on
Postgres, with a tiny model indexed through the user's code path.

The model (tests/tinymodels.build_clamp_model, a Llama) has neuron 0/3 writing along W_U[" dog"],
so a clamp of it must raise p(" dog"); and 14 neurons of layer 1 whose input weights read along
W_U[" house"] with growing scales, so all 14 have " house" as their top token but only 10 of them
can be its top-10 search hits: the index's curves are then a proper subset of the neurons.
What a curve or a generation should hold is computed here by calling workers.clamp directly on
the model loaded as a user's is.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from app import queries
from app.arrays import FLOAT32, INT32, unpack
from app.config import Settings, get_settings
from app.db import engine_for, session_scope
from app.main import create_app
from app.schema import ClampCurve, Generation, Job, Model, TextRun, TokenIndex
from app.tokens import visible
from tests.live_server import cli_runner, index_with_corpus, running_server
from tests.tinymodels import TRAINING_TEXT, build_clamp_model
from workers import clamp
from workers.loading import load_model
from workers.worker import Worker

NAME = "tiny-clamp"
CONTEXT = 16
CORPUS = TRAINING_TEXT * 6
ALIGNED = (0, 3)  # writes along W_U[" dog"]
ALIGNED_URL = f"/{NAME}/{ALIGNED[0]}/{ALIGNED[1]}"
CROWD_LAYER = 1
CROWD = range(40, 54)  # read along W_U[" house"], scores growing with the neuron number
PROMPT = "The cat sat on the mat and"
DOG = " dog"
LIVE_STAGES = ("clamp_run", "generation")
TOL = 1e-5


# ---------------------------------------------------------------- the model and the site


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_clamp_model(tmp_path_factory.mktemp("clamp-pages") / "llama", family="llama",
                             layer=ALIGNED[0], neuron=ALIGNED[1])
    house = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("▁house")
    assert house != 0, "the tiny tokenizer has \"▁house\""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        direction = model.get_output_embeddings().weight[house].clone()
        direction /= direction.norm()
        for k, neuron in enumerate(CROWD):  # the up_proj row is what `needle index` decodes for a gated MLP
            model.model.layers[CROWD_LAYER].mlp.up_proj.weight[neuron] = 3.0 * (1 + 0.1 * k) * direction
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir), device="cpu", dtype="float32")


@dataclass
class Site:
    http: httpx.Client
    engine: Engine
    settings: Settings
    model_dir: Path
    db_url: str


@pytest.fixture
def site(db_url, model_dir, tmp_path):
    # no live-request rate limit: these tests send a hundred live requests
    settings = index_with_corpus(db_url, model_dir, NAME, CORPUS, CONTEXT, tmp_path / "corpus.txt")
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield Site(http, engine_for(db_url), settings, model_dir, db_url)


def soup_of(r: httpx.Response) -> BeautifulSoup:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return BeautifulSoup(r.text, "html.parser")


def error_text(r: httpx.Response) -> str:
    """The message of an error answer: the JSON's "error", or the HTML page's error paragraph."""
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()["error"]
    shown = BeautifulSoup(r.text, "html.parser").select_one(".error-message")
    assert shown is not None, r.text[:500]
    return shown.get_text()


def token_id(loaded, text: str) -> int:
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def stored(engine: Engine) -> dict:
    """What live requests and the CLI store: curves and generations by source, and live jobs."""
    with session_scope(engine) as s:
        curves = dict(s.execute(select(ClampCurve.source, func.count()).group_by(ClampCurve.source)).all())
        gens = dict(s.execute(select(Generation.source, func.count()).group_by(Generation.source)).all())
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.stage.in_(LIVE_STAGES)))
        texts = s.scalar(select(func.count()).select_from(TextRun))
    return {"curves": {k: v for k, v in curves.items() if k != "index"}, "index_curves": curves.get("index", 0),
            "generations": gens, "live_jobs": jobs, "text_runs": texts}


def work(site: Site, *polls: str, timeout: float = 120) -> list[BeautifulSoup]:
    """Run a real worker in a thread until nothing is left to do, polling each panel (as htmx
    does) until it stops polling itself; return the final panels."""
    worker = Worker(site.engine, site.settings)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True, "poll_seconds": 0.1}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    panels = []
    for url in polls:
        while True:
            r = site.http.get(url, headers={"HX-Request": "true"})
            panel = BeautifulSoup(r.text, "html.parser").select_one(".live-run")
            assert panel is not None, (r.status_code, r.text[:500])
            if not panel.has_attr("hx-get") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not panel.has_attr("hx-get"), f"{url} did not finish"
        panels.append(panel)
    thread.join(timeout)
    assert not thread.is_alive(), "the worker did not go idle"
    return panels


def check_curve_shape(curve: dict, count: int) -> None:
    """The issue's JSON shape of a curve."""
    assert set(curve) >= {"values", "probs", "baseline", "token", "token_id", "top_tokens"}
    assert len(curve["values"]) == len(curve["probs"]) == count
    assert all(0.0 <= p <= 1.0 for p in curve["probs"])
    assert set(curve["baseline"]) == {"activation", "prob"}
    assert all(math.isfinite(curve["baseline"][k]) for k in ("activation", "prob"))
    assert isinstance(curve["token"], str) and isinstance(curve["token_id"], int)
    assert set(curve["top_tokens"]) == {"low", "high"}
    for end in ("low", "high"):
        tops = curve["top_tokens"][end]
        assert len(tops) == 5
        assert all(set(t) >= {"token", "token_id", "prob"} for t in tops)
        probs = [t["prob"] for t in tops]
        assert probs == sorted(probs, reverse=True)


def check_curve_plot(box, curve: dict) -> None:
    """An svg.clamp-curve: one point per value, and the ring of the unclamped model."""
    svg = box.select_one("svg.clamp-curve")
    assert svg is not None
    assert len(svg.select("circle.point")) == len(curve["values"])
    lo, hi = curve["values"][0], curve["values"][-1]
    assert lo <= curve["baseline"]["activation"] <= hi
    assert len(svg.select("circle.baseline-point")) == 1
    assert "unclamped" in svg.select_one("circle.baseline-point title").get_text()


# ---------------------------------------------------------------- 1. the curves `needle index` stores


def top10_hits(site: Site) -> dict[int, set[tuple[int, int]]]:
    """token id -> its 10 best neurons by search score, from the token index (sorted here)."""
    with session_scope(site.engine) as s:
        model_id = s.scalar(select(Model.id).where(Model.name == NAME))
        rows = s.scalars(select(TokenIndex).where(TokenIndex.model_id == model_id)).all()
        out = {}
        for row in rows:
            entries = [
                (float(score), int(layer), int(neuron))
                for layer, neuron, score in zip(unpack(row.layers, INT32), unpack(row.neurons, INT32),
                                                unpack(row.scores, FLOAT32))
                if layer >= 0 and neuron >= 0 and math.isfinite(score)
            ]
            entries.sort(key=lambda e: (-e[0], e[1], e[2]))
            out[row.token_id] = {(layer, neuron) for _, layer, neuron in entries[:10]}
    return out


def test_index_stores_a_curve_for_each_neuron_that_is_a_top_hit_for_its_own_top_token(site, loaded):
    http = site.http
    model = http.get(f"/{NAME}.json").json()
    own = {}  # (layer, neuron) -> its top token, from the layer pages
    for layer in range(model["n_layers"]):
        for n in http.get(f"/{NAME}/{layer}.json", params={"sort": "neuron"}).json()["neurons"]:
            own[(layer, n["neuron"])] = n["top_token"]
    assert len(own) == model["n_layers"] * model["d_mlp"]
    hits = top10_hits(site)
    expected = {pos for pos, top in own.items() if pos in hits.get(top["token_id"], set())}

    # the crowd: all 14 have " house" on top, the search ranks them by scale, and only 10 are top-10 hits
    house = token_id(loaded, " house")
    assert all(own[(CROWD_LAYER, n)]["token_id"] == house for n in CROWD)
    search = http.get(f"/{NAME}/search.json", params={"token": " house"}).json()
    assert house in [m["token_id"] for m in search["matches"]]
    ranked = [(r["layer"], r["neuron"]) for r in search["results"] if r["token_id"] == house]
    assert ranked[:14] == [(CROWD_LAYER, n) for n in reversed(CROWD)]
    assert set(ranked[:10]) <= expected
    assert not set(ranked[10:14]) & expected
    assert 0 < len(expected) < len(own)

    with session_scope(site.engine) as s:
        rows = s.execute(select(ClampCurve.layer, ClampCurve.neuron).where(ClampCurve.source == "index")).all()
    assert sorted(map(tuple, rows)) == sorted(expected), "one index curve per top-hit neuron, and no other"

    # the model's clamp prompt: the first 16 tokens of the corpus it was indexed on
    first = loaded.tokenizer(CORPUS, add_special_tokens=False)["input_ids"][:16]
    prompt = loaded.tokenizer.decode(first, skip_special_tokens=True)
    assert prompt.startswith("The dog sat on the mat.")

    for layer, neuron in sorted(expected):
        data = http.get(f"/{NAME}/{layer}/{neuron}.json").json()
        # the form's default prompt is the neuron's own top context, up to (and with) its max token
        top = data["examples"][0]
        assert data["clamp_form"]["prompt"] == "".join(top["tokens"][: top["max_index"] + 1])
        assert "top context" in data["clamp_form"]["prompt_from"]
        (curve,) = data["clamp_curves"]
        # the range its activation takes on the corpus, marked on the curve
        assert curve["observed_range"] == pytest.approx([data["stats"]["min"], data["stats"]["max"]])
        check_curve_shape(curve, 21)
        assert curve["source"] == "index" and curve["positions"] == "all" and curve["prompt"] == prompt
        assert curve["state"] == "done"
        assert curve["token_id"] == own[(layer, neuron)]["token_id"] == data["top_token"]["token_id"]
        assert curve["token"] == data["top_token"]["token"]
        # +-10x the neuron's observed max |activation| (to 3 significant digits), evenly spaced
        bound = 10 * max(abs(data["stats"]["max"]), abs(data["stats"]["min"]))
        values = curve["values"]
        assert values[-1] == pytest.approx(bound, rel=5e-3) and values[0] == -values[-1]
        np.testing.assert_allclose(values, np.linspace(values[0], values[-1], 21), rtol=1e-9, atol=1e-9)
        assert data["clamp_form"]["start"] == values[0] and data["clamp_form"]["stop"] == values[-1]

    # the neuron page shows the stored curve: a point per value and the unclamped ring
    for layer, neuron in (min(expected), (CROWD_LAYER, CROWD[-1])):
        data = http.get(f"/{NAME}/{layer}/{neuron}.json").json()
        section = soup_of(http.get(f"/{NAME}/{layer}/{neuron}")).select_one("section#clamp")
        boxes = section.select(".clamp-curve-box")
        assert len(boxes) == len(data["clamp_curves"]) == len(section.select("svg.clamp-curve.wide")) == 1
        check_curve_plot(boxes[0], data["clamp_curves"][0])
        assert boxes[0].select_one("svg.clamp-curve.wide rect.observed") is not None, "the observed range's band"
        assert "needle index" in boxes[0].get_text()
        assert len(boxes[0].select("table.tokens")) == 2
    # a neuron without a curve says so
    left_out = (CROWD_LAYER, CROWD[0])
    assert http.get(f"/{NAME}/{left_out[0]}/{left_out[1]}.json").json()["clamp_curves"] == []
    section = soup_of(http.get(f"/{NAME}/{left_out[0]}/{left_out[1]}")).select_one("section#clamp")
    assert section.select_one("svg.clamp-curve") is None
    assert "No clamp curve" in section.select_one("p.empty").get_text()


# ---------------------------------------------------------------- 2. a live clamp curve


def test_live_clamp_curve_from_the_page(site, loaded):
    http = site.http
    before = stored(site.engine)
    page = soup_of(http.get(ALIGNED_URL))
    form = page.select("section#clamp form.clamp-form")[0]
    assert form["action"] == form["hx-post"] == f"{ALIGNED_URL}/clamp"
    assert {f["name"] for f in form.select("[name]")} == {"prompt", "token", "start", "stop", "count", "positions"}

    # htmx posts the form and gets the panel, which polls itself
    asks = [
        {"prompt": PROMPT, "token": DOG, "start": "-100", "stop": "100", "count": "13", "positions": "last"},
        {"prompt": PROMPT, "token": DOG, "start": -100, "stop": 100, "count": 11},
        {"prompt": "The dog and the cat", "token": DOG, "start": "-40", "stop": "100", "count": "8"},
    ]
    r = http.post(f"{ALIGNED_URL}/clamp", data=asks[0], headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text[:500]
    panel = BeautifulSoup(r.text, "html.parser").select_one("#clamp-result")
    assert panel["hx-trigger"] == "every 1s" and "Queued" in panel.get_text()
    polls = [panel["hx-get"]]
    # a JSON client gets 202 and the queued curve
    r = http.post(f"{ALIGNED_URL}/clamp", json=asks[1])
    assert r.status_code == 202, r.text[:500]
    queued = r.json()["curve"]
    assert queued["state"] == "queued" and queued["probs"] is None and queued["positions"] == "all"
    polls.append(queued["url"])
    # a plain form post is sent on to the curve's permalink
    r = http.post(f"{ALIGNED_URL}/clamp", data=asks[2])
    assert r.status_code == 303
    permalink = r.headers["location"]
    assert permalink.startswith(f"{ALIGNED_URL}/clamp/")
    waiting_page = soup_of(http.get(permalink))
    waiting = waiting_page.select_one("#clamp-result")
    assert waiting.has_attr("hx-get")
    assert waiting_page.find("link", rel="alternate", type="application/json")["href"] == permalink + ".json"
    polls.append(permalink)
    assert stored(site.engine)["live_jobs"] == before["live_jobs"] + 3

    panels = work(site, *polls)
    dog = token_id(loaded, DOG)
    for ask, url, panel in zip(asks, polls, panels):
        got = http.get(url + ".json").json()
        curve = got["curve"]
        assert curve["state"] == "done" and curve["error"] is None and curve["source"] == "page"
        made = datetime.fromisoformat(curve["created_at"])  # ISO 8601, marked UTC (Z)
        assert curve["created_at"].endswith("Z") and made.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - made) < timedelta(hours=1)
        count = int(ask["count"])
        check_curve_shape(curve, count)
        values = np.linspace(float(ask["start"]), float(ask["stop"]), count)
        np.testing.assert_allclose(curve["values"], values, rtol=1e-12, atol=1e-12)
        last_only = ask.get("positions") == "last"
        assert curve["positions"] == ("last" if last_only else "all")
        direct = clamp.sweep(loaded, *ALIGNED, ask["prompt"], dog, values.tolist(), last_only=last_only)
        np.testing.assert_allclose(curve["probs"], direct["probs"], atol=TOL, rtol=0)
        assert curve["baseline"] == pytest.approx(direct["baseline"], abs=TOL)
        assert curve["token"] == DOG and curve["token_id"] == dog and curve["prompt"] == ask["prompt"]
        for end in ("low", "high"):
            assert [t["token_id"] for t in curve["top_tokens"][end]] == [t["token_id"] for t in direct["top_tokens"][end]]
        # the aligned neuron: p(" dog") rises with the clamp, to above one half at the top
        probs = np.array(curve["probs"])
        assert probs[-1] > 0.5 and probs[-1] > 10 * probs[0]
        top_half = probs[values >= 0]
        assert np.all(np.diff(top_half) > 0), top_half
        # the finished panel shows the plot
        check_curve_plot(panel, curve)
        assert ("last position only" if last_only else "every prompt position") in panel.get_text()

    # the permalink page renders the finished curve with its method
    page = soup_of(http.get(permalink))
    check_curve_plot(page.select_one("#clamp-result"), http.get(permalink + ".json").json()["curve"])
    assert "Davies" in page.select_one("section.method").get_text()
    # the neuron page and its JSON list them, newest first
    data = http.get(f"{ALIGNED_URL}.json").json()
    page_curves = [c for c in data["clamp_curves"] if c["source"] == "page"]
    assert [c["url"] for c in page_curves] == polls[::-1]
    section = soup_of(http.get(ALIGNED_URL)).select_one("section#clamp")
    assert len(section.select("svg.clamp-curve.wide")) == len(data["clamp_curves"])

    # a curve belongs to its neuron: another neuron's URL, or no such curve, is a 404
    curve_id = permalink.rsplit("/", 1)[1]
    r = http.get(f"/{NAME}/0/4/clamp/{curve_id}.json")
    assert r.status_code == 404 and r.json()["ok"] is False and "no clamp curve" in r.json()["error"]
    assert http.get(f"/{NAME}/0/4/clamp/{curve_id}").status_code == 404
    for missing in ("999999", "abc", "-1", "2147483648", "9" * 25, "\u00b9", "\u0663"):
        r = http.get(f"{ALIGNED_URL}/clamp/{missing}.json")
        assert r.status_code == 404 and r.json()["ok"] is False, (missing, r.status_code, r.text[:300])
    assert stored(site.engine)["curves"] == {"page": 3}


# ---------------------------------------------------------------- 3. a live clamped generation


def test_live_generation_from_the_page(site, loaded):
    http = site.http
    page = soup_of(http.get(ALIGNED_URL))
    form = page.select("section#clamp form.clamp-form")[1]
    assert form["action"] == form["hx-post"] == f"{ALIGNED_URL}/generate"
    assert {f["name"] for f in form.select("[name]")} == {"prompt", "value", "tokens", "seed"}

    asks = [
        {"prompt": PROMPT, "value": "50", "tokens": "8", "seed": ""},  # greedy
        {"prompt": PROMPT, "value": 30.0, "tokens": 10, "seed": 7},
        {"prompt": PROMPT, "value": 30.0, "tokens": 10, "seed": 0},  # seed 0 samples too
        {"prompt": "The dog", "value": "-20", "tokens": "6", "seed": "12345"},
    ]
    r = http.post(f"{ALIGNED_URL}/generate", data=asks[0], headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text[:500]
    panel = BeautifulSoup(r.text, "html.parser").select_one("#generation-result")
    assert panel["hx-trigger"] == "every 1s"
    polls = [panel["hx-get"]]
    for ask in asks[1:3]:
        r = http.post(f"{ALIGNED_URL}/generate", json=ask)
        assert r.status_code == 202, r.text[:500]
        queued = r.json()["generation"]
        assert queued["state"] == "queued" and queued["clamped"] is None
        assert queued["seed"] == ask["seed"] and queued["mode"] == "sampled"
        polls.append(queued["url"])
    r = http.post(f"{ALIGNED_URL}/generate", data=asks[3])
    assert r.status_code == 303 and r.headers["location"].startswith(f"{ALIGNED_URL}/generate/")
    polls.append(r.headers["location"])

    panels = work(site, *polls)
    for ask, url, panel in zip(asks, polls, panels):
        gen = http.get(url + ".json").json()["generation"]
        seed = int(ask["seed"]) if str(ask["seed"]) != "" else None
        assert gen["state"] == "done" and gen["source"] == "page"
        assert gen["seed"] == seed and gen["mode"] == ("greedy" if seed is None else "sampled")
        direct = clamp.generate(loaded, *ALIGNED, ask["prompt"], float(ask["value"]), tokens=int(ask["tokens"]), seed=seed)
        assert gen["clamped"] == direct["clamped"] and gen["unclamped"] == direct["unclamped"]
        assert 0 < len(gen["clamped"]["token_ids"]) <= int(ask["tokens"])
        shown = panel.select("pre.continuation")
        # a browser drops one newline right after <pre> (html.parser keeps it): the page writes one, so a
        # continuation that starts with a line break keeps it
        assert [p.get_text() for p in shown] == ["\n" + direct["clamped"]["text"], "\n" + direct["unclamped"]["text"]]
        same = direct["clamped"]["text"] == direct["unclamped"]["text"]
        assert (panel.select_one("p.note.same") is not None) == same
        assert gen["differ_at"] == (None if same else next(
            i for i in range(len(direct["clamped"]["text"]) + 1)
            if direct["clamped"]["text"][:i + 1] != direct["unclamped"]["text"][:i + 1]))
    # clamped high, the aligned neuron makes the model say " dog"; unclamped it does not
    greedy = http.get(polls[0] + ".json").json()["generation"]
    dog = token_id(loaded, DOG)
    assert greedy["clamped"]["token_ids"].count(dog) > len(greedy["clamped"]["token_ids"]) // 2
    assert greedy["clamped"] != greedy["unclamped"]
    # the permalink page, and the 404 of another neuron's URL
    page = soup_of(http.get(polls[-1]))
    assert page.select_one("#generation-result pre.continuation.clamped") is not None
    assert page.find("link", rel="alternate", type="application/json")["href"] == polls[-1] + ".json"
    method = page.select_one("section.method").decode_contents()
    assert "`" not in method and "<code>needle index</code>" in method, "commands in the method text are code"
    gen_id = polls[-1].rsplit("/", 1)[1]
    assert http.get(f"/{NAME}/0/4/generate/{gen_id}.json").status_code == 404
    for missing in (str(int(gen_id) + 100), "x", "2147483648", "9" * 25, "\u00b2"):
        r = http.get(f"{ALIGNED_URL}/generate/{missing}.json")
        assert r.status_code == 404 and r.json()["ok"] is False, (missing, r.status_code, r.text[:300])
    assert http.get(f"{ALIGNED_URL}/generate/x").status_code == 404
    assert stored(site.engine)["generations"] == {"page": 4}


def form_fields(form) -> dict:
    """What a browser submits for a form as the page shows it: each named field's value (a
    textarea's text; a checkbox only when checked)."""
    sent = {}
    for field in form.select("[name]"):
        if field.name == "textarea":  # a browser drops one newline right after <textarea> (html.parser keeps it)
            shown = field.get_text()
            sent[field["name"]] = shown[1:] if shown.startswith("\n") else shown
        elif field.get("type") != "checkbox" or field.has_attr("checked"):
            sent[field["name"]] = field.get("value", "")
    return sent


def test_a_request_s_own_page_asks_again_with_its_settings(site):
    """A clamp curve's, a generation's and a text run's pages each end with the form that made
    them, filled with what was asked: posting it unchanged (as a browser would) asks for the same
    thing again, and one changed field changes just that. Off when live requests are off."""
    http = site.http
    sweep = {"prompt": "The dog\nand <b>the</b> cat", "token": DOG, "start": "-40", "stop": "25.5", "count": "9",
             "positions": "last"}
    gen = {"prompt": "A cat & a dog", "value": "-12.5", "tokens": "7", "seed": "31"}
    greedy = {**gen, "seed": ""}
    text = {"text": "\nthe dog <i>barked</i>\n  twice"}  # a first line break is kept
    firsts = []
    for path, ask in (("clamp", sweep), ("generate", gen), ("generate", greedy), ("text", text)):
        r = http.post(f"{ALIGNED_URL}/{path}", data=ask)
        assert r.status_code == 303, (path, r.status_code, r.text[:300])
        firsts.append(r.headers["location"])
    for (path, ask), url in zip((("clamp", sweep), ("generate", gen), ("generate", greedy), ("text", text)), firsts):
        again = soup_of(http.get(url)).select_one("section#again form")
        assert again is not None, url
        assert again["action"] == f"{ALIGNED_URL}/{path}" and not again.has_attr("hx-post")  # it opens the new request's page
        sent = form_fields(again)
        # the target as its chip shows it (␣dog), which the server reads back as " dog"
        assert sent == ({**ask, "token": visible(ask["token"])} if path == "clamp" else ask), (url, sent)
        r = http.post(again["action"], data=sent)
        assert r.status_code == 303 and r.headers["location"] != url
        first, second = (http.get(u + ".json").json() for u in (url, r.headers["location"]))
        keys = {"clamp": ("prompt", "target", "values", "positions"), "generate": ("prompt", "value", "tokens", "seed")}
        keys["text"] = ("text",)
        one, two = (d[{"clamp": "curve", "generate": "generation", "text": "run"}[path]] for d in (first, second))
        assert [one[k] for k in keys[path]] == [two[k] for k in keys[path]]
        if path == "text":
            assert one["text"] == ask["text"]
    # one field changed, the rest kept: a sweep with every position
    again = form_fields(soup_of(http.get(firsts[0])).select_one("section#again form"))
    del again["positions"]
    r = http.post(f"{ALIGNED_URL}/clamp", json=again)
    curve = r.json()["curve"]
    assert curve["positions"] == "all" and curve["prompt"] == sweep["prompt"] and len(curve["values"]) == 9
    assert curve["values"][0] == -40 and curve["values"][-1] == 25.5
    # with live requests off, the pages show what was asked and no form
    off = Settings(database_url=site.db_url, heartbeat_seconds=0.5, page_size=500, live_requests=False)
    with running_server(create_app(off)) as base, httpx.Client(base_url=base, timeout=30) as http_off:
        for url in firsts:
            section = soup_of(http_off.get(url)).select_one("section#again")
            assert section.select("form") == [] and "switched off" in section.get_text(), url


# ---------------------------------------------------------------- 4. bad input


GOOD_CLAMP = {"prompt": PROMPT, "token": DOG, "start": "-10", "stop": "10", "count": "5"}
GOOD_GENERATE = {"prompt": PROMPT, "value": "10", "tokens": "8", "seed": ""}
BAD = [
    ("clamp", {"prompt": ""}, "The prompt is empty"),
    ("clamp", {"prompt": "  \n "}, "The prompt is empty"),
    ("clamp", {"prompt": None}, "The prompt is empty"),
    ("clamp", {"prompt": "x" * 2001}, "the limit is 2000"),
    ("clamp", {"count": "102"}, "use 2 to 101"),
    ("clamp", {"count": "1"}, "use 2 to 101"),
    ("clamp", {"count": "4.5"}, "is not a whole number"),
    ("clamp", {"count": None}, "number of values is missing"),
    ("clamp", {"start": "10"}, "not below its end"),
    ("clamp", {"start": "20"}, "not below its end"),
    ("clamp", {"start": "abc"}, "is not a number"),
    ("clamp", {"stop": "nan"}, "must be a finite number"),
    ("clamp", {"start": "-inf"}, "must be a finite number"),
    ("clamp", {"start": ""}, "range start is missing"),
    ("clamp", {"token": None}, "There is no target token"),
    ("clamp", {"token": ""}, "There is no target token"),
    ("clamp", {"token": "x" * 201}, "a token is at most 200"),
    # a word the model reads as two tokens is refused, naming them as the pages show tokens
    ("clamp", {"token": " dog house"}, "' dog house' is 2 tokens for this model (␣dog, ␣house)"),
    ("clamp", {"token": "␣dog␣house"}, "' dog house' is 2 tokens for this model (␣dog, ␣house)"),
    ("generate", {"prompt": ""}, "The prompt is empty"),
    ("generate", {"prompt": "y" * 2001}, "the limit is 2000"),
    ("generate", {"tokens": "0"}, "use 1 to 256"),
    ("generate", {"tokens": "257"}, "use 1 to 256"),
    ("generate", {"tokens": "ten"}, "is not a whole number"),
    ("generate", {"seed": "-1"}, "out of range"),
    ("generate", {"seed": str(2**31)}, "out of range"),
    ("generate", {"seed": "1.5"}, "is not a whole number"),
    ("generate", {"value": None}, "clamp value is missing"),
    ("generate", {"value": "inf"}, "must be a finite number"),
]


def with_changes(base: dict, changes: dict) -> dict:
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def test_bad_input_is_a_clear_400_and_stores_nothing(site):
    http = site.http
    before = stored(site.engine)
    for kind, changes, message in BAD:
        body = with_changes(GOOD_CLAMP if kind == "clamp" else GOOD_GENERATE, changes)
        for how in ({"data": body}, {"json": body}, {"data": body, "headers": {"HX-Request": "true"}}):
            r = http.post(f"{ALIGNED_URL}/{kind}", **how)
            assert r.status_code == 400, (kind, changes, how.keys(), r.status_code, r.text[:300])
            assert message in error_text(r), (kind, changes, error_text(r))
            assert "Traceback" not in r.text
    for kind in ("clamp", "generate"):
        for body in (b"[1, 2]", b'"prompt"', b"{not json", b"null"):
            r = http.post(f"{ALIGNED_URL}/{kind}", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not a JSON object" in error_text(r), (kind, body, r.text[:300])
        # no such neuron, layer or model: 404
        good = GOOD_CLAMP if kind == "clamp" else GOOD_GENERATE
        for where in (f"/{NAME}/0/64", f"/{NAME}/2/0", f"/{NAME}/0/x", "/no-such-model/0/0"):
            r = http.post(f"{where}/{kind}", data=good)
            assert r.status_code == 404, (where, kind, r.status_code)
            assert http.post(f"{where}/{kind}", json=good).status_code == 404
    backwards = http.post(f"{ALIGNED_URL}/clamp", json=with_changes(GOOD_CLAMP, {"start": "10", "stop": "-10"})).json()
    assert "From" in backwards["hint"] and "-50:50" not in backwards["hint"], "the form's words, not the CLI's"
    assert stored(site.engine) == before, "a refused request stores no curve, generation or job"


BAD_JSON = [  # what a form cannot send: JSON's own types, and numbers beyond any range
    ("clamp", {"count": float("inf")}, "is not a whole number"),
    ("clamp", {"count": 3.9}, "is not a whole number"),
    ("clamp", {"start": 10**400}, "is out of range"),
    ("clamp", {"prompt": ["a"]}, "it must be text or a number"),
    ("clamp", {"token": {"x": 1}}, "it must be text or a number"),
    ("clamp", {"prompt": 5}, "The prompt must be text"),
    ("clamp", {"count": "٣"}, "is not a whole number"),
    ("generate", {"tokens": float("inf")}, "is not a whole number"),
    ("generate", {"tokens": 2.9}, "is not a whole number"),
    ("generate", {"seed": float("-inf")}, "is not a whole number"),
    ("generate", {"value": 10**400}, "is out of range"),
    ("generate", {"value": True}, "true or false"),
    ("generate", {"seed": True}, "true or false"),
]


def test_the_live_requests_answer_in_one_shape_the_schema_gives(site):
    """The text run, the clamp sweep and the generation answer (202, then their .json twins) in one
    shape, which /-/openapi.json describes: where the request belongs, and the request under its key."""
    import jsonschema

    http = site.http
    paths = http.get("/-/openapi.json").json()["paths"]
    for path, body, key in (("text", {"text": "the dog"}, "run"), ("clamp", GOOD_CLAMP, "curve"),
                            ("generate", GOOD_GENERATE, "generation")):
        schema = paths["/{model}/{layer}/{neuron}/" + path]["post"]["responses"]["202"]["content"]["application/json"]["schema"]
        r = http.post(f"{ALIGNED_URL}/{path}", json=body)
        assert r.status_code == 202, r.text[:300]
        queued = r.json()
        jsonschema.validate(queued, schema)
        assert (queued["model"], queued["layer"], queued["neuron"], queued["neuron_url"]) == (NAME, *ALIGNED, ALIGNED_URL)
        twin = http.get(queued[key]["json_url"]).json()
        jsonschema.validate(twin, schema)
        assert set(twin) == set(queued) and twin[key]["id"] == queued[key]["id"]
        for other in {"run", "curve", "generation"} - {key}:
            with pytest.raises(jsonschema.ValidationError):  # the schema tells the three apart
                jsonschema.validate(queued, paths["/{model}/{layer}/{neuron}/" + {"run": "text", "curve": "clamp",
                                    "generation": "generate"}[other]]["post"]["responses"]["202"]["content"]["application/json"]["schema"])


def test_bad_json_types_and_bodies_are_clear_4xx_and_store_nothing(site):
    http = site.http
    before = stored(site.engine)
    for kind, changes, message in BAD_JSON:
        body = json.dumps(with_changes(GOOD_CLAMP if kind == "clamp" else GOOD_GENERATE, changes))
        r = http.post(f"{ALIGNED_URL}/{kind}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"], (kind, changes, r.status_code, r.text[:300])
    assert http.post(f"{ALIGNED_URL}/clamp", json={**GOOD_CLAMP, "count": 5.0}).status_code == 202, "5.0 is whole"
    deep = b"[" * 20_000 + b"]" * 20_000  # 40 KB, nested far past Python's recursion limit
    for path in ("text", "clamp", "generate"):
        url = f"{ALIGNED_URL}/{path}"
        r = http.post(url, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not a JSON object" in r.json()["error"], (path, r.status_code)
        r = http.post(url, content=b"text=" + b"x" * 70_000, headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413 and "64 KiB" in error_text(r), (path, r.status_code)
        for media in ("application/xml", "multipart/form-data; boundary=x", "text/plain"):
            r = http.post(url, content=b"<x/>", headers={"content-type": media})
            assert r.status_code == 415 and "application/x-www-form-urlencoded" in r.text, (path, media, r.status_code)
        r = http.get(url)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert "sent with POST" in error_text(r) and "read with GET" not in error_text(r)
    r = http.post(f"{ALIGNED_URL}/text", content=b"text=%FF%FE", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "not UTF-8" in error_text(r)
    r = http.post(f"{ALIGNED_URL}/text", content=b"&".join(b"f%d=1" % i for i in range(200)),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "over 100 fields" in error_text(r)
    r = http.post(f"{ALIGNED_URL}/text", json={"text": 5})
    assert r.status_code == 400 and "must be a string" in r.json()["error"]
    r = http.post(f"{ALIGNED_URL}/text", content=json.dumps({"text": "def f(x):"}),
                  headers={"content-type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 202, "media types are case-insensitive"
    after = stored(site.engine)
    assert after["curves"] == {**before["curves"], "page": before["curves"].get("page", 0) + 1}
    assert after["generations"] == before["generations"] and after["text_runs"] == before["text_runs"] + 1


# ---------------------------------------------------------------- 5. the live switch


def test_live_requests_switched_off(site):
    off = Settings(database_url=site.db_url, heartbeat_seconds=0.5, page_size=500, live_requests=False)
    shown = (CROWD_LAYER, CROWD[-1])  # has a curve from `needle index`
    before = stored(site.engine)
    with running_server(create_app(off)) as base, httpx.Client(base_url=base, timeout=30) as http:
        for path, body in (("clamp", GOOD_CLAMP), ("generate", GOOD_GENERATE), ("text", {"text": "the dog"})):
            for how in ({"data": body}, {"json": body}, {"data": body, "headers": {"HX-Request": "true"}}):
                r = http.post(f"{ALIGNED_URL}/{path}", **how)
                assert r.status_code == 403, (path, r.status_code, r.text[:300])
                assert "switched off" in error_text(r)
        assert stored(site.engine) == before
        # the page shows the stored curves but no form to ask for more
        data = http.get(f"/{NAME}/{shown[0]}/{shown[1]}.json").json()
        assert data["clamp_form"]["live"] is False and len(data["clamp_curves"]) == 1
        page = soup_of(http.get(f"/{NAME}/{shown[0]}/{shown[1]}"))
        assert page.select("form.clamp-form") == []
        assert page.select_one("section#your-text form") is None
        section = page.select_one("section#clamp")
        check_curve_plot(section.select_one(".clamp-curve-box"), data["clamp_curves"][0])
        assert "switched off" in section.get_text() and "needle clamp" in section.get_text()
    # the server with live requests on still has the forms
    page = soup_of(site.http.get(f"/{NAME}/{shown[0]}/{shown[1]}"))
    assert len(page.select("form.clamp-form")) == 2


# ---------------------------------------------------------------- 6. the limits


def test_the_limits_themselves_are_accepted(site, loaded):
    """Prompt 2000 characters, 101 values and 256 tokens are allowed. The tiny model reads only
    64 positions, so the long prompt and the long generation then fail in the worker, and their
    panels say why."""
    http = site.http
    limits = [
        ("clamp", {**GOOD_CLAMP, "count": "101"}),
        ("clamp", {**GOOD_CLAMP, "prompt": "x" * 2000}),
        ("clamp", {**GOOD_CLAMP, "prompt": "\r\n".join(["ab"] * 667)}),  # 2000 characters once \r\n is \n
        ("generate", {**GOOD_GENERATE, "tokens": "256"}),
        ("generate", {**GOOD_GENERATE, "prompt": "y" * 2000}),
    ]
    urls = []
    for kind, body in limits:
        r = http.post(f"{ALIGNED_URL}/{kind}", json=body)
        assert r.status_code == 202, (kind, r.text[:300])
        urls.append(r.json()["curve" if kind == "clamp" else "generation"]["url"])
    panels = work(site, *urls)

    wide = http.get(urls[0] + ".json").json()["curve"]
    assert wide["state"] == "done" and len(wide["probs"]) == 101
    direct = clamp.sweep(loaded, *ALIGNED, PROMPT, token_id(loaded, DOG), wide["values"])
    np.testing.assert_allclose(wide["probs"], direct["probs"], atol=TOL, rtol=0)
    for url, panel in zip(urls[1:], panels[1:]):
        data = http.get(url + ".json").json()
        item = data.get("curve") or data.get("generation")
        assert item["state"] == "failed" and "at most 64 positions" in item["error"], item
        assert "at most 64 positions" in panel.select_one(".error-message").get_text()
    assert http.get(urls[2] + ".json").json()["curve"]["prompt"] == "\n".join(["ab"] * 667)
    # a failed live request is not a failed indexing job of the model page
    model = http.get(f"/{NAME}.json").json()
    assert all(j["state"] == "done" for j in model["jobs"]) and not set(LIVE_STAGES) & {s["stage"] for s in model["stages"]}


# ---------------------------------------------------------------- 7. the CLI


@pytest.fixture
def cli(site, monkeypatch, capsys):
    """needle.cli.main in this process, on the site's database: (exit code, stdout, stderr)."""
    yield cli_runner(monkeypatch, capsys, site.db_url)
    get_settings.cache_clear()


def assert_clear_error(code: int, err: str, phrase: str) -> None:
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and phrase in err, err


def test_cli_clamp_prints_the_curve_and_stores_it(site, cli, loaded):
    http = site.http
    # without --prompt: the neuron's top context up to its max token (its page's default), where it
    # fires at its max: the range holds that activation
    code, out, err = cli("clamp", NAME, "0", "3", "--token", DOG, "--values", "-10:10:11", "--json")
    assert code == 0, err
    curve = json.loads(out)
    check_curve_shape(curve, 11)
    np.testing.assert_allclose(curve["values"], np.linspace(-10, 10, 11), rtol=1e-12, atol=1e-12)
    prompt = http.get(f"{ALIGNED_URL}.json").json()["clamp_form"]["prompt"]
    assert curve["prompt"] == prompt and curve["positions"] == "all" and curve["note"] is None
    direct = clamp.sweep(loaded, *ALIGNED, prompt, token_id(loaded, DOG), curve["values"])
    np.testing.assert_allclose(curve["probs"], direct["probs"], atol=TOL, rtol=0)
    assert curve["token"] == DOG and curve["token_id"] == token_id(loaded, DOG)
    assert curve["url"].endswith(f"{ALIGNED_URL}/clamp/{curve['id']}")
    # stored: the neuron JSON lists it, the page plots it
    listed = {c["id"]: c for c in http.get(f"{ALIGNED_URL}.json").json()["clamp_curves"]}
    assert listed[curve["id"]]["source"] == "cli"
    assert listed[curve["id"]]["probs"] == pytest.approx(curve["probs"], abs=1e-12)
    page = soup_of(http.get(f"{ALIGNED_URL}/clamp/{curve['id']}"))
    check_curve_plot(page.select_one("#clamp-result"), listed[curve["id"]])
    assert "needle clamp" in page.select_one("#clamp-result").get_text()

    # a target of several tokens is one clear error, naming them, and stores nothing
    code, out, err = cli("clamp", NAME, "0", "3", "--token", " dog house", "--prompt", PROMPT, "--values", "-50:50:5")
    assert_clear_error(code, err, "' dog house' is 2 tokens for this model (␣dog, ␣house)")
    assert stored(site.engine)["curves"] == {"cli": 1}
    # text output; a target as a page's chip shows it (␣dog); --last-only; --prompt
    code, out, err = cli("clamp", NAME, "0", "3", "--token", "␣dog", "--prompt", PROMPT, "--last-only",
                         "--values", "-50:50:5")
    assert code == 0, err
    assert "note:" not in out and "stored: http" in out
    code, out, err = cli("clamp", NAME, "0", "3", "--token", "␣dog", "--prompt", PROMPT, "--values=-50:50:5",
                         "--last-only", "--json")
    assert code == 0, err
    last = json.loads(out)
    assert last["note"] is None and last["token"] == DOG and last["positions"] == "last"
    direct = clamp.sweep(loaded, *ALIGNED, PROMPT, token_id(loaded, DOG), last["values"], last_only=True)
    np.testing.assert_allclose(last["probs"], direct["probs"], atol=TOL, rtol=0)
    assert stored(site.engine)["curves"] == {"cli": 3}
    # a curve stored with a note (as curves of several-token targets were, before they were refused) shows it
    # where it cannot be missed, above the plot
    with session_scope(site.engine) as s:
        s.get(ClampCurve, last["id"]).note = "' dog house' is 2 tokens; the curve is for its first token, ' dog'."
    last_page = f"{ALIGNED_URL}/clamp/{last['id']}"
    warning = soup_of(http.get(last_page)).select_one("#clamp-result p.warning")
    assert warning is not None and "first token" in warning.get_text() and warning["role"] == "note"
    # without --token and --values: the neuron's top token, 41 values over the default range
    code, out, err = cli("clamp", NAME, "1", str(CROWD[-1]), "--json")
    assert code == 0, err
    default = json.loads(out)
    data = http.get(f"/{NAME}/1/{CROWD[-1]}.json").json()
    assert default["token_id"] == data["top_token"]["token_id"] and len(default["values"]) == 41
    assert default["values"][0] == data["clamp_form"]["start"] and default["values"][-1] == data["clamp_form"]["stop"]


def test_cli_clamp_bad_input_is_one_clear_error(site, cli):
    before = stored(site.engine)
    for args, phrase in [
        (("clamp", NAME, "0", "3", "--values", "-5:5"), "START:STOP:COUNT"),
        (("clamp", NAME, "0", "3", "--values", "5:-5:11"), "not below its end"),
        (("clamp", NAME, "0", "3", "--values", "-5:5:102"), "use 2 to 101"),
        (("clamp", NAME, "0", "3", "--values", "a:5:3"), "not a number"),
        (("clamp", NAME, "0", "3", "--prompt", "  "), "The prompt is empty"),
        (("clamp", "no-such-model", "0", "3"), "There is no model named 'no-such-model'"),
        (("clamp", NAME, "2", "0"), "has no layer 2"),
        (("clamp", NAME, "0", "64"), "has no neuron 64"),
        (("generate", "no-such-model", "0", "3", "--value", "5"), "There is no model named"),
        (("generate", NAME, "0", "3", "--value", "5", "--tokens", "300"), "use 1 to 256"),
        (("generate", NAME, "0", "3", "--value", "5", "--tokens", "0"), "use 1 to 256"),
        (("generate", NAME, "0", "3", "--value", "nan"), "finite"),
    ]:
        code, out, err = cli(*args)
        assert_clear_error(code, err, phrase)
        assert out == ""
    assert stored(site.engine) == before


def test_cli_generate_prints_both_continuations_and_stores_them(site, cli, loaded):
    http = site.http
    code, out, err = cli("generate", NAME, "0", "3", "--value", "50", "--tokens", "8", "--json")
    assert code == 0, err
    gen = json.loads(out)
    prompt = http.get(f"{ALIGNED_URL}.json").json()["clamp_form"]["prompt"]
    assert gen["prompt"] == prompt and gen["mode"] == "greedy" and gen["seed"] is None and gen["tokens"] == 8
    direct = clamp.generate(loaded, *ALIGNED, prompt, 50.0, tokens=8)
    assert gen["clamped"] == direct["clamped"] and gen["unclamped"] == direct["unclamped"]
    saved = http.get(f"{ALIGNED_URL}/generate/{gen['id']}.json").json()["generation"]
    assert saved["source"] == "cli" and saved["state"] == "done"
    assert saved["clamped"] == gen["clamped"] and saved["unclamped"] == gen["unclamped"]
    # seeded, and in words
    code, out, err = cli("generate", NAME, "0", "3", "--value", "20", "--tokens", "6", "--seed", "3", "--prompt", PROMPT)
    assert code == 0, err
    direct = clamp.generate(loaded, *ALIGNED, PROMPT, 20.0, tokens=6, seed=3)
    assert f"clamped at 20: {direct['clamped']['text']!r}" in out
    assert f"unclamped: {direct['unclamped']['text']!r}" in out
    assert "seed 3" in out and "stored: http" in out
    assert stored(site.engine)["generations"] == {"cli": 2}


@pytest.mark.parametrize("a, b, at", [("\nimport sys", "\nimport os", 8), ("same", "same", None), ("ab", "abc", 2),
                                      ("x", "y", 0), ("", "", None)])
def test_where_two_continuations_part(a, b, at):
    from app.clamping import _parting

    assert _parting({"text": a}, {"text": b}) == at
    assert _parting(None, {"text": b}) is None


@pytest.mark.parametrize("a, b, said", [("\nimport sys", "\nimport os", "agree on their first 8 characters, then part"),
                                        ("ab", "ax", "agree on their first character, then part"),
                                        ("same", "same", "The clamp changed nothing here")])
def test_the_generation_panel_says_where_the_continuations_part(a, b, said):
    from app.clamping import _parting
    from app.rendering import environment

    generation = {"state": "done", "tokens": 8, "seed": None, "url": "/m/0/0/generate/1", "json_url": "/m/0/0/generate/1.json",
                  "prompt": "p", "value": 1.0, "clamped": {"text": a}, "unclamped": {"text": b},
                  "differ_at": _parting({"text": a}, {"text": b})}
    panel = BeautifulSoup(environment().get_template("_generation_panel.html").render(generation=generation), "html.parser")
    assert said in panel.get_text(" ", strip=True)


def test_every_token_shown_in_the_target_field_is_read_back_as_itself(site):
    """The sweep form shows its target as a chip does (␣dog); posted back, every token of the
    model's vocabulary resolves to a token of the same text (ids may share a text). A token that
    holds a mark itself (a literal ␣ after a space) is shown as it is, since marked it could not
    be read back."""
    from app.clamping import target_field, target_token

    with session_scope(site.engine) as s:
        model = s.scalar(select(Model).where(Model.name == NAME))
        vocab = dict(queries.vocab_tokens(s, model.id))
        shown = 0
        for token_id_, text in vocab.items():
            if not text:
                continue
            field = target_field(text)
            shown += field != text
            found, meant = target_token(s, model, field)
            assert vocab[found] == text == meant, (token_id_, text, field, found)
        assert shown > 10, "tokens with a space or a newline are shown marked"
    for text, field in ((" dog", "␣dog"), ("\n\n", "↵↵"), ("dog", "dog"), (" a␣b", " a␣b"), ("␣", "␣"), ("", "")):
        assert target_field(text) == field
