"""How `rar_edge.Memory` scales from 1k to 1M entries: exact native scan vs hnswlib HNSW.

For each size it builds one memory per back end through the public API (``Memory(backend="exact")``
and ``Memory(backend="hnsw")``, default storage and `HnswParams`), then measures, one query at a time
as an edge device classifies one image at a time:

* build time (exact: `Memory.add`, which seals the rows into a segment with its int8 copy, + the first
  search; HNSW: the same + `Memory.compact`, which builds one graph over every entry on all cores),
* RAM: bytes held by each structure and the process RSS growth while building it,
* lookup latency p50 / p95 of `Memory.search(q, k=5)`, and the HNSW / exact ratio of medians,
* recall of the top-5 *classes* against a float32 brute-force reference (numpy), for both back ends.

Data: clustered unit vectors (class centroids sharing a common direction, entries and queries are
centroid + noise), never i.i.d. Gaussian, which has no neighbour structure (see FACTS.md).

The HNSW build is the slow part (~100 s at 100k on 2 cores). Sizes whose predicted build time would
overrun ``--budget-s`` are not built; their build time and RAM are *extrapolated* from the largest
measured size (n log n for time, linear for RAM) and marked ``"extrapolated": true``.

Usage::

    .venv/bin/python benchmarks/memory_scaling.py --json artifacts/memory_scaling.json [--max-n 1000000] \
        [--plot artifacts/memory_scaling.png]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)


def clustered_data(
    n: int,
    *,
    n_classes: int,
    dim: int,
    n_queries: int,
    seed: int,
    entry_noise: float = 0.6,
    query_noise: float = 0.8,
    chunk: int = 65_536,
):
    """Clustered unit vectors made in float32 chunks (1M x 512 stays at 2 GB, no float64 copies).

    Centroids share a common direction (cosine ~0.5 between classes, as CLIP embeddings do);
    entries and queries are centroid + isotropic noise, normalised.

    Returns:
        (vectors float32 (n, dim), labels int32 (n,), queries float32 (n_queries, dim), query labels).
    """
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim).astype(np.float32)
    common /= np.linalg.norm(common)
    cent = common + rng.standard_normal((n_classes, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    labels = np.concatenate([np.arange(min(n, n_classes)), rng.integers(0, n_classes, max(n - n_classes, 0))])
    labels = rng.permutation(labels).astype(np.int32)
    vec = np.empty((n, dim), np.float32)
    scale = np.float32(entry_noise / math.sqrt(dim))
    for i in range(0, n, chunk):
        part = cent[labels[i : i + chunk]] + scale * rng.standard_normal((min(chunk, n - i), dim), dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        vec[i : i + chunk] = part
    qlab = rng.integers(0, n_classes, n_queries)
    qs = cent[qlab] + np.float32(query_noise / math.sqrt(dim)) * rng.standard_normal((n_queries, dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    return vec, labels, qs.astype(np.float32), qlab


def reference_topk_classes(
    vectors: np.ndarray, labels: np.ndarray, n_classes: int, queries: np.ndarray, k: int, *, block: int = 131_072
) -> np.ndarray:
    """Float32 brute force: per query, the k classes with the best max-cosine (the ground truth)."""
    best = np.full((len(queries), n_classes), -np.inf, np.float32)
    for i in range(0, len(vectors), block):
        s = queries @ vectors[i : i + block].T  # (Q, b)
        lab = labels[i : i + block]
        order = np.argsort(lab, kind="stable")
        lab_sorted = lab[order]
        starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
        mx = np.maximum.reduceat(s[:, order], starts, axis=1)
        cls = lab_sorted[starts]
        best[:, cls] = np.maximum(best[:, cls], mx)
    return np.argsort(-best, axis=1, kind="stable")[:, :k]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "n": len(ms)}


def measure_backend(backend: str, vectors, names, queries, truth, *, k: int, warmup: int) -> dict:
    """Builds one Memory with this back end and measures build, RAM, latency and class recall@k."""
    from rar_edge import Memory

    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    mem = Memory(dim=vectors.shape[1], backend=backend)
    mem.add(vectors, names)
    t_add = time.perf_counter() - t0
    t1 = time.perf_counter()
    if backend == "hnsw":
        mem.compact()  # one graph over every entry (the add sealed them into a segment and its int8 copy)
    mem.search(queries[0], k=k)
    t_index = time.perf_counter() - t1
    build_s = time.perf_counter() - t0
    rss1 = _rss_bytes()
    for q in queries[1 : 1 + warmup]:
        mem.search(q, k=k)
    lat, got = [], []
    for q in queries:
        t = time.perf_counter()
        res = mem.search(q, k=k)[0]
        lat.append((time.perf_counter() - t) * 1e3)
        got.append([c.label for c in res])
    hits = [len(set(g) & {names_of(t) for t in row}) / k for g, row in zip(got, truth)]
    out = {
        "build_s": build_s,
        "add_s": t_add,
        "index_s": t_index,
        "rss_growth_bytes": int(rss1 - rss0),
        "search_ms": _percentiles(lat),
        "recall_at_k_classes": float(np.mean(hits)),
    }
    snap = mem._engine.snapshot  # noqa: SLF001 - the structures searched; reported, not changed
    segments = snap.segments
    if backend == "exact":  # sealed segments' stores, and the unsealed tail's float32 rows
        out["index_bytes"] = int(sum(seg.store.nbytes for seg in segments) + snap.tail.n * mem.dim * 4)
        out["storage"] = mem.storage
    else:
        out["index_bytes"] = int(sum(seg.hnsw.index_file_size() for seg in segments if seg.hnsw is not None))
        out["hnsw"] = {
            "M": mem.hnsw_params.M,
            "ef_construction": mem.hnsw_params.ef_construction,
            "ef": mem.hnsw_params.ef,
            "threads": os.cpu_count(),
        }
    out["vectors_bytes"] = int(mem.vectors.nbytes)
    del mem
    gc.collect()
    return out


def names_of(i: int) -> str:
    return f"class{int(i):05d}"


def _predict_hnsw_build_s(prev: list[tuple[int, float]], n: int) -> float | None:
    if not prev:
        return None
    n0, t0 = prev[-1]
    return t0 * (n / n0) * (math.log(n) / math.log(n0))


def run(args) -> dict:
    sizes = [s for s in SIZES if s <= args.max_n] or [args.max_n]
    if args.max_n not in sizes and args.max_n > sizes[-1]:
        sizes.append(args.max_n)
    t_start = time.perf_counter()
    rows = []
    hnsw_builds: list[tuple[int, float]] = []
    hnsw_bytes_per_entry = None
    for n in sizes:
        t_n = time.perf_counter()
        vec, lab, qs, _ = clustered_data(
            n, n_classes=args.classes, dim=args.dim, n_queries=args.queries, seed=args.seed
        )
        names = [names_of(i) for i in lab]
        truth = reference_topk_classes(vec, lab, args.classes, qs, args.k)
        row = {"n": n, "exact": measure_backend("exact", vec, names, qs, truth, k=args.k, warmup=args.warmup)}
        elapsed = time.perf_counter() - t_start
        predicted = _predict_hnsw_build_s(hnsw_builds, n)
        if n <= args.max_hnsw_n and (predicted is None or elapsed + 1.3 * predicted < args.budget_s):
            row["hnsw"] = measure_backend("hnsw", vec, names, qs, truth, k=args.k, warmup=args.warmup)
            hnsw_builds.append((n, row["hnsw"]["build_s"]))
            hnsw_bytes_per_entry = row["hnsw"]["index_bytes"] / n
            row["hnsw_over_exact_p50"] = row["hnsw"]["search_ms"]["p50"] / row["exact"]["search_ms"]["p50"]
        else:
            row["hnsw"] = {
                "extrapolated": True,
                "reason": f"over --max-hnsw-n={args.max_hnsw_n}"
                if n > args.max_hnsw_n
                else f"predicted build {predicted:.0f} s would overrun the {args.budget_s:.0f} s budget",
                "build_s": predicted,
                "index_bytes": None if hnsw_bytes_per_entry is None else int(hnsw_bytes_per_entry * n),
            }
        row["seconds_for_this_size"] = time.perf_counter() - t_n
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str), file=sys.stderr, flush=True)
        del vec, names, lab, qs, truth
        gc.collect()

    measured = [r for r in rows if not r["hnsw"].get("extrapolated")]
    faster = [r["n"] for r in measured if r["hnsw"]["search_ms"]["p50"] < r["exact"]["search_ms"]["p50"]]
    crossover = None
    for r in measured:  # the first size from which HNSW stays faster at every larger measured size
        if all(x["hnsw"]["search_ms"]["p50"] < x["exact"]["search_ms"]["p50"] for x in measured if x["n"] >= r["n"]):
            crossover = r["n"]
            break
    from rar_edge import __version__
    from rar_edge.index.memory import AUTO_HNSW_MIN_ENTRIES

    return {
        "benchmark": "memory_scaling",
        "setup": {
            "dim": args.dim,
            "classes": args.classes,
            "queries": args.queries,
            "k": args.k,
            "seed": args.seed,
            "data": "clustered: centroids with a shared direction + noise 0.6 (entries) / 0.8 (queries)",
            "query_mode": "one query per Memory.search call (as one image per classify call)",
            "reference": "float32 brute force (numpy), per-class max cosine",
            "budget_s": args.budget_s,
            "max_n": args.max_n,
        },
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "rar_edge": __version__,
            "numpy": np.__version__,
        },
        "rows": rows,
        "sizes_where_hnsw_faster": faster,
        "crossover_n": crossover,
        "current_AUTO_HNSW_MIN_ENTRIES": AUTO_HNSW_MIN_ENTRIES,
        "total_s": time.perf_counter() - t_start,
    }


def plot(res: dict, path: str) -> None:
    """Lookup latency and build time against memory size, exact vs HNSW (log-log); extrapolations dashed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    n_ex = [r["n"] for r in rows]
    a1.plot(n_ex, [r["exact"]["search_ms"]["p50"] for r in rows], "o-", label="exact (native scan), p50")
    a1.fill_between(
        n_ex, [r["exact"]["search_ms"]["p50"] for r in rows], [r["exact"]["search_ms"]["p95"] for r in rows], alpha=0.2
    )
    hm = [r for r in rows if not r["hnsw"].get("extrapolated")]
    a1.plot([r["n"] for r in hm], [r["hnsw"]["search_ms"]["p50"] for r in hm], "s-", label="HNSW (hnswlib), p50")
    a1.fill_between(
        [r["n"] for r in hm],
        [r["hnsw"]["search_ms"]["p50"] for r in hm],
        [r["hnsw"]["search_ms"]["p95"] for r in hm],
        alpha=0.2,
    )
    for r in rows:
        a1.annotate(
            f"R {r['exact']['recall_at_k_classes']:.2f}",
            (r["n"], r["exact"]["search_ms"]["p50"]),
            textcoords="offset points",
            xytext=(0, 6),
            fontsize=7,
            ha="center",
            color="C0",
        )
    for r in hm:
        a1.annotate(
            f"R {r['hnsw']['recall_at_k_classes']:.2f}",
            (r["n"], r["hnsw"]["search_ms"]["p50"]),
            textcoords="offset points",
            xytext=(0, -12),
            fontsize=7,
            ha="center",
            color="C1",
        )
    if res.get("crossover_n"):
        a1.axvline(res["crossover_n"], color="grey", ls=":", label=f"HNSW faster from {res['crossover_n']:,}")
    a1.set(
        xscale="log",
        yscale="log",
        xlabel="memory entries (d=%d)" % res["setup"]["dim"],
        ylabel="Memory.search, one query (ms)",
        title="lookup latency (band = p50..p95; R = recall of top-%d classes)" % res["setup"]["k"],
    )
    a1.legend(fontsize=8)
    a1.grid(which="both", alpha=0.3)
    a2.plot(n_ex, [r["exact"]["build_s"] for r in rows], "o-", label="exact: add + pack store")
    a2.plot([r["n"] for r in hm], [r["hnsw"]["build_s"] for r in hm], "s-", label="HNSW: add + build graph")
    ext = [r for r in rows if r["hnsw"].get("extrapolated") and r["hnsw"].get("build_s")]
    if ext and hm:
        a2.plot(
            [hm[-1]["n"]] + [r["n"] for r in ext],
            [hm[-1]["hnsw"]["build_s"]] + [r["hnsw"]["build_s"] for r in ext],
            "s--",
            color="C1",
            alpha=0.5,
            label="HNSW build, EXTRAPOLATED (n log n)",
        )
    a2.set(
        xscale="log",
        yscale="log",
        xlabel="memory entries",
        ylabel="build time (s)",
        title=f"build time on {res['environment']['cores']} cores",
    )
    a2.legend(fontsize=8)
    a2.grid(which="both", alpha=0.3)
    fig.suptitle(
        f"rar_edge.Memory scaling: clustered data, {res['setup']['classes']} classes, "
        f"{res['setup']['queries']} queries",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--max-n", type=int, default=1_000_000, help="largest memory size (entries)")
    p.add_argument("--max-hnsw-n", type=int, default=1_000_000, help="largest size for which HNSW is built")
    p.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="skip (and extrapolate) HNSW builds predicted to end after this many seconds",
    )
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="also write a PNG plot here (matplotlib)")
    p.add_argument("--replot", action="store_true", help="only redraw --plot from an existing --json")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.json).read_text()), args.plot)
        return 0
    res = run(args)
    text = json.dumps(res, indent=2)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(res, args.plot)
    print(f"crossover (HNSW faster from): {res['crossover_n']} entries; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
