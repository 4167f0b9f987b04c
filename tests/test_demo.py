"""The README's main command runs end to end and says which models it used."""

import subprocess
import sys

import pytest


def test_demo_runs_and_names_its_models(tmp_path, shared_path):
    pytest.importorskip("tensorflow")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rar_edge",
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "-n",
            "3",
            "--shared",
            str(shared_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "models used:" in text
    assert "MobileNet v1 ImageNet-pretrained embedder (REAL weights)" in text
    assert "RANDOM-weight CLIP" in text or "real pretrained weights" in text
    assert "retrieval-only: " in text and "correct on these held-out photos" in text
    assert (tmp_path / "demo" / "flowers_4shot.rarmem").is_file()
