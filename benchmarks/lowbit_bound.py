"""How many rows a low-bit first pass with a rigorous error bound must hand on to exact rescoring.

The question behind issue #17: can a 4- or 2-bit scan replace the int8 scan of "int8_rerank" and keep its
contract (class recall 1.0 against float32)? Per-vector scalar codes ``v = s * c + r`` (c in
[-2^(b-1), 2^(b-1) - 1], the scale s chosen per row among clip ratios to minimise ||r||) bound every inner
product exactly: |q.v - s * q.c| <= ||q|| * ||r|| (Cauchy-Schwarz; ||r|| stored per row), or
<= ||q||_1 * max|r| (the per-dimension bound the int8 path uses). A row can reach the exact top-k classes
only if ``s * q.c + bound >= tau``, tau a lower bound of the exact k-th class score; here tau is the best
one can cheaply get: the exact k-th best of the exact scores of each of the 4k best classes' best
approximate row. The fraction of rows passing that test is what the first pass saves nothing on; the
exact float32 scores decide (numpy, float64). int8 (the shipped bound) is listed for comparison.

Also, for an opt-in storage without the guarantee: a statistical margin ``m * ||q|| * ||r|| / sqrt(d)`` (the
error's standard deviation were r's direction random) in place of the bound, for m in MARGINS: the rows it
passes and the class recall@5 of rescoring exactly only those (against the exact answer).

    python benchmarks/lowbit_bound.py --json artifacts/lowbit_bound.json [--sizes 10000 100000] [--queries 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clustered, write_json  # noqa: E402

K = 5
MARGINS = (3.0, 4.0, 6.0)
N_CLASSES = 1000
DIM = 512


def quantize(
    v: np.ndarray, bits: int, ratios: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-row scalar codes: (codes float64, scales, ||r||_2, max|r|), the ratio with the least ||r|| per row."""
    hi = 2 ** (bits - 1) - 1
    peak = np.abs(v).max(axis=1)
    best = None
    for ratio in ratios:
        s = np.where(peak > 0, peak * ratio / hi, 1.0)
        c = np.rint(v / s[:, None]).clip(-hi - 1, hi)
        r = v - s[:, None] * c
        rn = np.sqrt((r * r).sum(axis=1))
        rmax = np.abs(r).max(axis=1)
        if best is None:
            best = (s, c, rn, rmax)
        else:
            m = rn < best[2]
            best = (
                np.where(m, s, best[0]),
                np.where(m[:, None], c, best[1]),
                np.where(m, rn, best[2]),
                np.where(m, rmax, best[3]),
            )
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--queries", type=int, default=30)
    args = ap.parse_args()

    schemes = {"int8": (8, (1.0,)), "int4": (4, (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)), "int2": (2, (1.0, 0.7, 0.5, 0.35))}
    results: dict = {}
    for n in args.sizes:
        vectors, labels, queries = clustered(n, N_CLASSES, DIM, n_queries=args.queries, seed=n)
        v = vectors.astype(np.float64)
        per_n: dict = {}
        for name, (bits, ratios) in schemes.items():
            s, c, rn, rmax = quantize(v, bits, ratios)
            frac_cs, frac_l1, max_err = [], [], 0.0
            frac_m = {m: [] for m in MARGINS}
            recall_m = {m: [] for m in MARGINS}
            for f in queries.astype(np.float64):
                exact = v @ f
                approx = s * (c @ f)
                max_err = max(max_err, float(np.abs(exact - approx).max()))
                class_best = np.full(N_CLASSES, -np.inf)
                np.maximum.at(class_best, labels, approx)
                seeds = np.argsort(-class_best)[: 4 * K]
                seed_exact = [exact[np.flatnonzero(labels == cl)[np.argmax(approx[labels == cl])]] for cl in seeds]
                tau = np.sort(seed_exact)[-K]
                frac_cs.append(float(np.mean(approx + np.linalg.norm(f) * rn >= tau)))
                frac_l1.append(float(np.mean(approx + np.abs(f).sum() * rmax >= tau)))
                exact_best = np.full(N_CLASSES, -np.inf)
                np.maximum.at(exact_best, labels, exact)
                want = set(np.argsort(-exact_best, kind="stable")[:K].tolist())
                for m in MARGINS:
                    margin = m * np.linalg.norm(f) * rn / np.sqrt(DIM)
                    passed = approx + margin >= tau
                    got_best = np.full(N_CLASSES, -np.inf)
                    np.maximum.at(got_best, labels[passed], exact[passed])
                    got = set(np.argsort(-got_best, kind="stable")[:K].tolist())
                    frac_m[m].append(float(np.mean(passed)))
                    recall_m[m].append(len(got & want) / K)
            per_n[name] = {
                "bits_per_dim": bits,
                "rows_passed_cauchy_schwarz": round(float(np.mean(frac_cs)), 4),
                "rows_passed_l1": round(float(np.mean(frac_l1)), 4),
                "mean_bound_cauchy_schwarz": round(float(rn.mean()), 4),
                "max_abs_error_seen": round(max_err, 4),
                "statistical_margin": {
                    str(m): {
                        "rows_passed": round(float(np.mean(frac_m[m])), 5),
                        "class_recall5": round(float(np.mean(recall_m[m])), 4),
                    }
                    for m in MARGINS
                },
            }
        results[str(n)] = per_n
        print(
            f"N={n}: " + ", ".join(f"{m} passes {r['rows_passed_cauchy_schwarz']:.2%}" for m, r in per_n.items()),
            file=sys.stderr,
        )
    write_json(args.json, {"k": K, "classes": N_CLASSES, "dim": DIM, "queries": args.queries, "results": results})


if __name__ == "__main__":
    main()
