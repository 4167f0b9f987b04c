"""
rar_edge native core (private; use rar_edge.index.lookup / rar_edge.image.boxes)
"""

from __future__ import annotations
import numpy
import numpy.typing
import typing

__all__: list[str] = [
    "ADAPTIVE_MAX_SCALE",
    "ADAPTIVE_MIN_SCALE",
    "ADAPTIVE_TARGET_AREA",
    "MAX_CROP_SCALE",
    "MAX_OUT_SIZE",
    "MAX_SIGMA",
    "build_info",
    "crop_blur",
    "logsumexp",
    "topk_classes",
    "topk_classes_int4",
    "unit_rows",
]

def _set_simd(name: str) -> str:
    """
    Testing hook: force a kernel family ('scalar', 'avx2', 'avx512', 'neon', 'neon_dot').
    """

def build_info() -> dict:
    """
    What was compiled and which kernel family the CPU dispatch picked.
    """

def crop_blur(
    image: numpy.ndarray,
    boxes: numpy.ndarray,
    *,
    out_size: typing.SupportsInt | typing.SupportsIndex,
    crop_scale: typing.SupportsFloat | typing.SupportsIndex = 1.0,
    adaptive: bool = False,
    sigma: typing.SupportsFloat | typing.SupportsIndex = 0.0,
    letterbox: bool = False,
    pad_value: typing.SupportsInt | typing.SupportsIndex = 0,
    threads: typing.SupportsInt | typing.SupportsIndex = 1,
) -> numpy.typing.NDArray[numpy.uint8]:
    """
    Crop (enlarged), blur around and resize every box of one image: (N, S, S, 3) uint8.

    image: (H, W, 3) uint8 C-contiguous; boxes: (N, 4) float64 x1, y1, x2, y2 in pixels.
    """

def logsumexp(x: numpy.ndarray) -> float:
    """
    log(sum(exp(x))) of a float32 row (a vocabulary's logits), as max + log(sum(exp(x - max))) with a vectorised exp; NaN anywhere gives NaN.
    """

def topk_classes(
    vectors: numpy.ndarray,
    labels: numpy.ndarray,
    n_classes: typing.SupportsInt | typing.SupportsIndex,
    queries: numpy.ndarray,
    k: typing.SupportsInt | typing.SupportsIndex,
    *,
    scales: numpy.ndarray | None = None,
    rerank: numpy.ndarray | None = None,
    threads: typing.SupportsInt | typing.SupportsIndex = 1,
) -> tuple[numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.float32]]:
    """
    Exact top-k distinct classes per query.

    vectors: (N, d) float32, float16 or int8 (then scales (N,) float32: row i = scales[i] * vectors[i],
    and optionally rerank (N, d) float32: the rows whose int8 score could reach the top k are rescored
    in float32, giving the float32 result);
    labels: (N,) int32 in [0, n_classes); queries: (Q, d) float32. Returns (classes int32 (Q, k),
    scores float32 (Q, k)); class score = best inner product among its rows; -1 / -inf pad.
    """

def topk_classes_int4(
    codes: numpy.ndarray,
    scales: numpy.ndarray,
    resid: numpy.ndarray,
    rerank: numpy.ndarray,
    labels: numpy.ndarray,
    n_classes: typing.SupportsInt | typing.SupportsIndex,
    queries: numpy.ndarray,
    k: typing.SupportsInt | typing.SupportsIndex,
    *,
    margin_sigmas: typing.SupportsFloat | typing.SupportsIndex = 6.0,
    threads: typing.SupportsInt | typing.SupportsIndex = 1,
) -> tuple[numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.float32]]:
    """
    Top-k distinct classes from a 4-bit first pass and float32 rescoring (no recall guarantee).

    codes: (N, ceil(d / 32) * 16) uint8 as rar_edge.index.lookup.quantize_int4 packs them; scales, resid:
    (N,) float32; rerank: (N, d) float32 rows; labels (N,) int32 in [0, n_classes); queries (Q, d) float32.
    Rows whose 4-bit score is within margin_sigmas standard deviations of the error (were the residual's
    direction random) of the k-th class are rescored. Queries are split over threads.
    """

def unit_rows(
    x: numpy.ndarray, zero_point: typing.SupportsFloat | typing.SupportsIndex = 0.0
) -> tuple[numpy.typing.NDArray[numpy.float32], bool]:
    """
    Rows minus zero_point, scaled to unit L2 length (zero rows stay zero): ((N, d) float32, all_finite).

    x: (N, d) float32, uint8 or int8, C-contiguous. A row holding NaN or inf comes back all NaN, and all_finite is then False.
    """

ADAPTIVE_MAX_SCALE: float = 3.0
ADAPTIVE_MIN_SCALE: float = 1.25
ADAPTIVE_TARGET_AREA: float = 0.05
MAX_CROP_SCALE: float = 64.0
MAX_OUT_SIZE: int = 8192
MAX_SIGMA: float = 256.0
