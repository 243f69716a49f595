"""Compact array columns: numpy arrays to little-endian bytes and back."""

from __future__ import annotations

import numpy as np

INT32 = np.dtype("<i4")
INT16 = np.dtype("<i2")
UINT8 = np.dtype("u1")
INT64 = np.dtype("<i8")
FLOAT32 = np.dtype("<f4")
FLOAT16 = np.dtype("<f2")


def pack(values, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(values), dtype=dtype).tobytes()


def pack_rows(values, dtype: np.dtype, lengths=None) -> list[bytes]:
    """One blob per row of a 2-d array, converted once: row i holds its first lengths[i]
    values (all of them when lengths is None)."""
    arr = np.ascontiguousarray(np.asarray(values), dtype=dtype)
    data, width = arr.tobytes(), arr.shape[1] * arr.itemsize
    if lengths is None:
        return [data[i * width : (i + 1) * width] for i in range(arr.shape[0])]
    size = arr.itemsize
    return [data[i * width : i * width + int(n) * size] for i, n in enumerate(lengths)]


def unpack(blob: bytes, dtype: np.dtype, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.frombuffer(blob, dtype=dtype)
    return arr.reshape(shape) if shape is not None else arr
