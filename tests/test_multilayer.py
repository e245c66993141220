"""Multi-layer vision features (``vision.layer: [..]``): several hidden layers of one ViT read in ONE forward pass
and concatenated, cached, trained on and reproduced by the saved model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from align.config import load_train_recipe
from align.features import FeatureCache
from align.model import AlignedModel
from align.train import train
from tether.encoders import VisionEncoder
from tether.recipe import RecipeError
from test_train import data_dir, make_recipe, text_dir  # noqa: F401 (fixtures)


def _pixels(enc, n=3):
    rng = np.random.default_rng(0)
    return enc.preprocess([Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)])


def test_a_layer_list_is_one_pass_and_the_concatenation_of_its_layers(tiny_vision_dir):
    multi = VisionEncoder.load(str(tiny_vision_dir), layer=[1, -1])
    single = VisionEncoder.load(str(tiny_vision_dir))
    px = _pixels(single)
    calls = []
    hook = multi.model.register_forward_hook(lambda *a: calls.append(1))
    tok = multi.tokens(px)
    hook.remove()
    assert len(calls) == 1  # one forward pass for both layers
    assert multi.dim == 2 * single.dim and tok.shape[-1] == multi.dim
    assert multi.pooled_dim("cls+mean") == 4 * single.dim
    assert torch.allclose(tok, torch.cat([single.tokens(px, layer=1), single.tokens(px, layer=-1)], -1), atol=1e-6)
    assert multi.encode([Image.new("RGB", (60, 60))], pooling="cls+mean").shape == (1, 4 * single.dim)


def test_bad_layers_are_one_line_errors(tmp_path, tiny_vision_dir, text_dir, data_dir):  # noqa: F811
    with pytest.raises(RecipeError, match="layer 7 does not exist"):
        VisionEncoder.load(str(tiny_vision_dir), layer=[1, 7])  # the tiny model has hidden layers 0..2
    with pytest.raises(RecipeError, match="layer -4 does not exist"):
        VisionEncoder.load(str(tiny_vision_dir), layer=-4)
    px = _pixels(VisionEncoder.load(str(tiny_vision_dir)))
    from_end = VisionEncoder.load(str(tiny_vision_dir), layer=[-3, 1])  # indices from the end still count
    assert torch.allclose(from_end.tokens(px)[..., :32], from_end.tokens(px, layer=0), atol=1e-6)
    for bad in ([], [1, 1], list(range(9))):
        rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, vision__layer=bad)
        with pytest.raises(RecipeError, match="distinct integers") as e:
            load_train_recipe(rp)
        assert "\n" not in str(e.value)


def test_multilayer_cache_trains_and_the_saved_model_reproduces_it(tmp_path, tiny_vision_dir, text_dir,
                                                                    data_dir):  # noqa: F811
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, vision__layer=[1, 2],
                     features__pooling="cls+mean", features__cache_dir=str(tmp_path / "cache"), train__epochs=4)
    recipe = load_train_recipe(rp)
    s = train(recipe)
    assert s["last_loss"] < s["first_loss"] - 0.3
    val = FeatureCache.open(tmp_path / "cache" / "val")
    assert val.dims["image"] == 4 * 32 and val.dims["image_token"] == 64
    assert val.key["vision"]["layer"] == [1, 2]
    model = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config["vision"]["layer"] == [1, 2]
    from align.data import decode_image, iter_samples

    feats = val.load()
    samples = list(iter_samples(recipe.val))[:6]
    assert [x.key for x in samples] == feats.keys[:6]
    fresh = model.encode_image([decode_image(x.image) for x in samples])
    cached = model.project_image_features(feats.image[:6, 0])
    assert (fresh * cached).sum(1).min() > 0.999
    # a cache of another layer set is another cache: refused, not silently mixed
    from align.training.caches import open_checked

    other = recipe.model_copy(update={"vision": recipe.vision.model_copy(update={"layer": [2, 1]})})
    with pytest.raises(RecipeError, match="layer"):
        open_checked(other, "val", VisionEncoder.load(str(tiny_vision_dir), layer=[2, 1]), model.text)
