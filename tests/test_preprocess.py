import io

import numpy as np
import pytest
from PIL import Image

from rar_edge.errors import ImageDecodeError, InvalidInputError
from rar_edge.image.codec import _jpeg_draft_scale, decode_rgb, load_image
from rar_edge.image.transform import normalize, resize_for_model
from rar_edge.manifest import ImageSpec


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
    with pytest.raises(ImageDecodeError, match="is a folder, not an image file"):
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
    assert out.shape == (2, 2, 3) and out[:, :, 0].tolist() == [[0, 255], [128, 4]]  # 65535 -> 255, as OpenCV
    assert np.asarray(load_image(np.full((3, 3), 65535, np.uint16))).min() == 255  # white stays white
    assert (np.asarray(load_image(np.full((3, 3), 4095, np.uint16))) == 16).all()  # not stretched to white
    f = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], np.float32), "F")
    assert np.asarray(load_image(f))[:, :, 0].tolist() == [[0, 255], [128, 64]]
    wide = Image.fromarray(np.array([[-10.0, 30.0]], np.float32), "F")  # no known white level: its range
    assert np.asarray(load_image(wide))[:, :, 0].tolist() == [[0, 255]]
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
    via256 = resize_for_model(
        Image.fromarray(a), ImageSpec(size_px=(224, 224), resample="nearest", resize_shortest_edge_px=256)
    )
    assert direct.shape == via256.shape == (224, 224, 3)
    assert direct[0].max() == 255 and via256[0].max() == 0


@pytest.mark.parametrize(
    "mode,crop,size", [("squash", "none", 224), ("shortest_edge", "center", 224), ("shortest_edge", "center", 64)]
)
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
        _encode(rgb, "RGB", quality=90, keep_rgb=True),  # Adobe RGB: not the libjpeg-turbo path either
    ]
    adobe = cases[-1]
    cases.append(adobe[:17] + b"\x01" + adobe[18:])  # Adobe transform 1 (YCbCr): the libjpeg-turbo path
    for data in cases:
        want = np.asarray(load_image(data, draft_size_px=draft))
        got = decode_rgb(data, draft_size_px=draft)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_decode_rgb_takes_the_libjpeg_turbo_path_for_ordinary_jpegs(monkeypatch):
    data = _jpeg_bytes(1000, 800)
    seen = []
    import rar_edge.image.codec as pre

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
    for spec in (
        ImageSpec(size_px=(224, 224), resample="bilinear", resize_mode="squash", crop_mode="none"),
        ImageSpec(size_px=(224, 224), resample="bicubic"),
    ):
        np.testing.assert_array_equal(resize_for_model(a, spec), resize_for_model(Image.fromarray(a), spec))
    with pytest.raises(InvalidInputError, match="must be uint8, not float32"):
        resize_for_model(a.astype(np.float32), ImageSpec(size_px=(224, 224)))
    with pytest.raises(InvalidInputError, match=r"must be \(H, W, 3\) RGB"):
        resize_for_model(a[..., :2].copy(), ImageSpec(size_px=(224, 224)))


# -- EXIF orientation ---------------------------------------------------------------------------------
def _with_orientation(jpeg: bytes, orientation: int, *, big_endian: bool = False, typ: int = 3) -> bytes:
    """The same JPEG (same scan, same pixels) with an EXIF APP1 block holding only an Orientation tag."""
    import struct

    e = ">" if big_endian else "<"
    value = struct.pack(e + "HH", orientation, 0) if typ == 3 else struct.pack(e + "I", orientation)
    tiff = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1)
    tiff += struct.pack(e + "HHI", 0x0112, typ, 1) + value + struct.pack(e + "I", 0)
    body = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def _pillow_upright(data: bytes, draft=None) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillows_exif_transpose(orientation):
    from rar_edge.image.codec import orient

    plain = _jpeg_bytes(90, 60, seed=orientation)
    data = _with_orientation(plain, orientation)
    upright = _pillow_upright(data)
    assert upright.shape == ((90, 60, 3) if orientation >= 5 else (60, 90, 3))
    np.testing.assert_array_equal(decode_rgb(data), upright)  # libjpeg-turbo path
    np.testing.assert_array_equal(np.asarray(load_image(data)), upright)  # Pillow path
    np.testing.assert_array_equal(decode_rgb(Image.open(io.BytesIO(data))), upright)  # a PIL image as given
    np.testing.assert_array_equal(orient(decode_rgb(plain), orientation), upright)
    # big-endian TIFF and a LONG-typed tag read the same
    np.testing.assert_array_equal(decode_rgb(_with_orientation(plain, orientation, big_endian=True, typ=4)), upright)


@pytest.mark.parametrize("draft", [(32, 32), (40, 100), (100, 40), (224, 224)])
def test_exif_rotated_jpegs_get_the_same_draft_scale_on_both_paths(draft):
    plain = _jpeg_bytes(800, 320, seed=3)
    for orientation in (1, 6, 8):
        data = _with_orientation(plain, orientation)
        got, want = decode_rgb(data, draft_size_px=draft), np.asarray(load_image(data, draft_size_px=draft))
        np.testing.assert_array_equal(got, want)
        # the DCT scale fits the upright image to the requested (width, height)
        uw, uh = (320, 800) if orientation in (6, 8) else (800, 320)
        s = _jpeg_draft_scale(uw, uh, draft)
        assert got.shape == (-(-uh // s), -(-uw // s), 3) and got.shape[1] >= draft[0] and got.shape[0] >= draft[1]


def test_exif_orientation_on_a_png_goes_through_pillow():
    from PIL import ImageOps

    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    got = decode_rgb(buf.getvalue())
    assert got.shape == (30, 20, 3)
    np.testing.assert_array_equal(got, np.rot90(a, -1))
    np.testing.assert_array_equal(got, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))))


def test_jpeg_header_agrees_with_libjpeg_turbo():
    import simplejpeg

    from rar_edge.image.codec import jpeg_header

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (33, 51, 3), dtype=np.uint8)

    def first_segment_dropped(data):  # the APP0 (JFIF) or APP14 (Adobe) block right after SOI
        return data[:2] + data[4 + int.from_bytes(data[4:6], "big") :]

    ycc, adobe_rgb = _encode(rgb, "RGB"), _encode(rgb, "RGB", keep_rgb=True)  # keep_rgb: Adobe transform 0
    assert ycc[2:4] == b"\xff\xe0" and adobe_rgb[2:4] == b"\xff\xee"
    adobe_ycc = adobe_rgb[:17] + b"\x01" + adobe_rgb[18:]  # the Adobe transform byte says YCbCr
    cases = {
        "YCbCr": [
            ycc,
            _encode(rgb, "RGB", progressive=True),
            _encode(rgb, "RGB", subsampling=0),
            first_segment_dropped(ycc),
        ],  # no JFIF marker: component ids 1, 2, 3
        "Gray": [_encode(rgb[..., 0].copy(), "L")],
        "other": [
            _encode(np.concatenate([rgb, rgb[..., :1]], axis=2), "CMYK"),
            adobe_rgb,
            first_segment_dropped(adobe_rgb),
        ],  # no marker: component ids 'R', 'G', 'B'
    }
    h, w, cs, _ = simplejpeg.decode_jpeg_header(adobe_ycc)
    assert jpeg_header(adobe_ycc) == (w, h, "YCbCr", 1) and cs == "YCbCr"
    for colorspace, blobs in cases.items():
        for data in blobs:
            h, w, sj_colorspace, _ = simplejpeg.decode_jpeg_header(data)
            assert jpeg_header(data) == (w, h, colorspace, 1)
            assert (sj_colorspace in ("YCbCr", "Gray")) == (colorspace != "other")
    assert jpeg_header(b"\x89PNG\r\n\x1a\n") is None and jpeg_header(b"") is None


def test_jpeg_header_agrees_with_libjpeg_turbo_on_the_shared_photos(shared_path):
    import simplejpeg

    from rar_edge.image.codec import jpeg_header

    photos = sorted((shared_path / "data").glob("*/**/*.jpg"))
    if not photos:
        pytest.skip(f"no photos under {shared_path / 'data'}")
    for p in photos:
        data = p.read_bytes()
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        assert jpeg_header(data)[:3] == (w, h, colorspace), p


def test_jpeg_header_never_raises_on_damaged_headers():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from rar_edge.image.codec import jpeg_header

    base = _with_orientation(_jpeg_bytes(40, 30), 6)
    head = base[: base.index(b"\xff\xda") + 2]

    @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        st.integers(0, len(head)), st.lists(st.tuples(st.integers(0, len(head) - 1), st.integers(0, 255)), max_size=4)
    )
    def check(cut, edits):
        b = bytearray(head[:cut] if cut < len(head) else base)
        for i, v in edits:
            if i < len(b):
                b[i] = v
        info = jpeg_header(bytes(b))
        assert info is None or (len(info) == 4 and 1 <= info[3] <= 8)
        try:
            decode_rgb(bytes(b))  # either pixels or the decode error, never anything else
        except ImageDecodeError:
            pass

    check()


def test_unusual_inputs_get_the_sdks_errors():
    good = _jpeg_bytes(200, 150)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):  # a lazily opened, truncated image
        decode_rgb(Image.open(io.BytesIO(good[: len(good) // 2])))
    for empty in (np.zeros((0, 5, 4), np.uint8), np.zeros((0, 5), np.uint16), Image.new("RGB", (0, 0))):
        with pytest.raises(InvalidInputError, match="empty"):
            decode_rgb(empty)
    with pytest.raises(InvalidInputError, match="empty"):
        resize_for_model(np.zeros((0, 4, 3), np.uint8), ImageSpec(size_px=(8, 8)))


def test_paths_that_are_folders_or_missing_say_so(tmp_path):
    with pytest.raises(ImageDecodeError, match="is a folder, not an image file"):
        decode_rgb(tmp_path)
    with pytest.raises(ImageDecodeError, match="no such image file: ''"):
        decode_rgb("")


def test_max_pixels_above_pillows_warning_level_is_honoured_for_every_format(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow warns above this, refuses above twice it
    buf = io.BytesIO()
    Image.new("L", (150, 100)).save(buf, "PNG")  # 15,000 pixels: over Pillow's warning level
    assert decode_rgb(buf.getvalue(), max_pixels=20_000).shape == (100, 150, 3)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_rgb(buf.getvalue(), max_pixels=12_000)


def test_a_fractional_centre_crop_is_resampled_exactly():
    """A bilinear centre-crop spec whose region is not whole pixels resamples exactly that region."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (499, 635, 3), dtype=np.uint8)
    spec = ImageSpec(size_px=(224, 224), resample="bilinear", resize_shortest_edge_px=256)
    from rar_edge.image.transform import _model_region

    region = _model_region(635, 499, spec)
    assert not all(float(v).is_integer() for v in region)
    want = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR, box=region))
    np.testing.assert_array_equal(resize_for_model(img, spec), want)
