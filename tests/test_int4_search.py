"""The opt-in "int4_margin" storage: 4-bit codes, then float32 rescoring of the rows within the margin."""

from __future__ import annotations

import numpy as np
import pytest
from test_native_search import clustered

from rar_edge import _native
from rar_edge.errors import InvalidInputError
from rar_edge.index.lookup import INT4_MARGIN_SIGMAS, VectorStore, quantize_int4

from conftest import SIMD_FAMILIES as FAMILIES


def decode_int4(codes: np.ndarray, dim: int) -> np.ndarray:
    """The signed codes c (N, dim) back from the packed layout."""
    n, width = codes.shape
    blocks = width // 16
    u = np.stack([codes & 15, codes >> 4], axis=1).reshape(n, 2, blocks, 16).transpose(0, 2, 1, 3)
    return u.reshape(n, blocks * 32).astype(np.int64) - 8, dim


def native(store: VectorStore, labels, n_classes, q, k, *, margin=INT4_MARGIN_SIGMAS, threads=1):
    return _native.topk_classes_int4(
        store._v,
        store._scales,
        store._resid,
        store._rerank,
        labels,
        n_classes,
        np.atleast_2d(q),
        k,
        margin_sigmas=margin,
        threads=threads,
    )


@pytest.mark.parametrize("dim", [1, 31, 32, 33, 77, 128])
def test_quantize_int4_layout_and_residual(dim):
    rng = np.random.default_rng(dim)
    v = rng.standard_normal((40, dim)).astype(np.float32)
    v[3] = 0.0
    codes, scales, resid = quantize_int4(v)
    assert codes.dtype == np.uint8 and codes.shape == (40, (dim + 31) // 32 * 16)
    c, _ = decode_int4(codes, dim)
    assert c.min() >= -8 and c.max() <= 7
    assert (c[:, dim:] == 0).all()  # padding holds code 8 (zero)
    true_resid = np.linalg.norm(v.astype(np.float64) - scales[:, None].astype(np.float64) * c[:, :dim], axis=1)
    assert (resid >= true_resid).all()
    # the residual is at most the plain max|v| / 7 rounding's (the clip search only ever lowers it)
    assert (true_resid <= np.sqrt(dim) * np.abs(v).max(axis=1) / 14 + 1e-6).all()
    assert scales[3] == 1.0 and resid[3] == pytest.approx(0.0, abs=1e-30) and (c[3] == 0).all()


def test_clustered_answers_like_float32(family):
    v, labels, q = clustered(5000, 100, 128, n_queries=30, seed=7)
    exact = VectorStore(v, storage="float32").topk_classes(labels, 100, q, 5)
    store = VectorStore(v, storage="int4_margin")
    assert store.nbytes < VectorStore(v, storage="int8").nbytes * 0.6
    for threads in (1, 3):
        got = store.topk_classes(labels, 100, q, 5, threads=threads)
        np.testing.assert_array_equal(got[0], exact[0])
        np.testing.assert_array_equal(got[1], exact[1])


def test_a_margin_covering_everything_is_the_float32_search(family):
    v, labels, q = clustered(700, 20, 77, n_queries=9, seed=3)  # dim not a multiple of 32: an odd last block
    store = VectorStore(v, storage="int4_margin")
    exact = VectorStore(v, storage="float32").topk_classes(labels, 20, q, 20)
    got = native(store, labels, 20, q, 20, margin=1e5)
    np.testing.assert_array_equal(got[0], exact[0])
    np.testing.assert_array_equal(got[1], exact[1])


def test_families_agree():
    v, labels, q = clustered(1500, 30, 77, n_queries=7, seed=9)
    store = VectorStore(v, storage="int4_margin")
    before = _native.build_info()["selected"]
    try:
        results = []
        for fam in FAMILIES:
            _native._set_simd(fam)
            results.append(native(store, labels, 30, q, 6, margin=1.0))  # a thin margin: 4-bit scores decide
    finally:
        _native._set_simd(before)
    for c, s in results[1:]:
        # the 4-bit sums are exact integers in every family; the float32 rescoring sums in each family's order
        np.testing.assert_array_equal(c, results[0][0])
        np.testing.assert_allclose(s, results[0][1], rtol=0, atol=1e-6)


def test_edge_cases(family):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((200, 40)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = rng.integers(0, 5, 200).astype(np.int32)
    store = VectorStore(v, storage="int4_margin")
    # k larger than the classes present: padding
    c, s = native(store, labels, 5, v[0], 8)
    assert (c[0, 5:] == -1).all() and np.isneginf(s[0, 5:]).all() and c[0, 0] == labels[0]
    # ties: the same row in classes 2 and 1 goes to the lower id first
    v2 = np.vstack([v[:150], v[7:8]])
    lab2 = np.r_[labels[:150], 1].astype(np.int32)
    lab2[7] = 2
    s2 = VectorStore(v2, storage="int4_margin")
    c, _ = native(s2, lab2, 5, v[7], 2)
    assert c[0].tolist() == [1, 2]
    # one row, and no rows
    one = VectorStore(v[:1], storage="float32")
    codes, scales, resid = quantize_int4(v[:1])
    c, s = _native.topk_classes_int4(codes, scales, resid, one._v, np.zeros(1, np.int32), 1, v[:2], 2)
    assert c.tolist() == [[0, -1], [0, -1]]
    codes, scales, resid = quantize_int4(v[:0])
    c, s = _native.topk_classes_int4(codes, scales, resid, v[:0], np.zeros(0, np.int32), 3, v[:1], 2)
    assert c.tolist() == [[-1, -1]] and np.isneginf(s).all()
    # a NaN query scores nothing
    c, s = native(store, labels, 5, np.full(40, np.nan, np.float32), 3)
    assert (c == -1).all()


def test_input_errors():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((10, 40)).astype(np.float32)
    codes, scales, resid = quantize_int4(v)
    lab = np.zeros(10, np.int32)
    q = v[:1]
    with pytest.raises(TypeError, match="codes must be uint8"):
        _native.topk_classes_int4(codes.view(np.int8), scales, resid, v, lab, 1, q, 1)
    with pytest.raises(ValueError, match="codes must be"):
        _native.topk_classes_int4(codes[:, :8].copy(), scales, resid, v, lab, 1, q, 1)
    with pytest.raises(ValueError, match="resid must be"):
        _native.topk_classes_int4(codes, scales, resid[:5].copy(), v, lab, 1, q, 1)
    with pytest.raises(ValueError, match="outside"):
        _native.topk_classes_int4(codes, scales, resid, v, lab + 3, 1, q, 1)
    with pytest.raises(ValueError, match="margin_sigmas"):
        _native.topk_classes_int4(codes, scales, resid, v, lab, 1, q, 1, margin_sigmas=-1.0)
    with pytest.raises(ValueError, match="queries must be"):
        _native.topk_classes_int4(codes, scales, resid, v, lab, 1, v[:1, :7].copy(), 1)
    with pytest.raises(InvalidInputError):
        VectorStore(np.vstack([v] * 20), storage="int4_margin").topk_classes(np.zeros(200, np.int32), 1, q, 0)
