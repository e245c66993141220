"""Per-row reason texts that are the same for the same input: the one cleaner every stage uses.

Reasons built from exception messages can carry object addresses (``<_io.BytesIO object at 0x7f…>``) or span
several lines; two identical builds must still write identical catalogs, so every such text goes through
:func:`stable_reason` before it is stored.
"""

from __future__ import annotations

import re

_ADDRESS = re.compile(r"\s+(?:object\s+)?at\s+0x[0-9a-fA-F]+")


def stable_reason(text: str | None) -> str | None:
    """``text`` with object addresses removed (``<x object at 0x…>`` → ``<x object>``) and whitespace folded
    onto one line; ``None`` stays ``None``."""
    if text is None:
        return None
    return " ".join(_ADDRESS.sub(lambda m: " object" if "object" in m.group(0) else "", text).split())
