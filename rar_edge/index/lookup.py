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

* ``"int4_margin"`` (opt-in, no guarantee): 4-bit per-vector codes (half the int8 bytes), then float32
  rescoring of every row within `INT4_MARGIN_SIGMAS` standard deviations of the 4-bit error (were the
  residual's direction random) of the k-th class. Not a bound: a class can be missed where a row's 4-bit
  error exceeds its margin (recall measured in benchmarks/lookup.py; docs/design-notes.md#lowbit-bound).
  It holds on clustered synthetic data but not on non-negative (ReLU) image features such as MobileNet's,
  whose rounding error is biased: class recall@5 0.975-0.981 measured there. Use it only after measuring
  recall on your own embeddings.
  Keeps a reference to the float32 vectors like "int8_rerank"; a batch's queries are split over threads,
  a single query runs on one.

``DEFAULT_STORAGE`` is the fastest storage that answers like the exact float32 search
(docs/design-notes.md#lookup-storage).
"""

from __future__ import annotations

import numpy as np

from rar_edge import _native
from rar_edge.errors import InvalidInputError

STORAGES = ("float32", "float16", "int8", "int8_rerank", "int4_margin")
#: Storages whose answer is the exact float32 search's, or within their stated rounding of it.
GUARANTEED_STORAGES = ("float32", "float16", "int8", "int8_rerank")
#: "int4_margin" rescores rows within this many standard deviations of the 4-bit error.
INT4_MARGIN_SIGMAS = 6.0
#: Clip ratios tried per row by `quantize_int4` (scale = ratio * max|v| / 7), the least residual kept.
INT4_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
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


def quantize_int4(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row 4-bit codes in the layout ``_native.topk_classes_int4`` reads.

    Row i ~= scales[i] * c with c in [-8, 7], the scale chosen per row among `INT4_CLIP_RATIOS` to minimise
    the residual. Codes are stored as c + 8; per 32-dimension block, byte j holds dimension j (low nibble)
    and j + 16 (high nibble); dimensions past d are padded with code 8 (zero).

    Args:
        vectors: (N, d) float32, finite.

    Returns:
        (codes uint8 (N, ceil(d / 32) * 16), scales float32 (N,), resid float32 (N,)) with
        resid[i] >= ||vectors[i] - scales[i] * c_i||_2; all-zero rows get scale 1, code 8 and resid 0.
    """
    v = np.asarray(vectors, dtype=np.float32)
    n, d = v.shape
    blocks = (d + 31) // 32
    codes = np.empty((n, blocks * 16), np.uint8)
    scales = np.empty(n, np.float32)
    resid = np.empty(n, np.float32)
    for b in range(0, n, 16384):  # row chunks: the float64 temporaries stay small
        x = v[b : b + 16384].astype(np.float64)
        peak = np.abs(x).max(axis=1) if d else np.zeros(len(x))
        best_r = np.full(len(x), np.inf)
        best_s = np.ones(len(x))
        best_c = np.zeros(x.shape)
        for ratio in INT4_CLIP_RATIOS:
            s = np.where(peak > 0, (peak * ratio / 7.0).astype(np.float32), np.float32(1.0)).astype(np.float64)
            c = np.rint(x / s[:, None]).clip(-8, 7)
            r = np.sqrt(((x - s[:, None] * c) ** 2).sum(axis=1))
            better = r < best_r
            best_r = np.where(better, r, best_r)
            best_s = np.where(better, s, best_s)
            best_c[better] = c[better]
        u = np.full((len(x), blocks * 32), 8, np.uint8)
        u[:, :d] = (best_c + 8).astype(np.uint8)
        u = u.reshape(len(x), blocks, 2, 16)
        codes[b : b + 16384] = (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(len(x), blocks * 16)
        scales[b : b + 16384] = best_s
        # rounded up to float32, so the stored residual norm is never below the true one
        resid[b : b + 16384] = np.nextafter(best_r.astype(np.float32), np.float32(np.inf))
    return codes, scales, resid


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
        self._resid: np.ndarray | None = None
        if storage == "float32":
            self._v = v
        elif storage == "float16":
            self._v = np.ascontiguousarray(v.astype(np.float16))
        elif storage in ("int8_rerank", "int4_margin") and v.shape[0] < RERANK_MIN_ROWS:
            self._v = v
        elif storage == "int4_margin":
            self._v, self._scales, self._resid = quantize_int4(v)
            self._rerank = v
        else:
            self._v, self._scales = quantize_int8(v)
            if storage == "int8_rerank":
                self._rerank = v

    @classmethod
    def from_parts(
        cls, vectors: np.ndarray, *, storage: str, q8: np.ndarray | None = None, scales: np.ndarray | None = None
    ) -> "VectorStore":
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
        self._resid = None
        if storage == "float32" or (storage in ("int8_rerank", "int4_margin") and v.shape[0] < RERANK_MIN_ROWS):
            self._v = v
        elif storage == "float16":
            self._v = np.ascontiguousarray(v.astype(np.float16))
        elif storage == "int4_margin":
            self._v, self._scales, self._resid = quantize_int4(v)
            self._rerank = v
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
        """Bytes the search streams per query (vectors plus scales and residuals; not the float32 rescoring rows)."""
        return int(self._v.nbytes + sum(a.nbytes for a in (self._scales, self._resid) if a is not None))

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
            if self._resid is not None:
                return _native.topk_classes_int4(
                    self._v,
                    self._scales,
                    self._resid,
                    self._rerank,
                    lab,
                    int(n_classes),
                    q,
                    int(k),
                    margin_sigmas=INT4_MARGIN_SIGMAS,
                    threads=int(threads),
                )
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
