"""The directory store: a memory saved as immutable segment files plus a manifest (the commit point).

::

    NAME.rarmemd/
      MANIFEST.json            format, the memory's settings, the class table, next id, and per segment its
                               files with their sha256; replaced atomically, after the files it names are
      seg-<uid>.v.npy          float32 vectors        seg-<uid>.c.npy   int32 class codes (1-based)
      seg-<uid>.i.npy          int64 ids              seg-<uid>.s.json  sources
      seg-<uid>.q.npy/.qs.npy  int8 copy + scales (int8 storages)   seg-<uid>.h.bin  HNSW graph (optional)
      seg-<uid>.d<n>-<tag>.npy rows of the segment removed since it was written (int64 row numbers)

A save seals the memory's unsealed rows into a segment, writes the files of segments the store does not
hold yet (a segment's uid names its rows, so a file once written is never rewritten) and a new tombstone
file for a segment that lost rows, then swaps the manifest and deletes what no manifest names.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rar_edge._fs import atomic_write
from rar_edge.errors import CorruptFileError, InvalidInputError, MissingDependencyError
from rar_edge.index import _files, _store

if TYPE_CHECKING:
    from rar_edge.index.memory import Memory

_UID = re.compile(r"^[0-9a-f]{16}$")


def save_store(mem: "Memory", path: Path) -> None:
    """Saves ``mem`` into the store at ``path`` (created when missing), writing only what it lacks."""
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{path} exists and is not a memory store folder")
    path.mkdir(parents=True, exist_ok=True)
    if not _files.is_store(path) and any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise InvalidInputError(
            f"{path} is a folder that holds other files, not a memory store: refusing to write into it"
        )
    with _files.folder_lock(path, wait=True):
        try:
            old = _files.read_manifest(path) if _files.is_store(path) else None
        except CorruptFileError:
            old = None  # a damaged manifest: write every segment again
        snap = mem._engine.seal()
        old_segs = {s.get("uid"): s for s in (old or {}).get("segments", []) if isinstance(s, dict)}
        int8 = mem.storage in ("int8", "int8_rerank")
        records = []
        for seg in snap.segments:
            rec = old_segs.get(seg.uid)
            files = None
            if rec and rec.get("n") == seg.n and isinstance(rec.get("files"), dict):
                files = {r: f for r, f in rec["files"].items() if r != "d"}
                if not all(isinstance(f, dict) and (path / str(f.get("name"))).is_file() for f in files.values()):
                    files = None
            if files is None:
                files = _write_segment(path, seg, int8=int8)
            elif seg.hnsw is not None and "h" not in files:
                files["h"] = _files.write_bytes_member(path, f"seg-{seg.uid}.h.bin", _graph_blob(seg.hnsw))
            if seg.n_dead:
                d_old = rec["files"].get("d") if rec and isinstance(rec.get("files"), dict) else None
                if d_old and rec.get("n_dead") == seg.n_dead and (path / str(d_old.get("name"))).is_file():
                    files["d"] = d_old
                else:
                    dead = np.flatnonzero(seg.labels == 0).astype(np.int64)
                    files["d"] = _files.write_array_member(
                        path, f"seg-{seg.uid}.d{seg.n_dead}-{secrets.token_hex(4)}.npy", dead
                    )
            records.append({"uid": seg.uid, "n": seg.n, "n_dead": seg.n_dead, "files": files})
        manifest = {
            "format": _files.STORE_FORMAT,
            "format_version": _files.STORE_FORMAT_VERSION,
            "memory": mem._meta(),
            "classes": list(snap.names[1 : snap.n_codes]),
            "next_id": snap.next_id,
            "n_entries": snap.n_live,
            "segments": records,
        }
        manifest["checksum"] = _files.manifest_checksum(manifest)
        with atomic_write(path / _files.MANIFEST, "w") as f:  # the commit point
            json.dump(manifest, f, indent=1)
        _files.clean_store(path, _files.referenced(manifest))


def _write_segment(path: Path, seg: _store.Segment, *, int8: bool) -> dict:
    base = f"seg-{seg.uid}"
    files = {
        "v": _files.write_array_member(path, f"{base}.v.npy", np.asarray(seg.vectors)),
        "c": _files.write_array_member(path, f"{base}.c.npy", np.asarray(seg.codes)),
        "i": _files.write_array_member(path, f"{base}.i.npy", np.asarray(seg.ids)),
        "s": _files.write_bytes_member(path, f"{base}.s.json", json.dumps(list(seg.sources)).encode()),
    }
    if int8 and seg.store._scales is not None:
        files["q"] = _files.write_array_member(path, f"{base}.q.npy", np.asarray(seg.store._v))
        files["qs"] = _files.write_array_member(path, f"{base}.qs.npy", np.asarray(seg.store._scales))
    if seg.hnsw is not None:
        files["h"] = _files.write_bytes_member(path, f"{base}.h.bin", _graph_blob(seg.hnsw))
    return files


def _graph_blob(index: Any) -> bytes:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "hnsw.bin")
        index.save_index(p)
        with open(p, "rb") as f:
            return f.read()


#: Opens retried when a save in another process committed a new manifest (and deleted files the one read
#: named) while this open was reading.
_OPEN_ATTEMPTS = 5


def load_store(cls: type["Memory"], path: Path, *, mmap: bool) -> "Memory":
    """Opens the store at ``path``: every file named by the manifest is checked against its sha256."""
    for attempt in range(_OPEN_ATTEMPTS):
        version = _files.manifest_version(path)
        try:
            return _load_once(cls, path, mmap=mmap)
        except CorruptFileError:
            if attempt + 1 == _OPEN_ATTEMPTS or _files.manifest_version(path) == version:
                raise  # the store did not change under this open: it is damaged
    raise AssertionError("unreachable")  # pragma: no cover


def _load_once(cls: type["Memory"], path: Path, *, mmap: bool) -> "Memory":
    from rar_edge.index.memory import _check_ids

    try:
        with _files.folder_lock(path, wait=False) as got:
            m = _files.read_manifest(path)
            if got:  # no save is running: files a killed save left can go
                _files.clean_store(path, _files.referenced(m))
        meta = m.get("memory")
        if not isinstance(meta, dict):
            raise CorruptFileError(f"{path}: the manifest has no memory settings")
        mem = cls._from_meta(meta, path)
        classes = m["classes"]
        if (
            not isinstance(classes, list)
            or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise CorruptFileError(f"{path}: bad class table")
        mem._engine.set_names(classes)
        n_codes = len(classes) + 1
        segments, all_ids = [], []
        for rec in m["segments"]:
            if (
                not isinstance(rec, dict)
                or not _UID.match(str(rec.get("uid")))
                or not isinstance(rec.get("files"), dict)
            ):
                raise CorruptFileError(f"{path}: bad segment record")
            n = rec.get("n")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise CorruptFileError(f"{path}: bad segment size {n!r}")
            files = rec["files"]
            for role in ("v", "c", "i", "s"):
                if role not in files:
                    raise CorruptFileError(f"{path}: segment {rec['uid']} lacks its {role!r} file")
            v = _files.read_store_array(path, files["v"], dtype=np.float32, shape=(n, mem.dim), mmap=mmap)
            codes = _files.read_store_array(path, files["c"], dtype=np.int32, shape=(n,), mmap=False)
            if codes.min() < 1 or codes.max() >= n_codes:
                raise CorruptFileError(f"{path}: class codes outside the class table")
            ids = _files.read_store_array(path, files["i"], dtype=np.int64, shape=(n,), mmap=False)
            sources = json.loads(_files.read_store_bytes(path, files["s"]))
            if not isinstance(sources, list) or len(sources) != n:
                raise CorruptFileError(f"{path}: sources disagree with the segment")
            q8 = scales = None
            if "q" in files and "qs" in files:
                q8 = _files.read_store_array(path, files["q"], dtype=np.int8, shape=(n, mem.dim), mmap=mmap)
                scales = _files.read_store_array(path, files["qs"], dtype=np.float32, shape=(n,), mmap=False)
            labels = codes
            if "d" in files:
                nd = rec.get("n_dead")
                if not isinstance(nd, int) or isinstance(nd, bool) or not 0 < nd <= n:
                    raise CorruptFileError(f"{path}: bad tombstone count {nd!r}")
                dead = _files.read_store_array(path, files["d"], dtype=np.int64, shape=(nd,), mmap=False)
                if dead.min() < 0 or dead.max() >= n or len(np.unique(dead)) != nd:
                    raise CorruptFileError(f"{path}: bad tombstones")
                labels = codes.copy()
                labels[dead] = 0
            graph = None
            if "h" in files:
                try:
                    graph = mem._read_graph(_files.read_store_bytes(path, files["h"]), v)
                except ImportError:  # pragma: no cover - the exact scan answers without hnswlib
                    graph = None
            segments.append(
                _store.make_segment(
                    v,
                    codes,
                    ids,
                    [str(x) for x in sources],
                    storage=mem.storage,
                    uid=rec["uid"],
                    labels=labels,
                    q8=q8,
                    scales=scales,
                    hnsw=graph,
                )
            )
            all_ids.append(ids)
        next_id = _check_ids(np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64), m.get("next_id"), path)
        mem._engine.load(segments, next_id)
    except (CorruptFileError, MissingDependencyError):
        raise
    except Exception as e:  # noqa: BLE001 - damaged files raise anything from json, numpy, hnswlib
        raise CorruptFileError(f"{path} is not a readable rar_edge memory store: {type(e).__name__}: {e}") from e
    return mem
