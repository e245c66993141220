"""Rendering helpers of the explorer's templates: highlighted captions, the head/tail curve, heat colours, URL
quoting. Pure functions of their arguments: no catalog, no model."""

from __future__ import annotations

import math
import re
from urllib.parse import quote

from markupsafe import Markup, escape


def highlight(caption: str, spans, whole: bool = True) -> Markup:
    """``caption`` HTML-escaped with every occurrence of the matched span(s) wrapped in ``<mark>`` (``whole``:
    only where the span stands as whole words, as the lexical matcher found it)."""
    forms = sorted({s.strip() for s in (spans if isinstance(spans, (list, tuple)) else [spans]) if s and s.strip()},
                   key=len, reverse=True)
    if not forms:
        return escape(caption)
    b, e = (r"(?<!\w)", r"(?!\w)") if whole else ("", "")
    pat = re.compile("|".join(b + re.escape(f) + e for f in forms), re.IGNORECASE)
    out, last = [], 0
    for m in pat.finditer(caption):
        out += [escape(caption[last:m.start()]), Markup("<mark>"), escape(m.group(0)), Markup("</mark>")]
        last = m.end()
    out.append(escape(caption[last:]))
    return Markup("").join(out)


def heat_colors(t):
    """``t`` in [0, 1] (any shape) → RGB floats on a dark-purple → red → yellow ramp (``[..., 3]``)."""
    import numpy as np

    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
    x = np.clip(t, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def head_tail_svg(matched: list[int], alive: list[int], w: int = 640, h: int = 200) -> Markup:
    """Concept rank → sample count (log y) as an inline SVG: matched (blue) and alive now (orange)."""
    if not matched:
        return Markup("")
    top = math.log10(max(max(matched), 1) + 1)
    n = len(matched)

    def pts(vals):
        step = max(1, n // 400)  # at most ~400 points whatever the number of concepts
        idx = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
        return " ".join(f"{40 + (w - 50) * (i / max(1, n - 1)):.1f},"
                        f"{h - 20 - (h - 30) * math.log10(vals[i] + 1) / top:.1f}" for i in idx)

    return Markup(
        f'<svg class="curve" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="concept head/tail curve"><line x1="40" y1="{h - 20}" x2="{w - 10}" y2="{h - 20}" stroke="#999"/>'
        f'<line x1="40" y1="10" x2="40" y2="{h - 20}" stroke="#999"/>'
        f'<text x="2" y="16" font-size="11">{max(matched):,}</text><text x="2" y="{h - 22}" font-size="11">1</text>'
        f'<text x="{w // 2 - 60}" y="{h - 4}" font-size="11">concept rank (1 … {n:,})</text>'
        f'<polyline fill="none" stroke="#3366cc" stroke-width="2" points="{pts(matched)}"/>'
        f'<polyline fill="none" stroke="#e67300" stroke-width="2" points="{pts(alive)}"/></svg>')


def quote_id(value: str) -> str:
    return quote(str(value), safe="")
