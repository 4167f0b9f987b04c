"""Shared fixtures: tiny random-weight models built from real architectures, exported through the same
code a user runs, and the real data in ../shared.

Helpers other test modules may import (``from conftest import shared_dir``): `shared_dir`,
`shared_file`, `flower_photos`. Fixtures: ``shared_path``, ``tiny_clip_dir``, ``tiny_clip_onnx``,
``mobilenet_tflite``, ``mobilenet_onnx``.
"""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from pathlib import Path

import pytest

# transformers imports TensorFlow too when both are installed: slow, noisy, and unused by these tests.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEELS_DIR = REPO_ROOT / ".cache" / "wheels"  # filled by tools/fetch_test_assets.sh
MOBILENET_TFLITE = "models/mobilenet_v1_embedding/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"


# --- the shared data folder ---------------------------------------------------------------------------


def shared_dir() -> Path:
    """The read-only shared folder (``$RAR_EDGE_SHARED``, default ``<repo>/../shared``).

    Skips the calling test when the folder is absent.
    """
    path = Path(os.environ.get("RAR_EDGE_SHARED", REPO_ROOT.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set RAR_EDGE_SHARED to its location)")
    return path


def shared_file(relative: str) -> Path:
    """A file under the shared folder; skips the calling test when it is absent."""
    path = shared_dir() / relative
    if not path.exists():
        pytest.skip(f"{path} is absent from the shared data folder")
    return path


@pytest.fixture(scope="session")
def shared_path() -> Path:
    """`shared_dir` as a fixture: the shared data folder; skips the test when it is absent."""
    return shared_dir()


def flower_photos(*, classes: int = 3, per_class: int = 2) -> list[Path]:
    """The first ``per_class`` photos (sorted by name) of the first ``classes`` Oxford-17 flower classes."""
    root = shared_file("data/flowers17")
    photos = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir())[:classes]:
        photos += sorted(class_dir.glob("*.jpg"))[:per_class]
    if len(photos) < classes * per_class:
        pytest.skip(f"{root} holds fewer photos than the test needs")
    return photos


# --- a tiny CLIP ----------------------------------------------------------------------------------------


def _open_clip_bpe() -> str:
    wheels = sorted(WHEELS_DIR.glob("open_clip_torch-*.whl"))
    if not wheels:
        pytest.skip(f"no open_clip_torch wheel in {WHEELS_DIR}: run tools/fetch_test_assets.sh")
    with zipfile.ZipFile(wheels[-1]) as z:
        return gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of OpenAI's CLIP tokenizer, derived from open_clip's BPE file.

    The same construction as OpenAI's ``SimpleTokenizer``: the 256 byte symbols, the same with the
    end-of-word marker, one token per merge (the first 48,894 merges), then the two special tokens.
    """
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = _open_clip_bpe().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIPModel (hidden 64, 2 layers, ViT patch 16 at 224 px, projection 32) with the
    real CLIP tokenizer (vocab 49,408) and CLIP's image processor config, saved with save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab_file, merges_file = write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_bpe"))
    tokenizer = transformers.CLIPTokenizerFast(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        pad_token="<|endoftext|>",  # as in openai/clip-vit-base-patch32
        model_max_length=77,
    )
    assert len(tokenizer) == 49408
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # OpenAI CLIP's preprocessing: bicubic shortest edge 224, center crop 224, CLIP mean/std.
    transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_onnx(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_clip_dir` exported by `rar_edge_export.export_clip` (float32): a model folder."""
    from rar_edge_export import export_clip

    out = tmp_path_factory.mktemp("tiny_clip_onnx") / "model"
    export_clip(tiny_clip_dir, out)
    return out


# --- the real MobileNet embedder ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mobilenet_tflite() -> Path:
    """The shared uint8 MobileNet v1 embedding extractor (.tflite); skips when absent."""
    return shared_file(MOBILENET_TFLITE)


@pytest.fixture(scope="session")
def mobilenet_onnx(mobilenet_tflite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mobilenet_tflite` exported by `rar_edge_export.export_tflite`: a model folder."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from rar_edge_export import export_tflite

    out = tmp_path_factory.mktemp("mobilenet_onnx") / "model"
    export_tflite(mobilenet_tflite, out)
    return out
