"""detect(): boxes of real COCO photos through crop/blur, the encoder and a crop memory; box files; CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from rar_edge import Encoder, EncoderConfig, Memory, Pipeline, PipelineConfig
from rar_edge.datasets import read_boxes_file, read_yolo_dataset
from rar_edge.errors import InvalidBoxError, InvalidInputError
from rar_edge.index.build import memory_from_boxes

from conftest import linked_coco
from stub_ranker import StubRanker


@pytest.fixture(scope="module")
def coco_subset(tmp_path_factory):
    """12 labelled COCO128 photos as a YOLO folder (symlinks)."""
    return linked_coco(tmp_path_factory.mktemp("coco_subset"), 12)


@pytest.fixture(scope="module")
def encoder(mobilenet_onnx):
    return Encoder(mobilenet_onnx, config=EncoderConfig(threads=1))


def test_detect_classifies_every_box_of_a_photo(encoder, coco_subset):
    names, images = read_yolo_dataset(coco_subset)
    mem = memory_from_boxes(coco_subset, encoder=encoder, shots=2, seed=0, image_indices=np.arange(1, 12))
    assert mem.size > 0 and set(mem.classes) <= set(names)
    im = images[0]
    pipe = Pipeline(memory=mem, encoder=encoder, config=PipelineConfig(k=3))
    dets = pipe.detect(im.path, im.boxes)
    assert len(dets) == len(im.boxes) > 0
    for d, box in zip(dets, im.boxes):
        np.testing.assert_allclose(d.box, box)
        assert d.label in mem.classes and d.label == d.candidates[0].label
        assert len({c.label for c in d.retrieved}) == len(d.retrieved) == min(3, len(mem.classes))
        assert {"decode", "preprocess", "encode", "search", "total"} <= set(d.timings_ms)
    # an exemplar box classifies as its own class (its crop is in the memory)
    mem_all = memory_from_boxes(coco_subset, encoder=encoder, shots=None, seed=0, image_indices=np.array([0]))
    own = Pipeline(memory=mem_all, encoder=encoder).detect(im.path, im.boxes[:1])
    assert own[0].label == im.labels[0] and own[0].score > 0.99


def test_invalid_boxes_raise_naming_the_box_or_are_skipped(encoder, coco_subset):
    _, images = read_yolo_dataset(coco_subset)
    mem = memory_from_boxes(coco_subset, encoder=encoder, shots=1, seed=0)
    pipe = Pipeline(memory=mem, encoder=encoder)
    img = images[0].path
    boxes = np.array([[10, 10, 100, 100], [np.nan, 0, 5, 5], [50, 50, 50, 80], [20, 20, 60, 60]], float)
    with pytest.raises(InvalidBoxError, match="box 1"):
        pipe.detect(img, boxes)
    dets = pipe.detect(img, boxes, on_invalid="skip")
    assert [d.box for d in dets] == [(10.0, 10.0, 100.0, 100.0), (20.0, 20.0, 60.0, 60.0)]
    assert [d.index for d in dets] == [0, 3]  # which input box each answer is for
    # partly outside the image: clipped, still classified; the answer names the box as given
    with Image.open(img) as im:
        w, h = im.size
    (out,) = pipe.detect(img, [[w - 20, h - 20, w + 500, h + 500]])
    assert out.box == (w - 20, h - 20, w + 500, h + 500) and out.to_dict()["index"] == 0
    with pytest.raises(InvalidInputError):
        pipe.detect(img, np.zeros((3, 5)))
    # thousands of boxes in one call
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, min(w, h) / 2, (2000, 2))
    many = np.hstack([xy, xy + rng.uniform(4, 60, (2000, 2))])
    assert len(pipe.detect(img, many, k=1)) == 2000


def test_gray_rgba_and_16bit_images_are_converted(encoder, coco_subset):
    mem = memory_from_boxes(coco_subset, encoder=encoder, shots=1, seed=0)
    pipe = Pipeline(memory=mem, encoder=encoder)
    rng = np.random.default_rng(0)
    for arr in (
        rng.integers(0, 256, (120, 90), dtype=np.uint8),
        rng.integers(0, 256, (120, 90, 4), dtype=np.uint8),
        rng.integers(0, 65536, (120, 90), dtype=np.uint16),
    ):
        dets = pipe.detect(arr, [[5, 5, 60, 80]])
        assert len(dets) == 1 and dets[0].label in mem.classes


def test_zero_shot_text_memory_detect(tiny_clip_onnx, coco_subset):
    enc = Encoder(tiny_clip_onnx)
    names = ["person", "dog", "car", "pizza"]
    mem = Memory.from_class_names(names, encoder=enc)
    _, images = read_yolo_dataset(coco_subset)
    dets = Pipeline(memory=mem, encoder=enc, config=PipelineConfig(k=2)).detect(images[0].path, images[0].boxes)
    assert len(dets) == len(images[0].boxes) and all(d.label in names for d in dets)


def test_box_file_formats(tmp_path, coco_subset):
    img = sorted((coco_subset / "images").iterdir())[0]
    with Image.open(img) as im:
        w, h = im.size
    (tmp_path / "b.txt").write_text("0 0.5 0.5 0.2 0.4\n\n3 0.25 0.25 0.1 0.1\n")
    yolo = read_boxes_file(tmp_path / "b.txt", image=img)
    np.testing.assert_allclose(yolo[0], [0.4 * w, 0.3 * h, 0.6 * w, 0.7 * h])
    (tmp_path / "c.json").write_text(json.dumps([{"bbox": [10, 20, 30, 40], "category_id": 1}]))
    np.testing.assert_allclose(read_boxes_file(tmp_path / "c.json"), [[10, 20, 40, 60]])
    (tmp_path / "x.json").write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert read_boxes_file(tmp_path / "x.json").shape == (2, 4)
    (tmp_path / "bad.json").write_text(json.dumps([[1, 2, 3]]))
    with pytest.raises(InvalidInputError, match="box 0"):
        read_boxes_file(tmp_path / "bad.json")
    with pytest.raises(InvalidInputError, match="image is needed"):
        read_boxes_file(tmp_path / "b.txt")


def test_cli_memory_from_boxes_detect_and_eval_detect(mobilenet_onnx, coco_subset, tmp_path, run_cli):
    mem = tmp_path / "crops.rarmem"
    run = run_cli
    run("memory", "build", "--boxes", coco_subset, "--encoder", mobilenet_onnx, "--shots", 2, "--seed", 0, "-o", mem)
    img = sorted((coco_subset / "images").iterdir())[0]
    lab = coco_subset / "labels" / (img.stem + ".txt")
    dets = json.loads(run("detect", img, "--boxes", lab, "--memory", mem, "-k", 3, "--json"))
    assert len(dets) == len([ln for ln in lab.read_text().splitlines() if ln.strip()])
    assert all(len(d["candidates"]) == 3 and len(d["box"]) == 4 for d in dets)
    out = tmp_path / "det.json"
    run(
        "eval-detect",
        coco_subset,
        "--encoder",
        mobilenet_onnx,
        "--shots",
        2,
        "--seed",
        0,
        "-k",
        3,
        "--crop-scale",
        "adaptive",
        "--blur-sigma",
        "2",
        "--json",
        out,
    )
    d = json.loads(out.read_text())
    assert d["n_queries"] > 0 and set(d["recall"]) == {"1", "2", "3"} and d["per_class_top1"]
    assert d["setup"]["crop"]["crop_scale"] == "adaptive" and d["setup"]["crop"]["blur_sigma_px"] == 2.0


def test_yolo_boxes_are_read_in_the_upright_frame_of_an_exif_rotated_photo(tmp_path):
    """A phone photo stored landscape with Orientation 6 is decoded portrait; normalised YOLO boxes follow."""
    import io
    import struct

    from rar_edge.image.codec import decode_rgb

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(buf, "JPEG")
    tiff = b"II" + struct.pack("<HIH", 42, 8, 1) + struct.pack("<HHIHHI", 0x0112, 3, 1, 6, 0, 0)
    app1 = b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\0\0" + tiff
    img = tmp_path / "phone.jpg"
    img.write_bytes(buf.getvalue()[:2] + app1 + buf.getvalue()[2:])
    assert decode_rgb(img).shape[:2] == (100, 40)
    (tmp_path / "b.txt").write_text("0 0.5 0.5 0.5 0.1\n")
    np.testing.assert_allclose(read_boxes_file(tmp_path / "b.txt", image=img), [[10, 45, 30, 55]])


def test_eval_detect_honours_the_gate_margin(encoder, coco_subset):
    """--gate-margin skips the ranker where retrieval is that sure; it used to be accepted and ignored."""
    from rar_edge.tools.evaluate import evaluate_detection
    from rar_edge.types import Ranking

    class Counting(StubRanker):
        calls = 0

        def rank(self, image, candidates):
            Counting.calls += 1
            return Ranking(tuple(candidates), tuple(1.0 / (i + 1) for i in range(len(candidates))))

    evaluate_detection(coco_subset, encoder=encoder, shots=1, ranker=Counting(), gate_margin=0.0)  # every margin >= 0
    assert Counting.calls == 0
    res = evaluate_detection(coco_subset, encoder=encoder, shots=1, ranker=Counting(), gate_margin=None)
    assert Counting.calls == res["n_queries"] > 0  # no gate: every box is ranked


def test_a_coco_instances_file_gives_the_boxes_of_the_image_named(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "sub/b.jpg"}],
        "annotations": [
            {"image_id": 1, "bbox": [10, 10, 50, 50]},
            {"image_id": 2, "bbox": [300, 200, 100, 100]},
            {"image_id": 2, "bbox": [0, 0, 5, 5]},
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    np.testing.assert_allclose(
        read_boxes_file(tmp_path / "inst.json", image=tmp_path / "b.jpg"), [[300, 200, 400, 300], [0, 0, 5, 5]]
    )
    with pytest.raises(InvalidInputError, match="boxes of 2 images"):
        read_boxes_file(tmp_path / "inst.json", image=tmp_path / "c.jpg")
    coco["annotations"] = coco["annotations"][:1]  # one image's boxes: taken as they are
    (tmp_path / "one.json").write_text(json.dumps(coco))
    np.testing.assert_allclose(read_boxes_file(tmp_path / "one.json"), [[10, 10, 60, 60]])


def test_the_ranker_sees_each_box_cropped_at_its_own_size(encoder, coco_subset):
    from rar_edge.types import Ranking

    class Sized(StubRanker):
        def __init__(self, size):
            self.image_size_px, self.shapes = size, []

        def rank(self, image, candidates):
            self.shapes.append(image.shape)
            return Ranking(tuple(candidates), tuple(1.0 / (i + 1) for i in range(len(candidates))))

    _, images = read_yolo_dataset(coco_subset)
    mem = memory_from_boxes(coco_subset, encoder=encoder, shots=1, seed=0)
    im = images[0]
    for size, side in ((448, 448), (0, 224), (None, 224), (100, 224)):
        r = Sized(size)
        dets = Pipeline(memory=mem, encoder=encoder, ranker=r).detect(im.path, im.boxes)
        assert r.shapes == [(side, side, 3)] * len(dets), size
