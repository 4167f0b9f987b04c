"""classify() end to end on the real MobileNet embedder (exported by the project's own tflite path)."""

import dataclasses
import io
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import rar_edge
from rar_edge import Encoder, EncoderConfig, Memory, Pipeline, PipelineConfig
from rar_edge.errors import EmptyMemoryError, ImageDecodeError, InvalidInputError, MemoryMismatchError
from rar_edge.types import Ranking

from conftest import linked_flowers
from stub_ranker import StubRanker


@pytest.fixture(scope="module")
def flowers_subset(tmp_path_factory):
    """4 classes x 10 photos of Oxford Flowers (symlinks), small enough for quick end-to-end tests."""
    return linked_flowers(tmp_path_factory.mktemp("flowers_subset"), ["daisy", "sunflower", "tulip", "snowdrop"], 10)


@pytest.fixture(scope="module")
def encoder(mobilenet_onnx):
    return Encoder(mobilenet_onnx, config=EncoderConfig(threads=1))


@pytest.fixture(scope="module")
def memory(encoder, flowers_subset):
    return Memory.from_folder(flowers_subset, encoder=encoder, shots=4, seed=0)


def test_classify_accepts_every_input_kind_and_agrees(encoder, memory, flowers_subset):
    path = sorted((flowers_subset / "daisy").iterdir())[-1]
    pipe = Pipeline(memory=memory, encoder=encoder)
    data = path.read_bytes()
    results = [
        pipe.classify(path),
        pipe.classify(str(path)),
        pipe.classify(data),
        pipe.classify(Image.open(io.BytesIO(data))),
    ]
    labels = {r.label for r in results}
    assert len(labels) == 1
    r = results[0]
    assert r.label == r.candidates[0].label and r.label in memory.classes
    assert len(r.candidates) == 4 and len({c.label for c in r.candidates}) == 4  # k=5 > 4 classes
    assert r.candidates == r.retrieved and not r.ranker_ran
    assert set(r.timings_ms) == {"decode", "preprocess", "encode", "search", "total"}
    assert r.timings_ms["total"] >= r.timings_ms["encode"] > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.label = "x"  # type: ignore[misc]
    # an array input (full-resolution decode) lands on the same class for a clear photo
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert pipe.classify(arr).label == r.label


def test_few_shot_accuracy_on_held_out_photos(encoder, memory, flowers_subset):
    from rar_edge.datasets import few_shot_split

    split = few_shot_split(flowers_subset, shots=4, seed=0)
    pipe = Pipeline(memory=memory, encoder=encoder, config=PipelineConfig(k=2))
    hits = [pipe.classify(p).label == c for p, c in split.queries]
    assert len(hits) == 24
    assert np.mean(hits) >= 0.7  # 4 visually distinct flowers; retrieval with a real embedder


def test_seeded_shots_are_a_random_sample_not_the_first_files(flowers_subset):
    from rar_edge.datasets import few_shot_split

    a = few_shot_split(flowers_subset, shots=3, seed=0).support
    b = few_shot_split(flowers_subset, shots=3, seed=0).support
    c = few_shot_split(flowers_subset, shots=3, seed=1).support
    assert a == b and a != c
    firsts = {cls: sorted((flowers_subset / cls).iterdir())[:3] for cls in a}
    assert a != firsts


def test_streamed_classify_matches_one_at_a_time_and_keeps_order(encoder, memory, flowers_subset):
    paths = [p for cls in ("daisy", "tulip", "sunflower") for p in sorted((flowers_subset / cls).iterdir())[-3:]]
    pipe = Pipeline(memory=memory, encoder=encoder)
    one = [pipe.classify(p) for p in paths]
    for prefetch in (0, 1, 3):
        got = pipe.classify_many(iter(paths), prefetch=prefetch)  # any iterable, read lazily
        assert [r.candidates for r in got] == [r.candidates for r in one], prefetch
        for r in got:
            assert r.timings_ms["total"] >= r.timings_ms["encode"] > 0
            assert ("wait" in r.timings_ms) == (prefetch > 0)
    with pytest.raises(InvalidInputError):
        pipe.classify_many(paths, prefetch=-1)


def test_streamed_classify_raises_a_bad_image_in_its_turn_and_stops_cleanly(encoder, memory, flowers_subset):
    good = sorted((flowers_subset / "daisy").iterdir())[-2:]
    pipe = Pipeline(memory=memory, encoder=encoder)
    it = pipe.iter_classify([good[0], b"\xff\xd8\xff\xe0 not really a jpeg", good[1]], prefetch=2)
    assert next(it).label in memory.classes  # the image before the bad one comes out first
    with pytest.raises(ImageDecodeError):
        next(it)
    # Leaving a stream early joins its worker: nothing keeps running.
    stream = pipe.iter_classify(good * 5, prefetch=2)
    next(stream)
    stream.close()
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("rar_edge-prefetch")]


def test_encoder_without_spinning_threads_gives_the_same_embeddings(encoder, mobilenet_onnx, flowers_subset):
    pixels = np.stack([encoder.preprocess(encoder.decode(p)) for p in sorted((flowers_subset / "tulip").iterdir())[:3]])
    calm = Encoder(mobilenet_onnx, config=EncoderConfig(threads=2, allow_spinning=False))
    np.testing.assert_allclose(calm.embed_pixels(pixels), encoder.embed_pixels(pixels), atol=1e-6)


def test_encoder_beside_a_ranker_does_not_spin_unless_asked(mobilenet_onnx, memory):
    class Ranker(StubRanker):
        def rank(self, image, candidates):
            return Ranking(tuple(candidates), tuple(0.0 for _ in candidates))

    assert Pipeline(memory=memory, encoder=mobilenet_onnx).encoder.config.allow_spinning is None  # ORT's default
    assert Pipeline(memory=memory, encoder=mobilenet_onnx, ranker=Ranker()).encoder.config.allow_spinning is False
    asked = PipelineConfig(encoder=EncoderConfig(allow_spinning=True))
    assert (
        Pipeline(memory=memory, encoder=mobilenet_onnx, ranker=Ranker(), config=asked).encoder.config.allow_spinning
        is True
    )
    # an Encoder object made without a ranker in mind (as `rar-edge eval --ranker` makes one) is reopened quietly
    lone = Encoder(mobilenet_onnx, config=EncoderConfig(threads=1))
    beside = Pipeline(memory=memory, encoder=lone, ranker=Ranker()).encoder
    assert beside.config.allow_spinning is False and beside.config.threads == 1 and lone.config.allow_spinning is None
    mine = Encoder(mobilenet_onnx, config=EncoderConfig(allow_spinning=True))  # asked for: kept as it is
    assert Pipeline(memory=memory, encoder=mine, ranker=Ranker()).encoder is mine


def test_bad_images_and_empty_memory(encoder, memory):
    pipe = Pipeline(memory=memory, encoder=encoder)
    with pytest.raises(ImageDecodeError):
        pipe.classify(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = Memory.empty(encoder=encoder)
    with pytest.raises(EmptyMemoryError):
        Pipeline(memory=empty, encoder=encoder).classify(np.zeros((50, 50, 3), np.uint8))


def test_memory_from_another_encoder_is_refused(encoder, tiny_clip_onnx):
    other = Encoder(tiny_clip_onnx)
    mem = Memory.from_class_names(["cat", "dog"], encoder=other)
    with pytest.raises(MemoryMismatchError):
        Pipeline(memory=mem, encoder=encoder)


def test_memory_refuses_the_same_model_with_other_preprocessing(encoder, memory, mobilenet_onnx, tmp_path, monkeypatch):
    """Same weights, another resize in manifest.json: the vectors would differ, so the memory says no."""
    import shutil
    import zipfile

    changed = tmp_path / "enc"
    shutil.copytree(mobilenet_onnx, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["image"]["resample"] = "nearest"
    (changed / "manifest.json").write_text(json.dumps(manifest))
    other = Encoder(changed, config=EncoderConfig(threads=1))
    assert other.fingerprint == encoder.fingerprint and other.preprocess_fingerprint != encoder.preprocess_fingerprint
    with pytest.raises(MemoryMismatchError, match="other preprocessing"):
        memory.check_encoder(other)
    # so does a memory whose images another rar_edge decoded differently (a DECODE_VERSION bump)
    import rar_edge.manifest as mf

    monkeypatch.setattr(mf, "DECODE_VERSION", mf.DECODE_VERSION + 1)
    with pytest.raises(MemoryMismatchError, match="image decoding of another rar_edge version"):
        memory.check_encoder(encoder)
    monkeypatch.undo()
    memory.check_encoder(encoder)
    # a memory saved before the settings were recorded still opens with either encoder
    path = memory.save(tmp_path / "m.rarmem")
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(members["meta.json"])
    del meta["encoder"]["preprocess_fingerprint"]
    members["meta.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    assert Memory.load(path, encoder=other).encoder.preprocess_fingerprint is None
    assert Memory.load(memory.save(tmp_path / "new.rarmem"), encoder=encoder).encoder.preprocess_fingerprint


class _ReverseRanker(StubRanker):
    """A stand-in ranker: reverses the retrieval order (checks the pipeline's wiring, not a model)."""

    def __init__(self):
        self.calls = 0

    def rank(self, image, candidates):
        self.calls += 1
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        labels = tuple(reversed(candidates))
        return Ranking(labels=labels, scores=tuple(np.linspace(0.5, 0.1, len(labels))))


class _BrokenRanker(StubRanker):
    def rank(self, image, candidates):
        return Ranking(labels=("not a candidate",) + tuple(candidates[1:]), scores=(1.0,) * len(candidates))


def test_ranker_wiring_gate_and_refusal_of_out_of_list_answers(encoder, memory, flowers_subset):
    path = sorted((flowers_subset / "tulip").iterdir())[-1]
    rr = _ReverseRanker()
    r = Pipeline(memory=memory, encoder=encoder, ranker=rr, config=PipelineConfig(k=3)).classify(path)
    assert r.ranker_ran and rr.calls == 1
    assert [c.label for c in r.candidates] == [c.label for c in reversed(r.retrieved)]
    assert r.label == r.retrieved[-1].label and "rank" in r.timings_ms
    gated = Pipeline(memory=memory, encoder=encoder, ranker=rr, config=PipelineConfig(k=3, gate_margin=0.0))
    g = gated.classify(path)
    assert not g.ranker_ran and rr.calls == 1 and g.label == g.retrieved[0].label
    b = Pipeline(memory=memory, encoder=encoder, ranker=_BrokenRanker(), config=PipelineConfig(k=3)).classify(path)
    assert b.ranker_fallback and b.label == b.retrieved[0].label


def test_module_level_classify_caches_the_pipeline(encoder, memory, flowers_subset, tmp_path):
    p = memory.save(tmp_path / "m.rarmem")
    img = sorted((flowers_subset / "snowdrop").iterdir())[-1]
    a = rar_edge.classify(img, memory=p, encoder=encoder, k=3)
    from rar_edge.pipeline import _CACHE

    n = len(_CACHE)
    b = rar_edge.classify(img, memory=p, encoder=encoder, k=3)
    assert len(_CACHE) == n and a.label == b.label
    # the memory records its encoder's folder, so no encoder argument is needed
    assert rar_edge.classify(img, memory=p, k=3).label == a.label


def test_requested_gpu_that_falls_back_is_visible(mobilenet_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is available here; the fallback cannot be provoked")
    with pytest.warns(rar_edge.ProviderFallbackWarning, match="cuda"):
        enc = Encoder(mobilenet_onnx, config=EncoderConfig(provider="cuda"))
    assert enc.providers["image"] == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Encoder(mobilenet_onnx, config=EncoderConfig(provider="cpu"))
    # the command line says it once, as one line
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rar_edge",
            "-q",
            "memory",
            "build",
            "--classes",
            "/nonexistent",
            "--encoder",
            str(mobilenet_onnx),
            "--provider",
            "cuda",
            "-o",
            "/nonexistent/m",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in out.stderr.splitlines() if "CUDAExecutionProvider" in ln]
    assert len(lines) == 1 and lines[0].startswith("rar-edge: warning: requested provider 'cuda'"), out.stderr


def test_zero_shot_memory_classifies_into_one_of_the_names(tiny_clip_onnx, tmp_path):
    enc = Encoder(tiny_clip_onnx)
    names = ["tabby cat", "golden retriever", "airliner", "pizza"]
    mem = Memory.from_class_names(names, encoder=enc)
    assert mem.size == 4 and mem.classes == tuple(names)
    rng = np.random.default_rng(0)
    for _ in range(3):
        r = Pipeline(memory=mem, encoder=enc, config=PipelineConfig(k=3)).classify(
            rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)
        )
        assert r.label in names and len(r.candidates) == 3


def test_cli_build_info_classify_and_eval(mobilenet_onnx, flowers_subset, tmp_path, run_cli):
    mem = tmp_path / "flowers.rarmem"
    run = run_cli
    run("memory", "build", flowers_subset, "--encoder", mobilenet_onnx, "--shots", 4, "--seed", 0, "-o", mem)
    info = json.loads(run("memory", "info", mem, "--json"))
    assert info["n_entries"] == 16 and info["n_classes"] == 4
    assert info["encoder"]["path"] == str(mobilenet_onnx.resolve())
    img = sorted((flowers_subset / "sunflower").iterdir())[-1]
    (res,) = json.loads(run("classify", img, "--memory", mem, "-k", 3, "--json"))  # a list even for one image
    assert res["label"] in info["entries_per_class"] and len(res["candidates"]) == 3
    ev = tmp_path / "eval.json"
    run(
        "eval",
        flowers_subset,
        "--encoder",
        mobilenet_onnx,
        "--shots",
        4,
        "--seed",
        0,
        "-k",
        3,
        "--json",
        ev,
        "--backend",
        "hnsw",
        "--hnsw-m",
        4,
        "--ef-construction",
        9,
        "--ef",
        7,
    )
    d = json.loads(ev.read_text())
    assert d["n_queries"] == 24 and set(d["recall"]) == {"1", "2", "3"}
    assert 0 <= d["top1"] <= d["recall"]["3"] <= 1
    assert {"decode", "preprocess", "wait", "encode", "search", "total"} <= set(d["latency_ms"])
    # the HNSW options reach the memory (they were listed in --help and ignored)
    assert d["setup"]["backend"] == "hnsw" and d["setup"]["hnsw"] == {"M": 4, "ef_construction": 9, "ef": 7}
    assert {"p50", "p95"} <= set(d["latency_ms"]["total"])
    # a damaged memory file is refused with a clear message and a non-zero exit
    bad = tmp_path / "bad.rarmem"
    bad.write_bytes(mem.read_bytes()[:500])
    out = subprocess.run(
        [sys.executable, "-m", "rar_edge", "classify", img, "--memory", bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "rar-edge: error:" in out.stderr and "Traceback" not in out.stderr


def test_classify_many_refuses_a_single_image(encoder, memory, flowers_subset):
    """One image where a list is expected would be iterated row by row (an array) or char by char (a path)."""
    path = sorted((flowers_subset / "daisy").iterdir())[0]
    pipe = Pipeline(memory=memory, encoder=encoder)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
        for single in (arr, str(path), path, path.read_bytes(), im):
            with pytest.raises(InvalidInputError, match="for one image use classify"):
                pipe.classify_many(single)
    assert len(pipe.classify_many(arr[None])) == 1  # a batch array (N, H, W, 3) is a sequence of images


class _SizedRanker(StubRanker):
    """Records the image it is shown; ``image_size_px`` says how large its vision tower wants it."""

    def __init__(self, size):
        self.image_size_px = size
        self.shapes = []

    def rank(self, image, candidates):
        self.shapes.append(image.shape)
        return Ranking(labels=tuple(candidates), scores=tuple(np.linspace(0.5, 0.1, len(candidates))))


def test_the_ranker_sees_the_photo_at_its_own_size(encoder, memory, flowers_subset):
    """The encoder's JPEG decode stops at the DCT scale that covers 224 px; a ranker asking for 512 px
    gets the photo decoded again at its own size (full size here), one asking for 0 the encoder's decode."""
    path = sorted((flowers_subset / "daisy").iterdir())[0]
    with Image.open(path) as im:
        full = (im.height, im.width, 3)
    small = Pipeline(memory=memory, encoder=encoder).encoder.decode(path).shape
    assert min(small[:2]) < 512 and small != full
    for size, want in ((512, full), (None, full), (0, small), (200, small)):
        r = _SizedRanker(size)
        pipe = Pipeline(memory=memory, encoder=encoder, ranker=r)
        pipe.classify(path)
        pipe.classify_many([path.read_bytes()])
        assert r.shapes == [want, want], size


def test_the_pipeline_cache_leaves_a_ranker_passed_in_open(encoder, flowers_subset, tmp_path):
    """rar_edge.classify caches pipelines and closes the ones it evicts: not the caller's ranker object."""
    import rar_edge.pipeline as pl

    class _Ranker(_ReverseRanker):
        closed = False

        def close(self):
            self.closed = True

    mine = _Ranker()
    path = sorted((flowers_subset / "daisy").iterdir())[0]
    memories = [Memory.from_folder(flowers_subset, encoder=encoder, shots=1, seed=s) for s in range(pl._CACHE_SIZE + 1)]
    for mem in memories:  # more pipelines than the cache keeps: the first is evicted and closed
        rar_edge.classify(path, memory=mem, encoder=encoder, ranker=mine)
    assert not mine.closed and mine.calls == len(memories)
    pl._CACHE.clear()
    owned = Pipeline(memory=memories[0], encoder=encoder, ranker=mine)
    owned.close()
    assert not mine.closed  # a Pipeline closes only a ranker it loaded from a path itself


def test_eval_reports_the_ranker_even_when_the_gate_kept_it_idle(encoder, flowers_subset):
    from rar_edge.tools.evaluate import evaluate_classification

    for gate, ran in ((0.0, 0.0), (None, 1.0)):  # margin >= 0 always: the ranker never runs; no gate: always
        res = evaluate_classification(
            flowers_subset,
            encoder=encoder,
            shots=8,
            seed=0,
            k=3,
            ranker=_ReverseRanker(),
            config=PipelineConfig(k=3, gate_margin=gate),
        )
        assert res["ranker_ran_rate"] == ran and res["setup"]["gate_margin"] == gate
        # the ranker's own top-1 covers the queries it ordered: none behind the gate, all without one
        assert res["ranked_top1"] == (None if ran == 0.0 else res["top1"])
        assert res["ranker_changed_rate"] == ran  # the stub reverses the candidates whenever it runs


def test_the_pipeline_cache_shares_loads_and_never_closes_a_pipeline_in_use(encoder, memory, monkeypatch):
    """Threads asking for the same models at once share one load, and a pipeline pushed out of the cache is
    not closed under a thread that was just handed it (it raised 'the ranker is closed')."""
    import threading
    import time as _time

    import rar_edge.pipeline as pl

    built, closed = [], []

    class Slow(pl.Pipeline):
        def __init__(self, **kw):
            _time.sleep(0.2)  # a model load: long enough for the other threads to ask meanwhile
            super().__init__(**kw)
            built.append(self)

        def close(self):
            closed.append(self)
            super().close()

    monkeypatch.setattr(pl, "Pipeline", Slow)
    pl._CACHE.clear()
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(pl.get_pipeline(memory=memory, encoder=encoder))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and all(p is built[0] for p in got)
    first = got[0]
    for i in range(pl._CACHE_SIZE):  # push it out
        pl.get_pipeline(memory=memory, encoder=encoder, config=PipelineConfig(k=i + 1))
    assert first not in pl._CACHE.values() and not closed
    pl._CACHE.clear()
