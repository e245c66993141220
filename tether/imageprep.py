"""Fast image preprocessing: the same pixels as an encoder's own processor, made the cheap way.

A vision encoder's processor (a transformers ``BitImageProcessor`` / ``CLIPImageProcessor`` / ``ViTImageProcessor``,
or tether's :class:`tether.zoo.ImageTransform`) resizes, center-crops, rescales and normalises each image in
float numpy, one image at a time. :class:`FastImagePrep` splits that in two:

* :meth:`FastImagePrep.to_uint8` (in a data worker): the processor's PIL resize and center crop, kept as
  ``uint8`` ``[H, W, 3]`` — a quarter of the bytes of float32 pixels to move between processes, and no float
  numpy per image;
* :meth:`FastImagePrep.normalize` (next to the encoder, on its device): rescale + normalise as one tensor op on
  the whole batch, NHWC uint8 → NCHW in the encoder's dtype.

:meth:`FastImagePrep.draft_size` is the size a JPEG may be decoded at (PIL's draft mode: libjpeg's DCT scaling
by 1/2, 1/4 or 1/8) without going below what the resize needs; :func:`align.data.decode_image` uses it. On images
no larger than about twice the target, draft mode does nothing and the pixels equal the processor's (up to
float rounding, ``< 1e-5``); on larger JPEGs they differ by the DCT downscale (measured in docs/align.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tether.recipe import RecipeError

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _pil_resample(name: str):
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


def _field(size: Any, name: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(name)
    return getattr(size, name, None)


@dataclass(frozen=True)
class FastImagePrep:
    """``resize`` (shortest edge; ``size_hw`` = a fixed (height, width) instead), center ``crop`` (height, width),
    ``scale`` (rescale factor), ``mean``/``std``, PIL ``resample`` name, ``rounding`` of the long edge (``floor`` as
    transformers, ``round`` as :class:`ImageTransform`) and ``min_resize`` (ImageTransform never resizes an edge
    below the crop)."""

    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    resize: int | None = None
    size_hw: tuple[int, int] | None = None
    resample: str = "bicubic"
    rounding: str = "floor"
    min_resize: bool = False
    reducing_gap: float | None = None
    draft: bool = True

    @classmethod
    def from_processor(cls, processor: Any, draft: bool = True) -> "FastImagePrep":
        """The fast equivalent of ``processor``; :class:`RecipeError` (one line) for a processor it cannot mirror."""
        from tether.zoo import ImageTransform

        if isinstance(processor, ImageTransform):
            return cls(crop=(processor.crop, processor.crop), mean=tuple(processor.mean), std=tuple(processor.std),
                       resize=processor.resize, resample=processor.resample, rounding="round", min_resize=True,
                       reducing_gap=3.0, draft=draft)
        name = type(processor).__name__
        why = _unsupported(processor)
        if why:
            raise RecipeError(f"features.preprocess: fast cannot mirror {name} ({why}); "
                              f"use features.preprocess: processor")
        size, crop = processor.size, processor.crop_size if processor.do_center_crop else None
        short = _field(size, "shortest_edge")
        hw = (_field(size, "height"), _field(size, "width"))
        resample = processor.resample
        resample = _RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear"
        if crop is None:
            crop_hw = hw if short is None else None
            if crop_hw is None:
                raise RecipeError(f"features.preprocess: fast cannot mirror {name} (shortest-edge resize without a "
                                  f"center crop gives images of varying size); use features.preprocess: processor")
        else:
            crop_hw = (int(_field(crop, "height")), int(_field(crop, "width")))
        mean = tuple(float(m) for m in processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0)
        std = tuple(float(s) for s in processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0)
        scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        prep = cls(crop=crop_hw, mean=mean, std=std, scale=scale, resize=int(short) if short else None,
                   size_hw=None if short else (int(hw[0]), int(hw[1])), resample=resample, draft=draft)
        target = (prep.resize, prep.resize) if prep.resize else prep.size_hw
        if crop_hw[0] > target[0] or crop_hw[1] > target[1]:
            raise RecipeError(f"features.preprocess: fast cannot mirror {name} (its crop {crop_hw} is larger than "
                              f"the resize {target}: the processor pads); use features.preprocess: processor")
        return prep

    def to_dict(self) -> dict:
        return {"fast": {"crop": list(self.crop), "mean": list(self.mean), "std": list(self.std), "scale": self.scale,
                         "resize": self.resize, "size_hw": list(self.size_hw) if self.size_hw else None,
                         "resample": self.resample, "rounding": self.rounding, "min_resize": self.min_resize,
                         "reducing_gap": self.reducing_gap, "draft": self.draft}}

    def draft_size(self, min_scale: float = 1.0) -> tuple[int, int] | None:
        """(width, height) a JPEG may be draft-decoded at: every edge stays >= the resize target divided by
        ``sqrt(min_scale)`` (the smallest random crop's side still has the target's pixels). None: no draft."""
        if not self.draft:
            return None
        grow = 1 / math.sqrt(min_scale) if min_scale < 1 else 1.0
        if self.resize:
            s = math.ceil(self.resize * grow)
            return s, s
        h, w = self.size_hw
        return math.ceil(w * grow), math.ceil(h * grow)

    def _resized_size(self, w: int, h: int) -> tuple[int, int]:
        if self.size_hw:
            return self.size_hw[1], self.size_hw[0]
        s = self.resize
        if self.rounding == "round":  # ImageTransform: both edges scaled, rounded, never below the crop
            f = s / min(w, h)
            nw, nh = round(w * f), round(h * f)
            if self.min_resize:
                nw, nh = max(self.crop[1], nw), max(self.crop[0], nh)
            return nw, nh
        if w <= h:  # transformers: the short edge = s, the long one floor(s * long / short)
            return s, int(s * h / w)
        return int(s * w / h), s

    def to_uint8(self, image) -> np.ndarray:
        """One PIL image → ``uint8`` ``[crop_h, crop_w, 3]``: the processor's resize and center crop."""
        im = image if image.mode == "RGB" else image.convert("RGB")
        w, h = im.size
        nw, nh = self._resized_size(w, h)
        ch, cw = self.crop
        top, left = (nh - ch) // 2, (nw - cw) // 2
        if (nw, nh) != (w, h):  # (resizing only the crop with PIL's box= is not bit-exact: measured, dropped)
            im = im.resize((nw, nh), _pil_resample(self.resample), reducing_gap=self.reducing_gap)
        out = im.crop((left, top, left + cw, top + ch))
        return np.asarray(out, dtype=np.uint8)

    def batch_uint8(self, images) -> np.ndarray:
        """``[B, H, W, 3]`` uint8 of :meth:`to_uint8` over ``images``."""
        ch, cw = self.crop
        out = np.empty((len(images), ch, cw, 3), np.uint8)
        for i, im in enumerate(images):
            out[i] = self.to_uint8(im)
        return out

    def normalize(self, pixels: torch.Tensor | np.ndarray, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 → ``[B, 3, H, W]`` ``x * scale / std - mean / std`` on ``device`` in ``dtype``
        (float32 arithmetic; equals the processor's ``(x * scale - mean) / std`` within 1e-6). ``channels_last``:
        keep the NHWC memory layout (what convolutional backbones run fastest on) instead of copying to NCHW."""
        x = torch.as_tensor(pixels)
        device = torch.device(device)
        if device.type == "cuda":  # uint8 over the bus (a quarter of float32), asynchronously from pinned memory
            x = x.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
        nchw = x.permute(0, 3, 1, 2)
        y = (x.float().permute(0, 3, 1, 2) if channels_last
             else nchw.to(torch.float32, memory_format=torch.contiguous_format))
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        y = y.mul_(self.scale / std).sub_(mean / std)
        return y if dtype == torch.float32 else y.to(dtype)


def _unsupported(p: Any) -> str | None:
    """Why a transformers processor has steps :class:`FastImagePrep` does not mirror (None: it mirrors them all)."""
    for attr in ("do_resize", "size", "resample", "do_center_crop", "do_rescale", "do_normalize"):
        if not hasattr(p, attr):
            return f"no {attr}"
    if getattr(p, "do_pad", None):
        return "do_pad"
    if getattr(p, "do_reduce_labels", None):
        return "do_reduce_labels"
    if not p.do_resize:
        return "do_resize is false: image sizes would vary"
    size = p.size
    short = _field(size, "shortest_edge")
    if _field(size, "longest_edge") or _field(size, "max_height") or _field(size, "max_width"):
        return f"size {size} caps the long edge"
    if not short and not (_field(size, "height") and _field(size, "width")):
        return f"size {size}"
    if p.do_center_crop and not (_field(p.crop_size, "height") and _field(p.crop_size, "width")):
        return f"crop_size {p.crop_size}"
    if p.resample is not None and int(p.resample) not in _RESAMPLE:
        return f"resample {p.resample}"
    return None
