"""Post-export quantization of ONNX models: dynamic int8 weights, or fp16 weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rar_edge.errors import ExportError, InvalidInputError
from rar_edge.manifest import sha256_file

from ._common import QUANTIZATION_MODES, QUANTIZED_COSINE_WARN, logger, require

# Ops that only occur in a model that is already integer-quantized (QDQ or QOperator format).
_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)

INT8_METHOD = (
    "onnxruntime.quantization.quantize_dynamic: int8 (QInt8) weights for MatMul/Conv/Gather, "
    "uint8 activations quantized at run time"
)
FP16_METHOD = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"


@dataclass(frozen=True)
class QuantizationInfo:
    """What `quantize_onnx` did; `quantization_record` turns these into the manifest's section."""

    mode: str
    method: str
    source_sha256: str  # of the float32 model that was quantized


def quantization_record(infos: Mapping[str, QuantizationInfo], cosines: Mapping[str, float]) -> dict[str, Any]:
    """The manifest's ``quantization`` section for models quantized together, keyed by file role.

    Args:
        infos: file role (``image_model``, ...) -> what `quantize_onnx` returned for it.
        cosines: file role -> the smallest cosine between the quantized and the source model's outputs
            on the exporter's validation inputs (see `check_quantized_cosine`).
    """
    modes = {i.mode for i in infos.values()}
    methods = {i.method for i in infos.values()}
    if len(modes) != 1 or len(methods) != 1:
        raise ExportError(f"models quantized together must share one mode and method, got {modes} / {methods}")
    return {
        "mode": modes.pop(),
        "method": methods.pop(),
        "source_sha256": {role: i.source_sha256 for role, i in infos.items()},
        "cosine_to_source_min": dict(cosines),
    }


def check_quantized_cosine(name: str, cosine: float) -> float:
    """Logs how close a quantized model stays to its source; ExportError if its outputs are not finite."""
    logger.info("%s: cosine to the source model >= %.5f", name, cosine)
    if not np.isfinite(cosine):
        raise ExportError(f"the quantized model {name} gives non-finite outputs")
    if cosine < QUANTIZED_COSINE_WARN:
        logger.warning("the quantized model %s is far from its source: cosine %.3f", name, cosine)
    return float(cosine)


def is_quantized(model_path: str | os.PathLike) -> bool:
    """Whether an ONNX model already holds integer-quantized ops (QDQ or QOperator format)."""
    onnx = require("onnx", package="onnx", extra="export", purpose="Inspecting an ONNX model")
    model = onnx.load(str(model_path), load_external_data=False)
    return any(node.op_type in _QUANTIZED_OPS for node in model.graph.node)


def quantize_onnx(
    model_path: str | os.PathLike, out_path: str | os.PathLike, *, mode: str = "int8"
) -> QuantizationInfo:
    """Writes a quantized copy of a float32 ONNX model.

    ``int8`` stores MatMul/Conv/Gather weights as int8 and quantizes activations at run time
    (dynamic quantization: no calibration data needed; inputs and outputs stay float32).
    ``fp16`` stores weights and activations as float16 but keeps float32 inputs and outputs, so
    the preprocessing in the manifest does not change.

    Args:
        model_path: the float32 ONNX model.
        out_path: where to write the quantized model (its folder must exist).
        mode: ``"int8"`` or ``"fp16"``.

    Returns:
        The mode, the method and the sha256 of the source model, for the manifest.

    Raises:
        InvalidInputError: an unknown mode.
        ExportError: the model is already quantized, or quantization failed.
        MissingDependencyError: onnx / onnxruntime are not installed.
    """
    if mode not in QUANTIZATION_MODES:
        raise InvalidInputError(f"mode must be one of {QUANTIZATION_MODES}, not {mode!r}")
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise ExportError(f"no ONNX model at {model_path}")
    if is_quantized(model_path):
        raise ExportError(f"{model_path.name} is already integer-quantized; {mode} quantization does not apply")
    source_sha256 = sha256_file(model_path)
    if mode == "int8":
        _quantize_int8(model_path, out_path)
        method = INT8_METHOD
    else:
        _convert_fp16(model_path, out_path)
        method = FP16_METHOD
    logger.info("quantized %s -> %s (%s)", model_path.name, out_path.name, mode)
    return QuantizationInfo(mode=mode, method=method, source_sha256=source_sha256)


def _quantize_int8(model_path: Path, out_path: Path) -> None:
    quantization = require(
        "onnxruntime.quantization", package="onnxruntime", extra="export", purpose="int8 quantization"
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre_path = out_path.with_name(out_path.name + ".pre.onnx")
    source = model_path
    try:
        # Shape inference + graph clean-up lets the quantizer see more ops. Symbolic shape inference
        # gives up on CLIP's text tower (dynamic sequence length), so only the ONNX one runs.
        quant_pre_process(str(model_path), str(pre_path), skip_symbolic_shape=True)
        source = pre_path
    except Exception as e:  # a pre-processing failure only costs some quantization coverage
        logger.warning("quantization pre-processing of %s failed (%s); quantizing it as is", model_path.name, e)
    try:
        quantization.quantize_dynamic(str(source), str(out_path), weight_type=quantization.QuantType.QInt8)
    except Exception as e:
        raise ExportError(f"int8 quantization of {model_path.name} failed: {e}") from e
    finally:
        pre_path.unlink(missing_ok=True)


def _convert_fp16(model_path: Path, out_path: Path) -> None:
    onnx = require("onnx", package="onnx", extra="export", purpose="fp16 conversion")
    require("onnxruntime", package="onnxruntime", extra="export", purpose="fp16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
        onnx.save(model, str(out_path))
    except Exception as e:
        raise ExportError(f"fp16 conversion of {model_path.name} failed: {e}") from e
