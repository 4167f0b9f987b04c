"""`rar-edge bench` on a tiny set-up: the real MobileNet embedder, a few flower photos, few runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rar_edge import EncoderConfig
from rar_edge.errors import InvalidInputError
from rar_edge.tools.bench import STAGES, BenchConfig, run_bench
from rar_edge.types import Ranking

from conftest import linked_flowers
from stub_ranker import StubRanker

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PERCENTILE_KEYS = ("p50", "p95", "p99", "mean", "min", "max", "n")


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    """3 classes x 4 photos of Oxford Flowers (symlinks): 2 shots per class leave 6 queries."""
    return linked_flowers(tmp_path_factory.mktemp("bench_flowers"), ("daisy", "sunflower", "tulip"), 4)


def _config(**kw) -> BenchConfig:
    return BenchConfig(**{"runs": 8, "warmup": 1, "shots": 2, "k": 3, "encoder": EncoderConfig(threads=1), **kw})


def _check_percentiles(p: dict) -> None:
    assert set(PERCENTILE_KEYS) <= set(p)
    assert 0 <= p["min"] <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    assert p["min"] <= p["mean"] <= p["max"]


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 250


def test_retrieval_only_bench_writes_every_field(mobilenet_onnx, flowers, tmp_path):
    out = tmp_path / "bench"
    res = run_bench(encoder=mobilenet_onnx, images=flowers, out_dir=out, config=_config())
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(res))  # what is returned is what was written

    for key in (
        "schema",
        "created_at",
        "setup",
        "environment",
        "cold_start_ms",
        "setup_ms",
        "classify",
        "detect",
        "overhead_share",
        "overhead_target",
        "model_time_method",
        "memory_rss",
        "encoder_variants",
        "notes",
        "files",
    ):
        assert key in on_disk, key
    env = on_disk["environment"]
    for key in (
        "cpu_model",
        "logical_cpus",
        "cpus_usable",
        "encoder_threads",
        "providers_in_use",
        "providers_available",
        "versions",
        "git",
        "python",
        "load_average_before",
        "load_average_after",
    ):
        assert key in env, key
    assert env["providers_in_use"]["image"] == ["CPUExecutionProvider"]
    assert env["encoder_threads"] == 1 and env["encoder_allow_spinning"] == "onnxruntime default (spinning)"
    assert env["versions"]["onnxruntime"]

    cold = on_disk["cold_start_ms"]
    assert cold["encoder_load_ms"] > 0 and cold["first_classify_ms"] > 0
    assert cold["memory_load_ms"] is None and on_disk["setup_ms"]["memory_build"] > 0  # built, not loaded
    assert cold["total_ms"] >= cold["encoder_load_ms"] + cold["first_classify_ms"]

    c = on_disk["classify"]
    assert c["runs"] == 8 and c["throughput_per_s"] > 0
    assert "wait" not in c["latency_ms"]  # only a stream waits
    for stage in (s for s in STAGES if s != "wait"):
        if stage == "rank":
            assert c["latency_ms"]["rank"] is None  # retrieval only
            continue
        _check_percentiles(c["latency_ms"][stage])
        assert len(c["samples_ms"][stage]) == 8
    _check_percentiles(c["model_time_ms"]["encoder"])
    assert c["model_time_ms"]["ranker"] is None
    ov = c["overhead"]
    assert 0.0 <= on_disk["overhead_share"] == ov["overhead_share"] <= 1.0
    assert 0.0 <= ov["overhead_share_p50"] <= 1.0
    # The model call is inside the encode stage, which is inside the total.
    enc_model = np.asarray(c["samples_ms"]["encoder_model"])
    assert np.all(enc_model > 0)
    assert np.all(enc_model <= np.asarray(c["samples_ms"]["encode"]) + 1e-3)
    assert c["accuracy"]["n"] == 8 and 0.0 <= c["accuracy"]["top1"] <= 1.0
    # The streamed run: the same queries through iter_classify, decoding ahead on a worker thread.
    st = c["stream"]
    assert st["prefetch"] == 1 and st["runs"] == 8 and st["throughput_per_s"] > 0
    assert 0 < st["model_ms_per_image"] <= st["wall_ms_per_image"]
    assert on_disk["overhead_share_stream"] == st["overhead_share"]
    assert st["overhead_share"] == pytest.approx(1 - st["model_ms_per_image"] / st["wall_ms_per_image"], abs=1e-9)
    for stage in ("wait", "decode", "preprocess", "encode", "search", "total"):
        _check_percentiles(st["latency_ms"][stage])

    rss = on_disk["memory_rss"]
    assert rss["peak_bytes"] >= rss["after_runs_bytes"] > 0

    assert on_disk["files"]["plots"] == ["stage_breakdown.png", "latency_distribution.png"]
    for name in on_disk["files"]["plots"]:
        _check_png(out / name)
    summary = (out / "summary.md").read_text()
    assert "SDK overhead share" in summary and "| encode |" in summary


class _TimedRanker(StubRanker):
    """A ranker that reports its model time: 3 ms 'in the model' (counted in model_s), then 1 ms of its own work."""

    def __init__(self):
        self._model_s = 0.0

    @property
    def model_s(self) -> float:
        return self._model_s

    def describe(self):
        return {"name": "timed-stub", "mode": "score"}

    def rank(self, image, candidates):
        t0 = time.perf_counter()
        time.sleep(0.003)
        self._model_s += time.perf_counter() - t0
        time.sleep(0.001)  # prompt assembly and parsing: SDK overhead
        labels = tuple(reversed(candidates))
        return Ranking(labels=labels, scores=tuple(np.linspace(0.6, 0.1, len(labels))))


def test_ranker_time_is_its_model_counter_and_variants_compare(mobilenet_onnx, flowers, tmp_path):
    ranker = _TimedRanker()
    res = run_bench(
        encoder=mobilenet_onnx,
        images=flowers,
        out_dir=tmp_path,
        ranker=ranker,
        variants=[mobilenet_onnx],
        notes=["a note"],
        config=_config(runs=5, plots=True),
    )
    c = res["classify"]
    _check_percentiles(c["latency_ms"]["rank"])
    rk = c["model_time_ms"]["ranker"]
    _check_percentiles(rk)
    assert 2.5 <= rk["p50"] <= c["latency_ms"]["rank"]["p50"]
    assert c["latency_ms"]["rank"]["p50"] >= rk["p50"] + 0.5  # the 1 ms of Python is overhead, not model time
    assert "model_s" in c["overhead"]["ranker_call"]
    assert res["environment"]["ranker"] == {"name": "timed-stub", "mode": "score"}
    assert 0.0 <= res["overhead_share"] <= 1.0

    (ref, same) = res["encoder_variants"]
    assert ref["name"] == "int8 (reference)" and ref["latency_ratio_to_reference_p50"] == 1.0  # an int8 TFLite
    assert same["cosine_to_reference"]["min"] == pytest.approx(1.0, abs=1e-6)
    _check_percentiles(same["session_run_ms"])
    assert same["latency_ratio_to_reference_p50"] > 0
    assert res["notes"] == ["a note"]
    assert "encoder_variants.png" in res["files"]["plots"]
    for name in res["files"]["plots"]:
        _check_png(tmp_path / name)
    # a later run into the same folder without variants leaves no plot of the earlier run behind
    again = run_bench(encoder=mobilenet_onnx, images=flowers, out_dir=tmp_path, config=_config(runs=2, plots=True))
    assert not (tmp_path / "encoder_variants.png").exists() and "encoder_variants.png" not in again["files"]["plots"]


def test_cli_bench_prints_summary(mobilenet_onnx, flowers, tmp_path, capsys):
    from rar_edge.tools.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "bench",
            "--encoder",
            str(mobilenet_onnx),
            "--images",
            str(flowers),
            "--shots",
            "2",
            "--runs",
            "3",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--no-plots",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "overhead_share" in text and "classify p50 ms" in text
    res = json.loads((out / "bench.json").read_text())
    assert res["files"]["plots"] == [] and res["classify"]["runs"] == 3


def test_saved_memory_without_queries_uses_its_exemplars(mobilenet_onnx, flowers, tmp_path):
    from rar_edge import Encoder, Memory

    enc = Encoder(mobilenet_onnx, config=EncoderConfig(threads=1))
    mem_file = Memory.from_folder(flowers, encoder=enc, shots=2, seed=0).save(tmp_path / "m.rarmem")
    res = run_bench(encoder=enc, memory=mem_file, out_dir=tmp_path / "b", config=_config(runs=3, plots=False))
    assert res["cold_start_ms"]["memory_load_ms"] > 0 and res["cold_start_ms"]["encoder_load_ms"] is None
    assert res["classify"]["accuracy"] is None  # exemplars are in the memory: accuracy would be trivial
    assert res["setup"]["memory"]["entries"] == 6


def test_bad_arguments(mobilenet_onnx, flowers, tmp_path):
    with pytest.raises(InvalidInputError):  # neither memory nor images; and no empty output folder left
        run_bench(encoder=mobilenet_onnx, out_dir=tmp_path / "never", config=_config())
    assert not (tmp_path / "never").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInputError, match="is a file"):
        run_bench(encoder=mobilenet_onnx, images=flowers, out_dir=tmp_path / "afile", config=_config())
    with pytest.raises(InvalidInputError):
        BenchConfig(runs=0)
    with pytest.raises(InvalidInputError):
        BenchConfig(prefetch=-1)


def test_detect_is_timed_when_boxes_are_given(mobilenet_onnx, flowers, tmp_path):
    pytest.importorskip("rar_edge.image.boxes")
    from conftest import shared_file

    coco = shared_file("data/coco128")
    ds = tmp_path / "yolo"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    (ds / "classes.txt").write_text((coco / "classes.txt").read_text())
    for lbl in sorted((coco / "labels").glob("*.txt"))[:3]:
        (ds / "labels" / lbl.name).write_text(lbl.read_text())
        img = coco / "images" / (lbl.stem + ".jpg")
        (ds / "images" / img.name).symlink_to(img)
    res = run_bench(
        encoder=mobilenet_onnx, images=flowers, boxes=ds, out_dir=tmp_path / "b", config=_config(runs=3, plots=True)
    )
    d = res["detect"]
    _check_percentiles(d["latency_ms"]["total"])
    assert d["boxes_per_s"] > 0 and 0.0 <= d["overhead"]["overhead_share"] <= 1.0
    for name in res["files"]["plots"]:
        _check_png(tmp_path / "b" / name)


def test_decode_benchmark_compares_with_pillow_and_opencv(tmp_path):
    """benchmarks/decode.py on a few photos: every peer timed, and the native resize matches Pillow's."""
    pytest.importorskip("cv2")
    import os
    import subprocess
    import sys

    from conftest import shared_file

    shared = shared_file("data/flowers17").parents[1]
    out = tmp_path / "decode.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    subprocess.run(
        [sys.executable, str(script), "--limit", "6", "--repeats", "1", "--json", str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "RAR_EDGE_SHARED": str(shared)},
    )
    res = json.loads(out.read_text())
    assert set(res["per_photo_ms"]) == {"rar_edge", "pillow_draft", "pillow", "opencv"}
    assert all(v > 0 for v in res["per_photo_ms"].values()) and res["photos"] == 6
    assert res["psnr_rar_edge_vs_pillow_draft"]["psnr_db_min"] > 40  # same decode, resize within rounding


def test_overhead_floor_benchmark_runs_every_regime_for_both(mobilenet_onnx, tmp_path):
    """benchmarks/overhead_floor.py on a few photos: three regimes, rar_edge and the hand-written peer."""
    import os
    import subprocess
    import sys

    from conftest import shared_file

    flowers = shared_file("data/flowers17")
    out = tmp_path / "floor.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead_floor.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--encoder",
            str(mobilenet_onnx),
            "--images",
            str(flowers),
            "--runs",
            "4",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ),
    )
    res = json.loads(out.read_text())
    assert set(res["regimes"]) == {"model", "busy", "back_to_back"}
    for block in res["regimes"].values():
        for who in ("rar_edge", "peer"):
            assert block[who]["p50"] > 0 and 0.0 < block[who]["share_with_model"] < 1.0
        assert block["peer_over_rar_edge_overhead"] > 0
        assert set(block["rar_edge_stages_p50_ms"]) == {"decode", "preprocess", "search"}
    assert res["model_ms"]["p50"] > 0 and res["decode_floor_ms"]["p50"] > 0
    assert res["setup"]["busy_wait_ms"] > 0 and 0.0 <= res["peer_top1_agrees_with_rar_edge"] <= 1.0
