"""What keeps the neuron page fast on a large model (bench/server.py measures it):

- token_texts: a model's vocabulary held in memory by the server process. A neuron page shows
  about 3,000 tokens (45 windows of context tokens, its decodings); looking them up in the
  database on each request cost more than the rest of the page. Keyed by the database, the
  model's id and its updated_at: indexing a model saves its row and its vocabulary in one
  transaction, so a new vocabulary comes with a new key (as the search's tokenizer cache is keyed).
- rounded_activations: round(float(a), 4) of float16 activations through a table of all 65,536
  float16 values: the same numbers as rounding each one.
- context_tokens: the token spans of one example context (templates/_examples.html), byte for
  byte what the template's own loop wrote, with the per-token formatting done by table lookups
  and numpy instead of about ten template expressions per token.
- PageSpans: the same spans for all 45 contexts of a neuron page at once, from the stored arrays
  (token ids, float16 activations): each span is four strings taken from tables (its opening
  tag by sign, max mark and colour share; its token's escaped title; its activation's text by
  float16 bit pattern; its token's escaped text and the closing tag) and joined, with no Python
  work per token. Byte for byte what context_tokens writes for the same example (a test checks).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np
from markupsafe import Markup, escape
from sqlalchemy.orm import Session

from app import queries
from app.schema import Model
from app.tokens import chip_html, context_html, in_context, joined_bytes, one_break_per_run, token_bytes, visible

MAX_MODELS = 4  # vocabularies held at once (a 128k-token vocabulary is about 10 MB)


class TokenTexts(dict):
    """{token id: token text} of a model's stored vocabulary; `many` looks up an array of ids at once."""

    def __init__(self, pairs):
        super().__init__(pairs)
        size = max(self, default=-1) + 1
        self._array = np.full(size + 1, None, dtype=object)  # the last entry: None, for ids out of range
        for token_id, token in self.items():
            if token_id >= 0:
                self._array[token_id] = token
        self._parts = None  # span_parts, built on first use

    def span_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(titles, ends, known, byte_ids) indexed by token id, with one more entry for ids out of
        range: the escaped visible text of a token's title, its escaped text in context
        (context_html) followed by "</span>", whether the id is in the vocabulary (a missing one's
        title names its id), and whether the token is raw bytes (token_bytes: read with its
        neighbours, joined_bytes).
        Built on first use (a 128k vocabulary: about half a second) and kept with the vocabulary."""
        parts = self._parts
        if parts is None:
            size = len(self._array)
            titles = np.full(size, "", dtype=object)
            ends = np.full(size, str(escape(in_context(None))) + "</span>", dtype=object)
            known = np.zeros(size, dtype=bool)
            byte_ids = np.zeros(size, dtype=bool)
            for token_id, token in self.items():
                if 0 <= token_id < size - 1 and token is not None:
                    titles[token_id] = str(escape(visible(token)))
                    ends[token_id] = context_html(token) + "</span>"
                    known[token_id] = True
                    byte_ids[token_id] = token_bytes(token) is not None
            parts = self._parts = (titles, ends, known, byte_ids)
        return parts

    def many(self, ids: np.ndarray) -> list[str | None]:
        """[self.get(t) for t in ids] for an integer array."""
        last = len(self._array) - 1
        ids = np.asarray(ids, dtype=np.int64)
        return self._array[np.where((ids >= 0) & (ids < last), ids, last)].tolist()


_lock = threading.Lock()
_vocabularies: OrderedDict[tuple, TokenTexts] = OrderedDict()


def token_texts(session: Session, model: Model) -> TokenTexts:
    """The model's whole stored vocabulary (shared: do not modify it)."""
    key = (session.get_bind().engine.url.render_as_string(hide_password=True), model.id, model.updated_at)
    with _lock:
        texts = _vocabularies.get(key)
        if texts is not None:
            _vocabularies.move_to_end(key)
            return texts
    texts = TokenTexts(queries.vocab_tokens(session, model.id))
    with _lock:
        _vocabularies[key] = texts
        while len(_vocabularies) > MAX_MODELS:
            _vocabularies.popitem(last=False)
    return texts


@lru_cache(maxsize=1)
def _float16_tables() -> tuple[np.ndarray, dict[float, str]]:
    """round(v, 4) of every float16 bit pattern, and '%.4g' of those values (zeros and NaN left
    out: 0.0 and -0.0 are one dict key but print differently)."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    rounded = [round(v, 4) for v in values.tolist()]
    return np.array(rounded, dtype=np.float64), {v: "%.4g" % v for v in rounded if not math.isnan(v) and v != 0}


def rounded_activations(acts: np.ndarray) -> list[float]:
    """[round(float(a), 4) for a in acts], by table lookup when acts are float16."""
    if acts.dtype == np.float16:
        return _float16_tables()[0][np.ascontiguousarray(acts).view(np.uint16)].tolist()
    return [round(float(a), 4) for a in acts.astype(np.float32)]


@lru_cache(maxsize=1 << 17)
def _token_markup(token: str | None, token_id: int) -> tuple[str, str]:
    """(text shown in the context (context_html), text of its title), both escaped."""
    title = visible(token if token is not None else f"#{token_id}")
    return context_html(token), str(escape(title))


_SHARE = [f"{k // 1000}.{k % 1000:03d}" for k in range(1001)]  # "%.3f" of k / 1000 for k in 0..1000


Scale = dict  # app.examples.colour_scale: {"positive": p, "negative": n}, a positive a over p, a negative |a| over n


def _share_steps(values: np.ndarray, scale: Scale) -> tuple[np.ndarray, np.ndarray]:
    """(k, odd): k = round(1000 * min(|v| / its sign's scale, 1)) per value, so "%.3f" of the
    share is _SHARE[k], rounding in numpy: x * 1000 is off x's exact value by far less than 1e-6,
    so only the values that close to a rounding tie, or not finite, are `odd` (k 0): format those
    one by one with _share_text."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        by = np.where(values < 0, float(scale["negative"]), float(scale["positive"]))
        y = np.minimum(np.abs(values) / by, 1.0) * 1000.0
        odd = ~np.isfinite(y) | (np.abs(y - np.floor(y) - 0.5) < 1e-6)
        return np.where(odd, 0, np.rint(y)).astype(np.int64), odd


def _share_text(value: float, scale: Scale) -> str:
    by = float(scale["negative"] if value < 0 else scale["positive"])
    return "%.3f" % min(abs(float(value)) / by, 1.0)


def _shares(values: np.ndarray, scale: Scale) -> list[str]:
    """["%.3f" % min(abs(a) / its sign's scale, 1.0) for a in values]."""
    k, odd = _share_steps(values, scale)
    out = [_SHARE[i] for i in k.tolist()]
    for i in np.flatnonzero(odd).tolist():
        out[i] = _share_text(values[i], scale)
    return out


def context_tokens(ex: dict, scale: Scale) -> Markup:
    """The spans of _examples.html's context macro, one per token:
    <span class="t[ neg][ max][ part]" style="--a:min(|a|/scale of a's sign, 1) as %.3f" title="token (visible)  activation %.4g">token</span>
    where a byte token shows what joined_bytes makes of it ("part": it completes no character).
    """
    acts, ids, mark = ex["activations"], ex["token_ids"], ex["max_index"]
    if not acts:
        return Markup("")
    values = np.asarray(acts, dtype=np.float64)
    shares = _shares(values, scale)
    table = _float16_tables()[1]
    values_text = [table.get(a) or "%.4g" % a for a in acts]  # zeros and NaN are not in the table
    classes = np.where(values < 0, "t neg", "t").tolist()
    if 0 <= mark < len(classes):
        classes[mark] += " max"
    markups = [_token_markup(t, 0) if t is not None else _token_markup(None, i) for t, i in zip(ex["tokens"], ids)]
    for k, shown in joined_bytes(ex["tokens"][: len(classes)]).items():
        markups[k] = (context_html(shown) if shown else "", markups[k][1])
        if not shown:
            classes[k] += " part"
    return Markup(one_break_per_run("".join([
        f'<span class="{c}" style="--a:{s}" title="{title}  activation {v}">{text}</span>'
        for c, s, (text, title), v in zip(classes, shares, markups, values_text)
    ])))


_SPAN_CLASSES = ("t", "t neg", "t max", "t neg max")  # by kind = negative + 2 * max


@lru_cache(maxsize=1)
def _span_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """By float16 bit pattern: the rounded value (float64) and '  activation %.4g">' of it; and the
    opening tags '<span class="t[ neg][ max]" style="--a:S" title="' for every share S, indexed
    by kind * 1001 + round(1000 * share), kind = negative + 2 * max."""
    rounded = _float16_tables()[0]
    value_ends = np.array([f'  activation {"%.4g" % v}">' for v in rounded.tolist()], dtype=object)
    starts = np.array([f'<span class="{c}" style="--a:{s}" title="' for c in _SPAN_CLASSES for s in _SHARE],
                      dtype=object)
    return rounded, value_ends, starts


class PageSpans:
    """The token spans of a neuron page's contexts, rendered together on first use.
    groups: lists of contexts (the top contexts, then each interval bin's samples), a context
    being (token ids, float16 activations, max index); `html(g, j)` is the spans of group g's
    j-th context, as context_tokens(example, scale) writes them."""

    def __init__(self, text: TokenTexts, scale: Scale, groups: list[list[tuple[np.ndarray, np.ndarray, int]]]):
        self._text, self._scale = text, {k: float(scale[k]) for k in ("positive", "negative")}
        self._contexts = [c for group in groups for c in group]
        self._starts = np.cumsum([0, *[len(group) for group in groups]]).tolist()
        self._html: list[Markup] | None = None

    def html(self, group: int, j: int) -> Markup:
        if self._html is None:
            self._html = self._render()
        return self._html[self._starts[group] + j]

    def _render(self) -> list[Markup]:
        if not self._contexts:
            return []
        rounded, value_ends, starts = _span_tables()
        titles, ends, known, byte_ids = self._text.span_parts()
        lengths = [min(len(ids), len(acts)) for ids, acts, _ in self._contexts]
        ids = np.concatenate([np.asarray(ids[:n], dtype=np.int64) for (ids, _, _), n in zip(self._contexts, lengths)])
        bits = np.concatenate([np.ascontiguousarray(acts[:n], dtype=np.float16).view(np.uint16)
                               for (_, acts, _), n in zip(self._contexts, lengths)])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = rounded[bits]
        kind = (values < 0).astype(np.int64)
        for k, (_, _, mark) in enumerate(self._contexts):
            if 0 <= mark < lengths[k]:
                kind[offsets[k] + mark] += 2
        share, odd = _share_steps(values, self._scale)
        last = len(titles) - 1
        at = np.where((ids >= 0) & (ids < last), ids, last)
        pieces = np.empty((len(ids), 4), dtype=object)
        pieces[:, 0] = starts[kind * 1001 + share]
        pieces[:, 1] = titles[at]
        pieces[:, 2] = value_ends[bits]
        pieces[:, 3] = ends[at]
        for i in np.flatnonzero(odd).tolist():  # near a rounding tie, or not finite: formatted alone
            share_text = _share_text(values[i], self._scale)
            pieces[i, 0] = f'<span class="{_SPAN_CLASSES[int(kind[i])]}" style="--a:{share_text}" title="'
        for i in np.flatnonzero(~known[at]).tolist():  # not in the stored vocabulary: its id
            pieces[i, 1] = str(escape(visible(f"#{int(ids[i])}")))
        bytey = byte_ids[at]
        if bytey.any():  # characters split across byte tokens: read each context's together
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                if bytey[a:b].any():
                    for k, shown in joined_bytes(self._text.many(ids[a:b])).items():
                        pieces[a + k, 3] = (context_html(shown) if shown else "") + "</span>"
                        if not shown:
                            pieces[a + k, 0] = pieces[a + k, 0].replace('" style=', ' part" style=', 1)
        bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist())
        return [Markup(one_break_per_run("".join(pieces[a:b].ravel().tolist()))) for a, b in bounds]


def _context_box(ex: dict, tokens: str, mark_label: str = "max") -> str:
    """One context: its max activation (a negative context's: its min) and where its window
    starts, then its tokens' spans."""
    value = ex["min_activation"] if mark_label == "min" else ex["max_activation"]
    return ('<div class="context">\n  <div class="ctx-meta"><span class="ctx-max">'
            f'{escape(mark_label)} {escape("%.4g" % value)}</span>\n    <span class="ctx-source" '
            f'title="where the window starts">{escape(ex["source"])}</span></div>\n'
            f'  <div class="ctx-tokens">{tokens}</div>\n</div>')


def context(ex: dict, scale: Scale, mark_label: str = "max") -> Markup:
    """The templates' context(ex, scale): one context, its tokens by the per-example renderer
    (the text panel, the embed card)."""
    return Markup(_context_box(ex, context_tokens(ex, scale), mark_label))


def context_items(examples: list[dict], spans: PageSpans, group: int, mark_label: str = "max") -> Markup:
    """The <li> items of one list of a neuron page's contexts (its top contexts: group 0; an
    interval bin's: group 1, 2, ...; its top negative contexts, marked "min": the last group),
    their tokens from the page's spans: one call per list (45 contexts a page)."""
    return Markup("".join([f"<li>{_context_box(ex, spans.html(group, j), mark_label)}</li>"
                           for j, ex in enumerate(examples)]))


# ---------------------------------------------------------------- the search page's result rows


def _tok(t: dict) -> str:
    """A token's chip: its text made visible, its id on hover; #id when the vocabulary lacks it."""
    if t.get("token") is None:
        return (f'<code class="tok missing" title="token id {escape(t["token_id"])} (not in the stored vocabulary)">'
                f'#{escape(t["token_id"])}</code>')
    return f'<code class="tok" title="token id {escape(t["token_id"])}">{chip_html(t["token"])}</code>'


def _num(value, spec: str = "%.3f") -> str:
    """A number written with spec; – for none."""
    return "–" if value is None else str(escape(spec % value))


def _bar(value, best, kind: str = "") -> str:
    """A bar as long as value's share of best (0 to 100%); kind: its colour class."""
    share = (100 * value / best) if (value is not None and best) else 0
    cls = f"bar {escape(kind)}" if kind else "bar"
    return f'<span class="{cls}" aria-hidden="true"><span style="width: {"%.1f" % min(max(share, 0), 100)}%"></span></span>'


# The templates' tok(t), num(value, spec) and bar(value, best, kind): the same markup as the rows below.
def tok(t: dict) -> Markup:
    return Markup(_tok(t))


def num(value, spec: str = "%.3f") -> Markup:
    return Markup(_num(value, spec))


def bar(value, best, kind: str = "") -> Markup:
    return Markup(_bar(value, best, kind))


def _rows(rows: list[list[tuple[str, object]]]) -> Markup:
    """<tr> rows of <td> cells (each "attributes", "html"), laid out as the templates' loops wrote them."""
    return Markup("\n".join([
        "    <tr>\n" + "".join([f"      <td{attrs}>{html}</td>\n" for attrs, html in cells]) + "    </tr>"
        for cells in rows
    ]))


def token_table_rows(tokens: list[dict], best) -> Markup:
    """The rows of _token_table.html: rank, tok, num(prob), num(score), bar(score, best)."""
    return _rows([
        [(' class="num rank"', i), ("", _tok(t)), (' class="num"', _num(t["prob"], "%.4g")),
         (' class="num"', _num(t["score"], "%.4g")), (' class="barcell"', _bar(t["score"], best))]
        for i, t in enumerate(tokens, 1)
    ])


def logit_table_rows(tokens: list[dict], best, kind: str) -> Markup:
    """The rows of _logit_table.html: rank, tok, num(logit, '%+.3f'), bar(|logit|, best, kind)."""
    return _rows([
        [(' class="num rank"', i), ("", _tok(t)), (' class="num"', _num(t["logit"], "%+.3f")),
         (' class="barcell"', _bar(abs(t["logit"]) if t["logit"] is not None else None, best, kind))]
        for i, t in enumerate(tokens, 1)
    ])


def _unit_label(r: dict) -> str:
    """A search result's unit as a link's text: "layer 3 · neuron 7", or "layer 3 · SAE s · latent 7"."""
    if r.get("kind") == "latent":
        return f'layer {escape(r["layer"])} · SAE {escape(r["sae"])} · latent {escape(r["latent"])}'
    return f'layer {escape(r["layer"])} · neuron {escape(r["neuron"])}'


def _rank(r: dict) -> str:
    """A search result's token's rank in the unit's own decoding: "3", or "> 20" below its stored top tokens."""
    rank = r.get("decoding_rank")
    return str(rank) if rank is not None else f"&gt; {int(r.get('decoding_kept') or 0)}"


def search_result_rows(results: list[dict], best, start: int = 1) -> Markup:
    """The <tr> rows of _search_results.html, ranked from `start` (a search for a common token
    lists hundreds of neurons; a template macro call costs more than a row). Scores to 3 decimals
    and probabilities to 3 significant digits, so that a column's points line up."""
    return Markup("\n".join([
        "    <tr>\n"
        f'      <td class="num rank">{i}</td>\n'
        f'      <td><a class="nowrap" href="{escape(r["url"])}">{_unit_label(r)}</a></td>\n'
        f"      <td>{_tok(r)}</td>\n"
        f'      <td class="num">{_num(r["score"], "%.3f")}</td>\n'
        f'      <td class="num">{_num(r["prob"], "%#.3g")}</td>\n'
        f'      <td class="num decoding-rank">{_rank(r)}</td>\n'
        f'      <td class="barcell">{_bar(r["score"], best)}</td>\n'
        "    </tr>"
        for i, r in enumerate(results, start)
    ]))
