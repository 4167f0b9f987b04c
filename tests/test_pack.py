"""Packs and the memory editing commands on the real MobileNet embedder: a pack copied anywhere classifies
like the original; a memory whose encoder moved says which one to pass; the CLI edits memories and never
overwrites anything but a memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rar_edge import Encoder, EncoderConfig, Memory, Pipeline
from rar_edge.errors import CorruptFileError, InvalidInputError
from rar_edge.pack import open_pack, write_pack

from conftest import linked_flowers


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return linked_flowers(tmp_path_factory.mktemp("flowers"), ["daisy", "sunflower", "tulip"], 6)


@pytest.fixture(scope="module")
def built(tmp_path_factory, mobilenet_onnx, flowers):
    """An encoder folder of its own (so tests can move it) and a memory built with it."""
    work = tmp_path_factory.mktemp("pack")
    enc_dir = work / "encoder"
    shutil.copytree(mobilenet_onnx, enc_dir)
    enc = Encoder(enc_dir, config=EncoderConfig(threads=1))
    mem = Memory.from_folder(flowers, encoder=enc, shots=4, seed=0, progress=False)
    mem_path = mem.save(work / "m.rarmem")
    queries = [sorted((flowers / c).glob("*.jpg"))[-1] for c in ("daisy", "sunflower", "tulip")]
    return work, enc_dir, mem_path, queries


def _cli(*args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "rar_edge", "-q", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_a_copied_pack_classifies_like_the_original(built, tmp_path):
    work, enc_dir, mem_path, queries = built
    pack = write_pack(tmp_path / "pack", memory=mem_path)
    moved = tmp_path / "elsewhere" / "copied-pack"
    shutil.copytree(pack, moved)
    shutil.rmtree(pack)
    original = Pipeline(memory=mem_path, encoder=enc_dir)
    copied = Pipeline(pack=moved)
    assert copied.encoder.path.resolve() == (moved / "encoder").resolve()
    for q in queries:
        a, b = original.classify(q), copied.classify(q)
        assert a.label == b.label and [c.label for c in a.candidates] == [c.label for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-6)
    out = json.loads(_cli("classify", *queries, "--pack", moved, "--json").stdout)
    assert [r["label"] for r in out] == [original.classify(q).label for q in queries]


def test_a_damaged_or_foreign_pack_is_refused(built, tmp_path):
    _, _, mem_path, _ = built
    pack = write_pack(tmp_path / "pack", memory=mem_path)
    onnx = next((pack / "encoder").glob("*.onnx"))
    raw = bytearray(onnx.read_bytes())
    raw[len(raw) // 2] ^= 1
    onnx.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        open_pack(pack)
    desc = json.loads((pack / "pack.json").read_text())
    desc["memory"] = "../../etc/passwd"
    (pack / "pack.json").write_text(json.dumps(desc))
    with pytest.raises(CorruptFileError):
        open_pack(pack, verify=False)
    with pytest.raises(CorruptFileError, match="not a pack"):
        open_pack(tmp_path)


def test_pack_never_replaces_anything_but_a_pack(built, tmp_path):
    _, _, mem_path, _ = built
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not yours to delete")
    with pytest.raises(InvalidInputError, match="not a pack"):
        write_pack(photo, memory=mem_path)
    assert photo.read_bytes() == b"not yours to delete"
    pack = write_pack(tmp_path / "p", memory=mem_path)
    with pytest.raises(InvalidInputError, match="--overwrite"):
        write_pack(pack, memory=mem_path)
    write_pack(pack, memory=mem_path, overwrite=True)
    open_pack(pack)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_memory_whose_encoder_moved_names_it(built, tmp_path):
    work, enc_dir, mem_path, queries = built
    moved_enc = tmp_path / "moved-encoder"
    shutil.copytree(enc_dir, moved_enc)
    mem = Memory.load(mem_path)
    mem.encoder = type(mem.encoder)(
        mem.encoder.name,
        str(tmp_path / "gone"),
        mem.encoder.fingerprint,
        mem.encoder.embedding_dim,
        mem.encoder.preprocess_fingerprint,
    )
    p = mem.save(tmp_path / "m.rarmem")
    with pytest.raises(InvalidInputError, match=r"fingerprint [0-9a-f]{12}.*--encoder") as e:
        Pipeline(memory=p)
    assert str(tmp_path / "gone") in str(e.value) and mem.encoder.name in str(e.value)
    r = _cli("classify", queries[0], "--memory", p, check=False)
    assert r.returncode == 2 and "--encoder" in r.stderr
    assert (
        Pipeline(memory=p, encoder=moved_enc).classify(queries[0]).label
        == Pipeline(memory=mem_path, encoder=enc_dir).classify(queries[0]).label
    )


def test_cli_edits_memories_in_place_and_to_new_files(built, flowers, tmp_path):
    work, enc_dir, mem_path, queries = built
    m = tmp_path / "m.rarmemd"
    shutil.copy(mem_path, tmp_path / "src.rarmem")
    _cli("memory", "export", tmp_path / "src.rarmem", "-o", tmp_path / "copy.rarmem")
    Memory.load(tmp_path / "src.rarmem").save(m)  # a directory store
    before = Memory.load(m)
    new_photos = sorted((flowers / "daisy").glob("*.jpg"))[4:6]
    _cli("memory", "add", m, *new_photos, "--label", "daisy two")
    after = Memory.load(m)
    assert after.size == before.size + 2 and after.counts()["daisy two"] == 2
    _cli("memory", "remove", m, "--label", "daisy two")
    assert Memory.load(m).size == before.size and "daisy two" not in Memory.load(m).classes
    ids = Memory.load(m).ids[:3].tolist()
    _cli("memory", "remove", m, "--ids", *ids, "-o", tmp_path / "fewer.rarmem")
    assert Memory.load(tmp_path / "fewer.rarmem").size == before.size - 3
    _cli("memory", "merge", tmp_path / "fewer.rarmem", tmp_path / "copy.rarmem", "-o", tmp_path / "merged.rarmem")
    assert Memory.load(tmp_path / "merged.rarmem").size == 2 * before.size - 3
    _cli("memory", "export", m, "-o", tmp_path / "exported.rarmem")
    ex = Memory.load(tmp_path / "exported.rarmem")
    assert ex.size == before.size and ex.classes == before.classes


def test_cli_never_overwrites_other_files_and_checks_before_embedding(built, flowers, tmp_path):
    work, enc_dir, mem_path, _ = built
    model = next(enc_dir.glob("*.onnx"))
    before = model.read_bytes()
    for args in (
        ["memory", "build", flowers, "--encoder", enc_dir, "-o", model, "--overwrite"],
        ["memory", "export", mem_path, "-o", model, "--overwrite"],
        ["memory", "merge", mem_path, mem_path, "-o", model, "--overwrite"],
    ):
        r = _cli(*args, check=False)
        assert r.returncode == 2 and "not a memory" in r.stderr, r.stderr
    assert model.read_bytes() == before
    # an existing memory needs --overwrite; the refusal comes before any embedding (a missing encoder
    # folder would fail later, so it shows the order)
    r = _cli("memory", "build", flowers, "--encoder", tmp_path / "no-such-encoder", "-o", mem_path, check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    out = tmp_path / "fresh.rarmem"
    _cli("memory", "build", flowers, "--encoder", enc_dir, "--shots", "1", "-o", out)
    _cli("memory", "build", flowers, "--encoder", enc_dir, "--shots", "2", "-o", out, "--overwrite")
    assert Memory.load(out).size == 6
    merged = _cli("memory", "merge", out, out, "-o", out, check=False)
    assert merged.returncode == 2 and "--overwrite" in merged.stderr


def test_a_pack_carries_its_ranker(built, tmp_path, caplog):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from rar_edge_export.tiny_models import write_tiny_text_gguf

    _, _, mem_path, queries = built
    gguf = write_tiny_text_gguf(tmp_path / "tiny.gguf", seed=0)
    pack = write_pack(tmp_path / "pack", memory=mem_path, ranker=gguf)
    copied = shutil.copytree(pack, tmp_path / "copy")
    shutil.rmtree(pack)
    gguf.unlink()
    opened = open_pack(copied)
    assert opened.ranker is not None and opened.ranker.parent == (copied / "ranker").resolve()
    with Pipeline(pack=copied) as pipe:
        assert pipe.ranker is not None
        with caplog.at_level("WARNING", logger="rar_edge"):
            r = pipe.classify(queries[0])
        assert "no vision projector" in caplog.text  # the tiny model is text only: it ranks the names
        assert r.ranker_ran and {c.label for c in r.candidates} <= set(Memory.load(mem_path).classes)
