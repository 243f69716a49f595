"""`needle export` end to end, on SQLite and Postgres.

A tiny Llama with a neuron that fires on "▁house" only and one that fires on digits is indexed
through the user's code path with a corpus (examples) and the built-in text features (probes).
One vocabulary entry is then renamed to a hostile string, and the corpus holds the tokenizer's
added token "<script>alert(1)</script>" next to every "house". The model is exported by the real
command in both formats; the files are read back (pyarrow, json) and compared with every
neuron's JSON page, the feature pages and the stored arrays (app.queries), with each other, and
with exports of some layers, some parts and small batches. Bad arguments are one clear line,
exit 1 and nothing written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import text

from app import queries
from app.arrays import FLOAT16, FLOAT32, INT16, INT32, unpack
from app.config import Settings
from app.db import engine_for, session_scope
from app.examples import histogram
from app.main import create_app
from app.search import number
from needle.cli import index_model
from needle.export import TABLES, export_model
from tests.live_server import needle_in_process
from tests.tinymodels import SCRIPT_TOKEN, TRAINING_TEXT, build_detector, build_tiny

NAME = "exp"
CONTEXT = 16
HOUSE_NEURON = (1, 5)  # fires on "▁house" only
DIGIT_NEURON = (1, 7)  # fires on the digits only
DIGITS = tuple(f"<0x{0x30 + d:02X}>" for d in range(10))  # the tiny tokenizer spells digits as byte tokens
HOSTILE_AT = (0, 0)  # this neuron's top input token gets the hostile text
# layer 0's neurons 20..31 read along one direction (neuron 20's up_proj row, scaled 1.0, 1.05, ...),
# so they decode to the same top token; only 10 of them can be among its top-10 search hits, and
# `needle index` sweeps no clamp curve for the others
SAME_TOKEN = [(0, n) for n in range(20, 32)]
HOSTILE = '<script>alert("x")</script>\n\t"},{\\ \u202e🐍 ünï'
PER_NEURON = ("decodings", "examples", "probes")


def corpus_text() -> str:
    lines = []
    for i in range(400):
        lines.append(f"item {i * 37 % 1000} costs {i % 90 + 10} coins")
        if i % 3 == 0:
            lines.append(TRAINING_TEXT.splitlines()[i % 10])
        if i % 50 == 7:
            lines.append(f"the house {SCRIPT_TOKEN} is here")
    return "\n".join(lines) + "\n"


def needle(*args: str, db_url: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "NEEDLE_DATABASE_URL": db_url, **(env or {})}
    return subprocess.run([sys.executable, "-m", "needle.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=300, check=False)




def read_parquet(folder: Path, table: str) -> list[dict]:
    return pq.read_table(folder / f"{table}.parquet").to_pylist()


def read_jsonl(folder: Path, table: str) -> list[dict]:
    with open(folder / f"{table}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_all(folder: Path) -> dict[str, list[dict]]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    read = read_parquet if manifest["file_format"] == "parquet" else read_jsonl
    return {name: read(folder, name) for name in manifest["tables"]}


# ---------------------------------------------------------------- fixtures


def share_input_direction(path, neurons: list[tuple[int, int]]) -> None:
    """Give the neurons (all in one layer) the first one's input weights (the up_proj row, which
    decoding reads), each scaled a little more, so they decode to the same tokens at rising scores."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    (layer,) = {layer for layer, _ in neurons}
    up = model.model.layers[layer].mlp.up_proj.weight
    with torch.no_grad():
        row = up[neurons[0][1]].clone()
        for i, (_, neuron) in enumerate(neurons):
            up[neuron] = row * (1.0 + 0.05 * i)
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def indexed(request, tmp_path_factory, _sqlite_template):
    """The model indexed (decodings, examples, probes) into a fresh SQLite or Postgres database,
    with HOSTILE as the text of neuron HOSTILE_AT's top input token."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    if request.param == "sqlite":
        shutil.copy(_sqlite_template, root / "needle.sqlite")
        url = f"sqlite:///{root / 'needle.sqlite'}"
    else:
        url = request.getfixturevalue("pg_databases_module").new()
    path = build_detector(root / "model", {HOUSE_NEURON: "▁house", DIGIT_NEURON: DIGITS})
    share_input_direction(path, SAME_TOKEN)
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    settings = Settings(database_url=url)
    index_model(settings, str(path), NAME, device="cpu", corpus=str(corpus), context=CONTEXT, features=["text"],
                probe_corpus=str(corpus), probe_tokens=4096, quiet=True)
    engine = engine_for(url)
    with session_scope(engine) as s:
        model = queries.get_model(s, NAME)
        hostile_id = queries.get_neuron(s, model.id, *HOSTILE_AT).top_token_id
        s.execute(text("update vocab set token = :t where model_id = :m and token_id = :i"),
                  {"t": HOSTILE, "m": model.id, "i": hostile_id})
    return {"url": url, "settings": settings, "root": root, "path": path, "hostile_id": hostile_id}


@pytest.fixture(scope="module")
def exported(indexed):
    """The whole model exported by the command, once as Parquet and once as JSONL."""
    out = {}
    for fmt in ("parquet", "jsonl"):
        folder = indexed["root"] / f"out-{fmt}"
        proc = needle("export", NAME, "--format", fmt, "--out", str(folder), db_url=indexed["url"])
        assert proc.returncode == 0, proc.stderr
        assert str(folder) in proc.stdout and "decodings" in proc.stdout
        out[fmt] = folder
    return out


@pytest.fixture(scope="module")
def pages(indexed):
    """Every neuron's JSON page, and the features' pages."""
    client = TestClient(create_app(indexed["settings"]))
    neurons = {}
    for layer in range(2):
        for neuron in range(64):
            r = client.get(f"/{NAME}/{layer}/{neuron}.json")
            assert r.status_code == 200, r.text
            neurons[(layer, neuron)] = r.json()
    features = client.get(f"/{NAME}/features.json").json()["features"]
    feature_pages = {f["feature"]: client.get(f"/{NAME}/features/{f['feature']}.json").json() for f in features}
    return {"neurons": neurons, "features": features, "feature_pages": feature_pages}


# ---------------------------------------------------------------- the neuron's JSON


def test_neuron_json_has_decodings_examples_stats_and_features(pages):
    page = pages["neurons"][DIGIT_NEURON]
    assert len(page["input_tokens"]) == 20 and {"token", "token_id", "prob", "score"} <= set(page["input_tokens"][0])
    assert len(page["output_tokens"]["promoted"]) == 10 and len(page["output_tokens"]["suppressed"]) == 10
    assert page["examples"] and page["examples"][0]["max_activation"] > 0
    example = page["examples"][0]
    assert len(example["tokens"]) == len(example["token_ids"]) == len(example["activations"]) == CONTEXT
    assert len(page["interval_samples"]) == 5 and any(b["examples"] for b in page["interval_samples"])
    assert page["stats"]["frequency"] > 0 and page["stats"]["histogram"]["counts"]
    assert {f["feature"] for f in page["features"]} >= {"contains_digit", "all_digits"}


# ---------------------------------------------------------------- clamp curves, from the tables themselves

INDEX_TOP = 10  # `needle index` sweeps each neuron that is a top-10 search hit for its own top token
INDEX_COUNT = 21  # ... with 21 values from -10x to +10x its largest |activation| on the corpus


def sql_rows(url: str, query: str, **params) -> list:
    """A plain SQL query's rows, read straight from the tables (not through app.queries)."""
    engine = engine_for(url)
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def json_column(value):
    """A JSON column as plain SQL reads it: text on SQLite, already decoded by psycopg on Postgres."""
    return json.loads(value) if isinstance(value, str) else value


def int32s(blob) -> list[int]:
    return np.frombuffer(bytes(blob), dtype="<i4").tolist()


def index_clamp_neurons(url: str, model_id: int) -> dict[tuple[int, int], int]:
    """(layer, neuron) -> its top token id, for each neuron among the first INDEX_TOP entries of the
    search index (token_index, best score first) of its own top decoded token (neurons.top_token_id)."""
    own = {(layer, neuron): token for layer, neuron, token in sql_rows(
        url, "select layer, neuron, top_token_id from neurons where model_id = :m", m=model_id)}
    assert len(own) == 2 * 64
    rows = sql_rows(url, "select token_id, layers, neurons, scores from token_index where model_id = :m", m=model_id)
    assert rows
    found = {}
    for token_id, layers, neurons, scores in rows:
        scores = np.frombuffer(bytes(scores), dtype="<f4")
        assert (np.diff(scores) <= 0).all(), f"token {token_id}'s search hits are not best first"
        for key in zip(int32s(layers)[:INDEX_TOP], int32s(neurons)[:INDEX_TOP]):
            if own.get(key) == token_id:
                found[key] = token_id
    return found


def test_index_clamp_curves_are_on_their_neurons_json(indexed, pages):
    """`needle index` stored one clamp curve for each neuron that is a top-10 search hit for its own
    top token, and none for any other; each is on its neuron's JSON as it is in clamp_curves. The
    expectations come from what this test wrote (the corpus) and from the tables read by plain SQL."""
    url = indexed["url"]
    ((model_id, info),) = sql_rows(url, "select id, info from models where name = :n", n=NAME)
    want = index_clamp_neurons(url, model_id)
    assert want
    prompt = json_column(info)["clamp_prompt"]
    assert len(prompt) > 10 and corpus_text().startswith(prompt)  # the default prompt: the corpus's first tokens
    max_abs = {(layer, neuron): max(abs(hi), abs(lo)) for layer, neuron, hi, lo in sql_rows(
        url, "select layer, neuron, max_act, min_act from neuron_activations where model_id = :m", m=model_id)}
    stored: dict[tuple[int, int], list] = {}
    for row in sql_rows(url, "select layer, neuron, prompt, target, token_id, token, note, positions, clamp_values, "
                             "probs, baseline, top_tokens, source from clamp_curves where model_id = :m", m=model_id):
        stored.setdefault((row.layer, row.neuron), []).append(row)
    assert sorted(stored) == sorted(want)
    # both branches: neurons that index swept, and neurons it did not (whose JSON lists no curve)
    assert 0 < len(want) < len(pages["neurons"]), len(want)

    for key, page in pages["neurons"].items():
        curves = page["clamp_curves"]
        if key not in want:
            assert curves == [], key
            continue
        (row,) = stored[key]
        (curve,) = curves
        assert (curve["layer"], curve["neuron"]) == key
        assert curve["token_id"] == row.token_id == want[key], key
        assert (row.prompt, row.positions, row.source, row.note) == (prompt, "all", "index", None), key
        assert row.target == row.token
        assert (curve["prompt"], curve["target"], curve["token"], curve["note"], curve["positions"], curve["source"]) == (
            row.prompt, row.target, row.token, row.note, row.positions, row.source), key
        values, probs = json_column(row.clamp_values), json_column(row.probs)
        assert curve["values"] == values and curve["probs"] == probs, key
        assert curve["baseline"] == json_column(row.baseline) and curve["top_tokens"] == json_column(row.top_tokens)
        assert curve["state"] == "done"
        # 21 values evenly from -b to b, b being 10x the neuron's largest |activation| (to 3 digits)
        assert len(values) == len(probs) == INDEX_COUNT and all(0.0 <= p <= 1.0 for p in probs), key
        bound = values[-1]
        assert values[0] == -bound and bound == pytest.approx(10 * max_abs[key], rel=5e-3), key
        np.testing.assert_allclose(values, np.linspace(-bound, bound, INDEX_COUNT), rtol=0, atol=1e-9 * bound)
        assert {"activation", "prob"} <= set(curve["baseline"])
        assert [t["token_id"] for t in curve["top_tokens"]["high"]]


# ---------------------------------------------------------------- the export as a whole


def test_parquet_and_jsonl_hold_the_same_data(exported):
    parquet, jsonl = read_all(exported["parquet"]), read_all(exported["jsonl"])
    assert set(parquet) == set(jsonl) == set(TABLES)
    for name in TABLES:
        assert parquet[name], name
        assert parquet[name] == jsonl[name], name
    # a Parquet file's columns are the JSONL keys, in the manifest's order
    manifest = json.loads((exported["parquet"] / "manifest.json").read_text())
    for name, table in manifest["tables"].items():
        columns = [c["name"] for c in table["columns"]]
        assert pq.read_schema(exported["parquet"] / table["file"]).names == columns
        assert list(jsonl[name][0]) == columns


def test_manifest_has_the_model_counts_and_format(indexed, exported, pages):
    for fmt, folder in exported.items():
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["format"] == "needle-export" and manifest["version"] == 1 and manifest["file_format"] == fmt
        model = manifest["model"]
        assert (model["name"], model["n_layers"], model["d_mlp"], model["family"]) == (NAME, 2, 64, "llama")
        assert model["source"] == str(indexed["path"])
        assert manifest["layers"] == {"start": 0, "stop": 2}
        assert manifest["what"] == ["decodings", "examples", "probes"]
        data = read_all(folder)
        assert manifest["counts"] == {"neurons": 128, **{name: len(rows) for name, rows in data.items()}}
        assert {t["file"] for t in manifest["tables"].values()} | {"manifest.json"} == {p.name for p in folder.iterdir()}
        assert manifest["examples_run"]["context"] == CONTEXT and manifest["probe_run"]["specs"] == ["text"]
        assert manifest["counts"]["features"] == len(pages["features"])


def test_one_row_per_neuron_in_order(exported):
    data = read_all(exported["parquet"])
    every = [(layer, neuron) for layer in range(2) for neuron in range(64)]
    for name in PER_NEURON:
        assert [(r["layer"], r["neuron"]) for r in data[name]] == every, name


def test_decodings_equal_the_pages_and_the_stored_arrays(indexed, exported, pages):
    rows = {(r["layer"], r["neuron"]): r for r in read_all(exported["parquet"])["decodings"]}
    engine = engine_for(indexed["url"])
    with session_scope(engine) as s:
        model = queries.get_model(s, NAME)
        vocab = dict(queries.vocab_tokens(s, model.id))
        for key, page in pages["neurons"].items():
            row = rows[key]
            assert {"token": row["top_token"], "token_id": row["top_token_id"]} == page["top_token"]
            assert [number(row[k]) for k in ("top_prob", "top_score", "mean_top100")] == [
                page["top_prob"], page["top_score"], page["mean_top100"]]
            assert number(row["entropy"] / np.log(2)) == page["entropy_bits"]
            assert [{"token": t, "token_id": i, "prob": number(p), "score": number(sc)} for t, i, p, sc in zip(
                row["input_tokens"], row["input_token_ids"], row["input_probs"], row["input_scores"])
            ] == page["input_tokens"]
            for side in ("promoted", "suppressed"):
                assert [{"token": t, "token_id": i, "logit": number(v)} for t, i, v in zip(
                    row[f"{side}_tokens"], row[f"{side}_token_ids"], row[f"{side}_logits"])
                ] == page["output_tokens"][side]
            # the stored values exactly, not the page's 6 digits
            stored = queries.get_neuron(s, model.id, *key)
            assert row["input_token_ids"] == unpack(stored.in_ids, INT32).tolist()
            assert row["input_probs"] == unpack(stored.in_probs, FLOAT32).tolist()
            assert row["input_scores"] == unpack(stored.in_scores, FLOAT32).tolist()
            assert row["promoted_logits"] == unpack(stored.out_pos_logits, FLOAT32).tolist()
            assert row["suppressed_token_ids"] == unpack(stored.out_neg_ids, INT32).tolist()
            assert row["top_prob"] == stored.top_prob and row["mean_top100"] == stored.mean_top100
            assert row["input_tokens"] == [vocab[i] for i in row["input_token_ids"]]


def test_examples_equal_the_pages_and_the_stored_arrays(indexed, exported, pages):
    rows = {(r["layer"], r["neuron"]): r for r in read_all(exported["parquet"])["examples"]}

    def as_page(e: dict) -> dict:
        return {"tokens": e["tokens"], "token_ids": e["token_ids"], "activations": [round(a, 4) for a in e["activations"]],
                "max_activation": round(e["max_activation"], 4), "max_index": e["max_index"], "source": e["source"],
                "window": e["window"]}

    shown = negatives = 0
    for key, page in pages["neurons"].items():
        row = rows[key]
        assert [as_page(e) for e in row["examples"]] == page["examples"], key
        firing = sum(b["tokens"] for b in row["interval_samples"])
        assert [
            {"bin": [round(b["low"], 4), round(b["high"], 4)], "share": round(b["tokens"] / firing, 6) if firing else 0.0,
             "tokens": b["tokens"], "examples": [as_page(e) for e in b["examples"]]}
            for b in row["interval_samples"]
        ] == page["interval_samples"], key
        stats = {k: row[k] for k in ("tokens", "frequency", "frequency_above", "threshold", "silent", "mean", "std",
                                     "min", "max")}
        hist = histogram(np.array(row["histogram_edges"], np.float32), np.array(row["histogram_counts"]),
                         row["min"], row["max"])
        derived = ("firing_frequency", "firing_rule", "firing_relative")  # the page's reading of the stored figures
        assert {**stats, "histogram": hist} == {k: v for k, v in page["stats"].items() if k not in derived}, key
        assert page["stats"]["firing_frequency"] == row["frequency_above"], "a SiLU model's neurons: above 1/5 of the max"
        shown += len(row["examples"])
        # a gated MLP's neuron: its top negative contexts, as the page shows them
        assert [{**as_page({**e, "max_activation": e["min_activation"], "max_index": e["min_index"]}),
                 } for e in row["negative_examples"]] == [
            {**{k: v for k, v in e.items() if not k.startswith("min_")}, "max_activation": e["min_activation"],
             "max_index": e["min_index"]} for e in page["negative_examples"]], key
        negatives += len(row["negative_examples"])
    assert shown > 128  # most neurons have examples to compare
    assert negatives > 64 and all(e["min_activation"] < 0 for r in rows.values() for e in r["negative_examples"])

    # the stored float16 activations exactly, for the neurons that fire on one thing
    with session_scope(engine_for(indexed["url"])) as s:
        model = queries.get_model(s, NAME)
        for key in (HOUSE_NEURON, DIGIT_NEURON):
            stored = queries.neuron_activations(s, model.id, *key)
            windows = unpack(stored.top_windows, INT32)
            acts = unpack(stored.top_acts, FLOAT16).astype(np.float32).reshape(len(windows), CONTEXT)
            kept = [k for k, w in enumerate(windows) if w >= 0]
            assert [e["window"] for e in rows[key]["examples"]] == windows[kept].tolist()
            assert [e["activations"] for e in rows[key]["examples"]] == acts[kept].tolist()
            assert [e["max_index"] for e in rows[key]["examples"]] == unpack(stored.top_pos, INT16)[kept].tolist()
            assert [e["max_activation"] for e in rows[key]["examples"]] == unpack(stored.top_max, FLOAT32)[kept].tolist()
            assert rows[key]["histogram_counts"] == np.frombuffer(stored.hist_counts, "<i8").tolist()


def test_probes_equal_the_neuron_and_feature_pages(exported, pages):
    data = read_all(exported["parquet"])
    probes = {(r["layer"], r["neuron"]): r["features"] for r in data["probes"]}
    members = 0
    derived = ("url", "chance_f1", "f1_interval")  # the page's, from the stored numbers and counts (test_baselines)
    for key, page in pages["neurons"].items():
        assert [{k: v for k, v in f.items() if k not in derived} for f in page["features"]] == [
            {"feature": f["feature"], "rank": f["rank"], "mean_dif": number(f["mean_dif"]), "f1": number(f["f1"]),
             "precision": number(f["precision"]), "recall": number(f["recall"])} for f in probes[key]], key
        members += len(probes[key])
    assert members > 0
    assert probes[DIGIT_NEURON][0]["rank"] == 1 and probes[DIGIT_NEURON][0]["f1"] >= 0.9

    features = {f["feature"]: f for f in data["features"]}
    assert sorted(features) == sorted(f["feature"] for f in pages["features"])
    for listed in pages["features"]:
        f = features[listed["feature"]]
        assert (f["kind"], f["status"], f["reason"], f["description"]) == (
            listed["kind"], listed["status"], listed["reason"], listed["description"])
        counts = {k: f[k] for k in ("train_pos", "train_neg", "test_pos", "test_neg") if f[k] is not None}
        assert counts == listed["counts"]
        best = listed["best"]
        assert (f["best_layer"], f["best_neuron"], number(f["best_f1"]) if f["best_f1"] is not None else None) == (
            (best["layer"], best["neuron"], best["f1"]) if best else (None, None, None))

    layers = {(r["feature"], r["layer"]): r for r in data["feature_layers"]}
    compared = 0
    for name, page in pages["feature_pages"].items():
        for entry in page["layers"]:
            row = layers.pop((name, entry["layer"]))
            assert (row["best_neuron"], number(row["best_f1"]), number(row["best_precision"]),
                    number(row["best_recall"])) == (entry["best"]["neuron"], entry["best"]["f1"],
                                                    entry["best"]["precision"], entry["best"]["recall"])
            assert [{k: v for k, v in t.items() if k != "url"} for t in entry["top_neurons"]] == [
                {k: v for k, v in t.items() if k != "rank"} for t in row["top_neurons"]]
            assert [t["rank"] for t in row["top_neurons"]] == list(range(1, len(row["top_neurons"]) + 1))
            assert row["curve"] == entry["curve"] and row["pruned_curve"] == entry["pruned_curve"]
            compared += 1
    assert compared > 0 and not layers  # every exported feature layer is on a feature page


def test_token_strings_survive_hostile_and_odd_tokens(indexed, exported, pages):
    for folder in exported.values():
        data = read_all(folder)
        row = next(r for r in data["decodings"] if (r["layer"], r["neuron"]) == HOSTILE_AT)
        assert row["top_token"] == HOSTILE and row["input_tokens"][0] == HOSTILE
        assert row["top_token_id"] == indexed["hostile_id"]
        assert pages["neurons"][HOSTILE_AT]["top_token"]["token"] == HOSTILE
        # the added token next to every "house" is one token, in the house neuron's windows
        house = next(r for r in data["examples"] if (r["layer"], r["neuron"]) == HOUSE_NEURON)
        firing = [e for e in house["examples"] if e["max_activation"] > 0]
        assert any(SCRIPT_TOKEN in e["tokens"] for e in firing)
        assert all(e["tokens"][e["max_index"]] == " house" for e in firing)
        newline = [t for r in data["examples"] for e in r["examples"] for t in e["tokens"] if t == "\n"]
        assert newline, "the corpus's line breaks are tokens"
    # every JSONL line is strict JSON (no NaN), one object per line, in UTF-8
    raw = (exported["jsonl"] / "decodings.jsonl").read_bytes()
    raw.decode("utf-8")
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 129
    for line in lines[:-1]:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSONL"))


# ---------------------------------------------------------------- parts of a model, batches


def test_layers_and_what_export_part_of_the_model(indexed, exported, tmp_path):
    full = read_all(exported["parquet"])
    for layers, expect in (("1:2", [1]), ("1", [1]), (":1", [0]), ("0:", [0, 1])):
        folder = tmp_path / f"part-{layers.replace(':', '_')}"
        proc = needle("export", NAME, "--format", "jsonl", "--out", str(folder), "--what", "probes, decodings",
                      "--layers", layers, db_url=indexed["url"])
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["what"] == ["decodings", "probes"]
        assert manifest["layers"] == {"start": expect[0], "stop": expect[-1] + 1}
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["decodings.jsonl", "probes.jsonl", "features.jsonl", "feature_layers.jsonl", "manifest.json"])
        part = read_all(folder)
        for name in ("decodings", "probes", "feature_layers"):
            assert part[name] == [r for r in full[name] if r["layer"] in expect], (layers, name)
        assert len(part["decodings"]) == 64 * len(expect) == manifest["counts"]["decodings"]
        assert part["features"] == full["features"]  # model-wide
        assert manifest["examples_run"] is None


def test_batches_change_nothing_and_are_parquet_row_groups(indexed, exported, tmp_path):
    full = {fmt: read_all(folder) for fmt, folder in exported.items()}
    for fmt in ("parquet", "jsonl"):
        folder = tmp_path / fmt
        export_model(indexed["settings"], NAME, fmt=fmt, out=folder, batch_neurons=7, progress=False)
        assert read_all(folder) == full[fmt]
    for name in PER_NEURON:
        # 64 neurons in batches of 7: 10 row groups per layer
        assert pq.ParquetFile(tmp_path / "parquet" / f"{name}.parquet").metadata.num_row_groups == 20, name
    assert pq.ParquetFile(exported["parquet"] / "examples.parquet").metadata.num_row_groups == 2  # a layer each


# ---------------------------------------------------------------- bad input


def assert_clear_error(proc, *phrases):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) >= 2 and lines[1].startswith("  "), proc.stderr
    for phrase in phrases:
        assert phrase.lower() in proc.stderr.lower(), (phrase, proc.stderr)


@pytest.mark.parametrize("args, phrases", [
    (["nobody", "--format", "jsonl"], ["no model named 'nobody'", "models here:", NAME]),
    ([NAME, "--format", "xml"], ["--format 'xml'", "--format jsonl"]),
    ([NAME, "--format", "jsonl", "--what", "decodings,nope"], ["'nope'", "decodings, examples, probes"]),
    ([NAME, "--format", "jsonl", "--what", ""], ["names nothing", "decodings, examples, probes"]),
    ([NAME, "--format", "parquet", "--layers", "1:1"], ["is empty", "A:B"]),
    ([NAME, "--format", "jsonl", "--layers", "0:3"], ["goes past", "0 to 1", "--layers 0:2"]),
    ([NAME, "--format", "jsonl", "--layers", "2"], ["goes past"]),
    ([NAME, "--format", "jsonl", "--layers", "a:b"], ["not a layer range", "A:B"]),
    ([NAME, "--format", "jsonl", "--layers=-1:2"], ["not a layer range"]),
    ([NAME, "--format", "jsonl", "--layers", "-1:2"], ["--layers '-1:2' is not a layer range"]),  # not argparse's error
    ([NAME, "--format", "jsonl", "--layers", "-1"], ["--layers '-1' is not a layer range"]),
    ([NAME, "--format", "jsonl", "--layers", "0:1:2"], ["not a layer range"]),
])
def test_bad_arguments_are_one_clear_error_and_write_nothing(indexed, tmp_path, capsys, monkeypatch, args, phrases):
    out = tmp_path / "out"
    proc = needle_in_process("export", *args, "--out", str(out), db_url=indexed["url"], capsys=capsys,
                             monkeypatch=monkeypatch)
    assert_clear_error(proc, *phrases)
    assert not out.exists()


@pytest.mark.parametrize("out", ["/proc/needle-nope", "FILE/sub/out", "/sys/kernel/needle-nope"])
def test_an_out_that_cannot_be_written_is_a_clear_error(indexed, tmp_path, capsys, monkeypatch, out):
    """/proc and /sys take no new folders; a regular file has none under it."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out = out.replace("FILE", str(file))
    proc = needle_in_process("export", NAME, "--format", "jsonl", "--out", out, db_url=indexed["url"], capsys=capsys,
                             monkeypatch=monkeypatch)
    assert_clear_error(proc, f"cannot write to --out '{out}'", "a folder you can write to")
    assert not Path(out).exists() and file.read_text() == "mine"


def test_missing_parts_are_a_clear_error(indexed, tmp_path):
    """A model indexed without a corpus or features has no examples or probes to export."""
    out = tmp_path / "out"
    proc = needle("export", "bare", "--format", "jsonl", "--out", str(out), db_url=indexed["url"])
    assert_clear_error(proc, "no model named 'bare'", "models here:", NAME)  # as a real process prints it
    bare = build_tiny("gpt2", tmp_path / "gpt2")
    index_model(indexed["settings"], str(bare), "bare", quiet=True)
    for what, phrase in (("examples", "--corpus"), ("probes,decodings", "needle probe bare")):
        proc = needle("export", "bare", "--format", "jsonl", "--out", str(out), "--what", what, db_url=indexed["url"])
        assert_clear_error(proc, "has no", phrase)
        assert not out.exists()
    # by default, what it has
    proc = needle("export", "bare", "--format", "jsonl", "--out", str(out), db_url=indexed["url"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["decodings.jsonl", "manifest.json"]
    assert len(read_jsonl(out, "decodings")) == 2 * 64


def test_a_non_empty_out_needs_force_and_force_keeps_other_files(indexed, exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = needle("export", NAME, "--format", "jsonl", "--out", str(out), db_url=indexed["url"])
    assert_clear_error(proc, "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    file = out / "notes.txt"
    proc = needle("export", NAME, "--format", "jsonl", "--out", str(file), db_url=indexed["url"])
    assert_clear_error(proc, "is a file")
    assert file.read_text() == "mine"

    proc = needle("export", NAME, "--format", "jsonl", "--out", str(out), "--force", db_url=indexed["url"])
    assert proc.returncode == 0, proc.stderr
    assert read_all(out) == read_all(exported["jsonl"])
    # an export in the other format replaces this one's files; the user's file stays
    proc = needle("export", NAME, "--format", "parquet", "--out", str(out), "--force", "--what", "decodings",
                  db_url=indexed["url"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["decodings.parquet", "manifest.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert read_parquet(out, "decodings") == read_all(exported["parquet"])["decodings"]


def test_parquet_without_pyarrow_says_how_to_get_it_and_jsonl_works(indexed, exported, tmp_path):
    blocker = tmp_path / "blocker" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = needle("export", NAME, "--format", "parquet", "--out", str(out), db_url=indexed["url"], env=env)
    assert_clear_error(proc, "pyarrow", "pip install 'needle[export]'", "--format jsonl")
    assert not out.exists()
    proc = needle("export", NAME, "--format", "jsonl", "--out", str(out), db_url=indexed["url"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert read_all(out) == read_all(exported["jsonl"])


def test_a_failed_export_leaves_nothing(indexed, tmp_path, monkeypatch):
    """An error while writing (here: the examples) removes what was written, and the folder it made."""
    from needle import export

    def broken(*args, **kwargs):
        yield from ()
        raise RuntimeError("disk full")

    monkeypatch.setitem(export.ROWS, "examples", broken)
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(indexed["settings"], NAME, fmt="parquet", out=out, progress=False)
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        export_model(indexed["settings"], NAME, fmt="jsonl", out=kept, force=True, progress=False)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_values_that_are_not_finite_are_null_in_both_formats():
    """A non-finite stored value (an activation beyond float16) is null: JSONL stays strict JSON."""
    import pyarrow as pa

    from needle.export import _arrow_floats, _floats

    arr = np.array([[1.5, np.inf], [-np.inf, np.nan]], np.float32)
    assert _floats(arr) == [[1.5, None], [None, None]]
    assert _arrow_floats(pa, arr.ravel(), pa.float32()).to_pylist() == [1.5, None, None, None]
    assert all(isinstance(v, float) and math.isfinite(v) for v in _floats(np.array([0.1, 2.0], np.float32)))


def test_a_mlp_that_is_not_gated_has_no_negative_examples_in_either_format(tmp_path, sqlite_url):
    """GPT-2's neurons (GELU): examples exported, their negative_examples null (none were read), in
    Parquet and JSONL alike; the gated model above has them."""
    path = build_tiny("gpt2", tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text()[:4000], encoding="utf-8")
    index_model(Settings(database_url=sqlite_url), str(path), "g", device="cpu", corpus=str(corpus), context=CONTEXT,
                clamp=False, quiet=True)
    for fmt in ("parquet", "jsonl"):
        folder = tmp_path / fmt
        proc = needle("export", "g", "--format", fmt, "--out", str(folder), "--what", "examples", db_url=sqlite_url)
        assert proc.returncode == 0, proc.stderr
        rows = read_all(folder)["examples"]
        assert len(rows) == 2 * 64 and sum(len(r["examples"]) for r in rows) > 64
        assert all(r["negative_examples"] is None for r in rows), fmt
