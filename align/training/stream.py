"""Training from a feature cache of any size in bounded memory: windows of shards, shuffled, read ahead.

A cache whose tensors fit ``train.cache_memory_mb`` is held whole (on the training device, in its stored dtype)
and fed by :class:`align.training.batches.CacheBatches` exactly as before. A larger one is fed by
:class:`StreamedCacheBatches`:

* **the epoch order** is index arithmetic, never a per-pair object: a seeded permutation of the shards, cut greedily
  into *windows* of at most half the budget; the pairs of window ``w`` in the order of a seeded permutation of that
  window; the windows one after the other; the global batches cut from that sequence (the rest dropped, as
  :class:`~align.training.batches.EpochPlan` does). Batch ``b`` of epoch ``e`` is a pure function of (seed, e, b):
  a run resumed mid-epoch reads exactly the batches an uninterrupted run would.
* **memory**: the window in use and the next one (read by a background thread while the current one trains) in
  the cache's stored dtype (fp16/bf16), plus one shard while a window is assembled; a batch is gathered there,
  pinned and copied to the device, and only there made float32.
* **shuffle quality**: pairs mix within a window, not across the whole cache; a shard's pairs always share a window.
  With one window (the cache fits) the order is the in-memory one pair for pair.

Multi-positive captions keep working: ``image_ids`` are global image indices (shard offset + row), so captions of
one image are positives even when a batch spans two windows.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, TypedDict

import numpy as np
import torch
from safetensors import safe_open

from align.features import CorruptCacheError, FeatureCache, read_tensors

class Batch(TypedDict):
    """One micro-batch, as every batch provider yields it (the in-memory cache, the streamed cache, the frozen
    encoders) and the trainer consumes it."""

    image: torch.Tensor | None  # [B, D] pooled, [B, T, D] tokens; None: every row of this batch failed to decode
    text: torch.Tensor | None  # [N, D] pooled or [N, L, D] tokens, one row per caption
    text_mask: torch.Tensor | None  # [N, L] with token text features, else None
    image_ids: torch.Tensor | None  # [N]: the image of each caption (captions of one image are all positives)
    skipped: dict  # the decode skips of this batch's rows (a SkipLog dict; {} from a cache)


def make_batch(image: torch.Tensor | None = None, text: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None, image_ids: torch.Tensor | None = None,
               skipped: dict | None = None) -> Batch:
    """A :class:`Batch` with every key present (``image`` None: nothing to train on, only skips to record)."""
    return Batch(image=image, text=text, text_mask=text_mask, image_ids=image_ids, skipped=skipped or {})


# the seeds of the in-memory path (EpochPlan / CacheBatches.crop_choice); window 0 of a one-window epoch uses them
_ORDER_SEED, _CROP_SEED, _CROP_BASE = 100_003, 7_919, 1_000_003
_WINDOW_SALT, _SHARD_SALT = 1_000_000_007, 7_777_777_777
_ELT = {"float16": 2, "bfloat16": 2, "float32": 4}


def order_seed(seed: int, epoch: int, window: int = 0) -> int:
    return (seed * _ORDER_SEED + epoch + window * _WINDOW_SALT) % (1 << 62)


def crop_seed(seed: int, epoch: int, window: int = 0) -> int:
    return (seed * _CROP_SEED + _CROP_BASE + epoch + window * _WINDOW_SALT) % (1 << 62)


@dataclass(frozen=True)
class Part:
    """Which tensors training reads from each shard: pooled or token image / text, and a slice of the pooled image
    features (``train.image_pooling`` picks the CLS or mean half of a cls+mean cache)."""

    tokens_image: bool = False
    tokens_text: bool = False
    image_dims: tuple[int, int] | None = None  # [start, stop) of the last dim of ``image``; None = all

    @property
    def image(self) -> str:
        return "image_tokens" if self.tokens_image else "image"

    @property
    def text(self) -> str:
        return "text_tokens" if self.tokens_text else "text"


def shard_bytes(cache: FeatureCache, part: Part) -> list[int]:
    """Bytes each shard's training tensors take in memory (stored dtype), from the manifest alone: pooled sides
    from the dims; token sides by the shard file's size (an upper bound)."""
    key, dims = cache.key, cache.dims
    elt = _ELT.get(key.get("dtype", "float16"), 4)
    views = int(key.get("crops", 1))
    dv = (part.image_dims[1] - part.image_dims[0]) if part.image_dims else int(dims["image"])
    out = []
    for s in cache.manifest["shards"]:
        if part.tokens_image or part.tokens_text:
            out.append(int(s.get("bytes", 0)) + 16 * s["texts"])
            continue
        out.append(s["images"] * views * dv * elt + s["texts"] * (int(dims["text"]) * elt + 16))
    return out


def cache_bytes(cache: FeatureCache, part: Part) -> int:
    return int(sum(shard_bytes(cache, part)))


def read_shard(cache: FeatureCache, entry: dict[str, Any], part: Part) -> dict[str, torch.Tensor]:
    """One shard's training tensors in their stored dtype (its file checked against the manifest as it is read)."""
    names = {part.image, part.text, "text_image"} | ({"text_mask"} if part.tokens_text else set())
    t, _ = read_tensors(cache.root / entry["file"], entry, keep=names.__contains__)
    missing = sorted(names - set(t))
    if missing:
        raise CorruptCacheError(f"feature cache {cache.root}: {entry['file']} has no {', '.join(missing)}; "
                                f"re-run `align extract --overwrite` to rebuild it")
    image = t[part.image]
    if part.image_dims is not None:
        image = image[..., part.image_dims[0]:part.image_dims[1]].contiguous()
    out = {"image": image, "text": t[part.text], "text_image": t["text_image"].long()}
    if part.tokens_text:
        out["text_mask"] = t["text_mask"]
    return out


class Abandoned(Exception):
    """A read-ahead window whose epoch was closed before it was needed."""


class Window:
    """The tensors of a group of shards, concatenated in the group's order, with this epoch's pair order and crops.
    Filled shard by shard into preallocated tensors (peak: the window plus one shard)."""

    def __init__(self, cache: FeatureCache, shards: list[int], part: Part, image_offsets: np.ndarray,
                 order_gen: int, crop_gen: int | None, views: int, text_len: int | None = None,
                 stop: threading.Event | None = None):
        entries = [cache.manifest["shards"][i] for i in shards]
        n_img = sum(e["images"] for e in entries)
        n_txt = sum(e["texts"] for e in entries)
        self.pairs = n_txt
        image = text = mask = None
        self.text_image = torch.empty(n_txt, dtype=torch.long)  # window-local image row
        self.image_ids = torch.empty(n_txt, dtype=torch.long)  # global image index (positives across windows)
        io = it = 0
        for i, e in zip(shards, entries):
            if stop is not None and stop.is_set():
                raise Abandoned()
            t = read_shard(cache, e, part)
            ni, nt = int(t["image"].shape[0]), int(t["text"].shape[0])
            if image is None:
                image = torch.empty((n_img, *t["image"].shape[1:]), dtype=t["image"].dtype)
            if text is None and part.tokens_text:
                L = max(int(text_len or 0), int(t["text"].shape[1]))
                text = torch.zeros((n_txt, L, *t["text"].shape[2:]), dtype=t["text"].dtype)
                mask = torch.zeros((n_txt, L), dtype=t["text_mask"].dtype)
            elif text is None:
                text = torch.empty((n_txt, *t["text"].shape[1:]), dtype=t["text"].dtype)
            image[io:io + ni] = t["image"]
            if mask is not None:  # token grids: each shard padded to its own longest caption, the window to the cache's
                L = int(t["text"].shape[1])
                text[it:it + nt, :L] = t["text"]
                mask[it:it + nt, :L] = t["text_mask"]
            else:
                text[it:it + nt] = t["text"]
            self.text_image[it:it + nt] = t["text_image"] + io
            self.image_ids[it:it + nt] = t["text_image"] + int(image_offsets[i])
            io, it = io + ni, it + nt
            del t
        self.image, self.text, self.mask = image, text, mask
        self.order = torch.randperm(n_txt, generator=torch.Generator().manual_seed(order_gen))
        self.crop = (torch.randint(views, (n_txt,), generator=torch.Generator().manual_seed(crop_gen))
                     if crop_gen is not None else None)

    def take(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """The pairs at positions [lo, hi) of this window's order (stored dtype, on the CPU)."""
        idx = self.order[lo:hi]
        img = self.text_image[idx]
        crop = self.crop[idx] if self.crop is not None else torch.zeros_like(idx)
        out = {"image": self.image[img, crop], "text": self.text[idx], "image_ids": self.image_ids[idx]}
        if self.mask is not None:
            out["text_mask"] = self.mask[idx]
        return out


def _max_token_len(cache: FeatureCache) -> int | None:
    """Longest text token grid over the shards (token caches pad each shard to its own longest caption)."""
    best = 0
    for s in cache.manifest["shards"]:
        with safe_open(str(cache.root / s["file"]), framework="pt") as f:
            if "text_tokens" not in f.keys():
                return None
            best = max(best, f.get_slice("text_tokens").get_shape()[1])
    return best


class StreamedCacheBatches:
    """Batches from a cache larger than ``memory_bytes``: see the module docstring."""

    def __init__(self, cache: FeatureCache, part: Part, augment: bool, seed: int, device: torch.device,
                 memory_bytes: int):
        self.cache, self.part, self.seed, self.device = cache, part, seed, device
        shards = cache.manifest["shards"]
        self.views = int(cache.key.get("crops", 1))
        self.augment = augment and self.views > 1
        self.sizes = np.array([s["texts"] for s in shards], dtype=np.int64)
        self.image_offsets = np.concatenate([[0], np.cumsum([s["images"] for s in shards])[:-1]]).astype(np.int64)
        self.bytes = np.array(shard_bytes(cache, part), dtype=np.int64)
        self.memory_bytes = int(memory_bytes)
        self.window_budget = max(1, memory_bytes // 2)  # the window in use + the one being read ahead
        # token caches pad each shard to its own longest caption: every window pads to the cache's longest
        self.token_len = _max_token_len(cache) if part.tokens_text else None

    @property
    def num_pairs(self) -> int:
        return int(self.sizes.sum())

    def windows(self, epoch: int) -> list[list[int]]:
        """This epoch's windows (:func:`shard_windows`); a cache that fits the whole budget is one window in shard
        order: the in-memory order exactly."""
        if int(self.bytes.sum()) <= self.memory_bytes:
            return [list(range(len(self.sizes)))]
        return shard_windows(self.bytes, self.window_budget, self.seed, epoch)

    def _load(self, epoch: int, w: int, shards: list[int], stop: threading.Event | None = None) -> Window:
        return Window(self.cache, shards, self.part, self.image_offsets, order_seed(self.seed, epoch, w),
                      crop_seed(self.seed, epoch, w) if self.augment else None, self.views, self.token_len, stop)

    def epoch(self, epoch: int, plan, start: int = 0, cols: slice = slice(None)) -> Iterator[Batch]:
        """Global batches ``start..`` of ``plan`` for epoch ``epoch``, columns ``cols`` (this process's slice)."""
        with contextlib.closing(windowed_parts(self, epoch, plan, start, cols)) as batches:
            for parts in batches:
                yield self._to_device(parts)

    def _to_device(self, parts: list[dict[str, torch.Tensor]]) -> Batch:
        cat = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        cuda = self.device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(self.device, non_blocking=True) if cuda else t

        return make_batch(move(cat["image"]).float(), move(cat["text"]).float(),
                          move(cat["text_mask"]) if "text_mask" in cat else None, move(cat["image_ids"]))


def shard_windows(costs: np.ndarray, budget: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded permutation of the shards cut greedily into windows of at most ``budget`` (``costs`` per shard, any
    unit); a shard costing more than the budget is a window of its own."""
    g = torch.Generator().manual_seed(order_seed(seed, epoch) + _SHARD_SALT)
    perm = torch.randperm(len(costs), generator=g).tolist()
    out: list[list[int]] = [[]]
    used = 0
    for i in perm:
        if out[-1] and used + int(costs[i]) > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += int(costs[i])
    return out


def windowed_parts(provider, epoch: int, plan, start: int = 0, cols: slice = slice(None)) -> Iterator[list]:
    """The window walk both streamed providers share. ``provider`` has ``windows(epoch)`` (lists of shards),
    ``sizes`` (pairs per shard) and ``_load(epoch, w, shards, stop)`` → a window with ``take(lo, hi)``. Yields, per
    global batch ``start..`` of ``plan``, the ``take`` parts of columns ``cols`` (a batch may span two windows).
    The next window is read by a background thread while this one is used; closing the generator stops and joins
    it (no reader outlives its epoch)."""
    wins = provider.windows(epoch)
    sizes = np.array([int(provider.sizes[s].sum()) for s in wins], dtype=np.int64)
    ends = np.cumsum(sizes)
    G = plan.global_batch
    loaded: dict[int, Any] = {}
    ahead: dict[int, tuple[threading.Thread, list]] = {}
    stop = threading.Event()  # set when the epoch is closed (max_steps, an error, a kill): read-ahead stops

    def prefetch(w: int) -> None:
        if w >= len(wins) or w in loaded or w in ahead:
            return
        box: list = []

        def read() -> None:
            try:
                box.append(provider._load(epoch, w, wins[w], stop))
            except BaseException as e:  # raised in the training thread when the window is needed
                box.append(e)

        th = threading.Thread(target=read, daemon=True)
        th.start()
        ahead[w] = (th, box)

    def get(w: int):
        if w not in loaded:
            if w in ahead:
                th, box = ahead.pop(w)
                th.join()
                if isinstance(box[0], BaseException):
                    raise box[0]
                loaded[w] = box[0]
            else:
                loaded[w] = provider._load(epoch, w, wins[w], stop)
        return loaded[w]

    c0, c1 = cols.start or 0, cols.stop if cols.stop is not None else G
    try:
        for b in range(start, plan.batches_per_epoch):
            lo, hi = b * G + c0, b * G + c1
            first = int(np.searchsorted(ends, lo, side="right"))
            last = int(np.searchsorted(ends, hi - 1, side="right"))
            for w in [w for w in loaded if w < first]:  # windows behind us are released
                del loaded[w]
            parts = []
            for w in range(first, last + 1):
                win = get(w)
                prefetch(w + 1)
                base = int(ends[w] - sizes[w])
                parts.append(win.take(max(lo, base) - base, min(hi, int(ends[w])) - base))
            yield parts
    finally:
        stop.set()
        for th, _ in ahead.values():
            th.join()
