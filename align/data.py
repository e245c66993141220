"""Image–caption pairs for the aligner: Flickr8k caption files, webdataset shards and HF datasets.

Every reader yields :class:`Sample` objects (one image, its non-empty captions) in a deterministic order and
records every row it cannot use in a :class:`SkipLog` (reason → count, plus a few example keys) instead of
crashing or silently dropping it. Images are NOT decoded while reading: a sample keeps a cheap reference
(a file path, a ``(tar, offset, size)`` slice, raw bytes or a PIL image) and :func:`decode_image` turns it
into an RGB ``PIL.Image`` later (feature extraction, or the encoders-every-step training path), raising
:class:`BadSample` with the reason when it cannot.

Also here: the seeded random-resized-crop + flip used for augmentation (cached crops and per-step).
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from tether.recipe import RecipeError, Strict, resolve_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class CaptionSource(Strict):
    """One captions file of a Flickr8k image set (``data.captions`` list item): ``IMAGE.jpg#N<TAB>caption`` lines
    with the folder's image names, e.g. German captions of the same photos."""

    path: str  # relative paths are relative to the directory the command runs in, like every recipe path
    lang: str = Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")  # language tag: ISO 639-1 (en, de, zh), zh-Hant


class DataConfig(Strict):
    """Where image–caption pairs come from (recipe sections ``data:`` and ``val:``)."""

    format: Literal["flickr8k", "webdataset", "hf"] = "webdataset"
    # flickr8k: folder with images/, captions.txt and {split}_images.txt
    # webdataset: a shard path, glob or brace pattern ("shards/{00000..00009}.tar"), or a list of them
    # hf: a dataset name for datasets.load_dataset, or a folder written by Dataset.save_to_disk
    path: Union[str, list[str]]
    split: str = "train"
    limit: int | None = None  # at most this many images (first ones in reading order)
    image_column: str = "image"  # hf only
    caption_column: str = "caption"  # hf only; a str or a list-of-str column
    key_column: str | None = None  # hf only; default: row number
    data_files: Union[str, list[str], None] = None  # hf only, passed to load_dataset
    # webdataset only: a field of each sample's .json; samples with equal values are ONE image with several
    # captions (curate's shards hold one sample per caption, with the image's sha256). The image is then
    # encoded once and its other captions are positives, not false negatives. null = every sample on its own.
    group_by: str | None = "sha256"
    # flickr8k only: several caption files (e.g. English + German + Chinese) for the one image set of the split;
    # each image gets the captions of every file, in the order listed (an image captioned in no file is skipped).
    # null = the folder's captions.txt (English)
    captions: list[CaptionSource] | None = None

    @model_validator(mode="after")
    def _caption_sources(self) -> "DataConfig":
        if self.captions is None:
            return self
        if self.format != "flickr8k":
            raise ValueError(f"captions (a list of caption files) is for format: flickr8k, not {self.format}")
        if not self.captions:
            raise ValueError("captions is an empty list (give at least one {path, lang} or leave it out)")
        seen = set()
        for c in self.captions:
            if c.path in seen:
                raise ValueError(f"captions lists {c.path!r} twice")
            seen.add(c.path)
        return self


class BadSample(Exception):
    """An image or caption that cannot be used; ``reason`` is a short snake_case counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipLog:
    """Counts skipped rows by reason and keeps the first few keys of each reason for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, key: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if key and len(ex) < self.max_examples:
            ex.append(key)

    def merge(self, other: "SkipLog | dict") -> None:
        d = other.as_dict() if isinstance(other, SkipLog) else other
        for reason, n in d.get("counts", {}).items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(k for k in d.get("examples", {}).get(reason, []) if len(ex) < self.max_examples)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"


@dataclass(frozen=True)
class TarRef:
    """A member's bytes inside an uncompressed tar: random access without re-reading the archive."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


ImageSource = Union[str, bytes, TarRef, Image.Image, dict]


@dataclass
class Sample:
    key: str
    image: ImageSource
    captions: list[str]
    langs: list[str] | None = None  # language tag of each caption, when the source says (data.captions)


def decode_image(src: ImageSource, key: str = "", draft: tuple[int, int] | None = None) -> Image.Image:
    """Any :data:`ImageSource` → loaded RGB image; :class:`BadSample` (missing_image / corrupt_image) if not.
    ``draft`` (width, height): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, several times
    faster) as long as both edges stay at least this size (:meth:`tether.imageprep.FastImagePrep.draft_size`)."""
    try:
        if isinstance(src, Image.Image):
            im = src
        else:
            if isinstance(src, dict):  # HF Image feature without decoding: {"bytes": ..., "path": ...}
                src = src.get("bytes") or src.get("path") or b""
            if isinstance(src, TarRef):
                src = src.read()
            if isinstance(src, str):
                if not Path(src).is_file():
                    raise BadSample("missing_image", f"{key}: {src} not found")
                im = Image.open(src)
            else:
                if not src:
                    raise BadSample("missing_image", f"{key}: no image bytes")
                im = Image.open(io.BytesIO(src))
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
        im.load()
        return im.convert("RGB")
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        raise BadSample("corrupt_image", f"{key}: {type(e).__name__}: {e}") from None


def clean_captions(captions: Any) -> list[str]:
    """Strip captions; drop empty ones. Accepts a str, a list of str, or None."""
    if captions is None:
        return []
    if isinstance(captions, (bytes, bytearray)):
        captions = captions.decode("utf-8", errors="replace")
    if isinstance(captions, str):
        captions = [captions]
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


# -- readers -------------------------------------------------------------------------------------------------

def _paths(spec: Union[str, list[str]], base: str | Path | None) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for s in [spec] if isinstance(spec, str) else spec:
        for pat in braceexpand(str(resolve_path(s, base))):
            hits = sorted(glob.glob(pat)) if any(ch in pat for ch in "*?[") else [pat]
            out.extend(hits)
    return out


def flickr8k_captions(root: str | Path, file: str | Path | None = None) -> list[tuple[str, str, str]]:
    """(image name, caption id ``IMAGE.jpg#N``, caption) of every non-blank line of a Flickr8k ``captions.txt``
    (``IMAGE.jpg#N<TAB>caption``), in file order; the caption is "" on a line without a tab.
    ``file``: another captions file in that format (e.g. German captions of the same images)."""
    cap_file = Path(root) / "captions.txt" if file is None else Path(file)
    if not cap_file.is_file():
        raise RecipeError(f"{root}: no captions.txt here (expected a Flickr8k folder)" if file is None
                          else f"data.captions: {cap_file} not found")
    try:
        text = cap_file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RecipeError(f"{cap_file}: cannot read ({e.strerror or e})") from None
    out = []
    for line in text.splitlines():
        if line.strip():
            cid, _, cap = line.partition("\t")
            out.append((cid.split("#", 1)[0].strip(), cid.strip(), cap))
    return out


def flickr8k_split(root: str | Path, split: str) -> list[str]:
    """The image names of ``{split}_images.txt`` (train, dev, test), in file order."""
    split_file = Path(root) / f"{split}_images.txt"
    if not split_file.is_file():
        raise RecipeError(f"{root}: no {split}_images.txt (split must be train, dev, test or all)")
    return [n.strip() for n in split_file.read_text(encoding="utf-8").splitlines() if n.strip()]


def read_flickr8k(root: str | Path, split: str = "train", limit: int | None = None,
                  skips: SkipLog | None = None,
                  captions: list[tuple[str | Path, str]] | None = None) -> Iterator[Sample]:
    """Flickr8k: ``captions.txt`` lines ``IMAGE.jpg#N<TAB>caption`` and ``{split}_images.txt`` name lists.

    ``captions``: ``(file, language)`` pairs read instead of ``captions.txt``; an image gets the captions of every
    file in that order (``Sample.langs`` says which language each is) and is skipped (``no_caption``) only when no
    file captions it. Empty caption lines are counted as ``empty_caption`` (``empty_caption_de`` … with ``captions``)."""
    root = Path(root)
    skips = skips if skips is not None else SkipLog()
    sources = [(None, None)] if captions is None else list(captions)
    caps: dict[str, list[tuple[str, str | None]]] = {}
    for file, lang in sources:
        for img, _, cap in flickr8k_captions(root, file):
            caps.setdefault(img, []).append((cap, lang))
    names = sorted(caps) if split in ("all", "*") else flickr8k_split(root, split)
    n = 0
    for name in names:
        if limit is not None and n >= limit:
            break
        rows = caps.get(name, [])
        good, langs, dropped = [], [], Counter()
        for cap, lang in rows:
            c = clean_captions(cap)
            if c:
                good.append(c[0])
                langs.append(lang)
            else:
                dropped[lang] += 1
        if not good:
            skips.add("no_caption", name)
            continue
        for lang, k in dropped.items():
            skips.add("empty_caption" if lang is None else f"empty_caption_{lang}", name, k)
        yield Sample(key=Path(name).stem, image=str(root / "images" / name), captions=good,
                     langs=None if captions is None else langs)
        n += 1


def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/key.ext1.ext2`` → (``dir/key``, ``ext1.ext2``)."""
    d, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _wds_sample(key: str, parts: dict[str, TarRef], skips: SkipLog,
                group_by: str | None = None) -> tuple[Sample, str | None] | None:
    img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    captions: list[str] = []
    meta: Any = None
    if "json" in parts and (group_by or "txt" not in parts):
        try:
            meta = json.loads(parts["json"].read())
        except ValueError:
            meta = None
    if "txt" in parts:
        captions = clean_captions(parts["txt"].read().decode("utf-8", errors="replace"))
    elif isinstance(meta, dict):
        captions = clean_captions(meta.get("caption"))
    if img is None:
        skips.add("missing_image", key)
        return None
    if not captions:
        skips.add("empty_caption" if ("txt" in parts or "json" in parts) else "missing_caption", key)
        return None
    group = meta.get(group_by) if group_by and isinstance(meta, dict) else None
    return Sample(key=key, image=img, captions=captions), (str(group) if group not in (None, "") else None)


def read_webdataset(shards: Union[str, list[str]], base: str | Path | None = None, limit: int | None = None,
                    skips: SkipLog | None = None, group_by: str | None = None) -> Iterator[Sample]:
    """Uncompressed webdataset tar shards; members of one sample are consecutive and share the key.

    ``group_by`` (a .json field, e.g. ``sha256``): samples with the same value anywhere in the shards become one
    sample (the first one's key and image, every caption in reading order; ``limit`` counts these images).
    Grouping reads the .json of every sample before yielding the first (about 200 bytes of memory per sample).
    Samples without the field stay on their own.
    """
    skips = skips if skips is not None else SkipLog()
    paths = _paths(shards, base)
    if not paths:
        raise RecipeError(f"no webdataset shards match {shards!r}")
    for path in paths:
        if not Path(path).is_file():
            raise RecipeError(f"{path}: shard not found")
    pairs = (p for path in paths for p in _shard_samples(path, skips, group_by))
    samples: Iterator[Sample] = (s for s, _ in pairs) if not group_by else _grouped(pairs)
    for n, s in enumerate(samples):
        if limit is not None and n >= limit:
            return
        yield s


def _grouped(pairs: Iterator[tuple[Sample, str | None]]) -> Iterator[Sample]:
    groups: dict[str, Sample] = {}
    order: list[Sample] = []
    for s, g in pairs:
        if g is None:
            order.append(s)
        elif g in groups:
            groups[g].captions.extend(s.captions)
        else:
            groups[g] = s
            order.append(s)
    yield from order


def _shard_samples(path: str, skips: SkipLog, group_by: str | None = None) -> Iterator[tuple[Sample, str | None]]:
    """The good samples of one shard (bad ones counted in ``skips``); a broken tar ends the shard."""
    cur_key, parts = None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if key != cur_key and cur_key is not None:
                    s = _wds_sample(cur_key, parts, skips, group_by)
                    if s is not None:
                        yield s
                    parts = {}
                cur_key = key
                parts[ext] = TarRef(path, m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        skips.add("corrupt_shard", f"{Path(path).name}: {e}")
        cur_key = None  # the last, possibly truncated, sample of a broken shard is not trusted
    if cur_key is not None:
        s = _wds_sample(cur_key, parts, skips, group_by)
        if s is not None:
            yield s


def read_hf(cfg: DataConfig, base: str | Path | None = None, skips: SkipLog | None = None) -> Iterator[Sample]:
    """A Hugging Face dataset (hub name, local script/folder, or a ``save_to_disk`` folder)."""
    import datasets

    skips = skips if skips is not None else SkipLog()
    spec = cfg.path if isinstance(cfg.path, str) else cfg.path[0]
    local = resolve_path(spec, base)
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else spec, split=cfg.split,
                                       data_files=cfg.data_files)
    except Exception as e:
        raise RecipeError(f"cannot load HF dataset {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    for col in (cfg.image_column, cfg.caption_column):
        if col not in ds.column_names:
            raise RecipeError(f"HF dataset {spec!r} has no column {col!r} (columns: {', '.join(ds.column_names)})")
    if cfg.image_column in ds.features and isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # decode later, errors counted
    n = 0
    for i, row in enumerate(ds):
        if cfg.limit is not None and n >= cfg.limit:
            break
        key = str(row[cfg.key_column]) if cfg.key_column else str(i)
        captions = clean_captions(row[cfg.caption_column])
        if not captions:
            skips.add("empty_caption", key)
            continue
        img = row[cfg.image_column]
        if img is None:
            skips.add("missing_image", key)
            continue
        yield Sample(key=key, image=img, captions=captions)
        n += 1


def iter_samples(cfg: DataConfig, base: str | Path | None = None, skips: SkipLog | None = None) -> Iterator[Sample]:
    """Samples of ``cfg`` in a deterministic order; unusable rows go to ``skips``."""
    if cfg.format == "flickr8k":
        root = resolve_path(cfg.path if isinstance(cfg.path, str) else cfg.path[0], base)
        sources = None if cfg.captions is None else [(resolve_path(c.path, base), c.lang) for c in cfg.captions]
        return read_flickr8k(root, cfg.split, cfg.limit, skips, sources)
    if cfg.format == "webdataset":
        return read_webdataset(cfg.path, base, cfg.limit, skips, cfg.group_by)
    return read_hf(cfg, base, skips)


# -- augmentation ------------------------------------------------------------------------------------------------

def crop_rng(seed: int, key: str, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, sample key, crop/epoch index): reproducible across restarts."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), int(index)])


def random_resized_crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> Image.Image:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio`` (log-uniform), maybe flip.

    The crop is NOT resized here: the encoder's own image processor resizes it afterwards, so the result
    is exactly what the frozen encoder expects.
    """
    w, h = img.size
    area = w * h
    cw, ch = w, h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw_, ch_ = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw_ <= w and 0 < ch_ <= h:
            cw, ch = cw_, ch_
            break
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out
