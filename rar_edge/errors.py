"""The exception hierarchy: every error the SDK raises on purpose derives from RarEdgeError."""

from __future__ import annotations


class RarEdgeError(Exception):
    """Base class of every error rar_edge raises deliberately."""


class InvalidInputError(RarEdgeError, ValueError):
    """An argument or input (image, box, k, ...) is malformed or out of range."""


class ImageDecodeError(InvalidInputError):
    """An image could not be decoded: corrupt, truncated, unsupported, or a decompression bomb."""


class InvalidBoxError(InvalidInputError):
    """A box has zero or negative area, or a NaN/inf coordinate."""


class DatasetError(InvalidInputError):
    """A dataset folder or annotation file is empty or malformed."""


class EmptyMemoryError(RarEdgeError, LookupError):
    """A search was asked of a memory with no entries."""


class MemoryMismatchError(RarEdgeError, ValueError):
    """A memory was built by another encoder (fingerprint or dimension differ)."""


class CorruptFileError(RarEdgeError, OSError):
    """A saved file (memory, manifest, model) failed its checksum or could not be parsed."""


class ManifestError(RarEdgeError, ValueError):
    """A model folder's manifest.json is missing, malformed, or disagrees with the files beside it."""


class MissingDependencyError(RarEdgeError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""

    def __init__(self, package: str, extra: str | None, purpose: str) -> None:
        # extra None: a core dependency that went missing; the package itself is the fix
        how = f"pip install {package}" if extra is None else f"pip install 'rar-edge[{extra}]'"
        super().__init__(f"{purpose} needs the '{package}' package: {how}")
        self.package = package
        self.extra = extra


class RankerError(RarEdgeError, RuntimeError):
    """The MLLM ranker failed to load or to rank."""


class ExportError(RarEdgeError, RuntimeError):
    """A model export step failed."""
