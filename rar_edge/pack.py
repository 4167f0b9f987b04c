"""Packs: one folder holding a memory, the encoder that built it and optionally a ranker, copied anywhere.

::

    PACK/
      pack.json        {"format": "rar_edge.pack", "format_version": 1, "memory": "memory.rarmem",
                        "encoder": "encoder", "ranker": "ranker/<file or folder>" | null,
                        "files": {relative path: {"sha256": ..., "bytes": ...}}}
      memory.rarmem    the memory as one file
      encoder/         the encoder's model folder (manifest.json and its model files)
      ranker/          the ranker's model folder, or its GGUF file (and vision projector)

Every reference is relative to the pack, so `Pipeline(pack=...)` and ``rar-edge classify --pack`` work
wherever the folder is copied; opening a pack checks every file's size and sha256. The pack is written
in a temporary folder beside the target and renamed into place, so a crash leaves no half pack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rar_edge._fs import fsync_dir, write_text
from rar_edge.errors import CorruptFileError, InvalidInputError
from rar_edge.manifest import sha256_file

log = logging.getLogger("rar_edge")

PACK_FORMAT = "rar_edge.pack"
PACK_FORMAT_VERSION = 1
PACK_FILE = "pack.json"


@dataclass(frozen=True)
class Pack:
    """An opened (checked) pack: absolute paths of its parts."""

    path: Path
    memory: Path
    encoder: Path
    ranker: Path | None
    mmproj: Path | None = None


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def write_pack(
    out: str | os.PathLike,
    *,
    memory: str | os.PathLike,
    encoder: str | os.PathLike | None = None,
    ranker: str | os.PathLike | None = None,
    mmproj: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a pack folder.

    Args:
        out: the pack folder to create.
        memory: a saved memory (file or store).
        encoder: the encoder's model folder; default: the folder the memory records (checked against the
            memory's fingerprint).
        ranker: a ranker model folder or GGUF file, or None.
        mmproj: the vision projector GGUF beside a bare GGUF ranker.
        overwrite: replace an existing pack at ``out`` (never anything else).

    Raises:
        InvalidInputError: ``out`` exists (without ``overwrite``, or it is not a pack), or a part is missing.
        MemoryMismatchError: the encoder did not build the memory.
    """
    from rar_edge.encoders import Encoder
    from rar_edge.index.memory import Memory

    out = Path(out)
    check_pack_target(out, overwrite=overwrite)
    mem = Memory.load(memory)
    enc_dir = Path(encoder) if encoder is not None else mem.encoder_folder()
    mem.check_encoder(Encoder(enc_dir))  # the fingerprint the memory records, and the files are intact
    if ranker is not None and not Path(ranker).exists():
        raise InvalidInputError(f"no ranker at {ranker}")
    if mmproj is not None and not Path(mmproj).is_file():
        raise InvalidInputError(f"no vision projector at {mmproj}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        mem.save(tmp / "memory.rarmem", layout="file")
        shutil.copytree(enc_dir, tmp / "encoder")
        ranker_rel = None
        if ranker is not None:
            r = Path(ranker)
            (tmp / "ranker").mkdir()
            if r.is_dir():
                shutil.copytree(r, tmp / "ranker" / r.name)
            else:
                shutil.copy2(r, tmp / "ranker" / r.name)
                if mmproj is not None:
                    shutil.copy2(mmproj, tmp / "ranker" / Path(mmproj).name)
            ranker_rel = f"ranker/{r.name}"
        files = {}
        for p in _files_under(tmp):
            rel = p.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        desc = {
            "format": PACK_FORMAT,
            "format_version": PACK_FORMAT_VERSION,
            "memory": "memory.rarmem",
            "encoder": "encoder",
            "ranker": ranker_rel,
            "mmproj": None if mmproj is None else f"ranker/{Path(mmproj).name}",
            "files": files,
        }
        write_text(tmp / PACK_FILE, json.dumps(desc, indent=1) + "\n")
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(d)
        old = None
        if out.exists():  # checked above: a pack, and overwrite was asked
            old = out.with_name(f".{out.name}.old-{os.getpid()}.tmp")
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_pack_target(out: Path, *, overwrite: bool) -> None:
    """Refuses to write a pack over anything but a pack, and over a pack without ``overwrite``."""
    if not out.exists():
        return
    if not (out.is_dir() and (out / PACK_FILE).is_file()):
        raise InvalidInputError(f"{out} exists and is not a pack: refusing to replace it")
    if not overwrite:
        raise InvalidInputError(f"{out} exists: pass --overwrite (overwrite=True) to replace that pack")


def open_pack(path: str | os.PathLike, *, verify: bool = True) -> Pack:
    """Opens a pack, checking its description and (``verify``) every file's size and sha256.

    Raises:
        CorruptFileError: not a pack, a file missing, extra, or damaged.
    """
    root = Path(path)
    desc_path = root / PACK_FILE
    if not desc_path.is_file():
        raise CorruptFileError(f"{root} is not a pack (no {PACK_FILE})")
    try:
        desc = json.loads(desc_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{desc_path} is not readable: {e}") from e
    if not isinstance(desc, dict) or desc.get("format") != PACK_FORMAT or not isinstance(desc.get("files"), dict):
        raise CorruptFileError(f"{root} is not a rar_edge pack")
    fv = desc.get("format_version")
    if not isinstance(fv, int) or fv > PACK_FORMAT_VERSION:
        raise CorruptFileError(f"{root} was written by a newer rar_edge (pack format {fv!r})")
    base = root.resolve()

    def inside(rel: object) -> Path:
        if not isinstance(rel, str) or not rel:
            raise CorruptFileError(f"{root}: bad reference {rel!r}")
        p = (root / rel).resolve()
        if base != p and base not in p.parents:
            raise CorruptFileError(f"{root}: reference {rel!r} points outside the pack")
        return p

    files = desc["files"]
    for rel, rec in files.items():
        p = inside(rel)
        if not isinstance(rec, dict) or not p.is_file():
            raise CorruptFileError(f"{root}: {rel} is missing")
        if p.stat().st_size != rec.get("bytes"):
            raise CorruptFileError(f"{root}: {rel} has {p.stat().st_size} bytes, the pack says {rec.get('bytes')}")
        if verify and sha256_file(p) != rec.get("sha256"):
            raise CorruptFileError(f"{root}: {rel} does not match its checksum; the pack is damaged")
    memory = inside(desc.get("memory"))
    encoder = inside(desc.get("encoder"))
    ranker = None if desc.get("ranker") is None else inside(desc["ranker"])
    mmproj = None if desc.get("mmproj") is None else inside(desc["mmproj"])
    for p in (memory, encoder / "manifest.json", *(() if ranker is None else (ranker,))):
        rel = p.relative_to(base).as_posix()
        if p.is_file() and rel not in files:
            raise CorruptFileError(f"{root}: {rel} is not listed in {PACK_FILE}")
    return Pack(root, memory, encoder, ranker, mmproj)
