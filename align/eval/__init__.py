"""Evaluation and encoder-pair selection.

* :mod:`.zeroshot` — zero-shot classification (prompt-averaged class vectors, top-1/top-5/mean per-class recall).
* :mod:`.retrieval` — image↔text R@K with several captions per image, chunked.
* :mod:`.cka` — linear / unbiased CKA and mutual-kNN alignment between two encoders.
* :mod:`.select` — rank candidate vision × text encoder pairs before training (``align select``).
* :mod:`.report` — JSON + markdown + PNG reports; :mod:`.cli` — ``align eval`` / ``align select``.
* :class:`ClipBenchmarkModel` / :func:`load_clip_benchmark` (here) — a CLIP_benchmark custom-model hook around
  any model with ``encode_image``/``encode_text``; :mod:`.clip_benchmark` — the launcher that runs CLIP_benchmark
  with it (``python -m align.eval.clip_benchmark eval --model <folder> ...``).

Every metric takes arrays (or callables returning arrays), so it works with the trained
``align.model.AlignedModel``, with cached features, or with any other model.
"""

from align.eval.cka import linear_cka, mutual_knn, unbiased_cka
from align.eval.retrieval import PairedSet, ranks, retrieval_metrics
from align.eval.zeroshot import classification_metrics, zeroshot_classifier

__all__ = ["linear_cka", "unbiased_cka", "mutual_knn", "ranks", "retrieval_metrics", "PairedSet",
           "classification_metrics", "zeroshot_classifier"]


def _no_autocast():
    """Switch off an enclosing ``torch.autocast`` (CLIP_benchmark wraps encoding in one, default on): the tether
    model keeps its own precision, so its embeddings equal ``align eval``'s."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    for dev in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(dev)
        except TypeError:   # torch < 2.4
            on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        if on:
            stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


class _Texts(list):
    """A batch of raw strings that survives CLIP_benchmark's ``tokenizer(texts).to(device)``."""

    def to(self, *args, **kwargs) -> "_Texts":
        return self


class ClipBenchmarkModel:
    """Wrap a tether model (``encode_image(list[PIL]) / encode_text(list[str]) -> np.ndarray``) for
    CLIP_benchmark: ``encode_image`` takes the uint8 ``[B, 3, H, W]`` tensors that :meth:`transform` makes,
    ``encode_text`` the string batches that :meth:`tokenizer` makes; both return torch tensors.

    ``transform`` only resizes (shortest edge) and centre-crops to ``image_size`` so that a batch can be stacked;
    the model's own preprocessing then runs on the PIL images rebuilt from the uint8 pixels (lossless).
    """

    def __init__(self, model, image_size: int = 256):
        self.model, self.image_size = model, image_size

    def transform(self, image):
        import numpy as np
        import torch
        from PIL import Image

        im = image.convert("RGB")
        s = self.image_size / min(im.size)
        im = im.resize((max(self.image_size, round(im.width * s)), max(self.image_size, round(im.height * s))),
                       Image.BICUBIC)
        left, top = (im.width - self.image_size) // 2, (im.height - self.image_size) // 2
        im = im.crop((left, top, left + self.image_size, top + self.image_size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    @staticmethod
    def tokenizer(texts) -> _Texts:
        return _Texts([texts] if isinstance(texts, str) else list(texts))

    def encode_image(self, images):
        import torch
        from PIL import Image

        pil = [Image.fromarray(x.permute(1, 2, 0).cpu().numpy().astype("uint8")) for x in images]
        with _no_autocast():
            return torch.from_numpy(self.model.encode_image(pil))

    def encode_text(self, texts):
        import torch

        with _no_autocast():
            return torch.from_numpy(self.model.encode_text(list(texts)))

    # CLIP_benchmark calls model.eval()/to(device) on some paths
    def eval(self) -> "ClipBenchmarkModel":
        return self

    def to(self, *args, **kwargs) -> "ClipBenchmarkModel":
        return self


def load_clip_benchmark(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                        device: str = "cpu"):
    """CLIP_benchmark ``load_clip``-style entry: ``model_name`` is an AlignedModel folder; ``pretrained`` is used
    instead only when it is a folder too (CLIP_benchmark's CLI always passes one, by default ``laion400m_e32``).

    ``python -m align.eval.clip_benchmark eval --model <folder> ...`` registers it and runs CLIP_benchmark
    (:mod:`align.eval.clip_benchmark`); :func:`align.eval.clip_benchmark.register` registers it in the calling
    process. Returns ``(model, transform, tokenizer)``.
    """
    from pathlib import Path

    from align.eval.run import load_model

    path = pretrained if pretrained and Path(pretrained).is_dir() else model_name
    m = ClipBenchmarkModel(load_model(path, device=device))
    return m, m.transform, m.tokenizer
