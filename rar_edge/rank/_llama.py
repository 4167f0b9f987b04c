"""The raw llama.cpp / mtmd layer: owns the native model, context, batch and vision context, and frees them.

Only this module calls the ``llama_cpp`` ctypes bindings (as llama-cpp-python keeps ``_internals.py`` apart
from ``llama.py``); `rar_edge.rank.ranker.Ranker` builds prompts and rankings on top of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import signal
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from rar_edge import _native
from rar_edge._clock import ModelClock
from rar_edge.errors import MissingDependencyError, RankerError


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
_TLS = threading.local()  # .errors: a list collecting llama.cpp's error lines during a load on this thread
_T = TypeVar("_T")


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Runs the Python SIGINT handler (Ctrl-C: KeyboardInterrupt) once the native work inside has returned.

    Python runs a pending signal handler in whatever Python code runs next, and while llama.cpp works that is
    its log callback: ctypes reports the KeyboardInterrupt raised there as "ignored" and drops it, so Ctrl-C
    did nothing. Inside this block a Ctrl-C is only noted; the handler that was installed (the default one
    raises KeyboardInterrupt, an application's own is called as it is) runs when the block ends. Only the main
    thread receives signals; elsewhere, and under SIG_IGN / SIG_DFL, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    noted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if noted:
            previous(signal.SIGINT, None)


def _defers_ctrl_c(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``fn`` run inside `ctrl_c_deferred`: for the methods that call into llama.cpp, which logs through Python."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        with ctrl_c_deferred():
            return fn(*args, **kwargs)

    return wrapper


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
            collect = getattr(_TLS, "errors", None)
            if level == 4 and collect is not None and text:
                # a failing load: its reason goes into the RankerError, not onto the console
                collect.append(text.decode("utf-8", "replace").strip())
                py_level = logging.DEBUG
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


# A forked child inherits the parent's llama.cpp objects but not its worker threads: a decode there waits
# for threads that do not exist (mtmd_helper_eval_chunks hung in every such child). The child marks every
# model it inherited unusable, so that a use raises instead of hanging.
_LIVE: "weakref.WeakSet[_Native]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for native in list(_LIVE):
        native.forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Native:
    """Owns a llama.cpp model, a context with several sequences, a batch and optionally an mtmd context.

    A thin resource-owning layer over the raw ``llama_cpp`` bindings; frees everything in `close`.
    """

    @_defers_ctrl_c
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
        self.forked = False
        self.clock = ModelClock()  # time inside llama.cpp's decode, tokenizer and image-encode calls
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
        if n_gpu_layers != 0 and not lc.llama_supports_gpu_offload():
            from rar_edge.encoders import ProviderFallbackWarning

            warnings.warn(
                f"--n-gpu-layers {n_gpu_layers} asked for the GPU, but this llama-cpp-python build has no "
                'GPU support: the ranker runs on the CPU (reinstall it with CMAKE_ARGS="-DGGML_CUDA=on")',
                ProviderFallbackWarning,
                stacklevel=4,
            )
        _TLS.errors = errors = []
        try:
            self.model = lc.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
        finally:
            _TLS.errors = None
        if not self.model:
            self.model = None
            # the first error says why ("tensor ... data is not within the file bounds"); the last only that it failed
            why = re.sub(r"^\w+: (error loading model: )?", "", errors[0]) if errors else "not a GGUF it supports?"
            raise RankerError(f"llama.cpp could not load the model {model_path}: {why}")
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
        _LIVE.add(self)

    def usable(self) -> None:
        """Raises RankerError in a process forked after this model was loaded."""
        if self.forked:
            raise RankerError(
                "this ranker was loaded before the process forked: llama.cpp's threads stayed in the parent, so "
                "the forked process cannot run it; load the ranker in the child, or start worker processes "
                "with the 'spawn' or 'forkserver' method"
            )

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
        self.usable()
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

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        self.usable()
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
        self.usable()
        self.lc.llama_memory_clear(self.mem, True)
        self._slots_used.clear()

    @_defers_ctrl_c
    def decode(self, entries: Sequence[tuple[int, int, int | tuple[int, ...], bool]]) -> list[int]:
        """Decodes ``(token, pos, seq or seqs, want_logits)`` entries in as few calls as ``n_batch`` allows.

        A token given several sequences is stored once and seen by all of them (shared prompt cells).

        Returns:
            the batch positions of the entries that asked for logits, for `logits`. Logits survive only
            from the last call, so entries that want them must all fall in the last ``n_batch`` chunk.
        """
        self.usable()
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
            t0 = time.perf_counter()
            rc = self.lc.llama_decode(self.ctx, b)
            self.clock.add(time.perf_counter() - t0)
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
        vectorised exp; docs/design-notes.md#logsumexp); score mode reads one row per candidate token.
        """
        row = self._logit_row(batch_index)
        lse = _native.logsumexp(row)
        return row[np.asarray(token_ids, np.intp)].astype(np.float64) - lse

    def logits_of(self, batch_index: int, token_ids: Sequence[int]) -> np.ndarray:
        """The logits of a few tokens at a batch position, without copying the whole vocabulary row."""
        return self._logit_row(batch_index)[np.asarray(token_ids, np.int64)].astype(np.float64)

    # -- multimodal ----------------------------------------------------------------------------------

    @_defers_ctrl_c
    def eval_mtmd(
        self, text: str, images: Sequence[np.ndarray], *, n_past: int, seq: int, add_special: bool
    ) -> tuple[int, int, int]:
        """Tokenizes ``text`` (with one media marker per image) and evaluates it into ``seq`` at ``n_past``.

        Returns:
            (new n_past, tokens evaluated). The last position's logits are kept.
        """
        self.usable()
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
            t0 = time.perf_counter()
            rc = mt.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(itext), arr_t, len(bitmaps))
            self.clock.add(time.perf_counter() - t0)
            if rc == 2:
                shapes = ", ".join(f"{im.shape[0]}x{im.shape[1]}" for im in images)
                raise RankerError(
                    f"the vision preprocessor could not prepare the image ({shapes} pixels; an extreme aspect ratio?)"
                )
            if rc != 0:
                raise RankerError(f"mtmd_tokenize failed with code {rc} (markers and images disagree?)")
            n_tok = int(mt.mtmd_helper_get_n_tokens(chunks))
            if n_past + n_tok > self.n_ctx:
                raise RankerError(f"the prompt needs {n_past + n_tok} positions, n_ctx is {self.n_ctx}")
            new_n_past = self.lc.llama_pos(0)
            if seq > 0:
                self._slots_used.add(seq)
            t0 = time.perf_counter()
            rc = mt.mtmd_helper_eval_chunks(
                self.mtmd_ctx, self.ctx, chunks, n_past, seq, self.n_batch, True, ctypes.byref(new_n_past)
            )
            self.clock.add(time.perf_counter() - t0)
            if rc != 0:
                raise RankerError(f"evaluating the image and text failed (mtmd code {rc})")
            return int(new_n_past.value), n_tok
        finally:
            if chunks is not None:
                mt.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mt.mtmd_bitmap_free(bm)

    @_defers_ctrl_c
    def close(self) -> None:
        if self.forked:  # the parent owns these objects: freeing them here could wait on its threads
            self.mtmd_ctx = self._batch = self.ctx = self.model = None
            return
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
