"""Top-5 distinct classes for single queries: rar_edge's native exact search vs faiss, numpy and hnswlib.

Data (--data): `clustered` (default), unit vectors around 1k class centroids sharing a common direction +
noise (never i.i.d. Gaussian), d=512; or `real`, the shared photos' MobileNet v1 embeddings (d=1024; every
flower and COCO128 photo and its mirror image), one class per photo for 1k classes, entries and queries
the class's row times log-normal noise (`_common.replicated`). N in {1k, 10k, 100k} (--sizes) over 1k
classes, single queries drawn from the same classes.

Methods (all single-threaded, timed in the same process, round-robin per query so that load from other
processes hits them alike; latency p50/p90 over the queries):
  native/<storage>  rar_edge.index.lookup.VectorStore.topk_classes (class max fused into the scan)
  faiss             IndexFlatIP.search for the k' nearest vectors, k' = (sum of the k-1 largest class sizes) + 1
                    (guarantees k distinct classes), then numpy: first k distinct labels
  numpy             V @ q (BLAS, 1 thread), np.maximum.reduceat over label-sorted rows, argpartition
  hnswlib           HNSW (M=16, ef_construction=200, ef=64; hnswlib raises ef to k' for the k'-NN query),
                    same aggregation as faiss
  floor/<storage>   a plain single-thread read of the bytes that storage streams per query (numpy sum of
                    them viewed as uint64): the memory-bandwidth floor no scan of those bytes can beat
Recall: class recall@5 against an exact float64 search. Every size also reports the bytes each method reads
per query (vectors + scales + int32 labels; faiss: the float32 rows) and the load average around it (the
machine may be shared: compare methods within one run, never across runs).
With --batch B the queries go B at a time (native: one topk_classes call; faiss: one batched search),
one thread each, and the times are per batch; bytes_per_query and the floors are then one read of the
memory per call (the native scan reads it once per 32 queries, fewer when int8_rerank's row buffer caps
the block: docs/design-notes.md#batch-scan), numpy and hnswlib are skipped.

    python benchmarks/lookup.py --json artifacts/lookup.json [--sizes 1000 10000 100000] [--queries 200]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS single-threaded, like the others
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clustered, percentile_ms, replicated, shared_photo_embeddings, write_json  # noqa: E402

K = 5
N_CLASSES = 1000
DIM = 512


def first_k_distinct(labels_in_order: np.ndarray, k: int) -> np.ndarray:
    """The first k distinct labels of a ranked list, in order."""
    uniq, first = np.unique(labels_in_order, return_index=True)
    return uniq[np.argsort(first)][:k]


def exact_topk(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k classes in float64 (the recall reference; rows converted in chunks to bound memory)."""
    n_classes = int(labels.max()) + 1
    best = np.full((len(queries), n_classes), -np.inf)
    q64 = queries.astype(np.float64)
    for b in range(0, len(vectors), 65536):
        scores = vectors[b : b + 65536].astype(np.float64) @ q64.T  # (rows, Q)
        for i in range(len(queries)):
            np.maximum.at(best[i], labels[b : b + 65536], scores[:, i])
    present = np.flatnonzero(np.isfinite(best[0]))
    out = np.empty((len(queries), k), np.int64)
    for i in range(len(queries)):
        top = np.lexsort((present, -best[i, present]))[:k]
        out[i] = present[top]
    return out


def recall_at_k(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / ref.shape[1] for a, b in zip(got, ref)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-hnsw", action="store_true", help="skip hnswlib (its 100k build takes ~100 s on 2 cores)")
    ap.add_argument("--hnsw-build-threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="queries per call (1: single queries)")
    ap.add_argument("--storages", nargs="+", help="native storages to time (default: all)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy method (it copies the vectors)")
    ap.add_argument(
        "--data",
        choices=["clustered", "real"],
        default="clustered",
        help="clustered: synthetic, d=512, 1k classes; real: the shared photos' embeddings by --encoder (and their "
        "mirror images), one class per photo (up to 1k), replicated with multiplicative noise",
    )
    ap.add_argument("--encoder", default=".cache/models/mobilenet", help="--data real: the encoder (MobileNet v1)")
    ap.add_argument("--noise-sigma", type=float, default=0.4, help="--data real: the replicas' log-normal noise")
    args = ap.parse_args()

    import faiss

    from rar_edge import _native
    from rar_edge.index.lookup import DEFAULT_STORAGE, STORAGES, VectorStore

    faiss.omp_set_num_threads(1)
    base = shared_photo_embeddings(args.encoder) if args.data == "real" else None
    n_classes = min(N_CLASSES, len(base)) if base is not None else N_CLASSES
    dim = base.shape[1] if base is not None else DIM
    results: dict = {}
    for n in args.sizes:
        if base is not None:
            vectors, labels, queries = replicated(
                base, n, n_classes, n_queries=args.queries, seed=n, sigma=args.noise_sigma
            )
        else:
            vectors, labels, queries = clustered(n, n_classes, dim, n_queries=args.queries, seed=n)
        ref = exact_topk(vectors, labels, queries, K)
        sizes = np.bincount(labels, minlength=n_classes)
        k_prime = int(np.sort(sizes)[-(K - 1) :].sum()) + 1

        batch = args.batch
        methods: dict[str, object] = {}
        bytes_per_query: dict[str, int] = {}
        floors: dict[str, object] = {}
        for storage in args.storages or STORAGES:
            store = VectorStore(vectors, storage=storage)
            if batch == 1:
                methods[f"native/{storage}"] = lambda q, s=store: s.topk_classes(labels, n_classes, q, K)[0][0]
            else:
                methods[f"native/{storage}"] = lambda q, s=store: s.topk_classes(labels, n_classes, q, K)[0]
            bytes_per_query[f"native/{storage}"] = store.nbytes + labels.nbytes
            # As many bytes in an array of its own, read in a plain loop (cached as much as the store is)
            n_words = bytes_per_query[f"native/{storage}"] // 8
            words = np.ones(n_words, np.uint64)
            floors[f"floor/{storage}"] = lambda q, w=words: w.sum()
        bytes_per_query["faiss"] = vectors.nbytes

        index = faiss.IndexFlatIP(dim)
        index.add(vectors)

        def faiss_query(q: np.ndarray) -> np.ndarray:
            if q.ndim == 2:
                _, ids = index.search(q, k_prime)
                return np.stack([first_k_distinct(labels[r], K) for r in ids])
            _, ids = index.search(q[None, :], k_prime)
            return first_k_distinct(labels[ids[0]], K)

        methods["faiss"] = faiss_query

        order = np.argsort(labels, kind="stable")
        v_sorted = np.ascontiguousarray(vectors[order]) if not args.no_numpy else None
        starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
        present = labels[order][starts]

        def numpy_query(q: np.ndarray) -> np.ndarray:
            best = np.maximum.reduceat(v_sorted @ q, starts)
            top = np.argpartition(-best, K - 1)[:K]
            return present[top[np.argsort(-best[top], kind="stable")]]

        if batch == 1 and not args.no_numpy:
            methods["numpy"] = numpy_query

        build_s = None
        if not args.no_hnsw and batch == 1:
            import hnswlib

            hnsw = hnswlib.Index(space="ip", dim=dim)
            hnsw.init_index(max_elements=n, M=16, ef_construction=200, random_seed=0)
            t0 = time.perf_counter()
            hnsw.add_items(vectors, np.arange(n), num_threads=args.hnsw_build_threads)
            build_s = time.perf_counter() - t0
            hnsw.set_ef(64)
            hnsw.set_num_threads(1)
            kq = min(k_prime, n)

            def hnsw_query(q: np.ndarray) -> np.ndarray:
                ids, _ = hnsw.knn_query(q[None, :], k=kq)
                return first_k_distinct(labels[ids[0].astype(np.int64)], K)

            methods["hnswlib"] = hnsw_query

        units = (
            [queries[i] for i in range(len(queries))]
            if batch == 1
            else [queries[i : i + batch] for i in range(0, len(queries) - batch + 1, batch)]
        )
        for fn in methods.values():  # warm-up
            fn(units[0])
        times: dict[str, list[float]] = {m: [] for m in [*methods, *floors]}
        answers: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        load_before = os.getloadavg()[0]
        for q in units:
            for name, fn in [*methods.items(), *floors.items()]:
                t0 = time.perf_counter()
                a = fn(q)
                times[name].append((time.perf_counter() - t0) * 1e3)
                if name in answers:
                    answers[name].append(np.asarray(a).reshape(-1, np.asarray(a).shape[-1]))
        per_n: dict = {"k_prime": k_prime, "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        for name in methods:
            got = np.concatenate([np.pad(a, ((0, 0), (0, K - a.shape[1])), constant_values=-1) for a in answers[name]])
            per_n[name] = {
                "p50_ms": round(float(np.median(times[name])), 4),
                "p90_ms": round(percentile_ms(times[name], 90), 4),
                # the least any call took: the closest to the uncontended cost on a loaded machine
                "min_ms": round(float(np.min(times[name])), 4),
                "class_recall5": round(recall_at_k(got, ref[: len(got)]), 4),
            }
            if name in bytes_per_query:
                per_n[name]["bytes_per_query"] = bytes_per_query[name]
        for name in floors:
            p50 = float(np.median(times[name]))
            nbytes = bytes_per_query["native/" + name.split("/", 1)[1]]
            lo = float(np.min(times[name]))
            per_n[name] = {
                "p50_ms": round(p50, 4),
                "min_ms": round(lo, 4),
                "GB_per_s": round(nbytes / p50 / 1e6, 2),
                "GB_per_s_best": round(nbytes / lo / 1e6, 2),
            }
        if build_s is not None:
            per_n["hnswlib"]["build_s"] = round(build_s, 1)
        results[str(n)] = per_n
        print(
            f"N={n}: "
            + ", ".join(f"{m} {per_n[m]['p50_ms']:.3f} ms r={per_n[m]['class_recall5']}" for m in methods)
            + ", "
            + ", ".join(f"{f} {per_n[f]['p50_ms']:.3f} ms" for f in floors),
            file=sys.stderr,
        )

    default = f"native/{DEFAULT_STORAGE}"
    timed = [n for n in results if n != "1000" and default in results[n]]

    def ratio(a: str, b: str, n: str, key: str) -> float:
        return round(results[n][a][key] / results[n][b][key], 2)

    summary = {
        "default_storage": DEFAULT_STORAGE,
        "speedup_vs_faiss": {n: ratio("faiss", default, n, "p50_ms") for n in timed},
        "speedup_vs_faiss_min": {n: ratio("faiss", default, n, "min_ms") for n in timed},
        "class_recall5": {n: results[n][default]["class_recall5"] for n in timed},
        # How far the default storage sits above a plain read of its bytes (1.0 = at the bandwidth floor)
        "default_over_floor": {n: ratio(default, f"floor/{DEFAULT_STORAGE}", n, "p50_ms") for n in timed},
        "default_over_floor_min": {n: ratio(default, f"floor/{DEFAULT_STORAGE}", n, "min_ms") for n in timed},
        "results": results,
        "setup": {
            "data": args.data,
            **({"encoder": args.encoder, "noise_sigma": args.noise_sigma} if base is not None else {}),
            "dim": dim,
            "classes": n_classes,
            "k": K,
            "queries": args.queries,
            "batch": args.batch,
            "threads": 1,
            "simd": _native.build_info()["selected"],
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
    }
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
