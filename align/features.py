"""Feature cache: frozen-encoder features extracted once, then reused by training and evaluation.

Layout of a cache folder::

    manifest.json              format, key (what made the features), dims, shards (each with its file's size and
                               sha256, and the stat of the source files it was made from), skip counts, complete flag
    shard-00000.safetensors    one shard per ``shard_size`` source images, written atomically (tmp + rename)

Tensors of a shard (``n`` kept images, ``m`` kept captions, ``K`` crops)::

    image         [n, K, Dv]      pooled vision features (crop 0 = the processor's plain view, 1.. = random crops)
    image_tokens  [n, K, T, Dv]   optional token grids (prefix tokens first, then patches)
    text          [m, Dt]         pooled text features (the text encoder's own pooling: mean, cls or max)
    text_image    [m]             index of each caption's image inside the shard
    text_tokens   [m, L, Dt]      optional per-token text states, ``text_mask`` [m, L]

Shard metadata (safetensors header) holds the image keys, the captions, the decode skips of that shard and
``data_sha``: a sha256 over its source samples' keys, captions and image BYTES. The *key* names everything that
determines the features: encoder ids and weight fingerprints, layer, preprocessing, pooling, dtypes, crops, and
the data source. :meth:`FeatureCache.check` refuses a cache whose key differs from what a recipe expects
(:class:`StaleCacheError`, one line naming the first difference). Extraction resumes after a kill: finished
shards are kept and skipped (the sample order is deterministic) once they pass two checks: their file still has
the size and sha256 recorded at creation (else it is encoded again; reading refuses it,
:class:`CorruptCacheError`), and their source samples still have the same keys, captions and image bytes (else
:class:`StaleCacheError`; the image bytes are hashed again only when a source file's size or mtime changed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file

from align.data import Sample, SkipLog
from tether.digest import file_sha256, json_digest
from tether.ensemble import COMBINE, is_ensemble
from tether.fileio import CorruptFileError, atomic_write, file_checksum, known_checksum, remember_checksum
from tether.fileio import verify_file as _verify_file
from tether.recipe import RecipeError, Strict, resolve_path

FORMAT = "tether-features/2"  # /2: exact-bytes fingerprints, file checksums, data_sha
MANIFEST = "manifest.json"


class StaleCacheError(RecipeError):
    """The cache on disk was made with other encoders/settings/data than the recipe asks for."""


class CorruptCacheError(CorruptFileError):
    """A cache file is not what was written: its size or sha256 differs from the manifest's record."""


# -- checksums (tether.fileio: file_checksum, verify_file; tether.digest: the digests) -------------------------

REBUILD = "re-run `align extract` to rebuild it"


def verify_file(path: str | Path, entry: dict[str, Any], what: str = "feature cache") -> None:
    """Raise :class:`CorruptCacheError` (one line) unless ``path`` has the size and sha256 that ``entry`` records."""
    _verify_file(path, entry, what, REBUILD, error=CorruptCacheError)


_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _pooled(name: str) -> bool:
    """Not a token grid (what training and evaluation on pooled features read)."""
    return not (name.endswith("tokens") or name == "text_mask")


def read_tensors(path: str | Path, entry: dict[str, Any], keep: Callable[[str], bool] | None = None,
                 what: str = "feature cache") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (those whose name ``keep`` accepts; None: all) and its metadata.

    The file is read once into memory this process owns, checked against ``entry``'s size and sha256 (when
    recorded) and parsed from those bytes. Never a memory map of the file: a file truncated or rewritten while it is
    read is a :class:`CorruptCacheError` (one line), not a SIGBUS. Peak memory: the file plus the tensors kept."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCacheError(f"{what} {path.parent}: {path.name} is missing; {REBUILD}")
    checked = "sha256" in entry

    def corrupt(detail: str) -> CorruptCacheError:
        return CorruptCacheError(f"{what} {path.parent}: {path.name} is corrupt ({detail} differ from "
                                 f"{entry.get('bytes')} / {str(entry.get('sha256'))[:12]}… recorded when it was "
                                 f"written); {REBUILD}")

    before = os.stat(path)
    if checked and before.st_size != entry.get("bytes"):
        raise corrupt(f"size {before.st_size}")
    buf = bytearray(before.st_size)
    with open(path, "rb") as f:
        got = f.readinto(buf)
        grown = bool(f.read(1))
        after = os.fstat(f.fileno())
    if got != len(buf) or grown:
        raise corrupt(f"size {after.st_size}, changed while it was read,")
    if checked:
        memo = known_checksum(path)  # hashed before at this size and mtime: the size check above is enough
        same = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
        known = bool(same and memo and memo == (after.st_size, after.st_mtime_ns, entry["sha256"]))
        sha = entry["sha256"] if known else hashlib.sha256(buf).hexdigest()
        if sha != entry["sha256"]:
            raise corrupt(f"size {got} / sha256 {sha[:12]}…")
        if same:
            remember_checksum(path, after.st_size, after.st_mtime_ns, sha)
    try:
        n = int.from_bytes(buf[:8], "little")
        if not 0 < n <= len(buf) - 8:
            raise ValueError(f"header length {n}")
        header = json.loads(bytes(buf[8:8 + n]))
        meta = header.pop("__metadata__", None) or {}
        base, out = 8 + n, {}
        for name in [x for x in header if keep is None or keep(x)]:
            h = header[name]
            dtype, shape = _ST_DTYPES[h["dtype"]], [int(x) for x in h["shape"]]
            start, stop = (int(x) for x in h["data_offsets"])
            numel = math.prod(shape)
            outside = min(shape, default=0) < 0 or start < 0 or base + stop > len(buf)
            if outside or stop - start != numel * dtype.itemsize:
                raise ValueError(f"tensor {name!r} lies outside the file")
            out[name] = (torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start).reshape(shape).clone()
                         if numel else torch.empty(shape, dtype=dtype))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCacheError(f"{what} {path.parent}: {path.name} is not a readable safetensors file ({e}); "
                                f"{REBUILD}") from None
    return out, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def image_bytes_digest(src: Any) -> str:
    """sha256 of an image source's bytes (path, bytes, tar member, HF dict, PIL image); ``-`` when it has none."""
    from PIL import Image

    from align.data import TarRef

    if isinstance(src, dict):
        src = src.get("bytes") or src.get("path") or b""
    if isinstance(src, TarRef):
        src = src.read()
    if isinstance(src, str):
        return file_sha256(src) if os.path.isfile(src) else "-"
    if isinstance(src, Image.Image):
        h = hashlib.sha256(f"{src.mode}:{src.size}".encode())
        h.update(src.tobytes())
        return h.hexdigest()
    return hashlib.sha256(bytes(src)).hexdigest() if src else "-"


def data_digest(chunk: list[Sample]) -> str:
    """sha256 over the samples' keys, captions and image bytes (what a shard was made from)."""
    return chunk_digests(chunk)[0]


def chunk_digests(chunk: list[Sample]) -> tuple[str, str]:
    """(:func:`data_digest`, ``image_sha``: the same without the captions) with each image's bytes hashed once.
    ``image_sha`` lets a cache of the same images with other captions (more languages) copy the image side."""
    h, hi = hashlib.sha256(), hashlib.sha256()
    for s in chunk:
        img = image_bytes_digest(s.image)
        h.update(json.dumps([s.key, s.captions, img]).encode())
        hi.update(json.dumps([s.key, img]).encode())
    return h.hexdigest(), hi.hexdigest()


def source_stats(chunk: list[Sample]) -> str:
    """A digest of ``{file: [size, mtime_ns]}`` over the files the samples' images live in (tar shards, image
    files): when it is unchanged, the image bytes need not be hashed again."""
    from align.data import TarRef

    out: dict[str, list[int]] = {}
    for s in chunk:
        src = s.image.get("path") if isinstance(s.image, dict) and not s.image.get("bytes") else s.image
        path = src.path if isinstance(src, TarRef) else src if isinstance(src, str) else None
        if path and path not in out:
            try:
                st = os.stat(path)
                out[path] = [st.st_size, st.st_mtime_ns]
            except OSError:
                out[path] = [-1, -1]
    return hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:32]


class FeatureConfig(Strict):
    """Recipe section ``features:``."""

    cache_dir: str = "features"  # relative to the recipe's train.output_dir parent unless absolute
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    tokens: bool = False  # also store token grids (needed by token-level heads)
    crops: int = Field(1, ge=1)  # 1 = plain view only; K > 1 adds K-1 random resized crops per image
    crop_scale: tuple[float, float] = (0.5, 1.0)
    shard_size: int = Field(1024, ge=1)
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0
    # other caches (their cache_dir, as in a recipe) to copy one side from instead of re-encoding it: a shard's
    # text side is copied when the donor's text encoder, data and captions match; its image side when the
    # donor's vision encoder, pooling and data match. E.g. DINOv2 + mpnet reuses Lite0 + mpnet's text. Image
    # views are copied as a prefix: the plain view always, the donor's crops too when crop_scale and seed match,
    # so adding crops to a cache encodes only the new views.
    reuse: list[str] = []
    # data workers: processes that decode, crop and preprocess images ahead of the encoder (0: in the main
    # process, between encoder calls). Memory: about 2 x workers x batch_size x crops images in flight.
    workers: int = Field(0, ge=0, le=256)
    # processor: the encoder's own image processor (float32 pixels); fast: tether.imageprep.FastImagePrep — a
    # draft-mode JPEG decode, the same PIL resize + crop kept uint8, normalised on the encoder's device (equal
    # to the processor's pixels within 1e-6 on images up to ~2x the target size; the cache key records it)
    preprocess: Literal["processor", "fast"] = "processor"


def _sha(obj: Any) -> str:
    return json_digest(obj)


def cache_key(vision, text, cfg: FeatureConfig, data: dict | None = None) -> dict[str, Any]:
    """Everything that determines the cached features (compared field by field by :meth:`FeatureCache.check`)."""
    if is_ensemble(vision):  # the members' own keys are in their part caches (align/ensemble.py)
        side = {"name": vision.name, "fingerprint": vision.fingerprint, "members": vision.member_keys,
                "combine": COMBINE, "preprocess": _sha([vision.preprocessing, getattr(cfg, "preprocess", "processor")])}
    else:
        proc = vision.preprocessing  # the processor's config (+ backbone specifics), without class names
        side = {"name": vision.name, "fingerprint": vision.fingerprint, "layer": vision.layer,
                "dtype": str(vision.dtype).replace("torch.", ""), "preprocess": _sha(proc)}
        if getattr(cfg, "preprocess", "processor") == "fast":  # absent for the processor path: older caches valid
            from tether.imageprep import FastImagePrep

            side["preprocess_path"] = _sha(FastImagePrep.from_processor(vision.processor).to_dict())
    text_side = {"name": text.name, "fingerprint": text.fingerprint, "max_length": text.max_length,
                 "dtype": str(text.dtype).replace("torch.", ""), "pooling": getattr(text, "pooling", "mean")}
    if is_ensemble(text):
        text_side.update(members=text.member_keys, combine=COMBINE)
    return {
        "vision": side,
        "text": text_side,
        "pooling": cfg.pooling, "tokens": cfg.tokens, "crops": cfg.crops,
        "crop_scale": list(cfg.crop_scale) if cfg.crops > 1 else None, "seed": cfg.seed if cfg.crops > 1 else None,
        "dtype": cfg.dtype, "data": data or {},
    }


def _first_diff(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    if a != b:
        return f"{path or 'key'} is {a!r} in the cache but {b!r} now"
    return None


@dataclass
class CachedFeatures:
    """All shards of a cache concatenated in memory (float32 unless asked otherwise)."""

    image: torch.Tensor  # [N, K, Dv]
    text: torch.Tensor  # [M, Dt]
    text_image: torch.Tensor  # [M] global image index
    keys: list[str]
    captions: list[str]
    image_tokens: torch.Tensor | None = None  # [N, K, T, Dv]
    text_tokens: torch.Tensor | None = None  # [M, L, Dt]
    text_mask: torch.Tensor | None = None  # [M, L]

    @property
    def num_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.text.shape[0])


class FeatureCache:
    """A finished (or in-progress) cache folder; open with :meth:`open`."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path, require_complete: bool = True) -> "FeatureCache":
        root = Path(root)
        mf = root / MANIFEST
        if not mf.is_file():
            raise RecipeError(f"{root}: no feature cache here (run `align extract --config ...` first)")
        try:
            manifest = json.loads(mf.read_text())
        except ValueError as e:
            raise RecipeError(f"{mf}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise StaleCacheError(f"{root}: cache format {manifest.get('format')!r}, expected {FORMAT!r}; re-extract")
        if require_complete and not manifest.get("complete"):
            raise RecipeError(f"{root}: feature extraction did not finish; rerun `align extract` to resume it")
        return cls(root, manifest)

    # -- identity ---------------------------------------------------------------------------------------------
    @property
    def key(self) -> dict[str, Any]:
        return self.manifest["key"]

    @property
    def dims(self) -> dict[str, int]:
        return self.manifest["dims"]

    @property
    def num_images(self) -> int:
        return sum(s["images"] for s in self.manifest["shards"])

    @property
    def num_texts(self) -> int:
        return sum(s["texts"] for s in self.manifest["shards"])

    @property
    def skips(self) -> dict[str, Any]:
        return self.manifest.get("skips", {})

    def verify(self) -> None:
        """Check every shard file against the size and sha256 recorded when it was written
        (:class:`CorruptCacheError`, one line); :meth:`iter_shards` does the same for each shard it reads."""
        for s in self.manifest["shards"]:
            verify_file(self.root / s["file"], s)

    def check(self, expected: dict[str, Any]) -> None:
        """Raise :class:`StaleCacheError` (one line) unless the cache was made exactly as ``expected`` says."""
        diff = _first_diff(self.key, expected)
        if diff:
            raise StaleCacheError(f"feature cache {self.root} is stale: {diff} "
                                  f"(re-run `align extract --overwrite` or choose another features.cache_dir)")

    # -- reading ------------------------------------------------------------------------------------------------
    def iter_shards(self, tokens: bool = False, dtype: torch.dtype | None = torch.float32
                    ) -> Iterator[dict[str, Any]]:
        """One dict per shard: the tensors (``*_tokens`` only when asked) plus ``keys`` and ``captions``;
        floating tensors made ``dtype`` (None: kept as stored)."""
        if tokens and not self.key.get("tokens"):
            raise RecipeError(f"{self.root}: cache has no token grids; extract with features.tokens=true")
        for s in self.manifest["shards"]:
            tensors, meta = read_tensors(self.root / s["file"], s, keep=None if tokens else _pooled)
            out: dict[str, Any] = {name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
                                   for name, t in tensors.items()}
            out["keys"] = json.loads(meta.get("keys", "[]"))
            out["captions"] = json.loads(meta.get("captions", "[]"))
            yield out

    def load(self, tokens: bool = False, dtype: torch.dtype | None = torch.float32) -> CachedFeatures:
        """Every shard concatenated in memory (``dtype``; None: the stored dtype, half the memory of float32)."""
        imgs, txts, tix, keys, caps, itok, ttok, tmask = [], [], [], [], [], [], [], []
        offset = 0
        for sh in self.iter_shards(tokens=tokens, dtype=dtype):
            imgs.append(sh["image"])
            txts.append(sh["text"])
            tix.append(sh["text_image"].long() + offset)
            offset += sh["image"].shape[0]
            keys += sh["keys"]
            caps += sh["captions"]
            if tokens:
                itok.append(sh["image_tokens"])
                ttok.append(sh["text_tokens"])
                tmask.append(sh["text_mask"])
        d = self.dims
        k = int(self.key.get("crops", 1))
        feats = CachedFeatures(
            image=torch.cat(imgs) if imgs else torch.zeros(0, k, d["image"]),
            text=torch.cat(txts) if txts else torch.zeros(0, d["text"]),
            text_image=torch.cat(tix) if tix else torch.zeros(0, dtype=torch.long),
            keys=keys, captions=caps)
        if tokens and itok:
            feats.image_tokens = torch.cat(itok)
            L = max(t.shape[1] for t in ttok)
            feats.text_tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in ttok])
            feats.text_mask = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for m in tmask])
        return feats


def write_cache(out: str | Path, key: dict[str, Any], dims: dict[str, int],
                shards: Iterable[tuple[dict[str, torch.Tensor], dict[str, str]]],
                extra: dict[str, Any] | None = None) -> FeatureCache:
    """A finished cache in this format from ready tensors: one ``(tensors, metadata)`` per shard (the tensors of
    the module docstring; metadata ``keys`` and ``captions`` as JSON strings). For features computed elsewhere and
    for synthetic caches (bench/bench_align_scale.py, tests). Each shard is written atomically, the manifest last
    (``extra``: more manifest fields, e.g. the skips of the cache the features came from)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (tensors, meta) in enumerate(shards):
        name = f"shard-{i:05d}.safetensors"
        tmp = out / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, out / name)
        n_img, n_txt = int(tensors["image"].shape[0]), int(tensors["text"].shape[0])
        entries.append({"file": name, "images": n_img, "texts": n_txt, "source_images": n_img,
                        **file_checksum(out / name)})
    manifest = {"format": FORMAT, "key": key, "dims": dims, "shards": entries, "complete": True, "skips": {},
                **(extra or {})}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return FeatureCache(out, manifest)


# -- extraction -------------------------------------------------------------------------------------------------

def _chunks(it: Iterable[Sample], n: int) -> Iterator[list[Sample]]:
    buf: list[Sample] = []
    for s in it:
        buf.append(s)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


_SIDE_KEYS = {"text": ("text", "tokens", "dtype", "data"),
              "image": ("vision", "pooling", "tokens", "dtype", "data")}
_SIDE_TENSORS = {"text": ("text", "text_image", "text_tokens", "text_mask"), "image": ("image", "image_tokens")}


class Donors:
    """Finished shards of other caches whose key matches ours on one side (``text`` or ``image``)."""

    def __init__(self, roots: Iterable[str | Path], key: dict[str, Any], out: Path):
        self.sides: dict[str, list[dict[str, dict]]] = {"text": [], "image": []}
        for root in roots:
            root = Path(root)
            if not (root / MANIFEST).is_file() or root.resolve() == out.resolve():
                continue
            try:
                donor = FeatureCache.open(root, require_complete=False)
            except RecipeError:
                continue
            shards = {s["file"]: {**s, "path": root / s["file"]} for s in donor.manifest["shards"]}
            for side, fields in _SIDE_KEYS.items():
                if all(_side_field(donor.key, f, side) == _side_field(key, f, side) for f in fields):
                    self.sides[side].append({"shards": shards, "views": _shared_views(donor.key, key)})
        # the image donor with the most usable views first
        self.sides["image"].sort(key=lambda d: -d["views"])

    def __bool__(self) -> bool:
        return any(self.sides.values())

    def shard(self, side: str, name: str, source_images: int, data_sha: str | None = None,
              image_sha: str | None = None, sources: str | None = None) -> dict[str, Any] | None:
        """The donor shard ``name`` (``tensors`` of that side, ``keys``, ``captions``, ``skips``), if a donor has it
        (made from the same source samples: ``data_sha``, when given and recorded, must match). The image side
        of a cache with other captions (``data.captions``) is copied when its images are ours: the shard's
        ``image_sha`` matches, or, for shards written before it was recorded, its source files' stats."""
        for donor in self.sides[side]:
            s = donor["shards"].get(name)
            if s is None or s.get("source_images") != source_images or not s["path"].is_file():
                continue
            try:
                tensors, meta = read_tensors(s["path"], s, keep=_SIDE_TENSORS[side].__contains__)
            except CorruptCacheError:
                continue  # a damaged donor shard is not copied: this shard is encoded instead
            if data_sha and meta.get("data_sha", data_sha) != data_sha and not (
                    side == "image" and _same_images(meta, s, image_sha, sources)):
                continue
            if side == "image":  # image tensors are [n, K, ...]: keep the views we share
                tensors = {n: t[:, :donor["views"]].contiguous() for n, t in tensors.items()}
            return {"tensors": tensors, "views": donor["views"], "keys": json.loads(meta.get("keys", "[]")),
                    "captions": json.loads(meta.get("captions", "[]")), "skips": json.loads(meta.get("skips", "{}"))}
        return None


def _side_field(key: dict[str, Any], field: str, side: str) -> Any:
    """A cache-key field as one side sees it: the image side ignores the data's caption files."""
    v = key.get(field)
    if side == "image" and field == "data" and isinstance(v, dict):
        v = {k: x for k, x in v.items() if k != "captions"}
    return v


def _same_images(meta: dict[str, str], entry: dict[str, Any], image_sha: str | None, sources: str | None) -> bool:
    if "image_sha" in meta:
        return image_sha is not None and meta["image_sha"] == image_sha
    return sources is not None and entry.get("sources") == sources


def _shared_views(donor: dict[str, Any], key: dict[str, Any]) -> int:
    """How many leading image views a donor cache holds that ours would encode identically: the plain view
    always; its random crops too when the crop scale and seed are ours (crop k is seeded by seed, key and k)."""
    same_crops = donor.get("crop_scale") == key.get("crop_scale") and donor.get("seed") == key.get("seed")
    theirs = int(donor.get("crops", 1)) if same_crops else 1
    return min(theirs, int(key.get("crops", 1)))


def _encode_texts(text, captions: list[str], bs: int, tokens: bool, store: torch.dtype) -> dict[str, torch.Tensor]:
    """Pooled (and optionally per-token) caption features, batched by length (less padding), in input order."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    tpool, ttok, tmask = [], [], []
    for i in range(0, len(order), bs):
        batch = [captions[j] for j in order[i:i + bs]]
        if not tokens:  # pooled only: any text encoder (PooledTextEncoder included)
            tpool.append(text.pooled(batch).to(store))
            continue
        h, m = text.tokens(batch)
        tpool.append(text.pool(h, m).to(store))
        ttok.append(h.to(store))
        tmask.append(m.to(torch.int8))
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    out = {"text": torch.cat(tpool)[inv] if tpool else torch.zeros(0, text.dim, dtype=store)}
    if tokens and ttok:
        L = max(t.shape[1] for t in ttok)
        out["text_tokens"] = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in ttok])[inv]
        out["text_mask"] = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for m in tmask])[inv]
    return out


def _shard_matches(chunk: list[Sample], meta: dict[str, str]) -> bool:
    """Whether a shard on disk was made from these samples: its kept images are among them, with these captions.
    (The cache key names the data source, not its content; this catches a source edited in place.)"""
    if "keys" not in meta or "captions" not in meta:
        return True  # written before shards recorded them
    by_key = {s.key: s for s in chunk}
    keys = json.loads(meta["keys"])
    return (all(k in by_key for k in keys)
            and json.loads(meta["captions"]) == [c for k in keys for c in by_key[k].captions])


def full_image_donor(chunk: list[Sample], image_donor: dict | None, cfg: FeatureConfig) -> bool:
    """Whether a donor shard supplies this shard's whole image side (all views, images among the chunk's)."""
    if image_donor is None or image_donor["views"] != cfg.crops:
        return False
    keys = {s.key for s in chunk}
    return all(k in keys for k in image_donor["keys"])


def piece_args(chunk: list[Sample], cfg: FeatureConfig, image_donor: dict | None) -> list[tuple]:
    """The :func:`align.prepare.prepare_piece` arguments of a shard's pieces (``batch_size`` samples each)."""
    dk, dv = (image_donor["keys"], image_donor["views"]) if image_donor is not None else (None, 0)
    bs = cfg.batch_size
    return [(chunk[i:i + bs], dk, dv) for i in range(0, len(chunk), bs)]


@torch.no_grad()
def _encode_shard(chunk: list[Sample], vision, text, cfg: FeatureConfig, skips: SkipLog, store: torch.dtype,
                  image_donor: dict | None = None, text_donor: dict | None = None,
                  pieces: Iterable | None = None, spec=None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str]]:
    """Encode one shard; a donor shard (see :class:`Donors`) supplies its side instead of the encoder when it
    holds exactly this shard's images (and captions), or the leading image views when it holds fewer views
    than ``cfg.crops``. Also returns what was copied (``image``, ``image-views``, ``text``).

    ``pieces``: the shard's prepared pieces (:class:`align.prepare.PrepPool`, in order; one item, ignored, when
    the donor holds the whole image side); None: prepared here (``spec``: :class:`align.prepare.PrepSpec`)."""
    from align.prepare import PrepSpec, prepare_piece

    spec = spec or PrepSpec.for_encoder(vision, cfg)
    out: dict[str, torch.Tensor] = {}
    copied: set[str] = set()
    if full_image_donor(chunk, image_donor, cfg):
        # the donor decoded the same images: its kept keys and decode skips are ours
        for _ in pieces or ():
            pass
        order = {s.key: s for s in chunk}
        kept = [order[k] for k in image_donor["keys"]]
        skips.merge(image_donor["skips"])
        out.update(image_donor["tensors"])
        copied.add("image")
    else:
        args = piece_args(chunk, cfg, image_donor)
        if pieces is None:
            pieces = (prepare_piece(spec, *a) for a in args)
        first = image_donor["views"] if image_donor is not None else 0
        kept, mine, mismatch = [], SkipLog(), False
        pooled, toks = [[] for _ in range(cfg.crops)], [[] for _ in range(cfg.crops)]
        for (samples, _, _), piece in zip(args, pieces):
            mismatch = mismatch or piece.first != first
            if mismatch:  # the donor's kept images differ from ours after all: drain, then encode every view
                continue
            mine.merge(piece.skips)
            kept += [samples[i] for i in piece.kept]
            if not piece.kept:
                continue
            for k in range(first, cfg.crops):
                t = vision.tokens(spec.to_device(piece.views[k - first], vision))
                pooled[k].append(vision.pool(t, cfg.pooling).to(store))
                if cfg.tokens:
                    toks[k].append(t.to(store))
        if first and (mismatch or image_donor["keys"] != [s.key for s in kept]):
            return _encode_shard(chunk, vision, text, cfg, skips, store, None, text_donor, spec=spec)
        skips.merge(mine)
        pd = vision.pooled_dim(cfg.pooling)
        cols = [image_donor["tensors"]["image"]] if first else []
        cols += [torch.cat(pooled[k]).unsqueeze(1) if pooled[k] else torch.zeros(0, 1, pd, dtype=store)
                 for k in range(first, cfg.crops)]
        out["image"] = torch.cat(cols, 1).contiguous()
        if cfg.tokens and kept:
            tcols = [image_donor["tensors"]["image_tokens"]] if first else []
            tcols += [torch.cat(toks[k]).unsqueeze(1) for k in range(first, cfg.crops)]
            out["image_tokens"] = torch.cat(tcols, 1).contiguous()
        if first:
            copied.add("image-views")
    captions = [c for s in kept for c in s.captions]
    if text_donor is not None and text_donor["captions"] == captions and text_donor["keys"] == [s.key for s in kept]:
        out.update(text_donor["tensors"])
        copied.add("text")
    else:
        out["text_image"] = torch.tensor([i for i, s in enumerate(kept) for _ in s.captions], dtype=torch.long)
        out.update(_encode_texts(text, captions, max(cfg.batch_size, 128), cfg.tokens, store))
    meta = {"keys": json.dumps([s.key for s in kept]), "captions": json.dumps(captions),
            "skips": json.dumps(skips.as_dict())}
    if any(s.langs for s in kept):  # data.captions: the language of each caption
        meta["langs"] = json.dumps([lang for s in kept for lang in (s.langs or [None] * len(s.captions))])
    return out, meta, copied


def _local_jobs(planned: Iterable, vision, text, cfg: FeatureConfig, spec, pool) -> Iterator[tuple]:
    """``(facts, encoded | None)`` per planned shard, in order, with the shards' pieces prepared by ``pool``
    (:class:`align.prepare.PrepPool`) ahead of the encoder — across shard boundaries, so the workers stay busy
    while the main process encodes."""
    shards: deque = deque()

    def tasks():  # (last piece of its shard?, prepare_piece args or None = nothing to prepare)
        for facts, (job,) in planned:
            shards.append((facts, job))
            chunk, _, _, img_d, _ = job if job is not None else (None,) * 5
            args = [] if job is None or full_image_donor(chunk, img_d, cfg) else piece_args(chunk, cfg, img_d)
            if not args:
                yield True, None
            for i, a in enumerate(args):
                yield i == len(args) - 1, a

    results = pool.map(tasks())
    for last, piece in results:
        facts, job = shards.popleft()
        if job is None:
            yield facts, None
            continue

        def shard_pieces(last=last, piece=piece):
            yield piece
            while not last:
                last, piece = next(results)
                yield piece

        chunk, cfg_, store, img_d, txt_d = job
        yield facts, _encode_shard(chunk, vision, text, cfg_, SkipLog(), store, img_d, txt_d,
                                   pieces=shard_pieces(), spec=spec)


def load_encoder_pair(vision: dict, text: dict) -> tuple:
    """``(VisionEncoder.load(**vision), TextEncoder.load(**text))``: what a Ray actor of ``align extract`` holds."""
    from tether.encoders import TextEncoder, VisionEncoder

    return VisionEncoder.load(**vision), TextEncoder.load(**text)


def encode_job(encoders: tuple, job: tuple | None):
    """One shard's ``_encode_shard`` (``job`` = its arguments after the encoders; None: the shard is on disk)."""
    if job is None:
        return None
    chunk, cfg, store, img_d, txt_d = job
    return _encode_shard(chunk, *encoders, cfg, SkipLog(), store, img_d, txt_d)


def extract_features(samples: Iterable[Sample], vision, text, out_dir: str | Path, cfg: FeatureConfig | None = None,
                     data_id: dict | None = None, skips: SkipLog | None = None, overwrite: bool = False,
                     progress: bool = True, total: int | None = None, distributor=None,
                     load_kwargs: tuple[dict, dict] | None = None) -> FeatureCache:
    """Encode ``samples`` with the frozen ``vision``/``text`` encoders into a cache at ``out_dir``.

    Resumable: shards already on disk are skipped. A folder holding a cache with a different key is refused
    (:class:`StaleCacheError`) unless ``overwrite``. ``skips`` receives the reader's skips (pass the same
    SkipLog that the reader writes to) and the decode skips; the manifest records them all.

    ``distributor`` ``kind: ray`` (:class:`tether.distribute.DistributorConfig`) with ``load_kwargs`` (the
    ``VisionEncoder.load`` / ``TextEncoder.load`` arguments of ``vision`` / ``text``): shards are encoded by Ray
    actors that load the pair once each (images are read by path there: every node must see the data), and
    written here in shard order — the same files as a local run.
    """
    from tether.progress import progress as tqdm

    cfg = cfg or FeatureConfig()
    if cfg.tokens and not getattr(text, "supports_tokens", True):
        text.tokens([])  # a pooled-only text encoder: its one-line error, before anything is encoded
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = cache_key(vision, text, cfg, data_id)
    mf = out / MANIFEST
    old_entries: dict[str, dict[str, Any]] = {}  # what the previous run recorded per shard file (checksums, stats)
    old_complete: dict[str, Any] | None = None  # the previous manifest, when it described a finished cache
    if mf.exists():
        try:
            old = FeatureCache.open(out, require_complete=False)
            old.check(key)
        except RecipeError:
            if not overwrite:
                raise
            for f in out.glob("shard-*.safetensors"):
                f.unlink()
        else:
            if overwrite:
                for f in out.glob("shard-*.safetensors"):
                    f.unlink()
            else:
                old_entries = {e["file"]: e for e in old.manifest.get("pending", []) + old.manifest["shards"]}
                if old.manifest.get("complete"):
                    old_complete = old.manifest
    dims = {"image": vision.pooled_dim(cfg.pooling), "text": text.dim,
            "image_token": vision.dim, "num_prefix_tokens": vision.num_prefix_tokens}
    manifest: dict[str, Any] = {"format": FORMAT, "key": key, "dims": dims, "shards": [], "complete": False}

    def save_manifest() -> None:
        # records of shards not checked yet stay in "pending", so a kill during a check loses no checksum
        listed = {e["file"] for e in manifest["shards"]}
        manifest["pending"] = [e for f, e in sorted(old_entries.items()) if f not in listed]
        atomic_write(mf, json.dumps(manifest, indent=1, sort_keys=True))

    # a finished cache that passes every check is left untouched (no rewrite: several runs may share it)
    dirty = old_complete is None
    if dirty:
        save_manifest()
    store = torch.float16 if cfg.dtype == "float16" else torch.float32
    reader_skips = skips if skips is not None else SkipLog()
    decode_skips = SkipLog()
    donors = Donors([resolve_path(r) / out.name for r in cfg.reuse], key, out)
    reused = {"image": 0, "text": 0}  # whole sides copied; "image-views": shards whose leading views were copied
    repaired: list[str] = []
    lang_counts: Counter = Counter()  # captions per language (data.captions)
    # a finished cache is only checked (checksums, source stats): say so, so nobody thinks it re-extracts
    desc = "check cached features" if old_complete is not None else "extract features"
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    def planned():  # ((shard, its facts), (encode job or None)) in shard order
        for idx, chunk in enumerate(_chunks(samples, cfg.shard_size)):
            name = f"shard-{idx:05d}.safetensors"
            path = out / name
            prev = old_entries.get(name, {})
            existed = path.exists()
            if existed and "sha256" in prev:
                try:
                    verify_file(path, prev)
                except CorruptCacheError as e:  # damaged since it was written: encode it again
                    bar.write(f"warning: {str(e).split('; re-run')[0]}; encoding it again", file=sys.stderr)
                    repaired.append(name)
                    path.unlink()
                    existed = False
            stats = source_stats(chunk)
            if existed:
                yield (chunk, name, path, prev, stats, None, None), (None,)
                continue
            digest, image_sha = chunk_digests(chunk)
            img_d = donors.shard("image", name, len(chunk), digest, image_sha, stats) if donors else None
            txt_d = donors.shard("text", name, len(chunk), digest) if donors else None
            yield (chunk, name, path, prev, stats, digest, image_sha), ((chunk, cfg, store, img_d, txt_d),)

    from tether.distribute import Loaded, actor_load_kwargs, remote_embedding, run_units

    pool = None
    if remote_embedding(distributor):
        if load_kwargs is None:
            raise RecipeError("distributor.kind: ray: align extract needs the encoders' load arguments")
        vk, tk = (actor_load_kwargs(distributor, kw) for kw in load_kwargs)
        jobs = run_units(distributor, Loaded, (load_encoder_pair, {"vision": vk, "text": tk}, encode_job),
                         planned(), gpus=distributor.gpus)
    else:
        from align.prepare import PrepPool, PrepSpec

        spec = PrepSpec.for_encoder(vision, cfg)
        pool = PrepPool(spec, cfg.workers)
        jobs = _local_jobs(planned(), vision, text, cfg, spec, pool)
    try:
        for (chunk, name, path, prev, stats, digest, image_sha), encoded in jobs:
            existed = encoded is None
            if not existed:
                tensors, meta, copied = encoded
                meta["data_sha"], meta["image_sha"] = digest, image_sha
                for side in copied:
                    reused[side] = reused.get(side, 0) + 1
                tmp = out / (name + ".tmp")
                save_file(tensors, str(tmp), metadata=meta)
                os.replace(tmp, path)
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                n_img = f.get_slice("image").get_shape()[0]
                n_txt = f.get_slice("text").get_shape()[0]
            if existed:
                stale = not _shard_matches(chunk, meta) or prev.get("source_images", len(chunk)) != len(chunk)
                if not stale and prev.get("sources") != stats:  # a source file changed: compare the image bytes
                    digest = data_digest(chunk)
                    stale = meta.get("data_sha") != digest
                if stale:
                    raise StaleCacheError(f"{path}: holds other images or captions than the data now (the source "
                                          f"changed since it was extracted); re-run `align extract --overwrite` or "
                                          f"choose another features.cache_dir")
            decode_skips.merge(json.loads(meta.get("skips", "{}")))
            for lang in json.loads(meta.get("langs", "[]")):
                lang_counts[str(lang)] += 1
            entry = {"file": name, "images": n_img, "texts": n_txt, "source_images": len(chunk), **file_checksum(path),
                     "sources": stats}
            manifest["shards"].append(entry)
            dirty = dirty or entry != prev
            if dirty:
                save_manifest()
            bar.update(len(chunk))
            bar.set_postfix(skipped=reader_skips.total + decode_skips.total)
    finally:
        if pool is not None:
            pool.close()
    bar.close()
    if progress and old_complete is not None and not dirty and not repaired:
        n_img = sum(e["images"] for e in manifest["shards"])
        print(f"features cached, checked: {n_img:,} images in {len(manifest['shards'])} "
              f"shard{'' if len(manifest['shards']) == 1 else 's'} at {out} "
              f"(nothing re-encoded)", file=sys.stderr)
    if old_complete is not None and len(old_complete["shards"]) > len(manifest["shards"]):
        raise StaleCacheError(f"{out}: holds {len(old_complete['shards'])} shards but the data now fills "
                              f"{len(manifest['shards'])} (the source changed since it was extracted); re-run "
                              f"`align extract --overwrite` or choose another features.cache_dir")
    all_skips = SkipLog()
    all_skips.merge(reader_skips)
    all_skips.merge(decode_skips)
    manifest["skips"] = all_skips.as_dict()
    if lang_counts:
        manifest["caption_langs"] = dict(sorted(lang_counts.items()))
    manifest["complete"] = True
    manifest.pop("pending", None)
    if repaired:
        manifest["repaired_shards"] = repaired
    if donors:
        manifest["reused_shards"] = reused
    if old_complete is not None and not dirty:
        for k in ("reused_shards", "repaired_shards"):  # what the run that made the cache did, kept
            if k in old_complete:
                manifest[k] = old_complete[k]
    if dirty or manifest != old_complete:
        atomic_write(mf, json.dumps(manifest, indent=1, sort_keys=True))
    if skips is not None:
        skips.merge(decode_skips)
    # stray shards from a longer earlier run of the same key (e.g. a larger limit) are not part of this cache
    listed = {s["file"] for s in manifest["shards"]}
    for f in out.glob("shard-*.safetensors"):
        if f.name not in listed:
            f.unlink()
    return FeatureCache(out, manifest)

