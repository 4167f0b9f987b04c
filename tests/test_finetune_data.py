"""Ranking fine-tuning rows (RAR's recipe) and in-context examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rar_edge.errors import DatasetError, InvalidInputError
from rar_edge.rank.prompts import RANKING_PROMPT_V1
from rar_edge.tools.finetune_data import (
    build_ranking_rows,
    in_context_examples,
    read_image_folder,
    run_finetune_data,
    split_disjoint,
    write_jsonl,
)


def _clustered(n_classes: int, per_class: int, dim: int = 16, seed: int = 0):
    """Clustered embeddings (class centres + noise): neighbours carry class structure."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    labels = [f"class {c}" for c in range(n_classes) for _ in range(per_class)]
    emb = np.repeat(centres, per_class, axis=0) + 0.6 * rng.standard_normal((n_classes * per_class, dim))
    paths = [f"/img/{i:04d}.jpg" for i in range(len(labels))]
    return paths, labels, emb.astype(np.float32)


def _rows(k=5, n_classes=12, per_class=8, seed=0, **kw):
    paths, labels, emb = _clustered(n_classes, per_class, seed=seed)
    ia, ib = split_disjoint(labels, seed=seed)
    rows = build_ranking_rows(
        [paths[i] for i in ia],
        [labels[i] for i in ia],
        emb[ia],
        [paths[i] for i in ib],
        [labels[i] for i in ib],
        emb[ib],
        k=k,
        seed=seed,
        **kw,
    )
    return rows, (paths, labels, emb, ia, ib)


def test_split_is_disjoint_stratified_and_covers_everything():
    _, labels, _ = _clustered(7, 5)
    labels = labels + ["lonely"]
    a, b = split_disjoint(labels, seed=3)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(len(labels)))
    for c in set(labels) - {"lonely"}:
        assert any(labels[i] == c for i in a) and any(labels[i] == c for i in b)
    assert labels.index("lonely") in a  # a one-image class can be a candidate, never a query


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 8), seed=st.integers(0, 1000), windows=st.integers(1, 3))
def test_rows_have_k_distinct_names_with_the_truth_first_in_the_target(k, seed, windows):
    rows, (paths, labels, emb, ia, ib) = _rows(k=k, seed=seed, windows_per_image=windows)
    assert len(rows) >= len(ib)
    a_paths = {paths[i] for i in ia}
    for r in rows:
        assert len(r.candidates) == k == len(set(r.candidates))
        assert r.label in r.candidates
        assert r.ranked[0] == r.label
        assert sorted(r.ranked) == sorted(r.candidates)
        assert r.image not in a_paths  # queries never come from the memory subset


def test_target_follows_similarity_and_candidates_are_shuffled():
    rows, (paths, labels, emb, ia, ib) = _rows(k=5, seed=1)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    r = rows[0]
    qi = paths.index(r.image)
    sims = e[ia] @ e[qi]
    best = {}
    for j, s in zip(ia, sims):
        best[labels[j]] = max(best.get(labels[j], -2.0), s)
    rest = list(r.ranked[1:])
    assert rest == sorted(rest, key=lambda c: -best[c])
    assert any(row.candidates != row.ranked for row in rows)  # the shown order is not the answer


def test_rows_are_reproducible_for_a_seed():
    a, _ = _rows(seed=5)
    b, _ = _rows(seed=5)
    c, _ = _rows(seed=6)
    assert a == b
    assert a != c


def test_truth_missing_from_neighbours_still_enters_the_window():
    rng = np.random.default_rng(0)
    emb_a = rng.standard_normal((10, 8)).astype(np.float32)
    la = [f"c{i}" for i in range(10)]
    pa = [f"/a/{i}.jpg" for i in range(10)]
    rows = build_ranking_rows(pa, la, emb_a, ["/b/0.jpg"], ["outsider"], emb_a[:1] * 3, k=4, neighbours=5)
    assert rows[0].label == "outsider" and "outsider" in rows[0].candidates and len(rows[0].candidates) == 4


def test_bad_inputs_raise_clear_errors():
    paths, labels, emb = _clustered(3, 4)
    with pytest.raises(InvalidInputError, match="disjoint"):
        build_ranking_rows(paths, labels, emb, paths[:2], labels[:2], emb[:2])
    with pytest.raises(InvalidInputError, match="classes"):
        build_ranking_rows(paths[:6], labels[:6], emb[:6], paths[6:], labels[6:], emb[6:], k=5)
    with pytest.raises(InvalidInputError, match="same length"):
        build_ranking_rows(paths[:6], labels[:5], emb[:6], paths[6:], labels[6:], emb[6:], k=2)
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        build_ranking_rows(paths[:6], labels[:6], bad[:6], paths[6:], labels[6:], emb[6:], k=2)


def test_conversation_record_matches_the_ranker_prompt():
    rows, _ = _rows(k=3)
    rec = rows[0].to_conversation()
    human, gpt = rec["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"] == RANKING_PROMPT_V1.user_text(rows[0].candidates, image_marker="<image>")
    assert human["value"].count("<image>") == 1
    assert gpt["value"] == "\n".join(f"{i}. {c}" for i, c in enumerate(rows[0].ranked, 1))
    assert rec["image"] == rec["images"][0] == rows[0].image
    assert rec["prompt_version"] == "rar-rank-v1"


def test_in_context_examples_have_distinct_labels():
    rows, _ = _rows(k=4)
    ex = in_context_examples(rows, n=3, seed=0)
    assert len(ex) == 3
    assert len({e.ranked[0] for e in ex}) == 3
    assert all(e.image is None for e in ex)
    assert all(e.image is not None for e in in_context_examples(rows, n=2, with_images=True))


def test_in_context_examples_carry_the_rows_answers_not_the_order_shown():
    rows, _ = _rows(k=4)
    by_shown = {(r.image, r.candidates): r for r in rows}
    assert len(by_shown) == len(rows)
    examples = in_context_examples(rows, n=5, seed=1, with_images=True)
    assert len(examples) == 5
    for e in examples:
        row = by_shown[e.image, e.candidates]  # the candidates as the row shows them (shuffled)
        assert e.ranked == row.ranked and e.ranked[0] == row.label
        # the answer a ranker's prompt renders for it is the row's fine-tuning answer
        assert RANKING_PROMPT_V1.answer(e.ranked) == row.to_conversation()["conversations"][1]["value"]
    assert any(e.ranked != e.candidates for e in examples)  # else the check above could not tell them apart


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text("old\n")

    def boom():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(out, boom())
    assert out.read_text() == "old\n"  # the old file is intact
    assert write_jsonl(out, [{"name": 'bird\'s-foot "trefoil" \u00e9'}]) == 1
    assert json.loads(out.read_text())["name"] == 'bird\'s-foot "trefoil" \u00e9'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_run_finetune_data_on_a_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in range(6):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (root / "notes.txt").write_text("not a class")
    centres = rng.standard_normal((6, 8))

    def embed(paths):
        return np.stack([centres[int(p.split("class_")[1][0])] + 0.1 * rng.standard_normal(8) for p in paths])

    out = tmp_path / "out" / "rank.jsonl"
    summary = run_finetune_data(root, embed, k=3, out=out, seed=0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["rows"] == len(lines) == summary["images_b"] == 12
    assert summary["images_a"] + summary["images_b"] == 24
    a_set = {p for p in read_image_folder(root)[0]} - {r["image"] for r in lines}
    assert len(a_set) == 12
    for r in lines:
        assert len(r["candidates"]) == 3 and r["label"] in r["candidates"] and r["ranked"][0] == r["label"]


def test_run_finetune_data_rejects_bad_embeddings_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError):
        run_finetune_data(tmp_path, lambda p: np.zeros((len(p), 2)), out=tmp_path / "x.jsonl")
    from PIL import Image

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / f"c{c}" / f"{i}.png")
    with pytest.raises(InvalidInputError, match="shape"):
        run_finetune_data(tmp_path, lambda p: np.zeros((len(p) + 1, 2)), out=tmp_path / "x.jsonl", k=2)


def test_finetune_data_cli_on_real_flowers(tmp_path, mobilenet_onnx, shared_path, run_cli):
    flowers = shared_path / "data" / "flowers17"
    if not flowers.is_dir():
        pytest.skip(f"Oxford Flowers not found at {flowers}")
    out = tmp_path / "rank.jsonl"
    msg = run_cli("finetune-data", flowers, "--encoder", mobilenet_onnx, "-k", 5, "--seed", 0, "-o", out)
    assert "340 rows" in msg and "340 images in Da, 340 in Db" in msg
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 340 and len({r["image"] for r in rows}) == 340
    for r in rows:
        assert len(set(r["candidates"])) == 5 and r["label"] in r["candidates"]
        assert r["ranked"][0] == r["label"] and sorted(r["ranked"]) == sorted(r["candidates"])
        assert r["conversations"][1]["value"].startswith(f"1. {r['label']}\n")
