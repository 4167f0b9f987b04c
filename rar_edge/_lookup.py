"""Typed layer over the native exact search: vectors kept in a storage dtype, top-k distinct classes."""

from __future__ import annotations

import numpy as np

from . import _native
from .errors import InvalidInputError

STORAGES = ("float32",)
DEFAULT_STORAGE = "float32"


class VectorStore:
    """The memory's vectors in the layout the native search reads.

    Args:
        vectors: (N, d) float32, L2-normalised rows (the memory's source of truth).
        storage: the dtype searched: one of `STORAGES`.
    """

    def __init__(self, vectors: np.ndarray, *, storage: str = DEFAULT_STORAGE) -> None:
        if storage not in STORAGES:
            raise InvalidInputError(f"storage must be one of {STORAGES}, not {storage!r}")
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2:
            raise InvalidInputError(f"vectors must be (N, d), got shape {v.shape}")
        self.storage = storage
        self._v = v

    @property
    def n(self) -> int:
        return int(self._v.shape[0])

    @property
    def dim(self) -> int:
        return int(self._v.shape[1])

    def topk_classes(
        self, labels: np.ndarray, n_classes: int, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k distinct classes per query: (classes int32 (Q, k), scores float32 (Q, k)); -1 / -inf pad."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        lab = np.ascontiguousarray(labels, dtype=np.int32)
        return _native.topk_classes(self._v, lab, int(n_classes), q, int(k))
