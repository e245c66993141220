"""``train.source: encoders`` streamed (align/training/batches.py EncoderBatches): webdataset shards read a window at
a time, pairs shuffled within it, batch b of epoch e a pure function of (seed, e, b); one window is the exact order
of the whole sample list; data workers give the same result as none."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from align.data import DataConfig, SkipLog, read_webdataset
from align.prepare import PrepSpec
from align.training.batches import EncoderBatches, EpochPlan, SampleWindow, TrainPrep, TrainUnits
from align.training.stream import windowed_parts
from test_align_data import synthetic_pairs, write_shard
from test_train import make_recipe, text_dir  # noqa: F401  (fixture: tiny BERT with a real vocabulary)
from tether.recipe import RecipeError


def _shards(root, n_shards=6, per=20, dup_every=4):
    """Shards of one caption per sample; every ``dup_every``-th sample repeats an earlier image of its shard
    (same sha256 in .json): grouped, that image has two captions (positives)."""
    pairs = synthetic_pairs(n_shards * per)
    paths = []
    for s in range(n_shards):
        items, meta = [], {}
        for i in range(per):
            key, jpg, cap = pairs[s * per + i]
            items.append((key, jpg, cap))
            group = f"{s}-{i - 1}" if i % dup_every == dup_every - 1 else f"{s}-{i}"
            meta[key] = {"sha256": group}
        paths.append(write_shard(root / f"t-{s:03d}.tar", items, meta))
    return f"{root}/t-{{000..{n_shards - 1:03d}}}.tar"


def _provider(pattern, window_pairs, seed=0, workers=0):
    skips = SkipLog()
    units = TrainUnits(DataConfig(format="webdataset", path=pattern), skips)
    prep = TrainPrep(PrepSpec(crops=1, crop_scale=(0.5, 1.0), seed=seed), False, (0.5, 1.0), seed)
    return EncoderBatches(units, None, None, False, False, "cls", prep, window_pairs, workers, torch.device("cpu"))


def _items(p, plan, epoch, start=0, cols=slice(None)):
    return [[x for part in parts for x in part] for parts in windowed_parts(p, epoch, plan, start, cols)]


def test_one_window_is_the_order_of_the_whole_sample_list(tmp_path):
    pattern = _shards(tmp_path)
    p = _provider(pattern, window_pairs=10**6)
    assert p.num_pairs == 120 and len(p.windows(0)) == 1
    # today's order: the whole grouped list, pairs in list order, EpochPlan's permutation
    samples = list(read_webdataset(pattern, group_by="sha256"))
    pairs = [(i, c) for i, smp in enumerate(samples) for c in range(len(smp.captions))]
    plan = EpochPlan(len(pairs), 16, 1, seed=0)
    for epoch in (0, 1):
        got = _items(p, plan, epoch)
        want = [[(samples[pairs[j][0]].key, samples[pairs[j][0]].captions[pairs[j][1]], pairs[j][0])
                 for j in row.tolist()] for row in plan.batches(epoch)]
        assert [[(k, c, i) for _, k, c, i in b] for b in got] == want


def test_windows_cover_every_pair_once_resume_and_columns(tmp_path):
    pattern = _shards(tmp_path)
    p = _provider(pattern, window_pairs=40, seed=3)  # 2 shards (40 pairs) per window
    wins = p.windows(0)
    assert len(wins) == 3 and sorted(i for w in wins for i in w) == list(range(6)) and wins != p.windows(1)
    plan = EpochPlan(p.num_pairs, 10, 1, seed=3)
    full = _items(p, plan, 0)
    assert len(full) == 12 and sorted((k, c) for b in full for _, k, c, _ in b) == sorted(
        (smp.key, cap) for smp in read_webdataset(pattern, group_by="sha256") for cap in smp.captions)
    # grouped: two captions of one image (same sha256) share the image's key and id; ids are unique per image
    ids = {}
    for b in full:
        for _, k, c, i in b:
            ids.setdefault(i, set()).add((k, c))
    assert sum(len(v) == 2 for v in ids.values()) == 6 * 5 and len(ids) == 120 - 30
    assert all(len({k for k, _ in v}) == 1 for v in ids.values())
    assert _items(p, plan, 0, start=7) == full[7:]  # resumed mid-epoch: the same batches
    a, b = _items(p, plan, 0, cols=slice(0, 4)), _items(p, plan, 0, cols=slice(4, 10))
    assert [x + y for x, y in zip(a, b)] == full  # two processes' columns make the one-process global batch
    assert _items(_provider(pattern, window_pairs=40, seed=3), plan, 1) == _items(p, plan, 1)


def test_at_most_three_windows_and_a_changed_shard(tmp_path):
    pattern = _shards(tmp_path, n_shards=8)
    p = _provider(pattern, window_pairs=20)  # one shard per window
    plan = EpochPlan(p.num_pairs, 15, 1, seed=0)
    most = 0
    for _ in windowed_parts(p, 0, plan):
        gc.collect()
        most = max(most, sum(type(o) is SampleWindow for o in gc.get_objects()))
    assert 1 <= most <= 3
    # a shard rewritten after the pairs were counted: a one-line error, not a wrong batch
    write_shard(tmp_path / "t-003.tar", synthetic_pairs(5))
    with pytest.raises(RecipeError, match="the training data changed while training"):
        for _ in windowed_parts(p, 0, plan):
            pass


def test_encoders_path_workers_equal_inline_and_stream_equals_one_window(tmp_path, tiny_vision_dir, text_dir):
    from align.config import load_train_recipe
    from align.training import train

    data = tmp_path / "d"
    pattern = _shards(data, n_shards=4, per=24)
    write_shard(data / "val-000.tar", synthetic_pairs(40, seed=1))
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data,
                     data={"format": "webdataset", "path": pattern},
                     features={"cache_dir": str(tmp_path / "cache"), "shard_size": 64})
    base = ["train.source=encoders", "train.epochs=2", "train.batch_size=16", "train.augment=true"]
    runs = {}
    for name, extra in {"inline": [], "workers": ["train.num_workers=2"],
                        "windows": ["train.window_pairs=30"]}.items():
        s = train(load_train_recipe(rp, base + extra + [f"train.output_dir={tmp_path / name}"]))
        runs[name] = s
    assert runs["inline"]["steps"] == 2 * (96 // 16)
    assert runs["workers"]["last_loss"] == runs["inline"]["last_loss"]  # bit-identical pixels from the workers
    assert runs["workers"]["first_loss"] == runs["inline"]["first_loss"]
    # windows of shards: another order (the first loss differs), the same amount of data, training still works
    assert runs["windows"]["steps"] == runs["inline"]["steps"]
    assert np.isfinite(runs["windows"]["last_loss"]) and runs["windows"]["first_loss"] != runs["inline"]["first_loss"]
