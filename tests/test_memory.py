import json
import os
import zipfile

import numpy as np
import pytest

from rar_edge import HnswParams, Memory
from rar_edge.errors import CorruptFileError, EmptyMemoryError, InvalidInputError, MemoryMismatchError
from rar_edge.index.memory import EncoderRecord


def clustered(n_classes=20, per_class=10, dim=32, noise=0.3, seed=0):
    """Class centroids plus noise: real neighbour structure (unlike i.i.d. vectors)."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = cent[labels] + noise * rng.standard_normal((len(labels), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"class_{i:02d}" for i in labels], cent


def reference_topk(vectors, labels, q, k):
    """Numpy reference: per-class max cosine, top-k classes (ties by first-seen class order)."""
    s = vectors @ (q / np.linalg.norm(q))
    best = {}
    for score, lbl in zip(s, labels):
        best[lbl] = max(best.get(lbl, -np.inf), score)
    order = list(dict.fromkeys(labels))
    return sorted(best.items(), key=lambda kv: (-kv[1], order.index(kv[0])))[:k]


def make(vectors, labels, **kw):
    m = Memory(dim=vectors.shape[1], encoder=EncoderRecord("enc", "/models/enc", "f" * 64, vectors.shape[1]), **kw)
    m.add(vectors, labels)
    return m


def test_search_returns_distinct_classes_matching_reference():
    x, labels, _ = clustered()
    m = make(x, labels, backend="exact")
    rng = np.random.default_rng(5)
    for _ in range(20):
        q = rng.standard_normal(x.shape[1]).astype(np.float32)
        got = m.search(q, k=5)[0]
        ref = reference_topk(x, labels, q, 5)
        assert [c.label for c in got] == [r[0] for r in ref]
        np.testing.assert_allclose([c.score for c in got], [r[1] for r in ref], atol=1e-5)
        assert len({c.label for c in got}) == 5


def test_k_larger_than_classes_and_single_entry():
    m = make(np.eye(4, dtype=np.float32)[:1], ["only"])
    got = m.search(np.ones(4, np.float32), k=10)[0]
    assert [c.label for c in got] == ["only"]
    x, labels, _ = clustered(n_classes=3, per_class=4)
    assert len(make(x, labels).search(x[0], k=50)[0]) == 3


def test_batch_queries_and_bad_queries():
    x, labels, _ = clustered()
    m = make(x, labels)
    out = m.search(x[:7], k=3)
    assert len(out) == 7 and all(len(r) == 3 for r in out)
    assert [r[0].label for r in out] == labels[:7]
    with pytest.raises(InvalidInputError):
        m.search(np.ones(5, np.float32))
    with pytest.raises(InvalidInputError):
        m.search(np.full(x.shape[1], np.nan, np.float32))
    with pytest.raises(InvalidInputError):
        m.search(x[0], k=0)


def test_empty_memory_search_is_a_clear_error():
    m = Memory(dim=8)
    with pytest.raises(EmptyMemoryError, match="empty"):
        m.search(np.ones(8, np.float32))


def test_add_refuses_bad_rows():
    m = Memory(dim=4)
    with pytest.raises(InvalidInputError, match="NaN"):
        m.add(np.array([[np.nan, 0, 0, 1]], np.float32), ["a"])
    with pytest.raises(InvalidInputError, match="zero"):
        m.add(np.zeros((1, 4), np.float32), ["a"])
    with pytest.raises(InvalidInputError, match="labels"):
        m.add(np.ones((2, 4), np.float32), ["a"])
    with pytest.raises(InvalidInputError):
        m.add(np.ones((1, 5), np.float32), ["a"])


def test_remove_by_label_and_ids():
    x, labels, _ = clustered(n_classes=4, per_class=3)
    m = make(x, labels)
    ids = m.ids
    assert m.remove(label="class_01") == 3
    assert "class_01" not in m.classes and m.size == 9
    assert all(c.label != "class_01" for c in m.search(x[3], k=4)[0])
    assert m.remove(ids=[ids[0], ids[1]]) == 2
    assert m.counts()["class_00"] == 1
    with pytest.raises(InvalidInputError):
        m.remove(label="nope")
    # removing every entry leaves an empty memory that refuses to search
    m.remove(ids=m.ids)
    assert m.size == 0 and m.classes == ()
    with pytest.raises(EmptyMemoryError):
        m.search(x[0])


def test_save_load_roundtrip(tmp_path):
    x, labels, _ = clustered()
    m = make(x, labels)
    p = m.save(tmp_path / "m.rarmem")
    m2 = Memory.load(p)
    np.testing.assert_array_equal(m2.vectors, m.vectors)
    assert m2.labels == m.labels and m2.classes == m.classes
    np.testing.assert_array_equal(m2.ids, m.ids)
    assert m2.encoder == m.encoder
    q = x[11]
    assert m2.search(q, k=5) == m.search(q, k=5)
    # ids keep counting after load
    new = m2.add(x[:1], ["extra"])
    assert new[0] == m.ids.max() + 1


def test_crash_during_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    x, labels, _ = clustered()
    p = tmp_path / "m.rarmem"
    make(x[:50], labels[:50]).save(p)
    before = p.read_bytes()
    bigger = make(x, labels)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        bigger.save(p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert Memory.load(p).size == 50
    assert [f.name for f in tmp_path.iterdir()] == ["m.rarmem"]  # no temp files left behind


def test_damaged_or_foreign_files_are_refused(tmp_path):
    x, labels, _ = clustered()
    p = make(x, labels).save(tmp_path / "m.rarmem")
    raw = bytearray(p.read_bytes())
    # flip one byte inside the vectors member's data
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("vectors.npy")
    raw[info.header_offset + 200] ^= 0xFF
    bad = tmp_path / "bad.rarmem"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        Memory.load(bad)
    trunc = tmp_path / "trunc.rarmem"
    trunc.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CorruptFileError):
        Memory.load(trunc)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("meta.json", json.dumps({"format": "something else"}))
    with pytest.raises(CorruptFileError, match="not a rar_edge memory"):
        Memory.load(other)
    with pytest.raises(CorruptFileError, match="no memory file"):
        Memory.load(tmp_path / "missing.rarmem")
    # a tampered meta whose checksums match but whose arrays disagree with it
    with zipfile.ZipFile(p) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(members["meta.json"])
    meta["n_entries"] = 3
    members["meta.json"] = json.dumps(meta).encode()
    tampered = tmp_path / "tampered.rarmem"
    with zipfile.ZipFile(tampered, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(CorruptFileError, match="disagree"):
        Memory.load(tampered)


class _FakeEncoder:
    def __init__(self, dim, fingerprint):
        self.dim, self.fingerprint, self.name, self.path = dim, fingerprint, "other", "/elsewhere"


def test_memory_from_another_encoder_is_refused(tmp_path):
    x, labels, _ = clustered()
    p = make(x, labels).save(tmp_path / "m.rarmem")
    with pytest.raises(MemoryMismatchError, match="built by encoder"):
        Memory.load(p, encoder=_FakeEncoder(x.shape[1], "0" * 64))
    with pytest.raises(MemoryMismatchError, match="-d vectors"):
        Memory.load(p, encoder=_FakeEncoder(x.shape[1] + 1, "f" * 64))
    Memory.load(p, encoder=_FakeEncoder(x.shape[1], "f" * 64))  # the right one loads


def test_hnsw_backend_agrees_with_exact_on_clustered_data(tmp_path):
    x, labels, _ = clustered(n_classes=50, per_class=20, dim=48, noise=0.4, seed=3)
    exact = make(x, labels, backend="exact")
    hnsw = make(x, labels, backend="hnsw", hnsw=HnswParams(M=16, ef_construction=100, ef=64))
    assert hnsw.active_backend == "hnsw"
    rng = np.random.default_rng(0)
    queries = x[rng.choice(len(x), 100, replace=False)] + 0.05 * rng.standard_normal((100, 48)).astype(np.float32)
    agree = 0
    for q in queries:
        e = [c.label for c in exact.search(q, k=5)[0]]
        h = [c.label for c in hnsw.search(q, k=5)[0]]
        assert len(set(h)) == len(h) == 5
        agree += len(set(e) & set(h)) / 5
    assert agree / len(queries) >= 0.95
    # small memories keep their rows in the tail, scanned exactly; compact() puts them in one graph
    hnsw.compact()
    assert hnsw._engine.snapshot.segments[0].hnsw is not None
    # the saved index round-trips and still answers the same
    p = hnsw.save(tmp_path / "h.rarmem")
    loaded = Memory.load(p)
    assert loaded.active_backend == "hnsw" and loaded._engine.snapshot.segments[0].hnsw is not None
    for q in queries[:10]:
        assert loaded.search(q, k=5) == hnsw.search(q, k=5)
    # removals and additions are seen by the index
    loaded.remove(label=labels[0])
    assert all(c.label != labels[0] for c in loaded.search(x[0], k=5)[0])
    loaded.add(x[:1], ["brand_new"])
    assert loaded.search(x[0], k=1)[0][0].label == "brand_new"


def test_auto_backend_switches_by_size(monkeypatch):
    import rar_edge.index.memory as mm

    x, labels, _ = clustered()
    m = make(x, labels)
    assert m.active_backend == "exact"
    monkeypatch.setattr(mm, "AUTO_HNSW_MIN_ENTRIES", 10)
    assert m.active_backend == "hnsw"
    assert m.search(x[0], k=1)[0][0].label == labels[0]


def test_auto_keeps_the_exact_scan_where_ef_cannot_reach_the_kth_class(monkeypatch):
    """20 classes of 10: the 5th class's best row can rank 4 x 10 + 1 = 41st, beyond an ef of 40."""
    import rar_edge.index.memory as mm

    x, labels, _ = clustered()
    monkeypatch.setattr(mm, "AUTO_HNSW_MIN_ENTRIES", 10)
    assert make(x, labels, hnsw=HnswParams(ef=40)).active_backend == "exact"
    assert make(x, labels, hnsw=HnswParams(ef=41)).active_backend == "hnsw"
    m = make(x, labels, hnsw=HnswParams(ef=40))
    assert m.info()["active_backend"] == "exact"
    assert m._backend_for(m._engine.snapshot, k=4) == "hnsw"  # 3 x 10 + 1 = 31 rows suffice for k = 4
    assert [c.label for c in m.search(x[0], k=5)[0]] == [
        c.label for c in make(x, labels, backend="exact").search(x[0], k=5)[0]
    ]


def test_duplicate_vectors_do_not_duplicate_classes():
    v = np.tile(np.eye(6, dtype=np.float32)[:1], (5, 1))
    m = make(v, ["a", "a", "b", "b", "c"])
    got = m.search(v[0], k=5)[0]
    assert sorted(c.label for c in got) == ["a", "b", "c"]
    assert all(abs(c.score - 1.0) < 1e-6 for c in got)
    assert [c.label for c in got] == ["a", "b", "c"]  # ties broken by class order


def test_hnsw_falls_back_to_the_exact_scan_where_one_class_crowds_the_neighbourhood():
    """Thousands of near-copies of one class around the query: the graph alone cannot reach k classes."""
    rng = np.random.default_rng(1)
    c = rng.standard_normal(64)
    big = c + 0.3 * rng.standard_normal((20000, 64))  # hnswlib raised "Cannot return the results" here
    small = rng.standard_normal((64, 64))
    labels = ["a"] * 20000 + [f"o{i // 4}" for i in range(64)]
    hnsw, exact = Memory(dim=64, backend="hnsw"), Memory(dim=64, backend="exact")
    for m in (hnsw, exact):
        m.add(np.vstack([big, small]), labels)
    q = np.vstack([c + 0.3 * rng.standard_normal(64), small[5]])
    got, want = hnsw.search(q, k=5), exact.search(q, k=5)
    assert [[x.label for x in r] for r in got] == [[x.label for x in r] for r in want]
    assert len(got[0]) == 5


def test_k_beyond_the_classes_is_capped_not_allocated():
    import sys

    m = Memory(dim=8)
    m.add(np.eye(8)[:3], ["a", "b", "c"])
    for backend in ("exact", "hnsw"):
        m.backend = backend
        assert [c.label for c in m.search(np.eye(8)[1], k=sys.maxsize)[0]] == ["b", "a", "c"]


def test_labels_must_be_strings_and_large_or_tiny_vectors_normalise():
    m = Memory(dim=4)
    with pytest.raises(InvalidInputError, match="not one string"):
        m.add(np.eye(4)[:3], "dog")
    with pytest.raises(InvalidInputError, match="must be strings, got NoneType"):
        m.add(np.eye(4)[:1], [None])
    m.add(np.array([[1e20, 0, 0, 0], [0, 1e-20, 0, 0]], np.float32), ["big", "tiny"])
    np.testing.assert_allclose(m.vectors, np.eye(4)[:2], atol=1e-7)
    with pytest.raises(InvalidInputError, match="all-zero"):
        m.add(np.zeros((1, 4)), ["z"])


def test_saved_files_get_the_usual_permissions(tmp_path):
    m = Memory(dim=4)
    m.add(np.eye(4)[:2], ["a", "b"])
    mask = os.umask(0)
    os.umask(mask)
    fresh = m.save(tmp_path / "fresh.rarmem")
    assert os.stat(fresh).st_mode & 0o777 == 0o666 & ~mask
    shared = tmp_path / "shared.rarmem"
    shared.write_bytes(b"")
    os.chmod(shared, 0o640)
    m.save(shared)
    assert os.stat(shared).st_mode & 0o777 == 0o640


def test_foreign_zip_and_unusable_hnsw_index(tmp_path, caplog):
    import hashlib

    bad = tmp_path / "foreign.rarmem"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("meta.json", "[]")
    with pytest.raises(CorruptFileError, match="not a rar_edge memory"):
        Memory.load(bad)
    # an HNSW index that cannot be read (another hnswlib, say) is rebuilt from the vectors, with a warning
    v, labels, _ = clustered(n_classes=5, per_class=20, dim=16)
    m = Memory(dim=16, backend="hnsw")
    m.add(v, labels)
    path = m.save(tmp_path / "h.rarmem")
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(members["meta.json"])
    members["hnsw.bin"] = b"\0" * 100
    meta["checksums"]["hnsw.bin"] = hashlib.sha256(members["hnsw.bin"]).hexdigest()
    members["meta.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with caplog.at_level("WARNING", logger="rar_edge"):
        loaded = Memory.load(path)
    assert "rebuilt from the vectors" in caplog.text
    q = v[::7] + 0.01
    assert [[c.label for c in r] for r in loaded.search(q, k=3)] == [[c.label for c in r] for r in m.search(q, k=3)]


def test_labels_with_line_breaks_are_refused():
    """A ranker lists the candidates one per line: a label with any line break could never be ranked."""
    m = Memory(dim=4)
    for bad in ("tulip\n", "a\u2028b", "x\ry"):
        with pytest.raises(InvalidInputError, match="line break"):
            m.add(np.eye(4)[:1], [bad])


# -- storage engine: segments, directory store, mapped loads ------------------------------------------------
@pytest.fixture
def small_segments(monkeypatch):
    import rar_edge.index._store as store

    monkeypatch.setattr(store, "SEAL_ROWS", 64)
    monkeypatch.setattr(store, "HNSW_MIN_ROWS", 100)
    monkeypatch.setattr(store, "MERGE_FAN_IN", 4)
    return store


def test_appends_grow_the_tail_by_doubling(small_segments, monkeypatch):
    """Adding rows in batches of 16 reallocates the tail O(log n) times, not once per batch."""
    monkeypatch.setattr(small_segments, "SEAL_ROWS", 1 << 20)
    m = Memory(dim=8, backend="exact")
    rng = np.random.default_rng(0)
    buffers = set()
    for i in range(500):
        m.add(rng.standard_normal((16, 8)), [f"c{i % 7}"] * 16)
        buffers.add(id(m._engine._tail_v))
    assert m.size == 8000 and len(buffers) <= 8  # 256, 512, ... 8192 rows


def test_segments_merges_and_tombstones_answer_like_one_array(small_segments):
    x, labels, _ = clustered(n_classes=30, per_class=20, dim=24, seed=4)
    m = Memory(dim=24, backend="exact")
    for i in range(0, len(x), 16):
        m.add(x[i : i + 16], labels[i : i + 16])
    assert len(m._engine.snapshot.segments) >= 2
    m.remove(ids=m.ids[::3])
    m.remove(label="class_07")
    keep = [i for i in range(len(x)) if i % 3 and labels[i] != "class_07"]
    ref = make(x[keep], [labels[i] for i in keep], backend="exact")
    assert m.size == ref.size and m.labels == ref.labels
    snap = m._engine.snapshot
    assert snap.n_live_classes == len(snap.live_codes()) == len(ref.classes)  # the writer's count is right
    np.testing.assert_array_equal(m.vectors, ref.vectors)
    rng = np.random.default_rng(1)
    for q in rng.standard_normal((20, 24)).astype(np.float32):
        assert [c.label for c in m.search(q, k=5)[0]] == [c.label for c in ref.search(q, k=5)[0]]
    # a class removed and added again comes back
    m.add(x[labels.index("class_07")], ["class_07"])
    assert "class_07" in m.classes and m.search(x[labels.index("class_07")], k=1)[0][0].label == "class_07"


def test_segment_graphs_are_searched(small_segments):
    x, labels, _ = clustered(n_classes=40, per_class=30, dim=32, noise=0.4, seed=5)
    h = Memory(dim=32, backend="hnsw", hnsw=HnswParams(M=16, ef_construction=100, ef=128))
    e = make(x, labels, backend="exact")
    for i in range(0, len(x), 100):
        h.add(x[i : i + 100], labels[i : i + 100])
    assert any(s.hnsw is not None for s in h._engine.snapshot.segments)
    rng = np.random.default_rng(0)
    qs = x[rng.choice(len(x), 50, replace=False)] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    agree = np.mean(
        [len({c.label for c in h.search(q, k=5)[0]} & {c.label for c in e.search(q, k=5)[0]}) / 5 for q in qs]
    )
    assert agree >= 0.95


def test_directory_store_saves_only_what_changed(small_segments, tmp_path):
    x, labels, _ = clustered(n_classes=10, per_class=30, dim=16)
    m = make(x, labels)
    store = m.save(tmp_path / "m.rarmemd")
    first = {p.name: p.stat().st_ino for p in store.iterdir()}
    m.add(x[:5] + 0.01, ["new"] * 5)
    m.save(store)
    second = {p.name: p.stat().st_ino for p in store.iterdir()}
    kept = {n for n in first if n != "MANIFEST.json"}
    assert kept <= set(second) and all(first[n] == second[n] for n in kept)  # old segment files untouched
    new_files = set(second) - set(first)
    assert new_files and all(".d" not in n for n in new_files)
    written = sum((store / n).stat().st_size for n in new_files)
    assert written < 2_000  # 5 rows of 16 floats and their ids, codes, sources
    m.remove(ids=m.ids[:2])
    m.save(store)
    third = set(p.name for p in store.iterdir())
    assert any(".d2-" in n for n in third - set(second))  # a tombstone file, not a rewrite
    back = Memory.load(store)
    assert same_memory(back, m)
    assert back.search(x[7], k=3) == m.search(x[7], k=3)
    # a folder that is not a store is not written into
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="not a memory store"):
        m.save(other, layout="dir")


def same_memory(a, b) -> bool:
    return (
        a.size == b.size
        and np.array_equal(a.vectors, b.vectors)
        and a.labels == b.labels
        and np.array_equal(a.ids, b.ids)
        and a.sources == b.sources
        and a.classes == b.classes
    )


@pytest.mark.parametrize("storage", ["float32", "int8_rerank"])
@pytest.mark.parametrize("suffix", [".rarmem", ".rarmemd"])
def test_mmap_loads_map_the_vectors_and_answer_the_same(tmp_path, storage, suffix):
    x, labels, _ = clustered(n_classes=20, per_class=20, dim=32)
    m = make(x, labels, storage=storage)
    p = m.save(tmp_path / f"m{suffix}")
    whole, mapped = Memory.load(p), Memory.load(p, mmap=True)
    seg = mapped._engine.snapshot.segments[0]
    assert isinstance(seg.vectors.base, np.memmap) or isinstance(seg.vectors, np.memmap)
    if storage == "int8_rerank":
        assert isinstance(seg.store._v, np.memmap) or isinstance(seg.store._v.base, np.memmap)
    assert same_memory(whole, mapped)
    for q in x[::17]:
        assert mapped.search(q, k=5) == whole.search(q, k=5) == m.search(q, k=5)
    mapped.add(-x[:2], ["more", "more"])  # a mapped memory takes writes (new rows live in RAM)
    assert mapped.search(-x[0], k=1)[0][0].label == "more"


def test_merging_memories_needs_the_same_encoder():
    x, labels, _ = clustered()
    a, b = make(x, labels), make(x[:10], labels[:10])
    assert len(a.add_memory(b)) == 10 and a.size == len(x) + 10
    c = Memory(dim=x.shape[1], encoder=EncoderRecord("other", "/m", "0" * 64, x.shape[1]))
    c.add(x[:3], labels[:3])
    with pytest.raises(MemoryMismatchError, match="different encoders"):
        a.add_memory(c)


def test_merged_segments_carry_the_int8_rows_they_were_quantised_to(small_segments, monkeypatch):
    from rar_edge.index.lookup import quantize_int8

    monkeypatch.setattr(small_segments, "SEAL_ROWS", 256)  # above RERANK_MIN_ROWS: int8 copies exist
    x, labels, _ = clustered(n_classes=10, per_class=300, dim=16, seed=2)
    m = Memory(dim=16, backend="exact", storage="int8_rerank")
    for i in range(0, len(x), 100):
        m.add(x[i : i + 100], labels[i : i + 100])
    m.remove(ids=m.ids[::4])
    m.compact()
    (seg,) = m._engine.snapshot.segments
    q8, scales = quantize_int8(seg.vectors)
    np.testing.assert_array_equal(seg.store._v, q8)
    np.testing.assert_array_equal(seg.store._scales, scales)
