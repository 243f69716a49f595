"""Getting around: breadcrumbs, the jump box, random neurons, the copy-permalink button, Open
Graph tags, the embeddable neuron card, the search page's score-by-layer strip, the plots'
accessibility and static/needle.js, over real HTTP against a real server and database (SQLite
and Postgres) filled with a synthetic model. What the keys and the clipboard do in a browser is
tested with Playwright (tests/test_browser.py); here, the markup those rely on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from bs4 import BeautifulSoup
from sqlalchemy import delete

from app import plots, queries, urls
from app.arrays import FLOAT16, FLOAT32, INT16, INT32, INT64, pack
from app.config import Settings
from app.db import engine_for, session_scope
from app.main import create_app
from app.schema import Neuron
from tests.live_server import get_json, get_soup, running_server
from tests.synthetic import HOSTILE, Synthetic, add_jobs, fill_synthetic

MODEL = "nav-0.5m"
N_LAYERS, D_MLP, CONTEXT = 4, 30, 6
VOCAB = ["<unk>", "dog", " dog", "Dog", "cat", " cat", "hot", " the", "\n", HOSTILE] + [f"w{i}" for i in range(20)]
PLANTED = {(0, 0): HOSTILE, (1, 3): " dog", (2, 5): "dog"}
NEURON_PATH = re.compile(rf"^/{re.escape(MODEL)}/(\d+)/(\d+)$")
FEATURE = "is_dog"
PUBLIC = "https://needle.example.org"


@dataclass
class Site:
    http: httpx.Client
    base: str
    syn: Synthetic
    engine: object
    ids: dict

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def soup(self, path: str, **kwargs) -> BeautifulSoup:
        return get_soup(self.http, path, **kwargs)

    def json(self, path: str) -> dict:
        return get_json(self.http, path)


def _activations(layer: int, neuron: int, windows: list[int], rng) -> dict:
    """A neuron_activations row as workers/store.py writes it: top windows best first, interval
    samples, statistics and a histogram."""
    top_acts = rng.uniform(-1, 2, size=(len(windows), CONTEXT))
    top_acts[np.arange(len(windows)), np.arange(len(windows)) % CONTEXT] = np.linspace(5, 3, len(windows))
    bins = 5
    int_acts = rng.uniform(0, 3, size=(bins, 1, CONTEXT))
    return {
        "layer": layer, "neuron": neuron, "tokens": 1000, "frequency": 0.25, "frequency_above": 0.05,
        "threshold": 1.0, "mean": 0.3, "std": 0.9, "min_act": -1.0, "max_act": 5.0,
        "top_windows": pack(windows, INT32), "top_max": pack(top_acts.max(axis=1), FLOAT32),
        "top_pos": pack(top_acts.argmax(axis=1), INT16), "top_acts": pack(top_acts, FLOAT16),
        "int_windows": pack([windows[b % len(windows)] for b in range(bins)], INT32),
        "int_max": pack(int_acts.max(axis=2), FLOAT32), "int_pos": pack(int_acts.argmax(axis=2), INT16),
        "int_acts": pack(int_acts, FLOAT16), "int_edges": pack(np.linspace(0, 5, bins + 1), FLOAT32),
        "int_counts": pack([100, 60, 40, 30, 20], INT64),
        "hist_edges": pack(np.linspace(-1, 5, 13), FLOAT32),
        "hist_counts": pack([10, 40, 500, 200, 100, 60, 40, 20, 15, 10, 4, 1], INT64),
    }


def fill_everything(engine, syn: Synthetic) -> dict:
    """Examples for every neuron, a probed feature, a clamp curve and a generation of neuron 1/3."""
    rng = np.random.default_rng(3)
    t = syn.token_id
    windows = [[t(" the"), t(" dog"), t("w1"), t("w2"), t(" dog"), t("\n")],
               [t("hot"), t("dog"), t(" cat"), t(HOSTILE), t("w3"), t("w4")],
               [t("Dog"), t("w5"), t(" dog"), t("w6"), t("w7"), t("w8")],
               [t("w9"), t("w10"), t(" the"), t(" dog"), t("w11"), t("w12")]]
    with session_scope(engine) as s:
        queries.replace_examples(
            s, syn.model_id,
            {"corpus": "synthetic", "description": "four windows", "context": CONTEXT, "n_windows": len(windows),
             "n_tokens": 1000, "n_documents": 1, "bos_prefix": False,
             "settings": {"top_k": 4, "bins": 5, "per_bin": 1, "estimate_windows": 4, "hist_bins": 12}},
            [{"window": w, "source": f"doc{w}.txt", "token_ids": pack(ids, INT32)} for w, ids in enumerate(windows)],
            [_activations(layer, neuron, list(range(len(windows))), rng)
             for layer in range(syn.top_scores.shape[0]) for neuron in range(syn.top_scores.shape[1])],
        )
        queries.replace_probes(
            s, syn.model_id, {"specs": ["synthetic"], "description": "a feature", "settings": {}},
            [{"name": FEATURE, "kind": "token", "aggregation": "none", "source": "synthetic", "description": "dogs",
              "counts": {"train_pos": 30, "train_neg": 70}, "status": "probed", "reason": None,
              "best_layer": 1, "best_neuron": 3, "best_f1": 0.9}],
            [{"feature": FEATURE, "layer": 1, "best_neuron": 3, "best_f1": 0.9, "best_precision": 0.8,
              "best_recall": 0.95, "top_neurons": [{"neuron": 3, "mean_dif": 1.0, "f1": 0.9, "precision": 0.8,
                                                    "recall": 0.95}],
              "curve": [{"k": 1, "f1": 0.9}, {"k": 2, "f1": 0.92}], "pruned_curve": [{"k": 1, "f1": 0.9}]}],
            [{"layer": 1, "neuron": 3, "feature": FEATURE, "rank": 0, "mean_dif": 1.0, "f1": 0.9, "precision": 0.8,
              "recall": 0.95}],
        )
        top = [{"token": " dog", "token_id": t(" dog"), "prob": 0.5}]
        curve = queries.add_clamp_curve(
            s, syn.model_id, 1, 3, prompt="The", target=" dog", positions="all", values=[-2.0, 0.0, 2.0, 4.0],
            source="cli", result={"token_id": t(" dog"), "token": " dog", "note": None, "probs": [0.01, 0.02, 0.2, 0.6],
                                  "baseline": {"activation": 0.5, "prob": 0.03}, "top_tokens": {"low": top, "high": top}},
        )
        gen = queries.add_generation(
            s, syn.model_id, 1, 3, prompt="The", value=4.0, tokens=3, seed=None, source="cli",
            result={"clamped": {"text": " dog dog dog", "token_ids": [t(" dog")] * 3},
                    "unclamped": {"text": " the cat", "token_ids": [t(" the"), t(" cat")]}},
        )
        return {"curve": curve.id, "generation": gen.id}


def serve(db_url: str, settings: Settings | None = None):
    return running_server(create_app(settings or Settings(database_url=db_url)))


@pytest.fixture
def site(db_url):
    engine = engine_for(db_url)
    syn = fill_synthetic(engine, MODEL, N_LAYERS, D_MLP, VOCAB, plant=PLANTED, tokenizer=True)
    add_jobs(engine, MODEL, finished=True)
    ids = fill_everything(engine, syn)
    with serve(db_url) as base, httpx.Client(base_url=base, timeout=20) as http:
        yield Site(http, base, syn, engine, ids)


def meta(soup: BeautifulSoup, key: str) -> str:
    tag = soup.find("meta", attrs={"property": key}) or soup.find("meta", attrs={"name": key})
    assert tag is not None, key
    return tag["content"]


# ---------------------------------------------------------------- breadcrumbs


def crumbs(soup: BeautifulSoup) -> list[tuple[str, str | None]]:
    nav = soup.select("nav.breadcrumbs")
    assert len(nav) == 1, "one breadcrumb trail"
    assert nav[0]["aria-label"] == "Breadcrumb"
    items = nav[0].select("ol > li")
    current = nav[0].select('[aria-current="page"]')
    assert len(current) == 1 and items[-1].find(attrs={"aria-current": "page"}) is current[0], "the last is the page"
    assert current[0].name != "a", "the current page is not a link to itself"
    out = []
    for li in items:
        a = li.find("a")
        label = (a or li.find(attrs={"aria-current": "page"})).get_text(" ", strip=True)
        out.append((label, a["href"] if a else None))
    return out


def test_breadcrumbs_lead_from_the_models_list_to_the_page(site):
    curve, gen = site.ids["curve"], site.ids["generation"]
    model = [("Models", "/"), (MODEL, f"/{MODEL}")]
    neuron = [*model, ("layer 1", f"/{MODEL}/1"), ("neuron 3", f"/{MODEL}/1/3")]
    expected = {
        f"/{MODEL}": [("Models", "/"), (MODEL, None)],
        f"/{MODEL}/1": [*model, ("layer 1", None)],
        f"/{MODEL}/1/3": [*model, ("layer 1", f"/{MODEL}/1"), ("neuron 3", None)],
        urls.search_url(MODEL, "dog"): [*model, ("search", None)],
        urls.feature_url(MODEL, FEATURE): [*model, ("features", urls.features_url(MODEL)), (FEATURE, None)],
        urls.clamp_url(MODEL, 1, 3, curve): [*neuron, (f"clamp {curve}", None)],
        urls.generation_url(MODEL, 1, 3, gen): [*neuron, (f"generation {gen}", None)],
    }
    for path, trail in expected.items():
        soup = site.soup(path)
        assert crumbs(soup) == trail, path
        text = soup.select_one("nav.breadcrumbs").get_text(" ", strip=True)
        assert text == " › ".join(label for label, _ in trail), text
        for _, href in trail[:-1]:
            assert site.get(href).status_code == 200, href
    assert crumbs(site.soup("/")) == [("Models", None)]


# ---------------------------------------------------------------- the jump box


@pytest.mark.parametrize("path, layer, neuron", [(f"/{MODEL}", "", ""), (f"/{MODEL}/2", "2", ""),
                                                 (f"/{MODEL}/1/3", "1", "3")])
def test_jump_box_is_a_get_form_that_lands_on_the_neuron(site, path, layer, neuron):
    soup = site.soup(path)
    (form,) = soup.select("form.jump")
    assert form["method"] == "get" and form["action"] == f"/{MODEL}/jump"
    fields = {i["name"]: i for i in form.select("input")}
    assert set(fields) == {"layer", "neuron"}
    assert all(i["type"] == "number" and i["min"] == "0" for i in fields.values())
    assert fields["layer"].has_attr("required") and not fields["neuron"].has_attr("required")
    assert (fields["layer"]["max"], fields["neuron"]["max"]) == (str(N_LAYERS - 1), str(D_MLP - 1))
    assert (fields["layer"].get("value", ""), fields["neuron"].get("value", "")) == (layer, neuron), "prefilled"
    assert form.select_one("button[type=submit]") is not None

    r = site.get(form["action"], params={"layer": "2", "neuron": "17"})  # what the browser sends
    assert r.status_code == 303 and r.headers["location"] == f"/{MODEL}/2/17"
    assert site.json(r.headers["location"] + ".json")["neuron"] == 17
    # the neuron left empty: the layer's page
    for empty in ({"layer": "2", "neuron": ""}, {"layer": " 2 "}):
        r = site.get(form["action"], params=empty)
        assert r.status_code == 303 and r.headers["location"] == urls.layer_url(MODEL, 2), empty
        assert site.json(urls.layer_url(MODEL, 2, fmt=urls.JSON))["layer"] == 2


@pytest.mark.parametrize(
    "query, status, words",
    [
        ({"layer": str(N_LAYERS), "neuron": "0"}, 404, ["no layer 4", "0 to 3"]),
        ({"layer": "0", "neuron": str(D_MLP)}, 404, ["no neuron 30", "0 to 29"]),
        ({"layer": "9" * 5000, "neuron": "0"}, 404, ["no layer", "0 to 3"]),
        ({"layer": "abc", "neuron": "1"}, 400, ["'abc' is not a layer number", "0 to 3", "0 to 29"]),
        ({"layer": "-1", "neuron": "1"}, 400, ["not a layer number", "0 to 3"]),
        ({"layer": "1", "neuron": "2.5"}, 400, ["not a neuron number", "0 to 29"]),
        ({"layer": "", "neuron": "3"}, 400, ["Give a layer number", "0 to 3"]),
        ({"layer": str(N_LAYERS), "neuron": ""}, 404, ["no layer 4", "0 to 3"]),
        ({}, 400, ["Give a layer number", "0 to 3"]),
    ],
)
def test_jump_to_a_neuron_that_is_not_there_says_the_valid_range(site, query, status, words):
    r = site.get(f"/{MODEL}/jump", params=query)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("text/html")
    message = BeautifulSoup(r.text, "html.parser").select_one(".error-message").get_text()
    for word in words:
        assert word in message, (word, message)


def test_jump_in_an_unknown_model_and_huge_numbers_in_paths_are_404s(site):
    r = site.get("/nope/jump", params={"layer": "0", "neuron": "0"})
    assert r.status_code == 404 and "nope" in r.text
    for path in (f"/{MODEL}/0/{'9' * 5000}", f"/{MODEL}/{'9' * 5000}"):
        r = site.get(path)
        assert r.status_code == 404 and "numbered 0 to" in r.text, path


# ---------------------------------------------------------------- one address per page


def test_numbers_with_leading_zeros_redirect_to_the_canonical_url(site):
    """A layer, neuron, curve or generation number spelled with leading zeros is the same page at
    another address: a permanent redirect to the canonical one (urls.py), query string and .json
    suffix kept."""
    curve, gen = site.ids["curve"], site.ids["generation"]
    moved = {
        f"/{MODEL}/03/0102": f"/{MODEL}/3/102",  # no neuron 102 here: the redirect comes first, then the 404
        f"/{MODEL}/01/03": urls.neuron_url(MODEL, 1, 3),
        f"/{MODEL}/1/03": urls.neuron_url(MODEL, 1, 3),
        f"/{MODEL}/01/3.json": urls.neuron_url(MODEL, 1, 3, fmt=urls.JSON),
        f"/{MODEL}/01/03?embed=true": urls.embed_url(MODEL, 1, 3),
        f"/{MODEL}/00": urls.layer_url(MODEL, 0),
        f"/{MODEL}/02.json": urls.layer_url(MODEL, 2, fmt=urls.JSON),
        f"/{MODEL}/02?sort=-score&page=2": urls.layer_url(MODEL, 2, sort="-score", page=2),
        f"/{MODEL}/{'0' * 5000}1/3": urls.neuron_url(MODEL, 1, 3),
        f"/{MODEL}/01/3/clamp/0{curve}": urls.clamp_url(MODEL, 1, 3, curve),
        f"/{MODEL}/1/03/generate/{gen}.json": urls.generation_url(MODEL, 1, 3, gen, fmt=urls.JSON),
    }
    for path, target in moved.items():
        r = site.get(path)
        assert r.status_code in (301, 308) and r.headers["location"] == target, (path, r.status_code, r.headers)
    for path, target in moved.items():
        if "/102" in target or "page=2" in target:
            continue
        r = site.get(path, follow_redirects=True)
        assert r.status_code == 200 and str(r.url) == site.base + target, (path, r.url)
    r = site.get(f"/{MODEL}/01/03.json", follow_redirects=True)
    assert r.json()["url"] == urls.neuron_url(MODEL, 1, 3), "where the page says it lives"
    assert site.get(f"/{MODEL}/1/3").status_code == 200 and site.get(f"/{MODEL}/0/0").status_code == 200


@pytest.mark.parametrize("spelling", ["+1", "\u0661", "\uff11", "1_0", " 1", "1 ", "0x1", "1e0", "-0"])
def test_other_spellings_of_numbers_stay_errors(site, spelling):
    """What int() or a pydantic int would also read ("+1", Arabic-Indic and fullwidth digits,
    "1_0") is no layer or neuron number here, as in the jump box: a 404 saying what a number is,
    never a page or a redirect."""
    for path, what in ((f"/{MODEL}/{spelling}", "layer"), (f"/{MODEL}/{spelling}/3", "layer"),
                       (f"/{MODEL}/1/{spelling}", "neuron")):
        for suffix in ("", ".json"):
            r = site.get(path + suffix)
            assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code)
            text = r.json()["error"] if suffix else BeautifulSoup(r.text, "html.parser").select_one(".error-message").get_text()
            assert f"not a {what} number" in text, (path, text)


# ---------------------------------------------------------------- random neurons


def test_random_goes_to_a_stored_neuron(site):
    with session_scope(site.engine) as s:  # only layer 2 stays decoded
        s.execute(delete(Neuron).where(Neuron.model_id == site.syn.model_id, Neuron.layer != 2))
    assert site.soup(f"/{MODEL}/2/0").select_one("body")["data-random-url"] == f"/{MODEL}/random"
    seen = set()
    for _ in range(15):
        r = site.get(f"/{MODEL}/random")
        assert r.status_code in (302, 303) and r.headers["cache-control"] == "no-store"
        match = NEURON_PATH.match(r.headers["location"])
        assert match and match.group(1) == "2", r.headers["location"]
        seen.add(r.headers["location"])
    assert len(seen) > 1, "random, not always the same neuron"
    assert site.get(seen.pop()).status_code == 200
    with session_scope(site.engine) as s:
        s.execute(delete(Neuron).where(Neuron.model_id == site.syn.model_id))
    r = site.get(f"/{MODEL}/random")
    assert r.status_code == 404 and "no decoded neurons" in r.text


# ---------------------------------------------------------------- permalink and link previews


def test_copy_permalink_button_and_plain_link(site):
    soup = site.soup(f"/{MODEL}/1/3")
    (button,) = soup.select("button.copy-permalink")
    assert button["type"] == "button" and button.get_text(strip=True) == "Copy permalink"
    assert button["data-url"] == f"{site.base}/{MODEL}/1/3", "absolute"
    link = soup.select_one("a.permalink-url")
    assert link["href"] == f"/{MODEL}/1/3" and link.get_text(strip=True) == button["data-url"], "works without JS"
    assert site.json(f"/{MODEL}/1/3.json")["permalink"] == button["data-url"]


def test_open_graph_tags_preview_the_neurons_top_tokens(site):
    soup = site.soup(f"/{MODEL}/1/3")
    tokens = [t["token"] for t in site.json(f"/{MODEL}/1/3.json")["input_tokens"]]
    assert tokens[0] == " dog"
    assert meta(soup, "og:title") == f"{MODEL} layer 1 neuron 3"
    description = meta(soup, "og:description")
    assert description.startswith('Top tokens: " dog", ')
    assert description == "Top tokens: " + ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens[:8])
    assert meta(soup, "og:url") == f"{site.base}/{MODEL}/1/3"
    assert meta(soup, "og:type") == "website"
    assert meta(soup, "twitter:card") == "summary"


def test_open_graph_tags_escape_hostile_tokens(site):
    r = site.get(f"/{MODEL}/0/0")
    assert r.status_code == 200
    assert HOSTILE not in r.text
    soup = BeautifulSoup(r.text, "html.parser")
    assert meta(soup, "og:description").startswith(f'Top tokens: "{HOSTILE}"'), "escaped in the attribute, intact"
    head = r.text.split("</head>")[0]
    assert 'content="Top tokens: &#34;&lt;script&gt;alert(1)&lt;/script&gt;&#34;' in head
    assert not soup.select("head script:not([src])"), "no inline script"


def test_public_url_setting_makes_the_permalinks(db_url):
    engine = engine_for(db_url)
    fill_synthetic(engine, MODEL, 3, 20, VOCAB, plant=PLANTED)
    settings = Settings(database_url=db_url, public_url=PUBLIC + "/")
    with serve(db_url, settings) as base, httpx.Client(base_url=base, timeout=20) as http:
        soup = get_soup(http, f"/{MODEL}/1/3")
    assert meta(soup, "og:url") == f"{PUBLIC}/{MODEL}/1/3"
    assert soup.select_one("button.copy-permalink")["data-url"] == f"{PUBLIC}/{MODEL}/1/3"


# ---------------------------------------------------------------- the embeddable card


def test_embed_card_is_compact_and_marked_for_framing(site):
    full = site.get(f"/{MODEL}/1/3")
    assert "x-needle-embed" not in full.headers
    r = site.get(f"/{MODEL}/1/3", params={"embed": "true"})
    assert r.status_code == 200 and r.headers["x-needle-embed"] == "1"
    soup = BeautifulSoup(r.text, "html.parser")
    assert not soup.select("header, footer, nav, form"), "no site chrome in a card"
    assert not soup.find_all("script"), "a card needs no script"
    title = soup.select_one("h1 a")
    assert title["href"] == f"{site.base}/{MODEL}/1/3" and title["target"] == "_blank"
    assert "noopener" in title["rel"]
    assert "layer 1" in title.get_text() and "neuron 3" in title.get_text()
    tokens = [c.get_text() for c in soup.select(".card-tokens code.tok")]
    assert tokens[0] == "␣dog" and len(tokens) == 10

    svg = soup.select_one("svg.histogram")
    assert svg["role"] == "img" and len(svg.select("rect.hbar")) == 12
    contexts = soup.select("ol.contexts > li .context")
    data = site.json(f"/{MODEL}/1/3.json")
    assert len(data["examples"]) == 4 and len(contexts) == 3, "the top 3 contexts"
    for context, example in zip(contexts, data["examples"]):
        spans = context.select(".ctx-tokens .t")
        assert len(spans) == CONTEXT
        assert [i for i, s in enumerate(spans) if "max" in s["class"]] == [example["max_index"]]
        assert all(re.fullmatch(r"--a:[0-9.]+", s["style"]) for s in spans), "highlighted by activation"

    assert site.get(f"/{MODEL}/1/3", params={"embed": "false"}).headers.get("x-needle-embed") is None
    as_json = site.get(f"/{MODEL}/1/3.json", params={"embed": "true"})
    assert as_json.headers["content-type"].startswith("application/json") and "x-needle-embed" not in as_json.headers
    link = site.soup(f"/{MODEL}/1/3").select_one("a.embed-link")["href"]
    assert site.get(link).headers["x-needle-embed"] == "1"


@pytest.mark.parametrize("value", ["maybe", "", "yes", "on", "1", "0", "true ", "truee"])
def test_embed_other_than_true_or_false_is_a_400_saying_so(site, value):
    """?embed= is true (the card) or false (the page), in any case; anything else is not silently
    the page but an error page that says what embed takes ("1" and "0" too: no query parameter
    of the app's pages reads them as true or false)."""
    r = site.get(f"/{MODEL}/1/3", params={"embed": value})
    assert r.status_code == 400, (value, r.status_code)
    assert r.headers["content-type"].startswith("text/html") and "x-needle-embed" not in r.headers
    soup = BeautifulSoup(r.text, "html.parser")
    assert "embed must be true or false" in soup.select_one(".error-message").get_text()
    assert "?embed=true" in soup.select_one(".hint").get_text()
    as_json = site.get(f"/{MODEL}/1/3.json", params={"embed": value})
    assert as_json.status_code == 400 and "embed must be true or false" in as_json.json()["error"]


def test_embed_true_or_false_in_any_case(site):
    for value in ("true", "TRUE", "True"):
        r = site.get(f"/{MODEL}/1/3", params={"embed": value})
        assert r.status_code == 200 and r.headers["x-needle-embed"] == "1", value
    for params in ({"embed": "false"}, {"embed": "False"}, {}):
        r = site.get(f"/{MODEL}/1/3", params=params)
        assert r.status_code == 200 and "x-needle-embed" not in r.headers, params
        assert BeautifulSoup(r.text, "html.parser").select_one("header.site") is not None, "the full page"


def test_embed_card_escapes_hostile_tokens(site):
    r = site.get(f"/{MODEL}/0/0", params={"embed": "true"})
    assert r.status_code == 200 and HOSTILE not in r.text
    soup = BeautifulSoup(r.text, "html.parser")
    assert soup.select_one(".card-tokens code.tok").get_text() == HOSTILE
    assert not soup.find_all("script")


def test_embed_card_of_a_missing_neuron_is_a_404(site):
    assert site.get(f"/{MODEL}/0/{D_MLP}", params={"embed": "true"}).status_code == 404


# ---------------------------------------------------------------- the score-by-layer strip


def strip_points(svg) -> list[dict]:
    out = []
    for a in svg.select("a"):
        circle = a.select_one("circle")
        layer, neuron = map(int, NEURON_PATH.match(a["href"]).groups())
        out.append({"layer": layer, "neuron": neuron, "cx": float(circle["cx"]), "cy": float(circle["cy"]),
                    "title": circle.select_one("title").get_text()})
    return out


def test_search_strip_plots_the_top_50_by_layer_and_score(site):
    data = site.json(urls.search_url(MODEL, "dog", fmt="json"))
    assert len(data["results"]) > 50, "several matching tokens: more results than the strip shows"
    strip = data["score_strip"]
    assert strip["n_layers"] == N_LAYERS
    assert strip["points"] == [{k: r[k] for k in ("layer", "neuron", "score", "url")} for r in data["results"][:50]]

    soup = site.soup(urls.search_url(MODEL, "dog"))
    figure = soup.select_one("figure.score-strip")
    assert figure.find_next("table", class_="results") is not None, "above the results table"
    svg = figure.select_one("svg")
    assert svg["role"] == "img"
    labelled = svg["aria-labelledby"].split()
    assert [svg.find(id=i).name for i in labelled] == ["title", "desc"]
    assert "50" in svg.find(id=labelled[0]).get_text()

    points = strip_points(svg)  # in rank order: Tab goes from the best down
    assert len(points) == len(svg.select("circle")) == 50
    # the best is drawn again last, on top of the dots it overlaps: a picture only, not a second link
    on_top = svg.find_all(True)[-1]
    assert on_top.name == "use" and on_top["href"] == "#" + svg.select_one("a circle.dot.best")["id"]
    assert on_top["aria-hidden"] == "true" and on_top["pointer-events"] == "none" and on_top.find_parent("a") is None
    assert svg.select("circle.best") == [svg.select_one("a circle")], "the first link is the best"
    assert [(p["layer"], p["neuron"]) for p in points] == [(r["layer"], r["neuron"]) for r in data["results"][:50]]
    for rank, (p, r) in enumerate(zip(points, data["results"]), start=1):
        assert p["title"] == f"#{rank}: layer {r['layer']}, neuron {r['neuron']}, score {r['score']:.4g}"
    by_layer = sorted(points, key=lambda p: (p["layer"], p["cx"]))
    assert [p["cx"] for p in by_layer] == sorted(p["cx"] for p in points), "x ordered by layer"
    assert len({p["layer"] for p in points}) > 1
    best = points[0]
    assert (best["layer"], best["neuron"]) in {(1, 3), (2, 5)} and best["cy"] == min(p["cy"] for p in points)
    scores = {(r["layer"], r["neuron"]): r["score"] for r in data["results"][:50]}
    by_score = sorted(points, key=lambda p: -scores[(p["layer"], p["neuron"])])
    assert [p["cy"] for p in by_score] == sorted(p["cy"] for p in points), "y grows with the score"

    texts = [t.get_text() for t in svg.select("text")]
    assert "layer" in texts and "normalised score" in texts
    assert all(str(layer) in texts for layer in range(N_LAYERS)), "a tick per layer"
    assert site.get(svg.select_one("a")["href"]).status_code == 200


def test_search_strip_is_absent_without_results(site):
    fill_synthetic(site.engine, "plain", 1, 20, VOCAB)  # no tokenizer: "zebra" matches nothing
    soup = site.soup(urls.search_url("plain", "zebra"))
    assert soup.select_one("figure.score-strip") is None
    assert site.json(urls.search_url("plain", "zebra", fmt="json"))["score_strip"]["points"] == []
    assert site.soup(urls.search_url("plain", "dog")).select_one("figure.score-strip svg") is not None


def test_score_strip_svg_caps_points_and_keeps_layers_apart():
    points = [{"layer": i % 3, "neuron": i, "score": 100.0 - i, "url": f"/m/{i % 3}/{i}"} for i in range(80)]
    svg = BeautifulSoup(str(plots.score_strip_svg({"n_layers": 3, "points": points})), "html.parser")
    circles = svg.select("a > circle")
    assert len(circles) == plots.STRIP_POINTS == 50
    xs = {}
    for a in svg.select("a"):
        xs.setdefault(int(a["href"].split("/")[2]), []).append(float(a.circle["cx"]))
    assert max(xs[0]) < min(xs[1]) and max(xs[1]) < min(xs[2])
    assert str(plots.score_strip_svg({"n_layers": 3, "points": []})) == ""
    hostile = plots.score_strip_svg({"n_layers": 1, "points": [{"layer": 0, "neuron": 0, "score": 1.0,
                                                                 "url": '/m/0/0"><script>'}]})
    assert "<script>" not in str(hostile)


# ---------------------------------------------------------------- accessible plots


def assert_accessible(svg) -> None:
    assert svg["role"] == "img"
    title_id, desc_id = svg["aria-labelledby"].split()
    assert svg.find("title", id=title_id).get_text().strip()
    assert svg.find("desc", id=desc_id).get_text().strip()


def test_plots_name_themselves_and_every_mark_has_a_hover_value(site):
    soup = site.soup(f"/{MODEL}/1/3")
    histogram = soup.select_one("#firing svg.histogram")
    assert_accessible(histogram)
    bars = histogram.select("rect.hbar")
    assert bars and all(re.search(r"\): [\d,]+ tokens$", b.title.get_text()) for b in bars)
    assert "1,000 tokens" in histogram.find("desc").get_text()
    curve = soup.select_one("#clamp svg.clamp-curve")
    assert_accessible(curve)
    assert [c.title.get_text() for c in curve.select("circle.point")] == [
        "clamped at -2: p = 0.01", "clamped at 0: p = 0.02", "clamped at 2: p = 0.2", "clamped at 4: p = 0.6"]
    assert "highest 0.6 at 4" in curve.find("desc").get_text()
    ids = [tag["id"] for tag in soup.select("[id]")]
    assert len(ids) == len(set(ids)), "ids are unique on the page"

    feature = site.soup(urls.feature_url(MODEL, FEATURE))
    f1_plots = feature.select("svg.curve")
    assert len(f1_plots) == 4  # the fast and the pruning sweep, each drawn wide and narrow
    for svg in f1_plots:
        assert_accessible(svg)
    ids = [tag["id"] for tag in feature.select("[id]")]
    assert len(ids) == len(set(ids))


def test_every_plot_is_drawn_wide_and_narrow_with_the_same_content(site):
    """Each plot comes twice, the wide drawing and right after it the narrow one for phones
    (the stylesheet shows one): the same marks with the same hover values, the same links, the
    same description, the narrow one at most 364 units wide, each with its own ids."""
    pages = {f"/{MODEL}/1/3": ("histogram", "clamp-curve"), urls.search_url(MODEL, "dog"): ("score-strip",),
             urls.feature_url(MODEL, FEATURE): ("curve", "curve")}
    for path, kinds in pages.items():
        soup = site.soup(path)
        plots_ = soup.select("svg.plot")
        assert [[c for c in svg["class"] if c not in ("plot", "wide", "narrow")][0] for svg in plots_[::2]] == list(kinds)
        for wide, narrow in zip(plots_[::2], plots_[1::2]):
            assert "wide" in wide["class"] and "narrow" in narrow["class"], path
            assert wide.find_next_sibling("svg") is narrow, "side by side in one figure"
            assert_accessible(wide)
            assert_accessible(narrow)
            marks = [[(m.name, m.title.get_text()) for m in svg.select("rect, circle, polyline, line") if m.title]
                     for svg in (wide, narrow)]
            assert marks[0] and marks[0] == marks[1], path
            assert [a["href"] for a in wide.select("a")] == [a["href"] for a in narrow.select("a")]
            assert wide.find("desc").get_text() == narrow.find("desc").get_text()
            assert float(narrow["width"]) <= 364 < float(wide["width"])
        ids = [tag["id"] for tag in soup.select("[id]")]
        assert len(ids) == len(set(ids)), path
        assert all(u["href"][1:] in ids for u in soup.select("use")), "each <use> finds its own drawing's dot"


# ---------------------------------------------------------------- needle.js and the markup it relies on


def test_needle_js_is_served_and_included_without_inline_script(site):
    r = site.get("/-/static/needle.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    for name in ("search-q", "copy-permalink", 'rel~="next"', 'rel~="prev"', "data-random-url", "Copied", "shortcuts"):
        assert name in r.text, name
    for path in ("/", f"/{MODEL}", f"/{MODEL}/1", f"/{MODEL}/1/3", urls.search_url(MODEL, "dog"),
                 urls.feature_url(MODEL, FEATURE)):
        soup = site.soup(path)
        scripts = soup.find_all("script")
        assert all(s.get("src") for s in scripts), "no inline script"
        (needle,) = [s for s in scripts if s["src"] == "/-/static/needle.js"]
        assert needle.has_attr("defer")
        handlers = [(t.name, a) for t in soup.find_all(True) for a in t.attrs if a.lower().startswith("on")]
        assert handlers == [], "no inline event handlers"
        help_text = soup.select_one("footer details#shortcuts").get_text(" ")
        for key in ("j", "k", "/", "r", "?"):
            assert f" {key} " in f" {help_text} ", key


def test_header_search_box_and_neighbour_links(site):
    soup = site.soup(f"/{MODEL}/1/3")
    box = soup.select_one("header #search-q")
    assert box.name == "input" and box["name"] == "token"
    form = box.find_parent("form")
    assert form["action"] == f"/{MODEL}/search" and form.get("method", "get") == "get"
    r = site.get(form["action"], params={"token": "dog"})
    assert r.status_code == 200 and BeautifulSoup(r.text, "html.parser").select_one("figure.score-strip")
    assert soup.select_one('nav.neighbours a[rel="next"]')["href"] == f"/{MODEL}/1/4"
    assert soup.select_one('nav.neighbours a[rel="prev"]')["href"] == f"/{MODEL}/1/2"
    assert soup.select_one("body")["data-random-url"] == f"/{MODEL}/random"
    assert site.soup("/").select_one("#search-q") is None, "no model to search on the models list"


@pytest.mark.parametrize("scores, low", [
    ([1.27 - i * 0.0064 for i in range(50)], 0.9),  # close scores: the axis starts below the lowest
    ([5.0 - i * 0.09 for i in range(50)], 0.0),  # spread out: from 0
    ([3.0], 2.9),  # one neuron
])
def test_score_strip_axis_fits_the_scores(scores, low):
    points = [{"layer": i % 4, "neuron": i, "score": s, "url": f"/m/{i % 4}/{i}"} for i, s in enumerate(scores)]
    svg = BeautifulSoup(str(plots.score_strip_svg({"n_layers": 4, "points": points})), "html.parser")
    labels = [float(t.get_text()) for t in svg.select("text")[:3]]
    assert labels[0] == pytest.approx(low) and labels[0] <= min(scores) and labels[2] >= max(scores)
    assert labels[0] < labels[1] < labels[2]
    ys = [float(c["cy"]) for c in svg.select("circle")]
    grid = [float(t["y"]) - 4 for t in svg.select("text")[:3]]  # the labels sit at their values' heights
    assert all(grid[2] <= y <= grid[0] for y in ys), "every dot inside the axis"
    if len(scores) > 1:
        assert max(ys) - min(ys) > 0.5 * (grid[0] - grid[2]), "the dots use most of the height"


@pytest.mark.parametrize("n_layers", [1, 4, 24, 64])
def test_f1_plot_narrow_keeps_its_legend_inside_and_under_the_plot(n_layers):
    """The phone's F1 plot: at most 364 units wide (drawn about 346 px wide on a 390 px phone, its
    13-unit text at about 12 px), its legend in rows under the plot with every layer named, and
    every label inside the drawing (13-unit text is at most about 8 units a character)."""
    ks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    layers = [{"layer": i, "curve": [{"k": k, "f1": 0.5 + 0.4 * (i / max(n_layers - 1, 1)) * k / 256} for k in ks]}
              for i in range(n_layers)]
    svg = BeautifulSoup(str(plots.f1_curve_svg(layers, narrow=True)), "html.parser").svg
    _, _, width, height = map(float, svg["viewbox"].split())  # html.parser lowercases names
    assert width <= 364 and "narrow" in svg["class"]
    axis_bottom = max(float(line["y1"]) for line in svg.select("line.axis"))
    legend = [t for t in svg.select("text") if t.get_text().startswith("layer ")]
    assert [t.get_text() for t in legend] == [f"layer {i}" for i in range(n_layers)]
    assert all(float(t["y"]) > axis_bottom + 20 for t in legend), "below the axis and its label"
    for t in svg.select("text"):
        x, y, chars = float(t["x"]), float(t["y"]), len(t.get_text())
        half = {"middle": 0.5, "end": 1.0}.get(t.get("text-anchor"), 0.0) * 8 * chars
        if t.get("transform"):  # the rotated y label
            continue
        assert 0 <= x - half and x - half + 8 * chars <= width + 1 and 0 < y <= height, t
    wide = BeautifulSoup(str(plots.f1_curve_svg(layers)), "html.parser").svg
    assert "wide" in wide["class"] and wide.find("desc").get_text() == svg.find("desc").get_text()
    assert wide["aria-labelledby"] != svg["aria-labelledby"], "both on one page: their ids differ"


@pytest.mark.parametrize("fullest, label", [(999, "999"), (9_999, "9,999"), (163_604, "164k"), (35_000_000, "35M"),
                                            (1_234_567_890, "1.2G")])
@pytest.mark.parametrize("narrow", [False, True])
def test_histogram_count_label_fits_its_margin(fullest, label, narrow):
    """The fullest bin's count, written at the top of the y axis, stays inside the plot: 163,604
    ran past its left edge, now 164k (the bars' tooltips and the description keep exact counts).
    11-unit text is at most about 7 units a character."""
    stats = {"histogram": {"edges": [-2.0, -1.0, 0.0, 1.0, 2.0], "counts": [10, fullest, 3, 0]}, "mean": 0.1,
             "threshold": 1.0}
    svg = BeautifulSoup(str(plots.histogram_svg(stats, narrow=narrow)), "html.parser").svg
    texts = [t for t in svg.select("text") if not t.get("transform")]
    top = [t for t in texts if t["text-anchor"] == "end" and float(t["y"]) < 30]
    assert [t.get_text() for t in top] == [label]
    assert float(top[0]["x"]) - 7 * len(label) >= 0
    assert f"{fullest:,} tokens" in svg.select("rect.hbar")[1].title.get_text()
    assert f"the fullest bin holds {fullest:,}" in svg.find("desc").get_text()
