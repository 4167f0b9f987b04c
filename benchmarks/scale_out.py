"""Memory building at scale: `rar-edge memory build` on the local path and on Ray Data with 1 and 2 actors.

Generates N small JPEGs once (varied content: per-class colour and shape families, random placement,
noise; one sub-folder per class) into a folder outside the repository, then times each engine as its own
``rar-edge memory build`` process, sampling that process's RSS (the driver's) and the RSS of everything it
started (Ray's GCS, raylet, workers and actors) every half second. Each Ray build is checked against the
local one (same entries, labels and sources; the largest vector difference).

The driver's RSS necessarily grows by the memory it builds (N x dim float32 vectors, plus labels and
sources); streaming means it grows by that and not by the images: ``vectors_mb`` is printed beside it.

    python benchmarks/scale_out.py --encoder models/mobilenet --n 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

SIZE_PX = 96


def generate(folder: Path, n: int, *, classes: int, seed: int = 0) -> float:
    """Writes n JPEGs (n // classes per class) unless a complete set with these settings is there; seconds spent."""
    from PIL import Image, ImageDraw, ImageFilter

    marker = folder / ".complete.json"
    want = {"n": n, "classes": classes, "seed": seed, "size_px": SIZE_PX}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    per = n // classes
    for c in range(classes):
        d = folder / f"class_{c:04d}"
        d.mkdir(parents=True, exist_ok=True)
        crng = np.random.default_rng(seed * 100_003 + c)
        base = crng.integers(0, 256, 3)
        shape = c % 3  # the class's family: ellipses, rectangles or lines
        for i in range(per):
            bg = tuple(int(v) for v in np.clip(base + rng.normal(0, 25, 3), 0, 255))
            im = Image.new("RGB", (SIZE_PX, SIZE_PX), bg)
            draw = ImageDraw.Draw(im)
            for _ in range(int(rng.integers(2, 7))):
                x0, y0 = (int(v) for v in rng.integers(0, SIZE_PX - 10, 2))
                x1, y1 = x0 + int(rng.integers(8, 60)), y0 + int(rng.integers(8, 60))
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                if shape == 0:
                    draw.ellipse((x0, y0, x1, y1), fill=fill)
                elif shape == 1:
                    draw.rectangle((x0, y0, x1, y1), fill=fill)
                else:
                    draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(2, 8)))
            noise = rng.integers(-12, 13, (SIZE_PX, SIZE_PX, 3))
            arr = np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8)
            im = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))
            im.save(d / f"img_{i:06d}.jpg", quality=int(rng.integers(70, 95)))
    marker.write_text(json.dumps(want))
    return time.perf_counter() - t0


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _descendants(pid: int) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                parent[int(d)] = int(s[s.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out.extend(frontier)
    return out


def run_build(cmd: list[str], *, period_s: float = 0.5) -> dict:
    """Runs one build process; wall time, the driver's peak RSS and RSS over time, all processes' peak RSS."""
    samples: list[tuple[float, int]] = []
    peak = {"driver_hwm_kb": 0, "all_kb": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            rss, hwm = _rss_kb(proc.pid)
            if rss:
                samples.append((time.perf_counter() - t0, rss))
                peak["driver_hwm_kb"] = max(peak["driver_hwm_kb"], hwm)
                total = rss + sum(_rss_kb(p)[0] for p in _descendants(proc.pid))
                peak["all_kb"] = max(peak["all_kb"], total)
            done.wait(period_s)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    # RSS at each tenth of the run: flat apart from the growing vectors when the build streams.
    timeline = []
    for q in np.linspace(0.1, 1.0, 10):
        before = [r for t, r in samples if t <= q * wall]
        timeline.append(round(before[-1] / 1024, 1) if before else None)
    return {
        "wall_s": round(wall, 2),
        "driver_peak_rss_mb": round(peak["driver_hwm_kb"] / 1024, 1),
        "driver_rss_mb_each_tenth": timeline,
        "all_processes_peak_rss_mb": round(peak["all_kb"] / 1024, 1),
        "stdout": out.strip().splitlines()[-1:],
    }


def compare(a_path: Path, b_path: Path) -> dict:
    from rar_edge.index.memory import Memory

    a, b = Memory.load(a_path), Memory.load(b_path)
    same = a.size == b.size
    return {
        "entries": [a.size, b.size],
        "labels_equal": a.labels == b.labels,
        "sources_equal": a.sources == b.sources,
        "max_abs_dv": float(np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max()) if same else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="encoder model folder (rar-edge export tflite ...)")
    ap.add_argument("--n", type=int, default=100_000, help="images to generate and embed")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dir", default="/tmp/rar_scale", help="where the images go (outside the repository)")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Ray pool sizes to time")
    ap.add_argument("--ray-batch-size", type=int, default=64)
    ap.add_argument("--no-local", action="store_true", help="skip the local build (and the comparisons)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    folder = Path(args.dir) / f"n{args.n}_c{args.classes}"
    gen_s = generate(folder, args.n, classes=args.classes)
    n = (args.n // args.classes) * args.classes
    out_dir = Path(args.dir) / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [
        sys.executable,
        "-m",
        "rar_edge",
        "-q",
        "memory",
        "build",
        str(folder),
        "--encoder",
        args.encoder,
        "--overwrite",
    ]
    from rar_edge.encoders import Encoder

    dim = Encoder(args.encoder).dim
    runs: dict[str, dict] = {}
    if not args.no_local:
        runs["local"] = run_build([*base, "-o", str(out_dir / "local.rarmem")])
    for a in args.actors:
        runs[f"ray_{a}_actors"] = run_build(
            [
                *base,
                "-o",
                str(out_dir / f"ray{a}.rarmem"),
                "--engine",
                "ray",
                "--ray-concurrency",
                str(a),
                "--ray-batch-size",
                str(args.ray_batch_size),
            ]
        )
        if not args.no_local:
            runs[f"ray_{a}_actors"]["equals_local"] = compare(out_dir / "local.rarmem", out_dir / f"ray{a}.rarmem")
    for r in runs.values():
        r["images_per_s"] = round(n / r["wall_s"], 1)
    summary = {
        "images": n,
        "classes": args.classes,
        "image_px": SIZE_PX,
        "folder": str(folder),
        "generate_s": round(gen_s, 1),
        "cpus": os.cpu_count(),
        "load_avg_after": os.getloadavg(),
        "vectors_mb": round(n * dim * 4 / 2**20, 1),
        "runs": runs,
    }
    if "local" in runs:
        summary["speedup_vs_local"] = {
            k: round(runs["local"]["wall_s"] / v["wall_s"], 3) for k, v in runs.items() if k != "local"
        }
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
