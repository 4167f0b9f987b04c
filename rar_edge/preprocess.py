"""Image decoding and validation, and the resize/normalise step that the manifest describes.

Everything an encoder needs to turn a photo into its input tensor is read from the model's
`ImageSpec`; nothing here hard-codes a size or a mean.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError, InvalidInputError
from .manifest import ImageSpec

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: Largest image (in pixels) decoded by default; Pillow's own bomb limit is the same order.
DEFAULT_MAX_PIXELS = 89_478_485

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return type(src).__name__


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit single channel: scale the full range to 8 bits rather than clipping.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a8 = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
        return Image.fromarray(np.repeat(a8[..., None], 3, axis=2), "RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite over white so transparent areas do not turn black.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"cannot convert image {what} from mode {mode} to RGB: {e}") from e


def load_image(
    src: ImageLike,
    *,
    draft_size_px: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decodes any supported input into a fully loaded RGB PIL image.

    Args:
        src: a path, encoded bytes, a PIL image, or an HxWx3 (or HxW) uint8 array.
        draft_size_px: (width, height) the caller will shrink to; JPEGs are then decoded at the
            smallest DCT scale that is still at least this large (much cheaper than a full decode).
        max_pixels: refuse images larger than this (decompression-bomb guard).

    Returns:
        An RGB image (grayscale, palette, RGBA and 16-bit inputs are converted).

    Raises:
        ImageDecodeError: missing file, corrupt/truncated data, unsupported format, or too many pixels.
        InvalidInputError: an array of the wrong dtype or shape, or an unsupported type.
    """
    what = _describe(src)
    if isinstance(src, np.ndarray):
        return _array_to_image(src)
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise ImageDecodeError(f"image {what} has {src.width}x{src.height} pixels, more than max_pixels={max_pixels}")
        return _to_rgb(src, what)
    if isinstance(src, (bytes, bytearray, memoryview)):
        fp: object = io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise ImageDecodeError(f"no such image file: {p}")
        try:
            # One read, then decode from memory: Pillow's many small reads through a Python file object
            # cost ~0.1 ms per photo.
            fp = io.BytesIO(p.read_bytes())
        except OSError as e:
            raise ImageDecodeError(f"cannot read image file {p}: {e}") from e
    else:
        raise InvalidInputError(
            f"unsupported image type {type(src).__name__}: pass a path, bytes, a PIL image or an HxWx3 uint8 array"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)  # type: ignore[arg-type]
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"image {what} is {img.width}x{img.height} = {img.width * img.height} pixels, "
                    f"more than max_pixels={max_pixels} (decompression-bomb guard)"
                )
            if draft_size_px is not None and img.format == "JPEG":
                img.draft("RGB", (int(draft_size_px[0]), int(draft_size_px[1])))
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image {what} refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{what} is not an image Pillow can decode") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"image {what} is corrupt or truncated: {e}") from e
    return _to_rgb(img, what)


def _array_to_image(a: np.ndarray) -> Image.Image:
    if a.dtype == np.uint16 and a.ndim == 2:
        return _to_rgb(Image.fromarray(a), "array")
    if a.dtype != np.uint8:
        raise InvalidInputError(f"image arrays must be uint8 (got {a.dtype}); convert with .astype(np.uint8) after scaling")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        return _to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGBA"), "array")
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise InvalidInputError(f"image arrays must be HxWx3 (RGB) uint8, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidInputError(f"image array is empty: shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def image_to_array(img: Image.Image) -> np.ndarray:
    """An RGB PIL image as a C-contiguous HxWx3 uint8 array."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8))


def draft_size(spec: ImageSpec) -> tuple[int, int]:
    """The (width, height) below which decoding for this spec must not go."""
    h, w = spec.size_px
    return (w, h)


def _model_region(width: int, height: int, spec: ImageSpec) -> tuple[float, float, float, float]:
    """The part of a (width, height) image that the spec's resize (and centre crop) keeps, in pixels."""
    th, tw = spec.size_px
    if spec.resize_mode == "squash":
        return (0.0, 0.0, float(width), float(height))
    target_short = spec.resize_shortest_edge_px or (min(th, tw) if spec.crop_mode == "center" else max(th, tw))
    scale = target_short / min(width, height)
    cw, ch = min(width, tw / scale), min(height, th / scale)
    x0, y0 = (width - cw) / 2.0, (height - ch) / 2.0
    return (x0, y0, x0 + cw, y0 + ch)


def resize_for_model(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resizes (and centre-crops) as the spec says; returns an HxWx3 uint8 array of spec.size_px.

    One resampling pass over exactly the region the spec keeps (no resize-then-crop rounding).
    Square bilinear targets use the native resampler (Pillow's antialiased bilinear filter);
    other filters use Pillow's own.
    """
    th, tw = spec.size_px
    region = _model_region(img.width, img.height, spec)
    if spec.resample == "bilinear" and th == tw:
        from . import _native

        box = np.asarray([region], np.float64)
        return _native.crop_blur(image_to_array(img), box, th, 1.0, False, 0.0, False, 0, 1)[0]
    if region == (0.0, 0.0, float(img.width), float(img.height)) and img.size == (tw, th):
        return image_to_array(img)
    return image_to_array(img.resize((tw, th), _RESAMPLE[spec.resample], box=region))


def normalize(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """HxWx3 or NxHxWx3 uint8 pixels -> the model's input tensor (batch axis added if missing)."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if spec.dtype == "uint8":
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
    else:
        scale = (np.float32(spec.rescale) / np.asarray(spec.std, np.float32)).astype(np.float32)
        shift = (np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)).astype(np.float32)
        x = pixels.astype(np.float32) * scale - shift
    if spec.layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x
