"""Photo file -> model input pixels: rar_edge's decode + resize vs Pillow and OpenCV written as a user would.

The stage every classify() call pays before the encoder: read a JPEG from disk, decode it, resize it to
the encoder's 224x224 input (MobileNet's spec: stretched, antialiased bilinear), as HxWx3 uint8 RGB.

* rar_edge: `decode_rgb` (libjpeg-turbo via simplejpeg, decoded straight into numpy at the DCT scale
  Pillow's draft mode would pick) + `resize_for_model` (the native resampler).
* Pillow, draft: `Image.open`, `draft("RGB", (224, 224))`, `resize(BILINEAR)`, `np.asarray`: what a user
  who knows about draft mode writes.
* Pillow: the same without `draft` (full-size decode), the usual way.
* OpenCV: `cv2.imread`, `cvtColor(BGR2RGB)`, `cv2.resize(INTER_AREA)`.

Times are per photo (median over repeats of the mean over all photos), one thread, the four methods
interleaved within each repeat. PSNR compares each output with the full-size Pillow output photo by
photo: what decoding at reduced DCT scale costs in fidelity.

    python benchmarks/decode.py --json artifacts/decode.json [--limit N] [--repeats R]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median_ms, photo_bench_args, shared_dir, write_json  # noqa: E402

SIZE = 224


def main() -> None:
    args = photo_bench_args(__doc__)

    import cv2
    from PIL import Image

    from rar_edge.image.codec import decode_rgb
    from rar_edge.image.transform import draft_size, resize_for_model
    from rar_edge.manifest import ImageSpec

    root = shared_dir() / "data" / "flowers17"
    paths = sorted(root.rglob("*.jpg"))[: args.limit]
    if not paths:
        raise SystemExit(f"no photos under {root} (set RAR_EDGE_SHARED)")
    cv2.setNumThreads(1)
    spec = ImageSpec(
        size_px=(SIZE, SIZE), dtype="uint8", layout="NHWC", resize_mode="squash", crop_mode="none", resample="bilinear"
    )
    draft = draft_size(spec)

    def rar_edge_one(p: Path) -> np.ndarray:
        return resize_for_model(decode_rgb(p, draft_size_px=draft), spec)

    def pillow_one(p: Path, use_draft: bool) -> np.ndarray:
        with Image.open(p) as im:
            if use_draft:
                im.draft("RGB", (SIZE, SIZE))
            return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))

    def opencv_one(p: Path) -> np.ndarray:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (SIZE, SIZE), interpolation=cv2.INTER_AREA)

    methods = {
        "rar_edge": rar_edge_one,
        "pillow_draft": lambda p: pillow_one(p, True),
        "pillow": lambda p: pillow_one(p, False),
        "opencv": opencv_one,
    }
    t = interleaved_median_ms(
        {name: (lambda fn=fn: [fn(p) for p in paths]) for name, fn in methods.items()}, repeats=args.repeats, warmup=1
    )
    per_photo = {name: ms / len(paths) for name, ms in t.items()}

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)

    reference = [pillow_one(p, False) for p in paths]
    quality = {}
    for name in ("rar_edge", "pillow_draft", "opencv"):
        ps = [psnr(methods[name](p), ref) for p, ref in zip(paths, reference)]
        quality[name] = {"psnr_db_min": round(min(ps), 2), "psnr_db_median": round(float(np.median(ps)), 2)}
    # The decoded pixels equal Pillow's draft decode (tests/test_preprocess.py); the resize is the native one.
    vs_draft = [psnr(rar_edge_one(p), pillow_one(p, True)) for p in paths]

    write_json(
        args.json,
        {
            "per_photo_ms": {k: round(v, 4) for k, v in per_photo.items()},
            "speedup_vs": {k: round(per_photo[k] / per_photo["rar_edge"], 2) for k in per_photo if k != "rar_edge"},
            "psnr_vs_full_size_pillow": quality,
            "psnr_rar_edge_vs_pillow_draft": {
                "psnr_db_min": round(min(vs_draft), 2),
                "psnr_db_median": round(float(np.median(vs_draft)), 2),
            },
            "photos": len(paths),
            "mean_file_kb": round(float(np.mean([p.stat().st_size for p in paths])) / 1024, 1),
            "out_size_px": SIZE,
            "threads": 1,
            "repeats": args.repeats,
            "opencv": cv2.__version__,
            "pillow": Image.__version__,
        },
    )


if __name__ == "__main__":
    main()
