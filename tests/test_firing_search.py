"""Search by what fires: the token search also ranks the units whose top contexts peak on the
token (how many of their top windows have their max on it, then by activation), from an index
built when the examples are written; a unit's page lists the tokens its top contexts peak on.

The detector Llama of tests/test_examples.py (neuron 1/5 fires on "▁house" only) and an SAE
saved by sae_lens on its last MLP, indexed on SQLite and Postgres; every count is checked
against the units' own pages (each top context's token at its max).
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from needle.cli import index_model
from tests.live_server import running_server
from tests.test_examples import CONTEXT, DETECTOR, X_AT, detector  # noqa: F401 - fixtures
from tests.test_sharding import detector_sae

SHOWN = 30


@pytest.fixture
def site(detector, db_url, tmp_path):  # noqa: F811
    from needle.sae import import_folder

    settings = Settings(database_url=db_url)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT, quiet=True)
    folder, _ = detector_sae(detector, tmp_path)
    import_folder(settings, "det", str(folder), sae_name="s", quiet=True)
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield http


def peaks_from_pages(http) -> dict[tuple, Counter]:
    """Each unit's top contexts' max tokens where it fires, read off its page's JSON: {(kind, layer, index): Counter}."""
    model = http.get("/det.json").json()
    units = [("neuron", layer, n, f"/det/{layer}/{n}.json") for layer in range(model["n_layers"])
             for n in range(model["d_mlp"])]
    sae = http.get("/det/sae/s.json").json()
    units += [("latent", sae["layer"], n, f"/det/sae/s/{n}.json") for n in range(sae["d_sae"])]
    out = {}
    for kind, layer, index, path in units:
        page = http.get(path).json()
        peaks = Counter(ex["token_ids"][ex["max_index"]] for ex in page["examples"] if ex["max_activation"] > 0)
        best = {}
        for ex in page["examples"]:
            if ex["max_activation"] > 0:
                t = ex["token_ids"][ex["max_index"]]
                best[t] = max(best.get(t, 0.0), ex["max_activation"])
        out[(kind, layer, index)] = (peaks, best)
        assert [(p["token_id"], p["contexts"]) for p in page["peak_tokens"]] == sorted(
            peaks.items(), key=lambda x: (-x[1], x[0])), "the page lists the tokens its top contexts peak on"
    return out


def test_search_ranks_the_units_whose_top_contexts_peak_on_the_token(site):
    http = site
    pages = peaks_from_pages(http)
    # the detector neuron's top contexts all peak on "▁house": one per window that holds it
    peaks, _ = pages[("neuron", *DETECTOR)]
    assert len(peaks) == 1 and next(iter(peaks.values())) == len(X_AT)
    for query in ("house", "dog", "the"):
        data = http.get(f"/det/search.json?token={query}").json()
        ids = {m["token_id"] for m in data["matches"]}
        assert ids, query
        want = []
        for (kind, layer, index), (peaks, best) in pages.items():
            hits = [(peaks[t], best[t], t) for t in ids if peaks.get(t)]
            if hits:
                count, act, token = max(hits)
                want.append((kind, layer, index, count, act, token))
        want.sort(key=lambda w: (-w[3], -w[4], w[0], w[1]))
        got = data["firing"]
        assert len(got) >= min(len(want), 5) > 0, (query, len(want))
        assert [(u["kind"], u["layer"], u["neuron"] if u["kind"] == "neuron" else u["latent"], u["windows"])
                for u in got] == [w[:4] for w in want[:SHOWN]], query
        for u, w in zip(got, want):
            assert u["activation"] == pytest.approx(w[4], abs=1e-3) and u["token_id"] == w[5]
            assert u["url"] == (f"/det/{w[1]}/{w[2]}" if w[0] == "neuron" else f"/det/sae/s/{w[2]}")
        assert {u["kind"] for u in got} <= {"neuron", "latent"}
    house = http.get("/det/search.json?token=house").json()["firing"]
    assert (house[0]["kind"], house[0]["layer"], house[0]["neuron"]) == ("neuron", *DETECTOR)
    page = http.get("/det/search?token=house").text
    assert 'id="firing"' in page and f'href="/det/{DETECTOR[0]}/{DETECTOR[1]}"' in page
    neuron = http.get(f"/det/{DETECTOR[0]}/{DETECTOR[1]}").text
    assert "They peak on" in neuron and f"×{len(X_AT)}" in neuron


def test_a_model_without_examples_says_so(detector, db_url):  # noqa: F811
    settings = Settings(database_url=db_url)
    index_model(settings, str(detector["path"]), "bare", quiet=True)
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        data = http.get("/bare/search.json?token=house").json()
        assert data["firing"] == [] and data["firing_ready"] is False
        assert "no activation examples yet" in http.get("/bare/search?token=house").text
