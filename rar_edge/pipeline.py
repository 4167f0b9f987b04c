"""The pipeline: loads models once and chains decode -> preprocess -> encode -> search -> rank.

Every stage is timed; results carry both the retrieval order and the final ranking.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from rar_edge import defaults
from rar_edge.encoders import Encoder, EncoderConfig
from rar_edge.errors import InvalidInputError
from rar_edge.image.codec import DEFAULT_MAX_PIXELS, ImageLike, _describe, decode_rgb
from rar_edge.index.memory import Memory
from rar_edge.rank.protocol import RankerProtocol, check_ranker
from rar_edge.types import Candidate, Classification, Detection, ImageError, Ranking

if TYPE_CHECKING:
    from rar_edge.image.boxes import CropConfig

log = logging.getLogger("rar_edge")


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of a `Pipeline`.

    Attributes:
        k: classes retrieved (and ranked) per image.
        encoder: ONNX Runtime settings of the encoder.
        gate_margin: skip the ranker when the retrieval margin (score of the first class minus
            the second) is at least this; None always runs the ranker.
        crop: how detection boxes are cropped (None: `rar_edge.image.boxes.CropConfig()` at the
            encoder's input size).
        crop_threads: threads over boxes for the native crop.
        max_pixels: the largest image decoded, in pixels decoded (a JPEG read at a reduced DCT scale
            counts its reduced size): the decompression-bomb guard.
    """

    k: int = defaults.K
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    gate_margin: float | None = None
    crop: "CropConfig | None" = None
    crop_threads: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise InvalidInputError(f"max_pixels must be an integer >= 1, got {self.max_pixels!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidInputError(f"k must be an integer >= 1, got {self.k!r}")
        if self.gate_margin is not None and not (self.gate_margin >= 0):
            raise InvalidInputError("gate_margin must be >= 0 or None")


_END = object()  # end of an image stream
COLORS = ("rgb", "bgr")
ON_ERROR = ("stop", "skip")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")


def as_rgb(image: ImageLike, color: str) -> ImageLike:
    """``image`` in RGB order: an OpenCV frame (``color="bgr"``: HxWx3 BGR or HxWx4 BGRA uint8) has its
    channels swapped (a view, no copy); ``"rgb"`` returns ``image`` as it is.

    Raises:
        InvalidInputError: ``color="bgr"`` for a file, bytes or PIL image (they carry their own colour order).
    """
    if color == "rgb":
        return image
    _check_choice("color", color, COLORS)
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(
            f"color='bgr' is for arrays (OpenCV frames); a {type(image).__name__} carries its "
            "own colour order: pass it with color='rgb'"
        )
    if image.ndim == 3 and image.shape[2] == 3:
        return image[..., ::-1]
    if image.ndim == 3 and image.shape[2] == 4:
        return image[..., [2, 1, 0, 3]]
    return image  # one channel: the same either way (other shapes are refused by the decoder)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


class Pipeline:
    """Holds a loaded encoder, memory and optional ranker so repeated calls pay no load cost.

    Args:
        memory: a `Memory` or the path of a saved one.
        pack: instead of ``memory``, a pack folder (`rar_edge.pack`, ``rar-edge pack``): its memory, its
            encoder (unless ``encoder`` is given) and its ranker (unless ``ranker`` is given).
        encoder: an `Encoder` or a model folder; None uses the folder recorded in the memory.
        ranker: a `rar_edge.rank.protocol.RankerProtocol` (e.g. `rar_edge.rank.ranker.Ranker`), a ranker
            model folder / GGUF path, or None for retrieval only. ``image`` is an HxWx3 uint8
            RGB array: the decoded photo (classify), at least ``ranker.image_size_px`` on its shorter side
            where the photo has that many pixels, or the prepared box crop (detect), made at that size
            when it is larger than the encoder's.
        config: k, encoder settings, the confidence gate, crop settings.

    Raises:
        MemoryMismatchError: the memory was built by another encoder.
    """

    def __init__(
        self,
        *,
        memory: Memory | str | os.PathLike | None = None,
        pack: str | os.PathLike | None = None,
        encoder: Encoder | str | os.PathLike | None = None,
        ranker: RankerProtocol | str | os.PathLike | None = None,
        config: PipelineConfig | None = None,
    ) -> None:
        self.config = config or PipelineConfig()
        t0 = time.perf_counter()
        mmproj = None
        if (pack is None) == (memory is None):
            raise InvalidInputError("give memory= or pack=, one of them")
        if pack is not None:
            from rar_edge.pack import open_pack

            opened = open_pack(pack)
            memory, encoder = opened.memory, opened.encoder if encoder is None else encoder
            if ranker is None and opened.ranker is not None:
                ranker, mmproj = opened.ranker, opened.mmproj
        if not isinstance(memory, (Memory, str, os.PathLike)):
            raise InvalidInputError(
                f"memory must be a Memory or the path of a saved memory file (rar-edge memory "
                f"build), got {type(memory).__name__} {memory!r:.60}"
            )
        self.memory = memory if isinstance(memory, Memory) else Memory.load(memory)
        if encoder is None:
            encoder = self.memory.encoder_folder()  # says which encoder to pass when it moved
        enc_cfg = self.config.encoder if ranker is None else self.config.encoder.beside_ranker()
        if isinstance(encoder, Encoder) and ranker is not None and encoder.config.allow_spinning is None:
            # An encoder object made without a ranker in mind spins its ONNX Runtime threads, which starves a
            # llama.cpp ranker on the same cores (EncoderConfig): this pipeline opens its own, quiet sessions.
            log.debug("encoder %s reopened without spinning threads, beside the ranker", encoder.name)
            encoder = Encoder(encoder.path, config=encoder.config.beside_ranker())
        self.encoder = encoder if isinstance(encoder, Encoder) else Encoder(encoder, config=enc_cfg)
        self.memory.check_encoder(self.encoder)
        self._owns_ranker = ranker is not None and isinstance(ranker, (str, os.PathLike))
        if self._owns_ranker:
            from rar_edge.rank.ranker import Ranker

            ranker = Ranker.load(ranker, mmproj=mmproj)
        self.ranker: RankerProtocol | None = None if ranker is None else check_ranker(ranker)
        self.load_ms = _ms(t0)

    def close(self) -> None:
        """Frees the native memory of a ranker this pipeline loaded from a path. A ranker object passed in
        stays open: whoever made it closes it (it may serve other pipelines). Encoder sessions go with
        the object."""
        if self._owns_ranker and self.ranker is not None:
            self.ranker.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared tail: search + rank ------------------------------------------------------------------
    def _rank(
        self, view: Callable[[], np.ndarray], retrieved: list[Candidate], timings: dict[str, float]
    ) -> tuple[tuple[Candidate, ...], bool, bool]:
        """Ranks ``retrieved`` unless the gate or a single candidate makes it moot; ``view()`` makes the
        image the ranker sees (only when it runs: it may decode or crop again)."""
        if self.ranker is None or len(retrieved) < 2:
            return tuple(retrieved), False, False
        gate = self.config.gate_margin
        if gate is not None and retrieved[0].score - retrieved[1].score >= gate:
            return tuple(retrieved), False, False
        t0 = time.perf_counter()
        names = [c.label for c in retrieved]
        try:
            ranking: Ranking = self.ranker.rank(view(), names)
        finally:
            timings["rank"] = _ms(t0)
        if sorted(ranking.labels) != sorted(names) or len(ranking.scores) != len(ranking.labels):
            # A ranker must return a permutation of the candidates; anything else is not used.
            log.warning("ranker returned %r for candidates %r; keeping retrieval order", ranking.labels, names)
            return tuple(retrieved), True, True
        return tuple(Candidate(lbl, float(s)) for lbl, s in zip(ranking.labels, ranking.scores)), True, ranking.fallback

    def _ranker_px(self) -> int | None:
        """The ranker's wish for its image size: ``image_size_px`` (0 or no ranker: none; None: unknown)."""
        return 0 if self.ranker is None else self.ranker.image_size_px

    def _ranker_crop(self, arr: np.ndarray, box: np.ndarray, crop_cfg: Any, crop: np.ndarray) -> np.ndarray:
        """The box as the ranker sees it: the encoder's crop, or the same crop made at the ranker's size
        when its vision tower takes more pixels (a size it does not state keeps the encoder's crop)."""
        want = self._ranker_px()
        if not want or want <= crop.shape[0]:
            return crop
        from rar_edge.image.boxes import crop_valid_boxes

        return crop_valid_boxes(arr, box[None], config=dataclasses.replace(crop_cfg, out_size_px=int(want)))[0]

    def _ranker_view(self, image: np.ndarray, source: Any) -> np.ndarray:
        """The image the ranker sees. JPEGs are decoded for the encoder at the smallest DCT scale that
        covers its input (often 224 px); a ranker whose vision tower takes more (its ``image_size_px``,
        e.g. 384-512 px; None: unknown, so the full image) gets the photo decoded again at its own size.
        Rankers without the attribute get the encoder's decode."""
        want = self._ranker_px()
        if want == 0 or not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
            return image  # no wish, or an array / PIL input: already decoded at full size
        if want is not None and min(image.shape[:2]) >= want:
            return image
        return decode_rgb(
            source, draft_size_px=None if want is None else (int(want), int(want)), max_pixels=self.config.max_pixels
        )

    # -- classification ------------------------------------------------------------------------------
    def classify(self, image: ImageLike, *, k: int | None = None, color: str = "rgb") -> Classification:
        """Classifies one image: retrieve k distinct classes, then rank them if a ranker is set.

        Args:
            image: a path, encoded bytes, a PIL image or an HxWx3 uint8 array.
            k: overrides the config's k.
            color: the channel order of an array: ``"rgb"`` or ``"bgr"`` (OpenCV's ``imread`` and
                ``VideoCapture`` frames).
        """
        k = self.config.k if k is None else k
        image = as_rgb(image, color)
        t_all = time.perf_counter()
        img, pixels, timings = self._prepare(image)
        return self._finish(img, pixels, k, timings, t_all, image)

    def _prepare(self, image: ImageLike) -> tuple[Any, np.ndarray, dict[str, float]]:
        """Decode and resize: the part of classify that needs no model."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        img = self.encoder.decode(image, max_pixels=self.config.max_pixels)
        timings["decode"] = _ms(t0)
        t0 = time.perf_counter()
        pixels = self.encoder.preprocess(img)
        timings["preprocess"] = _ms(t0)
        return img, pixels, timings

    def _finish(
        self, img: Any, pixels: np.ndarray, k: int, timings: dict[str, float], t_all: float, source: Any = None
    ) -> Classification:
        """Encode, search and rank prepared pixels."""
        t0 = time.perf_counter()
        vec = self.encoder.embed_pixels(pixels)
        timings["encode"] = _ms(t0)
        t0 = time.perf_counter()
        retrieved = self.memory.search(vec, k=k)[0]
        timings["search"] = _ms(t0)
        ranked, ran, fallback = self._rank(lambda: self._ranker_view(img, source), retrieved, timings)
        timings["total"] = _ms(t_all)
        return Classification(
            label=ranked[0].label,
            score=ranked[0].score,
            candidates=ranked,
            retrieved=tuple(retrieved),
            ranker_ran=ran,
            ranker_fallback=fallback,
            timings_ms=timings,
        )

    def iter_classify(
        self,
        images: Iterable[ImageLike],
        *,
        k: int | None = None,
        prefetch: int = 1,
        color: str = "rgb",
        on_error: str = "stop",
    ) -> Iterator[Classification | ImageError]:
        """Classifies a stream of images in order, decoding the next ones while the current one runs.

        A worker thread decodes and resizes up to ``prefetch`` images ahead while this thread encodes,
        searches and ranks the current one (Pillow's decoder, ONNX Runtime and llama.cpp release the
        GIL), so on a machine with a core to spare the SDK's own work hides behind the model's.
        Errors come in order: an image that cannot be read (corrupt, truncated, missing, too large)
        raises when its turn comes, as in `classify` (``on_error="stop"``), or yields an `ImageError`
        record in its place and the stream goes on (``on_error="skip"``; a warning names it).

        Args:
            images: paths, encoded bytes, PIL images or arrays; any iterable (read lazily).
            k: overrides the config's k.
            prefetch: images prepared ahead (0: no worker thread, each image as `classify`).
            color: the channel order of arrays: ``"rgb"`` or ``"bgr"`` (OpenCV frames).
            on_error: ``"stop"`` (raise at an unreadable image) or ``"skip"`` (an `ImageError` in its place).

        Yields:
            One `Classification` per image (or an `ImageError`, with ``on_error="skip"``). Its
            ``timings_ms`` holds the worker's ``decode`` and
            ``preprocess`` times (overlapped with the previous image), ``wait`` (how long this
            image's pixels were still awaited) and ``total``: this image's share of the stream's
            wall time (wait, encode, search, rank), not counting the caller's time between items.
        """
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise InvalidInputError(f"prefetch must be an integer >= 0, got {prefetch!r}")
        _check_choice("on_error", on_error, ON_ERROR)
        _check_choice("color", color, COLORS)
        k = self.config.k if k is None else k
        if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim < 4
        ):
            raise InvalidInputError(
                "iter_classify / classify_many take a sequence of images (a list of paths, "
                "arrays...); for one image use classify"
            )

        def prepare(image: ImageLike) -> tuple[Any, np.ndarray, dict[str, float], ImageLike]:
            # the RGB view (or, for a BGRA frame, copy) is made once and handed on as the ranker's source
            rgb = as_rgb(image, color)
            return (*self._prepare(rgb), rgb)

        def failed(index: int, image: Any, e: InvalidInputError) -> ImageError:
            # only the image's own errors (decode, colour order, size) are per-item; the rest stop the stream
            if on_error == "stop":
                raise e
            rec = ImageError(index=index, image=_describe(image), error=str(e), error_type=type(e).__name__)
            log.warning("skipped image %d (%s): %s", index, rec.image, rec.error)
            return rec

        if prefetch == 0:
            for i, image in enumerate(images):
                t_all = time.perf_counter()
                try:
                    img, pixels, timings, rgb = prepare(image)
                except InvalidInputError as e:
                    yield failed(i, image, e)
                    continue
                yield self._finish(img, pixels, k, timings, t_all, rgb)
            return
        source = enumerate(images)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rar_edge-prefetch")
        pending: deque = deque()

        def submit() -> None:  # the next image, if any, to the worker
            item = next(source, _END)
            if item is not _END:
                pending.append((*item, pool.submit(prepare, item[1])))

        try:
            for _ in range(prefetch):
                submit()
            while pending:
                t_all = time.perf_counter()
                i, image, fut = pending.popleft()
                t0 = time.perf_counter()
                try:
                    img, pixels, timings, rgb = fut.result()
                except InvalidInputError as e:
                    submit()
                    yield failed(i, image, e)
                    continue
                timings["wait"] = _ms(t0)
                submit()
                yield self._finish(img, pixels, k, timings, t_all, rgb)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def classify_many(
        self,
        images: Iterable[ImageLike],
        *,
        k: int | None = None,
        prefetch: int = 1,
        color: str = "rgb",
        on_error: str = "stop",
    ) -> list[Classification | ImageError]:
        """`classify` for each image, in order, decoding ahead on a worker thread (see `iter_classify`).

        With ``on_error="skip"`` an unreadable image leaves an `ImageError` in its place and the rest are
        classified; with ``"stop"`` its error is raised.
        """
        return list(self.iter_classify(images, k=k, prefetch=prefetch, color=color, on_error=on_error))

    # -- detection ----------------------------------------------------------------------------------
    def detect(
        self,
        image: ImageLike,
        boxes: Sequence[Sequence[float]] | np.ndarray,
        *,
        k: int | None = None,
        on_invalid: str = "raise",
        color: str = "rgb",
    ) -> list[Detection]:
        """Classifies every box of one image (RAR's detection path).

        Each box is enlarged, cropped, blurred around the object and resized natively in one
        call, then embedded in one batch; each crop's k distinct classes are retrieved (and ranked).

        Args:
            image: the full image.
            boxes: (N, 4) x1, y1, x2, y2 in pixels of ``image``.
            k: overrides the config's k.
            on_invalid: "raise" (InvalidBoxError naming the box) or "skip" (logged, left out).
            color: the channel order of an array: ``"rgb"`` or ``"bgr"`` (OpenCV frames).

        Returns:
            One `Detection` per valid box, in input order.
        """
        from rar_edge.image.boxes import CropConfig, crop_valid_boxes, validate_boxes

        k = self.config.k if k is None else k
        t_all = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        arr = decode_rgb(as_rgb(image, color), max_pixels=self.config.max_pixels)
        timings["decode"] = _ms(t0)
        t0 = time.perf_counter()
        valid, kept, reasons = validate_boxes(boxes, arr.shape[:2], on_invalid=on_invalid)
        given = np.asarray(boxes, np.float64).reshape(-1, 4)  # as the caller wrote them (valid: clipped)
        for r in reasons:
            log.info("skipped box: %s", r)
        h, w = self.encoder.image_spec.size_px
        if h != w:
            raise InvalidInputError(f"detection crops need a square encoder input, this encoder takes {h}x{w}")
        crop_cfg = self.config.crop or CropConfig(out_size_px=h)
        if crop_cfg.out_size_px != h:
            raise InvalidInputError(f"crop out_size_px={crop_cfg.out_size_px} differs from the encoder input size {h}")
        crops = (
            crop_valid_boxes(arr, valid, config=crop_cfg, threads=self.config.crop_threads)
            if len(valid)
            else np.zeros((0, h, w, 3), np.uint8)
        )
        timings["preprocess"] = _ms(t0)
        t0 = time.perf_counter()
        vecs = self.encoder.embed_pixels(crops) if len(crops) else np.zeros((0, self.encoder.dim), np.float32)
        timings["encode"] = _ms(t0)
        t0 = time.perf_counter()
        retrieved_all = self.memory.search(vecs, k=k) if len(vecs) else []
        timings["search"] = _ms(t0)
        n = max(len(valid), 1)
        shared = {s: v / n for s, v in timings.items()}
        out = []
        for i, retrieved in enumerate(retrieved_all):
            t = dict(shared)
            ranked, ran, fallback = self._rank(
                lambda i=i: self._ranker_crop(arr, valid[i], crop_cfg, crops[i]), retrieved, t
            )
            t["total"] = sum(v for s, v in t.items() if s != "total")
            out.append(
                Detection(
                    box=tuple(given[kept[i]]),
                    label=ranked[0].label,
                    score=ranked[0].score,
                    candidates=ranked,
                    retrieved=tuple(retrieved),
                    ranker_ran=ran,
                    ranker_fallback=fallback,
                    timings_ms=t,
                    index=int(kept[i]),
                )
            )
        log.debug("detect: %d boxes in %.1f ms", len(out), _ms(t_all))
        return out


# -- module-level convenience with a small cache of loaded pipelines ------------------------------
_CACHE: "OrderedDict[tuple, Pipeline]" = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()
_LOADING: "dict[tuple, Future]" = {}  # keys being loaded now, so that concurrent callers share one load


def _key(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj).resolve()
        try:
            return ("path", str(p), p.stat().st_mtime_ns)
        except OSError:
            return ("path", str(p), None)
    return ("obj", id(obj))


def get_pipeline(*, memory, encoder=None, ranker=None, config: PipelineConfig | None = None) -> Pipeline:
    """A cached `Pipeline` for these arguments (paths are keyed by file and modification time).

    Thread-safe: threads asking for the same arguments at once share one load. A pipeline pushed out of
    the cache is not closed, since another thread may be in the middle of a call with it; its models are
    freed once nothing refers to it any more.
    """
    key = (_key(memory), _key(encoder), _key(ranker), config)
    with _CACHE_LOCK:
        p = _CACHE.get(key)
        if p is not None:
            _CACHE.move_to_end(key)
            return p
        loading = _LOADING.get(key)
        builder = loading is None
        if builder:
            loading = _LOADING[key] = Future()
    if not builder:
        return loading.result()  # another thread is loading these models: wait for its pipeline
    try:
        p = Pipeline(memory=memory, encoder=encoder, ranker=ranker, config=config)
    except BaseException as e:
        with _CACHE_LOCK:
            del _LOADING[key]
        loading.set_exception(e)
        raise
    with _CACHE_LOCK:
        del _LOADING[key]
        _CACHE[key] = p
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)  # dropped, not closed: see above
    loading.set_result(p)
    return p


def classify(
    image: ImageLike,
    *,
    memory: Memory | str | os.PathLike,
    encoder: Encoder | str | os.PathLike | None = None,
    ranker: RankerProtocol | str | os.PathLike | None = None,
    k: int = defaults.K,
    color: str = "rgb",
) -> Classification:
    """Classifies one image with RAR: retrieve k distinct classes from ``memory``, rank if ``ranker``.

    Models are loaded on the first call and kept for later calls with the same arguments.

    Args:
        image: a path, encoded bytes, a PIL image or an HxWx3 uint8 array.
        memory: a `Memory` or a saved memory file.
        encoder: an `Encoder` or model folder (default: the one recorded in the memory).
        ranker: a ranker, a ranker model folder, or None for retrieval only.
        k: candidates retrieved and ranked.
        color: the channel order of an array: ``"rgb"`` or ``"bgr"`` (OpenCV frames).
    """
    return get_pipeline(memory=memory, encoder=encoder, ranker=ranker).classify(image, k=k, color=color)


def detect(
    image: ImageLike,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    *,
    memory: Memory | str | os.PathLike,
    encoder: Encoder | str | os.PathLike | None = None,
    ranker: RankerProtocol | str | os.PathLike | None = None,
    k: int = defaults.K,
    on_invalid: str = "raise",
    color: str = "rgb",
) -> list[Detection]:
    """Classifies every box of an image (crop, enlarge, blur around, resize; retrieve; rank).

    Args:
        image: the full image.
        boxes: (N, 4) x1, y1, x2, y2 in pixels.
        memory, encoder, ranker, k: as in `classify`.
        on_invalid: "raise" or "skip" boxes with zero/negative area or NaN coordinates.
        color: the channel order of an array: ``"rgb"`` or ``"bgr"`` (OpenCV frames).
    """
    return get_pipeline(memory=memory, encoder=encoder, ranker=ranker).detect(
        image, boxes, k=k, on_invalid=on_invalid, color=color
    )
