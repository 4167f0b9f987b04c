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

from . import _native
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


def _encoded_bytes(src: ImageLike) -> bytes:
    """The encoded bytes of a path or bytes-like input."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        try:
            # One read through os (no Path or buffered file object): cheapest on the per-photo path.
            fd = os.open(src, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                data = os.read(fd, size + 1)
                if len(data) != size:  # a short read, or a file that changed size: read to the end
                    parts = [data]
                    while part := os.read(fd, 1 << 20):
                        parts.append(part)
                    data = b"".join(parts)
            finally:
                os.close(fd)
            return data
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ImageDecodeError(f"no such image file: {Path(src)}") from None
        except OSError as e:
            raise ImageDecodeError(f"cannot read image file {Path(src)}: {e}") from e
    raise InvalidInputError(
        f"unsupported image type {type(src).__name__}: pass a path, bytes, a PIL image or an HxWx3 uint8 array"
    )


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
    return _pil_decode(_encoded_bytes(src), what, draft_size_px, max_pixels)


def _pil_decode(data: bytes, what: str, draft_size_px: tuple[int, int] | None, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(_too_many_pixels(what, img.width, img.height, max_pixels))
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


def decode_rgb(
    src: ImageLike,
    *,
    draft_size_px: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Like `load_image`, but returns a C-contiguous HxWx3 uint8 array, decoding JPEGs straight into it.

    Baseline and progressive YCbCr or grayscale JPEGs go through libjpeg-turbo (simplejpeg) at the
    same DCT scale `load_image` picks, giving the same pixels about a third faster and without
    Pillow's header parsing or a copy out of the PIL image. Everything else, and any JPEG
    libjpeg-turbo reports a problem with, takes the `load_image` path and its errors.
    """
    if isinstance(src, (np.ndarray, Image.Image)):
        return image_to_array(load_image(src, max_pixels=max_pixels))
    data, what = _encoded_bytes(src), _describe(src)
    fast = _decode_jpeg_fast(data, draft_size_px, max_pixels, what)
    return fast if fast is not None else image_to_array(_pil_decode(data, what, draft_size_px, max_pixels))


def _too_many_pixels(what: str, width: int, height: int, max_pixels: int) -> str:
    return (f"image {what} is {width}x{height} = {width * height} pixels, "
            f"more than max_pixels={max_pixels} (decompression-bomb guard)")


_SIMPLEJPEG: object = None  # the module once imported, False where it is not installed


def _simplejpeg():
    global _SIMPLEJPEG
    if _SIMPLEJPEG is None:
        try:
            import simplejpeg

            _SIMPLEJPEG = simplejpeg
        except ImportError:  # pragma: no cover - a core dependency; Pillow decodes everything without it
            _SIMPLEJPEG = False
    return _SIMPLEJPEG or None


def _jpeg_draft_scale(width: int, height: int, draft_size_px: tuple[int, int] | None) -> int:
    """The DCT scale divisor (1, 2, 4 or 8) Pillow's JPEG draft mode picks for this request."""
    if draft_size_px is None:
        return 1
    fit = min(width // max(int(draft_size_px[0]), 1), height // max(int(draft_size_px[1]), 1))
    return next((s for s in (8, 4, 2) if fit >= s), 1)


def _decode_jpeg_fast(data: bytes, draft_size_px: tuple[int, int] | None, max_pixels: int, what: str) -> np.ndarray | None:
    sj = _simplejpeg()
    if sj is None or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):  # CMYK/YCCK (Adobe inversion) and RGB JPEGs: Pillow's handling
        return None
    if width * height > max_pixels:
        raise ImageDecodeError(_too_many_pixels(what, width, height, max_pixels))
    s = _jpeg_draft_scale(width, height, draft_size_px)
    h, w = -(-height // s), -(-width // s)
    try:
        # min_factor=s with min sizes of ceil(size/s) leaves exactly the scale 1/s (libjpeg-turbo also has M/8).
        out = sj.decode_jpeg(data, colorspace="RGB", min_height=h, min_width=w, min_factor=s, strict=True)
    except ValueError:
        return None
    return out if out.shape == (h, w, 3) and out.flags.c_contiguous else None


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


def resize_for_model(img: Image.Image | np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Resizes (and centre-crops) as the spec says; returns an HxWx3 uint8 array of spec.size_px.

    One resampling pass over exactly the region the spec keeps (no resize-then-crop rounding).
    Square bilinear targets use the native resampler (Pillow's antialiased bilinear filter);
    other filters use Pillow's own.
    """
    th, tw = spec.size_px
    pixels = img if isinstance(img, np.ndarray) else image_to_array(img)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise InvalidInputError(f"pixels must be HxWx3 uint8, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    region = _model_region(width, height, spec)
    if spec.resample == "bilinear" and th == tw:
        box = np.asarray([region], np.float64)
        return _native.crop_blur(np.ascontiguousarray(pixels), box, th, 1.0, False, 0.0, False, 0, 1)[0]
    if region == (0.0, 0.0, float(width), float(height)) and (height, width) == (th, tw):
        return np.ascontiguousarray(pixels)
    return image_to_array(Image.fromarray(np.ascontiguousarray(pixels), "RGB").resize((tw, th), _RESAMPLE[spec.resample], box=region))


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
