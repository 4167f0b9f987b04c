"""What `rar_edge.Pipeline` needs of a ranker: the declared interface, met by `rar_edge.rank.ranker.Ranker`.

Any object with these members works (a structural `typing.Protocol`): a ranker over another runtime, a
remote service, or a stub in a test.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from rar_edge.types import Ranking


@runtime_checkable
class RankerProtocol(Protocol):
    """Ranks the k retrieved candidate names for an image.

    Attributes:
        image_size_px: the side of the images the ranker's vision tower takes, so the pipeline decodes
            photos at least that large for it; 0: it uses no image (the pipeline passes nothing bigger
            than the encoder's view); None: unknown (the pipeline passes the full decoded image).
        model_s: seconds spent inside the ranker's model since it was loaded (the bench's model time; a
            ranker that cannot separate its model from its own work reports the time of its whole calls).
    """

    @property
    def image_size_px(self) -> int | None: ...

    @property
    def model_s(self) -> float: ...

    def rank(self, image: np.ndarray | None, candidates: Sequence[str]) -> Ranking:
        """A permutation of ``candidates`` (best first) for ``image`` (an HxWx3 uint8 RGB array)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts a report should record (name, mode, ...)."""
        ...

    def close(self) -> None:
        """Frees what the ranker holds (idempotent)."""
        ...


def check_ranker(ranker: object) -> RankerProtocol:
    """Returns ``ranker`` if it has every member of `RankerProtocol`, else raises naming what is missing."""
    from rar_edge.errors import InvalidInputError

    missing = [m for m in ("rank", "describe", "close", "image_size_px", "model_s") if not hasattr(ranker, m)]
    if missing:
        raise InvalidInputError(
            f"ranker {type(ranker).__name__} lacks {', '.join(missing)}: a ranker needs rank(image, candidates), "
            "image_size_px, model_s, describe() and close() (rar_edge.rank.protocol.RankerProtocol), or pass a "
            "ranker model folder / GGUF path"
        )
    return ranker  # type: ignore[return-value]
