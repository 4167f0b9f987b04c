"""Memory building on Ray Data: the same memory as a local build, embedded by a pool of actors.

The driver plans the entries exactly as the local builders do (`rar_edge.datasets.few_shot_split`,
`rar_edge.index.build.select_box_exemplars`, a class-name list) and hands Ray Data a dataset of paths
(or boxes, or names), in entry order. A pool of actors (`Dataset.map_batches` with a callable class) each
opens the encoder once (one ONNX Runtime session per actor), decodes and preprocesses with the SDK's own
code and embeds; results stream back in order (``preserve_order``) and are added to one `Memory` in
chunks, so images never gather in the driver: it holds the paths, the labels and the vectors.

Ray is imported lazily (the ``ray`` extra); the runtime never imports this module. Without an address a
local Ray is started in this process and stopped afterwards; with one (``auto``, ``HOST:6379``,
``ray://HOST:10001``) the job joins that cluster, whose nodes need ``rar-edge`` installed. A model folder
(and, for `rar_edge.tools.batch`, a memory file) absent on a node's disk reaches it through Ray's object
store (see `RayOptions.ship_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from rar_edge.errors import (
    DatasetError,
    ImageDecodeError,
    InvalidInputError,
    MemoryMismatchError,
    MissingDependencyError,
)

if TYPE_CHECKING:
    from rar_edge.encoders import Encoder, EncoderConfig
    from rar_edge.index.memory import HnswParams, Memory

log = logging.getLogger("rar_edge")

#: Rows added to the memory at a time while results stream in (`Memory.add` normalises a chunk in float64:
#: 32 MB at 1024 dims).
ADD_CHUNK_ROWS = 4096
#: Most input rows per Ray block: small enough that every actor gets work early, large enough to keep
#: the number of blocks (each an object in Ray's store) low for millions of photos.
MAX_BLOCK_ROWS = 1024


def import_ray() -> Any:
    """The ``ray`` module with Ray Data loaded.

    Raises:
        MissingDependencyError: ray is not installed (it names the ``ray`` extra).
    """
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate import)
    except ImportError as e:
        raise MissingDependencyError("ray", "ray", "the Ray engine (--engine ray)") from e
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How a job runs on Ray.

    Attributes:
        address: the cluster to join (``auto``, ``HOST:6379``, ``ray://HOST:10001``); None starts a local
            Ray in this process and stops it when the job ends (a Ray this process already started is used
            as it is and left running).
        concurrency: actors in the pool; each holds one encoder (one ONNX Runtime session).
        batch_size: rows per actor call.
        num_cpus_per_actor: CPUs Ray reserves for each actor; also the actor's ONNX Runtime threads when the
            encoder config leaves them unset, so that actors sharing a node do not oversubscribe it.
        num_gpus_per_actor: GPUs reserved per actor; None: 1 when the encoder's provider is cuda or
            tensorrt, else 0.
        local_num_cpus: CPUs of a local Ray started here (None: every core).
        ship_files: send the model folder (and a memory file) through Ray's object store to actors on
            nodes that lack it; None: when joining a cluster (``address`` given).
    """

    address: str | None = None
    concurrency: int = 1
    batch_size: int = 64
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float | None = None
    local_num_cpus: int | None = None
    ship_files: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise InvalidInputError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.num_cpus_per_actor > 0:
            raise InvalidInputError("num_cpus_per_actor must be > 0")
        if self.num_gpus_per_actor is not None and not self.num_gpus_per_actor >= 0:
            raise InvalidInputError("num_gpus_per_actor must be >= 0 or None")
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise InvalidInputError("local_num_cpus must be >= 1 or None")

    def gpus_for(self, provider: str) -> float:
        """GPUs each actor reserves for an encoder on ``provider``."""
        if self.num_gpus_per_actor is not None:
            return float(self.num_gpus_per_actor)
        return 1.0 if provider in ("cuda", "tensorrt") else 0.0

    @property
    def ships(self) -> bool:
        """Whether model folders and memory files travel through the object store."""
        return self.address is not None if self.ship_files is None else self.ship_files


@contextlib.contextmanager
def ray_session(options: RayOptions, *, progress: bool = False) -> Iterator[Any]:
    """Ray, connected for the duration of the block: joins ``options.address`` or starts a local Ray.

    A Ray this process had already initialised is used as it is and not shut down afterwards. Ray Data
    returns results in input order inside the block (the memory's entry order depends on it).

    Yields:
        The ``ray`` module.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if options.address is None:
            ray.init(
                num_cpus=options.local_num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        else:
            ray.init(address=options.address, logging_level=logging.WARNING)
        started = True
    with warnings.catch_warnings():
        # Ray Data 2.60 warns about its own default settings (deprecated fields) when it makes its context.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        ctx = ray.data.DataContext.get_current()
    data_log = logging.getLogger("ray.data")
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, data_log.level)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    if not progress:  # Ray Data's per-job INFO lines are progress reports too
        data_log.setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved[:2]
        data_log.setLevel(saved[2])
        if started:
            ray.shutdown()


# -- files that travel to the actors -------------------------------------------------------------------
def folder_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every regular file under ``folder`` (relative POSIX path -> bytes): a model folder to ship."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def materialise(path: str, shipped: list | None, *, marker: str | None) -> str:
    """The local path of a shipped folder or file, on the node an actor runs on.

    Args:
        path: where it lives on the driver; used as it is when it exists here (``marker`` inside a folder).
        shipped: ``[ObjectRef]`` of `folder_files` output (a folder) or of bytes (a file), or None.
        marker: for a folder, a file that must be in it (``manifest.json``); None for a file.

    Returns:
        ``path``, or a copy under the node's temporary folder named by the content's sha256 (written once
        per node and content, renamed into place complete, shared by the node's actors).
    """
    here = Path(path) / marker if marker else Path(path)
    if here.is_file():
        return path
    if not shipped:
        raise InvalidInputError(
            f"{here} does not exist on this node: put it on every node (a shared disk), or "
            "let it travel through Ray's object store (ship_files / --ray-ship-files)"
        )
    ray = import_ray()
    data = ray.get(shipped[0])
    files = data if isinstance(data, dict) else {Path(path).name: data}
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    root = Path(tempfile.gettempdir()) / "rar_edge-shipped"
    final = root / digest.hexdigest()[:32]
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
        for rel, blob in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(blob)
        try:
            os.rename(tmp, final)
        except OSError:  # another actor on this node renamed the same content into place first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final if isinstance(data, dict) else final / Path(path).name)


def _ship(ray: Any, options: RayOptions, make: Any) -> list | None:
    # Wrapped in a list: Ray resolves object refs passed directly as arguments, not ones inside a list.
    return [ray.put(make())] if options.ships else None


def actor_resources(options: RayOptions, provider: str) -> dict[str, Any]:
    """map_batches' pool and resource arguments for actors that run an encoder on ``provider``."""
    ray = import_ray()
    res: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(size=options.concurrency),
        "num_cpus": options.num_cpus_per_actor,
    }
    gpus = options.gpus_for(provider)
    if gpus:
        res["num_gpus"] = gpus
    return res


def actor_encoder_config(config: "EncoderConfig", options: RayOptions) -> "EncoderConfig":
    """The encoder config an actor uses: its ONNX Runtime threads bounded by the CPUs Ray reserved for it."""
    import dataclasses

    if config.threads is not None:
        return config
    return dataclasses.replace(config, threads=max(1, int(options.num_cpus_per_actor)))


def blocks(ray: Any, table: Any, options: RayOptions) -> Any:
    """A Ray dataset of ``table``'s rows in order, cut into blocks so every actor of the pool gets work."""
    n = table.num_rows
    per = max(1, min(MAX_BLOCK_ROWS, math.ceil(n / (4 * options.concurrency))))
    per = max(per, min(options.batch_size, MAX_BLOCK_ROWS))
    return ray.data.from_arrow([table.slice(i, per) for i in range(0, n, per)] or [table])


# -- the actors ----------------------------------------------------------------------------------------
class _EncoderActor:
    """Base of the embedding actors: opens the encoder once per actor and checks it is the driver's."""

    def __init__(self, *, model_dir: str, shipped: list | None, fingerprint: str, config: "EncoderConfig") -> None:
        from rar_edge.encoders import Encoder

        self.encoder = Encoder(materialise(model_dir, shipped, marker="manifest.json"), config=config)
        if self.encoder.fingerprint != fingerprint:
            raise MemoryMismatchError(
                f"the encoder at {model_dir} on this node (fingerprint {self.encoder.fingerprint[:12]}) is not the "
                f"driver's ({fingerprint[:12]}): give every node the same model files"
            )


class ImageEmbedder(_EncoderActor):
    """Rows ``key``, ``path`` -> ``key``, ``vector``, ``error`` ("" when fine); decoded as the local build does."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.encoder
        keys = np.asarray(batch["key"], np.int64)
        vectors = np.zeros((len(keys), enc.dim), np.float32)
        errors = [""] * len(keys)
        good, pixels = [], []
        for i, path in enumerate(batch["path"]):
            try:
                pixels.append(enc.preprocess(enc.decode(str(path))))
                good.append(i)
            except InvalidInputError as e:  # the image's own fault (unreadable, corrupt, too large), as locally
                errors[i] = str(e)
        if pixels:
            vectors[good] = enc.embed_pixels(np.stack(pixels))
        return {"key": keys, "vector": vectors, "error": np.asarray(errors, dtype=object)}


class BoxEmbedder(_EncoderActor):
    """Rows ``key``, ``path``, ``boxes`` (flat x1,y1,x2,y2), ``box_index``, ``label`` -> one row per kept crop
    (``key``, ``vector``, ``label``, ``source``), or one ``error`` row for an image that cannot be read."""

    def __init__(self, *, crop: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.crop = crop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rar_edge.index.build import exemplar_crops

        keys, crops, labels, sources, errors = [], [], [], [], []
        for key, path, flat, idx, lbl in zip(
            batch["key"], batch["path"], batch["boxes"], batch["box_index"], batch["label"]
        ):
            picks = [(int(j), str(name)) for j, name in zip(idx, lbl)]
            boxes = np.asarray(flat, np.float64).reshape(-1, 4)
            try:
                c, lab, src = exemplar_crops(str(path), boxes, picks, self.crop)
            except InvalidInputError as e:
                keys.append(int(key))
                crops.append(np.zeros((1, self.crop.out_size_px, self.crop.out_size_px, 3), np.uint8))
                labels.append("")
                sources.append(str(path))
                errors.append(str(e))
                continue
            keys.extend([int(key)] * len(c))
            crops.append(c)
            labels.extend(lab)
            sources.extend(src)
            errors.extend([""] * len(c))
        dim = self.encoder.dim
        stacked = np.concatenate(crops) if crops else np.zeros((0, 1, 1, 3), np.uint8)
        ok = np.asarray([not e for e in errors], bool)
        vectors = np.zeros((len(keys), dim), np.float32)
        if ok.any():
            vectors[ok] = self.encoder.embed_pixels(np.ascontiguousarray(stacked[ok]))
        return {
            "key": np.asarray(keys, np.int64),
            "vector": vectors,
            "label": np.asarray(labels, dtype=object),
            "source": np.asarray(sources, dtype=object),
            "error": np.asarray(errors, dtype=object),
        }


class TextEmbedder(_EncoderActor):
    """Rows ``key``, ``name`` -> ``key``, ``vector``: zero-shot class vectors (the template ensemble)."""

    def __init__(self, *, templates: Sequence[str] | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.templates = templates

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [str(n) for n in batch["name"]]
        vecs = self.encoder.embed_class_names(names, templates=self.templates)
        return {
            "key": np.asarray(batch["key"], np.int64),
            "vector": vecs.astype(np.float32),
            "error": np.asarray([""] * len(names), dtype=object),
        }


# -- the driver ----------------------------------------------------------------------------------------
class _InOrderAdder:
    """Adds streamed result batches to a memory in entry order, a chunk at a time.

    A row with an error (an image that cannot be read) stops the build (``on_error="stop"``) or is left out
    with a warning naming it (``"skip"``), as `Memory.add_images` does; rows out of order stop it too.
    """

    def __init__(
        self,
        mem: "Memory",
        *,
        labels: Sequence[str] | None,
        sources: Sequence[str] | None,
        paths: Sequence[str],
        what: str,
        on_error: str = "stop",
    ) -> None:
        self.mem, self.labels, self.sources, self.paths, self.what = mem, labels, sources, paths, what
        self.on_error = on_error
        self.last = -1
        self.rows = 0
        self.skipped: list[str] = []
        self._v: list[np.ndarray] = []
        self._l: list[str] = []
        self._s: list[str] = []
        self._n = 0

    def take(self, batch: dict[str, np.ndarray]) -> None:
        keys = np.asarray(batch["key"], np.int64)
        if not len(keys):
            return
        if keys[0] < self.last or np.any(np.diff(keys) < 0):
            raise RuntimeError(
                f"Ray Data returned {self.what} out of order (key {int(keys[0])} after "
                f"{self.last}); the memory would not match a local build"
            )
        self.last = int(keys[-1])
        self.rows += len(keys)
        ok = np.asarray([not e for e in batch["error"]], bool)
        for k, err in zip(keys[~ok], np.asarray(batch["error"])[~ok]):
            if self.on_error == "stop":
                raise ImageDecodeError(str(err))  # the decoder's message names the file
            log.warning("skipped image %s: %s", self.paths[int(k)], err)
            self.skipped.append(self.paths[int(k)])
        if not ok.all():
            keys = keys[ok]
            batch = {name: np.asarray(col)[ok] for name, col in batch.items()}
            if not len(keys):
                return
        self._v.append(np.asarray(batch["vector"], np.float32))
        if self.labels is not None:
            self._l.extend(self.labels[int(k)] for k in keys)
            self._s.extend(self.sources[int(k)] for k in keys)  # type: ignore[index]
        else:
            self._l.extend(str(x) for x in batch["label"])
            self._s.extend(str(x) for x in batch["source"])
        self._n += len(keys)
        if self._n >= ADD_CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._n:
            self.mem.add(np.concatenate(self._v), self._l, sources=self._s)
        self._v, self._l, self._s, self._n = [], [], [], 0


def build_memory(
    folder: str | os.PathLike | None = None,
    *,
    encoder: "Encoder",
    classes: Sequence[str] | None = None,
    boxes: str | os.PathLike | None = None,
    shots: int | None = None,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    crop_scale: float | str | None = None,
    blur_sigma_px: float | None = None,
    backend: str = "auto",
    hnsw: "HnswParams | None" = None,
    on_error: str = "stop",
    options: RayOptions | None = None,
    progress: bool = False,
) -> "Memory":
    """Builds a memory on Ray: the same entries, labels, sources and ids as the local builders.

    Exactly one source: ``folder`` (few-shot images as `Memory.from_folder`), ``classes`` (zero-shot names
    as `Memory.from_class_names`) or ``boxes`` (few-shot box crops of a YOLO folder or COCO json as
    `rar_edge.index.build.memory_from_boxes`).

    Args:
        folder: one sub-folder of images per class.
        encoder: the encoder (the driver's; each actor opens the same model folder with its config).
        classes: class names for a zero-shot memory.
        boxes: a detection dataset whose labelled boxes become exemplars.
        shots, seed: the seeded few-shot sample (images or boxes per class; None: all).
        templates: zero-shot prompt templates (default: the manifest's).
        crop_scale, blur_sigma_px: box crop settings (default: the SDK's).
        backend, hnsw: the memory's search back end.
        on_error: for ``folder``: ``"stop"`` (raise at an unreadable image) or ``"skip"`` (leave it out with a
            warning naming it), as `Memory.from_folder`; box builds always stop, as `memory_from_boxes`.
        options: the Ray job's settings.
        progress: show Ray Data's progress bars.

    Raises:
        ImageDecodeError: an image cannot be decoded (the path is named) and it is not skipped.
        MissingDependencyError: ray is not installed.
    """
    from rar_edge.index.memory import Memory

    given = [x for x in (folder, classes, boxes) if x is not None]
    if len(given) != 1:
        raise InvalidInputError("give exactly one of folder (few-shot images), classes (zero-shot) or boxes (crops)")
    if on_error not in ("stop", "skip"):
        raise InvalidInputError(f"on_error must be 'stop' or 'skip', not {on_error!r}")
    options = options or RayOptions()
    import pyarrow as pa

    mem = Memory.empty(encoder=encoder, backend=backend, hnsw=hnsw)
    cfg = actor_encoder_config(encoder.config, options)
    with ray_session(options, progress=progress) as ray:
        common = {
            "model_dir": str(encoder.path),
            "fingerprint": encoder.fingerprint,
            "config": cfg,
            "shipped": _ship(ray, options, lambda: folder_files(encoder.path)),
        }
        if folder is not None:
            from rar_edge.datasets import few_shot_split

            split = few_shot_split(folder, shots=shots, seed=seed)
            paths = [str(p) for ps in split.support.values() for p in ps]
            labels = [c for c, ps in split.support.items() for _ in ps]
            table = pa.table({"key": np.arange(len(paths), dtype=np.int64), "path": paths})
            actor, kwargs, what = ImageEmbedder, common, "images"
            adder = _InOrderAdder(mem, labels=labels, sources=paths, paths=paths, what=what, on_error=on_error)
        elif classes is not None:
            names = [str(n) for n in classes]
            if not names:
                raise InvalidInputError("no class names given")
            if len(set(names)) != len(names):
                raise InvalidInputError("class names must be distinct")
            table = pa.table({"key": np.arange(len(names), dtype=np.int64), "name": names})
            actor, kwargs, what = TextEmbedder, {**common, "templates": templates}, "class names"
            adder = _InOrderAdder(mem, labels=names, sources=[f"text:{n}" for n in names], paths=names, what=what)
        else:
            from rar_edge.datasets import read_detection_dataset, warn_invalid_boxes
            from rar_edge.index.build import crop_config, select_box_exemplars

            _, images = read_detection_dataset(boxes)  # type: ignore[arg-type]
            warn_invalid_boxes(images, str(boxes))  # as memory_from_boxes: the driver says it once
            chosen = select_box_exemplars(images, str(boxes), shots=shots, seed=seed, image_indices=None)
            paths = [str(images[i].path) for i, _ in chosen]
            table = pa.table(
                {
                    "key": np.arange(len(chosen), dtype=np.int64),
                    "path": paths,
                    "boxes": [images[i].boxes[[j for j, _ in picks]].ravel().tolist() for i, picks in chosen],
                    "box_index": [[j for j, _ in picks] for _, picks in chosen],
                    "label": [[lbl for _, lbl in picks] for _, picks in chosen],
                }
            )
            crop = crop_config(encoder, crop_scale, blur_sigma_px)
            actor, kwargs, what = BoxEmbedder, {**common, "crop": crop}, "box crops"
            adder = _InOrderAdder(mem, labels=None, sources=None, paths=paths, what=what)
        if table.num_rows == 0:
            raise DatasetError("nothing to embed")
        ds = blocks(ray, table, options).map_batches(
            actor,
            fn_constructor_kwargs=kwargs,
            batch_size=options.batch_size,
            batch_format="numpy",
            **actor_resources(options, encoder.config.provider),
        )
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            adder.take(batch)
        adder.flush()
    if boxes is None and adder.rows != table.num_rows:  # every planned row answered, entry or error
        raise RuntimeError(f"Ray Data returned {adder.rows} of {table.num_rows} {what}")
    log.info("built a %d-entry memory on Ray (%d actors)", mem.size, options.concurrency)
    return mem
