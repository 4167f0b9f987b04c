"""An image-embedding TFLite model (e.g. a quantized MobileNet feature extractor) -> ONNX + manifest.

Shapes, dtypes and the output quantization are read from the TFLite model itself, by the TFLite
interpreter; the conversion is tf2onnx's. Both run in a child process (`_tflite_worker`), because a
corrupt .tflite file can crash TensorFlow Lite instead of raising.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rar_edge.errors import ExportError
from rar_edge.manifest import ImageSpec, Manifest, load_manifest, sha256_file, write_manifest

from . import _tflite_worker
from ._common import (
    atomic_output_dir,
    check_installed,
    check_output_dir,
    check_quantize_mode,
    cosine_rows,
    exporter_id,
    logger,
    onnx_session,
    require,
)
from .quantize import check_quantized_cosine, is_quantized, quantization_record, quantize_onnx

MODEL_FILE = "model.onnx"
#: ONNX and TFLite embeddings (dequantized) must have at least this cosine on the validation images.
VALIDATION_MIN_COSINE = 0.9999
WORKER_TIMEOUT_S = 1800.0
_TFLITE_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier, bytes 4..8 of every .tflite file


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quantization: tuple[float, int] | None  # (scale, zero_point); None for float tensors


def export_tflite(
    tflite_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    opset: int = 17,
    quantize: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Exports an image-embedding TFLite model to a rar_edge model folder (``kind="image_embedder"``).

    The model must take one ``[1, H, W, 3]`` uint8 RGB image (no normalisation; the model's input
    quantization does that) and give one embedding. An integer output is dequantized by the runtime
    with the ``output_dequantize`` scale and zero point recorded in the manifest. The ONNX model is
    checked against the TFLite interpreter before anything is written to ``out_dir``.

    Args:
        tflite_file: the ``.tflite`` model.
        out_dir: the model folder to write; it is written atomically (built beside it, then renamed).
        opset: the ONNX opset.
        quantize: ``None``, ``"int8"`` or ``"fp16"``. A TFLite model that is already integer-quantized
            stays as it is for ``"int8"`` (the manifest says so) and refuses ``"fp16"``.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        The manifest of the written folder.

    Raises:
        ExportError: the file is missing, not a (loadable) TFLite model, has unsupported inputs, the
            conversion fails, or the ONNX model disagrees with the TFLite interpreter.
        InvalidInputError: a bad ``quantize`` mode.
        MissingDependencyError: tensorflow / tf2onnx / onnxruntime are not installed.
    """
    check_quantize_mode(quantize)
    path = _check_tflite_file(tflite_file)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite)
    check_installed("tensorflow", package="tensorflow-cpu", extra="tflite", purpose="Reading a TFLite model")
    check_installed("tf2onnx", package="tf2onnx", extra="tflite", purpose="Converting TFLite to ONNX")
    require("onnxruntime", package="onnxruntime", extra="export", purpose="Checking the converted model")

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        work = tmp / "work"
        work.mkdir()
        onnx_path = tmp / MODEL_FILE
        _run_worker(path, work, onnx_path, opset=opset)
        _canonical_names(onnx_path)
        details = json.loads((work / _tflite_worker.DETAILS_FILE).read_text(encoding="utf-8"))
        inp, out = _io_details(details, path)
        if quantize == "fp16" and out.quantization is not None:
            raise ExportError(f"{path.name} is already integer-quantized; fp16 conversion does not apply")
        with np.load(work / _tflite_worker.VALIDATION_FILE) as validation:
            images = list(validation["images"])
            reference = np.stack([_dequantize(o, out.quantization) for o in validation["outputs"]])
        shutil.rmtree(work)

        session = onnx_session(onnx_path)
        input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
        cosine = _check_matches_tflite(onnx_path, input_name, output_name, images, reference, out.quantization)

        source_sha256 = sha256_file(path)
        model_file, quantization = _quantize_step(
            onnx_path,
            quantize,
            source_sha256=source_sha256,
            cosine=cosine,
            check=lambda f: _check_matches_tflite(
                f, input_name, output_name, images, reference, out.quantization, min_cosine=0.0
            ),
        )

        image = ImageSpec(
            size_px=(inp.shape[1], inp.shape[2]),
            layout="NHWC",
            dtype="uint8",
            rescale=1.0,
            resize_mode="squash",
            crop_mode="none",
            resample="bilinear",
            input_name=input_name,
            output_name=output_name,
            output_dequantize=out.quantization,
        )
        write_manifest(
            tmp,
            {
                "kind": "image_embedder",
                "name": path.stem,
                "source": str(path.resolve()),
                "source_sha256": source_sha256,
                "exporter": exporter_id(),
                "opset": opset,
                "embedding_dim": int(np.prod(out.shape[1:])),
                "image": ImageSpec.from_dict(image.to_dict()).to_dict(),
                "text": None,
                "quantization": quantization,
            },
            files={"image_model": model_file},
        )
    return load_manifest(out_dir)


def _check_tflite_file(tflite_file: str | os.PathLike) -> Path:
    """The path, once it is known to be a file with the TFLite flatbuffer identifier."""
    path = Path(tflite_file)
    if not path.is_file():
        raise ExportError(f"TFLite model {path} does not exist")
    with open(path, "rb") as f:
        header = f.read(8)
    if header[4:8] != _TFLITE_IDENTIFIER:
        raise ExportError(f"{path} is not a TFLite model (no 'TFL3' flatbuffer identifier)")
    return path


def _quantize_step(
    onnx_path: Path, quantize: str | None, *, source_sha256: str, cosine: float, check: Callable[[Path], float]
) -> tuple[str, dict[str, Any] | None]:
    """The model file to keep and the manifest's quantization record.

    An integer TFLite stays as converted (it is int8 whatever was asked); otherwise ``quantize`` writes a
    quantized copy, ``check`` gives its cosine to the TFLite outputs, and the float model is removed.
    """
    if quantize in (None, "int8") and is_quantized(onnx_path):
        return MODEL_FILE, {
            "mode": "int8",
            "method": "native: the TFLite model is integer-quantized; its QDQ graph is kept as converted",
            "source_sha256": {"image_model": source_sha256},
            "cosine_to_source_min": {"image_model": cosine},
        }
    if quantize is None:
        return MODEL_FILE, None
    model_file = MODEL_FILE.replace(".onnx", f".{quantize}.onnx")
    info = quantize_onnx(onnx_path, onnx_path.parent / model_file, mode=quantize)
    q_cosine = check(onnx_path.parent / model_file)
    record = quantization_record({"image_model": info}, {"image_model": check_quantized_cosine(model_file, q_cosine)})
    onnx_path.unlink()
    return model_file, record


def _canonical_names(onnx_path: Path) -> None:
    """Renames the graph's inner tensors and nodes in graph order (inputs and outputs keep theirs).

    tf2onnx numbers some of the names it makes from process-wide counters (``zero_point__110``), so two
    exports of one TFLite file differed in a few names: another sha256, another encoder fingerprint, and
    memories built with the first export refused by the second. Same graph, same bytes now.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return  # subgraphs (If, Loop) have their own scopes: left as converted
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    initializers = {t.name for t in g.initializer}
    names: dict[str, str] = {}

    def canon(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"{'w' if name in initializers else 't'}{len(names)}"
        return names[name]

    for i, node in enumerate(g.node):
        node.input[:] = [canon(x) for x in node.input]
        node.output[:] = [canon(x) for x in node.output]
        node.name = f"{node.op_type}_{i}"
    order = {t.name: i for i, t in enumerate(g.initializer)}
    for t in g.initializer:
        t.name = canon(t.name)
    for v in g.value_info:
        v.name = canon(v.name)
    rank = {new: i for i, new in enumerate(names.values())}
    sorted_inits = sorted(g.initializer, key=lambda t: (rank.get(t.name, len(rank)), order.get(t.name, 0)))
    del g.initializer[:]
    g.initializer.extend(sorted_inits)
    sorted_info = sorted(g.value_info, key=lambda v: rank.get(v.name, len(rank)))
    del g.value_info[:]
    g.value_info.extend(sorted_info)
    onnx.save(model, str(onnx_path))


def _run_worker(path: Path, work: Path, onnx_path: Path, *, opset: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        f"{__package__}._tflite_worker",
        str(path.resolve()),
        str(work),
        "--opset",
        str(opset),
        "--onnx",
        str(onnx_path),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    logger.info("reading %s with TensorFlow Lite and converting it with tf2onnx (opset %d)", path.name, opset)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"reading and converting {path.name} took over {WORKER_TIMEOUT_S:.0f} s") from e
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise ExportError(f"TensorFlow Lite crashed ({name}) reading {path.name}: the file is corrupt or truncated")
    if proc.returncode != 0 or not (work / _tflite_worker.DETAILS_FILE).is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise ExportError(f"{path.name}: {tail or f'the TFLite worker failed (exit code {proc.returncode})'}")


def _tensor_info(d: dict[str, Any]) -> _TensorInfo:
    scale, zero_point = d["quantization"]
    dtype = np.dtype(d["dtype"])
    quantized = dtype.kind in "iu" and scale > 0
    return _TensorInfo(
        name=str(d["name"]),
        shape=tuple(int(v) for v in d["shape"]),
        dtype=dtype,
        quantization=(float(scale), int(zero_point)) if quantized else None,
    )


def _io_details(details: dict[str, Any], path: Path) -> tuple[_TensorInfo, _TensorInfo]:
    """The input and output tensors from the worker's details; ExportError if unsupported."""
    inputs, outputs = details["inputs"], details["outputs"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"{path.name}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
    inp, out = _tensor_info(inputs[0]), _tensor_info(outputs[0])
    if len(inp.shape) != 4 or inp.shape[0] != 1 or inp.shape[3] != 3 or inp.dtype != np.uint8:
        raise ExportError(
            f"{path.name}: the input must be one uint8 RGB image [1, H, W, 3], found {inp.dtype} {list(inp.shape)}"
        )
    if not out.shape or out.shape[0] != 1:
        raise ExportError(f"{path.name}: the output must be one embedding [1, ...], found {list(out.shape)}")
    return inp, out


def _dequantize(x: np.ndarray, quantization: tuple[float, int] | None) -> np.ndarray:
    x = np.asarray(x).reshape(-1)
    if quantization is None:
        return x.astype(np.float32)
    scale, zero_point = quantization
    return ((x.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _check_matches_tflite(
    onnx_path: Path,
    input_name: str,
    output_name: str,
    images: list[np.ndarray],
    reference: np.ndarray,
    quantization: tuple[float, int] | None,
    *,
    min_cosine: float = VALIDATION_MIN_COSINE,
) -> float:
    """The smallest cosine between ONNX and TFLite embeddings; ExportError below ``min_cosine``."""
    session = onnx_session(onnx_path)
    try:
        got = np.stack([_dequantize(session.run([output_name], {input_name: img})[0], quantization) for img in images])
    except Exception as e:  # ORT raises its own exception types
        raise ExportError(f"the converted model {onnx_path.name} failed to run: {e}") from e
    cosine = float(cosine_rows(got, reference).min())
    logger.info("%s: cosine to the TFLite interpreter >= %.6f", onnx_path.name, cosine)
    if not cosine >= min_cosine:  # also catches NaN
        raise ExportError(f"{onnx_path.name} disagrees with the TFLite interpreter: cosine {cosine:.6f} < {min_cosine}")
    return cosine
