"""Which URLs tether will fetch: the one place that decides, used at ingest and for every download/redirect.

Only ``http`` and ``https`` URLs with a host are fetchable. Everything else — ``file:``, ``data:``, ``ftp:``,
``gopher:``, scheme-less strings, URLs with control characters or absurd lengths — gets a deterministic
per-row reason instead (a crafted URL list must never make tether read the local machine's files).

:func:`address_reason` is the host rule of the download stage (``curate.fetch``): an address that is not
public (loopback, link-local such as the cloud metadata service 169.254.169.254, private, reserved, multicast,
unspecified) is refused unless ``media.download.allow_private_hosts`` is true.
"""

from __future__ import annotations

import ipaddress
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


def address_reason(ip: str) -> str | None:
    """``None`` for a public IP address, else what it is (``'loopback'``, ``'link-local'``, ``'private'``, …).

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged as the IPv4 address they carry.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return "unparseable"
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    if not addr.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "non-public"
    return None
