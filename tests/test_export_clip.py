"""CLIP -> ONNX export: the towers agree with PyTorch, the manifest and tokenizer carry what the runtime
needs, quantized variants stay close, and bad input fails with a clear ExportError."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, flower_photos

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")

from rar_edge.errors import ExportError, InvalidInputError  # noqa: E402
from rar_edge.manifest import load_manifest  # noqa: E402
from rar_edge_export import ZERO_SHOT_TEMPLATES, export_clip, main_export  # noqa: E402

CLASS_NAMES = ("daisy", "tiger lily", "lily of the valley", "fritillary")
ODD_TEXTS = (
    "",
    "a photo of a cat.",
    "Crème brûlée à la café, naïve façade",
    "  multiple   spaces\tand\nnew lines  ",
    "UPPER and MiXeD case, digits 12345 and punctuation!?;:",
    "emoji 🌻🌷 and CJK 向日葵",
    " ".join(["a very long description of a flower in a sunny meadow"] * 12),  # > 77 tokens
)


def _session(path: Path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _onnx_image_embeds(model_dir: Path, pixels: np.ndarray) -> np.ndarray:
    m = load_manifest(model_dir, verify=False)
    return _session(m.path("image_model")).run([m.image.output_name], {m.image.input_name: pixels})[0]


def _encode(model_dir: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Tokenizes as the runtime does: tokenizer.json through the tokenizers library only."""
    m = load_manifest(model_dir, verify=False)
    encodings = tokenizers.Tokenizer.from_file(str(m.path("tokenizer"))).encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def _onnx_text_embeds(model_dir: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    m = load_manifest(model_dir, verify=False)
    assert m.text is not None
    inputs = {name: feed[name] for name in m.text.input_names}
    return _session(m.path("text_model")).run([m.text.output_name], inputs)[0]


@pytest.fixture(scope="module")
def torch_clip(tiny_clip_dir: Path) -> "transformers.CLIPModel":
    return transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()


@pytest.fixture(scope="module")
def photo_pixels(tiny_clip_dir: Path) -> np.ndarray:
    """Six real flower photos through the model's own CLIPImageProcessor: (6, 3, 224, 224) float32."""
    from PIL import Image

    processor = transformers.CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    images = [Image.open(p).convert("RGB") for p in flower_photos(classes=3, per_class=2)]
    return processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [t.format(c) for t in ZERO_SHOT_TEMPLATES[:3] for c in CLASS_NAMES]


# --- the float32 export -----------------------------------------------------------------------------------


def test_manifest_describes_the_export(tiny_clip_onnx: Path, tiny_clip_dir: Path) -> None:
    m = load_manifest(tiny_clip_onnx, verify=True)  # every file exists and matches its sha256
    assert m.kind == "clip"
    assert m.embedding_dim == 32
    assert set(m.files) == {"image_model", "text_model", "tokenizer"}
    assert m.data["exporter"].startswith("rar_edge_export ")
    assert m.data["quantization"] is None
    assert m.zero_shot_templates == ZERO_SHOT_TEMPLATES
    assert max(m.data["validation"]["max_abs_diff_to_torch"].values()) < 1e-4

    processor = json.loads((tiny_clip_dir / "preprocessor_config.json").read_text())
    image = m.image
    assert image.size_px == (processor["crop_size"]["height"], processor["crop_size"]["width"]) == (224, 224)
    assert (image.layout, image.dtype) == ("NCHW", "float32")
    assert image.rescale == pytest.approx(processor["rescale_factor"])
    assert image.mean == pytest.approx(processor["image_mean"])
    assert image.std == pytest.approx(processor["image_std"])
    assert (image.resize_mode, image.crop_mode, image.resample) == ("shortest_edge", "center", "bicubic")
    assert m.data["image"]["resize_shortest_edge_px"] == processor["size"]["shortest_edge"]
    assert (image.input_name, image.output_name, image.output_dequantize) == ("pixel_values", "image_embeds", None)

    text = m.text
    assert text is not None
    assert text.input_names == ("input_ids", "attention_mask")
    assert text.output_name == "text_embeds"
    assert text.context_length == 77
    assert text.pad_token_id == 49407  # <|endoftext|>, CLIP's pad token


def test_image_embeddings_match_torch_on_photos(tiny_clip_onnx: Path, torch_clip, photo_pixels: np.ndarray) -> None:
    got = _onnx_image_embeds(tiny_clip_onnx, photo_pixels)
    with torch.no_grad():
        want = torch_clip.get_image_features(pixel_values=torch.from_numpy(photo_pixels)).numpy()
    assert got.shape == (len(photo_pixels), 32)
    assert np.abs(got - want).max() < 1e-4


def test_image_embeddings_match_torch_on_noise(tiny_clip_onnx: Path, torch_clip) -> None:
    pixels = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    got = _onnx_image_embeds(tiny_clip_onnx, pixels)
    with torch.no_grad():
        want = torch_clip.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_text_embeddings_match_torch(tiny_clip_onnx: Path, torch_clip, prompts: list[str]) -> None:
    texts = prompts + list(ODD_TEXTS)  # padded batch: short prompts, an empty text, a truncated one
    feed = _encode(tiny_clip_onnx, texts)
    got = _onnx_text_embeds(tiny_clip_onnx, feed)
    with torch.no_grad():
        want = torch_clip.get_text_features(
            input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"])
        ).numpy()
    assert got.shape == (len(texts), 32)
    assert np.abs(got - want).max() < 1e-4
    # Padding must not change an embedding: each text alone gives the same vector as in the batch.
    alone = np.concatenate([_onnx_text_embeds(tiny_clip_onnx, _encode(tiny_clip_onnx, [t])) for t in texts[:3]])
    assert np.abs(alone - got[:3]).max() < 1e-5


def test_tokenizer_json_tokenizes_like_transformers(
    tiny_clip_onnx: Path, tiny_clip_dir: Path, prompts: list[str]
) -> None:
    m = load_manifest(tiny_clip_onnx)
    texts = prompts + list(ODD_TEXTS)
    reference = transformers.CLIPTokenizerFast.from_pretrained(tiny_clip_dir)
    want = reference(texts, padding=True, truncation=True, max_length=m.text.context_length)
    got = _encode(tiny_clip_onnx, texts)
    assert got["input_ids"].tolist() == want["input_ids"]
    assert got["attention_mask"].tolist() == want["attention_mask"]
    # The real CLIP vocabulary: 'a photo of a cat.' has the ids OpenAI's tokenizer gives.
    assert _encode(tiny_clip_onnx, ["a photo of a cat."])["input_ids"].tolist() == [
        [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    ]
    # A text longer than the context is cut to 77 tokens and still ends with end-of-text (CLIP pools there).
    long_ids = _encode(tiny_clip_onnx, [ODD_TEXTS[-1]])["input_ids"][0]
    assert len(long_ids) == m.text.context_length and long_ids[-1] == 49407


def test_cli_writes_the_same_bundle(tiny_clip_dir: Path, tiny_clip_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli_model"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run(
        [sys.executable, "-m", "rar_edge_export", "clip", str(tiny_clip_dir), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    cli, fixture = load_manifest(out), load_manifest(tiny_clip_onnx)
    # The export is deterministic: the CLI and the Python call write identical files.
    assert {r: f["sha256"] for r, f in cli.files.items()} == {r: f["sha256"] for r, f in fixture.files.items()}
    assert cli.data["image"] == fixture.data["image"] and cli.data["text"] == fixture.data["text"]


def test_refuses_a_non_empty_folder_unless_overwrite(tiny_clip_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main_export(["clip", str(tiny_clip_dir), "-o", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert main_export(["clip", str(tiny_clip_dir), "-o", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    load_manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left beside it


def test_a_failed_export_leaves_the_old_folder_untouched(tiny_clip_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import rar_edge_export.clip as clip_module

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def disagree(path: Path, tower) -> float:
        raise ExportError(f"{path.name} disagrees with PyTorch (simulated)")

    monkeypatch.setattr(clip_module, "_check_matches_torch", disagree)
    with pytest.raises(ExportError, match="simulated"):
        export_clip(tiny_clip_dir, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- quantized exports --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_clip(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Exports `tiny_clip_dir` once per quantization mode, on first use."""
    done: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in done:
            done[mode] = export_clip(
                tiny_clip_dir, tmp_path_factory.mktemp(f"clip_{mode}") / "model", quantize=mode
            ).root
        return done[mode]

    return get


@pytest.mark.parametrize("mode, min_cosine", [("int8", 0.9), ("fp16", 0.999)])
def test_quantized_export_stays_close_to_float32(
    mode: str, min_cosine: float, quantized_clip, tiny_clip_onnx: Path, photo_pixels: np.ndarray, prompts: list[str]
) -> None:
    out = quantized_clip(mode)
    m, fp32 = load_manifest(out), load_manifest(tiny_clip_onnx)
    q = m.data["quantization"]
    assert q["mode"] == mode and q["method"]
    # Provenance: the source hashes are those of the float32 models (the export is deterministic).
    assert q["source_sha256"] == {role: fp32.files[role]["sha256"] for role in ("image_model", "text_model")}
    names = ["manifest.json", "tokenizer.json", f"vision.{mode}.onnx", f"text.{mode}.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert m.data["image"] == fp32.data["image"] and m.data["text"] == fp32.data["text"]

    image_cos = _cosine(_onnx_image_embeds(out, photo_pixels), _onnx_image_embeds(tiny_clip_onnx, photo_pixels))
    feed = _encode(out, prompts)
    text_cos = _cosine(_onnx_text_embeds(out, feed), _onnx_text_embeds(tiny_clip_onnx, feed))
    assert image_cos.min() > min_cosine, image_cos
    assert text_cos.min() > min_cosine, text_cos
    assert min(q["cosine_to_source_min"].values()) > min_cosine


def test_int8_models_hold_integer_weights(quantized_clip, tiny_clip_onnx: Path) -> None:
    import onnx

    m, fp32 = load_manifest(quantized_clip("int8")), load_manifest(tiny_clip_onnx)
    for role in ("image_model", "text_model"):
        ops = {n.op_type for n in onnx.load(str(m.path(role))).graph.node}
        assert "MatMulInteger" in ops, ops
    # The token embedding table (most of the text model) is stored as int8 too.
    assert m.path("text_model").stat().st_size < 0.4 * fp32.path("text_model").stat().st_size


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_clip(tmp_path / "no_such_model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ExportError, match="is a file"):
        export_clip(tmp_path / "model.bin", tmp_path / "out")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="config.json"):
        export_clip(tmp_path / "empty", tmp_path / "out")


def test_non_clip_folder(tmp_path: Path) -> None:
    transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ExportError, match="not a CLIP model.*'bert'"):
        export_clip(tmp_path / "bert", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_clip_folder_without_image_processor(tiny_clip_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, src)
    (src / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match="preprocessor_config.json"):
        export_clip(src, tmp_path / "out")


def test_bad_options(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="quantize"):
        export_clip(tiny_clip_dir, tmp_path / "out", quantize="int4")
    with pytest.raises(InvalidInputError, match="exactly one"):
        export_clip(tiny_clip_dir, tmp_path / "out", zero_shot_templates=["a photo"])
    assert not (tmp_path / "out").exists()


def test_import_is_light() -> None:
    code = (
        "import sys, rar_edge_export\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'tensorflow', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
