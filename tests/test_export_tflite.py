"""TFLite -> ONNX export of the shared MobileNet embedder: same embeddings as the TFLite interpreter,
a manifest read from the model itself, and clear errors for files that are not TFLite models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import flower_photos

tf = pytest.importorskip("tensorflow")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

from rar_edge.errors import ExportError  # noqa: E402
from rar_edge.manifest import load_manifest  # noqa: E402
from rar_edge_export import export_tflite, main_export  # noqa: E402

# tf.lite.Interpreter (the reference here, and what tf2onnx reads models with) warns that it moves to
# the ai_edge_litert package; it works in TF 2.21 and that package is not a dependency of this project.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*Warning. tf\.lite\.Interpreter is deprecated:UserWarning")

# From ../shared/README.md: what the shared model is documented to be.
MOBILENET_SHA256 = "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319"


@pytest.fixture(scope="module")
def interpreter(mobilenet_tflite: Path):
    it = tf.lite.Interpreter(model_path=str(mobilenet_tflite))
    it.allocate_tensors()
    return it


def _tflite_embed(interpreter, image: np.ndarray) -> np.ndarray:
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], image)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def _load_photo(path: Path, size_px: tuple[int, int]) -> np.ndarray:
    """As the manifest says: RGB, squashed to size_px with bilinear resampling, uint8 NHWC."""
    from PIL import Image

    h, w = size_px
    image = Image.open(path).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)[None]


def test_manifest_is_read_from_the_model(mobilenet_onnx: Path, mobilenet_tflite: Path, interpreter) -> None:
    m = load_manifest(mobilenet_onnx, verify=True)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert m.kind == "image_embedder"
    assert m.embedding_dim == int(np.prod(out["shape"][1:])) == 1024
    assert set(m.files) == {"image_model"} and m.text is None
    assert m.data["source_sha256"] == MOBILENET_SHA256
    image = m.image
    assert image.size_px == tuple(int(v) for v in inp["shape"][1:3]) == (224, 224)
    assert (image.layout, image.dtype) == ("NHWC", "uint8")
    assert (image.resize_mode, image.crop_mode, image.resample) == ("squash", "none", "bilinear")
    scale, zero_point = out["quantization"]
    assert image.output_dequantize == pytest.approx((scale, zero_point))
    assert image.output_dequantize == pytest.approx((0.023528477, 0))  # the value documented in shared/README
    session = ort.InferenceSession(str(m.path("image_model")), providers=["CPUExecutionProvider"])
    assert (image.input_name, image.output_name) == (session.get_inputs()[0].name, session.get_outputs()[0].name)


def test_onnx_equals_the_tflite_interpreter_on_photos(mobilenet_onnx: Path, interpreter) -> None:
    m = load_manifest(mobilenet_onnx)
    session = ort.InferenceSession(str(m.path("image_model")), providers=["CPUExecutionProvider"])
    scale, zero_point = m.image.output_dequantize
    for photo in flower_photos(classes=3, per_class=1):
        image = _load_photo(photo, m.image.size_px)
        want = _tflite_embed(interpreter, image).reshape(-1)
        got = session.run([m.image.output_name], {m.image.input_name: image})[0].reshape(-1)
        assert got.dtype == want.dtype == np.uint8
        # Integer outputs: allow one quantization step where the two runtimes round differently.
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        a = (got.astype(np.float64) - zero_point) * scale
        b = (want.astype(np.float64) - zero_point) * scale
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.9999, (photo.name, cosine)


def test_int8_keeps_the_natively_quantized_model(mobilenet_tflite: Path, mobilenet_onnx: Path, tmp_path: Path) -> None:
    m = export_tflite(mobilenet_tflite, tmp_path / "int8", quantize="int8")
    q = m.data["quantization"]
    assert q["mode"] == "int8" and q["method"].startswith("native")
    assert q["source_sha256"] == {"image_model": MOBILENET_SHA256}
    assert q["cosine_to_source_min"]["image_model"] > 0.9999
    assert m.data["image"] == load_manifest(mobilenet_onnx).data["image"]
    # the export without quantize= is the same int8 graph, and says so (bench must not call it fp32)
    assert load_manifest(mobilenet_onnx).data["quantization"]["mode"] == "int8"
    # two exports of one file are the same bytes (tf2onnx's counter-numbered names are canonicalised), so
    # the encoder fingerprint, and the memories it admits, survive a re-export
    assert m.files == load_manifest(mobilenet_onnx).files


def test_fp16_is_refused_for_an_integer_model(mobilenet_tflite: Path, tmp_path: Path, capsys) -> None:
    assert main_export(["tflite", str(mobilenet_tflite), "-o", str(tmp_path / "out"), "--quantize", "fp16"]) == 1
    assert "already integer-quantized" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_tflite(tmp_path / "nope.tflite", tmp_path / "out")


def test_not_a_tflite_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.tflite"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ExportError, match="not a TFLite model"):
        export_tflite(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_tflite_file(mobilenet_tflite: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.tflite"
    bad.write_bytes(mobilenet_tflite.read_bytes()[:20_000])  # keeps the TFL3 header, loses the rest
    # TFLite either refuses the file or reads past its end and crashes (SIGSEGV, in the worker process):
    # both must surface as an ExportError in this process.
    with pytest.raises(ExportError, match=r"TensorFlow Lite (cannot load|crashed)"):
        export_tflite(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
