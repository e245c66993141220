"""Image–text scorers: one interface over every model that embeds images and texts into one space.

The curation stages that look at the pictures (``media.agreement``: image–text agreement and image-verified concept
senses) score with a :class:`Scorer`: ``encode_image(list of PIL images)`` and ``encode_text(list of str)`` give
L2-normalised float32 arrays, and ``fingerprint`` identifies the exact model (caches are keyed by it).
:func:`load_scorer` loads one from

* ``kind: aligned`` — a model folder of tether's own ``align train`` / ``align export`` (through the
  ``tether.model_loaders`` plugin group: :func:`tether.plugins.load_model`; ``curate`` never imports ``align``);
* ``kind: clip`` — any Hugging Face CLIP-style model by hub id or local path: transformers ``CLIPModel``,
  ``SiglipModel`` or any ``AutoModel`` with ``get_image_features`` / ``get_text_features`` (tether's own exported
  transformers folders included, with ``trust_remote_code``), preprocessed by its ``AutoImageProcessor`` and
  ``AutoTokenizer``;
* ``kind: auto`` (default) — ``aligned`` for a folder holding a tether model (``config.json`` with ``heads`` or
  ``vision``/``text`` sections), else ``clip``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from tether.recipe import RecipeError

ScorerKind = Literal["auto", "aligned", "clip"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def model_files(path: str | Path) -> list[Path]:
    """The files whose exact bytes identify a local model folder: its ``config.json`` files and weights, in
    sorted order (subfolders included: an ``align export`` holds its transformers folder in ``hf/``)."""
    p = Path(path)
    return sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json")) \
        if p.is_dir() else []


def _is_aligned_folder(path: Path) -> bool:
    """A tether ``AlignedModel`` folder (its config names the frozen encoders and the heads)."""
    cfg = path / "config.json"
    if not cfg.is_file() or cfg.stat().st_size > 1 << 22:
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" not in data and {"vision", "text"} <= set(data)


class Scorer:
    """A model with ``encode_image`` / ``encode_text`` (L2-normalised float32) and a ``fingerprint``."""

    kind = "scorer"

    def __init__(self, name: str, fingerprint: str):
        self.name = name
        self.fingerprint = fingerprint

    def encode_image(self, images: Sequence, batch_size: int = 32) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class AlignedScorer(Scorer):
    """A tether model folder, loaded through the ``tether.model_loaders`` plugin (align's ``aligned`` loader)."""

    kind = "aligned"

    def __init__(self, path: Path):
        from tether.encoders import file_fingerprint
        from tether.plugins import load_model

        loaded = load_model(path)
        super().__init__(str(path), "aligned:" + file_fingerprint(loaded.files))
        self.model = loaded.model

    def encode_image(self, images, batch_size=32):
        return _normalise(self.model.encode_image(list(images), batch_size=batch_size))

    def encode_text(self, texts, batch_size=64):
        return _normalise(self.model.encode_text(list(texts), batch_size=batch_size))


class ClipScorer(Scorer):
    """A Hugging Face CLIP-style model (``get_image_features`` / ``get_text_features``) by hub id or path."""

    kind = "clip"

    def __init__(self, name: str, device: str = "cpu", dtype: str = "float32", max_length: int = 64):
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        remote = (Path(name) / "configuration_tether.py").is_file()  # tether's own export: its code is local
        try:
            self.model = AutoModel.from_pretrained(name, trust_remote_code=remote,
                                                   torch_dtype=getattr(torch, dtype)).to(device).eval()
            if remote:
                self.processor = self.tokenizer = None
            else:
                self.processor = AutoImageProcessor.from_pretrained(name)
                self.tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"cannot load the scorer {name!r} as a transformers model: {first}") from None
        for need in ("get_image_features", "get_text_features"):
            if not hasattr(self.model, need):
                raise RecipeError(f"scorer {name!r} ({type(self.model).__name__}) has no {need}: "
                                  "not a CLIP-style model (use kind: aligned for a tether model folder)")
        self.device, self.max_length = device, int(max_length)
        # SigLIP was trained on captions padded to a fixed length: pad the same way
        self.pad = "max_length" if "siglip" in type(self.model).__name__.lower() else True
        super().__init__(name, "clip:" + self._fingerprint(name))

    def _fingerprint(self, name: str) -> str:
        from tether.encoders import file_fingerprint

        files = model_files(name)
        if files:
            return file_fingerprint(files)
        from tether.encoders import _fingerprint  # hub id: the tensor bytes

        return _fingerprint(name, self.model)

    def _features(self, out) -> "Any":
        # transformers ≥ 5 may return a model output instead of a tensor
        return out if hasattr(out, "shape") else getattr(out, "pooler_output", out[0])

    def encode_image(self, images, batch_size=32):
        import torch

        images = list(images)
        out = [np.zeros((0, 0), np.float32)]
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                part = images[i:i + batch_size]
                if self.processor is None:
                    px = self.model.preprocess(part)
                else:
                    px = self.processor(images=part, return_tensors="pt")["pixel_values"]
                px = px.to(self.device, dtype=next(self.model.parameters()).dtype)
                out.append(self._features(self.model.get_image_features(pixel_values=px)).float().cpu().numpy())
        return _normalise(np.concatenate([o for o in out if o.size] or [np.zeros((0, 1), np.float32)]))

    def encode_text(self, texts, batch_size=64):
        import torch

        texts = [str(t) for t in texts]
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                part = texts[i:i + batch_size]
                if self.tokenizer is None:
                    enc = self.model.tokenize(part)
                else:
                    enc = self.tokenizer(part, padding=self.pad, truncation=True, max_length=self.max_length,
                                         return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in dict(enc).items()
                       if k in ("input_ids", "attention_mask", "token_type_ids")}
                if self.pad == "max_length":  # SigLIP takes no attention mask
                    enc.pop("attention_mask", None)
                out.append(self._features(self.model.get_text_features(**enc)).float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)


def load_scorer(name: str, kind: ScorerKind = "auto", device: str = "cpu", dtype: str = "float32",
                key: str = "scorer") -> Scorer:
    """The scorer ``name`` (hub id or local path; see the module doc); a one-line :class:`RecipeError` otherwise."""
    if not name or not str(name).strip():
        raise RecipeError(f"{key}: empty scorer name")
    p = Path(str(name)).expanduser()
    if kind == "auto":
        kind = "aligned" if _is_aligned_folder(p) else "clip"
    if kind == "aligned":
        if not _is_aligned_folder(p):
            raise RecipeError(f"{key}: {name!r} is not a tether model folder (config.json with vision/text "
                              "sections, as `align train` / `align export` write)")
        return AlignedScorer(p)
    from tether.zoo import check_model

    if not (p / "configuration_tether.py").is_file():
        check_model(key, str(name), ("config.json",))
    return ClipScorer(str(p) if p.exists() else str(name), device=device, dtype=dtype)


__all__ = ["Scorer", "AlignedScorer", "ClipScorer", "load_scorer", "model_files", "ScorerKind"]
