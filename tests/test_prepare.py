"""align.prepare + tether.imageprep: data workers and the fast preprocessing path of `align extract`."""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.data import SkipLog, decode_image, read_webdataset
from align.features import FeatureCache, FeatureConfig, cache_key, extract_features
from align.prepare import PrepPool, PrepSpec
from tether.imageprep import FastImagePrep
from tether.recipe import RecipeError
from test_align_data import synthetic_pairs, write_shard

SHARED = Path(os.environ.get("TETHER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DINO = SHARED / "models" / "dinov2-small"


@pytest.fixture()
def shard(tmp_path):
    pairs = synthetic_pairs(9)
    items = pairs[:3] + [("broken", b"\xff\xd8 not really", "a red car")] + pairs[3:]
    return write_shard(tmp_path / "d-000.tar", items)


def _extract(shard, out, vision, text, **cfg):
    skips = SkipLog()
    cache = extract_features(read_webdataset(str(shard), skips=skips), vision, text, out,
                             FeatureConfig(**{"shard_size": 4, "batch_size": 3, **cfg}),
                             data_id={"shard": str(shard)}, skips=skips, progress=False)
    return cache, skips


def _tensors(cache: FeatureCache) -> dict:
    out = {}
    for i, sh in enumerate(cache.iter_shards(tokens=True, dtype=None)):
        for k, v in sh.items():
            out[f"{i}/{k}"] = v
    return out


@pytest.mark.parametrize("preprocess", ["processor", "fast"])
def test_workers_write_the_same_cache_as_the_main_process(tmp_path, shard, tiny_vision, tiny_text, preprocess):
    serial, s0 = _extract(shard, tmp_path / "w0", tiny_vision, tiny_text, crops=2, tokens=True, preprocess=preprocess)
    pooled, s2 = _extract(shard, tmp_path / "w2", tiny_vision, tiny_text, crops=2, tokens=True, preprocess=preprocess,
                          workers=2)
    a, b = _tensors(serial), _tensors(pooled)
    assert a.keys() == b.keys() and len(serial.manifest["shards"]) == 3  # 10 samples / shard_size 4
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert serial.skips == pooled.skips and serial.skips["counts"] == {"corrupt_image": 1}
    assert serial.key == pooled.key  # the number of workers does not change what is cached
    assert ("preprocess_path" in serial.key["vision"]) == (preprocess == "fast")


def test_fast_path_is_in_the_key_and_matches_the_processor_on_tiny_images(tmp_path, shard, tiny_vision, tiny_text):
    proc, _ = _extract(shard, tmp_path / "p", tiny_vision, tiny_text)
    fast, _ = _extract(shard, tmp_path / "f", tiny_vision, tiny_text, preprocess="fast")
    assert proc.key != fast.key and proc.key["vision"]["preprocess"] == fast.key["vision"]["preprocess"]
    # the key of a processor-path cache is what it was before the fast path existed (old caches stay valid)
    assert set(proc.key["vision"]) == {"name", "fingerprint", "layer", "dtype", "preprocess"}
    a, b = proc.load(), fast.load()
    assert torch.allclose(a.image, b.image, atol=2e-3)  # fp16 storage; pixels equal within 1e-6
    with pytest.raises(Exception, match="stale"):
        FeatureCache.open(tmp_path / "f").check(cache_key(tiny_vision, tiny_text, FeatureConfig(shard_size=4,
                                                          batch_size=3), {"shard": str(shard)}))


def test_fast_path_refuses_a_processor_it_cannot_mirror(tiny_vision):
    class Padding:
        do_resize, do_center_crop, do_rescale, do_normalize, do_pad = True, False, True, True, True
        size, crop_size, resample = {"shortest_edge": 32}, None, 3

    with pytest.raises(RecipeError, match="features.preprocess: fast cannot mirror Padding .*do_pad.*processor"):
        FastImagePrep.from_processor(Padding())


def test_pool_is_ordered_and_bounded(shard, tiny_vision):
    samples = list(read_webdataset(str(shard)))
    spec = PrepSpec.for_encoder(tiny_vision, FeatureConfig(preprocess="fast"))
    pulled = []

    def items():
        for i, s in enumerate(samples):
            pulled.append(i)
            yield i, None if i == 4 else ([s], None, 0)

    seen = []
    with PrepPool(spec, workers=1, inflight=2) as pool:
        for tag, piece in pool.map(items()):
            assert len(pulled) - len(seen) <= 3  # at most `inflight` pieces submitted ahead (+ the one in hand)
            seen.append(tag)
            if tag == 4:
                assert piece is None  # passed through without work
            else:
                assert piece.views[0].dtype == torch.uint8
    assert seen == list(range(len(samples)))


def _photos(n: int) -> list[str]:
    out = sorted(glob.glob(str(SHARED / "data" / "imagenet-sample" / "images" / "*")))[:n]
    return out + sorted(glob.glob(str(SHARED / "data" / "flickr8k" / "images" / "*.jpg")))[:n]


needs_shared = pytest.mark.skipif(not DINO.is_dir() or not _photos(1),
                                  reason=f"needs the shared DINOv2-S weights and photos under {SHARED}")


@needs_shared
def test_fast_pixels_equal_the_hf_processor_on_real_photos():
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(DINO))
    fast = FastImagePrep.from_processor(proc)
    ims = [decode_image(p) for p in _photos(40)]
    assert len({im.size for im in ims}) > 3  # ImageNet photos of several shapes + Flickr8k's 224x224
    ref = proc(images=ims, return_tensors="pt")["pixel_values"]
    got = fast.normalize(fast.batch_uint8(ims))
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5


def test_fast_pixels_equal_image_transform():
    from tether.zoo import ImageTransform

    t = ImageTransform(resize=40, crop=32)
    fast = FastImagePrep.from_processor(t)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
           [(50, 70), (33, 33), (200, 90), (31, 64), (300, 400)]]
    ref = t(images=ims)["pixel_values"]
    got = fast.normalize(fast.batch_uint8(ims), channels_last=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - ref).abs().max() < 1e-5


@needs_shared
def test_draft_decode_of_large_jpegs_stays_close(tmp_path):
    """A photo enlarged 3x and saved as JPEG: draft mode decodes it at 1/2 scale; the pixels differ from the full
    decode + processor by DCT downscaling only, and DINOv2-S features stay nearly the same."""
    from tether.encoders import VisionEncoder

    enc = VisionEncoder.load(str(DINO))
    fast = FastImagePrep.from_processor(enc.processor)
    big = []
    for p in _photos(8)[:8]:
        im = decode_image(p)
        buf = io.BytesIO()
        im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=95)
        big.append(buf.getvalue())
    full = [decode_image(b) for b in big]
    drafted = [decode_image(b, draft=fast.draft_size()) for b in big]
    assert all(d.width < f.width for d, f in zip(drafted, full))  # draft mode did reduce them
    assert all(min(d.size) >= 256 for d in drafted)
    ref = enc.processor(images=full, return_tensors="pt")["pixel_values"]
    got = fast.normalize(fast.batch_uint8(drafted))
    assert (got - ref).abs().mean() < 0.05  # normalised units (≈ 3 grey levels)
    a = enc.pool(enc.tokens(ref), "cls")
    b = enc.pool(enc.tokens(got), "cls")
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.97
