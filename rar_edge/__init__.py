"""rar_edge: RAR (retrieve, then rank with a small MLLM) for visual recognition on edge devices."""

from rar_edge.encoders import Encoder, EncoderConfig, ProviderFallbackWarning
from rar_edge.errors import (
    CorruptFileError,
    DatasetError,
    EmptyMemoryError,
    ExportError,
    ImageDecodeError,
    InvalidBoxError,
    InvalidInputError,
    ManifestError,
    MemoryMismatchError,
    MissingDependencyError,
    RankerError,
    RarEdgeError,
)
from rar_edge.index.memory import HnswParams, Memory
from rar_edge.pipeline import Pipeline, PipelineConfig, classify, detect
from rar_edge.types import Candidate, Classification, Detection, ImageError, Ranking

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "Classification",
    "CorruptFileError",
    "DatasetError",
    "Detection",
    "EmptyMemoryError",
    "Encoder",
    "EncoderConfig",
    "ExportError",
    "HnswParams",
    "ImageError",
    "ImageDecodeError",
    "InvalidBoxError",
    "InvalidInputError",
    "ManifestError",
    "Memory",
    "MemoryMismatchError",
    "MissingDependencyError",
    "Pipeline",
    "PipelineConfig",
    "ProviderFallbackWarning",
    "RankerError",
    "Ranking",
    "RarEdgeError",
    "__version__",
    "classify",
    "detect",
]
