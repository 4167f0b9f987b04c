"""The MLLM ranker: an image and its k retrieved candidate names -> a ranking of exactly those names.

Two modes, one loaded model:

* ``"score"`` (default): the log-likelihood of each candidate as the first item of the answer
  (`` tulip\\n`` after ``1.``), averaged over its tokens, softmaxed over the candidates. The image and the
  candidate list are evaluated once; the k continuations are evaluated together in one batch, each in its
  own KV-cache sequence sharing the prompt's cells (a unified cache: ``llama_memory_seq_cp`` for the prefix,
  and the query's tokens tagged with every candidate's sequence). A text query and its continuations take
  one ``llama_decode``; an image query two (mtmd evaluates the image part). The last token of a
  continuation is scored from the logits before it and never evaluated.
* ``"generate"``: the paper's behaviour. The model writes the numbered list greedily, each line constrained
  to the names not yet written: at every token the choice is the argmax over the next tokens of those
  names' lines (their tokenization in context), so the list is a permutation by construction and no
  tokens go to repeats; the last name is implied. Tokens that no choice separates (the line number, the
  rest of a name once it is the only one left) are not sampled but evaluated together with the next choice
  in one ``llama_decode``: a line costs one decode, and no sampler walks the vocabulary
  (docs/design-notes.md#generate-mode). The names are the ones decoded, not parsed back
  from the text (`parse_ranking` reads free-form answers of other models); if the candidates' lines do
  not tokenize apart, the retrieval order is returned with ``fallback=True``.

The prompt (`rar_edge.rank.prompts`) is split into a prefix that is the same for every query (system text,
in-context examples, instruction), evaluated once per loaded model and kept in sequence 0 of the KV cache,
and a per-query part (image, candidates). Each query removes the cells after the prefix and evaluates only
its own part. Images go through llama.cpp's mtmd library (``llama_cpp.mtmd_cpp``): the image is encoded
once per query, never once per candidate. llama-cpp-python's chat handlers (``Llava15ChatHandler``, ...)
are not used for ranking: each of their calls clears the KV cache and re-evaluates the whole prompt, and
their ``Llama`` context has one sequence, which rules out batched candidate scoring.

A model is either a GGUF file (text only unless ``mmproj=`` is given) or a model folder written by
``rar-edge export mllm`` whose ``manifest.json`` has ``kind`` = ``"mllm"``::

    {
      "format": "rar_edge.model", "format_version": 1, "kind": "mllm",
      "name": "HuggingFaceTB/SmolVLM-256M-Instruct", "source": "...", "exporter": "rar_edge_export 0.1.0",
      "files": {"language_model": {"path": "model-Q4_K_M.gguf", "sha256": "..."},
                "mmproj": {"path": "mmproj-F16.gguf", "sha256": "..."}},          # mmproj: optional
      "architecture": "llama",                  # general.architecture of the language model
      "vision": {"projector_type": "idefics3", "image_size_px": 512, "patch_size_px": 16,
                 "has_vision_encoder": true} | null,        # from the mmproj GGUF; mtmd preprocesses
      "chat_template": "{% for message in messages %}..." | null,   # tokenizer.chat_template
      "chat_handler": "MTMDChatHandler" | "Llava15ChatHandler" | "Qwen25VLChatHandler" | ... | null,
      "quantization": "Q4_K_M",                 # of the language model; the mmproj stays F16
      "n_ctx": 4096,                            # suggested context size for ranking with images
      "prompt_version": "rar-rank-v1",          # the rar_edge.rank.prompts template to rank with
      "llama_cpp_python": "0.3.36"              # the version whose converter and quantizer wrote the files
    }

``chat_handler`` names the llama-cpp-python handler a user would pass to ``llama_cpp.Llama`` for chat with
the same files; the ranker itself does not need it. Files may be copies or hard links of the originals.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rar_edge import defaults
from rar_edge.errors import (
    InvalidInputError,
    ManifestError,
    RankerError,
)
from rar_edge.image.pixels import check_rgb
from rar_edge.manifest import load_manifest
from rar_edge.rank._llama import _Native
from rar_edge.rank.prompts import (
    RankingExample,
    RankingPrompt,
    get_prompt,
    render_chat,
    validate_candidates,
)
from rar_edge.types import Ranking

__all__ = ["MODES", "Ranker", "RankerConfig", "RankerStats"]

logger = logging.getLogger("rar_edge")


def _check_gguf(path: Path | None) -> None:
    """Refuses a file that does not start as a GGUF does, before llama.cpp tries it."""
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise RankerError(f"cannot read {path}: {e.strerror or e}") from e
    if head[:4] != b"GGUF":
        raise RankerError(
            f"{path} is not a GGUF file (it starts with {head[:4]!r}); give a model folder or a .gguf "
            "written by 'rar-edge export mllm' or llama.cpp"
        )


MODES = ("score", "generate")
DEFAULT_N_CTX = 4096
DEFAULT_MAX_CANDIDATES = 32
_SENTINELS = ("\x00RAR_EDGE_QUERY_A\x00", "\x00RAR_EDGE_QUERY_B\x00")


@dataclass(frozen=True)
class RankerConfig:
    """How a ranker is loaded and run (see `Ranker.load`).

    Attributes:
        mode: ``"score"`` or ``"generate"`` (default for `Ranker.rank`; each call may override it).
        n_threads: CPU threads; None: the CPUs this process may use.
        n_ctx: context size in tokens; None or 0: the model folder's suggestion, else 4096.
        max_candidates: the most candidates one call scores in one batch (more are scored in groups).
        prompt_version: a `rar_edge.rank.prompts` version; None: the model folder's, else the latest.
        verify: check the sha256 of a model folder's files on load, as encoders do (reads them once: about a
            second per GB); a missing file is refused either way.
        n_gpu_layers: layers offloaded to the GPU by a CUDA/Metal build of llama.cpp (-1: all; the vision
            projector then runs on the GPU too); 0 keeps everything on the CPU.
    """

    mode: str = "score"
    n_threads: int | None = None
    n_ctx: int | None = None
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    prompt_version: str | None = None
    verify: bool = True
    n_gpu_layers: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, not {self.mode!r}")
        if not 1 <= self.max_candidates <= 255:  # llama.cpp holds at most 256 sequences, one is the shared prefix
            raise InvalidInputError(f"max_candidates must be in [1, 255], got {self.max_candidates}")
        if self.n_ctx is not None and self.n_ctx < 0:
            raise InvalidInputError(
                f"n_ctx must be >= 0 (0 or None: the model folder's or the default), got {self.n_ctx}"
            )
        if self.n_threads is not None and self.n_threads < 1:
            raise InvalidInputError(f"n_threads must be >= 1, got {self.n_threads}")


@dataclass(frozen=True)
class RankerStats:
    """Counters since the model was loaded (what was evaluated, to check that caching works).

    Attributes:
        prefix_evals: times the fixed prompt prefix was evaluated (1 after the first query).
        prefix_tokens: tokens in the prefix.
        queries: calls to `Ranker.rank` that ran the model.
        query_tokens: tokens (text + image positions) evaluated for the per-query parts.
        image_encodes: images encoded by the vision projector (each once; a model's preprocessor may
            split one image into several tiles, still counted as one).
        continuation_tokens: candidate tokens evaluated in score mode (all but each candidate's last).
        generated_tokens: tokens sampled in generate mode.
        decode_calls: ``llama_decode`` calls made by the ranker (mtmd's own calls not counted).
    """

    prefix_evals: int = 0
    prefix_tokens: int = 0
    queries: int = 0
    query_tokens: int = 0
    image_encodes: int = 0
    continuation_tokens: int = 0
    generated_tokens: int = 0
    decode_calls: int = 0


def _to_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image
    else:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a core dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            arr = np.asarray(image.convert("RGB"))
        else:
            raise InvalidInputError(
                f"image must be a PIL.Image, an HxWx3 uint8 array or None, not {type(image).__name__}"
            )
    return np.ascontiguousarray(check_rgb(arr))


def _rank_weights(n: int) -> tuple[float, ...]:
    """Generate mode's scores: 1/rank, normalised to sum to 1 (rank-derived, not model probabilities)."""
    w = 1.0 / np.arange(1, n + 1)
    return tuple(float(v) for v in w / w.sum())


# A process forked while another thread was inside `Ranker.rank` inherits that call's lock held, by a thread
# that does not exist in the child: the child gets fresh locks, so that a use there reaches the clear
# RankerError of a model loaded before the fork (rank/_llama.py) instead of blocking for ever.
_RANKERS: "weakref.WeakSet[Ranker]" = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    for ranker in list(_RANKERS):
        ranker._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_in_child)


@dataclass(frozen=True)
class _ModelFiles:
    """What a ranker model folder (its manifest) or a bare GGUF gives the loader."""

    language_model: Path
    mmproj: Path | None
    name: str
    chat_template: str | None = None
    n_ctx: int | None = None
    prompt_version: str | None = None
    vision_px: int | None = None


def _model_files(path: Path, mmproj: str | os.PathLike | None, *, verify: bool) -> _ModelFiles:
    """Resolves a model folder (``mllm`` manifest) or a bare GGUF (+ ``mmproj``), checking the files exist."""
    if path.is_dir():
        if mmproj is not None:
            raise InvalidInputError("mmproj= is for a bare GGUF; a model folder names its own mmproj")
        m = load_manifest(path, verify=verify)
        if m.kind != "mllm":
            raise ManifestError(f"{path} holds a {m.kind!r} model, the ranker needs kind 'mllm'")
        px = (m.data.get("vision") or {}).get("image_size_px")
        return _ModelFiles(
            language_model=m.path("language_model"),
            mmproj=m.path("mmproj") if m.has_file("mmproj") else None,
            name=m.name,
            chat_template=m.data.get("chat_template"),
            n_ctx=m.data.get("n_ctx"),
            prompt_version=m.data.get("prompt_version"),
            vision_px=int(px) if isinstance(px, (int, float)) and px > 0 else None,
        )
    if path.is_file():
        mm_path = Path(mmproj) if mmproj is not None else None
        if mm_path is not None and not mm_path.is_file():
            raise InvalidInputError(f"mmproj file not found: {mm_path}")
        for p in (path, mm_path):
            _check_gguf(p)
        return _ModelFiles(language_model=path, mmproj=mm_path, name=path.stem)
    raise InvalidInputError(f"no model folder or GGUF file at {path}")


class Ranker:
    """Ranks the k retrieved candidate names for an image with a (multimodal) LLM through llama.cpp.

    Create with `Ranker.load`; use as a context manager or call `close`. Calls from several threads
    run one at a time (one llama.cpp context); for parallel ranking load one ranker per thread.

    Example:
        >>> with Ranker.load("models/smolvlm") as ranker:          # doctest: +SKIP
        ...     r = ranker.rank(image, ["tulip", "daffodil", "iris"])
        ...     r.labels[0]
    """

    def __init__(
        self,
        native: _Native,
        *,
        mode: str,
        prompt: RankingPrompt,
        chat_template: str | None,
        in_context_examples: Sequence[RankingExample],
        name: str,
        vision_image_size_px: int | None = None,
        config: RankerConfig | None = None,
    ) -> None:
        self._native: _Native | None = native
        self.config = config or RankerConfig(mode=mode)
        self._vision_px = vision_image_size_px
        self._mode = mode
        self._prompt = prompt
        self._chat_template = chat_template or None
        bad = [ex for ex in in_context_examples if not isinstance(ex, RankingExample)]
        if bad:
            raise InvalidInputError(
                f"in_context_examples must be rar_edge.rank.prompts.RankingExample objects, got {type(bad[0]).__name__}"
            )
        self._examples = tuple(in_context_examples)
        # One llama.cpp context serves one call at a time; the module-level classify() cache hands the same
        # ranker to every thread, so calls queue here instead of corrupting the KV cache.
        self._lock = threading.Lock()
        _RANKERS.add(self)
        self.name = name
        self._warned_no_vision = False
        self._stats: dict[str, int] = dict.fromkeys(RankerStats.__dataclass_fields__, 0)
        # The constant start of every query's text joins the cached prefix.
        self._head = prompt.query_head(vision=native.mtmd_ctx is not None)
        self._prefix_text, self._query_tail = self._split_prompt()
        self._n_prefix: int | None = None
        self._closed_model_s = 0.0

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        *,
        mmproj: str | os.PathLike | None = None,
        config: RankerConfig | None = None,
        in_context_examples: Sequence[RankingExample] | None = None,
        mode: str = "score",
        n_threads: int | None = None,
        n_ctx: int | None = None,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        prompt_version: str | RankingPrompt | None = None,
        verify: bool = True,
        n_gpu_layers: int = 0,
    ) -> "Ranker":
        """Loads a ranker.

        Settings come either in ``config`` or as the keywords after ``in_context_examples`` (each documented
        in `RankerConfig`), not both.

        Args:
            model: a model folder with an ``mllm`` manifest, or a GGUF language model.
            mmproj: the vision projector GGUF, for a bare GGUF ``model`` (a folder names its own).
            config: the settings as one object.
            in_context_examples: solved rankings placed in the cached prompt prefix
                (see `rar_edge.tools.finetune_data.in_context_examples`).
            prompt_version: also a `RankingPrompt` object (a custom prompt).

        Raises:
            MissingDependencyError: llama-cpp-python is not installed (``pip install 'rar-edge[llm]'``).
            ManifestError: the folder is not an ``mllm`` model folder.
            RankerError: llama.cpp cannot load the files.
        """
        keywords = dict(
            mode=mode,
            n_threads=n_threads,
            n_ctx=n_ctx,
            max_candidates=max_candidates,
            verify=verify,
            n_gpu_layers=n_gpu_layers,
        )
        custom_prompt = prompt_version if isinstance(prompt_version, RankingPrompt) else None
        if config is None:
            config = RankerConfig(**keywords, prompt_version=None if custom_prompt else prompt_version)
        elif keywords != {f: getattr(RankerConfig(), f) for f in keywords} or prompt_version is not None:
            raise InvalidInputError("pass the ranker's settings either in config= or as keywords, not both")
        mode, n_ctx, max_candidates = config.mode, config.n_ctx, config.max_candidates
        files = _model_files(Path(model), mmproj, verify=config.verify)
        prompt = get_prompt(custom_prompt or config.prompt_version or files.prompt_version or defaults.PROMPT_VERSION)
        n_threads = config.n_threads
        if n_threads is None:
            n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        native = _Native(
            files.language_model,
            mmproj_path=files.mmproj,
            n_ctx=int(n_ctx or files.n_ctx or DEFAULT_N_CTX),
            n_batch=512,
            n_seq_max=max_candidates + 1,
            n_threads=int(n_threads),
            n_gpu_layers=int(config.n_gpu_layers),
        )
        try:
            return cls(
                native,
                mode=mode,
                prompt=prompt,
                chat_template=(
                    files.chat_template if files.chat_template is not None else native.meta("tokenizer.chat_template")
                ),
                in_context_examples=in_context_examples or (),
                name=files.name,
                vision_image_size_px=files.vision_px,
                config=config,
            )
        except BaseException:
            native.close()
            raise

    # -- public ---------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The default mode of `rank`."""
        return self._mode

    @property
    def has_vision(self) -> bool:
        """Whether a vision projector is loaded (images are used)."""
        return self._live().mtmd_ctx is not None

    @property
    def image_size_px(self) -> int | None:
        """The side of the images the vision tower takes (from the model folder's manifest): `Pipeline`
        decodes photos for the ranker at least this large. 0: no vision projector; None: not known (a bare
        GGUF + mmproj), so the pipeline passes the full image and llama.cpp's preprocessor resizes it."""
        if self._live().mtmd_ctx is None:
            return 0
        return self._vision_px

    @property
    def prompt_version(self) -> str:
        return self._prompt.version

    @property
    def stats(self) -> RankerStats:
        """A snapshot of the evaluation counters."""
        return RankerStats(**self._stats)

    @property
    def model_s(self) -> float:
        """Seconds spent inside llama.cpp's decode and image-encode calls since the model was loaded."""
        native = self._native
        return native.clock.seconds if native is not None else self._closed_model_s

    def describe(self) -> dict[str, Any]:
        """What a report should record about this ranker (JSON-ready)."""
        native = self._native
        return {
            "name": self.name,
            "mode": self._mode,
            "prompt_version": self._prompt.version,
            "has_vision": native is not None and native.mtmd_ctx is not None,
            "image_size_px": self._vision_px,
            "in_context_examples": len(self._examples),
            "n_ctx": None if native is None else native.n_ctx,
            "n_threads": self.config.n_threads,
            "n_gpu_layers": self.config.n_gpu_layers,
            "max_candidates": self.config.max_candidates,
        }

    def rank(self, image: Any, candidates: Sequence[str], *, mode: str | None = None) -> Ranking:
        """Ranks ``candidates`` for ``image``.

        Args:
            image: a PIL image, an HxWx3 uint8 RGB array, or None (rank from the names alone). Ignored,
                with one logged warning, by a model without a vision projector.
            candidates: the k distinct class names in retrieval order (best first).
            mode: override the ranker's mode for this call.

        Returns:
            `Ranking` with every candidate exactly once, best first. Score mode: softmax probabilities.
            Generate mode: rank-derived weights (1/rank, normalised), ``raw`` the model's text, and
            ``fallback=True`` with retrieval order when the answer was unusable.

        Raises:
            InvalidInputError: bad image or candidates (empty, duplicates, line breaks).
            RankerError: llama.cpp failed (e.g. the context is too small).
        """
        mode = self._mode if mode is None else mode
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, not {mode!r}")
        cands = validate_candidates(candidates)
        img = None if image is None else _to_rgb_array(image)
        with self._lock:
            native = self._live()
            if img is not None and native.mtmd_ctx is None:
                if not self._warned_no_vision:
                    logger.warning("ranker %s has no vision projector: ranking from the names alone", self.name)
                    self._warned_no_vision = True
                img = None
            if len(cands) == 1:
                return Ranking(labels=cands, scores=(1.0,), fallback=False, raw="")
            if mode == "score":
                return self._rank_score(img, cands)
            return self._rank_generate(img, cands)

    def close(self) -> None:
        """Frees the model and its context (idempotent; waits for a call in progress)."""
        with self._lock:
            if self._native is not None:
                self._closed_model_s = self._native.clock.seconds
                self._native.close()
                self._native = None

    def __enter__(self) -> "Ranker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    # -- prompt ---------------------------------------------------------------------------------------

    def _live(self) -> _Native:
        if self._native is None:
            raise RankerError("the ranker is closed")
        return self._native

    def _marker(self) -> str | None:
        n = self._live()
        return n.marker if n.mtmd_ctx is not None else None

    def _render(self, last_user: str) -> str:
        p = self._prompt
        marker = self._marker()
        if self._chat_template:
            msgs: list[dict[str, str]] = [{"role": "system", "content": p.system}]
            for ex in self._examples:
                use_img = ex.image is not None and marker is not None
                msgs.append(
                    {"role": "user", "content": p.user_text(ex.candidates, image_marker=marker if use_img else None)}
                )
                msgs.append({"role": "assistant", "content": p.answer(ex.ranked)})
            msgs.append({"role": "user", "content": p.instruction + "\n" + self._head + last_user})
            n = self._live()
            eos = n.token_text(n.lc.llama_vocab_eos(n.vocab)) if n.lc.llama_vocab_eos(n.vocab) >= 0 else ""
            return render_chat(self._chat_template, msgs, bos_token="", eos_token=eos, add_generation_prompt=True)
        parts = [p.system, "\n\n"]
        for ex in self._examples:
            use_img = ex.image is not None and marker is not None
            parts += [
                p.plain_user,
                p.user_text(ex.candidates, image_marker=marker if use_img else None),
                "\n",
                p.plain_assistant,
                p.answer(ex.ranked),
                p.plain_turn_end,
            ]
        parts += [p.plain_user, p.instruction, "\n", self._head, last_user, "\n", p.plain_assistant]
        return "".join(parts)

    def _split_prompt(self) -> tuple[str, str]:
        """(prefix text, tail after the query's user text), checked to not depend on the query."""
        a, b = (self._render(s) for s in _SENTINELS)
        if a.count(_SENTINELS[0]) != 1 or b.count(_SENTINELS[1]) != 1:
            raise RankerError("the chat template does not place the user's text verbatim; cannot split it")
        pa, ta = a.split(_SENTINELS[0])
        pb, tb = b.split(_SENTINELS[1])
        if pa != pb or ta != tb:
            raise RankerError("the chat template renders the prompt differently per query; cannot cache it")
        return pa, ta

    def _example_images(self) -> list[np.ndarray]:
        if self._marker() is None:
            return []
        from rar_edge.image.codec import decode_rgb

        # decoded as queries are (upright: EXIF orientation applied)
        return [decode_rgb(ex.image) for ex in self._examples if ex.image is not None]

    def _query_text(self, cands: Sequence[str], with_image: bool) -> str:
        marker = self._marker() if with_image else None
        text = self._prompt.query_text(cands, image_marker=marker)
        if not text.startswith(self._head):  # a prompt whose query_head is wrong: fail loudly, not silently
            raise RankerError(f"prompt {self._prompt.version}: query text does not start with its constant head")
        return text[len(self._head) :] + self._query_tail + self._prompt.answer_open

    def _tokens_after(self, anchor: str, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as tokenized in context, right after ``anchor``."""
        n = self._live()
        base = n.tokenize(anchor, add_special=False)
        out = []
        for text in texts:
            joint = n.tokenize(anchor + text, add_special=False)
            if joint[: len(base)] == base and len(joint) > len(base):
                out.append(joint[len(base) :])
            else:  # the anchor merged with the text: tokenize the text on its own
                out.append(n.tokenize(text, add_special=False))
        return out

    def _continuations(self, cands: Sequence[str]) -> list[list[int]]:
        """Token ids of each candidate's continuation, tokenized in context after the answer opening."""
        last = len(cands) == 1
        return self._tokens_after(self._prompt.answer_open, [self._prompt.continuation(c, last=last) for c in cands])

    # -- evaluation -----------------------------------------------------------------------------------

    def _ensure_prefix(self) -> int:
        """Evaluates the fixed prefix into sequence 0 once; afterwards only drops what follows it."""
        n = self._live()
        n.clear_slots()
        if self._n_prefix is not None:
            n.seq_rm(0, self._n_prefix, -1)
            return self._n_prefix
        n.clear_all()
        images = self._example_images()
        if images:
            n_past, n_tok = n.eval_mtmd(self._prefix_text, images, n_past=0, seq=0, add_special=True)
            self._stats["image_encodes"] += len(images)
        else:
            toks = n.tokenize(self._prefix_text, add_special=True)
            if len(toks) >= n.n_ctx:
                raise RankerError(f"the prompt prefix has {len(toks)} tokens, n_ctx is {n.n_ctx}")
            n.decode([(t, i, 0, False) for i, t in enumerate(toks)])
            self._stats["decode_calls"] += n.last_decode_calls
            n_past = n_tok = len(toks)
        self._n_prefix = n_past
        self._stats["prefix_evals"] += 1
        self._stats["prefix_tokens"] = n_tok
        return n_past

    def _query_tokens(self, cands: Sequence[str]) -> list[int]:
        n = self._live()
        toks = n.tokenize(self._query_text(cands, False), add_special=False)
        if self._n_prefix is not None and self._n_prefix + len(toks) >= n.n_ctx:
            raise RankerError(f"the prompt needs {self._n_prefix + len(toks)} tokens, n_ctx is {n.n_ctx}")
        return toks

    def _eval_query(self, img: np.ndarray | None, cands: Sequence[str]) -> int:
        """Evaluates image + candidate list into sequence 0 after the prefix; keeps the last token's logits.

        Returns:
            n_past after the query.
        """
        n = self._live()
        n_past = self._ensure_prefix()
        self._stats["queries"] += 1
        if img is not None:
            text = self._query_text(cands, True)
            new_past, n_tok = n.eval_mtmd(text, [img], n_past=n_past, seq=0, add_special=False)
            self._stats["query_tokens"] += n_tok
            self._stats["image_encodes"] += 1
            return new_past
        toks = self._query_tokens(cands)
        n.decode([(t, n_past + i, 0, i == len(toks) - 1) for i, t in enumerate(toks)])
        self._stats["decode_calls"] += n.last_decode_calls
        self._stats["query_tokens"] += len(toks)
        return n_past + len(toks)

    def _score_groups(self, conts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Candidates to evaluate, in batches that fit ``n_batch`` tokens and the free sequences."""
        n = self._live()
        size = max(1, n.n_seq_max - 1)
        groups: list[list[int]] = []
        n_tok = 0
        for ci, toks in enumerate(conts):
            need = len(toks) - 1  # the last token is scored from the previous logits, never evaluated
            if need == 0:
                continue
            if need > n.n_batch:
                raise RankerError(f"a candidate name has {need} tokens, more than n_batch={n.n_batch}")
            if not groups or len(groups[-1]) == size or n_tok + need > n.n_batch:
                groups.append([])
                n_tok = 0
            groups[-1].append(ci)
            n_tok += need
        return groups

    def _rank_score(self, img: np.ndarray | None, cands: tuple[str, ...]) -> Ranking:
        n = self._live()
        conts = self._continuations(cands)
        groups = self._score_groups(conts)
        total = [0.0] * len(cands)
        firsts = [toks[0] for toks in conts]  # every candidate's first token is scored from the query's logits

        def group_entries(members: list[int], n_past: int) -> list[tuple[int, int, int, bool]]:
            # the group's candidate j lives in sequence j+1; its token i's logits predict token i+1
            return [
                (t, n_past + i, slot, True)
                for slot, ci in enumerate(members, start=1)
                for i, t in enumerate(conts[ci][:-1])
            ]

        def add_logprobs(members: list[int], rows: Iterator[int]) -> None:
            for ci in members:
                toks = conts[ci]
                for j in range(1, len(toks)):
                    total[ci] += float(n.log_probs(next(rows), (toks[j],))[0])

        def prepare_slots(members: list[int]) -> None:
            n.clear_slots()  # every slot written before: a larger earlier group's cells must go too
            for slot in range(1, len(members) + 1):
                n.seq_cp(0, slot)

        if img is None:
            # Text query: the query and the first group's continuations go in one llama_decode. The query
            # tokens belong to sequence 0 and to each of the group's sequences, which first share the prefix.
            n_prefix = self._ensure_prefix()
            self._stats["queries"] += 1
            q = self._query_tokens(cands)
            n_past = n_prefix + len(q)
            first: list[int] = []
            if groups and len(q) + sum(len(conts[c]) - 1 for c in groups[0]) <= n.n_batch:
                first = groups.pop(0)
            prepare_slots(first)
            shared = (0, *range(1, len(first) + 1))
            entries = [(t, n_prefix + i, shared, i == len(q) - 1) for i, t in enumerate(q)]
            cont_entries = group_entries(first, n_past)
            if n_past + len(cont_entries) > n.n_ctx:
                raise RankerError(f"scoring needs {n_past + len(cont_entries)} KV cells, n_ctx is {n.n_ctx}")
            rows = iter(n.decode(entries + cont_entries))
            self._stats["decode_calls"] += n.last_decode_calls
            self._stats["query_tokens"] += len(q)
            self._stats["continuation_tokens"] += len(cont_entries)
            query_row = next(rows)
            first_lp = n.log_probs(query_row, firsts)
            add_logprobs(first, rows)
        else:
            n_past = self._eval_query(img, cands)
            first_lp = n.log_probs(-1, firsts)
        for ci in range(len(conts)):
            total[ci] += float(first_lp[ci])
        for members in groups:
            entries = group_entries(members, n_past)
            if n_past + len(entries) > n.n_ctx:
                raise RankerError(f"scoring needs {n_past + len(entries)} KV cells, n_ctx is {n.n_ctx}")
            prepare_slots(members)
            rows = iter(n.decode(entries))
            self._stats["decode_calls"] += n.last_decode_calls
            self._stats["continuation_tokens"] += len(entries)
            add_logprobs(members, rows)
        mean = np.array([t / len(c) for t, c in zip(total, conts)])
        probs = np.exp(mean - mean.max())
        probs /= probs.sum()
        order = sorted(range(len(cands)), key=lambda j: (-probs[j], j))
        return Ranking(
            labels=tuple(cands[j] for j in order),
            scores=tuple(float(probs[j]) for j in order),
            fallback=False,
            raw="",
        )

    def _line_tokens(self, names: Sequence[str], number: int) -> dict[str, list[int]]:
        """Each name's whole answer line ``"number. name\n"`` as tokens, tokenized in context (line 1 follows
        the prompt's ``1.``, later lines the previous line break)."""
        if number == 1:
            return dict(zip(names, self._continuations(names)))
        return dict(zip(names, self._tokens_after("\n", [f"{number}. {name}\n" for name in names])))

    def _rank_generate(self, img: np.ndarray | None, cands: tuple[str, ...]) -> Ranking:
        """The model writes the list line by line, greedily, each line restricted to the names not yet
        written (see the module notes); the last name is implied, not generated."""
        n = self._live()
        n_past = self._eval_query(img, cands)  # its last token's logits choose the first name
        remaining = list(cands)
        chosen: list[str] = []
        lines: list[str] = []
        pending: list[int] = []  # decided tokens not evaluated yet
        for number in range(1, len(cands)):
            live = self._line_tokens(remaining, number)
            if any(not t for t in live.values()) or len(set(map(tuple, live.values()))) < len(live):
                logger.warning("generate mode: candidate lines do not tokenize apart; returning retrieval order")
                return self._fallback(cands, self._prompt.answer_open + "".join(lines))
            pos = 0
            while True:
                nexts = sorted({t[pos] for t in live.values()})
                if len(nexts) == 1:
                    tok = nexts[0]  # nothing to choose: no sampling, no evaluation yet
                else:
                    if pending:
                        if n_past + len(pending) >= n.n_ctx:
                            raise RankerError(f"the answer needs more than n_ctx={n.n_ctx} positions")
                        n.decode([(t, n_past + i, 0, i == len(pending) - 1) for i, t in enumerate(pending)])
                        self._stats["decode_calls"] += n.last_decode_calls
                        n_past += len(pending)
                        pending = []
                    tok = nexts[int(np.argmax(n.logits_of(-1, nexts)))]
                pending.append(tok)
                self._stats["generated_tokens"] += 1
                live = {c: t for c, t in live.items() if t[pos] == tok}
                pos += 1
                done = [c for c, t in live.items() if len(t) == pos]
                if done:
                    break
            lines.append(("" if number == 1 else f"{number}.") + f" {done[0]}\n")
            chosen.append(done[0])
            remaining.remove(done[0])
        raw = self._prompt.answer_open + "".join(lines) + f"{len(cands)}. {remaining[0]}"
        # Every line was decoded as one candidate's own tokens: the names are known without reading the text
        # back (a parser would fold names that differ only in spaces or punctuation, e.g. "rose" / "rose.").
        names = chosen + remaining
        return Ranking(labels=tuple(names), scores=_rank_weights(len(names)), fallback=False, raw=raw)

    @staticmethod
    def _fallback(cands: tuple[str, ...], raw: str) -> Ranking:
        return Ranking(labels=cands, scores=_rank_weights(len(cands)), fallback=True, raw=raw)

    # -- introspection for tests ----------------------------------------------------------------------

    def _prompt_tokens(self, candidates: Sequence[str]) -> tuple[list[int], list[int], list[list[int]]]:
        """(prefix tokens, query tokens, continuation tokens per candidate) for a text-only query."""
        n = self._live()
        cands = validate_candidates(candidates)
        return (
            n.tokenize(self._prefix_text, add_special=True),
            n.tokenize(self._query_text(cands, False), add_special=False),
            self._continuations(cands),
        )
