"""A base for the stand-in rankers of the tests: the members of `RankerProtocol` a stub does not care about."""

from __future__ import annotations

from typing import Any


class StubRanker:
    """Subclass and define ``rank(image, candidates)``; set ``image_size_px`` to ask for a larger view."""

    image_size_px: int | None = 0
    model_s: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__}

    def close(self) -> None:
        pass
