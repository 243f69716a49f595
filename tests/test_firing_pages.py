"""What a person sees of a neuron's activations: the neuron page's top contexts, interval
samples, statistics and histogram, the layer sorts, the model's dead-neuron counts, and the
"test your own text" run, over real HTTP against a real server, a real worker and real
databases (SQLite and Postgres), with a tiny model indexed through the user's code path."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.config import Settings
from app.db import engine_for, session_scope
from app.main import create_app
from needle.cli import index_model
from tests.live_server import running_server
from tests.tinymodels import TRAINING_TEXT, build_tiny
from workers.worker import Worker

CONTEXT = 16
NAME = "tiny-gpt2"


@pytest.fixture
def site(db_url, tmp_path):
    model_dir = build_tiny("gpt2", tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TRAINING_TEXT * 6, encoding="utf-8")
    settings = Settings(database_url=db_url, heartbeat_seconds=0.5, page_size=500)
    index_model(settings, str(model_dir), NAME, device="cpu", corpus=str(corpus), context=CONTEXT, quiet=True)
    engine = engine_for(db_url)
    app = create_app(settings)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield http, engine, settings, model_dir


def soup_of(r: httpx.Response) -> BeautifulSoup:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return BeautifulSoup(r.text, "html.parser")


def direct_activations(model_dir, layer: int, neuron: int, token_ids: list[int]) -> np.ndarray:
    """A plain float32 forward read by the test's own hook (not the project's adapter): the
    input of GPT-2's MLP output projection c_proj in that layer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = []
    handle = model.transformer.h[layer].mlp.c_proj.register_forward_pre_hook(lambda m, args: got.append(args[0]))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([token_ids]), use_cache=False)
    finally:
        handle.remove()
    return got[0][0, :, neuron].numpy()


def test_neuron_page_shows_contexts_intervals_and_stats(site):
    http, _, _, _ = site
    data = http.get(f"/{NAME}/1/3.json").json()
    examples, intervals, stats = data["examples"], data["interval_samples"], data["stats"]
    assert 0 < len(examples) <= 20
    maxima = [e["max_activation"] for e in examples]
    assert maxima == sorted(maxima, reverse=True)
    for e in examples:
        assert set(e) >= {"tokens", "token_ids", "activations", "max_activation", "max_index"}
        assert len(e["tokens"]) == len(e["token_ids"]) == len(e["activations"]) == CONTEXT
        assert e["activations"][e["max_index"]] == pytest.approx(e["max_activation"], rel=2e-3, abs=2e-3)
    assert len(intervals) == 5 and sum(b["share"] for b in intervals) == pytest.approx(1.0, abs=1e-4)
    assert intervals[-1]["bin"][1] == pytest.approx(stats["max"], rel=1e-4)
    assert sum(stats["histogram"]["counts"]) == stats["tokens"]

    page = soup_of(http.get(f"/{NAME}/1/3"))
    firing = page.select_one("#firing")
    contexts = firing.select("h3 + ol.contexts > li .context")
    assert len(contexts) == len(examples)
    first = contexts[0].select(".ctx-tokens .t")
    assert len(first) == CONTEXT
    marked = [i for i, t in enumerate(first) if "max" in t["class"]]
    assert marked == [examples[0]["max_index"]]
    # hover shows the value; negative activations get their own class
    for t, a in zip(first, examples[0]["activations"]):
        assert f"{a:.4g}" in t["title"]
        assert ("neg" in t["class"]) == (a < 0)
    # colour strength, per sign: a / the neuron's max for a positive a, |a| / |its min| for a negative one
    assert stats["max"] > 0 > stats["min"] and stats["max"] != -stats["min"], "both signs, at different scales"
    shown = [ex for ex in examples] + [ex for b in intervals for ex in b["examples"]]
    boxes = firing.select("ol.contexts > li .ctx-tokens")
    assert len(boxes) == len(shown)
    negatives = 0
    for box, ex in zip(boxes, shown):
        for t, a in zip(box.select(".t"), ex["activations"]):
            want = min(a / stats["max"], 1.0) if a >= 0 else min(-a / -stats["min"], 1.0)
            assert float(t["style"].removeprefix("--a:")) == pytest.approx(want, abs=1.5e-3), (a, t["style"])
            negatives += a < 0
    assert negatives > 0
    legend = firing.select_one("p.legend").get_text(" ", strip=True)
    assert f"{stats['max']:.4g}" in legend and f"{-stats['min']:.4g}" in legend
    assert len(firing.select(".interval")) == 5
    assert firing.select_one("svg.histogram") is not None
    assert len(firing.select("svg.histogram.wide rect.hbar")) == sum(c > 0 for c in stats["histogram"]["counts"])
    method = page.select_one("section.method").get_text(" ", strip=True)
    assert "reservoir" in method and "estimate" in method


def test_layer_sorts_by_frequency_and_max_and_model_counts_dead(site):
    http, _, _, _ = site
    by_freq = http.get(f"/{NAME}/0.json?sort=frequency").json()["neurons"]
    freqs = [n["frequency"] for n in by_freq]
    assert freqs == sorted(freqs, reverse=True) and len(freqs) == 64
    least = [n["frequency"] for n in http.get(f"/{NAME}/0.json?sort=-frequency").json()["neurons"]]
    assert least == sorted(least)
    by_max = [n["max_activation"] for n in http.get(f"/{NAME}/0.json?sort=max").json()["neurons"]]
    assert by_max == sorted(by_max, reverse=True)
    # the layer page shows the columns, the model page the dead neurons (never > 0) per layer
    page = soup_of(http.get(f"/{NAME}/0?sort=frequency"))
    assert "Frequency" in page.select_one("table.neurons thead").get_text()
    model = http.get(f"/{NAME}.json").json()
    for layer in model["layers"]:
        dead = 0
        for n in http.get(f"/{NAME}/{layer['layer']}.json?sort=neuron").json()["neurons"]:
            dead += n["frequency"] == 0
        assert layer["dead"] == dead
    assert model["dead_neurons"] == sum(layer["dead"] for layer in model["layers"])
    assert model["examples_run"]["context"] == CONTEXT


def test_own_text_runs_through_a_worker(site):
    http, engine, settings, model_dir = site
    text = "def feed(dog):\n    return dog"
    r = http.post(f"/{NAME}/1/3/text", data={"text": text}, headers={"HX-Request": "true"})
    assert r.status_code == 200
    panel = BeautifulSoup(r.text, "html.parser").select_one("#text-result")
    poll = panel["hx-get"]  # queued: the panel polls itself
    assert panel["hx-trigger"] == "every 1s"

    worker = Worker(engine, settings)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True, "poll_seconds": 0.1}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        panel = BeautifulSoup(http.get(poll, headers={"HX-Request": "true"}).text, "html.parser").select_one("#text-result")
        if not panel.has_attr("hx-get") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    thread.join(30)
    assert not panel.has_attr("hx-get"), "the run did not finish"
    shown = panel.select(".ctx-tokens .t")
    twin = http.get(poll + ".json").json()
    # the shape every live request answers in: where it belongs, and the request under its own key
    assert (twin["model"], twin["layer"], twin["neuron"], twin["neuron_url"]) == (NAME, 1, 3, f"/{NAME}/1/3")
    assert twin["run"]["url"] == poll and twin["run"]["json_url"] == poll + ".json" and twin["run"]["state"] == "done"
    result = twin["run"]["result"]
    assert len(shown) == len(result["token_ids"]) > 3
    expected = direct_activations(model_dir, 1, 3, result["token_ids"])
    np.testing.assert_allclose(result["activations"], expected, rtol=1e-3, atol=1e-4)
    assert "".join(result["tokens"]) == text
    # the run has a permalink page of its own
    page = soup_of(http.get(poll))
    assert len(page.select("#text-result .ctx-tokens .t")) == len(shown)
    assert page.select_one(".left-out") is None, "the whole text ran"

    # a text longer than the model reads: its first tokens run, and the page says how many were left out
    long_text = "dog feed return " * 60
    r = http.post(f"/{NAME}/1/3/text", data={"text": long_text})
    assert r.status_code == 303
    long_url = r.headers["location"]
    worker.run(until_idle=True, poll_seconds=0.1)
    ran = http.get(long_url + ".json").json()["run"]["result"]
    total = len(AutoTokenizer.from_pretrained(model_dir)(long_text, add_special_tokens=False)["input_ids"])
    assert len(ran["token_ids"]) < total
    note = soup_of(http.get(long_url)).select_one("#text-result .left-out").get_text(" ", strip=True)
    assert f"first {len(ran['token_ids'])} tokens" in note and f"last {total - len(ran['token_ids'])} of" in note, note


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "no text"), ("   \n ", "no text"), ("x" * 2001, "limit is 2000")],
)
def test_own_text_bad_input_is_a_clear_400(site, text, message):
    http, engine, _, _ = site
    r = http.post(f"/{NAME}/1/3/text", data={"text": text})
    assert r.status_code == 400 and message in r.text
    r = http.post(f"/{NAME}/1/3/text", json={"text": text})
    assert r.status_code == 400 and message in r.json()["error"], (r.status_code, r.text[:300])
    with session_scope(engine) as s:
        from app.schema import TextRun

        assert s.query(TextRun).count() == 0


def test_text_run_for_another_neuron_is_404(site):
    http, _, _, _ = site
    r = http.post(f"/{NAME}/1/3/text", json={"text": "dog"})
    assert r.status_code == 202
    run = r.json()["run"]["id"]
    assert r.json()["run"]["state"] == "queued" and r.json()["neuron_url"] == f"/{NAME}/1/3"
    assert http.get(f"/{NAME}/1/4/text/{run}").status_code == 404
    assert http.get(f"/{NAME}/1/3/text/{run}.json").status_code == 200
    assert http.get(f"/{NAME}/1/3/text/999999.json").json()["ok"] is False


def test_text_run_body_that_is_not_json_is_a_clear_400(site):
    http, engine, _, _ = site
    r = http.post(f"/{NAME}/1/3/text", content=b"[1, 2", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not a JSON object" in r.text and "Traceback" not in r.text
    assert http.post(f"/{NAME}/1/99/text", data={"text": "dog"}).status_code == 404
    with session_scope(engine) as s:
        from app.schema import TextRun

        assert s.query(TextRun).count() == 0


def test_features_of_an_unprobed_model_and_a_too_long_search(site):
    http, _, _, _ = site
    data = http.get(f"/{NAME}/features.json").json()
    assert data["probed"] is False and data["features"] == []
    page = BeautifulSoup(http.get(f"/{NAME}/features").text, "html.parser")
    assert "needle probe" in page.select_one("p.empty").get_text()
    r = http.get(f"/{NAME}/features.json", params={"q": "x" * 201})
    assert r.status_code == 400 and r.json()["ok"] is False and "limit is 200" in r.json()["error"]
