"""Class names (and WordNet glosses) for zero-shot classification, and labelled image sets.

ImageNet wnids → names come from WordNet lemmas. Source order: timm's data files
(``timm/data/_info/imagenet_synset_to_lemma.txt`` / ``imagenet_synset_to_definition.txt``, located by
:func:`tether.resources.timm_info_dir` — timm is never imported, it needs torchvision), else the WordNet 3.0 dictionary
(``/usr/share/wordnet/data.noun`` from Debian ``wordnet-base``, or ``$WNHOME/dict``), where a wnid's offset is
the byte offset of its synset line.

Labelled image sets: an ImageFolder tree (``root/<class>/*.jpg``), a flat folder whose file names start with a
wnid (``n01440764_tench.jpg``, the ImageNet sample in ``../shared``), or a Hugging Face dataset with an image
column and a label column (``ClassLabel`` names used when present).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tether.recipe import RecipeError
from tether.resources import imagenet_wnids  # noqa: F401  (re-exported: the one ImageNet class list)
from tether.resources import timm_info_dir as _timm_dir
from tether.resources import wordnet_dict_dir

WNID = re.compile(r"^n\d{8}$")
WNID_PREFIX = re.compile(r"^(n\d{8})(?:[_\-.]|$)")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _read_tsv(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for ln in path.read_text(encoding="utf-8").splitlines():
        if "\t" in ln:
            k, v = ln.split("\t", 1)
            out[k.strip()] = v.strip()
    return out


@lru_cache(maxsize=None)
def _timm_tables() -> tuple[dict[str, str], dict[str, str]] | None:
    d = _timm_dir(required=False)
    if d is None:
        return None
    lem, dfn = d / "imagenet_synset_to_lemma.txt", d / "imagenet_synset_to_definition.txt"
    if not (lem.exists() and dfn.exists()):
        return None
    return _read_tsv(lem), _read_tsv(dfn)


def _wordnet_synset(wnid: str) -> tuple[list[str], str] | None:
    """(lemmas, gloss) of a noun synset read straight from WordNet's data.noun at byte offset = wnid number."""
    d = wordnet_dict_dir()
    if d is None or not WNID.match(wnid):
        return None
    with open(d / "data.noun", "rb") as f:
        f.seek(int(wnid[1:]))
        line = f.readline().decode("utf-8", "replace")
    if not line.startswith(wnid[1:]):
        return None
    head, _, gloss = line.partition("|")
    parts = head.split()
    n_words = int(parts[3], 16)
    lemmas = [re.sub(r"\(.*\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
    gloss = gloss.strip().split(";")[0].strip()
    return lemmas, gloss


def wnid_lemmas(wnid: str) -> list[str]:
    """WordNet lemmas of a noun synset (timm's table first, WordNet dict files second)."""
    t = _timm_tables()
    if t is not None and wnid in t[0]:
        return [s.strip() for s in t[0][wnid].split(",") if s.strip()]
    syn = _wordnet_synset(wnid)
    if syn is None:
        raise RecipeError(f"{wnid}: unknown WordNet id (install timm's data files or Debian wordnet-base)")
    return syn[0]


def wnid_gloss(wnid: str) -> str | None:
    """WordNet definition of a synset (first sense text), or None when no source knows it."""
    t = _timm_tables()
    if t is not None and wnid in t[1]:
        return t[1][wnid].split(";")[0].strip()
    syn = _wordnet_synset(wnid)
    return syn[1] if syn else None


def names_for_wnids(wnids: Sequence[str]) -> list[str]:
    """First lemma of each synset; when two classes of the list share it, each takes its first lemma that no
    other class of the list uses (kept as is when none exists — the gloss prompts then disambiguate)."""
    lemmas = [wnid_lemmas(w) for w in wnids]
    first = [ls[0] for ls in lemmas]
    counts: dict[str, int] = {}
    for n in first:
        counts[n] = counts.get(n, 0) + 1
    taken = set(first)
    out = []
    for ls, n in zip(lemmas, first):
        if counts[n] > 1:
            alt = next((x for x in ls[1:] if x not in taken), None)
            if alt is not None:
                taken.add(alt)
                n = alt
        out.append(n)
    return out


def readable(label: str) -> str:
    """Folder/label string → class name (wnids resolved through WordNet, ``_`` → space)."""
    return names_for_wnids([label])[0] if WNID.match(label) else label.replace("_", " ").strip()


@dataclass
class LabeledImages:
    """Images with integer labels into ``classnames`` (``class_ids`` are the raw labels, e.g. wnids)."""

    images: Sequence[Any]                  # file paths, or an indexable of PIL images (HF dataset column)
    labels: np.ndarray
    class_ids: list[str]
    classnames: list[str]
    glosses: list[str | None] = field(default_factory=list)
    name: str = "images"
    root: Path | None = None               # folder the image paths are relative to (their feature keys)

    def __len__(self) -> int:
        return len(self.labels)

    def keys(self) -> list[str]:
        """A stable per-image key used to match cached feature rows: the path relative to ``root``
        (``cat/0001.jpg``: file names repeat across class folders), else the file name; the row number for
        dataset rows."""
        out = []
        for i, p in enumerate(self.images):
            if not isinstance(p, (str, Path)):
                out.append(str(i))
                continue
            p = Path(p)
            try:
                out.append(p.relative_to(self.root).as_posix() if self.root is not None else p.name)
            except ValueError:
                out.append(p.name)
        return out

    def open(self, i: int):
        x = self.images[i]
        if isinstance(x, (str, Path)):
            from align.data import decode_image

            return decode_image(str(x), Path(x).name)
        return x.convert("RGB")


def _make(images: list, raw: list[str], name: str, root: Path | None = None) -> LabeledImages:
    class_ids = sorted(set(raw))
    index = {c: i for i, c in enumerate(class_ids)}
    wn = all(WNID.match(c) for c in class_ids)
    names = names_for_wnids(class_ids) if wn else [readable(c) for c in class_ids]
    glosses = [wnid_gloss(c) for c in class_ids] if wn else [None] * len(class_ids)
    return LabeledImages(images, np.asarray([index[r] for r in raw], np.int64), class_ids, names, glosses, name,
                         root)


def load_labeled_images(root: str | Path) -> LabeledImages:
    """ImageFolder tree or flat wnid-prefixed folder (see module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(f"{root}: not a folder of images")
    base = root / "images" if (root / "images").is_dir() else root
    subdirs = sorted(p for p in base.iterdir() if p.is_dir())
    images: list[Path] = []
    raw: list[str] = []
    if subdirs:
        for d in subdirs:
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    images.append(f)
                    raw.append(d.name)
    else:
        for f in sorted(base.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            m = WNID_PREFIX.match(f.name)
            if m is None:
                raise RecipeError(f"{f}: flat image folders need a wnid file-name prefix (n01440764_...); "
                                  "use root/<class>/*.jpg otherwise")
            images.append(f)
            raw.append(m.group(1))
    if not images:
        raise RecipeError(f"{base}: no images found")
    return _make(images, raw, root.name, base)


def from_hf_dataset(ds, label_column: str = "label", image_column: str = "image",
                    name: str = "hf") -> LabeledImages:
    """A Hugging Face ``datasets.Dataset`` with image and label columns (ClassLabel names when present)."""
    for col in (label_column, image_column):
        if col not in ds.column_names:
            raise RecipeError(f"dataset has no column {col!r} (columns: {', '.join(ds.column_names)})")
    feat = ds.features[label_column]
    vals = ds[label_column]
    if hasattr(feat, "names") and feat.names:
        class_ids = list(feat.names)
        labels = np.asarray(vals, np.int64)
        wn = all(WNID.match(c) for c in class_ids)
        names = names_for_wnids(class_ids) if wn else [readable(c) for c in class_ids]
        glosses = [wnid_gloss(c) for c in class_ids] if wn else [None] * len(class_ids)
        return LabeledImages(_Column(ds, image_column), labels, class_ids, names, glosses, name)
    return _make(_Column(ds, image_column), [str(v) for v in vals], name)  # type: ignore[arg-type]


class _Column:
    """Lazy view of one image column of a HF dataset (decodes one row at a time)."""

    def __init__(self, ds, col: str):
        self.ds, self.col = ds, col

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[int(i)][self.col]
