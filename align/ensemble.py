"""Encoder ensembles in training: the frozen members of a recipe's ``vision.members`` / ``text.members``, their
per-member feature caches, and the joined cache that training reads (tether/ensemble.py has the encoders).

A recipe with members is extracted as *parts*, each an ordinary feature cache under ``features.cache_dir/parts``:

    v0   the primary vision encoder + the primary text encoder   (image and text side)
    v1…  vision member j + the primary text encoder              (image side; its text is copied from v0)
    t1…  the primary vision encoder + text member k              (text side; its images are copied from v0)

so each encoder runs once per input, every part resumes after a kill like any cache, and ``features.reuse``
copies sides from caches made before (a Lite2 + mpnet cache gives the Lite2 part for free). The joined cache
(``features.cache_dir/<split>``) holds, shard by shard, ``combine`` of the parts' features
(:func:`tether.ensemble.combine`); it is rebuilt when any part's shards changed and is otherwise left as it is.
Every shard of every part must hold the same images and captions in the same order (one-line
:class:`~align.features.StaleCacheError` otherwise). Memory: one shard of each part at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from align.config import TextConfig, TrainRecipe, VisionConfig, local_encoder_name
from align.features import MANIFEST, FeatureCache, StaleCacheError, read_tensors, write_cache
from tether.ensemble import EnsembleTextEncoder, EnsembleVisionEncoder, combine
from tether.recipe import RecipeError, resolve_path

PARTS = "parts"


def vision_members(recipe: TrainRecipe) -> list[tuple[VisionConfig, str]]:
    """``(single-encoder vision config, pooling)`` of every vision encoder, the primary first."""
    v = recipe.vision
    first = (v.model_copy(update={"members": []}), recipe.features.pooling)
    return [first] + [(VisionConfig(name=m.name, layer=m.layer, dtype=m.dtype), m.pooling) for m in v.members]


def text_members(recipe: TrainRecipe) -> list[TextConfig]:
    """A single-encoder text config of every text encoder, the primary first."""
    t = recipe.text
    return [t.model_copy(update={"members": []})] + [TextConfig(name=m.name, max_length=m.max_length, dtype=m.dtype)
                                                     for m in t.members]


def part_recipes(recipe: TrainRecipe) -> dict[str, tuple[TrainRecipe, int, int]]:
    """Per part (``v0``, ``v1``…, ``t1``…): its single-encoder recipe, with its own cache folder, and the indices
    of its vision and text encoders in :func:`vision_members` / :func:`text_members`."""
    root = resolve_path(recipe.features.cache_dir) / PARTS
    vis, txt = vision_members(recipe), text_members(recipe)
    specs = {f"v{j}": (j, 0) for j in range(len(vis))}
    specs.update({f"t{k}": (0, k) for k in range(1, len(txt))})
    out = {}
    for name, (j, k) in specs.items():
        (v, pooling), t = vis[j], txt[k]
        features = recipe.features.model_copy(update={
            "cache_dir": str(root / name), "pooling": pooling,
            "reuse": list(recipe.features.reuse) + [str(root / other) for other in specs if other != name]})
        out[name] = (recipe.model_copy(update={"vision": v, "text": t, "features": features}), j, k)
    return out


def load_text_side(recipe: TrainRecipe, device: str = "cpu"):
    """The recipe's frozen text encoder: an :class:`EnsembleTextEncoder` when ``text.members`` is set."""
    from tether.encoders import TextEncoder

    txt = [TextEncoder.load(local_encoder_name(t.name), device=device, dtype=t.dtype, max_length=t.max_length)
           for t in text_members(recipe)]
    return EnsembleTextEncoder(txt) if len(txt) > 1 else txt[0]


def load_ensemble_encoders(recipe: TrainRecipe, device: str = "cpu"):
    """The recipe's frozen encoders: an :class:`EnsembleVisionEncoder` / :class:`EnsembleTextEncoder` on a side
    with members, the single encoder on the other."""
    from tether.encoders import VisionEncoder

    vis = [(VisionEncoder.load(local_encoder_name(v.name), device=device, dtype=v.dtype, layer=v.layer), p)
           for v, p in vision_members(recipe)]
    vision = EnsembleVisionEncoder([e for e, _ in vis], [p for _, p in vis]) if len(vis) > 1 else vis[0][0]
    return vision, load_text_side(recipe, device)


def _members(encoder) -> list:
    return list(getattr(encoder, "members", [encoder]))


def extract_ensemble_split(recipe: TrainRecipe, split: str, vision, text, extract_split: Callable, key: dict,
                           overwrite: bool = False, progress: bool = True) -> FeatureCache:
    """Extract (or resume) every part of ``split`` with ``extract_split`` (the single-encoder extraction,
    :func:`align.training.caches.extract_split`), then join them into the recipe's cache of ``split``, whose
    cache key is ``key``."""
    vis, txt = _members(vision), _members(text)
    parts: dict[str, FeatureCache] = {}
    for name, (r, j, k) in part_recipes(recipe).items():
        v, t = vis[j], txt[k]
        if progress:
            print(f"ensemble part {name}: {v.name} + {t.name}", flush=True)
        parts[name] = extract_split(r, split, v, t, overwrite=overwrite, progress=progress)
    return join_parts(parts, recipe.cache_dir(split), key,
                      combine_image=len(vis) > 1, combine_text=len(txt) > 1,
                      dtype=torch.float16 if recipe.features.dtype == "float16" else torch.float32)


def _part_record(parts: dict[str, FeatureCache]) -> dict[str, list[str]]:
    return {name: [s["sha256"] for s in c.manifest["shards"]] for name, c in parts.items()}


def join_parts(parts: dict[str, FeatureCache], out: Path, key: dict, combine_image: bool, combine_text: bool,
               dtype: torch.dtype = torch.float16) -> FeatureCache:
    """The joined cache at ``out`` from finished part caches (``v0`` first; ``v*`` give images, ``t*`` texts)."""
    record = _part_record(parts)
    try:
        old = FeatureCache.open(out)
        if old.key == key and old.manifest.get("parts") == record:
            return old  # nothing changed since the last join
    except RecipeError:  # no cache there, unfinished, unreadable: joined again
        pass
    first = parts["v0"]
    counts = {name: len(c.manifest["shards"]) for name, c in parts.items()}
    if len(set(counts.values())) != 1:
        raise StaleCacheError(f"ensemble parts of {out} have different shard counts {counts}: they were made from "
                              f"different data; re-run `align extract --overwrite`")
    img_names = [n for n in parts if n.startswith("v")]
    txt_names = ["v0"] + [n for n in parts if n.startswith("t")]

    def shards():
        for i in range(counts["v0"]):
            read = {n: read_tensors(c.root / c.manifest["shards"][i]["file"], c.manifest["shards"][i])
                    for n, c in parts.items()}
            t0, meta = read["v0"]
            for n, (_, m) in read.items():
                same = m.get("keys") == meta.get("keys") and (not n.startswith("t")
                                                              or m.get("captions") == meta.get("captions"))
                if not same:
                    raise StaleCacheError(f"ensemble part {n} of {out}: shard {i} holds other images or captions "
                                          f"than part v0; re-run `align extract --overwrite`")
            image = [read[n][0]["image"] for n in img_names]
            text = [read[n][0]["text"] for n in txt_names]
            tensors = {
                "image": (combine(image) if combine_image else image[0]).to(dtype),
                "text": (combine(text) if combine_text else text[0]).to(dtype),
                "text_image": t0["text_image"],
            }
            yield tensors, meta

    dims = {"image": sum(int(parts[n].dims["image"]) for n in (img_names if combine_image else ["v0"])),
            "text": sum(int(parts[n].dims["text"]) for n in (txt_names if combine_text else ["v0"])),
            "image_token": 0, "num_prefix_tokens": 1}
    extra = {"parts": record, "skips": first.manifest.get("skips", {})}
    if "caption_langs" in first.manifest:
        extra["caption_langs"] = first.manifest["caption_langs"]
    (out / MANIFEST).unlink(missing_ok=True)  # not a finished cache while it is rewritten
    cache = write_cache(out, key, dims, shards(), extra=extra)
    listed = {s["file"] for s in cache.manifest["shards"]}
    for f in out.glob("shard-*.safetensors"):  # a longer earlier join's shards
        if f.name not in listed:
            f.unlink()
    return cache


def model_members(vision, text) -> dict[str, list[dict]]:
    """What a saved model's config records of the ensemble sides (``vision.members`` / ``text.members``)."""
    out = {}
    if isinstance(vision, EnsembleVisionEncoder):
        out["vision"] = vision.member_keys
    if isinstance(text, EnsembleTextEncoder):
        out["text"] = text.member_keys
    return out


def load_model_side(side: str, config: dict, device: str, check) -> object:
    """The ensemble encoder a saved model's ``config[side]["members"]`` names, each member's fingerprint checked
    with ``check(side, encoder, recorded_fingerprint)`` (which returns the encoder)."""
    from tether.encoders import TextEncoder, VisionEncoder

    members = config["members"]
    if side == "vision":
        encs = [check(side, VisionEncoder.load(m["name"], device=device, dtype=m["dtype"], layer=m["layer"]),
                      m["fingerprint"]) for m in members]
        return EnsembleVisionEncoder(encs, [m["pooling"] for m in members])
    encs = [check(side, TextEncoder.load(m["name"], device=device, dtype=m["dtype"], max_length=m["max_length"]),
                  m["fingerprint"]) for m in members]
    return EnsembleTextEncoder(encs)


__all__ = ["PARTS", "vision_members", "text_members", "part_recipes", "load_ensemble_encoders", "load_text_side",
           "extract_ensemble_split", "join_parts", "model_members", "load_model_side"]
