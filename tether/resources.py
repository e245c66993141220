"""Where tether finds offline data files that ship inside other packages.

ImageNet-1k/21k wnids, lemmas and definitions ship inside the PyPI package ``timm`` (``timm/data/_info``). tether
only READS those files, never imports timm (it needs torchvision, and an importable-but-broken timm also breaks
``accelerate launch``, which probes for it). So the recommended install keeps timm off ``sys.path``::

    pip install --no-deps --target ~/.cache/tether/timm-data timm

Search order: ``$TETHER_TIMM_DATA`` (a folder holding ``timm/``, or ``timm/data/_info`` itself), the cache folder
above, then an ordinary installed timm (found without importing it).

The WordNet 3.0 dictionary files (:func:`find_wordnet`): Debian's ``wordnet-base``, ``$WNSEARCHDIR``,
``$WNHOME/dict``, or an NLTK data folder (plain or ``wordnet.zip``). Both halves use these locators and no other.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
from pathlib import Path
from typing import Literal

from tether.recipe import RecipeError, expand

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


def imagenet_wnids(which: Literal["1k", "21k"] = "1k") -> list[str]:
    """The ImageNet-1k (1,000, the standard sorted label order) or ImageNet-21k (fall 2011, 21,843) wnids, in
    class-index order, from timm's data files; one-line RecipeError when they are not installed."""
    name = {"1k": "imagenet_synsets.txt", "21k": "imagenet21k_goog_synsets.txt"}[which]
    d = timm_info_dir(required=False)
    if d is None or not (d / name).exists():
        raise RecipeError(f"ImageNet-{which} class list needs timm's data files: {TIMM_HELP}")
    return [ln.strip() for ln in (d / name).read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ WordNet 3.0
WORDNET_HELP = ("install WordNet 3.0 (`apt-get install wordnet-base`, or "
                "`python -c \"import nltk; nltk.download('wordnet')\"`) or set concepts.wordnet_dir")


def _candidate_dirs() -> list[Path]:
    out: list[Path] = []
    for var in ("WNSEARCHDIR",):
        if os.environ.get(var):
            out.append(Path(os.environ[var]))
    if os.environ.get("WNHOME"):
        out.append(Path(os.environ["WNHOME"]) / "dict")
    out += [Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"), Path("/usr/local/WordNet-3.0/dict")]
    nltk_dirs = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    nltk_dirs += [str(Path.home() / "nltk_data"), os.path.join(sys.prefix, "nltk_data"),
                  os.path.join(sys.prefix, "share", "nltk_data"), os.path.join(sys.prefix, "lib", "nltk_data"),
                  "/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data",
                  "/usr/local/lib/nltk_data"]
    out += [Path(d) for d in nltk_dirs]
    return out


def _locate_in(base: Path) -> Path | None:
    """The folder (or zip) under ``base`` that holds ``data.noun``, trying the NLTK layouts too."""
    for cand in (base, base / "dict", base / "wordnet", base / "corpora" / "wordnet"):
        if (cand / "data.noun").is_file():
            return cand
    for z in (base / "corpora" / "wordnet.zip", base / "wordnet.zip", base):
        if z.is_file() and zipfile.is_zipfile(z):
            return z
    return None


def find_wordnet(path: str | os.PathLike | None = None) -> Path:
    """Where the WordNet dictionary files are; a one-line :class:`RecipeError` saying how to install if absent.

    ``path`` (when given) must hold them; otherwise the usual system and NLTK locations are searched.
    """
    if path:
        base = Path(expand(str(path)))
        hit = _locate_in(base)
        if hit is None:
            raise RecipeError(f"concepts.wordnet_dir: no WordNet dictionary (data.noun) under {base}; {WORDNET_HELP}")
        return hit
    for base in _candidate_dirs():
        hit = _locate_in(base)
        if hit is not None:
            return hit
    raise RecipeError(f"WordNet 3.0 not found (searched /usr/share/wordnet, $WNSEARCHDIR, NLTK data dirs); "
                      f"{WORDNET_HELP}")


def wordnet_dict_dir() -> Path | None:
    """The WordNet dictionary FOLDER (not a zip) when one is found, else None (for readers that seek in files)."""
    try:
        hit = find_wordnet()
    except RecipeError:
        return None
    return hit if hit.is_dir() else None
