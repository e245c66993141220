"""Several frozen encoders read as one: the pooled features of each member, concatenated.

An ensemble is what a recipe's ``vision.members`` / ``text.members`` build (issue 25: "several frozen encoders
at once"). Each member keeps its own preprocessing, layer and pooling; the ensemble's feature of an input is

    combine([f_1, …, f_k]) = [ f_1 / ‖f_1‖ · √d_1 , …, f_k / ‖f_k‖ · √d_k ]

— every member's pooled vector L2-normalised and rescaled to unit RMS per coordinate, so that no member
dominates the head's LayerNorm by the scale of its raw features (a DINOv2 CLS token is ~50× an EfficientNet
average pool). :func:`combine` is the one place this happens: `align extract` joins member caches with it and a
saved model embeds new inputs with it, so cached and fresh features agree exactly.

Ensembles embed pooled features only: token-level heads need one token grid, and an ensemble has several.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tether.digest import json_digest
from tether.recipe import RecipeError

COMBINE = "l2-unit-rms/1"  # the rule :func:`combine` implements (part of cache keys and model configs)


def combine(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[..., sum d_j]``: each part's last axis L2-normalised, scaled by √d_j, concatenated (float32)."""
    out = []
    for p in parts:
        p = p.float()
        out.append(torch.nn.functional.normalize(p, dim=-1) * (p.shape[-1] ** 0.5))
    return torch.cat(out, -1)


def _no_tokens(what: str):
    raise RecipeError(f"{what}: an encoder ensemble (members) embeds pooled features only; token-level heads and "
                      f"features.tokens need a single encoder")


class EnsembleVisionEncoder:
    """Frozen vision encoders with a pooling each; :meth:`pool` returns their :func:`combine`d features.

    ``preprocess`` gives one pixel tensor per member and ``tokens`` one token tensor per member, so code written
    for one encoder (``enc.pool(enc.tokens(enc.preprocess(images)), pooling)``) runs unchanged; the ``pooling``
    argument is ignored (every member has its own)."""

    def __init__(self, members: Sequence, poolings: Sequence[str]):
        if len(members) < 2 or len(members) != len(poolings):
            raise ValueError("an ensemble needs two or more members, one pooling each")
        self.members, self.poolings = list(members), list(poolings)
        first = self.members[0]
        self.name = "+".join(str(m.name) for m in self.members)
        self.device, self.dtype, self.layer = first.device, first.dtype, first.layer
        self.num_prefix_tokens = 1  # not read: ensembles have pooled heads only

    @property
    def member_keys(self) -> list[dict]:
        return [{"name": m.name, "fingerprint": m.fingerprint, "layer": m.layer, "pooling": p,
                 "dtype": str(m.dtype).replace("torch.", "")} for m, p in zip(self.members, self.poolings)]

    @property
    def fingerprint(self) -> str:
        return json_digest([COMBINE, [(k["fingerprint"], k["layer"], k["pooling"]) for k in self.member_keys]])

    @property
    def dim(self) -> int:  # no token grid: the width of the combined pooled feature
        return self.pooled_dim()

    def pooled_dim(self, pooling: str | None = None) -> int:
        return sum(m.pooled_dim(p) for m, p in zip(self.members, self.poolings))

    @property
    def preprocessing(self) -> dict:
        return {"ensemble": [m.preprocessing for m in self.members]}

    def preprocess(self, images) -> list[torch.Tensor]:
        return [m.preprocess(images) for m in self.members]

    @torch.no_grad()
    def tokens(self, pixel_values: Sequence[torch.Tensor], layer: int | None = None) -> list[torch.Tensor]:
        if layer is not None:
            raise RecipeError("an encoder ensemble reads each member's own layer")
        return [m.tokens(px) for m, px in zip(self.members, pixel_values)]

    def pool(self, tokens: Sequence[torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        return combine([m.pool(t, p) for m, t, p in zip(self.members, tokens, self.poolings)])


class EnsembleTextEncoder:
    """Frozen text encoders; :meth:`pooled` returns their :func:`combine`d sentence embeddings."""

    supports_tokens = False

    def __init__(self, members: Sequence):
        if len(members) < 2:
            raise ValueError("an ensemble needs two or more members")
        self.members = list(members)
        first = self.members[0]
        self.name = "+".join(str(m.name) for m in self.members)
        self.device, self.dtype, self.max_length = first.device, first.dtype, first.max_length
        self.pooling = "+".join(str(getattr(m, "pooling", "mean")) for m in self.members)

    @property
    def member_keys(self) -> list[dict]:
        return [{"name": m.name, "fingerprint": m.fingerprint, "max_length": m.max_length,
                 "pooling": getattr(m, "pooling", "mean"), "dtype": str(m.dtype).replace("torch.", "")}
                for m in self.members]

    @property
    def fingerprint(self) -> str:
        return json_digest([COMBINE, [(k["fingerprint"], k["max_length"], k["pooling"]) for k in self.member_keys]])

    @property
    def dim(self) -> int:
        return sum(int(m.dim) for m in self.members)

    def tokens(self, texts):
        return _no_tokens("the text head")

    @torch.no_grad()
    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        return combine([m.pooled(texts) for m in self.members])


def is_ensemble(encoder) -> bool:
    return isinstance(encoder, (EnsembleVisionEncoder, EnsembleTextEncoder))


__all__ = ["COMBINE", "combine", "EnsembleVisionEncoder", "EnsembleTextEncoder", "is_ensemble"]
