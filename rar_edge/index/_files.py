"""Memory files: the single-file ``.rarmem`` (export and transport) and the directory store (incremental saves).

Single file: an uncompressed zip of ``vectors.npy`` (float32), ``labels.npy`` (int32, index into the meta's
``classes``), ``ids.npy`` (int64), ``sources.json``, for int8 storages ``q8.npy`` + ``q8_scales.npy``, for HNSW
``hnsw.bin``, and ``meta.json`` with the sha256 of every other member. Array members start 64-byte aligned
(a padding extra field, as Android's zipalign does), so ``mmap=True`` maps them straight from the file.
Members are streamed in and out (no whole-file copy in RAM) and the sha256 is checked while reading.

Directory store: immutable segment files (``seg-<uid>.<role>``) and ``MANIFEST.json``, the commit point,
replaced atomically after the files it names are durable. A save writes only segments the store does not
hold yet (plus a small tombstone file for a segment that lost rows); files no manifest names (left by a
killed save) are deleted by the next save or open.

Writers hold an exclusive `flock` on the folder (the file's folder, or the store itself) while they save;
an open cleans stale temporaries only when it can take that lock at once, so it never deletes the
temporary file of a save in progress in another process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from rar_edge._fs import TEMP_SUFFIX, atomic_write, remove_stale_temps
from rar_edge.errors import CorruptFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder locks; stale temporaries stay until removed
    fcntl = None  # type: ignore[assignment]

MANIFEST = "MANIFEST.json"
STORE_FORMAT = "rar_edge.memory_store"
STORE_FORMAT_VERSION = 1
STORE_SUFFIX = ".rarmemd"
_ALIGN = 64
_CHUNK = 1 << 22
_SEGMENT_FILE = re.compile(r"^seg-[0-9a-f]{16}\.")


# -- locks -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def folder_lock(folder: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive flock on ``folder``; yields whether it was taken (``wait=False`` may fail to)."""
    if fcntl is None:  # pragma: no cover
        yield wait
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# -- npy streams -----------------------------------------------------------------------------------------
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


class _Hashing:
    """A write-through wrapper that hashes what passes."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: Any) -> None:
        if isinstance(b, np.ndarray):
            b = b.reshape(-1).view(np.uint8)  # a view: the block is C-contiguous
        mv = memoryview(b).cast("B")
        self.h.update(mv)
        self.f.write(mv)
        self.n += len(mv)


def _write_rows(
    out: _Hashing,
    parts: Sequence[tuple[np.ndarray, np.ndarray | None]],
    dtype: np.dtype,
    row_shape: tuple[int, ...],
    n: int,
) -> None:
    """Writes an npy array of ``n`` rows from (array, keep-mask or None) parts, in chunks."""
    out.write(_npy_header(dtype, (n, *row_shape)))
    for a, keep in parts:
        step = max(1, _CHUNK // max(1, a[:1].nbytes))
        for i in range(0, len(a), step):
            block = a[i : i + step]
            if keep is not None:
                block = block[keep[i : i + step]]
            out.write(np.ascontiguousarray(block, dtype=dtype))


def _read_npy(
    stream: IO[bytes], *, dtype: np.dtype, shape: tuple[int, ...], h: Any, into: bool, limit: int
) -> tuple[np.ndarray | None, int]:
    """Reads an npy array from ``stream`` (checking dtype and shape before allocating), hashing every byte;
    returns (the array, or None when ``into`` is False, and the header's length)."""
    head = stream.read(10)
    h.update(head)
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise CorruptFileError("not an npy array")
    major = head[6]
    hl = struct.unpack("<H", head[8:10])[0] if major == 1 else None
    if hl is None:
        more = stream.read(2)
        h.update(more)
        hl = struct.unpack("<I", head[8:10] + more)[0]
        start = 12
    else:
        start = 10
    if hl > 1 << 16:
        raise CorruptFileError("npy header too long")
    raw = stream.read(hl)
    h.update(raw)
    # the readers take the stream just after the magic and version
    header = (
        np.lib.format.read_array_header_1_0(io.BytesIO(head[8:10] + raw))
        if major == 1
        else np.lib.format.read_array_header_2_0(io.BytesIO(head[8:10] + more + raw))
    )
    got_shape, fortran, got_dtype = header
    if fortran or np.dtype(got_dtype) != np.dtype(dtype) or tuple(got_shape) != tuple(shape):
        raise CorruptFileError(
            f"an array disagrees with the metadata: it is {np.dtype(got_dtype)} "
            f"{tuple(got_shape)}, the metadata says {np.dtype(dtype)} {shape}"
        )
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes > limit:
        raise CorruptFileError("array larger than its file")
    arr = np.empty(shape, dtype) if into else None
    flat = memoryview(arr.reshape(-1).view(np.uint8)) if arr is not None else None
    pos = 0
    while pos < nbytes:
        b = stream.read(min(_CHUNK, nbytes - pos))
        if not b:
            raise CorruptFileError("array data truncated")
        h.update(b)
        if flat is not None:
            flat[pos : pos + len(b)] = b
        pos += len(b)
    return arr, start + hl


def _drain(stream: IO[bytes]) -> None:
    """Reads to the end (a zip member checks its CRC there); trailing bytes mean damage."""
    rest = stream.read(_CHUNK)
    if rest:
        raise CorruptFileError("unexpected data after the array")


# -- the single file -------------------------------------------------------------------------------------
def _open_aligned(z: zipfile.ZipFile, name: str) -> IO[bytes]:
    """A stored zip member whose data starts on a 64-byte boundary (padding in an extra field 0xD935)."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.external_attr = 0o644 << 16
    # local header: 30 bytes + name + extra (ours, then zipfile's 20-byte zip64 field, forced)
    base = z.start_dir + 30 + len(name.encode("ascii")) + 20 + 4
    pad = (-base) % _ALIGN
    zi.extra = struct.pack("<HH", 0xD935, pad) + b"\0" * pad
    return z.open(zi, "w", force_zip64=True)


def write_file(
    path: Path,
    meta: dict,
    arrays: dict[str, tuple[np.dtype, tuple[int, ...], int, list]],
    sources: Sequence[str],
    blobs: dict[str, bytes],
) -> None:
    """Writes a ``.rarmem`` through `atomic_write`, streaming the arrays.

    Args:
        meta: meta.json without checksums (added here).
        arrays: member name -> (dtype, row shape, rows, [(array, keep mask or None), ...]).
        sources: per-row provenance.
        blobs: other members (e.g. ``hnsw.bin``).
    """
    checksums: dict[str, str] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent, wait=True) as locked:
        if locked:  # no other save of this folder runs: what temporaries are left were left by a killed one
            remove_stale_temps(path)
        with atomic_write(path, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, (dtype, row_shape, n, parts) in arrays.items():
                    with _open_aligned(z, name) as w:
                        out = _Hashing(w)
                        _write_rows(out, parts, np.dtype(dtype), row_shape, n)
                    checksums[name] = out.h.hexdigest()
                members = {"sources.json": json.dumps(list(sources)).encode(), **blobs}
                for name, b in members.items():
                    z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), b)
                    checksums[name] = hashlib.sha256(b).hexdigest()
                z.writestr(
                    zipfile.ZipInfo("meta.json", date_time=(1980, 1, 1, 0, 0, 0)),
                    json.dumps({**meta, "checksums": checksums}, indent=1),
                )


def _data_offset(fh: IO[bytes], zi: zipfile.ZipInfo) -> int:
    fh.seek(zi.header_offset)
    hdr = fh.read(30)
    if len(hdr) != 30 or hdr[:4] != b"PK\x03\x04":
        raise CorruptFileError(f"bad local header for {zi.filename}")
    name_len, extra_len = struct.unpack("<HH", hdr[26:30])
    return zi.header_offset + 30 + name_len + extra_len


def read_file(path: Path, *, shapes: Any, mmap: bool) -> tuple[dict, dict[str, np.ndarray], dict[str, bytes]]:
    """Opens a ``.rarmem``: meta, arrays (mapped when ``mmap`` and aligned), other members; every member's
    sha256 checked. ``shapes(meta)`` gives member name -> (dtype, shape) for the array members.

    Raises:
        CorruptFileError: anything wrong (zip structure, checksums, shapes), never another exception.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        with zipfile.ZipFile(fh) as z:
            zmeta = z.getinfo("meta.json")
            if zmeta.file_size > size or zmeta.file_size > 1 << 30:
                raise CorruptFileError("meta.json is larger than the file")
            meta = json.loads(z.read("meta.json"))
            if not isinstance(meta, dict) or not isinstance(meta.get("checksums"), dict):
                raise CorruptFileError(f"{path} is not a rar_edge memory file")
            want_arrays = shapes(meta)
            arrays: dict[str, np.ndarray] = {}
            blobs: dict[str, bytes] = {}
            for name, want in meta["checksums"].items():
                if not isinstance(name, str) or not isinstance(want, str):
                    raise CorruptFileError("bad checksum table")
                zi = z.getinfo(name)
                if zi.file_size > size:
                    raise CorruptFileError(f"{name} is larger than the file")
                h = hashlib.sha256()
                if name in want_arrays:
                    dtype, shape = want_arrays[name]
                    mapped = mmap and name in ("vectors.npy", "q8.npy") and zi.compress_type == zipfile.ZIP_STORED
                    with z.open(zi) as s:
                        arr, header_len = _read_npy(s, dtype=dtype, shape=shape, h=h, into=not mapped, limit=size)
                        _drain(s)
                    if h.hexdigest() != want:
                        raise CorruptFileError(f"{path}: {name} does not match its checksum; the file is damaged")
                    if mapped:
                        off = _data_offset(fh, zi) + header_len
                        if off % np.dtype(dtype).itemsize == 0 and int(np.prod(shape)):
                            arr = np.memmap(fh, dtype=dtype, mode="r", offset=off, shape=shape)
                        else:  # an unaligned member (written by an older version) or no rows: read it
                            with z.open(zi) as s:
                                arr, _ = _read_npy(
                                    s, dtype=dtype, shape=shape, h=hashlib.sha256(), into=True, limit=size
                                )
                    arrays[name] = arr
                else:
                    with z.open(zi) as s:
                        b = s.read(zi.file_size)
                        _drain(s)
                    h.update(b)
                    if h.hexdigest() != want:
                        raise CorruptFileError(f"{path}: {name} does not match its checksum; the file is damaged")
                    blobs[name] = b
            missing = set(want_arrays) - set(arrays)
            if missing:
                raise CorruptFileError(f"{path}: members {sorted(missing)} are missing")
    return meta, arrays, blobs


# -- the directory store ---------------------------------------------------------------------------------
def is_store(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _write_member(folder: Path, name: str, write: Any) -> dict:
    """Writes one immutable store file through `atomic_write`; returns its manifest record."""
    with atomic_write(folder / name, "wb") as f:
        out = _Hashing(f)
        write(out)
    return {"name": name, "sha256": out.h.hexdigest(), "bytes": out.n}


def write_array_member(folder: Path, name: str, a: np.ndarray) -> dict:
    return _write_member(folder, name, lambda out: _write_rows(out, [(a, None)], a.dtype, a.shape[1:], len(a)))


def write_bytes_member(folder: Path, name: str, b: bytes) -> dict:
    return _write_member(folder, name, lambda out: out.write(b))


def read_manifest(folder: Path) -> dict:
    p = folder / MANIFEST
    try:
        if p.stat().st_size > 1 << 30:
            raise CorruptFileError(f"{p} is too large")
        m = json.loads(p.read_bytes())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{folder} is not a readable rar_edge memory store: {e}") from e
    if not isinstance(m, dict) or m.get("format") != STORE_FORMAT or not isinstance(m.get("segments"), list):
        raise CorruptFileError(f"{folder} is not a rar_edge memory store")
    if m.get("checksum") != manifest_checksum(m):
        raise CorruptFileError(f"{p} does not match its checksum; the store is damaged")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > STORE_FORMAT_VERSION:
        raise CorruptFileError(f"{folder} was written by a newer rar_edge (store format {m.get('format_version')})")
    return m


def manifest_checksum(manifest: dict) -> str:
    """The sha256 of a manifest's canonical JSON without its ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_version(folder: Path) -> tuple[int, int] | None:
    """Identifies the committed manifest file (a save replaces it by a rename: a new inode)."""
    try:
        st = (folder / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def read_store_array(folder: Path, rec: Any, *, dtype: np.dtype, shape: tuple[int, ...], mmap: bool) -> np.ndarray:
    """A store file checked against its record (size, sha256, dtype, shape); mapped when ``mmap``."""
    name, want = _record(folder, rec)
    p = folder / name
    h = hashlib.sha256()
    with open(p, "rb") as f:
        arr, header_len = _read_npy(f, dtype=dtype, shape=shape, h=h, into=not mmap, limit=p.stat().st_size)
        _drain(f)
    if h.hexdigest() != want:
        raise CorruptFileError(f"{p} does not match its checksum; the store is damaged")
    if mmap:
        if not int(np.prod(shape)):
            return np.zeros(shape, dtype)
        arr = np.memmap(p, dtype=dtype, mode="r", offset=header_len, shape=shape)
    return arr


def read_store_bytes(folder: Path, rec: Any) -> bytes:
    name, want = _record(folder, rec)
    p = folder / name
    b = p.read_bytes()
    if hashlib.sha256(b).hexdigest() != want:
        raise CorruptFileError(f"{p} does not match its checksum; the store is damaged")
    return b


def _record(folder: Path, rec: Any) -> tuple[str, str]:
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not isinstance(rec.get("sha256"), str):
        raise CorruptFileError(f"{folder}: bad file record {rec!r}")
    name = rec["name"]
    if not _SEGMENT_FILE.match(name) or "/" in name or "\\" in name:
        raise CorruptFileError(f"{folder}: bad file name {name!r}")
    return name, rec["sha256"]


def referenced(manifest: dict) -> set[str]:
    names = set()
    for seg in manifest.get("segments", []):
        for rec in (seg.get("files") or {}).values():
            if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                names.add(rec["name"])
    return names


def clean_store(folder: Path, keep: set[str]) -> list[Path]:
    """Deletes segment files no manifest names and temporaries (call with the store's lock held)."""
    removed = []
    for p in folder.iterdir():
        n = p.name
        stale = (n.startswith(".") and n.endswith(TEMP_SUFFIX)) or (_SEGMENT_FILE.match(n) and n not in keep)
        if stale and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
