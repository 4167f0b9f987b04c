"""The ``export`` commands: ``clip`` and ``tflite`` here; other modules (``mllm``) register their own."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from rar_edge.errors import RarEdgeError

from ._common import QUANTIZATION_MODES

# Modules of this package that add their own subcommand with ``add_subcommand(subparsers)``, if present.
_PLUGIN_MODULES = ("mllm",)


def add_export_subcommands(subparsers: Any) -> None:
    """Registers the export subcommands on an argparse subparsers object.

    Each subcommand sets ``func``: ``args.func(args)`` runs it and returns an exit code. Used by
    ``rar-edge export`` and by ``python -m rar_edge_export``.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    clip = subparsers.add_parser(
        "clip",
        help="CLIP (Hugging Face CLIPModel) -> image and text ONNX models + tokenizer + manifest",
        description="Export a CLIP model (a local folder or a Hugging Face id) to a rar_edge model folder.",
    )
    clip.add_argument("src", help="a folder holding a CLIPModel, or a Hugging Face model id")
    _add_common_options(clip)
    clip.set_defaults(func=_run_clip)

    tflite = subparsers.add_parser(
        "tflite",
        help="an image-embedding .tflite model -> ONNX + manifest",
        description="Export a TFLite image embedder ([1,H,W,3] uint8 in, one embedding out) to a rar_edge model folder.",
    )
    tflite.add_argument("tflite_file", type=Path, help="the .tflite model")
    _add_common_options(tflite)
    tflite.set_defaults(func=_run_tflite)

    for name in _PLUGIN_MODULES:
        module_name = f"{__package__}.{name}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_subcommand(subparsers)


def main_export(argv: Sequence[str] | None = None) -> int:
    """``python -m rar_edge_export {clip,tflite,...} ...``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m rar_edge_export", description="Export models to rar_edge model folders (ONNX + manifest)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_export_subcommands(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except RarEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--quantize", choices=QUANTIZATION_MODES, default=None, help="write quantized models")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _run_clip(args: argparse.Namespace) -> int:
    # transformers would otherwise import TensorFlow too (slow, noisy) when both are installed.
    os.environ.setdefault("USE_TF", "0")
    from .clip import export_clip

    manifest = export_clip(args.src, args.out, opset=args.opset, quantize=args.quantize, overwrite=args.overwrite)
    _report(manifest)
    return 0


def _run_tflite(args: argparse.Namespace) -> int:
    from .tflite import export_tflite

    manifest = export_tflite(
        args.tflite_file, args.out, opset=args.opset, quantize=args.quantize, overwrite=args.overwrite
    )
    _report(manifest)
    return 0


def _report(manifest: Any) -> None:
    files = ", ".join(f"{role}={f['path']}" for role, f in sorted(manifest.files.items()))
    print(f"wrote {manifest.root} (kind {manifest.kind}, embedding_dim {manifest.embedding_dim}): {files}")
