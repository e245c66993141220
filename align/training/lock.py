"""Text-encoder swap, LiT-style (``train.lock_image_from: MODEL``): the image head of an already trained
:class:`~align.model.AlignedModel` is loaded and locked (no gradient, no dropout), and only a new text head — for the
recipe's text encoder, which may be any other one, e.g. a multilingual one — and the temperature are trained
against it. The result is saved as a new ``AlignedModel`` (same image side, new text side).

The locked head only means something on the vision features it was trained on, so the model's vision encoder
fingerprint (exact weight bytes), layer and pooling must equal the recipe's, and its image head configuration the
recipe's ``projector.image``; anything else is refused in one line before any feature is extracted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.config import TrainRecipe
from align.model import AlignedModel, DualProjector, head_dims
from align.projectors import ProjectorConfig
from tether.recipe import RecipeError, resolve_path


@dataclass
class LockedImageHead:
    """The trained image head of the model at ``path`` (weights without the ``image.`` prefix) and its config."""

    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    def provenance(self) -> dict[str, Any]:
        """What the new model records about where its image head came from (``config.json``,
        ``image_head_locked_from``)."""
        return {"path": str(self.path), "text": {k: self.config["text"].get(k) for k in ("name", "fingerprint")}}


def _read_model(path: Path, field: str) -> AlignedModel:
    try:
        return AlignedModel.from_pretrained(path)
    except RecipeError as e:
        raise RecipeError(f"{field}: {e}") from None
    except Exception as e:  # noqa: BLE001 - unreadable or malformed config.json / model.safetensors
        raise RecipeError(f"{field} {path}: cannot read the model ({type(e).__name__}: {e})") from None


def _check_side(model: AlignedModel, side: str, recipe: TrainRecipe, vision, text, what: str) -> None:
    """Refuse (one line) a model whose ``side`` head was trained on other frozen features or is configured
    otherwise than the recipe's head of that side."""
    c = model.config[side]
    enc = vision if side == "vision" else text
    ours = ({"fingerprint": vision.fingerprint, "layer": vision.layer, "pooling": recipe.image_pooling}
            if side == "vision" else {"fingerprint": text.fingerprint, "max_length": text.max_length})
    diff = [f"{k} {c.get(k)} (model) vs {v} (recipe)" for k, v in ours.items() if c.get(k) != v]
    if diff:
        raise RecipeError(f"{what}: its {side} head was trained on other {side} features than this recipe's "
                          f"({', '.join(diff)}; {side} {c.get('name')!r} vs {enc.name!r}); use a model trained "
                          f"with the same {side} encoder weights and settings")
    head = "image" if side == "vision" else "text"
    got = ProjectorConfig(**model.config["projector"][head]).model_dump()
    want = getattr(recipe.projector, head).model_dump()
    if got != want:
        keys = ", ".join(f"{k} {got[k]!r} (model) vs {want[k]!r} (recipe)" for k in want if got.get(k) != want[k])
        raise RecipeError(f"{what}: its {head} head differs from projector.{head} ({keys}); set projector.{head} "
                          f"to the model's")
    dims = dict(zip(("vision", "text"), head_dims(recipe.projector.image, vision, text, recipe.image_pooling)))
    if int(c.get("dim", -1)) != dims[side]:
        raise RecipeError(f"{what}: its {head} head reads {c.get('dim')}-wide features, this recipe's {side} "
                          f"features are {dims[side]}-wide")


def load_locked_image_head(recipe: TrainRecipe, vision, text) -> LockedImageHead:
    """Read ``train.lock_image_from`` and check it fits ``recipe`` and its loaded frozen encoders."""
    path = resolve_path(recipe.train.lock_image_from)
    model = _read_model(path, "train.lock_image_from")
    _check_side(model, "vision", recipe, vision, text, f"train.lock_image_from {path}")
    state = {k: v.detach().clone() for k, v in model.heads.image.state_dict().items()}
    return LockedImageHead(path, model.config, state)


def load_init_model(recipe: TrainRecipe, vision, text) -> AlignedModel:
    """Read ``train.init_from`` (both heads start from that model's weights: a later stage of a multi-stage run)
    and check both of its heads fit ``recipe`` and its loaded frozen encoders."""
    path = resolve_path(recipe.train.init_from)
    model = _read_model(path, "train.init_from")
    for side in ("vision", "text"):
        _check_side(model, side, recipe, vision, text, f"train.init_from {path}")
    return model


def lock_image_head(heads: DualProjector, locked: LockedImageHead) -> DualProjector:
    """Load the locked weights into ``heads.image`` and freeze them (the text head is untouched)."""
    heads.image.load_state_dict(locked.state)
    heads.image.requires_grad_(False)
    return heads
