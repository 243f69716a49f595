"""Labelled feature datasets for sparse probing (Gurnee et al. 2023): token ids plus labels.

    data = load_features(["text", "python", "mine.jsonl"], tokenizer, context=64)
    data.windows                          # int64 [n_windows, 64] token ids, right-padded
    feature = data.features[0]
    data.windows[feature.window, feature.position]   # the labelled tokens (token features)

A SPEC is one of:

- `text`: token-level features of each token's own text, over the windows of the `corpus`
  SPEC (workers.corpus.load_corpus, max_tokens): TEXT_FEATURES says each rule exactly.
  The rules read the token's text as the vocabulary table shows it (workers.loading.vocabulary:
  Ġ/▁ become a space, byte pieces <0x0A> their character); special tokens (the EOS between
  documents) are negative for every rule.
- `python`: the Python standard library's sources (workers.demo_model.stdlib_files order), each
  file labelled with Python's own `tokenize` (and `ast` for docstrings) and mapped to model
  tokens through the fast tokenizer's character offsets: a token is positive when its
  characters overlap a labelled span (PYTHON_FEATURES). Files are tokenized like a corpus
  (add_special_tokens=False, EOS between files, consecutive windows of `context` tokens),
  max_tokens // context windows. Plus the sequence-level `is_python_code`: code windows
  (label 1, the first of those windows) against prose windows (label 0): each file's
  docstrings (ast.get_docstring, cleaned) and comments (without "#") in source order, joined
  with newlines, tokenized into windows the same way; max_tokens // (2 * context) windows
  of each, at most PYTHON_CODE_WINDOWS each. Files that tokenize or ast cannot parse are
  skipped.
- a `.jsonl` file: user features, one JSON object per line (blank lines skipped), either
  sequence-level  {"feature": NAME, "text": "...", "label": 0 | 1, "aggregation": "mean" | "max"}
  ("aggregation" optional, "mean" by default, the same on every line of a feature) or
  token-level  {"feature": NAME, "text": "...", "spans": [[start, end], ...]}, where start and
  end are character offsets (Python string indices) and a token is positive when its
  characters overlap some [start, end). A file may hold several features, each of one kind
  only. Each distinct text is one window row, tokenized with add_special_tokens=False and
  truncated to `context` tokens (descriptions say how many were). Not capped by max_tokens.

Token-level samples are every real (non-padding) token of the feature's windows; a
sequence-level sample is a whole row (position -1), aggregated over its first `length`
tokens. No BOS is put in the windows: the caller prepends it as it does for a corpus
(workers.corpus.bos_prefix_id). Features of one spec may share their window/position
tensors: treat them as read-only. The same inputs give the same dataset.
"""

from __future__ import annotations

import ast
import bisect
import io
import itertools
import json
import keyword
import re
import tokenize
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from app.errors import NeedleError

BUILTIN_SPECS = ("text", "python")
SPEC_FORMS = "text, python or a .jsonl file of labelled texts"
PYTHON_CODE_WINDOWS = 512  # is_python_code: at most this many code windows and as many prose windows
JSONL_BATCH = 1024  # lines of a .jsonl feature file read and tokenized at once
NAME_MAX = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_BYTES = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


@dataclass
class Feature:
    name: str  # slug: lowercase letters, digits, '_', '-', '.'
    kind: str  # "token" | "sequence"
    aggregation: str  # "token" for token features; "mean" or "max" for sequence features
    source: str  # "text", "python" or the JSONL path
    description: str  # one line: how it is labelled
    window: torch.Tensor  # int64 [n] sample -> row of ProbeDataset.windows
    position: torch.Tensor  # int64 [n] token features: position in the window; sequence features: -1
    label: torch.Tensor  # bool [n]


@dataclass
class ProbeDataset:
    windows: torch.Tensor  # int64 [n_windows, context] token ids, right-padded
    lengths: torch.Tensor  # int64 [n_windows] real tokens per row (padding after)
    features: list[Feature]
    description: str


# ---- names -------------------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why `name` is not a valid feature name, or None when it is."""
    if not name:
        return "it is empty"
    if len(name) > NAME_MAX:
        return f"it is longer than {NAME_MAX} characters"
    if not _NAME.fullmatch(name):
        return 'use lowercase letters, digits, "_", "-" and ".", starting with a letter or digit'
    if name.endswith(".json"):
        return 'it ends in ".json", which a feature page\'s JSON twin would take'
    return None


# ---- text features -------------------------------------------------------------------------------


class TextRule(NamedTuple):
    rule: Callable[[str], bool]  # on the token's text, leading space kept (" Dog")
    description: str


def _unspaced(text: str) -> str:
    return text[1:] if text[:1] in (" ", "Ġ", "▁") else text


def _cased(text: str) -> list[str]:
    return [c for c in text if c.isupper() or c.islower()]


def _all_caps(text: str) -> bool:
    cased = _cased(_unspaced(text))
    return len(cased) >= 2 and all(c.isupper() for c in cased)


def _is_punctuation(text: str) -> bool:
    core = text.strip()
    return bool(core) and all(unicodedata.category(c).startswith("P") for c in core)


_STRIP = "after one leading space (Ġ/▁) is dropped"
TEXT_FEATURES: dict[str, TextRule] = {
    "contains_digit": TextRule(
        lambda t: any(c.isdecimal() for c in t),
        "the token's text has a decimal digit (0-9 or another script's: str.isdecimal)",
    ),
    "all_digits": TextRule(
        lambda t: bool(_unspaced(t)) and all(c.isdecimal() for c in _unspaced(t)),
        f"the token's text, {_STRIP}, is non-empty and all decimal digits",
    ),
    "is_capitalized": TextRule(
        lambda t: _unspaced(t)[:1].isupper(),
        f"the token's text, {_STRIP}, starts with an uppercase letter (\"Dog\", \" Dog\", \"DOG\"; not \"'Dog\")",
    ),
    "all_caps": TextRule(
        _all_caps,
        f"the token's text, {_STRIP}, has at least two cased letters and none is lowercase (\"DOG\", \" HTTP_2\")",
    ),
    "leading_space": TextRule(
        lambda t: t.startswith(" "),
        "the token's text starts with a space (a Ġ or ▁ piece); not a tab or newline",
    ),
    "is_punctuation": TextRule(
        _is_punctuation,
        "the token's text, whitespace stripped, is non-empty and every character is Unicode punctuation "
        "(category P*: . , ; : ! ? ' \" ( ) [ ] { } - _ # % & * / @ \\; not symbols such as + < = > $ ^ | ~)",
    ),
    "is_not_ascii": TextRule(
        lambda t: any(ord(c) > 127 for c in t),
        "the token's text has a character outside ASCII, or the token is a byte of a multi-byte UTF-8 character",
    ),
}


def token_texts(tokenizer, ids: list[int]) -> dict[int, str | None]:
    """Each id's text as the vocabulary table shows it; None for a special token; a token that is
    only byte(s) of a multi-byte character maps to "\\x80" (non-ASCII, nothing else)."""
    from workers.loading import vocabulary

    rows = vocabulary(tokenizer, max(ids) + 1) if ids else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts: dict[int, str | None] = {}
    for i in ids:
        text = rows[i]["token"]
        if i in special:
            texts[i] = None
        elif _BYTES.fullmatch(text):  # how the vocabulary shows bytes that are not a whole character
            texts[i] = "\x80"
        else:
            texts[i] = text
    return texts


def _text_features(tokenizer, corpus: str, context: int, max_tokens: int) -> ProbeDataset:
    from workers.corpus import load_corpus

    loaded = load_corpus(corpus, tokenizer, context=context, max_tokens=max_tokens)
    windows = loaded.windows
    n_windows = windows.shape[0]
    unique, inverse = torch.unique(windows.reshape(-1), return_inverse=True)
    texts = token_texts(tokenizer, unique.tolist())
    table = torch.tensor(
        [[text is not None and rule.rule(text) for rule in TEXT_FEATURES.values()] for text in texts.values()],
        dtype=torch.bool,
    ).view(len(texts), len(TEXT_FEATURES))
    labels = table[inverse]  # [n_windows * context, n_rules]
    window = torch.arange(n_windows, dtype=torch.long).repeat_interleave(context)
    position = torch.arange(context, dtype=torch.long).repeat(n_windows)
    features = [
        Feature(name, "token", "token", "text", rule.description, window, position, labels[:, k].clone())
        for k, (name, rule) in enumerate(TEXT_FEATURES.items())
    ]
    lengths = torch.full((n_windows,), context, dtype=torch.long)
    return ProbeDataset(windows, lengths, features, f"text: token rules over {loaded.description}")


# ---- Python features ------------------------------------------------------------------------------


PYTHON_FEATURES: dict[str, str] = {
    "in_comment": "the token overlaps a comment (tokenize COMMENT: from # to the end of the line)",
    "in_string": "the token overlaps a string literal (tokenize STRING, prefix and quotes included; an f-string whole)",
    "in_docstring": "the token overlaps a docstring: a string literal that is the first statement of a module, "
    "class or function (ast)",
    "is_keyword": "the token overlaps a keyword: a NAME for which keyword.iskeyword holds "
    "(not soft keywords such as match, case, _)",
    "is_number": "the token overlaps a number literal (tokenize NUMBER)",
    "is_operator": "the token overlaps an operator or delimiter (tokenize OP: + - * / == = ( ) [ ] { } , : . ; -> ...)",
    "is_name": "the token overlaps an identifier: a NAME that is not a keyword",
}
PYTHON_CODE_DESCRIPTION = (
    "a window of standard-library Python source (1) against a window of prose (0): the docstrings and comments "
    "taken out of the same files, joined with newlines; mean over the window's tokens"
)
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_FSTRING_START = {getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, n)}
_FSTRING_END = {getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, n)}


@dataclass
class PythonLabels:
    spans: dict[str, list[tuple[int, int]]]  # per PYTHON_FEATURES name: character spans [start, end)
    prose: str  # the docstrings and comments, in source order, joined with newlines


def python_labels(text: str) -> PythonLabels | None:
    """Label a Python source's characters with tokenize and ast; None if either cannot parse it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning: invalid escape sequences in old sources
            tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError, ValueError, RecursionError, MemoryError):
        return None
    starts = [0] + [m.end() for m in re.finditer("\n", text)]  # StringIO.readline splits at "\n" only
    lines = text.split("\n")

    def char_at(row: int, col: int) -> int:
        return starts[row - 1] + col

    def char_at_byte(row: int, byte_col: int) -> int:  # ast columns count UTF-8 bytes
        return starts[row - 1] + len(lines[row - 1].encode("utf-8")[:byte_col].decode("utf-8", "ignore"))

    docstrings: list[tuple[int, int]] = []
    prose: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, _DOCSTRING_OWNERS) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
            continue
        if not isinstance(first.value.value, str):
            continue
        value = first.value
        start = char_at_byte(value.lineno, value.col_offset)
        end = char_at_byte(value.end_lineno or value.lineno, value.end_col_offset or value.col_offset)  # set by ast.parse
        docstrings.append((start, end))
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            prose.append((start, doc.strip()))
    docstrings.sort()
    doc_starts = [a for a, _ in docstrings]

    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in PYTHON_FEATURES}
    depth, fstring_start = 0, 0
    for tok in tokens:
        start, end = char_at(*tok.start), char_at(*tok.end)
        if tok.type == tokenize.COMMENT:
            spans["in_comment"].append((start, end))
            words = tok.string.lstrip("#").strip()
            if words:
                prose.append((start, words))
        elif tok.type in _FSTRING_START:
            fstring_start = start if depth == 0 else fstring_start
            depth += 1
        elif tok.type in _FSTRING_END:
            depth -= 1
            if depth == 0:
                spans["in_string"].append((fstring_start, end))
        elif depth:
            continue  # inside an f-string (Python 3.12+): part of the string
        elif tok.type == tokenize.STRING:
            spans["in_string"].append((start, end))
            k = bisect.bisect_right(doc_starts, start) - 1
            if k >= 0 and start < docstrings[k][1]:
                spans["in_docstring"].append((start, end))
        elif tok.type == tokenize.NAME:
            spans["is_keyword" if keyword.iskeyword(tok.string) else "is_name"].append((start, end))
        elif tok.type == tokenize.NUMBER:
            spans["is_number"].append((start, end))
        elif tok.type == tokenize.OP:
            spans["is_operator"].append((start, end))
    prose.sort(key=lambda p: p[0])
    return PythonLabels(spans, "\n".join(words for _, words in prose))


def overlap_labels(offsets: torch.Tensor, spans: list[tuple[int, int]], n_chars: int) -> torch.Tensor:
    """bool [n_tokens]: token [s, e) overlaps some span [a, b) (s < b and a < e); empty tokens never do."""
    n = offsets.shape[0]
    if not spans or n == 0:
        return torch.zeros(n, dtype=torch.bool)
    bounds = torch.tensor(spans, dtype=torch.long)
    diff = torch.zeros(n_chars + 1, dtype=torch.long)
    diff.index_add_(0, bounds[:, 0], torch.ones(len(spans), dtype=torch.long))
    diff.index_add_(0, bounds[:, 1], -torch.ones(len(spans), dtype=torch.long))
    covered = (diff.cumsum(0)[:n_chars] > 0).long()
    prefix = torch.cat([torch.zeros(1, dtype=torch.long), covered.cumsum(0)])
    s = offsets[:, 0].clamp(0, n_chars)
    e = offsets[:, 1].clamp(0, n_chars)
    return (prefix[e] - prefix[s]) > 0


def _require_fast(tokenizer, what: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise NeedleError(
            f"{what} needs a fast tokenizer (character offsets), and this one is a slow (Python) tokenizer",
            hint="Load the model's tokenizer.json (a fast tokenizer), or use sequence-level features only.",
        )


def _encode_offsets(tokenizer, text: str) -> tuple[list[int], torch.Tensor]:
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
        return_token_type_ids=False, verbose=False,
    )  # fmt: skip
    return list(enc["input_ids"]), torch.tensor(enc["offset_mapping"], dtype=torch.long).view(-1, 2)


class _Stream:
    """Documents' token ids (and per-token labels) joined with EOS, as workers.corpus joins them."""

    def __init__(self, eos: int | None, n_labels: int = 0):
        self.eos, self.n_labels = eos, n_labels
        self.ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.total = 0
        self.documents = 0

    def add(self, ids: list[int], labels: torch.Tensor | None = None) -> None:
        if not ids:
            return
        if self.ids and self.eos is not None:
            self.ids.append(torch.tensor([self.eos], dtype=torch.long))
            self.labels.append(torch.zeros(1, self.n_labels, dtype=torch.bool))
            self.total += 1
        self.ids.append(torch.tensor(ids, dtype=torch.long))
        self.labels.append(labels if labels is not None else torch.zeros(len(ids), self.n_labels, dtype=torch.bool))
        self.total += len(ids)
        self.documents += 1

    def windows(self, context: int, most: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(self.total // context, most)
        if n == 0:
            return torch.zeros(0, context, dtype=torch.long), torch.zeros(0, context, self.n_labels, dtype=torch.bool)
        used = n * context
        ids = torch.cat(self.ids)[:used].view(n, context)
        labels = torch.cat(self.labels)[:used].view(n, context, self.n_labels)
        return ids, labels


def _python_features(tokenizer, context: int, max_tokens: int) -> ProbeDataset:
    from workers.corpus import _encode, _stdlib_files

    _require_fast(tokenizer, "the python features")
    token_windows = max_tokens // context
    each = min(PYTHON_CODE_WINDOWS, max(1, max_tokens // (2 * context)))
    eos = getattr(tokenizer, "eos_token_id", None)
    names = list(PYTHON_FEATURES)
    code, prose = _Stream(eos, len(names)), _Stream(eos)
    skipped = 0
    root, files = _stdlib_files()
    for path in files:
        if code.total >= token_windows * context and prose.total >= each * context:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        labelled = python_labels(text)
        if labelled is None:
            skipped += 1
            continue
        if code.total < token_windows * context:
            ids, offsets = _encode_offsets(tokenizer, text)
            labels = torch.stack([overlap_labels(offsets, labelled.spans[n], len(text)) for n in names], dim=1)
            code.add(ids, labels)
        if prose.total < each * context and labelled.prose:
            prose.add(_encode(tokenizer, [labelled.prose])[0])

    code_windows, code_labels = code.windows(context, token_windows)
    prose_windows, _ = prose.windows(context, each)
    if code_windows.shape[0] == 0 or prose_windows.shape[0] == 0:
        raise NeedleError(
            f"the standard library at {root} gave {code_windows.shape[0]} code and {prose_windows.shape[0]} prose "
            f"windows of {context} tokens",
            hint="Lower the context, or raise max_tokens.",
        )
    n_code = code_windows.shape[0]
    windows = torch.cat([code_windows, prose_windows])
    lengths = torch.full((windows.shape[0],), context, dtype=torch.long)
    window = torch.arange(n_code, dtype=torch.long).repeat_interleave(context)
    position = torch.arange(context, dtype=torch.long).repeat(n_code)
    flat = code_labels.view(-1, len(names))
    features = [
        Feature(name, "token", "token", "python", PYTHON_FEATURES[name], window, position, flat[:, k].clone())
        for k, name in enumerate(names)
    ]
    pairs = min(each, n_code, prose_windows.shape[0])
    seq_window = torch.cat([torch.arange(pairs), n_code + torch.arange(pairs)]).long()
    seq_label = torch.cat([torch.ones(pairs, dtype=torch.bool), torch.zeros(pairs, dtype=torch.bool)])
    features.append(
        Feature("is_python_code", "sequence", "mean", "python", PYTHON_CODE_DESCRIPTION, seq_window,
                torch.full((2 * pairs,), -1, dtype=torch.long), seq_label)
    )  # fmt: skip
    description = (
        f"python: {n_code:,} windows ({n_code * context:,} tokens) of {code.documents:,} standard-library files "
        f"labelled with tokenize and ast; is_python_code: {pairs:,} code against {pairs:,} prose windows "
        f"(docstrings and comments of {prose.documents:,} files)"
        + (f"; {skipped:,} files skipped (not parseable)" if skipped else "")
    )
    # prose rows past `pairs` are never sampled: drop them
    windows, lengths = windows[: n_code + pairs], lengths[: n_code + pairs]
    return ProbeDataset(windows, lengths, features, description)


# ---- user JSONL features -----------------------------------------------------------------------------

_JSONL_FIELDS = ("feature", "text", "label", "spans", "aggregation")
JSONL_HINT = (
    'Give one JSON object per line: sequence-level {"feature": "is_french", "text": "Bonjour", "label": 1} '
    '(optional "aggregation": "mean" or "max"), or token-level '
    '{"feature": "dog_token", "text": "a dog", "spans": [[2, 5]]} (character offsets, end exclusive).'
)


@dataclass
class _Row:
    line: int
    feature: str
    text: str
    label: int | None  # sequence rows
    spans: list[tuple[int, int]] | None  # token rows
    aggregation: str  # "mean" | "max" for sequence rows, "token" for token rows

    @property
    def kind(self) -> str:
        return "token" if self.spans is not None else "sequence"


def _type(value) -> str:
    """The JSON type of a value, with its article: "a number", "an object"."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "null")


def _jsonl_row(spec: str, number: int, raw: bytes) -> _Row:
    def fail(what: str) -> NeedleError:
        return NeedleError(f"{spec} line {number}: {what}", hint=JSONL_HINT)

    try:
        row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
    except UnicodeDecodeError as exc:
        raise fail(f"not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise fail(f"not JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise fail("JSON nested too deeply to read (arrays or objects inside each other)") from None
    if not isinstance(row, dict):
        raise fail(f"{_type(row)} in JSON, not an object")
    unknown = [k for k in row if k not in _JSONL_FIELDS]
    if unknown:
        raise fail(f"unknown field {', '.join(map(repr, unknown))} (the fields are {', '.join(_JSONL_FIELDS)})")
    for name in ("feature", "text"):
        if name not in row:
            raise fail(f'no "{name}" field')
        if not isinstance(row[name], str):
            raise fail(f'"{name}" is {_type(row[name])}, not a string')
    feature, text = row["feature"], row["text"]
    problem = name_problem(feature)
    if problem:
        raise fail(f'"feature" {feature!r} is not a valid feature name: {problem}')
    if not text:
        raise fail('"text" is empty')
    if ("label" in row) == ("spans" in row):
        raise fail(
            'has both "label" and "spans"' if "label" in row else 'has neither "label" (a sequence-level line) '
            'nor "spans" (a token-level line)'
        )
    if "label" in row:
        label = row["label"]
        if type(label) not in (int, bool) or label not in (0, 1):
            raise fail(f'"label" must be 0 or 1, not {json.dumps(label)}')
        aggregation = row.get("aggregation", "mean")
        if aggregation not in ("mean", "max"):
            raise fail(f'"aggregation" must be "mean" or "max", not {json.dumps(aggregation)}')
        return _Row(number, feature, text, int(label), None, aggregation)
    if "aggregation" in row:
        raise fail('"aggregation" is for sequence-level lines ("label"); a token-level line ("spans") has none')
    spans = row["spans"]
    if not isinstance(spans, list):
        raise fail(f'"spans" is {_type(spans)}, not a list of [start, end] pairs')
    pairs: list[tuple[int, int]] = []
    for k, span in enumerate(spans, start=1):
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
            raise fail(f"span {k} of \"spans\" is {json.dumps(span)}, not a pair of integers [start, end]")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise fail(
                f"span {k} [{start}, {end}] is out of range: it needs 0 <= start < end <= {len(text)} "
                "(the text's length in characters)"
            )
        pairs.append((start, end))
    return _Row(number, feature, text, None, pairs, "token")


def _jsonl_rows(spec: str, path: Path) -> Iterator[_Row]:
    """The file's rows, each checked as it is read; only each feature's first row is kept."""
    first: dict[str, _Row] = {}
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                row = _jsonl_row(spec, number, raw)
                seen = first.setdefault(row.feature, row)
                if seen.kind != row.kind:
                    raise NeedleError(
                        f"{spec} line {number}: feature {row.feature!r} is {row.kind}-level here but {seen.kind}-level "
                        f"on line {seen.line}; one feature cannot mix \"label\" and \"spans\" lines",
                        hint="Give the token-level lines another feature name.",
                    )
                if seen.aggregation != row.aggregation:
                    raise NeedleError(
                        f"{spec} line {number}: feature {row.feature!r} has aggregation {row.aggregation!r} here but "
                        f"{seen.aggregation!r} on line {seen.line}",
                        hint='Give every line of a feature the same "aggregation" ("mean" when left out).',
                    )
                yield row
    except OSError as exc:
        raise NeedleError(
            f"could not read {spec}: {exc.strerror or exc}", hint="Check that the file is readable."
        ) from None
    if not first:
        raise NeedleError(f"{spec} has no lines: the feature file is empty", hint=JSONL_HINT)


@dataclass
class _Encoded:
    row: _Row
    ids: list[int]  # all the text's tokens (a window keeps the first `context`)
    labels: torch.Tensor | None  # token rows: bool [min(len(ids), context)]; sequence rows: None


def _jsonl_batches(spec: str, tokenizer, context: int) -> Iterator[list[_Encoded]]:
    """The rows of a feature file with their tokens, read, checked and tokenized JSONL_BATCH lines
    at a time, so that a file of any length is held a batch at a time."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise NeedleError(f"no such feature file: {spec}", hint=f"Give {SPEC_FORMS}.")
    rows = _jsonl_rows(spec, path)
    while batch := list(itertools.islice(rows, JSONL_BATCH)):
        token_level = any(row.kind == "token" for row in batch)
        if token_level:
            _require_fast(tokenizer, f"the token-level features of {spec}")
        texts = list(dict.fromkeys(row.text for row in batch))
        enc = tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=token_level, return_attention_mask=False,
            return_token_type_ids=False, verbose=False,
        )  # fmt: skip
        at = {text: i for i, text in enumerate(texts)}
        out = []
        for row in batch:
            ids = enc["input_ids"][at[row.text]]
            if not ids:
                raise NeedleError(f"{spec} line {row.line}: \"text\" has no tokens", hint=JSONL_HINT)
            labels = None
            if row.spans is not None:
                n = min(len(ids), context)
                offsets = torch.tensor(enc["offset_mapping"][at[row.text]][:n], dtype=torch.long).view(-1, 2)
                labels = overlap_labels(offsets, row.spans, len(row.text))
            out.append(_Encoded(row, ids, labels))
        yield out


def _check_both_labels(spec: str, name: str, kind: str, positives: int, samples: int) -> None:
    if positives in (0, samples):
        unit = "tokens" if kind == "token" else "texts"
        raise NeedleError(
            f"feature {name!r} of {spec} has only {'negative' if positives == 0 else 'positive'} {unit} "
            f"({samples:,}); a probe needs both",
            hint="Add lines with the other label" + (" (or spans within the first tokens)" if kind == "token" else ""),
        )


def _jsonl_check(spec: str, tokenizer, context: int) -> list[str]:
    """Every check _jsonl_features makes, keeping only counts: the names of the file's features."""
    counts: dict[str, list] = {}  # name -> [kind, positives, samples]
    for batch in _jsonl_batches(spec, tokenizer, context):
        for e in batch:
            count = counts.setdefault(e.row.feature, [e.row.kind, 0, 0])
            count[1] += int(e.labels.sum()) if e.labels is not None else e.row.label
            count[2] += len(e.labels) if e.labels is not None else 1
    for name, (kind, positives, samples) in counts.items():
        _check_both_labels(spec, name, kind, positives, samples)
    return list(counts)


@dataclass
class _Gathered:
    """One feature's samples, gathered a batch at a time."""

    kind: str
    aggregation: str
    rows: int = 0
    truncated: int = 0  # rows whose text is longer than a window
    window: list[torch.Tensor] = field(default_factory=list)
    position: list[torch.Tensor] = field(default_factory=list)
    label: list[torch.Tensor] = field(default_factory=list)


def _jsonl_features(spec: str, tokenizer, context: int) -> ProbeDataset:
    pad = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if i is not None), 0)  # fmt: skip
    row_of: dict[str, int] = {}  # each distinct text is one window row
    windows, lengths = [], []
    gathered: dict[str, _Gathered] = {}
    lines = truncated_texts = 0
    for batch in _jsonl_batches(spec, tokenizer, context):
        lines += len(batch)
        new = []
        for e in batch:
            if e.row.text not in row_of:
                row_of[e.row.text] = len(row_of)
                new.append(e.ids[:context])
                truncated_texts += len(e.ids) > context
        if new:
            block = torch.full((len(new), context), pad, dtype=torch.long)
            for i, ids in enumerate(new):
                block[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            windows.append(block)
            lengths.append(torch.tensor([len(ids) for ids in new], dtype=torch.long))
        mine: dict[str, list[_Encoded]] = {}
        for e in batch:
            mine.setdefault(e.row.feature, []).append(e)
        for name, encoded in mine.items():
            g = gathered.setdefault(name, _Gathered(encoded[0].row.kind, encoded[0].row.aggregation))
            g.rows += len(encoded)
            g.truncated += sum(len(e.ids) > context for e in encoded)
            rows = torch.tensor([row_of[e.row.text] for e in encoded], dtype=torch.long)
            if g.kind == "sequence":
                g.window.append(rows)
                g.position.append(torch.full((len(encoded),), -1, dtype=torch.long))
                g.label.append(torch.tensor([e.row.label for e in encoded], dtype=torch.bool))
            else:
                labels = [e.labels for e in encoded if e.labels is not None]  # every row of a token feature's
                n = torch.tensor([len(t) for t in labels], dtype=torch.long)
                g.window.append(rows.repeat_interleave(n))
                g.position.append(torch.cat([torch.arange(int(k), dtype=torch.long) for k in n]))
                g.label.append(torch.cat(labels))

    features = []
    for name, g in gathered.items():
        window, position, label = torch.cat(g.window), torch.cat(g.position), torch.cat(g.label)
        positives = int(label.sum())
        _check_both_labels(spec, name, g.kind, positives, len(label))
        cut = f"; {g.truncated:,} of them truncated to {context} tokens" if g.truncated else ""
        if g.kind == "sequence":
            what = f"{g.rows:,} texts labelled 1 or 0 ({g.aggregation} over each text's tokens){cut}"
        else:
            what = f"{g.rows:,} texts; a token is positive when it overlaps a labelled character span{cut}"
        unit = "tokens" if g.kind == "token" else "texts"
        description = f"{spec}: {what}; {positives:,} of {len(label):,} {unit} positive"
        features.append(Feature(name, g.kind, g.aggregation, spec, description, window, position, label))
    description = f"{spec}: {lines:,} lines, {len(row_of):,} distinct texts, {len(features)} features" + (
        f", {truncated_texts:,} texts truncated to {context} tokens" if truncated_texts else ""
    )
    return ProbeDataset(torch.cat(windows), torch.cat(lengths), features, description)


# ---- combining specs ---------------------------------------------------------------------------------


def _load_one(spec: str, tokenizer, context: int, max_tokens: int, corpus: str) -> ProbeDataset:
    if spec == "text":
        return _text_features(tokenizer, corpus, context, max_tokens)
    if spec == "python":
        return _python_features(tokenizer, context, max_tokens)
    if spec.lower().endswith(".jsonl"):
        return _jsonl_features(spec, tokenizer, context)
    raise NeedleError(f"{spec!r} is not a feature spec", hint=f"Give {SPEC_FORMS}.")


def _checked_specs(specs: list[str], context: int, max_tokens: int) -> list[str]:
    specs = [spec.strip() for spec in specs]
    if not specs or not all(specs):
        raise NeedleError("no feature spec given", hint=f"Give {SPEC_FORMS}.")
    if context < 2:
        raise NeedleError(f"a window of {context} tokens is too short", hint="Give a context of at least 2 tokens.")
    if max_tokens < context:
        raise NeedleError(
            f"max_tokens {max_tokens:,} is less than one window of {context:,} tokens",
            hint="Raise max_tokens to at least the context, or lower the context.",
        )
    return specs


def _claim_name(owner: dict[str, str], name: str, spec: str) -> None:
    """Note that feature `name` comes from `spec`; an error when another spec has it too."""
    if name in owner:
        raise NeedleError(
            f"feature {name!r} comes from both {owner[name]} and {spec}",
            hint="Feature names must be unique: rename one, or give each spec once.",
        )
    owner[name] = spec


def load_features(
    specs: list[str], tokenizer, *, context: int = 64, max_tokens: int = 65_536, corpus: str = "stdlib"
) -> ProbeDataset:
    """The feature datasets of SPECs, together (see the module docstring for each)."""
    specs = _checked_specs(specs, context, max_tokens)
    owner: dict[str, str] = {}
    windows, lengths, features, descriptions = [], [], [], []
    offset = 0
    for spec in specs:
        part = _load_one(spec, tokenizer, context, max_tokens, corpus)
        shifted: dict[int, torch.Tensor] = {}  # shared window tensors stay shared
        for feature in part.features:
            _claim_name(owner, feature.name, spec)
            if offset:
                key = id(feature.window)
                if key not in shifted:
                    shifted[key] = feature.window + offset
                feature.window = shifted[key]
            features.append(feature)
        windows.append(part.windows)
        lengths.append(part.lengths)
        descriptions.append(part.description)
        offset += part.windows.shape[0]
    return ProbeDataset(torch.cat(windows), torch.cat(lengths), features, "; ".join(descriptions))


def check_features(
    specs: list[str], tokenizer, *, context: int = 64, max_tokens: int = 65_536, corpus: str = "stdlib"
) -> None:
    """Make every check load_features makes, without keeping the dataset: a .jsonl file is read
    a batch of lines at a time and only counts are kept, so a file of any length is checked in
    little memory (`needle index` checks the specs this way before it stores anything)."""
    owner: dict[str, str] = {}
    for spec in _checked_specs(specs, context, max_tokens):
        if spec.lower().endswith(".jsonl"):
            names = _jsonl_check(spec, tokenizer, context)
        else:  # the built-in specs are as large as max_tokens at most
            names = [f.name for f in _load_one(spec, tokenizer, context, max_tokens, corpus).features]
        for name in names:
            _claim_name(owner, name, spec)
