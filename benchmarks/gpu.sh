#!/usr/bin/env bash
# Benchmarks rar_edge on a machine with an NVIDIA GPU: ONNX Runtime's CUDA execution provider for the
# encoder and llama.cpp built with CUDA for the ranker, against the CPU on the same machine.
#
# Usage (from the repository root, on the GPU machine, with network access to PyPI):
#   ENCODER=path/to/model_folder IMAGES=path/to/image_folder [RANKER=path/to/mllm_folder] \
#     bash benchmarks/gpu.sh [OUT_DIR]
#
# Environment:
#   ENCODER     an exported encoder folder (rar-edge export clip|tflite, done on a workstation: the
#               'export' extra pulls the CPU onnxruntime, which must not share a venv with onnxruntime-gpu)
#   IMAGES      an image folder, one sub-folder per class (e.g. ../shared/data/flowers17)
#   RANKER      optional MLLM model folder or GGUF for the ranker
#   RUNS        timed runs per configuration (default 100); WARMUP (default 10)
#   CUDA_ARCH   CMAKE_CUDA_ARCHITECTURES for llama.cpp (default: native = the GPU of this machine; on a Jetson
#               the board's own: 87 Orin, 72 Xavier, 110 Thor, read from /proc/device-tree/compatible)
#   ORT_WHEEL   Jetson only: the onnxruntime-gpu wheel built for this JetPack (a file or URL), or
#   ORT_INDEX   Jetson only: the package index that has it (e.g. https://pypi.jetson-ai-lab.io/jp6/cu126);
#               PyPI's aarch64 onnxruntime-gpu has no kernels for Jetson GPUs (docs/jetson.md)
#   VENV        the virtual environment to create or reuse (default .venv-gpu; never the CPU .venv:
#               onnxruntime and onnxruntime-gpu install into the same folder and break each other)
#   PYTHON      the interpreter that creates the venv (default python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-artifacts/bench-gpu}"
venv="${VENV:-.venv-gpu}"
runs="${RUNS:-100}"
warmup="${WARMUP:-10}"
cuda_arch="${CUDA_ARCH:-native}"
: "${ENCODER:?set ENCODER to an exported encoder folder}"
: "${IMAGES:?set IMAGES to an image folder with one sub-folder per class}"

# On a Jetson nvidia-smi is absent (JetPack 5) or says little about the iGPU, which shares the board's memory:
# /etc/nv_tegra_release, the device tree and tegrastats describe it instead.
jetson=0; [ -f /etc/nv_tegra_release ] && jetson=1
if [ "$jetson" = 1 ]; then
  head -n 1 /etc/nv_tegra_release; tr -d '\0' </proc/device-tree/model; echo
  command -v nvpmodel >/dev/null && nvpmodel -q 2>/dev/null | head -n 2  # the power mode changes every number
  if [ "$cuda_arch" = native ]; then
    case "$(tr -d '\0' </proc/device-tree/compatible)" in
      *tegra234*) cuda_arch=87 ;; *tegra194*) cuda_arch=72 ;; *tegra264*) cuda_arch=110 ;;
    esac
  fi
else
  command -v nvidia-smi >/dev/null || { echo "gpu.sh: nvidia-smi not found: is this a machine with an NVIDIA GPU?" >&2; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
nvcc_bin="$(command -v nvcc || true)"
[ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc_bin=/usr/local/cuda/bin/nvcc
[ -n "$nvcc_bin" ] || { echo "gpu.sh: nvcc not found (install the CUDA toolkit or put it on PATH)" >&2; exit 2; }
"$nvcc_bin" --version | tail -n 2

test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q -U pip
# setuptools: --no-build-isolation builds hnswlib's setup.py here, and a Python 3.12 venv has none.
"$py" -m pip install -q scikit-build-core pybind11 cmake ninja setuptools
# llama-cpp-python from source with CUDA (no CUDA wheels on PyPI). CUDACXX: CMake otherwise may not find
# nvcc outside PATH; GGML_NATIVE=OFF: a baseline CPU build, as the CPU wheel of the project (on aarch64 with
# the dot product, ARMv8.2: otherwise llama.cpp's CPU code is built for ARMv8.0). On a Jetson, GGML_CUDA_NO_VMM:
# the CUDA pool's 32 GB virtual reservation fails on the iGPU at the first image (ggml-org/llama.cpp#29142).
cmake_args="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$cuda_arch"
[ "$(uname -m)" = aarch64 ] && cmake_args="$cmake_args -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"
[ "$jetson" = 1 ] && cmake_args="$cmake_args -DGGML_CUDA_NO_VMM=ON"
if ! "$py" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' 2>/dev/null; then
  CUDACXX="$nvcc_bin" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_ARGS="$cmake_args" \
    "$py" -m pip install --no-cache-dir --force-reinstall --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
fi
if [ "$jetson" = 1 ]; then
  # The JetPack's own onnxruntime-gpu first (the gpu extra installs nothing on aarch64); JetPack 6's wheels
  # need numpy<2 (the jetson extra).
  if [ -n "${ORT_WHEEL:-}" ]; then "$py" -m pip install -q "$ORT_WHEEL"
  elif [ -n "${ORT_INDEX:-}" ]; then "$py" -m pip install -q --index-url "$ORT_INDEX" onnxruntime-gpu
  else echo "gpu.sh: on a Jetson set ORT_WHEEL or ORT_INDEX to the onnxruntime-gpu built for this JetPack (docs/jetson.md)" >&2; exit 2
  fi
  extras="llm,bench"; grep -q '^# R36' /etc/nv_tegra_release && extras="$extras,jetson"
else
  extras="gpu,llm,bench"
fi
# The project with onnxruntime-gpu, the llm and bench extras; never the cpu extra in the same venv.
"$py" -m pip install -q --no-build-isolation -e ".[$extras]"
"$py" -m pip uninstall -y -q onnxruntime 2>/dev/null || true  # a stray CPU build would shadow the GPU one

"$py" - <<'EOF'
import onnxruntime as ort, llama_cpp
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
print("llama.cpp GPU offload:", bool(llama_cpp.llama_supports_gpu_offload()))
print(llama_cpp.llama_print_system_info().decode())
# The provider list is what was compiled in, not what works: only a real session tells (see docs/jetson.md).
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu is not the onnxruntime in use"
EOF

ranker_args=()
[ -n "${RANKER:-}" ] && ranker_args=(--ranker "$RANKER")
mkdir -p "$out"
if [ "$jetson" = 1 ] && command -v tegrastats >/dev/null; then  # GPU load, clocks, memory and power, once a second
  tegrastats --interval 1000 >"$out/tegrastats.log" 2>&1 &
  tegra_pid=$!
  trap 'kill "$tegra_pid" 2>/dev/null || true' EXIT
fi
# CPU first, then CUDA, on the same machine and data: compare the two bench.json files (medians, ratios).
for provider in cpu cuda; do
  gpu_layers=0; [ "$provider" = cuda ] && gpu_layers=-1  # the ranker on the GPU too in the CUDA run
  "$venv/bin/rar-edge" bench --encoder "$ENCODER" --images "$IMAGES" "${ranker_args[@]}" \
    --provider "$provider" --n-gpu-layers "$gpu_layers" --runs "$runs" --warmup "$warmup" --out "$out/$provider"
done
"$py" - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
res = {p: json.load(open(f"{out}/{p}/bench.json")) for p in ("cpu", "cuda")}
used = res["cuda"]["environment"]["providers_in_use"]["image"]
if used[0] != "CUDAExecutionProvider":
    sys.exit(f"the CUDA run fell back to {used}: check onnxruntime-gpu against the CUDA / cuDNN versions")
for stage in ("encode", "rank", "total"):
    a, b = (res[p]["classify"]["latency_ms"].get(stage) for p in ("cpu", "cuda"))
    if a and b:
        print(f"{stage:7s} p50 cpu {a['p50']:8.2f} ms  cuda {b['p50']:8.2f} ms  ratio cuda/cpu {b['p50'] / a['p50']:.3f}")
print("overhead_share cpu %.3f cuda %.3f" % (res["cpu"]["overhead_share"], res["cuda"]["overhead_share"]))
EOF
