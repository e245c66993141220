"""Which URLs tether will fetch: the one place that decides, used at ingest and for every download/redirect.

Only ``http`` and ``https`` URLs with a host are fetchable. Everything else — ``file:``, ``data:``, ``ftp:``,
``gopher:``, scheme-less strings, URLs with control characters or absurd lengths — gets a deterministic
per-row reason instead (a crafted URL list must never make tether read the local machine's files).
"""

from __future__ import annotations

from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
MAX_URL_CHARS = 8192


def url_reason(url: str) -> str | None:
    """``None`` when ``url`` may be fetched, else a short deterministic reason (no object reprs, no addresses)."""
    if len(url) > MAX_URL_CHARS:
        return f"url longer than {MAX_URL_CHARS} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "url contains control characters"
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:  # e.g. an unbalanced IPv6 bracket
        return f"url not parseable ({e})"
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = scheme if scheme and scheme.isascii() and len(scheme) <= 16 else "none"
        return f"url scheme {shown!r} not allowed (only http and https)"
    try:
        host = parts.hostname
    except ValueError as e:
        return f"url not parseable ({e})"
    if not host:
        return "url has no host"
    return None
