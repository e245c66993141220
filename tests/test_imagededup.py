"""Image dedup: exact (sha256), near (pHash + faiss binary index), semantic (SemDeDup) with the keep rule."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.catalog import Catalog
from curate.download import DownloadConfig, load_selection, run_download
from curate.imagededup import (ImageDedupConfig, greedy_keep, near_duplicates, phash_bytes, run_image_dedup,
                               semantic_duplicates)
from httpserver import make_build


def _drops(cat: Catalog) -> dict[str, str]:
    return dict(cat.execute("SELECT uid, ref_uid FROM decisions WHERE stage='image_dedup' AND NOT kept").fetchall())


def _hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def test_binary_indexes_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 8), dtype=np.uint8)
    noisy = base.copy()
    for row in noisy:  # flip 0..5 bits
        for bit in rng.choice(64, rng.integers(0, 6), replace=False):
            row[bit // 8] ^= np.uint8(1 << (bit % 8))
    codes = np.concatenate([base, noisy])
    order = rng.permutation(len(codes))
    codes = codes[order]
    n = len(codes)
    d = np.array([[_hamming(codes[i], codes[j]) for j in range(n)] for i in range(n)])
    q, j = np.nonzero(d <= 3)
    want = greedy_keep(n, q, j, d[q, j].astype(float), larger_is_closer=False)
    for index in ("flat", "multihash"):
        keep, ref, dist = near_duplicates(codes, 3, index)
        assert np.array_equal(keep, want[0]) and np.array_equal(ref, want[1]), index
    assert 0 < (~keep).sum() < 40
    assert all(ref[i] < i and keep[ref[i]] for i in np.flatnonzero(~keep))  # refs are kept, higher-ranked


def test_greedy_keep_never_chains_through_dropped():
    # 0~1 and 1~2 but not 0~2: 1 is dropped for 0, so 2 (whose only duplicate 1 was dropped) survives
    keep, ref, _ = greedy_keep(3, np.array([0, 1, 1, 2]), np.array([1, 0, 2, 1]), np.ones(4), larger_is_closer=False)
    assert keep.tolist() == [True, False, True] and ref.tolist() == [-1, 0, -1]


def test_semantic_duplicates_on_vectors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    dup = x[:10] + 0.01 * rng.normal(size=(10, 16)).astype(np.float32)  # cos ≈ 0.9998
    emb = np.concatenate([x, dup])
    keep, ref, cos = semantic_duplicates(emb, epsilon=0.01, clusters=6, seed=0)
    assert keep[:60].all() and not keep[60:].any()
    assert ref[60:].tolist() == list(range(10)) and (cos[60:] > 0.99).all()


def _variants(src: Path, out: Path, stem: str) -> dict[str, Path]:
    """Copies of a real photo: byte-identical, re-encoded (q=40), resized to 60%, cropped by 2% per side."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    paths = {"copy": out / f"{stem}_copy.jpg", "reenc": out / f"{stem}_reenc.jpg",
             "resized": out / f"{stem}_resized.jpg", "cropped": out / f"{stem}_cropped.jpg"}
    shutil.copyfile(src, paths["copy"])
    im.save(paths["reenc"], quality=40)
    im.resize((int(w * 0.6), int(h * 0.6)), Image.Resampling.BILINEAR).save(paths["resized"], quality=90)
    dx, dy = int(w * 0.02), int(h * 0.02)
    im.crop((dx, dy, w - dx, h - dy)).save(paths["cropped"], quality=90)
    return paths


def _build_with_variants(tmp_path: Path, originals: list[Path], n_dup: int) -> tuple[Path, dict]:
    rows, truth = [], {}
    for i, p in enumerate(originals):
        rows.append({"uid": f"a{i:02d}", "path": str(p), "caption": f"photo {i}", "concept_ids": ["n1"]})
        if i < n_dup:
            for kind, vp in _variants(p, tmp_path, f"v{i:02d}").items():
                uid = f"b{i:02d}-{kind}"
                rows.append({"uid": uid, "path": str(vp), "caption": f"copy {i}", "concept_ids": ["n1"]})
                truth[uid] = (f"a{i:02d}", kind)
    build = tmp_path / "build"
    make_build(build, rows)
    return build, truth


@pytest.mark.real
def test_phash_and_sha256_find_real_copies(flickr8k, tmp_path):
    originals = sorted((flickr8k / "images").glob("*.jpg"))[200:224]
    build, truth = _build_with_variants(tmp_path, originals, n_dup=6)
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        run_download(cat, DownloadConfig(), build, progress=False)
        res = run_image_dedup(cat, ImageDedupConfig(phash={"threshold": 10}), build, progress=False)
        got = {u: (r, why) for u, r, why in cat.execute(
            "SELECT uid, ref_uid, reason FROM decisions WHERE stage='image_dedup' AND NOT kept").fetchall()}
        kept = {u for (u,) in cat.execute("SELECT uid FROM decisions WHERE stage='image_dedup' AND kept").fetchall()}
        n_hashes = cat.scalar("SELECT count(*) FROM image_hashes")
    assert set(got) == set(truth)  # every variant found, no distinct photo dropped
    assert kept == {f"a{i:02d}" for i in range(len(originals))}
    for uid, (orig, kind) in truth.items():
        ref, why = got[uid]
        assert ref == orig, (uid, ref, why)
        assert why.startswith("exact duplicate") if kind == "copy" else why.startswith("near duplicate")
    assert res.dropped == {"exact": 6, "phash": 18}
    assert n_hashes == len(originals) + 18  # exact copies are not hashed


def test_phash_of_resized_copy_is_close():
    rng = np.random.default_rng(0)
    arr = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(arr).resize((256, 192), Image.Resampling.BICUBIC)
    a, b = io.BytesIO(), io.BytesIO()
    im.save(a, format="JPEG", quality=95)
    im.resize((128, 96)).save(b, format="PNG")
    ha, hb = (np.frombuffer(phash_bytes(x.getvalue()), np.uint8) for x in (a, b))
    other = np.frombuffer(phash_bytes(_noise_jpeg(1)), np.uint8)
    assert _hamming(ha, hb) <= 4 < _hamming(ha, other)


def _noise_jpeg(seed: int) -> bytes:
    arr = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_semantic_dedup_with_tiny_encoder_and_resume(tiny_vision, tmp_path):
    """The SemDeDup path end to end with a tiny random DINOv2; exact/pHash off so only embeddings decide."""
    rows = []
    for i in range(6):
        p = tmp_path / f"n{i}.jpg"
        p.write_bytes(_noise_jpeg(10 + i))
        rows.append({"uid": f"a{i}", "path": str(p), "caption": "x", "concept_ids": ["n1"]})
    for i in range(2):  # byte copies: cosine 1.0
        q = tmp_path / f"c{i}.jpg"
        shutil.copyfile(tmp_path / f"n{i}.jpg", q)
        rows.append({"uid": f"b{i}", "path": str(q), "caption": "x", "concept_ids": ["n1"]})
    build = tmp_path / "b"
    make_build(build, rows)
    cfg = ImageDedupConfig(exact=False, phash={"enabled": False}, chunk=3,
                           semantic={"enabled": True, "epsilon": 1e-5, "clusters": 2})
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        run_download(cat, DownloadConfig(), build, progress=False)
        res = run_image_dedup(cat, cfg, build, encoder=tiny_vision, progress=False)
        drops = _drops(cat)
        assert drops == {"b0": "a0", "b1": "a1"} and res.dropped == {"semantic": 2}
        files = sorted((build / "media" / "embeddings").glob("*.npy"))
        assert len(files) == 3 and cat.scalar("SELECT count(*) FROM image_embeddings") == 8
        # rerun: embeddings come from the cache (no new chunk files), same verdicts
        run_image_dedup(cat, cfg, build, encoder=tiny_vision, progress=False)
        assert sorted((build / "media" / "embeddings").glob("*.npy")) == files
        again = _drops(cat)
        assert again == drops


@pytest.mark.real
def test_semantic_dedup_with_dinov2_small(dinov2_small, flickr8k, tmp_path):
    from tether.encoders import VisionEncoder

    enc = VisionEncoder.load(str(dinov2_small), layer=11)
    originals = sorted((flickr8k / "images").glob("*.jpg"))[300:306]
    build, truth = _build_with_variants(tmp_path, originals, n_dup=1)
    # measured on these weights: distinct photos cos <= 0.92, copies >= 0.99 (docs/media.md)
    cfg = ImageDedupConfig(exact=False, phash={"enabled": False},
                           semantic={"enabled": True, "epsilon": 0.03, "clusters": 2, "layer": 11})
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        run_download(cat, DownloadConfig(), build, progress=False)
        run_image_dedup(cat, cfg, build, encoder=enc, progress=False)
        drops = _drops(cat)
    assert drops == {u: o for u, (o, _) in truth.items()}


def test_rows_sharing_an_image_are_judged_together(tmp_path):
    """Several captions of one file are not duplicates of each other; a copy of the file drops all its rows."""
    for name, seed in (("x.jpg", 1), ("y.jpg", 2)):
        (tmp_path / name).write_bytes(_noise_jpeg(seed))
    shutil.copyfile(tmp_path / "x.jpg", tmp_path / "x_copy.jpg")
    rows = [{"uid": u, "path": str(tmp_path / f), "caption": u, "concept_ids": ["n1"]}
            for u, f in (("a0", "x.jpg"), ("a1", "x.jpg"), ("a2", "x.jpg"), ("b0", "x_copy.jpg"),
                         ("b1", "x_copy.jpg"), ("c0", "y.jpg"))]
    build = tmp_path / "b"
    make_build(build, rows)
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        run_download(cat, DownloadConfig(), build, progress=False)
        res = run_image_dedup(cat, ImageDedupConfig(), build, progress=False)
        got = _drops(cat)
        assert got == {"b0": "a0", "b1": "a0"} and res.dropped["exact"] == 2
        assert cat.scalar("SELECT count(*) FROM image_hashes") == 2  # x and y hashed once each
        res = run_image_dedup(cat, ImageDedupConfig(group_same_source=False), build, progress=False)
        got = _drops(cat)
        assert got == {"a1": "a0", "a2": "a0", "b0": "a0", "b1": "a0"}
