"""Missing shared data: a skip on a developer's machine, a failure under CI=true (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDS_SHARED = "tests/test_preprocess.py::test_jpeg_header_agrees_with_libjpeg_turbo_on_the_shared_photos"


def _pytest(tmp_path: Path, *, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["RAR_EDGE_SHARED"] = str(tmp_path / "no-shared-here")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", NEEDS_SHARED],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_shared_data_skips_off_ci(tmp_path):
    out = _pytest(tmp_path, ci=None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "no-shared-here is absent" in out.stdout


def test_missing_shared_data_fails_under_ci(tmp_path):
    out = _pytest(tmp_path, ci="true")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 error" in out.stdout and "1 skipped" not in out.stdout
    assert "CI=true: the shared data folder" in out.stdout and "no-shared-here is absent" in out.stdout
