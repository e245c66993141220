"""The one home of tether's digests: a file's bytes streamed into a hash, a file's sha256, and the short digest of
a JSON-able value (cache keys, stage parameters). Every key that was ever written with these formulas must stay
bit-identical: caches, resume keys and fingerprints on users' disks depend on them."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

BLOCK = 1 << 20


def update_from_file(h: Any, path: str | os.PathLike, block: int = BLOCK) -> Any:
    """Feed the bytes of ``path`` into the hash object ``h`` block by block (bounded memory); returns ``h``."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    return update_from_file(hashlib.sha256(), path).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """The canonical JSON of ``obj`` that digests are taken over (sorted keys; non-JSON values as ``str``)."""
    return json.dumps(obj, sort_keys=True, default=str).encode()


def json_digest(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha1 of :func:`json_bytes` — the short key of a settings value."""
    return hashlib.sha1(json_bytes(obj)).hexdigest()[:length]


__all__ = ["update_from_file", "file_sha256", "json_bytes", "json_digest", "BLOCK"]
