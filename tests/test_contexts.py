"""What a person reads in a context: characters split across byte tokens are shown whole, and
line breaks break the line (a run of them once).

A tiny Llama (a sentencepiece-style tokenizer with byte fallback: "é" is <0xC3> then <0xA9>) is
indexed over a corpus of accented letters, curly quotes, emoji and newlines through the user's
code path, and its neuron page is read over real HTTP: every context, read as a person reads it,
is a piece of the corpus, with no <0x..> in it but where a window cut a character in two.
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from app import urls
from app.config import Settings
from app.fastpage import PageSpans, TokenTexts, context_tokens
from app.main import create_app
from app.tokens import joined_bytes
from needle.cli import index_model
from tests.live_server import get_json, get_soup, running_server
from tests.tinymodels import build_tiny

LINES = ["the café’s crème brûlée 😀 is naïve", "the dog is in “the” house — déjà vu", "print(self) for résumé"]
BYTES = re.compile(r"(?:<0x[0-9A-F]{2}>)+")
ONE = {"positive": 1.0, "negative": 1.0}  # colour scales


@pytest.fixture(scope="module")
def page(tmp_path_factory, _sqlite_template):
    import shutil

    root = tmp_path_factory.mktemp("contexts")
    path = build_tiny("llama", root / "model")
    corpus = root / "corpus.txt"
    # every other line is followed by a blank line (a run of two line breaks)
    corpus.write_text("\n".join(line + "\n" * (i % 2) for i, line in enumerate(LINES * 12)), encoding="utf-8")
    db = root / "needle.sqlite"
    shutil.copy(_sqlite_template, db)
    url = f"sqlite:///{db}"
    index_model(Settings(database_url=url), str(path), "bytes", corpus=str(corpus), context=16, quiet=True)
    with running_server(create_app(Settings(database_url=url))) as base, httpx.Client(base_url=base, timeout=30) as http:
        soup = get_soup(http, urls.neuron_url("bytes", 1, 3))
        data = get_json(http, urls.neuron_url("bytes", 1, 3, fmt="json"))
    return soup, data, corpus.read_text(encoding="utf-8")


def test_the_tokenizer_splits_these_characters_into_byte_tokens(page):
    _, data, _ = page
    tokens = [t for ex in data["examples"] for t in ex["tokens"]]
    assert "<0xC3>" in tokens and "<0xE2>" in tokens, "the test needs byte-fallback tokens in its contexts"
    assert "\n" in tokens


def test_each_context_reads_as_a_piece_of_the_corpus(page):
    soup, data, corpus = page
    contexts = soup.select("ol.contexts .ctx-tokens")
    assert len(contexts) >= len(data["examples"]) > 0
    seen = set()
    for ctx in contexts:
        spans = ctx.select(".t")
        shown = "".join(s.get_text() for s in spans)
        middle = _middle(shown)
        assert not BYTES.search(middle), shown  # <0x..> only where the window cut a character
        assert middle.replace("↵", "\n").strip() in corpus, shown
        seen.update(ch for ch in "éû’“😀—" if ch in shown)
        # a line break in the text is a ↵; a run of them breaks the line once, after its last ↵
        # (inside that newline token's span), and a run the window starts with does not
        assert _lines(ctx) == _expected_lines(shown), shown
        for br in ctx.find_all("br"):
            assert br.parent.name == "span" and br.parent.get_text().endswith("↵"), str(br.parent)
    assert set("é’“—") <= seen, seen
    emoji = ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    whole = any(ex["tokens"][i : i + 4] == emoji for ex in _all_examples(data) for i in range(len(ex["tokens"])))
    assert ("😀" in seen) == whole


def _lines(ctx) -> list[str]:
    """A context's text as it is laid out: split where a <br> breaks the line."""
    from bs4 import BeautifulSoup

    copy = BeautifulSoup(str(ctx), "html.parser")
    for br in copy.find_all("br"):
        br.replace_with("\n")
    return copy.get_text().split("\n")


def _expected_lines(shown: str) -> list[str]:
    """shown (its ↵ marks) split after each run of ↵ but one it starts with."""
    return re.sub(r"↵+", lambda m: m.group() + ("" if m.start() == 0 else "\n"), shown).split("\n")


def _all_examples(data: dict) -> list[dict]:
    return [*data["examples"], *(ex for b in data["interval_samples"] for ex in b["examples"])]


def _middle(shown: str) -> str:
    """shown without the <0x..> groups at its very start and end (a window cut inside a character)."""
    start = BYTES.match(shown)
    shown = shown[start.end():] if start else shown
    end = re.search(r"(?:<0x[0-9A-F]{2}>)+$", shown)
    return shown[: end.start()] if end else shown


def test_the_tokens_before_a_split_character_are_thin_blocks_that_name_their_bytes(page):
    soup, _, _ = page
    parts = soup.select("ol.contexts .ctx-tokens .t.part")
    assert parts, "a character's leading byte tokens are drawn as thin blocks"
    for s in parts:
        assert s.get_text() == ""
        assert BYTES.match(s["title"]), s["title"]  # hover: the token's own bytes
    complete = [s for s in soup.select("ol.contexts .ctx-tokens .t") if s.get_text() == "é"]
    assert complete and all(s["title"].startswith("<0xA9>") for s in complete), "é is shown on <0xA9>, which completes it"


def _render(tokens: list[str | None]) -> list[tuple[str, str]]:
    from bs4 import BeautifulSoup

    n = len(tokens)
    ex = {"tokens": tokens, "token_ids": list(range(n)), "activations": [1.0] * n, "max_index": 0}
    html = str(context_tokens(ex, ONE))
    # the neuron page renders all its contexts at once (PageSpans): the same spans
    page = PageSpans(TokenTexts(dict(enumerate(tokens))), ONE, [[(np.arange(n), np.ones(n, np.float16), 0)]])
    assert str(page.html(0, 0)) == html
    spans = BeautifulSoup(html, "html.parser").select(".t")
    return [(s.get_text(), " ".join(c for c in s["class"] if c == "part")) for s in spans]


@pytest.mark.parametrize(
    ("tokens", "shown"),
    [
        # ’ = E2 80 99 across two byte-level tokens; shown on the token that completes it
        ([" it", "<0xE2><0x80>", "<0x99>", "s"], [(" it", ""), ("", "part"), ("’", ""), ("s", "")]),
        # 😀 = F0 9F 98 80 over four sentencepiece byte tokens
        (["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"], [("", "part"), ("", "part"), ("", "part"), ("😀", "")]),
        # a window that starts inside a character, and one that ends inside one: the bytes stay
        (["<0x99>", "a", "<0xC3>"], [("<0x99>", ""), ("a", ""), ("<0xC3>", "")]),
        # two characters in one token, and a lead byte that is not followed by its continuation
        (["<0xC3><0xA9><0xC3><0xA8>", "<0xC3>", "b"], [("éè", ""), ("<0xC3>", ""), ("b", "")]),
        # a byte token, then a text token, then one that continues nothing
        (["<0xC3>", "x", "<0xA9>"], [("<0xC3>", ""), ("x", ""), ("<0xA9>", "")]),
        # invalid UTF-8 (an overlong lead byte, a surrogate) stays as bytes
        (["<0xC0>", "<0x80>", "<0xED><0xA0><0x80>"], [("<0xC0>", ""), ("<0x80>", ""), ("<0xED><0xA0><0x80>", "")]),
        # a token that only looks like bytes in part is text
        (["<0xC3>x", "<0xA9>"], [("<0xC3>x", ""), ("<0xA9>", "")]),
        # newlines: ↵ and a line break
        (["a\nb", "\n"], [("a↵b", ""), ("↵", "")]),
    ],
)
def test_context_text(tokens, shown):
    assert _render(tokens) == shown


@pytest.mark.parametrize(
    ("tokens", "lines"),
    [
        (["a", "\n", "b"], ["a↵", "b"]),
        # blank lines: one break after the run; a run the window starts with breaks nothing
        (["\n", "\n", "a", "\n", "\n\n", "b", "\n"], ["↵↵a↵↵↵", "b↵", ""]),
        (["x\n\ny", "\n", "z"], ["x↵↵", "y↵", "z"]),
        # a newline inside a split character's run of byte tokens
        (["a", "\n", "<0xC3>", "<0xA9>", "\n", "\n"], ["a↵", "é↵↵", ""]),
        (["no breaks at all"], ["no breaks at all"]),
    ],
)
def test_a_run_of_line_breaks_breaks_the_line_once(tokens, lines):
    from bs4 import BeautifulSoup

    n = len(tokens)
    ex = {"tokens": tokens, "token_ids": list(range(n)), "activations": [0.5] * n, "max_index": 0}
    html = str(context_tokens(ex, ONE))
    page = PageSpans(TokenTexts(dict(enumerate(tokens))), ONE, [[(np.arange(n), np.full(n, 0.5, np.float16), 0)]])
    assert str(page.html(0, 0)) == html
    assert _lines(BeautifulSoup(html, "html.parser")) == lines


def test_joined_bytes_leaves_text_tokens_alone():
    assert joined_bytes(["the", " dog", None, "\n"]) == {}
    assert joined_bytes(["<0xC3>", "<0xA9>"]) == {0: "", 1: "é"}



def test_a_chip_may_wrap_only_past_long_chip_characters():
    from app.tokens import LONG_CHIP, chip_html

    assert str(chip_html(" dog\n")) == "␣dog↵"
    assert str(chip_html("IncrementalEncoder")) == "IncrementalEncoder"  # 18: never wraps
    long = '<script>alert("x")</script> ' * 2
    assert len(long) > LONG_CHIP
    assert str(chip_html(long)) == (
        '<span class="long">&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;␣&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;␣</span>'
    )
    assert str(chip_html(None)) == "∅" and str(chip_html("")) == "∅"
