"""The web pages and their JSON twins, over real HTTP against a real server and database
(SQLite and Postgres), filled with a synthetic model. HTML is asserted by parsing it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from bs4 import BeautifulSoup
from sqlalchemy import update

from app import pagedata, urls
from app.config import Settings
from app.db import engine_for
from app.main import create_app
from app.schema import Neuron
from tests.live_server import get_json, get_soup, running_server
from tests.synthetic import HOSTILE, Synthetic, add_jobs, fill_synthetic, finish_jobs

MODEL = "tiny-1.5m"  # a dot in the name, like "pythia-1.4b"
N_LAYERS, D_MLP, PAGE_SIZE = 3, 24, 10
VOCAB = ["<unk>", "dog", " dog", "Dog", "cat", " cat", "hot", " the", "\n", HOSTILE] + [f"w{i}" for i in range(20)]
PLANTED = {(0, 0): HOSTILE, (1, 3): " dog", (2, 5): "dog"}
NEURON_PATH = re.compile(rf"^/{re.escape(MODEL)}/(\d+)/(\d+)$")


@dataclass
class Site:
    http: httpx.Client
    syn: Synthetic
    engine: object

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def json(self, path: str) -> dict:
        return get_json(self.http, path)

    def soup(self, path: str, **kwargs) -> BeautifulSoup:
        return get_soup(self.http, path, **kwargs)


@pytest.fixture
def site(db_url):
    engine = engine_for(db_url)
    syn = fill_synthetic(engine, MODEL, N_LAYERS, D_MLP, VOCAB, plant=PLANTED, tokenizer=True)
    add_jobs(engine, MODEL, finished=True)
    app = create_app(Settings(database_url=db_url, page_size=PAGE_SIZE))
    with running_server(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        yield Site(http, syn, engine)


def alternate_href(soup: BeautifulSoup) -> str:
    link = soup.find("link", rel="alternate", type="application/json")
    assert link is not None, "every HTML page links its JSON twin"
    return link["href"]


def links(soup: BeautifulSoup, pattern: re.Pattern = NEURON_PATH) -> list[str]:
    return [a["href"] for a in soup.select("main a[href]") if pattern.match(a["href"])]


def assert_error(r: httpx.Response, status: int, json: bool, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    if json:
        body = r.json()
        assert body["ok"] is False and body["status"] == status and isinstance(body["error"], str)
        text = body["error"]
    else:
        assert r.headers["content-type"].startswith("text/html")
        text = BeautifulSoup(r.text, "html.parser").select_one(".error-message").get_text()
    assert "Traceback" not in r.text
    for word in words:
        assert word in text, (word, text)


# ---------------------------------------------------------------- the pages


def test_models_page_lists_the_model_and_has_a_json_twin(site):
    soup = site.soup("/")
    assert alternate_href(soup) == "/-/models.json"
    assert f"/{MODEL}" in [a["href"] for a in soup.select("table a")]
    data = site.json("/-/models.json")
    (model,) = data["models"]
    assert model["name"] == MODEL and model["url"] == f"/{MODEL}"
    assert model["neurons_stored"] == N_LAYERS * D_MLP and model["status"] == "ready"


def test_model_page_shows_layers_and_how_it_was_computed(site):
    soup = site.soup(f"/{MODEL}")
    assert alternate_href(soup) == f"/{MODEL}.json"
    layer_links = links(soup, re.compile(rf"^/{re.escape(MODEL)}/\d+$"))
    assert layer_links == [f"/{MODEL}/{layer}" for layer in range(N_LAYERS)]
    facts = soup.select_one("dl.facts").get_text(" ")
    for fact in ("synthetic:tiny-1.5m", "gpt2", "float32", "cpu", "none"):
        assert fact in facts
    panel = soup.select_one("#jobs-panel")
    assert not panel.has_attr("hx-trigger"), "no polling once every job is done"
    # every job done: the layers lead the page, the jobs close it
    assert [h.get_text() for h in soup.select("main section.panel > h2")] == [
        "Layers", "Sparse autoencoders", "What was computed, and how", "Jobs"]
    # no SAE on this model: the panel says how to train or import one
    saes = soup.select_one("#saes").get_text(" ")
    assert "No SAE yet" in saes and f"needle sae train {MODEL} --layer L" in " ".join(saes.split())
    assert "decode" in panel.get_text() and "search_index" in panel.get_text()

    data = site.json(f"/{MODEL}.json")
    assert data["model"] == MODEL and data["decode_norm"] == "none"
    assert [layer["neurons"] for layer in data["layers"]] == [D_MLP] * N_LAYERS
    assert {s["stage"]: s["state"] for s in data["stages"]} == {"decode": "done", "search_index": "done"}
    assert all(s["seconds"] is not None and s["seconds"] >= 0 for s in data["stages"])
    assert data["jobs_pending"] is False


def test_jobs_panel_polls_itself_until_the_jobs_are_done(site):
    fill_synthetic(site.engine, "busy", 1, 20, VOCAB)
    add_jobs(site.engine, "busy", finished=False)
    soup = site.soup("/busy")
    panel = soup.select_one("#jobs-panel")
    assert panel["hx-trigger"] == "every 2s"
    # while jobs run, their panel leads the page
    assert [h.get_text() for h in soup.select("main section.panel > h2")][0] == "Jobs"
    assert panel["hx-get"] == urls.jobs_panel_url("busy")
    assert "running" in panel.get_text()

    r = site.get(panel["hx-get"], headers={"HX-Request": "true"})
    assert r.status_code == 200 and "<html" not in r.text
    polled = BeautifulSoup(r.text, "html.parser").select_one("#jobs-panel")
    assert polled["hx-trigger"] == "every 2s" and "HX-Refresh" not in r.headers

    finish_jobs(site.engine, "busy")
    r = site.get(panel["hx-get"], headers={"HX-Request": "true"})
    done = BeautifulSoup(r.text, "html.parser").select_one("#jobs-panel")
    assert not done.has_attr("hx-trigger"), "polling stops when nothing is pending"
    assert r.headers["HX-Refresh"] == "true", "the page reloads to show the results"


def test_layer_page_sorts_and_paginates(site):
    expected = np.argsort(-site.syn.top_scores[1], kind="stable")
    seen = []
    for page in (1, 2, 3):
        data = site.json(urls.layer_url(MODEL, 1, page=page, fmt="json"))
        assert data["page"] == page and data["pages"] == 3 and data["sort"] == "score"
        scores = [n["top_score"] for n in data["neurons"]]
        assert scores == sorted(scores, reverse=True)
        seen += [n["neuron"] for n in data["neurons"]]
    assert len(seen) == D_MLP and sorted(seen) == list(range(D_MLP))
    assert seen[:3] == [int(i) for i in expected[:3]]
    assert site.json(urls.layer_url(MODEL, 1, fmt="json"))["neurons"][0]["neuron"] == 3  # the planted " dog"

    by_index = site.json(f"/{MODEL}/1.json?sort=neuron&page=2")
    assert [n["neuron"] for n in by_index["neurons"]] == list(range(10, 20))
    lowest = site.json(f"/{MODEL}/1.json?sort=-score")["neurons"]
    assert [n["top_score"] for n in lowest] == sorted(n["top_score"] for n in lowest)

    soup = site.soup(f"/{MODEL}/1")
    assert alternate_href(soup) == f"/{MODEL}/1.json"
    rows = soup.select("table.neurons tbody tr")
    assert len(rows) == PAGE_SIZE
    assert rows[0].select_one("a")["href"] == f"/{MODEL}/1/3"
    assert "␣dog" in rows[0].select_one("td.tokens").get_text()
    # each number column has one number of decimals, so the points line up; p to 3 significant digits
    data = site.json(f"/{MODEL}/1.json")["neurons"]
    best = max(n["top_score"] for n in data)
    for row, n in zip(rows, data):
        score, prob = [td.get_text() for td in row.select("td.num")][1:3]
        assert score == f"{n['top_score']:.3f}" and re.fullmatch(r"\d+\.\d{3}", score), score
        assert float(prob) == pytest.approx(n["top_prob"], rel=6e-3) and len(prob.replace(".", "").lstrip("0")) == 3, prob
        # the bar: from a best score of 1 to the layer's best
        width = float(re.search(r"width: ([\d.]+)%", str(row.select_one("td.barcell"))).group(1))
        assert width == pytest.approx(100 * (n["top_score"] - 1) / (best - 1), abs=0.06), (n["top_score"], width)
    next_page = soup.select_one("nav.pager a[rel=next]")["href"]
    assert next_page == f"/{MODEL}/1?page=2"
    assert site.get(next_page).status_code == 200
    for href in links(soup):
        assert site.get(href).status_code == 200


@pytest.mark.parametrize(
    "query, words",
    [("page=0", ["Page"]), ("page=4", ["out of range"]), ("page=two", ["Page"]), ("sort=best", ["sort"])],
)
def test_layer_page_rejects_bad_pages_and_sorts(site, query, words):
    assert_error(site.get(f"/{MODEL}/0.json?{query}"), 400, True, *words)
    assert_error(site.get(f"/{MODEL}/0?{query}"), 400, False, *words)


def test_neuron_json_has_decodings_best_first(site):
    data = site.json(f"/{MODEL}/1/3.json")
    assert (data["model"], data["layer"], data["neuron"]) == (MODEL, 1, 3)
    inputs = data["input_tokens"]
    assert len(inputs) == 20 and set(inputs[0]) >= {"token", "token_id", "prob", "score"}
    assert inputs[0]["token"] == " dog" and inputs[0]["token_id"] == site.syn.token_id(" dog")
    assert [t["score"] for t in inputs] == sorted((t["score"] for t in inputs), reverse=True)
    assert [t["prob"] for t in inputs] == sorted((t["prob"] for t in inputs), reverse=True)
    promoted, suppressed = data["output_tokens"]["promoted"], data["output_tokens"]["suppressed"]
    assert len(promoted) == len(suppressed) == 10
    assert set(promoted[0]) >= {"token", "token_id", "logit"}
    assert [t["logit"] for t in promoted] == sorted((t["logit"] for t in promoted), reverse=True)
    assert [t["logit"] for t in suppressed] == sorted(t["logit"] for t in suppressed)
    assert suppressed[0]["logit"] < promoted[-1]["logit"]


def test_neuron_page_shows_tables_method_and_citation(site):
    soup = site.soup(f"/{MODEL}/1/3")
    assert alternate_href(soup) == f"/{MODEL}/1/3.json"
    decoding = soup.select("table.decoding tbody tr")
    assert len(decoding) == 20
    assert decoding[0].select_one("code.tok").get_text() == "␣dog"
    assert len(soup.select("table.logits.promoted tbody tr")) == 10
    assert len(soup.select("table.logits.suppressed tbody tr")) == 10
    # the decoding reads against its baseline: 1/V for a flat decoding
    data = site.json(f"/{MODEL}/1/3.json")
    vocab = site.json(f"/{MODEL}.json")["vocab_size"]
    assert data["uniform_prob"] == pytest.approx(1 / vocab, rel=1e-5)
    assert data["top_prob_over_uniform"] == pytest.approx(data["top_prob"] * vocab, rel=1e-4)
    summary = " ".join(soup.select_one("p.summary").get_text(" ").split())
    assert f"1/V = {1 / vocab:.3g}" in summary and f"{data['top_prob'] * vocab:.3g}×" in summary
    # and against a flat decoding's entropy, log2 V bits: the planted neuron's is far below it
    stored = float(site.syn.probs[1, 3] @ -np.log2(site.syn.probs[1, 3]))
    assert data["entropy_bits"] == pytest.approx(stored, rel=1e-5) and data["max_entropy_bits"] == pytest.approx(np.log2(vocab))
    assert f"{stored:.3g} bits" in summary and f"V = {np.log2(vocab):.3g}" in summary and "close to flat" not in summary
    with site.engine.begin() as c:  # a decoding within 2% of flat says its top tokens say little
        c.execute(update(Neuron).where(Neuron.layer == 1, Neuron.neuron == 3).values(entropy=0.99 * np.log(vocab)))
    assert "close to flat" in site.soup(f"/{MODEL}/1/3").select_one("p.summary").get_text()
    with site.engine.begin() as c:  # a unit decoded before the entropy was stored
        c.execute(update(Neuron).where(Neuron.layer == 1, Neuron.neuron == 3).values(entropy=None))
    assert site.json(f"/{MODEL}/1/3.json")["entropy_bits"] is None
    assert "index the model again" in site.soup(f"/{MODEL}/1/3").select_one("p.summary").get_text()
    method = soup.select_one("section.method").get_text(" ")
    assert "Flash Interpretability" in method and "Davies" in method
    assert "none" in method, "says which decode norm was used"
    assert "mean" in method and "sum" in method


def test_hostile_token_is_escaped_in_html_and_raw_in_json(site):
    r = site.get(f"/{MODEL}/0/0")
    assert r.status_code == 200
    soup = BeautifulSoup(r.text, "html.parser")
    assert not [s for s in soup.find_all("script") if "alert" in (s.string or "")]
    assert HOSTILE not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert soup.select_one("table.decoding code.tok").get_text() == HOSTILE
    data = site.json(f"/{MODEL}/0/0.json")
    assert data["input_tokens"][0]["token"] == HOSTILE

    r = site.get(urls.search_url(MODEL, HOSTILE))
    assert r.status_code == 200 and HOSTILE not in r.text
    assert site.json(urls.search_url(MODEL, HOSTILE, fmt="json"))["results"][0]["token"] == HOSTILE


def test_previous_next_and_random_links_resolve(site):
    soup = site.soup(f"/{MODEL}/1/0")
    assert soup.select_one("a[rel=prev]")["href"] == f"/{MODEL}/0/{D_MLP - 1}", "previous crosses the layer boundary"
    assert soup.select_one("a[rel=next]")["href"] == f"/{MODEL}/1/1"
    last = site.soup(f"/{MODEL}/0/{D_MLP - 1}")
    assert last.select_one("a[rel=next]")["href"] == f"/{MODEL}/1/0", "next crosses the layer boundary"
    assert site.soup(f"/{MODEL}/0/0").select_one("a[rel=prev]") is None
    assert site.soup(f"/{MODEL}/{N_LAYERS - 1}/{D_MLP - 1}").select_one("a[rel=next]") is None
    data = site.json(f"/{MODEL}/1/0.json")
    assert data["previous"]["url"] == f"/{MODEL}/0/{D_MLP - 1}" and data["next"]["url"] == f"/{MODEL}/1/1"

    for a in soup.select("nav.neighbours a"):
        r = site.get(a["href"])
        if a["href"].endswith("/random"):
            assert r.status_code == 302 and NEURON_PATH.match(r.headers["location"])
            r = site.get(r.headers["location"])
        assert r.status_code == 200

    r = site.get(f"/{MODEL}/random.json")
    assert r.status_code == 302 and r.headers["location"].endswith(".json")
    assert site.get(r.headers["location"]).json()["model"] == MODEL


@pytest.mark.parametrize(
    "path, words",
    [
        ("/nope", ["nope"]),
        (f"/{MODEL}/{N_LAYERS}", ["no layer 3"]),
        (f"/{MODEL}/0/{D_MLP}", ["no neuron 24"]),
        ("/nope/0/0", ["nope"]),
        (f"/{MODEL}/abc", ["'abc'", "not a layer number"]),
        (f"/{MODEL}/-1", ["not a layer number"]),
        (f"/{MODEL}/1.5", ["not a layer number"]),
        (f"/{MODEL}/0/x", ["not a neuron number"]),
        ("/nope/random", ["nope"]),
        ("/nope/search", ["nope"]),
        ("/-/nothing", ["There is no such page"]),  # the app's own prefix: not "no model named '-'"
        ("/-/nothing/0/1", ["There is no page at /-/nothing/0/1"]),
    ],
)
def test_missing_or_malformed_things_are_404_in_html_and_json(site, path, words):
    assert_error(site.get(path), 404, False, *words)
    assert_error(site.get(path + ".json"), 404, True, *words)


def test_unrouted_paths_and_methods(site):
    assert_error(site.get(f"/{MODEL}/0/0/extra"), 404, False)
    assert_error(site.get(f"/{MODEL}/0/0/extra.json"), 404, True)
    assert_error(site.http.post("/"), 405, False, "POST")
    assert_error(site.http.post(f"/{MODEL}/0.json"), 405, True, "POST")
    assert_error(site.get(f"/{MODEL}?fragment=bogus"), 422, False)


def test_search_finds_the_dog_neurons_from_every_spelling(site):
    dog, space_dog = site.syn.token_id("dog"), site.syn.token_id(" dog")
    for query in ("dog", " dog", "Ġdog", "DOG"):
        data = site.json(urls.search_url(MODEL, query, fmt="json"))
        assert data["query"] == query
        matched = {m["token_id"] for m in data["matches"]}
        assert {dog, space_dog} <= matched, query
        top = {(r["layer"], r["neuron"]): r for r in data["results"][:2]}
        assert set(top) == {(1, 3), (2, 5)}, query
        assert top[(1, 3)]["token"] == " dog" and top[(2, 5)]["token"] == "dog", "results say which token matched"
        assert top[(1, 3)]["url"] == f"/{MODEL}/1/3"
        scores = [r["score"] for r in data["results"]]
        assert scores == sorted(scores, reverse=True)
        pairs = [(r["layer"], r["neuron"]) for r in data["results"]]
        assert len(pairs) == len(set(pairs)), "one entry per neuron"
        assert set(data["results"][0]) >= {"layer", "neuron", "token", "score", "prob", "url"}

    soup = site.soup(urls.search_url(MODEL, "Ġdog"))
    assert alternate_href(soup) == urls.search_url(MODEL, "Ġdog", fmt="json")
    assert "single-token" in soup.get_text()
    first = soup.select("table.results tbody tr")[0]
    assert NEURON_PATH.match(first.select_one("a")["href"])
    assert site.get(first.select_one("a")["href"]).status_code == 200


def test_search_shows_50_results_then_the_others_folded(site):
    """A query matching several tokens merges their top-50 lists: the page shows the best 50 and
    folds the others into a <details>, ranked on; the JSON has them all."""
    data = site.json(urls.search_url(MODEL, "dog", fmt="json"))
    assert len(data["results"]) > 50, "the test needs more than 50 results"
    soup = site.soup(urls.search_url(MODEL, "dog"))
    first = soup.select("main > table.results tbody tr") or soup.select("table.results")[0].select("tbody tr")
    folded = soup.select("details.more-results table.results tbody tr")
    assert len(first) == 50 and len(first) + len(folded) == len(data["results"])
    assert not soup.select_one("details.more-results").has_attr("open")
    ranks = [int(r.select_one("td.rank").get_text()) for r in first + folded]
    assert ranks == list(range(1, len(data["results"]) + 1))
    for row, r in zip(first + folded, data["results"]):
        assert row.select_one("a")["href"] == r["url"]
        score, prob = [td.get_text() for td in row.select("td.num")][1:3]
        assert score == f"{r['score']:.3f}" and float(prob) == pytest.approx(r["prob"], rel=6e-3)


def test_search_results_say_where_the_token_stands_in_each_unit_s_decoding(site):
    """Each result's rank of its token in the unit's own decoding, checked against the unit's page:
    the token's place in its input_tokens, or "> 20" when it is not among them."""
    seen = set()
    for query in ("dog", "cat", "w3"):
        data = site.json(urls.search_url(MODEL, query, fmt="json"))
        soup = site.soup(urls.search_url(MODEL, query))
        rows = soup.select("table.results tbody tr")
        assert len(rows) == len(data["results"])
        for row, r in zip(rows, data["results"], strict=True):
            page = site.json(urls.neuron_url(MODEL, r["layer"], r["neuron"], fmt="json"))
            ids = [t["token_id"] for t in page["input_tokens"]]
            assert len(ids) == r["decoding_kept"] == 20
            expected = ids.index(r["token_id"]) + 1 if r["token_id"] in ids else None
            assert r["decoding_rank"] == expected, (query, r)
            shown = row.select_one("td.decoding-rank").get_text()
            assert shown == (str(expected) if expected is not None else "> 20")
            seen.add(expected is None)
            seen.add("top" if expected == 1 else "other")
    assert {True, False, "top", "other"} <= seen, "the test needs results of every kind"
    planted = next(r for r in site.json(urls.search_url(MODEL, " dog", fmt="json"))["results"]
                   if (r["layer"], r["neuron"]) == (1, 3))
    assert planted["decoding_rank"] == 1, "a planted neuron's token is its top token"


def test_a_chip_copied_from_a_page_finds_its_token(site):
    """Pages show a space as ␣ and a line break as ↵: searching what a chip shows finds its token."""
    for shown, token in (("␣the", " the"), ("↵", "\n"), ("␣dog", " dog")):
        data = site.json(urls.search_url(MODEL, shown, fmt="json"))
        assert data["method"] == "token" and data["query"] == shown, shown
        assert site.syn.token_id(token) in {m["token_id"] for m in data["matches"]}, shown
        assert data["results"], shown
    # the marks in a query that matches no token are read as what they show when it is tokenized
    data = site.json(urls.search_url(MODEL, "hot␣dog", fmt="json"))
    assert data["method"] == "tokenized" and [t["token"] for t in data["tokenized"]] == ["hot", "dog"]


def test_multi_token_query_is_tokenized_and_each_token_searched(site):
    data = site.json(urls.search_url(MODEL, "hot dog", fmt="json"))
    assert data["method"] == "tokenized"
    assert [t["token"] for t in data["tokenized"]] == ["hot", "dog"]
    assert [g["token"] for g in data["groups"]] == ["hot", "dog"]
    assert (2, 5) in [(r["layer"], r["neuron"]) for r in data["results"]]
    soup = site.soup(urls.search_url(MODEL, "hot dog"))
    assert "tokenized" in soup.select_one("p.matches").get_text()


def test_search_without_a_token_is_a_clear_400(site):
    for path in (f"/{MODEL}/search", f"/{MODEL}/search?token="):
        assert_error(site.get(path), 400, False, "token")
        soup = BeautifulSoup(site.get(path).text, "html.parser")
        form = soup.select_one("main form.search")
        assert form is not None and form["action"] == urls.search_url(MODEL), "the search form again: no dead end"
        assert soup.select_one("header form.header-search") is not None
        assert soup.select_one(f'main .crumbs a[href="{urls.model_url(MODEL)}"]') is not None
    lost = BeautifulSoup(site.get("/no-such-model/search?token=dog").text, "html.parser")
    assert lost.select_one("main form.search") is None and lost.select_one("header form.header-search") is None
    for path in (f"/{MODEL}/search.json", f"/{MODEL}/search.json?token="):
        assert_error(site.get(path), 400, True, "token")


def test_search_with_no_matching_token(site):
    fill_synthetic(site.engine, "plain", 1, 20, VOCAB)  # no tokenizer stored
    data = site.json(urls.search_url("plain", "zebra", fmt="json"))
    assert data["matches"] == [] and data["results"] == []
    assert "No vocabulary token" in site.soup(urls.search_url("plain", "zebra")).get_text()


def test_every_page_links_its_json_twin(site):
    pages = ["/", f"/{MODEL}", f"/{MODEL}/2", f"/{MODEL}/2?sort=neuron&page=2", f"/{MODEL}/2/7"]
    pages.append(urls.search_url(MODEL, "cat"))
    for path in pages:
        href = alternate_href(site.soup(path))
        assert site.json(href), href
        assert href.split("?")[0].endswith(".json")


def test_htmx_request_gets_the_content_block_only(site):
    for path in (f"/{MODEL}/1", f"/{MODEL}/1/3", urls.search_url(MODEL, "dog"), f"/{MODEL}"):
        full = site.get(path)
        fragment = site.get(path, headers={"HX-Request": "true"})
        assert "<html" in full.text and "<html" not in fragment.text and "<body" not in fragment.text
        assert fragment.status_code == 200 and "HX-Request" in fragment.headers["vary"].split(", ")
        soup = BeautifulSoup(fragment.text, "html.parser")
        assert soup.find("h1") is not None and soup.find("table") is not None
    restore = site.get(f"/{MODEL}/1", headers={"HX-Request": "true", "HX-History-Restore-Request": "true"})
    assert "<html" in restore.text, "a history restore needs the whole page"


def test_pages_use_only_local_assets(site):
    assert site.get("/-/static/style.css").status_code == 200
    assert site.get("/-/static/htmx.min.js").status_code == 200
    soup = site.soup(f"/{MODEL}/1/3")
    for tag in soup.find_all(["script", "link", "img"]):
        ref = tag.get("src") or tag.get("href") or ""
        assert not re.match(r"^(https?:)?//", ref), ref


def test_unexpected_error_is_a_generic_500(site, monkeypatch):
    def broken(session):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(pagedata, "models_page", broken)
    r = site.get("/")
    assert_error(r, 500, False)
    assert "secret internal detail" not in r.text
    r = site.get("/-/models.json")
    assert_error(r, 500, True)
    assert "secret internal detail" not in r.text


def test_unmigrated_database_is_a_503_naming_the_command(tmp_path):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'empty.sqlite'}"))
    with running_server(app) as base:
        r = httpx.get(base + "/-/models.json")
    assert r.status_code == 503 and r.json()["ok"] is False
    assert "needle db upgrade" in r.json()["hint"]


def test_pages_are_gzipped_for_clients_that_accept_it(site, db_url):
    path = f"/{MODEL}/1/3"
    with site.http.stream("GET", path, headers={"Accept-Encoding": "gzip"}) as r:
        packed = r.read()  # decoded by httpx
        sent = r.num_bytes_downloaded  # the bytes on the wire
    plain = site.get(path, headers={"Accept-Encoding": "identity"})
    assert r.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert packed == plain.content, "the compressed page is the same page"
    assert sent < len(plain.content) / 2, (sent, len(plain.content))
    assert "Accept-Encoding" in r.headers["vary"] and "HX-Request" in r.headers["vary"]
    assert r.headers["content-security-policy"] == plain.headers["content-security-policy"]
    for json_path in (f"{path}.json", f"/{MODEL}.json"):
        assert site.get(json_path, headers={"Accept-Encoding": "gzip"}).headers.get("content-encoding") == "gzip"
    tiny = site.get("/-/health", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in tiny.headers, "answers under 1 KiB go out as they are"

    off = create_app(Settings(database_url=db_url, gzip_level=0))  # NEEDLE_GZIP_LEVEL=0: behind a compressing proxy
    with running_server(off) as base:
        r = httpx.get(base + path, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert len(r.content) == len(plain.content) and "Layer 1 · Neuron 3" in r.text  # its permalink has another port


def test_head_is_answered_like_get_without_a_body(site):
    for path in (f"/{MODEL}/1/3", f"/{MODEL}/1/3.json", f"/{MODEL}", "/-/static/style.css"):
        get = site.get(path, headers={"Accept-Encoding": "identity"})
        head = site.http.head(path, headers={"Accept-Encoding": "identity"})
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert int(head.headers["content-length"]) == len(get.content), path
        assert "content-security-policy" in head.headers
    missing = site.http.head(f"/{MODEL}/1/999")
    assert missing.status_code == 404 and missing.content == b""
