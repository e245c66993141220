"""What every room of the explorer shares: the limits of a page, a query and the search, the two request errors,
and where the explorer caches things outside the (read-only) build."""

from __future__ import annotations

import os
import re
from pathlib import Path

PAGE_SIZE = 50  # table rows per page
GRID_SIZE = 24  # thumbnails per page
MAX_PAGE = 1_000_000
MAX_QUERY_CHARS = 300
COUNT_CAP = 10_000  # search results are counted exactly up to this many (beyond: "10,000+", and an estimate)
IMAGE_HITS = 240  # text → image: this many nearest images, paged
STATUSES = ("any", "kept", "dropped")
DEAD = "EXISTS (SELECT 1 FROM decisions d WHERE d.uid = s.uid AND NOT d.kept)"
# caption words, as search sees them: runs of letters, digits and "_" (RE2 in DuckDB, re in Python: the same sets)
TOKEN_SQL = r"[\pL\pN_]+"
TOKEN_RE = re.compile(r"\w+")
MAX_TOKEN = 64  # longer runs are not indexed (and cannot be searched)
RARE_WORD = 20_000  # a search whose rarest word is in at most this many captions checks them all in one query
SUMMARY_VERSION = 1


class BadRequest(Exception):
    """A malformed query (HTTP 400)."""


class NotFound(Exception):
    """An unknown uid / concept (HTTP 404)."""


def cache_root() -> Path:
    """Where embeddings of builds are cached: ``$TETHER_CACHE/serve`` (default ``~/.cache/tether/serve``)."""
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether") / "serve"
