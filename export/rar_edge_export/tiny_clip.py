"""A tiny random-weight CLIP of the real architecture with the real CLIP BPE tokenizer, built offline.

For tests and the demo when no pretrained CLIP can be had. The tokenizer is derived from
``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the open_clip_torch wheel (fetched from PyPI by
``tools/fetch_test_assets.sh``) exactly as OpenAI's ``SimpleTokenizer`` builds its vocabulary.
"""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from pathlib import Path

from rar_edge.errors import ExportError

#: Where tools/fetch_test_assets.sh puts the wheel, relative to the checkout.
_DEFAULT_WHEEL_DIRS = (Path.cwd() / ".cache" / "wheels", Path(__file__).resolve().parents[2] / ".cache" / "wheels")


def find_open_clip_wheel(wheel: str | os.PathLike | None = None) -> Path:
    """The open_clip_torch wheel: ``wheel``, ``$RAR_EDGE_OPEN_CLIP_WHEEL``, or ``.cache/wheels/``.

    Raises:
        ExportError: none found (run tools/fetch_test_assets.sh).
    """
    if wheel is None:
        wheel = os.environ.get("RAR_EDGE_OPEN_CLIP_WHEEL")
    if wheel is not None:
        p = Path(wheel)
        if not p.is_file():
            raise ExportError(f"no open_clip_torch wheel at {p}")
        return p
    for d in _DEFAULT_WHEEL_DIRS:
        found = sorted(d.glob("open_clip_torch-*.whl"))
        if found:
            return found[-1]
    raise ExportError(
        "no open_clip_torch wheel found in .cache/wheels: run tools/fetch_test_assets.sh "
        "(pip download --no-deps open_clip_torch)"
    )


def write_clip_tokenizer_files(
    folder: str | os.PathLike, *, wheel: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """vocab.json + merges.txt of OpenAI's CLIP tokenizer, derived from open_clip's BPE file.

    The same construction as OpenAI's ``SimpleTokenizer``: the 256 byte symbols, the same with the
    end-of-word marker, one token per merge (the first 48,894 merges), then the two special tokens.
    """
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    with zipfile.ZipFile(find_open_clip_wheel(wheel)) as z:
        bpe = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    lines = bpe.split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_clip(out_dir: str | os.PathLike, *, seed: int = 0, wheel: str | os.PathLike | None = None) -> Path:
    """Saves a random-weight CLIPModel (hidden 64, 2 layers, ViT patch 16 at 224 px, projection 32) with
    the real CLIP tokenizer (vocab 49,408) and CLIP's image processor config; returns the folder."""
    import torch
    import transformers

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = write_clip_tokenizer_files(folder / "_bpe", wheel=wheel)
    tokenizer = transformers.CLIPTokenizerFast(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        pad_token="<|endoftext|>",  # as in openai/clip-vit-base-patch32
        model_max_length=77,
    )
    if len(tokenizer) != 49408:
        raise ExportError(f"the CLIP tokenizer built from open_clip has {len(tokenizer)} tokens, expected 49408")
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # OpenAI CLIP's preprocessing: bicubic shortest edge 224, center crop 224, CLIP mean/std.
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(folder)
    return folder
