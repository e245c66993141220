"""Benchmarks of the media stages, each against a baseline measured side by side in the same run.

1. shard writing: samples/s and samples per CPU-second ("per core": the writer is single-threaded) for real
   224 px JPEGs (Flickr8k) through ``curate.shards.run_shards``; baselines: the same loop re-encoding every image
   with PIL (what a writer that normalises images does), and webdataset's ``TarWriter``.
2. pHash dedup: hashes/s of ``phash_bytes`` (DCT-scaled JPEG decode) vs ``imagehash.phash`` on a full decode;
   then the near-duplicate search over N random 64-bit codes with faiss ``IndexBinaryFlat`` /
   ``IndexBinaryMultiHash`` vs a numpy popcount brute force.
3. semantic dedup: image embeddings/s of a frozen DINOv2-S on CPU (``../shared/models/dinov2-small``), and the
   SemDeDup step (faiss k-means + within-cluster cosine) over N random 384-d vectors vs the full n×n
   similarity (chunked matmul) it replaces.

Usage:  python bench/bench_media.py [--images 2000] [--codes 100000] [--vectors 50000] [--embed 64]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tether.recipe import shared_dir  # noqa: E402


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _line(name: str, n: int, wall: float, cpu: float | None = None, unit: str = "samples") -> float:
    rate = n / wall
    extra = f", {n / cpu:,.0f} {unit}/CPU-s" if cpu else ""
    print(f"  {name:<46} {n:>8,} {unit} in {wall:7.2f} s = {rate:>10,.0f} {unit}/s{extra}")
    return rate


def bench_shards(photos: list[Path], work: Path) -> None:
    from PIL import Image

    from curate.catalog import Catalog
    from curate.download import DownloadConfig, load_selection, run_download
    from curate.shards import ShardConfig, ShardWriter, run_shards, sample_meta

    print(f"\n[1] shard writing, {len(photos):,} real 224 px JPEGs (Flickr8k)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    build = work / "build"
    build.mkdir(parents=True)
    pq.write_table(pa.table({"uid": [f"u{i:06d}" for i in range(len(photos))], "path": [str(p) for p in photos],
                             "caption": [f"a photo number {i}" for i in range(len(photos))],
                             "concept_ids": [["n02084071", "n00007846"]] * len(photos)}), build / "sel.parquet")
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "sel.parquet")
        run_download(cat, DownloadConfig(), build, progress=False)
        for p in photos:  # warm the page cache so every variant reads from memory
            p.read_bytes()
        res, wall, cpu = _timed(lambda: run_shards(cat, ShardConfig(samples_per_shard=1000), build, progress=False))
        ours = _line("tether run_shards (bytes as stored)", res.samples, wall, cpu)
        ours_cpu = res.samples / cpu
        rows = cat.execute("SELECT m.uid, m.caption, d.key FROM media_rows m JOIN downloads d USING (uid) "
                           "ORDER BY m.pos").fetchall()

    def reencode() -> int:
        w = ShardWriter(work / "reenc.tar")
        for i, (uid, cap, path) in enumerate(rows):
            with Image.open(path) as im:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=95)
            w.write(f"{i:010d}", buf.getvalue(), cap, sample_meta(uid, cap, ["n1"], "s", "", "", 224, 224))
        w.commit()
        return len(rows)

    n, wall, cpu = _timed(reencode)
    base = _line("baseline: PIL decode + re-encode each image", n, wall, cpu)
    base_cpu = n / cpu

    def wds_writer() -> int:
        import json

        import webdataset as wds

        with wds.TarWriter(str(work / "wds.tar")) as tw:
            for i, (uid, cap, path) in enumerate(rows):
                tw.write({"__key__": f"{i:010d}", "jpg": Path(path).read_bytes(), "txt": cap,
                          "json": json.dumps(sample_meta(uid, cap, ["n1"], "s", "", "", 224, 224))})
        return len(rows)

    n, wall, cpu = _timed(wds_writer)
    wdsr = _line("baseline: webdataset.TarWriter (bytes as stored)", n, wall, cpu)
    print(f"  ratio tether / PIL re-encode: {ours / base:.1f}x wall, {ours_cpu / base_cpu:.1f}x per CPU-s;"
          f" tether / webdataset TarWriter: {ours / wdsr:.2f}x wall")
    print(f"  goal >= 5,000 samples/s/core: {'MET' if ours_cpu >= 5000 else 'NOT met'} ({ours_cpu:,.0f}/CPU-s)")


def bench_phash(photos: list[Path], n_codes: int) -> None:
    import imagehash
    from PIL import Image

    from curate.imagededup import near_duplicates, phash_bytes

    print(f"\n[2] pHash dedup: hashing {len(photos):,} real JPEGs, then searching {n_codes:,} 64-bit codes")
    blobs = [p.read_bytes() for p in photos]
    phash_bytes(blobs[0]), imagehash.phash(Image.open(io.BytesIO(blobs[0])))  # warm-up (scipy import)
    _, wall, cpu = _timed(lambda: [phash_bytes(b) for b in blobs])
    ours = _line("tether phash_bytes (DCT-scaled decode)", len(blobs), wall, cpu, "images")
    _, wall, cpu = _timed(lambda: [imagehash.phash(Image.open(io.BytesIO(b))) for b in blobs])
    base = _line("baseline: imagehash.phash(Image.open) full decode", len(blobs), wall, cpu, "images")
    print(f"  ratio: {ours / base:.1f}x")

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n_codes, 8), dtype=np.uint8)
    k = n_codes // 100  # 1% planted near-duplicates (2 flipped bits)
    src = rng.choice(n_codes - k, k, replace=False)
    codes[-k:] = codes[src]
    codes[-k:, 0] ^= 0b00010001
    for index in ("flat", "multihash"):
        (keep, _, _), wall, cpu = _timed(lambda: near_duplicates(codes, 4, index))
        print(f"  faiss {index:<9} threshold 4: {wall:6.2f} s for {n_codes:,} codes, dropped {(~keep).sum():,} "
              f"({n_codes / wall:,.0f} codes/s)")
    nb = min(n_codes, 5000)
    sub = codes[:nb]
    lut = np.array([bin(i).count("1") for i in range(256)], np.uint8)

    def brute() -> int:
        hits = 0
        for s in range(0, nb, 1000):
            d = lut[np.bitwise_xor(sub[s:s + 1000, None, :], sub[None, :, :])].sum(-1)
            hits += int((d <= 4).sum())
        return hits

    _, wall_b, _ = _timed(brute)
    (_, _, _), wall_f, _ = _timed(lambda: near_duplicates(sub, 4, "flat"))
    print(f"  {nb:,} codes: numpy popcount brute force {wall_b:.2f} s vs faiss flat (incl. keep rule) {wall_f:.2f} s"
          f" = {wall_b / wall_f:.1f}x (brute force grows as n^2: {n_codes:,} would take ~"
          f"{wall_b * (n_codes / nb) ** 2:,.0f} s)")


def bench_semantic(photos: list[Path], n_vec: int, n_embed: int) -> None:
    from PIL import Image

    from curate.imagededup import semantic_duplicates

    print(f"\n[3] semantic dedup: DINOv2-S embeddings of {n_embed} images; SemDeDup over {n_vec:,} vectors")
    model = shared_dir() / "models" / "dinov2-small"
    if model.exists():
        from tether.encoders import VisionEncoder

        enc = VisionEncoder.load(str(model))
        ims = [Image.open(p).convert("RGB") for p in photos[:n_embed]]
        enc.encode(ims[:4], normalize=True)  # warm-up
        _, wall, cpu = _timed(lambda: enc.encode(ims, batch_size=32, normalize=True))
        _line("DINOv2-S (224 px, fp32, CPU) embeddings", len(ims), wall, None, "images")
    else:
        print(f"  (skipped: {model} not found)")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(200, 384)).astype(np.float32)
    x = centers[rng.integers(0, 200, n_vec)] + rng.normal(size=(n_vec, 384)).astype(np.float32) * 0.9
    k = n_vec // 100
    x[-k:] = x[:k] + rng.normal(size=(k, 384)).astype(np.float32) * 0.02
    (keep, _, _), wall, _ = _timed(lambda: semantic_duplicates(x, epsilon=0.01, seed=0))
    ours = _line(f"SemDeDup (k-means sqrt(n), eps 0.01): dropped {(~keep).sum():,}", n_vec, wall, None, "vectors")
    nb = min(n_vec, 20000)
    xb = x[:nb] / np.linalg.norm(x[:nb], axis=1, keepdims=True)

    def full() -> int:
        hits = 0
        for s in range(0, nb, 2048):
            hits += int((xb[s:s + 2048] @ xb.T >= 0.99).sum())
        return hits

    _, wall_b, _ = _timed(full)
    (_, _, _), wall_o, _ = _timed(lambda: semantic_duplicates(x[:nb], epsilon=0.01, seed=0))
    print(f"  {nb:,} vectors: full n x n similarity {wall_b:.2f} s vs SemDeDup {wall_o:.2f} s = "
          f"{wall_b / wall_o:.1f}x (the full form grows as n^2: {n_vec:,} would take "
          f"~{wall_b * (n_vec / nb) ** 2:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--codes", type=int, default=100_000)
    ap.add_argument("--vectors", type=int, default=50_000)
    ap.add_argument("--embed", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    imgs = shared_dir() / "data" / "flickr8k" / "images"
    if not imgs.exists():
        sys.exit(f"error: {imgs} not found (set TETHER_SHARED)")
    photos = sorted(imgs.glob("*.jpg"))[: args.images]
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (other jobs share these cores)")
    work = Path(tempfile.mkdtemp(prefix="bench_media_"))
    try:
        bench_shards(photos, work)
        bench_phash(photos, args.codes)
        bench_semantic(photos, args.vectors, args.embed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
