"""The memory's storage engine: immutable snapshots of segments, published by one reference assignment.

Readers (searches, the `Memory` properties) read `Engine.snapshot` once and use only that object; the one
writer at a time (under `Engine.lock`) prepares the next snapshot privately and publishes it by assigning
the reference, as LSM stores and Lucene publish segments behind a commit point. Nothing a published
snapshot references is modified afterwards:

* sealed segments: immutable rows (float32, possibly memory-mapped), the search store built from them
  (int8 / float16 copies) and, for HNSW, a graph built on a private hnswlib index before publication
  (hnswlib's ``add_items`` is not safe beside ``knn_query``; a published graph is only ever searched);
* the tail: rows appended into buffers whose capacity doubles. A snapshot sees the prefix ``[0, n)``;
  the writer writes only beyond the largest published ``n``, so an append costs amortised O(1) per row.
  When the tail reaches `SEAL_ROWS` it becomes a sealed segment; `MERGE_FAN_IN` sealed segments of one
  size tier are merged into one of the next tier (size-tiered, so a row is rewritten O(log N) times,
  with a large base);
* class codes: append-only, never remapped (code 0 marks a removed row: a tombstone). A removal publishes
  copies of the affected label arrays with the removed rows set to 0; a segment half made of tombstones
  is rewritten without them.

A search scans each segment (native exact top-k, or the segment's HNSW graph) for the k + 1 best class
codes and merges them by per-class maximum: a class in the overall top k is in the top k of the segment
holding its best entry, so the merge is exact.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from rar_edge import _native
from rar_edge.errors import InvalidInputError, MissingDependencyError
from rar_edge.index.lookup import VectorStore

log = logging.getLogger("rar_edge")

#: Rows the tail holds before it is sealed (quantised, maybe given a graph); the tail is scanned in float32
#: (docs/design-notes.md#memory-segments, as for the next two).
SEAL_ROWS = 16_384
#: Sealed segments of one size tier merged into one of the next tier (tier = log_{fan-in} of rows / SEAL_ROWS).
MERGE_FAN_IN = 8
#: Segments with fewer live rows are scanned exactly even on the HNSW back end.
HNSW_MIN_ROWS = 50_000
#: A removal that leaves a segment at least this fraction tombstones rewrites it without them.
REWRITE_DEAD_FRACTION = 0.5
#: Ids stay below this (they are int64, and a file's next id is checked against it).
MAX_ID = 2**62


def new_uid() -> str:
    """A segment's name: random, so that a uid names one immutable set of rows wherever it is stored."""
    return secrets.token_hex(8)


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


@dataclass(frozen=True, eq=False)
class Segment:
    """Immutable rows: vectors, class codes (0: removed), ids, provenance; the search structures over them.

    Attributes:
        uid: names the rows (vectors, ids, sources and codes as sealed); tombstones do not change it.
        vectors: (n, d) float32, unit rows; read-only (maybe memory-mapped).
        codes: (n,) int32 class codes as sealed (no tombstones); what a directory store writes.
        labels: (n,) int32 codes with removed rows set to 0; what searches read.
        ids: (n,) int64.
        sources: n provenance strings.
        store: the exact-search store.
        hnsw: a built hnswlib index over all n rows, or None.
    """

    uid: str
    vectors: np.ndarray
    codes: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    sources: Sequence[str]
    store: VectorStore
    hnsw: object | None = None
    n_dead: int = 0
    n_live_classes: int = 0

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def n_live(self) -> int:
        return self.n - self.n_dead


def make_segment(
    vectors: np.ndarray,
    codes: np.ndarray,
    ids: np.ndarray,
    sources: Sequence[str],
    *,
    storage: str,
    uid: str | None = None,
    labels: np.ndarray | None = None,
    q8: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    hnsw: object | None = None,
) -> Segment:
    """A sealed segment (``labels``: the codes with tombstones; default: ``codes``)."""
    codes = _readonly(np.ascontiguousarray(codes, np.int32))
    labels = codes if labels is None else _readonly(np.ascontiguousarray(labels, np.int32))
    live = labels[labels > 0]
    return Segment(
        uid=uid or new_uid(),
        vectors=_readonly(vectors),
        codes=codes,
        labels=labels,
        ids=_readonly(np.ascontiguousarray(ids, np.int64)),
        sources=tuple(sources),
        store=VectorStore.from_parts(vectors, storage=storage, q8=q8, scales=scales),
        hnsw=hnsw,
        n_dead=int(len(labels) - len(live)),
        n_live_classes=int(len(np.unique(live))),
    )


@dataclass(frozen=True, eq=False)
class Tail:
    """The unsealed rows a snapshot sees: the prefix ``[0, n)`` of the writer's growing buffers."""

    vectors: np.ndarray  # (capacity, d); rows >= n belong to the writer
    labels: np.ndarray  # (capacity,)
    ids: np.ndarray
    sources: list  # append-only; entries >= n belong to the writer
    n: int = 0
    n_dead: int = 0

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        return self.vectors[: self.n], self.labels[: self.n], self.ids[: self.n], self.sources[: self.n]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One consistent state of a memory: what every search and property reads."""

    dim: int
    segments: tuple[Segment, ...]
    tail: Tail
    names: list  # code -> class name, append-only and shared; names[0] is the tombstone's ""
    n_codes: int  # len(names) when published
    n_live: int
    next_id: int
    n_live_classes: int = 0  # codes with at least one live entry
    _cache: dict = field(default_factory=dict, repr=False)

    def parts(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[str]]]:
        """(vectors, labels, ids, sources) of every segment, then the tail, in entry order."""
        out = [(s.vectors, s.labels, s.ids, s.sources) for s in self.segments]
        if self.tail.n:
            out.append(self.tail.rows())
        return out

    def code_counts(self) -> np.ndarray:
        """Live entries per class code (index 0: always 0)."""
        c = self._cache.get("counts")
        if c is None:
            c = np.zeros(self.n_codes, np.int64)
            for _, lab, _, _ in self.parts():
                c += np.bincount(lab, minlength=self.n_codes)[: self.n_codes]
            c[0] = 0
            self._cache["counts"] = c  # the same value whichever thread computes it first
        return c

    def live_codes(self) -> np.ndarray:
        """Codes with at least one live entry, in code order (the order classes were first added)."""
        return np.flatnonzero(self.code_counts())

    def live_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(vectors, codes, ids, sources) of every live row, concatenated in entry order (copies)."""
        vs, ls, is_, ss = [], [], [], []
        for v, lab, ids, src in self.parts():
            keep = lab > 0
            if keep.all():
                vs.append(v), ls.append(lab), is_.append(ids), ss.extend(src)
            else:
                vs.append(v[keep]), ls.append(lab[keep]), is_.append(ids[keep])
                ss.extend(s for s, k in zip(src, keep) if k)
        if not vs:
            return (np.zeros((0, self.dim), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64), [])
        return np.concatenate(vs), np.concatenate(ls), np.concatenate(is_), ss


# -- search ----------------------------------------------------------------------------------------------
def search(snap: Snapshot, q: np.ndarray, k: int, *, use_hnsw: bool, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k live class codes for unit queries ``q`` (Q, d): (codes int32 (Q, k), scores float32), padded
    with code -1 / -inf."""
    kk = k + 1  # one slot more: code 0 (the tombstones' class) may take one
    per: list[tuple[np.ndarray, np.ndarray]] = []
    for seg in snap.segments:
        if seg.n_live == 0:
            continue
        if use_hnsw and seg.hnsw is not None:
            per.append(_search_graph(seg, q, min(k, seg.n_live_classes), snap.n_codes, ef))
        else:
            per.append(seg.store.topk_classes(seg.labels, snap.n_codes, q, min(kk, snap.n_codes)))
    t = snap.tail
    if t.n - t.n_dead > 0:  # the tail's rows are finite unit rows (checked by Memory.add)
        per.append(
            _native.topk_classes(t.vectors[: t.n], t.labels[: t.n], snap.n_codes, q, min(kk, snap.n_codes), threads=1)
        )
    out_c = np.full((len(q), k), -1, np.int32)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    if len(per) == 1:
        c, s = per[0]
        for qi in range(len(q)):
            keep = c[qi] > 0
            row_c, row_s = c[qi][keep][:k], s[qi][keep][:k]
            out_c[qi, : len(row_c)], out_s[qi, : len(row_s)] = row_c, row_s
        return out_c, out_s
    for qi in range(len(q)):
        best: dict[int, float] = {}
        for c, s in per:
            for code, score in zip(c[qi].tolist(), s[qi].tolist()):
                if code > 0 and score > best.get(code, -math.inf):
                    best[code] = score
        top = sorted(best.items(), key=lambda cs: (-cs[1], cs[0]))[:k]
        for j, (code, score) in enumerate(top):
            out_c[qi, j], out_s[qi, j] = code, score
    return out_c, out_s


def _search_graph(seg: Segment, q: np.ndarray, k: int, n_codes: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    """A segment's nearest entries from its graph, widened until k distinct live classes are among them. A
    query whose neighbourhood one class crowds (a class with far more entries than the rest) would need
    most of the segment: it gets the exact scan instead, as does hnswlib refusing a large fetch. The graph
    is only read here (its search width was set before it was published)."""
    index = seg.hnsw
    out_c = np.full((len(q), k), -1, np.int32)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    labels = seg.labels
    for qi in range(len(q)):
        fetch, best = max(4 * k, 32), None
        while fetch < seg.n // 2:
            try:
                nn, dist = index.knn_query(q[qi : qi + 1], k=fetch)  # type: ignore[attr-defined]
            except RuntimeError:  # "cannot return the results in a contiguous 2D array": nodes unreachable
                break
            found: dict[int, float] = {}
            for e, d in zip(nn[0].tolist(), dist[0].tolist()):
                c = int(labels[e])
                s = 1.0 - float(d)  # hnswlib "ip" distance is 1 - <a, b>
                if c > 0 and s > found.get(c, -math.inf):
                    found[c] = s
            if len(found) >= k:
                best = found
                break
            fetch *= 4
        if best is None:
            c, s = seg.store.topk_classes(labels, n_codes, q[qi : qi + 1], min(k + 1, n_codes))
            keep = c[0] > 0
            rc, rs = c[0][keep][:k], s[0][keep][:k]
            out_c[qi, : len(rc)], out_s[qi, : len(rs)] = rc, rs
            continue
        top = sorted(best.items(), key=lambda cs: (-cs[1], cs[0]))[:k]
        for j, (c, s) in enumerate(top):
            out_c[qi, j], out_s[qi, j] = c, s
    return out_c, out_s


def build_graph(vectors: np.ndarray, *, M: int, ef_construction: int, ef: int) -> object:
    """A private hnswlib index over ``vectors`` (rows 0..n-1), its search width set; publish it only after."""
    try:
        import hnswlib
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("hnswlib", None, "the HNSW back end") from e
    index = hnswlib.Index(space="ip", dim=int(vectors.shape[1]))
    index.init_index(max_elements=max(int(vectors.shape[0]), 1), ef_construction=ef_construction, M=M)
    if len(vectors):
        index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(ef)
    return index


# -- the writer ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    """What the writer needs to know of the memory: vector storage, and whether (and how) to build graphs."""

    storage: str
    want_graph: Callable[[int], bool]  # live entries after the write -> build HNSW graphs?
    M: int = 16
    ef_construction: int = 200
    ef: int = 512


class Engine:
    """Owns the writer state; publishes `snapshot`. Writers call under `lock`; readers never lock."""

    def __init__(self, dim: int, config: EngineConfig) -> None:
        self.dim = int(dim)
        self.config = config
        self.lock = threading.RLock()
        self._names: list[str] = [""]
        self._index: dict[str, int] = {}
        self._tail_cap = 0
        self._tail_v = np.zeros((0, self.dim), np.float32)
        self._tail_l = np.zeros(0, np.int32)
        self._tail_i = np.zeros(0, np.int64)
        self._tail_s: list[str] = []
        # live entries per code: the writer's own (readers get the class count; the per-class counts they
        # ask for are computed from their snapshot)
        self._counts = np.zeros(16, np.int64)
        self._n_live_classes = 0
        self.snapshot = Snapshot(
            self.dim, (), Tail(self._tail_v, self._tail_l, self._tail_i, self._tail_s), self._names, 1, 0, 0
        )

    # -- classes -------------------------------------------------------------------------------------
    def code_of(self, name: str) -> int | None:
        return self._index.get(name)

    def live_count(self, code: int) -> int:
        """Live entries of a class code (writer side: call under `lock`)."""
        return int(self._counts[code]) if code < len(self._counts) else 0

    def _count(self, codes: np.ndarray, sign: int) -> None:
        if not len(codes):
            return
        uniq, cnt = np.unique(codes, return_counts=True)
        if uniq[-1] >= len(self._counts):
            grown = np.zeros(max(2 * len(self._counts), int(uniq[-1]) + 1), np.int64)
            grown[: len(self._counts)] = self._counts
            self._counts = grown
        before = self._counts[uniq]
        after = before + sign * cnt
        self._counts[uniq] = after
        self._n_live_classes += int(np.count_nonzero((before == 0) & (after > 0)))
        self._n_live_classes -= int(np.count_nonzero((before > 0) & (after == 0)))

    def _code(self, name: str) -> int:
        c = self._index.get(name)
        if c is None:
            c = len(self._names)
            self._names.append(name)  # readers index only codes below their snapshot's n_codes
            self._index[name] = c
        return c

    def set_names(self, names: Sequence[str]) -> None:
        """Starts the code table (code i + 1 = names[i]); only on an empty engine, before publishing rows."""
        for n in names:
            if n in self._index:
                raise InvalidInputError(f"class {n!r} appears twice in the class table")
            self._code(str(n))

    # -- publishing ----------------------------------------------------------------------------------
    def _publish(self, segments: Sequence[Segment], tail: Tail, next_id: int) -> Snapshot:
        n_live = sum(s.n_live for s in segments) + tail.n - tail.n_dead
        snap = Snapshot(
            self.dim, tuple(segments), tail, self._names, len(self._names), n_live, next_id, self._n_live_classes
        )
        self.snapshot = snap  # the commit: one reference assignment
        return snap

    def load(self, segments: Sequence[Segment], next_id: int) -> None:
        """Publishes loaded segments (codes already in the table)."""
        with self.lock:
            s = self.snapshot
            for seg in segments:
                self._count(seg.labels[seg.labels > 0], +1)
            self._publish(list(s.segments) + list(segments), s.tail, max(next_id, s.next_id))

    # -- writes -------------------------------------------------------------------------------------
    def append(self, vectors: np.ndarray, names: Sequence[str], sources: Sequence[str]) -> np.ndarray:
        """Appends unit rows; returns their ids."""
        with self.lock:
            snap = self.snapshot
            m = len(vectors)
            if snap.next_id + m > MAX_ID:
                raise InvalidInputError(f"ids would pass {MAX_ID}: this memory cannot take more entries")
            codes = np.fromiter((self._code(n) for n in names), np.int32, m)
            ids = np.arange(snap.next_id, snap.next_id + m, dtype=np.int64)
            t = snap.tail
            n = t.n
            if n + m > self._tail_cap:
                cap = max(2 * self._tail_cap, n + m, 256)
                v2 = np.empty((cap, self.dim), np.float32)
                l2 = np.empty(cap, np.int32)
                i2 = np.empty(cap, np.int64)
                v2[:n], l2[:n], i2[:n] = t.vectors[:n], t.labels[:n], t.ids[:n]
                self._tail_v, self._tail_l, self._tail_i, self._tail_cap = v2, l2, i2, cap
                self._tail_s = list(t.sources[:n])
            elif self._tail_l is not t.labels:  # a removal copied the label buffer after this snapshot
                self._tail_l = t.labels
            # rows >= n are seen by no published snapshot: writing them races with no reader
            self._tail_v[n : n + m] = vectors
            self._tail_l[n : n + m] = codes
            self._tail_i[n : n + m] = ids
            del self._tail_s[n:]
            self._tail_s.extend(str(x) for x in sources)
            tail = Tail(self._tail_v, self._tail_l, self._tail_i, self._tail_s, n + m, t.n_dead)
            segments = list(snap.segments)
            if tail.n >= SEAL_ROWS:
                segments, tail = self._seal(segments, tail, snap.n_live + m)
            self._count(codes, +1)
            self._publish(segments, tail, snap.next_id + m)
            return ids

    def _empty_tail(self) -> Tail:
        self._tail_cap = 0
        self._tail_v = np.zeros((0, self.dim), np.float32)
        self._tail_l = np.zeros(0, np.int32)
        self._tail_i = np.zeros(0, np.int64)
        self._tail_s = []
        return Tail(self._tail_v, self._tail_l, self._tail_i, self._tail_s)

    def _segment_from(self, parts: Sequence[tuple], n_live_total: int) -> Segment:
        """One new segment holding the live rows of ``parts`` (copied), with a graph if one is wanted.

        A part is (vectors, labels, ids, sources) or, for a sealed segment, also its store: int8 rows are
        quantised row by row, so a merge concatenates the segments' int8 copies instead of quantising again.
        """
        vs, ls, is_, ss, q8s, scs = [], [], [], [], [], []
        for part in parts:
            v, lab, ids, src = part[:4]
            store = part[4] if len(part) > 4 else None
            keep = lab > 0
            every = bool(keep.all())
            if every:
                vs.append(v), ls.append(lab), is_.append(ids), ss.extend(src)
            else:
                vs.append(v[keep]), ls.append(lab[keep]), is_.append(ids[keep])
                ss.extend(s for s, k in zip(src, keep) if k)
            if store is not None and store._scales is not None:
                q8s.append(store._v if every else store._v[keep])
                scs.append(store._scales if every else store._scales[keep])
        v = np.ascontiguousarray(np.concatenate(vs)) if len(vs) > 1 else np.array(vs[0], np.float32, copy=True)
        lab = np.concatenate(ls).astype(np.int32, copy=True)
        ids = np.concatenate(is_).astype(np.int64, copy=True)
        q8 = scales = None
        if len(q8s) == len(parts) and self.config.storage in ("int8", "int8_rerank"):
            q8, scales = np.concatenate(q8s), np.concatenate(scs)
        graph = None
        if self.config.want_graph(n_live_total) and len(v) >= HNSW_MIN_ROWS:
            c = self.config
            graph = build_graph(v, M=c.M, ef_construction=c.ef_construction, ef=c.ef)
        return make_segment(v, lab, ids, ss, storage=self.config.storage, hnsw=graph, q8=q8, scales=scales)

    def _seal(self, segments: list[Segment], tail: Tail, n_live_total: int) -> tuple[list[Segment], Tail]:
        if tail.n - tail.n_dead > 0:
            segments.append(self._segment_from([tail.rows()], n_live_total))
        segments = self._merge_tiers(segments, n_live_total)
        return segments, self._empty_tail()

    def _merge_tiers(self, segments: list[Segment], n_live_total: int) -> list[Segment]:
        """Merges `MERGE_FAN_IN` consecutive segments of one size tier into one, until none are left."""

        def tier(s: Segment) -> int:
            t = 0
            while s.n_live >= SEAL_ROWS * MERGE_FAN_IN ** (t + 1):
                t += 1
            return t

        merged = True
        while merged:
            merged = False
            for i in range(len(segments) - MERGE_FAN_IN + 1):
                group = segments[i : i + MERGE_FAN_IN]
                if len({tier(s) for s in group}) == 1:
                    new = self._segment_from(
                        [(s.vectors, s.labels, s.ids, s.sources, s.store) for s in group], n_live_total
                    )
                    segments = segments[:i] + [new] + segments[i + MERGE_FAN_IN :]
                    merged = True
                    break
        return segments

    def seal(self) -> Snapshot:
        """Seals the tail (a directory-store save writes it as a segment file)."""
        with self.lock:
            snap = self.snapshot
            if snap.tail.n == 0:
                return snap
            segments, tail = self._seal(list(snap.segments), snap.tail, snap.n_live)
            return self._publish(segments, tail, snap.next_id)

    def compact(self, *, graph: bool | None = None) -> Snapshot:
        """Rewrites every live row into one segment (tombstones dropped); ``graph`` forces a graph on or off."""
        with self.lock:
            snap = self.snapshot
            parts: list[tuple] = [(s.vectors, s.labels, s.ids, s.sources, s.store) for s in snap.segments]
            if snap.tail.n:
                parts.append(snap.tail.rows())
            if not parts or snap.n_live == 0:
                return self._publish([], self._empty_tail(), snap.next_id)
            seg = self._segment_from(parts, snap.n_live)
            if graph and seg.hnsw is None:
                c = self.config
                seg = replace(seg, hnsw=build_graph(seg.vectors, M=c.M, ef_construction=c.ef_construction, ef=c.ef))
            elif graph is False:
                seg = replace(seg, hnsw=None)
            return self._publish([seg], self._empty_tail(), snap.next_id)

    def remove(self, ids: np.ndarray | None, code: int | None) -> int:
        """Tombstones the live rows with these ids and/or this class code; returns how many."""
        with self.lock:
            snap = self.snapshot
            removed = 0
            gone: list[np.ndarray] = []  # the codes of the removed rows
            segments: list[Segment] = []
            for seg in snap.segments:
                drop = self._drop_mask(seg.labels, seg.ids, ids, code)
                cnt = int(drop.sum())
                if not cnt:
                    segments.append(seg)
                    continue
                removed += cnt
                gone.append(seg.labels[drop])
                labels = seg.labels.copy()
                labels[drop] = 0
                if seg.n_dead + cnt >= REWRITE_DEAD_FRACTION * seg.n:
                    if seg.n_dead + cnt < seg.n:
                        segments.append(
                            self._segment_from(
                                [(seg.vectors, labels, seg.ids, seg.sources, seg.store)], snap.n_live - cnt
                            )
                        )
                    continue
                live = labels[labels > 0]
                segments.append(
                    replace(
                        seg, labels=_readonly(labels), n_dead=seg.n_dead + cnt, n_live_classes=int(len(np.unique(live)))
                    )
                )
            t = snap.tail
            tail = t
            if t.n:
                drop = self._drop_mask(t.labels[: t.n], t.ids[: t.n], ids, code)
                cnt = int(drop.sum())
                if cnt:
                    removed += cnt
                    gone.append(t.labels[: t.n][drop])
                    labels = t.labels.copy()  # the whole buffer: the writer keeps appending into it
                    labels[: t.n][drop] = 0
                    self._tail_l = labels
                    tail = Tail(t.vectors, labels, t.ids, t.sources, t.n, t.n_dead + cnt)
            if removed:
                self._count(np.concatenate(gone), -1)
                self._publish(segments, tail, snap.next_id)
            return removed

    @staticmethod
    def _drop_mask(labels: np.ndarray, row_ids: np.ndarray, ids: np.ndarray | None, code: int | None) -> np.ndarray:
        drop = np.zeros(len(labels), bool)
        if ids is not None and len(ids):
            drop |= np.isin(row_ids, ids)
        if code is not None:
            drop |= labels == code
        return drop & (labels > 0)
