"""`Memory`: labelled vectors, searched for the top-k *distinct* classes, saved atomically.

A memory holds L2-normalised embeddings (few-shot image exemplars and/or zero-shot class-name
vectors), one class label per entry, and a record of the encoder that made them. Search returns
the k best classes, a class's score being the best cosine among its entries.

Back ends:
    ``exact``: the native fused scan (inner products + per-class max + top-k in one pass).
    ``hnsw``: hnswlib's graph index with explicit ``M`` / ``ef_construction`` / ``ef``; entries are
        fetched in growing batches until k distinct classes are found.
    ``auto``: exact below `AUTO_HNSW_MIN_ENTRIES` entries, HNSW from there on.

File format (one file, written to a temporary name and renamed, so a crash mid-save leaves the
previous file intact): an uncompressed zip of ``meta.json``, ``vectors.npy`` (float32),
``labels.npy`` (int32), ``ids.npy`` (int64), ``sources.json`` and, for HNSW, ``hnsw.bin``. The
meta records format version, dim, metric, encoder fingerprint, versions and the sha256 of every
other member; loading verifies all of it. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from rar_edge import _native
from rar_edge._fs import atomic_write
from rar_edge.errors import (
    CorruptFileError,
    EmptyMemoryError,
    InvalidInputError,
    MemoryMismatchError,
    MissingDependencyError,
)
from rar_edge.index.lookup import DEFAULT_STORAGE, STORAGES, VectorStore
from rar_edge.rank.prompts import has_line_break
from rar_edge.types import Candidate

if TYPE_CHECKING:
    from rar_edge.encoders import Encoder

log = logging.getLogger("rar_edge")

FORMAT = "rar_edge.memory"
FORMAT_VERSION = 1
#: Entries from which ``backend="auto"`` switches from the exact scan to HNSW. From
#: benchmarks/memory_scaling.py (d=512, 1k classes, clustered, 1 query): at equal top-5-class recall
#: (ef 512: 0.94 at 100k) HNSW took 13 ms against the exact scan's 2.9 ms; the exact scan grows
#: linearly (36 ms at 1M), so HNSW wins from roughly 400k entries (extrapolated, HNSW not built above 100k).
AUTO_HNSW_MIN_ENTRIES = 500_000
BACKENDS = ("auto", "exact", "hnsw")


@dataclass(frozen=True)
class HnswParams:
    """hnswlib settings: graph degree, build beam width, search beam width."""

    M: int = 16
    ef_construction: int = 200
    # A distinct-class search needs many more neighbours than k entries: at ef 64 only 75% of the true
    # top-5 classes came back at 100k entries (benchmarks/memory_scaling.py), at ef 512 94%.
    ef: int = 512

    def __post_init__(self) -> None:
        if self.M < 2 or self.ef_construction < 1 or self.ef < 1:
            raise InvalidInputError("HNSW needs M >= 2, ef_construction >= 1, ef >= 1")


@dataclass(frozen=True)
class EncoderRecord:
    """Which encoder built a memory: its name, folder (as given when built), the fingerprint of its model
    files and of its preprocessing settings (None in memories saved before it was recorded)."""

    name: str
    path: str
    fingerprint: str
    embedding_dim: int
    preprocess_fingerprint: str | None = None

    @classmethod
    def of(cls, encoder: "Encoder") -> "EncoderRecord":
        return cls(encoder.name, str(encoder.path), encoder.fingerprint, encoder.dim, encoder.preprocess_fingerprint)


@dataclass
class _Hnsw:
    index: object
    n_indexed: int
    dirty: bool = False


class Memory:
    """Labelled embeddings with a top-k distinct-class search.

    Build one with `Memory.from_folder` (few-shot images), `Memory.from_class_names`
    (zero-shot text) or `Memory.empty`, then `add` / `remove` / `search` / `save`; reopen with
    `Memory.load`.

    Searches may run from several threads at once; `add` and `remove` must not run while another
    thread searches (guard the memory with a lock, or build a new one and swap it in).

    Args:
        dim: embedding size.
        encoder: the record of the encoder whose vectors this memory holds.
        backend: "auto", "exact" or "hnsw".
        hnsw: HNSW parameters (used when the HNSW back end is active).
        storage: vector storage of the exact scan (see `rar_edge.index.lookup.STORAGES`).
    """

    def __init__(
        self,
        *,
        dim: int,
        encoder: EncoderRecord | None = None,
        backend: str = "auto",
        hnsw: HnswParams | None = None,
        storage: str = DEFAULT_STORAGE,
    ) -> None:
        if dim < 1:
            raise InvalidInputError("dim must be >= 1")
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if storage not in STORAGES:
            raise InvalidInputError(f"storage must be one of {STORAGES}, not {storage!r}")
        if encoder is not None and encoder.embedding_dim != dim:
            raise MemoryMismatchError(f"encoder makes {encoder.embedding_dim}-d vectors, memory dim is {dim}")
        self.dim = int(dim)
        self.encoder = encoder
        self.backend = backend
        self.hnsw_params = hnsw or HnswParams()
        self.storage = storage
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._labels = np.zeros((0,), np.int32)
        self._ids = np.zeros((0,), np.int64)
        self._sources: list[str] = []
        self._classes: list[str] = []
        self._class_index: dict[str, int] = {}
        self._next_id = 0
        self._store: VectorStore | None = None
        self._hnsw: _Hnsw | None = None
        self.path: Path | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, *, encoder: "Encoder", backend: str = "auto", hnsw: HnswParams | None = None,
              storage: str = DEFAULT_STORAGE) -> "Memory":
        """An empty memory for vectors of this encoder."""
        return cls(dim=encoder.dim, encoder=EncoderRecord.of(encoder), backend=backend, hnsw=hnsw, storage=storage)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        *,
        encoder: "Encoder",
        shots: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        hnsw: HnswParams | None = None,
        storage: str = DEFAULT_STORAGE,
        progress: bool = False,
    ) -> "Memory":
        """A few-shot memory: ``shots`` images per class, sampled with ``seed`` (all when None).

        Args:
            folder: one sub-folder of images per class.
            encoder: the image encoder.
            shots: images per class; a seeded random sample, not the first files.
            seed: sampling seed (the same split as `rar_edge.datasets.few_shot_split`).
            progress: show a progress bar.

        Raises:
            DatasetError: empty folder or class.
            ImageDecodeError: a sampled image cannot be decoded (the path is named).
        """
        from rar_edge.datasets import few_shot_split

        split = few_shot_split(folder, shots=shots, seed=seed)
        mem = cls.empty(encoder=encoder, backend=backend, hnsw=hnsw, storage=storage)
        mem.add_images(
            [p for ps in split.support.values() for p in ps],
            [c for c, ps in split.support.items() for _ in ps],
            encoder=encoder,
            progress=progress,
        )
        return mem

    @classmethod
    def from_class_names(
        cls,
        names: Sequence[str],
        *,
        encoder: "Encoder",
        templates: Sequence[str] | None = None,
        backend: str = "auto",
        hnsw: HnswParams | None = None,
        storage: str = DEFAULT_STORAGE,
    ) -> "Memory":
        """A zero-shot memory: one text-embedding entry per class name (prompt-template ensemble).

        Args:
            names: distinct class names.
            encoder: a CLIP encoder with a text tower.
            templates: prompt templates with one ``{}``; default: the encoder manifest's ensemble.
        """
        names = [str(n) for n in names]
        if not names:
            raise InvalidInputError("no class names given")
        if len(set(names)) != len(names):
            raise InvalidInputError("class names must be distinct")
        mem = cls.empty(encoder=encoder, backend=backend, hnsw=hnsw, storage=storage)
        vecs = encoder.embed_class_names(names, templates=templates)
        mem.add(vecs, names, sources=[f"text:{n}" for n in names])
        return mem

    def add_images(
        self,
        images: Sequence,
        labels: Sequence[str],
        *,
        encoder: "Encoder",
        progress: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Embeds images with ``encoder`` and adds them; returns the new entry ids."""
        self.check_encoder(encoder)
        if len(images) != len(labels):
            raise InvalidInputError(f"{len(images)} images but {len(labels)} labels")
        bs = batch_size or encoder.config.batch_size
        chunks = range(0, len(images), bs)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="embedding", unit="batch", total=len(chunks))
        ids = []
        for i in chunks:
            part = list(images[i : i + bs])
            vecs = encoder.embed_images(part)
            ids.append(self.add(vecs, list(labels[i : i + bs]),
                                sources=[str(p) if isinstance(p, (str, os.PathLike)) else "" for p in part]))
        return np.concatenate(ids) if ids else np.zeros((0,), np.int64)

    # -- contents ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of entries."""
        return int(self._vectors.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names that have at least one entry."""
        return tuple(self._classes)

    @property
    def vectors(self) -> np.ndarray:
        """A read-only view of the (N, dim) float32 vectors."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    @property
    def labels(self) -> tuple[str, ...]:
        """The class name of every entry, in entry order."""
        return tuple(self._classes[i] for i in self._labels)

    @property
    def ids(self) -> np.ndarray:
        """Every entry's stable id (int64), in entry order."""
        return self._ids.copy()

    @property
    def sources(self) -> tuple[str, ...]:
        """Every entry's provenance (image path, ``text:<name>``, or ``""``), in entry order."""
        return tuple(self._sources)

    def counts(self) -> dict[str, int]:
        """Entries per class."""
        c = np.bincount(self._labels, minlength=len(self._classes))
        return {name: int(c[i]) for i, name in enumerate(self._classes)}

    @property
    def active_backend(self) -> str:
        """The back end searches use now ("exact" or "hnsw")."""
        if self.backend == "auto":
            return "hnsw" if self.size >= AUTO_HNSW_MIN_ENTRIES else "exact"
        return self.backend

    def check_encoder(self, encoder: "Encoder") -> None:
        """Raises MemoryMismatchError unless ``encoder`` is the one this memory's vectors came from."""
        if encoder.dim != self.dim:
            raise MemoryMismatchError(
                f"encoder {encoder.name!r} makes {encoder.dim}-d vectors but this memory holds {self.dim}-d vectors"
            )
        if self.encoder is not None and self.encoder.fingerprint != encoder.fingerprint:
            raise MemoryMismatchError(
                f"this memory was built by encoder {self.encoder.name!r} (fingerprint {self.encoder.fingerprint[:12]}, "
                f"from {self.encoder.path}) but encoder {encoder.name!r} (fingerprint {encoder.fingerprint[:12]}) was "
                "given; rebuild the memory with this encoder or pass the one that built it"
            )
        pre = None if self.encoder is None else self.encoder.preprocess_fingerprint
        if pre is not None and pre != encoder.preprocess_fingerprint:
            raise MemoryMismatchError(
                f"this memory was built by the same model files as encoder {encoder.name!r} but with other "
                "preprocessing: the image or text section of its manifest.json (input size, resize, crop, "
                "normalisation, tokenisation) or the image decoding of another rar_edge version; rebuild the "
                "memory, or restore the settings it was built with"
            )

    def add(self, vectors: np.ndarray, labels: Sequence[str], *, sources: Sequence[str] | None = None) -> np.ndarray:
        """Adds entries.

        Args:
            vectors: (n, dim) embeddings (normalised here; NaN/inf and zero rows are refused).
            labels: a class name per row.
            sources: optional provenance per row (image path, ``text:...``).

        Returns:
            The new entries' ids (int64), stable across save/load and removals.
        """
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise InvalidInputError(f"vectors must be (n, {self.dim}), got {v.shape}")
        if isinstance(labels, (str, bytes)):
            raise InvalidInputError("labels must be a sequence of class names, one per row, not one string")
        labels = list(labels)
        for lbl in labels:
            if not isinstance(lbl, (str, np.str_)):
                raise InvalidInputError(f"class labels must be strings, got {type(lbl).__name__} {lbl!r}")
        labels = [str(x) for x in labels]
        if len(labels) != len(v):
            raise InvalidInputError(f"{len(v)} vectors but {len(labels)} labels")
        if any(not lbl.strip() for lbl in labels):
            raise InvalidInputError("class labels must be non-empty strings")
        broken = next((lbl for lbl in labels if has_line_break(lbl)), None)
        if broken is not None:  # a ranker lists candidates one per line
            raise InvalidInputError(f"class label {broken!r} contains a line break")
        if not np.all(np.isfinite(v)):
            raise InvalidInputError("vectors contain NaN or inf")
        v64 = v.astype(np.float64)  # norms of large float32 values overflow in float32
        norms = np.linalg.norm(v64, axis=1)
        if np.any(norms == 0):
            raise InvalidInputError("vectors contain an all-zero row")
        v = (v64 / norms[:, None]).astype(np.float32)
        srcs = list(sources) if sources is not None else [""] * len(v)
        if len(srcs) != len(v):
            raise InvalidInputError(f"{len(v)} vectors but {len(srcs)} sources")
        lab = np.empty(len(v), np.int32)
        for i, name in enumerate(labels):
            idx = self._class_index.get(name)
            if idx is None:
                idx = len(self._classes)
                self._classes.append(name)
                self._class_index[name] = idx
            lab[i] = idx
        new_ids = np.arange(self._next_id, self._next_id + len(v), dtype=np.int64)
        self._next_id += len(v)
        self._vectors = np.concatenate([self._vectors, v]) if self.size else v
        self._labels = np.concatenate([self._labels, lab])
        self._ids = np.concatenate([self._ids, new_ids])
        self._sources.extend(str(s) for s in srcs)
        self._store = None
        return new_ids

    def remove(self, *, ids: Iterable[int] | None = None, label: str | None = None) -> int:
        """Removes entries by id and/or every entry of a class; returns how many were removed."""
        if ids is None and label is None:
            raise InvalidInputError("remove() needs ids= or label=")
        drop = np.zeros(self.size, bool)
        if ids is not None:
            drop |= np.isin(self._ids, np.fromiter((int(i) for i in ids), np.int64))
        if label is not None:
            idx = self._class_index.get(str(label))
            if idx is None:
                raise InvalidInputError(f"no class {label!r} in this memory")
            drop |= self._labels == idx
        n = int(drop.sum())
        if n:
            keep = ~drop
            self._vectors = np.ascontiguousarray(self._vectors[keep])
            self._ids = self._ids[keep]
            self._sources = [s for s, k in zip(self._sources, keep) if k]
            old_labels = self._labels[keep]
            # Compact the class list so that a class with no entries left disappears.
            used = np.unique(old_labels)
            remap = np.full(len(self._classes), -1, np.int32)
            remap[used] = np.arange(len(used), dtype=np.int32)
            self._classes = [self._classes[i] for i in used]
            self._class_index = {c: i for i, c in enumerate(self._classes)}
            self._labels = remap[old_labels].astype(np.int32)
            self._store = None
            if self._hnsw is not None:
                self._hnsw.dirty = True
        return n

    # -- search ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, *, k: int = 5) -> list[list[Candidate]]:
        """The top-k distinct classes for each query vector.

        Args:
            queries: (Q, dim) or (dim,) embeddings from this memory's encoder.
            k: classes per query; fewer come back when the memory has fewer classes.

        Returns:
            Per query, up to k `Candidate` (label, best cosine among the class's entries), best first.

        Raises:
            EmptyMemoryError: the memory has no entries.
            InvalidInputError: wrong shape, NaN, or k < 1.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
        if self.size == 0:
            raise EmptyMemoryError("the memory is empty: add entries (memory build / Memory.add) before searching")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(f"queries must be (Q, {self.dim}), got {np.shape(queries)}")
        q, finite = _native.unit_rows(np.require(q, requirements="CA"))
        if not finite:
            raise InvalidInputError("queries contain NaN or inf")
        k = min(int(k), len(self._classes))  # no more classes than there are (and no (Q, k) arrays beyond)
        classes, scores = self._search_hnsw(q, k) if self.active_backend == "hnsw" else self._search_exact(q, k)
        names = self._classes
        return [
            [Candidate(names[c], s) for c, s in zip(crow, srow) if c >= 0]
            for crow, srow in zip(classes.tolist(), scores.tolist())
        ]

    def _hnsw_index(self):
        try:
            import hnswlib
        except ImportError as e:  # pragma: no cover
            raise MissingDependencyError("hnswlib", None, "the HNSW back end") from e
        h = self._hnsw
        if h is None or h.dirty:
            p = self.hnsw_params
            index = hnswlib.Index(space="ip", dim=self.dim)
            index.init_index(max_elements=max(self.size, 1), ef_construction=p.ef_construction, M=p.M)
            index.add_items(self._vectors, np.arange(self.size))
            h = self._hnsw = _Hnsw(index, self.size)
        elif h.n_indexed < self.size:
            h.index.resize_index(self.size)
            h.index.add_items(self._vectors[h.n_indexed :], np.arange(h.n_indexed, self.size))
            h.n_indexed = self.size
        return h.index

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._store is None:
            self._store = VectorStore(self._vectors, storage=self.storage)
        return self._store.topk_classes(self._labels, len(self._classes), q, k)

    def _search_hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entries from the graph, widened until k distinct classes are among them. A query whose
        neighbourhood one class crowds (a class with far more entries than the rest, many duplicates) would
        need most of the memory: it gets the exact scan instead, as does hnswlib refusing a large fetch."""
        index = self._hnsw_index()
        out_c = np.full((len(q), k), -1, np.int32)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        for qi in range(len(q)):
            fetch, best = max(4 * k, 32), None
            while fetch < self.size // 2:
                index.set_ef(max(self.hnsw_params.ef, fetch))
                try:
                    nn, dist = index.knn_query(q[qi : qi + 1], k=fetch)
                except RuntimeError:  # "cannot return the results in a contiguous 2D array": nodes unreachable
                    break
                found: dict[int, float] = {}
                for e, d in zip(nn[0], dist[0]):
                    c = int(self._labels[int(e)])
                    s = 1.0 - float(d)  # hnswlib "ip" distance is 1 - <a, b>
                    if s > found.get(c, -np.inf):
                        found[c] = s
                if len(found) >= k:
                    best = found
                    break
                fetch *= 4
            if best is None:
                c, s = self._search_exact(q[qi : qi + 1], k)
                out_c[qi], out_s[qi] = c[0], s[0]
                continue
            top = sorted(best.items(), key=lambda cs: (-cs[1], cs[0]))[:k]
            for j, (c, s) in enumerate(top):
                out_c[qi, j], out_s[qi, j] = c, s
        return out_c, out_s

    # -- persistence -----------------------------------------------------------------------------------
    def _meta(self) -> dict:
        import platform

        from rar_edge import __version__

        try:
            import hnswlib  # noqa: F401

            hv = _dist_version("hnswlib")
        except ImportError:  # pragma: no cover
            hv = None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "metric": "cosine",
            "n_entries": self.size,
            "classes": list(self._classes),
            "next_id": self._next_id,
            "backend": self.backend,
            "storage": self.storage,
            "hnsw": asdict(self.hnsw_params),
            "encoder": None if self.encoder is None else {
                "name": self.encoder.name, "path": self.encoder.path,
                "fingerprint": self.encoder.fingerprint, "embedding_dim": self.encoder.embedding_dim,
                "preprocess_fingerprint": self.encoder.preprocess_fingerprint},
            "versions": {"rar_edge": __version__, "numpy": np.__version__, "hnswlib": hv,
                         "python": platform.python_version()},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the memory to one file atomically (temp file + fsync + rename).

        A crash or error at any point leaves a previous file at ``path`` untouched.
        """
        path = Path(path)
        members: dict[str, bytes] = {
            "vectors.npy": _npy_bytes(self._vectors),
            "labels.npy": _npy_bytes(self._labels),
            "ids.npy": _npy_bytes(self._ids),
            "sources.json": json.dumps(self._sources).encode(),
        }
        if self.active_backend == "hnsw" and self.size:
            members["hnsw.bin"] = self._hnsw_bytes()
        meta = self._meta()
        meta["checksums"] = {name: hashlib.sha256(b).hexdigest() for name, b in members.items()}
        with atomic_write(path, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
                z.writestr("meta.json", json.dumps(meta, indent=1))
                for name, b in members.items():
                    z.writestr(name, b)
        self.path = path
        return path

    def _hnsw_bytes(self) -> bytes:
        index = self._hnsw_index()
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "hnsw.bin")
            index.save_index(p)
            with open(p, "rb") as f:
                return f.read()

    @classmethod
    def load(cls, path: str | os.PathLike, *, encoder: "Encoder | None" = None) -> "Memory":
        """Opens a saved memory, verifying format, checksums and shapes.

        Args:
            path: a file written by `save`.
            encoder: if given, refuse the memory unless this encoder built it.

        Raises:
            CorruptFileError: not a memory file, damaged, or checksums do not match.
            MemoryMismatchError: ``encoder`` is not the one that built the memory.
        """
        path = Path(path)
        if not path.is_file():
            raise CorruptFileError(f"no memory file at {path}")
        try:
            with zipfile.ZipFile(path, "r") as z:
                bad = z.testzip()
                if bad is not None:
                    raise CorruptFileError(f"{path}: member {bad} is damaged (CRC mismatch)")
                meta = json.loads(z.read("meta.json"))
                if not isinstance(meta, dict) or not isinstance(meta.get("checksums"), dict):
                    raise CorruptFileError(f"{path} is not a rar_edge memory file")
                if meta.get("format") != FORMAT:
                    raise CorruptFileError(f"{path} is not a rar_edge memory file")
                if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                    raise CorruptFileError(f"{path} was written by a newer rar_edge (format {meta['format_version']})")
                raw = {}
                for name, want in meta["checksums"].items():
                    b = z.read(name)
                    if hashlib.sha256(b).hexdigest() != want:
                        raise CorruptFileError(f"{path}: {name} does not match its checksum; the file is damaged")
                    raw[name] = b
        except CorruptFileError:
            raise
        except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError, EOFError) as e:
            raise CorruptFileError(f"{path} is not a readable rar_edge memory file: {e}") from e
        try:
            vectors = _npy_load(raw["vectors.npy"])
            labels = _npy_load(raw["labels.npy"])
            ids = _npy_load(raw["ids.npy"])
            sources = json.loads(raw["sources.json"])
            enc = meta.get("encoder")
            rec = None if enc is None else EncoderRecord(enc["name"], enc["path"], enc["fingerprint"],
                                                         int(enc["embedding_dim"]), enc.get("preprocess_fingerprint"))
            hp = meta.get("hnsw") or {}
            mem = cls(dim=int(meta["dim"]), encoder=rec, backend=meta.get("backend", "auto"),
                      hnsw=HnswParams(**hp), storage=meta.get("storage", DEFAULT_STORAGE)
                      if meta.get("storage", DEFAULT_STORAGE) in STORAGES else DEFAULT_STORAGE)
            classes = [str(c) for c in meta["classes"]]
            n = int(meta["n_entries"])
            if (vectors.dtype != np.float32 or vectors.shape != (n, mem.dim) or labels.dtype != np.int32
                    or labels.shape != (n,) or ids.shape != (n,) or len(sources) != n
                    or (n and (labels.min() < 0 or labels.max() >= len(classes)))):
                raise CorruptFileError(f"{path}: arrays disagree with the metadata")
        except CorruptFileError:
            raise
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptFileError(f"{path}: bad memory metadata: {e}") from e
        mem._vectors, mem._labels, mem._ids = vectors, labels, ids.astype(np.int64)
        mem._sources = [str(s) for s in sources]
        mem._classes = classes
        mem._class_index = {c: i for i, c in enumerate(classes)}
        mem._next_id = int(meta.get("next_id", int(ids.max()) + 1 if n else 0))
        if "hnsw.bin" in raw:
            mem._load_hnsw(raw["hnsw.bin"])
        mem.path = path
        if encoder is not None:
            mem.check_encoder(encoder)
        return mem

    def _load_hnsw(self, blob: bytes) -> None:
        import hnswlib

        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "hnsw.bin")
            with open(p, "wb") as f:
                f.write(blob)
            index = hnswlib.Index(space="ip", dim=self.dim)
            try:
                index.load_index(p, max_elements=self.size)
                # the right entries of the right width: count, and entry 0's vector read back
                ok = index.get_current_count() == self.size and (self.size == 0 or np.allclose(
                    np.asarray(index.get_items([0]), np.float32).reshape(-1), self._vectors[0], atol=1e-6))
            except RuntimeError as e:  # e.g. an index another hnswlib version wrote
                ok, why = False, str(e)
            else:
                why = f"it holds {index.get_current_count()} entries (memory: {self.size}) or other vectors"
        if not ok:
            # the vectors are the source of truth: the graph is rebuilt from them on the first search
            log.warning("the memory's HNSW index cannot be used (%s); it will be rebuilt from the vectors", why)
            return
        self._hnsw = _Hnsw(index, self.size)

    def info(self) -> dict:
        """A JSON-ready summary: sizes, classes, back end, encoder, file."""
        counts = self.counts()
        return {
            "path": None if self.path is None else str(self.path),
            "n_entries": self.size,
            "n_classes": len(self._classes),
            "dim": self.dim,
            "metric": "cosine",
            "backend": self.backend,
            "active_backend": self.active_backend,
            "storage": self.storage,
            "hnsw": asdict(self.hnsw_params),
            "encoder": None if self.encoder is None else {
                "name": self.encoder.name, "path": self.encoder.path, "fingerprint": self.encoder.fingerprint},
            "entries_per_class": counts,
        }

    def __repr__(self) -> str:
        return f"Memory(n_entries={self.size}, n_classes={len(self._classes)}, dim={self.dim}, backend={self.active_backend!r})"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return None
