"""benchmarks/random_gguf.py: a quantized GGUF's layout (metadata, tensor names, shapes, types) with random
weights, so a model that cannot travel can still be timed where it runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("random_gguf", REPO / "benchmarks" / "random_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def q4km(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from rar_edge_export.mllm import _quantize
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    d = tmp_path_factory.mktemp("random_gguf")
    out = d / "tiny-Q4_K_M.gguf"
    _quantize(write_tiny_text_gguf(d / "tiny-f32.gguf", seed=0), out, "Q4_K_M", 2)
    return out


def _layout(reader) -> list[tuple]:
    return [(t.name, [int(x) for x in t.shape], t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors]


def test_layout_file_then_random_model_keeps_every_shape_type_and_key(q4km, tmp_path):
    tool = _tool()
    real = gguf.GGUFReader(q4km)
    assert {"Q4_K", "Q6_K", "F32"} <= {t.tensor_type.name for t in real.tensors}  # what a real Q4_K_M holds

    layout = tmp_path / "layout.gguf"
    tool.layout(q4km, layout)
    assert gguf.GGUFReader(layout).tensors == [] and layout.stat().st_size < q4km.stat().st_size / 4

    out = tmp_path / "random.gguf"
    tool.make(layout, out, seed=1)
    rnd = gguf.GGUFReader(out)
    assert _layout(rnd) == _layout(real)
    for name, field in real.fields.items():
        if not name.startswith("GGUF.") and name != "general.name":
            assert rnd.fields[name].contents() == field.contents(), name
    assert "random weights" in rnd.fields["general.name"].contents()

    changed = 0
    for a, b in zip(real.tensors, rnd.tensors):
        w = gguf.quants.dequantize(b.data, b.tensor_type)
        assert np.all(np.isfinite(w)), b.name  # every block scale a finite fp16
        if b.tensor_type.name != "F32":
            assert 1e-4 < float(np.std(w)) < 1.0, b.name
        changed += not np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert changed >= len(real.tensors) // 2  # the weights are new (norms are ones in both)

    # The same from the real file directly, and a different seed gives different weights.
    direct = tmp_path / "direct.gguf"
    tool.make(q4km, direct, seed=2)
    assert _layout(gguf.GGUFReader(direct)) == _layout(real)
    assert direct.read_bytes() != out.read_bytes()


def test_llama_cpp_loads_and_runs_the_random_model(q4km, tmp_path):
    from rar_edge.rank.ranker import Ranker

    out = tmp_path / "random.gguf"
    _tool().make(q4km, out, seed=0)
    with Ranker.load(out, n_threads=1) as r:
        for mode in ("score", "generate"):
            res = r.rank(None, ["rose", "tulip", "daisy"], mode=mode)
            assert sorted(res.labels) == ["daisy", "rose", "tulip"]
            assert np.all(np.isfinite(res.scores))
