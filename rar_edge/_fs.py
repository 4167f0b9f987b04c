"""Atomic file writes: the one place the SDK replaces a file on disk.

`atomic_write` writes to a temporary file in the target's folder, flushes and fsyncs it, renames it over
the target and fsyncs the folder, so a crash at any moment leaves either the old file or the new one
(never a torn one), and a power cut after the call returns keeps the new one. The temporary file is named
``.NAME.<random>.tmp``; `remove_stale_temps` deletes those a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

from rar_edge.errors import InvalidInputError

TEMP_SUFFIX = ".tmp"


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename inside it survives a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Opens a temporary file beside ``path``; on a clean exit it replaces ``path`` durably.

    The new file keeps the permissions of the file it replaces (else those the umask gives a new file). On
    an exception the temporary file is removed and ``path`` is untouched.

    Args:
        path: the file to write.
        mode: ``"wb"`` or ``"w"``.
        encoding: for text mode (default UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    p = Path(path)
    if p.is_dir():  # else the rename fails naming the temporary file, not the path the caller gave
        raise InvalidInputError(f"{p} is a folder; give the path of a file to write")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=TEMP_SUFFIX, dir=p.parent)
    try:
        # mkstemp makes the file 0600: give it the permissions of the file it replaces, else the umask's
        os.chmod(tmp, stat.S_IMODE(os.stat(p).st_mode) if p.exists() else 0o666 & ~umask())
        with os.fdopen(fd, mode, **({"encoding": encoding or "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replaces ``path`` with ``data`` atomically and durably (see `atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replaces ``path`` with UTF-8 ``text`` atomically and durably (see `atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def remove_stale_temps(path: str | os.PathLike, *, older_than_s: float = 0.0) -> list[Path]:
    """Deletes the temporary files a killed `atomic_write` of ``path`` left beside it.

    Args:
        path: the file whose ``.NAME.*.tmp`` siblings to remove.
        older_than_s: keep temporaries modified more recently than this (a writer may still be at work).

    Returns:
        The files removed.
    """
    p = Path(path)
    removed: list[Path] = []
    now = time.time()
    try:
        siblings = list(p.parent.glob(f".{p.name}.*{TEMP_SUFFIX}"))
    except OSError:
        return removed
    for t in siblings:
        try:
            if now - t.stat().st_mtime >= older_than_s:
                t.unlink()
                removed.append(t)
        except OSError:
            continue
    return removed
