"""Sparse probing end to end: a tiny model with a neuron made to fire only on digits is indexed
with the built-in text features through the user's code path, on SQLite and Postgres; its
feature page, features list, search and neuron page are read over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from bs4 import BeautifulSoup
from sklearn.metrics import f1_score

from app import queries
from app.config import Settings
from app.db import engine_for, session_scope
from app.main import create_app
from needle.cli import index_model
from tests.live_server import running_server
from tests.tinymodels import TRAINING_TEXT, build_detector, tiny_tokenizer

DIGIT_NEURON = (1, 7)
NAME = "digits"
DIGITS = [f"<0x{0x30 + d:02X}>" for d in range(10)]  # the tiny tokenizer spells digits as byte tokens


def digit_corpus() -> str:
    lines = []
    for i in range(400):
        lines.append(f"item {i * 37 % 1000} costs {i % 90 + 10} coins")
        if i % 3 == 0:
            lines.append(TRAINING_TEXT.splitlines()[i % 10])
    return "\n".join(lines) + "\n"


@pytest.fixture
def probed(db_url, tmp_path):
    tok = tiny_tokenizer("sentencepiece")
    pieces = tuple(p for p in DIGITS if tok.convert_tokens_to_ids(p) != tok.unk_token_id)
    assert len(pieces) == 10
    model_dir = build_detector(tmp_path / "model", {DIGIT_NEURON: pieces})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(digit_corpus(), encoding="utf-8")
    settings = Settings(database_url=db_url)
    index_model(
        settings, str(model_dir), NAME, device="cpu", features=["text"], probe_corpus=str(corpus),
        probe_tokens=8192, context=32, quiet=True,
    )
    return settings, model_dir, corpus


def test_digit_neuron_is_the_k1_probe_and_first_by_mean_difference(probed):
    settings, _, _ = probed
    app = create_app(settings)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        data = http.get(f"/{NAME}/features/contains_digit.json").json()
        assert data["feature"] == "contains_digit" and data["kind"] == "token"
        assert set(data["counts"]) == {"train_pos", "train_neg", "test_pos", "test_neg"}
        assert data["counts"]["train_pos"] >= 20
        layer = next(entry for entry in data["layers"] if entry["layer"] == DIGIT_NEURON[0])
        assert layer["best"]["neuron"] == DIGIT_NEURON[1]
        assert layer["best"]["f1"] >= 0.95
        assert layer["top_neurons"][0]["neuron"] == DIGIT_NEURON[1], "first by mean difference"
        ks = [p["k"] for p in layer["curve"]]
        assert ks == [k for k in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 128, 256) if k <= 64]
        for point in layer["curve"]:
            assert len(point["neurons"]) == point["k"]
            assert set(point) >= {"k", "f1", "precision", "recall", "neurons"}

        # the feature page: counts, a row per layer linking the best neuron, the curve plot
        page = BeautifulSoup(http.get(f"/{NAME}/features/contains_digit").text, "html.parser")
        rows = page.select("table.feature-layers tbody tr")
        assert len(rows) == 2
        link = rows[DIGIT_NEURON[0]].select_one("a")["href"]
        assert link == f"/{NAME}/{DIGIT_NEURON[0]}/{DIGIT_NEURON[1]}#features", "to the neuron's features panel"
        # the top neuron by mean difference (k = 1, chosen on train data), and beside it the best test F1
        # of the layer's one-neuron probes
        for row, entry in zip(rows, sorted(data["layers"], key=lambda e: e["layer"])):
            alone = max(entry["top_neurons"], key=lambda t: t["f1"])
            cell = row.select("td")[5]
            assert cell.select_one("a")["href"] == f"/{NAME}/{entry['layer']}/{alone['neuron']}#features"
            assert f"{alone['f1']:.3f}" in cell.get_text()
        # the fast sweep and the pruning sweep, a line per layer, each drawn wide and narrow (phones)
        fast, fast_narrow, pruned, pruned_narrow = page.select("svg.curve")
        assert all(len(svg.select("polyline")) == 2 for svg in (fast, fast_narrow, pruned, pruned_narrow))
        assert "Train" in page.select_one("dl.counts").get_text()

        # evidence with its baselines: chance F1 (predicting every test example positive, as scikit-learn
        # scores it) and, on this small test set, a bootstrap interval around each F1
        pos, neg = data["counts"]["test_pos"], data["counts"]["test_neg"]
        chance = f1_score([1] * pos + [0] * neg, [1] * (pos + neg))
        assert data["chance_f1"] == pytest.approx(chance, rel=1e-5) and data["chance_f1"] < 0.9
        for entry in data["layers"]:
            low, high = entry["best"]["f1_interval"]
            assert low <= entry["best"]["f1"] <= high and high - low < 0.5, entry["best"]
        assert "Chance F1" in page.select_one("dl.counts").get_text()
        assert f"[{layer['best']['f1_interval'][0]:.3f}, " in rows[DIGIT_NEURON[0]].get_text()

        # the neuron page lists the feature with its single-neuron metrics
        neuron = http.get(f"/{NAME}/{DIGIT_NEURON[0]}/{DIGIT_NEURON[1]}.json").json()
        listed = {f["feature"]: f for f in neuron["features"]}
        assert listed["contains_digit"]["rank"] == 1 and listed["contains_digit"]["f1"] >= 0.95
        assert listed["contains_digit"]["chance_f1"] == data["chance_f1"]
        assert listed["contains_digit"]["f1_interval"] is not None
        html = BeautifulSoup(http.get(f"/{NAME}/{DIGIT_NEURON[0]}/{DIGIT_NEURON[1]}").text, "html.parser")
        assert "contains_digit" in html.select_one("#features").get_text()

        # the features list and search by name
        names = [f["feature"] for f in http.get(f"/{NAME}/features.json").json()["features"]]
        assert {"contains_digit", "all_digits", "leading_space"} <= set(names)
        found = [f["feature"] for f in http.get(f"/{NAME}/features.json", params={"q": "DIGIT"}).json()["features"]]
        assert found == ["all_digits", "contains_digit"]
        assert http.get(f"/{NAME}/features/no_such.json").status_code == 404


def test_rare_feature_is_reported_not_probed(probed):
    settings, _, _ = probed
    engine = engine_for(settings.resolved_database_url())
    with session_scope(engine) as s:
        model = queries.get_model(s, NAME)
        rare = queries.get_feature(s, model.id, "is_not_ascii")
        assert rare.status == "skipped" and "20" in rare.reason
        assert queries.feature_layers(s, model.id, "is_not_ascii") == []


def test_probe_command_on_an_indexed_model_and_bad_jsonl(probed, tmp_path):
    settings, _, corpus = probed
    url = settings.resolved_database_url()
    env = {**os.environ, "NEEDLE_DATABASE_URL": url}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"feature": "f", "text": "a", "label": 1}\n{"feature": "f", "text": 3, "label": 0}\n')
    before = dump(url)
    proc = subprocess.run(
        [sys.executable, "-m", "needle.cli", "probe", NAME, "--features", str(bad)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1 and "line 2" in proc.stderr and "Traceback" not in proc.stderr
    assert dump(url) == before
    # other settings without --force are refused, with nothing changed
    proc = subprocess.run(
        [sys.executable, "-m", "needle.cli", "probe", NAME, "--features", "text", "--probe-corpus", str(corpus),
         "--probe-tokens", "4096", "--context", "32"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert dump(url) == before
    proc = subprocess.run(
        [sys.executable, "-m", "needle.cli", "probe", "nobody", "--features", "text"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1 and "needle index" in proc.stderr


def dump(url: str) -> dict:
    from sqlalchemy import MetaData, select

    engine = engine_for(url)
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return {
            name: sorted(repr(tuple(r)) for r in conn.execute(select(table)))
            for name, table in meta.tables.items()
        }


def test_probe_method_paper_end_to_end(probed):
    """`needle probe --method paper` on the indexed digit model: refused without --force (the stored probes
    are Needle's), then run; the feature page says which method made it, and the digit neuron is still
    its k = 1 probe (workers/probes.py's paper method is checked against scikit-learn in test_probes.py)."""
    settings, _, corpus = probed
    env = {**os.environ, "NEEDLE_DATABASE_URL": settings.resolved_database_url()}
    args = [sys.executable, "-m", "needle.cli", "probe", NAME, "--features", "text", "--probe-corpus", str(corpus),
            "--probe-tokens", "8192", "--context", "32", "--method", "paper"]
    app = create_app(settings)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        before = http.get(f"/{NAME}/features/contains_digit.json").json()
        assert before["probe_method"] == "needle" and "stratified" in " ".join(before["method"])
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 1 and "--force" in proc.stderr and "paper" in proc.stderr
        proc = subprocess.run(args + ["--force"], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        after = http.get(f"/{NAME}/features/contains_digit.json").json()
        assert after["probe_method"] == "paper" and after["settings"]["method"] == "paper"
        assert "random_state=1" in " ".join(after["method"])
        page = BeautifulSoup(http.get(f"/{NAME}/features/contains_digit").text, "html.parser")
        assert "--method paper" in page.select_one(".probe-method").get_text()
        layer = next(la for la in after["layers"] if la["layer"] == DIGIT_NEURON[0])
        assert layer["best"]["neuron"] == DIGIT_NEURON[1] and layer["best"]["f1"] >= 0.95
