"""`Memory`: labelled vectors, searched for the top-k *distinct* classes, saved atomically.

A memory holds L2-normalised embeddings (few-shot image exemplars and/or zero-shot class-name
vectors), one class label per entry, and a record of the encoder that made them. Search returns
the k best classes, a class's score being the best cosine among its entries.

Back ends:
    ``exact``: the native fused scan (inner products + per-class max + top-k in one pass).
    ``hnsw``: hnswlib's graph index with explicit ``M`` / ``ef_construction`` / ``ef``; entries are
        fetched in growing batches until k distinct classes are found.
    ``auto``: exact below `AUTO_HNSW_MIN_ENTRIES` entries; from there on HNSW where its ``ef`` candidates can
        reach the k-th class ((k - 1) x the largest class + 1 <= ef), else exact (docs/design-notes.md#auto-hnsw).

Concurrency: any number of threads search while writers add and remove. Every search reads one
immutable snapshot (the memory before or after a write, never a mix); writers take a lock among
themselves and publish the next snapshot by one reference assignment (`rar_edge.index._store`). Appends
cost amortised O(1) per row; HNSW graphs are built on private indexes and only searched once published.

Files (`rar_edge.index._files`): ``save("m.rarmem")`` writes one file (an uncompressed zip of
``meta.json``, ``vectors.npy``, ``labels.npy``, ``ids.npy``, ``sources.json``, ``q8.npy`` /
``q8_scales.npy`` for int8 storages, ``hnsw.bin`` for HNSW; meta.json holds the sha256 of every other
member and loading verifies all of it); ``save("m.rarmemd")`` keeps a directory store whose saves write
only new segments, committed by an atomically replaced manifest. Both go through
`rar_edge._fs.atomic_write`; ``load(..., mmap=True)`` maps the vectors instead of reading them. No pickle.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import weakref
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from rar_edge import _native, defaults
from rar_edge.errors import (
    CorruptFileError,
    EmptyMemoryError,
    InvalidInputError,
    MemoryMismatchError,
    MissingDependencyError,
)
from rar_edge.index import _files, _store
from rar_edge.index.lookup import DEFAULT_STORAGE, STORAGES, quantize_int8
from rar_edge.labels import check_labels, normalize_label
from rar_edge.types import Candidate
from rar_edge.vectors import unit_rows_checked

if TYPE_CHECKING:
    from rar_edge.encoders import Encoder

log = logging.getLogger("rar_edge")

FORMAT = "rar_edge.memory"
FORMAT_VERSION = 1
#: Entries from which ``backend="auto"`` switches from the exact scan to HNSW (docs/design-notes.md#auto-hnsw).
AUTO_HNSW_MIN_ENTRIES = 500_000
BACKENDS = ("auto", "exact", "hnsw")


@dataclass(frozen=True)
class HnswParams:
    """hnswlib settings: graph degree, build beam width, search beam width."""

    M: int = defaults.HNSW_M
    ef_construction: int = defaults.HNSW_EF_CONSTRUCTION
    # A distinct-class search needs many more neighbours than k entries: at ef 64 only 75% of the true
    # top-5 classes came back at 100k entries (benchmarks/memory_scaling.py), at ef 512 94%.
    ef: int = defaults.HNSW_EF

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


class Memory:
    """Labelled embeddings with a top-k distinct-class search.

    Build one with `Memory.from_folder` (few-shot images), `Memory.from_class_names`
    (zero-shot text) or `Memory.empty`, then `add` / `remove` / `search` / `save`; reopen with
    `Memory.load`.

    Any number of threads may search while others `add` / `remove`: each search sees the memory as it
    was before or after a write, never a mix (writes take turns; searches never wait for them).

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
        p = self.hnsw_params
        me = weakref.ref(self)  # no cycle: a dropped memory's arrays are freed at once, not at the next gc

        def want_graph(n: int) -> bool:
            m = me()
            return m is not None and m._choose(n, m._engine.snapshot) == "hnsw"

        self._engine = _store.Engine(
            self.dim,
            _store.EngineConfig(
                storage=storage, want_graph=want_graph, M=p.M, ef_construction=p.ef_construction, ef=p.ef
            ),
        )
        self.path: Path | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        *,
        encoder: "Encoder",
        backend: str = "auto",
        hnsw: HnswParams | None = None,
        storage: str = DEFAULT_STORAGE,
    ) -> "Memory":
        """An empty memory for vectors of this encoder."""
        return cls(dim=encoder.dim, encoder=EncoderRecord.of(encoder), backend=backend, hnsw=hnsw, storage=storage)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        *,
        encoder: "Encoder | str | os.PathLike",
        shots: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        hnsw: HnswParams | None = None,
        storage: str = DEFAULT_STORAGE,
        progress: bool = True,
        on_error: str = "stop",
    ) -> "Memory":
        """A few-shot memory: ``shots`` images per class, sampled with ``seed`` (all when None).

        Args:
            folder: one sub-folder of images per class.
            encoder: the image encoder, or its model folder.
            shots: images per class; a seeded random sample, not the first files.
            seed: sampling seed (the same split as `rar_edge.datasets.few_shot_split`).
            progress: a progress bar counting images, shown only when stderr is a terminal.
            on_error: ``"stop"`` (raise at an unreadable image) or ``"skip"`` (leave it out, with a warning
                naming it).

        Raises:
            DatasetError: empty folder or class.
            ImageDecodeError: a sampled image cannot be decoded (the path is named), with ``on_error="stop"``.
        """
        from rar_edge.datasets import few_shot_split

        encoder = _as_encoder(encoder)
        split = few_shot_split(folder, shots=shots, seed=seed)
        mem = cls.empty(encoder=encoder, backend=backend, hnsw=hnsw, storage=storage)
        mem.add_images(
            [p for ps in split.support.values() for p in ps],
            [c for c, ps in split.support.items() for _ in ps],
            encoder=encoder,
            progress=progress,
            on_error=on_error,
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
            names: distinct class names (a list; Unicode-normalised to NFC).
            encoder: a CLIP encoder with a text tower, or its model folder.
            templates: prompt templates with one ``{}``; default: the encoder manifest's ensemble.
        """
        if isinstance(names, (str, bytes)):
            raise InvalidInputError(
                f"names must be a list of class names, not one string ({names!r:.40}); "
                f"for one class pass [{names!r:.40}]"
            )
        encoder = _as_encoder(encoder)
        names = [normalize_label(n) if isinstance(n, str) else str(n) for n in names]
        if not names:
            raise InvalidInputError("no class names given")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidInputError(f"class names must be distinct (after Unicode NFC normalisation): {dup}")
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
        on_error: str = "stop",
    ) -> np.ndarray:
        """Embeds images with ``encoder`` and adds them; returns the new entry ids.

        Args:
            images: paths, bytes, PIL images or arrays.
            labels: a class name per image.
            encoder: the encoder this memory's vectors come from.
            progress: a progress bar counting images, shown only when stderr is a terminal.
            batch_size: images per model call (default: the encoder's).
            on_error: ``"stop"`` (raise at an unreadable image) or ``"skip"`` (leave it out with a warning
                naming it; its label gets no entry from it).
        """
        from rar_edge.encoders import Encoder

        if not isinstance(encoder, Encoder):
            raise InvalidInputError(f"encoder must be an Encoder, got {type(encoder).__name__}")
        if on_error not in ("stop", "skip"):
            raise InvalidInputError(f"on_error must be 'stop' or 'skip', not {on_error!r}")
        self.check_encoder(encoder)
        if isinstance(images, (str, bytes, os.PathLike)) or isinstance(labels, (str, bytes)):
            raise InvalidInputError("images and labels must be sequences, one label per image")
        if len(images) != len(labels):
            raise InvalidInputError(f"{len(images)} images but {len(labels)} labels")
        bs = batch_size or encoder.config.batch_size
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(images), desc="embedding", unit="img", disable=None)  # None: quiet off a terminal
        ids = []
        try:
            for i in range(0, len(images), bs):
                pixels, kept = [], []
                for j in range(i, min(i + bs, len(images))):
                    try:
                        pixels.append(encoder.preprocess(encoder.decode(images[j])))
                        kept.append(j)
                    except InvalidInputError as e:  # the image's own fault: unreadable, corrupt, too large
                        if on_error == "stop":
                            raise
                        log.warning("skipped image %s: %s", _image_name(images[j]), e)
                if kept:
                    vecs = encoder.embed_pixels(np.stack(pixels))
                    ids.append(
                        self.add(vecs, [labels[j] for j in kept], sources=[_image_name(images[j], "") for j in kept])
                    )
                if bar is not None:
                    bar.update(min(bs, len(images) - i))
        finally:
            if bar is not None:
                bar.close()
        return np.concatenate(ids) if ids else np.zeros((0,), np.int64)

    # -- contents ---------------------------------------------------------------------------------
    # Each property reads one snapshot, so it describes one state even while another thread writes.
    @property
    def size(self) -> int:
        """Number of entries."""
        return self._engine.snapshot.n_live

    def __len__(self) -> int:
        return self.size

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names that have at least one entry, in the order they were first added."""
        snap = self._engine.snapshot
        return tuple(snap.names[c] for c in snap.live_codes())

    @property
    def vectors(self) -> np.ndarray:
        """The (N, dim) float32 vectors in entry order (read-only)."""
        v = self._engine.snapshot.live_rows()[0]
        v.flags.writeable = False
        return v

    @property
    def labels(self) -> tuple[str, ...]:
        """The class name of every entry, in entry order."""
        snap = self._engine.snapshot
        return tuple(snap.names[c] for c in snap.live_rows()[1].tolist())

    @property
    def ids(self) -> np.ndarray:
        """Every entry's stable id (int64), in entry order."""
        return self._engine.snapshot.live_rows()[2]

    @property
    def sources(self) -> tuple[str, ...]:
        """Every entry's provenance (image path, ``text:<name>``, or ``""``), in entry order."""
        return tuple(self._engine.snapshot.live_rows()[3])

    def counts(self) -> dict[str, int]:
        """Entries per class."""
        snap = self._engine.snapshot
        c = snap.code_counts()
        return {snap.names[i]: int(c[i]) for i in snap.live_codes()}

    @property
    def active_backend(self) -> str:
        """The back end searches use now ("exact" or "hnsw"), for k = `defaults.K`."""
        return self._backend_for(self._engine.snapshot)

    def _backend_for(self, snap: _store.Snapshot, k: int = defaults.K) -> str:
        return self._choose(snap.n_live, snap, k)

    def _choose(self, n_entries: int, snap: _store.Snapshot, k: int = defaults.K) -> str:
        """The back end for n_entries live entries whose class sizes are snap's (a write's sealing asks before
        its snapshot is published, with the entries it will have)."""
        if self.backend != "auto":
            return self.backend
        if n_entries < AUTO_HNSW_MIN_ENTRIES:
            return "exact"
        # The graph answers from its ef nearest rows, and the k-th class's best row can rank as low as the rows
        # of the k - 1 classes above it plus one: with big classes it lies beyond ef, and the class is missed
        # (measured: top-5-class recall 0.785 at 300k entries in 1k classes, docs/design-notes.md#auto-hnsw).
        largest = int(snap.code_counts().max(initial=0))  # cached per snapshot
        return "hnsw" if (max(k, 1) - 1) * largest + 1 <= self.hnsw_params.ef else "exact"

    def encoder_folder(self) -> Path:
        """The encoder folder this memory records, if it is still there.

        Raises:
            InvalidInputError: no encoder recorded, or its folder moved: the message names the encoder
                (name, fingerprint, the path it had) and says to pass it explicitly.
        """
        if self.encoder is None:
            raise InvalidInputError("the memory records no encoder: pass encoder= (--encoder)")
        p = Path(self.encoder.path)
        if not (p / "manifest.json").is_file():
            raise InvalidInputError(
                f"this memory was built by encoder {self.encoder.name!r} (fingerprint "
                f"{self.encoder.fingerprint[:12]}), which was at {self.encoder.path} and is not there any more: "
                "pass that encoder's model folder with --encoder (encoder= in Python), or use a pack "
                "(rar-edge pack) that carries it"
            )
        return p

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
        labels = check_labels(str(x) if isinstance(x, np.str_) else x for x in labels)
        if len(labels) != len(v):
            raise InvalidInputError(f"{len(v)} vectors but {len(labels)} labels")
        v = unit_rows_checked(v)
        srcs = list(sources) if sources is not None else [""] * len(v)
        if len(srcs) != len(v):
            raise InvalidInputError(f"{len(v)} vectors but {len(srcs)} sources")
        return self._engine.append(v, labels, [str(s) for s in srcs])

    def remove(self, *, ids: Iterable[int] | None = None, label: str | None = None) -> int:
        """Removes entries by id and/or every entry of a class; returns how many were removed."""
        if ids is None and label is None:
            raise InvalidInputError("remove() needs ids= or label=")
        want = None
        if ids is not None:
            if isinstance(ids, (str, bytes)):
                raise InvalidInputError("ids must be a sequence of integers")
            try:
                want = np.unique(np.fromiter((int(i) for i in ids), np.int64))
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidInputError(f"ids must be integers: {e}") from None
        with self._engine.lock:  # the class lookup and the removal see the same state
            code = None
            if label is not None:
                code = self._engine.code_of(normalize_label(str(label)))
                if code is None or self._engine.live_count(code) == 0:
                    raise InvalidInputError(f"no class {label!r} in this memory")
            return self._engine.remove(want, code)

    def add_memory(self, other: "Memory") -> np.ndarray:
        """Adds every entry of ``other`` (built by the same encoder); returns their new ids here.

        Raises:
            MemoryMismatchError: other dimension, encoder fingerprint or preprocessing.
        """
        if other.dim != self.dim:
            raise MemoryMismatchError(f"cannot merge a {other.dim}-d memory into a {self.dim}-d one")
        a, b = self.encoder, other.encoder
        if (a is None) != (b is None) or (
            a is not None
            and b is not None
            and (a.fingerprint != b.fingerprint or a.preprocess_fingerprint != b.preprocess_fingerprint)
        ):
            raise MemoryMismatchError(
                f"the memories were built by different encoders ({a.name if a else None!r} "
                f"{a.fingerprint[:12] if a else ''} vs {b.name if b else None!r} {b.fingerprint[:12] if b else ''}): "
                "their vectors cannot be compared"
            )
        v, codes, _, sources = other._engine.snapshot.live_rows()
        if not len(v):
            return np.zeros(0, np.int64)
        names = other._engine.snapshot.names
        return self.add(v, [names[c] for c in codes.tolist()], sources=sources)

    def compact(self) -> None:
        """Rewrites all entries into one segment: drops removed rows, and on the HNSW back end builds one
        graph over everything (searches meanwhile use the state before)."""
        self._engine.compact(graph=self.active_backend == "hnsw" or None)

    # -- search ---------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, *, k: int = defaults.K) -> list[list[Candidate]]:
        """The top-k distinct classes for each query vector.

        Safe from any number of threads, also while others add or remove: a search answers from the
        memory as it was before or after each write.

        Args:
            queries: (Q, dim) or (dim,) embeddings from this memory's encoder.
            k: classes per query; fewer come back when the memory has fewer classes.

        Returns:
            Per query, up to k `Candidate` (label, best cosine among the class's entries), best first.

        Raises:
            EmptyMemoryError: the memory has no entries.
            InvalidInputError: wrong shape or dtype (complex), NaN, inf, an all-zero query, or k < 1.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
        snap = self._engine.snapshot  # the one state this search reads
        if snap.n_live == 0:
            raise EmptyMemoryError("the memory is empty: add entries (memory build / Memory.add) before searching")
        raw = np.asarray(queries)
        if raw.dtype.kind not in "fiu":  # complex (its imaginary part would be dropped), strings, objects
            raise InvalidInputError(f"queries must be real numbers, not {raw.dtype}")
        q = raw.astype(np.float32, copy=False)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(f"queries must be (Q, {self.dim}), got {np.shape(queries)}")
        q, finite = _native.unit_rows(np.require(q, requirements="CA"))
        if not finite:
            raise InvalidInputError("queries contain NaN or inf")
        if q.size and not np.all(np.any(q != 0, axis=1)):
            raise InvalidInputError("a query is all zeros: it has no direction to search")
        k = min(int(k), snap.n_live_classes)  # no more classes than there are (and no (Q, k) arrays beyond)
        codes, scores = _store.search(snap, q, k, use_hnsw=self._backend_for(snap, k) == "hnsw", ef=self.hnsw_params.ef)
        names = snap.names
        return [
            [Candidate(names[c], s) for c, s in zip(crow, srow) if c > 0]
            for crow, srow in zip(codes.tolist(), scores.tolist())
        ]

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
            "backend": self.backend,
            "storage": self.storage,
            "hnsw": asdict(self.hnsw_params),
            "encoder": None
            if self.encoder is None
            else {
                "name": self.encoder.name,
                "path": self.encoder.path,
                "fingerprint": self.encoder.fingerprint,
                "embedding_dim": self.encoder.embedding_dim,
                "preprocess_fingerprint": self.encoder.preprocess_fingerprint,
            },
            "versions": {
                "rar_edge": __version__,
                "numpy": np.__version__,
                "hnswlib": hv,
                "python": platform.python_version(),
            },
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, path: str | os.PathLike, *, layout: str | None = None) -> Path:
        """Saves the memory atomically: a crash or error at any point leaves the previous save intact.

        Args:
            path: ``*.rarmem`` for one file (rewritten whole: for export and transport), or a directory
                store (``*.rarmemd``, or an existing store): a save there writes only what changed since
                the store's last save (new entries; a small file per segment that lost entries), then
                swaps its manifest.
            layout: ``"file"`` or ``"dir"`` to choose explicitly.

        Returns:
            ``path``.
        """
        path = Path(path)
        if layout is None:
            layout = "dir" if path.suffix == _files.STORE_SUFFIX or _files.is_store(path) else "file"
        if layout not in ("file", "dir"):
            raise InvalidInputError(f"layout must be 'file' or 'dir', not {layout!r}")
        if layout == "dir":
            from rar_edge.index._dirstore import save_store

            save_store(self, path)
        else:
            self._save_file(path)
        self.path = path
        return path

    def _save_file(self, path: Path) -> None:
        snap = self._engine.snapshot
        live = snap.live_codes()
        remap = np.zeros(snap.n_codes, np.int32)
        remap[live] = np.arange(len(live), dtype=np.int32)
        vec_parts, lab_parts, id_parts, srcs = [], [], [], []
        q8_parts, sc_parts = [], []
        int8 = self.storage in ("int8", "int8_rerank")
        for seg in snap.segments:
            keep = None if seg.n_dead == 0 else seg.labels > 0
            vec_parts.append((seg.vectors, keep))
            lab_parts.append((remap[seg.labels], keep))
            id_parts.append((seg.ids, keep))
            srcs.extend(seg.sources if keep is None else (s for s, k in zip(seg.sources, keep) if k))
            if int8:
                q8, sc = (
                    (seg.store._v, seg.store._scales) if seg.store._scales is not None else quantize_int8(seg.vectors)
                )
                q8_parts.append((q8, keep)), sc_parts.append((sc, keep))
        t = snap.tail
        if t.n:
            v, lab, ids, src = t.rows()
            keep = None if t.n_dead == 0 else lab > 0
            vec_parts.append((v, keep)), lab_parts.append((remap[lab], keep)), id_parts.append((ids, keep))
            srcs.extend(src if keep is None else (s for s, k in zip(src, keep) if k))
            if int8:
                q8, sc = quantize_int8(v)
                q8_parts.append((q8, keep)), sc_parts.append((sc, keep))
        n = snap.n_live
        arrays = {
            "vectors.npy": (np.float32, (self.dim,), n, vec_parts),
            "labels.npy": (np.int32, (), n, lab_parts),
            "ids.npy": (np.int64, (), n, id_parts),
        }
        if int8 and n:
            arrays["q8.npy"] = (np.int8, (self.dim,), n, q8_parts)
            arrays["q8_scales.npy"] = (np.float32, (), n, sc_parts)
        blobs = {}
        if self._backend_for(snap) == "hnsw" and n:
            blobs["hnsw.bin"] = self._graph_bytes(snap)
        meta = {**self._meta(), "n_entries": n, "classes": [snap.names[c] for c in live], "next_id": snap.next_id}
        _files.write_file(path, meta, arrays, srcs, blobs)

    def _graph_bytes(self, snap: "_store.Snapshot") -> bytes:
        """One graph over all live rows in entry order: the single segment's own when it has one and no
        removed rows, else a new one built from the rows (this save's private copy)."""
        segs = snap.segments
        if len(segs) == 1 and snap.tail.n == 0 and segs[0].n_dead == 0 and segs[0].hnsw is not None:
            index = segs[0].hnsw
        else:
            p = self.hnsw_params
            index = _store.build_graph(snap.live_rows()[0], M=p.M, ef_construction=p.ef_construction, ef=p.ef)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "hnsw.bin")
            index.save_index(f)  # type: ignore[attr-defined]
            with open(f, "rb") as fh:
                return fh.read()

    @classmethod
    def load(cls, path: str | os.PathLike, *, encoder: "Encoder | None" = None, mmap: bool = False) -> "Memory":
        """Opens a saved memory (a ``.rarmem`` file or a directory store), verifying format, every
        checksum and the shapes, and removing temporary files a killed save left beside it.

        Args:
            path: a file or store written by `save`.
            encoder: if given, refuse the memory unless this encoder built it.
            mmap: map the vectors (float32 and the int8 copy) from the file instead of reading them into
                RAM: the kernel pages in what searches read. The file must stay in place while the memory
                is open; replacing it by a save (a rename) is fine.

        Raises:
            CorruptFileError: not a memory, damaged, or checksums do not match.
            MemoryMismatchError: ``encoder`` is not the one that built the memory.
        """
        path = Path(path)
        if path.is_dir():
            from rar_edge.index._dirstore import load_store

            mem = load_store(cls, path, mmap=mmap)
        elif path.is_file():
            mem = cls._load_file(path, mmap=mmap)
        else:
            raise CorruptFileError(f"no memory file at {path}")
        mem.path = path
        if encoder is not None:
            mem.check_encoder(encoder)
        return mem

    @classmethod
    def _from_meta(cls, meta: dict, where: Path) -> "Memory":
        """An empty memory with the settings a file's metadata records (checked)."""
        if meta.get("format") != FORMAT:
            raise CorruptFileError(f"{where} is not a rar_edge memory file")
        fv = meta.get("format_version")
        if not isinstance(fv, int) or isinstance(fv, bool) or fv > FORMAT_VERSION:
            raise CorruptFileError(f"{where} was written by a newer rar_edge (format {fv!r})")
        enc = meta.get("encoder")
        rec = (
            None
            if enc is None
            else EncoderRecord(
                str(enc["name"]),
                str(enc["path"]),
                str(enc["fingerprint"]),
                int(enc["embedding_dim"]),
                enc.get("preprocess_fingerprint"),
            )
        )
        hp = meta.get("hnsw") or {}
        if (
            not isinstance(hp, dict)
            or set(hp) - {"M", "ef_construction", "ef"}
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in hp.values())
        ):
            raise CorruptFileError(f"{where}: bad HNSW settings {hp!r}")
        storage = meta.get("storage", DEFAULT_STORAGE)
        backend = meta.get("backend", "auto")
        dim = meta["dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 1 << 20:
            raise CorruptFileError(f"{where}: bad dim {dim!r}")
        return cls(
            dim=dim,
            encoder=rec,
            backend=backend if backend in BACKENDS else "auto",
            hnsw=HnswParams(**hp),
            storage=storage if storage in STORAGES else DEFAULT_STORAGE,
        )

    @classmethod
    def _load_file(cls, path: Path, *, mmap: bool) -> "Memory":
        _clean_stale(path)
        box: dict = {}

        def shapes(meta: dict) -> dict:
            mem = box["mem"] = cls._from_meta(meta, path)
            n = meta["n_entries"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise CorruptFileError(f"{path}: bad n_entries {n!r}")
            want = {
                "vectors.npy": (np.float32, (n, mem.dim)),
                "labels.npy": (np.int32, (n,)),
                "ids.npy": (np.int64, (n,)),
            }
            if "q8.npy" in meta["checksums"]:
                want.update({"q8.npy": (np.int8, (n, mem.dim)), "q8_scales.npy": (np.float32, (n,))})
            return want

        try:
            meta, arrays, blobs = _files.read_file(path, shapes=shapes, mmap=mmap)
            mem: Memory = box["mem"]
            classes = meta["classes"]
            if (
                not isinstance(classes, list)
                or not all(isinstance(c, str) for c in classes)
                or len(set(classes)) != len(classes)
            ):
                raise CorruptFileError(f"{path}: bad class list")
            n = int(meta["n_entries"])
            sources = json.loads(blobs["sources.json"])
            labels, ids = arrays["labels.npy"], arrays["ids.npy"]
            if (
                not isinstance(sources, list)
                or len(sources) != n
                or (n and (labels.min() < 0 or labels.max() >= len(classes)))
            ):
                raise CorruptFileError(f"{path}: arrays disagree with the metadata")
            next_id = _check_ids(ids, meta.get("next_id"), path)
            mem._engine.set_names(classes)
            graph = None
            if "hnsw.bin" in blobs:
                graph = mem._read_graph(blobs["hnsw.bin"], arrays["vectors.npy"])
            if n:
                seg = _store.make_segment(
                    arrays["vectors.npy"],
                    labels + 1,
                    ids,
                    [str(x) for x in sources],
                    storage=mem.storage,
                    q8=arrays.get("q8.npy"),
                    scales=arrays.get("q8_scales.npy"),
                    hnsw=graph,
                )
                mem._engine.load([seg], next_id)
            else:
                mem._engine.load([], next_id)
        except (CorruptFileError, MissingDependencyError):
            raise
        except Exception as e:  # noqa: BLE001 - a damaged zip raises anything from zipfile, json, numpy
            raise CorruptFileError(f"{path} is not a readable rar_edge memory file: {type(e).__name__}: {e}") from e
        return mem

    def _read_graph(self, blob: bytes, vectors: np.ndarray) -> object | None:
        """A saved HNSW graph if it fits the vectors; None (rebuilt when needed, with a warning) otherwise."""
        import hnswlib

        n = len(vectors)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "hnsw.bin")
            with open(p, "wb") as f:
                f.write(blob)
            index = hnswlib.Index(space="ip", dim=self.dim)
            try:
                index.load_index(p, max_elements=max(n, 1))
                # the right entries of the right width: count, and entry 0's vector read back
                ok = index.get_current_count() == n and (
                    n == 0
                    or np.allclose(np.asarray(index.get_items([0]), np.float32).reshape(-1), vectors[0], atol=1e-6)
                )
            except RuntimeError as e:  # e.g. an index another hnswlib version wrote
                ok, why = False, str(e)
            else:
                why = f"it holds {index.get_current_count()} entries (memory: {n}) or other vectors"
        if not ok:
            # the vectors are the source of truth: searches scan them exactly until the graph is rebuilt
            log.warning(
                "the memory's HNSW index cannot be used (%s); it will be rebuilt from the vectors "
                "(Memory.compact, or the next save)",
                why,
            )
            return None
        index.set_ef(self.hnsw_params.ef)
        return index

    def info(self) -> dict:
        """A JSON-ready summary: sizes, classes, back end, encoder, file, segments."""
        snap = self._engine.snapshot
        counts = self.counts()
        return {
            "path": None if self.path is None else str(self.path),
            "n_entries": snap.n_live,
            "n_classes": len(counts),
            "dim": self.dim,
            "metric": "cosine",
            "backend": self.backend,
            "active_backend": self._backend_for(snap),
            "storage": self.storage,
            "hnsw": asdict(self.hnsw_params),
            "segments": len(snap.segments) + (1 if snap.tail.n else 0),
            "encoder": None
            if self.encoder is None
            else {"name": self.encoder.name, "path": self.encoder.path, "fingerprint": self.encoder.fingerprint},
            "entries_per_class": counts,
        }

    def __repr__(self) -> str:
        return (
            f"Memory(n_entries={self.size}, n_classes={len(self.classes)}, dim={self.dim}, "
            f"backend={self.active_backend!r})"
        )


def is_memory(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a saved memory (a ``.rarmem`` file or a directory store), by its metadata."""
    p = Path(path)
    try:
        if p.is_dir():
            return _files.read_manifest(p).get("format") == _files.STORE_FORMAT
        with zipfile.ZipFile(p) as z:
            if z.getinfo("meta.json").file_size > 1 << 30:
                return False
            meta = json.loads(z.read("meta.json"))
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not a memory
        return False


def _check_ids(ids: np.ndarray, next_id: object, where: Path) -> int:
    """The next id a file records, checked: an int above every id, below `_store.MAX_ID`; ids unique."""
    top = int(ids.max()) + 1 if len(ids) else 0
    if len(ids) and (ids.min() < 0 or top > _store.MAX_ID):
        raise CorruptFileError(f"{where}: entry ids outside [0, {_store.MAX_ID})")
    if next_id is None:  # files written before it was recorded
        next_id = top
    if not isinstance(next_id, int) or isinstance(next_id, bool) or not top <= next_id <= _store.MAX_ID:
        raise CorruptFileError(
            f"{where}: next_id {next_id!r} is not an integer in [{top}, {_store.MAX_ID}] "
            "(it must exceed every entry id)"
        )
    if len(ids) and len(np.unique(ids)) != len(ids):
        raise CorruptFileError(f"{where}: duplicate entry ids")
    return next_id


def _clean_stale(path: Path) -> None:
    """Removes temporaries a killed save of ``path`` left, unless a save is running now (it holds the lock)."""
    with _files.folder_lock(path.parent, wait=False) as got:
        if got:
            from rar_edge._fs import remove_stale_temps

            removed = remove_stale_temps(path)
            if removed:
                log.info("removed %d temporary file(s) a killed save left beside %s", len(removed), path)


def _image_name(image: object, other: str | None = None) -> str:
    """A path as given; for other inputs ``other``, or their type name."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return type(image).__name__ if other is None else other


def _as_encoder(encoder: object) -> "Encoder":
    """An `Encoder`, opened from a model folder path where one is given."""
    from rar_edge.encoders import Encoder

    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, (str, os.PathLike)):
        return Encoder(encoder)
    raise InvalidInputError(
        f"encoder must be an Encoder or a model folder (rar-edge export), got {type(encoder).__name__} {encoder!r:.60}"
    )


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return None
