"""Few-shot memories of box crops (RAR's detection path): labelled boxes cropped, blurred around, embedded.

The zero-shot detection memory is `Memory.from_class_names` (crops are matched image-to-text).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import numpy as np

from rar_edge.encoders import Encoder
from rar_edge.errors import DatasetError
from rar_edge.image.codec import decode_rgb
from rar_edge.index.memory import HnswParams, Memory

log = logging.getLogger("rar_edge")


def crop_config(encoder: Encoder, crop_scale: float | str | None, blur_sigma_px: float | None):
    from rar_edge.image.boxes import CropConfig

    cfg = CropConfig(out_size_px=encoder.image_spec.size_px[0])
    if crop_scale is not None:
        cfg = replace(cfg, crop_scale=crop_scale if crop_scale == "adaptive" else float(crop_scale))
    if blur_sigma_px is not None:
        cfg = replace(cfg, blur_sigma_px=float(blur_sigma_px))
    return cfg


def split_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
    from rar_edge.datasets import read_detection_dataset, warn_invalid_boxes

    _, images = read_detection_dataset(dataset)
    warn_invalid_boxes(images, str(dataset))
    return crop_memory(
        images,
        str(dataset),
        encoder=encoder,
        shots=shots,
        seed=seed,
        image_indices=image_indices,
        cfg=crop_config(encoder, crop_scale, blur_sigma_px),
        backend=backend,
        hnsw=hnsw,
        progress=progress,
    )


def select_box_exemplars(
    images: list, name: str, *, shots: int | None, seed: int, image_indices: np.ndarray | None
) -> list[tuple[int, list[tuple[int, str]]]]:
    """The boxes a crop memory takes: ``shots`` random labelled boxes per class (seeded), all when None.

    Args:
        images: the dataset's `BoxImage` list.
        name: the dataset's name, for errors.
        image_indices: restrict sampling to these images (in reading order).

    Returns:
        (image index, [(box index, class name), ...]) in image order, boxes in the order their crops are
        added: the entry order of the memory (`crop_memory`, and the Ray build of `rar_edge.tools.distributed`).
    """
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
        pick = (
            range(len(items)) if shots is None or shots >= len(items) else rng.choice(len(items), shots, replace=False)
        )
        for t in sorted(int(x) for x in pick):
            i, j = items[t]
            chosen.setdefault(i, []).append((j, lbl))
    return sorted(chosen.items())


def exemplar_crops(
    image: Any, boxes: np.ndarray, picks: list[tuple[int, str]], cfg: Any
) -> tuple[np.ndarray, list[str], list[str]]:
    """The crops of one image's chosen boxes, with their labels and sources; invalid boxes are skipped (logged).

    Args:
        image: what `decode_rgb` takes (the image's path, or its encoded bytes).
        boxes: (len(picks), 4) the chosen boxes, in pixels.
        picks: (box index, class name) of each chosen box (`select_box_exemplars`).
        cfg: the `CropConfig`.

    Returns:
        (N, S, S, 3) uint8 crops, their class names, their sources (``PATH#boxJ``); N may be 0.
    """
    from rar_edge.image.boxes import crop_valid_boxes, validate_boxes

    arr = decode_rgb(image)
    what = image if isinstance(image, (str, os.PathLike)) else "<bytes>"
    valid, kept, reasons = validate_boxes(boxes, arr.shape[:2], on_invalid="skip")
    for r in reasons:
        log.info("%s: skipped exemplar box: %s", what, r)
    if len(valid) == 0:
        return np.zeros((0, cfg.out_size_px, cfg.out_size_px, 3), np.uint8), [], []
    return (
        crop_valid_boxes(arr, valid, config=cfg),
        [picks[int(k)][1] for k in kept],
        [f"{what}#box{picks[int(k)][0]}" for k in kept],
    )


def crop_memory(
    images: list,
    name: str,
    *,
    encoder: Encoder,
    shots: int | None,
    seed: int,
    image_indices: np.ndarray | None,
    cfg: Any,
    backend: str = "auto",
    hnsw: HnswParams | None = None,
    progress: bool = False,
) -> Memory:
    chosen = select_box_exemplars(images, name, shots=shots, seed=seed, image_indices=image_indices)
    mem = Memory.empty(encoder=encoder, backend=backend, hnsw=hnsw)
    it: Any = chosen
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="cropping exemplars", unit="img", disable=None)  # None: quiet off a terminal
    for i, picks in it:
        boxes = images[i].boxes[[j for j, _ in picks]]
        crops, labels, sources = exemplar_crops(images[i].path, boxes, picks, cfg)
        if len(crops):
            mem.add(encoder.embed_pixels(crops), labels, sources=sources)
    return mem
