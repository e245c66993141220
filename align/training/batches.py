"""Sample order and batch providers: a seeded permutation of the pairs per epoch cut into global batches
(:class:`EpochPlan`), fed from cached features (:class:`CacheBatches`) or by running the frozen encoders on
decoded, augmented images every step (:class:`EncoderBatches`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from align.data import BadSample, Sample, crop_rng, decode_image, random_resized_crop
from align.features import CachedFeatures


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
              ) -> Iterator[dict[str, Any]]:
        """Global batches ``start..`` of ``plan`` for epoch ``epoch``, columns ``cols`` (this process's slice)."""
        for idx in plan.batches(epoch)[start:, cols]:
            idx = idx.to(self.device)
            img_idx = self.text_image[idx]
            crop = self.crop_choice(epoch)[idx] if self.augment else torch.zeros_like(idx)
            yield {"image": self.image[img_idx, crop].float(), "text": self.text[idx].float(),
                   "text_mask": None if self.mask is None else self.mask[idx], "image_ids": img_idx,
                   "skipped": {}}


class _PairImages(torch.utils.data.Dataset):
    """``(epoch, pair)`` → (pixel tensor, caption, image index) or a skip reason; augmentation seeded per epoch."""

    def __init__(self, samples: list[Sample], processor, augment: bool, crop_scale, seed: int):
        self.samples, self.processor = samples, processor
        self.augment, self.crop_scale, self.seed = augment, tuple(crop_scale), seed
        # pair j = (image pair_image[j], its caption pair_caption[j]): two int arrays, not a tuple per pair
        counts = np.fromiter((len(s.captions) for s in samples), np.int64, len(samples))
        self.pair_image = np.repeat(np.arange(len(samples), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        self.pair_caption = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)).astype(np.int32)

    def __len__(self) -> int:
        return int(self.pair_image.shape[0])

    def __getitem__(self, item):
        epoch, j = item
        i = int(self.pair_image[j])
        s = self.samples[i]
        caption = s.captions[int(self.pair_caption[j])]
        try:
            im = decode_image(s.image, s.key)
        except BadSample as e:
            return None, e.reason, s.key
        if self.augment:
            im = random_resized_crop(im, crop_rng(self.seed, s.key, 1_000 + epoch), scale=self.crop_scale)
        px = self.processor(images=[im], return_tensors="pt")["pixel_values"][0]
        return px, caption, i


def _collate(items):
    good = [it for it in items if it[0] is not None]
    skipped: dict[str, int] = {}
    for it in items:
        if it[0] is None:
            skipped[it[1]] = skipped.get(it[1], 0) + 1
    if not good:
        return {"pixels": None, "captions": [], "image_ids": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    return {"pixels": torch.stack([g[0] for g in good]), "captions": [g[1] for g in good],
            "image_ids": torch.tensor([g[2] for g in good]), "skipped": skipped}


class EncoderBatches:
    """Batches made by running the frozen encoders on decoded (augmented) images and captions every step."""

    def __init__(self, samples: list[Sample], vision, text, tokens_image: bool, tokens_text: bool, pooling: str,
                 augment: bool, crop_scale, seed: int, num_workers: int, device: torch.device):
        self.vision, self.text, self.device = vision, text, device
        self.tokens_image, self.tokens_text, self.pooling = tokens_image, tokens_text, pooling
        if tokens_text and not getattr(text, "supports_tokens", True):
            text.tokens([])  # a pooled-only text encoder: its one-line error before the first step
        self.ds = _PairImages(samples, vision.processor, augment, crop_scale, seed)
        self.num_workers = num_workers

    @property
    def num_pairs(self) -> int:
        return len(self.ds)

    def epoch(self, epoch: int, plan: EpochPlan, start: int = 0, cols: slice = slice(None)
              ) -> Iterator[dict[str, Any]]:
        batches = [[(epoch, int(j)) for j in r] for r in plan.batches(epoch)[start:, cols]]
        loader = torch.utils.data.DataLoader(self.ds, batch_sampler=batches, collate_fn=_collate,
                                             num_workers=self.num_workers, generator=torch.Generator())
        for b in loader:
            if b["pixels"] is None:
                yield {"image": None, "skipped": b["skipped"]}
                continue
            with torch.no_grad():
                t = self.vision.tokens(b["pixels"].to(self.device))
                img = t if self.tokens_image else self.vision.pool(t, self.pooling)
                if self.tokens_text:
                    txt, m = self.text.tokens(b["captions"])
                else:
                    txt, m = self.text.pooled(b["captions"]), None
            yield {"image": img.float(), "text": txt.float(), "text_mask": m if self.tokens_text else None,
                   "image_ids": b["image_ids"].to(self.device), "skipped": b["skipped"]}
