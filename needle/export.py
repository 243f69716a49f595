"""`needle export`: a model's decodings, activation examples and probe results as Parquet or JSONL.

    needle export NAME --format parquet|jsonl --out DIR [--what decodings,examples,probes]
                  [--layers A:B] [--force]

DIR gets one file per table (`decodings`, `examples`, `probes`, `features`, `feature_layers`,
each `.parquet` or `.jsonl`) and `manifest.json`: the model's metadata, the examples and probe
runs' settings, every table's file, row count and columns (name, type, meaning), and the
export's format and version. TABLES below is the schema; the manifest repeats it.

- Values are the stored ones, not the pages' rounded ones: float32 arrays as float32, float
  scalars as float64, float16 activations widened to float32 (exactly). A value that is not
  finite is null, so every JSONL line is strict JSON. Token strings are the vocabulary's text
  (what the pages show, leading space kept); a token id the vocabulary lacks has a null string.
- Both formats are written from the same rows, so they hold the same data: a Parquet column is
  the JSONL key of the same name (list<...> a JSON array, struct<...> a JSON object).
- Memory stays bounded: tables are read and written a batch of neurons of one layer at a time
  (about a million per-token values per batch of `examples`), and each Parquet batch is one
  row group. On Postgres the whole export reads one snapshot (REPEATABLE READ).
- Nothing is written unless every argument is good: the files are written under temporary
  names and renamed at the end (manifest.json last); a failed export removes them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.errors import NeedleError

FORMAT_NAME = "needle-export"
FORMAT_VERSION = 1
FORMATS = ("parquet", "jsonl")
WHAT = ("decodings", "examples", "probes")
EXAMPLE_VALUES_PER_BATCH = 1 << 20  # per-token values (windows x context) of `examples` held per batch
DECODINGS_PER_BATCH = 4096  # neurons per batch of `decodings` and `probes`

# ---------------------------------------------------------------- types: a small description both formats share

I32, I64, F32, F64, STR, BOOL = "int32", "int64", "float32", "float64", "string", "bool"


def List(item) -> tuple:  # a type, so capitalised
    return ("list", item)


def Struct(*fields: tuple) -> tuple:
    return ("struct", fields)


def type_name(t) -> str:
    if isinstance(t, str):
        return t
    if t[0] == "list":
        return f"list<{type_name(t[1])}>"
    return "struct<" + ", ".join(f"{name}: {type_name(ft)}" for name, ft, *_ in t[1]) + ">"


def arrow_type(pa, t):
    if isinstance(t, str):
        return {I32: pa.int32(), I64: pa.int64(), F32: pa.float32(), F64: pa.float64(), STR: pa.string(),
                BOOL: pa.bool_()}[t]
    if t[0] == "list":
        return pa.list_(arrow_type(pa, t[1]))
    return pa.struct([(name, arrow_type(pa, ft)) for name, ft, *_ in t[1]])


@dataclass(frozen=True)
class Table:
    name: str
    what: str  # the --what choice that exports it
    description: str
    columns: tuple  # (name, type, description)

    def schema(self, pa):
        fields = [pa.field(name, arrow_type(pa, t)) for name, t, _ in self.columns]
        return pa.schema(fields, metadata={"needle.table": self.name, "needle.format_version": str(FORMAT_VERSION)})

    def manifest(self) -> dict:
        return {"description": self.description,
                "columns": [{"name": n, "type": type_name(t), "description": d} for n, t, d in self.columns]}


EXAMPLE = Struct(
    ("window", I32), ("source", STR), ("token_ids", List(I32)), ("tokens", List(STR)),
    ("activations", List(F32)), ("max_activation", F32), ("max_index", I32),
)
# a top negative context: the same fields in the same order, its min and where it is for its max
NEGATIVE_EXAMPLE = Struct(
    ("window", I32), ("source", STR), ("token_ids", List(I32)), ("tokens", List(STR)),
    ("activations", List(F32)), ("min_activation", F32), ("min_index", I32),
)
EXAMPLE_TEXT = ("{window, source, token_ids, tokens, activations, max_activation, max_index}: a corpus window "
                "(id into the corpus's windows, and the file it came from), its token ids and strings, the neuron's "
                "activation on each token, its max and where it is")

TABLES = {
    t.name: t
    for t in (
        Table("decodings", "decodings", "One row per decoded neuron: its input-weight decodings p = softmax(W_U · w_in) "
              "(the top tokens with p and the normalised score s = p / mean(top-100 p)) and its direct logit effect "
              "W_U · w_out (top promoted and suppressed tokens, raw logits), best first.", (
            ("layer", I32, "layer"),
            ("neuron", I32, "neuron within the layer"),
            ("top_token_id", I32, "the top input-weight token"),
            ("top_token", STR, "its text"),
            ("top_prob", F64, "its p"),
            ("top_score", F64, "its normalised score s"),
            ("mean_top100", F64, "mean of the neuron's top-100 p (the score's normaliser)"),
            ("entropy", F64, "entropy of the whole decoding p, in nats (null: decoded before it was stored)"),
            ("input_token_ids", List(I32), "top input-weight tokens, best first"),
            ("input_tokens", List(STR), "their text"),
            ("input_probs", List(F32), "their p"),
            ("input_scores", List(F32), "their normalised score s"),
            ("promoted_token_ids", List(I32), "tokens the neuron's output weights promote most, largest logit first"),
            ("promoted_tokens", List(STR), "their text"),
            ("promoted_logits", List(F32), "their logit W_U · w_out"),
            ("suppressed_token_ids", List(I32), "tokens the output weights suppress most, most negative first"),
            ("suppressed_tokens", List(STR), "their text"),
            ("suppressed_logits", List(F32), "their logit W_U · w_out"),
        )),
        Table("examples", "examples", "One row per neuron with activation examples: statistics over every corpus "
              "token, the stored histogram, the top windows and the interval samples (see the manifest's "
              "examples_run for the corpus and the method).", (
            ("layer", I32, "layer"),
            ("neuron", I32, "neuron within the layer"),
            ("tokens", I64, "corpus tokens the statistics are over"),
            ("frequency", F64, "share of tokens with activation > 0"),
            ("frequency_above", F64, "share of tokens above the threshold"),
            ("threshold", F64, "the first interval edge (1/5 of the estimated max); null if none"),
            ("silent", BOOL, "its largest |activation| is under 1% of its layer's median (dead, for SiLU and GELU "
                               "neurons); null if not computed"),
            ("mean", F64, "mean activation"),
            ("std", F64, "standard deviation of the activation"),
            ("min", F64, "smallest activation"),
            ("max", F64, "largest activation"),
            ("histogram_edges", List(F32), ("the histogram's bin edges as stored (over the estimated range widened "
                                            "by a quarter each side; the end bins also hold anything beyond)")),
            ("histogram_counts", List(I64), "tokens per histogram bin"),
            ("examples", List(EXAMPLE), "the top windows by their max activation, best first: " + EXAMPLE_TEXT),
            ("interval_samples", List(Struct(("bin", I32), ("low", F32), ("high", F32), ("tokens", I64),
                                             ("examples", List(EXAMPLE)))),
             "per interval bin (low, high]: firing tokens in it and the windows sampled from it"),
            ("negative_examples", List(NEGATIVE_EXAMPLE),
             "a gated MLP's neuron (SwiGLU, GeGLU): the top windows by their min activation, most negative first, "
             "those below 0, as examples with min_activation and min_index; null for other MLPs and SAE latents"),
        )),
        Table("probes", "probes", "One row per neuron of the exported layers: the features for which it is among "
              "its layer's top neurons by mean difference, with its single-neuron probe (best F1 first; empty for "
              "most neurons).", (
            ("layer", I32, "layer"),
            ("neuron", I32, "neuron within the layer"),
            ("features", List(Struct(("feature", STR), ("rank", I32), ("mean_dif", F64), ("f1", F64),
                                     ("precision", F64), ("recall", F64))),
             ("feature, rank by mean difference in the layer (1 = first), |mean(pos) - mean(neg)| in train-std "
              "units, and the single-neuron probe's held-out F1, precision and recall")),
        )),
        Table("features", "probes", "One row per probed feature (all of the model's, whatever --layers): its data "
              "and the best single neuron over all layers.", (
            ("feature", STR, "name"),
            ("kind", STR, "token or sequence"),
            ("aggregation", STR, "how a sequence feature aggregates a row's activations"),
            ("source", STR, "the dataset it came from"),
            ("description", STR, "what it labels"),
            ("status", STR, "probed, or skipped"),
            ("reason", STR, "why it was skipped; null if probed"),
            ("train_pos", I64, "positive train samples"),
            ("train_neg", I64, "negative train samples"),
            ("test_pos", I64, "positive test samples"),
            ("test_neg", I64, "negative test samples"),
            ("best_layer", I32, "layer of the best k = 1 probe"),
            ("best_neuron", I32, "its neuron"),
            ("best_f1", F64, "its held-out F1"),
        )),
        Table("feature_layers", "probes", "One row per probed feature and exported layer: the best single neuron, "
              "the top neurons by mean difference with their single-neuron probes, and the F1-vs-k sweeps.", (
            ("feature", STR, "name"),
            ("layer", I32, "layer"),
            ("best_neuron", I32, "the k = 1 probe's neuron"),
            ("best_f1", F64, "its held-out F1"),
            ("best_precision", F64, "its held-out precision"),
            ("best_recall", F64, "its held-out recall"),
            ("top_neurons", List(Struct(("rank", I32), ("neuron", I32), ("mean_dif", F64), ("f1", F64),
                                        ("precision", F64), ("recall", F64))),
             "the layer's top neurons by mean difference (rank 1 first) with their single-neuron probes"),
            ("curve", List(Struct(("k", I32), ("f1", F64), ("precision", F64), ("recall", F64),
                                  ("neurons", List(I32)))),
             "fast sweep: an L2 probe on the top-k neurons, per k"),
            ("pruned_curve", List(Struct(("k", I32), ("f1", F64), ("precision", F64), ("recall", F64),
                                         ("neurons", List(I32)), ("enet_f1", F64), ("enet_precision", F64),
                                         ("enet_recall", F64))),
             "pruning sweep: the neurons an elastic net keeps at each k, with the L2 refit's and the net's metrics"),
        )),
    )
}
ALL_FILES = [f"{name}.{fmt}" for name in TABLES for fmt in FORMATS] + ["manifest.json"]


# ---------------------------------------------------------------- arguments


def parse_format(text: str) -> str:
    if text not in FORMATS:
        raise NeedleError(f"--format {text!r} is not an export format.", hint="Use --format parquet or --format jsonl.")
    return text


def parse_what(text: str | None) -> list[str] | None:
    """The --what choices, in their canonical order; None for "everything the model has"."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in WHAT]
    if not names or unknown:
        what = f"unknown part(s) {', '.join(map(repr, unknown))}" if unknown else "nothing"
        raise NeedleError(f"--what {text!r} names {what}.",
                          hint=f"Choose from {', '.join(WHAT)}, comma-separated, e.g. --what decodings,probes.")
    return [w for w in WHAT if w in names]


_NUMBER = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]*):([0-9]*)")
LAYERS_HINT = "Write A:B for layers A to B-1 (e.g. --layers 0:4), A: or :B for an open end, or one layer number."


def parse_layers(text: str | None) -> tuple[int | None, int | None]:
    """--layers A:B (half-open, like a Python slice), A:, :B, or N (that layer alone)."""
    if text is None:
        return None, None
    t = text.replace(" ", "")
    if _NUMBER.fullmatch(t):
        return int(t), int(t) + 1
    m = _RANGE.fullmatch(t)
    if m is None:
        raise NeedleError(f"--layers {text!r} is not a layer range.", hint=LAYERS_HINT)
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] else None)


def resolve_layers(text: str | None, span: tuple[int | None, int | None], model_name: str, n_layers: int) -> range:
    start, stop = span
    start = 0 if start is None else start
    stop = n_layers if stop is None else stop
    if stop > n_layers or start >= n_layers:
        raise NeedleError(
            f"--layers {text!r} goes past the layers of {model_name!r}, which are 0 to {n_layers - 1}.",
            hint=f"{LAYERS_HINT} All of them: --layers 0:{n_layers} (or leave --layers out).",
        )
    if start >= stop:
        raise NeedleError(f"--layers {text!r} is empty: it must start before it ends.", hint=LAYERS_HINT)
    return range(start, stop)


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NeedleError(f"--out {str(out)!r} is a file, not a folder.", hint="Give a folder to write the files in.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NeedleError(
            f"--out {str(out)!r} is not empty.",
            hint="Choose a new or empty folder, or pass --force to write into it (the files of an earlier "
            "export there are replaced; other files are left alone).",
        )


def out_error(out: Path, exc: OSError) -> NeedleError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    return NeedleError(f"Cannot write to --out {str(out)!r}: {exc.strerror or exc}{where}.",
                       hint="Give a folder you can write to (it is made if missing).")


def require_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise NeedleError(
            "--format parquet needs the pyarrow package, which is not installed.",
            hint="Install it with pip install 'needle[export]' (or pip install 'pyarrow>=14'), or use --format jsonl.",
        ) from None
    return pa, pq


# ---------------------------------------------------------------- values


def _text(s: str | None) -> str | None:
    """A string every writer can encode: a lone surrogate (possible in SQLite) becomes '?'."""
    if s is None:
        return None
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _floats(arr: np.ndarray):
    """Nested lists of a float array (any shape), null where not finite."""
    finite = np.isfinite(arr)
    if finite.all():
        return arr.tolist()
    obj = arr.astype(object)
    obj[~finite] = None
    return obj.tolist()


def _coerce(value, t):
    """A value stored as JSON, as the column type says (the JSON columns of the probe tables)."""
    if value is None:
        return None
    if t in (I32, I64):
        return int(value)
    if t in (F32, F64):
        return _float(value)
    if t == STR:
        return _text(str(value))
    if t[0] == "list":
        return [_coerce(v, t[1]) for v in value]
    return {name: _coerce(value.get(name), ft) for name, ft, *_ in t[1]}


class Vocabulary:
    """Token id -> text for a whole model, looked up a numpy array at a time."""

    def __init__(self, pairs: list[tuple[int, str]], size: int):
        self.table = np.empty(max([size, *(t + 1 for t, _ in pairs[-1:])]), dtype=object)
        for token_id, token in pairs:
            self.table[token_id] = _text(token)
        self._arrow: Any = None  # the vocabulary as an Arrow array, made on first use

    def text(self, token_id: int) -> str | None:
        return self.table[token_id] if 0 <= token_id < len(self.table) else None

    def texts(self, ids: np.ndarray) -> list:
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self.table))
        if ok.all():
            return self.table[ids].tolist()
        out = np.full(ids.shape, None, dtype=object)
        out[ok] = self.table[ids[ok]]
        return out.tolist()

    def arrow_texts(self, pa, ids: np.ndarray):
        """The same as texts(ids) for a flat array, as an Arrow string array (null for an unknown id)."""
        if self._arrow is None:
            self._arrow = pa.array(self.table.tolist(), pa.string())
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self.table))
        return self._arrow.take(pa.array(np.where(ok, ids, 0), pa.int64(), mask=None if ok.all() else ~ok))


# ---------------------------------------------------------------- rows, a batch at a time


def _decoding_rows(session, model, layers: range, vocab: Vocabulary, batch: int | None) -> Iterator[list[dict]]:
    from app import queries
    from app.unitarrays import unpack_decoding

    batch = batch or DECODINGS_PER_BATCH
    for layer in layers:
        for start in range(0, model.d_mlp, batch):
            rows = []
            for n in queries.neurons_in_range(session, model.id, layer, start, start + batch, model.basis):
                a = unpack_decoding(n)
                rows.append({
                    "layer": n.layer, "neuron": n.neuron,
                    "top_token_id": n.top_token_id, "top_token": vocab.text(n.top_token_id),
                    "top_prob": _float(n.top_prob), "top_score": _float(n.top_score),
                    "mean_top100": _float(n.mean_top100),
                    "entropy": _float(n.entropy) if n.entropy is not None else None,
                    "input_token_ids": a["in_ids"].tolist(), "input_tokens": vocab.texts(a["in_ids"]),
                    "input_probs": _floats(a["in_probs"]),
                    "input_scores": _floats(a["in_scores"]),
                    "promoted_token_ids": a["out_pos_ids"].tolist(), "promoted_tokens": vocab.texts(a["out_pos_ids"]),
                    "promoted_logits": _floats(a["out_pos_logits"]),
                    "suppressed_token_ids": a["out_neg_ids"].tolist(),
                    "suppressed_tokens": vocab.texts(a["out_neg_ids"]),
                    "suppressed_logits": _floats(a["out_neg_logits"]),
                })
            session.expunge_all()
            yield rows


class ExampleBatch:
    """A batch of `examples` rows, read once: `rows()` gives them as dicts (JSONL), `arrow()` as an
    Arrow table built from the arrays directly (Parquet; the same values, far faster than from dicts)."""

    def __init__(self, stored: list, context: int, windows: dict, vocab: Vocabulary):
        from app.arrays import INT32, unpack
        from app.unitarrays import unpack_examples, unpack_negatives

        self.stored, self.vocab = stored, vocab
        self.neurons = []
        for r in stored:
            a = unpack_examples(r, context)
            neg = unpack_negatives(r, context)
            self.neurons.append({
                **a, "top_windows": a["top_windows"].tolist(), "int_windows": a["int_windows"].tolist(),
                "top_acts": a["top_acts"].astype(np.float32), "int_acts": a["int_acts"].astype(np.float32),
                # (window, acts, min, index) of the top negative contexts below 0, as the page keeps them
                "negatives": None if neg is None else [
                    (w, neg["neg_acts"][k].astype(np.float32), neg["neg_min"][k], neg["neg_pos"][k])
                    for k, w in enumerate(neg["neg_windows"].tolist()) if w >= 0 and neg["neg_min"][k] < 0],
            })
        # window -> (token ids, source); a window some neuron names but that is not stored is left out, as on the page
        self.windows = {w: (unpack(blob, INT32), _text(source)) for w, (blob, source) in windows.items()}

    def __len__(self) -> int:
        return len(self.stored)

    def _stats(self, r) -> dict:
        return {"layer": r.layer, "neuron": r.neuron, "tokens": int(r.tokens), "frequency": _float(r.frequency),
                "frequency_above": _float(r.frequency_above), "threshold": _float(r.threshold),
                "silent": None if r.silent is None else bool(r.silent),
                "mean": _float(r.mean), "std": _float(r.std), "min": _float(r.min_act), "max": _float(r.max_act)}

    def rows(self) -> list[dict]:
        order = list(self.windows)
        flat = np.concatenate([self.windows[w][0] for w in order]) if order else np.zeros(0, np.int32)
        texts, ids, at = self.vocab.texts(flat), flat.tolist(), 0
        shown = {}
        for w in order:
            n = len(self.windows[w][0])
            shown[w] = (ids[at : at + n], texts[at : at + n], self.windows[w][1])
            at += n

        def example(w: int, acts: list, max_act, pos, extreme: str = "max") -> dict:
            token_ids, tokens, source = shown[w]
            return {"window": w, "source": source, "token_ids": token_ids, "tokens": tokens, "activations": acts,
                    f"{extreme}_activation": _float(max_act), f"{extreme}_index": int(pos)}

        out = []
        for r, a in zip(self.stored, self.neurons):
            top_acts, int_acts = _floats(a["top_acts"]), _floats(a["int_acts"])
            top_max, int_max = a["top_max"].tolist(), a["int_max"].tolist()
            top_pos, int_pos = a["top_pos"].tolist(), a["int_pos"].tolist()
            edges, counts = a["int_edges"].tolist(), a["int_counts"].tolist()
            out.append({
                **self._stats(r),
                "histogram_edges": _floats(a["hist_edges"]),
                "histogram_counts": a["hist_counts"].tolist(),
                "examples": [example(w, top_acts[k], top_max[k], top_pos[k])
                             for k, w in enumerate(a["top_windows"]) if w in shown],
                "interval_samples": [
                    {"bin": b, "low": _float(edges[b]), "high": _float(edges[b + 1]), "tokens": counts[b],
                     "examples": [example(w, int_acts[b][j], int_max[b][j], int_pos[b][j])
                                  for j, w in enumerate(a["int_windows"][b]) if w in shown]}
                    for b in range(len(counts))
                ],
                "negative_examples": None if a["negatives"] is None else [
                    example(w, _floats(acts), low, pos, "min") for w, acts, low, pos in a["negatives"] if w in shown],
            })
        return out

    def arrow(self, pa, schema):
        example_type = schema.field("examples").type.value_type
        negative_type = schema.field("negative_examples").type.value_type
        bin_type = schema.field("interval_samples").type.value_type

        def lists(values: list, arrow_values, t):
            """A list array of per-row lengths len(v) for v in values over the flat arrow_values (null where v is None)."""
            offsets = np.zeros(len(values) + 1, dtype=np.int32)
            np.cumsum([0 if v is None else len(v) for v in values], out=offsets[1:])
            nulls = [v is None for v in values]
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), arrow_values, type=t,
                                            mask=pa.array(nulls, pa.bool_()) if any(nulls) else None)

        def examples(picks: list[tuple[int, np.ndarray, float, int]], struct=example_type):
            """StructArray of examples (or negative examples) from (window, activations, max or min, its index)."""
            windows = [p[0] for p in picks]
            token_ids = [self.windows[w][0] for w in windows]
            flat = np.concatenate(token_ids) if picks else np.zeros(0, np.int32)
            acts = [p[1] for p in picks]
            fields = {
                "window": pa.array(windows, pa.int32()),
                "source": pa.array([self.windows[w][1] for w in windows], pa.string()),
                "token_ids": lists(token_ids, pa.array(flat, pa.int32()), pa.list_(pa.int32())),
                "tokens": lists(token_ids, self.vocab.arrow_texts(pa, flat), pa.list_(pa.string())),
                "activations": lists(acts, _arrow_floats(pa, np.concatenate(acts) if picks else np.zeros(0, np.float32),
                                                          pa.float32()), pa.list_(pa.float32())),
                "max_activation": _arrow_floats(pa, np.array([p[2] for p in picks], np.float32), pa.float32()),
                "max_index": pa.array([int(p[3]) for p in picks], pa.int32()),
            }
            # the struct's fields in EXAMPLE's order (a negative example's min in place of the max)
            return pa.StructArray.from_arrays([fields[f.name] for f in example_type], fields=list(struct))

        top, top_per, bins, bins_per, bin_picks, bin_per = [], [], [], [], [], []
        negatives: list = []
        negatives_per: list[list | None] = []
        for a in self.neurons:
            picked = None if a["negatives"] is None else [p for p in a["negatives"] if p[0] in self.windows]
            negatives.extend(picked or ())
            negatives_per.append(picked)
            picked = [(w, a["top_acts"][k], a["top_max"][k], a["top_pos"][k])
                      for k, w in enumerate(a["top_windows"]) if w in self.windows]
            top.extend(picked)
            top_per.append(picked)
            edges = a["int_edges"]
            for b in range(len(a["int_counts"])):
                picked = [(w, a["int_acts"][b, j], a["int_max"][b, j], a["int_pos"][b, j])
                          for j, w in enumerate(a["int_windows"][b]) if w in self.windows]
                bin_picks.extend(picked)
                bin_per.append(picked)
                bins.append((b, edges[b], edges[b + 1], int(a["int_counts"][b])))
            bins_per.append(range(len(a["int_counts"])))
        bin_fields = {
            "bin": pa.array([b[0] for b in bins], pa.int32()),
            "low": _arrow_floats(pa, np.array([b[1] for b in bins], np.float32), pa.float32()),
            "high": _arrow_floats(pa, np.array([b[2] for b in bins], np.float32), pa.float32()),
            "tokens": pa.array([b[3] for b in bins], pa.int64()),
            "examples": lists(bin_per, examples(bin_picks), pa.list_(example_type)),
        }
        stats = [self._stats(r) for r in self.stored]
        hist_edges = [a["hist_edges"] for a in self.neurons]
        hist_counts = [a["hist_counts"] for a in self.neurons]
        columns = {
            **{name: pa.array([s[name] for s in stats], schema.field(name).type) for name in stats[0]},
            "histogram_edges": lists(hist_edges, _arrow_floats(pa, np.concatenate(hist_edges), pa.float32()),
                                     pa.list_(pa.float32())),
            "histogram_counts": lists(hist_counts, pa.array(np.concatenate(hist_counts), pa.int64()),
                                      pa.list_(pa.int64())),
            "examples": lists(top_per, examples(top), pa.list_(example_type)),
            "interval_samples": lists(
                bins_per, pa.StructArray.from_arrays([bin_fields[f.name] for f in bin_type], fields=list(bin_type)),
                pa.list_(bin_type)),
            "negative_examples": lists(negatives_per, examples(negatives, negative_type), pa.list_(negative_type)),
        }
        return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _arrow_floats(pa, arr: np.ndarray, t):
    """An Arrow float array, null where not finite (as _floats gives None)."""
    finite = np.isfinite(arr)
    return pa.array(arr, t, mask=None if finite.all() else ~finite)


def examples_batch(slots: int, context: int) -> int:
    """Neurons per batch of `examples`: about EXAMPLE_VALUES_PER_BATCH per-token values."""
    return max(1, EXAMPLE_VALUES_PER_BATCH // max(1, slots * context))


def _example_rows(session, model, layers: range, vocab: Vocabulary, batch: int | None) -> Iterator[ExampleBatch]:
    from app import queries
    from app.arrays import unpack
    from app.unitarrays import EXAMPLES, NEGATIVES

    run = queries.example_run(session, model.id)
    assert run is not None, "export() exports examples only where a run is stored"
    s = run.settings or {}
    slots = int(s.get("top_k") or 20) + int(s.get("bins") or 5) * int(s.get("per_bin") or 5)
    batch = batch or examples_batch(slots, run.context)
    for layer in layers:
        for start in range(0, model.d_mlp, batch):
            stored = queries.activations_in_range(session, model.id, layer, start, start + batch, model.basis)
            wanted = {int(w) for r in stored for c in ("top_windows", "int_windows", "neg_windows")
                      if getattr(r, c) is not None
                      for w in unpack(getattr(r, c), {**EXAMPLES, **NEGATIVES}[c]).tolist() if w >= 0}
            out = ExampleBatch(stored, run.context, queries.window_tokens(session, model.id, wanted), vocab)
            session.expunge_all()
            yield out


PROBE_FIELDS = ("feature", "rank", "mean_dif", "f1", "precision", "recall")


def _probe_rows(session, model, layers: range, vocab: Vocabulary | None, batch: int | None) -> Iterator[list[dict]]:
    from app import queries

    batch = batch or DECODINGS_PER_BATCH
    for layer in layers:
        member: dict[int, list[dict]] = {}
        for nf in queries.neuron_features_of_layer(session, model.id, layer, model.basis):
            member.setdefault(nf.neuron, []).append({
                "feature": _text(nf.feature), "rank": nf.rank + 1, "mean_dif": _float(nf.mean_dif),
                "f1": _float(nf.f1), "precision": _float(nf.precision), "recall": _float(nf.recall),
            })
        session.expunge_all()
        for start in range(0, model.d_mlp, batch):
            yield [{"layer": layer, "neuron": n, "features": member.get(n, [])}
                   for n in range(start, min(start + batch, model.d_mlp))]


def _feature_rows(session, model, layers: range, vocab: Vocabulary | None, batch: int | None) -> Iterator[list[dict]]:
    from app import queries

    rows = []
    for f in queries.list_features(session, model.id):
        counts = f.counts or {}
        rows.append({
            "feature": _text(f.name), "kind": _text(f.kind), "aggregation": _text(f.aggregation),
            "source": _text(f.source), "description": _text(f.description), "status": _text(f.status),
            "reason": _text(f.reason),
            **{k: _coerce(counts.get(k), I64) for k in ("train_pos", "train_neg", "test_pos", "test_neg")},
            "best_layer": f.best_layer, "best_neuron": f.best_neuron, "best_f1": _float(f.best_f1),
        })
    yield rows


def _feature_layer_rows(session, model, layers: range, vocab: Vocabulary | None,
                        batch: int | None) -> Iterator[list[dict]]:
    from app import queries

    columns = {name: t for name, t, _ in TABLES["feature_layers"].columns}
    rows = []
    for fl in queries.feature_layers_in_range(session, model.id, layers.start, layers.stop, model.basis):
        top = [{**t, "rank": i + 1} for i, t in enumerate(fl.top_neurons or [])]
        rows.append({
            "feature": _text(fl.feature), "layer": fl.layer, "best_neuron": fl.best_neuron,
            "best_f1": _float(fl.best_f1), "best_precision": _float(fl.best_precision),
            "best_recall": _float(fl.best_recall),
            "top_neurons": _coerce(top, columns["top_neurons"]),
            "curve": _coerce(fl.curve or [], columns["curve"]),
            "pruned_curve": _coerce(fl.pruned_curve or [], columns["pruned_curve"]),
        })
    yield rows


# ---------------------------------------------------------------- writers


class JsonlWriter:
    def __init__(self, path: Path, table: Table):
        self.file = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed by close()

    def write(self, batch) -> None:
        rows = batch.rows() if isinstance(batch, ExampleBatch) else batch
        self.file.write("".join(
            json.dumps(r, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n" for r in rows
        ))

    def close(self) -> None:
        self.file.close()


class ParquetWriter:
    def __init__(self, path: Path, table: Table):
        self.pa, pq = require_pyarrow()
        self.schema = table.schema(self.pa)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, batch) -> None:
        if not len(batch):
            return
        if isinstance(batch, ExampleBatch):
            table = batch.arrow(self.pa, self.schema)
        else:
            table = self.pa.Table.from_pylist(batch, schema=self.schema)
        self.writer.write_table(table)  # one row group per batch

    def close(self) -> None:
        self.writer.close()


WRITERS: dict[str, type[ParquetWriter | JsonlWriter]] = {"parquet": ParquetWriter, "jsonl": JsonlWriter}
@dataclass(frozen=True)
class Units:
    """What the row readers export of a model: `id` the model's, `d_mlp` the units per layer, `basis`
    0 for the neurons or an SAE's id for its latents (a row's `neuron` is then the latent's index)."""

    id: int
    d_mlp: int
    basis: int = 0


# each table's batches: f(session, units, layers, vocabulary, units per batch or None for the default)
ROWS: dict[str, Callable[..., Iterator]] = {"decodings": _decoding_rows, "examples": _example_rows, "probes": _probe_rows, "features": _feature_rows,
        "feature_layers": _feature_layer_rows}


# ---------------------------------------------------------------- the export


@contextmanager
def _snapshot(engine):
    """A session that reads one snapshot of the database for the whole export (on Postgres)."""
    from sqlalchemy.orm import Session

    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind=conn) as session:
            yield session
            session.rollback()


def _model_meta(model) -> dict:
    from app import queries

    return {
        "name": model.name, "source": model.source, "family": model.family, "architecture": model.architecture,
        "n_layers": model.n_layers, "d_model": model.d_model, "d_mlp": model.d_mlp, "vocab_size": model.vocab_size,
        "device": model.device, "dtype": model.dtype, "decode_norm": model.decode_norm, "info": model.info or {},
        "created_at": queries.utc_text(model.created_at),
        "updated_at": queries.utc_text(model.updated_at),
    }


def _progress(desc: str, total: int, show: bool):
    from tqdm import tqdm

    # None: shown on a terminal only
    return tqdm(total=total, desc=desc, unit="neuron", leave=False, dynamic_ncols=True, disable=None if show else True)


def export_model(
    settings: Settings, name: str, *, fmt: str, out: str | Path, what: str | None = None, layers: str | None = None,
    force: bool = False, batch_neurons: int | None = None, progress: bool = True, warn=None, sae: str | None = None,
) -> dict:
    """Export a model's tables into `out` and return the manifest; with `sae`, that SAE's latents
    instead of the neurons (their decodings, examples and probes, at its layer). Every argument
    is checked before anything is written; a NeedleError says what was wrong."""
    from app import examples, queries
    from app.db import get_engine, require_migrated

    fmt = parse_format(fmt)
    wanted = parse_what(what)
    span = parse_layers(layers)
    if batch_neurons is not None and batch_neurons < 1:
        raise NeedleError(f"batch_neurons {batch_neurons} must be at least 1.")
    if fmt == "parquet":
        require_pyarrow()
    out = Path(out)
    try:
        check_out(out, force)
    except OSError as exc:  # a folder this user cannot list
        raise out_error(out, exc) from None
    engine = get_engine(settings)
    require_migrated(engine)
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))

    with _snapshot(engine) as s:
        model = queries.get_model(s, name)
        if model is None:
            names = [m.name for m in queries.list_models(s)]
            raise NeedleError(
                f"There is no model named {name!r} here.",
                hint=f"Models here: {', '.join(names)}." if names else "Index one first: needle index MODEL --name NAME.",
            )
        units, basis_meta = Units(model.id, model.d_mlp), None
        if sae is not None:
            if layers is not None:
                raise NeedleError("--layers does not apply with --sae: an SAE has the one layer it reads.",
                                  hint="Leave --layers out.")
            row = queries.get_sae(s, model.id, sae)
            if row is None:
                names = [x.name for x in queries.list_saes(s, model.id)]
                raise NeedleError(f"{model.name!r} has no SAE named {sae!r}.",
                                  hint=f"Its SAEs: {', '.join(names)}." if names else "Train one: needle sae train.")
            units = Units(model.id, row.d_sae, row.id)
            chosen = range(row.layer, row.layer + 1)
            basis_meta = {"unit": "latent", "sae": row.name, "layer": row.layer, "site": row.site,
                          "architecture": row.architecture, "d_in": row.d_in, "d_sae": row.d_sae, "source": row.source,
                          "note": "a row's `neuron` is the latent's index in the SAE"}
        else:
            chosen = resolve_layers(layers, span, model.name, model.n_layers)
        run, probes = queries.example_run(s, model.id), queries.probe_run(s, model.id)
        has = {"decodings": True, "examples": run is not None, "probes": probes is not None}
        if wanted is None:
            wanted = [w for w in WHAT if has[w]]
        missing = [w for w in wanted if not has[w]]
        if missing:
            how = {"examples": f"needle index {model.source} --name {model.name} --corpus SPEC",
                   "probes": f"needle probe {model.name} --features SPEC"}
            raise NeedleError(
                f"{model.name!r} has no {' and no '.join(missing)} to export.",
                hint="Compute them first (" + "; ".join(how[m] for m in missing) + "), or leave them out of --what.",
            )
        # the features table is of the features themselves (their best neuron), not of a basis
        tables = [t for t in TABLES.values() if t.what in wanted and not (sae is not None and t.name == "features")]
        expected = len(chosen) * units.d_mlp
        meta = _model_meta(model)
        vocab = Vocabulary(queries.vocab_tokens(s, model.id), model.vocab_size) if (
            "decodings" in wanted or "examples" in wanted) else None

        created = not out.exists()
        written: list[Path] = []
        counts: dict[str, int] = {}
        try:
            out.mkdir(parents=True, exist_ok=True)
            for table in tables:
                path = out / f".{table.name}.{fmt}.partial"
                written.append(path)
                writer = WRITERS[fmt](path, table)
                per_neuron = table.name in ("decodings", "examples", "probes")
                bar = _progress(table.name, expected if per_neuron else 0, progress)
                try:
                    counts[table.name] = 0
                    for rows in ROWS[table.name](s, units, chosen, vocab, batch_neurons):
                        writer.write(rows)
                        counts[table.name] += len(rows)
                        bar.update(len(rows) if per_neuron else 0)
                finally:
                    writer.close()
                    bar.close()
            for what_name in ("decodings", "examples"):
                if what_name in counts and counts[what_name] < expected:
                    warn(f"only {counts[what_name]} of the {expected} neurons of layers {chosen.start} to "
                         f"{chosen.stop - 1} have {what_name} stored (indexing unfinished?); exported those.")
            manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "file_format": fmt,
                "needle_version": _needle_version(),
                "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "model": meta,
                "basis": basis_meta or {"unit": "neuron"},
                "layers": {"start": chosen.start, "stop": chosen.stop},
                "what": wanted,
                "counts": {"neurons": expected, **counts},
                "examples_run": examples.run_info(run) if "examples" in wanted else None,
                "probe_run": {"specs": probes.specs, "description": probes.description, "settings": probes.settings,
                              "computed_at": queries.utc_text(probes.created_at)}
                if probes is not None and "probes" in wanted else None,
                "tables": {t.name: {"file": f"{t.name}.{fmt}", "rows": counts[t.name], **t.manifest()} for t in tables},
            }
            path = out / ".manifest.json.partial"
            written.append(path)
            path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            # done: replace an earlier export's files, the manifest last
            keep = {f"{t.name}.{fmt}" for t in tables} | {"manifest.json"}
            for stale in ALL_FILES:
                if stale not in keep and (out / stale).is_file():
                    (out / stale).unlink()
            for table in tables:
                (out / f".{table.name}.{fmt}.partial").replace(out / f"{table.name}.{fmt}")
            path.replace(out / "manifest.json")
        except BaseException as exc:
            for path in written:
                path.unlink(missing_ok=True)
            if created:
                try:
                    out.rmdir()
                except OSError:
                    pass
            if isinstance(exc, OSError):  # a folder that cannot be made or takes no files, a full disk
                raise out_error(out, exc) from None
            raise
    return manifest


def _needle_version() -> str:
    from needle import __version__

    return __version__


# ---------------------------------------------------------------- the command


def cmd_export(args: argparse.Namespace, settings: Settings) -> None:
    manifest = export_model(settings, args.name, fmt=args.format, out=args.out, what=args.what, layers=args.layers,
                            force=args.force, sae=args.sae)
    layers = manifest["layers"]
    files = ", ".join(f"{t['file']} ({t['rows']} rows)" for t in manifest["tables"].values())
    print(f"Exported {manifest['model']['name']} (layers {layers['start']} to {layers['stop'] - 1}) to {args.out}: "
          f"{files}, manifest.json")


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="export a model's decodings, examples and probe results as Parquet or JSONL",
                       description="Write a model's decodings, activation examples and probe results as Parquet or "
                       "JSONL files (one per table) plus manifest.json (the model, counts and the columns) into DIR.")
    p.add_argument("name", help="the model's name, as given to `needle index --name`")
    p.add_argument("--format", required=True, metavar="parquet|jsonl",
                   help="parquet (needs pip install 'needle[export]') or jsonl (one JSON object per line)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write into (made if missing; "
                   "must be empty unless --force)")
    p.add_argument("--what", metavar="LIST", help="comma-separated: decodings, examples, probes "
                   "(default: all the model has)")
    p.add_argument("--layers", metavar="A:B", help="only layers A to B-1 (A:, :B and a single N work too; "
                   "default: all)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing an earlier "
                   "export's files")
    p.add_argument("--sae", metavar="NAME", help="export this SAE's latents instead of the neurons")
    p.set_defaults(func=cmd_export)
