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
    cross = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not (cross and qemu and shutil.which("g++")):
        pytest.skip(
            "needs g++, aarch64-linux-gnu-g++ and qemu-aarch64 (apt install g++-aarch64-linux-gnu qemu-user or "
            "qemu-user-static)"
        )
    x86 = _parse(_build_and_run("g++", tmp_path / "x86", [], []))
    arm = _parse(_build_and_run(cross, tmp_path / "a64", [qemu], ["-static"]))
    # qemu-user's default CPU ("max") has the dot-product instructions: all three aarch64 families run
    assert {"scalar", "neon", "neon_dot"} <= set(arm) and "scalar" in x86
    ref = x86["scalar"]
    assert len(ref) == 97  # 80 search lines (4 storages x 2 dims x 2 thread counts x 5 queries) + 17
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
    # The sdot kernel sums the same integers per chunk as plain NEON's: its int8 scores are the same floats
    int8 = [key for key in arm["neon"] if key[0] == "search" and key[1].startswith("i8")]
    assert len(int8) == 40  # i8 and i8r, dims 512 and 77, 1 and 3 threads, 5 queries each
    for key in int8:
        assert arm["neon_dot"][key][0] == arm["neon"][key][0], key
        assert np.array_equal(arm["neon_dot"][key][1], arm["neon"][key][1]), key
