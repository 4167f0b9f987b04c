"""A thread-safe counter of the time spent inside a model's native calls (what the bench reports as model time)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class ModelClock:
    """Seconds spent inside timed native calls, and how many there were.

    The encoder times its ONNX Runtime ``run`` calls with one, the ranker its llama.cpp decode, tokenizer
    and image-encode calls; `rar_edge.tools.bench` subtracts their totals from the wall time to get the
    SDK's own overhead.
    """

    __slots__ = ("_lock", "_seconds", "_calls")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0
        self._calls = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds += seconds
            self._calls += 1

    @contextmanager
    def timing(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(time.perf_counter() - t0)

    @property
    def seconds(self) -> float:
        return self._seconds

    @property
    def calls(self) -> int:
        return self._calls
