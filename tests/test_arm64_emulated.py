"""The runtime installed and run on an emulated Debian arm64 system, against the same calls on this machine.

tools/arm64_check.sh builds (once) a Debian arm64 root with debootstrap, runs it through qemu-user-static
(binfmt_misc), installs ``rar-edge[cpu,jetson,dev]`` from this checkout there (onnxruntime's aarch64 wheel,
numpy<2 as JetPack 6 needs, hnswlib and the native module compiled by the root's own g++), runs the runtime
tests there (the native kernels as NEON and as scalar), and classifies and detects on the shared photos
there and here (tools/arm64_probe.py). Root, debootstrap and qemu-user-static are needed
(``apt install debootstrap qemu-user-static binfmt-support``); the first run takes tens of minutes
(``make test-arm64`` runs the script alone). It checks results, never speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIP = 77  # tools/arm64_check.sh: something it needs is missing


def test_runtime_on_emulated_arm64_matches_x86(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, chroot and bind mounts)")
    for tool in ("debootstrap", "qemu-aarch64-static", "chroot"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt install debootstrap qemu-user-static binfmt-support)")
    run = subprocess.run(
        ["bash", str(ROOT / "tools" / "arm64_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=4 * 3600,
    )
    if run.returncode == SKIP:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    arm = json.loads((tmp_path / "arm64.json").read_text())
    assert arm["machine"] == "aarch64" and arm["install_ok"]
    assert arm["rar_edge_file"].startswith("/opt/venv/")  # the installed package, not the source tree
    # qemu-user's default CPU ("max") has the dot-product instructions, so neon_dot is the family it picks
    assert {"neon", "neon_dot"} <= set(arm["native"]["compiled"]) and arm["native"]["selected"] == "neon_dot"
    assert arm["numpy"].startswith("1.")  # the jetson extra's numpy<2 held
    tests = arm["tests"]
    assert tests["failures"] == 0 and tests["errors"] == 0, arm["tests_failed"]
    assert tests["passed"] > 0 and arm["tests_neon_passed"] > 0  # the kernels' NEON paths ran through Python
    # -march=armv8.2-a+dotprod (the llama.cpp CPU flags on aarch64) enables the dot product; plain ARMv8 does not.
    assert arm["gcc_dotprod_define"] == {"-march=armv8-a": 0, "-march=armv8.2-a+dotprod": 1}
    # On aarch64 the gpu extra resolves to no onnxruntime-gpu, while the bare name would get PyPI's wheel.
    gpu, bare = arm["dry_run"]["gpu"], arm["dry_run"]["onnxruntime-gpu"]
    assert gpu is not None and not any(p.startswith("onnxruntime") for p in gpu)
    assert bare is not None and any(p.startswith("onnxruntime-gpu==") for p in bare)
    jb = {p.split("==")[0]: p.split("==")[1] for p in arm["dry_run"]["jetson-bench"]}
    assert jb["numpy"].startswith("1.") and "opencv-python-headless" in jb

    cmp = json.loads((tmp_path / "compare.json").read_text())
    assert cmp["machines"] == ["aarch64", cmp["machines"][1]] and cmp["machines"][1] != "aarch64"
    assert cmp["pixels_equal"]  # libjpeg-turbo's decode and the resize give the same model input on both
    for key in ("classify", "detect"):
        c = cmp[key]
        assert c["n"] == c["n_arm64"] == c["n_x86"] > 0
        assert c["equal"]["label"] == c["n"], c["differing"]
        assert c["equal"]["candidates"] == c["n"]
        # Embeddings of a uint8-quantised model through ONNX Runtime's own arm64 and x86 kernels.
        assert c["max_score_diff"] <= 1e-3
