"""Encoder ensembles (vision.members / text.members): part caches, the joined cache, training, the saved model."""

from __future__ import annotations

import pytest
import torch

from align.config import load_train_recipe
from align.features import FeatureCache
from align.model import AlignedModel
from align.train import train
from tether.ensemble import combine
from tether.recipe import RecipeError
from test_train import data_dir, make_recipe, text_dir  # noqa: F401 (fixtures)


def _ensemble_recipe(tmp_path, vision_dir, text_dir, data_dir, **over):
    sections = {"vision": {"name": str(vision_dir), "members": [{"name": str(vision_dir), "layer": 1,
                                                                 "pooling": "cls+mean"}]},
                "text": {"name": str(text_dir), "max_length": 16,
                         "members": [{"name": str(text_dir), "max_length": 8}]},
                "features": {"cache_dir": str(tmp_path / "cache"), "shard_size": 64, "crops": 2}}
    return make_recipe(tmp_path / "r.yaml", vision_dir, text_dir, data_dir, **{**sections, **over})


def test_combine_is_unit_rms_per_member():
    a, b = torch.randn(5, 3, 8) * 50, torch.randn(5, 3, 2) * 0.01
    c = combine([a, b])
    assert c.shape == (5, 3, 10)
    assert torch.allclose(c[..., :8].pow(2).mean(-1), torch.ones(5, 3), atol=1e-5)
    assert torch.allclose(c[..., 8:].pow(2).mean(-1), torch.ones(5, 3), atol=1e-5)


def test_ensemble_parts_join_train_and_saved_model(tmp_path, tiny_vision_dir, text_dir, data_dir):  # noqa: F811
    rp = _ensemble_recipe(tmp_path, tiny_vision_dir, text_dir, data_dir, train__epochs=4)
    recipe = load_train_recipe(rp)
    s = train(recipe)
    assert s["last_loss"] < s["first_loss"] - 0.3
    cache = tmp_path / "cache"
    joined = FeatureCache.open(cache / "train")
    # image: primary cls (32) + layer-1 member cls+mean (64); text: two 32-wide sentence embeddings
    assert joined.dims["image"] == 96 and joined.dims["text"] == 64
    assert sorted(p.name for p in (cache / "parts").iterdir()) == ["t1", "v0", "v1"]
    parts = {n: FeatureCache.open(cache / "parts" / n / "train").load() for n in ("v0", "v1", "t1")}
    got = joined.load()
    assert got.keys == parts["v0"].keys and got.captions == parts["t1"].captions
    want_img = combine([parts["v0"].image, parts["v1"].image])
    want_txt = combine([parts["v0"].text, parts["t1"].text])
    assert torch.allclose(got.image, want_img, atol=2e-2) and torch.allclose(got.text, want_txt, atol=2e-2)
    assert not torch.equal(parts["v0"].image, parts["v1"].image[..., :32])  # layer 1 is not the final layer
    # the text of v1 and the images of t1 were copied from v0, not encoded again
    assert FeatureCache.open(cache / "parts" / "v1" / "train").manifest["reused_shards"]["text"] > 0
    assert FeatureCache.open(cache / "parts" / "t1" / "train").manifest["reused_shards"]["image"] > 0

    # the saved model embeds raw inputs exactly as the cached (joined) features say
    model = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert [m["layer"] for m in model.config["vision"]["members"]] == [-1, 1]
    val = FeatureCache.open(cache / "val").load()
    from align.data import iter_samples

    samples = list(iter_samples(recipe.val))[:8]
    assert [x.key for x in samples] == val.keys[:8]
    from align.data import decode_image

    fresh = model.encode_image([decode_image(x.image) for x in samples])
    cached = model.project_image_features(val.image[:8, 0])
    assert (fresh * cached).sum(1).min() > 0.999
    fresh_t = model.encode_text(val.captions[:8])
    cached_t = model.project_text_features(val.text[:8])
    assert (fresh_t * cached_t).sum(1).min() > 0.999

    # a second extraction re-encodes nothing and leaves the joined cache as it is
    mtime = (cache / "train" / "manifest.json").stat().st_mtime_ns
    from align.cli import main as cli_main

    assert cli_main(["extract", "--config", str(rp)]) == 0
    assert (cache / "train" / "manifest.json").stat().st_mtime_ns == mtime

    # a transformers folder references one encoder per side: refused in one line
    from align.hf import export_hf

    with pytest.raises(RecipeError, match="encoder ensemble"):
        export_hf(model, tmp_path / "hf")


def test_ensemble_recipe_errors(tmp_path, tiny_vision_dir, text_dir, data_dir):  # noqa: F811
    with pytest.raises(RecipeError, match="pooled heads only"):
        load_train_recipe(_ensemble_recipe(tmp_path, tiny_vision_dir, text_dir, data_dir,
                                           projector={"image": {"kind": "token", "out_dim": 64},
                                                      "text": {"kind": "mlp", "out_dim": 64}}))
    with pytest.raises(RecipeError, match="trains from its feature cache"):
        load_train_recipe(_ensemble_recipe(tmp_path, tiny_vision_dir, text_dir, data_dir, train__source="encoders"))
    with pytest.raises(RecipeError, match="pooling"):
        load_train_recipe(_ensemble_recipe(tmp_path, tiny_vision_dir, text_dir, data_dir,
                                           vision={"name": "x", "members": [{"name": "y", "pooling": "max"}]}))
