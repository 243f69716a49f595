"""Real-browser tests: Playwright drives Debian's chromium (/usr/bin/chromium, or
NEEDLE_CHROMIUM) through the dashboard, against a real uvicorn server on the bundled demo
model with a worker thread beside it, as `needle demo` / `needle serve --with-worker` run it.

Without chromium (or the playwright package) these tests skip, saying why; with
NEEDLE_REQUIRE_BROWSER=1 (as .ci/run sets) they fail instead. ./scripts/test.sh installs
Debian's chromium when it is missing (never `playwright install`, which downloads).

Every step saves a full-page screenshot to NEEDLE_ARTIFACTS (default test-artifacts/browser/
at the repository root), named <test>-<step number>-<step>.png; a test that fails also saves
<test>-failed.png, where it stopped. Every walk fails on a console error, an uncaught page
error, a Content-Security-Policy violation or an error answer from the server.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.tokens import LONG_CHIP
from tests.live_server import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("NEEDLE_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("NEEDLE_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(os.environ.get("NEEDLE_ARTIFACTS") or ROOT / "test-artifacts" / "browser")
# The demo's corpus, cut to a few seconds of work (`needle demo` reads 262,144 tokens).
DEMO_TOKENS = 4096
# The neuron the live requests run on: comparison operators (README, "The demo model").
LIVE_NEURON = (3, 102)
DEMO_SAE = "l2-mlp-3072"  # the shipped SAE (assets/demo-sae), as `needle demo` names it
# A feature whose probe results the demo fixture stores, for the feature page and its F1 plots.
FEATURE = "is_keyword"
FEATURE_KS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32, 64, 128, 256)  # the probes stage's k, for d_mlp 256 and up
LIVE_TEXT = "if x != y and a <= b:\n    return x"
WORKER_TIMEOUT_MS = 90_000  # the worker thread loads the model on its first job

# Reports every CSP violation (also as a console error, in every frame), with what was blocked.
CSP_WATCH = """
document.addEventListener("securitypolicyviolation", function (e) {
  console.error("CSP violation: " + e.violatedDirective + " blocked " + (e.blockedURI || "inline") +
                " in " + e.sourceFile + ":" + e.lineNumber);
});
"""


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"a browser is required (NEEDLE_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(f"real-browser tests skipped: {reason}")


@pytest.fixture(scope="module")
def chromium() -> str:
    """The chromium binary, checked before the demo is indexed, so a missing one skips at once."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"there is no chromium at {CHROMIUM} (Debian: apt-get install -y chromium; "
                     "./scripts/test.sh installs it when it can)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15_000)  # a neuron page takes a few seconds on a busy 2-core machine

    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=chromium)
        except Exception as exc:  # noqa: BLE001 - any launch failure means "no usable browser"
            _unavailable(f"chromium at {chromium} does not start: {exc}")
        yield b
        b.close()


@dataclass
class Demo:
    base: str  # the server's URL, without a trailing slash
    model: str
    n_layers: int
    d_mlp: int
    settings: object = None  # the server's app.config.Settings

    def url(self, path: str = "") -> str:
        return f"{self.base}/{self.model}{path}"


@pytest.fixture(scope="module")
def demo(chromium, tmp_path_factory):
    """The bundled demo model indexed as `needle demo` indexes it (its name, model folder and
    stdlib corpus, from the same settings) into a fresh SQLite database, with DEMO_TOKENS corpus
    tokens and without the demo's sparse probes and precomputed clamp curves, which cost minutes
    of CPU whatever the token counts and which no step here reads; then served by a real uvicorn
    server with a worker thread beside it for the live requests, as `needle serve --with-worker`."""
    from app.config import Settings
    from app.db import get_engine, upgrade
    from app.main import create_app
    from needle.cli import DEMO_MODEL, DEMO_SAE, DEMO_SAE_NAME, index_model, start_background_worker
    from needle.sae import import_folder

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'demo.sqlite'}"
    # live requests on, and permalinks on this server (whatever NEEDLE_* the environment sets)
    settings = Settings(database_url=url, demo_tokens=DEMO_TOKENS, live_requests=True, public_url="")
    engine = get_engine(settings)
    upgrade(engine)
    index_model(settings, str(DEMO_MODEL), settings.demo_name, corpus=settings.demo_corpus,
                tokens=settings.demo_tokens, clamp=False, quiet=True)
    # the demo's shipped SAE, its latents' stages run here (seconds on DEMO_TOKENS), as `needle demo` imports it
    import_folder(settings, settings.demo_name, str(DEMO_SAE), sae_name=DEMO_SAE_NAME, quiet=True)
    store_feature(engine, settings.demo_name)
    store_curve(engine, settings.demo_name, *CURVE_NEURON)
    worker = start_background_worker(engine, settings)
    try:
        with running_server(create_app(settings)) as base:
            import httpx

            info = httpx.get(f"{base}/{settings.demo_name}.json", timeout=10).json()
            yield Demo(base, settings.demo_name, int(info["n_layers"]), int(info["d_mlp"]), settings)
    finally:
        worker.stopping.set()


def store_feature(engine, model: str) -> None:
    """FEATURE's probe results in every layer, stored as the probes stage stores them (the F1
    numbers made up: probing the demo costs minutes), so that its feature page has its plots."""
    from app import queries
    from app.db import session_scope

    with session_scope(engine) as s:
        m = queries.get_model(s, model, tokenizer=False)
        layers = []
        for layer in range(m.n_layers):
            curve = [{"k": k, "f1": round(0.5 + 0.45 * (1 - 0.8 ** k) - 0.02 * layer, 4)} for k in FEATURE_KS
                     if k <= m.d_mlp]
            top = [{"neuron": n, "mean_dif": 1.0 - 0.1 * n, "f1": 0.5, "precision": 0.5, "recall": 0.5} for n in range(6)]
            layers.append({"feature": FEATURE, "layer": layer, "best_neuron": 0, "best_f1": curve[0]["f1"],
                           "best_precision": 0.6, "best_recall": 0.7, "top_neurons": top, "curve": curve,
                           "pruned_curve": curve[7:]})
        queries.replace_probes(
            s, m.id, {"specs": ["python"], "description": "made up for the browser tests", "settings": {}},
            [{"name": FEATURE, "kind": "token", "aggregation": "none", "source": "python", "description": "keywords",
              "counts": {"train_pos": 300, "train_neg": 700, "test_pos": 130, "test_neg": 300}, "status": "probed",
              "reason": None, "best_layer": 0, "best_neuron": 0, "best_f1": layers[0]["best_f1"]}],
            layers, [],
        )


CURVE_NEURON = (2, 100)  # a neuron with a stored clamp curve (made up, as `needle index` stores one)


def store_curve(engine, model: str, layer: int, neuron: int) -> None:
    """One clamp curve on the neuron, stored as `needle index` stores it (its numbers made up: the
    demo's clamp stage costs a minute), so that its page draws the clamp plot without a sweep."""
    from app import queries
    from app.db import session_scope

    values = [-50.0 + 5.0 * i for i in range(21)]
    probs = [round(0.9 / (1.0 + 2.718 ** (-v / 10.0)), 4) for v in values]
    with session_scope(engine) as s:
        m = queries.get_model(s, model, tokenizer=False)
        queries.add_clamp_curve(s, m.id, layer, neuron, prompt="def f(x):", target="return", positions="all",
                                values=values, source="index",
                                result={"token_id": 1, "token": "return", "note": None, "probs": probs,
                                        "baseline": {"activation": 0.5, "prob": probs[10]},
                                        "top_tokens": {"low": [{"token_id": 2, "token": " x", "prob": 0.3}],
                                                       "high": [{"token_id": 1, "token": "return", "prob": 0.9}]}})


class Walk:
    """One test's browser page: screenshots by step, and every problem the page reports."""

    def __init__(self, page, demo: Demo, name: str):
        self.page, self.demo, self.name = page, demo, name
        self.steps = 0
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"uncaught page error: {exc}"))
        page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            self.problems.append(f"console error: {message.text} ({where})")

    def _response(self, response) -> None:
        if response.url.startswith(self.demo.base) and response.status >= 400:
            self.problems.append(f"HTTP {response.status} for {response.request.method} {response.url}")

    def goto(self, path: str):
        """Open a path of the server; returns the response (asserted 200)."""
        response = self.page.goto(self.demo.base + path)
        assert response is not None and response.status == 200, (path, response and response.status)
        return response

    def shot(self, step: str, panel=None) -> None:
        """A full-page screenshot of this step; with panel (a locator), that element's too, as
        <name>-panel.png, since a neuron page is several screens long."""
        self.steps += 1
        name = f"{self.name}-{self.steps:02d}-{step}"
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        if panel is not None:
            panel.screenshot(path=str(ARTIFACTS / f"{name}-panel.png"))

    def assert_clean(self) -> None:
        assert not self.problems, "the browser reported problems:\n" + "\n".join(self.problems)


@pytest.fixture
def walk(request, browser, demo):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=demo.base,
                                  permissions=["clipboard-read", "clipboard-write"])
    context.set_default_timeout(15_000)
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    w = Walk(page, demo, request.node.name.removeprefix("test_"))
    yield w
    if getattr(request.node, "call_raised", False):
        # the page may be gone: the failure itself is what matters
        with suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / f"{w.name}-failed.png"), full_page=True)
    context.close()


def expect(*args, **kwargs):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(*args, **kwargs)


@contextmanager
def other_site(html: str) -> Iterator[str]:
    """Serve one HTML page from another site (http://localhost:PORT/) while inside the block."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def neuron_path(demo: Demo, layer: int, neuron: int) -> str:
    return f"/{demo.model}/{layer}/{neuron}"


def assert_on_neuron(walk: Walk, layer: int, neuron: int) -> None:
    expect(walk.page).to_have_url(walk.demo.base + neuron_path(walk.demo, layer, neuron))
    expect(walk.page.locator("h1")).to_have_text(f"Layer {layer} · Neuron {neuron}")


# ---------------------------------------------------------------- the walk through the steps


def test_open_the_demo_model_and_go_to_a_neuron(walk, demo):
    page = walk.page
    walk.goto("/")
    walk.shot("models")
    page.locator("main").get_by_role("link", name=demo.model, exact=True).click()
    expect(page).to_have_url(demo.url())
    expect(page.locator("h1")).to_contain_text(demo.model)
    walk.shot("model")
    page.locator(f'main table a[href="/{demo.model}/3"]').click()
    expect(page).to_have_url(demo.url("/3"))
    expect(page.locator("h1")).to_contain_text("Layer 3")
    walk.shot("layer")
    first = page.locator(f'main table a[href^="/{demo.model}/3/"]').first
    neuron = int(first.get_attribute("href").rsplit("/", 1)[1])
    first.click()
    assert_on_neuron(walk, 3, neuron)
    # what the index computed shows: decoded tokens, and the corpus's histogram and top contexts
    expect(page.locator("main table.decoding code.tok").first).to_be_visible()
    expect(page.locator("#firing svg").first).to_be_visible()
    assert page.locator("#firing ol.contexts .ctx-tokens span.t").count() > 0
    walk.shot("neuron")
    walk.assert_clean()


def test_follow_previous_and_next(walk, demo):
    page = walk.page
    walk.goto(neuron_path(demo, 1, 5))
    page.locator('a[rel~="next"]').click()
    assert_on_neuron(walk, 1, 6)
    walk.shot("next")
    page.locator('a[rel~="prev"]').click()
    page.locator('a[rel~="prev"]').click()
    assert_on_neuron(walk, 1, 4)
    walk.shot("previous-twice")
    # across a layer's end, both ways
    last = demo.d_mlp - 1
    walk.goto(neuron_path(demo, 0, last))
    page.locator('a[rel~="next"]').click()
    assert_on_neuron(walk, 1, 0)
    walk.shot("next-into-layer-1")
    page.locator('a[rel~="prev"]').click()
    assert_on_neuron(walk, 0, last)
    # the ends of the model have no link past them
    walk.goto(neuron_path(demo, 0, 0))
    expect(page.locator('a[rel~="prev"]')).to_have_count(0)
    expect(page.locator('a[rel~="next"]')).to_have_count(1)
    walk.assert_clean()


def test_search_a_token_and_click_a_result(walk, demo):
    page = walk.page
    walk.goto(f"/{demo.model}")
    form = page.locator("main form.search")
    form.locator('input[name="token"]').fill("return")
    walk.shot("query-typed")
    form.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(re.escape(demo.url("/search?token=return")) + "$"))
    expect(page.locator("h1")).to_contain_text("return")
    results = page.locator("main table.results tbody tr")
    expect(results.first).to_be_visible()
    assert results.count() >= 10
    walk.shot("results")
    link = results.nth(1).locator("a").first  # the second result: not just the first row
    match = re.fullmatch(rf"/{re.escape(demo.model)}/(\d+)/(\d+)", link.get_attribute("href"))
    assert match, link.get_attribute("href")
    layer, neuron = int(match[1]), int(match[2])
    link.click()
    assert_on_neuron(walk, layer, neuron)
    walk.shot("result-neuron")
    walk.assert_clean()


def test_tab_reaches_the_search_strip_s_best_neuron_first(walk, demo):
    """The score strip's dots are links: Tab from the search form reaches the best neuron's dot first
    (they were drawn, and so tabbed, from #50 up), and Enter opens its page."""
    page = walk.page
    walk.goto(f"/{demo.model}/search?token=def")
    # the copy drawn on top looks like the best dot (a <use> takes no style from the page's selectors)
    fills = page.evaluate("""() => [document.querySelector('figure.score-strip circle.best'),
                                    document.querySelector('figure.score-strip .on-top')].map(e => getComputedStyle(e).fill)""")
    assert fills[0] == fills[1] == "rgb(176, 69, 47)", fills
    page.locator("main form.search button").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => !!document.activeElement.closest('figure.score-strip')"):
            break
    else:
        raise AssertionError("Tab never reached the score strip")
    title = page.evaluate("() => document.activeElement.querySelector('title').textContent")
    assert title.startswith("#1: "), title
    # the best dot's copy on top steps aside while #1 has the focus, so its focus mark shows; it is back for #2
    on_top = "() => getComputedStyle(document.querySelector('figure.score-strip .on-top')).visibility"
    assert page.evaluate(on_top) == "hidden"
    walk.shot("strip-focused")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.querySelector('title').textContent").startswith("#2: ")
    assert page.evaluate(on_top) == "visible"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    layer, neuron = map(int, re.fullmatch(r"#1: layer (\d+), neuron (\d+), score .*", title).groups())
    assert_on_neuron(walk, layer, neuron)
    walk.assert_clean()


def test_test_your_own_text_shows_highlights(walk, demo):
    page = walk.page
    layer, neuron = LIVE_NEURON
    walk.goto(neuron_path(demo, layer, neuron))
    panel = page.locator("#your-text")
    expect(panel.locator("#text-result .ctx-tokens span.t")).to_have_count(0)
    panel.locator('textarea[name="text"]').fill(LIVE_TEXT)
    walk.shot("text-typed")
    panel.get_by_role("button", name="Run").click()
    # htmx swaps in the polling panel, which polls until the worker has run the text
    tokens = page.locator("#text-result .ctx-tokens span.t")
    expect(tokens.first).to_be_visible(timeout=WORKER_TIMEOUT_MS)
    expect(page).to_have_url(demo.base + neuron_path(demo, layer, neuron))  # in place, not a new page
    walk.shot("highlights", panel=page.locator("#your-text"))
    # the highlights are the run's activations, token by token
    json_link = page.locator("#text-result a", has_text="JSON")
    run = page.request.get(demo.base + json_link.get_attribute("href")).json()["run"]
    assert run["state"] == "done" and "".join(run["result"]["tokens"]) == LIVE_TEXT
    acts = run["result"]["activations"]
    assert tokens.count() == len(acts)
    titles = tokens.evaluate_all("spans => spans.map(s => s.title)")
    for title, a in zip(titles, acts):
        assert title.endswith(f"activation {a:.4g}"), (title, a)
    # the max token is coloured (its background has alpha > 0: the style="" attributes are
    # not blocked by the Content-Security-Policy) and outlined
    top = page.locator("#text-result .ctx-tokens span.t.max")
    expect(top).to_have_count(1)
    assert tokens.evaluate_all("spans => spans.findIndex(s => s.classList.contains('max'))") == run["result"]["max_index"]
    background = top.evaluate("s => getComputedStyle(s).backgroundColor")
    alpha = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", background)
    assert alpha and float(alpha[4] or 1) > 0.05, background
    walk.assert_clean()


def test_clamp_sweep_shows_the_plot(walk, demo):
    page = walk.page
    layer, neuron = LIVE_NEURON
    walk.goto(neuron_path(demo, layer, neuron))
    expect(page.locator("#clamp-result svg.plot:visible")).to_have_count(0)
    form = page.locator("#clamp form.clamp-form").first
    form.locator('input[name="count"]').fill("11")
    walk.shot("clamp-form")
    form.get_by_role("button", name="Sweep").click()
    plot = page.locator("#clamp-result svg.plot:visible")
    expect(plot).to_be_visible(timeout=WORKER_TIMEOUT_MS)
    expect(page.locator("#clamp-result .error-message")).to_have_count(0)
    box = plot.bounding_box()
    assert box and box["width"] > 200 and box["height"] > 100, box
    walk.shot("clamp-plot", panel=page.locator("#clamp-result"))
    # the plot is this sweep's: the stored curve has the 11 values asked for, a probability each
    json_link = page.locator("#clamp-result a", has_text="JSON").first
    curve = page.request.get(demo.base + json_link.get_attribute("href")).json()
    curve = curve.get("curve", curve)
    assert len(curve["values"]) == 11 and len(curve["probs"]) == 11
    assert all(0.0 <= p <= 1.0 for p in curve["probs"])
    walk.assert_clean()


def test_sweep_again_from_a_curve_s_page_with_one_thing_changed(walk, demo):
    """A person opens a sweep's permalink, finds its form filled with what that sweep asked, changes
    one number and sweeps again: the new curve's own page plots it, with the rest kept."""
    page = walk.page
    walk.goto(neuron_path(demo, *LIVE_NEURON))
    form = page.locator("#clamp form.clamp-form").first
    form.locator('input[name="count"]').fill("9")
    form.locator('input[name="start"]').fill("-30")
    form.get_by_role("button", name="Sweep").click()
    permalink = page.locator("#clamp-result a", has_text="Permalink").first
    expect(permalink).to_be_visible(timeout=WORKER_TIMEOUT_MS)
    permalink.click()
    expect(page).to_have_url(re.compile(r"/clamp/\d+$"))
    first_url = page.url
    again = page.locator("section#again form")
    expect(again.locator('input[name="count"]')).to_have_value("9")
    expect(again.locator('input[name="start"]')).to_have_value("-30")
    walk.shot("sweep-again-form", panel=page.locator("section#again"))
    again.locator('input[name="count"]').fill("5")
    again.get_by_role("button", name="Sweep").click()
    expect(page).not_to_have_url(first_url)
    expect(page).to_have_url(re.compile(r"/clamp/\d+$"))
    plot = page.locator("#clamp-result svg.plot:visible")
    expect(plot).to_be_visible(timeout=WORKER_TIMEOUT_MS)
    walk.shot("sweep-again-plot", panel=page.locator("#clamp-result"))
    first, second = (page.request.get(url + ".json").json()["curve"] for url in (first_url, page.url))
    assert len(first["values"]) == 9 and len(second["values"]) == 5 and len(second["probs"]) == 5
    assert second["values"][0] == first["values"][0] == -30
    assert (second["prompt"], second["token"], second["positions"]) == (first["prompt"], first["token"], first["positions"])
    walk.assert_clean()


def test_an_error_in_a_panel_is_shown_and_the_form_works_again(walk, demo):
    """htmx swaps nothing on an error answer by default: a bad sweep would look like a dead
    button. Needle shows the error where the result goes, and the form can be sent again."""
    page = walk.page
    walk.goto(neuron_path(demo, *LIVE_NEURON))
    form = page.locator("#clamp form.clamp-form").first
    form.locator('input[name="start"]').fill("5")
    form.locator('input[name="stop"]').fill("1")
    form.locator('input[name="count"]').fill("5")
    form.get_by_role("button", name="Sweep").click()
    error = page.locator("#clamp-result.error-panel")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Error 400")
    expect(error).to_contain_text("starts at 5, not below its end 1")
    walk.shot("clamp-error", panel=error)
    # the 400 itself is reported twice (the response, and Chrome's console line for it); nothing else
    assert [p for p in walk.problems if not ("400" in p and "/clamp" in p)] == [], walk.problems
    walk.problems.clear()
    # the panel kept its id: a good range now gives the plot in the same place
    form.locator('input[name="start"]').fill("-5")
    form.get_by_role("button", name="Sweep").click()
    expect(page.locator("#clamp-result svg.plot:visible")).to_be_visible(timeout=WORKER_TIMEOUT_MS)
    expect(page.locator("#clamp-result .error-message")).to_have_count(0)
    walk.assert_clean()


def test_pages_send_a_content_security_policy_that_breaks_nothing(walk, demo):
    """Every page kind, in a browser that enforces the policy: no violation (Walk fails on one)."""
    page = walk.page
    csp = walk.goto(neuron_path(demo, *LIVE_NEURON)).header_value("content-security-policy")
    assert csp and "script-src" in csp, csp
    script_src = re.search(r"script-src ([^;]*)", csp)[1]
    assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src, csp
    # htmx and the page's own script did load under it
    assert page.evaluate("typeof window.htmx") == "object"
    for path in ("/", f"/{demo.model}", f"/{demo.model}/2", f"/{demo.model}/2?sort=neuron",
                 f"/{demo.model}/search?token=def", f"/{demo.model}/features", "/-/jobs"):
        response = walk.goto(path)
        assert response.header_value("content-security-policy"), path
    walk.shot("jobs-page")
    # an htmx swap under the policy: the layer page's sort links fetch and swap #content
    walk.goto(f"/{demo.model}/2")
    page.locator("main a", has_text="neuron index").first.click()
    expect(page).to_have_url(demo.url("/2?sort=neuron"))
    expect(page.locator("main table a").first).to_have_text("0")
    walk.shot("layer-sorted-by-htmx")
    walk.assert_clean()


# ---------------------------------------------------------------- navigation (issue 7's contract)


def test_needle_js_is_loaded_deferred(walk, demo):
    walk.goto(neuron_path(demo, 2, 10))
    scripts = walk.page.locator('script[src*="needle.js"]')
    expect(scripts).to_have_count(1)
    assert scripts.evaluate("s => s.defer") is True
    walk.assert_clean()


def test_keyboard_j_k_slash_and_r(walk, demo):
    page = walk.page
    walk.goto(neuron_path(demo, 2, 10))
    page.keyboard.press("j")
    assert_on_neuron(walk, 2, 11)
    walk.shot("j-next")
    page.keyboard.press("k")
    assert_on_neuron(walk, 2, 10)
    page.keyboard.press("k")
    assert_on_neuron(walk, 2, 9)
    walk.shot("k-previous")
    # keys typed into a field are text, not shortcuts
    box = page.locator('#your-text textarea[name="text"]')
    box.click()
    page.keyboard.type("jkr")
    page.wait_for_timeout(500)
    expect(box).to_have_value("jkr")
    assert_on_neuron(walk, 2, 9)
    box.evaluate("b => b.blur()")
    # "/" focuses the header search box, which searches this model
    page.keyboard.press("/")
    search = page.locator("#search-q")
    expect(search).to_be_focused()
    expect(search).to_have_value("")  # the "/" itself is not typed into it
    # Escape leaves the box, and the keys are shortcuts again; "/" comes back to it
    page.keyboard.type("xyz")
    page.keyboard.press("Escape")
    expect(search).not_to_be_focused()
    page.keyboard.press("/")
    expect(search).to_be_focused()
    page.keyboard.press("Control+a")
    page.keyboard.type("def")
    walk.shot("slash-search")
    page.keyboard.press("Enter")
    expect(page).to_have_url(demo.url("/search?token=def"))
    expect(page.locator("main table.results tbody tr").first).to_be_visible()
    # "r": a random neuron of this model (a new page load, even if it drew the same neuron)
    with page.expect_navigation():
        page.keyboard.press("r")
    expect(page).to_have_url(re.compile(re.escape(demo.url()) + r"/\d+/\d+$"))
    expect(page.locator("h1")).to_have_text(re.compile(r"^Layer \d+ · Neuron \d+$"))
    walk.shot("r-random")
    walk.assert_clean()


def test_question_mark_shows_the_shortcuts_where_the_reader_is(walk, demo):
    """"?" opens the list of shortcuts in view without scrolling the page (it used to jump to the
    footer, 12,000 px down a neuron page); "?" or Escape closes it."""
    page = walk.page
    walk.goto(neuron_path(demo, 2, 10))
    page.evaluate("window.scrollTo(0, 1500)")
    help_list = page.locator("#shortcuts dl")
    for close in ("?", "Escape"):
        page.keyboard.press("?")
        expect(help_list).to_be_visible()
        assert page.evaluate("window.scrollY") == 1500
        assert help_list.evaluate("e => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.bottom <= innerHeight; }")
        walk.shot(f"shortcuts-{close}")
        page.keyboard.press(close)
        expect(help_list).to_be_hidden()
    walk.assert_clean()


def test_breadcrumbs(walk, demo):
    page = walk.page
    walk.goto(neuron_path(demo, 2, 10))
    crumbs = page.locator("nav.breadcrumbs")
    expect(crumbs).to_have_count(1)
    expect(crumbs).to_contain_text(demo.model)
    expect(crumbs).to_contain_text("10")
    walk.shot("neuron-crumbs")
    crumbs.locator(f'a[href="/{demo.model}/2"]').click()
    expect(page).to_have_url(demo.url("/2"))
    expect(page.locator("h1")).to_contain_text("Layer 2")
    walk.shot("layer")
    page.locator("nav.breadcrumbs").locator(f'a[href="/{demo.model}"]').click()
    expect(page).to_have_url(demo.url())
    page.locator("nav.breadcrumbs").locator('a[href="/"]').click()
    expect(page).to_have_url(demo.base + "/")
    expect(page.locator("h1")).to_have_text("Models")
    walk.shot("models")
    walk.assert_clean()


def test_jump_to_a_neuron(walk, demo):
    page = walk.page
    walk.goto(neuron_path(demo, 0, 0))
    form = page.locator("form.jump").first
    form.locator('input[name="layer"]').fill("3")
    form.locator('input[name="neuron"]').fill("102")
    form.locator('input[name="neuron"]').press("Enter")
    assert_on_neuron(walk, 3, 102)
    walk.shot("jumped")
    # from the model page too
    walk.goto(f"/{demo.model}")
    form = page.locator("form.jump").first
    form.locator('input[name="layer"]').fill("1")
    form.locator('input[name="neuron"]').fill(str(demo.d_mlp - 1))
    form.locator('input[name="neuron"]').press("Enter")
    assert_on_neuron(walk, 1, demo.d_mlp - 1)
    walk.assert_clean()


def test_copy_permalink(walk, demo):
    page = walk.page
    walk.goto(neuron_path(demo, 3, 102))
    button = page.locator("button.copy-permalink")
    expect(button).to_have_count(1)
    url = button.get_attribute("data-url")
    assert url and url.endswith(neuron_path(demo, 3, 102)), url
    page.evaluate("navigator.clipboard.writeText('nothing copied yet')")
    button.click()
    expect(button).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == url
    walk.shot("copied")
    expect(button).to_have_text("Copy permalink", timeout=5_000)  # back to its label, for the next copy
    # the permalink opens this neuron
    page.goto(url)
    assert_on_neuron(walk, 3, 102)
    walk.assert_clean()


def test_embed_card_in_another_sites_iframe(walk, demo):
    page = walk.page
    path = neuron_path(demo, 3, 102)
    top = page.request.get(demo.base + path + ".json").json()["input_tokens"][0]
    walk.goto(path + "?embed=true")
    card = page.locator("main")
    expect(card).to_contain_text("102")
    expect(card.locator(f'code.tok[title="token id {top["token_id"]}"]').first).to_be_visible()
    expect(page.locator("header.site")).to_have_count(0)  # a card, not the page
    expect(page.locator("#your-text")).to_have_count(0)
    walk.shot("card")
    # framed by a page of another site (a second local server: Chromium refuses a local frame
    # in a page from a public or unknown address), the card renders inside it
    html = (f'<!doctype html><title>blog</title><h1>A post</h1>'
            f'<iframe src="{demo.base}{path}?embed=true" width="700" height="600"></iframe>')
    with other_site(html) as embedder:
        page.goto(embedder)
        framed = page.frame_locator("iframe").locator("main")
        expect(framed).to_contain_text("102")
        expect(framed.locator(f'code.tok[title="token id {top["token_id"]}"]').first).to_be_visible()
        walk.shot("card-in-iframe")
    walk.assert_clean()


# A plot's drawn width, its smallest text in CSS pixels as drawn, the texts that stick out of it,
# and how many legend entries ("layer N") it has.
PLOT_TEXT = """svg => { const box = svg.getBoundingClientRect();
    const scale = box.width / svg.viewBox.baseVal.width, out = [], sizes = [];
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      sizes.push(parseFloat(getComputedStyle(t).fontSize) * scale);
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        out.push(t.textContent);
    }
    return {width: box.width, smallest: Math.min(...sizes), outside: out, classes: [...svg.classList],
            legend: [...svg.querySelectorAll('text')].filter(t => t.textContent.startsWith('layer ')).length}; }"""


def test_feature_plots_are_readable_on_a_desktop_and_a_phone(walk, demo):
    """The F1 plots of a feature page, a line per layer: at 1280 px each is drawn at least 640 px
    wide with its text at 12 px or more, and every label and legend entry lies inside the plot.
    At 390 px (a phone) the narrow drawing shows instead, its legend below the plot, with its text
    still 12 px or more; the wide one, shrunk to fit, had text of about 6.5 px."""
    walk.goto(f"/{demo.model}/features/{FEATURE}")
    plots = walk.page.locator("svg.curve:visible")
    for width, narrow, least in ((1280, False, 640), (390, True, 330)):
        walk.page.set_viewport_size({"width": width, "height": 900})
        expect(plots).to_have_count(2)
        for i in range(2):
            got = plots.nth(i).evaluate(PLOT_TEXT)
            assert ("narrow" in got["classes"]) is narrow and got["width"] >= least and got["smallest"] >= 12, (width, got)
            assert got["outside"] == [] and got["legend"] == demo.n_layers, (width, got)
        walk.shot("feature-plots" + ("-on-a-phone" if narrow else ""), plots.first)
    walk.assert_clean()


def test_an_sae_s_latents_beside_the_neurons(walk, demo):
    """The demo's SAE as a person reads it: from the model page to the SAE's quality and
    densities, its latents sorted by how high they fire, a latent's contexts and the neurons its
    decoder is made of, and from such a neuron back to the latents that use it."""
    page = walk.page
    sae = f"/{demo.model}/sae/{DEMO_SAE}"
    walk.goto(f"/{demo.model}")
    page.locator(f'#saes a[href="{sae}"]').click()
    expect(page).to_have_url(demo.base + sae)
    expect(page.locator("h1")).to_contain_text(f"SAE {DEMO_SAE}")
    quality = page.locator("main section.panel", has=page.locator("h2", has_text="Quality on held-out text"))
    for figure in ("L0", "Variance explained", "CE loss recovered"):
        expect(quality).to_contain_text(figure)
    expect(page.locator("#density table.density tbody tr").first).to_be_visible()
    walk.shot("sae")
    page.locator("main a", has_text="highest max activation first").click()
    expect(page).to_have_url(re.compile(r"sort=max"))
    first = page.locator(f'main table a[href^="{sae}/"]').first
    latent = int(first.get_attribute("href").rsplit("/", 1)[1])
    first.click()
    expect(page).to_have_url(f"{demo.base}{sae}/{latent}")
    expect(page.locator("h1")).to_have_text(f"Layer 2 · SAE {DEMO_SAE} · Latent {latent}")
    # the latent that fires highest has contexts with highlighted tokens, like a neuron
    expect(page.locator("#firing svg").first).to_be_visible()
    assert page.locator("#firing ol.contexts .ctx-tokens span.t").count() > 0
    expect(page.locator("#superposition h2")).to_have_text("The neurons it is made of")
    walk.shot("latent", page.locator("#superposition"))
    link = page.locator(f'#superposition table.links a[href^="/{demo.model}/2/"]').first
    neuron = int(link.get_attribute("href").rsplit("/", 1)[1])
    link.click()
    assert_on_neuron(walk, 2, neuron)
    expect(page.locator("#superposition h2")).to_have_text("Latents that use this neuron")
    assert page.locator(f'#superposition table.links a[href^="{sae}/"]').count() > 0
    walk.shot("neuron-with-its-latents", page.locator("#superposition"))
    walk.assert_clean()


def test_what_fires_on_a_typed_text(walk, demo):
    """From the model page to "what fires on your text": type a text, wait for the worker, pick
    a token to see its top units (the other tokens' lists stay hidden), open one of them."""
    page = walk.page
    walk.goto(f"/{demo.model}")
    page.locator("main a", has_text="What fires on your text").click()
    expect(page).to_have_url(demo.url("/text"))
    page.locator("#scan-form textarea").fill("def main():\n    return self.value == 42\n")
    walk.shot("form")
    page.locator("#scan-form button").click()
    expect(page).to_have_url(re.compile(rf"/{re.escape(demo.model)}/text/\d+$"))
    tokens = page.locator("#scan-result .scan-tokens a.scan-tok")
    expect(tokens.first).to_be_visible(timeout=60_000)
    assert tokens.count() > 5
    expect(page.locator("#tok-3")).to_be_hidden()
    tokens.nth(3).click()
    section = page.locator("#tok-3")
    expect(section).to_be_visible()
    expect(page.locator("#tok-2")).to_be_hidden()
    rows = section.locator("table.scan-units tbody tr")
    expect(rows.first).to_be_visible()
    assert rows.count() == 10
    walk.shot("a-token-s-units", section)
    link = rows.first.locator("a").first
    href = link.get_attribute("href")
    link.click()
    expect(page).to_have_url(demo.base + href)
    walk.assert_clean()


def test_compare_two_models_and_one_neuron_side_by_side(walk, demo, tmp_path):
    """A second copy of the demo model, one neuron's input weights replaced, compared with the demo:
    from the model page to the comparison, whose changed list leads with that neuron; its two
    cards side by side on a desktop, one above the other on a phone."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from needle.cli import DEMO_MODEL, index_model
    from needle.compare import compare_models

    edited = tmp_path / "edited"
    shutil.copytree(DEMO_MODEL, edited)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    with torch.no_grad():
        row = model.model.layers[1].mlp.up_proj.weight[5]  # the demo is a Llama: a neuron's input weights
        row.copy_(torch.randn(row.shape, generator=torch.Generator().manual_seed(0)) * row.std())
    model.save_pretrained(edited)
    index_model(demo.settings, str(edited), "demo-edited", clamp=False, quiet=True)
    compare_models(demo.settings, demo.model, "demo-edited", quiet=True)
    page = walk.page
    walk.goto(f"/{demo.model}")
    page.locator("main .compare-with a", has_text="demo-edited").click()
    expect(page).to_have_url(f"{demo.base}/-/compare/{demo.model}/demo-edited")
    expect(page.locator(".agreement")).to_have_text(re.compile(r"^\d+\.\d%$"))
    walk.shot("comparison")
    first = page.locator("#changed tbody tr a").first
    expect(first).to_have_text("1/5")
    first.click()
    expect(page).to_have_url(f"{demo.base}/-/compare/{demo.model}/demo-edited/1/5")
    cards = page.locator(".side-by-side article.neuron-card")
    expect(cards).to_have_count(2)
    left, right = cards.nth(0).bounding_box(), cards.nth(1).bounding_box()
    assert right["x"] >= left["x"] + left["width"] and abs(right["y"] - left["y"]) < 2, (left, right)
    walk.shot("side-by-side")
    page.set_viewport_size({"width": 390, "height": 844})
    left, right = cards.nth(0).bounding_box(), cards.nth(1).bounding_box()
    assert right["y"] >= left["y"] + left["height"], (left, right)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    walk.shot("on-a-phone")
    walk.assert_clean()


def test_no_page_is_wider_than_a_phone(walk, demo):
    """At 390 px (a phone), nothing makes the page scroll sideways: wide tables scroll inside their
    panels and plots inside their figures. Before, every page but the embed card was 464 to 1,065
    px wide. At 1280 px, no highlighted token runs past its context's edge."""
    page = walk.page
    paths = ["/", f"/{demo.model}", f"/{demo.model}/2", neuron_path(demo, *LIVE_NEURON),
             f"/{demo.model}/search?token=def", f"/{demo.model}/features", f"/{demo.model}/features/{FEATURE}",
             "/-/jobs", f"/{demo.model}/sae/{DEMO_SAE}", f"/{demo.model}/sae/{DEMO_SAE}/0"]
    overflowing = """() => { const out = []; for (const box of document.querySelectorAll('.ctx-tokens')) {
        const edge = box.getBoundingClientRect().right;
        for (const t of box.querySelectorAll('.t')) for (const r of t.getClientRects()) if (r.right > edge + 1) out.push(t.textContent);
      } return out; }"""
    walk.goto(neuron_path(demo, *LIVE_NEURON))
    assert page.locator(".ctx-tokens .t").count() > 100
    assert page.evaluate(overflowing) == []
    page.set_viewport_size({"width": 390, "height": 844})
    for path in paths:
        walk.goto(path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
    # every plot in full on a 390 px phone: none runs past its figure (the clamp curve's rising
    # half, the F1 plots' legend and the search strip's last layer were cut off at 460 px), and
    # each is its narrow drawing, its text 10.5 px or more with none outside it (the wide ones,
    # shrunk to fit, had text of 6.4 to 7.3 px)
    clipped = """() => [...document.querySelectorAll('main svg.plot')].filter(svg => {
        const box = svg.closest('figure') || svg.parentElement;
        return svg.getBoundingClientRect().right > box.getBoundingClientRect().right + 1; }).length"""
    for path, kinds in ((neuron_path(demo, *CURVE_NEURON), ["histogram", "clamp-curve"]),
                        (f"/{demo.model}/search?token=def", ["score-strip"]),
                        (f"/{demo.model}/features/{FEATURE}", ["curve", "curve"])):
        walk.goto(path)
        plots = page.locator("main svg.plot:visible")
        assert plots.count() == len(kinds), path
        for i, kind in enumerate(kinds):
            got = plots.nth(i).evaluate(PLOT_TEXT)
            assert kind in got["classes"] and "narrow" in got["classes"], (path, got)
            assert got["smallest"] >= 10.5 and got["outside"] == [], (path, got)
        assert page.evaluate(clipped) == 0, path
    walk.goto(neuron_path(demo, *LIVE_NEURON))
    walk.shot("neuron-on-a-phone")
    table = page.locator("main table.data").first
    assert table.evaluate("t => t.scrollWidth > t.clientWidth"), "the wide table scrolls on its own"
    walk.assert_clean()


def test_decoding_tables_fit_their_panels_on_a_desktop(walk, demo):
    """At 1280 px the input and output decodings sit side by side with every column in view (the
    score bars too), and at 1024 px they stack: no decoding panel scrolls sideways. Before, the
    input table ran 84-128 px past its panel at 1280 px (128: a token of a newline and 35 spaces)
    and 162 px at 1024 px."""
    page = walk.page
    scrolled = "() => [...document.querySelectorAll('.columns .panel')].map(p => p.scrollWidth - p.clientWidth)"
    import httpx

    def longest_token(key) -> int:
        data = httpx.get(demo.base + neuron_path(demo, *key) + ".json", timeout=30).json()
        return max(len(t["token"]) for t in data["input_tokens"])

    # the neurons whose top input tokens are longest make the widest tables
    sample = [(layer, neuron) for layer in range(demo.n_layers) for neuron in range(0, demo.d_mlp, 37)]
    longest = sorted(sample, key=longest_token, reverse=True)
    for width in (1280, 1024):
        page.set_viewport_size({"width": width, "height": 900})
        for key in [LIVE_NEURON, (2, 100), *longest[:4]]:  # 2/100: IncrementalEncoder (18 characters)
            walk.goto(neuron_path(demo, *key))
            panels = page.evaluate(scrolled)
            assert len(panels) == 2 and max(panels) <= 0, (width, key, panels)
            # ... and no token chip is broken across lines, but one of over LONG_CHIP characters
            broken = page.evaluate("""n => [...document.querySelectorAll('.columns code.tok')]
                .filter(c => [...c.textContent].length <= n && c.getClientRects().length > 1).map(c => c.textContent)""",
                                   LONG_CHIP)
            assert broken == [], (width, key, broken)
            tops = page.evaluate("() => [...document.querySelectorAll('.columns .panel')].map(p => p.getBoundingClientRect().top)")
            assert (tops[0] == tops[1]) == (width == 1280), (width, tops)  # side by side, or stacked
        walk.shot(f"neuron-decodings-{width}")
    walk.assert_clean()


def test_the_embed_card_reads_contexts_as_flowing_text(walk, demo):
    """The card shows its contexts as a few lines of running text: a line break is its ↵ alone and
    a run of spaces (code's indentation) one space wide, not a gap of many characters."""
    page = walk.page
    page.set_viewport_size({"width": 600, "height": 800})
    gaps = """() => { const box = document.querySelector('.neuron-card .ctx-tokens');
        const probe = document.createElement('span'); probe.textContent = '0'.repeat(20); box.appendChild(probe);
        const char = probe.getBoundingClientRect().width / 20; probe.remove();
        const out = []; let indents = 0;
        for (const t of document.querySelectorAll('.neuron-card .ctx-tokens .t')) {
          if (!/ {4,}/.test(t.textContent)) continue;
          indents += 1;   // a token with a run of spaces: as wide as its text with the run as one space
          const wide = [...t.getClientRects()].reduce((w, r) => w + r.width, 0);
          const chars = t.textContent.replace(/\\s+/g, ' ').length;
          if (wide > (chars + 1) * char) out.push([t.textContent, Math.round(wide / char)]);
        }
        return {out, indents, breaks: [...document.querySelectorAll('.neuron-card .ctx-tokens br')]
                                          .filter(b => getComputedStyle(b).display !== 'none').length}; }"""
    checked = 0
    for key in [(2, 100), LIVE_NEURON, (0, 5)]:
        walk.goto(neuron_path(demo, *key) + "?embed=true")
        got = page.evaluate(gaps)
        assert got["out"] == [] and got["breaks"] == 0, (key, got)
        checked += got["indents"]
    assert checked > 0, "the demo's code contexts have indentation runs to check"
    walk.shot("card-600")
    walk.assert_clean()


def test_the_next_page_of_a_layer_opens_at_its_top(walk, demo):
    """The pager at the foot of a layer's table swaps the next page in place (htmx) and shows it
    from its top, not from where the last page was scrolled to (its foot)."""
    page = walk.page
    walk.goto(f"/{demo.model}/1")
    first = page.locator("table.data tbody tr").first.inner_text()
    page.locator("nav.pager a[rel=next]").last.scroll_into_view_if_needed()
    assert page.evaluate("window.scrollY") > 1000, "the foot's pager is far down the page"
    page.locator("nav.pager a[rel=next]").last.click()
    page.wait_for_url(re.compile(r"page=2"))
    expect(page.locator("nav.pager span").first).to_have_text(re.compile(r"page 2 of"))
    assert page.locator("table.data tbody tr").first.inner_text() != first
    page.wait_for_function("window.scrollY === 0")
    assert page.locator("table.data tbody tr").first.is_visible()
    walk.shot("layer-page-2")
    walk.assert_clean()


def test_a_text_over_the_limit_is_refused_not_cut(walk, demo):
    """A paste longer than the limit stays whole in the box and the server's answer says how long it
    was and what the limit is (a maxlength attribute used to cut it silently); the box is named."""
    page = walk.page
    walk.goto(neuron_path(demo, *LIVE_NEURON))
    box = page.get_by_role("textbox", name="Test your own text")
    limit = int(page.request.get(demo.base + neuron_path(demo, *LIVE_NEURON) + ".json").json()["text_max_chars"])
    long_text = "def f(x):\n    return x\n" * (limit // 20)
    assert len(long_text) > limit
    box.fill(long_text)
    expect(box).to_have_value(long_text)
    page.locator("#your-text").get_by_role("button", name="Run").click()
    error = page.locator("#text-result .error-message, #text-result.error-panel, #your-text .error-panel")
    expect(error.first).to_contain_text(f"{len(long_text)} characters")
    expect(error.first).to_contain_text(str(limit))
    walk.shot("text-too-long", panel=page.locator("#your-text"))
    # the refusal itself (a 400, which the console reports too) is the only problem
    assert [p for p in walk.problems if not ("400" in p and "/text" in p)] == [], walk.problems
    walk.problems.clear()
