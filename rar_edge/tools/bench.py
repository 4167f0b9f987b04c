"""``rar-edge bench``: per-stage latency, SDK overhead, cold start, peak RSS and the environment.

What is measured, in one process:

* **cold start**: loading the encoder (ONNX Runtime import + session creation), the memory (load or
  few-shot build), the ranker, and the first classify call (ORT's first-run allocations);
* **warm latency**: after ``warmup`` calls, ``runs`` timed classify calls (and detect calls when
  boxes are given), each on the next query image; p50 / p95 / p99 of every stage the pipeline times
  (decode, preprocess, encode, search, rank, total) and single-stream throughput;
* **SDK overhead**: ``overhead_share = 1 - model_time / total``, summed over the timed runs, where
  model_time is the wall time spent *inside* ``InferenceSession.run`` of the encoder and inside the
  llama.cpp C functions the ranker calls. Both are measured by timing proxies that this module puts
  in front of the encoder's session and the ranker's ``llama_cpp`` / ``mtmd_cpp`` modules for the
  duration of the benchmark only (nothing in the pipeline changes). Normalisation, L2 norms,
  decoding, resizing, search, prompt assembly and Python glue all count as overhead;
* **encoder variants** (``variants=``): other exports of the same model (int8, fp16): the
  ``session.run`` latency on the same preprocessed pixels, interleaved with the reference encoder
  so that machine noise hits all alike, and the cosine of each variant's embeddings to the reference's;
* **environment**: CPU model, cores, threads, ONNX Runtime providers really used, llama.cpp system
  info, package versions, git commit and the load average before and after.

Outputs in ``out_dir``: ``bench.json``, ``summary.md``, and PNG plots (matplotlib, Agg backend; the
``bench`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rar_edge import defaults
from rar_edge._fs import write_text
from rar_edge.encoders import EncoderConfig
from rar_edge.errors import InvalidInputError, MissingDependencyError
from rar_edge.rank.protocol import RankerProtocol
from rar_edge.rank.ranker import Ranker
from rar_edge.tools.stats import STAGES, percentiles

if TYPE_CHECKING:
    from rar_edge.encoders import Encoder
    from rar_edge.index.memory import Memory
    from rar_edge.pipeline import Pipeline

log = logging.getLogger("rar_edge")

SCHEMA = "rar_edge.bench/1"
#: The issue's target for the retrieval-only MobileNet run.
OVERHEAD_TARGET = 0.10
#: The plots a run may write; one from an earlier run into the same folder that this run did not write is
#: removed.
_PLOT_STAGES, _PLOT_LATENCY, _PLOT_VARIANTS = "stage_breakdown.png", "latency_distribution.png", "encoder_variants.png"
_PLOTS = (_PLOT_STAGES, _PLOT_LATENCY, _PLOT_VARIANTS)
MODEL_TIME_METHOD = {
    "encoder": "wall time inside onnxruntime InferenceSession.run (Encoder.model_s)",
    "ranker": "wall time inside llama.cpp's llama_decode, mtmd_tokenize and mtmd_helper_eval_chunks "
    "(Ranker.model_s); another ranker reports what its model_s says",
}


@dataclass(frozen=True)
class BenchConfig:
    """Settings of a benchmark run.

    Attributes:
        runs: timed calls per mode (classify, detect).
        warmup: untimed calls before them.
        k: classes retrieved (and ranked) per image.
        encoder: ONNX Runtime settings of every encoder loaded.
        shots: images per class in a memory built from an image folder (the rest are queries).
        seed: the few-shot split and the order of the query images.
        ranker_mode: "score" or "generate" for a ranker given as a path.
        ranker_gpu_layers: layers a CUDA build of llama.cpp offloads for a ranker given as a path (-1: all).
        prefetch: images decoded ahead in the streamed classify run (`Pipeline.iter_classify`); 0 skips
            that run.
        plots: write the PNG plots.
    """

    runs: int = 50
    warmup: int = 5
    k: int = defaults.K
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    shots: int = 4
    seed: int = 0
    ranker_mode: str = "score"
    ranker_gpu_layers: int = 0
    prefetch: int = 1
    plots: bool = True

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise InvalidInputError("runs must be >= 1")
        if self.warmup < 0:
            raise InvalidInputError("warmup must be >= 0")
        if self.k < 1:
            raise InvalidInputError("k must be >= 1")
        if self.shots < 1:
            raise InvalidInputError("shots must be >= 1")
        if self.prefetch < 0:
            raise InvalidInputError("prefetch must be >= 0")


# -- model time ------------------------------------------------------------------------------------------
class _ModelTime:
    """Reads the model-time counters a pipeline's encoder and ranker expose (`Encoder.model_s`,
    `RankerProtocol.model_s`), so a call's own overhead is its wall time minus the model's."""

    def __init__(self, pipe: "Pipeline") -> None:
        self._encoder = pipe.encoder
        self._ranker = pipe.ranker
        self.ranker_method: str | None = None if pipe.ranker is None else MODEL_TIME_METHOD["ranker"]
        self.encoder_method = MODEL_TIME_METHOD["encoder"]

    def encoder_s(self) -> float:
        return self._encoder.model_s

    def ranker_s(self) -> float:
        return 0.0 if self._ranker is None else self._ranker.model_s

    def model_s(self) -> float:
        return self.encoder_s() + self.ranker_s()


# -- small helpers ----------------------------------------------------------------------------------------
def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _rss_bytes() -> int | None:
    """The current resident set size (Linux /proc; psutil elsewhere when installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil  # type: ignore[import-not-found]

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return None


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(encoder: "Encoder", ranker: RankerProtocol | None = None) -> dict[str, Any]:
    """What a reader needs to compare two benchmark files: machine, threads, providers, versions, commit."""
    import onnxruntime as ort

    cfg = encoder.config
    env: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "encoder_threads": cfg.threads if cfg.threads is not None else "onnxruntime default (one per physical core)",
        "encoder_allow_spinning": "onnxruntime default (spinning)"
        if cfg.allow_spinning is None
        else cfg.allow_spinning,
        "provider_requested": cfg.provider,
        "providers_in_use": encoder.providers,
        "providers_available": list(ort.get_available_providers()),
        # engine cache folder and FP16: what a TensorRT run's start-up time and numbers depend on
        "tensorrt": cfg.tensorrt_options() if cfg.provider == "tensorrt" else None,
        "python": platform.python_version(),
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("rar_edge", "rar-edge"),
                ("numpy", "numpy"),
                ("pillow", "pillow"),
                ("onnxruntime", "onnxruntime"),
                ("onnxruntime_gpu", "onnxruntime-gpu"),
                ("hnswlib", "hnswlib"),
                ("llama_cpp_python", "llama-cpp-python"),
                ("matplotlib", "matplotlib"),
            )
        },
        "git": _git_commit(),
        "env_vars": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "CUDA_VISIBLE_DEVICES")
            if k in os.environ
        },
    }
    if ranker is not None:
        env["ranker"] = ranker.describe()
    if isinstance(ranker, Ranker):
        try:
            import llama_cpp

            info = llama_cpp.llama_print_system_info()
            env["llama_cpp_system_info"] = (
                info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info)
            )
        except Exception as e:  # noqa: BLE001 - informative only
            env["llama_cpp_system_info"] = f"unavailable: {e}"
    return env


# -- inputs ------------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    memory: "Memory"
    memory_source: dict[str, Any]
    memory_ms: float
    queries: list[tuple[Path, str | None]]  # (image, truth or None)
    accuracy_meaningful: bool


def _prepare_inputs(encoder: "Encoder", *, memory: Any, images: Any, queries: Any, config: BenchConfig) -> _Inputs:
    from rar_edge.datasets import few_shot_split, read_image_folder
    from rar_edge.index.memory import Memory

    if (memory is None) == (images is None):
        raise InvalidInputError("give exactly one of memory= (a saved memory or Memory) and images= (a folder)")
    t0 = time.perf_counter()
    qs: list[tuple[Path, str | None]] = []
    meaningful = True
    if images is not None:
        split = few_shot_split(images, shots=config.shots, seed=config.seed)
        mem = Memory.empty(encoder=encoder)
        mem.add_images(
            [p for ps in split.support.values() for p in ps],
            [c for c, ps in split.support.items() for _ in ps],
            encoder=encoder,
        )
        source = {"built_from": str(images), "shots": config.shots, "seed": config.seed}
        qs = [(Path(p), c) for p, c in split.queries]
    else:
        mem = memory if isinstance(memory, Memory) else Memory.load(memory, encoder=encoder)
        source = {"loaded_from": None if mem.path is None else str(mem.path)}
    mem_ms = _ms(t0)
    if queries is not None:
        qs = [(Path(p), c) for c, ps in read_image_folder(queries).items() for p in ps]
    elif images is None:
        # A saved memory and no query folder: its own exemplar images (latency only; accuracy is trivial).
        qs = [(Path(s), lbl) for s, lbl in zip(mem.sources, mem.labels) if s and Path(s).is_file()]
        meaningful = False
    if not qs:
        raise InvalidInputError(
            "no query images: pass a query folder with one sub-folder per class (--queries, "
            "or queries= in Python), or --images with more images per class than --shots, "
            "or a memory built from image files that still exist"
        )
    order = np.random.default_rng(config.seed).permutation(len(qs))
    qs = [qs[i] for i in order]
    # Read the files that will be used once, so that "decode" measures decoding rather than a cold disk.
    for p, _ in qs[: config.warmup + config.runs + 1]:
        p.read_bytes()
    return _Inputs(
        mem,
        {
            **source,
            "entries": mem.size,
            "classes": len(mem.classes),
            "backend": mem.active_backend,
            "storage": mem.storage,
        },
        mem_ms,
        qs,
        meaningful,
    )


# -- the measurements ---------------------------------------------------------------------------------------
def _summarise(
    records: list[dict[str, float]],
    wall_s: float,
    inst_totals: list[float],
    *,
    ranker_method: str | None,
    encoder_method: str,
) -> dict[str, Any]:
    lat: dict[str, Any] = {}
    for stage in STAGES:
        if stage == "wait" and not any("wait" in r for r in records):
            continue  # only a stream waits
        lat[stage] = percentiles([r[stage] for r in records if stage in r])
    total = np.asarray([r["total"] for r in records])
    model = np.asarray(inst_totals)
    enc = np.asarray([r["encoder_model"] for r in records])
    rnk = np.asarray([r["ranker_model"] for r in records])
    share = float(np.clip(1.0 - model.sum() / total.sum(), 0.0, 1.0)) if total.sum() > 0 else 0.0
    per_run = np.clip(1.0 - model / np.maximum(total, 1e-9), 0.0, 1.0)
    return {
        "runs": len(records),
        "latency_ms": lat,
        "throughput_per_s": len(records) / wall_s if wall_s > 0 else None,
        "model_time_ms": {"encoder": percentiles(enc), "ranker": percentiles(rnk) if rnk.any() else None},
        "overhead": {
            "overhead_share": share,
            "overhead_share_p50": float(np.median(per_run)),
            "overhead_ms": percentiles(total - model),
            "encoder_call": encoder_method,
            "ranker_call": ranker_method,
        },
        "samples_ms": {stage: [round(r[stage], 4) for r in records if stage in r] for stage in lat}
        | {"encoder_model": [round(float(x), 4) for x in enc], "ranker_model": [round(float(x), 4) for x in rnk]},
    }


def _time_classify(
    pipe: "Pipeline", inst: _ModelTime, queries: list[tuple[Path, str | None]], *, config: BenchConfig, meaningful: bool
) -> dict[str, Any]:
    n = len(queries)
    for i in range(config.warmup):
        pipe.classify(queries[i % n][0], k=config.k)
    records, model_totals, hits = [], [], []
    t_start = time.perf_counter()
    for i in range(config.runs):
        path, truth = queries[(config.warmup + i) % n]
        e0, r0 = inst.encoder_s(), inst.ranker_s()
        res = pipe.classify(path, k=config.k)
        rec = dict(res.timings_ms)
        rec["encoder_model"] = (inst.encoder_s() - e0) * 1e3
        rec["ranker_model"] = (inst.ranker_s() - r0) * 1e3
        records.append(rec)
        model_totals.append(rec["encoder_model"] + rec["ranker_model"])
        if truth is not None:
            hits.append(res.label == truth)
    wall = time.perf_counter() - t_start
    out = _summarise(records, wall, model_totals, ranker_method=inst.ranker_method, encoder_method=inst.encoder_method)
    out["distinct_images"] = min(n, config.runs)
    out["accuracy"] = {"top1": float(np.mean(hits)), "n": len(hits)} if hits and meaningful else None
    return out


def _time_stream(
    pipe: "Pipeline", inst: _ModelTime, queries: list[tuple[Path, str | None]], *, config: BenchConfig
) -> dict[str, Any]:
    """The same queries through `Pipeline.iter_classify`: the next image is decoded and resized on a
    worker thread while this one is encoded (and ranked). Wall time per image vs model time per image."""
    n = len(queries)
    warm = [queries[i % n][0] for i in range(max(config.warmup, 1))]
    for _ in pipe.iter_classify(warm, k=config.k, prefetch=config.prefetch):
        pass
    paths = [queries[(config.warmup + i) % n][0] for i in range(config.runs)]
    e0, r0 = inst.encoder_s(), inst.ranker_s()
    t_start = time.perf_counter()
    results = list(pipe.iter_classify(paths, k=config.k, prefetch=config.prefetch))
    wall = time.perf_counter() - t_start
    model = (inst.encoder_s() - e0) + (inst.ranker_s() - r0)
    return {
        "prefetch": config.prefetch,
        "runs": len(results),
        "wall_ms_per_image": wall * 1e3 / len(results),
        "model_ms_per_image": model * 1e3 / len(results),
        "throughput_per_s": len(results) / wall if wall > 0 else None,
        "overhead_share": float(np.clip(1.0 - model / wall, 0.0, 1.0)) if wall > 0 else 0.0,
        "latency_ms": {
            s: percentiles([r.timings_ms[s] for r in results if s in r.timings_ms])
            for s in ("wait", "decode", "preprocess", "encode", "search", "rank", "total")
        },
        "note": "decode and preprocess run on a worker thread, overlapped with the previous image's model "
        "call; 'total' is each image's share of the stream's wall time",
    }


def _time_detect(pipe: "Pipeline", inst: _ModelTime, dataset: Any, *, config: BenchConfig) -> dict[str, Any]:
    from rar_edge.datasets import read_detection_dataset

    _, imgs = read_detection_dataset(dataset)
    imgs = [im for im in imgs if len(im.boxes)]
    if not imgs:
        raise InvalidInputError(f"{dataset}: no image with boxes")
    order = np.random.default_rng(config.seed).permutation(len(imgs))
    imgs = [imgs[i] for i in order]
    for im in imgs[: config.warmup + config.runs]:
        Path(im.path).read_bytes()  # warm the page cache, as for classify
    for i in range(config.warmup):
        im = imgs[i % len(imgs)]
        pipe.detect(im.path, im.boxes, k=config.k, on_invalid="skip")
    records, model_totals, n_boxes = [], [], []
    t_start = time.perf_counter()
    for i in range(config.runs):
        im = imgs[(config.warmup + i) % len(imgs)]
        e0, r0 = inst.encoder_s(), inst.ranker_s()
        t0 = time.perf_counter()
        dets = pipe.detect(im.path, im.boxes, k=config.k, on_invalid="skip")
        wall_ms = _ms(t0)
        # Each Detection carries its share of the shared stages (and its own rank time): sum them back.
        rec = {
            s: sum(d.timings_ms.get(s, 0.0) for d in dets)
            for s in STAGES
            if s != "total" and any(s in d.timings_ms for d in dets)
        }
        rec["total"] = wall_ms
        rec["encoder_model"] = (inst.encoder_s() - e0) * 1e3
        rec["ranker_model"] = (inst.ranker_s() - r0) * 1e3
        records.append(rec)
        model_totals.append(rec["encoder_model"] + rec["ranker_model"])
        n_boxes.append(len(dets))
    wall = time.perf_counter() - t_start
    out = _summarise(records, wall, model_totals, ranker_method=inst.ranker_method, encoder_method=inst.encoder_method)
    boxes_total = max(sum(n_boxes), 1)
    out["boxes_per_call"] = percentiles(n_boxes)
    out["per_box_total_ms_mean"] = float(sum(r["total"] for r in records) / boxes_total)
    out["boxes_per_s"] = boxes_total / wall if wall > 0 else None
    out["dataset"] = str(dataset)
    return out


_SPEC_FIELDS = ("size_px", "layout", "dtype", "rescale", "mean", "std", "resize_mode", "crop_mode", "resample")


def _variant_label(enc: "Encoder") -> str:
    q = enc.manifest.data.get("quantization") or {}
    return str(q.get("mode") or "fp32")


def _time_variants(
    reference: "Encoder", variant_dirs: Sequence[Any], queries: list[tuple[Path, str | None]], *, config: BenchConfig
) -> list[dict[str, Any]]:
    """Reference and variants on the same pixels, interleaved per image; run latency and cosine."""
    from rar_edge.encoders import Encoder

    # Without spinning threads: several sessions that busy-wait between their parallel sections would
    # compete for the cores, and the table would measure that contention, not the variants.
    quiet = dataclasses.replace(config.encoder, allow_spinning=False)
    encs = [Encoder(reference.path, config=quiet)]
    for d in variant_dirs:
        e = Encoder(d, config=quiet)
        a, b = reference.image_spec.to_dict(), e.image_spec.to_dict()
        diff = [f for f in _SPEC_FIELDS if a.get(f) != b.get(f)]
        if diff or e.dim != reference.dim:
            raise InvalidInputError(
                f"variant {d} is not the same model as the reference encoder (differs in {diff or ['embedding_dim']})"
            )
        encs.append(e)
    n = len(queries)
    pixels = [
        reference.preprocess(reference.decode(queries[i % n][0])) for i in range(min(n, config.runs + config.warmup))
    ]
    run_ms: list[list[float]] = [[] for _ in encs]
    cos: list[list[float]] = [[] for _ in encs]
    for i in range(config.warmup + config.runs):
        px = pixels[i % len(pixels)]
        # Rotate the starting encoder so that none always runs right after another's cache warm-up.
        order = [(i + j) % len(encs) for j in range(len(encs))]
        out: dict[int, np.ndarray] = {}
        for j in order:
            s0 = encs[j].model_s
            out[j] = encs[j].embed_pixels(px)[0]
            if i >= config.warmup:
                run_ms[j].append((encs[j].model_s - s0) * 1e3)
        if i >= config.warmup:
            for j in range(len(encs)):
                cos[j].append(float(np.dot(out[0], out[j])))
    ref_p50 = float(np.median(run_ms[0]))
    rows = []
    for j, e in enumerate(encs):
        model_file = e.manifest.path("image_model")
        p50 = float(np.median(run_ms[j]))
        rows.append(
            {
                "name": _variant_label(e) + (" (reference)" if j == 0 else ""),
                "path": str(e.path),
                "quantization": e.manifest.data.get("quantization"),
                "model_bytes": model_file.stat().st_size,
                "session_run_ms": percentiles(run_ms[j]),
                "latency_ratio_to_reference_p50": p50 / ref_p50 if ref_p50 > 0 else None,
                "cosine_to_reference": {"mean": float(np.mean(cos[j])), "min": float(np.min(cos[j])), "n": len(cos[j])},
                "providers": e.providers,
            }
        )
    return rows


def run_bench(
    *,
    encoder: "str | os.PathLike | Encoder",
    out_dir: str | os.PathLike,
    memory: "str | os.PathLike | Memory | None" = None,
    images: str | os.PathLike | None = None,
    queries: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    ranker: Any = None,
    variants: Sequence[str | os.PathLike] = (),
    notes: Sequence[str] = (),
    config: BenchConfig | None = None,
) -> dict[str, Any]:
    """Benchmarks a pipeline and writes ``bench.json``, ``summary.md`` and plots to ``out_dir``.

    Args:
        encoder: the encoder model folder (loaded here, so that its load is timed) or a loaded `Encoder`.
        out_dir: the output folder (created).
        memory: a saved memory file or a `Memory`; exclusive with ``images``.
        images: an image folder (one sub-folder per class): a memory of ``config.shots`` images per
            class is built and the other images are the queries.
        queries: an image folder (one sub-folder per class) to classify instead; default: the held-out
            images of ``images``, or the exemplar images recorded in ``memory``.
        boxes: a detection dataset (YOLO folder or COCO json): detect is timed on its images too.
        ranker: a ranker model folder / GGUF (loaded with ``config.ranker_mode``), an object with
            ``rank(image, candidates)``, or None for retrieval only.
        variants: model folders of the same encoder exported differently (int8, fp16), compared to
            ``encoder`` for latency and embedding cosine.
        notes: free-text lines recorded in ``bench.json`` and the summary (e.g. how variants were made).
        config: runs, warm-up, k, encoder threads and provider, shots, seed.

    Returns:
        The dict written to ``bench.json``.

    Raises:
        InvalidInputError: bad arguments, no query images, or a variant of another model.
        MissingDependencyError: matplotlib is missing and plots were asked for.
    """
    from rar_edge.encoders import Encoder
    from rar_edge.pipeline import Pipeline, PipelineConfig

    config = config or BenchConfig()
    out = Path(out_dir)
    _check_out_dir(out, config)
    load_before = _loadavg()
    rss_start = _rss_bytes()
    cold: dict[str, float | None] = {}

    ort_imported_here = "onnxruntime" not in sys.modules
    t0 = time.perf_counter()
    enc_cfg = config.encoder if ranker is None else config.encoder.beside_ranker()
    enc = encoder if isinstance(encoder, Encoder) else Encoder(encoder, config=enc_cfg)
    cold["encoder_load_ms"] = _ms(t0) if not isinstance(encoder, Encoder) else None
    inputs = _prepare_inputs(enc, memory=memory, images=images, queries=queries, config=config)
    # A loaded memory is part of a cold start; one built from images here is set-up, reported apart.
    built = images is not None
    cold["memory_load_ms"] = None if built else inputs.memory_ms
    t0 = time.perf_counter()
    rk = ranker
    owns_ranker = isinstance(ranker, (str, os.PathLike))
    if owns_ranker:
        from rar_edge.rank.ranker import Ranker

        rk = Ranker.load(ranker, mode=config.ranker_mode, n_gpu_layers=config.ranker_gpu_layers)
    cold["ranker_load_ms"] = _ms(t0) if owns_ranker else None
    try:
        pipe = Pipeline(
            memory=inputs.memory, encoder=enc, ranker=rk, config=PipelineConfig(k=config.k, encoder=enc.config)
        )
        measured = _measure(pipe, inputs, boxes, cold, config=config)
        variant_rows = _time_variants(enc, variants, inputs.queries, config=config) if variants else []
        env = environment(enc, pipe.ranker)
    finally:
        if owns_ranker and rk is not None:
            rk.close()
    classify, detect = measured["classify"], measured["detect"]

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setup": {
            "encoder": enc.describe(),
            "memory": inputs.memory_source,
            "queries": {"n_images": len(inputs.queries), "folder": None if queries is None else str(queries)},
            "ranker": env.get("ranker"),
            "boxes": None if boxes is None else str(boxes),
            "runs": config.runs,
            "warmup": config.warmup,
            "k": config.k,
        },
        "environment": {**env, "load_average_before": load_before, "load_average_after": _loadavg()},
        "cold_start_ms": cold,
        "setup_ms": {"memory_build": inputs.memory_ms if built else None},
        "cold_start_note": "in-process: encoder_load includes "
        + ("importing onnxruntime and " if ort_imported_here else "")
        + "creating the sessions; a fresh "
        "process also pays Python and rar_edge imports, and a cold disk cache",
        "classify": classify,
        "detect": detect,
        "overhead_share": classify["overhead"]["overhead_share"],
        "overhead_share_stream": classify["stream"]["overhead_share"] if classify["stream"] else None,
        "overhead_target": OVERHEAD_TARGET,
        "model_time_method": MODEL_TIME_METHOD,
        "memory_rss": {
            "at_start_bytes": rss_start,
            "after_load_bytes": measured["rss_loaded"],
            "after_runs_bytes": measured["rss_runs"],
            "peak_bytes": measured["peak_runs"],
            "method": "current RSS from /proc/self/statm (psutil elsewhere); peak from getrusage ru_maxrss, "
            "taken before the encoder variants are loaded (it includes whatever the process held before)",
        },
        "encoder_variants": variant_rows,
        "notes": list(notes),
        "files": {"json": "bench.json", "summary": "summary.md", "plots": []},
    }
    _write_outputs(result, out, plots=config.plots)
    return result


def _check_out_dir(out: Path, config: BenchConfig) -> None:
    """Refuses an output path that is a file, or a folder holding other things than an earlier bench's output."""
    if config.plots:
        _require_matplotlib()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not (out / "bench.json").is_file() and any(out.iterdir()):
        # e.g. a class folder: plots written there would be read as photos by the next memory build
        raise InvalidInputError(
            f"--out {out} is a folder that holds other files and no bench.json (it is not an "
            "earlier bench output): give a new or empty folder"
        )


def _measure(
    pipe: "Pipeline", inputs: _Inputs, boxes: Any, cold: dict[str, float | None], *, config: BenchConfig
) -> dict[str, Any]:
    """The first call (cold start), then the timed classify, streamed and detect runs, and RSS around them."""
    inst = _ModelTime(pipe)
    t0 = time.perf_counter()
    pipe.classify(inputs.queries[0][0], k=config.k)
    cold["first_classify_ms"] = _ms(t0)
    cold["total_ms"] = sum(v for v in cold.values() if v is not None)
    rss_loaded = _rss_bytes()
    classify = _time_classify(pipe, inst, inputs.queries, config=config, meaningful=inputs.accuracy_meaningful)
    classify["stream"] = _time_stream(pipe, inst, inputs.queries, config=config) if config.prefetch > 0 else None
    detect = _time_detect(pipe, inst, boxes, config=config) if boxes is not None else None
    rss_runs = _rss_bytes()
    # ru_maxrss and /proc's resident count can differ by a few pages: the peak is at least the current.
    return {
        "classify": classify,
        "detect": detect,
        "rss_loaded": rss_loaded,
        "rss_runs": rss_runs,
        "peak_runs": max(_peak_rss_bytes(), rss_runs or 0),
    }


def _write_outputs(result: dict[str, Any], out: Path, *, plots: bool) -> None:
    """bench.json, summary.md and the plots; plots an earlier run left in the same folder are removed."""
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails on its inputs leaves no empty folder
    if plots:
        result["files"]["plots"] = write_plots(result, out)
    for stale in set(_PLOTS) - set(result["files"]["plots"]):
        (out / stale).unlink(missing_ok=True)
    write_text(out / "summary.md", summary_markdown(result))
    write_text(out / "bench.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")


# -- report ----------------------------------------------------------------------------------------------------


def _fmt(x: Any, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def summary_markdown(res: dict[str, Any]) -> str:
    """A one-page Markdown summary of a bench result."""
    env, setup = res["environment"], res["setup"]
    lines = [f"# rar-edge bench: {setup['encoder']['name']}", ""]
    lines += [
        f"- CPU: {env['cpu_model']} ({env['cpus_usable']} usable CPUs), encoder threads: {env['encoder_threads']}",
        f"- providers in use: {env['providers_in_use']}",
        f"- memory: {setup['memory']['entries']} entries, {setup['memory']['classes']} classes "
        f"({setup['memory']['backend']}); ranker: {setup['ranker']['name'] if setup['ranker'] else 'none'}",
        f"- {setup['runs']} timed runs after {setup['warmup']} warm-up; load average before/after: "
        f"{env['load_average_before']} / {env['load_average_after']}",
        f"- git: {(env.get('git') or {}).get('commit', 'unknown')}"
        + (" (dirty)" if (env.get("git") or {}).get("dirty") else ""),
        "",
    ]
    for mode in ("classify", "detect"):
        block = res.get(mode)
        if not block:
            continue
        lines += [
            f"## {mode}",
            "",
            "| stage | p50 ms | p95 ms | p99 ms | mean ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for stage in STAGES:
            p = block["latency_ms"].get(stage)
            if p:
                lines.append(f"| {stage} | {p['p50']:.2f} | {p['p95']:.2f} | {p['p99']:.2f} | {p['mean']:.2f} |")
        ov = block["overhead"]
        enc_m = block["model_time_ms"]["encoder"]
        lines += [
            "",
            f"- throughput: {_fmt(block['throughput_per_s'], 1)} calls/s (one stream)",
            f"- model calls: encoder session.run p50 {_fmt(enc_m['p50'] if enc_m else None)} ms"
            + (
                f", ranker llama.cpp p50 {block['model_time_ms']['ranker']['p50']:.2f} ms"
                if block["model_time_ms"]["ranker"]
                else ""
            ),
            f"- **SDK overhead share: {ov['overhead_share']:.3f}** (1 - model time / total, summed over runs; "
            f"per-run median {ov['overhead_share_p50']:.3f}; target <= {OVERHEAD_TARGET})",
        ]
        st = block.get("stream")
        if st:
            lines.append(
                f"- **streamed** (`iter_classify`, prefetch {st['prefetch']}: the next image decoded on a "
                f"worker thread): {st['wall_ms_per_image']:.2f} ms per image, model {st['model_ms_per_image']:.2f} "
                f"ms, {_fmt(st['throughput_per_s'], 1)} images/s, **overhead share {st['overhead_share']:.3f}**"
            )
        if mode == "classify" and block.get("accuracy"):
            lines.append(f"- top-1 on the timed queries: {block['accuracy']['top1']:.3f} (n={block['accuracy']['n']})")
        if mode == "detect":
            lines.append(
                f"- boxes per call p50 {block['boxes_per_call']['p50']:.0f}; {_fmt(block['boxes_per_s'], 1)} boxes/s"
            )
        lines.append("")
    cold = res["cold_start_ms"]
    lines += ["## cold start", "", "| step | ms |", "| --- | ---: |"]
    lines += [f"| {k.removesuffix('_ms')} | {_fmt(v, 1)} |" for k, v in cold.items()]
    rss = res["memory_rss"]
    lines += [
        "",
        f"Peak RSS: {rss['peak_bytes'] / 2**20:.0f} MiB; after load {_fmt((rss['after_load_bytes'] or 0) / 2**20, 0)} MiB.",
        "",
    ]
    if res["encoder_variants"]:
        lines += [
            "## encoder variants (same pixels, interleaved)",
            "",
            "| variant | session.run p50 ms | ratio | cosine to reference mean / min | model MB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for v in res["encoder_variants"]:
            c = v["cosine_to_reference"]
            lines.append(
                f"| {v['name']} | {v['session_run_ms']['p50']:.2f} | {v['latency_ratio_to_reference_p50']:.2f} "
                f"| {c['mean']:.4f} / {c['min']:.4f} | {v['model_bytes'] / 1e6:.1f} |"
            )
        lines.append("")
    if res.get("notes"):
        lines += ["## notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    lines += [
        "## method",
        "",
        f"- encoder model time: {MODEL_TIME_METHOD['encoder']}",
        f"- ranker model time: {MODEL_TIME_METHOD['ranker']}",
        "- stage times are the pipeline's own (`Classification.timings_ms`); percentiles over the timed runs.",
        "",
    ]
    if res["files"]["plots"]:
        lines += ["## plots", ""] + [f"![{p}]({p})" for p in res["files"]["plots"]] + [""]
    return "\n".join(lines)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("matplotlib", "bench", "Plotting benchmark results") from e


STAGE_COLOURS = {
    "decode": "#4C72B0",
    "preprocess": "#55A868",
    "encode": "#C44E52",
    "search": "#8172B2",
    "rank": "#CCB974",
    "total": "#333333",
}


def _hboxplot(ax: Any, data: list, labels: list[str]) -> dict:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    kw: dict[str, Any] = {"whis": (1, 99), "showfliers": True, "patch_artist": True, "flierprops": {"markersize": 3}}
    if (major, minor) >= (3, 10):
        return ax.boxplot(data, orientation="horizontal", tick_labels=labels, **kw)
    return ax.boxplot(data, vert=False, labels=labels, **kw)  # matplotlib 3.8 / 3.9


def _plot_stage_bars(ax: Any, block: dict[str, Any], mode: str) -> None:
    """p50 per stage with p95 whiskers (a log axis when the stages differ by orders of magnitude)."""
    lat = block["latency_ms"]
    stages = [s for s in STAGES if lat.get(s)]
    p50 = [lat[s]["p50"] for s in stages]
    p95 = [lat[s]["p95"] for s in stages]
    y = np.arange(len(stages))
    ax.barh(y, p50, color=[STAGE_COLOURS[s] for s in stages])
    ax.errorbar(
        p50,
        y,
        xerr=[np.zeros(len(p50)), np.maximum(np.subtract(p95, p50), 0)],
        fmt="none",
        ecolor="black",
        capsize=3,
        lw=1,
    )
    for yi, v, w in zip(y, p50, p95):
        ax.text(max(v, w), yi, f"  p50 {v:.2f} / p95 {w:.2f} ms", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, stages)
    ax.invert_yaxis()
    if max(p95) > 200 * max(min(p50), 1e-3):  # e.g. a ranker taking seconds: small stages need a log axis
        ax.set_xscale("log")
        ax.set_xlim(max(min(p50), 1e-3) / 2, max(p95) * 30)
        ax.set_xlabel("latency per call (ms, log scale): bar = p50, whisker = p95")
    else:
        ax.set_xlim(0, max(p95) * 1.45)
        ax.set_xlabel("latency per call (ms): bar = p50, whisker = p95")
    ax.set_title(f"{mode}: per-stage latency ({block['runs']} runs)")
    ax.grid(axis="x", alpha=0.3)


def _plot_model_split(ax2: Any, block: dict[str, Any], mode: str) -> None:
    """The mean total split into model calls and SDK overhead, one call at a time and streamed."""
    s = block["samples_ms"]
    total = float(np.mean(s["total"]))
    enc_m = float(np.mean(s["encoder_model"]))
    rnk_m = float(np.mean(s["ranker_model"]))
    parts = [
        ("encoder session.run", enc_m, "#C44E52"),
        ("ranker llama.cpp", rnk_m, "#CCB974"),
        ("SDK overhead", max(total - enc_m - rnk_m, 0.0), "#999999"),
    ]
    left = 0.0
    for label, v, c in parts:
        if v <= 0:
            continue
        ax2.barh([1], [v], left=left, height=0.5, color=c, label=f"{label}: {v:.2f} ms ({v / total:.1%})")
        left += v
    st = block.get("stream")
    if st:  # the streamed run: wall time per image split the same way
        smodel, swall = st["model_ms_per_image"], st["wall_ms_per_image"]
        ax2.barh(
            [0.2],
            [smodel],
            height=0.5,
            color="#8172B2",
            label=f"streamed: model {smodel:.2f} ms, overhead {max(swall - smodel, 0):.2f} ms "
            f"(share {st['overhead_share']:.3f})",
        )
        ax2.barh([0.2], [max(swall - smodel, 0.0)], left=smodel, height=0.5, color="#999999")
        ax2.set_yticks([1, 0.2], ["one call", f"stream\n(prefetch {st['prefetch']})"], fontsize=8)
    else:
        ax2.set_yticks([])
    ax2.set_ylim(-1.6, 1.5)
    ax2.set_xlabel("mean latency per call (ms)")
    ov = block["overhead"]["overhead_share"]
    ax2.set_title(
        f"{mode}: model calls vs SDK overhead (target share <= {OVERHEAD_TARGET})\n"
        f"overhead_share = {ov:.3f} one call at a time" + (f", {st['overhead_share']:.3f} streamed" if st else ""),
        fontsize=9,
    )
    ax2.legend(loc="lower center", fontsize=8, frameon=False)
    ax2.set_xlim(0, total * 1.05)


def _plot_stage_distributions(ax: Any, block: dict[str, Any], mode: str) -> None:
    """Box plots of every stage's samples (log scale)."""
    samples = block["samples_ms"]
    stages = [s for s in STAGES if samples.get(s)]
    data = [np.maximum(samples[s], 1e-3) for s in stages]
    bp = _hboxplot(ax, data, stages)
    for patch, st in zip(bp["boxes"], stages):
        patch.set_facecolor(STAGE_COLOURS[st])
        patch.set_alpha(0.6)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("latency per call (ms, log scale): box = p25..p75, line = p50, whiskers = p1..p99")
    ax.set_title(f"{mode}: latency distribution per stage")
    ax.grid(axis="x", which="both", alpha=0.3)


def _plot_runs(ax2: Any, block: dict[str, Any], mode: str) -> None:
    """The total of every timed run in order, with its percentiles (noise, drift)."""
    samples = block["samples_ms"]
    tot = samples["total"]
    ax2.plot(np.arange(1, len(tot) + 1), tot, ".-", lw=0.8, ms=3, color="#333333", label="total")
    lat = block["latency_ms"]["total"]
    for q, ls in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax2.axhline(lat[q], ls=ls, color="#C44E52", lw=1, label=f"{q} {lat[q]:.2f} ms")
    ax2.set_xlabel("timed run #")
    ax2.set_ylabel("total latency (ms)")
    ax2.set_title(f"{mode}: total per run (noise, drift)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)


def _plot_variants(plt: Any, rows: list[dict[str, Any]], where: str, out: Path) -> None:
    """Encoder variants: session.run latency with the cosine to the reference written on each bar."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(rows)))
    y = np.arange(len(rows))
    p50 = [r["session_run_ms"]["p50"] for r in rows]
    p95 = [r["session_run_ms"]["p95"] for r in rows]
    ax.barh(y, p50, color=["#4C72B0"] + ["#DD8452"] * (len(rows) - 1))
    ax.errorbar(
        p50,
        y,
        xerr=[np.zeros(len(rows)), np.maximum(np.subtract(p95, p50), 0)],
        fmt="none",
        ecolor="black",
        capsize=3,
        lw=1,
    )
    for yi, r, v, w in zip(y, rows, p50, p95):
        c = r["cosine_to_reference"]
        ax.text(
            max(v, w),
            yi,
            f"  p50 {v:.2f} ms (x{r['latency_ratio_to_reference_p50']:.2f} of reference)\n"
            f"  cosine to reference: mean {c['mean']:.5f}, min {c['min']:.5f}",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(y, [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(p95) * 2.4)
    ax.set_xlabel("image encoder session.run per image (ms): bar = p50, whisker = p95")
    ax.set_title(f"encoder variants on the same {rows[0]['cosine_to_reference']['n']} real images\n{where}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / _PLOT_VARIANTS, dpi=110)
    plt.close(fig)


def write_plots(res: dict[str, Any], out: Path) -> list[str]:
    """Stage breakdown, latency distributions and (when present) encoder variants as PNGs; returns file names."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    env = res["environment"]
    name = res["setup"]["encoder"]["name"]
    where = f"{env['cpu_model']} | {env['cpus_usable']} CPUs | encoder threads: {env['encoder_threads']}"
    modes = [m for m in ("classify", "detect") if res.get(m)]
    pages = [
        (_PLOT_STAGES, _plot_stage_bars, _plot_model_split, 3.6, f"rar-edge bench: {name}\n{where}"),
        (
            _PLOT_LATENCY,
            _plot_stage_distributions,
            _plot_runs,
            3.8,
            f"rar-edge bench: {name} | load average before/after {env['load_average_before']} / "
            f"{env['load_average_after']}",
        ),
    ]
    files = []
    for file_name, left, right, row_height, title in pages:
        fig, axes = plt.subplots(
            len(modes), 2, figsize=(12, row_height * len(modes)), squeeze=False, gridspec_kw={"width_ratios": [3, 2]}
        )
        for row, mode in zip(axes, modes):
            left(row[0], res[mode], mode)
            right(row[1], res[mode], mode)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / file_name, dpi=110)
        plt.close(fig)
        files.append(file_name)
    if res["encoder_variants"]:
        _plot_variants(plt, res["encoder_variants"], where, out)
        files.append(_PLOT_VARIANTS)
    return files


# -- CLI ---------------------------------------------------------------------------------------------------------
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` options (shared by the CLI and benchmarks/latency.py)."""
    p.add_argument("--encoder", required=True, help="encoder model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--memory", help="a saved memory file")
    src.add_argument(
        "--images", help="image folder (one sub-folder per class): memory of --shots per class, the rest are queries"
    )
    p.add_argument("--shots", type=int, default=4, help="images per class in the memory built from --images")
    p.add_argument("--seed", type=int, default=0, help="few-shot split and query order")
    p.add_argument("--queries", default=None, help="classify this folder's images (one sub-folder per class)")
    p.add_argument("--boxes", default=None, help="YOLO folder or COCO json: time detect on its images too")
    p.add_argument("--ranker", default=None, help="MLLM ranker model folder or GGUF")
    p.add_argument(
        "--ranker-mode",
        default="score",
        choices=["score", "generate"],
        help="score: candidate log-likelihoods; generate: the model writes the ranked list",
    )
    p.add_argument("--n-gpu-layers", type=int, default=0, help="ranker layers offloaded by a CUDA llama.cpp (-1: all)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="DIR",
        help="another export of the same encoder (int8, fp16) to compare; repeatable",
    )
    p.add_argument("--runs", type=int, default=50, help="timed calls")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    p.add_argument("-k", type=int, default=defaults.K, help="classes retrieved (and ranked) per image")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument(
        "--spinning",
        choices=["auto", "on", "off"],
        default="auto",
        help="ONNX Runtime's idle intra-op threads busy-wait (on) or sleep (off); auto: off when a "
        "ranker shares the process, else ONNX Runtime's default (on)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="images decoded ahead in the extra streamed run (Pipeline.iter_classify); 0 skips it",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--out",
        required=True,
        help="output folder for bench.json, summary.md and plots: new, empty, or an earlier bench output",
    )


def run_from_args(args: argparse.Namespace, *, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the benchmark described by parsed `add_bench_arguments` options."""
    cfg = BenchConfig(
        runs=args.runs,
        warmup=args.warmup,
        k=args.k,
        shots=args.shots,
        seed=args.seed,
        encoder=EncoderConfig(
            provider=args.provider,
            threads=args.threads,
            batch_size=16,
            allow_spinning={"auto": None, "on": True, "off": False}[args.spinning],
        ),
        ranker_mode=args.ranker_mode,
        ranker_gpu_layers=args.n_gpu_layers,
        prefetch=args.prefetch,
        plots=not args.no_plots,
    )
    return run_bench(
        encoder=args.encoder,
        out_dir=args.out,
        memory=args.memory,
        images=args.images,
        queries=args.queries,
        boxes=args.boxes,
        ranker=args.ranker,
        variants=args.variant,
        notes=notes,
        config=cfg,
    )


def summary_lines(res: dict[str, Any], out: str) -> list[str]:
    """The few lines the CLI prints after a run."""
    lat = res["classify"]["latency_ms"]
    parts = " ".join(f"{s} {lat[s]['p50']:.2f}" for s in STAGES if lat.get(s))
    lines = [
        f"classify p50 ms: {parts}",
        f"overhead_share {res['overhead_share']:.3f} (target <= {OVERHEAD_TARGET}); "
        f"{res['classify']['throughput_per_s']:.1f} img/s; cold start {res['cold_start_ms']['total_ms']:.0f} ms; "
        f"peak RSS {res['memory_rss']['peak_bytes'] / 2**20:.0f} MiB",
    ]
    st = res["classify"].get("stream")
    if st:
        lines.append(
            f"streamed (prefetch {st['prefetch']}): {st['wall_ms_per_image']:.2f} ms per image, "
            f"{st['throughput_per_s']:.1f} img/s, overhead_share {st['overhead_share']:.3f}"
        )
    if res.get("detect"):
        d = res["detect"]["latency_ms"]["total"]
        lines.append(f"detect total p50 {d['p50']:.2f} ms ({res['detect']['boxes_per_s']:.1f} boxes/s)")
    for v in res["encoder_variants"]:
        lines.append(
            f"variant {v['name']}: session.run p50 {v['session_run_ms']['p50']:.2f} ms "
            f"(x{v['latency_ratio_to_reference_p50']:.2f}), cosine {v['cosine_to_reference']['mean']:.4f}"
        )
    lines.append(f"wrote {Path(out) / 'bench.json'}, summary.md, {len(res['files']['plots'])} plots")
    return lines


def _cmd_bench(args: argparse.Namespace) -> int:
    res = run_from_args(args)
    if getattr(args, "json", None):
        text = json.dumps(res, indent=1, ensure_ascii=False)
        if args.json == "-":
            print(text)
        else:
            write_text(args.json, text + "\n")
    for line in summary_lines(res, args.out):
        print(line, file=sys.stderr if getattr(args, "json", None) == "-" else sys.stdout)
    return 0


def add_bench_subcommand(sub: "argparse._SubParsersAction") -> None:
    """Registers ``bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", help="per-stage latency, SDK overhead, cold start, RSS (needs the 'bench' extra for plots)"
    )
    add_bench_arguments(p)
    p.add_argument(
        "--json", default=None, metavar="FILE", help="also write the results (bench.json's content) here; '-': stdout"
    )
    p.set_defaults(func=_cmd_bench)
