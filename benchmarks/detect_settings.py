"""Crop settings for RAR's detection path: blur on/off x crop scales, over several seeds.

Runs `rar_edge.tools.evaluate.evaluate_detection` (few-shot crop memory from half of the images, every box
of the other half classified, retrieval only) for each setting and seed, and prints JSON with each
run and the mean over seeds. This is what chose the SDK's default `CropConfig`.

    python benchmarks/detect_settings.py --encoder MODEL_DIR [--dataset ../shared/data/coco128] --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True, help="image encoder model folder (e.g. the exported MobileNet)")
    ap.add_argument("--dataset", default=str(shared_dir() / "data" / "coco128"))
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scales", nargs="+", default=["1.0", "1.5", "adaptive"])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 4.0])
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from rar_edge import Encoder
    from rar_edge.tools.evaluate import evaluate_detection

    enc = Encoder(args.encoder)
    runs, summary = [], []
    for scale in args.scales:
        for sigma in args.sigmas:
            if scale == "1.0" and sigma > 0 and 0.0 in args.sigmas:
                continue  # a crop of exactly the box has no context to blur: same as sigma 0
            per_seed = []
            for seed in args.seeds:
                res = evaluate_detection(
                    args.dataset,
                    encoder=enc,
                    shots=args.shots,
                    seed=seed,
                    k=args.k,
                    crop_scale=scale,
                    blur_sigma_px=sigma,
                )
                row = {
                    "crop_scale": scale,
                    "blur_sigma_px": sigma,
                    "seed": seed,
                    "top1": res["top1"],
                    f"recall{args.k}": res["recall"][str(args.k)],
                    "n_queries": res["n_queries"],
                    "query_boxes_with_class_not_in_memory": res["setup"]["query_boxes_with_class_not_in_memory"],
                }
                runs.append(row)
                per_seed.append(row)
                print(json.dumps(row), file=sys.stderr)
            summary.append(
                {
                    "crop_scale": scale,
                    "blur_sigma_px": sigma,
                    "top1_mean": statistics.mean(r["top1"] for r in per_seed),
                    f"recall{args.k}_mean": statistics.mean(r[f"recall{args.k}"] for r in per_seed),
                }
            )
    out = {
        "dataset": args.dataset,
        "encoder": enc.describe()["name"],
        "shots": args.shots,
        "seeds": args.seeds,
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
