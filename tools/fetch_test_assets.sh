#!/usr/bin/env bash
# Fetches the files the tests need from the package registry into .cache/ (idempotent, no Hugging Face hub).
#   open_clip_torch wheel: its bpe_simple_vocab_16e6.txt.gz gives the tests a real CLIP BPE tokenizer offline.
#   .cache/models/mobilenet: the shared MobileNet .tflite exported once by `rar-edge export tflite`, so the
#   runtime tests need no TensorFlow (tests/conftest.py checks it was made from the same .tflite bytes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$root/.cache/wheels"
OPEN_CLIP_VERSION="3.3.0"
wheel="$wheels/open_clip_torch-$OPEN_CLIP_VERSION-py3-none-any.whl"
python="${PYTHON:-python3}"
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$root/.venv/bin/python"; fi

if [ -f "$wheel" ]; then
  echo "fetch_test_assets: $wheel already present"
else
  mkdir -p "$wheels"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: "open_clip_torch==$OPEN_CLIP_VERSION" -d "$wheels"
  test -f "$wheel" || { echo "fetch_test_assets: expected $wheel after download" >&2; exit 1; }
  echo "fetch_test_assets: downloaded $wheel"
fi

shared="${RAR_EDGE_SHARED:-$root/../shared}"
tflite="$shared/models/mobilenet_v1_embedding/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
mobilenet="$root/.cache/models/mobilenet"
if [ ! -f "$tflite" ]; then
  echo "fetch_test_assets: $tflite absent: the MobileNet tests will skip (or fail under CI=true)"
elif [ -f "$mobilenet/manifest.json" ] && grep -q "$(sha256sum "$tflite" | cut -d' ' -f1)" "$mobilenet/manifest.json"; then
  echo "fetch_test_assets: $mobilenet already exported from $tflite"
else
  "$python" -m rar_edge -q export tflite "$tflite" -o "$mobilenet" --overwrite
  echo "fetch_test_assets: exported $tflite to $mobilenet"
fi
