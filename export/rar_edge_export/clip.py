"""CLIP (a Hugging Face ``CLIPModel``) -> separate image and text ONNX towers + tokenizer.json + manifest.

The runtime never sees transformers: the image preprocessing is read here from the model's
``CLIPImageProcessor`` config, the tokenizer is saved as a plain ``tokenizers`` file with CLIP's
truncation and padding built in, and both go into the manifest beside the ONNX files.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rar_edge.errors import ExportError, InvalidInputError
from rar_edge.manifest import ImageSpec, Manifest, TextSpec, load_manifest, write_manifest

from ._common import (
    atomic_output_dir,
    check_output_dir,
    check_quantize_mode,
    cosine_rows,
    exporter_id,
    logger,
    looks_like_path,
    onnx_session,
    require,
    run_onnx,
)
from .quantize import check_quantized_cosine, quantization_record, quantize_onnx

# A small ensemble from the 80 ImageNet prompts of Radford et al. (2021), the templates CLIP was
# evaluated with; generic enough for any label set.
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "itap of a {}.",
)

IMAGE_FILE = "vision.onnx"
TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
#: ONNX and PyTorch embeddings must agree to this (absolute, for embeddings of magnitude <= 1).
VALIDATION_ATOL = 1e-4

# PIL.Image.Resampling values as stored in preprocessor_config.json.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_APPROX = {1: "bicubic", 4: "bilinear", 5: "bilinear"}  # lanczos, box, hamming

_VALIDATION_TEXTS = (
    "a photo of a cat.",
    "a close-up photo of a fritillary, a type of flower with a checkered pattern.",
    # Longer than CLIP's 77 tokens: exercises truncation and the last position embedding.
    " ".join(["a photo of many small red and yellow tulips in a field"] * 12),
)


@dataclass(frozen=True)
class _Tower:
    role: str  # manifest file role
    file: str
    output_name: str
    feed: dict[str, np.ndarray]
    reference: np.ndarray  # PyTorch output on ``feed``


def export_clip(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    opset: int = 17,
    quantize: str | None = None,
    overwrite: bool = False,
    zero_shot_templates: Sequence[str] | None = None,
) -> Manifest:
    """Exports a CLIP model to a rar_edge model folder.

    Writes ``vision.onnx`` (``pixel_values`` -> ``image_embeds``), ``text.onnx`` (``input_ids``,
    ``attention_mask`` -> ``text_embeds``), ``tokenizer.json`` and ``manifest.json``. Both towers
    are checked against PyTorch on a few inputs before anything is written to ``out_dir``.

    Args:
        src: a local folder holding a ``CLIPModel`` (config, weights, tokenizer, image processor
            config), or a Hugging Face model id.
        out_dir: the model folder to write; it is written atomically (built beside it, then renamed).
        opset: the ONNX opset.
        quantize: ``None`` for float32, ``"int8"`` (dynamic int8 weights) or ``"fp16"``; the quantized
            models replace the float32 ones and the manifest records how they were made.
        overwrite: replace a non-empty ``out_dir``.
        zero_shot_templates: prompt templates with one ``{}`` for the class name, recorded in the
            manifest; default `ZERO_SHOT_TEMPLATES`.

    Returns:
        The manifest of the written folder.

    Raises:
        ExportError: ``src`` is missing or not a CLIP model, ``out_dir`` is not empty, the ONNX
            export fails or disagrees with PyTorch.
        InvalidInputError: a bad ``quantize`` mode or template.
        MissingDependencyError: torch / transformers / optimum / onnxruntime are not installed.
    """
    check_quantize_mode(quantize)
    templates = _check_templates(ZERO_SHOT_TEMPLATES if zero_shot_templates is None else zero_shot_templates)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite)
    source, local = _resolve_source(src)
    for module, package in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("optimum.exporters.onnx", "optimum-onnx"),
    ):
        require(module, package=package, extra="export", purpose="Exporting CLIP to ONNX")

    config = _load_config(source, local)
    preprocessing = _image_preprocessing(source, local, config)
    context_length = int(config.text_config.max_position_embeddings)
    vision, text = _load_towers(source, local, config)

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        pad_token_id = _save_tokenizer(source, local, context_length, tmp / TOKENIZER_FILE)
        fp32_dir = tmp / "fp32" if quantize else tmp
        fp32_dir.mkdir(exist_ok=True)
        _export_onnx(vision, text, fp32_dir, opset=opset)
        towers = _reference_outputs(vision, text, tmp / TOKENIZER_FILE, preprocessing["size_px"])
        max_diff = {t.role: _check_matches_torch(fp32_dir / t.file, t) for t in towers}

        files, quantization = _quantize_towers(towers, fp32_dir, tmp, quantize)
        image, text_spec = _io_specs(tmp, files, preprocessing, context_length, pad_token_id)
        write_manifest(
            tmp,
            {
                "kind": "clip",
                "name": Path(source).name if local else source,
                "source": source,
                "exporter": exporter_id(),
                "opset": opset,
                "embedding_dim": int(config.projection_dim),
                "image": image,
                "text": text_spec.to_dict(),
                "zero_shot_templates": list(templates),
                "quantization": quantization,
                "validation": {"max_abs_diff_to_torch": max_diff},
            },
            files=files,
        )
    return load_manifest(out_dir)


def _quantize_towers(
    towers: Sequence[Any], fp32_dir: Path, tmp: Path, quantize: str | None
) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The files map (tokenizer and towers) and the quantization record; quantized towers replace the fp32 ones."""
    files = {"tokenizer": TOKENIZER_FILE}
    if quantize is None:
        files.update({t.role: t.file for t in towers})
        return files, None
    infos, cosines = {}, {}
    for t in towers:
        files[t.role] = t.file.replace(".onnx", f".{quantize}.onnx")
        infos[t.role] = quantize_onnx(fp32_dir / t.file, tmp / files[t.role], mode=quantize)
        got = run_onnx(tmp / files[t.role], t.feed, t.output_name)
        cosines[t.role] = check_quantized_cosine(files[t.role], float(cosine_rows(got, t.reference).min()))
    shutil.rmtree(fp32_dir)
    return files, quantization_record(infos, cosines)


def _io_specs(
    tmp: Path, files: dict[str, str], preprocessing: dict[str, Any], context_length: int, pad_token_id: int
) -> tuple[dict[str, Any], TextSpec]:
    """The manifest's image section and text spec, with the input and output names the exported graphs have."""
    image_session = onnx_session(tmp / files["image_model"])
    text_session = onnx_session(tmp / files["text_model"])
    image = ImageSpec.from_dict(
        {
            **preprocessing,
            "input_name": image_session.get_inputs()[0].name,
            "output_name": image_session.get_outputs()[0].name,
        }
    ).to_dict()
    text_spec = TextSpec(
        input_names=tuple(i.name for i in text_session.get_inputs()),
        output_name=text_session.get_outputs()[0].name,
        context_length=context_length,
        pad_token_id=pad_token_id,
    )
    return image, text_spec


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or not templates:
        raise InvalidInputError("zero_shot_templates must be a non-empty sequence of strings")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise InvalidInputError(f"a zero-shot template needs exactly one '{{}}' for the class name: {t!r}")
    return tuple(templates)


def _resolve_source(src: str | os.PathLike) -> tuple[str, bool]:
    """(an absolute folder path, True) or (a Hugging Face model id, False)."""
    text = os.fspath(src)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.exists():
        raise ExportError(f"{path} is a file; expected a CLIP model folder or a Hugging Face model id")
    # A hub id is 'name' or 'org/name'; anything else that does not exist is a missing folder.
    if not text or looks_like_path(src):
        raise ExportError(f"model folder {path} does not exist")
    return text, False


def _load_config(source: str, local: bool) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read a model config (config.json) from {source}: {e}") from e
    if config.model_type != "clip":
        raise ExportError(
            f"{source} is not a CLIP model: its config.json has model_type {config.model_type!r}, expected 'clip'"
        )
    return config


def _image_preprocessing(source: str, local: bool, config: Any) -> dict[str, Any]:
    """ImageSpec fields (all but the tensor names) from the model's CLIPImageProcessor config."""
    from transformers import CLIPImageProcessor

    try:
        proc = CLIPImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the image preprocessing (preprocessor_config.json) of {source}: {e}") from e
    if not proc.do_resize:
        raise ExportError(f"{source}: image processors that do not resize are not supported")
    size = dict(proc.size)
    crop = dict(proc.crop_size) if proc.do_center_crop else None
    fields: dict[str, Any] = {"layout": "NCHW", "dtype": "float32"}
    if "shortest_edge" in size:
        if crop is None:
            raise ExportError(f"{source}: a shortest-edge resize without a center crop gives no fixed input size")
        fields["resize_mode"] = "shortest_edge"
        fields["resize_shortest_edge_px"] = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        fields["resize_mode"] = "squash"
    else:
        raise ExportError(f"{source}: unsupported image processor size {size}")
    final = (int(crop["height"]), int(crop["width"])) if crop else (int(size["height"]), int(size["width"]))
    fields["size_px"] = list(final)
    fields["crop_mode"] = "center" if crop else "none"
    expected = int(config.vision_config.image_size)
    if final != (expected, expected):
        raise ExportError(f"{source}: the image processor gives {final} px images, the vision model expects {expected}")
    fields["resample"] = _resample_name(int(proc.resample), source)
    fields["rescale"] = float(proc.rescale_factor) if proc.do_rescale else 1.0
    fields["mean"] = [float(v) for v in proc.image_mean] if proc.do_normalize else [0.0, 0.0, 0.0]
    fields["std"] = [float(v) for v in proc.image_std] if proc.do_normalize else [1.0, 1.0, 1.0]
    return fields


def _resample_name(resample: int, source: str) -> str:
    if resample in _RESAMPLE:
        return _RESAMPLE[resample]
    if resample in _RESAMPLE_APPROX:
        logger.warning(
            "%s: resample filter %d is recorded as its closest supported filter, %s",
            source,
            resample,
            _RESAMPLE_APPROX[resample],
        )
        return _RESAMPLE_APPROX[resample]
    raise ExportError(f"{source}: unknown resample filter {resample} in the image processor config")


def _load_towers(source: str, local: bool, config: Any) -> tuple[Any, Any]:
    import torch
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    towers = []
    for cls, sub_config in (
        (CLIPVisionModelWithProjection, config.vision_config),
        (CLIPTextModelWithProjection, config.text_config),
    ):
        sub_config = copy.deepcopy(sub_config)
        # Many checkpoints keep projection_dim only at the top level; each tower reads its own copy.
        sub_config.projection_dim = config.projection_dim
        try:
            model, info = cls.from_pretrained(
                source, config=sub_config, local_files_only=local, dtype=torch.float32, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise ExportError(f"cannot load the weights of {source} into {cls.__name__}: {e}") from e
        missing = list(info["missing_keys"]) + [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
        if missing:
            raise ExportError(
                f"{source}: {cls.__name__} weights missing or mis-shaped in the checkpoint: {sorted(missing)[:5]}"
            )
        towers.append(model.eval())
    return towers[0], towers[1]


def _save_tokenizer(source: str, local: bool, context_length: int, path: Path) -> int:
    """Saves the fast tokenizer with CLIP's truncation and padding built in; returns the pad id."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise ExportError(f"cannot load the tokenizer of {source}: {e}") from e
    if not tokenizer.is_fast:
        raise ExportError(f"{source}: no fast (tokenizers) version of its tokenizer is available")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ExportError(f"{source}: the tokenizer has neither a pad nor an end-of-text token")
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    # Truncation keeps the end-of-text token (CLIP pools there); padding is to the longest in a batch.
    backend.enable_truncation(max_length=context_length)
    backend.enable_padding(pad_id=pad_id, pad_token=tokenizer.convert_ids_to_tokens(pad_id))
    backend.save(str(path))

    # The runtime only has tokenizers: the saved file must give exactly transformers' ids.
    saved = Tokenizer.from_file(str(path)).encode_batch(list(_VALIDATION_TEXTS))
    want = tokenizer(list(_VALIDATION_TEXTS), padding=True, truncation=True, max_length=context_length)
    if [e.ids for e in saved] != want["input_ids"] or [e.attention_mask for e in saved] != want["attention_mask"]:
        raise ExportError(f"{source}: the saved tokenizer.json tokenizes differently from the transformers tokenizer")
    return int(pad_id)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    import torch

    with warnings.catch_warnings():
        # Tracing reports CLIP's shape checks (sequence vs position table, image vs patch grid) that are
        # constant for every valid input; optimum uses the legacy TorchScript exporter on purpose.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        yield


def _onnx_configs() -> tuple[type, type]:
    from optimum.exporters.onnx.model_configs import CLIPTextWithProjectionOnnxConfig, CLIPVisionModelOnnxConfig

    class VisionEmbedsOnnxConfig(CLIPVisionModelOnnxConfig):
        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {"image_embeds": {0: "batch_size"}}

    class TextEmbedsOnnxConfig(CLIPTextWithProjectionOnnxConfig):
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return {
                "input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "sequence_length"},
            }

        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {"text_embeds": {0: "batch_size"}}

    return VisionEmbedsOnnxConfig, TextEmbedsOnnxConfig


def _export_onnx(vision: Any, text: Any, out: Path, *, opset: int) -> None:
    from optimum.exporters.onnx import export_models

    vision_config_cls, text_config_cls = _onnx_configs()
    models = {
        "vision": (vision, vision_config_cls(vision.config, task="feature-extraction")),
        "text": (text, text_config_cls(text.config, task="feature-extraction")),
    }
    logger.info("exporting the CLIP towers to ONNX (opset %d)", opset)
    try:
        with _quiet_tracing():
            # Not optimum's validate_models_outputs: it spawns processes; _check_matches_torch does the job.
            export_models(models, out, opset=opset, output_names=[IMAGE_FILE, TEXT_FILE])
    except Exception as e:  # torch.onnx raises many unrelated types
        raise ExportError(f"ONNX export of the CLIP towers failed: {e}") from e


def _reference_outputs(vision: Any, text: Any, tokenizer_file: Path, size_px: Sequence[int]) -> list[_Tower]:
    """Validation inputs (seeded random pixels, tokenized texts) and PyTorch's embeddings of them."""
    import torch
    from tokenizers import Tokenizer

    pixels = np.random.default_rng(0).standard_normal((2, 3, *size_px)).astype(np.float32)
    encodings = Tokenizer.from_file(str(tokenizer_file)).encode_batch(list(_VALIDATION_TEXTS))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    with torch.no_grad():
        image_ref = vision(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
        text_ref = text(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).text_embeds.numpy()
    return [
        _Tower("image_model", IMAGE_FILE, "image_embeds", {"pixel_values": pixels}, image_ref),
        _Tower("text_model", TEXT_FILE, "text_embeds", {"input_ids": ids, "attention_mask": mask}, text_ref),
    ]


def _check_matches_torch(path: Path, tower: _Tower) -> float:
    got = run_onnx(path, tower.feed, tower.output_name)
    diff = float(np.abs(got - tower.reference).max())
    scale = max(1.0, float(np.abs(tower.reference).max()))
    logger.info("%s: ONNX vs PyTorch max abs diff %.2e", path.name, diff)
    if not diff <= VALIDATION_ATOL * scale:  # also catches NaN
        raise ExportError(
            f"{path.name} disagrees with PyTorch: max abs diff {diff:.3g} > {VALIDATION_ATOL * scale:.3g}"
        )
    return diff
