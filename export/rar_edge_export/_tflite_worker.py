"""The child process of `export_tflite`: everything that opens the .tflite file runs here.

TensorFlow Lite does not fully verify a model before reading it: a truncated or corrupt file can crash
the process (segmentation fault) instead of raising. Here that crash ends only this child, and the
parent turns it into an ExportError. It also keeps TensorFlow's import, logging and memory out of the
caller's process.

Usage: ``python -m rar_edge_export._tflite_worker MODEL WORKDIR --opset N [--onnx OUT.onnx]``.
Writes ``WORKDIR/details.json`` (the interpreter's input and output details), and for a model with
one ``[1, H, W, 3]`` uint8 input ``WORKDIR/validation.npz`` (images, the interpreter's raw outputs);
with ``--onnx``, the tf2onnx conversion. Exit code 0 on success, 2 with a message on stderr if not.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DETAILS_FILE = "details.json"
VALIDATION_FILE = "validation.npz"


def validation_images(height: int, width: int) -> np.ndarray:
    """A smooth colour gradient and seeded noise: (2, 1, H, W, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 255 // max(height + width - 2, 1)],
        axis=-1,
    )
    noise = np.random.default_rng(0).integers(0, 256, size=(height, width, 3))
    return np.stack([img.astype(np.uint8)[None] for img in (gradient, noise)])


def _details(d: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = d.get("quantization", (0.0, 0))
    return {
        "name": str(d["name"]),
        "shape": [int(v) for v in d["shape"]],
        "dtype": np.dtype(d["dtype"]).name,
        "quantization": [float(scale), int(zero_point)],
    }


def _is_image_input(details: dict[str, Any]) -> bool:
    shape = details["shape"]
    return len(shape) == 4 and shape[0] == 1 and shape[3] == 3 and details["dtype"] == "uint8"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rar_edge_export._tflite_worker")
    parser.add_argument("model", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--opset", type=int, required=True)
    parser.add_argument("--onnx", type=Path, default=None)
    args = parser.parse_args(argv)

    import tensorflow as tf

    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that it moves to ai_edge_litert; it still works in TF 2.21 and is
        # what tf2onnx itself reads models with.
        warnings.filterwarnings(
            "ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated", category=UserWarning
        )
        try:
            interpreter = tf.lite.Interpreter(model_path=str(args.model))
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            print(f"TensorFlow Lite cannot load {args.model.name}: {e}", file=sys.stderr)
            return 2
    inputs = [_details(d) for d in interpreter.get_input_details()]
    outputs = [_details(d) for d in interpreter.get_output_details()]
    (args.workdir / DETAILS_FILE).write_text(json.dumps({"inputs": inputs, "outputs": outputs}), encoding="utf-8")
    if len(inputs) != 1 or len(outputs) != 1 or not _is_image_input(inputs[0]):
        return 0  # the parent explains what is unsupported

    images = validation_images(inputs[0]["shape"][1], inputs[0]["shape"][2])
    raw = []
    for image in images:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
        interpreter.invoke()
        raw.append(np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])))
    np.savez(args.workdir / VALIDATION_FILE, images=images, outputs=np.stack(raw))

    if args.onnx is not None:
        import tf2onnx.convert

        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated", category=UserWarning
            )
            try:
                tf2onnx.convert.from_tflite(str(args.model), opset=args.opset, output_path=str(args.onnx))
            except Exception as e:  # tf2onnx raises anything from ValueError to KeyError on unsupported ops
                print(f"tf2onnx cannot convert {args.model.name}: {type(e).__name__}: {e}", file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
