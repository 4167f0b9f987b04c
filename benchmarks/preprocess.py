"""Box crop + blur + resize: rar_edge's native call vs the same operation in OpenCV and in Pillow.

All three cut every labelled box of the COCO128 photos (../shared/data/coco128) with the same geometry
(rar_edge.image.boxes: enlarge x1.5, sigma 4 px blur outside the box, 224 px stretched), single-threaded.
The OpenCV and Pillow versions are written the way a user would: crop view, GaussianBlur, paste the sharp
box back, resize (cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging; Pillow BILINEAR, which
antialiases). Times are the total over the dataset per pass (decoded images in memory; each image's crops
are dropped before the next, as a pipeline that encodes them would), median of repeats, the three methods
interleaved within each repeat so that load from other processes hits them alike.
PSNR compares the native output with the Pillow output box by box.

    python benchmarks/preprocess.py --json artifacts/preprocess.json [--limit N] [--repeats R]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median_ms, photo_bench_args, shared_dir, write_json  # noqa: E402


def load_coco128(limit: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image RGB uint8, boxes float64 (N, 4) in pixels) for every photo with at least one box."""
    from rar_edge.datasets import read_yolo_dataset
    from rar_edge.image.codec import decode_rgb

    root = shared_dir() / "data" / "coco128"
    if not root.is_dir():
        raise SystemExit(f"COCO128 not found at {root} (set RAR_EDGE_SHARED)")
    _, images = read_yolo_dataset(root)
    out = []
    for im in images[:limit]:
        if len(im.boxes):
            out.append((decode_rgb(im.path), im.boxes))  # upright, the frame the boxes are read in
    return out


def geometry(
    box: np.ndarray, h: int, w: int, scale: float
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The crop rectangle and the sharp rectangle (in crop pixels), as rar_edge.image.boxes documents them."""
    x1, y1, x2, y2 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], w), min(box[3], h)
    ix0, iy0 = math.floor(x1), math.floor(y1)
    ix1, iy1 = max(math.ceil(x2), ix0 + 1), max(math.ceil(y2), iy0 + 1)
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    X0, Y0 = min(math.floor(max(cx - hw, 0)), ix0), min(math.floor(max(cy - hh, 0)), iy0)
    X1, Y1 = min(max(math.ceil(min(cx + hw, w)), ix1), w), min(max(math.ceil(min(cy + hh, h)), iy1), h)
    return (X0, Y0, X1, Y1), (ix0 - X0, iy0 - Y0, min(ix1, X1) - X0, min(iy1, Y1) - Y0)


def main() -> None:
    args = photo_bench_args(__doc__)

    import cv2
    from PIL import Image, ImageFilter

    from rar_edge import _native
    from rar_edge.image.boxes import CropConfig, crop_boxes, validate_boxes

    cv2.setNumThreads(1)
    cfg = CropConfig()
    S, sigma, scale = cfg.out_size_px, cfg.blur_sigma_px, float(cfg.crop_scale)
    data = []
    for img, boxes in load_coco128(args.limit):
        valid, _, _ = validate_boxes(boxes, img.shape[:2], on_invalid="skip")
        h, w = img.shape[:2]
        geo = [geometry(b, h, w, scale) for b in valid]
        data.append((img, valid, geo, Image.fromarray(img)))
    n_boxes = sum(len(d[1]) for d in data)

    def run_native(keep: bool = False) -> list[np.ndarray]:
        res = []
        for img, valid, _, _ in data:
            out = crop_boxes(img, valid, config=cfg, threads=1)
            if keep:
                res.append(out)
        return res

    def run_opencv(keep: bool = False) -> list[list[np.ndarray]]:
        res = []
        for img, _, geo, _ in data:
            outs = []
            for (X0, Y0, X1, Y1), (bx0, by0, bx1, by1) in geo:
                crop = img[Y0:Y1, X0:X1]
                blurred = cv2.GaussianBlur(crop, (0, 0), sigma)
                blurred[by0:by1, bx0:bx1] = crop[by0:by1, bx0:bx1]
                interp = cv2.INTER_AREA if (X1 - X0) > S or (Y1 - Y0) > S else cv2.INTER_LINEAR
                outs.append(cv2.resize(blurred, (S, S), interpolation=interp))
            if keep:
                res.append(outs)
        return res

    def run_pillow(keep: bool = False) -> list[list[np.ndarray]]:
        res = []
        for _, _, geo, pil in data:
            outs = []
            for (X0, Y0, X1, Y1), (bx0, by0, bx1, by1) in geo:
                crop = pil.crop((X0, Y0, X1, Y1))
                blurred = crop.filter(ImageFilter.GaussianBlur(sigma))
                blurred.paste(crop.crop((bx0, by0, bx1, by1)), (bx0, by0))
                outs.append(np.asarray(blurred.resize((S, S), Image.BILINEAR)))
            if keep:
                res.append(outs)
        return res

    t = interleaved_median_ms(
        {"native": run_native, "opencv": run_opencv, "pillow": run_pillow}, repeats=args.repeats, warmup=1
    )
    native_ms, opencv_ms, pillow_ms = t["native"], t["opencv"], t["pillow"]

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)

    ps_pil = []
    for nat, pil in zip(run_native(keep=True), run_pillow(keep=True)):
        ps_pil.extend(psnr(nat[i], pil[i]) for i in range(len(pil)))

    write_json(
        args.json,
        {
            "native_ms": round(native_ms, 3),
            "opencv_ms": round(opencv_ms, 3),
            "pillow_ms": round(pillow_ms, 3),
            "speedup_vs_opencv": round(opencv_ms / native_ms, 2),
            "speedup_vs_pillow": round(pillow_ms / native_ms, 2),
            "psnr_db_min": round(min(ps_pil), 2),
            "psnr_db_median": round(float(np.median(ps_pil)), 2),
            "images": len(data),
            "boxes": n_boxes,
            "config": {"out_size_px": S, "crop_scale": scale, "blur_sigma_px": sigma, "letterbox": cfg.letterbox},
            "threads": 1,
            "repeats": args.repeats,
            "simd": _native.build_info()["selected"],
            "opencv": cv2.__version__,
        },
    )


if __name__ == "__main__":
    main()
