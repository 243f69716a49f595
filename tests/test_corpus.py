"""workers.corpus: SPEC -> windows of token ids, on real files and a real (tiny) tokenizer."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from app.errors import NeedleError
from tests.hubserver import counting_hub, point_hub_at
from tests.tinymodels import TRAINING_TEXT, tiny_tokenizer
from workers import corpus as corpus_module
from workers.corpus import bos_prefix_id, load_corpus

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("byte_level")


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def expected_windows(ids: list[int], context: int) -> torch.Tensor:
    n = len(ids) // context
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


def joined(tok, texts: list[str]) -> list[int]:
    """The documents' own encodings with EOS between them."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.append(tok.eos_token_id)
        ids.extend(enc(tok, text))
    return ids


def sources_for(texts: list[str], names: list[str], tok, context: int, n_windows: int) -> list[str]:
    """Per window, the name of the document its first token belongs to (EOS goes with the document before)."""
    owner: list[str] = []
    for i, (text, name) in enumerate(zip(texts, names)):
        owner.extend([name] * (len(enc(tok, text)) + (1 if i < len(texts) - 1 else 0)))
    return [owner[w * context] for w in range(n_windows)]


def doc_text(i: int, lines: int = 3) -> str:
    parts = TRAINING_TEXT.splitlines(keepends=True)
    return f"# document {i}\n" + "".join(parts[(i + k) % len(parts)] for k in range(lines))


def raises(match: str, *args, **kwargs) -> NeedleError:
    with pytest.raises(NeedleError, match=match) as info:
        load_corpus(*args, **kwargs)
    err = info.value
    assert err.hint, f"no hint for: {err.message}"
    assert "Traceback" not in str(err)
    return err


# ---- windows equal the tokenizer's own encoding --------------------------------------------------


def test_text_file(tmp_path, tok):
    text = TRAINING_TEXT * 2
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    c = load_corpus(str(path), tok, context=32)
    ids = enc(tok, text)
    assert c.windows.dtype == torch.int64
    assert torch.equal(c.windows, expected_windows(ids, 32))
    assert c.n_tokens == (len(ids) // 32) * 32 == c.windows.numel()
    assert c.sources == ["notes.txt"] * len(c.windows)
    assert c.n_documents == 1
    assert c.spec == str(path)
    assert c.description == f"file: {path} ({c.n_tokens:,} tokens)"


def test_folder_order_separator_hidden_and_binary(tmp_path, tok):
    root = tmp_path / "docs"
    texts = {
        "b.txt": "The dog sat on the mat.\n" * 5,
        "a.txt": "def feed(dog):\n    return dog\n" * 4,
        "sub/c.py": "import os\nimport sys\n" * 6,
        "sub/deeper/d.md": "A small dog, a big dog.\n" * 3,
    }
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden dog " * 50)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main " * 50)
    (root / "image.bin").write_bytes(bytes(range(256)) * 4)  # NUL bytes
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)  # not UTF-8
    order = ["a.txt", "b.txt", "sub/c.py", "sub/deeper/d.md"]

    c = load_corpus(str(root), tok, context=16)
    docs = [texts[name] for name in order]
    ids = joined(tok, docs)
    assert torch.equal(c.windows, expected_windows(ids, 16))
    # the same as the tokenizer's encoding of the joined text, EOS written out between documents
    assert ids == enc(tok, EOS.join(docs))
    assert ids.count(tok.eos_token_id) == 3
    assert c.sources == sources_for(docs, order, tok, 16, len(c.windows))
    assert set(c.sources) == set(order)
    assert c.n_documents == 4
    assert c.description == f"folder: 4 files of {root} ({c.n_tokens:,} tokens, 2 non-text files skipped)"


def test_jsonl_lines_blank_lines_and_sources(tmp_path, tok):
    rows = [{"text": doc_text(i), "id": i} for i in range(6)]
    rows[2]["text"] = "A dog in unicode: café, 狗, 🐕\n"
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n   \n", encoding="utf-8")
    names = ["line 1"] + [f"line {i + 2}" for i in range(1, 6)]

    c = load_corpus(str(path), tok, context=8)
    docs = [r["text"] for r in rows]
    ids = joined(tok, docs)
    assert torch.equal(c.windows, expected_windows(ids, 8))
    assert c.sources == sources_for(docs, names, tok, 8, len(c.windows))
    assert c.sources[0] == "line 1" and "line 3" in c.sources and "line 2" not in c.sources
    assert c.n_documents == 6
    assert c.description.startswith(f"jsonl: 6 lines of {path} (")


def test_empty_documents_are_skipped(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    texts = ["", doc_text(1), "", doc_text(2), ""]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    c = load_corpus(str(path), tok, context=4)
    assert torch.equal(c.windows, expected_windows(joined(tok, [doc_text(1), doc_text(2)]), 4))
    assert c.n_documents == 2


def test_no_separator_without_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer("byte_level").backend_tokenizer)
    assert plain.eos_token_id is None
    root = tmp_path / "docs"
    root.mkdir()
    (root / "1.txt").write_text(doc_text(1))
    (root / "2.txt").write_text(doc_text(2))
    c = load_corpus(str(root), plain, context=8)
    ids = enc(plain, doc_text(1)) + enc(plain, doc_text(2))
    assert torch.equal(c.windows, expected_windows(ids, 8))


def test_sentencepiece_tokenizer(tmp_path):
    sp = tiny_tokenizer("sentencepiece")
    path = tmp_path / "data.jsonl"
    docs = [doc_text(i) for i in range(4)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    c = load_corpus(str(path), sp, context=16)
    assert torch.equal(c.windows, expected_windows(joined(sp, docs), 16))
    assert sp.eos_token_id in c.windows.flatten().tolist()


# ---- max_tokens --------------------------------------------------------------------------------


def test_max_tokens_caps_and_stops_reading(tmp_path, tok):
    """Line 1500 is not JSON: the capped corpus never reads that far, the whole one does and fails there."""
    docs = [doc_text(i, lines=2) for i in range(2000)]
    lines = [json.dumps({"text": t}) for t in docs]
    lines[1499] = "{this is not json"
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")

    c = load_corpus(str(path), tok, context=32, max_tokens=32 * 10 + 7)
    assert c.windows.shape == (10, 32)
    assert torch.equal(c.windows, expected_windows(joined(tok, docs[:50]), 32)[:10])
    assert c.n_tokens == 320
    assert c.n_documents < 50
    names = [f"line {i + 1}" for i in range(50)]
    assert c.sources == sources_for(docs[:50], names, tok, 32, 10)
    assert c.description == f"jsonl: {c.n_documents} lines of {path} (first 320 tokens)"

    raises("line 1500 of .*big.jsonl is not JSON", str(path), tok, context=32)


def test_max_tokens_on_a_folder_reads_only_the_first_files(tmp_path, tok):
    root = tmp_path / "many"
    root.mkdir()
    docs = [doc_text(i) for i in range(300)]
    for i, text in enumerate(docs):
        (root / f"{i:03d}.txt").write_text(text)
    (root / "zzz.dat").write_bytes(b"\0\1\2" * 100)

    whole = load_corpus(str(root), tok, context=64)
    assert whole.description.endswith("1 non-text file skipped)")
    c = load_corpus(str(root), tok, context=64, max_tokens=64 * 5)
    assert torch.equal(c.windows, whole.windows[:5])
    assert c.sources == whole.sources[:5]
    assert c.n_documents < 20
    assert c.description == f"folder: {c.n_documents} files of {root} (first 320 tokens)"  # zzz.dat never read


def test_a_large_file_is_read_as_a_prefix(tmp_path, tok):
    """Text then binary garbage: a cap reads only a prefix (no error) and its windows are the whole file's."""
    text = "".join(doc_text(i, lines=4) for i in range(2500))
    assert len(text.encode()) > 4 * corpus_module.MIN_PREFIX_BYTES
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8") + b"\0\xff" * 1000)
    ids = enc(tok, text)
    c = load_corpus(str(path), tok, context=50, max_tokens=1000)
    assert torch.equal(c.windows, expected_windows(ids, 50)[:20])
    assert c.description == f"file: {path} (first 1,000 tokens)"
    raises(r"big.txt is not a text file: it has NUL bytes", str(path), tok, context=50)


def test_growing_prefixes_give_the_whole_files_tokens(tmp_path, tok, monkeypatch):
    """Batches and prefixes of a few dozen bytes, grown many times, cut anywhere: still the whole file's windows."""
    monkeypatch.setattr(corpus_module, "MIN_BATCH_CHARS", 64)
    monkeypatch.setattr(corpus_module, "BATCH_CHARS", 64)
    monkeypatch.setattr(corpus_module, "MIN_PREFIX_BYTES", 64)
    text = "".join(doc_text(i, lines=4) for i in range(40)) + "     \n\t  \n" + "狗 dog" * 300 + "x" * 3000
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    ids = enc(tok, text)
    for context, max_tokens in [(7, 70), (50, 1000), (64, len(ids) // 2), (64, len(ids) - 200), (64, len(ids))]:
        c = load_corpus(str(path), tok, context=context, max_tokens=max_tokens)
        assert torch.equal(c.windows, expected_windows(ids, context)[: max_tokens // context]), (context, max_tokens)
    root = tmp_path / "docs"
    root.mkdir()
    docs = [doc_text(i, lines=30) for i in range(5)]
    for i, doc in enumerate(docs):
        (root / f"{i}.txt").write_text(doc)
    whole = joined(tok, docs)
    for context, max_tokens in [(16, 160), (16, len(whole) - 100)]:
        c = load_corpus(str(root), tok, context=context, max_tokens=max_tokens)
        assert torch.equal(c.windows, expected_windows(whole, context)[: max_tokens // context])


def test_stdlib_with_a_cap(tok):
    from workers.demo_model import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    c = load_corpus("stdlib", tok, context=64, max_tokens=64 * 400)
    assert c.windows.shape == (400, 64)
    first = [p.read_text(encoding="utf-8") for p in files[: c.n_documents + 1]]
    assert torch.equal(c.windows, expected_windows(joined(tok, first), 64)[:400])
    assert c.sources[0] == files[0].relative_to(root).as_posix()
    assert not any(s.startswith(("site-packages/", "test/")) for s in c.sources)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert c.description == f"stdlib: {c.n_documents} files of the Python {version} standard library (first 25,600 tokens)"
    assert str(root) not in c.description, "no server path on public pages"


def test_stdlib_sample_is_seeded_spread_over_the_library_and_unseen_text_first(tok):
    """stdlib-sample: the stdlib's files in a seeded random order, the demo model's held-out files
    first; the same order every time, and a cap reads files from all over the library."""
    import random

    from workers.corpus import SAMPLE_SEED
    from workers.demo_model import is_held_out, stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    held, rest = [p for p in files if is_held_out(p)], [p for p in files if not is_held_out(p)]
    rng = random.Random(SAMPLE_SEED)
    rng.shuffle(held)
    rng.shuffle(rest)
    order = held + rest
    c = load_corpus("stdlib-sample", tok, context=64, max_tokens=64 * 400)
    again = load_corpus("stdlib-sample", tok, context=64, max_tokens=64 * 400)
    assert torch.equal(c.windows, again.windows) and c.sources == again.sources
    texts = [p.read_text(encoding="utf-8") for p in order[: c.n_documents + 1]]
    assert torch.equal(c.windows, expected_windows(joined(tok, texts), 64)[:400])
    assert c.sources[0] == order[0].relative_to(root).as_posix() and is_held_out(order[0])
    assert c.sources[0] != files[0].relative_to(root).as_posix(), "not the first file by path"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert c.description.startswith(f"stdlib: {c.n_documents} files of a seeded sample of the Python {version} standard")
    # the demo reads it: its examples come from all over the library, the held-out files first
    from app.config import Settings

    assert Settings().demo_corpus == "stdlib-sample"


def test_stdlib_files_leave_out_tests_caches_and_installed_packages(tmp_path):
    from workers.demo_model import stdlib_files

    kept = ["a.py", "json/decoder.py", "email/mime/text.py", "testing_tools.py"]
    left_out = ["json/notes.txt", "site-packages/torch/nn.py", "dist-packages/x.py", "test/test_json.py",
                "json/tests/t.py", "idlelib/idle_test/t.py", "json/__pycache__/decoder.py"]
    for rel in kept + left_out:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)] == sorted(kept)


# ---- bos_prefix_id -----------------------------------------------------------------------------


def test_bos_prefix_id(tok):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    assert bos_prefix_id(tok) is None  # has a BOS token, but does not prepend it
    backend = tiny_tokenizer("sentencepiece").backend_tokenizer
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert llama_like("a").input_ids[0] == bos
    assert bos_prefix_id(llama_like) == bos
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer("byte_level").backend_tokenizer)
    assert bos_prefix_id(no_bos) is None


def test_windows_have_no_bos_even_when_the_tokenizer_adds_one(tmp_path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer("sentencepiece").backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    path = tmp_path / "a.txt"
    path.write_text(TRAINING_TEXT)
    c = load_corpus(str(path), llama_like, context=16)
    assert 1 not in c.windows.flatten().tolist()


# ---- bad input ---------------------------------------------------------------------------------


def test_missing_path(tmp_path, tok):
    err = raises("no such file or folder", str(tmp_path / "nope.txt"), tok, context=8)
    assert "stdlib" in err.hint and "hf:" in err.hint


def test_empty_corpora(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    raises("has no text", str(tmp_path / "empty.txt"), tok, context=8)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    raises("has no text", str(tmp_path / "blank.jsonl"), tok, context=8)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / ".only-hidden").write_text("some text")
    raises("has no files", str(tmp_path / "dir"), tok, context=8)
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "a.so").write_bytes(b"\x7fELF\0\0")
    (tmp_path / "bins" / "b.txt").write_bytes(b"\xff\xfe\xfd")
    raises(r"has no text: 2 files in it are binary or not UTF-8 \(e.g. a.so\)", str(tmp_path / "bins"), tok, context=8)


def test_binary_single_file(tmp_path, tok):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04\0\0abc")
    raises(r"model.bin is not a text file: it has NUL bytes", str(tmp_path / "model.bin"), tok, context=8)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1") * 10)
    raises(r"latin.txt is not a text file: it is not valid UTF-8", str(tmp_path / "latin.txt"), tok, context=8)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json}", r"line 3 of .*bad.jsonl is not JSON"),
        ('{"content": "a dog", "id": 7}', r"line 3 of .*bad.jsonl has no field \"text\" \(its keys: 'content', 'id'\)"),
        ('{"text": 5}', r'line 3 of .*bad.jsonl has a int, not a string, in its field "text"'),
        ('["a dog"]', r"line 3 of .*bad.jsonl is a JSON list, not an object"),
    ],
)
def test_bad_jsonl_line(tmp_path, tok, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a dog"}) + "\n\n" + line + "\n")
    err = raises(match, str(path), tok, context=2)
    assert '"text"' in err.hint


def test_too_short(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("The dog sat.")
    n = len(enc(tok, "The dog sat."))
    err = raises(rf"has {n} tokens, fewer than one window of 64 tokens", str(path), tok, context=64)
    assert err.hint == "Lower --context or give more text."


def test_bad_context_and_max_tokens(tmp_path, tok):
    path = tmp_path / "a.txt"
    path.write_text(TRAINING_TEXT)
    raises("a window of 1 tokens is too short", str(path), tok, context=1)
    raises("max_tokens 10 is less than one window of 64 tokens", str(path), tok, context=64, max_tokens=10)


def test_hf_bad_spec(tok):
    raises("is not a dataset spec", "hf:a:b:c:d", tok, context=8)
    raises("is not a dataset spec", "hf:", tok, context=8)


def test_hf_without_datasets(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    err = raises("needs the datasets package", "hf:roneneldan/TinyStories", tok, context=8)
    assert "pip install 'needle[hf]'" in err.hint


NO_SUCH_DATASET = "needle-tests/no-such-dataset-4f9c"
# What the hub answers for a missing (or private) repo: the error code is what makes huggingface_hub raise
# RepositoryNotFoundError (a bare 404 is a plain HTTP error to it).
REPO_NOT_FOUND = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}


def point_datasets_at(monkeypatch, tmp_path, url: str) -> None:
    """huggingface_hub and datasets both talking to url, with empty caches, not offline."""
    import datasets

    point_hub_at(monkeypatch, url, tmp_path / "hub-cache")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)


def test_hf_missing_dataset_asks_the_hub_once(tok, tmp_path, monkeypatch):
    """A dataset the hub does not have: one request (the probe), then the error; datasets is never asked."""
    import datasets  # noqa: F401 - a test dependency: missing, this fails rather than skips
    with counting_hub(status=404, headers=REPO_NOT_FOUND) as hub:
        point_datasets_at(monkeypatch, tmp_path, hub.url)
        err = raises(f"no dataset '{NO_SUCH_DATASET}' on the Hugging Face hub", f"hf:{NO_SUCH_DATASET}", tok, context=8)
    assert hub.requests == [("GET", f"/api/datasets/{NO_SUCH_DATASET}")]
    assert "Check the name" in err.hint


def test_hf_failing_hub_is_asked_once(tok, tmp_path, monkeypatch):
    """A hub that answers 503 (a status huggingface_hub's backoff retries): one request, no retries."""
    import datasets  # noqa: F401 - a test dependency: missing, this fails rather than skips
    with counting_hub(status=503) as hub:
        point_datasets_at(monkeypatch, tmp_path, hub.url)
        err = raises(f"could not reach the Hugging Face hub to load the dataset '{NO_SUCH_DATASET}'",
                     f"hf:{NO_SUCH_DATASET}", tok, context=8)
    assert hub.requests == [("GET", f"/api/datasets/{NO_SUCH_DATASET}")]
    assert "503" in err.message and "HF_HUB_OFFLINE=1" in err.hint


@pytest.mark.parametrize("hub_offline", [True, False], ids=["hub-and-datasets-offline", "datasets-offline"])
def test_hf_missing_dataset_offline(tok, tmp_path, monkeypatch, hub_offline):
    """Offline, only the local cache is looked in: not one request, even to a hub that would answer. With only
    datasets offline (HF_DATASETS_OFFLINE), huggingface_hub itself would let a request through."""
    import datasets  # a test dependency: missing, this fails rather than skips
    from huggingface_hub import constants

    with counting_hub(status=404, headers=REPO_NOT_FOUND) as hub:
        point_datasets_at(monkeypatch, tmp_path, hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_offline)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        err = raises(f"could not load the dataset '{NO_SUCH_DATASET}'", f"hf:{NO_SUCH_DATASET}", tok, context=8)
    assert hub.requests == []
    assert "HF_HUB_OFFLINE" in err.message


def test_hf_local_dataset(tmp_path, tok):
    import datasets  # noqa: F401 - a test dependency: missing, this fails rather than skips
    root = tmp_path / "ds"
    root.mkdir()
    docs = [doc_text(i) for i in range(5)]
    (root / "train.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(docs)))
    c = load_corpus(f"hf:{root}:train:body", tok, context=16)
    assert torch.equal(c.windows, expected_windows(joined(tok, docs), 16))
    assert c.sources[0] == "train[0]" and c.sources[-1] == "train[4]"
    assert c.description.startswith(f"hf: 5 rows of {root} train['body'] (")
    raises(r"row train\[0\] of the dataset .* has no string field 'text' \(its fields: 'body', 'n'\)",
           f"hf:{root}", tok, context=16)  # fmt: skip
    raises(r"could not load the dataset .*\(split 'nosplit'\)", f"hf:{root}:nosplit:body", tok, context=16)
