"""Class names: the one place their rules live (memory labels, dataset folders and files, ranker candidates).

A name is stored in Unicode NFC (macOS folder names come in NFD: "café" is one class whichever way its "é"
is written), is not empty, and holds no line break, because a ranker lists its candidates one a line.
"""

from __future__ import annotations

import unicodedata
from typing import Iterable

from rar_edge.errors import InvalidInputError


def normalize_label(label: str) -> str:
    """A class name in Unicode NFC."""
    return unicodedata.normalize("NFC", label)


def has_line_break(name: str) -> bool:
    """Whether a name holds any line break Python splits lines at (\\n, \\r, \\v, \\f, \\x1c-\\x1e, \\x85,
    \\u2028, \\u2029): such a name cannot be one line of a ranked list."""
    return name != "".join(name.splitlines())


def check_labels(labels: Iterable[object], *, what: str = "class label") -> list[str]:
    """The labels in NFC, once each is known to be a non-empty string without a line break.

    Raises:
        InvalidInputError: naming the first label that breaks a rule.
    """
    out = []
    for lbl in labels:
        if not isinstance(lbl, str):
            raise InvalidInputError(f"{what}s must be strings, got {type(lbl).__name__} {lbl!r}")
        name = normalize_label(str(lbl))
        if not name.strip():
            raise InvalidInputError(f"{what}s must be non-empty strings")
        if has_line_break(name):
            raise InvalidInputError(f"{what} {name!r} contains a line break")
        out.append(name)
    return out
