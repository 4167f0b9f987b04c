"""The native log-sum-exp of a logit row (the ranker's score mode) against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from rar_edge import _native

from conftest import SIMD_FAMILIES


def _reference(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 1023, 1024, 1025, 4097, 50299, 151936])
def test_matches_float64_reference(family, n):
    rng = np.random.default_rng(n)
    for scale in (1e-3, 1.0, 5.0, 40.0, 400.0):
        x = (rng.standard_normal(n) * scale + rng.uniform(-50, 50)).astype(np.float32)
        assert _native.logsumexp(x) == pytest.approx(_reference(x), abs=1e-6, rel=1e-6)


def test_equal_entries_and_one_dominant_entry(family):
    n = 151936
    assert _native.logsumexp(np.full(n, 2.5, np.float32)) == pytest.approx(2.5 + np.log(n), abs=1e-6)
    x = np.full(1000, -200.0, np.float32)
    x[777] = 3.0
    assert _native.logsumexp(x) == pytest.approx(3.0, abs=1e-6)  # exp(-203) terms vanish next to it


def test_non_finite_values(family):
    row = np.zeros(37, np.float32)
    for pos in (0, 17, 36):  # in the vector part and in the tail
        x = row.copy()
        x[pos] = np.nan
        assert np.isnan(_native.logsumexp(x))
        x[pos] = np.inf
        assert _native.logsumexp(x) == np.inf
        x[pos] = -np.inf  # a masked token: it contributes nothing
        assert _native.logsumexp(x) == pytest.approx(np.log(36.0), abs=1e-6)
    assert _native.logsumexp(np.full(20, -np.inf, np.float32)) == -np.inf


def test_families_agree_within_float_rounding():
    x = (np.random.default_rng(1).standard_normal(50299) * 8).astype(np.float32)
    before = _native.build_info()["selected"]
    try:
        got = []
        for fam in SIMD_FAMILIES:
            _native._set_simd(fam)
            got.append(_native.logsumexp(x))
    finally:
        _native._set_simd(before)
    assert max(got) - min(got) < 1e-6


def test_input_errors():
    with pytest.raises(TypeError, match="float32"):
        _native.logsumexp(np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        _native.logsumexp(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        _native.logsumexp(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.logsumexp(np.zeros(8, np.float32)[::2])
    with pytest.raises(ValueError, match="aligned"):
        _native.logsumexp(np.frombuffer(bytes(33), np.float32, count=8, offset=1))
