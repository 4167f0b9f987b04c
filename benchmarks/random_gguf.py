"""A GGUF with a real model's layout and random weights, for timing a model that cannot travel.

Latency of a llama.cpp model depends on its architecture, tensor shapes, quantization types and tokenizer,
not on the weight values. This tool keeps all of those from a real GGUF and replaces the weights with
random, valid values (every block scale a finite fp16, norms 1), so a machine that cannot hold the real file
(the lent GPU machine: 64 MiB travels) can still time the same model shape. The answers of such a model
mean nothing; only timings do.

Two steps::

    # here, next to the real file: its metadata (tokenizer, hyper-parameters) and tensor list, a few MB
    python benchmarks/random_gguf.py layout REAL.gguf -o layout.gguf
    # anywhere: the random-weight model, same size and layout as REAL.gguf
    python benchmarks/random_gguf.py make layout.gguf -o random.gguf --seed 0

``make`` also accepts the real GGUF directly. Needs the ``gguf`` package (llama.cpp's gguf-py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TENSORS_KEY = "rar_edge.random_gguf.tensors"

# Block layouts of the types real quantized files use: bytes per block, and the byte offsets of the fp16
# fields with the value each gets. The values keep dequantized weights at a trained model's scale (a few
# hundredths), so activations stay in fp16 range on the GPU: e.g. Q4_K = d * scale(0..63) * q(0..15) - dmin * m.
_FP16_FIELDS = {
    "Q4_0": (18, {0: 5e-3}),
    "Q4_1": (20, {0: 3e-3, 2: -0.02}),
    "Q5_0": (22, {0: 2e-3}),
    "Q5_1": (24, {0: 1.5e-3, 2: -0.02}),
    "Q8_0": (34, {0: 3e-4}),
    "Q2_K": (84, {80: 2e-3, 82: 1e-3}),
    "Q3_K": (110, {108: 1e-3}),
    "Q4_K": (144, {0: 1e-4, 2: 1e-4}),
    "Q5_K": (176, {0: 5e-5, 2: 5e-5}),
    "Q6_K": (210, {208: 1.5e-5}),
}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a usage error
        sys.exit(f"random_gguf: needs the gguf package (llama.cpp's gguf-py on PYTHONPATH): {e}")
    return gguf


def _tensor_list(reader) -> list[dict]:
    field = reader.fields.get(TENSORS_KEY)
    if field is not None:
        return json.loads(field.contents())
    return [{"name": t.name, "ne": [int(x) for x in t.shape], "type": t.tensor_type.name} for t in reader.tensors]


def _copy_metadata(gguf, reader, writer, skip: set[str]) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def layout(src: Path, out: Path) -> None:
    gguf = _gguf()
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tensors = _tensor_list(reader)
    writer = gguf.GGUFWriter(out, arch)
    _copy_metadata(gguf, reader, writer, skip={TENSORS_KEY})
    writer.add_string(TENSORS_KEY, json.dumps(tensors))
    _write(writer)
    print(json.dumps({"layout": str(out), "bytes": out.stat().st_size, "tensors": len(tensors)}))


def _random_tensor(
    gguf, rng: np.random.Generator, name: str, ne: list[int], type_name: str
) -> tuple[np.ndarray, object]:
    qtype = gguf.GGMLQuantizationType[type_name]
    shape = list(reversed(ne))  # numpy order: the row (ne0) last
    if type_name == "F32":
        if "norm" in name:
            return np.ones(shape, np.float32), None
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02), None
    if type_name in ("F16", "BF16"):
        a = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return (a.astype(np.float16), None) if type_name == "F16" else (a, None)
    if type_name not in _FP16_FIELDS:
        raise SystemExit(f"random_gguf: tensor {name}: type {type_name} is not supported")
    block_elems, type_size = gguf.GGML_QUANT_SIZES[qtype]
    block_bytes, fields = _FP16_FIELDS[type_name]
    assert block_bytes == type_size, (type_name, block_bytes, type_size)
    if ne[0] % block_elems:
        raise SystemExit(f"random_gguf: tensor {name}: row of {ne[0]} is not a multiple of {block_elems}")
    n_blocks = int(np.prod(ne, dtype=np.int64)) // block_elems
    data = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off, value in fields.items():  # finite scales instead of random bits (which include inf and NaN)
        data[:, off : off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    row_bytes = ne[0] // block_elems * block_bytes
    return data.reshape(shape[:-1] + [row_bytes]), qtype


def make(src: Path, out: Path, seed: int) -> None:
    gguf = _gguf()
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tensors = _tensor_list(reader)
    writer = gguf.GGUFWriter(out, arch)
    _copy_metadata(gguf, reader, writer, skip={TENSORS_KEY, "general.name"})
    name = reader.fields.get("general.name")
    writer.add_key_value(
        "general.name",
        f"random weights in the layout of {name.contents() if name else src.name}",
        gguf.GGUFValueType.STRING,
    )
    rng = np.random.default_rng(seed)
    for t in tensors:
        data, qtype = _random_tensor(gguf, rng, t["name"], t["ne"], t["type"])
        writer.add_tensor(t["name"], data, raw_dtype=qtype)
    _write(writer)
    print(
        json.dumps(
            {
                "model": str(out),
                "bytes": out.stat().st_size,
                "tensors": len(tensors),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("layout", help="write a real GGUF's metadata and tensor list (no weights)")
    a.add_argument("src", type=Path)
    a.add_argument("-o", "--out", type=Path, required=True)
    b = sub.add_parser("make", help="write a GGUF with that layout and random weights")
    b.add_argument("src", type=Path, help="a layout file or a real GGUF")
    b.add_argument("-o", "--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "layout":
        layout(args.src, args.out)
    else:
        make(args.src, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
