"""A text corpus cut into windows of token ids, for running a model over real text.

    corpus = load_corpus("docs/", tokenizer, context=128, max_tokens=262_144)
    corpus.windows      # int64 [n_windows, 128]

SPEC is one of:

- a text file, or a folder: every regular file under it, recursively, in order of relative
  path, hidden files and folders (names starting with ".") left out; files that are not
  text (NUL bytes, or not valid UTF-8) are skipped in a folder and an error as a single file;
- a `.jsonl` file: one JSON object per line with a string field "text", blank lines skipped;
- `hf:NAME[:split[:field]]`: a Hugging Face dataset (split "train" and field "text" by
  default), streamed with the `datasets` package (`pip install 'needle[hf]'`); NAME may also
  be a local dataset folder or data file;
- `stdlib`: the Python standard library's own .py sources (tests, site-packages and
  dist-packages left out), the text the demo model was trained on, in order of path;
- `stdlib-sample`: the same files in a seeded random order (SAMPLE_SEED), the demo model's
  held-out files (workers/demo_model.is_held_out, text it never trained on) first: a token
  cap reads a sample spread over the whole library rather than its first files by name. The
  demo's examples corpus.

Method: documents (files, lines, rows) are read in a fixed order (sorted paths, line
order, dataset order), tokenized with add_special_tokens=False, joined into one stream with
the tokenizer's EOS id between documents (nothing between them when it has no EOS), and cut
into consecutive non-overlapping windows of `context` tokens; the last partial window is
dropped. No BOS or other special token is put in front of a window (`bos_prefix_id` says
which id a caller should prepend to match how the model saw text). Empty documents are
skipped. With max_tokens the corpus is the first max_tokens // context windows of that
stream: documents are read and tokenized lazily, in batches sized to what is still needed,
and reading stops as soon as the windows are full; a large file is read as a prefix cut at
a line end, grown until it yields the tokens needed plus a margin, and the margin is
dropped, so the windows are the same as if the whole file had been tokenized.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.errors import NeedleError

HUB_PROBE_TIMEOUT_S = 5.0
SPEC_FORMS = "a text file, a folder of text files, a .jsonl file, hf:NAME[:split[:field]], stdlib or stdlib-sample"
SAMPLE_SEED = 0  # the order of stdlib-sample's files

BATCH_CHARS = 4_000_000  # text per tokenizer batch when everything is read
MIN_BATCH_CHARS = 16_384
MAX_BATCH_DOCS = 512
MIN_PREFIX_BYTES = 65_536  # the least of a large file read at once under a cap
PREFIX_MARGIN = 64  # tokens read past what is needed from a file prefix, then dropped
_HF_DATA_FILES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Corpus:
    spec: str  # the SPEC as the user gave it
    description: str  # one human line
    windows: torch.Tensor  # int64 [n_windows, context] token ids, no special prefix
    sources: list[str]  # per window: the document it starts in
    n_documents: int  # documents read (fully or partly) into the windows

    @property
    def n_tokens(self) -> int:
        return int(self.windows.shape[0]) * int(self.windows.shape[1])


def bos_prefix_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself prepends it to plain text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a").input_ids
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "a" prepends nothing we can see
        return None
    return bos if ids and ids[0] == bos else None


# ---- documents -----------------------------------------------------------------------------


class _Binary(Exception):
    """A file that is not text: NUL bytes or not valid UTF-8."""


@dataclass
class _Doc:
    name: str
    # read(limit): (text, complete). limit: bytes to read at most (None: all); raises _Binary.
    read: Callable[[int | None], tuple[str, bool]]


@dataclass
class _Source:
    kind: str  # "file", "folder", "jsonl", "hf", "stdlib"
    place: str  # what the description says it is of
    unit: str  # what a document is: "file", "line", "row"
    docs: Iterator[_Doc]
    skip_binary: bool  # folder: skip non-text files; single file: raise
    skipped: list[str] = field(default_factory=list)


def _file_reader(path: Path) -> Callable[[int | None], tuple[str, bool]]:
    def read(limit: int | None) -> tuple[str, bool]:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
        complete = limit is None or len(data) <= limit
        if not complete:
            data = data[:limit]
            cut = data.rfind(b"\n")
            if cut >= len(data) // 2:
                data = data[: cut + 1]
        if b"\0" in data:
            raise _Binary("it has NUL bytes")
        try:  # incremental: a prefix may end inside a character
            text = codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=complete)
        except UnicodeDecodeError as exc:
            raise _Binary(f"it is not valid UTF-8 (byte {exc.start})") from None
        return text, complete

    return read


def _whole(text: str) -> Callable[[int | None], tuple[str, bool]]:
    return lambda _limit: (text, True)


def _folder_files(root: Path) -> list[Path]:
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _files_source(kind: str, root: Path, files: list[Path], place: str) -> _Source:
    docs = (_Doc(p.relative_to(root).as_posix(), _file_reader(p)) for p in files)
    return _Source(kind, place, "file", docs, skip_binary=True)


def _jsonl_docs(path: Path, spec: str) -> Iterator[_Doc]:
    hint = 'Give one JSON object per line with the document in a string field "text": {"text": "..."}.'
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                raise NeedleError(f"line {number} of {spec} is not valid UTF-8 (byte {exc.start})", hint=hint) from None
            except json.JSONDecodeError as exc:
                raise NeedleError(
                    f"line {number} of {spec} is not JSON: {exc.msg} (column {exc.colno})", hint=hint
                ) from None
            except RecursionError:
                raise NeedleError(
                    f"line {number} of {spec} is JSON nested too deeply to read (arrays or objects inside each other)",
                    hint=hint,
                ) from None
            if not isinstance(row, dict):
                raise NeedleError(
                    f'line {number} of {spec} is a JSON {type(row).__name__}, not an object with a "text" field',
                    hint=hint,
                )
            text = row.get("text")
            if not isinstance(text, str):
                keys = ", ".join(map(repr, row)) or "none"
                what = "has no" if text is None else f"has a {type(text).__name__}, not a string, in its"
                raise NeedleError(f'line {number} of {spec} {what} field "text" (its keys: {keys})', hint=hint)
            yield _Doc(f"line {number}", _whole(text))


def _stdlib_files(sample: bool = False) -> tuple[Path, list[Path]]:
    """The stdlib's sources by path; with `sample`, in stdlib-sample's order (module docstring)."""
    import random
    import sysconfig

    from workers.demo_model import is_held_out, stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib_files() if "dist-packages" not in p.relative_to(root).parts]
    if sample:
        held = [p for p in files if is_held_out(p)]
        rest = [p for p in files if not is_held_out(p)]
        rng = random.Random(SAMPLE_SEED)
        rng.shuffle(held)
        rng.shuffle(rest)
        files = held + rest
    return root, files


# ---- Hugging Face datasets ------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hf_offline() -> bool:
    import datasets
    from huggingface_hub import constants

    return bool(
        constants.HF_HUB_OFFLINE
        or getattr(datasets.config, "HF_HUB_OFFLINE", False)
        or getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    )


def _hf_probe(name: str) -> None:
    """One quick look at the hub, no retries: a missing dataset or no network fails in seconds."""
    from huggingface_hub import HfApi, errors

    try:
        HfApi().dataset_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except (ValueError, errors.HFValidationError) as exc:
        raise NeedleError(
            f"{name!r} is not a valid Hugging Face dataset name: {_first_line(exc)}",
            hint="Use hf:OWNER/NAME[:split[:field]], e.g. hf:roneneldan/TinyStories.",
        ) from None
    except errors.GatedRepoError:
        raise NeedleError(
            f"the dataset {name!r} is gated on the Hugging Face hub",
            hint="Accept its terms on the hub and log in (hf auth login).",
        ) from None
    except errors.RepositoryNotFoundError:
        raise NeedleError(
            f"no dataset {name!r} on the Hugging Face hub",
            hint="Check the name (OWNER/NAME); if it is private, log in (hf auth login).",
        ) from None
    except Exception as exc:  # noqa: BLE001 - DNS failure, refused connection, timeout, proxy: all "unreachable"
        raise NeedleError(
            f"could not reach the Hugging Face hub to load the dataset {name!r} (no connection: {_first_line(exc)})",
            hint="Run where the hub is reachable, set HF_HUB_OFFLINE=1 to use a copy already in the local cache, "
            "or pass a local .jsonl file or folder instead.",
        ) from None


def _hf_source(spec: str) -> _Source:
    parts = spec[len("hf:") :].split(":")
    usage = "Use hf:NAME[:split[:field]], e.g. hf:roneneldan/TinyStories or hf:NAME:validation:content."
    if len(parts) > 3 or not parts[0].strip():
        raise NeedleError(f"{spec!r} is not a dataset spec", hint=usage)
    name = parts[0].strip()
    split = (parts[1].strip() if len(parts) > 1 else "") or "train"
    text_field = (parts[2].strip() if len(parts) > 2 else "") or "text"
    try:
        import datasets
    except ImportError:
        raise NeedleError(
            f"reading the dataset {name!r} needs the datasets package, which is not installed",
            hint="pip install 'needle[hf]' (or pip install datasets).",
        ) from None

    local = Path(name).expanduser()
    streaming = True
    try:
        if local.is_file():
            builder = _HF_DATA_FILES.get(local.suffix.lower())
            if builder is None:
                raise NeedleError(
                    f"{name} is a file datasets cannot read by its suffix {local.suffix!r}",
                    hint=f"Give a {', '.join(_HF_DATA_FILES)} file or a dataset folder, or drop hf: for plain text.",
                )
            data = datasets.load_dataset(builder, data_files={split: str(local)}, split=split, streaming=True)
        elif local.is_dir():
            data = datasets.load_dataset(str(local), split=split, streaming=True)
        elif _hf_offline():
            streaming = False  # the prepared copy in the local cache, memory-mapped
            data = datasets.load_dataset(name, split=split)
        else:
            _hf_probe(name)
            data = datasets.load_dataset(name, split=split, streaming=True)
    except NeedleError:
        raise
    except Exception as exc:  # noqa: BLE001 - unknown split, missing config, no files, cache miss offline
        why, hint = _first_line(exc), usage
        if not streaming:
            why += "; HF_HUB_OFFLINE is set, so only the local cache was looked in"
            hint = "Load it once where the hub is reachable (without HF_HUB_OFFLINE), or pass a local copy."
        raise NeedleError(f"could not load the dataset {name!r} (split {split!r}): {why}", hint=hint) from None

    def docs() -> Iterator[_Doc]:
        rows = iter(data)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a connection lost mid-stream, a corrupt shard
                raise NeedleError(
                    f"reading the dataset {name!r} failed at {split}[{index}]: {_first_line(exc)}",
                    hint="Try again, or pass a local copy.",
                ) from None
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                keys = ", ".join(map(repr, row)) if isinstance(row, dict) else "none"
                raise NeedleError(
                    f"row {split}[{index}] of the dataset {name!r} has no string field {text_field!r} "
                    f"(its fields: {keys})",
                    hint=f"Name the text field: hf:{name}:{split}:FIELD.",
                )
            yield _Doc(f"{split}[{index}]", _whole(text))
            index += 1

    return _Source("hf", f"{name} {split}[{text_field!r}]", "row", docs(), skip_binary=False)


# ---- the stream --------------------------------------------------------------------------------


def _open(spec: str) -> _Source:
    text = spec.strip()
    if not text:
        raise NeedleError("no corpus given", hint=f"Give {SPEC_FORMS}.")
    if text in ("stdlib", "stdlib-sample"):
        sample = text == "stdlib-sample"
        root, files = _stdlib_files(sample)
        # named, not by its folder: the server's install path has no place on public pages
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        what = (f"a seeded sample of the Python {version} standard library (its files in a seeded random order, "
                "the demo model's held-out files first)") if sample else f"the Python {version} standard library"
        return _files_source("stdlib", root, files, what)
    if text.startswith("hf:"):
        return _hf_source(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise NeedleError(f"no such file or folder: {text}", hint=f"Give {SPEC_FORMS}.")
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise NeedleError(
                f"the folder {text} has no files (hidden files are left out)",
                hint="Put text files in it, or give another folder.",
            )
        return _files_source("folder", path, files, text)
    if not path.is_file():
        raise NeedleError(f"{text} is neither a regular file nor a folder", hint=f"Give {SPEC_FORMS}.")
    if path.suffix.lower() == ".jsonl":
        return _Source("jsonl", text, "line", _jsonl_docs(path, text), skip_binary=False)
    return _Source("file", text, "file", iter([_Doc(path.name, _file_reader(path))]), skip_binary=False)


def _read(source: _Source, doc: _Doc, limit: int | None) -> tuple[str, bool] | None:
    """(text, complete): the document's text, a prefix if limit cut it; None for a skipped non-text file."""
    try:
        return doc.read(limit)
    except _Binary as exc:
        if source.skip_binary:
            source.skipped.append(doc.name)
            return None
        raise NeedleError(
            f"{source.place} is not a text file: {exc}",
            hint="Give a UTF-8 text file, a folder of them, or a .jsonl file with a \"text\" field per line.",
        ) from None
    except OSError as exc:
        raise NeedleError(
            f"could not read {doc.name} of {source.place}: {exc.strerror or exc}",
            hint="Check that the file is readable.",
        ) from None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(
        texts, add_special_tokens=False, verbose=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]


@dataclass
class _Stream:
    chunks: list[torch.Tensor] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # offset of each document's first token
    names: list[str] = field(default_factory=list)
    total: int = 0
    chars: int = 0

    def add(self, name: str, ids: list[int], eos: int | None, n_chars: int) -> None:
        if not ids:
            return
        if self.chunks and eos is not None:
            self.chunks.append(torch.tensor([eos], dtype=torch.long))
            self.total += 1
        self.starts.append(self.total)
        self.names.append(name)
        self.chunks.append(torch.tensor(ids, dtype=torch.long))
        self.total += len(ids)
        self.chars += n_chars


def _fill(source: _Source, tokenizer, need: int | None) -> tuple[_Stream, bool]:
    """Read and tokenize documents until `need` tokens are in the stream (all of them if None).

    Returns the stream and whether reading stopped before the end of the corpus."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream = _Stream()
    docs = source.docs
    while need is None or stream.total < need:
        if need is None:
            target = BATCH_CHARS
        else:  # chars still needed at the chars-per-token seen so far (4 before any), with room
            ratio = stream.chars / stream.total if stream.total else 4.0
            target = min(BATCH_CHARS, max(MIN_BATCH_CHARS, int((need - stream.total) * ratio * 1.25)))
        batch: list[tuple[_Doc, str, bool]] = []
        size = 0
        for doc in docs:
            limit = None if need is None else max(MIN_PREFIX_BYTES, 2 * (target - size))
            got = _read(source, doc, limit)
            if not got or not got[0]:
                continue
            text, complete = got
            batch.append((doc, text, complete))
            size += len(text)
            if not complete or size >= target or len(batch) >= MAX_BATCH_DOCS:
                break
        if not batch:
            return stream, False
        for (doc, text, complete), ids in zip(batch, _encode(tokenizer, [t for _, t, _ in batch])):
            if need is not None and stream.total >= need:
                return stream, True
            if not complete:  # a prefix of a large file: grow it until it holds what is needed, plus a margin
                assert need is not None  # only a read with a limit stops short, and only a set need gives one
                wanted = need - stream.total - (1 if stream.chunks and eos is not None else 0)
                read_bytes = len(text.encode("utf-8"))
                while not complete and len(ids) < wanted + PREFIX_MARGIN:
                    # grow by the bytes per token seen so far, with room: at least 1.25x, at most 8x
                    growth = (wanted + PREFIX_MARGIN) / max(len(ids), 1) * 1.2
                    read_bytes = int(read_bytes * min(8.0, max(1.25, growth)))
                    got = _read(source, doc, read_bytes)
                    if got is None:  # non-text further in: keep the prefix we have
                        break
                    text, complete = got
                    ids = _encode(tokenizer, [text])[0]
                if not complete:
                    ids = ids[:wanted]  # the tokens near the cut could differ from the whole file's
            stream.add(doc.name, ids, eos, len(text))
    return stream, True


def _plural(n: int, unit: str) -> str:
    return f"{n:,} {unit}" + ("" if n == 1 else "s")


def load_corpus(spec: str, tokenizer, *, context: int, max_tokens: int | None = None) -> Corpus:
    """Read SPEC into windows of `context` token ids (see the module docstring for the method)."""
    if context < 2:
        raise NeedleError(f"a window of {context} tokens is too short", hint="Give a context of at least 2 tokens.")
    if max_tokens is not None and max_tokens < context:
        raise NeedleError(
            f"max_tokens {max_tokens:,} is less than one window of {context:,} tokens",
            hint="Raise the token cap (--tokens) to at least the context, or lower --context.",
        )
    source = _open(spec)
    max_windows = None if max_tokens is None else max_tokens // context
    try:
        stream, stopped = _fill(source, tokenizer, None if max_windows is None else max_windows * context)
    finally:
        close = getattr(source.docs, "close", None)
        if close is not None:
            close()

    if stream.total == 0:
        if source.skipped:
            raise NeedleError(
                f"the folder {source.place} has no text: {_plural(len(source.skipped), 'file')} in it "
                f"{'is' if len(source.skipped) == 1 else 'are'} binary or not UTF-8 (e.g. {source.skipped[0]}), "
                "any others are empty",
                hint="Give a folder of UTF-8 text files.",
            )
        raise NeedleError(f"the corpus {spec} has no text", hint="Give a corpus with some text in it.")
    n_windows = stream.total // context
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise NeedleError(
            f"the corpus {spec} has {_plural(stream.total, 'token')}, fewer than one window of {context:,} tokens",
            hint="Lower --context or give more text.",
        )
    used = n_windows * context
    windows = torch.cat(stream.chunks)[:used].view(n_windows, context)
    starts = torch.tensor(stream.starts, dtype=torch.long)
    first_doc = torch.searchsorted(starts, torch.arange(n_windows, dtype=torch.long) * context, right=True) - 1
    sources = [stream.names[i] for i in first_doc.tolist()]
    n_documents = int((starts < used).sum())

    what = source.place if source.kind == "file" else f"{_plural(n_documents, source.unit)} of {source.place}"
    tokens = f"first {used:,} tokens" if stopped else f"{used:,} tokens"
    skipped = f", {_plural(len(source.skipped), 'non-text file')} skipped" if source.skipped else ""
    description = f"{source.kind}: {what} ({tokens}{skipped})"
    return Corpus(spec=spec, description=description, windows=windows, sources=sources, n_documents=n_documents)
