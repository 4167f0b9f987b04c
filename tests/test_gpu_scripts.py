"""benchmarks/gpu_offline.sh refuses to build device libraries for a CPU architecture other than this machine's.

The libraries it builds carry this machine's CPU code (AVX2 flags on x86-64) and its libgomp: a bundle made on
an x86-64 workstation with CUDA_ARCH=87 would not load on a Jetson Orin. The refusal happens before anything
is built or written, so these tests take well under a second.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_offline.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _prepare(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bundle = tmp_path / "bundle"
    return subprocess.run(
        ["bash", str(SCRIPT), "prepare", str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
    )


@pytest.mark.skipif(platform.machine() == "aarch64", reason="on an aarch64 machine a Jetson CUDA_ARCH is this CPU's")
@pytest.mark.parametrize("cuda_arch", ["87", "72", "110", "87-real"])
def test_prepare_refuses_a_jetson_gpu_on_another_cpu(tmp_path, cuda_arch):
    out = _prepare(tmp_path, CUDA_ARCH=cuda_arch)
    assert out.returncode == 2, out.stderr
    assert f"for an aarch64 device (CUDA_ARCH={cuda_arch})" in out.stderr
    assert "PREPARE_LIB=0" in out.stderr
    assert not (tmp_path / "bundle").exists()  # refused before writing anything


def test_prepare_refuses_an_explicit_other_device_arch(tmp_path):
    other = "x86_64" if platform.machine() == "aarch64" else "aarch64"
    out = _prepare(tmp_path, DEVICE_ARCH=other, CUDA_ARCH="90-real")
    assert out.returncode == 2, out.stderr
    assert f"for an {other} device" in out.stderr
