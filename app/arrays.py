"""Compact array columns: numpy arrays to little-endian bytes and back."""

from __future__ import annotations

import numpy as np

INT32 = np.dtype("<i4")
INT16 = np.dtype("<i2")
FLOAT32 = np.dtype("<f4")
FLOAT16 = np.dtype("<f2")


def pack(values, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(np.asarray(values), dtype=dtype).tobytes()


def unpack(blob: bytes, dtype: np.dtype, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.frombuffer(blob, dtype=dtype)
    return arr.reshape(shape) if shape is not None else arr
