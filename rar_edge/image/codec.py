"""Image decoding and validation: JPEG header and EXIF orientation, libjpeg-turbo at a reduced DCT scale, Pillow.

Every path returns upright RGB pixels (HxWx3 uint8); the model transform is in `rar_edge.image.transform`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rar_edge.errors import ImageDecodeError, InvalidInputError

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: Largest image (in pixels) decoded by default; Pillow's own bomb limit is the same order.
DEFAULT_MAX_PIXELS = 89_478_485


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
        # One 16- or 32-bit channel. 16-bit data (and 32-bit data within 0..65535) maps 65535 to 255, as
        # OpenCV and torchvision scale it; float data within 0..1 maps 1 to 255; anything else has no
        # known white level, so its own range is stretched (a constant image then keeps its clipped value).
        a = np.asarray(img, dtype=np.float64)
        if a.size == 0:
            raise InvalidInputError(f"image {what} is empty: {img.width}x{img.height}")
        lo, hi = float(a.min()), float(a.max())
        if mode.startswith("I;16") or (0.0 <= lo and hi <= 65535.0 and mode == "I"):
            a = a * (255.0 / 65535.0)
        elif mode == "F" and 0.0 <= lo and hi <= 1.0:
            a = a * 255.0
        elif hi > lo:
            a = (a - lo) * (255.0 / (hi - lo))
        a8 = np.clip(np.nan_to_num(a).round(), 0, 255).astype(np.uint8)
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
        except IsADirectoryError:
            raise ImageDecodeError(f"{os.fspath(src)!r} is a folder, not an image file") from None
        except (FileNotFoundError, NotADirectoryError):
            raise ImageDecodeError(f"no such image file: {os.fspath(src)!r}") from None
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
        An RGB image (grayscale, palette, RGBA and 16-bit inputs are converted), upright: an EXIF
        Orientation tag (phone photos) is applied, as OpenCV's imread and Hugging Face's load_image do.

    Raises:
        ImageDecodeError: missing file, corrupt/truncated data, unsupported format, or too many pixels.
        InvalidInputError: an array of the wrong dtype or shape, or an unsupported type.
    """
    what = _describe(src)
    if isinstance(src, np.ndarray):
        return _array_to_image(src)
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise ImageDecodeError(_too_many_pixels(what, src.width, src.height, max_pixels))
        if src.width < 1 or src.height < 1:
            raise InvalidInputError(f"image {what} is empty: {src.width}x{src.height}")
        try:
            src.load()  # a lazily opened image reads its file now: corrupt data is an ImageDecodeError
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageDecodeError(f"image {what} is corrupt or truncated: {e}") from e
        return _to_rgb(_upright(src, what), what)
    return _pil_decode(_encoded_bytes(src), what, draft_size_px, max_pixels)


#: EXIF orientations (2-8) that swap width and height.
_TRANSPOSING = (5, 6, 7, 8)


def _exif_orientation_of(img: Image.Image) -> int:
    try:
        v = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, as Pillow's exif_transpose does
        return 1
    return v if isinstance(v, int) and 1 <= v <= 8 else 1


def _swapped_if_transposed(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """A (width, height) taken between a photo's stored and upright frames (the same swap both ways)."""
    return (size[1], size[0]) if orientation in _TRANSPOSING else (size[0], size[1])


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied (as decoding gives it)."""
    return _swapped_if_transposed(img.size, _exif_orientation_of(img))


def _upright(img: Image.Image, what: str) -> Image.Image:
    """The image turned as its EXIF Orientation tag says (the tag is then dropped); unchanged without one."""
    if _exif_orientation_of(img) == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"image {what} is corrupt or truncated: {e}") from e


def _pil_decode(data: bytes, what: str, draft_size_px: tuple[int, int] | None, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # max_pixels (checked below) decides, not Pillow's warning level; Pillow still refuses
            # images over twice Image.MAX_IMAGE_PIXELS outright.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height, scale = img.width, img.height, 1
            if draft_size_px is not None and img.format == "JPEG":
                # the draft must cover the upright image: the request in the stored frame
                dw, dh = _swapped_if_transposed(draft_size_px, _exif_orientation_of(img))
                img.draft("RGB", (int(dw), int(dh)))
                scale = max(1, width // max(img.width, 1))
            if img.width * img.height > max_pixels:  # the pixels decoded (a JPEG draft decodes fewer)
                raise ImageDecodeError(_too_many_pixels(what, width, height, max_pixels, scale=scale))
            img.load()
            img = _upright(img, what)
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
    libjpeg-turbo reports a problem with, takes the `load_image` path and its errors. Either way an
    EXIF Orientation tag is applied: the pixels come back upright.
    """
    if isinstance(src, (np.ndarray, Image.Image)):
        return image_to_array(load_image(src, max_pixels=max_pixels))
    data, what = _encoded_bytes(src), _describe(src)
    fast = _decode_jpeg_fast(data, draft_size_px, max_pixels, what)
    return fast if fast is not None else image_to_array(_pil_decode(data, what, draft_size_px, max_pixels))


def _too_many_pixels(what: str, width: int, height: int, max_pixels: int, *, scale: int = 1) -> str:
    at = "" if scale == 1 else f" (decoded at 1/{scale} scale: {-(-width // scale)}x{-(-height // scale)})"
    return (
        f"image {what} is {width}x{height} = {width * height} pixels{at}, more than the limit of "
        f"{max_pixels} (a decompression-bomb guard; raise it with --max-pixels, or PipelineConfig.max_pixels)"
    )


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


def _decode_jpeg_fast(
    data: bytes, draft_size_px: tuple[int, int] | None, max_pixels: int, what: str
) -> np.ndarray | None:
    sj = _simplejpeg()
    if sj is None:
        return None
    info = jpeg_header(data)
    # CMYK/YCCK (Adobe inversion), RGB, 12-bit, lossless and arithmetic-coded JPEGs: Pillow's handling
    if info is None or info[2] not in ("YCbCr", "Gray"):
        return None
    width, height, _, orientation = info
    if draft_size_px is not None:
        draft_size_px = _swapped_if_transposed(draft_size_px, orientation)  # as in _pil_decode
    s = _jpeg_draft_scale(width, height, draft_size_px)
    h, w = -(-height // s), -(-width // s)
    # The guard is on the pixels decoded: a 12000x9000 phone photo decoded at 1/8 scale is 1500x1125.
    if w * h > max_pixels:
        raise ImageDecodeError(_too_many_pixels(what, width, height, max_pixels, scale=s))
    try:
        # min_factor=s with min sizes of ceil(size/s) leaves exactly the scale 1/s (libjpeg-turbo also has M/8).
        out = sj.decode_jpeg(data, colorspace="RGB", min_height=h, min_width=w, min_factor=s, strict=True)
    except ValueError:
        return None
    if out.shape != (h, w, 3) or not out.flags.c_contiguous:
        return None
    return out if orientation == 1 else orient(out, orientation)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """HxWxC pixels turned upright as an EXIF Orientation value (1-8) says (Pillow's exif_transpose)."""
    a = pixels
    if orientation in _TRANSPOSING:
        a = a.transpose(1, 0, 2)  # 5: transpose; 6, 7, 8 add a flip to it
    flip_rows, flip_cols = {
        2: (False, True),
        3: (True, True),
        4: (True, False),
        6: (False, True),
        7: (True, True),
        8: (True, False),
    }.get(orientation, (False, False))
    if flip_rows:
        a = a[::-1]
    if flip_cols:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


_SOF_HUFFMAN_8BIT = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential and progressive, Huffman-coded


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, str, int] | None:
    """What a JPEG's header says, read without decoding: (width, height, colorspace, EXIF orientation).

    colorspace is "YCbCr" or "Gray" for the 8-bit Huffman-coded JPEGs libjpeg-turbo decodes to RGB as
    Pillow does, guessed as libjpeg does (a JFIF marker, else an Adobe marker's transform, else the
    component ids); "other" for the rest (CMYK, YCCK, RGB, 12-bit, lossless, arithmetic coding).
    orientation is the EXIF Orientation tag (1-8; 1 when absent or malformed). None: not a JPEG, or a
    header that ends or breaks before its scan starts.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, sof, jfif, adobe_transform, orientation, exif_seen = 2, None, False, None, 1, False
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        m = data[pos + 1]
        if m == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if m == 0xDA:  # start of scan: the header is complete
            break
        if m in (0x00, 0x01, 0xD8, 0xD9) or 0xD0 <= m <= 0xD7:  # no segment of its own here: malformed
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        seg, end = pos + 4, pos + 2 + length
        if length < 2 or end > n:
            return None
        if m == 0xE0 and length >= 16 and data[seg : seg + 5] == b"JFIF\0":
            jfif = True
        elif m == 0xE1 and not exif_seen and data[seg : seg + 6] == b"Exif\0\0":
            exif_seen = True  # the first Exif block counts, as in Pillow
            orientation = _tiff_orientation(data, seg + 6, end)
        elif m == 0xEE and length >= 14 and data[seg : seg + 5] == b"Adobe":
            adobe_transform = data[seg + 11]
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):  # a start of frame (not DHT, JPG, DAC)
            if sof is not None or length < 8:
                return None
            precision, height, width, nc = struct.unpack_from(">BHHB", data, seg)
            if length < 8 + 3 * nc:
                return None
            sof = (m, precision, height, width, nc, bytes(data[seg + 6 : seg + 6 + 3 * nc : 3]))
        pos = end
    if sof is None:
        return None
    m, precision, height, width, nc, ids = sof
    colorspace = "other"
    if m in _SOF_HUFFMAN_8BIT and precision == 8 and width > 0 and height > 0:
        if nc == 1:
            colorspace = "Gray"
        elif nc == 3:  # libjpeg's guess (jdapimin.c default_decompress_parms)
            if jfif:
                colorspace = "YCbCr"
            elif adobe_transform is not None:
                colorspace = "YCbCr" if adobe_transform == 1 else "other"
            else:
                colorspace = "other" if ids == b"RGB" else "YCbCr"
    return width, height, colorspace, orientation


def _tiff_orientation(data: bytes | memoryview, t: int, end: int) -> int:
    """The Orientation tag (1-8) in IFD0 of the TIFF block data[t:end]; 1 where absent or malformed."""
    if end - t < 8:
        return 1
    e = {b"II": "<", b"MM": ">"}.get(bytes(data[t : t + 2]))
    if e is None:
        return 1
    magic, ifd = struct.unpack_from(e + "HI", data, t + 2)
    p = t + ifd
    if magic != 42 or ifd < 8 or p + 2 > end:
        return 1
    (count,) = struct.unpack_from(e + "H", data, p)
    p += 2
    for i in range(min(count, (end - p) // 12)):
        tag, typ, cnt = struct.unpack_from(e + "HHI", data, p + 12 * i)
        if tag == 0x0112:
            if cnt != 1 or typ not in (3, 4):  # SHORT (the standard) or LONG
                return 1
            (v,) = struct.unpack_from(e + ("H" if typ == 3 else "I"), data, p + 12 * i + 8)
            return v if 1 <= v <= 8 else 1
    return 1


def _array_to_image(a: np.ndarray) -> Image.Image:
    if a.size == 0:
        raise InvalidInputError(f"image array is empty: shape {a.shape}")
    if a.dtype == np.uint16 and a.ndim == 2:
        return _to_rgb(Image.fromarray(a), "array")
    if a.dtype != np.uint8:
        raise InvalidInputError(
            f"image arrays must be uint8 (got {a.dtype}); convert with .astype(np.uint8) after scaling"
        )
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
