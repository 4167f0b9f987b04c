"""Shared fixtures: tiny random-weight models built from real architectures, exported through the same
code a user runs, and the real data in ../shared.

Helpers other test modules may import (``from conftest import shared_dir``): `shared_dir`,
`shared_file`, `flower_photos`, `SIMD_FAMILIES`. Fixtures: ``shared_path``, ``tiny_clip_dir``,
``tiny_clip_onnx``, ``mobilenet_tflite``, ``mobilenet_onnx``, ``family`` (each native kernel family).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rar_edge import _native

# transformers imports TensorFlow too when both are installed: slow, noisy, and unused by these tests.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEELS_DIR = REPO_ROOT / ".cache" / "wheels"  # filled by tools/fetch_test_assets.sh
MOBILENET_TFLITE = "models/mobilenet_v1_embedding/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"


# --- the shared data folder ---------------------------------------------------------------------------


def _shared_root() -> Path:
    return Path(os.environ.get("RAR_EDGE_SHARED", REPO_ROOT.parent / "shared"))


def on_ci() -> bool:
    """Whether this is a CI run (``CI=true``), where missing shared data fails tests instead of skipping them."""
    return os.environ.get("CI") == "true"


def pytest_report_header(config: pytest.Config) -> str:
    root = _shared_root()
    ci = " (CI=true: tests that need it fail when it is absent)" if on_ci() else ""
    return f"shared data: {root} {'present' if root.is_dir() else 'ABSENT'}{ci}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true a test skipped for missing shared data fails: a CI run without the data would otherwise
    pass with those tests silently skipped. Every such skip names a path under the shared folder."""
    rep = yield
    report = rep.get_result()
    if not (on_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if str(_shared_root()) in reason:
        report.outcome = "failed"
        report.longrepr = (
            f"{reason}\nCI=true: the shared data folder ({_shared_root()}, or $RAR_EDGE_SHARED) must be "
            "present, so this test fails instead of skipping."
        )


def shared_dir() -> Path:
    """The read-only shared folder (``$RAR_EDGE_SHARED``, default ``<repo>/../shared``).

    Skips the calling test when the folder is absent (fails it under CI=true: `pytest_runtest_makereport`).
    """
    path = _shared_root()
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
def run_cli():
    """Runs ``python -m rar_edge -q ARGS...``; asserts exit 0 and returns stdout."""

    def run(*args: object) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "rar_edge", "-q", *map(str, args)], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run


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


def linked_flowers(root: Path, classes: list[str] | tuple[str, ...], per_class: int) -> Path:
    """A class-per-folder tree under ``root`` of the first ``per_class`` photos of each named Oxford-17 class
    (symlinks into the shared folder; skips the calling test when it is absent)."""
    src = shared_file("data/flowers17")
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for photo in sorted((src / cls).glob("*.jpg"))[:per_class]:
            (root / cls / photo.name).symlink_to(photo)
    return root


def linked_coco(root: Path, n_images: int) -> Path:
    """A YOLO folder under ``root`` of the first ``n_images`` labelled COCO128 photos (symlinks)."""
    src = shared_file("data/coco128")
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").symlink_to(src / "classes.txt")
    for lab in sorted((src / "labels").glob("*.txt"))[:n_images]:
        (root / "labels" / lab.name).symlink_to(lab)
        img = src / "images" / (lab.stem + ".jpg")
        (root / "images" / img.name).symlink_to(img)
    return root


# --- a tiny CLIP ----------------------------------------------------------------------------------------


def _open_clip_wheel() -> Path:
    wheels = sorted(WHEELS_DIR.glob("open_clip_torch-*.whl"))
    if not wheels:
        pytest.skip(f"no open_clip_torch wheel in {WHEELS_DIR}: run tools/fetch_test_assets.sh")
    return wheels[-1]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIPModel (hidden 64, 2 layers, ViT patch 16 at 224 px, projection 32) with the
    real CLIP tokenizer (vocab 49,408) and CLIP's image processor config, saved with save_pretrained."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from rar_edge_export.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, wheel=_open_clip_wheel())


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


#: The exported MobileNet folder that `tools/fetch_test_assets.sh` writes once (`rar-edge export tflite`),
#: so the runtime tests need neither TensorFlow nor tf2onnx; tests/test_export_tflite.py exports anew.
MOBILENET_ONNX_CACHE = REPO_ROOT / ".cache" / "models" / "mobilenet"


def _cached_mobilenet(tflite: Path) -> Path | None:
    """The cached export of ``tflite``, if one exists, verifies and was made from these very bytes."""
    from rar_edge.errors import RarEdgeError
    from rar_edge.manifest import load_manifest, sha256_file

    try:
        m = load_manifest(MOBILENET_ONNX_CACHE, verify=True)
    except RarEdgeError:
        return None
    want = sha256_file(tflite)
    return MOBILENET_ONNX_CACHE if m.data.get("source_sha256") == want else None


@pytest.fixture(scope="session")
def mobilenet_onnx(mobilenet_tflite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mobilenet_tflite` exported by `rar_edge_export.export_tflite`: a model folder.

    The folder `tools/fetch_test_assets.sh` exported once when it matches the shared file; otherwise an
    export made here (which needs the tflite extra).
    """
    cached = _cached_mobilenet(mobilenet_tflite)
    if cached is not None:
        return cached
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from rar_edge_export import export_tflite

    out = tmp_path_factory.mktemp("mobilenet_onnx") / "model"
    export_tflite(mobilenet_tflite, out)
    return out


def _families() -> list[str]:
    """Kernel families this build has and this CPU runs."""
    ok = []
    current = _native.build_info()["selected"]
    for name in _native.build_info()["compiled"]:
        try:
            _native._set_simd(name)
        except ValueError:
            continue
        ok.append(name)
    _native._set_simd(current)
    return ok


SIMD_FAMILIES = _families()


@pytest.fixture(params=SIMD_FAMILIES)
def family(request):
    """Runs the test once per kernel family (scalar, avx2, avx512 / neon, neon_dot), restoring the default after."""
    before = _native.build_info()["selected"]
    _native._set_simd(request.param)
    yield request.param
    _native._set_simd(before)
