"""align.data: Flickr8k / webdataset / HF readers, skip reasons, decoding, augmentation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.data import (BadSample, DataConfig, SkipLog, crop_rng, decode_image, iter_samples, random_resized_crop,
                        read_flickr8k, read_webdataset)
from tether.recipe import RecipeError

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "black": (10, 10, 10), "white": (245, 245, 245), "brown": (120, 70, 20)}
NOUNS = ["dog", "cat", "car", "ball", "bird", "tree"]


def _jpeg(rgb, size=64, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """``n`` (key, jpeg, caption) triples whose caption names the image's colour (learnable by tiny models)."""
    names = list(COLORS)
    out = []
    for i in range(n):
        c = names[i % len(names)]
        noun = NOUNS[(i // len(names)) % len(NOUNS)]
        out.append((f"s{i:05d}", _jpeg(COLORS[c], seed=seed * 10_000 + i), f"a {c} {noun} in the park"))
    return out


def write_shard(path: Path, items: list[tuple[str, bytes | None, str | None]], meta: dict | None = None) -> Path:
    """A webdataset tar: ``key.jpg`` / ``key.txt`` / ``key.json`` per item (None → member left out); ``meta``
    adds fields to a key's .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, img, cap in items:
            members = []
            if img is not None:
                members.append((f"{key}.jpg", img))
            if cap is not None:
                members.append((f"{key}.txt", cap.encode()))
            members.append((f"{key}.json", json.dumps({"uid": key, **(meta or {}).get(key, {})}).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_reader_counts_bad_rows(tmp_path):
    good = synthetic_pairs(6)
    items = good[:3] + [("bad_img", b"this is not a jpeg", "a red dog"), ("empty_cap", good[0][1], "   "),
                        ("no_img", None, "a cat")] + good[3:]
    shard = write_shard(tmp_path / "s-000.tar", items)
    skips = SkipLog()
    samples = list(read_webdataset(str(shard), skips=skips))
    assert [s.key for s in samples] == [k for k, _, _ in good[:3]] + ["bad_img"] + [k for k, _, _ in good[3:]]
    assert skips.counts == {"empty_caption": 1, "missing_image": 1}
    assert skips.examples["empty_caption"] == ["empty_cap"]
    # decoding finds the corrupt image; good ones decode to RGB
    with pytest.raises(BadSample) as e:
        decode_image(samples[3].image, "bad_img")
    assert e.value.reason == "corrupt_image"
    im = decode_image(samples[0].image)
    assert im.mode == "RGB" and im.size == (64, 64)
    assert samples[0].captions == ["a red dog in the park"]


def test_webdataset_glob_limit_and_truncated_shard(tmp_path):
    pairs = synthetic_pairs(8)
    write_shard(tmp_path / "a-000.tar", pairs[:4])
    write_shard(tmp_path / "a-001.tar", pairs[4:])
    cfg = DataConfig(format="webdataset", path=str(tmp_path / "a-{000..001}.tar"), limit=6)
    assert [s.key for s in iter_samples(cfg)] == [k for k, _, _ in pairs[:6]]
    # a truncated shard: what was read before the break is kept, the break is counted
    data = (tmp_path / "a-001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    skips = SkipLog()
    got = list(read_webdataset(str(tmp_path / "cut.tar"), skips=skips))
    assert len(got) < 4 and skips.counts.get("corrupt_shard", 0) + len(got) >= 1
    with pytest.raises(RecipeError):
        list(read_webdataset(str(tmp_path / "nothing-*.tar")))


def test_webdataset_groups_one_sample_per_caption_by_image(tmp_path):
    """curate writes one sample per caption; samples with the same sha256 (any shard, any order) are one image
    with all its captions, so the image is encoded once and its captions are positives of each other."""
    pairs = synthetic_pairs(4)
    a, b = pairs[0][1], pairs[1][1]
    items = [("k0", a, "first caption of a"), ("k1", b, "b one"), ("k2", a, "second caption of a"),
             ("k3", pairs[2][1], "no sha field")]
    meta = {"k0": {"sha256": "AAA"}, "k1": {"sha256": "BBB"}, "k2": {"sha256": "AAA"}}
    write_shard(tmp_path / "g-000.tar", items[:2], meta)
    write_shard(tmp_path / "g-001.tar", items[2:] + [("k4", b, "b two")], {**meta, "k4": {"sha256": "BBB"}})
    cfg = DataConfig(format="webdataset", path=str(tmp_path / "g-*.tar"))
    got = [(s.key, s.captions) for s in iter_samples(cfg)]
    assert got == [("k0", ["first caption of a", "second caption of a"]), ("k1", ["b one", "b two"]),
                   ("k3", ["no sha field"])]
    assert [s.key for s in iter_samples(cfg.model_copy(update={"limit": 2}))] == ["k0", "k1"]
    flat = [s.key for s in iter_samples(cfg.model_copy(update={"group_by": None}))]
    assert flat == ["k0", "k1", "k2", "k3", "k4"]


def test_flickr8k_reader_on_made_files(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"im{i}.jpg").write_bytes(_jpeg((i * 80, 50, 50)))
    lines = ["im0.jpg#0\ta dog runs", "im0.jpg#1\t  ", "im1.jpg#0\ta cat", "im2.jpg#0\t"]
    (tmp_path / "captions.txt").write_bytes("\r\n".join(lines).encode())
    (tmp_path / "train_images.txt").write_text("im0.jpg\nim1.jpg\nim2.jpg\nmissing.jpg\n")
    skips = SkipLog()
    got = list(read_flickr8k(tmp_path, "train", skips=skips))
    assert [(s.key, s.captions) for s in got] == [("im0", ["a dog runs"]), ("im1", ["a cat"])]
    assert skips.counts == {"empty_caption": 1, "no_caption": 2}
    with pytest.raises(RecipeError, match="split"):
        list(read_flickr8k(tmp_path, "nosuch"))


def test_hf_dataset_reader(tmp_path):
    import datasets

    pairs = synthetic_pairs(4)
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for _, b, _ in pairs],
                                     "caption": [c for _, _, c in pairs[:3]] + [""],
                                     "uid": [k for k, _, _ in pairs]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string"),
                                                                "uid": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    skips = SkipLog()
    got = list(iter_samples(DataConfig(format="hf", path=str(tmp_path / "hf"), key_column="uid"), skips=skips))
    assert [s.key for s in got] == [k for k, _, _ in pairs[:3]]
    assert skips.counts == {"empty_caption": 1}
    assert decode_image(got[0].image).size == (64, 64)
    with pytest.raises(RecipeError, match="no column"):
        list(iter_samples(DataConfig(format="hf", path=str(tmp_path / "hf"), caption_column="text")))


def test_random_resized_crop_is_seeded():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    a = random_resized_crop(im, crop_rng(1, "k", 2))
    b = random_resized_crop(im, crop_rng(1, "k", 2))
    c = random_resized_crop(im, crop_rng(1, "k", 3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size[0] <= 120 and a.size[1] <= 80 and a.size[0] * a.size[1] >= 0.4 * 80 * 120
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.real
def test_real_flickr8k_split(flickr8k):
    skips = SkipLog()
    got = list(read_flickr8k(flickr8k, "test", skips=skips))
    assert len(got) == 1000 and all(len(s.captions) == 5 for s in got)
    assert decode_image(got[0].image).size == (224, 224)
