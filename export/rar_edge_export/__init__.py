"""Workstation-side export tools: CLIP/TFLite -> ONNX, MLLM -> GGUF. Each writes a manifest.

Importing this package is cheap: torch, transformers, optimum and tensorflow are imported inside the
functions that need them.
"""

from .cli import add_export_subcommands, main_export
from .clip import ZERO_SHOT_TEMPLATES, export_clip
from .quantize import QuantizationInfo, quantize_onnx
from .tflite import export_tflite

__all__ = [
    "ZERO_SHOT_TEMPLATES",
    "QuantizationInfo",
    "add_export_subcommands",
    "export_clip",
    "export_tflite",
    "main_export",
    "quantize_onnx",
]
