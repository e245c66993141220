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
    """The frozen vision and text encoders named by the recipe (an ensemble on a side with members)."""
    from align.features import load_encoder_pair

    if recipe.ensemble:
        from align.ensemble import load_ensemble_encoders

        return load_ensemble_encoders(recipe, device)

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
    if recipe.ensemble:  # one cache per member encoder, then joined (align/ensemble.py)
        from align.ensemble import extract_ensemble_split

        return extract_ensemble_split(recipe, split, vision, text, extract_split,
                                      expected_key(recipe, split, vision, text), overwrite=overwrite,
                                      progress=progress)
    data = split_data(recipe, split)
    skips = SkipLog()
    samples = iter_samples(data, skips=skips)
    # streamed, never listed (memory set by the shard size, not the split). The bar's total: for file readers one
    # counting pass over references (tar headers / caption lines: no image bytes, O(1) memory); for a Hugging Face
    # dataset its limit, else what a finished cache there was made from, else unknown
    if data.format != "hf":
        total = sum(1 for _ in iter_samples(data, skips=SkipLog()))
    else:
        total = data.limit if data.limit is not None else previous_total(recipe.cache_dir(split))
    cache = extract_features(samples, vision, text, recipe.cache_dir(split), split_features_config(recipe, split),
                             data_id=data_id(data), skips=skips, overwrite=overwrite, progress=progress,
                             total=total, distributor=recipe.distributor,
                             load_kwargs=encoder_load_kwargs(recipe, str(getattr(vision, "device", "cpu"))))
    return cache


def previous_total(root) -> int | None:
    """Source samples behind a finished cache at ``root`` (None: no finished cache there)."""
    try:
        cache = FeatureCache.open(root)
    except RecipeError:
        return None
    return sum(int(s.get("source_images", s["images"])) for s in cache.manifest["shards"]) or None


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
