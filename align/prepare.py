"""The data side of ``align extract``: decode, crop views and preprocess images, in the main process or in
``features.workers`` worker processes that run ahead of the encoder.

A shard's samples are cut into *pieces* of ``features.batch_size`` source samples; :func:`prepare_piece` decodes a
piece (the decode skips become per-row reasons), makes its views (the plain view, then ``crops - 1`` seeded random
resized crops) and turns each view into pixels: the encoder's own processor (``features.preprocess: processor``,
float32 NCHW, exactly today's pixels) or :class:`tether.imageprep.FastImagePrep` (``fast``: draft-mode JPEG decode
and ``uint8`` NHWC, normalised later on the encoder's device). :class:`PrepPool` maps pieces over a process pool
(forked on Linux), ordered and bounded (at most ``2 × workers`` pieces in flight: memory is set by
``batch_size × crops × workers``, not by the data), or runs them inline when ``workers: 0``. The encoder consumes
one piece per batch, so a piece prepared by any worker gives the same features as one prepared inline.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from align.data import BadSample, Sample, SkipLog, crop_rng, decode_image, random_resized_crop
from tether.imageprep import FastImagePrep
from tether.recipe import RecipeError


@dataclass(frozen=True)
class PrepSpec:
    """Everything a data worker needs (picklable): the views to make and how to turn them into pixels."""

    crops: int
    crop_scale: tuple[float, float]
    seed: int
    processor: Any = None  # the encoder's own image processor (features.preprocess: processor)
    fast: FastImagePrep | None = None  # features.preprocess: fast

    @classmethod
    def for_encoder(cls, vision, cfg) -> "PrepSpec":
        """The spec of ``features:`` ``cfg`` for ``vision``; a processor the fast path cannot mirror is a one-line
        :class:`RecipeError`."""
        fast = FastImagePrep.from_processor(vision.processor) if cfg.preprocess == "fast" else None
        return cls(crops=cfg.crops, crop_scale=tuple(cfg.crop_scale), seed=cfg.seed,
                   processor=None if fast else vision.processor, fast=fast)

    @property
    def draft(self) -> tuple[int, int] | None:
        if self.fast is None:
            return None
        return self.fast.draft_size(self.crop_scale[0] if self.crops > 1 else 1.0)

    def pixels(self, views: list) -> torch.Tensor:
        """Views → ``uint8 [B, H, W, 3]`` (fast) or the processor's ``float32 [B, 3, H, W]``. A tensor, not an
        array: from a worker process it travels in shared memory (torch's multiprocessing reductions), not as
        pickled bytes through a pipe."""
        if self.fast is not None:
            return torch.from_numpy(self.fast.batch_uint8(views))
        px = self.processor(images=[im.convert("RGB") for im in views], return_tensors="pt")["pixel_values"]
        return torch.as_tensor(px)

    def to_device(self, pixels: torch.Tensor, vision) -> torch.Tensor:
        """Pixels of :meth:`pixels` → the encoder's input on its device and in its dtype."""
        if self.fast is not None:
            from tether.encoders import ConvVisionEncoder

            return self.fast.normalize(pixels, vision.device, vision.dtype,
                                       channels_last=isinstance(vision, ConvVisionEncoder))
        x = pixels
        if vision.device.type == "cuda":
            return x.pin_memory().to(vision.device, vision.dtype, non_blocking=True)
        return x.to(vision.device, vision.dtype)


@dataclass
class Piece:
    """One prepared piece: which of its samples decoded, their decode skips, and pixels per view
    ``first..crops-1`` (views before ``first`` come from a donor cache)."""

    kept: list[int]
    skips: dict[str, Any]
    first: int
    views: list[torch.Tensor] = field(default_factory=list)


def prepare_piece(spec: PrepSpec, samples: list[Sample], donor_keys: list[str] | None = None,
                  donor_views: int = 0) -> Piece:
    """Decode ``samples`` and make their pixels. ``donor_keys``/``donor_views``: a donor cache holds the first
    ``donor_views`` views of exactly these kept images (checked here, after decoding), so only the rest are made."""
    skips = SkipLog()
    images, kept = [], []
    draft = spec.draft
    for i, s in enumerate(samples):
        try:
            images.append(decode_image(s.image, s.key, draft=draft))
            kept.append(i)
        except BadSample as e:
            skips.add(e.reason, s.key)
    first = 0
    if donor_keys is not None:
        mine = {s.key for s in samples}
        if [k for k in donor_keys if k in mine] == [samples[i].key for i in kept]:
            first = donor_views
    views = []
    for k in range(first, spec.crops):
        ims = images if k == 0 else [random_resized_crop(im, crop_rng(spec.seed, samples[i].key, k), spec.crop_scale)
                                     for im, i in zip(images, kept)]
        views.append(spec.pixels(ims) if ims else torch.zeros(0, dtype=torch.uint8))
    return Piece(kept=kept, skips=skips.as_dict(), first=first, views=views)


# -- worker processes ---------------------------------------------------------------------------------------------

_SPEC: Any = None
_FN: Callable[..., Piece] | None = None


def _init_worker(spec: Any, fn: Callable[..., Piece]) -> None:
    global _SPEC, _FN
    _SPEC, _FN = spec, fn
    torch.set_num_threads(1)  # one core per worker: N workers use N cores


def _run_piece(args: tuple) -> Piece:
    return _FN(_SPEC, *args)


class PrepPool:
    """Ordered, bounded map of ``fn(spec, *args)`` (:func:`prepare_piece`; training's encoders path passes its own)
    over ``workers`` processes (0: inline, lazily).

    :meth:`map` takes ``(tag, args)`` items — ``args`` None passes the item through without work — and yields
    ``(tag, Piece | None)`` in input order, with at most ``inflight`` pieces submitted ahead. The processes start
    here, before the caller starts any thread of its own (forking a process with running threads is unsafe)."""

    def __init__(self, spec: Any, workers: int = 0, inflight: int | None = None,
                 fn: Callable[..., Piece] = prepare_piece):
        self.spec, self.workers, self.fn = spec, int(workers), fn
        self.inflight = max(1, inflight or 2 * self.workers)
        self._ex = None
        if self.workers:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork where it is safe (Linux; as torch's DataLoader: no re-import, workers start in milliseconds and
            # never touch the parent's accelerator), spawn elsewhere
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method),
                                           initializer=_init_worker, initargs=(spec, fn))
            self._ex.submit(int).result()  # forked processes all start on the first task: now

    def map(self, items: Iterable[tuple[Any, tuple | None]]) -> Iterator[tuple[Any, Piece | None]]:
        if self._ex is None:
            for tag, args in items:
                yield tag, None if args is None else self.fn(self.spec, *args)
            return
        from concurrent.futures.process import BrokenProcessPool

        q: deque = deque()
        pending = 0

        def take():
            nonlocal pending
            tag, fut = q.popleft()
            if fut is None:
                return tag, None
            pending -= 1
            try:
                return tag, fut.result()
            except BrokenProcessPool as e:
                raise RecipeError(f"a data worker died ({e}); lower the workers (features.workers, "
                                  f"train.num_workers) or the batch size if memory is short") from None

        for tag, args in items:
            q.append((tag, None if args is None else self._ex.submit(_run_piece, args)))
            pending += args is not None
            while pending >= self.inflight or (q and q[0][1] is None) or (q and q[0][1].done()):
                yield take()
        while q:
            yield take()

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self) -> "PrepPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

