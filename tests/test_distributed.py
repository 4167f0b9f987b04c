"""Ray Data memory building and batch labelling (rar_edge.tools.distributed / batch).

One local Ray (2 CPUs) serves the whole module; its teardown checks that every process it started is gone.
The Ray builds must equal the local ones entry for entry; batch labelling must give one row per image, a
corrupt file being a row with its error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rar_edge.encoders import Encoder
from rar_edge.errors import ImageDecodeError, InvalidInputError, MissingDependencyError
from rar_edge.index.memory import Memory
from rar_edge.pipeline import Pipeline, PipelineConfig
from rar_edge.types import Ranking

from conftest import flower_photos, shared_file
from stub_ranker import StubRanker

pq = pytest.importorskip("pyarrow.parquet")


def _parents() -> dict[int, int]:
    """The parent of every live process (from /proc); zombies (exited, not yet reaped) are left out."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":  # a zombie has exited; only its parent's wait is missing
                out[int(d)] = int(fields[1])
    return out


def _descendants(pid: int) -> set[int]:
    ppid = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in ppid.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs for this module; afterwards no process it started may be left."""
    ray = pytest.importorskip("ray")
    if not sys.platform.startswith("linux"):
        pytest.skip("the stray-process check reads /proc")
    before = _descendants(os.getpid())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    started = _descendants(os.getpid()) - before
    assert started, "ray.init started no processes of its own"
    yield ray
    ours = _descendants(os.getpid()) - before  # GCS, raylet, workers and actors, and whatever they started
    ray.shutdown()

    def left() -> set[int]:  # ours still alive wherever they were reparented, or new children of this process
        return (set(_parents()) & ours) | (_descendants(os.getpid()) - before)

    deadline = time.monotonic() + 30  # processes told to stop take a moment to exit
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), f"Ray left processes behind after shutdown: {sorted(left())}"


@pytest.fixture(scope="module")
def encoder(mobilenet_onnx: Path) -> Encoder:
    return Encoder(mobilenet_onnx)


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 4 real flower photos, linked into a class-per-folder tree."""
    root = tmp_path_factory.mktemp("flowers")
    for p in flower_photos(classes=3, per_class=4):
        (root / p.parent.name).mkdir(exist_ok=True)
        (root / p.parent.name / p.name).symlink_to(p)
    return root


def _same_memory(a: Memory, b: Memory) -> None:
    assert a.size == b.size > 0
    assert a.labels == b.labels
    assert a.sources == b.sources
    assert np.array_equal(a.ids, b.ids)
    assert a.encoder == b.encoder
    assert float(np.abs(a.vectors - b.vectors).max()) <= 1e-5


def test_folder_build_equals_local(ray_cluster, encoder, flowers):
    from rar_edge.tools.distributed import RayOptions, build_memory

    local = Memory.from_folder(flowers, encoder=encoder, shots=2, seed=3)
    remote = build_memory(flowers, encoder=encoder, shots=2, seed=3, options=RayOptions(concurrency=2, batch_size=2))
    _same_memory(local, remote)
    assert remote.size == 6


def test_box_build_equals_local(ray_cluster, encoder, tmp_path):
    from rar_edge.index.build import memory_from_boxes
    from rar_edge.tools.distributed import RayOptions, build_memory

    coco = shared_file("data/coco128")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    shutil.copy(coco / "classes.txt", tmp_path / "classes.txt")
    for img in sorted((coco / "images").glob("*.jpg"))[:6]:
        (tmp_path / "images" / img.name).symlink_to(img)
        lab = coco / "labels" / (img.stem + ".txt")
        if lab.is_file():
            shutil.copy(lab, tmp_path / "labels" / lab.name)
    local = memory_from_boxes(tmp_path, encoder=encoder, shots=2, seed=1)
    remote = build_memory(boxes=tmp_path, encoder=encoder, shots=2, seed=1, options=RayOptions(batch_size=2))
    _same_memory(local, remote)
    assert all("#box" in s for s in remote.sources)


def test_zero_shot_build_equals_local(ray_cluster, tiny_clip_onnx):
    from rar_edge.tools.distributed import RayOptions, build_memory

    enc = Encoder(tiny_clip_onnx)
    names = ["cat", "dog", "red fox", "traffic light", "bicycle"]
    local = Memory.from_class_names(names, encoder=enc)
    remote = build_memory(classes=names, encoder=enc, options=RayOptions(batch_size=2))
    _same_memory(local, remote)
    assert remote.sources[2] == "text:red fox"


def test_a_corrupt_image_stops_or_is_skipped_as_locally(ray_cluster, encoder, flowers, tmp_path, caplog):
    from rar_edge.tools.distributed import build_memory

    shutil.copytree(flowers, tmp_path / "f", symlinks=True)
    bad = tmp_path / "f" / sorted(os.listdir(flowers))[0] / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageDecodeError, match="zz_broken.jpg"):
        Memory.from_folder(tmp_path / "f", encoder=encoder)  # on_error="stop", the API's default
    with pytest.raises(ImageDecodeError, match="zz_broken.jpg"):
        build_memory(tmp_path / "f", encoder=encoder)
    local = Memory.from_folder(tmp_path / "f", encoder=encoder, on_error="skip")
    with caplog.at_level("WARNING", logger="rar_edge"):
        remote = build_memory(tmp_path / "f", encoder=encoder, on_error="skip")
    _same_memory(local, remote)
    assert remote.size == 12 and str(bad) not in remote.sources
    assert any("zz_broken.jpg" in r.getMessage() for r in caplog.records)


def _batch_src(flowers: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    src = tmp_path / "src"
    shutil.copytree(flowers, src, symlinks=True)
    (src / "bluebell_broken.jpg").write_bytes((next(flowers.rglob("*.jpg"))).read_bytes()[:2000])
    good = sorted(str(p) for p in src.rglob("*.jpg") if p.name != "bluebell_broken.jpg")
    return src, good


def test_cli_joins_the_cluster_builds_and_labels(ray_cluster, encoder, flowers, tmp_path, run_cli):
    """The command joins the running Ray (--ray-address): same memory as a local build; classify-batch writes a
    row per image, the corrupt one with its error, the same rows as the local engine and as Pipeline.classify."""
    from rar_edge.tools.batch import BatchConfig, classify_batch

    address = ray_cluster.get_runtime_context().gcs_address
    local, remote = tmp_path / "local.rarmem", tmp_path / "ray.rarmem"
    Memory.from_folder(flowers, encoder=encoder, shots=2, seed=0).save(local)
    run_cli(
        "memory",
        "build",
        flowers,
        "--encoder",
        encoder.path,
        "--shots",
        2,
        "--seed",
        0,
        "-o",
        remote,
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--ray-concurrency",
        2,
        "--ray-batch-size",
        2,
    )
    _same_memory(Memory.load(local), Memory.load(remote))

    src, good = _batch_src(flowers, tmp_path)
    out_local, out_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    res = classify_batch(src, memory=local, output=out_local, config=BatchConfig(k=3))
    assert (res.rows, res.errors) == (len(good) + 1, 1)
    printed = run_cli(
        "classify-batch",
        src,
        "--memory",
        local,
        "-k",
        3,
        "-o",
        out_ray,
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--ray-concurrency",
        2,
        "--ray-batch-size",
        3,
    )
    assert "13 rows, 1 with an error" in printed
    assert out_ray.is_dir()  # Parquet shards
    a, b = pq.read_table(out_local), pq.read_table(out_ray)
    assert a.num_rows == b.num_rows == len(good) + 1
    assert a.schema == b.schema
    assert a.drop(["scores", "score"]).to_pylist() == b.drop(["scores", "score"]).to_pylist()
    np.testing.assert_allclose(
        b.column("score").to_numpy(zero_copy_only=False).astype(float),
        a.column("score").to_numpy(zero_copy_only=False).astype(float),
        atol=1e-6,
    )
    rows = {r["path"]: r for r in b.to_pylist()}
    broken = rows.pop(str(src / "bluebell_broken.jpg"))
    assert broken["label"] is None and "ImageDecodeError" in broken["error"]
    assert sorted(rows) == good
    pipe = Pipeline(memory=local, config=PipelineConfig(k=3))
    for path, row in rows.items():
        r = pipe.classify(path)
        assert row["error"] is None
        assert row["label"] == r.label and row["labels"] == [c.label for c in r.retrieved]
        assert row["scores"] == pytest.approx([c.score for c in r.retrieved], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight text GGUF: a real llama.cpp ranker that ranks from the names alone."""
    pytest.importorskip("llama_cpp")
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    return write_tiny_text_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", seed=0)


def test_ray_rows_with_a_ranker_equal_local_and_the_output_is_not_overwritten_unasked(
    ray_cluster, encoder, flowers, tiny_gguf, tmp_path
):
    from rar_edge.errors import InvalidInputError
    from rar_edge.tools.batch import BatchConfig, classify_batch

    Memory.from_folder(flowers, encoder=encoder, shots=1).save(tmp_path / "m.rarmem")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(flowers.rglob("*.jpg"))[::4]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"x")
    kw = {"memory": tmp_path / "m.rarmem", "ranker": tiny_gguf, "config": BatchConfig(k=3)}
    with pytest.raises(InvalidInputError, match="--overwrite"):
        classify_batch(listing, output=out, engine="ray", **kw)
    res = classify_batch(listing, output=out, engine="ray", overwrite=True, **kw)
    assert (res.rows, res.errors) == (3, 0)
    assert not (out / "old.parquet").exists()
    classify_batch(listing, output=tmp_path / "local.parquet", **kw)
    rows, local = pq.read_table(out).to_pylist(), pq.read_table(tmp_path / "local.parquet").to_pylist()
    assert all(r["ranker_ran"] and sorted(r["ranked"]) == sorted(r["labels"]) for r in rows)
    assert [(r["path"], r["ranked"]) for r in rows] == [(r["path"], r["ranked"]) for r in local]


def test_a_shipped_model_folder_reaches_an_actor_without_the_path(ray_cluster, encoder, tmp_path):
    from rar_edge.tools.distributed import folder_files, materialise

    missing = str(tmp_path / "not_on_this_node")
    ref = [ray_cluster.put(folder_files(encoder.path))]
    got = materialise(missing, ref, marker="manifest.json")
    assert materialise(missing, ref, marker="manifest.json") == got  # one copy per node and content
    assert Encoder(got).fingerprint == encoder.fingerprint
    assert materialise(str(encoder.path), ref, marker="manifest.json") == str(encoder.path)  # the path wins
    with pytest.raises(InvalidInputError, match="does not exist on this node"):
        materialise(missing, None, marker="manifest.json")


def test_actors_reserve_a_gpu_with_the_cuda_provider(ray_cluster):
    from rar_edge.tools.distributed import RayOptions, actor_resources

    assert actor_resources(RayOptions(concurrency=3), "cuda")["num_gpus"] == 1.0
    assert "num_gpus" not in actor_resources(RayOptions(), "cpu")
    assert actor_resources(RayOptions(num_gpus_per_actor=0.25), "cuda")["num_gpus"] == 0.25
    pool = actor_resources(RayOptions(concurrency=3), "cpu")["compute"]
    assert (pool.min_size, pool.max_size) == (3, 3)


def test_local_batch_reads_a_list_of_paths_and_uris(encoder, flowers, tmp_path, monkeypatch):
    from rar_edge.tools.batch import classify_batch

    mem = Memory.from_folder(flowers, encoder=encoder, shots=1)
    mem.save(tmp_path / "m.rarmem")
    photos = sorted(flowers.rglob("*.jpg"))[:3]
    monkeypatch.chdir(flowers)
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# three photos\n{photos[0].relative_to(flowers)}\n\nfile://{photos[1]}\n{photos[2]}\n"
        f"{tmp_path / 'missing.jpg'}\n"
    )
    res = classify_batch(listing, memory=tmp_path / "m.rarmem", output=tmp_path / "o.parquet")
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert (res.rows, res.errors) == (4, 1)
    assert [r["path"] for r in rows] == [
        str(photos[0].relative_to(flowers)),
        f"file://{photos[1]}",
        str(photos[2]),
        str(tmp_path / "missing.jpg"),
    ]
    pipe = Pipeline(memory=mem, encoder=encoder)
    assert [r["label"] for r in rows[:3]] == [pipe.classify(p).label for p in photos]
    assert "missing.jpg" in rows[3]["error"]
    with pytest.raises(InvalidInputError, match="--overwrite"):
        classify_batch(listing, memory=tmp_path / "m.rarmem", output=tmp_path / "o.parquet")
    assert (
        classify_batch(photos[0], memory=tmp_path / "m.rarmem", output=tmp_path / "o.parquet", overwrite=True).rows == 1
    )


def test_rows_carry_the_rankers_answer(encoder, flowers):
    from rar_edge.tools.batch import classify_rows, rows_table

    class Reverse(StubRanker):
        def rank(self, image, candidates):
            names = list(candidates)[::-1]
            return Ranking(tuple(names), tuple(1.0 / len(names) for _ in names))

    mem = Memory.from_folder(flowers, encoder=encoder, shots=1)
    pipe = Pipeline(memory=mem, encoder=encoder, ranker=Reverse(), config=PipelineConfig(k=3))
    photo = str(next(flowers.rglob("*.jpg")))
    row = rows_table(list(classify_rows(pipe, [photo]))).to_pylist()[0]
    assert row["ranker_ran"] is True
    assert row["ranked"] == row["labels"][::-1]
    assert row["label"] == row["labels"][-1] != row["labels"][0]


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from rar_edge.tools.distributed import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"rar-edge\[ray\]"):
        import_ray()


def test_the_cli_names_the_extra_without_ray(tmp_path, mobilenet_onnx, flowers):
    """A fresh interpreter where `import ray` fails: the command exits 2 with the install hint."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rar_edge",
            "-q",
            "memory",
            "build",
            str(flowers),
            "--encoder",
            str(mobilenet_onnx),
            "-o",
            str(tmp_path / "m.rarmem"),
            "--engine",
            "ray",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    assert "rar-edge[ray]" in out.stderr
    assert not (tmp_path / "m.rarmem").exists()
