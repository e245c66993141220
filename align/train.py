"""Train the projectors that align a FROZEN vision encoder with a FROZEN text encoder.

Run as ``accelerate launch align/train.py --config recipes/x.yaml [--set train.lr=5e-4 ...]``,
``python align/train.py ...`` or ``align train ...`` (``--processes N``: :func:`launch`, accelerate with one-line
errors).

* Two data paths (``train.source``): ``cache`` — features extracted once by :mod:`align.features` (checked as
  ``align extract`` checks them: missing shards extracted, damaged files encoded again, stale data refused),
  optionally several cached crops per image of which each epoch picks
  one per pair; ``encoders`` — images decoded, randomly cropped/flipped and run through the frozen encoders at
  every step (the paper's way).
* accelerate ``Accelerator`` (mixed precision, DDP across processes, trackers), gradient accumulation, AdamW with
  weight decay only on matrices (no decay for norms, biases, temperature), linear warm-up + cosine decay, seeded.
* Sample order: a seeded permutation of all caption–image pairs per epoch, cut into global batches (each
  process takes its slice). Checkpoints (``accelerator.save_state`` into a temporary folder renamed into place,
  so a kill never leaves a half-written checkpoint) record epoch and batch position, the run's first and recent
  losses, and the size + sha256 of every file; a rerun verifies them, resumes from the latest one and skips the
  consumed batches, so kill + resume equals an uninterrupted run (a damaged RNG state is refused unless
  ``--ignore-rng-state``).
* Progress bar with loss, samples/s and the share of time spent waiting for data; logs through accelerate's
  ``log_with`` (tensorboard when installed, else a JSONL tracker); validation retrieval R@1/5/10
  (``align.eval.retrieval``) on the held-out ``val`` split from cached features every ``val_every`` steps / epoch; export with :class:`align.model.AlignedModel`.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a script: align/ must not shadow packages (data, ...)
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]
    _sys.path.insert(0, _os.path.dirname(_here))

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from align.config import TrainRecipe, data_id, load_train_recipe
from align.data import BadSample, Sample, SkipLog, crop_rng, decode_image, iter_samples, random_resized_crop
from align.eval.retrieval import retrieval_metrics
from align.features import (CachedFeatures, FeatureCache, FeatureConfig, cache_key, extract_features,
                            file_checksum, verify_file)
from align.loss import ContrastiveLoss
from align.model import AlignedModel, DualProjector
from tether.clikit import one_line, run_command
from tether.fileio import atomic_write
from tether.recipe import RecipeError

CKPT_PREFIX = "step-"
CHECKSUMS = "checksums.json"  # in every checkpoint: size + sha256 of each file, verified before resuming
LAST_LOSSES = 10  # metrics.json's last_loss: the mean of the run's last 10 micro-batch losses
KILL_ENV = "TETHER_KILL_AFTER_STEP"
ERROR_DIR_ENV = "TETHER_LAUNCH_ERRORS"  # set by `align train --processes`: each rank writes its error line there  # test hook: SIGKILL this process right after that optimiser step


# -- encoders and feature caches ------------------------------------------------------------------------------

def load_encoders(recipe: TrainRecipe, device: str = "cpu"):
    """The frozen vision and text encoders named by the recipe."""
    from tether.encoders import TextEncoder, VisionEncoder

    vision = VisionEncoder.load(recipe.encoder_name("vision"), device=device, dtype=recipe.vision.dtype,
                                layer=recipe.vision.layer)
    text = TextEncoder.load(recipe.encoder_name("text"), device=device, dtype=recipe.text.dtype,
                            max_length=recipe.text.max_length)
    return vision, text


def split_features_config(recipe: TrainRecipe, split: str) -> FeatureConfig:
    """Validation caches hold the plain view only (no crops)."""
    return recipe.features if split == "train" else recipe.features.model_copy(update={"crops": 1})


def split_data(recipe: TrainRecipe, split: str):
    cfg = recipe.data if split == "train" else recipe.val
    if cfg is None:
        raise RecipeError(f"recipe has no {split!r} data section")
    return cfg


def expected_key(recipe: TrainRecipe, split: str, vision, text) -> dict:
    return cache_key(vision, text, split_features_config(recipe, split), data_id(split_data(recipe, split)))


def extract_split(recipe: TrainRecipe, split: str, vision, text, overwrite: bool = False,
                  progress: bool = True) -> FeatureCache:
    """Extract (or resume extracting) the feature cache of ``split``; returns the finished cache."""
    data = split_data(recipe, split)
    skips = SkipLog()
    samples = iter_samples(data, skips=skips)
    total = data.limit
    if data.format != "hf":  # file readers yield references, not image bytes: listing them first gives the bar a total
        samples = list(samples)
        total = len(samples)
    cache = extract_features(samples, vision, text, recipe.cache_dir(split), split_features_config(recipe, split),
                             data_id=data_id(data), skips=skips, overwrite=overwrite, progress=progress,
                             total=total)
    return cache


def pooled_part(feats: CachedFeatures, part: str, dim: int) -> CachedFeatures:
    """``train.image_pooling``: the CLS half (``cls``) or mean-patch half (``mean``) of cls+mean pooled features."""
    if part == "cache":
        return feats
    feats.image = (feats.image[..., :dim] if part == "cls" else feats.image[..., dim:]).contiguous()
    return feats


def open_checked(recipe: TrainRecipe, split: str, vision, text) -> FeatureCache:
    cache = FeatureCache.open(recipe.cache_dir(split))
    cache.check(expected_key(recipe, split, vision, text))
    return cache


# -- sample order ------------------------------------------------------------------------------------------------

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


@dataclass
class TrainState:
    """Position of the run; saved in every checkpoint (accelerate ``register_for_checkpointing``)."""

    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already consumed
    step: int = 0  # optimiser steps done
    samples: int = 0  # pairs seen (global)
    device_seconds: float = 0.0  # training-loop wall time × processes, summed over every (resumed) run
    val: dict = field(default_factory=dict)
    first_loss: float | None = None  # the run's first micro-batch loss (kept across resumes)
    recent_losses: list = field(default_factory=list)  # the last LAST_LOSSES micro-batch losses

    def add_loss(self, loss: float) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        self.recent_losses = (self.recent_losses + [loss])[-LAST_LOSSES:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "samples": self.samples,
                "device_seconds": self.device_seconds, "val": self.val, "first_loss": self.first_loss,
                "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch, self.step = int(d["epoch"]), int(d["batch"]), int(d["step"])
        self.samples, self.val = int(d["samples"]), dict(d.get("val", {}))
        self.device_seconds = float(d.get("device_seconds", 0.0))
        self.first_loss = None if d.get("first_loss") is None else float(d["first_loss"])
        self.recent_losses = [float(x) for x in d.get("recent_losses", [])]


# -- batch providers ------------------------------------------------------------------------------------------------

class CacheBatches:
    """Batches from cached features held in memory (on the training device)."""

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

    def epoch(self, epoch: int, rows: torch.Tensor) -> Iterator[dict[str, Any]]:
        for idx in rows:
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
        self.pairs = [(i, c) for i, s in enumerate(samples) for c in s.captions]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item):
        epoch, j = item
        i, caption = self.pairs[j]
        s = self.samples[i]
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

    def epoch(self, epoch: int, rows: torch.Tensor) -> Iterator[dict[str, Any]]:
        batches = [[(epoch, int(j)) for j in r] for r in rows]
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


# -- model, optimiser, schedule ------------------------------------------------------------------------------------

class AlignTask(nn.Module):
    """Projectors + contrastive loss: what the optimiser trains (the loss holds the learnable temperature)."""

    def __init__(self, heads: DualProjector, loss: ContrastiveLoss):
        super().__init__()
        self.heads, self.loss = heads, loss

    def forward(self, image, text, text_mask=None, image_ids=None):
        img, txt = self.heads(image, text, text_mask)
        return self.loss(img, txt, image_ids)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases and the temperature/bias scalars are excluded."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total: int, warmup: int, min_ratio: float = 0.0):
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


# -- validation --------------------------------------------------------------------------------------------------

@torch.no_grad()
def validate(heads: DualProjector, feats: CachedFeatures, device: torch.device, batch: int = 1024) -> dict[str, float]:
    """Retrieval R@1/5/10 (%, ``align.eval.retrieval``) of the current heads on cached validation features."""
    was = heads.training
    heads.eval()
    img_x = feats.image_tokens[:, 0] if heads.image_tokens else feats.image[:, 0]
    txt_x = feats.text_tokens if heads.text_tokens else feats.text
    imgs = [heads.image(img_x[i:i + batch].float().to(device)) for i in range(0, len(img_x), batch)]
    txts = [heads.text(txt_x[i:i + batch].float().to(device),
                       feats.text_mask[i:i + batch].to(device) if heads.text_tokens else None)
            for i in range(0, len(txt_x), batch)]
    heads.train(was)
    img = torch.nn.functional.normalize(torch.cat(imgs).float(), dim=-1).cpu().numpy()
    txt = torch.nn.functional.normalize(torch.cat(txts).float(), dim=-1).cpu().numpy()
    res = retrieval_metrics(img, txt, feats.text_image.numpy(), ks=(1, 5, 10))
    res["chance_R@1"] = 100.0 / max(1, feats.num_images)
    return res


# -- checkpoints --------------------------------------------------------------------------------------------------

def verify_checkpoint(ckpt: Path, process_index: int, ignore_rng_state: bool = False) -> None:
    """Refuse (one line) a checkpoint whose files differ from the sizes and sha256 recorded when it was saved, or
    that lacks a readable RNG state for this process — accelerate would skip such an RNG state silently and the
    resumed run would diverge. ``ignore_rng_state`` resumes without a damaged or missing RNG state instead."""
    from accelerate.utils import load as accelerate_load

    hint = ("resume from another checkpoint (--resume PATH), start over (--resume never), "
            "or resume without it (--ignore-rng-state)")
    rng = f"random_states_{process_index}.pkl"
    sums_path = ckpt / CHECKSUMS
    if sums_path.is_file():
        try:
            files = json.loads(sums_path.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise RecipeError(f"checkpoint {ckpt}: unreadable {CHECKSUMS} ({e})") from None
        for name, entry in sorted(files.items()):
            try:
                verify_file(ckpt / name, entry, what="checkpoint")
            except RecipeError as e:
                if name.startswith("random_states_") and ignore_rng_state:
                    print(f"warning: {str(e).split(';')[0]}; resuming without it (--ignore-rng-state)",
                          file=sys.stderr)
                    continue
                if name.startswith("random_states_"):
                    raise RecipeError(f"{str(e).split(';')[0]}: the resumed run would not continue the same random "
                                      f"stream; {hint}") from None
                raise RecipeError(f"{str(e).split(';')[0]}; resume from another checkpoint (--resume PATH) or "
                                  f"start over (--resume never)") from None
    if ignore_rng_state:
        return
    path = ckpt / rng
    if not path.is_file():
        raise RecipeError(f"checkpoint {ckpt} has no RNG state for process {process_index} ({rng}; was it saved by "
                          f"fewer processes?); {hint}")
    try:
        accelerate_load(str(path))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise RecipeError(f"checkpoint {ckpt}: {rng} cannot be read ({type(e).__name__}); {hint}") from None


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
    return done[-1] if done else None


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """``save_state`` into ``checkpoints/.tmp-step-N`` then rename to ``step-N``; keep the newest ``keep``."""
    root = output_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # every rank writes its RNG state here, so it must exist before the barrier
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # size + sha256 of every file (model, optimiser, schedule, run position, each rank's RNG state)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {str(p.relative_to(tmp)): file_checksum(p) for p in files}
        atomic_write(tmp / CHECKSUMS, json.dumps({"processes": accelerator.num_processes, "files": sums},
                                                 indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# -- trackers ---------------------------------------------------------------------------------------------------------

def _jsonl_tracker_class():
    from accelerate.tracking import GeneralTracker

    class JSONLTracker(GeneralTracker):
        """One JSON object per ``log`` call in ``<logging_dir>/<run>/log.jsonl`` (used when tensorboard is absent)."""

        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self, run_name: str, logging_dir: str, **kwargs):
            super().__init__()
            self.path = Path(logging_dir) / run_name / "log.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = None

        @property
        def tracker(self):
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")
            return self._f

        def store_init_configuration(self, values: dict):
            self.log({"config": values}, step=0)

        def log(self, values: dict, step: int | None = None, **kwargs):
            self.tracker.write(json.dumps({"step": step, "time": time.time(), **values}, default=str) + "\n")
            self.tracker.flush()

        def finish(self):
            if self._f is not None:
                self._f.close()
                self._f = None

    return JSONLTracker


def make_trackers(kind: str, logging_dir: Path):
    if kind == "none":
        return None
    if kind in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
            return "tensorboard"
        except ImportError:
            if kind == "tensorboard":
                raise RecipeError("train.log_with=tensorboard but tensorboard is not installed "
                                  "(pip install tensorboard, or use jsonl)") from None
    return _jsonl_tracker_class()(run_name="align", logging_dir=str(logging_dir))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


# -- the program -------------------------------------------------------------------------------------------------------

def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def train(recipe: TrainRecipe, resume: str = "auto", ignore_rng_state: bool = False) -> dict[str, Any]:
    """Run training as the recipe says; returns the summary also written to ``<output_dir>/metrics.json``.
    ``ignore_rng_state``: resume from a checkpoint whose RNG state is damaged or missing (else refused)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    tc = recipe.train
    out_dir = recipe.output_dir
    accelerator = Accelerator(mixed_precision=tc.mixed_precision,
                              log_with=make_trackers(tc.log_with, out_dir / "logs"),
                              project_config=ProjectConfiguration(project_dir=str(out_dir),
                                                                  logging_dir=str(out_dir / "logs")))
    device = accelerator.device
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise RecipeError(f"launched {launched} processes but accelerate sees {accelerator.num_processes}; on CPU "
                          "use `accelerate launch --cpu ...` or set ACCELERATE_USE_CPU=true")
    set_seed(tc.seed)
    vision, text = load_encoders(recipe, device=str(device))
    tok_img = recipe.projector.image.kind == "token"
    tok_txt = recipe.projector.text.kind == "token"
    skips = SkipLog()

    # data
    splits = ["train"] if tc.source == "cache" else []
    if recipe.val is not None:
        splits.append("val")
    # the main process runs exactly what `align extract` runs: missing shards are extracted, every shard on disk is
    # checked against its recorded checksum (a damaged one is encoded again) and against the data as it is now
    # (keys, captions, image bytes); a stale cache is refused, never rebuilt silently
    for split in splits:
        if accelerator.is_main_process:
            extract_split(recipe, split, vision, text, progress=tc.progress)
        accelerator.wait_for_everyone()
    val_feats = None
    if recipe.val is not None:
        val_feats = pooled_part(open_checked(recipe, "val", vision, text).load(tokens=tok_img or tok_txt),
                                tc.image_pooling, vision.dim)
    if tc.source == "cache":
        cache = open_checked(recipe, "train", vision, text)
        skips.merge(cache.skips)
        feats = pooled_part(cache.load(tokens=tok_img or tok_txt), tc.image_pooling, vision.dim)
        provider: CacheBatches | EncoderBatches = CacheBatches(feats, tok_img, tok_txt, tc.augment, tc.seed, device)
        dims = {"image": vision.dim if tok_img else int(feats.image.shape[-1]), "text": cache.dims["text"]}
    else:
        samples = list(iter_samples(recipe.data, skips=skips))
        provider = EncoderBatches(samples, vision, text, tok_img, tok_txt, recipe.features.pooling, tc.augment,
                                  tc.crop_scale, tc.seed, tc.num_workers, device)
        dims = {"image": vision.dim if tok_img else vision.pooled_dim(recipe.features.pooling), "text": text.dim}

    world = accelerator.num_processes
    plan = EpochPlan(provider.num_pairs, tc.batch_size * world, tc.grad_accum, tc.seed)
    if plan.steps_per_epoch < 1:
        raise RecipeError(f"{provider.num_pairs} pairs are fewer than one step of train.batch_size={tc.batch_size} "
                          f"x {world} processes x grad_accum={tc.grad_accum}")
    total_steps = plan.steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(round(tc.warmup_ratio * total_steps))

    # model
    heads = DualProjector(recipe.projector.image, recipe.projector.text, dims["image"], dims["text"],
                          vision.num_prefix_tokens)
    task = AlignTask(heads, ContrastiveLoss.from_config(recipe.loss))
    optimizer = torch.optim.AdamW(param_groups(task, tc.weight_decay), lr=tc.lr, betas=tc.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup, tc.min_lr_ratio))
    task, optimizer = accelerator.prepare(task, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)

    ckpt = None
    if resume == "auto":
        ckpt = latest_checkpoint(out_dir)
    elif resume not in ("never", "none"):
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise RecipeError(f"--resume {resume}: no checkpoint folder there")
    if ckpt is not None:
        verify_checkpoint(ckpt, accelerator.process_index, ignore_rng_state)
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} (epoch {state.epoch}, batch {state.batch}, step {state.step})")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    if tc.log_with != "none":
        accelerator.init_trackers("align", config=_flat(json.loads(recipe.model_dump_json())))

    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    micro_total = total_steps * tc.grad_accum
    bar = tqdm(total=micro_total, initial=state.step * tc.grad_accum, desc="train", unit="batch",
               disable=not (tc.progress and accelerator.is_local_main_process), dynamic_ncols=True)
    t_start, data_wait, seen_here = time.perf_counter(), 0.0, 0
    t_last = t_start
    last_logs: dict[str, float] = {}
    done = state.step >= total_steps
    unwrapped = accelerator.unwrap_model(task)
    while not done and state.epoch < tc.epochs:
        rows = plan.batches(state.epoch)
        rank = accelerator.process_index
        local = rows[state.batch:, rank * tc.batch_size:(rank + 1) * tc.batch_size]
        it = provider.epoch(state.epoch, local)
        task.train()
        while True:
            t0 = time.perf_counter()
            b = next(it, None)
            data_wait += time.perf_counter() - t0
            if b is None:
                break
            for reason, n in b.get("skipped", {}).items():
                skips.add(reason, n=n)
            sync = (state.batch + 1) % tc.grad_accum == 0
            if b["image"] is not None:
                ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(task)
                with ctx:
                    with accelerator.autocast():
                        loss, logs = task(b["image"], b["text"], b["text_mask"], b["image_ids"])
                    accelerator.backward(loss / tc.grad_accum)
                last_logs = logs
                state.add_loss(float(logs["loss"]))
                seen_here += int(logs.get("batch", b["image"].shape[0]))
            state.batch += 1
            bar.update(1)
            if not sync:
                continue
            if tc.max_grad_norm:
                accelerator.clip_grad_norm_(task.parameters(), tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.samples += tc.batch_size * world * tc.grad_accum
            now = time.perf_counter()
            state.device_seconds += (now - t_last) * world
            t_last = now
            elapsed = now - t_start
            if state.step % tc.log_every == 0 or state.step == total_steps:
                rate = seen_here / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{last_logs.get('loss', float('nan')):.3f}", sps=f"{rate:.0f}",
                                wait=f"{100 * data_wait / max(elapsed, 1e-9):.0f}%")
                accelerator.log({**{f"train/{k}": v for k, v in last_logs.items()}, "train/lr": scheduler.get_last_lr()[0],
                                 "train/samples_per_s": rate, "train/data_wait_frac": data_wait / max(elapsed, 1e-9),
                                 "train/epoch": state.epoch}, step=state.step)
            if val_feats is not None and tc.val_every and state.step % tc.val_every == 0:
                state.val = validate(unwrapped.heads, val_feats, device)
                accelerator.log({f"val/{k}": v for k, v in state.val.items()}, step=state.step)
            end_of_epoch = state.batch >= plan.batches_per_epoch
            done = state.step >= total_steps
            if end_of_epoch:
                if val_feats is not None and not tc.val_every:
                    state.val = validate(unwrapped.heads, val_feats, device)
                    accelerator.log({f"val/{k}": v for k, v in state.val.items()}, step=state.step)
                state.epoch, state.batch = state.epoch + 1, 0
            if state.step % tc.checkpoint_every == 0 or end_of_epoch or done:
                save_checkpoint(accelerator, out_dir, state.step, tc.keep_checkpoints)
            if kill_at and state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if done or end_of_epoch:
                break
    bar.close()

    if val_feats is not None and not state.val:
        state.val = validate(unwrapped.heads, val_feats, device)
    summary = {
        "steps": state.step, "epochs_done": state.epoch, "samples": state.samples,
        # over the whole run, across resumes (the checkpoint carries them)
        "first_loss": _round(state.first_loss, 4),
        "last_loss": _round(float(np.mean(state.recent_losses)), 4) if state.recent_losses else None,
        "samples_per_s": _round(seen_here / max(time.perf_counter() - t_start, 1e-9), 1),
        "data_wait_frac": _round(data_wait / max(time.perf_counter() - t_start, 1e-9), 4),
        "temperature": _round(float(unwrapped.loss.temperature.item()), 5),
        "val": {k: _round(v, 2) for k, v in state.val.items()}, "skips": skips.as_dict(),
        "num_pairs": provider.num_pairs, "processes": world,
        # the paper's data / compute claims made checkable: pairs seen and accelerator-hours, over all resumes
        "pairs_seen": state.samples, "device": device.type,
        "device_hours": _round(state.device_seconds / 3600.0, 6),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = AlignedModel.from_parts(unwrapped.heads, vision, text, recipe.projector.image, recipe.projector.text,
                                        pooling=recipe.image_pooling, temperature=summary["temperature"])
        model.save_pretrained(out_dir / "model")
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        loss = ("no loss recorded" if summary["first_loss"] is None else
                f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
        val = ", ".join(f"{k} {round(v, 1):g}" for k, v in summary["val"].items()) or "none"
        accelerator.print(f"done: {state.step} steps, {state.samples:,} pairs seen, "
                          f"{summary['device_hours']:.4f} {device.type}-process-hours, {loss}, "
                          f"val {val}, skipped {skips}; model in {out_dir / 'model'}")
    accelerator.end_training()
    return summary


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="align train", description="Train projectors between frozen encoders.")
    p.add_argument("--config", required=True, help="training recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=5e-4 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto (latest checkpoint in output_dir, default), never, or a checkpoint folder")
    p.add_argument("--ignore-rng-state", action="store_true",
                   help="resume even if the checkpoint's RNG state is damaged or missing (the run then diverges "
                        "from an uninterrupted one); without it such a checkpoint is refused")
    return p


def run(args: argparse.Namespace) -> int:
    recipe = load_train_recipe(args.config, args.set)
    train(recipe, resume=args.resume, ignore_rng_state=args.ignore_rng_state)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err_dir = os.environ.get(ERROR_DIR_ENV)
    if not err_dir:
        return run_command(run, args)
    # started by `align train --processes N`: the launcher prints the first rank's error, once
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - reported by the launcher in one line
        if os.environ.get("TETHER_DEBUG"):
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        atomic_write(Path(err_dir) / f"rank-{rank:05d}.txt", one_line(e))
        return 2


def launch(args: argparse.Namespace, processes: int) -> int:
    """``align train --processes N``: ``accelerate launch`` of this script with every launch value passed (no
    accelerate warnings, no accelerate config needed) and one-line errors: a failing run prints the lowest failed
    rank's ``error: ...`` once, not accelerate's or torch.distributed's tracebacks. On a machine without CUDA the
    processes run on the CPU (gloo)."""
    import logging
    import subprocess
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser

    if processes < 1:
        raise RecipeError(f"--processes must be at least 1, got {processes}")
    load_train_recipe(args.config, args.set)  # a bad recipe fails here, once, before any process starts
    script = [str(Path(__file__).resolve()), "--config", str(args.config), "--resume", str(args.resume)]
    for s in args.set:
        script += ["--set", s]
    if args.ignore_rng_state:
        script.append("--ignore-rng-state")
    flags = ["--quiet", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--num_cpu_threads_per_process",
             os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))]
    if processes > 1:
        flags += ["--multi_gpu", "--main_process_port", "0"]
    env = {ERROR_DIR_ENV: None, "ACCELERATE_USE_CPU": None}
    with tempfile.TemporaryDirectory(prefix="tether-launch-") as err_dir:
        env[ERROR_DIR_ENV] = err_dir
        if processes > 1 and not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
            env["ACCELERATE_USE_CPU"] = "true"
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v for k, v in env.items() if v is not None})
        quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.run", "accelerate")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.CRITICAL + 1)
        failed: BaseException | None = None
        try:
            launch_command(launch_command_parser().parse_args([*flags, *script]))
        except SystemExit as e:  # --quiet single-process launch: exit 1 when the script failed
            failed = e if e.code not in (0, None) else None
        except (subprocess.CalledProcessError, Exception) as e:  # noqa: BLE001 - reported below in one line
            failed = e
        finally:
            for lg, lvl in zip(quiet, levels):
                lg.setLevel(lvl)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if failed is None:
            return 0
        errors = sorted(Path(err_dir).glob("rank-*.txt"))
        if errors:
            raise RecipeError(errors[0].read_text().strip())
        raise RecipeError(f"training failed in the {processes} launched process(es) without an error message "
                          f"({one_line(failed)})")

if __name__ == "__main__":
    sys.exit(main())
