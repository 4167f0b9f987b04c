"""Typed layer over the native exact search: vectors kept in a storage dtype, top-k distinct classes.

Storages (what the search streams through memory for every query):

* ``"float32"``: the vectors as given; results equal an exact float32 search (faiss ``IndexFlatIP``).
* ``"float16"``: IEEE half precision (round to nearest), half the bytes; scores within ~1e-3.
* ``"int8"``: symmetric per-vector quantisation ``v ~= scale * q`` with ``scale = max|v| / 127``; a quarter
  of the bytes. Each query is quantised to int16 (error ~1e-5 relative, far below the vectors' rounding);
  scores within ~2e-3, so classes can swap where scores are that close.
* ``"int8_rerank"``: the int8 scan, then every row whose int8 score could still reach the top k (a
  rigorous bound on the rounding, typically a few hundred rows) is rescored in float32: the result is the
  float32 search's at about the int8 cost. Keeps a reference to the float32 vectors (no copy when they
  are given as C-contiguous float32), so it needs them in memory beside the int8 copy.

``DEFAULT_STORAGE`` is the fastest storage that answers like the exact float32 search
(docs/design-notes.md#lookup-storage).
"""

from __future__ import annotations

import numpy as np

from rar_edge import _native
from rar_edge.errors import InvalidInputError

STORAGES = ("float32", "float16", "int8", "int8_rerank")
DEFAULT_STORAGE = "int8_rerank"
#: Below this many rows "int8_rerank" scans the float32 rows directly (its result is the float32 search's
#: anyway): the int8 pass and the rescoring cost more than they save (docs/design-notes.md#rerank-min-rows).
RERANK_MIN_ROWS = 128


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation.

    Args:
        vectors: (N, d) float32.

    Returns:
        (q int8 (N, d), scales float32 (N,)) with ``vectors[i] ~= scales[i] * q[i]``; all-zero rows get
        scale 1 and stay zero.
    """
    v = np.asarray(vectors, dtype=np.float32)
    peak = np.abs(v).max(axis=1) if v.shape[1] else np.zeros(v.shape[0], np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.empty(v.shape, np.int8)
    step = 4096  # rows per block: the float temporary stays in cache, no full-size temporaries
    for i in range(0, len(v), step):
        t = np.divide(v[i : i + step], scales[i : i + step, None])
        np.rint(t, out=t)
        np.clip(t, -127, 127, out=t)
        q[i : i + step] = t
    return q, np.ascontiguousarray(scales)


class VectorStore:
    """The memory's vectors in the layout the native search reads.

    Args:
        vectors: (N, d) float32, L2-normalised rows (the memory's source of truth).
        storage: the dtype searched: one of `STORAGES`.
    """

    def __init__(self, vectors: np.ndarray, *, storage: str = DEFAULT_STORAGE) -> None:
        if storage not in STORAGES:
            raise InvalidInputError(f"storage must be one of {STORAGES}, not {storage!r}")
        v = np.require(vectors, np.float32, "CA")  # C-contiguous and aligned, as the native scan reads it
        if v.ndim != 2:
            raise InvalidInputError(f"vectors must be (N, d), got shape {v.shape}")
        if not np.isfinite(v).all():
            raise InvalidInputError("vectors contain NaN or infinite values")
        self.storage = storage
        self._shape = v.shape
        self._scales: np.ndarray | None = None
        self._rerank: np.ndarray | None = None
        if storage == "float32":
            self._v = v
        elif storage == "float16":
            self._v = np.ascontiguousarray(v.astype(np.float16))
        else:
            if storage == "int8_rerank" and v.shape[0] < RERANK_MIN_ROWS:
                self._v = v
            else:
                self._v, self._scales = quantize_int8(v)
                if storage == "int8_rerank":
                    self._rerank = v

    @classmethod
    def from_parts(cls, vectors: np.ndarray, *, storage: str, q8: np.ndarray | None = None,
                   scales: np.ndarray | None = None) -> "VectorStore":
        """A store over vectors already checked (finite, L2-normalised), reusing a saved int8 copy.

        Nothing is copied when the arrays are C-contiguous and aligned, so memory-mapped arrays stay mapped
        (the search then pages in only what it reads).

        Args:
            vectors: (N, d) float32.
            storage: one of `STORAGES`.
            q8, scales: the int8 rows and their scales as `quantize_int8` made them (int8 storages only;
                computed here when None).
        """
        if storage not in STORAGES:
            raise InvalidInputError(f"storage must be one of {STORAGES}, not {storage!r}")
        v = np.require(vectors, np.float32, "CA")
        self = cls.__new__(cls)
        self.storage = storage
        self._shape = v.shape
        self._scales = None
        self._rerank = None
        if storage == "float32" or (storage == "int8_rerank" and v.shape[0] < RERANK_MIN_ROWS):
            self._v = v
        elif storage == "float16":
            self._v = np.ascontiguousarray(v.astype(np.float16))
        else:
            if q8 is None or scales is None:
                q8, scales = quantize_int8(v)
            if q8.shape != v.shape or scales.shape != (v.shape[0],):
                raise InvalidInputError(f"int8 rows {q8.shape} / scales {scales.shape} do not fit vectors {v.shape}")
            self._v, self._scales = np.require(q8, np.int8, "CA"), np.require(scales, np.float32, "CA")
            if storage == "int8_rerank":
                self._rerank = v
        return self

    @property
    def n(self) -> int:
        """Number of stored vectors."""
        return int(self._shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes the search streams per query (vectors plus int8 scales; not the float32 rescoring rows)."""
        return int(self._v.nbytes + (self._scales.nbytes if self._scales is not None else 0))

    def topk_classes(
        self,
        labels: np.ndarray,
        n_classes: int,
        queries: np.ndarray,
        k: int,
        *,
        threads: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k distinct classes per query.

        Args:
            labels: (N,) class id of every stored vector, in [0, n_classes).
            n_classes: number of class ids.
            queries: (Q, d) or (d,) float32 (other float dtypes are converted).
            k: classes per query (>= 1); slots past the classes present are padded.
            threads: worker threads (queries are split for batches, vectors for a single query).

        Returns:
            (classes int32 (Q, k), scores float32 (Q, k)), best first, ties to the lower class id;
            padding is class -1 with score -inf.

        Raises:
            InvalidInputError: wrong shapes, labels out of range, k < 1, threads < 1.
        """
        q = np.require(queries, np.float32, "CA")
        if q.ndim == 1:
            q = q[None, :]
        lab = np.asarray(labels)
        if lab.dtype != np.int32:
            if lab.dtype.kind not in "iu":
                raise InvalidInputError(f"labels must be integers, not {lab.dtype}")
            if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
                raise InvalidInputError(f"labels must lie in [0, n_classes={n_classes})")
            lab = lab.astype(np.int32)
        lab = np.require(lab, requirements="CA")
        try:
            return _native.topk_classes(
                self._v,
                lab,
                int(n_classes),
                q,
                int(k),
                scales=self._scales,
                rerank=self._rerank,
                threads=int(threads),
            )
        except ValueError as e:
            raise InvalidInputError(str(e)) from None
