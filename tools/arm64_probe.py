"""Classify and detect on the shared photos through the public API; prints one JSON object.

The same script runs on the x86-64 development machine and inside the emulated arm64 root
(tools/arm64_check.sh), so the two outputs can be compared field by field
(tests/test_arm64_emulated.py). It says nothing about speed.

    python tools/arm64_probe.py --encoder MODEL_DIR --shared SHARED_DIR [--queries 17] [--det-images 6]

Classification: a 4-shot, seed-0 memory of Oxford Flowers 17 and, as queries, the first photo (by name) of
each class that is not in the memory. Detection: a 2-shot, seed-0 memory of COCO128 box crops sampled from
the first 64 images, and every labelled box of the next ``--det-images`` images as queries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np


def _round(x: float) -> float:
    return float(f"{x:.6f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True, help="an exported encoder folder (e.g. .cache/models/mobilenet)")
    ap.add_argument("--shared", required=True, help="the shared folder holding data/flowers17 and data/coco128")
    ap.add_argument("--queries", type=int, default=17, help="flower queries (one per class, at most 17)")
    ap.add_argument("--det-images", type=int, default=6, help="COCO128 images whose boxes are classified")
    args = ap.parse_args(argv)

    import rar_edge
    from rar_edge import _native
    from rar_edge.datasets import few_shot_split, read_yolo_dataset
    from rar_edge.index.build import memory_from_boxes

    shared = Path(args.shared)
    flowers, coco = shared / "data" / "flowers17", shared / "data" / "coco128"
    enc = rar_edge.Encoder(args.encoder)
    out: dict = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "native": {k: v for k, v in _native.build_info().items() if k in ("compiled", "selected")},
        "providers": enc.providers,
    }

    # One photo's model input: the decode + resize path (libjpeg-turbo's SIMD IDCT differs per machine).
    first = sorted(next(p for p in sorted(flowers.iterdir()) if p.is_dir()).glob("*.jpg"))[0]
    pixels = enc.preprocess(enc.decode(first))
    out["pixels"] = {
        "photo": first.name,
        "shape": list(pixels.shape),
        "sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
    }

    mem = rar_edge.Memory.from_folder(flowers, encoder=enc, shots=4, seed=0, progress=False)
    split = few_shot_split(flowers, shots=4, seed=0)
    support = {p for ps in split.support.values() for p in ps}
    queries = []
    for cls_dir in sorted(p for p in flowers.iterdir() if p.is_dir())[: args.queries]:
        queries.append(next(p for p in sorted(cls_dir.glob("*.jpg")) if p not in support))
    with rar_edge.Pipeline(memory=mem, encoder=enc) as pipe:
        out["classify"] = [
            {
                "photo": f"{q.parent.name}/{q.name}",
                "label": r.label,
                "score": _round(r.score),
                "candidates": [c.label for c in r.candidates],
                "scores": [_round(c.score) for c in r.candidates],
            }
            for q, r in ((q, pipe.classify(q, k=5)) for q in queries)
        ]

    _, images = read_yolo_dataset(coco)
    box_mem = memory_from_boxes(coco, encoder=enc, shots=2, seed=0, image_indices=np.arange(64))
    dets = []
    with rar_edge.Pipeline(memory=box_mem, encoder=enc) as pipe:
        for im in images[64 : 64 + args.det_images]:
            if len(im.boxes) == 0:
                continue
            for truth, d in zip(im.labels, pipe.detect(im.path, im.boxes, k=5)):
                dets.append(
                    {
                        "image": im.path.name,
                        "truth": truth,
                        "label": d.label,
                        "score": _round(d.score),
                        "candidates": [c.label for c in d.candidates],
                    }
                )
    out["detect"] = dets
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
