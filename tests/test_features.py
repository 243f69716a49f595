"""workers.features: probing datasets from rules, Python's tokenize/ast and user JSONL, on real
files and real (tiny) tokenizers."""

from __future__ import annotations

import ast
import io
import json
import tokenize

import pytest
import torch

from app.errors import NeedleError
from tests.tinymodels import tiny_tokenizer
from workers.corpus import _stdlib_files
from workers.features import (
    PYTHON_FEATURES,
    TEXT_FEATURES,
    load_features,
    overlap_labels,
    python_labels,
    token_texts,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("byte_level")


@pytest.fixture(scope="module")
def sp_tok():
    return tiny_tokenizer("sentencepiece")


def offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc.input_ids, [tuple(o) for o in enc.offset_mapping]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def by_name(data):
    return {f.name: f for f in data.features}


# ---- text rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, yes, no",
    [
        ("contains_digit", ["7", " 12", "a1", "x٣"], ["a", " ", "", "seven"]),
        ("all_digits", ["7", " 12", "٣"], ["a1", " ", "", "1.5", "12\n"]),
        ("is_capitalized", ["Dog", " Dog", "DOG", "▁Dog", "ĠDog", "É"], ["dog", " dog", "'Dog", "  Dog", "\nDog", "1A"]),
        ("all_caps", ["DOG", " HTTP", " HTTP_2", "ÉTÉ", "A1B"], ["A", " A", "Dog", "DOg", "12", "__"]),
        ("leading_space", [" dog", " ", "  ", " ("], ["dog", "\tdog", "\n", ""]),
        ("is_punctuation", [".", " (", "):", " __", "«", "—", "#"], [" ", "", "+", "=", "$", "<", "a.", " 1"]),
        ("is_not_ascii", ["é", " café", "—", "\x80"], ["cafe", " ", "~", ""]),
    ],
)
def test_text_rules(name, yes, no):
    rule = TEXT_FEATURES[name].rule
    assert [t for t in yes if not rule(t)] == []
    assert [t for t in no if rule(t)] == []


def test_token_texts_show_leading_space_bytes_and_specials(tok, sp_tok):
    ids, _ = offsets(tok, " Dog é")
    texts = token_texts(tok, ids + [tok.eos_token_id])
    pieces = [texts[i] for i in ids]
    assert pieces[0] == " Dog"
    assert "\x80" in pieces  # é is two byte-level tokens, each a part of a character
    assert texts[tok.eos_token_id] is None
    sp_ids, _ = offsets(sp_tok, "The dog\né")
    sp = token_texts(sp_tok, sp_ids)
    assert [sp[i] for i in sp_ids[:2]] == [" The", " dog"] and sp[sp_ids[2]] == "\n"
    assert sp[sp_ids[-1]] == "\x80"  # byte fallback <0xA9>


def test_text_spec_labels_each_corpus_token(tmp_path, sp_tok):
    (tmp_path / "a.txt").write_text("The dog, 42 DOG dogs é.\n" * 3, encoding="utf-8")
    (tmp_path / "b.txt").write_text("A dog (Rex) runs: 7!\n" * 3, encoding="utf-8")
    data = load_features(["text"], sp_tok, context=8, max_tokens=64, corpus=str(tmp_path))
    feats = by_name(data)
    assert list(feats) == list(TEXT_FEATURES)
    n_windows = data.windows.shape[0]
    assert data.windows.shape == (64 // 8, 8), "max_tokens 64 in windows of 8"
    assert data.lengths.tolist() == [8] * n_windows
    ids = data.windows.reshape(-1).tolist()
    pieces = sp_tok.convert_ids_to_tokens(ids)
    for f in data.features:
        assert (f.kind, f.aggregation, f.source) == ("token", "token", "text")
        assert f.window.tolist() == [w for w in range(n_windows) for _ in range(8)]
        assert f.position.tolist() == list(range(8)) * n_windows
        assert f.label.dtype == torch.bool and len(f.label) == n_windows * 8
        assert "token" in f.description
    labelled = {name: {pieces[i] for i in f.label.nonzero().flatten().tolist()} for name, f in feats.items()}
    assert {"▁The", "▁A"} <= labelled["is_capitalized"] and "▁dog" not in labelled["is_capitalized"]
    assert {"▁The", "▁dog"} <= labelled["leading_space"] and "<0x0A>" not in labelled["leading_space"]
    assert "<0xC3>" in labelled["is_not_ascii"] and "<0xC3>" not in labelled["contains_digit"]
    assert {"(", ")", ".", "<0x21>"} <= labelled["is_punctuation"]
    assert "▁dog," not in labelled["is_punctuation"] and "▁dog," in labelled["leading_space"]
    digits = {p for p in pieces if p.lstrip("▁").isdecimal() or p in ("<0x34>", "<0x32>", "<0x37>")}
    assert digits and digits <= labelled["all_digits"] <= labelled["contains_digit"]
    eos = [k for k, i in enumerate(ids) if i == sp_tok.eos_token_id]
    assert eos, "the two files are joined with EOS"
    assert not any(f.label[k] for f in data.features for k in eos)


# ---- Python labels ---------------------------------------------------------------------------------

SOURCE = '''"""Module doc."""
import os  # a comment


class Dog:
    """Dog doc."""

    def bark(self, n=12):
        x = f"{n} woofs"
        return n + 3.5 if n else 'no'
'''


def test_python_spans_are_the_tokenize_and_ast_tokens():
    labels = python_labels(SOURCE)
    text = {name: [SOURCE[a:b] for a, b in spans] for name, spans in labels.spans.items()}
    assert text["in_comment"] == ["# a comment"]
    assert text["in_string"] == ['"""Module doc."""', '"""Dog doc."""', 'f"{n} woofs"', "'no'"]
    assert text["in_docstring"] == ['"""Module doc."""', '"""Dog doc."""']
    assert text["is_keyword"] == ["import", "class", "def", "return", "if", "else"]
    assert text["is_number"] == ["12", "3.5"]
    assert text["is_operator"] == [":", "(", ",", "=", ")", ":", "=", "+"]
    assert text["is_name"] == ["os", "Dog", "bark", "self", "n", "x", "n", "n"]
    assert labels.prose == "Module doc.\na comment\nDog doc."
    assert python_labels("def broken(:\n") is None


def test_python_labels_reach_the_overlapping_model_tokens(tok):
    labels = python_labels(SOURCE)
    _, offs = offsets(tok, SOURCE)
    marks = {
        name: overlap_labels(torch.tensor(offs), spans, len(SOURCE)).tolist() for name, spans in labels.spans.items()
    }

    def tokens(name: str) -> str:
        return "".join(SOURCE[a:b] for (a, b), on in zip(offs, marks[name]) if on)

    def words(name: str) -> list[str]:
        return [SOURCE[a:b].strip() for (a, b), on in zip(offs, marks[name]) if on]

    assert tokens("in_comment") == "# a comment"
    assert tokens("in_docstring") == '"""Module doc.""" """Dog doc."""'  # ' "' carries the space before
    assert tokens("in_string") == '"""Module doc.""" """Dog doc.""" f"{n} woofs"\'no\''
    assert "".join(words("is_keyword")) == "importclassdefreturnifelse"
    assert words("is_number") == ["1", "2", "3", ".", "5"]
    assert "".join(words("is_name")) == "osDogbarkselfnxnn"  # the n inside the f-string is string
    assert "".join(words("is_operator")) == ":(,=):=+"
    # every token that overlaps nothing is whitespace
    plain = [SOURCE[a:b] for k, (a, b) in enumerate(offs) if not any(m[k] for m in marks.values())]
    assert all(not p.strip() for p in plain)


def test_overlap_semantics():
    offs = torch.tensor([[0, 1], [1, 5], [5, 9], [9, 9]])
    assert overlap_labels(offs, [(2, 5)], 9).tolist() == [False, True, False, False]
    assert overlap_labels(offs, [(4, 6)], 9).tolist() == [False, True, True, False]
    assert overlap_labels(offs, [(5, 6)], 9).tolist() == [False, False, True, False]  # end exclusive
    assert overlap_labels(offs, [(0, 1), (8, 9)], 9).tolist() == [True, False, True, False]
    assert overlap_labels(offs, [], 9).tolist() == [False] * 4


def _prose(text: str) -> str | None:
    """The docstrings and comments of a source, independently of workers.features."""
    try:
        tree = ast.parse(text)
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                parts.append(((node.body[0].lineno, node.body[0].col_offset), doc.strip()))
    parts += [(t.start, t.string.lstrip("#").strip()) for t in toks if t.type == tokenize.COMMENT]
    return "\n".join(words for _, words in sorted(parts, key=lambda p: p[0]) if words)


@pytest.fixture(scope="module")
def stdlib_python(tok):
    return load_features(["python"], tok, context=32, max_tokens=4096)


def test_python_spec_over_the_stdlib(tok, stdlib_python):
    data = stdlib_python
    feats = by_name(data)
    assert list(feats) == [*PYTHON_FEATURES, "is_python_code"]
    code_rows, pairs = 4096 // 32, 4096 // 64
    assert data.windows.shape == (code_rows + pairs, 32) and data.lengths.tolist() == [32] * (code_rows + pairs)
    for name in PYTHON_FEATURES:
        f = feats[name]
        assert (f.kind, f.aggregation, f.source) == ("token", "token", "python")
        assert len(f.label) == code_rows * 32 and int(f.window.max()) == code_rows - 1
    assert all(feats[n].label.any() for n in ("in_string", "in_docstring", "is_name", "is_keyword", "is_operator"))
    assert not (feats["in_docstring"].label & ~feats["in_string"].label).any()

    code = feats["is_python_code"]
    assert (code.kind, code.aggregation) == ("sequence", "mean")
    assert code.position.tolist() == [-1] * 2 * pairs
    assert code.window.tolist() == list(range(pairs)) + list(range(code_rows, code_rows + pairs))
    assert code.label.tolist() == [True] * pairs + [False] * pairs

    # the code rows are the stdlib sources, the prose rows their docstrings and comments
    sources = []
    for path in _stdlib_files()[1][:40]:
        text = path.read_text(encoding="utf-8")
        if text.strip() and _prose(text) is not None:
            sources.append(text)
    eos = tok.eos_token
    code_text = eos.join(sources)
    prose_text = eos.join(p for p in map(_prose, sources) if p)
    code_rows_text = tok.decode(data.windows[:code_rows].reshape(-1))
    prose_rows_text = tok.decode(data.windows[code_rows:].reshape(-1))
    assert code_text.startswith(code_rows_text)  # consecutive windows of the files joined with EOS
    assert prose_text.startswith(prose_rows_text)  # the same for their docstrings and comments
    assert prose_rows_text not in code_text  # comments lost their "#", docstrings their quotes


def test_python_labels_match_tokenize_on_stdlib_windows(tok, stdlib_python):
    """A token labelled is_keyword decodes to (part of) a keyword, and so on."""
    import keyword

    feats = by_name(stdlib_python)
    rows = stdlib_python.windows.shape[0] - 4096 // 64
    flat = stdlib_python.windows[:rows].reshape(-1)
    keywords = {tok.decode([int(i)]).strip() for i in flat[feats["is_keyword"].label]}
    assert keywords and "" not in keywords, "a whitespace token is no keyword"
    assert all(any(w in k for k in keyword.kwlist) for w in keywords)
    numbers = {tok.decode([int(i)]).strip() for i in flat[feats["is_number"].label]}
    assert numbers and "" not in numbers, "a whitespace token is no number"
    assert all(set(w) <= set("0123456789.xXabcdefABCDEFjJ_eE+-oO") for w in numbers)
    comments = tok.decode(flat[feats["in_comment"].label])
    assert "#" in comments


def test_deterministic(tok, stdlib_python):
    again = load_features(["python"], tok, context=32, max_tokens=4096)
    assert torch.equal(again.windows, stdlib_python.windows)
    for a, b in zip(again.features, stdlib_python.features):
        assert a.name == b.name and torch.equal(a.label, b.label) and torch.equal(a.window, b.window)


# ---- JSONL ---------------------------------------------------------------------------------------------


def test_jsonl_sequence_features(tmp_path, tok):
    long = "the dog " * 40
    path = write_jsonl(
        tmp_path / "seq.jsonl",
        [
            {"feature": "about_dogs", "text": "The dog sat.", "label": 1},
            "",
            {"feature": "about_dogs", "text": "The cat sat.", "label": 0},
            {"feature": "about_dogs", "text": long, "label": 1},
            {"feature": "has-dog.v2", "text": "The dog sat.", "label": True, "aggregation": "max"},
            {"feature": "has-dog.v2", "text": "A cat.", "label": 0, "aggregation": "max"},
        ],
    )
    data = load_features([path], tok, context=16)
    feats = by_name(data)
    assert list(feats) == ["about_dogs", "has-dog.v2"]
    texts = ["The dog sat.", "The cat sat.", long, "A cat."]  # one row per distinct text
    assert data.windows.shape == (4, 16)
    for row, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False).input_ids[:16]
        assert data.lengths[row] == len(ids) and data.windows[row, : len(ids)].tolist() == ids
    a, b = feats["about_dogs"], feats["has-dog.v2"]
    assert (a.kind, a.aggregation, a.source) == ("sequence", "mean", path)
    assert (b.kind, b.aggregation) == ("sequence", "max")
    assert a.window.tolist() == [0, 1, 2] and a.label.tolist() == [True, False, True]
    assert b.window.tolist() == [0, 3] and b.label.tolist() == [True, False]
    assert a.position.tolist() == [-1] * 3
    assert "1 of them truncated to 16 tokens" in a.description and "truncated" not in b.description
    assert "truncated" in data.description


def test_jsonl_token_features_and_span_overlap(tmp_path, tok):
    text = "a dog and a cat"
    ids, offs = offsets(tok, text)
    path = write_jsonl(
        tmp_path / "tok.jsonl",
        [
            {"feature": "dog", "text": text, "spans": [[3, 4]]},  # inside " dog"
            {"feature": "dog", "text": "the cat", "spans": []},
            {"feature": "edges", "text": text, "spans": [[5, 6], [0, 1]]},  # starts where " and" starts
        ],
    )
    data = load_features([path], tok, context=8)
    feats = by_name(data)
    n = min(len(ids), 8)
    dog, edges = feats["dog"], feats["edges"]
    assert (dog.kind, dog.aggregation) == ("token", "token")
    n_cat = len(tok("the cat", add_special_tokens=False).input_ids)
    assert dog.window.tolist() == [0] * n + [1] * n_cat
    assert dog.position.tolist() == list(range(n)) + list(range(n_cat))
    expected_dog = [a < 4 and 3 < b for a, b in offs[:n]] + [False] * n_cat
    assert dog.label.tolist() == expected_dog and sum(expected_dog) == 1
    assert text[slice(*offs[dog.label.tolist().index(True)])].strip() == "dog"
    labelled = [text[a:b] for (a, b), on in zip(offs, edges.label.tolist()) if on]
    assert labelled == [text[: offs[0][1]], text[slice(*next(o for o in offs if o[0] <= 5 < o[1]))]]
    assert " dog" not in labelled  # [5, 6) ends where " dog" ends: no overlap
    assert edges.window.tolist() == [0] * n


def test_jsonl_truncation_keeps_the_first_tokens(tmp_path, tok):
    text = "dog " * 30
    path = write_jsonl(tmp_path / "t.jsonl", [{"feature": "dog", "text": text, "spans": [[0, 3], [100, 103]]}])
    data = load_features([path], tok, context=8)
    f = data.features[0]
    assert len(f.label) == 8 and data.lengths.tolist() == [8]
    assert f.label.tolist()[0] and "truncated to 8 tokens" in f.description


VALID = {"feature": "ok", "text": "a dog", "label": 1}


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a list in JSON, not an object"),
        ({"text": "a dog", "label": 1}, 'no "feature" field'),
        ({"feature": "ok", "label": 1}, 'no "text" field'),
        ({"feature": 3, "text": "a", "label": 1}, '"feature" is a number'),
        ({"feature": "ok", "text": ["a"], "label": 1}, '"text" is a list'),
        ({"feature": "Bad Name", "text": "a", "label": 1}, "not a valid feature name"),
        ({"feature": "x.json", "text": "a", "label": 1}, "not a valid feature name"),
        ({"feature": "ok", "text": "", "label": 1}, '"text" is empty'),
        ({"feature": "ok", "text": "a"}, 'neither "label"'),
        ({"feature": "ok", "text": "a", "label": 1, "spans": []}, 'both "label" and "spans"'),
        ({"feature": "ok", "text": "a", "label": 2}, '"label" must be 0 or 1, not 2'),
        ({"feature": "ok", "text": "a", "label": "1"}, '"label" must be 0 or 1'),
        ({"feature": "ok", "text": "a", "label": 1, "aggregation": "sum"}, '"aggregation" must be "mean" or "max"'),
        ({"feature": "ok", "text": "a", "spans": [], "aggregation": "max"}, '"aggregation" is for sequence-level'),
        ({"feature": "ok", "text": "a", "spans": {"0": 1}}, '"spans" is an object'),
        ({"feature": "ok", "text": "a", "spans": [[0, 1, 2]]}, "span 1 of"),
        ({"feature": "ok", "text": "a", "spans": [[0, 1], [0.5, 1]]}, "span 2 of"),
        ({"feature": "ok", "text": "a dog", "spans": [[2, 6]]}, r"span 1 \[2, 6\] is out of range"),
        ({"feature": "ok", "text": "a dog", "spans": [[3, 3]]}, "out of range"),
        ({"feature": "ok", "text": "a dog", "spans": [[-1, 2]]}, "out of range"),
        ({"feature": "ok", "text": "a", "label": 1, "lable": 0}, "unknown field 'lable'"),
        ({"feature": "ok", "text": "a dog", "spans": [[2, 5]]}, "token-level here but sequence-level on line 1"),
        ({"feature": "ok", "text": "a", "label": 0, "aggregation": "max"}, "aggregation 'max' here but 'mean'"),
    ],
)
def test_bad_jsonl_lines_name_the_line(tmp_path, tok, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [VALID, "  ", line, {**VALID, "label": 0}])
    with pytest.raises(NeedleError, match=match) as info:
        load_features([path], tok)
    assert info.value.message.startswith(f"{path} line 3: ")
    assert info.value.hint


def test_bad_utf8_line(tmp_path, tok):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(VALID).encode() + b"\n" + b'{"feature": "ok", "text": "\xff"}\n')
    with pytest.raises(NeedleError, match=r"line 2: not valid UTF-8"):
        load_features([str(path)], tok)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "has no lines"),
        (["", "   "], "has no lines"),
        ([VALID, {**VALID, "text": "a cat"}], "only positive texts"),
        ([{"feature": "ok", "text": "a dog", "spans": []}], "only negative tokens"),
    ],
)
def test_bad_jsonl_files(tmp_path, tok, rows, match):
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    with pytest.raises(NeedleError, match=match) as info:
        load_features([path], tok)
    assert path in info.value.message and info.value.hint


def test_bad_specs(tmp_path, tok):
    with pytest.raises(NeedleError, match="no such feature file"):
        load_features([str(tmp_path / "missing.jsonl")], tok)
    with pytest.raises(NeedleError, match="not a feature spec"):
        load_features(["words"], tok)
    with pytest.raises(NeedleError, match="no feature spec"):
        load_features([], tok)
    with pytest.raises(NeedleError, match="less than one window"):
        load_features(["python"], tok, context=64, max_tokens=32)


def test_duplicate_names_across_specs(tmp_path, tok):
    rows = [{**VALID, "feature": "contains_digit"}, {**VALID, "feature": "contains_digit", "text": "b", "label": 0}]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", rows)
    corpus = tmp_path / "c.txt"
    corpus.write_text("The dog sat on the mat. " * 20, encoding="utf-8")
    with pytest.raises(NeedleError, match=f"'contains_digit' comes from both {first} and {second}"):
        load_features([first, second], tok)
    with pytest.raises(NeedleError, match="'contains_digit' comes from both text and"):
        load_features(["text", first], tok, context=8, max_tokens=64, corpus=str(corpus))


def test_specs_combine_with_shifted_rows(tmp_path, tok):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The dog sat on the mat. " * 20, encoding="utf-8")
    path = write_jsonl(tmp_path / "u.jsonl", [{**VALID, "text": "a dog"}, {**VALID, "text": "a cat", "label": 0}])
    text_only = load_features(["text"], tok, context=8, max_tokens=64, corpus=str(corpus))
    data = load_features(["text", path], tok, context=8, max_tokens=64, corpus=str(corpus))
    rows = text_only.windows.shape[0]
    assert torch.equal(data.windows[:rows], text_only.windows)
    user = by_name(data)["ok"]
    assert user.window.tolist() == [rows, rows + 1]
    assert tok.decode(data.windows[rows, : data.lengths[rows]]) == "a dog"
    assert data.lengths.tolist() == [8] * rows + [len(tok("a dog").input_ids), len(tok("a cat").input_ids)]
    assert by_name(data)["all_digits"].window.max() == rows - 1
    assert str(corpus) in data.description and path in data.description
