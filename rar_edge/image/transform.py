"""The model transform: resize (and centre-crop) to the encoder's input, then normalise, as the manifest says.

Everything an encoder needs to turn decoded pixels into its input tensor is read from the model's
`ImageSpec`; nothing here hard-codes a size or a mean.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rar_edge import _native
from rar_edge.image.codec import image_to_array
from rar_edge.image.pixels import check_rgb
from rar_edge.manifest import ImageSpec

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


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
    Square bilinear targets over a whole-pixel region use the native resampler (Pillow's antialiased
    bilinear filter); other filters, and fractional centre crops, use Pillow's own.
    """
    th, tw = spec.size_px
    pixels = img if isinstance(img, np.ndarray) else image_to_array(img)
    check_rgb(pixels, what="pixels")
    height, width = pixels.shape[:2]
    region = _model_region(width, height, spec)
    if spec.resample == "bilinear" and th == tw and all(float(v).is_integer() for v in region):
        # the native resampler crops whole pixels (it rounds a box outwards); a fractional centre crop
        # goes to Pillow, which resamples exactly that region
        box = np.asarray([region], np.float64)
        return _native.crop_blur(np.ascontiguousarray(pixels), box, out_size=th)[0]
    if region == (0.0, 0.0, float(width), float(height)) and (height, width) == (th, tw):
        return np.ascontiguousarray(pixels)
    return image_to_array(
        Image.fromarray(np.ascontiguousarray(pixels), "RGB").resize((tw, th), RESAMPLE[spec.resample], box=region)
    )


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
