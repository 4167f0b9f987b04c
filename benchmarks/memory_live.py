"""A memory that lives on a device: build time from small batches, incremental saves, RSS mapped vs whole.

Measures, with clustered d=512 vectors (`memory_scaling.clustered_data`, a pool of 65,536 rows cycled so
that the data is not held twice beside a 1M memory):

* ``build``: `Memory.add` from batches of 16 rows up to 100k, 300k and 1M entries (exact back end,
  default storage), seconds and microseconds per row (flat when appends are amortised O(1)); optionally
  ``--old-tree`` (an old checkout with its compiled module) at small sizes, where its add re-concatenated
  every vector on each call;
* ``save``: the 1M memory saved as a directory store, then 100 entries added and saved again (writes only
  the new segment), against saving the whole memory as one ``.rarmem`` file;
* ``rss``: a fresh process opens the 1M ``.rarmem`` whole or with ``mmap=True`` and runs 1,000 single
  searches (k=5): RSS after the open and after the searches (anonymous and file-backed: mapped pages the
  kernel can drop under memory pressure), peak RSS, open time, search p50 / p95; for the default storage
  ("int8_rerank", whose rescoring reads float32 rows) and for plain "int8".

Usage::

    .venv/bin/python benchmarks/memory_live.py --json artifacts/memory_live.json --workdir /tmp/memlive \
        [--sizes 100000 300000 1000000] [--old-tree /tmp/old13 --old-sizes 10000 20000 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DIM = 512
BATCH = 16


def _pool(seed: int = 0):
    sys.path.insert(0, str(HERE))
    from memory_scaling import clustered_data

    vec, labels, queries, _ = clustered_data(65_536, n_classes=1000, dim=DIM, n_queries=1000, seed=seed)
    names = np.array([f"class_{i:04d}" for i in range(1000)])
    return vec, names[labels], queries


def build(n: int, vec: np.ndarray, names: np.ndarray):
    from rar_edge import Memory

    m = Memory(dim=DIM, backend="exact")
    t0 = time.perf_counter()
    pool = len(vec)
    for i in range(0, n, BATCH):
        j = i % pool
        m.add(vec[j : j + BATCH], names[j : j + BATCH].tolist())
    return m, time.perf_counter() - t0


def _rss_mb() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024
    return out


def rss_child(path: str, mmap: bool, seed: int) -> dict:
    """Runs in a fresh process: open, 1,000 searches, RSS."""
    from rar_edge import Memory

    _, _, queries = _pool(seed)
    base = _rss_mb()["VmRSS"]  # the peak so far is the query pool's generation
    t0 = time.perf_counter()
    m = Memory.load(path, mmap=mmap)
    open_s = time.perf_counter() - t0
    after_open = _rss_mb()
    times = []
    for q in queries:
        t = time.perf_counter()
        m.search(q, k=5)
        times.append((time.perf_counter() - t) * 1e3)
    end = _rss_mb()
    # RssFile: pages of mapped files, which the kernel can drop and read again under memory pressure;
    # RssAnon: memory only swap can free
    return {
        "mmap": mmap,
        "entries": m.size,
        "open_s": round(open_s, 2),
        "rss_mb_before_open": round(base),
        "rss_mb_after_open": round(after_open["VmRSS"]),
        "rss_anon_mb_after_open": round(after_open["RssAnon"]),
        "rss_mb_after_1000_searches": round(end["VmRSS"]),
        "rss_anon_mb_after_1000_searches": round(end["RssAnon"]),
        "rss_file_mb_after_1000_searches": round(end["RssFile"]),
        "peak_rss_mb": round(end["VmHWM"]),
        "search_ms_p50": round(float(np.percentile(times, 50)), 3),
        "search_ms_p95": round(float(np.percentile(times, 95)), 3),
    }


def old_build_child(tree: str, n: int) -> dict:
    """An old checkout's Memory.add from batches of 16 (runs in a fresh process)."""
    sys.meta_path[:] = [
        f for f in sys.meta_path if "Editable" not in type(f).__name__ and "editable" not in type(f).__module__.lower()
    ]
    sys.path.insert(0, tree)
    vec, names, _ = _pool(0)
    from rar_edge import Memory

    assert Memory.__module__.startswith("rar_edge") and tree in sys.modules["rar_edge"].__file__
    _, s = build(n, vec, names)
    return {"entries": n, "seconds": round(s, 2), "us_per_row": round(s / n * 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default="/tmp/memory_live")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--old-tree", default=None)
    ap.add_argument("--old-sizes", type=int, nargs="+", default=[10_000, 20_000, 40_000])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child.split(",")
        out = rss_child(rest[0], rest[1] == "1", 0) if kind == "rss" else old_build_child(rest[0], int(rest[1]))
        print(json.dumps(out))
        return

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    vec, names, _ = _pool(0)
    res: dict = {
        "dim": DIM,
        "batch": BATCH,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "build": [],
        "old_build": [],
    }
    big = None
    for n in a.sizes:
        m, s = build(n, vec, names)
        res["build"].append(
            {
                "entries": n,
                "seconds": round(s, 2),
                "us_per_row": round(s / n * 1e6, 2),
                "segments": m.info()["segments"],
            }
        )
        print(json.dumps(res["build"][-1]), flush=True)
        if n == max(a.sizes):
            big = m
        del m
    del vec
    store, single = work / "big.rarmemd", work / "big.rarmem"
    t0 = time.perf_counter()
    big.save(store)
    first_dir = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    extra = rng.standard_normal((100, DIM)).astype(np.float32)
    big.add(extra, [f"new_{i // 10}" for i in range(100)])
    before = {p.name for p in store.iterdir()}
    t0 = time.perf_counter()
    big.save(store)
    inc = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in store.iterdir() if p.name not in before or p.name == "MANIFEST.json")
    t0 = time.perf_counter()
    big.save(single)
    full = time.perf_counter() - t0
    res["save"] = {
        "entries": big.size,
        "first_directory_save_s": round(first_dir, 2),
        "incremental_save_after_100_s": round(inc, 3),
        "incremental_bytes_written": written,
        "full_rarmem_rewrite_s": round(full, 2),
        "rarmem_bytes": single.stat().st_size,
        "ratio_full_over_incremental": round(full / inc, 1),
    }
    print(json.dumps(res["save"]), flush=True)
    del big
    # the same rows with plain int8 storage: no float32 rescoring, so a mapped search reads only the int8 copy
    from rar_edge import Memory

    src = Memory.load(single, mmap=True)
    plain = Memory(dim=DIM, backend="exact", storage="int8")
    plain.add_memory(src)
    single_int8 = plain.save(work / "big_int8.rarmem")
    del src, plain
    res["rss"] = []
    for path, storage in ((single, "int8_rerank"), (single_int8, "int8")):
        for mm in (False, True):
            p = subprocess.run(
                [sys.executable, __file__, "--child", f"rss,{path},{int(mm)}"],
                capture_output=True,
                text=True,
                check=True,
            )
            res["rss"].append({"storage": storage, **json.loads(p.stdout.strip().splitlines()[-1])})
            print(json.dumps(res["rss"][-1]), flush=True)
    if a.old_tree:
        for n in a.old_sizes:
            p = subprocess.run(
                [sys.executable, __file__, "--child", f"old,{a.old_tree},{n}"],
                capture_output=True,
                text=True,
                check=True,
            )
            res["old_build"].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps({"old": res["old_build"][-1]}), flush=True)
        for n in a.old_sizes:  # the same sizes with this tree, for the ratio
            vec, names, _ = _pool(0)
            _, s = build(n, vec, names)
            res.setdefault("new_build_small", []).append(
                {"entries": n, "seconds": round(s, 2), "us_per_row": round(s / n * 1e6, 2)}
            )
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
