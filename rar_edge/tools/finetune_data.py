"""Ranking fine-tuning data and in-context examples, following RAR's recipe (arXiv 2403.13805, Sec. 3.3).

From a labelled image folder (one sub-folder per class) two disjoint subsets are drawn, per class: ``Da``
plays the memory and ``Db`` the queries. For each ``Db`` image its ``neighbours`` (20) nearest ``Da``
images by cosine similarity of their embeddings give a similarity-ordered list of distinct class names;
windows of ``k`` consecutive names from that list that contain the true class become candidate lists
(hard negatives: the classes retrieval really confuses). If the true class is not among the neighbours'
classes, it takes the last place of the first window. The candidates are shown in a seeded random order;
the target ranking is the true class first, then the others in similarity order.

Rows are written as JSON Lines in the LLaVA conversation format, which LLaVA's training code reads as is,
and LLaMA-Factory / ms-swift read as ShareGPT-style multimodal data (``images`` column)::

    {"id": "b000012-w0", "image": "/data/flowers/tulip/img_0012.jpg", "images": ["/data/.../img_0012.jpg"],
     "conversations": [{"from": "human", "value": "<instruction>\\nImage: <image>\\nCandidate categories:\\ntulip\\n..."},
                       {"from": "gpt", "value": "1. tulip\\n2. crocus\\n..."}],
     "label": "tulip", "candidates": [...], "ranked": [...], "prompt_version": "rar-rank-v1"}

The human turn is exactly the user text the ranker sends (`rar_edge.rank.prompts`), with ``<image>`` where the
ranker puts the image, so a model fine-tuned on these rows answers in the format the ranker scores.
The same rows give the ranker's in-context examples (`in_context_examples`).

This module takes embeddings as numpy arrays and needs no encoder; `run_finetune_data` takes an
``embed_fn(paths) -> array`` so the CLI can plug the encoder in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from rar_edge import defaults
from rar_edge._fs import atomic_write
from rar_edge.datasets import IMAGE_SUFFIXES
from rar_edge.datasets import read_image_folder as _read_classes
from rar_edge.errors import DatasetError, InvalidInputError
from rar_edge.rank.prompts import RankingExample, get_prompt
from rar_edge.vectors import unit_rows_checked

__all__ = [
    "IMAGE_EXTENSIONS",
    "RankingRow",
    "build_ranking_rows",
    "in_context_examples",
    "read_image_folder",
    "run_finetune_data",
    "split_disjoint",
    "write_jsonl",
]

IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # the image files a class folder is read for (rar_edge.datasets)
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class RankingRow:
    """One fine-tuning row.

    Attributes:
        id: a stable identifier (query index and window number).
        image: the query image's path.
        label: its true class.
        candidates: the k names in the order the prompt shows them (shuffled).
        ranked: the target ranking: ``label`` first, then the others in similarity order.
    """

    id: str
    image: str
    label: str
    candidates: tuple[str, ...]
    ranked: tuple[str, ...]

    def to_example(self, *, with_image: bool = False) -> RankingExample:
        """This row as an in-context example for the ranker."""
        return RankingExample(candidates=self.candidates, ranked=self.ranked, image=self.image if with_image else None)

    def to_conversation(self, *, prompt_version: str = defaults.PROMPT_VERSION) -> dict:
        """This row as a LLaVA-style conversation record."""
        p = get_prompt(prompt_version)
        return {
            "id": self.id,
            "image": self.image,
            "images": [self.image],
            "conversations": [
                {"from": "human", "value": p.user_text(self.candidates, image_marker=IMAGE_TOKEN)},
                {"from": "gpt", "value": p.answer(self.ranked)},
            ],
            "label": self.label,
            "candidates": list(self.candidates),
            "ranked": list(self.ranked),
            "prompt_version": p.version,
        }


def read_image_folder(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(image paths, class names) of a folder with one sub-folder per class, sorted for reproducibility.

    The same listing as `rar_edge.datasets.read_image_folder` (hidden files skipped, an empty class
    folder refused), flattened.

    Raises:
        DatasetError: no class folders, or a class folder without images.
    """
    per_class = _read_classes(folder)
    paths = [str(p) for ps in per_class.values() for p in ps]
    labels = [c for c, ps in per_class.items() for _ in ps]
    return paths, labels


def split_disjoint(labels: Sequence[str], *, fraction_a: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into disjoint ``Da`` (memory) and ``Db`` (queries), stratified by class.

    Each class with at least two images puts at least one in each part; a class with one image goes to
    ``Da`` only (it can still be a candidate, never a query).

    Returns:
        (indices of Da, indices of Db), each sorted.
    """
    if not 0.0 < fraction_a < 1.0:
        raise InvalidInputError("fraction_a must be in (0, 1)")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    a: list[int] = []
    b: list[int] = []
    for lab in sorted(by_class):
        idx = np.array(by_class[lab])
        rng.shuffle(idx)
        if len(idx) == 1:
            a.extend(idx.tolist())
            continue
        n_a = min(max(1, int(round(fraction_a * len(idx)))), len(idx) - 1)
        a.extend(idx[:n_a].tolist())
        b.extend(idx[n_a:].tolist())
    return np.array(sorted(a), dtype=np.int64), np.array(sorted(b), dtype=np.int64)


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidInputError(f"{what} must be a non-empty 2-D array, got shape {x.shape}")
    return unit_rows_checked(x, what=what)


def _check_sizes(k: int, neighbours: int, windows_per_image: int, *, n_classes: int | None = None) -> None:
    if k < 1 or neighbours < 1 or windows_per_image < 1:
        raise InvalidInputError("k, neighbours and windows_per_image must be >= 1")
    if n_classes is not None and n_classes < k:
        raise InvalidInputError(f"k={k} needs at least {k} classes, the data has {n_classes}")


def build_ranking_rows(
    paths_a: Sequence[str],
    labels_a: Sequence[str],
    emb_a: np.ndarray,
    paths_b: Sequence[str],
    labels_b: Sequence[str],
    emb_b: np.ndarray,
    *,
    k: int = defaults.K,
    neighbours: int = 20,
    windows_per_image: int = 1,
    seed: int = 0,
) -> list[RankingRow]:
    """Builds ranking rows for the ``Db`` images against the ``Da`` memory.

    Args:
        paths_a, labels_a, emb_a: the memory subset (embeddings one row per image, any scale).
        paths_b, labels_b, emb_b: the query subset; must share no path with ``Da``.
        k: names per candidate list; needs at least ``k`` classes in ``Da`` plus ``Db``.
        neighbours: nearest ``Da`` images per query (the paper uses 20).
        windows_per_image: candidate lists per query (different windows when there are several).
        seed: seeds window choice, padding and candidate shuffling.

    Returns:
        rows, each with ``k`` distinct names that include the true class.

    Raises:
        InvalidInputError: mismatched lengths, overlapping subsets, or too few classes for ``k``.
    """
    _check_sizes(k, neighbours, windows_per_image)
    a = _normalise(emb_a, "emb_a")
    b = _normalise(emb_b, "emb_b")
    if not (len(paths_a) == len(labels_a) == a.shape[0]) or not (len(paths_b) == len(labels_b) == b.shape[0]):
        raise InvalidInputError("paths, labels and embeddings must have the same length in each subset")
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    overlap = set(map(str, paths_a)) & set(map(str, paths_b))
    if overlap:
        raise InvalidInputError(
            f"Da and Db must be disjoint; {len(overlap)} images are in both, e.g. {sorted(overlap)[0]}"
        )
    classes = sorted(set(labels_a) | set(labels_b))
    _check_sizes(k, neighbours, windows_per_image, n_classes=len(classes))
    rng = np.random.default_rng(seed)
    labels_a_arr = np.asarray(labels_a, dtype=object)
    n_nb = min(neighbours, a.shape[0])
    rows: list[RankingRow] = []
    block = 1024
    for start in range(0, b.shape[0], block):
        sims = b[start : start + block] @ a.T
        top = np.argpartition(-sims, n_nb - 1, axis=1)[:, :n_nb]
        for r in range(sims.shape[0]):
            qi = start + r
            order = top[r][np.argsort(-sims[r, top[r]], kind="stable")]
            ordered = list(dict.fromkeys(labels_a_arr[order].tolist()))  # distinct, by best similarity
            truth = labels_b[qi]
            if len(ordered) < k:  # pad with other classes, in a seeded random order
                rest = [c for c in classes if c not in ordered and c != truth]
                rng.shuffle(rest)
                ordered += rest[: k - len(ordered)]
            windows = [ordered[s : s + k] for s in range(0, len(ordered) - k + 1) if truth in ordered[s : s + k]]
            if not windows:
                first = ordered[:k]
                if truth not in first:
                    first = first[: k - 1] + [truth]
                windows = [first]
            pick = rng.permutation(len(windows))[:windows_per_image]
            for w_i, w in enumerate(pick):
                window = windows[w]
                ranked = (truth, *[c for c in window if c != truth])
                shuffled = list(window)
                rng.shuffle(shuffled)
                rows.append(
                    RankingRow(
                        id=f"b{qi:06d}-w{w_i}",
                        image=str(paths_b[qi]),
                        label=truth,
                        candidates=tuple(shuffled),
                        ranked=ranked,
                    )
                )
    return rows


def in_context_examples(
    rows: Sequence[RankingRow], *, n: int = 3, seed: int = 0, with_images: bool = False
) -> list[RankingExample]:
    """``n`` rows with distinct true classes as in-context examples for `rar_edge.rank.ranker.Ranker.load`."""
    rng = np.random.default_rng(seed)
    chosen: list[RankingExample] = []
    seen: set[str] = set()
    for i in rng.permutation(len(rows)):
        row = rows[int(i)]
        if row.label in seen:
            continue
        seen.add(row.label)
        chosen.append(row.to_example(with_image=with_images))
        if len(chosen) == n:
            break
    return chosen


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes one JSON object a line, atomically (a temporary file renamed over ``path``).

    Returns:
        the number of records written.
    """
    n = 0
    with atomic_write(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def run_finetune_data(
    folder: str | os.PathLike,
    embed_fn: Callable[[list[str]], np.ndarray],
    *,
    out: str | os.PathLike,
    k: int = defaults.K,
    seed: int = 0,
    neighbours: int = 20,
    fraction_a: float = 0.5,
    windows_per_image: int = 1,
    prompt_version: str = defaults.PROMPT_VERSION,
) -> dict:
    """Reads a labelled image folder, embeds it, and writes ranking fine-tuning rows as JSONL.

    Args:
        folder: one sub-folder per class.
        embed_fn: maps a list of image paths to an ``(n, d)`` array of embeddings (e.g. the CLIP image encoder).
        out: the JSONL file to write.
        k, seed, neighbours, fraction_a, windows_per_image: see `build_ranking_rows` and `split_disjoint`.
        prompt_version: the `rar_edge.rank.prompts` template used for the human turn.

    Returns:
        a summary: ``{"out", "rows", "images_a", "images_b", "classes", "k", "prompt_version"}``.
    """
    paths, labels = read_image_folder(folder)
    _check_sizes(k, neighbours, windows_per_image, n_classes=len(set(labels)))  # before the long embedding
    emb = np.asarray(embed_fn(list(paths)))
    if emb.ndim != 2 or emb.shape[0] != len(paths):
        raise InvalidInputError(f"embed_fn returned shape {emb.shape} for {len(paths)} images; expected (n, d)")
    ia, ib = split_disjoint(labels, fraction_a=fraction_a, seed=seed)
    if len(ib) == 0:
        raise DatasetError(f"{folder}: every class has a single image, nothing is left for queries")
    rows = build_ranking_rows(
        [paths[i] for i in ia],
        [labels[i] for i in ia],
        emb[ia],
        [paths[i] for i in ib],
        [labels[i] for i in ib],
        emb[ib],
        k=k,
        neighbours=neighbours,
        windows_per_image=windows_per_image,
        seed=seed,
    )
    n = write_jsonl(out, (r.to_conversation(prompt_version=prompt_version) for r in rows))
    return {
        "out": str(out),
        "rows": n,
        "images_a": int(len(ia)),
        "images_b": int(len(ib)),
        "classes": len(set(labels)),
        "k": k,
        "prompt_version": get_prompt(prompt_version).version,
    }
