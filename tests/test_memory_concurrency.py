"""Searches beside a writer: every result must be the answer of the memory before or after some write.

The writer cycles through four writes (remove a class in the middle of the class list, add 200 entries of
a new class, add the removed class back, remove the new one), so the memory moves through four states whose
answers are known in advance. Searchers note the write counter before and after each search; the result
must equal the answer of one of the states in between. A crash (segfault, abort) is caught by running the
stress in a child process. Short versions run by default; the >= 20 s ones are marked slow.

Run by hand: ``python tests/test_memory_concurrency.py --backend hnsw --seconds 20 --threads 6``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
DIM = 32


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((31, DIM))
    base_labels = np.repeat(np.arange(30), 40)
    base = cent[base_labels] + 0.35 * rng.standard_normal((len(base_labels), DIM))
    extra = cent[30] + 0.35 * rng.standard_normal((200, DIM))
    queries = np.vstack(
        [
            cent[[0, 4, 5, 6, 17, 29, 30]],
            cent[5] + 0.3 * rng.standard_normal(DIM),
            cent[30] + 0.3 * rng.standard_normal(DIM),
        ]
    )
    names = [f"class_{i:02d}" for i in base_labels]
    return base.astype(np.float32), names, extra.astype(np.float32), queries.astype(np.float32)


def _reference(rows: list[tuple[np.ndarray, str]], queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    v = np.vstack([r[0] for r in rows]).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = [r[1] for r in rows]
    out = []
    for q in queries.astype(np.float64):
        s = v @ (q / np.linalg.norm(q))
        best: dict[str, float] = {}
        for score, lbl in zip(s, labels):
            best[lbl] = max(best.get(lbl, -np.inf), score)
        out.append(sorted(best.items(), key=lambda kv: -kv[1])[:k])
    return out


def stress(*, backend: str, seconds: float, threads: int, k: int = 5) -> dict:
    """Runs searchers beside the cycling writer; returns counts (searches, writes, wrong, errors)."""
    import rar_edge.index._store as store
    from rar_edge import HnswParams, Memory

    # small segments, so that sealing, tier merges, tombstones, rewrites and graphs all happen often
    store.SEAL_ROWS, store.HNSW_MIN_ROWS, store.MERGE_FAN_IN = 256, 200, 4
    base, names, extra, queries = _data()
    c05 = [i for i, n in enumerate(names) if n == "class_05"]
    rows_base = [(base[i], names[i]) for i in range(len(names))]
    rows_no5 = [r for r in rows_base if r[1] != "class_05"]
    rows_extra = [(e, "extra") for e in extra]
    states = [
        _reference(rows, queries, k) for rows in (rows_base, rows_no5, rows_no5 + rows_extra, rows_base + rows_extra)
    ]
    mem = Memory(dim=DIM, backend=backend, hnsw=HnswParams(M=16, ef_construction=100, ef=512))
    mem.add(base, names)
    ops = [
        lambda: mem.remove(label="class_05"),
        lambda: mem.add(extra, ["extra"] * len(extra)),
        lambda: mem.add(base[c05], ["class_05"] * len(c05)),
        lambda: mem.remove(label="extra"),
    ]
    version = [0]
    stop = threading.Event()
    counts = {"searches": 0, "writes": 0, "wrong": 0, "errors": 0}
    examples: list[str] = []
    lock = threading.Lock()

    def writer() -> None:
        try:
            while not stop.is_set():
                ops[version[0] % 4]()
                version[0] += 1
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                counts["errors"] += 1
                examples.append(f"writer: {type(e).__name__}: {e}")

    def searcher(seed: int) -> None:
        n = wrong = errors = 0
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            qi = rng.integers(0, len(queries), size=int(rng.integers(1, 4)))
            before = version[0]
            try:
                got = mem.search(queries[qi], k=k)
            except Exception as e:  # noqa: BLE001
                errors += 1
                if len(examples) < 5:
                    examples.append(f"search: {type(e).__name__}: {e}")
                continue
            after = version[0]
            n += 1
            ok = False
            for v in range(before, after + 2):  # a write is published just before the counter moves
                want = [states[v % 4][i] for i in qi]
                if all(
                    [c.label for c in g] == [w[0] for w in wq]
                    and np.allclose([c.score for c in g], [w[1] for w in wq], atol=1e-4)
                    for g, wq in zip(got, want)
                ):
                    ok = True
                    break
            if not ok:
                wrong += 1
                if len(examples) < 5:
                    examples.append(
                        f"wrong: queries {qi.tolist()} versions {before}..{after}: "
                        f"{[[(c.label, round(c.score, 4)) for c in g] for g in got]}"
                    )
        with lock:
            counts["searches"] += n
            counts["wrong"] += wrong
            counts["errors"] += errors

    pool = [threading.Thread(target=searcher, args=(i,)) for i in range(threads)]
    w = threading.Thread(target=writer)
    for t in pool:
        t.start()
    w.start()
    time.sleep(seconds)
    stop.set()
    w.join()
    for t in pool:
        t.join()
    counts["writes"] = version[0]
    counts["examples"] = examples
    return counts


def searches_after_add(*, threads: int, per_thread: int) -> dict:
    """HNSW, searches only, started right after an add that published new graphs (F1)."""
    import rar_edge.index._store as store
    from rar_edge import HnswParams, Memory

    store.SEAL_ROWS, store.HNSW_MIN_ROWS = 512, 400
    base, names, extra, queries = _data()
    mem = Memory(dim=DIM, backend="hnsw", hnsw=HnswParams(M=16, ef_construction=64, ef=128))
    mem.add(base, names)
    mem.add(extra, ["extra"] * len(extra))
    assert any(s.hnsw is not None for s in mem._engine.snapshot.segments)
    errors: list[str] = []
    go = threading.Barrier(threads)

    def run() -> None:
        go.wait()
        for i in range(per_thread):
            try:
                mem.search(queries[i % len(queries)], k=5)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"searches": threads * per_thread, "errors": len(errors), "examples": errors[:3]}


def _child(*args: str, timeout_s: float) -> dict:
    """Runs this file in a child process; a crash shows as a negative return code."""
    p = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        return {"crashed": True, "returncode": p.returncode, "stderr": p.stderr[-2000:]}
    return {"crashed": False, **json.loads(p.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_searches_beside_a_writer_see_one_state(backend):
    r = _child("--backend", backend, "--seconds", "2", "--threads", "3", timeout_s=120)
    assert not r["crashed"], r
    assert r["searches"] > 50 and r["writes"] > 8, r
    assert r["wrong"] == 0 and r["errors"] == 0, r


def test_hnsw_searches_right_after_an_add_do_not_crash():
    for _ in range(3):
        r = _child("--after-add", "--threads", "6", timeout_s=120)
        assert not r["crashed"], r
        assert r["errors"] == 0, r


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["exact", "hnsw"])
def test_searches_beside_a_writer_for_20_s(backend):
    r = _child("--backend", backend, "--seconds", "20", "--threads", "6", timeout_s=300)
    print(json.dumps({"backend": backend, **r}))
    assert not r["crashed"], r
    assert r["wrong"] == 0 and r["errors"] == 0 and r["writes"] > 100, r


@pytest.mark.slow
def test_hnsw_searches_right_after_an_add_20_runs():
    results = [_child("--after-add", "--threads", "6", timeout_s=120) for _ in range(20)]
    print(
        json.dumps(
            {
                "runs": 20,
                "crashes": sum(r["crashed"] for r in results),
                "errors": sum(r.get("errors", 0) for r in results),
            }
        )
    )
    assert not any(r["crashed"] or r["errors"] for r in results), results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="exact")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--after-add", action="store_true")
    a = ap.parse_args()
    out = (
        searches_after_add(threads=a.threads, per_thread=200)
        if a.after_add
        else stress(backend=a.backend, seconds=a.seconds, threads=a.threads)
    )
    print(json.dumps(out))
