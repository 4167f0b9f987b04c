"""Image and text encoders over ONNX Runtime, configured entirely by the model folder's manifest.

Provider choice is honest: the providers a session really uses are exposed, and a requested
accelerator that fell back to the CPU raises a `ProviderFallbackWarning`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rar_edge import defaults
from rar_edge._clock import ModelClock
from rar_edge.errors import CorruptFileError, InvalidInputError, ManifestError, MissingDependencyError
from rar_edge.image.codec import DEFAULT_MAX_PIXELS, ImageLike, decode_rgb
from rar_edge.image.transform import draft_size, normalize, resize_for_model
from rar_edge.manifest import Manifest, load_manifest
from rar_edge.vectors import l2_normalize

log = logging.getLogger("rar_edge")

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ProviderFallbackWarning(RuntimeWarning):
    """A requested execution provider (CUDA, TensorRT) is not in use; the model runs on the CPU."""


# What ONNX Runtime says (cudaErrorNoKernelImageForDevice) when its CUDA kernels were built for other GPUs, e.g.
# PyPI's aarch64 onnxruntime-gpu on a Jetson: it lists CUDAExecutionProvider, then fails on the first run.
_NO_KERNEL_IMAGE = "no kernel image is available"


def _no_kernel_image_message(config: "EncoderConfig", path: Path, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return (
        f"requested provider {config.provider!r} fell back to the CPU for {path.name}: this onnxruntime build "
        f"has no CUDA kernels for this GPU ({first}). Install an onnxruntime-gpu built for the GPU's compute "
        "capability; on a Jetson, the wheel for your JetPack (docs/jetson.md)."
    )


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("onnxruntime", "cpu", "running encoders") from e
    return ort


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of an encoder's ONNX Runtime sessions.

    Attributes:
        provider: "cpu", "cuda" or "tensorrt".
        threads: intra-op threads per session (None: ONNX Runtime's default, all cores).
        batch_size: images or texts per model call.
        allow_spinning: whether ONNX Runtime's intra-op threads busy-wait between parallel sections.
            True (ONNX Runtime's own default) gives the lowest encoder latency on otherwise idle cores;
            False lets them sleep and frees the cores for other work: a llama.cpp ranker in the same
            process (docs/design-notes.md#encoder-spinning), the decode thread of
            `Pipeline.iter_classify`, the app. None (default): True for a lone
            encoder, False when a `Pipeline` (or `rar-edge bench`) also holds a ranker.
        trt_engine_cache_dir: where the TensorRT provider keeps the engines it builds, so that the next start
            loads them instead of building them again (ONNX Runtime's ``trt_engine_cache_path``). None:
            ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/rar_edge/tensorrt``. Engines fit one GPU and one
            TensorRT version: empty the folder after upgrading either. Provider "tensorrt" only.
        trt_engine_cache: False builds every engine anew at each session start.
        trt_fp16: lets TensorRT run layers in FP16 (``trt_fp16_enable``): faster on GPUs with fast FP16
            (Jetson Orin), with slightly different embeddings.
    """

    provider: str = "cpu"
    threads: int | None = None
    batch_size: int = defaults.BATCH_SIZE
    allow_spinning: bool | None = None
    trt_engine_cache_dir: str | os.PathLike | None = None
    trt_engine_cache: bool = True
    trt_fp16: bool = False

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise InvalidInputError(f"provider must be one of {sorted(PROVIDERS)}, not {self.provider!r}")
        if self.threads is not None and self.threads < 1:
            raise InvalidInputError("threads must be >= 1 or None")
        if self.batch_size < 1:
            raise InvalidInputError("batch_size must be >= 1")

    def beside_ranker(self) -> "EncoderConfig":
        """This config for an encoder that shares the process with a ranker: no spinning unless asked."""
        return self if self.allow_spinning is not None else dataclasses.replace(self, allow_spinning=False)

    def tensorrt_options(self) -> dict[str, bool | str]:
        """The TensorRT execution provider's options these settings give (what `rar-edge bench` records)."""
        cache = self.trt_engine_cache_dir
        if cache is None:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rar_edge" / "tensorrt"
        return {
            "trt_engine_cache_enable": self.trt_engine_cache,
            "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": self.trt_fp16,
        }


def _providers(config: EncoderConfig, available: Sequence[str]) -> list:
    """The ``providers`` argument of an InferenceSession: the wanted ones ONNX Runtime has, TensorRT's with options."""
    names = [p for p in PROVIDERS[config.provider] if p in available] or ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" not in names:
        return names
    trt = config.tensorrt_options()
    if trt["trt_engine_cache_enable"]:
        Path(str(trt["trt_engine_cache_path"])).mkdir(parents=True, exist_ok=True)
    return [(p, trt) if p == "TensorrtExecutionProvider" else p for p in names]


def _session(path: Path, config: EncoderConfig):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.threads is not None:
        opts.intra_op_num_threads = config.threads
        opts.inter_op_num_threads = 1
    if config.allow_spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    opts.log_severity_level = 3  # ORT's own fallback errors would be noise; we report it ourselves below
    wanted = PROVIDERS[config.provider]
    available = ort.get_available_providers()
    providers = _providers(config, available)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors (InvalidProtobuf, Fail, ...) share no base class
        if _NO_KERNEL_IMAGE in str(e) and config.provider != "cpu":
            warnings.warn(_no_kernel_image_message(config, path, e), ProviderFallbackWarning, stacklevel=3)
            return _session(path, dataclasses.replace(config, provider="cpu"))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(
            f"ONNX Runtime cannot load {path}: {first[:300]} (re-export the model folder with 'rar-edge export')"
        ) from e
    in_use = sess.get_providers()
    if wanted[0] not in in_use:
        msg = (
            f"requested provider {config.provider!r} ({wanted[0]}) is not in use for {path.name}; "
            f"running on {in_use} (available: {available}). "
            + (
                "On aarch64 the 'gpu' extra installs no onnxruntime-gpu: install the wheel built for your JetPack "
                "(docs/jetson.md)."
                if platform.machine() == "aarch64"
                else "Install the 'gpu' extra and a matching CUDA."
            )
        )
        warnings.warn(msg, ProviderFallbackWarning, stacklevel=3)  # once: not also a log line
    return sess


_ORT_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}


def _check_image_input(sess, spec, manifest: Manifest) -> None:
    """Refuses a manifest whose image section disagrees with the model's declared input (layout, size, dtype),
    which ONNX Runtime would otherwise report on the first image as an INVALID_ARGUMENT."""
    inputs = {i.name: i for i in sess.get_inputs()}
    inp = inputs.get(spec.input_name) or sess.get_inputs()[0]
    h, w = spec.size_px
    want = [None, 3, h, w] if spec.layout == "NCHW" else [None, h, w, 3]
    shape = list(inp.shape or [])
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
    where = f"{manifest.root / 'manifest.json'}"
    if len(shape) != 4 or any(f is not None and x is not None and f != x for f, x in zip(fixed, want)):
        raise ManifestError(
            f"{where}: the image section says layout {spec.layout} at {h}x{w}, so the model input should be "
            f"[N, {', '.join(str(x) for x in want[1:])}], but input {inp.name!r} takes {shape}; fix 'layout' and "
            "'size_px' in the manifest or re-export the folder"
        )
    if _ORT_TYPES.get(spec.dtype, inp.type) != inp.type:
        raise ManifestError(
            f"{where}: the image section says dtype {spec.dtype}, but input {inp.name!r} takes "
            f"{inp.type}; fix 'dtype' in the manifest or re-export the folder"
        )


class Encoder:
    """The image (and, for CLIP, text) tower of one exported model folder.

    Args:
        model_dir: a folder written by ``rar-edge export`` (holds manifest.json).
        config: provider, threads, batch size.
        verify: check the model files' sha256 against the manifest on load.
    """

    def __init__(
        self, model_dir: str | os.PathLike, *, config: EncoderConfig | None = None, verify: bool = True
    ) -> None:
        self.config = config or EncoderConfig()
        self.manifest: Manifest = load_manifest(model_dir, verify=verify)
        if self.manifest.kind not in ("clip", "image_embedder"):
            raise ManifestError(f"{model_dir} holds a {self.manifest.kind!r} model, not an image encoder")
        self.image_spec = self.manifest.image
        self.text_spec = self.manifest.text
        self._image_sess = _session(self.manifest.path("image_model"), self.config)
        _check_image_input(self._image_sess, self.image_spec, self.manifest)
        self._clock = ModelClock()  # time inside ONNX Runtime's run, image and text towers together
        inp = self._image_sess.get_inputs()[0]
        self._image_input = (
            inp.name
            if self.image_spec.input_name not in {i.name for i in self._image_sess.get_inputs()}
            else self.image_spec.input_name
        )
        batch_dim = inp.shape[0] if inp.shape else None
        self._image_fixed_batch = isinstance(batch_dim, int) and batch_dim > 0
        out_names = [o.name for o in self._image_sess.get_outputs()]
        self._image_output = self.image_spec.output_name if self.image_spec.output_name in out_names else out_names[0]
        self._text_sess = None
        self._tokenizer = None
        dim = self.manifest.embedding_dim
        if dim is None:
            raise ManifestError(f"{model_dir}: manifest has no embedding_dim")
        self.dim = dim

    # -- identity -------------------------------------------------------------------------------
    @property
    def model_s(self) -> float:
        """Seconds spent inside ONNX Runtime's ``run`` (both towers) since the encoder was made."""
        return self._clock.seconds

    @property
    def model_calls(self) -> int:
        """ONNX Runtime ``run`` calls made (both towers)."""
        return self._clock.calls

    @property
    def fingerprint(self) -> str:
        """Identifies the exact model files; a memory records it to refuse another encoder."""
        return self.manifest.fingerprint

    @property
    def preprocess_fingerprint(self) -> str:
        """Identifies the manifest's preprocessing settings; a memory records it to refuse changed settings."""
        return self.manifest.preprocess_fingerprint

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def path(self) -> Path:
        return self.manifest.root

    @property
    def has_text(self) -> bool:
        return self.manifest.has_file("text_model") and self.text_spec is not None

    @property
    def providers(self) -> dict[str, list[str]]:
        """The execution providers each loaded session really uses."""
        out = {"image": list(self._image_sess.get_providers())}
        if self._text_sess is not None:
            out["text"] = list(self._text_sess.get_providers())
        return out

    def describe(self) -> dict:
        """What a user should see about this encoder: name, kind, dim, files' fingerprint, providers."""
        return {
            "name": self.name,
            "kind": self.manifest.kind,
            "path": str(self.path),
            "embedding_dim": self.dim,
            "fingerprint": self.fingerprint,
            "quantization": self.manifest.data.get("quantization"),
            "providers": self.providers,
        }

    # -- images ---------------------------------------------------------------------------------
    def decode(self, image: ImageLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decodes an input to HxWx3 uint8 RGB, at reduced JPEG scale when the model input is smaller.

        Args:
            image: a path, encoded bytes, a PIL image or an array.
            max_pixels: the decompression-bomb guard, on the pixels decoded (see `decode_rgb`).
        """
        return decode_rgb(image, draft_size_px=draft_size(self.image_spec), max_pixels=max_pixels)

    def preprocess(self, image) -> np.ndarray:
        """Decoded RGB pixels (an HxWx3 uint8 array or a PIL image) -> HxWx3 uint8 at the model's input size."""
        return resize_for_model(image, self.image_spec)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Runs the image model on (N, H, W, 3) uint8 pixels at the model's size.

        Returns:
            (N, dim) float32, rows L2-normalised.
        """
        if pixels.ndim == 3:
            pixels = pixels[None]
        h, w = self.image_spec.size_px
        if pixels.ndim != 4 or pixels.shape[1:] != (h, w, 3) or pixels.dtype != np.uint8:
            raise InvalidInputError(f"pixels must be (N, {h}, {w}, 3) uint8, got {pixels.shape} {pixels.dtype}")
        step = 1 if self._image_fixed_batch else self.config.batch_size
        outs = []
        for i in range(0, len(pixels), step):
            x = normalize(pixels[i : i + step], self.image_spec)
            with self._clock.timing():
                y = self._run("image", [self._image_output], {self._image_input: x})[0]
            outs.append(np.asarray(y).reshape(len(x), -1))
        if not outs:
            return np.zeros((0, self.dim), np.float32)
        raw = outs[0] if len(outs) == 1 else np.concatenate(outs)
        if raw.shape[1] != self.dim:
            raise ManifestError(f"model output has {raw.shape[1]} values, manifest says embedding_dim={self.dim}")
        zero_point = 0.0
        deq = self.image_spec.output_dequantize
        if deq is not None and np.issubdtype(raw.dtype, np.integer):
            # (q - zero_point) * scale, then unit length: a positive scale cancels.
            if not deq[0] > 0:
                raise ManifestError(f"output_dequantize scale must be > 0, got {deq[0]}")
            zero_point = deq[1]
        return l2_normalize(raw, zero_point)

    def _run(self, which: str, outputs: list[str], feeds: dict) -> list:
        """One run of the image or text session. A GPU session whose kernels do not fit this GPU (ONNX Runtime's
        "no kernel image is available") is replaced by a CPU session, with a `ProviderFallbackWarning` saying so."""
        sess = self._image_sess if which == "image" else self._text_sess
        assert sess is not None  # the text session is made by _ensure_text before any text run
        try:
            return sess.run(outputs, feeds)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's Fail has no importable base class
            if _NO_KERNEL_IMAGE not in str(e) or sess.get_providers() == ["CPUExecutionProvider"]:
                raise
            path = self.manifest.path(f"{which}_model")
            warnings.warn(_no_kernel_image_message(self.config, path, e), ProviderFallbackWarning, stacklevel=4)
            cpu = _session(path, dataclasses.replace(self.config, provider="cpu"))
            if which == "image":
                self._image_sess = cpu
            else:
                self._text_sess = cpu
            return cpu.run(outputs, feeds)

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Decodes, preprocesses and embeds images: (N, dim) float32, L2-normalised."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        pixels = np.stack([self.preprocess(self.decode(im)) for im in images])
        return self.embed_pixels(pixels)

    # -- text -----------------------------------------------------------------------------------
    def _ensure_text(self) -> None:
        if self._text_sess is not None:
            return
        if not self.has_text:
            raise InvalidInputError(
                f"encoder {self.name!r} is image-only ({self.manifest.kind}): zero-shot memories need a CLIP "
                "model with a text tower (rar-edge export clip)"
            )
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover
            raise MissingDependencyError("tokenizers", "cpu", "text encoding") from e
        tok = Tokenizer.from_file(str(self.manifest.path("tokenizer")))
        spec = self.text_spec
        assert spec is not None
        tok.enable_truncation(max_length=spec.context_length)
        tok.enable_padding(pad_id=spec.pad_token_id, length=None)
        self._tokenizer = tok
        self._text_sess = _session(self.manifest.path("text_model"), self.config)
        names = {i.name for i in self._text_sess.get_inputs()}
        self._text_inputs = [n for n in spec.input_names if n in names]
        outs = [o.name for o in self._text_sess.get_outputs()]
        self._text_output = spec.output_name if spec.output_name in outs else outs[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds strings with the text tower: (N, dim) float32, L2-normalised."""
        self._ensure_text()
        if isinstance(texts, str):
            raise InvalidInputError("embed_texts takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        outs = []
        for i in range(0, len(texts), self.config.batch_size):
            enc = self._tokenizer.encode_batch(list(texts[i : i + self.config.batch_size]))  # type: ignore[union-attr]
            feeds = {}
            if "input_ids" in self._text_inputs:
                feeds["input_ids"] = np.asarray([e.ids for e in enc], dtype=np.int64)
            if "attention_mask" in self._text_inputs:
                feeds["attention_mask"] = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
            with self._clock.timing():
                y = self._run("text", [self._text_output], feeds)[0]
            outs.append(np.asarray(y, dtype=np.float32))
        return l2_normalize(np.concatenate(outs))

    def embed_class_names(self, names: Sequence[str], *, templates: Sequence[str] | None = None) -> np.ndarray:
        """Zero-shot class vectors: the mean of each name's template embeddings, re-normalised.

        Args:
            names: class names.
            templates: prompt templates with one ``{}``; default: the manifest's ensemble.
        """
        tpl = tuple(templates) if templates else self.manifest.zero_shot_templates
        bad = [t for t in tpl if t.count("{}") != 1]
        if bad:
            raise InvalidInputError(f"templates need exactly one '{{}}' placeholder: {bad}")
        texts = [t.format(n) for n in names for t in tpl]
        emb = self.embed_texts(texts).reshape(len(names), len(tpl), self.dim).mean(axis=1)
        return l2_normalize(emb)
