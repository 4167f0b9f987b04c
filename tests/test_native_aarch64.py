"""The C++ core on aarch64 (NEON), run under qemu-aarch64, against the same kernels on this x86-64 machine.

tests/native/cross_check.cpp runs search (float32, float16, int8, int8 + rerank; 1 and 3 threads), crop + blur +
resize (5 cases), log-sum-exp and unit_rows on fixed pseudo-random inputs with every kernel family each build
has. Every family on both machines must give the x86 scalar build's classes exactly, scores and floats within
float rounding, and pixels within 1. Needs a cross compiler and qemu-user (Debian/Ubuntu:
``apt install g++-aarch64-linux-gnu qemu-user``); slow (two builds of the core).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests" / "native" / "cross_check.cpp"] + [
    ROOT / "cpp" / f for f in ("cpu.cpp", "search.cpp", "crop.cpp", "logits.cpp", "parallel.cpp")
]


def _build_and_run(compiler: str, out: Path, runner: list[str], extra: list[str]) -> str:
    subprocess.run(
        [compiler, "-std=c++17", "-O2", f"-I{ROOT / 'cpp'}", *map(str, SOURCES), "-o", str(out), "-lpthread", *extra],
        check=True,
        capture_output=True,
    )
    return subprocess.run([*runner, str(out)], check=True, capture_output=True, text=True, timeout=600).stdout


def _parse(text: str) -> dict[str, dict[tuple, object]]:
    out: dict[str, dict[tuple, object]] = {}
    for line in text.splitlines():
        f = line.split()
        fam, kind = f[0], f[1]
        if kind == "search":
            k = (len(f) - 5) // 2
            val: object = (list(map(int, f[5 : 5 + k])), np.array(f[5 + k :], float))
            key: tuple = (kind, f[2], f[3], f[4])
        elif kind == "crop":
            key, val = (kind, f[2], f[3]), np.frombuffer(bytes.fromhex(f[4]), np.uint8)
        else:  # lse, unit
            key, val = (kind, f[2]), np.array(f[3:], float)
        out.setdefault(fam, {})[key] = val
    return out


def test_neon_kernels_match_x86(tmp_path):
    cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (cross and qemu and shutil.which("g++")):
        pytest.skip("needs g++, aarch64-linux-gnu-g++ and qemu-aarch64 (apt install g++-aarch64-linux-gnu qemu-user)")
    x86 = _parse(_build_and_run("g++", tmp_path / "x86", [], []))
    arm = _parse(_build_and_run(cross, tmp_path / "a64", [qemu], ["-static"]))
    assert "neon" in arm and "scalar" in arm and "scalar" in x86
    ref = x86["scalar"]
    assert len(ref) == 65
    for machine, results in (("x86-64", x86), ("aarch64", arm)):
        for fam, res in results.items():
            assert set(res) == set(ref), (machine, fam)
            for key, got in res.items():
                want = ref[key]
                where = (machine, fam, *key[:3])
                if key[0] == "search":
                    assert got[0] == want[0], where  # the same classes in the same order
                    assert np.max(np.abs(got[1] - want[1])) <= 2e-6, where
                elif key[0] == "crop":
                    assert np.max(np.abs(got.astype(int) - want.astype(int))) <= 1, where
                else:
                    assert np.max(np.abs(got - want)) <= 1e-6, where
