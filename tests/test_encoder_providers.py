"""Execution-provider settings of the encoder: TensorRT's engine cache and FP16 options, and the fallback to the
CPU when ONNX Runtime's CUDA kernels do not fit the GPU ("no kernel image is available").

This machine's ONNX Runtime is the CPU build, so the GPU failure is played by a session wrapper that raises
ONNX Runtime's own message (as reported on Jetsons with a wheel built for other GPUs); everything around it,
the real CPU session that replaces it included, is the SDK's code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rar_edge import Encoder, EncoderConfig, ProviderFallbackWarning
from rar_edge import encoders as enc_mod
from rar_edge.tools.bench import environment

# ONNX Runtime's text for cudaErrorNoKernelImageForDevice (microsoft/onnxruntime#22441, #27725).
NO_KERNEL = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. Name:'conv1' "
    "Status Message: CUDA error cudaErrorNoKernelImageForDevice:no kernel image is available for execution "
    "on the device"
)
ALL_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_tensorrt_options_default_to_a_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert EncoderConfig(provider="tensorrt").tensorrt_options() == {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "rar_edge" / "tensorrt"),
        "trt_fp16_enable": False,
    }
    cfg = EncoderConfig(provider="tensorrt", trt_engine_cache_dir=tmp_path / "e", trt_engine_cache=False, trt_fp16=True)
    assert cfg.tensorrt_options() == {
        "trt_engine_cache_enable": False,
        "trt_engine_cache_path": str(tmp_path / "e"),
        "trt_fp16_enable": True,
    }


def test_session_providers_carry_the_tensorrt_options(tmp_path):
    cfg = EncoderConfig(provider="tensorrt", trt_engine_cache_dir=tmp_path / "engines", trt_fp16=True)
    got = enc_mod._providers(cfg, ALL_GPU)
    assert got == [
        ("TensorrtExecutionProvider", cfg.tensorrt_options()),
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert (tmp_path / "engines").is_dir()  # ONNX Runtime writes engines there
    # Only what this onnxruntime has, and no options where TensorRT is absent.
    assert enc_mod._providers(cfg, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert enc_mod._providers(cfg, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert enc_mod._providers(EncoderConfig(provider="cuda"), ALL_GPU) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


class _GpuWithoutKernels:
    """A session that says it runs on CUDA and fails like a wheel built for other GPUs."""

    def __init__(self, real, message: str = NO_KERNEL):
        self._real, self._message, self.runs = real, message, 0

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, outputs, feeds):
        self.runs += 1
        raise RuntimeError(self._message)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture()
def pixels(mobilenet_onnx):
    rng = np.random.default_rng(0)
    h, w = Encoder(mobilenet_onnx).image_spec.size_px
    return rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)


def test_no_kernel_image_falls_back_to_the_cpu_and_says_why(mobilenet_onnx, pixels):
    enc = Encoder(mobilenet_onnx)
    want = enc.embed_pixels(pixels)
    enc._image_sess = _GpuWithoutKernels(enc._image_sess)
    with pytest.warns(ProviderFallbackWarning, match="no CUDA kernels for this GPU") as rec:
        got = enc.embed_pixels(pixels)
    msg = str(rec[0].message)
    assert "no kernel image is available" in msg and "docs/jetson.md" in msg
    np.testing.assert_array_equal(got, want)
    assert enc.providers["image"] == ["CPUExecutionProvider"]  # what runs now, reported honestly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(enc.embed_pixels(pixels), want)  # once replaced, no more warnings


def test_other_run_errors_are_not_taken_for_a_missing_kernel(mobilenet_onnx, pixels):
    enc = Encoder(mobilenet_onnx)
    enc._image_sess = fake = _GpuWithoutKernels(enc._image_sess, "CUDA error cudaErrorMemoryAllocation: out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        enc.embed_pixels(pixels)
    assert enc._image_sess is fake


def test_a_cpu_session_does_not_fall_back_again(mobilenet_onnx, pixels):
    enc = Encoder(mobilenet_onnx)
    fake = _GpuWithoutKernels(enc._image_sess)
    fake.get_providers = lambda: ["CPUExecutionProvider"]  # type: ignore[method-assign]
    enc._image_sess = fake
    with pytest.raises(RuntimeError, match="no kernel image"):
        enc.embed_pixels(pixels)


def test_fallback_on_aarch64_points_at_the_jetson_procedure(mobilenet_onnx, monkeypatch):
    # This machine's onnxruntime has no CUDA provider, so asking for it falls back when the session is made.
    monkeypatch.setattr(enc_mod.platform, "machine", lambda: "aarch64")
    with pytest.warns(ProviderFallbackWarning, match=r"installs no onnxruntime-gpu.*docs/jetson\.md"):
        Encoder(mobilenet_onnx, config=EncoderConfig(provider="cuda"))


def test_bench_records_the_tensorrt_settings(mobilenet_onnx, tmp_path):
    cfg = EncoderConfig(provider="tensorrt", trt_engine_cache_dir=tmp_path / "engines", trt_fp16=True)
    with pytest.warns(ProviderFallbackWarning):  # no TensorRT in this onnxruntime
        enc = Encoder(mobilenet_onnx, config=cfg)
    env = environment(enc)
    assert env["tensorrt"] == {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "engines"),
        "trt_fp16_enable": True,
    }
    assert environment(Encoder(mobilenet_onnx))["tensorrt"] is None
