"""Sample order and batch providers: a seeded permutation of the pairs per epoch cut into global batches
(:class:`EpochPlan`), fed from cached features (:class:`CacheBatches`) or by running the frozen encoders on
decoded, augmented images every step (:class:`EncoderBatches`)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from align.data import (BadSample, DataConfig, Sample, SkipLog, _grouped, _paths, _shard_samples, crop_rng,
                        decode_image, iter_samples, random_resized_crop)
from align.features import CachedFeatures
from align.prepare import Piece, PrepPool, PrepSpec
from align.training.stream import Abandoned, Batch, make_batch, order_seed, shard_windows, windowed_parts
from tether.progress import progress as tqdm
from tether.recipe import RecipeError


@dataclass
class EpochPlan:
    """Seeded permutation of the ``n`` pairs per epoch, cut into full global batches (the rest is dropped)."""

    n: int
    global_batch: int
    grad_accum: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        b = self.n // self.global_batch
        return b - b % self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.grad_accum

    def batches(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        nb = self.batches_per_epoch
        return perm[: nb * self.global_batch].view(nb, self.global_batch)


class CacheBatches:
    """Batches from cached features held in memory (on the training device, in the dtype they were loaded in: the
    cache's stored fp16 is made float32 per batch, which gives the same values as loading it as float32)."""

    def __init__(self, feats: CachedFeatures, tokens_image: bool, tokens_text: bool, augment: bool, seed: int,
                 device: torch.device):
        self.device = device
        self.text_image = feats.text_image.to(device)
        self.crops = int(feats.image.shape[1])
        self.image = (feats.image_tokens if tokens_image else feats.image).to(device)
        self.text = (feats.text_tokens if tokens_text else feats.text).to(device)
        self.mask = feats.text_mask.to(device) if tokens_text else None
        self.augment, self.seed = augment and self.crops > 1, seed
        self._epoch, self._crop = -1, None

    @property
    def num_pairs(self) -> int:
        return int(self.text.shape[0])

    def crop_choice(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 7_919 + 1_000_003 + epoch)
            self._crop = torch.randint(self.crops, (self.num_pairs,), generator=g).to(self.device)
            self._epoch = epoch
        return self._crop

    def epoch(self, epoch: int, plan: EpochPlan, start: int = 0, cols: slice = slice(None)
              ) -> Iterator[Batch]:
        """Global batches ``start..`` of ``plan`` for epoch ``epoch``, columns ``cols`` (this process's slice)."""
        for idx in plan.batches(epoch)[start:, cols]:
            idx = idx.to(self.device)
            img_idx = self.text_image[idx]
            crop = self.crop_choice(epoch)[idx] if self.augment else torch.zeros_like(idx)
            yield make_batch(self.image[img_idx, crop].float(), self.text[idx].float(),
                             None if self.mask is None else self.mask[idx], img_idx)


# -- the encoders path: the frozen encoders run on every batch's images -------------------------------------------

@dataclass(frozen=True)
class TrainPrep:
    """How a data worker turns a batch's images into pixels (picklable): ``spec``'s processor or fast path, after a
    random resized crop + flip per (seed, image key, epoch) when ``augment``."""

    spec: PrepSpec
    augment: bool
    crop_scale: tuple[float, float]
    seed: int


def prepare_train_piece(prep: TrainPrep, items: list[tuple[Any, str]], epoch: int) -> Piece:
    """Decode ``items`` ((image source, key) per pair), augment and preprocess them: a :class:`Piece` with one view
    (the kept pairs' pixels) and the decode skips as per-row reasons."""
    skips, images, kept = SkipLog(), [], []
    fast = prep.spec.fast
    draft = fast.draft_size(prep.crop_scale[0] if prep.augment else 1.0) if fast is not None else None
    for i, (src, key) in enumerate(items):
        try:
            im = decode_image(src, key, draft=draft)
        except BadSample as e:
            skips.add(e.reason, key)
            continue
        if prep.augment:
            im = random_resized_crop(im, crop_rng(prep.seed, key, 1_000 + epoch), scale=prep.crop_scale)
        images.append(im)
        kept.append(i)
    return Piece(kept=kept, skips=skips.as_dict(), first=0, views=[prep.spec.pixels(images)] if images else [])


class TrainUnits:
    """The encoders path's data as units read one at a time, with their pair counts from one pass over the captions
    (no image bytes): each webdataset shard, or — flickr8k, hf, or a ``data.limit`` — the whole split as one unit
    (held as today: those are the small, local sources). The pass's unusable rows go to ``skips`` once."""

    def __init__(self, cfg: DataConfig, skips: SkipLog, progress: bool = False):
        self.cfg, self.paths, self._whole = cfg, None, None
        self.group_by = cfg.group_by if cfg.format == "webdataset" else None
        if cfg.format == "webdataset" and cfg.limit is None:
            self.paths = _paths(cfg.path, None)
            if not self.paths:
                raise RecipeError(f"no webdataset shards match {cfg.path!r}")
            for path in self.paths:
                if not Path(path).is_file():
                    raise RecipeError(f"{path}: shard not found")
            self.sizes = np.zeros(len(self.paths), dtype=np.int64)
            for i, path in enumerate(tqdm(self.paths, desc="index shards", unit="shard", disable=not progress)):
                self.sizes[i] = sum(len(smp.captions) for smp, _ in _shard_samples(path, skips, self.group_by))
        else:
            self._whole = list(iter_samples(cfg, skips=skips))
            self.sizes = np.array([sum(len(smp.captions) for smp in self._whole)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, i: int) -> Iterator[tuple[Sample, str | None]]:
        """Unit ``i``'s samples with their ``group_by`` value (its skips were counted by the first pass)."""
        if self._whole is not None:
            return ((smp, None) for smp in self._whole)
        return _shard_samples(self.paths[i], SkipLog(), self.group_by)


class SampleWindow:
    """The samples of a group of units (samples with the same ``group_by`` value within the window are one image:
    its captions are positives), their pairs in this epoch's seeded order. Image ids are ``window << 40`` + the
    image's row here, so one window (all the data) numbers images exactly as the sample list did."""

    def __init__(self, units: TrainUnits, shards: list[int], order_gen: int, window: int,
                 stop: threading.Event | None = None):
        def pairs() -> Iterator[tuple[Sample, str | None]]:
            for i in shards:
                if stop is not None and stop.is_set():
                    raise Abandoned()
                yield from units.read(i)

        self.samples = list(_grouped(pairs())) if units.group_by else [smp for smp, _ in pairs()]
        counts = np.fromiter((len(smp.captions) for smp in self.samples), np.int64, len(self.samples))
        expected = int(units.sizes[shards].sum())
        if int(counts.sum()) != expected:
            raise RecipeError(f"the training data changed while training: {int(counts.sum())} pairs in "
                              f"{len(shards)} unit(s) where {expected} were counted at the start; restart the run")
        # pair j = (image pair_image[j], its caption pair_caption[j]): two int arrays, not a tuple per pair
        self.pair_image = np.repeat(np.arange(len(self.samples), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        self.pair_caption = (np.arange(expected, dtype=np.int64) - np.repeat(starts, counts)).astype(np.int32)
        self.pairs, self.base = expected, int(window) << 40
        self.order = torch.randperm(expected, generator=torch.Generator().manual_seed(order_gen)).numpy()

    def take(self, lo: int, hi: int) -> list[tuple[Any, str, str, int]]:
        """(image source, key, caption, image id) of the pairs at positions [lo, hi) of this window's order."""
        out = []
        for j in self.order[lo:hi]:
            i = int(self.pair_image[j])
            smp = self.samples[i]
            out.append((smp.image, smp.key, smp.captions[int(self.pair_caption[j])], self.base + i))
        return out


class EncoderBatches:
    """Batches made by running the frozen encoders on decoded (augmented) images and captions every step, streamed.

    The units (webdataset shards) are read a *window* at a time: data of at most ``window_pairs`` pairs is one window
    in reading order — exactly the order of the whole sample list, pair for pair — and more is a seeded shard
    permutation cut into windows of ``window_pairs``, the next one read ahead by a thread (align.training.stream).
    Batch ``b`` of epoch ``e`` is a pure function of (seed, e, b): a resumed run reads what an uninterrupted one
    would. Each process decodes only its own columns of the global batch, in ``num_workers`` processes (ordered,
    at most 2 × workers batches ahead), so 1 or N processes see the same global batches."""

    def __init__(self, units: TrainUnits, vision, text, tokens_image: bool, tokens_text: bool, pooling: str,
                 prep: TrainPrep, window_pairs: int, num_workers: int, device: torch.device):
        self.units, self.vision, self.text, self.device = units, vision, text, device
        self.tokens_image, self.tokens_text, self.pooling = tokens_image, tokens_text, pooling
        if tokens_text and not getattr(text, "supports_tokens", True):
            text.tokens([])  # a pooled-only text encoder: its one-line error before the first step
        self.prep, self.seed, self.window_pairs, self.num_workers = prep, prep.seed, int(window_pairs), num_workers
        self.sizes = units.sizes

    @property
    def num_pairs(self) -> int:
        return int(self.sizes.sum())

    def windows(self, epoch: int) -> list[list[int]]:
        if self.num_pairs <= self.window_pairs:
            return [list(range(len(self.sizes)))]
        return shard_windows(self.sizes, self.window_pairs, self.seed, epoch)

    def _load(self, epoch: int, w: int, shards: list[int], stop: threading.Event | None = None) -> SampleWindow:
        return SampleWindow(self.units, shards, order_seed(self.seed, epoch, w), w, stop)

    def epoch(self, epoch: int, plan: EpochPlan, start: int = 0, cols: slice = slice(None)
              ) -> Iterator[Batch]:
        with PrepPool(self.prep, self.num_workers, fn=prepare_train_piece) as pool, \
                contextlib.closing(windowed_parts(self, epoch, plan, start, cols)) as batches:
            def pieces() -> Iterator[tuple[list, tuple]]:
                for parts in batches:
                    flat = [x for p in parts for x in p]
                    yield flat, ([(src, key) for src, key, _, _ in flat], epoch)

            for flat, piece in pool.map(pieces()):
                if not piece.kept:
                    yield make_batch(skipped=piece.skips)
                    continue
                captions = [flat[i][2] for i in piece.kept]
                ids = torch.tensor([flat[i][3] for i in piece.kept], dtype=torch.long)
                with torch.no_grad():
                    t = self.vision.tokens(self.prep.spec.to_device(piece.views[0], self.vision))
                    img = t if self.tokens_image else self.vision.pool(t, self.pooling)
                    if self.tokens_text:
                        txt, m = self.text.tokens(captions)
                    else:
                        txt, m = self.text.pooled(captions), None
                yield make_batch(img.float(), txt.float(), m if self.tokens_text else None, ids.to(self.device),
                                 piece.skips)
