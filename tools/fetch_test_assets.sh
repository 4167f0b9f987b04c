#!/usr/bin/env bash
# Fetches the files the tests need from the package registry into .cache/ (idempotent, no Hugging Face hub).
#   open_clip_torch wheel: its bpe_simple_vocab_16e6.txt.gz gives the tests a real CLIP BPE tokenizer offline.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$root/.cache/wheels"
OPEN_CLIP_VERSION="3.3.0"
wheel="$wheels/open_clip_torch-$OPEN_CLIP_VERSION-py3-none-any.whl"
python="${PYTHON:-python3}"
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$root/.venv/bin/python"; fi

if [ -f "$wheel" ]; then
  echo "fetch_test_assets: $wheel already present"
  exit 0
fi
mkdir -p "$wheels"
"$python" -m pip download --quiet --no-deps --only-binary=:all: "open_clip_torch==$OPEN_CLIP_VERSION" -d "$wheels"
test -f "$wheel" || { echo "fetch_test_assets: expected $wheel after download" >&2; exit 1; }
echo "fetch_test_assets: downloaded $wheel"
