"""Multi-layer vision features: one forward pass for several hidden layers (``vision.layer: [..]``) against one pass
per layer (each layer a separate ensemble member, as before), on real photos and the shared DINOv2-S weights.

Both arms encode the same preprocessed pixels (the first ``--images`` Flickr8k training photos, decoded and
preprocessed once, outside the timing) in batches of ``--batch-size``; the features are checked to be the same
(max abs difference printed). Torch uses every core it is given (``--threads``, default all).

    python bench/bench_layers.py --images 256 --layers 9 10 11 -1

The LAST line is ``layers: per-layer A s, one pass B s, x<A/B> (L layers, N images)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="+", default=[9, 10, 11, -1])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--shared", default=os.environ.get("TETHER_SHARED", "../shared"))
    args = ap.parse_args(argv)
    from PIL import Image

    from tether.encoders import VisionEncoder

    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    photos = sorted((shared / "data" / "flickr8k" / "images").glob("*.jpg"))[:args.images]
    if not photos:
        raise SystemExit(f"no Flickr8k photos under {shared}/data/flickr8k")
    enc = VisionEncoder.load(str(shared / "models" / "dinov2-small"), layer=list(args.layers))
    batches = [enc.preprocess([Image.open(p) for p in photos[i:i + args.batch_size]])
               for i in range(0, len(photos), args.batch_size)]
    enc.tokens(batches[0][:2])  # warm-up

    t0 = time.perf_counter()
    per_layer = [torch.cat([enc.pool(enc.tokens(px, layer=k), "cls+mean") for px in batches]) for k in args.layers]
    t_sep = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = torch.cat([enc.pool(enc.tokens(px), "cls+mean") for px in batches])
    t_one = time.perf_counter() - t0

    d, n = enc.model.config.hidden_size, len(args.layers)
    # one pass: [cls of every layer, mean of every layer]; per layer: [cls_k, mean_k]
    want = torch.cat([torch.cat([p[:, :d] for p in per_layer], 1), torch.cat([p[:, d:] for p in per_layer], 1)], 1)
    diff = float((want - one).abs().max())
    print(f"{len(photos)} images, layers {args.layers}, batch {args.batch_size}, {args.threads} threads: "
          f"{n} passes {t_sep:.1f} s ({len(photos) / t_sep:.1f} img/s), one pass {t_one:.1f} s "
          f"({len(photos) / t_one:.1f} img/s); max |difference| {diff:.2e}")
    print(f"layers: per-layer {t_sep:.1f} s, one pass {t_one:.1f} s, x{t_sep / t_one:.2f} ({n} layers, "
          f"{len(photos)} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
