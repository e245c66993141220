"""align/training/stream.py: training batches from a cache larger than memory — exact, shuffled, resumable,
bounded; identical to the in-memory batches when the cache fits."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from align.features import FeatureCache, write_cache
from align.training.batches import CacheBatches, EpochPlan
from align.training.stream import Part, StreamedCacheBatches, Window, cache_bytes


def synthetic_cache(root, images=(30, 25, 40, 35, 20), caps=3, views=2, dv=6, dt=4, dtype=torch.float32,
                    tokens=False):
    """Shards whose features name themselves: image[i, k, 0] = 10 * global image + k, text[j, 0] = global pair j."""
    shards, img0, txt0 = [], 0, 0
    for n in images:
        m = n * caps
        image = torch.zeros(n, views, dv, dtype=dtype)
        image[:, :, 0] = (10 * (img0 + torch.arange(n)).view(-1, 1) + torch.arange(views)).to(dtype)
        image[:, :, 1:] = torch.randn(n, views, dv - 1).to(dtype)
        text = torch.randn(m, dt).to(dtype)
        text[:, 0] = (txt0 + torch.arange(m)).to(dtype)
        t = {"image": image, "text": text, "text_image": torch.arange(n).repeat_interleave(caps)}
        if tokens:
            L = 3 + len(shards)  # each shard padded to its own length
            t["text_tokens"] = text[:, None, :].repeat(1, L, 1)
            t["text_mask"] = torch.ones(m, L, dtype=torch.int8)
            t["image_tokens"] = image[:, :, None, :].repeat(1, 1, 2, 1)
        keys = [f"k{img0 + i}" for i in range(n)]
        shards.append((t, {"keys": json.dumps(keys), "captions": json.dumps([f"c{txt0 + j}" for j in range(m)])}))
        img0, txt0 = img0 + n, txt0 + m
    key = {"crops": views, "dtype": "float32" if dtype == torch.float32 else "float16", "tokens": tokens}
    return write_cache(root, key, {"image": dv, "text": dt, "image_token": dv, "num_prefix_tokens": 1}, shards)


def _batches(provider, plan, epoch, start=0, cols=slice(None)):
    return list(provider.epoch(epoch, plan, start, cols))


def test_one_window_equals_the_in_memory_batches(tmp_path):
    cache = synthetic_cache(tmp_path / "c")
    ram = CacheBatches(cache.load(dtype=None), False, False, augment=True, seed=3, device=torch.device("cpu"))
    st = StreamedCacheBatches(cache, Part(), augment=True, seed=3, device=torch.device("cpu"),
                              memory_bytes=2 * cache_bytes(cache, Part()))
    assert len(st.windows(0)) == 1 and st.num_pairs == ram.num_pairs == 450
    plan = EpochPlan(st.num_pairs, 32, 2, seed=3)
    for epoch in (0, 1):
        a, b = _batches(ram, plan, epoch), _batches(st, plan, epoch)
        assert len(a) == len(b) == plan.batches_per_epoch
        for x, y in zip(a, b):
            for k in ("image", "text", "image_ids"):
                assert torch.equal(x[k], y[k]), k


def test_windows_cover_every_pair_once_with_global_image_ids_and_resume(tmp_path):
    cache = synthetic_cache(tmp_path / "c")
    per_shard = cache_bytes(cache, Part()) // 5
    st = StreamedCacheBatches(cache, Part(), augment=True, seed=0, device=torch.device("cpu"),
                              memory_bytes=int(2.2 * per_shard))
    wins = st.windows(0)
    assert len(wins) >= 3 and sorted(i for w in wins for i in w) == list(range(5))
    assert st.windows(1) != wins  # the shard order is shuffled per epoch
    plan = EpochPlan(st.num_pairs, 40, 1, seed=0)
    text_image = cache.load().text_image
    bs = _batches(st, plan, 0)
    assert len(bs) == plan.batches_per_epoch == 450 // 40
    pairs = torch.cat([b["text"][:, 0] for b in bs]).long()
    assert len(set(pairs.tolist())) == len(pairs) == 11 * 40  # each pair at most once, the rest dropped
    ids = torch.cat([b["image_ids"] for b in bs])
    assert torch.equal(ids, text_image[pairs])  # global ids: captions of one image are positives anywhere
    img = torch.cat([b["image"][:, 0] for b in bs]).long()
    assert torch.equal(img // 10, ids) and set((img % 10).tolist()) == {0, 1}  # both cached crops are drawn
    # shuffled within windows: not the shard order
    assert not torch.equal(pairs, torch.sort(pairs).values)
    # resume mid-epoch: the same batches as the uninterrupted epoch
    tail = _batches(st, plan, 0, start=7)
    for x, y in zip(bs[7:], tail):
        assert torch.equal(x["text"], y["text"]) and torch.equal(x["image"], y["image"])
    # two processes' column slices make up the global batch
    half = [_batches(st, plan, 0, cols=slice(r * 20, (r + 1) * 20)) for r in (0, 1)]
    for full, a, b in zip(bs, *half):
        assert torch.equal(full["text"], torch.cat([a["text"], b["text"]]))
    # another seed, another order
    other = StreamedCacheBatches(cache, Part(), augment=True, seed=1, device=torch.device("cpu"),
                                 memory_bytes=int(2.2 * per_shard))
    assert not torch.equal(torch.cat([b["text"][:, 0] for b in _batches(other, plan, 0)]).long(), pairs)


def test_at_most_two_windows_are_held(tmp_path):
    cache = synthetic_cache(tmp_path / "c", images=(20,) * 12)
    per_shard = cache_bytes(cache, Part()) // 12
    st = StreamedCacheBatches(cache, Part(), augment=False, seed=0, device=torch.device("cpu"),
                              memory_bytes=2 * per_shard)  # one shard per window
    plan = EpochPlan(st.num_pairs, 25, 1, seed=0)
    most = 0
    for _ in st.epoch(0, plan):
        gc.collect()
        most = max(most, sum(type(o) is Window for o in gc.get_objects()))
    assert 1 <= most <= 3  # the window in use, the one ending (a batch spanning both) and the one read ahead


def test_fp16_stays_fp16_until_the_batch_and_tokens_pad_across_shards(tmp_path):
    cache = synthetic_cache(tmp_path / "c", dtype=torch.float16, tokens=True)
    part = Part(tokens_image=True, tokens_text=True)
    st = StreamedCacheBatches(cache, part, augment=False, seed=0, device=torch.device("cpu"),
                              memory_bytes=cache_bytes(cache, part) // 2)
    win = st._load(0, 0, [0, 4])
    assert win.text.dtype == torch.float16 and win.text.shape[1] == 3 + 4  # the cache's longest grid
    assert win.mask[:, 3:].sum() > 0 and win.mask[: 30 * 3, 3:].sum() == 0  # shard 0's rows padded
    plan = EpochPlan(st.num_pairs, 16, 1, seed=0)
    b = next(st.epoch(0, plan))
    assert b["text"].dtype == torch.float32 and b["text"].shape[1:] == (7, 4) and b["text_mask"].shape == (16, 7)
    assert b["image"].shape == (16, 2, 6)


def test_image_pooling_slice_and_a_corrupt_shard(tmp_path):
    cache = synthetic_cache(tmp_path / "c")
    st = StreamedCacheBatches(cache, Part(image_dims=(1, 4)), augment=False, seed=0, device=torch.device("cpu"),
                              memory_bytes=1000)
    plan = EpochPlan(st.num_pairs, 16, 1, seed=0)
    assert next(st.epoch(0, plan))["image"].shape == (16, 3)
    # damage one shard after the checksums were recorded: reading it is refused with the one-line error
    f = tmp_path / "c" / "shard-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    from align.features import CorruptCacheError
    from tether.fileio import _VERIFIED

    _VERIFIED.clear()
    fresh = StreamedCacheBatches(FeatureCache.open(tmp_path / "c"), Part(), augment=False, seed=0,
                                 device=torch.device("cpu"), memory_bytes=1000)
    with pytest.raises(CorruptCacheError, match="shard-00002.safetensors is corrupt"):
        for _ in fresh.epoch(0, plan):
            pass


def test_window_budget_follows_the_stored_dtype(tmp_path):
    a = cache_bytes(synthetic_cache(tmp_path / "a", dv=256, dt=128), Part())
    b = cache_bytes(synthetic_cache(tmp_path / "b", dv=256, dt=128, dtype=torch.float16), Part())
    assert a == pytest.approx(2 * b, rel=0.2) and np.isfinite(a)


def test_read_tensors_own_their_memory_and_reject_a_changed_file(tmp_path):
    """Cache reads never map the file: a shard replaced in place after it was read (or while a read-ahead thread
    reads it) must not crash the process with SIGBUS; a truncated or garbage file is a one-line CorruptCacheError."""
    from align.features import CorruptCacheError, read_tensors
    from tether.fileio import _VERIFIED

    cache = synthetic_cache(tmp_path / "c", images=(30,), dtype=torch.float16)
    entry = cache.manifest["shards"][0]
    f = tmp_path / "c" / entry["file"]
    kept = [sh["image"] for sh in cache.iter_shards(dtype=None)] + [cache.load(dtype=None).image]
    t, meta = read_tensors(f, entry, keep=lambda n: n != "text")
    assert set(t) == {"image", "text_image"} and json.loads(meta["keys"])[0] == "k0"
    assert t["image"].dtype == torch.float16 and t["image"].shape == (30, 2, 6)
    original = f.read_bytes()
    f.write_bytes(b"")  # truncated in place: a mapped tensor would now be a SIGBUS when touched
    assert all(torch.isfinite(x.float()).all() for x in kept + [t["image"]])
    _VERIFIED.clear()
    with pytest.raises(CorruptCacheError, match="is corrupt"):
        read_tensors(f, entry)
    f.write_bytes(original[: len(original) // 2])
    with pytest.raises(CorruptCacheError, match="is corrupt"):
        read_tensors(f, entry)
    with pytest.raises(CorruptCacheError, match="not a readable safetensors file"):
        read_tensors(f, {})  # no checksum recorded: the header and offsets are still checked
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCacheError, match="not a readable safetensors file"):
        read_tensors(f, {})


def test_closing_an_epoch_stops_its_read_ahead(tmp_path):
    import threading

    cache = synthetic_cache(tmp_path / "c", images=(20,) * 12)
    st = StreamedCacheBatches(cache, Part(), augment=False, seed=0, device=torch.device("cpu"),
                              memory_bytes=2 * (cache_bytes(cache, Part()) // 12))  # one shard per window
    plan = EpochPlan(st.num_pairs, 25, 1, seed=0)
    before = threading.active_count()
    it = st.epoch(0, plan)
    next(it)
    it.close()  # what the trainer does on max_steps, an error or a kill
    assert threading.active_count() == before
