"""Media stages (download → image dedup → re-balance → shards). PLACEHOLDER being filled in by the media work."""

from __future__ import annotations

from curate.recipe import Strict


class MediaRecipe(Strict):
    """Recipe section ``media:``; filled in by the download/shards work."""
