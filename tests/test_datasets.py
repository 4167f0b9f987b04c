import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rar_edge.datasets import few_shot_split, read_class_names, read_image_folder, read_yolo_dataset
from rar_edge.errors import DatasetError


def _img(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)


def test_empty_folder_and_empty_class_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        read_image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        read_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    _img(tmp_path / "cat" / "a.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="dog"):
        read_image_folder(tmp_path)


def test_few_shot_split_uses_every_image_once(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            _img(tmp_path / c / f"{i}.png", seed=i)
    split = few_shot_split(tmp_path, shots=2, seed=3)
    support = [p for ps in split.support.values() for p in ps]
    queries = [p for p, _ in split.queries]
    assert len(support) == 4 and len(queries) == 6 and not set(support) & set(queries)
    assert few_shot_split(tmp_path, shots=9, seed=0).queries == []  # more shots than images: all in memory
    with pytest.raises(DatasetError):
        few_shot_split(tmp_path, shots=0)


def test_class_names_file_with_a_byte_order_mark(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_bytes("\ufeffcat\n # c\n\ndog \n".encode("utf-8"))  # as Windows Notepad saves it
    assert read_class_names(p) == ["cat", "dog"]


def test_class_names_file(tmp_path):
    p = tmp_path / "names.txt"
    p.write_text("# comment\ncat\n\ndog\n")
    assert read_class_names(p) == ["cat", "dog"]
    p.write_text("cat\ncat\n")
    with pytest.raises(DatasetError, match="more than once"):
        read_class_names(p)
    p.write_text("\n")
    with pytest.raises(DatasetError, match="no class names"):
        read_class_names(p)


def test_yolo_labels_are_validated(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    _img(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    names, images = read_yolo_dataset(tmp_path)
    assert names == ["cat", "dog"] and images[0].labels == ("dog",)
    np.testing.assert_allclose(images[0].boxes, [[7.5, 5.0, 22.5, 15.0]])
    (tmp_path / "labels" / "x.txt").write_text("7 0.5 0.5 0.5 0.5\n")
    with pytest.raises(DatasetError, match="class 7"):
        read_yolo_dataset(tmp_path)
    (tmp_path / "labels" / "x.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9\n")  # a YOLO-seg polygon
    with pytest.raises(DatasetError, match="a detection label"):
        read_yolo_dataset(tmp_path)
    (tmp_path / "labels" / "x.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "images" / "y.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="y.jpg is not a readable image"):
        read_yolo_dataset(tmp_path)


def test_coco_annotations_are_validated(tmp_path):
    import json

    from rar_edge.datasets import read_coco_json

    base = {"categories": [{"id": 1, "name": "cat"}], "images": [{"id": 1, "file_name": "a.jpg"}]}
    for ann, what in (
        ({"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5]}, "7"),
        ({"image_id": 1, "category_id": 1}, "bbox"),
    ):
        (tmp_path / "c.json").write_text(json.dumps({**base, "annotations": [ann]}))
        with pytest.raises(DatasetError, match=f"annotation 0 .*{what}"):
            read_coco_json(tmp_path / "c.json")


def test_cli_names_a_corrupt_image_and_exits_2(tmp_path, mobilenet_onnx):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        _img(tmp_path / "data" / c / "ok.png")
    (tmp_path / "data" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rar_edge",
            "-q",
            "memory",
            "build",
            str(tmp_path / "data"),
            "--encoder",
            str(mobilenet_onnx),
            "-o",
            str(tmp_path / "m.rarmem"),
            "--on-error",
            "stop",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # the default skips it (tests/test_inputs.py)
    assert out.returncode == 2 and "broken.jpg" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m.rarmem").exists()  # nothing half-written


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "rar_edge", "-q", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_cli_refusals_are_one_line_errors(tmp_path, mobilenet_onnx):
    """Inputs that used to end in a Python traceback: each is now one 'rar-edge: error:' line and exit 2."""
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            _img(tmp_path / "data" / c / f"{i}.png", seed=i)
    (tmp_path / "data" / "a" / "._0.png").write_bytes(b"macOS resource fork")  # skipped by every reader
    (tmp_path / "yolo" / "images").mkdir(parents=True)
    (tmp_path / "yolo" / "labels").mkdir()
    (tmp_path / "yolo" / "classes.txt").write_text("cat\n")
    _img(tmp_path / "yolo" / "images" / "x.png")
    (tmp_path / "yolo" / "labels" / "x.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "b.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    enc = ("--encoder", mobilenet_onnx)
    built = _cli("memory", "build", tmp_path / "data", *enc, "-o", tmp_path / "m")
    assert built.returncode == 0, built.stderr
    cases = [
        (["eval", tmp_path / "data", *enc, "--shots", "4"], "no query images left"),
        (["memory", "build", tmp_path / "data", *enc, "-o", tmp_path], "exists and is not a memory"),
        (
            ["memory", "build", "--boxes", tmp_path / "yolo", *enc, "--shots", "0", "-o", tmp_path / "b"],
            "--shots: must be >= 1",
        ),
        (["eval-detect", tmp_path / "yolo", *enc, "--crop-scale", "foo"], "'adaptive'"),
        (
            ["detect", tmp_path / "missing.jpg", "--boxes", tmp_path / "b.txt", "--memory", tmp_path / "m"],
            "no such image file",
        ),
    ]
    for args, message in cases:
        out = _cli(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    ok = _cli("finetune-data", tmp_path / "data", *enc, "-k", "2", "-o", tmp_path / "rows.jsonl")
    assert ok.returncode == 0, ok.stderr
