"""MLLM export: GGUF sources, tiny random VLMs of each supported family through llama.cpp's converters,
quantization, and the exported folders ranking an image end to end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from rar_edge.errors import ExportError, RankerError  # noqa: E402
from rar_edge.manifest import load_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SDIST_DIR = Path(os.environ.get("RAR_EDGE_LLAMA_CPP_SDIST", REPO / ".cache" / "sdist"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    return write_tiny_text_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


@pytest.fixture(scope="module")
def lcpp(tmp_path_factory) -> Path:
    """llama.cpp's converters, extracted from the llama-cpp-python source package (no network)."""
    from rar_edge_export.mllm import DEFAULT_LLAMA_CPP_PYTHON, llama_cpp_source

    for mod in ("torch", "transformers", "sentencepiece"):  # the converters' imports (not imported here)
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'rar-edge[export]')")
    sdist = SDIST_DIR if SDIST_DIR.is_file() else SDIST_DIR / f"llama_cpp_python-{DEFAULT_LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"{sdist} is absent: run tools/fetch_llm.sh --sdist")
    return llama_cpp_source(
        version=DEFAULT_LLAMA_CPP_PYTHON, sdist=sdist, cache_dir=tmp_path_factory.mktemp("lcpp"), download=False
    )


# --- GGUF sources -----------------------------------------------------------------------------------------


def test_gguf_source_is_hard_linked_and_described(tmp_path, tiny_gguf):
    from rar_edge_export.mllm import export_mllm

    m = export_mllm(tiny_gguf, tmp_path / "linked")
    lm = m.path("language_model")
    assert os.stat(lm).st_ino == os.stat(tiny_gguf).st_ino  # no second copy on disk
    d = m.data
    assert d["kind"] == "mllm" and d["architecture"] == "llama"
    assert d["chat_template"].startswith("{% for message in messages %}")
    assert d["chat_handler"] is None and d["vision"] is None
    assert d["quantization"] == "F32" and d["prompt_version"] == "rar-rank-v1" and d["n_ctx"] == 2048
    load_manifest(m.root, verify=True)

    c = export_mllm(tiny_gguf, tmp_path / "copied", copy=True)
    assert os.stat(c.path("language_model")).st_ino != os.stat(tiny_gguf).st_ino
    assert c.files["language_model"]["sha256"] == m.files["language_model"]["sha256"]


def test_export_refuses_to_clobber_and_bad_sources(tmp_path, tiny_gguf):
    from rar_edge_export.mllm import export_mllm

    out = tmp_path / "m"
    export_mllm(tiny_gguf, out)
    with pytest.raises(ExportError, match="not empty"):
        export_mllm(tiny_gguf, out)
    export_mllm(tiny_gguf, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind
    with pytest.raises(ExportError, match="quant"):
        export_mllm(tiny_gguf, tmp_path / "q", quant="Q2")
    with pytest.raises(ExportError, match="not an mmproj"):
        export_mllm(tiny_gguf, tmp_path / "mm", mmproj=tiny_gguf)
    (tmp_path / "hf").mkdir()
    with pytest.raises(ExportError, match="config.json"):
        export_mllm(tmp_path / "hf", tmp_path / "x")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ExportError, match="GGUF"):
        export_mllm(bad, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_unknown_vision_family_is_rejected(tmp_path, lcpp):
    from rar_edge_export.mllm import _from_hf

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mystery_vl", "vision_config": {}}))
    with pytest.raises(ExportError):
        _from_hf(tmp_path / "hf", tmp_path, quant="F16", lcpp=lcpp, n_threads=1)


def test_quantize_tiny_text_model(tmp_path, tiny_gguf):
    pytest.importorskip("llama_cpp")
    from rar_edge.rank.ranker import Ranker
    from rar_edge_export.mllm import QUANTS, _quantize, gguf_summary

    for q in ("Q4_K_M", "Q8_0"):
        out = tmp_path / f"tiny-{q}.gguf"
        _quantize(tiny_gguf, out, q, 2)
        assert gguf_summary(out)["file_type"] == QUANTS[q]
        assert out.stat().st_size < tiny_gguf.stat().st_size / 2
        with Ranker.load(out, n_threads=1) as r:
            assert sorted(r.rank(None, ["a", "b", "c"]).labels) == ["a", "b", "c"]


def test_cli_subcommand(tmp_path, tiny_gguf, capsys):
    from rar_edge_export.mllm import add_subcommand

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["mllm", str(tiny_gguf), "-o", str(tmp_path / "cli"), "--copy"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["files"]["language_model"] == "tiny.gguf"
    assert oct((tmp_path / "cli").stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700
    args = parser.parse_args(["mllm", str(tiny_gguf), "-o", str(tmp_path / "cli")])
    with pytest.raises(ExportError, match="not empty"):  # exists, no --overwrite: rar-edge says it, exit 2
        args.func(args)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):  # refused before any conversion
        args.func(parser.parse_args(["mllm", str(tiny_gguf), "-o", str(tmp_path / "afile"), "--overwrite"]))
    with pytest.raises(ExportError, match="keeps its own quantization"):  # --quant would be silently ignored
        args.func(parser.parse_args(["mllm", str(tiny_gguf), "-o", str(tmp_path / "q"), "--quant", "Q8_0"]))
    with pytest.raises(ExportError, match="model folder ./no/such/folder does not exist"):
        args.func(parser.parse_args(["mllm", "./no/such/folder", "-o", str(tmp_path / "x")]))


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_llama_cpp_source_without_sdist_or_download(tmp_path, monkeypatch):
    from rar_edge_export.mllm import llama_cpp_source

    monkeypatch.delenv("RAR_EDGE_LLAMA_CPP_SRC", raising=False)
    monkeypatch.delenv("RAR_EDGE_LLAMA_CPP_SDIST", raising=False)
    with pytest.raises(ExportError, match="converter scripts are needed"):
        llama_cpp_source(version="0.0.1", cache_dir=tmp_path, download=False)
    monkeypatch.setenv("RAR_EDGE_LLAMA_CPP_SRC", str(tmp_path))
    with pytest.raises(ExportError, match="convert_hf_to_gguf.py"):
        llama_cpp_source()


# --- tiny random VLMs of each family, end to end -----------------------------------------------------------

# One family runs by default (SmolVLM through convert_hf_to_gguf.py --mmproj, Q4_K_M as a user would);
# the others take ~10-30 s each on two cores and are marked slow.
FAMILY_PARAMS = [
    pytest.param("smolvlm", "Q4_K_M", "MTMDChatHandler", "idefics3", id="smolvlm"),
    pytest.param("llava", "Q8_0", "Llava15ChatHandler", "mlp", id="llava15", marks=pytest.mark.slow),
    pytest.param("qwen2_vl", "F16", "Qwen25VLChatHandler", "qwen2vl_merger", id="qwen2vl", marks=pytest.mark.slow),
    pytest.param(
        "qwen2_5_vl", "Q8_0", "Qwen25VLChatHandler", "qwen2.5vl_merger", id="qwen25vl", marks=pytest.mark.slow
    ),
    pytest.param("gemma3", "Q8_0", "MTMDChatHandler", "gemma3", id="gemma3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family, quant, handler, projector", FAMILY_PARAMS)
def test_tiny_vlm_exports_and_ranks_an_image(tmp_path, lcpp, family, quant, handler, projector):
    pytest.importorskip("llama_cpp")
    from rar_edge.rank.ranker import Ranker
    from rar_edge_export.mllm import export_mllm
    from rar_edge_export.tiny_models import build_tiny_vlm

    hf = build_tiny_vlm(family, tmp_path / "hf", vocab_gguf=lcpp / "models" / "ggml-vocab-gpt-2.gguf")
    m = export_mllm(hf, tmp_path / "model", quant=quant, llama_cpp_src=lcpp)
    d = m.data
    assert set(m.files) == {"language_model", "mmproj"}
    assert d["quantization"] == quant and d["chat_handler"] == handler
    assert d["vision"]["projector_type"] == projector
    assert d["chat_template"] and d["n_ctx"] == 4096
    load_manifest(m.root, verify=True)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    cands = ["tulip", "rose", "bird's-foot trefoil", "daisy"]
    with Ranker.load(m.root, n_threads=2) as r:
        assert r.has_vision
        assert r.image_size_px == d["vision"]["image_size_px"] > 0  # what Pipeline decodes photos to for it
        t0 = time.perf_counter()
        s = r.rank(image, cands, mode="score")
        t_score = time.perf_counter() - t0
        g = r.rank(image, cands, mode="generate")
        again = r.rank(image, cands, mode="score")
        stats = r.stats
        try:  # too thin for some vision towers (SmolVLM's): that must be said as such
            r.rank(np.zeros((10, 1000, 3), np.uint8), cands)
        except RankerError as e:
            assert "vision preprocessor could not prepare the image (10x1000" in str(e)
    assert sorted(s.labels) == sorted(g.labels) == sorted(cands)
    assert again == s  # the cached prefix gives the same answer
    assert stats.prefix_evals == 1
    assert stats.image_encodes == 3  # once per query, not once per candidate
    assert t_score < 30

    # An in-context example with its own image: encoded once, with the cached prefix.
    from PIL import Image

    from rar_edge.rank.prompts import RankingExample

    Image.fromarray(image[::-1]).save(tmp_path / "example.png")
    ex = [RankingExample(candidates=("rose", "tulip"), ranked=("tulip", "rose"), image=str(tmp_path / "example.png"))]
    with Ranker.load(m.root, n_threads=2, in_context_examples=ex) as r:
        for query in (image, Image.fromarray(image)):  # an array, then a PIL image (read-only pixels)
            assert sorted(r.rank(query, cands).labels) == sorted(cands)
        assert r.stats.prefix_evals == 1 and r.stats.image_encodes == 1 + 2


def test_tiny_multimodal_ranker_classifies_an_image_through_the_cli(
    tmp_path, lcpp, mobilenet_onnx, shared_path, run_cli
):
    """RAR end to end, offline, with the commands a user types: export mllm, memory build, classify --ranker."""
    pytest.importorskip("llama_cpp")
    from rar_edge_export.tiny_models import build_tiny_vlm

    flowers = shared_path / "data" / "flowers17"
    if not flowers.is_dir():
        pytest.skip(f"Oxford Flowers not found at {flowers}")
    hf = build_tiny_vlm("smolvlm", tmp_path / "hf", vocab_gguf=lcpp / "models" / "ggml-vocab-gpt-2.gguf")
    ranker = tmp_path / "ranker"
    run_cli("export", "mllm", hf, "-o", ranker, "--quant", "Q8_0", "--llama-cpp-src", lcpp)
    manifest = json.loads((ranker / "manifest.json").read_text())
    assert manifest["kind"] == "mllm" and "mmproj" in manifest["files"] and manifest["vision"]
    mem = tmp_path / "flowers.rarmem"
    run_cli("memory", "build", flowers, "--encoder", mobilenet_onnx, "--shots", 1, "--seed", 0, "-o", mem)
    img = sorted((flowers / "tulip").glob("*.jpg"))[-1]
    for mode in ("score", "generate"):
        (res,) = json.loads(
            run_cli("classify", img, "--memory", mem, "-k", 5, "--ranker", ranker, "--ranker-mode", mode, "--json")
        )
        retrieved = [c["label"] for c in res["retrieved"]]
        ranked = [c["label"] for c in res["candidates"]]
        assert res["ranker_ran"] and not res["ranker_fallback"]
        assert len(retrieved) == 5 and sorted(ranked) == sorted(retrieved) and res["label"] == ranked[0]
        assert res["timings_ms"]["rank"] > 0
