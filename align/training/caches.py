"""Frozen encoders and the feature caches training reads: extracted (or resumed, or checked) exactly as
``align extract`` does, then opened with their key checked against the recipe."""

from __future__ import annotations

from align.config import TrainRecipe, data_id
from align.data import SkipLog, iter_samples
from align.features import CachedFeatures, FeatureCache, FeatureConfig, cache_key, extract_features
from tether.recipe import RecipeError


def encoder_load_kwargs(recipe: TrainRecipe, device: str = "cpu") -> tuple[dict, dict]:
    """The ``VisionEncoder.load`` / ``TextEncoder.load`` arguments of the recipe's frozen encoders."""
    return ({"name_or_path": recipe.encoder_name("vision"), "device": device, "dtype": recipe.vision.dtype,
             "layer": recipe.vision.layer},
            {"name_or_path": recipe.encoder_name("text"), "device": device, "dtype": recipe.text.dtype,
             "max_length": recipe.text.max_length})


def load_encoders(recipe: TrainRecipe, device: str = "cpu"):
    """The frozen vision and text encoders named by the recipe."""
    from align.features import load_encoder_pair

    vk, tk = encoder_load_kwargs(recipe, device)
    return load_encoder_pair(vk, tk)


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
                             total=total, distributor=recipe.distributor,
                             load_kwargs=encoder_load_kwargs(recipe, str(getattr(vision, "device", "cpu"))))
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
