"""The model-bundle manifest: the contract that `export/` writes and the runtime reads.

A model folder holds the model files and a ``manifest.json``. Everything downstream (input size,
normalisation, resize mode, embedding size, tokenizer, prompt templates, chat template) is read
from here; nothing is hard-coded at a call site.

Encoder manifest (``kind`` = ``"clip"`` or ``"image_embedder"``)::

    {
      "format": "rar_edge.model", "format_version": 1, "kind": "clip",
      "name": "openai/clip-vit-base-patch32", "source": "...", "exporter": "rar_edge_export 0.1.0",
      "embedding_dim": 512,
      "files": {"image_model": {"path": "vision.onnx", "sha256": "..."},
                "text_model": {"path": "text.onnx", "sha256": "..."},
                "tokenizer": {"path": "tokenizer.json", "sha256": "..."}},
      "image": {"size_px": [224, 224], "layout": "NCHW", "dtype": "float32", "rescale": 0.00392156862745098,
                "mean": [...], "std": [...], "resize_mode": "shortest_edge", "crop_mode": "center",
                "resample": "bicubic", "input_name": "pixel_values", "output_name": "image_embeds",
                "output_dequantize": null},
      "text": {"input_names": ["input_ids", "attention_mask"], "output_name": "text_embeds",
               "context_length": 77, "pad_token_id": 49407},
      "zero_shot_templates": ["a photo of a {}."],
      "quantization": null
    }

``output_dequantize`` is ``{"scale": s, "zero_point": z}`` for models with integer outputs.
MLLM manifests (``kind`` = ``"mllm"``) are described in `rar_edge.rank.ranker`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from rar_edge._fs import write_text
from rar_edge.errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT = "rar_edge.model"
FORMAT_VERSION = 1
#: How rar_edge turns image files into pixels, in the preprocessing fingerprint a memory records. Raise it
#: when decoding changes pixels (2: EXIF orientation applied), so that memories built before are refused.
DECODE_VERSION = 2
KINDS = ("clip", "image_embedder", "mllm")
#: The largest model input side accepted from a manifest (the largest vision towers take about 1,500 px).
MAX_SIZE_PX = 8192


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ImageSpec:
    """How raw RGB pixels become the image model's input tensor."""

    size_px: tuple[int, int]  # (height, width)
    layout: str = "NCHW"  # or "NHWC"
    dtype: str = "float32"  # or "uint8": raw pixels, no normalisation
    rescale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize_mode: str = "shortest_edge"  # "shortest_edge" (then crop) or "squash"
    crop_mode: str = "center"  # "center" or "none"
    resample: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"
    input_name: str = "pixel_values"
    output_name: str = "image_embeds"
    output_dequantize: tuple[float, float] | None = None  # (scale, zero_point)
    resize_shortest_edge_px: int | None = None  # shortest_edge: resize to this, then crop (default: crop size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageSpec":
        try:
            size = tuple(int(v) for v in d["size_px"])
            deq = d.get("output_dequantize")
            spec = cls(
                size_px=(size[0], size[1]),
                layout=str(d.get("layout", "NCHW")),
                dtype=str(d.get("dtype", "float32")),
                rescale=float(d.get("rescale", 1.0 / 255.0)),
                mean=tuple(float(v) for v in d.get("mean", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d.get("std", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
                resize_mode=str(d.get("resize_mode", "shortest_edge")),
                crop_mode=str(d.get("crop_mode", "center")),
                resample=str(d.get("resample", "bicubic")),
                input_name=str(d.get("input_name", "pixel_values")),
                output_name=str(d.get("output_name", "image_embeds")),
                output_dequantize=None if deq is None else (float(deq["scale"]), float(deq["zero_point"])),
                resize_shortest_edge_px=None
                if d.get("resize_shortest_edge_px") is None
                else int(d["resize_shortest_edge_px"]),
            )
        except KeyError as e:
            raise ManifestError(f"the 'image' section lacks {e.args[0]!r}") from e
        except (TypeError, ValueError, IndexError) as e:
            raise ManifestError(f"bad 'image' section in manifest: {e}") from e
        if spec.layout not in ("NCHW", "NHWC"):
            raise ManifestError(f"image.layout must be NCHW or NHWC, not {spec.layout!r}")
        if spec.dtype not in ("float32", "uint8"):
            raise ManifestError(f"image.dtype must be float32 or uint8, not {spec.dtype!r}")
        if spec.resize_mode not in ("shortest_edge", "squash"):
            raise ManifestError(f"image.resize_mode must be shortest_edge or squash, not {spec.resize_mode!r}")
        if spec.crop_mode not in ("center", "none"):
            raise ManifestError(f"image.crop_mode must be center or none, not {spec.crop_mode!r}")
        if spec.resample not in ("bicubic", "bilinear", "nearest"):
            raise ManifestError(f"image.resample must be bicubic, bilinear or nearest, not {spec.resample!r}")
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise ManifestError("image.mean and image.std need 3 values, std > 0")
        if min(spec.size_px) < 1 or max(spec.size_px) > MAX_SIZE_PX:
            raise ManifestError(
                f"image.size_px must be [height, width] within 1..{MAX_SIZE_PX}, not {list(spec.size_px)}"
            )
        if spec.resize_shortest_edge_px is not None and spec.resize_shortest_edge_px < min(spec.size_px):
            raise ManifestError("image.resize_shortest_edge_px must be at least the crop size")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_px": list(self.size_px),
            "layout": self.layout,
            "dtype": self.dtype,
            "rescale": self.rescale,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_mode": self.resize_mode,
            "crop_mode": self.crop_mode,
            "resample": self.resample,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "output_dequantize": None
            if self.output_dequantize is None
            else {"scale": self.output_dequantize[0], "zero_point": self.output_dequantize[1]},
            "resize_shortest_edge_px": self.resize_shortest_edge_px,
        }


@dataclass(frozen=True)
class TextSpec:
    """How class names become the text model's input."""

    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    output_name: str = "text_embeds"
    context_length: int = 77
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextSpec":
        try:
            return cls(
                input_names=tuple(str(v) for v in d.get("input_names", ("input_ids", "attention_mask"))),
                output_name=str(d.get("output_name", "text_embeds")),
                context_length=int(d.get("context_length", 77)),
                pad_token_id=int(d.get("pad_token_id", 0)),
            )
        except (TypeError, ValueError) as e:
            raise ManifestError(f"bad 'text' section in manifest: {e!r}") from e

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_names": list(self.input_names),
            "output_name": self.output_name,
            "context_length": self.context_length,
            "pad_token_id": self.pad_token_id,
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json plus the folder it lives in."""

    root: Path
    data: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def name(self) -> str:
        return str(self.data.get("name", self.root.name))

    @property
    def embedding_dim(self) -> int | None:
        v = self.data.get("embedding_dim")
        return None if v is None else int(v)

    @property
    def files(self) -> Mapping[str, Mapping[str, str]]:
        return self.data.get("files", {})

    def has_file(self, role: str) -> bool:
        return role in self.files

    def path(self, role: str) -> Path:
        """The absolute path of the file with this role (``image_model``, ``text_model``, ...)."""
        try:
            rel = self.files[role]["path"]
        except KeyError as e:
            raise ManifestError(f"{self.root / MANIFEST_NAME} has no '{role}' file") from e
        p = (self.root / rel).resolve()
        if self.root.resolve() not in p.parents:
            raise ManifestError(f"file {rel!r} points outside the model folder")
        return p

    @property
    def image(self) -> ImageSpec:
        if "image" not in self.data:
            raise ManifestError(f"{self.root / MANIFEST_NAME} has no 'image' section")
        return ImageSpec.from_dict(self.data["image"])

    @property
    def text(self) -> TextSpec | None:
        t = self.data.get("text")
        return None if t is None else TextSpec.from_dict(t)

    @property
    def zero_shot_templates(self) -> tuple[str, ...]:
        return tuple(self.data.get("zero_shot_templates") or ("a photo of a {}.",))

    @property
    def fingerprint(self) -> str:
        """Identifies the exact model files: sha256 over the roles and file hashes (not the folder path)."""
        h = hashlib.sha256()
        for role in sorted(self.files):
            h.update(role.encode())
            h.update(str(self.files[role].get("sha256", "")).encode())
        return h.hexdigest()

    @property
    def preprocess_fingerprint(self) -> str:
        """Identifies what turns inputs into vectors besides the weights: the image and text sections (size,
        resize, crop, normalisation, tokenisation) in canonical form, and the embedding size."""
        spec = {
            "image": None if self.data.get("image") is None else self.image.to_dict(),
            "text": None if self.text is None else self.text.to_dict(),
            "embedding_dim": self.embedding_dim,
            "decode": DECODE_VERSION,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def verify(self) -> None:
        """Checks that every listed file exists and matches its sha256; raises ManifestError if not."""
        for role in self.files:
            p = self.path(role)
            if not p.is_file():
                raise ManifestError(f"model file for '{role}' is missing: {p}")
            want = self.files[role].get("sha256")
            if want and sha256_file(p) != want:
                raise ManifestError(f"model file for '{role}' does not match its sha256 in the manifest: {p}")


def load_manifest(folder: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """Reads and validates ``folder/manifest.json``.

    Args:
        folder: a model folder written by ``rar-edge export``.
        verify: also check every file's sha256 (reads the files once).

    Raises:
        ManifestError: missing, unparsable, of another format, or a file missing / not matching.
    """
    root = Path(folder)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{root} is not a model folder: no {MANIFEST_NAME} (make one with 'rar-edge export')")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {mpath}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{mpath} is not a rar_edge manifest (format != {FORMAT!r})")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{mpath}: format_version must be an integer, got {version!r}")
    files = data.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) for f in files.values()
    ):
        raise ManifestError(f'{mpath}: \'files\' must map each role to {{"path": ..., "sha256": ...}}')
    dim = data.get("embedding_dim")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise ManifestError(f"{mpath}: embedding_dim must be a positive integer, got {dim!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{mpath} has format_version {data.get('format_version')}, this rar_edge reads <= {FORMAT_VERSION}"
        )
    if data.get("kind") not in KINDS:
        raise ManifestError(f"{mpath}: unknown kind {data.get('kind')!r}, expected one of {KINDS}")
    m = Manifest(root=root.resolve(), data=data)
    for section in ("image", "text"):  # validated now, not at first use: a bad value is named before any work
        if data.get(section) is not None:
            if not isinstance(data[section], dict):
                raise ManifestError(f"{mpath}: '{section}' must be an object, not {type(data[section]).__name__}")
            try:
                ImageSpec.from_dict(data[section]) if section == "image" else TextSpec.from_dict(data[section])
            except ManifestError as e:
                raise ManifestError(f"{mpath}: {e}") from None
    if verify:
        m.verify()
    else:  # no hashing, but a missing file is named now rather than by whatever fails to open it later
        for role in m.files:
            if not m.path(role).is_file():
                raise ManifestError(f"model file for '{role}' is missing: {m.path(role)}")
    return m


def write_manifest(folder: str | os.PathLike, data: Mapping[str, Any], *, files: Mapping[str, str]) -> Manifest:
    """Writes ``folder/manifest.json`` atomically, filling in the sha256 of every file.

    Args:
        folder: the model folder.
        data: the manifest fields except ``format``, ``format_version`` and ``files``.
        files: role -> path relative to ``folder``.
    """
    root = Path(folder)
    out = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(data)}
    out["files"] = {role: {"path": rel, "sha256": sha256_file(root / rel)} for role, rel in files.items()}
    write_text(root / MANIFEST_NAME, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return load_manifest(root, verify=False)
