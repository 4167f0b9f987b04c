"""Unit-length rows: the one home of L2 normalisation (encoder outputs, memory entries, fine-tuning data)."""

from __future__ import annotations

import numpy as np

from rar_edge import _native
from rar_edge.errors import InvalidInputError


def l2_normalize(x: np.ndarray, zero_point: float = 0.0) -> np.ndarray:
    """Rows minus ``zero_point``, scaled to unit length (zero rows stay zero) in one native pass: float32.

    The encoders' path: rows holding NaN or inf come back all NaN, so `Memory.add` and `Memory.search`
    refuse them. Integer (quantized model) outputs are read without a float copy.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.uint8, np.int8):
        x = x.astype(np.float32)
    shape = x.shape
    rows, _ = _native.unit_rows(
        np.require(x.reshape(-1, shape[-1]) if x.ndim != 2 else x, requirements="CA"), float(zero_point)
    )
    return rows.reshape(shape)


def unit_rows_checked(x: np.ndarray, *, what: str = "vectors") -> np.ndarray:
    """(N, d) rows scaled to unit length as float32, refusing what cannot be: NaN or inf, an all-zero row.

    Norms are taken in float64: those of large float32 values overflow in float32.

    Raises:
        InvalidInputError: not 2-D, or a row that is not finite or all zero (``what`` names the input).
    """
    v = np.asarray(x)
    if v.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (N, d), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise InvalidInputError(f"{what} contain NaN or inf")
    v64 = v.astype(np.float64)
    norms = np.linalg.norm(v64, axis=1)
    if np.any(norms == 0):
        raise InvalidInputError(f"{what} contain an all-zero row")
    return (v64 / norms[:, None]).astype(np.float32)
