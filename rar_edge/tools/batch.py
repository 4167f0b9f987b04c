"""Batch labelling: one Parquet row per image of a folder or a list of paths/URIs, on this machine or on Ray.

Each row holds the image's path, the top-k retrieved classes and their scores, the answer (the ranker's
first choice when a ranker ran, else retrieval's) and an error: an image that cannot be read or decoded is
a row with its error, not a failed job. Paths and URIs go through pyarrow's filesystems, so ``s3://`` and
``gs://`` sources and outputs work wherever pyarrow has the credentials (on a cluster, on every node).

Locally (``engine="local"``) the rows are written to one Parquet file, replaced atomically; on Ray
(``engine="ray"``) an actor pool, each actor holding one `Pipeline`, writes a folder of Parquet shards
through Ray Data. Both read back with ``pyarrow.parquet.read_table(OUT)``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from rar_edge import defaults
from rar_edge.datasets import IMAGE_SUFFIXES
from rar_edge.errors import DatasetError, InvalidInputError, MissingDependencyError, RarEdgeError

if TYPE_CHECKING:
    from rar_edge.encoders import EncoderConfig
    from rar_edge.pipeline import Pipeline
    from rar_edge.tools.distributed import RayOptions

log = logging.getLogger("rar_edge")

ENGINES = ("local", "ray")
#: Rows per Parquet row group written by the local engine (and per shard flush).
ROW_GROUP_ROWS = 4096


def _pa() -> tuple[Any, Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError("pyarrow", "ray", "classify-batch (Parquet output)") from e
    return pa, pafs, pq


def schema() -> Any:
    """The Parquet schema of a batch-labelling result (the same for both engines)."""
    pa, _, _ = _pa()
    return pa.schema(
        [
            ("path", pa.string()),
            ("labels", pa.list_(pa.string())),  # retrieved classes, best first
            ("scores", pa.list_(pa.float32())),  # their retrieval scores (best cosine per class)
            ("label", pa.string()),  # the answer: the ranker's first choice, else retrieval's
            ("score", pa.float32()),
            ("ranker_ran", pa.bool_()),
            ("ranked", pa.list_(pa.string())),  # the final order (the ranker's when it ran)
            ("error", pa.string()),  # null when the image was classified
        ]
    )


# -- paths and URIs ------------------------------------------------------------------------------------
def _is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=16)
def _filesystem_of(prefix: str) -> Any:
    _, pafs, _ = _pa()
    return pafs.FileSystem.from_uri(prefix + "/")[0]


def filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, file://)."""
    _, pafs, _ = _pa()
    if not _is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, rest = path.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    bucket = rest.split("/", 1)[0]
    return _filesystem_of(f"{scheme}://{bucket}"), pafs.FileSystem.from_uri(path)[1]


def read_uri(uri: str) -> bytes:
    """The bytes of a file named by a URI or a local path, through pyarrow's filesystems."""
    fs, p = filesystem(uri)
    with fs.open_input_file(p) as f:
        return f.readall()


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_SUFFIXES


def list_images(src: str | os.PathLike) -> list[str]:
    """The images a batch job labels, in a stable order.

    Args:
        src: a folder (every image under it, recursively, sorted), a file listing one path or URI a line
            (blank lines and # comments skipped; relative paths are relative to the current folder), or one
            image. Local paths or URIs.

    Raises:
        DatasetError: ``src`` does not exist, or names no image.
    """
    _, pafs, _ = _pa()
    src = os.fspath(src)
    fs, p = filesystem(src)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        sel = pafs.FileSelector(p, recursive=True)
        found = sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File and _is_image_name(i.path))
        if _is_uri(src):
            scheme = src.split("://", 1)[0]
            out = [f"{scheme}://{x}" for x in found]
        else:
            base = src.rstrip("/\\") or "/"
            out = [os.path.join(base, os.path.relpath(x, p)) for x in found]
    elif info.type == pafs.FileType.File:
        if _is_image_name(p):
            out = [src]
        else:
            text = read_uri(src).decode("utf-8-sig")
            out = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    else:
        raise DatasetError(f"no such folder or file: {src}")
    if not out:
        raise DatasetError(f"{src} names no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


# -- classification ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchConfig:
    """What each image goes through.

    Attributes:
        k: classes retrieved (and ranked) per image.
        encoder: ONNX Runtime settings of the encoder.
        ranker_mode: "score" or "generate" (with a ranker).
        gate_margin: skip the ranker where retrieval's margin is at least this (see `PipelineConfig`).
        n_gpu_layers: ranker layers offloaded to a GPU by a CUDA build of llama.cpp.
    """

    k: int = defaults.K
    encoder: "EncoderConfig | None" = None
    ranker_mode: str = "score"
    gate_margin: float | None = None
    n_gpu_layers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidInputError(f"k must be an integer >= 1, got {self.k!r}")


def open_pipeline(memory: str, *, encoder: str | None, ranker: str | None, config: BatchConfig) -> "Pipeline":
    """A `Pipeline` over a memory file (and a ranker path): what each worker of a batch job holds."""
    from rar_edge.encoders import EncoderConfig
    from rar_edge.pipeline import Pipeline, PipelineConfig

    rk = None
    if ranker:
        from rar_edge.rank.ranker import Ranker

        rk = Ranker.load(ranker, mode=config.ranker_mode, n_gpu_layers=config.n_gpu_layers)
    cfg = PipelineConfig(k=config.k, encoder=config.encoder or EncoderConfig(), gate_margin=config.gate_margin)
    return Pipeline(memory=memory, encoder=encoder, ranker=rk, config=cfg)


def classify_rows(pipe: "Pipeline", paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One result row per path (see `schema`); an image that cannot be read or classified gets its error."""
    for path in paths:
        path = str(path)
        try:
            r = pipe.classify(read_uri(path) if _is_uri(path) else path)
        except (RarEdgeError, OSError) as e:
            yield {
                "path": path,
                "labels": None,
                "scores": None,
                "label": None,
                "score": None,
                "ranker_ran": None,
                "ranked": None,
                "error": f"{type(e).__name__}: {e}",
            }
            continue
        yield {
            "path": path,
            "labels": [c.label for c in r.retrieved],
            "scores": [c.score for c in r.retrieved],
            "label": r.label,
            "score": r.score,
            "ranker_ran": r.ranker_ran,
            "ranked": [c.label for c in r.candidates],
            "error": None,
        }


def rows_table(rows: Sequence[dict[str, Any]]) -> Any:
    """Result rows as a pyarrow table with `schema`."""
    pa, _, _ = _pa()
    return pa.Table.from_pylist(list(rows), schema=schema())


class Classifier:
    """A Ray Data actor: one `Pipeline` per actor; rows ``path`` -> result rows (a pyarrow table)."""

    def __init__(
        self,
        *,
        memory: str,
        memory_shipped: list | None,
        encoder: str | None,
        encoder_shipped: list | None,
        ranker: str | None,
        config: BatchConfig,
    ) -> None:
        from rar_edge.tools.distributed import materialise

        mem = materialise(memory, memory_shipped, marker=None)
        enc = None if encoder is None else materialise(encoder, encoder_shipped, marker="manifest.json")
        self.pipe = open_pipeline(mem, encoder=enc, ranker=ranker, config=config)

    def __call__(self, batch: Any) -> Any:
        return rows_table(list(classify_rows(self.pipe, batch.column("path").to_pylist())))


@dataclass(frozen=True)
class BatchSummary:
    """What a batch job wrote: rows, rows with an error, where."""

    rows: int
    errors: int
    output: str
    engine: str


def _write_local(rows: Iterator[dict[str, Any]], out: str) -> None:
    _, _, pq = _pa()
    chunk: list[dict[str, Any]] = []

    def flush(writer: Any) -> None:
        writer.write_table(rows_table(chunk))
        chunk.clear()

    if _is_uri(out):
        fs, p = filesystem(out)
        stream = fs.open_output_stream(p)
        ctx: Any = stream
    else:
        from rar_edge._fs import atomic_write

        ctx = atomic_write(out, "wb")
    with ctx as f, pq.ParquetWriter(f, schema()) as writer:
        for row in rows:
            chunk.append(row)
            if len(chunk) >= ROW_GROUP_ROWS:
                flush(writer)
        if chunk:
            flush(writer)


def classify_batch(
    src: str | os.PathLike,
    *,
    memory: str | os.PathLike,
    output: str | os.PathLike,
    encoder: str | os.PathLike | None = None,
    ranker: str | os.PathLike | None = None,
    config: BatchConfig | None = None,
    engine: str = "local",
    options: "RayOptions | None" = None,
    overwrite: bool = False,
    progress: bool = False,
) -> BatchSummary:
    """Labels every image of ``src`` and writes one Parquet row per image.

    Args:
        src: a folder, a file listing paths/URIs, or one image (see `list_images`).
        memory: the memory file (a local path; on a cluster it travels to nodes that lack it).
        output: the Parquet file (local engine) or folder of shards (Ray engine); a local path or a URI.
        encoder: the encoder folder (default: the one the memory records).
        ranker: a ranker model folder or GGUF (on a cluster: a path every node has).
        config: k, encoder settings, ranker settings.
        engine: "local" (this process) or "ray" (an actor pool on Ray Data).
        options: the Ray job's settings (engine "ray").
        overwrite: replace an existing output (the local engine's file, the Ray engine's folder of shards).
        progress: a progress bar (local) or Ray Data's progress bars.

    Returns:
        How many rows were written and how many hold an error.
    """
    if engine not in ENGINES:
        raise InvalidInputError(f"engine must be one of {ENGINES}, not {engine!r}")
    config = config or BatchConfig()
    memory, out = os.fspath(memory), os.fspath(output)
    enc = None if encoder is None else os.fspath(encoder)
    rk = None if ranker is None else os.fspath(ranker)
    paths = list_images(src)
    _, pafs, _ = _pa()
    fs, p = filesystem(out)
    info = fs.get_file_info(p)
    if engine == "local" and info.type != pafs.FileType.NotFound:
        if info.type != pafs.FileType.File:
            raise InvalidInputError(f"{out} is not a file: the local engine writes one Parquet file")
        if not overwrite:
            raise InvalidInputError(f"{out} exists: pass --overwrite to replace it")
    if engine == "local":
        pipe = open_pipeline(memory, encoder=enc, ranker=rk, config=config)
        it: Iterable[str] = paths
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(paths, desc="classifying", unit="img")
        errors = 0

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal errors
            for row in classify_rows(pipe, it):
                errors += row["error"] is not None
                yield row

        try:
            _write_local(counted(), out)
        finally:
            pipe.close()
            if pipe.ranker is not None:
                pipe.ranker.close()
        return BatchSummary(rows=len(paths), errors=errors, output=out, engine=engine)
    return _classify_on_ray(
        paths,
        memory=memory,
        out=out,
        encoder=enc,
        ranker=rk,
        config=config,
        options=options,
        overwrite=overwrite,
        progress=progress,
    )


def _classify_on_ray(
    paths: list[str],
    *,
    memory: str,
    out: str,
    encoder: str | None,
    ranker: str | None,
    config: BatchConfig,
    options: "RayOptions | None",
    overwrite: bool,
    progress: bool,
) -> BatchSummary:
    import numpy as np

    from rar_edge.encoders import EncoderConfig
    from rar_edge.tools.distributed import (
        RayOptions,
        _ship,
        actor_encoder_config,
        actor_resources,
        blocks,
        folder_files,
        ray_session,
    )

    pa, pafs, pq = _pa()
    options = options or RayOptions()
    fs, p = filesystem(out)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        raise InvalidInputError(f"{out} is a file: the Ray engine writes a folder of Parquet shards")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if not overwrite:
            raise InvalidInputError(f"{out} already holds files: pass --overwrite to replace them")
        fs.delete_dir_contents(p)
    enc_cfg = actor_encoder_config(config.encoder or EncoderConfig(), options)
    config = BatchConfig(
        k=config.k,
        encoder=enc_cfg,
        ranker_mode=config.ranker_mode,
        gate_margin=config.gate_margin,
        n_gpu_layers=config.n_gpu_layers,
    )
    if encoder is None:
        from rar_edge.index.memory import Memory

        rec = Memory.load(memory).encoder
        if rec is None:
            raise InvalidInputError("the memory records no encoder: pass encoder=")
        encoder = rec.path
    with ray_session(options, progress=progress) as ray:
        kwargs = {
            "memory": os.path.abspath(memory),
            "memory_shipped": _ship(ray, options, lambda: Path(memory).read_bytes()),
            "encoder": os.path.abspath(encoder),
            "encoder_shipped": _ship(ray, options, lambda: folder_files(encoder)),
            "ranker": None if ranker is None else os.path.abspath(ranker),
            "config": config,
        }
        table = pa.table({"key": np.arange(len(paths), dtype=np.int64), "path": paths})
        ds = blocks(ray, table, options).map_batches(
            Classifier,
            fn_constructor_kwargs=kwargs,
            batch_size=options.batch_size,
            batch_format="pyarrow",
            **actor_resources(options, enc_cfg.provider),
        )
        ds.write_parquet(p, filesystem=fs, min_rows_per_file=100_000)
    errs = pq.read_table(p, filesystem=fs, columns=["error"]).column("error")
    return BatchSummary(rows=len(errs), errors=len(errs) - errs.null_count, output=out, engine="ray")
