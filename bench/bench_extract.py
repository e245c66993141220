"""Feature extraction's data path: images/s of `align extract` serially vs with N data workers, on real photos.

Runs ``align.features.extract_features`` (the code `align extract` runs) over the first ``--images`` Flickr8k
training photos (from the shared folder: ``$TETHER_SHARED`` or ``../shared``) several times, each into a fresh
cache:

* ``serial``: ``features.workers: 0, preprocess: processor`` — today's path: decode + the encoder's own image
  processor in the main process between encoder calls;
* ``workersN``: ``features.workers: N`` with ``--preprocess`` (processor: the same pixels, so the ratio is the
  workers alone; fast: tether.imageprep's draft decode + uint8 resize/crop, normalised next to the encoder).

``--null-encoder`` replaces the vision encoder by one that returns zeros (the data path's ceiling: what an
accelerator that encodes for free would see); otherwise ``--encoder`` (lite0: EfficientNet-Lite0, dinov2-s: the
shared DINOv2 ViT-S/14) encodes on CPU. The text side is always a null encoder (captions are not measured here).
Worker start-up (spawned processes) is included in each run's time. A per-core preprocessing table (processor vs
fast, one thread, decoded images in memory) is printed first.

    python bench/bench_extract.py --images 3000 --workers 1 2 --null-encoder
    python bench/bench_extract.py --images 1000 --workers 1 2 --encoder lite0 --preprocess fast

The LAST line is ``extract: serial=A workers1=B workers2=C ratio2=C/A`` (images/s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shared_root(arg: str | None) -> Path:
    root = Path(arg or os.environ.get("TETHER_SHARED") or REPO.parent / "shared")
    if not (root / "data" / "flickr8k" / "captions.txt").is_file():
        sys.exit(f"bench_extract: no Flickr8k under {root}/data/flickr8k (pass --shared DIR or set TETHER_SHARED)")
    return root


def processor_of(encoder: str, shared: Path):
    if encoder == "lite0":
        from tether.zoo import backbone_spec

        return backbone_spec("efficientnet-lite0").transform(None, None, None)
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(shared / "models" / "dinov2-small"))


class NullVision:
    """A vision encoder that encodes for free: the encoder's processor, zeros for features."""

    def __init__(self, processor, dim: int = 384):
        self.processor, self.name, self.fingerprint, self.layer = processor, "null", "null", -1
        self.device, self.dtype, self.dim, self.num_prefix_tokens = torch.device("cpu"), torch.float32, dim, 1
        to_dict = getattr(processor, "to_dict", None)
        self.preprocessing = to_dict() if callable(to_dict) else {}

    def pooled_dim(self, pooling: str) -> int:
        return self.dim * (2 if pooling == "cls+mean" else 1)

    def tokens(self, pixel_values: torch.Tensor, layer=None) -> torch.Tensor:
        return torch.zeros(pixel_values.shape[0], 2, self.dim)

    def pool(self, tokens: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        return tokens[:, 0] if pooling != "cls+mean" else torch.cat([tokens[:, 0], tokens[:, 1]], -1)


def null_text():
    from tether.encoders import PooledTextEncoder

    class NullText(PooledTextEncoder):
        fingerprint = "null"

        def embed(self, texts):
            return np.zeros((len(texts), self.dim), np.float32)

    return NullText("null-text", 16)


def per_core_table(paths: list[str], processor, reps: int = 1) -> tuple[float, float]:
    """Images/s on one thread of the processor vs the fast path on decoded images (no decode)."""
    from align.data import decode_image
    from tether.imageprep import FastImagePrep

    torch.set_num_threads(1)
    ims = [decode_image(p) for p in paths]
    fast = FastImagePrep.from_processor(processor)
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(0, len(ims), 64):
            processor(images=ims[i:i + 64], return_tensors="pt")
    hf = len(ims) * reps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(0, len(ims), 64):
            fast.batch_uint8(ims[i:i + 64])
    f_worker = len(ims) * reps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(0, len(ims), 64):
            fast.normalize(fast.batch_uint8(ims[i:i + 64]))
    f_all = len(ims) * reps / (time.perf_counter() - t0)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"per core, {len(ims)} decoded photos: processor {hf:,.0f} img/s | fast resize+crop (the workers' part) "
          f"{f_worker:,.0f} img/s = {f_worker / hf:.2f}x | fast incl. normalise on CPU {f_all:,.0f} img/s = "
          f"{f_all / hf:.2f}x")
    return hf, f_worker


def run(samples, vision, text, workers: int, preprocess: str, shard_size: int, batch: int) -> float:
    from align.features import FeatureConfig, extract_features

    out = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        cfg = FeatureConfig(workers=workers, preprocess=preprocess, shard_size=shard_size, batch_size=batch)
        t0 = time.perf_counter()
        cache = extract_features(iter(samples), vision, text, out / "c", cfg, data_id={"bench": len(samples)},
                                 progress=False)
        dt = time.perf_counter() - t0
        assert cache.num_images == len(samples), (cache.num_images, len(samples))
        return len(samples) / dt
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--null-encoder", action="store_true")
    ap.add_argument("--encoder", choices=["lite0", "dinov2-s"], default="lite0")
    ap.add_argument("--preprocess", choices=["processor", "fast"], default="processor",
                    help="the workers' preprocessing (serial is always the processor: today's path)")
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shared")
    args = ap.parse_args(argv)
    if args.images < 1 or any(w < 1 for w in args.workers):
        sys.exit("bench_extract: --images and --workers must be >= 1")
    shared = shared_root(args.shared)
    from align.data import read_flickr8k

    samples = list(read_flickr8k(shared / "data" / "flickr8k", "train", limit=args.images))
    processor = processor_of(args.encoder, shared)
    per_core_table([s.image for s in samples[:300]], processor)
    if args.null_encoder:
        vision = NullVision(processor)
    else:
        from tether.encoders import VisionEncoder

        vision = VisionEncoder.load("efficientnet-lite0" if args.encoder == "lite0"
                                    else str(shared / "models" / "dinov2-small"))
    text = null_text()
    what = "null encoder" if args.null_encoder else f"{args.encoder} on CPU"
    print(f"{len(samples):,} Flickr8k photos, {what}, {os.cpu_count()} cores, shard {args.shard_size}, "
          f"batch {args.batch_size}")
    serial = run(samples, vision, text, 0, "processor", args.shard_size, args.batch_size)
    print(f"serial    (workers 0, processor): {serial:,.0f} img/s")
    got = {}
    for w in args.workers:
        got[w] = run(samples, vision, text, w, args.preprocess, args.shard_size, args.batch_size)
        print(f"workers{w:<3} ({args.preprocess}): {got[w]:,.0f} img/s = {got[w] / serial:.2f}x serial")
    w1, w2 = got.get(1, float("nan")), got.get(2, float("nan"))
    print(f"extract: serial={serial:.0f} workers1={w1:.0f} workers2={w2:.0f} ratio2={w2 / serial:.2f}")


if __name__ == "__main__":
    main()
