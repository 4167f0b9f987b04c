"""RAR's detection path around `Pipeline.detect`: box files, few-shot crop memories, evaluation.

Two memories, as in the paper: zero-shot (class-name text embeddings; crops are matched
image-to-text, built with `Memory.from_class_names`) and few-shot (crops of labelled boxes as
exemplars, `memory_from_boxes`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .encoders import Encoder
from .errors import DatasetError, InvalidInputError
from .memory import HnswParams, Memory
from .pipeline import Pipeline, PipelineConfig
from .preprocess import decode_rgb, load_image, upright_size

log = logging.getLogger("rar_edge")


def read_boxes_file(path: str | os.PathLike, *, image: Any = None) -> np.ndarray:
    """Reads boxes as (N, 4) x1, y1, x2, y2 pixels.

    Formats: a YOLO txt (``[class] cx cy w h`` normalised; needs ``image`` for its size), a
    COCO-style json list (``[{"bbox": [x, y, w, h], ...}]`` or ``{"annotations": [...]}``; from a COCO
    instances file with several images only the boxes of ``image``, matched by file name), or a
    json list of ``[x1, y1, x2, y2]``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInputError(f"cannot read boxes file {p}: {e}") from e
    if p.suffix.lower() == ".txt":
        if image is None:
            raise InvalidInputError("YOLO boxes are normalised: the image is needed for its size")
        w, h = _image_size(image)
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (4, 5):
                raise InvalidInputError(f"{p}:{n}: expected '[class] cx cy w h', got {line!r}")
            try:
                cx, cy, bw, bh = (float(v) for v in parts[-4:])
            except ValueError as e:
                raise InvalidInputError(f"{p}:{n}: not numbers: {line!r}") from e
            rows.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
        return np.asarray(rows, np.float64).reshape(-1, 4)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{p} is neither YOLO txt nor json: {e}") from e
    if isinstance(data, dict) and "annotations" in data:
        data = _annotations_of(data, image, p)
    if not isinstance(data, list):
        raise InvalidInputError(f"{p}: expected a json list of boxes")
    rows = []
    for i, b in enumerate(data):
        coords = b["bbox"] if isinstance(b, dict) and "bbox" in b else b
        try:
            if not isinstance(coords, (list, tuple)) or len(coords) != 4:
                raise ValueError("not four numbers")
            v = [float(c) for c in coords]
        except (TypeError, ValueError):
            raise InvalidInputError(f"{p}: box {i} is neither {{'bbox': [x,y,w,h]}} nor [x1,y1,x2,y2]: {b!r}") from None
        rows.append((v[0], v[1], v[0] + v[2], v[1] + v[3]) if coords is not b else tuple(v))
    return np.asarray(rows, np.float64).reshape(-1, 4)


def _annotations_of(coco: dict, image: Any, p: Path) -> list:
    """The annotations of ``image`` in a COCO instances dict (all of them when they are of one image)."""
    anns = coco["annotations"]
    if not isinstance(anns, list):
        raise InvalidInputError(f"{p}: 'annotations' must be a list")
    ids = {a.get("image_id") for a in anns if isinstance(a, dict)}
    if len(ids) <= 1:
        return anns
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else None
    matches = [im.get("id") for im in coco.get("images", []) if isinstance(im, dict)
               and name is not None and Path(str(im.get("file_name", ""))).name == name]
    if len(matches) != 1:
        raise InvalidInputError(f"{p} holds boxes of {len(ids)} images and none is named "
                                f"{name or '(no image path given)'!r}: pass that image, or a file of its boxes only")
    return [a for a in anns if isinstance(a, dict) and a.get("image_id") == matches[0]]


def _image_size(image: Any) -> tuple[int, int]:
    """(width, height) of an image as detect() decodes it (upright: EXIF orientation applied)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as im:
                return upright_size(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            decode_rgb(image)  # raises the decoder's own ImageDecodeError for this file
            raise
    return upright_size(load_image(image))  # no `with`: a caller's PIL image stays open


def _crop_config(encoder: Encoder, crop_scale: float | str | None, blur_sigma_px: float | None):
    from .boxes import CropConfig

    cfg = CropConfig(out_size_px=encoder.image_spec.size_px[0])
    if crop_scale is not None:
        cfg = replace(cfg, crop_scale=crop_scale if crop_scale == "adaptive" else float(crop_scale))
    if blur_sigma_px is not None:
        cfg = replace(cfg, blur_sigma_px=float(blur_sigma_px))
    return cfg


def _split_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def memory_from_boxes(
    dataset: str | os.PathLike,
    *,
    encoder: Encoder,
    shots: int | None,
    seed: int = 0,
    image_indices: np.ndarray | None = None,
    crop_scale: float | str | None = None,
    blur_sigma_px: float | None = None,
    backend: str = "auto",
    hnsw: HnswParams | None = None,
    progress: bool = False,
) -> Memory:
    """A few-shot memory of box crops: ``shots`` random labelled boxes per class (seeded).

    Args:
        dataset: a YOLO folder or a COCO json.
        encoder: the image encoder (its input size is the crop size).
        shots: boxes per class; None takes every box.
        image_indices: restrict sampling to these images of the dataset (in reading order).
        crop_scale, blur_sigma_px: override the default crop settings.
    """
    from .datasets import read_detection_dataset

    _, images = read_detection_dataset(dataset)
    return _crop_memory(images, str(dataset), encoder=encoder, shots=shots, seed=seed, image_indices=image_indices,
                        cfg=_crop_config(encoder, crop_scale, blur_sigma_px), backend=backend, hnsw=hnsw,
                        progress=progress)


def _crop_memory(images: list, name: str, *, encoder: Encoder, shots: int | None, seed: int,
                 image_indices: np.ndarray | None, cfg: Any, backend: str = "auto", hnsw: HnswParams | None = None,
                 progress: bool = False) -> Memory:
    from .boxes import crop_boxes, validate_boxes

    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1):
        raise DatasetError(f"shots must be an integer >= 1 (boxes per class), got {shots!r}")
    idx = np.arange(len(images)) if image_indices is None else np.asarray(image_indices)
    pool: dict[str, list[tuple[int, int]]] = {}
    for i in idx:
        for j, lbl in enumerate(images[i].labels):
            pool.setdefault(lbl, []).append((int(i), j))
    if not pool:
        raise DatasetError(f"{name}: no labelled boxes to build a memory from")
    rng = np.random.default_rng(seed)
    chosen: dict[int, list[tuple[int, str]]] = {}
    for lbl in sorted(pool):
        items = pool[lbl]
        pick = range(len(items)) if shots is None or shots >= len(items) else rng.choice(len(items), shots, replace=False)
        for t in sorted(int(x) for x in pick):
            i, j = items[t]
            chosen.setdefault(i, []).append((j, lbl))
    mem = Memory.empty(encoder=encoder, backend=backend, hnsw=hnsw)
    it: Any = sorted(chosen.items())
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="cropping exemplars", unit="img")
    for i, picks in it:
        arr = decode_rgb(images[i].path)
        boxes = images[i].boxes[[j for j, _ in picks]]
        valid, kept, reasons = validate_boxes(boxes, arr.shape[:2], on_invalid="skip")
        for r in reasons:
            log.info("%s: skipped exemplar box: %s", images[i].path, r)
        if len(valid) == 0:
            continue
        crops = crop_boxes(arr, valid, config=cfg)
        mem.add(encoder.embed_pixels(crops), [picks[int(k)][1] for k in kept],
                sources=[f"{images[i].path}#box{picks[int(k)][0]}" for k in kept])
    return mem


def evaluate_detection(
    dataset: str | os.PathLike,
    *,
    encoder: Encoder,
    shots: int,
    seed: int = 0,
    k: int = 5,
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
        The fields of `rar_edge.evaluate.evaluate_classification` plus per-class accuracy and the
        crop settings used.
    """
    from .datasets import read_detection_dataset
    from .evaluate import describe_ranker, latency_summary, score_results

    from .boxes import validate_boxes

    _, images = read_detection_dataset(dataset)
    support_idx, query_idx = _split_images(len(images), seed)
    cfg = _crop_config(encoder, crop_scale, blur_sigma_px)
    mem = _crop_memory(images, str(dataset), encoder=encoder, shots=shots, seed=seed, image_indices=support_idx,
                       cfg=cfg, progress=progress)
    if queries is not None:
        _, qimages = read_detection_dataset(queries)
    else:
        qimages = [images[i] for i in query_idx]
    pipe = Pipeline(memory=mem, encoder=encoder, ranker=ranker, config=PipelineConfig(k=k, encoder=encoder.config,
                                                                                       crop=cfg, gate_margin=gate_margin))
    results, truths = [], []
    it: Any = [im for im in qimages if len(im.boxes)]
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="classifying boxes", unit="img")
    skipped = 0
    for im in it:
        arr = decode_rgb(im.path)
        _, kept, _ = validate_boxes(im.boxes, arr.shape[:2], on_invalid="skip")
        skipped += len(im.boxes) - len(kept)
        dets = pipe.detect(arr, im.boxes[kept], k=k)  # all valid now: nothing is validated away twice
        results.extend(dets)
        truths.extend(im.labels[int(j)] for j in kept)
    if not results:
        raise DatasetError(f"{queries if queries is not None else dataset}: no query boxes to classify "
                           "(the query images hold no valid labelled boxes)")
    out = score_results(results, truths, k=k, ranker_given=ranker is not None)
    known = set(mem.classes)
    out.update({
        "latency_ms": latency_summary([dict(r.timings_ms) for r in results]),
        "setup": {"dataset": str(dataset), "queries": None if queries is None else str(queries), "shots": shots,
                  "seed": seed, "k": k, "memory_entries": mem.size, "memory_classes": len(mem.classes),
                  "query_boxes_with_class_not_in_memory": sum(1 for t in truths if t not in known),
                  "invalid_boxes_skipped": skipped, "gate_margin": gate_margin,
                  "ranker": describe_ranker(ranker),
                  "crop": {"out_size_px": cfg.out_size_px, "crop_scale": cfg.crop_scale,
                           "blur_sigma_px": cfg.blur_sigma_px, "letterbox": cfg.letterbox},
                  "encoder": encoder.describe()},
    })
    return out
