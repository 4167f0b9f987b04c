"""The Python snippets of README.md and docs/camera.md run as written, against tiny models and photos made in
tmp_path under the names the snippets use (models/mobilenet, flowers/, query.jpg, ...)."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inputs import COLOURS, make_folder, photo, save_jpeg, write_tiny_embedder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))


def python_blocks(markdown: Path) -> list[str]:
    """The ```python fenced blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown.read_text(encoding="utf-8"), flags=re.S | re.M)


def run_snippet(code: str, cwd: Path, monkeypatch) -> str:
    """Executes ``code`` in ``cwd`` as a fresh module would run it; returns what it printed."""
    monkeypatch.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
    return out.getvalue()


@pytest.fixture
def workdir(tmp_path) -> Path:
    """Everything the snippets name: an encoder folder, a class-per-folder photo set, photos, a ranker folder."""
    pytest.importorskip("onnx")
    write_tiny_embedder(tmp_path / "models" / "mobilenet")
    make_folder(tmp_path / "flowers", per_class=5)
    for name in ("query.jpg", "a.jpg", "b.jpg", "c.jpg"):
        save_jpeg(tmp_path / name, photo(COLOURS["green"], seed=len(name)))
    save_jpeg(tmp_path / "street.jpg", photo(COLOURS["blue"], seed=1, size=(480, 320)))
    return tmp_path


def _tiny_ranker(folder: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("gguf")
    from rar_edge_export.mllm import export_mllm
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    gguf = write_tiny_text_gguf(folder.parent / "tiny.gguf", seed=0)
    export_mllm(gguf, folder)


def test_readme_python_snippets_run_as_written(workdir, monkeypatch):
    blocks = python_blocks(REPO / "README.md")
    assert blocks, "README.md has no ```python block"
    if any("models/ranker" in b for b in blocks):
        _tiny_ranker(workdir / "models" / "ranker")
    printed = "".join(run_snippet(b, workdir, monkeypatch) for b in blocks)
    assert (workdir / "flowers.rarmem").is_file()
    assert any(name in printed for name in COLOURS)  # the snippets print labels of the memory


def test_camera_doc_runs_with_a_fake_capture(workdir, monkeypatch):
    """docs/camera.md against a stand-in for cv2.VideoCapture that gives three BGR frames of a blue photo."""
    from rar_edge import Encoder, Memory

    Memory.from_folder(workdir / "flowers", encoder=Encoder(workdir / "models" / "mobilenet"), progress=False).save(
        workdir / "flowers.rarmem"
    )
    rgb = np.asarray(Image.open(sorted((workdir / "flowers" / "blue").glob("*.jpg"))[0]))
    released = []

    class VideoCapture:
        def __init__(self, source):
            self.left = 3

        def read(self):
            self.left -= 1
            return (True, np.ascontiguousarray(rgb[..., ::-1])) if self.left >= 0 else (False, None)

        def release(self):
            released.append(True)

    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(VideoCapture=VideoCapture))
    (block,) = python_blocks(REPO / "docs" / "camera.md")
    printed = run_snippet(block, workdir, monkeypatch)
    labels = [line.split()[0] for line in printed.splitlines()]
    assert labels == ["blue"] * 3  # read as BGR; read as RGB this photo is classified "red"
    assert released == [True]
