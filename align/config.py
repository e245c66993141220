"""The training recipe (``align train`` / ``align extract`` / ``align/train.py``): typed, strict, one-line errors.

A recipe has the sections ``vision``, ``text`` (frozen encoders), ``data`` and optional ``val`` (pairs, see
:class:`align.data.DataConfig`), ``features`` (the cache, :class:`align.features.FeatureConfig`),
``projector`` (one :class:`align.projectors.ProjectorConfig` per side), ``loss``
(:class:`align.loss.LossConfig`) and ``train`` (:class:`TrainConfig`). Unknown keys are errors.

Paths may use ``~``, ``$VAR`` and ``${VAR:-default}``. One rule for every tether recipe
(:func:`tether.recipe.resolve_input`): relative INPUT paths — ``data``/``val`` paths and caption files, local
encoder folders, ``features.reuse`` caches, ``train.lock_image_from`` — resolve against the recipe's folder
(e.g. ``${TETHER_SHARED:-../../shared}`` for a recipe in ``recipes/``); the OUTPUT locations
``features.cache_dir`` and ``train.output_dir`` resolve against the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from align.data import DataConfig
from align.features import FeatureConfig
from align.loss import LossConfig
from align.projectors import ProjectorConfig
from tether.distribute import DistributorConfig
from tether.encoders import check_layers
from tether.recipe import RecipeError, Strict, load_recipe, resolve_input, resolve_path


# a vision layer: one hidden layer (-1 = final output), or a list of distinct ones read in ONE forward pass and
# concatenated (a ViT's multi-layer features, cached once): tether.encoders.check_layers
VisionLayer = Annotated[int | list[int], AfterValidator(check_layers)]


class VisionMember(Strict):
    """One more frozen vision encoder of an ensemble (``vision.members``), with its own layer and pooling."""

    name: str
    layer: VisionLayer = -1
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"


class VisionConfig(Strict):
    """Frozen vision encoder: hub id or local folder (``${TETHER_SHARED:-../shared}/models/dinov2-small``)."""

    name: str
    layer: VisionLayer = -1  # e.g. 11 for the shared DINOv2-S weights, or [9, 10, 11, -1]
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # an encoder ensemble (tether/ensemble.py): more frozen backbones whose pooled features are concatenated
    # with this one's (pooled as features.pooling); each member has its own cache under features.cache_dir/parts
    members: list[VisionMember] = []


class TextMember(Strict):
    """One more frozen text encoder of an ensemble (``text.members``)."""

    name: str
    max_length: int = Field(77, ge=4)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class TextConfig(Strict):
    """Frozen text encoder (sentence-transformers folder or transformers model), mask-mean pooled."""

    name: str
    max_length: int = Field(77, ge=4)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    members: list[TextMember] = []  # an encoder ensemble: more text encoders, sentence embeddings concatenated


class ProjectorsConfig(Strict):
    image: ProjectorConfig = ProjectorConfig()
    text: ProjectorConfig = ProjectorConfig()

    @model_validator(mode="after")
    def _same_dim(self) -> "ProjectorsConfig":
        if self.image.out_dim != self.text.out_dim:
            raise ValueError(f"image.out_dim ({self.image.out_dim}) and text.out_dim ({self.text.out_dim}) differ")
        return self


class TrainConfig(Strict):
    """Optimisation, checkpointing and logging (recipe section ``train:``)."""

    output_dir: str
    source: Literal["cache", "encoders"] = "cache"  # cached features (fast) or frozen encoders every step
    epochs: int = Field(15, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimiser steps (the LR schedule ends there)
    batch_size: int = Field(1024, ge=2)  # pairs per process per micro-step
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_ratio
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(None, gt=0)
    # an exponential moving average of the head weights (decay per optimiser step; the first step's weights start
    # it): what validation sees and what the saved model holds; None = off
    ema_decay: float | None = Field(None, gt=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    augment: bool = True  # cache: pick one of the cached crops per pair; encoders: random resized crop + flip
    # from a features.pooling=cls+mean cache: train (and validate, and save the model) on its CLS half or its
    # mean-patch half only — a pooling comparison without extracting the features again
    image_pooling: Literal["cache", "cls", "mean"] = "cache"
    crop_scale: tuple[float, float] = (0.5, 1.0)  # encoders path only
    num_workers: int = Field(0, ge=0, le=256)  # encoders path: image decoding + preprocessing processes
    # encoders path: pairs per shuffle window. Webdataset shards are read a window at a time (the next one read
    # ahead), pairs shuffled within it: memory is set here, not by the data. Data of at most this many pairs is one
    # window: the exact order of the whole list (align/training/batches.py EncoderBatches)
    window_pairs: int = Field(500_000, ge=1)
    # cache path: the most memory the training features may take (MiB, stored dtype). A cache that fits is held
    # whole on the device; a larger one is streamed in shuffled windows of shards, two at a time (the one in use and
    # the next, read ahead): memory is set here, not by the cache's size (align/training/stream.py)
    cache_memory_mb: float = Field(4096, gt=0)
    checkpoint_every: int = Field(500, ge=1)  # optimiser steps
    keep_checkpoints: int = Field(2, ge=1)
    val_every: int | None = Field(None, ge=1)  # optimiser steps; None = end of every epoch
    log_every: int = Field(10, ge=1)
    log_with: Literal["auto", "tensorboard", "jsonl", "none"] = "auto"
    progress: bool = True
    # text-encoder swap (LiT-style): an AlignedModel folder whose trained image head is loaded and frozen; only the
    # text head (for this recipe's text encoder) and the temperature train. The model's vision encoder fingerprint,
    # layer, pooling and image head must match this recipe's (align/training/lock.py)
    lock_image_from: str | None = None
    # an AlignedModel folder whose two heads (same encoders, same head configs) are the starting point
    init_from: str | None = None
    freeze: list[Literal["image", "text"]] = []  # heads that do not train (eval mode: no dropout)
    # multi-stage training: one training run per stage, each starting from the previous stage's heads and
    # temperature; a stage sets what differs (epochs, lr, its own data, frozen heads …). Each stage writes
    # output_dir/stages/NN-name (resumable as any run); the last one's model is output_dir/model
    stages: list["TrainStage"] = []


class TrainStage(Strict):
    """One stage of ``train.stages``: the recipe's ``train`` settings with these replaced."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    freeze: list[Literal["image", "text"]] | None = None
    data: DataConfig | None = None  # this stage's training pairs (default: the recipe's data); cached apart


TrainConfig.model_rebuild()


class TrainRecipe(Strict):
    vision: VisionConfig
    text: TextConfig
    data: DataConfig
    val: DataConfig | None = None
    features: FeatureConfig = FeatureConfig()
    projector: ProjectorsConfig = ProjectorsConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig
    # where `align extract` encodes its shards: this process (local) or Ray actors (tether/distribute.py)
    distributor: DistributorConfig = DistributorConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainRecipe":
        token = [s for s in ("image", "text") if getattr(self.projector, s).kind == "token"]
        names = [st.name for st in self.train.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"train.stages: stage names must differ, got {names}")
        if self.train.stages and self.train.lock_image_from:
            raise ValueError("train.stages with train.lock_image_from: freeze the image head in a stage instead")
        if set(self.train.freeze) == {"image", "text"} or any(set(st.freeze or ()) == {"image", "text"}
                                                             for st in self.train.stages):
            raise ValueError("train.freeze: freezing both heads leaves nothing to train")
        if self.ensemble:
            if token or self.features.tokens:
                raise ValueError("an encoder ensemble (vision/text members) has pooled heads only: no token-level "
                                 "projector, no features.tokens")
            if self.train.source != "cache" or self.train.image_pooling != "cache":
                raise ValueError("an encoder ensemble (vision/text members) trains from its feature cache: "
                                 "train.source: cache, train.image_pooling: cache")
        if token and self.train.source == "cache" and not self.features.tokens:
            raise ValueError(f"token-level {token[0]} projector from the cache needs features.tokens: true")
        if self.train.image_pooling != "cache" and (self.features.pooling != "cls+mean"
                                                    or self.train.source != "cache" or "image" in token):
            raise ValueError(f"train.image_pooling={self.train.image_pooling} picks half of a features.pooling="
                             f"cls+mean cache: it needs that pooling, train.source=cache and a pooled image head")
        return self

    @property
    def ensemble(self) -> bool:
        """Several frozen encoders on a side (``vision.members`` / ``text.members``)."""
        return bool(self.vision.members or self.text.members)

    @property
    def image_pooling(self) -> str:
        """The pooling the trained image projector sees (what a saved model applies to new images)."""
        return self.features.pooling if self.train.image_pooling == "cache" else self.train.image_pooling

    # -- paths ------------------------------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return resolve_path(self.train.output_dir)

    def cache_dir(self, split: str) -> Path:
        """Feature cache folder of ``split`` ("train" or "val")."""
        return resolve_path(self.features.cache_dir) / split

    def encoder_name(self, side: str) -> str:
        """The encoder id with env vars expanded; an existing local folder becomes an absolute path."""
        return local_encoder_name(self.vision.name if side == "vision" else self.text.name)


def local_encoder_name(name: str) -> str:
    """An encoder id with env vars expanded; an existing local folder becomes an absolute path."""
    p = resolve_path(name)
    return str(p.resolve()) if p.exists() else name


def load_train_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainRecipe:
    """Load and validate a training recipe; any problem → :class:`RecipeError` with one line. Relative input
    paths come back resolved against the recipe's folder (:func:`inputs_from`)."""
    return inputs_from(load_recipe(path, TrainRecipe, overrides), Path(path).resolve().parent)


def data_inputs_from(cfg: DataConfig, base: str | os.PathLike) -> DataConfig:
    """``cfg`` with its relative paths resolved against ``base`` (hf dataset names stay names)."""
    hf = cfg.format == "hf"
    path = ([resolve_input(p, base, may_be_id=hf) for p in cfg.path] if isinstance(cfg.path, list)
            else resolve_input(cfg.path, base, may_be_id=hf))
    update: dict = {"path": path}
    if cfg.captions is not None:
        update["captions"] = [c.model_copy(update={"path": resolve_input(c.path, base)}) for c in cfg.captions]
    # (hf data_files stay as written: datasets resolves them against the dataset's own folder or repository)
    return cfg.model_copy(update=update)


def inputs_from(recipe: TrainRecipe, base: str | os.PathLike) -> TrainRecipe:
    """The recipe with every relative INPUT path resolved against ``base`` (the recipe's folder); encoder names
    that are hub ids or zoo names stay as they are (:func:`tether.recipe.resolve_input`)."""
    def named(cfg):
        return cfg.model_copy(update={"name": resolve_input(cfg.name, base, may_be_id=True)})

    return recipe.model_copy(update={
        "vision": named(recipe.vision).model_copy(update={"members": [named(m) for m in recipe.vision.members]}),
        "text": named(recipe.text).model_copy(update={"members": [named(m) for m in recipe.text.members]}),
        "data": data_inputs_from(recipe.data, base),
        "val": data_inputs_from(recipe.val, base) if recipe.val is not None else None,
        "features": recipe.features.model_copy(update={"reuse": [resolve_input(r, base)
                                                                 for r in recipe.features.reuse]}),
        "train": recipe.train.model_copy(update={
            "lock_image_from": resolve_input(recipe.train.lock_image_from, base) if recipe.train.lock_image_from
            else None,
            "init_from": resolve_input(recipe.train.init_from, base) if recipe.train.init_from else None,
            "stages": [st.model_copy(update={"data": data_inputs_from(st.data, base) if st.data else None})
                       for st in recipe.train.stages]}),
    })


def data_id(cfg: DataConfig) -> dict:
    """The data part of a feature-cache key: the source spec with paths made absolute."""
    d = cfg.model_dump()
    if cfg.format != "webdataset":
        d.pop("group_by")  # meaningless for other formats: caches made before the field existed stay valid
    if cfg.captions is None:
        d.pop("captions")  # the default captions.txt: caches made before the field existed stay valid
    else:
        d["captions"] = [{"path": str(resolve_path(c.path).resolve()), "lang": c.lang} for c in cfg.captions]
    paths = [d["path"]] if isinstance(d["path"], str) else d["path"]
    resolved = [str(resolve_path(p).resolve()) if resolve_path(p).exists() or cfg.format != "hf" else p
                for p in paths]
    d["path"] = resolved[0] if isinstance(cfg.path, str) else resolved
    return d


__all__ = ["VisionConfig", "VisionMember", "TextConfig", "TextMember", "ProjectorsConfig", "TrainConfig",
           "TrainStage", "TrainRecipe", "load_train_recipe", "local_encoder_name", "data_id", "RecipeError"]
