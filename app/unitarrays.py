"""The array columns stored per unit (an MLP neuron): each row kind's columns with their dtypes
and shapes, packed a batch of units at a time (workers/store.py) and unpacked one stored row at
a time (the pages, the export). Unpacking is np.frombuffer and reshape: views, no copies."""

from __future__ import annotations

import math

import numpy as np

from app.arrays import FLOAT16, FLOAT32, INT16, INT32, INT64, pack_rows, unpack

# the decoding row (app.schema.Neuron): each column [k], best first
DECODING: dict[str, np.dtype] = {
    "in_ids": INT32,  # the input tokens that most excite the unit
    "in_probs": FLOAT32,
    "in_scores": FLOAT32,
    "out_pos_ids": INT32,  # the output tokens it most promotes
    "out_pos_logits": FLOAT32,
    "out_neg_ids": INT32,  # and most suppresses
    "out_neg_logits": FLOAT32,
}

# the examples row (app.schema.NeuronActivations); a window id of -1 marks an empty slot
EXAMPLES: dict[str, np.dtype] = {
    "top_windows": INT32,  # [top_k]
    "top_max": FLOAT32,  # [top_k]
    "top_pos": INT16,  # [top_k] index of the max token in its window
    "top_acts": FLOAT16,  # [top_k, context]
    "int_windows": INT32,  # [bins, per_bin]
    "int_max": FLOAT32,  # [bins, per_bin]
    "int_pos": INT16,  # [bins, per_bin]
    "int_acts": FLOAT16,  # [bins, per_bin, context]
    "int_edges": FLOAT32,  # [bins + 1]
    "int_counts": INT64,  # [bins] firing tokens per bin
    "hist_edges": FLOAT32,  # [hist_bins + 1]
    "hist_counts": INT64,  # [hist_bins]
}

# the examples row's top negative contexts (a gated MLP's neurons; NULL otherwise), most negative first
NEGATIVES: dict[str, np.dtype] = {
    "neg_windows": INT32,  # [top_k]
    "neg_min": FLOAT32,  # [top_k] the window's min
    "neg_pos": INT16,  # [top_k] index of the min token in its window
    "neg_acts": FLOAT16,  # [top_k, context]
}


def pack_units(columns: dict[str, np.dtype], arrays) -> dict[str, list[bytes]]:
    """Each column's blob for every unit of a batch: arrays (a LayerDecoding, a LayerExamples)
    has an attribute per column with the units on its first axis."""
    out = {}
    for name, dtype in columns.items():
        values = getattr(arrays, name)
        out[name] = pack_rows(values.reshape(len(values), math.prod(values.shape[1:])), dtype)
    return out


def unpack_decoding(row) -> dict[str, np.ndarray]:
    """A stored decoding row's columns, each [k]."""
    return {name: unpack(getattr(row, name), dtype) for name, dtype in DECODING.items()}


def unpack_examples(row, context: int) -> dict[str, np.ndarray]:
    """A stored examples row's columns in the shapes EXAMPLES gives; context is the run's."""
    a = {name: unpack(getattr(row, name), dtype) for name, dtype in EXAMPLES.items()}
    bins = len(a["int_counts"])
    per_bin = len(a["int_windows"]) // max(bins, 1)
    a["top_acts"] = a["top_acts"].reshape(len(a["top_windows"]), context)
    for name in ("int_windows", "int_max", "int_pos"):
        a[name] = a[name].reshape(bins, per_bin)
    a["int_acts"] = a["int_acts"].reshape(bins, per_bin, context)
    return a


def unpack_negatives(row, context: int) -> dict[str, np.ndarray] | None:
    """A stored examples row's top negative contexts in NEGATIVES's shapes, or None where none were read."""
    if any(getattr(row, name, None) is None for name in NEGATIVES):
        return None
    a = {name: unpack(getattr(row, name), dtype) for name, dtype in NEGATIVES.items()}
    a["neg_acts"] = a["neg_acts"].reshape(len(a["neg_windows"]), context)
    return a
