#!/usr/bin/env bash
# The GPU benchmark for an NVIDIA machine WITHOUT network (gpu.sh needs PyPI): everything it needs is built
# and gathered on a workstation first, into one bundle folder small enough to copy over.
#
#   bash benchmarks/gpu_offline.sh prepare [BUNDLE]    # on a workstation with nvcc and the models
#   bash benchmarks/gpu_offline.sh run [BUNDLE] [OUT]  # on the GPU machine (python3 with numpy, pillow,
#                                                      # onnxruntime, tokenizers, scikit-build-core, pybind11)
#
# prepare (BUNDLE default .cache/device):
#   lib/          (PREPARE_LIB=0 skips it) llama.cpp from the llama-cpp-python 0.3.36 sdist's vendored sources, built with CUDA for
#                 CUDA_ARCH (default 90-real: H100/H200) as shared libraries (llama, mtmd, ggml-*), stripped,
#                 the CUDA one xz-compressed (run unpacks it). They are built for THIS machine's CPU (x86-64:
#                 AVX2 flags and its libgomp; aarch64: ARMv8.2 + dot product), so prepare refuses a device of
#                 another CPU architecture (DEVICE_ARCH, default this machine's; a Jetson CUDA_ARCH such as 87
#                 means aarch64): build lib/ on the board itself, or PREPARE_LIB=0 for the rest of the bundle
#   py/           llama-cpp-python's Python bindings (no libraries: LLAMA_CPP_LIB_PATH points at lib/), diskcache
#   qwen-layout.gguf  the metadata and tensor list of the ranker GGUF (QWEN, default the Qwen2.5-Coder-1.5B
#                 Q4_K_M that tools/fetch_llm.sh fetches): run makes a random-weight model of the same layout
#                 there (benchmarks/random_gguf.py), since 1.1 GB does not travel
#   tiny-vlm/     a tiny random SmolVLM exported by `rar-edge export mllm` (TINY_VLM): the image path
#   encoder/      an exported encoder (ENCODER, default artifacts/bench/mobilenet)
#   shared/data/  6 photos per Oxford-17 class and the COCO class names, laid out as ../shared
#   gguf-py/      llama.cpp's gguf package (for random_gguf.py)
#
# run: builds rar_edge's native module for the machine's python3, then times on one machine, GPU against its CPU:
#   1. the ranker on the random Qwen-layout model, score / generate / llama-cpp-python's chat (the peer),
#      all layers on the GPU, then on the CPU (all cores);
#   2. the ranker with an image (tiny VLM + mmproj), GPU then CPU;
#   3. `rar-edge bench` retrieval + tiny ranker, ranker on the GPU (ONNX Runtime there is the CPU build).
# Writes OUT/results.tgz (every JSON, summary and plot) and prints a short table.
# Environment for run: N / N_CPU ranker queries on the GPU / CPU (50 / 20), RUNS bench runs (100),
# STEPS ("ranker bench"), BENCH_VARIANTS ("name:extra bench options;...", e.g. "on:--spinning on;off:--spinning off").
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cmd="${1:?usage: gpu_offline.sh prepare|run [BUNDLE] [OUT]}"
bundle="${2:-.cache/device}"

prepare() {
  set -e
  local sdist="${SDIST:-.cache/sdist/llama_cpp_python-0.3.36.tar.gz}" arch="${CUDA_ARCH:-90-real}"
  local qwen="${QWEN:-.cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}"
  local encoder="${ENCODER:-artifacts/bench/mobilenet}" flowers="${FLOWERS:-../shared/data/flowers17}"
  local py="${PYTHON:-.venv/bin/python}" build="${BUILD_DIR:-/tmp/rar-edge-llama-cuda}"
  local host device="${DEVICE_ARCH:-}"
  host="$(uname -m)"
  case "${arch%%-*}" in 53|62|72|87|101|110) device="${device:-aarch64}" ;; esac  # Jetson iGPUs: aarch64 boards
  device="${device:-$host}"
  if [ "${PREPARE_LIB:-1}" = 1 ] && [ "$device" != "$host" ]; then
    echo "gpu_offline.sh prepare: refusing to build the device libraries on this $host machine for an $device device" \
      "(CUDA_ARCH=$arch): they would carry $host CPU code and this machine's libgomp. Build lib/ on the device" \
      "(docs/jetson.md), or PREPARE_LIB=0 to gather the rest of the bundle." >&2
    return 2
  fi
  mkdir -p "$bundle"
  local cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
  [ "$host" = aarch64 ] && cpu_flags=(-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod)
  # A Jetson iGPU: the CUDA pool's 32 GB virtual reservation fails at the first image (ggml-org/llama.cpp#29142).
  [ -f /etc/nv_tegra_release ] && cpu_flags+=(-DGGML_CUDA_NO_VMM=ON)
  if [ "${PREPARE_LIB:-1}" = 1 ] && [ ! -f "$bundle/lib/libggml-cuda.so.xz" ]; then
    if [ ! -f "$build/b/build.ninja" ]; then
      local src="$build/src"
      rm -rf "$src" && mkdir -p "$src"
      tar xzf "$sdist" -C "$src" --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
      # Shared libraries only: no common library, tools, tests or server; mtmd as its own library. A
      # machine without a driver links against the toolkit's stub libcuda.so (lib64/stubs).
      cmake -S "$src" -B "$build/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_NCCL=OFF "${cpu_flags[@]}" \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_MTMD=ON -DLLAMA_OPENSSL=OFF
    fi
    ninja -C "$build/b" -j "${JOBS:-$(nproc)}" ggml-cuda llama mtmd  # 24 min on 2 cores for one architecture
    rm -rf "$bundle/lib" && mkdir -p "$bundle/lib"
    local l
    for l in ggml ggml-base ggml-cpu ggml-cuda llama mtmd; do cp -L "$build/b/bin/lib$l.so" "$bundle/lib/"; done
    strip --strip-unneeded "$bundle"/lib/*.so
    cp -L "$(gcc -print-file-name=libgomp.so.1)" "$bundle/lib/"  # the CPU backend's OpenMP, in case it is missing
    (cd "$bundle/lib" && for f in lib*[a-z].so; do ln -sf "$f" "$f.0"; done)  # the SONAMEs the libraries ask for
    xz -T0 -6 "$bundle/lib/libggml-cuda.so"  # 41 MB of kernels -> 19 MB: what travels is limited
  fi
  local site; site="$("$py" -c 'import llama_cpp, os; print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))')"
  rm -rf "$bundle/py" && mkdir -p "$bundle/py"
  (cd "$site" && tar cf - --exclude=lib --exclude=__pycache__ --exclude=server llama_cpp diskcache) | tar xf - -C "$bundle/py"
  rm -rf "$bundle/gguf-py" "$build/gguf" && mkdir -p "$bundle/gguf-py" "$build/gguf"
  tar xzf "$sdist" -C "$build/gguf" --strip-components=4 --wildcards '*/vendor/llama.cpp/gguf-py/gguf/*'
  mv "$build/gguf/gguf" "$bundle/gguf-py/gguf"
  "$py" benchmarks/random_gguf.py layout "$qwen" -o "$bundle/qwen-layout.gguf"
  rm -rf "$bundle/tiny-vlm" "$bundle/encoder" "$bundle/shared"
  if [ -n "${TINY_VLM:-}" ]; then cp -r "$TINY_VLM" "$bundle/tiny-vlm"; else
    "$py" - "$bundle/tiny-vlm" <<'EOF'
import sys, tempfile
from pathlib import Path
from rar_edge_export.tiny_models import build_tiny_vlm
from rar_edge_export.mllm import export_mllm, llama_cpp_source
src = llama_cpp_source()
with tempfile.TemporaryDirectory() as tmp:
    hf = build_tiny_vlm("smolvlm", Path(tmp) / "hf", vocab_gguf=src / "models" / "ggml-vocab-gpt-2.gguf")
    export_mllm(hf, sys.argv[1], quant="Q8_0", llama_cpp_src=src)
EOF
  fi
  cp -r "$encoder" "$bundle/encoder"
  # The class names benchmarks/ranker.py draws from, and 6 photos per flower class (a 2-shot memory, 4 queries)
  mkdir -p "$bundle/shared/data/coco128"
  cp "$(dirname "$flowers")/coco128/classes.txt" "$bundle/shared/data/coco128/"
  for d in "$flowers"/*/; do
    c="$(basename "$d")"; mkdir -p "$bundle/shared/data/flowers17/$c"
    find "$d" -maxdepth 1 -name '*.jpg' | sort | head -n 6 | xargs -I{} cp {} "$bundle/shared/data/flowers17/$c/"
  done
  du -sh "$bundle"/* "$bundle"
}

run() {
  local out="${3:-${OUT:-artifacts/gpu-offline}}" res
  bundle="$(cd "$bundle" && pwd)"
  res="$out/res"; mkdir -p "$res"
  if [ -f "$bundle/lib/libggml-cuda.so.xz" ] && [ ! -f "$bundle/lib/libggml-cuda.so" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$bundle/lib/libggml-cuda.so.xz" "$bundle/lib/libggml-cuda.so"
  fi
  local tegra_pid=""
  if [ -f /etc/nv_tegra_release ]; then  # a Jetson: no nvidia-smi on JetPack 5; tegrastats samples the iGPU
    { head -n 1 /etc/nv_tegra_release; tr -d '\0' </proc/device-tree/model; echo; nvpmodel -q 2>/dev/null | head -n 2; } \
      | tee "$res/gpu.txt"
    if command -v tegrastats >/dev/null; then
      tegrastats --interval 1000 >"$res/tegrastats.log" 2>&1 &
      tegra_pid=$!
    fi
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$res/gpu.txt"
  else
    echo "gpu_offline.sh run: neither nvidia-smi nor a Jetson (/etc/nv_tegra_release) here" >&2; return 2
  fi
  lscpu | grep -E '^(Model name|CPU\(s\))' | tee -a "$res/gpu.txt"
  # CUDA runtime and cuBLAS: the toolkit's, or the NVIDIA wheels beside PyTorch.
  local ld=""
  for d in /usr/local/cuda/lib64 "/usr/local/cuda/targets/$(uname -m)-linux/lib" \
           $(python3 -c 'import glob, site; print(" ".join(sorted({p.rsplit("/", 1)[0] for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/libcu*.so*", recursive=True)})))' 2>/dev/null); do
    [ -d "$d" ] && ld="$ld:$d"
  done
  export LD_LIBRARY_PATH="$bundle/lib$ld:${LD_LIBRARY_PATH:-}"
  export LLAMA_CPP_LIB_PATH="$bundle/lib" MTMD_CPP_LIB="$bundle/lib" PYTHONUNBUFFERED=1
  # The native module for this Python, placed in the source tree (the scripts import rar_edge from there).
  local t0=$SECONDS
  if python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/site . >"$res/pip.log" 2>&1; then
    cp /tmp/site/rar_edge/_native*.so rar_edge/
  else  # an older scikit-build-core: plain CMake
    tail -5 "$res/pip.log"
    cmake -S . -B /tmp/native -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
      -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >"$res/cmake.log" 2>&1 && ninja -C /tmp/native >>"$res/cmake.log" 2>&1 \
      && cp /tmp/native/cpp/_native*.so rar_edge/ || { tail -20 "$res/cmake.log"; return 1; }
  fi
  echo "rar_edge native module built in $((SECONDS - t0)) s"
  [ -d /usr/local/nvidia/lib64 ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"
  export PYTHONPATH="$root:$bundle/py:$bundle/gguf-py:${PYTHONPATH:-}"
  python3 -c 'import llama_cpp as l; print("llama.cpp GPU offload:", bool(l.llama_supports_gpu_offload())); print(l.llama_print_system_info().decode())' \
    | tee -a "$res/gpu.txt"
  local threads steps="${STEPS:-ranker bench}"  # which parts to run
  threads="$(nproc)"
  [[ " $steps " == *" ranker "* ]] && python3 benchmarks/random_gguf.py make "$bundle/qwen-layout.gguf" -o /tmp/qwen-random.gguf
  [[ " $steps " == *" ranker "* ]] && for where in gpu cpu; do
    # Fewer queries on the CPU (N_CPU): a random-weight model never says stop, so the peer's free-form chat
    # always writes its whole token budget, which costs seconds per query there.
    local ngl=-1 n="${N:-50}"; [ "$where" = cpu ] && ngl=0 n="${N_CPU:-20}"
    python3 benchmarks/ranker.py --model /tmp/qwen-random.gguf --n "$n" --threads "$threads" --n-gpu-layers "$ngl" \
      --shared "$bundle/shared" --json "$res/ranker_qwen_$where.json" >"$res/ranker_qwen_$where.log" 2>&1 \
      || tail -20 "$res/ranker_qwen_$where.log"
    python3 benchmarks/ranker.py --model "$bundle/tiny-vlm/model-Q8_0.gguf" --mmproj "$bundle/tiny-vlm/mmproj-F16.gguf" \
      --n "$n" --threads "$threads" --n-gpu-layers "$ngl" --shared "$bundle/shared" --json "$res/ranker_vlm_$where.json" \
      >"$res/ranker_vlm_$where.log" 2>&1 || tail -20 "$res/ranker_vlm_$where.log"
  done
  # BENCH_VARIANTS: "name:extra bench options;..." (default one plain run per place)
  local variants v name args
  IFS=';' read -ra variants <<<"${BENCH_VARIANTS:-plain:}"
  [[ " $steps " == *" bench "* ]] && for v in "${variants[@]}"; do
    name="${v%%:*}" args="${v#*:}"
    for where in gpu cpu; do
      local ngl=-1; [ "$where" = cpu ] && ngl=0
      # shellcheck disable=SC2086
      python3 -m rar_edge -q bench --encoder "$bundle/encoder" --images "$bundle/shared/data/flowers17" --shots 2 \
        --ranker "$bundle/tiny-vlm" --n-gpu-layers "$ngl" --runs "${RUNS:-100}" --warmup 10 $args \
        --out "$res/bench_${where}_$name" >"$res/bench_${where}_$name.log" 2>&1 || tail -20 "$res/bench_${where}_$name.log"
    done
  done
  [ -n "$tegra_pid" ] && kill "$tegra_pid" 2>/dev/null
  tar czf "$out/results.tgz" -C "$out" res
  python3 - "$res" <<'EOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
def load(name):
    p = res / name
    return json.loads(p.read_text()) if p.is_file() else None
for model in ("qwen", "vlm"):
    g, c = load(f"ranker_{model}_gpu.json"), load(f"ranker_{model}_cpu.json")
    for mode in ("score", "generate", "peer_chat"):
        if g and c and f"{mode}_ms" in g and f"{mode}_ms" in c:
            a, b = c[f"{mode}_ms"]["p50"], g[f"{mode}_ms"]["p50"]
            print(f"ranker {model:4s} {mode:9s} p50 cpu {a:8.2f} ms  gpu {b:8.2f} ms  gpu/cpu {b / a:.3f}")
    if g:
        print(f"ranker {model} gpu in_list {g['in_list_rate']} score/generate p50 {g['score_over_generate_p50']:.3f}"
              f" load {g['load_ms']:.0f} ms offload {g['gpu_offload_supported']}")
for p in sorted(res.glob("bench_*/bench.json")):
    b = json.loads(p.read_text())
    lat, st = b["classify"]["latency_ms"], b["classify"].get("stream")
    print(f"{p.parent.name}: " + "  ".join(f"{s} {v['p50']:.2f}" for s, v in lat.items() if v) +
          f"  overhead_share {b['overhead_share']:.3f}" +
          (f"  streamed {st['wall_ms_per_image']:.2f} ms/img share {st['overhead_share']:.3f}" if st else ""))
EOF
}

case "$cmd" in
  prepare) prepare ;;
  run) run "$@" ;;
  *) echo "usage: gpu_offline.sh prepare|run [BUNDLE] [OUT]" >&2; exit 2 ;;
esac
