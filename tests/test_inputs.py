"""Real-world inputs (issue 14): one test (or a parametrised family) per defect row, numbered as in the issue.

A tiny random ONNX image embedder (Flatten + MatMul over a 32x32 input, built here with onnx.helper and
written with the runtime's own `write_manifest`) keeps these tests fast; the rows that need a ranker use the
tiny random llama GGUF of `rar_edge_export.tiny_models`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rar_edge import Encoder, Memory, Pipeline, PipelineConfig, classify, detect
from rar_edge.errors import (
    CorruptFileError,
    DatasetError,
    ImageDecodeError,
    InvalidInputError,
    ManifestError,
    RankerError,
)
from rar_edge.manifest import write_manifest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "export"))

SIZE = 32
DIM = 8
# class -> the colour its photos are made around (distinct enough for a random projection to tell apart)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_tiny_embedder(folder: Path, *, layout: str = "NCHW", size_px=(SIZE, SIZE), seed: int = 0) -> Path:
    """A random Flatten + MatMul image embedder (float32 NCHW 1x3x32x32 in, 8 out) as a model folder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3 * SIZE * SIZE, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["image_embeds"]),
        ],
        "tiny_embedder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["n", DIM])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(
        folder,
        {
            "kind": "image_embedder",
            "name": "tiny",
            "embedding_dim": DIM,
            "image": {
                "size_px": list(size_px),
                "layout": layout,
                "dtype": "float32",
                "rescale": 1 / 255,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "resize_mode": "squash",
                "crop_mode": "none",
                "resample": "bilinear",
                "input_name": "pixel_values",
                "output_name": "image_embeds",
            },
            "text": None,
        },
        files={"image_model": "model.onnx"},
    )
    return folder


def photo(colour, *, seed: int, size=(64, 48)) -> np.ndarray:
    """An RGB photo around ``colour``: a noisy gradient, so each photo differs."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.asarray(colour, np.float64)[None, None, :] * np.linspace(0.6, 1.0, w)[None, :, None]
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def save_jpeg(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=92)
    return path


def make_folder(root: Path, per_class: int = 4, classes=tuple(COLOURS)) -> Path:
    for ci, name in enumerate(classes):
        for i in range(per_class):
            save_jpeg(root / name / f"{name}_{i}.jpg", photo(COLOURS[name], seed=100 * ci + i))
    return root


def truncated_jpeg(path: Path) -> Path:
    data = io.BytesIO()
    Image.fromarray(photo((200, 200, 0), seed=7)).save(data, "JPEG")
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 3])
    return path


def cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rar_edge", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    return write_tiny_embedder(tmp_path_factory.mktemp("enc") / "tiny")


@pytest.fixture(scope="module")
def encoder(enc_dir) -> Encoder:
    return Encoder(enc_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("photos") / "colours")


@pytest.fixture(scope="module")
def mem_path(encoder, folder, tmp_path_factory) -> Path:
    mem = Memory.from_folder(folder, encoder=encoder, shots=3, seed=0, progress=False)
    return mem.save(tmp_path_factory.mktemp("mem") / "colours.rarmem")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("gguf")
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    return write_tiny_text_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


# --- row 1: Ctrl-C stops promptly, rc 130, with or without a ranker ----------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random SmolVLM ranker folder (mmproj included): llama.cpp's mtmd logs while it encodes images."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    for mod in ("torch", "transformers"):
        pytest.importorskip(mod)
    from rar_edge_export.mllm import DEFAULT_LLAMA_CPP_PYTHON, export_mllm, llama_cpp_source
    from rar_edge_export.tiny_models import build_tiny_vlm

    sdist = REPO / ".cache" / "sdist" / f"llama_cpp_python-{DEFAULT_LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"{sdist} is absent: run tools/fetch_llm.sh --sdist")
    tmp = tmp_path_factory.mktemp("vlm")
    lcpp = llama_cpp_source(version=DEFAULT_LLAMA_CPP_PYTHON, sdist=sdist, cache_dir=tmp / "lcpp", download=False)
    hf = build_tiny_vlm("smolvlm", tmp / "hf", vocab_gguf=lcpp / "models" / "ggml-vocab-gpt-2.gguf")
    return export_mllm(hf, tmp / "ranker", quant="Q8_0", llama_cpp_src=lcpp).root


@pytest.mark.parametrize(
    "ranker",
    [None, "tiny_gguf", pytest.param("tiny_vlm", marks=pytest.mark.slow)],
    ids=["retrieval", "text-ranker", "vision-ranker"],
)
@pytest.mark.parametrize("signals", [1, 3])
def test_1_ctrl_c_stops_a_batch_promptly_with_rc_130(ranker, signals, folder, mem_path, enc_dir, request):
    images = [p for p in sorted(folder.rglob("*.jpg"))] * 400  # minutes of work: it must not run to the end
    args = [
        sys.executable,
        "-m",
        "rar_edge",
        "-q",
        "classify",
        *images,
        "--memory",
        mem_path,
        "--encoder",
        enc_dir,
        "-k",
        "2",
    ]
    if ranker:
        args += ["--ranker", request.getfixturevalue(ranker)]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # the first result: the models are loaded and the batch is running
        assert ": " in first, proc.stderr.read()
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        waited = time.monotonic() - t0
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, err
    assert waited < 10
    assert len(out.splitlines()) + 1 < len(images)  # stopped, did not finish
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert "interrupted" in err


def test_1_a_ctrl_c_during_llama_cpp_work_is_raised_when_it_returns(tiny_gguf):
    """llama.cpp calls back into Python to log; a Ctrl-C handled there would be dropped by ctypes, so inside
    the native calls it is held and raised once they return."""
    from rar_edge.rank import _llama
    from rar_edge.rank.ranker import Ranker

    with Ranker.load(tiny_gguf, n_threads=1, n_ctx=512):
        pass  # installs the log callback
    cb = dict(_llama._LOG_CALLBACKS)["llama"]
    reached = []
    # Python's own Ctrl-C handler, as in a terminal: a process started in the background by a shell without
    # job control (as CI may start this one) inherits SIGINT ignored, and Python then installs none.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _llama.ctrl_c_deferred():
                signal.raise_signal(signal.SIGINT)  # Ctrl-C while "llama.cpp" runs ...
                cb(2, b"a log line", None)  # ... and calls back through ctypes: nothing is raised (or lost) here
                reached.append(True)
        assert reached == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
        calls = []
        signal.signal(signal.SIGINT, lambda s, f: calls.append(s))  # an application's own handler ...
        with _llama.ctrl_c_deferred():
            signal.raise_signal(signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]  # ... is called once the native work is done
    finally:
        signal.signal(signal.SIGINT, inherited)


# --- row 2: a bad file in a batch ---------------------------------------------------------------------------


def test_2_cli_batch_keeps_the_good_results_and_names_the_bad_file(folder, mem_path, tmp_path):
    a, b = sorted((folder / "red").glob("*.jpg"))[:2]
    broken = truncated_jpeg(tmp_path / "broken.jpg")
    r = cli("-q", "classify", a, broken, b, "--memory", mem_path, "--json")
    rows = json.loads(r.stdout)
    assert r.returncode == 1, r.stderr
    assert [row["image"] for row in rows] == [str(a), str(broken), str(b)]
    assert rows[0]["label"] == "red" and rows[2]["label"] == "red"
    assert rows[1]["error_type"] == "ImageDecodeError" and "broken.jpg" in rows[1]["error"]
    assert "broken.jpg" in r.stderr
    text = cli("-q", "classify", a, broken, b, "--memory", mem_path)  # without --json: b is still tried
    assert text.returncode == 1 and str(b) in text.stdout and str(a) in text.stdout
    stop = cli("-q", "classify", a, broken, b, "--memory", mem_path, "--json", "--on-error", "stop")
    assert stop.returncode == 2 and "broken.jpg" in stop.stderr
    assert [row["image"] for row in json.loads(stop.stdout)] == [str(a)]  # a's result is not lost


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_2_iter_classify_skips_a_bad_frame_and_goes_on(encoder, mem_path, folder, prefetch, caplog):
    good = sorted((folder / "green").glob("*.jpg"))[:2]
    pipe = Pipeline(memory=mem_path, encoder=encoder)
    with caplog.at_level(logging.WARNING, logger="rar_edge"):
        out = pipe.classify_many([good[0], b"\xff\xd8 not a jpeg", good[1]], prefetch=prefetch, on_error="skip")
    assert [type(r).__name__ for r in out] == ["Classification", "ImageError", "Classification"]
    assert out[1].index == 1 and out[1].error_type == "ImageDecodeError"
    assert out[0].label == out[2].label == "green"
    assert "skipped image 1" in caplog.text
    with pytest.raises(ImageDecodeError):
        pipe.classify_many([good[0], b"\xff\xd8 not a jpeg"], prefetch=prefetch)  # the default stops


def test_2_memory_build_and_eval_survive_a_truncated_photo(enc_dir, tmp_path):
    root = make_folder(tmp_path / "ds", per_class=4)
    bad = truncated_jpeg(root / "red" / "red_9.jpg")
    out = tmp_path / "m.rarmem"
    r = cli("-q", "memory", "build", root, "--encoder", enc_dir, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_entries"] == 12 and info["skipped_images"] == [str(bad)]
    assert "red_9.jpg" in r.stderr
    stop = cli(
        "-q", "memory", "build", root, "--encoder", enc_dir, "-o", tmp_path / "stop.rarmem", "--on-error", "stop"
    )
    assert stop.returncode == 2 and "red_9.jpg" in stop.stderr
    ev = cli("-q", "eval", root, "--encoder", enc_dir, "--shots", "1", "--seed", "0", "-k", "2", "--json", "-")
    res = json.loads(ev.stdout)
    assert ev.returncode == 0, ev.stderr
    # 12 good photos and a bad one: whichever side of the split it fell on, it is accounted for
    assert res["n_queries"] + res["setup"]["memory_entries"] == 12
    assert [q["image"] for q in res["skipped_queries"]] in ([], [str(bad)])


# --- row 3: BGR frames ----------------------------------------------------------------------------------------


def test_3_bgr_frames_are_read_as_bgr(encoder, mem_path, folder):
    rgb = np.asarray(Image.open(sorted((folder / "blue").glob("*.jpg"))[0]))
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what cv2.imread / VideoCapture give
    pipe = Pipeline(memory=mem_path, encoder=encoder)
    want = pipe.classify(rgb)
    got = pipe.classify(bgr, color="bgr")
    assert got.label == want.label == "blue"
    assert got.score == pytest.approx(want.score, abs=1e-6)
    assert pipe.classify(bgr).label != "blue"  # read as RGB, the blue photo looks red: the argument matters
    streamed = pipe.classify_many([bgr, bgr], color="bgr")
    assert [r.label for r in streamed] == ["blue", "blue"]
    d_rgb = detect(rgb, [[0, 0, 40, 30]], memory=mem_path, encoder=encoder)
    d_bgr = detect(bgr, [[0, 0, 40, 30]], memory=mem_path, encoder=encoder, color="bgr")
    assert d_bgr[0].score == pytest.approx(d_rgb[0].score, abs=1e-6)
    assert classify(bgr, memory=mem_path, encoder=encoder, color="bgr").label == "blue"
    with pytest.raises(InvalidInputError, match="color='bgr' is for arrays"):
        pipe.classify(sorted((folder / "blue").glob("*.jpg"))[0], color="bgr")
    with pytest.raises(InvalidInputError, match="color"):
        pipe.classify(rgb, color="hsv")


# --- row 4: a broken model folder is one clear error ------------------------------------------------------


def _corrupt_onnx(d: Path) -> None:
    (d / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    m = json.loads((d / "manifest.json").read_text())
    write_manifest(
        d,
        {k: v for k, v in m.items() if k not in ("format", "format_version", "files")},
        files={"image_model": "model.onnx"},
    )  # the sha256 now matches the corrupt file


def _edit_manifest(**image):
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        m["image"].update(image)
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


@pytest.mark.parametrize(
    "damage, error, words",
    [
        (_corrupt_onnx, CorruptFileError, "ONNX Runtime cannot load"),
        (_edit_manifest(layout="NHWC"), ManifestError, "layout NHWC"),
        (_edit_manifest(size_px=[100000, 100000]), ManifestError, "size_px"),
        (_edit_manifest(size_px=[64, 64]), ManifestError, "input 'pixel_values' takes"),
        (_edit_manifest(dtype="uint8"), ManifestError, "dtype uint8"),
    ],
    ids=["corrupt-onnx", "layout", "huge-size", "wrong-size", "dtype"],
)
def test_4_broken_encoder_folders_give_one_clear_error(tmp_path, folder, damage, error, words):
    pytest.importorskip("onnx")
    d = write_tiny_embedder(tmp_path / "enc")
    damage(d)
    with pytest.raises(error, match=words):
        Encoder(d)
    r = cli("-q", "memory", "build", folder, "--encoder", d, "-o", tmp_path / "m.rarmem")
    assert r.returncode == 2
    assert r.stderr.startswith("rar-edge: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


# --- row 5: arguments of the wrong kind --------------------------------------------------------------------


def test_5_from_folder_takes_a_model_folder_path_like_classify(enc_dir, encoder, folder):
    by_path = Memory.from_folder(folder, encoder=str(enc_dir), shots=2, progress=False)
    by_obj = Memory.from_folder(folder, encoder=encoder, shots=2, progress=False)
    np.testing.assert_allclose(by_path.vectors, by_obj.vectors, atol=1e-6)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda e, f, m, t: Memory.from_folder(f, encoder=None), "encoder must be an Encoder or a model folder"),
        (lambda e, f, m, t: Memory.from_folder(f, encoder=e, shots="4"), "shots .* must be an integer"),
        (lambda e, f, m, t: Memory.from_folder(f, encoder=e, shots=0), "shots .* must be an integer"),
        (lambda e, f, m, t: classify(np.zeros((8, 8, 3), np.uint8), memory=None), "memory"),
        (lambda e, f, m, t: classify(np.zeros((8, 8, 3), np.uint8), memory=123), "memory must be a Memory or the path"),
        (lambda e, f, m, t: Memory.load(m).save(t), "is a folder; give the path of a file"),
    ],
    ids=["encoder-None", "shots-str", "shots-0", "memory-None", "memory-int", "save-to-folder"],
)
def test_5_wrong_kinds_of_argument_are_named(encoder, folder, mem_path, tmp_path, call, words):
    with pytest.raises(InvalidInputError, match=words) as e:
        call(encoder, folder, mem_path, tmp_path)
    if "give the path of a file" in words:  # the folder the caller gave, not a temporary file beside it
        assert str(tmp_path) in str(e.value) and ".tmp" not in str(e.value)


def test_5_cli_names_a_folder_given_as_output(enc_dir, folder, tmp_path):
    r = cli("-q", "memory", "build", folder, "--encoder", enc_dir, "-o", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"rar-edge: error: {tmp_path} ") and ".tmp" not in r.stderr


# --- row 6: one string is not a list of class names ----------------------------------------------------------


def test_6_from_class_names_refuses_one_string(encoder):
    with pytest.raises(InvalidInputError, match="not one string"):
        Memory.from_class_names("cat", encoder=encoder)


# --- row 7: invalid labelled boxes are counted and named ------------------------------------------------------


def _yolo(root: Path, bad_lines: dict[str, str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("red\ngreen\n")
    for i in range(6):
        name = f"im{i}"
        save_jpeg(root / "images" / f"{name}.jpg", photo(COLOURS["red" if i % 2 else "green"], seed=i, size=(96, 96)))
        lines = [f"{i % 2} 0.5 0.5 0.5 0.5", f"{(i + 1) % 2} 0.25 0.25 0.3 0.3"]
        if name in bad_lines:
            lines.append(bad_lines[name])
        (root / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_7_invalid_label_boxes_are_warned_about_and_counted(enc_dir, tmp_path):
    ds = _yolo(tmp_path / "yolo", {"im0": "0 nan 0.5 0.2 0.2", "im3": "1 0.5 0.5 0 0.2", "im4": "0 0.5 0.5 -0.2 0.2"})
    r = cli("-q", "eval-detect", ds, "--encoder", enc_dir, "--shots", "2", "-k", "2", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["setup"]["invalid_label_boxes"] == 3
    assert "3 labelled boxes in 3 images" in r.stderr and "im0.jpg" in r.stderr
    b = cli("-q", "memory", "build", "--boxes", ds, "--encoder", enc_dir, "-o", tmp_path / "b.rarmem")
    assert b.returncode == 0 and "3 labelled boxes" in b.stderr


# --- row 8: a class with fewer photos than --shots --------------------------------------------------------------


def test_8_short_classes_are_named(enc_dir, tmp_path):
    root = make_folder(tmp_path / "ds", per_class=4)
    for p in sorted((root / "green").glob("*.jpg"))[1:]:
        p.unlink()
    r = cli("-q", "memory", "build", root, "--encoder", enc_dir, "--shots", "4", "-o", tmp_path / "m.rarmem")
    assert r.returncode == 0
    assert "1 of 3 classes have fewer than 4 images" in r.stderr and "green (1)" in r.stderr


# --- row 9: ranker files checked as encoder folders are ---------------------------------------------------------


def _ranker_folder(tmp_path: Path, tiny_gguf: Path, *, mmproj: bool) -> Path:
    d = tmp_path / "ranker"
    d.mkdir(parents=True)
    (d / "lm.gguf").write_bytes(tiny_gguf.read_bytes())
    files = {"language_model": "lm.gguf"}
    if mmproj:
        (d / "mmproj.gguf").write_bytes(b"GGUF placeholder")
        files["mmproj"] = "mmproj.gguf"
    write_manifest(d, {"kind": "mllm", "name": "tiny"}, files=files)
    return d


def test_9_a_truncated_ranker_or_a_missing_mmproj_is_named(tiny_gguf, tmp_path, caplog):
    from rar_edge.rank.ranker import Ranker

    d = _ranker_folder(tmp_path / "a", tiny_gguf, mmproj=False)
    data = (d / "lm.gguf").read_bytes()
    (d / "lm.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="does not match its sha256"):
        Ranker.load(d)
    d2 = _ranker_folder(tmp_path / "b", tiny_gguf, mmproj=True)
    (d2 / "mmproj.gguf").unlink()
    for verify in (True, False):
        with pytest.raises(ManifestError, match="'mmproj' is missing"):
            Ranker.load(d2, verify=verify)
    bare = tmp_path / "half.gguf"
    bare.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.ERROR, logger="rar_edge"):
        with pytest.raises(RankerError, match="could not load the model .*half.gguf.*: .+"):
            Ranker.load(bare)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # the reason is in the error, once
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(RankerError, match="not a GGUF file"):
        Ranker.load(tmp_path / "x.gguf")
    r = cli("-q", "classify", tmp_path / "x.gguf", "--memory", tmp_path / "none", "--ranker", bare)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# --- row 10: export mllm without the index fails fast with the hint -------------------------------------------


def test_10_export_mllm_without_the_index_fails_fast_with_the_hint(tmp_path):
    pytest.importorskip("rar_edge_export")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAR_EDGE_LLAMA_CPP", "PIP_"))}
    env.update({"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path)})
    t0 = time.monotonic()
    r = cli("export", "mllm", hf, "-o", tmp_path / "out", env=env, timeout=120)
    assert r.returncode == 2
    assert time.monotonic() - t0 < 60
    assert "downloading the llama-cpp-python" in r.stderr and "pass --sdist DIR" in r.stderr


# --- row 11: phone photos are not bombs; max_pixels for the rest ---------------------------------------------


def test_11_a_big_jpeg_decoded_at_reduced_scale_is_not_a_bomb(encoder, mem_path, tmp_path):
    big = save_jpeg(tmp_path / "big.jpg", photo(COLOURS["red"], seed=3, size=(1600, 1200)))  # 1.92 MP
    cfg = PipelineConfig(max_pixels=1_000_000)  # a limit the full photo exceeds, its 1/8-scale decode does not
    pipe = Pipeline(memory=mem_path, encoder=encoder, config=cfg)
    assert pipe.classify(big).label == "red"
    from rar_edge.image.codec import decode_rgb, load_image

    with pytest.raises(ImageDecodeError, match="max-pixels"):
        decode_rgb(big, max_pixels=1_000_000)  # a full-size decode is still refused
    with pytest.raises(ImageDecodeError, match="max-pixels"):
        load_image(big.read_bytes(), max_pixels=1_000_000)
    assert load_image(big.read_bytes(), max_pixels=1_000_000, draft_size_px=(SIZE, SIZE)).width <= 400
    png = tmp_path / "big.png"
    Image.fromarray(photo(COLOURS["red"], seed=3, size=(1600, 1200))).save(png)
    with pytest.raises(ImageDecodeError, match="max-pixels"):
        pipe.classify(png)
    assert Pipeline(memory=mem_path, encoder=encoder, config=PipelineConfig(max_pixels=2_000_000)).classify(png)
    r = cli("-q", "classify", png, "--memory", mem_path, "--max-pixels", "1000000", "--json")
    assert r.returncode == 1 and "more than the limit of 1000000" in json.loads(r.stdout)[0]["error"]
    assert cli("-q", "classify", png, "--memory", mem_path, "--max-pixels", "2000000").returncode == 0
    with pytest.raises(InvalidInputError, match="max_pixels"):
        PipelineConfig(max_pixels=0)


# --- row 12: detect says what it skipped, and when there is nothing ---------------------------------------------


def test_12_detect_says_skipped_boxes_and_no_boxes(mem_path, folder, tmp_path):
    img = sorted((folder / "red").glob("*.jpg"))[0]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[0, 0, 30, 20], [10, 10, 10, 30], [5, 5, 40, 40]]))
    r = cli("-q", "detect", img, "--boxes", boxes, "--memory", mem_path, "--on-invalid", "skip")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3
    assert lines[1].startswith("skipped box 1 has zero or negative area")
    j = cli("-q", "detect", img, "--boxes", boxes, "--memory", mem_path, "--on-invalid", "skip", "--json")
    assert [d["index"] for d in json.loads(j.stdout)] == [0, 2] and "skipped box 1" in j.stderr
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    e = cli("-q", "detect", img, "--boxes", empty, "--memory", mem_path)
    assert e.returncode == 0 and e.stdout.strip() == f"no boxes in {empty}"


# --- row 13: class names are Unicode-normalised --------------------------------------------------------------------


def test_13_nfc_and_nfd_names_are_one_class(encoder, tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    mem = Memory.empty(encoder=encoder)
    mem.add(np.eye(DIM, dtype=np.float32)[:2], [nfc, nfd])
    assert mem.classes == (nfc,)
    with pytest.raises(InvalidInputError, match="distinct"):
        Memory.from_class_names([nfc, nfd], encoder=encoder)
    from rar_edge.datasets import read_class_names, read_image_folder

    names = tmp_path / "names.txt"
    names.write_text(f"{nfd}\nthé\n", encoding="utf-8")
    assert read_class_names(names) == [nfc, "thé"]
    names.write_text(f"{nfd}\n{nfc}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="more than once"):
        read_class_names(names)
    for i, form in enumerate((nfc, nfd)):
        save_jpeg(tmp_path / "ds" / form / f"{i}.jpg", photo(COLOURS["red"], seed=i))
    if len(list((tmp_path / "ds").iterdir())) == 2:  # a file system that keeps both spellings apart
        assert list(read_image_folder(tmp_path / "ds")) == [nfc]


# --- row 15: k clamped to the class count ------------------------------------------------------------------------


def test_15_eval_clamps_k_to_the_class_count(enc_dir, folder):
    r = cli("-q", "eval", folder, "--encoder", enc_dir, "--shots", "2", "-k", "1000", "--json", "-")
    res = json.loads(r.stdout)
    assert r.returncode == 0
    assert sorted(res["recall"]) == ["1", "2", "3"] and res["setup"]["k"] == 3 and res["setup"]["k_requested"] == 1000
    assert "-k 1000 is more than the 3 classes" in r.stderr and "recall@3" in r.stderr


# --- row 16: --n-gpu-layers on a CPU-only llama.cpp ----------------------------------------------------------------


def test_16_gpu_layers_on_a_cpu_build_warn(tiny_gguf):
    import llama_cpp

    from rar_edge.encoders import ProviderFallbackWarning
    from rar_edge.rank.ranker import Ranker

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build offloads to a GPU")
    with pytest.warns(ProviderFallbackWarning, match="--n-gpu-layers 99 .* no GPU support"):
        Ranker.load(tiny_gguf, n_gpu_layers=99, n_threads=1, n_ctx=512).close()


# --- row 17: bench --out refuses a folder of other files ------------------------------------------------------------


def test_17_bench_refuses_a_non_empty_folder_that_is_not_a_bench_output(enc_dir, folder, tmp_path):
    before = sorted(p.name for p in (folder / "red").iterdir())
    r = cli(
        "-q",
        "bench",
        "--encoder",
        enc_dir,
        "--images",
        folder,
        "--shots",
        "2",
        "--out",
        folder / "red",
        "--no-plots",
        "--runs",
        "2",
        "--warmup",
        "0",
    )
    assert r.returncode == 2 and "holds other files and no bench.json" in r.stderr
    assert sorted(p.name for p in (folder / "red").iterdir()) == before
    out = tmp_path / "bench"
    for _ in range(2):  # a new folder, then the same folder again (an earlier bench output)
        r = cli(
            "-q",
            "bench",
            "--encoder",
            enc_dir,
            "--images",
            folder,
            "--shots",
            "2",
            "--out",
            out,
            "--no-plots",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--prefetch",
            "0",
        )
        assert r.returncode == 0, r.stderr
    assert (out / "bench.json").is_file()


# --- also: messages in the user's words, --version, help with defaults, JSON keeps names readable -------------------


def test_also_cli_words_version_and_readable_json(mem_path, folder, enc_dir, tmp_path):
    r = cli("classify", "x.jpg", "--memory", mem_path, "--threads", "0")
    assert r.returncode == 2 and "argument --threads: must be >= 1, got 0" in r.stderr
    v = cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("rar-edge ")
    h = " ".join(cli("classify", "--help").stdout.split())
    assert "(default: 5)" in h and "(default: skip)" in h
    root = tmp_path / "ds"
    for i in range(2):
        save_jpeg(root / "café" / f"{i}.jpg", photo(COLOURS["red"], seed=i))
        save_jpeg(root / "thé" / f"{i}.jpg", photo(COLOURS["green"], seed=i))
    m = tmp_path / "m.rarmem"
    assert cli("-q", "memory", "build", root, "--encoder", enc_dir, "-o", m).returncode == 0
    j = cli("-q", "classify", root / "café" / "0.jpg", "--memory", m, "--json")
    assert '"label": "café"' in j.stdout
    f = cli("-q", "finetune-data", folder, "--encoder", enc_dir, "-k", "2", "-o", tmp_path / "rows.jsonl", "--json")
    assert f.returncode == 0, f.stderr
    assert json.loads(f.stdout)["rows"] == len((tmp_path / "rows.jsonl").read_text().splitlines()) > 0


def test_also_every_option_has_help():
    import argparse

    from rar_edge.tools.cli import build_parser

    missing = []

    def walk(p, name):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sp in a.choices.items():
                    walk(sp, f"{name} {n}")
            elif not a.help and not isinstance(a, argparse._HelpAction):
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), "rar-edge")
    mine = (
        "rar-edge classify ",
        "rar-edge detect",
        "rar-edge eval",
        "rar-edge bench",
        "rar-edge finetune-data",
        "rar-edge memory build",
        "rar-edge memory info",
        "rar-edge demo",
        "rar-edge -",
        "rar-edge export mllm",
    )
    assert not [m for m in missing if m.startswith(mine)], missing
