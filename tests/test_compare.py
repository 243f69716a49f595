"""Two models compared (`needle compare`, /-/compare/{a}/{b}): a tiny Llama against a copy of itself
(100% agreement, cosine 1 everywhere) and against a copy whose neuron 1/7 got new input weights
(it leads the changed lists), every figure checked against the weights read here with
transformers; models of different sizes probed on the same features compare by feature. Real
worker jobs, real HTTP, SQLite and Postgres."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
import torch
from bs4 import BeautifulSoup

from app.config import Settings
from app.errors import NeedleError
from app.main import create_app
from needle.cli import index_model
from needle.compare import compare_models
from tests.live_server import running_server
from tests.test_probing import DIGIT_NEURON, DIGITS, digit_corpus
from tests.tinymodels import build_detector, build_tiny, tiny_tokenizer

EDITED = (1, 7)


def _edited_copy(src, dst, seed: int = 1):
    """A copy of the model at src whose neuron EDITED reads new input weights (its up_proj row)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    layer, neuron = EDITED
    with torch.no_grad():
        row = model.model.layers[layer].mlp.up_proj.weight[neuron]
        row.copy_(torch.randn(row.shape, generator=gen) * row.norm() / row.numel() ** 0.5)
    model.save_pretrained(dst)
    return dst


def _weights(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return [b.mlp.up_proj.weight.detach() for b in model.model.layers], model.lm_head.weight.detach()


def direct(path_a, path_b) -> tuple[list[list[bool]], list[torch.Tensor]]:
    """Per layer: whether each neuron's top decoded token (argmax of W_U . w_in) is the same, and the
    cosine of its input weights in the two models, computed here from the weights."""
    (wa, ua), (wb, ub) = _weights(path_a), _weights(path_b)
    same, cos = [], []
    for la, lb in zip(wa, wb, strict=True):
        same.append(((la @ ua.T).argmax(1) == (lb @ ub.T).argmax(1)).tolist())
        cos.append(torch.nn.functional.cosine_similarity(la, lb, dim=1))
    return same, cos


@pytest.fixture
def three(db_url, tmp_path):
    base = build_tiny("llama", tmp_path / "base", seed=0)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    edited = _edited_copy(base, tmp_path / "edited")
    settings = Settings(database_url=db_url)
    for name, path in (("base", base), ("copy", copy), ("edited", edited)):
        index_model(settings, str(path), name, device="cpu", clamp=False, quiet=True)
    return settings, base, copy, edited


def test_a_copy_agrees_everywhere_and_an_edited_neuron_leads_the_changed_lists(three):
    settings, base, copy, edited = three
    data = compare_models(settings, "base", "copy", quiet=True)
    assert data["state"] == "done" and data["comparable"]
    assert data["agreement"] == 1.0 and data["same"] == data["neurons"] == 2 * 64
    assert [la["agreement"] for la in data["layers"]] == [1.0, 1.0]
    assert data["unchanged"] == 2 * 64 and data["changed"] == data["changed_tokens"] == []

    data = compare_models(settings, "base", "edited", quiet=True)
    same, cos = direct(base, edited)
    flat = [s for layer in same for s in layer]
    assert data["same"] == sum(flat) and data["agreement"] == pytest.approx(sum(flat) / len(flat), abs=1e-6)
    for la, s in zip(data["layers"], same, strict=True):
        assert la["agreement"] == pytest.approx(sum(s) / len(s), abs=1e-6)
    lead = data["changed"][0]
    assert (lead["layer"], lead["neuron"]) == EDITED
    assert lead["cosine"] == pytest.approx(float(cos[EDITED[0]][EDITED[1]]), abs=1e-5)
    assert lead["cosine"] < 0.5, "new random weights are far from the old"
    assert len(data["changed"]) == 1 and data["unchanged"] == 2 * 64 - 1, "every other neuron is as it was"
    assert data["changed_tokens"] == data["changed"] and lead["overlap"] < 10
    # the lists name the neuron's top tokens in each model, as its own pages do
    assert lead["a_tokens"] != lead["b_tokens"]
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        page_a = http.get(f"/base/{EDITED[0]}/{EDITED[1]}.json").json()
        page_b = http.get(f"/edited/{EDITED[0]}/{EDITED[1]}.json").json()
        assert [t["token_id"] for t in lead["a_tokens"]] == [t["token_id"] for t in page_a["input_tokens"][:5]]
        assert [t["token_id"] for t in lead["b_tokens"]] == [t["token_id"] for t in page_b["input_tokens"][:5]]

        # the page and its JSON are the CLI's data
        assert http.get("/-/compare/base/edited.json").json() == data
        page = BeautifulSoup(http.get("/-/compare/base/edited").text, "html.parser")
        assert page.select_one(".agreement").text == f"{100 * data['agreement']:.1f}%"
        assert len(page.select("table.compare-layers tbody tr")) == 2
        first = page.select_one("#changed tbody tr a")
        assert first.text == f"{EDITED[0]}/{EDITED[1]}" and first["href"] == f"/-/compare/base/edited/{EDITED[0]}/{EDITED[1]}"

        # one neuron side by side: the figures, both cards
        unit = http.get(first["href"] + ".json").json()
        assert unit["cosine"] == lead["cosine"] and unit["overlap"] == lead["overlap"] and unit["same_top"] == lead["same_top"]
        assert [t["token_id"] for t in unit["sides"][0]["tokens"]] == [t["token_id"] for t in page_a["input_tokens"][:10]]
        assert [t["token_id"] for t in unit["sides"][1]["tokens"]] == [t["token_id"] for t in page_b["input_tokens"][:10]]
        side = BeautifulSoup(http.get(first["href"]).text, "html.parser")
        cards = side.select(".side-by-side article.neuron-card")
        assert [c.select_one("h1 a")["href"] for c in cards] == ["/base/1/7", "/edited/1/7"]
        for card, page_data in zip(cards, (page_a, page_b), strict=True):
            assert [t["title"] for t in card.select(".card-tokens code.tok")] == [
                f"token id {t['token_id']}" for t in page_data["input_tokens"][:10]]
            # the same markup as the unit's own embed card
            embed = BeautifulSoup(http.get(card.select_one("h1 a")["href"] + "?embed=true").text, "html.parser")
            assert str(embed.select_one(".card-tokens")) == str(card.select_one(".card-tokens"))

        # not computed the other way round yet: the page says how
        other = http.get("/-/compare/edited/base.json").json()
        assert other["state"] == "not computed" and other["agreement"] is None
        assert "needle compare edited base" in http.get("/-/compare/edited/base").text


def test_a_model_indexed_again_marks_its_comparison_stale(three):
    settings, base, _, edited = three
    compare_models(settings, "base", "edited", quiet=True)
    index_model(settings, str(edited), "edited", device="cpu", clamp=False, force=True, quiet=True)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/-/compare/base/edited.json").json()["stale"] is True
        assert "indexed again" in http.get("/-/compare/base/edited").text
    assert compare_models(settings, "base", "edited", quiet=True)["stale"] is False


def test_what_cannot_be_compared_is_named(three, tmp_path):
    settings, base, _, _ = three
    index_model(settings, str(base), "normed", device="cpu", clamp=False, decode_norm="final", quiet=True)
    with pytest.raises(NeedleError) as err:
        compare_models(settings, "base", "normed", quiet=True)
    assert "--decode-norm none" in err.value.message and "--decode-norm final" in err.value.message
    with pytest.raises(NeedleError, match="Both models are 'base'"):
        compare_models(settings, "base", "base", quiet=True)
    with pytest.raises(NeedleError, match="no model named 'nope'"):
        compare_models(settings, "base", "nope", quiet=True)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        data = http.get("/-/compare/base/normed.json").json()
        assert data["state"] == "not comparable" and any("decode-norm" in d for d in data["differences"])
        missing = http.get("/-/compare/base/nope")
        assert missing.status_code == 404 and "no model named" in missing.text
        for path in ("/-/compare/base/base", "/-/compare/base/base.json", "/-/compare/base/base/0/0"):
            same = http.get(path)
            assert same.status_code == 400 and "Both models are" in same.text and "base" in same.text, path
        side = http.get("/-/compare/base/normed/0/0")
        assert side.status_code == 404 and "decode-norm" in side.text
        for path in ("/-/compare/base/copy/2/0", "/-/compare/base/copy/0/64", "/-/compare/base/copy/x/0"):
            assert http.get(path).status_code == 404, path
        assert http.get("/-/compare/base/copy/0/63.json").json()["computed"] is False

    # the command line says the same, and exits 1 without a stack trace
    proc = subprocess.run([sys.executable, "-m", "needle.cli", "compare", "base", "normed"], capture_output=True,
                          text=True, env={**settings_env(settings)}, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot be compared neuron by neuron" in proc.stderr and "decode-norm" in proc.stderr


def settings_env(settings: Settings) -> dict:
    import os

    return {**os.environ, "NEEDLE_DATABASE_URL": settings.database_url}


def _wider(src, dst, d_mlp: int = 128):
    """The detector model at src with d_mlp neurons per layer: its neurons first, the rest new and small."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    small = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = small.config
    config.intermediate_size = d_mlp
    torch.manual_seed(2)
    wide = LlamaForCausalLM(config)
    state = small.state_dict()
    with torch.no_grad():
        for name, tensor in wide.state_dict().items():
            old = state[name]
            if tensor.shape == old.shape:
                tensor.copy_(old)
            else:
                tensor.mul_(0.01)
                tensor[tuple(slice(0, n) for n in old.shape)] = old
    shutil.copytree(src, dst)
    wide.save_pretrained(dst)
    return dst


@pytest.fixture
def sizes(db_url, tmp_path):
    tok = tiny_tokenizer("sentencepiece")
    pieces = tuple(p for p in DIGITS if tok.convert_tokens_to_ids(p) != tok.unk_token_id)
    small = build_detector(tmp_path / "small", {DIGIT_NEURON: pieces})
    wide = _wider(small, tmp_path / "wide")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(digit_corpus(), encoding="utf-8")
    settings = Settings(database_url=db_url)
    for name, path in (("small", small), ("wide", wide)):
        index_model(settings, str(path), name, device="cpu", features=["text"], probe_corpus=str(corpus),
                    probe_tokens=8192, context=32, clamp=False, quiet=True)
    return settings


def test_models_of_different_sizes_compare_by_feature(sizes):
    settings = sizes
    data = compare_models(settings, "small", "wide", quiet=True)
    assert data["state"] == "not comparable"
    assert data["differences"] == ["neurons per layer: small has 64, wide has 128"]
    rows = {r["feature"]: r for r in data["features"]["rows"]}
    assert "contains_digit" in rows
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for side, name in (("a", "small"), ("b", "wide")):
            for feature, row in rows.items():
                page = http.get(f"/{name}/features/{feature}.json").json()
                figures = row[side]
                best = page["best"]
                assert figures["best_f1"] == best["f1"] and figures["best_url"] == best["url"]
                assert (figures["best_layer"], figures["best_neuron"]) == (best["layer"], best["neuron"])
                points = [(p["k"], p["f1"], la["layer"]) for la in page["layers"] for p in la["curve"]]
                top = max(f1 for _, f1, _ in points)
                k90 = min((k, layer) for k, f1, layer in points if f1 >= 0.9 * top)
                assert figures["sparse_f1"] == pytest.approx(top, rel=1e-5)
                assert (figures["k90"], figures["k90_layer"]) == k90
        # the digit neuron is the best single neuron in both, at the same place
        digit = rows["contains_digit"]
        assert (digit["a"]["best_layer"], digit["a"]["best_neuron"]) == DIGIT_NEURON
        assert (digit["b"]["best_layer"], digit["b"]["best_neuron"]) == DIGIT_NEURON
        assert digit["a"]["k90"] == 1 and digit["b"]["k90"] == 1
        assert http.get("/-/compare/small/wide.json").json() == data
        page = BeautifulSoup(http.get("/-/compare/small/wide").text, "html.parser")
        assert "neurons per layer: small has 64, wide has 128" in page.select_one("#neurons").text
        assert len(page.select("table.compare-features tbody tr")) == len(rows)
        side = http.get("/-/compare/small/wide/1/7")
        assert side.status_code == 404 and "neurons per layer" in side.text
    out = subprocess.run([sys.executable, "-m", "needle.cli", "compare", "small", "wide", "--json"], capture_output=True,
                         text=True, env=settings_env(settings), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == data

    # a stored curve with points that are not points breaks neither the table nor the page
    from sqlalchemy import select, update

    from app.db import engine_for
    from app.schema import FeatureLayer, Model

    with engine_for(settings.database_url).begin() as c:
        wide = c.execute(select(Model.id).where(Model.name == "wide")).scalar_one()
        c.execute(update(FeatureLayer).where(FeatureLayer.model_id == wide, FeatureLayer.feature == "contains_digit")
                  .values(curve=[{"f1": 0.99}, "x", {"k": 3, "f1": None}, {"k": 1, "f1": 0.5}]))
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        broken = http.get("/-/compare/small/wide.json").json()
        digit = next(r for r in broken["features"]["rows"] if r["feature"] == "contains_digit")
        assert (digit["b"]["sparse_f1"], digit["b"]["k90"]) == (0.5, 1)
        assert http.get("/-/compare/small/wide").status_code == 200


def test_a_broken_stored_comparison_breaks_no_page(three):
    from sqlalchemy import update

    from app.db import engine_for, session_scope
    from app.schema import Comparison

    settings, _, _, _ = three
    compare_models(settings, "base", "copy", quiet=True)
    with session_scope(engine_for(settings.database_url)) as s:
        s.execute(update(Comparison).values(cosine=b"\x00\x01\x02", info=None))
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        data = http.get("/-/compare/base/copy.json").json()
        assert data["state"] == "broken" and data["agreement"] is None and "needle compare" in data["error"]
        page = http.get("/-/compare/base/copy")
        assert page.status_code == 200 and "cannot be shown" in page.text
        unit = http.get("/-/compare/base/copy/0/0.json")
        assert unit.status_code == 200 and unit.json()["computed"] is False
    # computing it again mends it
    assert compare_models(settings, "base", "copy", quiet=True)["agreement"] == 1.0
