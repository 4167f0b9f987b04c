import io

import numpy as np
import pytest
from PIL import Image

from rar_edge.errors import ImageDecodeError, InvalidInputError
from rar_edge.manifest import ImageSpec
from rar_edge.preprocess import decode_rgb, load_image, normalize, resize_for_model


def _jpeg_bytes(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_all_input_kinds_decode_to_the_same_pixels(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    from_path = np.asarray(load_image(p))
    from_str = np.asarray(load_image(str(p)))
    from_bytes = np.asarray(load_image(data))
    from_pil = np.asarray(load_image(Image.open(io.BytesIO(data))))
    from_array = np.asarray(load_image(from_path))
    for a in (from_str, from_bytes, from_pil, from_array):
        np.testing.assert_array_equal(a, from_path)
    assert from_path.shape == (48, 64, 3)


@pytest.mark.parametrize("decode", [load_image, decode_rgb])
def test_corrupt_and_truncated_images_raise_clear_errors(tmp_path, decode):
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode(b"this is not an image at all")
    data = _jpeg_bytes(256, 256)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="no such image file"):
        decode(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="no such image file"):
        decode(tmp_path)
    with pytest.raises(InvalidInputError, match="unsupported image type"):
        decode(12345)  # type: ignore[arg-type]


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, "PNG")  # compresses to a few KB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        load_image(buf.getvalue(), max_pixels=1_000_000)


def test_gray_rgba_palette_and_16bit_become_rgb():
    gray = Image.fromarray(np.full((5, 7), 100, np.uint8), "L")
    assert np.asarray(load_image(gray)).shape == (5, 7, 3)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white background
    assert (np.asarray(load_image(rgba)) == 255).all()
    img16 = np.array([[0, 65535], [32768, 1000]], np.uint16)
    out = np.asarray(load_image(img16))
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == 0 and out[0, 1, 0] == 255
    with pytest.raises(InvalidInputError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InvalidInputError, match="HxWx3"):
        load_image(np.zeros((4, 4, 5), np.uint8))


def test_draft_decoding_keeps_at_least_the_requested_size():
    data = _jpeg_bytes(1000, 800)
    img = load_image(data, draft_size_px=(224, 224))
    assert img.width >= 224 and img.height >= 224 and img.width < 1000


@pytest.mark.parametrize("mode,crop", [("shortest_edge", "center"), ("squash", "none")])
def test_resize_for_model_gives_the_model_size(mode, crop):
    spec = ImageSpec(size_px=(32, 32), resize_mode=mode, crop_mode=crop)
    for w, h in [(100, 50), (50, 100), (32, 32), (7, 3)]:
        out = resize_for_model(Image.new("RGB", (w, h)), spec)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_shortest_edge_center_crop_takes_the_middle():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # the middle third is white
    spec = ImageSpec(size_px=(20, 20), resize_mode="shortest_edge", crop_mode="center", resample="nearest")
    out = resize_for_model(Image.fromarray(a), spec)
    assert (out == 255).all()


def test_normalize_matches_manual_formula():
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    spec = ImageSpec(size_px=(4, 4), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = normalize(px, spec)
    ref = ((px / 255.0 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, ref, atol=1e-5)
    u8 = normalize(px, ImageSpec(size_px=(4, 4), dtype="uint8", layout="NHWC"))
    assert u8.dtype == np.uint8 and (u8 == px).all()


def test_resize_shortest_edge_then_crop_honours_the_manifest_resize_size():
    # 256 -> 224 centre crop (the common ImageNet recipe): the crop drops a border of the resized image.
    a = np.zeros((100, 100, 3), np.uint8)
    a[:6] = 255  # a white band at the top: inside a direct 224 resize, cropped away after a 256 resize
    direct = resize_for_model(Image.fromarray(a), ImageSpec(size_px=(224, 224), resample="nearest"))
    via256 = resize_for_model(Image.fromarray(a), ImageSpec(size_px=(224, 224), resample="nearest",
                                                            resize_shortest_edge_px=256))
    assert direct.shape == via256.shape == (224, 224, 3)
    assert direct[0].max() == 255 and via256[0].max() == 0


@pytest.mark.parametrize("mode,crop,size", [("squash", "none", 224), ("shortest_edge", "center", 224),
                                            ("shortest_edge", "center", 64)])
def test_native_bilinear_resize_matches_pillow(mode, crop, size):
    """The native path for square bilinear targets gives what Pillow's resize (+ crop) gives."""
    import dataclasses

    rng = np.random.default_rng(3)
    # a smooth photo-like image (random noise would make every interpolation difference look huge)
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC)
    spec = ImageSpec(size_px=(size, size), resize_mode=mode, crop_mode=crop, resample="bilinear")
    native = resize_for_model(img, spec)
    # Pillow reference: its bilinear resize of the same region (the whole image, or the centre crop)
    th, tw = spec.size_px
    if mode == "squash":
        region = (0, 0, img.width, img.height)
    else:
        side = min(img.size)
        region = ((img.width - side) / 2, (img.height - side) / 2, (img.width + side) / 2, (img.height + side) / 2)
    ref = np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR, box=region))
    assert native.shape == ref.shape == (size, size, 3)
    mse = np.mean((native.astype(float) - ref.astype(float)) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert psnr >= 35, psnr
    via_pillow = resize_for_model(img, dataclasses.replace(spec, resample="bicubic"))
    assert via_pillow.shape == native.shape


def _encode(arr, mode, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("draft", [None, (32, 32), (100, 60), (224, 224), (2000, 2000)])
def test_decode_rgb_gives_pillows_pixels_for_every_jpeg_kind(draft):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    gray = rgb[..., 0].copy()
    cmyk = np.concatenate([rgb, rgb[..., :1]], axis=2)
    cases = [
        _encode(rgb, "RGB", quality=90),
        _encode(rgb, "RGB", quality=90, progressive=True),
        _encode(rgb, "RGB", quality=90, subsampling=0),  # 4:4:4
        _encode(gray, "L", quality=90),
        _encode(cmyk, "CMYK", quality=90),  # not the libjpeg-turbo path: Pillow inverts Adobe CMYK
    ]
    for data in cases:
        want = np.asarray(load_image(data, draft_size_px=draft))
        got = decode_rgb(data, draft_size_px=draft)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_decode_rgb_takes_the_libjpeg_turbo_path_for_ordinary_jpegs(monkeypatch):
    data = _jpeg_bytes(1000, 800)
    seen = []
    import rar_edge.preprocess as pre

    real = pre._decode_jpeg_fast
    monkeypatch.setattr(pre, "_decode_jpeg_fast", lambda *a: seen.append(real(*a)) or seen[-1])
    out = decode_rgb(data, draft_size_px=(224, 224))
    assert seen[0] is not None and out.shape == (400, 500, 3)  # scale 1/2, as Pillow's draft picks


def test_decode_rgb_refuses_bombs_from_the_header_and_takes_every_input_kind(tmp_path):
    data = _jpeg_bytes(256, 256)
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_rgb(_jpeg_bytes(1200, 1000), max_pixels=1_000_000)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    np.testing.assert_array_equal(decode_rgb(p), decode_rgb(data))
    np.testing.assert_array_equal(decode_rgb(Image.open(p)), np.asarray(load_image(p)))
    np.testing.assert_array_equal(decode_rgb(np.asarray(load_image(p))), np.asarray(load_image(p)))


def test_resize_for_model_takes_arrays_and_pil_images_alike():
    a = np.random.default_rng(2).integers(0, 256, (250, 318, 3), dtype=np.uint8)
    for spec in (ImageSpec(size_px=(224, 224), resample="bilinear", resize_mode="squash", crop_mode="none"),
                 ImageSpec(size_px=(224, 224), resample="bicubic")):
        np.testing.assert_array_equal(resize_for_model(a, spec), resize_for_model(Image.fromarray(a), spec))
    with pytest.raises(InvalidInputError, match="HxWx3 uint8"):
        resize_for_model(a.astype(np.float32), ImageSpec(size_px=(224, 224)))
