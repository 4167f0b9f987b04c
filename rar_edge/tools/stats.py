"""Latency statistics shared by eval and bench: the stage names and one percentile summary."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

#: The per-call stages a `Classification` / `Detection` times, in pipeline order ("wait": how long a streamed
#: image's pixels were still awaited in `Pipeline.iter_classify`).
STAGES = ("decode", "preprocess", "wait", "encode", "search", "rank", "total")


def percentiles(values_ms: Sequence[float]) -> dict[str, float] | None:
    """p50 / p95 / p99 / mean / min / max and the count of ``values_ms``; None when there are none."""
    a = np.asarray(values_ms, np.float64)
    if a.size == 0:
        return None
    p50, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
    return {
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def latency_summary(timings: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """`percentiles` of each stage present in the per-call timings (stages no call timed are left out)."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        summary = percentiles([t[stage] for t in timings if stage in t])
        if summary is not None:
            out[stage] = summary
    return out
