"""Shared helpers for the benchmark scripts: timing with medians, clustered data, the shared data folder."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np


def shared_dir() -> Path:
    """The read-only ../shared folder beside the checkout (env RAR_EDGE_SHARED overrides)."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get("RAR_EDGE_SHARED", default))


def photo_bench_args(doc: str | None) -> argparse.Namespace:
    """--json, --limit and --repeats: the options of the scripts that time a pass over shared photos."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--limit", type=int, default=None, help="first N photos only")
    ap.add_argument("--repeats", type=int, default=5)
    return ap.parse_args()


def median_ms(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (ms) of each function, the functions taking turns within every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def percentile_ms(samples_ms: list[float], q: float) -> float:
    """The q-th percentile (0..100) of per-call timings."""
    return float(np.percentile(np.asarray(samples_ms), q))


def clustered(
    n: int,
    n_classes: int,
    dim: int,
    *,
    n_queries: int,
    seed: int,
    shared_weight: float = 1.0,
    entry_noise: float = 0.6,
    query_noise: float = 0.8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit vectors resembling image embeddings (never i.i.d. Gaussian).

    Every class has a centroid that shares a common direction with all others (cosine ~0.5 between
    centroids, as CLIP embeddings do); entries and queries are centroid + isotropic noise, normalised.

    Returns:
        (vectors float32 (n, dim), labels int32 (n,), queries float32 (n_queries, dim)).
    """
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim)
    common /= np.linalg.norm(common)
    cent = shared_weight * common + rng.standard_normal((n_classes, dim)) / np.sqrt(dim)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, max(n - n_classes, 0))])[:n]
    labels = rng.permutation(labels).astype(np.int32)
    # In row chunks (the same draws in the same order as one call): 1M x 512 needs 2 GB, not 12 GB of float64
    vec = np.empty((n, dim), np.float32)
    for b in range(0, n, 65536):
        e = min(n, b + 65536)
        chunk = cent[labels[b:e]] + entry_noise * rng.standard_normal((e - b, dim)) / np.sqrt(dim)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        vec[b:e] = chunk
    qlab = rng.integers(0, n_classes, n_queries)
    qs = cent[qlab] + query_noise * rng.standard_normal((n_queries, dim)) / np.sqrt(dim)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    return vec, labels, qs.astype(np.float32)


def shared_photo_embeddings(encoder_dir: str | Path, *, cache_dir: str | Path = ".cache/bench") -> np.ndarray:
    """Real embeddings of the shared photos: every Oxford flower and COCO128 photo and its mirror image.

    (2 x (680 + 128) rows, the encoder's dim), float32 unit rows. Cached under cache_dir, keyed by the
    encoder's fingerprint. Raises SystemExit when ../shared/data is absent.
    """
    from PIL import Image, ImageOps

    from rar_edge.encoders import Encoder

    data = shared_dir() / "data"
    paths = sorted((data / "flowers17").glob("*/*.jpg")) + sorted((data / "coco128" / "images").rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no photos under {data}: the real-embedding data needs ../shared/data")
    enc = Encoder(encoder_dir)
    cache = Path(cache_dir) / f"shared_photos_{enc.fingerprint[:16]}_{len(paths)}.npy"
    if cache.is_file():
        return np.load(cache)
    rows = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            pair = [enc.preprocess(enc.decode(im)), enc.preprocess(enc.decode(ImageOps.mirror(im)))]
        rows.append(enc.embed_pixels(np.stack(pair)))
    base = np.concatenate(rows).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, base)
    return base


def replicated(
    base: np.ndarray, n: int, n_classes: int, *, n_queries: int, seed: int, sigma: float = 0.4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real embeddings replicated with noise: class c is base row c; its entries and the queries are that row
    times exp(sigma * N(0, 1)) per value, renormalised. The multiplicative noise keeps the real rows' sign
    pattern and sparsity (ReLU features stay non-negative and zeros stay zero); at sigma = 0.4 two replicas
    of one row have cosine about exp(-sigma^2) = 0.85. Same return as `clustered`."""
    if n_classes > len(base):
        raise ValueError(f"{n_classes} classes need {n_classes} base rows, have {len(base)}")
    rng = np.random.default_rng(seed)
    cent = base[rng.permutation(len(base))[:n_classes]].astype(np.float32)
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, max(n - n_classes, 0))])[:n]
    labels = rng.permutation(labels).astype(np.int32)
    dim = base.shape[1]

    def noisy(lab: np.ndarray) -> np.ndarray:
        x = cent[lab] * np.exp(sigma * rng.standard_normal((len(lab), dim), dtype=np.float32))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    vec = np.empty((n, dim), np.float32)
    for b in range(0, n, 65536):
        vec[b : b + 65536] = noisy(labels[b : b + 65536])
    qs = noisy(rng.integers(0, n_classes, n_queries))
    return vec, labels, qs.astype(np.float32)


def write_json(path: str | None, obj: dict) -> None:
    """Print obj as JSON and write it to path when given."""
    text = json.dumps(obj, indent=2, sort_keys=False)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
