"""Builders of tiny random-weight models, for tests and demos (seconds on a CPU, no network).

* `write_tiny_text_gguf`: a llama-architecture GGUF written directly with ``gguf.GGUFWriter``
  (n_embd 256 so that K-quants apply, 2 layers, a byte-fallback SentencePiece-style vocabulary with
  ChatML control tokens and a ChatML chat template). Token strings must be unique: llama.cpp aborts the
  whole process (GGML_ASSERT) on a duplicate instead of raising.
* `build_tiny_vlm`: a Hugging Face folder of a tiny random vision-language model of a real architecture
  (``llava`` = LLaVA-1.5, ``smolvlm`` = Idefics3, ``qwen2_vl``, ``qwen2_5_vl``, ``gemma3``), built from
  transformers' own config classes and saved with ``save_pretrained``, for `rar_edge_export.mllm.export_mllm`.
  Their tokenizer is GPT-2's byte-level BPE, rebuilt from the vocab-only ``ggml-vocab-gpt-2.gguf`` that
  the llama-cpp-python source package ships, so llama.cpp's converter recognises its pre-tokenizer hash
  ("gpt-2") offline; each family's image/control tokens are added on top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CHATML_TEMPLATE", "FAMILIES", "build_tiny_vlm", "gpt2_tokenizer_files", "write_tiny_text_gguf"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("llava", "smolvlm", "qwen2_vl", "qwen2_5_vl", "gemma3")


def write_tiny_text_gguf(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 512,
    n_ctx_train: int = 4096,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Writes a tiny random llama-architecture GGUF (F32 weights) and returns its path."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []

    def add(tok: str, score: float, ttype: int) -> None:
        tokens.append(tok.encode("utf-8"))
        scores.append(score)
        types.append(ttype)

    T = gguf.TokenType
    add("<unk>", 0.0, T.UNKNOWN)
    add("<s>", 0.0, T.CONTROL)
    add("</s>", 0.0, T.CONTROL)
    add("<|im_start|>", 0.0, T.CONTROL)
    add("<|im_end|>", 0.0, T.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, T.BYTE)
    add("\u2581", -1.0, T.NORMAL)
    for c in range(0x21, 0x7F):
        add(chr(c), -2.0, T.NORMAL)
    pieces = [
        "\u2581a",
        "\u2581the",
        "\u2581of",
        "\u2581and",
        "er",
        "in",
        "an",
        "on",
        "at",
        "or",
        "es",
        "en",
        "\u2581c",
        "\u2581s",
        "\u2581t",
        "\u2581i",
        "\u2581p",
        "\u2581m",
        "\u2581f",
        "\u2581d",
        "\u2581b",
    ]
    for i, p in enumerate(pieces):
        add(p, -3.0 - i * 0.01 + len(p), T.NORMAL)
    if len(set(tokens)) != len(tokens):  # llama.cpp would abort the process, not raise
        raise ValueError("tiny vocabulary has duplicate token strings")
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("rar-edge-tiny-llama")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def mat(rows: int, cols: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd, 0.5))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(n_vocab, n_embd, 0.2))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def gpt2_tokenizer_files(
    out_dir: str | os.PathLike,
    vocab_gguf: str | os.PathLike,
    *,
    added_tokens: Sequence[str] = (),
    chat_template: str = CHATML_TEMPLATE,
    eos_token: str = "<|im_end|>",
) -> int:
    """Writes ``tokenizer.json`` + ``tokenizer_config.json`` for GPT-2's BPE, read from a vocab-only GGUF.

    Returns:
        the vocabulary size including the added tokens.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    r = gguf.GGUFReader(str(vocab_gguf))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    vocab = {t: i for i, t in enumerate(toks)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *added_tokens]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(specials)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": eos_token,
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "add_prefix_space": False,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return tok.get_vocab_size()


def _family_tokens(family: str) -> list[str]:
    if family == "smolvlm":
        rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
        return ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *rows]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    if family == "gemma3":
        return ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    if family == "llava":
        return ["<image>"]
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def build_tiny_vlm(family: str, out_dir: str | os.PathLike, *, vocab_gguf: str | os.PathLike, seed: int = 0) -> Path:
    """Saves a tiny random VLM of ``family`` as a Hugging Face folder and returns it.

    Args:
        family: one of `FAMILIES`.
        out_dir: the folder to write.
        vocab_gguf: ``ggml-vocab-gpt-2.gguf`` from the llama-cpp-python source package
            (``llama_cpp_source() / "models" / "ggml-vocab-gpt-2.gguf"``).
        seed: torch seed for the random weights.
    """
    import torch
    import transformers as tf

    out = Path(out_dir)
    n_vocab = gpt2_tokenizer_files(out, vocab_gguf, added_tokens=_family_tokens(family))
    with open(out / "tokenizer.json", encoding="utf-8") as f:
        tid = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    torch.manual_seed(seed)
    text_common: dict[str, Any] = dict(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tid["<|endoftext|>"],
        eos_token_id=tid["<|im_end|>"],
        pad_token_id=tid["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    pre: dict[str, Any] = {}
    if family == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            projection_dim=64,
        )
        cfg = tf.LlavaConfig(
            vision_config=vision,
            text_config=tf.LlamaConfig(**text_common),
            image_token_index=tid["<image>"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=16,
            tie_word_embeddings=True,
        )
        model = tf.LlavaForConditionalGeneration(cfg)
        pre = {
            "image_processor_type": "CLIPImageProcessor",
            "crop_size": {"height": 64, "width": 64},
            "size": {"shortest_edge": 64},
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
    elif family == "smolvlm":
        vision = tf.Idefics3VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        )
        text = tf.LlamaConfig(**text_common, architectures=["VLlama3ForCausalLM"])
        cfg = tf.Idefics3Config(
            vision_config=vision,
            text_config=text,
            image_token_id=tid["<image>"],
            scale_factor=2,
            tie_word_embeddings=True,
        )
        model = tf.Idefics3ForConditionalGeneration(cfg)
        pre = {
            "image_processor_type": "Idefics3ImageProcessor",
            "size": {"longest_edge": 64},
            "max_image_size": {"longest_edge": 64},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text_kw = dict(text_common, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        ids = dict(
            image_token_id=tid["<|image_pad|>"],
            video_token_id=tid["<|video_pad|>"],
            vision_start_token_id=tid["<|vision_start|>"],
            vision_end_token_id=tid["<|vision_end|>"],
        )
        if family == "qwen2_vl":
            # depth >= 3: the converter maps the merger's mlp.2 through the block-index table
            vision_kw = dict(
                depth=3,
                embed_dim=64,
                hidden_size=64,
                num_heads=4,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            )
            cfg = tf.Qwen2VLConfig(text_config=text_kw, vision_config=vision_kw, **ids, tie_word_embeddings=True)
            model = tf.Qwen2VLForConditionalGeneration(cfg)
        else:
            vision_kw = dict(
                depth=4,
                hidden_size=64,
                intermediate_size=128,
                num_heads=4,
                out_hidden_size=64,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=112,
                fullatt_block_indexes=[1, 3],
                in_channels=3,
            )
            cfg = tf.Qwen2_5_VLConfig(text_config=text_kw, vision_config=vision_kw, **ids, tie_word_embeddings=True)
            model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
        pre = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": 3136,
            "max_pixels": 50176,
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
    elif family == "gemma3":
        vision = tf.SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
        )
        text = tf.Gemma3TextConfig(
            **{k: v for k, v in text_common.items() if k != "tie_word_embeddings"},
            head_dim=16,
            sliding_window=512,
            query_pre_attn_scalar=16,
        )
        cfg = tf.Gemma3Config(
            vision_config=vision,
            text_config=text,
            mm_tokens_per_image=16,
            boi_token_index=tid["<start_of_image>"],
            eoi_token_index=tid["<end_of_image>"],
            image_token_index=tid["<image_soft_token>"],
        )
        model = tf.Gemma3ForConditionalGeneration(cfg)
        pre = {
            "image_processor_type": "Gemma3ImageProcessor",
            "size": {"height": 64, "width": 64},
            "image_seq_length": 16,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    # Real checkpoints name their class in config.json and the converter routes on it; transformers 4.57
    # drops it for some composite configs (Qwen2-VL), so write it explicitly.
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    saved["architectures"] = [type(model).__name__]
    cfg_path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1), encoding="utf-8")
    return out
