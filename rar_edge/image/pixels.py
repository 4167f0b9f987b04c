"""The one check of decoded pixels that the SDK's stages hand each other: an HxWx3 uint8 RGB array."""

from __future__ import annotations

import numpy as np

from rar_edge.errors import InvalidInputError


def check_rgb(image: object, *, what: str = "image", contiguous: bool = False) -> np.ndarray:
    """Returns ``image`` if it is a non-empty HxWx3 uint8 array, else raises `InvalidInputError` saying why.

    Args:
        image: the array to check.
        what: how the message names it.
        contiguous: also require C order (for native calls, which refuse to copy silently).
    """
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"{what} must be a numpy array (H, W, 3) uint8, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidInputError(
            f"{what} must be uint8, not {image.dtype} (convert explicitly, e.g. np.clip(x, 0, 255).astype(np.uint8))"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"{what} must be (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInputError(f"{what} is empty: shape {image.shape}")
    if contiguous and not image.flags.c_contiguous:
        raise InvalidInputError(
            f"{what} must be C-contiguous; np.ascontiguousarray({what}) makes the copy this call refuses to make silently"
        )
    return image
