"""Per-stage latency, SDK overhead, cold start and encoder variants: a thin script over `rar_edge.tools.bench`.

Plain use takes the same options as ``rar-edge bench``::

    .venv/bin/python benchmarks/latency.py --encoder MODEL_DIR --images ../shared/data/flowers17 --out OUT

With ``--export-variants SRC`` the encoder is exported here first, through the project's exporters
(`rar_edge_export.export_tflite` / `export_clip` with ``quantize=None``, ``"int8"``, ``"fp16"``), into
``--models-dir``; the float32 export is the reference and the others are compared to it (latency of
``session.run`` on the same pixels, embedding cosine on the query photos). SRC is a ``.tflite`` file, a
local CLIP folder, or ``random-clip-vit-b32``: a CLIP with ViT-B/32's shapes and *random* weights (no
pretrained CLIP is reachable offline), which gives real latencies but cosines of an untrained network::

    .venv/bin/python benchmarks/latency.py --export-variants random-clip-vit-b32 \\
        --models-dir artifacts/models --images ../shared/data/flowers17 --out artifacts/bench-clip
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow as well: slow and unused here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
RANDOM_CLIP = "random-clip-vit-b32"


def _random_clip_vit_b32(folder: Path) -> Path:
    """Writes a random-weight CLIPModel with openai/clip-vit-base-patch32's shapes and the real CLIP tokenizer."""
    import torch
    import transformers

    # The tokenizer files come from the same construction as the tests' fixtures (open_clip's BPE file).
    spec = importlib.util.spec_from_file_location("_rar_edge_test_conftest", REPO / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(conftest)
    vocab, merges = conftest.write_clip_tokenizer_files(folder / "bpe")
    tok = transformers.CLIPTokenizerFast(
        vocab_file=str(vocab), merges_file=str(merges), pad_token="<|endoftext|>", model_max_length=77
    )
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
    )
    torch.manual_seed(0)
    out = folder / "clip-vit-b32-random"
    transformers.CLIPModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(out)
    return out


def export_variants(src: str, models_dir: Path) -> tuple[Path, list[Path], list[str]]:
    """Exports float32 / int8 / fp16 folders of ``src`` (reusing complete ones); returns (reference, variants, notes)."""
    from rar_edge.errors import ExportError
    from rar_edge_export import export_clip, export_tflite

    notes = []
    models_dir.mkdir(parents=True, exist_ok=True)
    if src == RANDOM_CLIP:
        base = models_dir / "clip-vit-b32-random"
        source = base / "clip-vit-b32-random"
        if not (source / "config.json").is_file():
            _random_clip_vit_b32(base)
        export, stem = export_clip, "clip-vit-b32-random"
        notes.append(
            "encoder: CLIP with ViT-B/32 shapes and RANDOM weights (torch.manual_seed(0)): latencies are "
            "those of ViT-B/32; cosines are those of an untrained network, not of OpenAI's weights"
        )
    elif src.endswith(".tflite"):
        source, export, stem = Path(src), export_tflite, Path(src).stem
    else:
        source, export, stem = Path(src), export_clip, Path(src).name
    dirs = {}
    for mode in (None, "int8", "fp16"):
        if mode is not None and None in dirs and _quantization_mode(dirs[None]) is not None:
            notes.append(
                f"{mode} variant not made: the source model is already "
                f"{_quantization_mode(dirs[None])}-quantized (no float32 twin to compare with)"
            )
            continue
        d = models_dir / f"{stem}.{mode or 'fp32'}"
        if not (d / "manifest.json").is_file():
            try:
                export(source, d, quantize=mode, overwrite=True)
            except ExportError as e:
                notes.append(f"{mode} variant not made: {e}")
                continue
        dirs[mode] = d
    fn = export.__name__
    notes.append(
        f"variants exported with rar_edge_export.{fn}(quantize=None | 'int8' | 'fp16'); "
        "the export made without quantize= is the reference (float32 unless the source is quantized)"
    )
    return dirs[None], [dirs[m] for m in ("int8", "fp16") if m in dirs], notes


def _quantization_mode(model_dir: Path) -> str | None:
    q = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8")).get("quantization")
    return None if not q else q.get("mode")


def main(argv: list[str] | None = None) -> int:
    from rar_edge.errors import RarEdgeError
    from rar_edge.tools.bench import add_bench_arguments, run_from_args, summary_lines

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--export-variants", default=None, metavar="SRC")
    pre.add_argument("--models-dir", default=None)
    pre.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    known, rest = pre.parse_known_args(argv)
    notes: list[str] = []
    if known.export_only:  # the child process below: export, print what was made, exit
        if not (known.export_variants == RANDOM_CLIP or Path(known.export_variants).exists()):
            print(f"latency.py: error: no model at {known.export_variants}", file=sys.stderr)
            return 2
        ref, variants, notes = export_variants(known.export_variants, Path(known.models_dir))
        print(json.dumps({"reference": str(ref), "variants": [str(v) for v in variants], "notes": notes}))
        return 0
    if known.export_variants:
        # Export in a child process, so that torch and the exporters' memory stay out of the measured
        # process (cold start, peak RSS).
        models_dir = Path(known.models_dir or tempfile.mkdtemp(prefix="rar_edge_variants_"))
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--export-variants",
                known.export_variants,
                "--models-dir",
                str(models_dir),
                "--export-only",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.returncode != 0:
            print(f"latency.py: error: exporting {known.export_variants} failed (see above)", file=sys.stderr)
            return 2
        made = json.loads(proc.stdout.strip().splitlines()[-1])
        notes = made["notes"]
        rest = ["--encoder", made["reference"], *[x for v in made["variants"] for x in ("--variant", v)], *rest]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre])
    add_bench_arguments(p)
    args = p.parse_args(rest)
    try:
        res = run_from_args(args, notes=notes)
    except RarEdgeError as e:
        print(f"latency.py: error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(res, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
