"""Helpers shared by the exporters: atomic output folders, lazy imports, ONNX Runtime checks."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from rar_edge.errors import ExportError, InvalidInputError, MissingDependencyError

logger = logging.getLogger("rar_edge.export")

QUANTIZATION_MODES = ("int8", "fp16")
#: Below this cosine to float32, a quantized model is kept but a warning is logged.
QUANTIZED_COSINE_WARN = 0.9


def exporter_id() -> str:
    """``"rar_edge_export <version>"``, recorded in every manifest this package writes (one version source:
    ``rar_edge.__version__``, which the package metadata also reads)."""
    from rar_edge import __version__

    return f"rar_edge_export {__version__}"


def require(module: str, *, package: str, extra: str, purpose: str) -> Any:
    """Imports an optional dependency or raises MissingDependencyError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package, extra, purpose) from e


def check_installed(module: str, *, package: str, extra: str, purpose: str) -> None:
    """Like `require`, without importing the module (for modules only a child process imports)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(package, extra, purpose)


def check_quantize_mode(quantize: str | None) -> None:
    """Raises InvalidInputError unless ``quantize`` is None or one of QUANTIZATION_MODES."""
    if quantize is not None and quantize not in QUANTIZATION_MODES:
        raise InvalidInputError(f"quantize must be one of {QUANTIZATION_MODES} or None, not {quantize!r}")


def looks_like_path(src: str | os.PathLike) -> bool:
    """Whether ``src`` names a local path rather than a Hugging Face model id ('name' or 'org/name')."""
    text = os.fspath(src)
    return (
        isinstance(src, os.PathLike)
        or Path(text).expanduser().is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
    )


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuses a path that is a file, or a non-empty folder unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``out_dir`` that becomes ``out_dir`` on success.

    On any exception the temporary folder is removed and ``out_dir`` is left as it was. With
    ``overwrite``, an existing ``out_dir`` is replaced only after the new one is complete.

    Raises:
        ExportError: ``out_dir`` is a file, or a non-empty folder and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling (same file system) so that the final rename is atomic; mkdir honours the umask.
    stem = f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out_dir.parent / f"{stem}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out_dir, overwrite=overwrite)  # something may have appeared meanwhile
        if out_dir.exists():
            old = out_dir.parent / f"{stem}.old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out_dir)


def onnx_session(path: Path) -> Any:
    """A CPU ONNX Runtime session; ExportError if the model does not load."""
    ort = require("onnxruntime", package="onnxruntime", extra="export", purpose="Checking an exported model")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types, not a common base
        raise ExportError(f"ONNX Runtime cannot load the exported model {path.name}: {e}") from e


def run_onnx(path: Path, feed: Mapping[str, np.ndarray], output_name: str) -> np.ndarray:
    """Runs ``path`` on ``feed`` and returns the named output; ExportError if it fails."""
    session = onnx_session(path)
    try:
        (out,) = session.run([output_name], dict(feed))
    except Exception as e:
        raise ExportError(f"the exported model {path.name} failed to run: {e}") from e
    return np.asarray(out)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays (flattened past the first axis)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, 1e-30)
