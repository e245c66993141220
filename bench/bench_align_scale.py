"""Training from a feature cache at scale: peak memory and samples/s of the streamed loader vs the in-RAM one.

Writes (once; reused while its manifest matches) a synthetic cache in tether's own format with the dims of
EfficientNet-Lite0 (1280-d pooled) + all-MiniLM-L6-v2 (384-d), stored fp16, ``--captions`` captions per image, and
trains a fixed number of steps from it with the training code (``StreamedCacheBatches`` / ``CacheBatches``
feeding ``AlignTask`` = the default MLP heads + InfoNCE, AdamW): the streamed loader on ``--pairs`` pairs with a
``--memory-mb`` budget, and in the same run the in-RAM loader of landed main (every shard concatenated as
float32) on ``--baseline-pairs`` pairs. Each side runs in a fresh process, so its peak RSS is its own.

    python bench/bench_align_scale.py --pairs 1000000 --baseline-pairs 1000000
    python bench/bench_align_scale.py --pairs 10000000 --baseline-pairs 1000000 --cache-dir /tmp/align-scale

The LAST line is ``align-scale: pairs=N peak_rss_gb=X samples_per_s=Y in_ram_samples_per_s=Z ratio=Y/Z``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_train import train_step  # noqa: E402

DIMS = {"image": 1280, "text": 384, "image_token": 1280, "num_prefix_tokens": 1}  # Lite0 + MiniLM


def make_cache(root: Path, pairs: int, captions: int, shard_images: int, seed: int = 0):
    """The synthetic cache (reused when a finished one with the same parameters is there)."""
    from align.features import FeatureCache, write_cache

    images = -(-pairs // captions)
    key = {"crops": 1, "dtype": "float16", "tokens": False,
           "data": {"synthetic": {"pairs": pairs, "captions": captions, "shard_images": shard_images, "seed": seed}}}
    try:
        cache = FeatureCache.open(root)
        if cache.key == key:
            return cache, 0.0
    except Exception:
        pass
    t0 = time.perf_counter()

    tty = sys.stderr.isatty()

    def shards():
        g = torch.Generator().manual_seed(seed)
        said = 0
        done_img = done_txt = 0
        while done_img < images:
            n = min(shard_images, images - done_img)
            m = min(n * captions, pairs - done_txt)
            n = -(-m // captions)
            yield ({"image": torch.randn(n, 1, DIMS["image"], generator=g).half(),
                    "text": torch.randn(m, DIMS["text"], generator=g).half(),
                    "text_image": torch.arange(n).repeat_interleave(captions)[:m]},
                   {"keys": json.dumps([f"s{done_img + i}" for i in range(n)]), "captions": "[]"})
            done_img, done_txt = done_img + n, done_txt + m
            if tty or done_txt * 10 // pairs > said:  # off a terminal: a line per tenth, no carriage returns
                said = done_txt * 10 // pairs
                print(f"  writing cache {root}: {done_txt:,}/{pairs:,} pairs", end="\r" if tty else "\n",
                      file=sys.stderr, flush=True)

    cache = write_cache(root, key, DIMS, shards())
    if tty:
        print(file=sys.stderr)
    return cache, time.perf_counter() - t0


def worker(args) -> dict:
    """One side, in its own process: train ``--steps`` steps; samples/s and this process's peak RSS."""
    from align.config import LossConfig
    from align.features import FeatureCache
    from align.loss import ContrastiveLoss
    from align.model import DualProjector
    from align.train import AlignTask, CacheBatches, EpochPlan, param_groups
    from align.training.stream import Part, StreamedCacheBatches

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    cache = FeatureCache.open(args.cache)
    t0 = time.perf_counter()
    if args.worker == "streamed":
        prov = StreamedCacheBatches(cache, Part(), augment=True, seed=0, device=cpu,
                                    memory_bytes=int(args.memory_mb * 2**20))
    else:  # landed main's path: the whole cache concatenated in RAM as float32
        prov = CacheBatches(cache.load(dtype=torch.float32), False, False, augment=True, seed=0, device=cpu)
    setup = time.perf_counter() - t0
    from align.projectors import ProjectorConfig

    pc = ProjectorConfig(kind="mlp", out_dim=512, hidden_dim=2048, dropout=0.1)  # the best-pair recipe's heads
    heads = DualProjector(pc, pc, DIMS["image"], DIMS["text"], 1)
    task = AlignTask(heads, ContrastiveLoss.from_config(LossConfig()))
    opt = torch.optim.AdamW(param_groups(task, 0.02), lr=1e-3)
    plan = EpochPlan(prov.num_pairs, args.batch, 1, seed=0)
    seen, t_start, wait, warm = 0, None, 0.0, 3
    it = prov.epoch(0, plan)
    for i in range(warm + args.steps):
        t = time.perf_counter()
        b = next(it)
        if i >= warm:
            wait += time.perf_counter() - t
        if i == warm:
            t_start = t
        n, loss = train_step(task, opt, b)
        if i >= warm:
            seen += n
    secs = time.perf_counter() - t_start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"pairs": prov.num_pairs, "samples_per_s": seen / secs, "peak_rss_gb": rss / 2**30,
            "setup_s": setup, "data_wait_frac": wait / secs, "steps": args.steps, "last_loss": float(loss)}


def run_side(side: str, cache: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--cache", str(cache), "--steps", str(args.steps),
           "--batch", str(args.batch), "--memory-mb", str(args.memory_mb), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{side} run failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--baseline-pairs", type=int, default=None, help="in-RAM side (default: --pairs)")
    ap.add_argument("--cache-dir", default="/tmp/tether-align-scale", help="where the synthetic caches live")
    ap.add_argument("--captions", type=int, default=2, help="captions per image (the issue's cache: 836k/410k)")
    ap.add_argument("--shard-images", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--memory-mb", type=float, default=1024, help="train.cache_memory_mb of the streamed side")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--worker", choices=["streamed", "in-ram"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    base_pairs = args.baseline_pairs or args.pairs
    root = Path(args.cache_dir)
    big, t_big = make_cache(root / f"pairs-{args.pairs}", args.pairs, args.captions, args.shard_images)
    small, t_small = (big, 0.0) if base_pairs == args.pairs else make_cache(
        root / f"pairs-{base_pairs}", base_pairs, args.captions, args.shard_images)
    disk = sum(s["bytes"] for s in big.manifest["shards"]) / 2**30
    print(f"cache: {args.pairs:,} pairs / {big.num_images:,} images, {len(big.manifest['shards'])} shards, "
          f"{disk:.2f} GiB fp16 on disk (written in {t_big + t_small:.0f} s; 0 = reused); batch {args.batch}, "
          f"{args.steps} timed steps, {args.threads} threads")
    st = run_side("streamed", big.root, args)
    print(f"streamed  ({args.pairs:,} pairs, cache_memory_mb={args.memory_mb:g}): {st['samples_per_s']:,.0f} "
          f"samples/s, peak RSS {st['peak_rss_gb']:.2f} GiB, set-up {st['setup_s']:.1f} s, data wait "
          f"{100 * st['data_wait_frac']:.1f} %")
    ram = run_side("in-ram", small.root, args)
    print(f"in-RAM    ({base_pairs:,} pairs, float32 as landed main loads it): {ram['samples_per_s']:,.0f} "
          f"samples/s, peak RSS {ram['peak_rss_gb']:.2f} GiB, set-up {ram['setup_s']:.1f} s, data wait "
          f"{100 * ram['data_wait_frac']:.1f} %")
    ratio = st["samples_per_s"] / ram["samples_per_s"]
    print(f"align-scale: pairs={args.pairs} peak_rss_gb={st['peak_rss_gb']:.2f} samples_per_s={st['samples_per_s']:.0f} "
          f"in_ram_samples_per_s={ram['samples_per_s']:.0f} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
