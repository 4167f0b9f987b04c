"""`rar-edge eval` and `eval-detect` numbers against answers worked out by hand.

A stub encoder maps each image (or box crop) to a known vector by the colour of its centre pixel, the memory
holds one unit vector per class, and a stub ranker answers from a table. So every query's retrieval order,
margin, ranking and final label is known in advance, and every figure the evaluation reports (top-1, recall@j,
the ranker's rates, per-class counts) is written below as the fraction worked out from the table, not
recomputed by the code under test.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from rar_edge.encoders import Encoder, EncoderConfig
from rar_edge.pipeline import PipelineConfig
from rar_edge.tools.evaluate import evaluate_classification, evaluate_detection, score_results
from rar_edge.types import Candidate, Classification, Ranking

CLASSES = ("A", "B", "C", "D")  # class i's memory entry is the unit vector e_i
SUPPORT_RED = {c: 200 + 10 * i for i, c in enumerate(CLASSES)}  # red level of each class's support image / box

# One row per query: (red level that identifies it, true class, weights of the query vector over A..D,
# the retrieval order those weights give with k=3, what the stub ranker answers when it runs).
# A query's class scores are its weights / |weights| (cosine with e_i), so the retrieval order is the order of the
# weights, and the margin (first score minus second) is (w1 - w2) / |w|:
#   q1: |w|^2 = 85, margin 4/sqrt(85) = 0.434      q7: |w|^2 = 95, margin 6/sqrt(95) = 0.616
#   q2..q6: |w|^2 = 30, margin 1/sqrt(30) = 0.183
# A ranker answer of None stands for a fallback: the ranker returns retrieval order with fallback=True.
QUERIES = [
    (10, "A", (8, 4, 2, 1), ("A", "B", "C"), ("B", "A", "C")),  # truth retrieved 1st; the ranker moves it to 2nd
    (20, "B", (4, 3, 2, 1), ("A", "B", "C"), ("B", "A", "C")),  # truth retrieved 2nd; the ranker fixes it
    (30, "C", (1, 2, 4, 3), ("C", "D", "B"), ("C", "B", "D")),  # truth 1st; the ranker keeps it 1st
    (40, "D", (4, 1, 3, 2), ("A", "C", "D"), ("D", "A", "C")),  # truth 3rd; the ranker fixes it
    (50, "B", (1, 2, 3, 4), ("D", "C", "B"), ("C", "D", "B")),  # truth 3rd; the ranker gets it wrong too
    (60, "A", (1, 4, 3, 2), ("B", "C", "D"), None),  # truth not retrieved; the ranker falls back
    (70, "C", (2, 9, 1, 3), ("B", "D", "A"), ("A", "B", "D")),  # truth not retrieved; the ranker changes the label
]
K = 3
GATE = 0.3  # between 0.183 and 0.434: the gate skips the ranker for q1 and q7 only


def _unit(w) -> np.ndarray:
    v = np.asarray(w, np.float32)
    return v / np.linalg.norm(v)


VECTORS = {red: _unit(w) for red, _, w, _, _ in QUERIES}
VECTORS.update({red: np.eye(len(CLASSES), dtype=np.float32)[i] for i, red in enumerate(SUPPORT_RED.values())})


def _red(image: np.ndarray) -> int:
    h, w = image.shape[:2]
    return int(image[h // 2, w // 2, 0])


class ColourEncoder(Encoder):
    """An `Encoder` whose embedding of an image is looked up by the red level of its centre pixel."""

    def __init__(self, size_px: int = 16) -> None:  # no model folder: nothing of Encoder.__init__ applies
        self.config = EncoderConfig(threads=1, allow_spinning=False)
        self.dim = len(CLASSES)
        self.image_spec = SimpleNamespace(size_px=(size_px, size_px))
        self.calls = 0

    name = "colour-stub"
    path = Path("colour-stub")
    fingerprint = "colour-stub"
    preprocess_fingerprint = "colour-stub"

    def describe(self) -> dict:
        return {"name": self.name}

    def decode(self, image, **_) -> np.ndarray:
        from rar_edge.image.codec import decode_rgb

        return decode_rgb(image)

    def preprocess(self, image) -> np.ndarray:
        return np.asarray(image)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        batch = pixels[None] if pixels.ndim == 3 else pixels
        self.calls += len(batch)
        return np.stack([VECTORS[_red(p)] for p in batch])  # KeyError: a crop lost its centre colour


class TableRanker:
    """Answers from `QUERIES`; refuses candidates other than the retrieval order worked out by hand."""

    image_size_px = 0  # the encoder's view is enough: the centre pixel is all it reads
    model_s = 0.0

    def __init__(self) -> None:
        self.seen: list[int] = []

    def describe(self) -> dict:
        return {"name": "table-stub"}

    def close(self) -> None:
        pass

    def rank(self, image: np.ndarray, candidates) -> Ranking:
        red = _red(image)
        (row,) = [q for q in QUERIES if q[0] == red]
        assert tuple(candidates) == row[3], f"query {red}: retrieved {candidates}, worked out {row[3]}"
        self.seen.append(red)
        answer = row[4]
        if answer is None:
            return Ranking(labels=tuple(candidates), scores=(1 / 3,) * 3, fallback=True, raw="(unreadable)")
        return Ranking(labels=answer, scores=(0.5, 0.3, 0.2))


# The figures every evaluation below must report, worked out from the table by hand.
# Truth positions in the retrieval order: q1 1st, q2 2nd, q3 1st, q4 3rd, q5 3rd, q6 and q7 absent.
RECALL = {"1": 2 / 7, "2": 3 / 7, "3": 5 / 7}
RETRIEVAL_TOP1 = 2 / 7  # q1, q3
PER_CLASS_N = {"A": 2, "B": 2, "C": 2, "D": 1}
EXPECTED = {
    # no gate: final labels B B C D C B(fallback) A -> right for q2 q3 q4
    None: {
        "top1": 3 / 7,
        "ranked_top1": 3 / 6,  # the ranker's own: q1-q5 and q7 (q6 fell back), 3 right
        "ranker_ran_rate": 7 / 7,
        "ranker_fallback_rate": 1 / 7,
        "ranker_changed_rate": 5 / 7,  # the label is not retrieval's first for q1 q2 q4 q5 q7
        "per_class_top1": {"A": 0 / 2, "B": 1 / 2, "C": 1 / 2, "D": 1 / 1},
        "ranked": [10, 20, 30, 40, 50, 60, 70],
    },
    # gate 0.3: q1 and q7 keep retrieval order (A, B): final A B C D C B B -> right for q1 q2 q3 q4
    GATE: {
        "top1": 4 / 7,
        "ranked_top1": 3 / 4,  # the ranker's own: q2-q5, 3 right
        "ranker_ran_rate": 5 / 7,
        "ranker_fallback_rate": 1 / 7,
        "ranker_changed_rate": 3 / 7,  # q2 q4 q5
        "per_class_top1": {"A": 1 / 2, "B": 1 / 2, "C": 1 / 2, "D": 1 / 1},
        "ranked": [20, 30, 40, 50, 60],
    },
}
NUMBERS = ("top1", "ranked_top1", "ranker_ran_rate", "ranker_fallback_rate", "ranker_changed_rate")


def _check(res: dict, gate: float | None, ranker: TableRanker | None) -> None:
    assert res["n_queries"] == 7
    assert res["retrieval_top1"] == pytest.approx(RETRIEVAL_TOP1)
    assert res["recall"] == pytest.approx(RECALL)
    assert res["per_class_n"] == PER_CLASS_N
    if ranker is None:
        assert res["top1"] == pytest.approx(RETRIEVAL_TOP1)
        assert res["per_class_top1"] == pytest.approx({"A": 1 / 2, "B": 0 / 2, "C": 1 / 2, "D": 0 / 1})  # q1, q3
        assert not any(key in res for key in NUMBERS[1:])
        return
    want = EXPECTED[gate]
    for key in NUMBERS:
        assert res[key] == pytest.approx(want[key]), key
    assert res["per_class_top1"] == pytest.approx(want["per_class_top1"])
    assert sorted(ranker.seen) == want["ranked"]  # the ranker ran exactly where the gate let it


# --- eval: an image folder --------------------------------------------------------------------------------


def _solid(path: Path, red: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (red, 0, 0)).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(support folder: one image per class, queries folder: the seven query images under their true class)."""
    root = tmp_path_factory.mktemp("eval")
    for c, red in SUPPORT_RED.items():
        _solid(root / "support" / c / "0.png", red)
    for red, truth, *_ in QUERIES:
        _solid(root / "queries" / truth / f"{red}.png", red)
    return root / "support", root / "queries"


@pytest.mark.parametrize("gate", [None, GATE], ids=["no-gate", "gate"])
def test_eval_reports_the_figures_worked_out_by_hand(folders, gate):
    support, queries = folders
    ranker = TableRanker()
    res = evaluate_classification(
        support,
        encoder=ColourEncoder(),
        shots=1,
        k=K,
        queries_folder=queries,
        ranker=ranker,
        config=PipelineConfig(k=K, gate_margin=gate),
    )
    _check(res, gate, ranker)
    assert res["setup"]["memory_entries"] == 4 and res["setup"]["queries_with_class_not_in_memory"] == 0


def test_eval_without_a_ranker_reports_retrieval(folders):
    support, queries = folders
    res = evaluate_classification(support, encoder=ColourEncoder(), shots=1, k=K, queries_folder=queries)
    _check(res, None, None)


# --- eval-detect: a YOLO folder of coloured boxes ---------------------------------------------------------

SIDE = 64
SLOTS = [(4, 4), (40, 4), (4, 40), (40, 40)]  # top-left corners of 16 px boxes, far enough apart for 1.5x crops


def _yolo(root: Path, images: list[list[tuple[int, str, int]]]) -> Path:
    """A YOLO folder; each image a list of (red level, class, box side in px; 0: a zero-size box)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for n, boxes in enumerate(images):
        canvas = np.zeros((SIDE, SIDE, 3), np.uint8)
        rows = []
        for (x, y), (red, cls, side) in zip(SLOTS, boxes):
            canvas[y : y + 16, x : x + 16] = (red, 0, 0)
            rows.append(f"{CLASSES.index(cls)} {(x + 8) / SIDE} {(y + 8) / SIDE} {side / SIDE} {side / SIDE}")
        Image.fromarray(canvas).save(root / "images" / f"{n}.png")
        (root / "labels" / f"{n}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def yolo_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval_detect")
    every_class = [(red, c, 16) for c, red in SUPPORT_RED.items()]
    support = _yolo(root / "support", [every_class, every_class])  # whichever image the split keeps, same memory
    q = [(red, truth, 16) for red, truth, *_ in QUERIES]
    queries = _yolo(root / "queries", [q[0:3], q[3:5] + [(0, "A", 0)], q[5:7]])  # one box of zero size: skipped
    return support, queries


@pytest.mark.parametrize("gate", [None, GATE], ids=["no-gate", "gate"])
def test_eval_detect_reports_the_figures_worked_out_by_hand(yolo_folders, gate):
    support, queries = yolo_folders
    ranker = TableRanker()
    res = evaluate_detection(
        support, encoder=ColourEncoder(), shots=1, k=K, queries=queries, ranker=ranker, gate_margin=gate
    )
    _check(res, gate, ranker)
    assert res["setup"]["invalid_boxes_skipped"] == 1
    assert res["setup"]["memory_entries"] == 4  # one box per class from the support half


def test_eval_detect_without_a_ranker_reports_retrieval(yolo_folders):
    support, queries = yolo_folders
    _check(evaluate_detection(support, encoder=ColourEncoder(), shots=1, k=K, queries=queries), None, None)


# --- score_results on results written out directly ---------------------------------------------------------


def _result(label_order, retrieved, *, ran=False, fallback=False) -> Classification:
    cands = tuple(Candidate(lbl, 1.0 / (i + 1)) for i, lbl in enumerate(label_order))
    return Classification(
        label=label_order[0],
        score=cands[0].score,
        candidates=cands,
        retrieved=tuple(Candidate(lbl, 0.9 - 0.1 * i) for i, lbl in enumerate(retrieved)),
        ranker_ran=ran,
        ranker_fallback=fallback,
    )


def test_score_results_counts_a_query_the_ranker_never_saw():
    results = [
        _result(("b", "a"), ("a", "b"), ran=True),  # truth b: the ranker fixed it
        _result(("a", "b"), ("a", "b")),  # truth b: gated, retrieval kept, wrong
        _result(("c", "a"), ("c", "a")),  # truth c: gated, right
    ]
    res = score_results(results, ["b", "b", "c"], k=2)
    assert res["top1"] == pytest.approx(2 / 3) and res["retrieval_top1"] == pytest.approx(1 / 3)
    assert res["recall"] == pytest.approx({"1": 1 / 3, "2": 1.0})
    assert res["ranked_top1"] == 1.0 and res["ranker_ran_rate"] == pytest.approx(1 / 3)
    assert res["per_class_top1"] == pytest.approx({"b": 0.5, "c": 1.0}) and res["per_class_n"] == {"b": 2, "c": 1}
    idle = score_results(results[1:], ["b", "c"], k=2, ranker_given=True)  # the gate kept the ranker idle
    assert idle["ranked_top1"] is None and idle["ranker_ran_rate"] == 0.0
    assert "ranked_top1" not in score_results(results[1:], ["b", "c"], k=2)  # no ranker: no ranker figures
    assert score_results([], [], k=2) == {"top1": None, "recall": {}, "n_queries": 0}
