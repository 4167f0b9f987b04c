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
  in one ``llama_decode``: a line costs one decode, and no sampler walks the vocabulary (llama.cpp's GBNF
  grammar sampler, used before, took ~38 ms a token for a 152k vocabulary on a 16-core Xeon and made
  generate mode 44x slower than score mode on a GPU). The names are the ones decoded, not parsed back
  from the text (`parse_ranking` reads free-form answers of other models); if the candidates' lines do
  not tokenize apart, the retrieval order is returned with ``fallback=True``.

The prompt (`rar_edge.prompts`) is split into a prefix that is the same for every query (system text,
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
      "prompt_version": "rar-rank-v1",          # the rar_edge.prompts template to rank with
      "llama_cpp_python": "0.3.36"              # the version whose converter and quantizer wrote the files
    }

``chat_handler`` names the llama-cpp-python handler a user would pass to ``llama_cpp.Llama`` for chat with
the same files; the ranker itself does not need it. Files may be copies or hard links of the originals.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import _native
from .errors import InvalidInputError, ManifestError, MissingDependencyError, RankerError
from .manifest import load_manifest
from .prompts import RankingExample, RankingPrompt, get_prompt, render_chat, validate_candidates
from .types import Ranking

__all__ = ["MODES", "Ranker", "RankerStats", "parse_ranking"]

logger = logging.getLogger("rar_edge")

MODES = ("score", "generate")
DEFAULT_N_CTX = 4096
_SENTINELS = ("\x00RAR_EDGE_QUERY_A\x00", "\x00RAR_EDGE_QUERY_B\x00")


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependencyError("llama-cpp-python", "llm", "The MLLM ranker") from e
    return llama_cpp


# llama.cpp writes its chatter through one process-wide callback; route it to logging at DEBUG level
# (llama-cpp-python's own callback prints to stderr). The ctypes callbacks must stay referenced.
_LOG_LOCK = threading.Lock()
_LOG_CALLBACKS: list[Any] = []


def _install_log_callback(llama_cpp: Any, mtmd: Any | None) -> None:
    with _LOG_LOCK:
        have_mtmd = any(kind == "mtmd" for kind, _ in _LOG_CALLBACKS)
        if _LOG_CALLBACKS and (mtmd is None or have_mtmd):
            return
        native_logger = logging.getLogger("rar_edge.llama_cpp")

        def forward(level: int, text: bytes, user_data: Any) -> None:
            # ggml.h levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation; only errors are worth
            # more than DEBUG here (llama.cpp "warns" about routine things such as quantization fallbacks).
            py_level = logging.ERROR if level == 4 else logging.DEBUG
            if text and native_logger.isEnabledFor(py_level):
                native_logger.log(py_level, "%s", text.decode("utf-8", "replace").rstrip("\n"))

        if not _LOG_CALLBACKS:
            cb = llama_cpp.llama_log_callback(forward)
            llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
            _LOG_CALLBACKS.append(("llama", cb))
        if mtmd is not None and not have_mtmd:
            cb = llama_cpp.llama_log_callback(forward)
            mtmd.mtmd_log_set(cb, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(cb, ctypes.c_void_p(0))
            _LOG_CALLBACKS.append(("mtmd", cb))


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


class _Native:
    """Owns a llama.cpp model, a context with several sequences, a batch and optionally an mtmd context.

    A thin resource-owning layer over the raw ``llama_cpp`` bindings; frees everything in `close`.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        mmproj_path: Path | None,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        n_gpu_layers: int = 0,
    ) -> None:
        lc = _import_llama_cpp()
        self.lc = lc
        self.mtmd = None
        self.model = None
        self.ctx = None
        self.mtmd_ctx = None
        self._batch = None
        if mmproj_path is not None:
            try:
                from llama_cpp import mtmd_cpp
            except (ImportError, OSError) as e:
                raise RankerError(f"this llama-cpp-python build has no usable mtmd library: {e}") from e
            self.mtmd = mtmd_cpp
        _install_log_callback(lc, self.mtmd)
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers  # only a GPU build of llama.cpp offloads; a CPU build ignores it
        self.model = lc.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
        if not self.model:
            self.model = None
            raise RankerError(f"llama.cpp could not load the model {model_path} (not a GGUF it supports?)")
        try:
            self.vocab = lc.llama_model_get_vocab(self.model)
            self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
            cparams = lc.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_batch
            cparams.n_ubatch = n_batch
            cparams.n_seq_max = n_seq_max
            cparams.kv_unified = True  # sequences share the prefix cells instead of splitting n_ctx
            cparams.swa_full = True  # sliding-window models: keep all cells so removal after the prefix works
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
            cparams.no_perf = True
            self.ctx = lc.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                self.ctx = None
                raise RankerError(f"llama.cpp could not create a context (n_ctx={n_ctx}); try a smaller n_ctx")
            self.n_ctx = int(lc.llama_n_ctx(self.ctx))
            # llama.cpp caps the batch at n_ctx: a larger decode call would abort the process (GGML_ASSERT)
            self.n_batch = int(lc.llama_n_batch(self.ctx))
            self.n_seq_max = n_seq_max
            self._slots_used: set[int] = set()  # sequences > 0 that may hold cells: `clear_slots` drops them
            self.mem = lc.llama_get_memory(self.ctx)
            self._batch = lc.llama_batch_init(self.n_batch, 0, n_seq_max)
            if self.mtmd is not None:
                mp = self.mtmd.mtmd_context_params_default()
                mp.use_gpu = n_gpu_layers != 0
                mp.print_timings = False
                mp.n_threads = n_threads
                mp.warmup = False
                self.mtmd_ctx = self.mtmd.mtmd_init_from_file(str(mmproj_path).encode("utf-8"), self.model, mp)
                if not self.mtmd_ctx:
                    self.mtmd_ctx = None
                    raise RankerError(f"llama.cpp's mtmd could not load the vision projector {mmproj_path}")
                if not self.mtmd.mtmd_support_vision(self.mtmd_ctx):
                    raise RankerError(f"{mmproj_path} has no vision encoder")
                self.marker = self.mtmd.mtmd_default_marker().decode("utf-8")
        except BaseException:
            self.close()
            raise

    # -- metadata -----------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lc.llama_model_meta_val_str(self.model, key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self.lc.llama_model_meta_val_str(self.model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return self.lc.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    # -- tokens ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            n_max = -n
            buf = (self.lc.llama_token * n_max)()
            n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            raise RankerError("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    # -- KV cache -------------------------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        if not self.lc.llama_memory_seq_rm(self.mem, seq, p0, p1):
            raise RankerError(f"llama.cpp refused to drop KV cells [{p0}, {p1}) of sequence {seq}")

    def seq_cp(self, src: int, dst: int) -> None:
        if dst > 0:
            self._slots_used.add(dst)
        self.lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def clear_slots(self) -> None:
        """Drops every cell of the sequences above 0 that were written since the last clear (all writes go
        through `seq_cp`, `decode` and `eval_mtmd`, which note their sequences)."""
        for slot in sorted(self._slots_used):
            self.seq_rm(slot, -1, -1)
            self._slots_used.discard(slot)

    def clear_all(self) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        self._slots_used.clear()

    def decode(self, entries: Sequence[tuple[int, int, int | tuple[int, ...], bool]]) -> list[int]:
        """Decodes ``(token, pos, seq or seqs, want_logits)`` entries in as few calls as ``n_batch`` allows.

        A token given several sequences is stored once and seen by all of them (shared prompt cells).

        Returns:
            the batch positions of the entries that asked for logits, for `logits`. Logits survive only
            from the last call, so entries that want them must all fall in the last ``n_batch`` chunk.
        """
        out_idx: list[int] = []
        b = self._batch
        n_calls = 0
        starts = range(0, len(entries), self.n_batch)
        for start in starts:
            chunk = entries[start : start + self.n_batch]
            last = start == starts[-1]
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                seqs = (seq,) if isinstance(seq, int) else seq
                b.n_seq_id[i] = len(seqs)
                for j, sq in enumerate(seqs):
                    b.seq_id[i][j] = sq
                    if sq > 0:
                        self._slots_used.add(sq)
                b.logits[i] = 1 if want else 0
                if want:
                    if not last:
                        raise RankerError("internal: logits asked for outside the last batch")
                    out_idx.append(i)
            b.n_tokens = len(chunk)
            rc = self.lc.llama_decode(self.ctx, b)
            n_calls += 1
            if rc == 1:
                raise RankerError(
                    f"the KV cache is full (n_ctx={self.n_ctx}): load the ranker with a larger n_ctx, "
                    "or use fewer candidates / in-context examples"
                )
            if rc != 0:
                raise RankerError(f"llama_decode failed with code {rc}")
        self.last_decode_calls = n_calls
        return out_idx

    def _logit_row(self, batch_index: int) -> np.ndarray:
        """A batch position's float32 logits: a view of llama.cpp's buffer, valid until the next decode."""
        ptr = self.lc.llama_get_logits_ith(self.ctx, batch_index)
        if not ptr:
            raise RankerError(f"no logits for batch position {batch_index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def log_probs(self, batch_index: int, token_ids: Sequence[int]) -> np.ndarray:
        """log softmax of a batch position's logits, at a few tokens (float64).

        The row's log-sum-exp comes from the native kernel (one pass for the maximum, one with a
        vectorised exp; about 45-60 us at 152k tokens against 255 us for numpy on a float64 copy of the
        row); score mode reads one row per candidate token.
        """
        row = self._logit_row(batch_index)
        lse = _native.logsumexp(row)
        return row[np.asarray(token_ids, np.intp)].astype(np.float64) - lse

    def logits_of(self, batch_index: int, token_ids: Sequence[int]) -> np.ndarray:
        """The logits of a few tokens at a batch position, without copying the whole vocabulary row."""
        return self._logit_row(batch_index)[np.asarray(token_ids, np.int64)].astype(np.float64)

    # -- multimodal ----------------------------------------------------------------------------------

    def eval_mtmd(self, text: str, images: Sequence[np.ndarray], *, n_past: int, seq: int,
                  add_special: bool) -> tuple[int, int, int]:
        """Tokenizes ``text`` (with one media marker per image) and evaluates it into ``seq`` at ``n_past``.

        Returns:
            (new n_past, tokens evaluated). The last position's logits are kept.
        """
        mt = self.mtmd
        bitmaps = []
        chunks = None
        try:
            for img in images:
                h, w = img.shape[:2]
                data = np.ascontiguousarray(img, dtype=np.uint8)
                # A pointer, not from_buffer: arrays from PIL are read-only. mtmd copies the pixels.
                bm = mt.mtmd_bitmap_init(w, h, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
                if not bm:
                    raise RankerError("mtmd could not take the image")
                bitmaps.append(bm)
            itext = mt.mtmd_input_text()
            raw = text.encode("utf-8")
            itext.text = raw
            itext.text_len = len(raw)
            itext.add_special = add_special
            itext.parse_special = True
            chunks = mt.mtmd_input_chunks_init()
            arr_t = (mt.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            rc = mt.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(itext), arr_t, len(bitmaps))
            if rc == 2:
                shapes = ", ".join(f"{im.shape[0]}x{im.shape[1]}" for im in images)
                raise RankerError(f"the vision preprocessor could not prepare the image ({shapes} pixels; an "
                                  "extreme aspect ratio?)")
            if rc != 0:
                raise RankerError(f"mtmd_tokenize failed with code {rc} (markers and images disagree?)")
            n_tok = int(mt.mtmd_helper_get_n_tokens(chunks))
            if n_past + n_tok > self.n_ctx:
                raise RankerError(f"the prompt needs {n_past + n_tok} positions, n_ctx is {self.n_ctx}")
            new_n_past = self.lc.llama_pos(0)
            if seq > 0:
                self._slots_used.add(seq)
            rc = mt.mtmd_helper_eval_chunks(
                self.mtmd_ctx, self.ctx, chunks, n_past, seq, self.n_batch, True, ctypes.byref(new_n_past)
            )
            if rc != 0:
                raise RankerError(f"evaluating the image and text failed (mtmd code {rc})")
            return int(new_n_past.value), n_tok
        finally:
            if chunks is not None:
                mt.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mt.mtmd_bitmap_free(bm)

    def close(self) -> None:
        lc = self.lc
        if self.mtmd_ctx is not None:
            self.mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lc.llama_model_free(self.model)
            self.model = None


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
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"image array must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidInputError(f"image array must have shape (H, W, 3), got {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInputError(f"image is empty: shape {arr.shape}")
    return np.ascontiguousarray(arr)


_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):\]-]|[-*\u2022])\s*")
_QUOTES = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"


def _clean_item(text: str) -> str:
    s = _NUMBERING.sub("", text).strip()
    s = s.strip(" \t,;.")
    s = s.strip("[]()")
    return s.strip()


def parse_ranking(text: str, candidates: Sequence[str]) -> tuple[list[str], bool]:
    """Reads a model's answer back into candidate names.

    Lines are matched first exactly, then without list numbering, bullets, surrounding quotes and case;
    a line that still matches no single name is scanned for every candidate it mentions (longest name
    first), which also reads one-line answers such as ``['tulip', "bird's-foot trefoil"]``.

    Args:
        text: the raw answer.
        candidates: the names offered, in retrieval order.

    Returns:
        (names, repaired): every candidate exactly once, the model's order first, then the names it left
        out in retrieval order; ``repaired`` is True when duplicates or missing names had to be fixed.
        An answer that names no candidate gives ``([], True)``.
    """
    cands = list(candidates)
    by_exact = {c: c for c in cands}
    by_fold = {}
    for c in cands:
        by_fold.setdefault(c.casefold(), c)
        by_fold.setdefault(c.strip(_QUOTES + " ").casefold(), c)

    def match_whole(item: str) -> str | None:
        for variant in (item, item.strip(_QUOTES), item.strip(_QUOTES + " .,;")):
            if variant in by_exact:
                return by_exact[variant]
            if variant.casefold() in by_fold:
                return by_fold[variant.casefold()]
        return None

    longest_first = sorted(cands, key=len, reverse=True)

    def scan(line: str) -> list[str]:
        low = line.casefold()
        taken = [False] * len(low)
        hits: list[tuple[int, str]] = []
        for c in longest_first:
            needle = c.casefold()
            start = 0
            while True:
                i = low.find(needle, start)
                if i < 0:
                    break
                j = i + len(needle)
                before = low[i - 1] if i > 0 else " "
                after = low[j] if j < len(low) else " "
                if not any(taken[i:j]) and not before.isalnum() and not after.isalnum():
                    for t in range(i, j):
                        taken[t] = True
                    hits.append((i, c))
                start = i + 1
        return [c for _, c in sorted(hits)]

    found: list[str] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        hit = match_whole(line) or match_whole(_clean_item(line))
        found.extend([hit] if hit is not None else scan(line))

    seen: set[str] = set()
    ordered = []
    for c in found:
        if c not in seen:
            seen.add(c)
            ordered.append(c)
    if not ordered:
        return [], True
    repaired = len(ordered) != len(found) or len(ordered) != len(cands)
    ordered.extend(c for c in cands if c not in seen)
    return ordered, repaired


def _rank_weights(n: int) -> tuple[float, ...]:
    """Generate mode's scores: 1/rank, normalised to sum to 1 (rank-derived, not model probabilities)."""
    w = 1.0 / np.arange(1, n + 1)
    return tuple(float(v) for v in w / w.sum())


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
    ) -> None:
        self._native: _Native | None = native
        self._vision_px = vision_image_size_px
        self._mode = mode
        self._prompt = prompt
        self._chat_template = chat_template or None
        bad = [ex for ex in in_context_examples if not isinstance(ex, RankingExample)]
        if bad:
            raise InvalidInputError(f"in_context_examples must be rar_edge.prompts.RankingExample objects, got "
                                    f"{type(bad[0]).__name__}")
        self._examples = tuple(in_context_examples)
        # One llama.cpp context serves one call at a time; the module-level classify() cache hands the same
        # ranker to every thread, so calls queue here instead of corrupting the KV cache.
        self._lock = threading.Lock()
        self.name = name
        self._warned_no_vision = False
        self._stats: dict[str, int] = dict.fromkeys(RankerStats.__dataclass_fields__, 0)
        # The constant start of every query's text joins the cached prefix.
        self._head = prompt.query_head(vision=native.mtmd_ctx is not None)
        self._prefix_text, self._query_tail = self._split_prompt()
        self._n_prefix: int | None = None

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        *,
        mmproj: str | os.PathLike | None = None,
        mode: str = "score",
        n_threads: int | None = None,
        n_ctx: int | None = None,
        max_candidates: int = 32,
        in_context_examples: Sequence[RankingExample] | None = None,
        prompt_version: str | RankingPrompt | None = None,
        verify: bool = False,
        n_gpu_layers: int = 0,
    ) -> "Ranker":
        """Loads a ranker.

        Args:
            model: a model folder with an ``mllm`` manifest, or a GGUF language model.
            mmproj: the vision projector GGUF, for a bare GGUF ``model`` (a folder names its own).
            mode: ``"score"`` or ``"generate"`` (default for `rank`; each call may override it).
            n_threads: CPU threads; default: the CPUs this process may use.
            n_ctx: context size in tokens; default: the manifest's suggestion, else 4096.
            max_candidates: the most candidates one call may score in one batch (more are scored in groups).
            in_context_examples: solved rankings placed in the cached prompt prefix
                (see `rar_edge.finetune_data.in_context_examples`).
            prompt_version: a `rar_edge.prompts` version; default: the manifest's, else the latest.
            verify: check the sha256 of a folder's files (reads them once; slow for large models).
            n_gpu_layers: layers offloaded to the GPU by a CUDA/Metal build of llama.cpp (-1: all); with a
                non-zero value the vision projector runs on the GPU too. 0 keeps everything on the CPU.

        Raises:
            MissingDependencyError: llama-cpp-python is not installed (``pip install 'rar-edge[llm]'``).
            ManifestError: the folder is not an ``mllm`` model folder.
            RankerError: llama.cpp cannot load the files.
        """
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, not {mode!r}")
        if not 1 <= max_candidates <= 255:  # llama.cpp holds at most 256 sequences, one is the shared prefix
            raise InvalidInputError(f"max_candidates must be in [1, 255], got {max_candidates}")
        if n_ctx is not None and n_ctx < 0:
            raise InvalidInputError(f"n_ctx must be >= 0 (0 or None: the model folder's or the default), got {n_ctx}")
        path = Path(model)
        chat_template: str | None = None
        manifest_n_ctx = None
        manifest_prompt = None
        vision_px = None
        if path.is_dir():
            if mmproj is not None:
                raise InvalidInputError("mmproj= is for a bare GGUF; a model folder names its own mmproj")
            m = load_manifest(path, verify=verify)
            if m.kind != "mllm":
                raise ManifestError(f"{path} holds a {m.kind!r} model, the ranker needs kind 'mllm'")
            lm_path = m.path("language_model")
            mm_path = m.path("mmproj") if m.has_file("mmproj") else None
            chat_template = m.data.get("chat_template")
            manifest_n_ctx = m.data.get("n_ctx")
            manifest_prompt = m.data.get("prompt_version")
            px = (m.data.get("vision") or {}).get("image_size_px")
            vision_px = int(px) if isinstance(px, (int, float)) and px > 0 else None
            name = m.name
        elif path.is_file():
            lm_path = path
            mm_path = Path(mmproj) if mmproj is not None else None
            if mm_path is not None and not mm_path.is_file():
                raise InvalidInputError(f"mmproj file not found: {mm_path}")
            name = path.stem
        else:
            raise InvalidInputError(f"no model folder or GGUF file at {path}")
        prompt = get_prompt(prompt_version or manifest_prompt or "rar-rank-v1")
        if n_threads is None:
            n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        native = _Native(
            lm_path,
            mmproj_path=mm_path,
            n_ctx=int(n_ctx or manifest_n_ctx or DEFAULT_N_CTX),
            n_batch=512,
            n_seq_max=max_candidates + 1,
            n_threads=int(n_threads),
            n_gpu_layers=int(n_gpu_layers),
        )
        try:
            if chat_template is None:
                chat_template = native.meta("tokenizer.chat_template")
            return cls(
                native,
                mode=mode,
                prompt=prompt,
                chat_template=chat_template,
                in_context_examples=in_context_examples or (),
                name=name,
                vision_image_size_px=vision_px,
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
                msgs.append({"role": "user", "content": p.user_text(ex.candidates, image_marker=marker if use_img else None)})
                msgs.append({"role": "assistant", "content": p.answer(ex.ranked)})
            msgs.append({"role": "user", "content": p.instruction + "\n" + self._head + last_user})
            n = self._live()
            eos = n.token_text(n.lc.llama_vocab_eos(n.vocab)) if n.lc.llama_vocab_eos(n.vocab) >= 0 else ""
            return render_chat(self._chat_template, msgs, bos_token="", eos_token=eos, add_generation_prompt=True)
        parts = [p.system, "\n\n"]
        for ex in self._examples:
            use_img = ex.image is not None and marker is not None
            parts += [p.plain_user, p.user_text(ex.candidates, image_marker=marker if use_img else None), "\n",
                      p.plain_assistant, p.answer(ex.ranked), p.plain_turn_end]
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
        from .preprocess import decode_rgb

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
            return [(t, n_past + i, slot, True)
                    for slot, ci in enumerate(members, start=1) for i, t in enumerate(conts[ci][:-1])]

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
