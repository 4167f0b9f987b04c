"""Native exact top-k class search against a plain numpy reference, for every storage and kernel family."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rar_edge import _native
from rar_edge.errors import InvalidInputError
from rar_edge.index.lookup import DEFAULT_STORAGE, STORAGES, VectorStore, quantize_int8

from conftest import SIMD_FAMILIES as FAMILIES

NEG_INF = np.float32(-np.inf)


def class_scores(vectors: np.ndarray, labels: np.ndarray, n_classes: int, queries: np.ndarray) -> np.ndarray:
    """(Q, n_classes) best inner product per class in float64; -inf for classes without entries."""
    s = queries.astype(np.float64) @ vectors.astype(np.float64).T
    out = np.full((len(queries), n_classes), -np.inf)
    for q in range(len(queries)):
        np.maximum.at(out[q], labels, s[q])
    return out


def reference_topk(cs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes by score, ties to the lower id, padded with -1 / -inf."""
    q, c = cs.shape
    classes = np.full((q, k), -1, np.int64)
    scores = np.full((q, k), -np.inf)
    for i in range(q):
        present = np.flatnonzero(np.isfinite(cs[i]))
        order = present[np.lexsort((present, -cs[i, present]))][:k]
        classes[i, : len(order)] = order
        scores[i, : len(order)] = cs[i, order]
    return classes, scores


def clustered(n: int, n_classes: int, dim: int, n_queries: int, seed: int):
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim)
    cent = common / np.linalg.norm(common) + rng.standard_normal((n_classes, dim)) / np.sqrt(dim)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, n).astype(np.int32)
    v = cent[labels] + 0.6 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = cent[rng.integers(0, n_classes, n_queries)] + 0.8 * rng.standard_normal((n_queries, dim)) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return v.astype(np.float32), labels, q.astype(np.float32)


def storage_tolerance(storage: str, vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Per-query bound on |score - exact| for a storage (float32 rounding included)."""
    l1 = np.abs(queries).sum(axis=1).astype(np.float64)
    vmax = np.abs(vectors).max() if vectors.size else 0.0
    base = 1e-5 * (1 + l1 * vmax) * max(1, vectors.shape[1]) ** 0.5
    if storage == "float16":
        return base + l1 * vmax * 2.0**-10
    if storage == "int8":
        scale = vmax / 127.0
        return base + l1 * scale * 0.52 + 1e-4 * l1 * vmax
    return base


@pytest.fixture(autouse=True)
def _int8_rerank_at_every_size(monkeypatch):
    """These tests check the native kernels: int8_rerank takes its int8 path even for tiny memories."""
    import rar_edge.index.lookup as lookup

    monkeypatch.setattr(lookup, "RERANK_MIN_ROWS", 0)


def check_against_reference(store_storage: str, vectors, labels, n_classes, queries, k, threads=1):
    store = VectorStore(vectors, storage=store_storage)
    classes, scores = store.topk_classes(labels, n_classes, queries, k, threads=threads)
    assert classes.dtype == np.int32 and scores.dtype == np.float32
    assert classes.shape == scores.shape == (len(queries), k)
    cs = class_scores(vectors, labels, n_classes, queries)
    ref_c, ref_s = reference_topk(cs, k)
    tol = storage_tolerance("float32" if store_storage == "int8_rerank" else store_storage, vectors, queries)
    for i in range(len(queries)):
        n_present = int(np.isfinite(cs[i]).sum())
        assert (classes[i, n_present:] == -1).all() and np.isneginf(scores[i, n_present:]).all()
        got = classes[i, : min(k, n_present)]
        assert len(set(got.tolist())) == len(got), "classes must be distinct"
        # every returned score is that class's true score, within tolerance
        np.testing.assert_allclose(scores[i, : len(got)], cs[i, got], atol=tol[i], rtol=0)
        # descending order
        assert (np.diff(scores[i, : len(got)]) <= 0).all()
        # where the reference's ranking is well separated, the classes agree exactly
        ranked = np.sort(cs[i][np.isfinite(cs[i])])[::-1]
        for j in range(len(got)):
            gap_before = ranked[j - 1] - ranked[j] if j > 0 else np.inf
            gap_after = ranked[j] - ranked[j + 1] if j + 1 < len(ranked) else np.inf
            if min(gap_before, gap_after) > 2.5 * tol[i]:
                assert got[j] == ref_c[i, j], (i, j, got, ref_c[i])


@st.composite
def memories(draw):
    n_classes = draw(st.integers(1, 12))
    n = draw(st.integers(0, 60))
    dim = draw(st.integers(1, 70))
    nq = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    if n and draw(st.booleans()):  # duplicate vectors (some across classes)
        dup = rng.integers(0, n, n // 2)
        v[rng.integers(0, n, n // 2)] = v[dup]
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)
    labels = rng.integers(0, n_classes, n).astype(np.int32)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-6)
    k = draw(st.integers(1, n_classes + 4))
    threads = draw(st.sampled_from([1, 2, 3]))
    return v, labels, n_classes, q, k, threads


@pytest.mark.parametrize("storage", STORAGES)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mem=memories())
def test_matches_numpy_reference(storage, family, mem):
    v, labels, n_classes, q, k, threads = mem
    check_against_reference(storage, v, labels, n_classes, q, k, threads)


@pytest.mark.parametrize("storage", STORAGES)
def test_clustered_memory_all_paths(storage, family):
    v, labels, q = clustered(3000, 50, 96, n_queries=9, seed=3)
    for threads in (1, 2, 4):  # batch split over queries, and (threads > queries) over rows
        check_against_reference(storage, v, labels, 50, q, 7, threads)
        check_against_reference(storage, v, labels, 50, q[:1], 7, threads)


def test_int8_rerank_equals_float32(family):
    v, labels, q = clustered(4000, 100, 128, n_queries=20, seed=5)
    exact = VectorStore(v, storage="float32").topk_classes(labels, 100, q, 10)
    for threads in (1, 3):
        got = VectorStore(v, storage="int8_rerank").topk_classes(labels, 100, q, 10, threads=threads)
        np.testing.assert_array_equal(got[0], exact[0])
        np.testing.assert_array_equal(got[1], exact[1])


@pytest.mark.parametrize("storage", STORAGES)
def test_a_batch_answers_each_query_as_alone(storage, family):
    # 37 = one block of 32 queries (one pass over the rows) + 5 (a kernel group of 4 or 2, then single ones)
    v, labels, q = clustered(1500, 30, 77, n_queries=37, seed=17)
    store = VectorStore(v, storage=storage)
    batch_c, batch_s = store.topk_classes(labels, 30, q, 6)
    for i in range(len(q)):
        one_c, one_s = store.topk_classes(labels, 30, q[i], 6)
        np.testing.assert_array_equal(batch_c[i], one_c[0])
        np.testing.assert_array_equal(batch_s[i], one_s[0])


def test_default_storage_recall_on_clustered_data():
    v, labels, q = clustered(20000, 500, 256, n_queries=50, seed=11)
    exact, _ = VectorStore(v, storage="float32").topk_classes(labels, 500, q, 5)
    got, _ = VectorStore(v, storage=DEFAULT_STORAGE).topk_classes(labels, 500, q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got.tolist(), exact.tolist())])
    assert recall >= 0.99


def test_kernel_families_agree():
    v, labels, q = clustered(2000, 40, 77, n_queries=5, seed=2)  # dim not a multiple of any vector width
    results = {}
    for fam in FAMILIES:
        _native._set_simd(fam)
        results[fam] = {s: VectorStore(v, storage=s).topk_classes(labels, 40, q, 6) for s in STORAGES}
    _native._set_simd(_native.build_info()["best"])
    first = results[FAMILIES[0]]
    for fam in FAMILIES[1:]:
        for s in STORAGES:
            np.testing.assert_allclose(results[fam][s][1], first[s][1], atol=2e-5)


def test_one_entry_and_k_larger_than_classes():
    v = np.array([[0.6, 0.8]], np.float32)
    for storage in STORAGES:
        c, s = VectorStore(v, storage=storage).topk_classes(
            np.array([3], np.int32), 5, np.array([1.0, 0.0], np.float32), 4
        )
        assert c.tolist() == [[3, -1, -1, -1]]
        assert s[0, 0] == pytest.approx(0.6, abs=5e-3)
        assert np.isneginf(s[0, 1:]).all()


def test_empty_memory():
    for storage in STORAGES:
        store = VectorStore(np.zeros((0, 8), np.float32), storage=storage)
        assert store.n == 0 and store.dim == 8
        c, s = store.topk_classes(np.zeros(0, np.int32), 0, np.ones((2, 8), np.float32), 3)
        assert (c == -1).all() and np.isneginf(s).all()


def test_ties_go_to_lower_class_id():
    v = np.tile(np.array([[1.0, 0.0]], np.float32), (4, 1))
    labels = np.array([3, 1, 2, 0], np.int32)
    for storage in STORAGES:
        c, _ = VectorStore(v, storage=storage).topk_classes(labels, 4, np.array([1.0, 0.0], np.float32), 4)
        assert c.tolist() == [[0, 1, 2, 3]]


def test_nan_query_gives_padding_not_a_crash():
    v, labels, _ = clustered(100, 5, 16, 1, seed=0)
    q = np.full(16, np.nan, np.float32)
    for storage in STORAGES:
        c, s = VectorStore(v, storage=storage).topk_classes(labels, 5, q, 3)
        assert (c == -1).all() and np.isneginf(s).all()


def test_quantize_int8_round_trip():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 33)).astype(np.float32)
    v[3] = 0
    q, scales = quantize_int8(v)
    assert q.dtype == np.int8 and scales.dtype == np.float32
    assert np.abs(q.astype(np.float32) * scales[:, None] - v).max() <= scales.max() / 2 + 1e-6
    assert (q[3] == 0).all() and scales[3] == 1.0


def test_input_errors():
    v, labels, q = clustered(50, 5, 8, 2, seed=1)
    store = VectorStore(v, storage="float32")
    with pytest.raises(InvalidInputError, match="outside"):
        store.topk_classes(np.where(labels == 0, 7, labels).astype(np.int32), 5, q, 3)
    with pytest.raises(InvalidInputError, match="n_classes"):
        store.topk_classes(np.full(50, -1, np.int64), 5, q, 3)
    with pytest.raises(InvalidInputError, match="k must be"):
        store.topk_classes(labels, 5, q, 0)
    with pytest.raises(InvalidInputError, match="dim"):
        store.topk_classes(labels, 5, np.ones((1, 9), np.float32), 3)
    with pytest.raises(InvalidInputError, match="entries"):
        store.topk_classes(labels[:10], 5, q, 3)
    with pytest.raises(InvalidInputError, match="threads"):
        store.topk_classes(labels, 5, q, 3, threads=0)
    with pytest.raises(InvalidInputError, match=r"threads must be in \[1, 1024\]"):  # not a million threads
        store.topk_classes(labels, 5, q, 3, threads=10**6)
    with pytest.raises(InvalidInputError, match="storage"):
        VectorStore(v, storage="bfloat16")
    with pytest.raises(InvalidInputError, match="NaN"):
        VectorStore(np.full((2, 3), np.nan, np.float32))


def test_native_refuses_silent_copies():
    v, labels, q = clustered(50, 5, 8, 2, seed=1)
    with pytest.raises(TypeError, match="float32"):
        _native.topk_classes(v.astype(np.float64), labels, 5, q, 3)
    with pytest.raises(TypeError, match="queries"):
        _native.topk_classes(v, labels, 5, q.astype(np.float64), 3)
    with pytest.raises(TypeError, match="int32"):
        _native.topk_classes(v, labels.astype(np.int64), 5, q, 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.topk_classes(np.asfortranarray(v), labels, 5, q, 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.topk_classes(v, labels, 5, np.ascontiguousarray(np.tile(q, (1, 2)))[:, ::2], 3)
    with pytest.raises(TypeError, match="scales"):
        _native.topk_classes(v.astype(np.int8), labels, 5, q, 3)
    with pytest.raises(ValueError, match="only for int8"):
        _native.topk_classes(v, labels, 5, q, 3, scales=np.ones(50, np.float32))
    with pytest.raises(ValueError, match="rerank"):
        _native.topk_classes(v.astype(np.int8), labels, 5, q, 3, scales=np.ones(50, np.float32), rerank=v[:10])


def test_build_info():
    info = _native.build_info()
    assert {"compiler", "arch", "compiled", "simd", "selected", "best", "storages"} <= set(info)
    assert info["selected"] in info["compiled"]
    assert "scalar" in info["compiled"]
    with pytest.raises(ValueError):
        _native._set_simd("quantum")


def test_stub_matches_the_module():
    """rar_edge/_native.pyi (made by pybind11-stubgen) names the module's functions and their arguments."""
    import ast
    import re
    from pathlib import Path

    stub = Path(_native.__file__).resolve().parent / "_native.pyi"
    if not stub.exists():  # editable installs load the module from the build folder
        stub = Path(__file__).resolve().parents[1] / "rar_edge" / "_native.pyi"
    tree = ast.parse(stub.read_text())
    stub_funcs = {
        f.name: [a.arg for a in f.args.args + f.args.kwonlyargs] for f in tree.body if isinstance(f, ast.FunctionDef)
    }
    stub_consts = {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)} - {"__all__"}
    runtime_funcs = {}
    for name in dir(_native):
        obj = getattr(_native, name)
        if callable(obj) and not name.startswith("__") and obj.__doc__:
            sig = obj.__doc__.splitlines()[0]
            inner = sig[sig.index("(") + 1 : sig.rindex(") ->")]
            runtime_funcs[name] = re.findall(r"(\w+)\s*:", inner)
    assert stub_funcs == runtime_funcs, "regenerate: pybind11-stubgen rar_edge._native -o <dir>"
    assert stub_consts == {n for n in dir(_native) if n.isupper()}


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8])
def test_unit_rows_matches_numpy(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 1024)) * 50).clip(-128, 127).astype(dtype)
    x[2] = 5 if dtype != np.int8 else 0  # a constant row: zero after the zero point below for uint8/float32
    zp = 5.0 if dtype != np.int8 else 0.0
    got, finite = _native.unit_rows(x, zp)
    ref = x.astype(np.float64) - zp
    norms = np.linalg.norm(ref, axis=1, keepdims=True)
    ref = np.where(norms > 0, ref / np.where(norms > 0, norms, 1), 0)
    assert finite and got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-7)
    assert np.all(got[2] == 0)


def test_unit_rows_flags_nan_and_inf_rows_and_refuses_bad_input():
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    got, finite = _native.unit_rows(x)
    assert not finite and np.all(np.isnan(got[1:])) and np.allclose(got[0], 0.5)
    with pytest.raises(TypeError, match="float32, uint8 or int8"):
        _native.unit_rows(np.ones((2, 2), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.unit_rows(np.ones((4, 4), np.float32)[:, ::2])
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        _native.unit_rows(np.ones(4, np.float32))


def test_small_memories_scan_float32_with_the_same_result(monkeypatch):
    import rar_edge.index.lookup as lookup

    v, labels, q = clustered(100, 20, 64, n_queries=5, seed=9)
    monkeypatch.setattr(lookup, "RERANK_MIN_ROWS", 128)
    small = VectorStore(v, storage="int8_rerank")
    assert small._scales is None and small._v.dtype == np.float32  # the shortcut is taken below 128 rows
    monkeypatch.setattr(lookup, "RERANK_MIN_ROWS", 0)
    forced = VectorStore(v, storage="int8_rerank")
    assert forced._v.dtype == np.int8
    for a, b in zip(small.topk_classes(labels, 20, q, 5), forced.topk_classes(labels, 20, q, 5)):
        np.testing.assert_array_equal(a, b)


def test_int8_sums_do_not_overflow_on_flat_long_vectors(family):
    """Flat non-negative vectors at d >= 2048: a chunk's int32 sum of int8 x int16 products used to overflow
    (one whole 8192-element chunk reached 1.7e10), so int8_rerank lost the exact match."""
    d = 2048
    v = np.full((2, d), 1 / np.sqrt(d), np.float32)
    v[1] *= -1
    labels = np.array([0, 1], np.int32)
    for storage in ("int8", "int8_rerank"):
        c, s = VectorStore(v, storage=storage).topk_classes(labels, 2, v[:1], 1)
        assert c[0, 0] == 0 and s[0, 0] == pytest.approx(1.0, abs=2e-3), (family, storage)
    rng = np.random.default_rng(0)
    d = 4096
    u = rng.uniform(0, 1, (400, d)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    lab = rng.integers(0, 20, 400).astype(np.int32)
    q = u[:5] + 0.002 * rng.standard_normal((5, d)).astype(np.float32)
    exact = VectorStore(u, storage="float32").topk_classes(lab, 20, q, 3)
    got = VectorStore(u, storage="int8_rerank").topk_classes(lab, 20, q, 3)
    np.testing.assert_array_equal(got[0], exact[0])


def test_a_huge_finite_query_is_not_taken_for_nan(family):
    v = np.full((200, 64), 1 / 8, np.float32)
    v[100:] *= 0.5
    labels = np.r_[np.zeros(100), np.ones(100)].astype(np.int32)
    q = np.full((1, 64), 1e37, np.float32)  # finite, but its L1 norm passes FLT_MAX
    for storage in STORAGES:
        c, _ = VectorStore(v, storage=storage).topk_classes(labels, 2, q, 2)
        assert c[0].tolist() == [0, 1], storage


def test_misaligned_arrays_are_refused_natively_and_copied_by_the_wrappers():
    buf = bytearray(4 * 64 * 8 + 1)
    v = np.frombuffer(buf, np.float32, count=64 * 8, offset=1).reshape(64, 8)
    v[:] = np.random.default_rng(0).standard_normal((64, 8))
    assert v.flags.c_contiguous and not v.flags.aligned
    labels = np.zeros(64, np.int32)
    with pytest.raises(ValueError, match="aligned"):
        _native.topk_classes(v, labels, 1, np.ones((1, 8), np.float32), 1)
    with pytest.raises(ValueError, match="aligned"):
        _native.unit_rows(v)
    c, _ = VectorStore(v, storage="float32").topk_classes(labels, 1, v[:1], 1)  # the wrapper makes an aligned copy
    assert c[0, 0] == 0
