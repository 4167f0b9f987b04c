"""Fuzzing the native entry points: any input gives a correct-shaped result or a clear Python exception.

A fixed, derandomised budget (a few seconds in total): the point is that malformed arrays, odd dtypes,
NaN/inf/huge coordinates and out-of-range arguments never crash the interpreter.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rar_edge import _native
from rar_edge.errors import InvalidInputError
from rar_edge.image.boxes import CropConfig, crop_boxes, validate_boxes

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

DTYPES = st.sampled_from([np.float32, np.float16, np.int8, np.float64, np.int32, np.uint8, np.int64, np.bool_])


def arrays(dtype, max_dims=3, max_side=6):
    """Arrays of any small shape, sometimes non-contiguous (a strided view)."""
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side)

    @st.composite
    def build(draw):
        dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
        a = draw(
            hnp.arrays(
                dt,
                shapes,
                elements=hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True)
                if np.dtype(dt).kind == "f"
                else None,
            )
        )
        if a.ndim >= 1 and a.shape[-1] > 1 and draw(st.booleans()):
            a = a[..., ::2]
        return a

    return build()


@FUZZ
@given(
    vectors=arrays(DTYPES, max_dims=3),
    labels=arrays(st.sampled_from([np.int32, np.int64, np.float32]), max_dims=2),
    n_classes=st.integers(-2, 8),
    queries=arrays(st.sampled_from([np.float32, np.float64]), max_dims=3),
    k=st.integers(-2, 12),
    scales=st.one_of(st.none(), arrays(st.sampled_from([np.float32, np.float64]), max_dims=2)),
    rerank=st.one_of(st.none(), arrays(st.just(np.float32), max_dims=2)),
    threads=st.integers(-1, 4),
)
def test_topk_classes_never_crashes(vectors, labels, n_classes, queries, k, scales, rerank, threads):
    try:
        c, s = _native.topk_classes(
            vectors, labels, n_classes, queries, k, scales=scales, rerank=rerank, threads=threads
        )
    except (TypeError, ValueError):
        return
    assert c.shape == s.shape == (queries.shape[0], k)
    assert c.dtype == np.int32 and s.dtype == np.float32
    assert ((c >= -1) & (c < max(n_classes, 0))).all()


@st.composite
def consistent_memories(draw):
    """Well-formed inputs with hostile values: the search must return, whatever the numbers."""
    n = draw(st.integers(0, 40))
    d = draw(st.integers(0, 40))
    n_classes = draw(st.integers(1 if n else 0, 6))
    storage = draw(st.sampled_from(["float32", "float16", "int8", "int8_rerank"]))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    v = draw(hnp.arrays(np.float32, (n, d), elements=floats))
    q = draw(hnp.arrays(np.float32, (draw(st.integers(0, 5)), d), elements=floats))
    labels = draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, max(n_classes - 1, 0))))
    return storage, v, labels, n_classes, q, draw(st.integers(1, 9)), draw(st.integers(1, 3))


@FUZZ
@given(mem=consistent_memories())
def test_topk_classes_hostile_values(mem):
    storage, v, labels, n_classes, q, k, threads = mem
    with np.errstate(all="ignore"):
        if storage == "float32":
            args = (v,)
            kw = {}
        elif storage == "float16":
            args, kw = (v.astype(np.float16),), {}
        else:
            peak = np.nan_to_num(np.abs(v), posinf=1e30).max(axis=1) if v.size else np.zeros(len(v), np.float32)
            scales = np.where(peak > 0, peak / 127, 1).astype(np.float32)
            q8 = (
                np.nan_to_num(np.rint(v / scales[:, None])).clip(-127, 127).astype(np.int8)
                if v.size
                else v.astype(np.int8)
            )
            args = (q8,)
            kw = {"scales": scales, "rerank": v if storage == "int8_rerank" else None}
    c, s = _native.topk_classes(*args, labels, n_classes, q, k, threads=threads, **kw)
    assert c.shape == (len(q), k)
    assert ((c >= -1) & (c < n_classes)).all()
    assert np.isneginf(s[c == -1]).all()


coords = st.floats(allow_nan=True, allow_infinity=True, min_value=None, max_value=None)


@FUZZ
@given(
    image=arrays(st.sampled_from([np.uint8, np.uint8, np.uint8, np.float32, np.int16]), max_dims=4, max_side=9),
    boxes=st.one_of(
        hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.just(4)), elements=coords),
        arrays(st.sampled_from([np.float64, np.float32]), max_dims=3),
    ),
    out_size=st.integers(-1, 24),
    crop_scale=st.floats(allow_nan=True, allow_infinity=True),
    adaptive=st.booleans(),
    sigma=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 30)),
    letterbox=st.booleans(),
    pad_value=st.integers(-3, 300),
    threads=st.integers(-1, 3),
)
def test_crop_blur_never_crashes(image, boxes, out_size, crop_scale, adaptive, sigma, letterbox, pad_value, threads):
    try:
        out = _native.crop_blur(
            image,
            boxes,
            out_size=out_size,
            crop_scale=crop_scale,
            adaptive=adaptive,
            sigma=sigma,
            letterbox=letterbox,
            pad_value=pad_value,
            threads=threads,
        )
    except (TypeError, ValueError):
        return
    assert out.shape == (boxes.shape[0], out_size, out_size, 3) and out.dtype == np.uint8


@FUZZ
@given(
    hw=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    boxes=hnp.arrays(np.float64, st.tuples(st.integers(0, 8), st.just(4)), elements=st.floats(-100, 100)),
    size=st.integers(1, 40),
    scale=st.one_of(st.just("adaptive"), st.floats(1.0, 10.0)),
    sigma=st.floats(0.0, 20.0),
    letterbox=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_crop_boxes_valid_inputs(hw, boxes, size, scale, sigma, letterbox, seed):
    img = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    cfg = CropConfig(out_size_px=size, crop_scale=scale, blur_sigma_px=sigma, letterbox=letterbox, pad_value=seed % 256)
    valid, kept, reasons = validate_boxes(boxes, hw, on_invalid="skip")
    assert len(kept) + len(reasons) == len(boxes)
    out = crop_boxes(img, valid, config=cfg, threads=1 + seed % 2)
    assert out.shape == (len(valid), size, size, 3)
    if len(valid) != len(boxes):
        try:
            crop_boxes(img, boxes, config=cfg)
        except InvalidInputError:
            pass
        else:
            raise AssertionError("invalid boxes must raise")


@FUZZ
@given(
    hw=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    boxes=hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.just(4)), elements=coords),
    out_size=st.integers(1, 20),
    crop_scale=st.one_of(st.floats(1.0, 64.0), st.floats(allow_nan=True, allow_infinity=True)),
    adaptive=st.booleans(),
    sigma=st.one_of(st.floats(0, 256), st.floats(allow_nan=True, allow_infinity=True)),
    letterbox=st.booleans(),
    threads=st.integers(1, 3),
)
def test_crop_blur_hostile_boxes(hw, boxes, out_size, crop_scale, adaptive, sigma, letterbox, threads):
    img = np.full((*hw, 3), 128, np.uint8)
    try:
        out = _native.crop_blur(
            img,
            boxes,
            out_size=out_size,
            crop_scale=crop_scale,
            adaptive=adaptive,
            sigma=sigma,
            letterbox=letterbox,
            pad_value=7,
            threads=threads,
        )
    except ValueError:
        return
    assert out.shape == (len(boxes), out_size, out_size, 3)
    assert ((out == 128) | (out == 7)).all()  # a flat image stays flat; letterbox padding is 7
