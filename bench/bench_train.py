"""Training throughput: samples/s from cached features for each head vs. running the frozen encoders every step.

Both sides use the training code of align/train.py (``CacheBatches`` / ``EncoderBatches`` feeding ``AlignTask``
= projectors + InfoNCE, AdamW steps), measured side by side in one run:

* cache path: random features with the dims of DINOv2-S (CLS+mean = 768-d pooled, 257 x 384 tokens) and
  MiniLM (384-d, 32 tokens), so no extraction is needed to measure the training loop itself;
* encoders path: real Flickr8k photos decoded + cropped + preprocessed, DINOv2-S (shared weights) and
  all-MiniLM-L6-v2 run per batch (``--tiny`` uses tiny random models when ../shared is absent).

    python bench/bench_train.py                      # all heads, batch 1024 (token head: 256)
    python bench/bench_train.py --heads mlp --steps 20
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from align.features import CachedFeatures
from align.loss import ContrastiveLoss
from align.model import DualProjector
from align.projectors import ProjectorConfig
from align.train import AlignTask, CacheBatches, EncoderBatches, EpochPlan, param_groups


def _task(kind: str, dims: dict, out_dim: int) -> tuple[AlignTask, torch.optim.Optimizer]:
    pc = ProjectorConfig(kind=kind, out_dim=out_dim)
    heads = DualProjector(pc, pc, dims["image_token"] if kind == "token" else dims["image"], dims["text"], 1)
    task = AlignTask(heads, ContrastiveLoss())
    return task, torch.optim.AdamW(param_groups(task, 0.02), lr=1e-3)


def train_step(task, opt, b: dict, bf16: bool = False) -> tuple[int, torch.Tensor]:
    """One optimiser step of ``task`` on batch ``b`` (forward under CPU bf16 autocast when ``bf16``): the batch's
    size and its loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = task(b["image"], b["text"], b["text_mask"], b["image_ids"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(b["image"].shape[0]), loss.detach()


def _steps(task, opt, batches, n_steps: int, warm: int = 2, bf16: bool = False) -> tuple[float, int]:
    """Run ``warm`` + ``n_steps`` steps; return (seconds for the timed steps, pairs in them).

    ``bf16``: forward under CPU bfloat16 autocast, as ``train.mixed_precision: bf16`` does."""
    task.train()
    seen, t0 = 0, None
    for i, b in enumerate(batches):
        if i == warm:
            t0 = time.perf_counter()
        n, _ = train_step(task, opt, b, bf16)
        if i >= warm:
            seen += n
        if i + 1 == warm + n_steps:
            break
    return time.perf_counter() - t0, seen


def bench_cache(kind: str, batch: int, n_steps: int, out_dim: int, bf16: bool = False) -> float:
    n = batch * (n_steps + 2)
    d_img, d_tok, d_txt, T, L = 768, 384, 384, 257, 32
    g = torch.Generator().manual_seed(0)
    tokens = kind == "token"
    feats = CachedFeatures(image=torch.randn(n, 1, d_img, generator=g), text=torch.randn(n, d_txt, generator=g),
                           text_image=torch.arange(n), keys=[str(i) for i in range(n)], captions=[""] * n)
    if tokens:
        feats.image_tokens = torch.randn(n, 1, T, d_tok, generator=g, dtype=torch.float16)
        feats.text_tokens = torch.randn(n, L, d_txt, generator=g, dtype=torch.float16)
        feats.text_mask = (torch.arange(L)[None] < torch.randint(8, L, (n, 1), generator=g)).to(torch.int8)
    prov = CacheBatches(feats, tokens, tokens, augment=False, seed=0, device=torch.device("cpu"))
    task, opt = _task(kind, {"image": d_img, "image_token": d_tok, "text": d_txt}, out_dim)
    secs, seen = _steps(task, opt, prov.epoch(0, EpochPlan(n, batch, 1, 0)), n_steps, bf16=bf16)
    return seen / secs


def bench_encoders(batch: int, n_steps: int, out_dim: int, tiny: bool) -> tuple[float, str]:
    from align.data import read_flickr8k
    from tether.encoders import TextEncoder, VisionEncoder
    from tether.recipe import shared_dir

    sh = shared_dir()
    if tiny or not (sh / "models" / "dinov2-small").exists():
        raise SystemExit("encoders baseline needs ../shared (DINOv2-S + Flickr8k); set TETHER_SHARED")
    vision = VisionEncoder.load(str(sh / "models" / "dinov2-small"), layer=11)
    text = TextEncoder.load("sentence-transformers/all-MiniLM-L6-v2", max_length=64)
    samples = list(read_flickr8k(sh / "data" / "flickr8k", "train", limit=batch * (n_steps + 2)))
    prov = EncoderBatches(samples, vision, text, False, False, "cls+mean", augment=True, crop_scale=(0.5, 1.0),
                          seed=0, num_workers=0, device=torch.device("cpu"))
    task, opt = _task("mlp", {"image": 2 * vision.dim, "text": text.dim}, out_dim)
    secs, seen = _steps(task, opt, prov.epoch(0, EpochPlan(prov.num_pairs, batch, 1, 0)), n_steps, warm=1)
    return seen / secs, "DINOv2-S (shared, layer 11) + all-MiniLM-L6-v2, Flickr8k photos"


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """The machine's fp32 matmul rate right now (calibrates the numbers when cores are shared)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="linear,mlp,token")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--token-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--enc-batch", type=int, default=32)
    ap.add_argument("--enc-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--precision", default="fp32,bf16", help="fp32 and/or bf16 (CPU autocast) for the cache path")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, out_dim {args.out_dim}; "
          f"fp32 1024^3 matmul now: {matmul_gflops():.0f} GFLOP/s")
    rates = {}
    for kind in args.heads.split(","):
        b = args.token_batch if kind == "token" else args.batch
        for prec in args.precision.split(","):
            r = bench_cache(kind, b, args.steps, args.out_dim, bf16=prec == "bf16")
            rates[f"{kind}/{prec}"] = r
            print(f"cache   {kind:6s} head  {prec}  batch {b:5d}: {r:10.0f} samples/s")
    enc, what = bench_encoders(args.enc_batch, args.enc_steps, args.out_dim, args.tiny)
    print(f"encoders every step (mlp head, batch {args.enc_batch}, {what}): {enc:.1f} samples/s")
    for kind, r in rates.items():
        print(f"ratio cache/{kind} vs encoders-every-step: {r / enc:.0f}x")
    best = max((r for k, r in rates.items() if k.startswith("mlp/")), default=None)
    if best is not None:
        print(f"goal >= 5000 samples/s for the pooled MLP head at batch {args.batch}: "
              f"{'MET' if best >= 5000 else 'NOT met'} (best {best:.0f})")


if __name__ == "__main__":
    main()
