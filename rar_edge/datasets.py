"""Dataset readers: image folders (one sub-folder per class), YOLO txt and COCO json boxes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rar_edge.errors import DatasetError, InvalidInputError
from rar_edge.image.codec import decode_rgb, load_image, upright_size
from rar_edge.labels import normalize_label

log = logging.getLogger("rar_edge")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def read_image_folder(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Lists a class-per-sub-folder dataset.

    Returns:
        class name -> sorted image paths, classes in sorted order.

    Raises:
        DatasetError: the folder is missing, has no class sub-folders, or a class has no images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"no such folder: {root}")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected one folder of images per class)")
    out: dict[str, list[Path]] = {}
    for d in classes:
        imgs = sorted(p for p in d.iterdir() if _is_image(p))
        if not imgs:
            raise DatasetError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        # NFC: a folder name written in decomposed form (macOS) is the same class as its composed form
        out.setdefault(normalize_label(d.name), []).extend(imgs)
    return {c: sorted(ps) for c, ps in sorted(out.items())}


@dataclass(frozen=True)
class FewShotSplit:
    """A seeded few-shot split of an image folder.

    Attributes:
        support: class -> the sampled shots (the memory's entries).
        queries: (path, class) of every image not sampled, in a stable order.
    """

    support: dict[str, list[Path]]
    queries: list[tuple[Path, str]]


def few_shot_split(folder: str | os.PathLike, *, shots: int | None, seed: int = 0) -> FewShotSplit:
    """Samples ``shots`` images per class at random (seeded); the rest are queries.

    Args:
        folder: class-per-sub-folder dataset.
        shots: images per class for the memory; None takes every image (no queries).
        seed: the sampling seed; the same (folder, shots, seed) always gives the same split.

    Raises:
        DatasetError: as `read_image_folder`, or shots < 1.
    """
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1):
        raise DatasetError(f"shots (images per class) must be an integer >= 1, or None for every image; got {shots!r}")
    data = read_image_folder(folder)
    short = {c: len(ps) for c, ps in data.items() if shots is not None and len(ps) < shots}
    if short:
        names = ", ".join(f"{c} ({n})" for c, n in list(short.items())[:10]) + (", ..." if len(short) > 10 else "")
        log.warning(
            "%d of %d classes have fewer than %d images (shots), so the memory is unbalanced: %s",
            len(short),
            len(data),
            shots,
            names,
        )
    rng = np.random.default_rng(seed)
    support: dict[str, list[Path]] = {}
    queries: list[tuple[Path, str]] = []
    for cls, paths in data.items():
        if shots is None or shots >= len(paths):
            chosen = set(range(len(paths)))
        else:
            chosen = set(int(i) for i in rng.choice(len(paths), size=shots, replace=False))
        support[cls] = [paths[i] for i in sorted(chosen)]
        queries.extend((paths[i], cls) for i in range(len(paths)) if i not in chosen)
    return FewShotSplit(support=support, queries=queries)


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (blank lines and # comments skipped); refuses duplicates."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark (Notepad) is not a name
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read class list {p}: {e}") from e
    names = [normalize_label(ln.strip()) for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise DatasetError(f"{p} lists no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{p} lists these class names more than once (after Unicode NFC normalisation): {dup}")
    return names


def warn_invalid_boxes(images: list["BoxImage"], name: str) -> int:
    """Counts the labelled boxes with a NaN/inf coordinate or a zero or negative size, and warns once with the
    count and the first few files; returns the count. They are left out where boxes are used."""
    bad: list[tuple[Path, int]] = []
    for im in images:
        b = im.boxes
        if len(b):
            with np.errstate(invalid="ignore"):
                n = int(np.sum(~np.isfinite(b).all(axis=1) | ~(b[:, 2] > b[:, 0]) | ~(b[:, 3] > b[:, 1])))
            if n:
                bad.append((im.path, n))
    total = sum(n for _, n in bad)
    if total:
        first = ", ".join(f"{p.name} ({n})" for p, n in bad[:5]) + (", ..." if len(bad) > 5 else "")
        log.warning(
            "%s: %d labelled boxes in %d images have a NaN coordinate or a zero or negative size and are left out: %s",
            name,
            total,
            len(bad),
            first,
        )
    return total


@dataclass(frozen=True)
class BoxImage:
    """One image of a detection dataset with its boxes in pixels (x1, y1, x2, y2) and class names."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) float64
    labels: tuple[str, ...]


def _yolo_rows(
    text: str, path: Path, width: float, height: float, *, need_class: bool
) -> list[tuple[int, int | None, tuple[float, float, float, float]]]:
    """The lines of a YOLO label file as (line number, class or None, x1 y1 x2 y2 in pixels).

    ``need_class``: a dataset's label line is ``class cx cy w h``; a box file may leave the class out.
    """
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 and (need_class or len(parts) != 4):
            # more columns: a segmentation polygon or a keypoint label, not a box
            want = "class cx cy w h" if need_class else "[class] cx cy w h"
            raise DatasetError(f"{path}:{n}: expected '{want}' (a detection label), got {line!r}")
        try:
            c = int(parts[0]) if need_class else None  # a box file's class column is not read
            cx, cy, bw, bh = (float(v) for v in parts[-4:])
        except ValueError as e:
            raise DatasetError(f"{path}:{n}: not numbers: {line!r}") from e
        rows.append(
            (n, c, ((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height))
        )
    return rows


def read_yolo_dataset(folder: str | os.PathLike) -> tuple[list[str], list[BoxImage]]:
    """Reads a YOLO folder: images/, labels/ (``class cx cy w h`` normalised), classes.txt.

    Returns:
        (class names, images with their boxes in pixels); images without a label file have no boxes.
    """
    from PIL import Image

    root = Path(folder)
    names = read_class_names(root / "classes.txt")
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DatasetError(f"{root} has no images/ folder (YOLO layout: images/, labels/, classes.txt)")
    out: list[BoxImage] = []
    for ip in sorted(p for p in img_dir.iterdir() if _is_image(p)):
        try:
            with Image.open(ip) as im:
                w, h = upright_size(im)  # YOLO labels are normalised to the upright image (EXIF orientation applied)
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            raise DatasetError(f"{ip} is not a readable image: {e}") from e
        lp = lab_dir / (ip.stem + ".txt")
        boxes, labels = [], []
        if lp.is_file():
            for n, c, box in _yolo_rows(lp.read_text(encoding="utf-8"), lp, w, h, need_class=True):
                if not 0 <= c < len(names):
                    raise DatasetError(f"{lp}:{n}: class {c} not in classes.txt ({len(names)} classes)")
                boxes.append(box)
                labels.append(names[c])
        out.append(BoxImage(ip, w, h, np.asarray(boxes, np.float64).reshape(-1, 4), tuple(labels)))
    if not out:
        raise DatasetError(f"{img_dir} holds no images")
    return names, out


def read_coco_json(
    path: str | os.PathLike, *, images_dir: str | os.PathLike | None = None
) -> tuple[list[str], list[BoxImage]]:
    """Reads COCO instances json (``bbox`` = x, y, w, h in pixels).

    Args:
        path: the annotation file.
        images_dir: where ``file_name`` paths are relative to (default: the json's folder).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        cats = {int(c["id"]): normalize_label(str(c["name"])) for c in data["categories"]}
        imgs = {int(i["id"]): i for i in data["images"]}
        anns = data.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"cannot read COCO json {p}: {e}") from e
    base = Path(images_dir) if images_dir is not None else p.parent
    per: dict[int, list[tuple[tuple[float, ...], str]]] = {i: [] for i in imgs}
    for i, a in enumerate(anns):
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            per.setdefault(int(a["image_id"]), []).append(((x, y, x + w, y + h), cats[int(a["category_id"])]))
        except (KeyError, ValueError, TypeError) as e:
            raise DatasetError(f"{p}: annotation {i} ({a!r:.120}) is not a box with a known category: {e!r}") from e
    out = []
    for iid, info in sorted(imgs.items()):
        items = per.get(iid, [])
        out.append(
            BoxImage(
                base / info["file_name"],
                int(info.get("width", 0)),
                int(info.get("height", 0)),
                np.asarray([b for b, _ in items], np.float64).reshape(-1, 4),
                tuple(lbl for _, lbl in items),
            )
        )
    return [cats[k] for k in sorted(cats)], out


def read_detection_dataset(path: str | os.PathLike) -> tuple[list[str], list[BoxImage]]:
    """A YOLO folder or a COCO json file, whichever ``path`` is."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        return read_coco_json(p)
    if p.is_dir():
        return read_yolo_dataset(p)
    raise DatasetError(f"{p} is neither a YOLO folder (images/, labels/, classes.txt) nor a COCO .json file")


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
        rows = [box for _, _, box in _yolo_rows(text, p, w, h, need_class=False)]
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
    matches = [
        im.get("id")
        for im in coco.get("images", [])
        if isinstance(im, dict) and name is not None and Path(str(im.get("file_name", ""))).name == name
    ]
    if len(matches) != 1:
        raise InvalidInputError(
            f"{p} holds boxes of {len(ids)} images and none is named "
            f"{name or '(no image path given)'!r}: pass that image, or a file of its boxes only"
        )
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
