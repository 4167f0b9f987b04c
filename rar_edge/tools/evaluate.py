"""Accuracy evaluation: retrieval-only vs retrieval + ranking, recall@k, per-stage latency."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rar_edge import defaults
from rar_edge.encoders import Encoder
from rar_edge.errors import DatasetError
from rar_edge.image.boxes import validate_boxes
from rar_edge.image.codec import decode_rgb
from rar_edge.index.build import crop_config, crop_memory, split_images
from rar_edge.index.memory import HnswParams, Memory
from rar_edge.pipeline import Pipeline, PipelineConfig
from rar_edge.rank.protocol import RankerProtocol
from rar_edge.tools.stats import STAGES, latency_summary  # noqa: F401 - STAGES re-exported
from rar_edge.types import Classification, Detection, ImageError

log = logging.getLogger("rar_edge")


def describe_ranker(ranker: RankerProtocol | None) -> dict[str, Any] | None:
    """What an evaluation's ``setup`` records of its ranker: its own ``describe()``; None without one."""
    return None if ranker is None else ranker.describe()


def score_results(
    results: Sequence[Classification | Detection], truths: Sequence[str], *, k: int, ranker_given: bool | None = None
) -> dict[str, Any]:
    """Top-1, recall@1..k (truth among the first j retrieved classes) and per-class accuracy; with a ranker
    (``ranker_given``; None: inferred from whether it ran) also the ranker's rates, zero when the gate
    kept it from ever running, and ``ranked_top1``: top-1 over the queries whose final order the ranker
    gave (it ran and did not fall back), None when there were none."""
    n = len(results)
    if n == 0:
        return {"top1": None, "recall": {}, "n_queries": 0}
    hits_rank = np.array([r.label == t for r, t in zip(results, truths)])
    hits_retr = np.array([bool(r.retrieved) and r.retrieved[0].label == t for r, t in zip(results, truths)])
    pos = [next((i for i, c in enumerate(r.retrieved) if c.label == t), None) for r, t in zip(results, truths)]
    recall = {str(j): float(np.mean([p is not None and p < j for p in pos])) for j in range(1, k + 1)}
    per_class: dict[str, list[bool]] = defaultdict(list)
    for h, t in zip(hits_rank, truths):
        per_class[t].append(bool(h))
    out: dict[str, Any] = {
        "top1": float(hits_rank.mean()),
        "retrieval_top1": float(hits_retr.mean()),
        "recall": recall,
        "n_queries": n,
        "per_class_top1": {c: float(np.mean(v)) for c, v in sorted(per_class.items())},
        "per_class_n": {c: len(v) for c, v in sorted(per_class.items())},
    }
    ran = [r.ranker_ran for r in results]
    if any(ran) if ranker_given is None else ranker_given:
        # top1 mixes queries the ranker ordered with those the gate or a fallback left in retrieval order;
        # ranked_top1 is the ranker's own accuracy, over the queries whose final order it gave.
        used = [bool(h) for h, r in zip(hits_rank, results) if r.ranker_ran and not r.ranker_fallback]
        out["ranked_top1"] = float(np.mean(used)) if used else None
        out["ranker_ran_rate"] = float(np.mean(ran))
        out["ranker_fallback_rate"] = float(np.mean([r.ranker_fallback for r in results]))
        out["ranker_changed_rate"] = float(
            np.mean([bool(r.retrieved) and r.label != r.retrieved[0].label for r in results])
        )
    return out


def evaluate_classification(
    folder: str | os.PathLike,
    *,
    encoder: Encoder,
    shots: int,
    seed: int = 0,
    k: int = defaults.K,
    queries_folder: str | os.PathLike | None = None,
    ranker: Any = None,
    config: PipelineConfig | None = None,
    backend: str = "auto",
    hnsw: HnswParams | None = None,
    progress: bool = False,
    on_error: str = "stop",
) -> dict[str, Any]:
    """Few-shot classification accuracy on an image folder.

    Builds the memory from ``shots`` random images per class of ``folder`` (seeded) and queries
    every other image of ``folder``, or every image of ``queries_folder`` when given. ``k`` above the
    memory's class count is lowered to it (with a warning). ``on_error="skip"`` leaves unreadable
    images out of the memory and the queries (each named in a warning, the queries in ``skipped_queries``);
    ``"stop"`` raises at the first.

    Returns:
        ``top1``, ``retrieval_top1``, ``recall`` {"1": .., "k": ..}, ``n_queries``,
        ``latency_ms`` {stage: {p50, p95, p99, mean}} (streamed: decode and preprocess run ahead on a
        worker thread, ``wait`` is how long an image's pixels were still awaited, and ``total`` is each
        image's share of the stream's wall time, not the latency of one `Pipeline.classify` call),
        per-class accuracy, and with a ranker
        ``ranked_top1``, ``ranker_changed_rate``, ``ranker_ran_rate``, ``ranker_fallback_rate``.
    """
    from rar_edge.datasets import few_shot_split, read_image_folder

    split = few_shot_split(folder, shots=shots, seed=seed)
    if queries_folder is not None:
        queries = [(p, c) for c, ps in read_image_folder(queries_folder).items() for p in ps]
    else:
        queries = split.queries
    if not queries:
        raise DatasetError(
            f"{queries_folder or folder}: no query images left (every class has at most "
            f"--shots={shots} images, all taken for the memory); pass a queries folder or fewer shots"
        )
    mem = Memory.empty(encoder=encoder, backend=backend, hnsw=hnsw)
    mem.add_images(
        [p for ps in split.support.values() for p in ps],
        [c for c, ps in split.support.items() for _ in ps],
        encoder=encoder,
        progress=progress,
        on_error=on_error,
    )
    k_asked, k = k, clamp_k(k, len(mem.classes))
    cfg = config or PipelineConfig(k=k, encoder=encoder.config)
    pipe = Pipeline(memory=mem, encoder=encoder, ranker=ranker, config=cfg)
    # Streamed: the next photo is decoded on a worker thread while this one runs (same results, in order).
    it: Any = pipe.iter_classify((p for p, _ in queries), k=k, on_error=on_error)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(queries), desc="classifying", unit="img", disable=None)  # None: quiet off a tty
    answers = list(it)
    skipped = [r.to_dict() for r in answers if isinstance(r, ImageError)]
    kept = [(r, c) for r, (_, c) in zip(answers, queries) if not isinstance(r, ImageError)]
    results = [r for r, _ in kept]
    out = score_results(results, [c for _, c in kept], k=k, ranker_given=ranker is not None)
    out["skipped_queries"] = skipped
    unknown = sum(1 for _, c in queries if c not in set(mem.classes))
    out.update(
        {
            "latency_ms": latency_summary([dict(r.timings_ms) for r in results]),
            "setup": {
                "folder": str(Path(folder)),
                "queries_folder": None if queries_folder is None else str(queries_folder),
                "shots": shots,
                "seed": seed,
                "k": k,
                "k_requested": k_asked,
                "backend": mem.active_backend,
                "hnsw": dataclasses.asdict(mem.hnsw_params) if mem.active_backend == "hnsw" else None,
                "gate_margin": cfg.gate_margin,
                "memory_entries": mem.size,
                "memory_classes": len(mem.classes),
                "queries_with_class_not_in_memory": unknown,
                "encoder": encoder.describe(),
                "ranker": describe_ranker(ranker),
            },
        }
    )
    return out


def clamp_k(k: int, n_classes: int) -> int:
    """``k`` lowered to the memory's class count (a search cannot return more distinct classes), with a warning."""
    if k > n_classes >= 1:
        log.warning("-k %d is more than the %d classes in the memory: using k=%d", k, n_classes, n_classes)
        return n_classes
    return k


def evaluate_detection(
    dataset: str | os.PathLike,
    *,
    encoder: Encoder,
    shots: int,
    seed: int = 0,
    k: int = defaults.K,
    queries: str | os.PathLike | None = None,
    ranker: Any = None,
    crop_scale: float | str | None = None,
    blur_sigma_px: float | None = None,
    gate_margin: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Box classification accuracy with a few-shot crop memory.

    The images are split in two halves (seeded): the memory takes ``shots`` boxes per class from
    the first half and every box of the second half is classified (or every box of ``queries``).
    ``gate_margin`` skips the ranker where retrieval is that sure (see `PipelineConfig`).

    Returns:
        The fields of `rar_edge.tools.evaluate.evaluate_classification` plus per-class accuracy and the
        crop settings used.
    """
    from rar_edge.datasets import read_detection_dataset, warn_invalid_boxes

    _, images = read_detection_dataset(dataset)
    invalid_labels = warn_invalid_boxes(images, str(dataset))
    support_idx, query_idx = split_images(len(images), seed)
    cfg = crop_config(encoder, crop_scale, blur_sigma_px)
    mem = crop_memory(
        images,
        str(dataset),
        encoder=encoder,
        shots=shots,
        seed=seed,
        image_indices=support_idx,
        cfg=cfg,
        progress=progress,
    )
    k_asked, k = k, clamp_k(k, len(mem.classes))
    if queries is not None:
        _, qimages = read_detection_dataset(queries)
        invalid_labels += warn_invalid_boxes(qimages, str(queries))
    else:
        qimages = [images[i] for i in query_idx]
    pipe = Pipeline(
        memory=mem,
        encoder=encoder,
        ranker=ranker,
        config=PipelineConfig(k=k, encoder=encoder.config, crop=cfg, gate_margin=gate_margin),
    )
    results, truths = [], []
    it: Any = [im for im in qimages if len(im.boxes)]
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="classifying boxes", unit="img", disable=None)  # None: quiet off a terminal
    skipped = 0
    for im in it:
        arr = decode_rgb(im.path)
        _, kept, _ = validate_boxes(im.boxes, arr.shape[:2], on_invalid="skip")
        skipped += len(im.boxes) - len(kept)
        dets = pipe.detect(arr, im.boxes[kept], k=k)  # all valid now: nothing is validated away twice
        results.extend(dets)
        truths.extend(im.labels[int(j)] for j in kept)
    if not results:
        raise DatasetError(
            f"{queries if queries is not None else dataset}: no query boxes to classify "
            "(the query images hold no valid labelled boxes)"
        )
    out = score_results(results, truths, k=k, ranker_given=ranker is not None)
    known = set(mem.classes)
    out.update(
        {
            "latency_ms": latency_summary([dict(r.timings_ms) for r in results]),
            "setup": {
                "dataset": str(dataset),
                "queries": None if queries is None else str(queries),
                "shots": shots,
                "seed": seed,
                "k": k,
                "k_requested": k_asked,
                "memory_entries": mem.size,
                "memory_classes": len(mem.classes),
                "query_boxes_with_class_not_in_memory": sum(1 for t in truths if t not in known),
                "invalid_boxes_skipped": skipped,
                "invalid_label_boxes": invalid_labels,
                "gate_margin": gate_margin,
                "ranker": describe_ranker(ranker),
                "crop": {
                    "out_size_px": cfg.out_size_px,
                    "crop_scale": cfg.crop_scale,
                    "blur_sigma_px": cfg.blur_sigma_px,
                    "letterbox": cfg.letterbox,
                },
                "encoder": encoder.describe(),
            },
        }
    )
    return out
