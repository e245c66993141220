"""Where tether finds offline data files that ship inside other packages.

ImageNet-1k/21k wnids, lemmas and definitions ship inside the PyPI package ``timm`` (``timm/data/_info``). tether
only READS those files, never imports timm (it needs torchvision, and an importable-but-broken timm also breaks
``accelerate launch``, which probes for it). So the recommended install keeps timm off ``sys.path``::

    pip install --no-deps --target ~/.cache/tether/timm-data timm

Search order: ``$TETHER_TIMM_DATA`` (a folder holding ``timm/``, or ``timm/data/_info`` itself), the cache folder
above, then an ordinary installed timm (found without importing it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tether.recipe import RecipeError

TIMM_TARGET = Path("~/.cache/tether/timm-data").expanduser()
TIMM_HELP = f"pip install --no-deps --target {TIMM_TARGET} timm  (its data files are read by path, never imported)"


def _candidates() -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("TETHER_TIMM_DATA")
    if env:
        p = Path(env).expanduser()
        out += [p, p / "timm" / "data" / "_info"]
    out.append(TIMM_TARGET / "timm" / "data" / "_info")
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        out += [Path(loc) / "data" / "_info" for loc in spec.submodule_search_locations]
    return out


def timm_info_dir(required: bool = True) -> Path | None:
    """The folder holding ``imagenet_synsets.txt`` & co.; RecipeError (or None) when no copy is found."""
    for c in _candidates():
        if (c / "imagenet_synsets.txt").exists():
            return c
    if required:
        raise RecipeError(f"ImageNet class lists not found: {TIMM_HELP}")
    return None
