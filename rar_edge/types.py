"""Result dataclasses: one return type per function, frozen, with per-stage timings in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Candidate:
    """One class proposed for an image.

    Attributes:
        label: the class name.
        score: retrieval: best cosine similarity among the class's memory entries;
            ranking, score mode: the ranker's probability for this class (softmax over the candidates);
            ranking, generate mode: 1/rank, normalised to sum to 1 (an order, not a probability).
    """

    label: str
    score: float


def _frozen_timings(t: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType({str(k): float(v) for k, v in t.items()})


def _answer_dict(r: "Classification | Detection") -> dict:
    return {
        "label": r.label,
        "score": r.score,
        "candidates": [{"label": c.label, "score": c.score} for c in r.candidates],
        "retrieved": [{"label": c.label, "score": c.score} for c in r.retrieved],
        "ranker_ran": r.ranker_ran,
        "ranker_fallback": r.ranker_fallback,
        "timings_ms": dict(r.timings_ms),
    }


@dataclass(frozen=True)
class Classification:
    """The answer for one image.

    Attributes:
        label: the prediction (the first of ``candidates``); always one of the retrieved classes.
        score: the score of ``label`` in ``candidates``.
        candidates: the final ranking, best first (the ranker's when it ran, else retrieval's).
        retrieved: the k distinct classes in retrieval order with their similarity scores.
        ranker_ran: whether the MLLM ranker was called for this image.
        ranker_fallback: the ranker ran but its answer could not be used; retrieval order was kept.
        timings_ms: milliseconds per stage (decode, preprocess, encode, search, rank, total).
    """

    label: str
    score: float
    candidates: tuple[Candidate, ...]
    retrieved: tuple[Candidate, ...]
    ranker_ran: bool = False
    ranker_fallback: bool = False
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "retrieved", tuple(self.retrieved))
        object.__setattr__(self, "timings_ms", _frozen_timings(self.timings_ms))

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return _answer_dict(self)


@dataclass(frozen=True)
class Detection:
    """The answer for one box of an image.

    Attributes:
        box: (x1, y1, x2, y2) in pixels of the original image, as given (before clipping and enlarging).
        label, score, candidates, retrieved, ranker_ran, ranker_fallback: as in `Classification`.
        timings_ms: this box's share of each stage in milliseconds.
        index: the box's position in the boxes given to ``detect`` (boxes skipped as invalid leave gaps).
    """

    box: tuple[float, float, float, float]
    label: str
    score: float
    candidates: tuple[Candidate, ...]
    retrieved: tuple[Candidate, ...]
    ranker_ran: bool = False
    ranker_fallback: bool = False
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "retrieved", tuple(self.retrieved))
        object.__setattr__(self, "timings_ms", _frozen_timings(self.timings_ms))

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"box": list(self.box), "index": self.index, **_answer_dict(self)}


@dataclass(frozen=True)
class Ranking:
    """What a ranker returns for one image and its candidates.

    Attributes:
        labels: every candidate exactly once, best first.
        scores: one score per label (probabilities summing to 1 in score mode).
        fallback: the model's answer was unusable and retrieval order was returned instead.
        raw: the model's raw text (generate mode) or an empty string.
    """

    labels: tuple[str, ...]
    scores: tuple[float, ...]
    fallback: bool = False
    raw: str = ""


@dataclass(frozen=True)
class ImageError:
    """The record of one image of a batch that could not be classified (``on_error="skip"``).

    Streams (`rar_edge.Pipeline.iter_classify`, `classify_many`) yield it in the failed image's place, so
    results stay in step with the inputs; the images after it are still classified.

    Attributes:
        index: the image's position in the batch (0-based).
        image: the image as given (its path), or a short description of it (``<1234 bytes>``, ``ndarray``).
        error: the error's message.
        error_type: the error's class name (e.g. ``ImageDecodeError``).
    """

    index: int
    image: str
    error: str
    error_type: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"index": self.index, "image": self.image, "error": self.error, "error_type": self.error_type}
