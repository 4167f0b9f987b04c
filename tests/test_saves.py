"""What a save promises, observed: the new file is fsynced before it is renamed over the old one, the folder is
fsynced after the rename, the temporary file sits beside the target and is gone after an error, permissions
are kept; and what a load promises: a ``.rarmem`` member whose bytes changed is refused by its sha256 even when
its zip CRC-32 was rewritten to match (so the zip's own check cannot be what catches it).

Memories are used through `Memory.save` / `Memory.load` and the documented file format only (a stored zip with
``meta.json`` holding every other member's sha256), not through the memory's internals.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from rar_edge import Memory
from rar_edge._fs import atomic_write, remove_stale_temps, umask, write_bytes, write_text
from rar_edge.errors import CorruptFileError
from rar_edge.tools.finetune_data import write_jsonl

CLASSES = ("daisy", "tulip", "rose")


def _memory(n: int = 9, dim: int = 8) -> Memory:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    mem = Memory(dim=dim)
    mem.add(v, [CLASSES[i % len(CLASSES)] for i in range(n)], sources=[f"s{i}" for i in range(n)])
    return mem


WRITERS = {
    "memory": lambda p: _memory().save(p),
    "bytes": lambda p: write_bytes(p, b"\x00new bytes"),
    "text": lambda p: write_text(p, "new text\n"),
    "jsonl": lambda p: write_jsonl(p, [{"a": 1}, {"b": 2}]),
}
NAMES = {"memory": "m.rarmem", "bytes": "out.bin", "text": "out.txt", "jsonl": "rows.jsonl"}


class _Recorder:
    """Wraps os.fsync and os.replace, recording what each was called on, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail_on: str | None = None) -> None:
        self.calls: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            self.calls.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
            if fail_on == "fsync" and not stat.S_ISDIR(st.st_mode):
                raise OSError(5, "injected fsync failure")
            return real_fsync(fd)

        def replace(src, dst, **kw):
            src, dst = Path(os.fsdecode(src)), Path(os.fsdecode(dst))
            self.calls.append(("replace", src, dst, src.exists()))
            if fail_on == "replace":
                raise OSError(28, "injected rename failure")
            return real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_file_fsynced_before_the_rename_and_folder_after(tmp_path, monkeypatch, kind, existing):
    path = tmp_path / "out" / NAMES[kind]
    if existing:
        path.parent.mkdir()
        path.write_bytes(b"old")
    rec = _Recorder(monkeypatch)
    WRITERS[kind](path)
    monkeypatch.undo()
    renames = [i for i, c in enumerate(rec.calls) if c[0] == "replace" and c[2] == path]
    assert len(renames) == 1, rec.calls
    r = renames[0]
    _, src, _, src_existed = rec.calls[r]
    # the temporary file: beside the target (a rename within one folder is atomic), hidden, gone now
    assert src_existed and src.parent == path.parent and src.name.startswith(f".{path.name}.") and not src.exists()
    ino_file, ino_dir = path.stat().st_ino, path.parent.stat().st_ino  # a rename keeps the inode
    assert ("fsync", "file", ino_file) in rec.calls[:r], "the new file's data is not fsynced before the rename"
    assert ("fsync", "dir", ino_dir) in rec.calls[r + 1 :], "the folder is not fsynced after the rename"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("fail_on", ["fsync", "replace"])
def test_an_error_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, kind, fail_on):
    path = tmp_path / NAMES[kind]
    path.write_bytes(b"the previous contents")
    _Recorder(monkeypatch, fail_on=fail_on)
    with pytest.raises(OSError, match="injected"):
        WRITERS[kind](path)
    monkeypatch.undo()
    assert path.read_bytes() == b"the previous contents"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_exception_inside_atomic_write_removes_the_temporary_file(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(path) as f:
            f.write(b"partial")
            assert [p.parent for p in tmp_path.iterdir()] == [tmp_path]  # the temporary file, beside the target
            raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", list(WRITERS))
def test_permissions_are_kept_and_new_files_follow_the_umask(tmp_path, kind):
    kept = tmp_path / NAMES[kind]
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    WRITERS[kind](kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    new = tmp_path / "new" / NAMES[kind]
    WRITERS[kind](new)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask()  # not mkstemp's 0600


def test_stale_temporary_files_are_removed_by_age(tmp_path):
    """What a killed writer left beside the target (``.NAME.*.tmp``) goes; a younger one (a writer at work) and
    other files stay."""
    path = tmp_path / "m.rarmem"
    old, young = tmp_path / ".m.rarmem.k1.tmp", tmp_path / ".m.rarmem.k2.tmp"
    others = [tmp_path / ".other.rarmem.k3.tmp", tmp_path / "m.rarmem.tmp", path]
    for f in (old, young, *others):
        f.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert remove_stale_temps(path, older_than_s=60) == [old]
    assert remove_stale_temps(path) == [young]
    assert sorted(tmp_path.iterdir()) == sorted(others)


# --- loads: every member's sha256, on its own ---------------------------------------------------------------


def _change_member(path: Path, member: str, change, *, fix_crc: bool) -> None:
    """Changes a stored member's bytes in place (same length); with ``fix_crc`` also writes the new CRC-32
    into its local and central headers (or its data descriptor), so the zip's own checks pass."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        zi, central = z.getinfo(member), z.start_dir
    assert zi.compress_type == zipfile.ZIP_STORED
    off = zi.header_offset
    assert data[off : off + 4] == b"PK\x03\x04"
    flags = struct.unpack_from("<H", data, off + 6)[0]
    n_name, n_extra = struct.unpack_from("<HH", data, off + 26)
    start = off + 30 + n_name + n_extra
    body = bytearray(data[start : start + zi.file_size])
    before = bytes(body)
    change(body)
    assert len(body) == zi.file_size
    data[start : start + len(body)] = body
    if fix_crc:
        crc = struct.pack("<I", zlib.crc32(body))
        if flags & 0x08:  # CRC in a data descriptor after the data (optional signature first)
            d = start + len(body)
            at = d + 4 if data[d : d + 4] == b"PK\x07\x08" else d
            data[at : at + 4] = crc
        else:
            data[off + 14 : off + 18] = crc
        pos = central
        while data[pos : pos + 4] == b"PK\x01\x02":
            n, e, c = struct.unpack_from("<HHH", data, pos + 28)
            if data[pos + 46 : pos + 46 + n].decode() == member:
                data[pos + 16 : pos + 20] = crc
            pos += 46 + n + e + c
    path.write_bytes(bytes(data))
    assert (bytes(body) != before) == (change is not _same)


def _same(body: bytearray) -> None:
    pass


def _last_float(body: bytearray) -> None:
    v = struct.unpack("<f", body[-4:])[0]
    body[-4:] = struct.pack("<f", v + 0.5)


def _last_label(body: bytearray) -> None:  # another class, still a valid index
    v = struct.unpack("<i", body[-4:])[0]
    body[-4:] = struct.pack("<i", (v + 1) % len(CLASSES))


def _a_source(body: bytearray) -> None:
    i = bytes(body).index(b"s8")
    body[i : i + 2] = b"s7"


TAMPER = {"vectors.npy": _last_float, "labels.npy": _last_label, "sources.json": _a_source}


@pytest.fixture()
def saved(tmp_path) -> Path:
    return _memory().save(tmp_path / "m.rarmem")


def test_the_tampering_helper_keeps_a_file_loadable(saved):
    """Rewriting a member with its own bytes and CRC changes nothing: what fails below fails for the bytes."""
    for member in TAMPER:
        _change_member(saved, member, _same, fix_crc=True)
    mem = Memory.load(saved)
    want = _memory()
    np.testing.assert_array_equal(mem.vectors, want.vectors)
    assert mem.labels == want.labels and mem.sources == want.sources


@pytest.mark.parametrize("member", list(TAMPER))
def test_a_member_with_a_matching_crc_but_another_sha256_is_refused(saved, member):
    _change_member(saved, member, TAMPER[member], fix_crc=True)
    with zipfile.ZipFile(saved) as z:
        assert z.testzip() is None  # the zip's CRC-32 check passes: only the sha256 can catch this
        assert member in json.loads(z.read("meta.json"))["checksums"]
    with pytest.raises(CorruptFileError, match=re.escape(member)):
        Memory.load(saved)


@pytest.mark.parametrize("member", list(TAMPER))
def test_a_member_with_a_wrong_crc_is_refused(saved, member):
    _change_member(saved, member, TAMPER[member], fix_crc=False)
    with pytest.raises(CorruptFileError):
        Memory.load(saved)


# --- what a save holds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["float32", "int8_rerank"])
def test_a_save_after_removals_holds_exactly_the_live_entries(tmp_path, storage):
    """Entries removed before a save (from the entries loaded and from ones added after the load) are not in
    the file, and the rest keep their ids, labels, sources, vectors and search results."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal((14, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = [CLASSES[i % len(CLASSES)] for i in range(14)]
    mem = Memory(dim=8, storage=storage)
    first = mem.add(v[:9], labels[:9], sources=[f"s{i}" for i in range(9)])
    mem = Memory.load(mem.save(tmp_path / "a.rarmem"))  # reopened, as an app would between batches
    later = mem.add(v[9:], labels[9:], sources=[f"s{i}" for i in range(9, 14)])
    assert mem.remove(ids=[int(first[1]), int(first[4]), int(later[2])]) == 3
    keep = [i for i in range(14) if i not in (1, 4, 11)]
    mem.save(tmp_path / "b.rarmem")
    back = Memory.load(tmp_path / "b.rarmem")
    assert back.size == 11 and back.counts() == {"daisy": 5, "tulip": 3, "rose": 3}  # 1, 4: tulip; 11: rose
    assert back.ids.tolist() == [int(np.concatenate([first, later])[i]) for i in keep]
    assert back.labels == tuple(labels[i] for i in keep) and back.sources == tuple(f"s{i}" for i in keep)
    np.testing.assert_array_equal(back.vectors, mem.vectors)  # bit for bit what the memory held
    np.testing.assert_allclose(back.vectors, v[keep], atol=1e-6)
    q = v[[0, 5, 12]] + 0.01
    assert back.search(q, k=3) == mem.search(q, k=3)


def test_an_empty_memory_saves_and_loads(tmp_path):
    back = Memory.load(Memory(dim=8).save(tmp_path / "empty.rarmem"))
    assert back.size == 0 and back.dim == 8 and back.classes == ()
