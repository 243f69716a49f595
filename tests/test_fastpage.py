"""app/fastpage.PageSpans renders a neuron page's context tokens all at once from the stored
arrays; it must write exactly what the per-example renderer (context_tokens, which the text
panel and the embed card still use) writes for the same example: hostile token text, tokens
missing from the vocabulary, negative, zero, signed-zero, non-finite and rounding-tie values,
the max mark at either end or out of range, contexts of different lengths."""

from __future__ import annotations

import numpy as np
import pytest

from app.examples import _example
from app.fastpage import PageSpans, TokenTexts, context_tokens, rounded_activations
from tests.synthetic import HOSTILE_TOKENS

VOCAB = ["plain", " space", "", "\n", "\t", *HOSTILE_TOKENS]


def _text() -> TokenTexts:
    pairs = {i: t for i, t in enumerate(VOCAB)}
    pairs[len(VOCAB) + 3] = None  # a stored id without text
    return TokenTexts(pairs)


def _contexts(rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    contexts = []
    for k in range(count):
        n = int(rng.integers(1, 40))
        ids = rng.integers(-2, len(VOCAB) + 6, size=n).astype(np.int32)  # some ids out of range, one without text
        acts = rng.normal(0, 3, size=n).astype(np.float16)
        acts[rng.random(n) < 0.15] = 0
        if n > 3:
            acts[1] = np.float16(-0.0)
            acts[2] = np.float16(1e-5)  # rounds to 0.0 (and a negative one to -0.0)
            acts[3] = -np.float16(1e-5)
        mark = [0, n - 1, n, -1, int(rng.integers(0, n))][k % 5]
        contexts.append((ids, acts, mark))
    return contexts


def _expected(text: TokenTexts, scale: dict, context: tuple[np.ndarray, np.ndarray, int]) -> str:
    """What context_tokens writes for the example the page builds from these arrays."""
    ids, acts, mark = context
    if 0 <= mark < len(acts):
        example = _example(ids, acts, text, "src", mark=mark)
    else:  # a mark out of range: _example cannot take it, context_tokens marks nothing
        example = {"tokens": text.many(ids), "token_ids": ids.tolist(), "activations": rounded_activations(acts),
                   "max_index": mark}
    return str(context_tokens(example, scale))


@pytest.mark.parametrize("seed", range(6))
def test_page_spans_equal_the_per_example_renderer(seed):
    rng = np.random.default_rng(seed)
    text = _text()
    scale = {"positive": float(rng.choice([0.5, 2.0, 7.3, 1000.0])), "negative": float(rng.choice([0.5, 3.1, 1000.0]))}
    groups = [_contexts(rng, 7), _contexts(rng, 0), _contexts(rng, 3), _contexts(rng, 5)]
    spans = PageSpans(text, scale, groups)
    for g, group in enumerate(groups):
        for j, context in enumerate(group):
            assert str(spans.html(g, j)) == _expected(text, scale, context), (g, j)


def test_special_values_and_ties():
    text = _text()
    scale = {"positive": 2.0, "negative": 2.0}
    # |a| / 2 * 1000 lands on x.5 for 0.001 (0.5), a rounding tie; inf and nan are not finite
    acts = np.array([0.001, -0.001, np.inf, -np.inf, np.nan, 3.0, -3.0, 0.0], dtype=np.float16)
    ids = np.arange(len(acts), dtype=np.int32)
    groups = [[(ids, acts, 5)], [(ids[:3], acts[:3], 2)]]
    spans = PageSpans(text, scale, groups)
    assert str(spans.html(0, 0)) == _expected(text, scale, groups[0][0])
    assert str(spans.html(1, 0)) == _expected(text, scale, groups[1][0])
    assert 'class="t max"' in str(spans.html(0, 0))  # the mark
    assert "<script" not in str(spans.html(0, 0)).replace("&lt;script", "")  # escaped


def test_hostile_tokens_are_escaped():
    text = _text()
    ids = np.array([VOCAB.index(t) for t in HOSTILE_TOKENS], dtype=np.int32)
    acts = np.ones(len(ids), dtype=np.float16)
    html = str(PageSpans(text, {"positive": 1.0, "negative": 1.0}, [[(ids, acts, 0)]]).html(0, 0))
    assert html.count("<span") == len(ids) == html.count("</span>")
    assert html == _expected(text, {"positive": 1.0, "negative": 1.0}, (ids, acts, 0))


@pytest.mark.parametrize("seed", range(3))
def test_context_items_equal_one_context_per_example(seed):
    """A neuron page writes each list of contexts with context_items, its tokens from the page's
    spans; the text panel and the embed card write one context(ex, scale) at a time, its tokens by
    the per-example renderer. Both write the same items (hostile window sources, values that round
    in '%.4g', negatives)."""
    from app.fastpage import context, context_items

    rng = np.random.default_rng(seed)
    text = _text()
    scale = {"positive": 2.0, "negative": 3.0}
    groups = [[c for c in _contexts(rng, n) if 0 <= c[2] < len(c[1])] for n in (6, 0, 4)]
    spans = PageSpans(text, scale, groups)
    for g, group in enumerate(groups):
        examples = [_example(ids, acts, text, [HOSTILE_TOKENS[j % len(HOSTILE_TOKENS)], f"file.py:{j}"][j % 2], mark=mark)
                    for j, (ids, acts, mark) in enumerate(group)]
        expected = "".join(f"<li>{context(ex, scale)}</li>" for ex in examples)
        assert str(context_items(examples, spans, g)) == expected, g
    assert groups[0] and groups[2], "each seed gives contexts to compare"
