"""The training loop: :class:`Trainer` sets a run up from a recipe in named steps and runs it; :func:`train` is
``Trainer(recipe, ...).fit()``.

Set-up, in order (the order fixes the random streams, so it is part of kill + resume = uninterrupted): the
accelerator, the seed, the frozen encoders (+ the locked image head of a text-encoder swap,
:mod:`align.training.lock`), the feature caches (:mod:`align.training.caches`), the batch provider
(:mod:`align.training.batches`), the step schedule, the heads + loss + optimiser, the resume
(:mod:`align.training.checkpoints`), the output folder and trackers. The loop does one micro-batch at a time; after
every optimiser step :meth:`Trainer.after_step` does the logging, validation, epoch end, checkpoint and the
callbacks; :meth:`Trainer.finish` writes the model and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from align.config import TrainRecipe
from align.data import SkipLog
from align.eval.retrieval import retrieval_metrics
from align.features import CachedFeatures
from align.loss import ContrastiveLoss
from tether.encoders import masked_mean
from align.model import AlignedModel, DualProjector
from align.prepare import PrepSpec
from align.training.batches import CacheBatches, EncoderBatches, EpochPlan, TrainPrep, TrainUnits
from align.training.caches import extract_split, load_encoders, open_checked, pooled_part
from align.training.stream import Batch, Part, StreamedCacheBatches, cache_bytes
from align.training.checkpoints import (TrainState, ema_heads_state, resume_checkpoint, save_checkpoint,
                                        verify_checkpoint)
from align.training.lock import load_init_model, load_locked_image_head, lock_image_head
from align.training.trackers import flat_config, make_trackers
from tether.recipe import RecipeError


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class AlignTask(nn.Module):
    """Projectors + contrastive loss: what the optimiser trains (the loss holds the learnable temperature).
    ``frozen``: heads ("image", "text") that do not train and stay in eval mode (no dropout) — the text-encoder
    swap's locked image head, ``train.freeze``."""

    def __init__(self, heads: DualProjector, loss: ContrastiveLoss, frozen: Sequence[str] = ()):
        super().__init__()
        self.heads, self.loss = heads, loss
        self.frozen = tuple(dict.fromkeys(frozen))
        for side in self.frozen:
            getattr(heads, side).requires_grad_(False)
            getattr(heads, side).eval()

    def train(self, mode: bool = True) -> "AlignTask":
        super().train(mode)
        for side in self.frozen:
            getattr(self.heads, side).eval()
        return self

    def forward(self, image, text, text_mask=None, image_ids=None):
        img, txt = self.heads(image, text, text_mask)
        frozen = None
        if self.loss.wants_frozen:   # pooled frozen features: a token grid by its first (CLS) / masked-mean token
            fi = image[:, 0] if image.ndim == 3 else image
            ft = text if text.ndim == 2 else masked_mean(text, text_mask)
            frozen = (fi, ft)
        return self.loss(img, txt, image_ids, frozen=frozen)


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


@torch.no_grad()
def validate(heads: DualProjector, feats: CachedFeatures, device: torch.device, batch: int = 1024) -> dict[str, float]:
    """Retrieval R@1/5/10 (%, ``align.eval.retrieval``) of the current heads on cached validation features."""
    was = {m: m.training for m in heads.modules()}  # restored per module: a locked image head stays in eval mode
    heads.eval()
    img_x = feats.image_tokens[:, 0] if heads.image_tokens else feats.image[:, 0]
    txt_x = feats.text_tokens if heads.text_tokens else feats.text
    imgs = [heads.image(img_x[i:i + batch].float().to(device)) for i in range(0, len(img_x), batch)]
    txts = [heads.text(txt_x[i:i + batch].float().to(device),
                       feats.text_mask[i:i + batch].to(device) if heads.text_tokens else None)
            for i in range(0, len(txt_x), batch)]
    for m, mode in was.items():
        m.train(mode)
    img = torch.nn.functional.normalize(torch.cat(imgs).float(), dim=-1).cpu().numpy()
    txt = torch.nn.functional.normalize(torch.cat(txts).float(), dim=-1).cpu().numpy()
    res = retrieval_metrics(img, txt, feats.text_image.numpy(), ks=(1, 5, 10))
    res["chance_R@1"] = 100.0 / max(1, feats.num_images)
    return res


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


StepCallback = Callable[["Trainer"], None]


class Trainer:
    """One training run of ``recipe``: construction does the set-up, :meth:`fit` the loop and the finish.

    ``callbacks``: functions called with the trainer after every optimiser step, once that step's logging,
    validation and checkpoint are done (``trainer.state.step`` is the step just finished) — e.g. to watch a run
    or to stop it from outside (the kill/resume test kills the process from one)."""

    def __init__(self, recipe: TrainRecipe, resume: str = "auto", ignore_rng_state: bool = False,
                 callbacks: Sequence[StepCallback] = ()):
        from accelerate.utils import set_seed

        self.recipe, self.tc, self.out_dir = recipe, recipe.train, recipe.output_dir
        self.callbacks = list(callbacks)
        self.accelerator = self._make_accelerator()
        self.device, self.world = self.accelerator.device, self.accelerator.num_processes
        set_seed(self.tc.seed)
        self.vision, self.text = load_encoders(recipe, device=str(self.device))
        # text-encoder swap: the locked image head is checked against the encoders before any feature is extracted
        self.locked = load_locked_image_head(recipe, self.vision, self.text) if self.tc.lock_image_from else None
        if self.locked is not None:
            self.accelerator.print(f"image head locked from {self.locked.path} (trained with text encoder "
                                   f"{self.locked.config['text'].get('name')}); training the text head only")
        self.tok_img = recipe.projector.image.kind == "token"
        self.tok_txt = recipe.projector.text.kind == "token"
        self.skips = SkipLog()
        self.val_feats = self._prepare_caches()
        self.provider = self._make_batches()
        self.plan, self.total_steps, self.warmup = self._make_schedule()
        self.task, self.optimizer, self.scheduler = self._make_optimizer()
        self.unwrapped: AlignTask = self.accelerator.unwrap_model(self.task)
        self.state = TrainState()
        self.ema = self._make_ema()
        for obj in (self.scheduler, self.state, self.ema):  # the order of checkpoints.CHECKPOINTED
            if obj is not None:
                self.accelerator.register_for_checkpointing(obj)
        self._resume(resume, ignore_rng_state)
        self._start_output()

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        tc, out_dir = self.tc, self.out_dir
        accelerator = Accelerator(mixed_precision=tc.mixed_precision,
                                  log_with=make_trackers(tc.log_with, out_dir / "logs"),
                                  project_config=ProjectConfiguration(project_dir=str(out_dir),
                                                                      logging_dir=str(out_dir / "logs")))
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and accelerator.num_processes != launched:
            raise RecipeError(f"launched {launched} processes but accelerate sees {accelerator.num_processes}; on "
                              "CPU use `accelerate launch --cpu ...` or set ACCELERATE_USE_CPU=true")
        return accelerator

    def _prepare_caches(self) -> CachedFeatures | None:
        """Extract/check the feature caches (main process; the others wait); the validation features, if any."""
        recipe, tc, accelerator = self.recipe, self.tc, self.accelerator
        splits = ["train"] if tc.source == "cache" else []
        if recipe.val is not None:
            splits.append("val")
        # the main process runs exactly what `align extract` runs: missing shards are extracted, every shard on disk
        # is checked against its recorded checksum (a damaged one is encoded again) and against the data as it is
        # now (keys, captions, image bytes); a stale cache is refused, never rebuilt silently
        for split in splits:
            if accelerator.is_main_process:
                extract_split(recipe, split, self.vision, self.text, progress=tc.progress)
            accelerator.wait_for_everyone()
        if recipe.val is None:
            return None
        # kept in the cache's stored dtype: validate() makes each chunk float32
        feats = open_checked(recipe, "val", self.vision, self.text).load(tokens=self.tok_img or self.tok_txt,
                                                                         dtype=None)
        return pooled_part(feats, tc.image_pooling, self.vision.dim)

    def _make_batches(self) -> CacheBatches | StreamedCacheBatches | EncoderBatches:
        recipe, tc = self.recipe, self.tc
        if tc.source == "cache":
            cache = open_checked(recipe, "train", self.vision, self.text)
            self.skips.merge(cache.skips)
            dim = self.vision.dim
            part = Part(self.tok_img, self.tok_txt, {"cache": None, "cls": (0, dim), "mean": (dim, 2 * dim)}[
                tc.image_pooling])
            need, budget = cache_bytes(cache, part), int(tc.cache_memory_mb * 2**20)
            if need > budget:  # larger than the budget: windows of shards, read ahead (align/training/stream.py)
                self.accelerator.print(f"training cache {_size(need)} > train.cache_memory_mb={tc.cache_memory_mb}: "
                                       f"streamed in shuffled windows of up to {_size(budget // 2)}")
                return StreamedCacheBatches(cache, part, tc.augment, tc.seed, self.device, budget)
            feats = pooled_part(cache.load(tokens=self.tok_img or self.tok_txt, dtype=None), tc.image_pooling, dim)
            return CacheBatches(feats, self.tok_img, self.tok_txt, tc.augment, tc.seed, self.device)
        from tether.imageprep import FastImagePrep

        fast = FastImagePrep.from_processor(self.vision.processor) if recipe.features.preprocess == "fast" else None
        spec = PrepSpec(crops=1, crop_scale=tuple(tc.crop_scale), seed=tc.seed,
                        processor=None if fast else self.vision.processor, fast=fast)
        units = TrainUnits(recipe.data, self.skips, progress=tc.progress and self.accelerator.is_local_main_process)
        return EncoderBatches(units, self.vision, self.text, self.tok_img, self.tok_txt, recipe.features.pooling,
                              TrainPrep(spec, tc.augment, tuple(tc.crop_scale), tc.seed), tc.window_pairs,
                              tc.num_workers, self.device)

    def _make_schedule(self) -> tuple[EpochPlan, int, int]:
        """The epoch plan, the number of optimiser steps and of warm-up steps."""
        tc = self.tc
        plan = EpochPlan(self.provider.num_pairs, tc.batch_size * self.world, tc.grad_accum, tc.seed)
        if plan.steps_per_epoch < 1:
            raise RecipeError(f"{self.provider.num_pairs} pairs are fewer than one step of train.batch_size="
                              f"{tc.batch_size} x {self.world} processes x grad_accum={tc.grad_accum}")
        total_steps = plan.steps_per_epoch * tc.epochs
        if tc.max_steps:
            total_steps = min(total_steps, tc.max_steps)
        warmup = tc.warmup_steps if tc.warmup_steps is not None else int(round(tc.warmup_ratio * total_steps))
        return plan, total_steps, warmup

    def _make_heads(self) -> DualProjector:
        recipe = self.recipe
        heads = DualProjector.for_encoders(recipe.projector.image, recipe.projector.text, self.vision, self.text,
                                           recipe.image_pooling)
        if self.tc.init_from:  # both heads start from a trained model (checked against these encoders)
            heads.load_state_dict(load_init_model(recipe, self.vision, self.text).heads.state_dict())
        return heads if self.locked is None else lock_image_head(heads, self.locked)

    def _make_optimizer(self):
        """Heads + loss (the learnable temperature) as one module, AdamW, warm-up + cosine; prepared."""
        tc = self.tc
        frozen = list(tc.freeze) + (["image"] if self.locked is not None else [])
        task = AlignTask(self._make_heads(), ContrastiveLoss.from_config(self.recipe.loss), frozen=frozen)
        optimizer = torch.optim.AdamW(param_groups(task, tc.weight_decay), lr=tc.lr, betas=tc.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      warmup_cosine(self.total_steps, self.warmup, tc.min_lr_ratio))
        task, optimizer = self.accelerator.prepare(task, optimizer)
        return task, optimizer, scheduler

    def _make_ema(self):
        """The moving average of the heads (``train.ema_decay``), or None. Its first update copies the weights."""
        decay = self.tc.ema_decay
        if decay is None:
            return None
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        return AveragedModel(self.unwrapped.heads, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def heads(self) -> DualProjector:
        """The heads that are validated and saved: the moving average when ``train.ema_decay`` is set."""
        return self.unwrapped.heads if self.ema is None else self.ema.module

    def _resume(self, resume: str, ignore_rng_state: bool) -> None:
        ckpt = resume_checkpoint(self.out_dir, resume)
        if ckpt is None:
            return
        verify_checkpoint(ckpt, self.accelerator.process_index, ignore_rng_state)
        if self.ema is not None:
            ema_heads_state(ckpt)  # one line for a checkpoint saved without the average
        self.accelerator.load_state(str(ckpt))
        s = self.state
        self.accelerator.print(f"resumed from {ckpt} (epoch {s.epoch}, batch {s.batch}, step {s.step})")

    def _start_output(self) -> None:
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "recipe.json").write_text(self.recipe.model_dump_json(indent=2))
        if self.tc.log_with != "none":
            self.accelerator.init_trackers("align", config=flat_config(json.loads(self.recipe.model_dump_json())))

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule (from where a resumed run stopped); returns :meth:`finish`'s summary."""
        from tether.progress import progress as tqdm

        tc, state = self.tc, self.state
        self.bar = tqdm(total=self.total_steps * tc.grad_accum, initial=state.step * tc.grad_accum, desc="train",
                        unit="batch", disable=not (tc.progress and self.accelerator.is_local_main_process),
                        dynamic_ncols=True)
        self.t_start = self.t_last = time.perf_counter()
        self.data_wait, self.seen_here = 0.0, 0
        self.last_logs: dict[str, float] = {}
        done = state.step >= self.total_steps
        while not done and state.epoch < tc.epochs:
            self.task.train()
            with contextlib.closing(self._epoch_batches()) as batches:  # closed on a break or an error too
                for b in batches:
                    if b["skipped"]:
                        self.skips.merge(b["skipped"])  # decode skips of this batch's rows (a SkipLog dict)
                    sync = (state.batch + 1) % tc.grad_accum == 0
                    if b["image"] is not None:
                        self._forward_backward(b, sync)
                    state.batch += 1
                    self.bar.update(1)
                    if not sync:
                        continue
                    self._optimizer_step()
                    done, end_of_epoch = self.after_step()
                    if done or end_of_epoch:
                        break
        self.bar.close()
        return self.finish()

    def _epoch_batches(self) -> Iterator[Batch]:
        """This process's slice of the rest of the current epoch's global batches; the time spent waiting for
        each batch is added to ``data_wait``."""
        tc, state = self.tc, self.state
        rank = self.accelerator.process_index
        it = self.provider.epoch(state.epoch, self.plan, state.batch,
                                 slice(rank * tc.batch_size, (rank + 1) * tc.batch_size))
        try:
            while True:
                t0 = time.perf_counter()
                b = next(it, None)
                self.data_wait += time.perf_counter() - t0
                if b is None:
                    return
                yield b
        finally:  # the provider's readers stop with the epoch, not whenever the garbage collector gets to them
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _forward_backward(self, b: Batch, sync: bool) -> None:
        """Loss and gradients of one micro-batch (no DDP gradient sync unless it ends an accumulation)."""
        accelerator = self.accelerator
        ctx = contextlib.nullcontext() if sync or self.world == 1 else accelerator.no_sync(self.task)
        with ctx:
            with accelerator.autocast():
                loss, logs = self.task(b["image"], b["text"], b["text_mask"], b["image_ids"])
            accelerator.backward(loss / self.tc.grad_accum)
        self.last_logs = logs
        self.state.add_loss(float(logs["loss"]))
        self.seen_here += int(logs.get("batch", b["image"].shape[0]))

    def _optimizer_step(self) -> None:
        tc = self.tc
        if tc.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.task.parameters(), tc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped.heads)
        self.state.step += 1
        self.state.samples += tc.batch_size * self.world * tc.grad_accum

    def after_step(self) -> tuple[bool, bool]:
        """Everything after an optimiser step, in order: time accounting, progress + tracker log (every
        ``log_every`` steps and the last), validation (every ``val_every`` steps, else at the epoch end), the epoch
        end, a checkpoint (every ``checkpoint_every`` steps, at the epoch end and the last step), the callbacks.
        Returns ``(done, end_of_epoch)``."""
        tc, state = self.tc, self.state
        now = time.perf_counter()
        state.device_seconds += (now - self.t_last) * self.world
        self.t_last = now
        if state.step % tc.log_every == 0 or state.step == self.total_steps:
            self._log_progress(now - self.t_start)
        if tc.val_every and state.step % tc.val_every == 0:
            self._validate()
        end_of_epoch = state.batch >= self.plan.batches_per_epoch
        done = state.step >= self.total_steps
        if end_of_epoch:
            if not tc.val_every:
                self._validate()
            state.epoch, state.batch = state.epoch + 1, 0
        if state.step % tc.checkpoint_every == 0 or end_of_epoch or done:
            save_checkpoint(self.accelerator, self.out_dir, state.step, tc.keep_checkpoints)
        for callback in self.callbacks:
            callback(self)
        return done, end_of_epoch

    def _log_progress(self, elapsed: float) -> None:
        rate = self.seen_here / max(elapsed, 1e-9)
        wait = self.data_wait / max(elapsed, 1e-9)
        self.bar.set_postfix(loss=f"{self.last_logs.get('loss', float('nan')):.3f}", sps=f"{rate:.0f}",
                             wait=f"{100 * wait:.0f}%")
        self.accelerator.log({**{f"train/{k}": v for k, v in self.last_logs.items()},
                              "train/lr": self.scheduler.get_last_lr()[0], "train/samples_per_s": rate,
                              "train/data_wait_frac": wait, "train/epoch": self.state.epoch}, step=self.state.step)

    def _validate(self, log: bool = True) -> None:
        """Retrieval on the validation features into ``state.val`` (and the trackers); nothing without ``val``."""
        if self.val_feats is None:
            return
        self.state.val = validate(self.heads, self.val_feats, self.device)
        if log:
            self.accelerator.log({f"val/{k}": v for k, v in self.state.val.items()}, step=self.state.step)

    # -- the end --------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Validate if no validation ran yet, then (main process) save ``model/`` and ``metrics.json`` and print
        the ``done:`` line; returns the summary."""
        if not self.state.val:
            self._validate(log=False)
        summary = self.summary()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._save(summary)
        self.accelerator.end_training()
        return summary

    def summary(self) -> dict[str, Any]:
        state, elapsed = self.state, max(time.perf_counter() - self.t_start, 1e-9)
        return {
            "steps": state.step, "epochs_done": state.epoch, "samples": state.samples,
            # over the whole run, across resumes (the checkpoint carries them)
            "first_loss": _round(state.first_loss, 4),
            "last_loss": _round(float(np.mean(state.recent_losses)), 4) if state.recent_losses else None,
            "samples_per_s": _round(self.seen_here / elapsed, 1),
            "data_wait_frac": _round(self.data_wait / elapsed, 4),
            "temperature": _round(float(self.unwrapped.loss.temperature.item()), 5),
            "val": {k: _round(v, 2) for k, v in state.val.items()}, "skips": self.skips.as_dict(),
            "num_pairs": self.provider.num_pairs, "processes": self.world,
            # the paper's data / compute claims made checkable: pairs seen and accelerator-hours, over all resumes
            "pairs_seen": state.samples, "device": self.device.type,
            "device_hours": _round(state.device_seconds / 3600.0, 6),
        }

    def _save(self, summary: dict[str, Any]) -> None:
        recipe, out_dir, state = self.recipe, self.out_dir, self.state
        model = AlignedModel.from_parts(self.heads, self.vision, self.text, recipe.projector.image,
                                        recipe.projector.text, pooling=recipe.image_pooling,
                                        temperature=summary["temperature"])
        if self.locked is not None:
            model.config["image_head_locked_from"] = self.locked.provenance()
        if self.tc.init_from:
            model.config["initialised_from"] = str(self.tc.init_from)
        model.save_pretrained(out_dir / "model")
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        loss = ("no loss recorded" if summary["first_loss"] is None else
                f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
        val = ", ".join(f"{k} {round(v, 1):g}" for k, v in summary["val"].items()) or "none"
        self.accelerator.print(f"done: {state.step} steps, {state.samples:,} pairs seen, "
                               f"{summary['device_hours']:.4f} {self.device.type}-process-hours, {loss}, "
                               f"val {val}, skipped {self.skips}; model in {out_dir / 'model'}")


def train(recipe: TrainRecipe, resume: str = "auto", ignore_rng_state: bool = False,
          callbacks: Sequence[StepCallback] = ()) -> dict[str, Any]:
    """Run training as the recipe says; returns the summary also written to ``<output_dir>/metrics.json``.
    ``ignore_rng_state``: resume from a checkpoint whose RNG state is damaged or missing (else refused).
    ``callbacks``: see :class:`Trainer`. A recipe with ``train.stages`` trains them in order
    (:mod:`align.training.stages`)."""
    if recipe.train.stages:
        from align.training.stages import run_stages

        return run_stages(recipe, lambda r: Trainer(r, resume=resume, ignore_rng_state=ignore_rng_state,
                                                    callbacks=callbacks).fit())
    return Trainer(recipe, resume=resume, ignore_rng_state=ignore_rng_state, callbacks=callbacks).fit()
