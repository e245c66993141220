"""align.features: cache layout and shapes, tokens, crops, resume per shard, staleness refusal."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from align.data import SkipLog, read_webdataset
from tether.encoders import VisionEncoder
from align.features import FeatureCache, FeatureConfig, StaleCacheError, cache_key, extract_features
from tether.recipe import RecipeError
from test_align_data import synthetic_pairs, write_shard


@pytest.fixture()
def shard(tmp_path):
    pairs = synthetic_pairs(7)
    items = pairs[:2] + [("broken", b"\xff\xd8 not really", "a red car")] + pairs[2:]
    items.append(("nocap", pairs[0][1], ""))
    return write_shard(tmp_path / "d-000.tar", items)


def _extract(shard, out, vision, text, **cfg):
    skips = SkipLog()
    cache = extract_features(read_webdataset(str(shard), skips=skips), vision, text, out,
                             FeatureConfig(shard_size=3, batch_size=4, **cfg), data_id={"shard": str(shard)},
                             skips=skips, progress=False)
    return cache, skips


def test_extract_shapes_and_skips(tmp_path, shard, tiny_vision, tiny_text):
    cache, skips = _extract(shard, tmp_path / "c", tiny_vision, tiny_text, tokens=True, crops=2)
    assert cache.num_images == 7 and cache.num_texts == 7
    assert cache.skips["counts"] == {"corrupt_image": 1, "empty_caption": 1}
    assert skips.counts == {"corrupt_image": 1, "empty_caption": 1}
    f = FeatureCache.open(tmp_path / "c").load(tokens=True)
    assert f.image.shape == (7, 2, 32) and f.text.shape == (7, 32)
    assert f.image_tokens.shape == (7, 2, 1 + 16, 32)  # CLS + 4x4 patches
    assert f.text_tokens.shape[0] == 7 and f.text_mask.shape == f.text_tokens.shape[:2]
    assert "broken" not in f.keys and f.text_image.tolist() == list(range(7))
    # crop 0 is the plain view: identical to encoding the image directly; crop 1 differs
    from align.data import decode_image
    first = next(read_webdataset(str(shard)))
    direct = tiny_vision.encode([decode_image(first.image)], pooling="cls")
    assert torch.allclose(f.image[0, 0], torch.from_numpy(direct[0]), atol=2e-2)
    assert not torch.allclose(f.image[0, 0], f.image[0, 1], atol=1e-3)
    # pooled CLS equals token 0; text pooled equals masked mean of tokens (fp16 storage tolerance)
    assert torch.allclose(f.image[:, :, :], f.image_tokens[:, :, 0], atol=1e-6)
    m = f.text_mask.unsqueeze(-1).float()
    assert torch.allclose((f.text_tokens * m).sum(1) / m.sum(1), f.text, atol=2e-2)
    assert f.captions[0] == "a red dog in the park"


def test_resume_recomputes_only_missing_shards(tmp_path, shard, tiny_vision, tiny_text):
    cache, _ = _extract(shard, tmp_path / "c", tiny_vision, tiny_text)
    full = cache.load()
    shards = sorted((tmp_path / "c").glob("shard-*.safetensors"))
    assert len(shards) == 3  # 9 readable samples / shard_size 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    # simulate a kill after the first two shards: last shard gone, manifest incomplete
    shards[-1].unlink()
    mf = tmp_path / "c" / "manifest.json"
    m = json.loads(mf.read_text())
    m["complete"], m["shards"] = False, m["shards"][:2]
    mf.write_text(json.dumps(m))
    with pytest.raises(RecipeError, match="did not finish"):
        FeatureCache.open(tmp_path / "c")
    cache2, _ = _extract(shard, tmp_path / "c", tiny_vision, tiny_text)
    again = cache2.load()
    assert torch.equal(full.image, again.image) and torch.equal(full.text, again.text)
    assert full.keys == again.keys
    for p in shards[:2]:
        assert p.stat().st_mtime_ns == mtimes[p.name]
    assert cache2.skips == cache.skips


def test_stale_cache_is_refused(tmp_path, shard, tiny_vision, tiny_vision_dir, tiny_text):
    cache, _ = _extract(shard, tmp_path / "c", tiny_vision, tiny_text)
    cfg = FeatureConfig(shard_size=3, batch_size=4)
    same = cache_key(tiny_vision, tiny_text, cfg, {"shard": str(shard)})
    FeatureCache.open(tmp_path / "c").check(same)  # matches
    other_layer = VisionEncoder.load(str(tiny_vision_dir), layer=1)
    with pytest.raises(StaleCacheError, match="vision.layer is -1 in the cache but 1 now"):
        cache.check(cache_key(other_layer, tiny_text, cfg, {"shard": str(shard)}))
    # other weights: fingerprint differs (one parameter nudged)
    other = VisionEncoder.load(str(tiny_vision_dir))
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    with pytest.raises(StaleCacheError, match="vision.fingerprint"):
        cache.check(cache_key(other, tiny_text, cfg, {"shard": str(shard)}))
    with pytest.raises(StaleCacheError, match="pooling"):
        cache.check(cache_key(tiny_vision, tiny_text, FeatureConfig(pooling="mean", shard_size=3, batch_size=4),
                              {"shard": str(shard)}))
    # extracting into the folder with other settings is refused too, unless overwrite
    with pytest.raises(StaleCacheError):
        _extract(shard, tmp_path / "c", tiny_vision, tiny_text, pooling="mean")
    skips = SkipLog()
    c2 = extract_features(read_webdataset(str(shard), skips=skips), tiny_vision, tiny_text, tmp_path / "c",
                          FeatureConfig(shard_size=3, pooling="cls+mean"), data_id={"shard": str(shard)},
                          overwrite=True, progress=False)
    assert c2.load().image.shape == (7, 1, 64)
    with pytest.raises(RecipeError, match="no token grids"):
        c2.load(tokens=True)


def test_reuse_copies_a_matching_side_and_never_the_other(tmp_path, shard, tiny_vision, tiny_vision_dir, tiny_text,
                                                          monkeypatch):
    """features.reuse: a second pair that shares the text encoder copies the donor's text side shard by shard
    (identical tensors, no text encoding), encodes its own images, and ends with the key of a fresh extraction."""
    donor, _ = _extract(shard, tmp_path / "a" / "train", tiny_vision, tiny_text, tokens=True)
    other = VisionEncoder.load(str(tiny_vision_dir), layer=1)  # another vision side
    calls = {"text": 0}
    real = type(tiny_text).tokens

    def counting(self, texts):
        calls["text"] += 1
        return real(self, texts)

    monkeypatch.setattr(type(tiny_text), "tokens", counting)
    reused, _ = _extract(shard, tmp_path / "b" / "train", other, tiny_text, tokens=True,
                         reuse=[str(tmp_path / "a")])
    assert calls["text"] == 0 and reused.manifest["reused_shards"] == {"image": 0, "text": 3}
    a, b = donor.load(tokens=True), reused.load(tokens=True)
    assert torch.equal(a.text, b.text) and torch.equal(a.text_tokens, b.text_tokens) and a.captions == b.captions
    assert not torch.allclose(a.image, b.image)  # images were encoded by the other vision encoder
    fresh, _ = _extract(shard, tmp_path / "c" / "train", other, tiny_text, tokens=True)
    assert fresh.key == reused.key
    assert torch.allclose(fresh.load().image, b.image) and torch.allclose(fresh.load().text, b.text, atol=2e-3)
    # a donor whose text side differs (no token grids) is not used: the text encoder runs
    _extract(shard, tmp_path / "d" / "train", tiny_vision, tiny_text, tokens=False, reuse=[str(tmp_path / "a")])
    assert calls["text"] > 0
    # the image side is copied when the vision side matches (same encoder, pooling, crops, data)
    calls["text"] = 0
    img_reused, _ = _extract(shard, tmp_path / "e" / "train", tiny_vision, tiny_text, tokens=True,
                             reuse=[str(tmp_path / "b"), str(tmp_path / "a")])
    assert img_reused.manifest["reused_shards"] == {"image": 3, "text": 3} and calls["text"] == 0
    assert torch.equal(img_reused.load().image, a.image) and img_reused.skips == donor.skips


def test_reuse_copies_leading_views_and_encodes_only_new_crops(tmp_path, shard, tiny_vision, tiny_text, monkeypatch):
    """Adding crops to a cache: the donor's plain view (and its crops when scale and seed match) are copied,
    only the missing views are encoded, and the result equals a fresh extraction."""
    plain, _ = _extract(shard, tmp_path / "a" / "train", tiny_vision, tiny_text, tokens=True)
    fresh, _ = _extract(shard, tmp_path / "f" / "train", tiny_vision, tiny_text, tokens=True, crops=3)
    seen = {"images": 0}
    real = type(tiny_vision).tokens

    def counting(self, pixels):
        seen["images"] += pixels.shape[0]
        return real(self, pixels)

    monkeypatch.setattr(type(tiny_vision), "tokens", counting)
    more, _ = _extract(shard, tmp_path / "b" / "train", tiny_vision, tiny_text, tokens=True, crops=3,
                       reuse=[str(tmp_path / "a")])
    assert seen["images"] == 2 * 7  # 7 decodable images x the 2 new views; the plain view was copied
    assert more.manifest["reused_shards"] == {"image": 0, "image-views": 3, "text": 3}
    assert more.key == fresh.key and more.skips == fresh.skips
    m, f = more.load(tokens=True), fresh.load(tokens=True)
    assert m.image.shape == (7, 3, 32) and m.image_tokens.shape == (7, 3, 17, 32)
    assert torch.equal(m.image[:, :1], plain.load().image)
    assert torch.allclose(m.image, f.image, atol=1e-3) and torch.allclose(m.image_tokens, f.image_tokens, atol=1e-3)
    # fewer views than the donor, same crop settings: a whole copy (the donor with most views wins)
    seen["images"] = 0
    fewer, _ = _extract(shard, tmp_path / "c" / "train", tiny_vision, tiny_text, tokens=True, crops=2,
                        reuse=[str(tmp_path / "a"), str(tmp_path / "b")])
    assert seen["images"] == 0 and fewer.manifest["reused_shards"]["image"] == 3
    assert torch.equal(fewer.load().image, m.image[:, :2])
    # other crop scale: the donor's crops are not ours, only its plain view is copied
    seen["images"] = 0
    other, _ = _extract(shard, tmp_path / "d" / "train", tiny_vision, tiny_text, tokens=True, crops=3,
                        crop_scale=(0.2, 0.4), reuse=[str(tmp_path / "b")])
    assert seen["images"] == 2 * 7 and other.manifest["reused_shards"]["image-views"] == 3
    assert torch.equal(other.load().image[:, 0], m.image[:, 0]) and not torch.allclose(other.load().image, m.image)


def test_resume_refuses_shards_made_from_other_data(tmp_path, shard, tiny_vision, tiny_text):
    """The key names the data source, not its content: a source edited in place is caught shard by shard."""
    samples = list(read_webdataset(str(shard), skips=SkipLog()))
    cfg = FeatureConfig(shard_size=3, batch_size=4)
    extract_features(samples, tiny_vision, tiny_text, tmp_path / "c", cfg, data_id={"x": 1}, progress=False)
    extract_features(samples, tiny_vision, tiny_text, tmp_path / "c", cfg, data_id={"x": 1}, progress=False)
    # fewer samples than the finished cache was made from: the trailing shard is not silently dropped
    with pytest.raises(StaleCacheError, match="holds 3 shards but the data now fills 2"):
        extract_features(samples[:6], tiny_vision, tiny_text, tmp_path / "c", cfg, data_id={"x": 1}, progress=False)
    with pytest.raises(StaleCacheError, match="shard-00001.safetensors: holds other images"):
        extract_features(samples[:4], tiny_vision, tiny_text, tmp_path / "c", cfg, data_id={"x": 1}, progress=False)
    edited = [dataclasses.replace(s, captions=["another caption"]) if i == 4 else s
              for i, s in enumerate(samples)]
    with pytest.raises(StaleCacheError, match="shard-00001.safetensors: holds other images or captions"):
        extract_features(edited, tiny_vision, tiny_text, tmp_path / "c", cfg, data_id={"x": 1}, progress=False)
    again = extract_features(edited, tiny_vision, tiny_text, tmp_path / "c", cfg, data_id={"x": 1},
                             overwrite=True, progress=False)
    assert "another caption" in again.load().captions
