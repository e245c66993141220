"""Shuffle quality of streamed training: validation R@1 of the in-memory order vs windows of shards, over seeds.

A cache larger than ``train.cache_memory_mb`` is streamed in windows of shards (align/training/stream.py): a batch
draws its pairs from one window, not from the whole cache. This trains one recipe (default: the quickstart's, on
the cache its `align extract` wrote) once per seed with the whole cache in memory and once per seed with a memory
budget small enough to force windows, and prints each run's validation retrieval (the training run's own
validation on the recipe's ``val`` split):

    bash recipes/quickstart.sh                      # once: the curated shards and both caches
    python bench/bench_shuffle.py --seeds 0 1 2 --memory-mb 8

The LAST line is ``shuffle: seeds=K in_memory_R1=A±a streamed_R1=B±b windows=W delta=B-A`` (mean ± std over seeds of
the mean of text→image and image→text R@1, %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(config: str, seed: int, memory_mb: float | None, out: Path) -> dict:
    from align.config import load_train_recipe
    from align.training import train

    sets = [f"train.seed={seed}", f"train.output_dir={out}", "train.progress=false", "train.log_with=none"]
    if memory_mb is not None:
        sets.append(f"train.cache_memory_mb={memory_mb}")
    return train(load_train_recipe(config, sets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "recipes" / "quickstart_align.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--memory-mb", type=float, default=8.0, help="the streamed runs' train.cache_memory_mb")
    args = ap.parse_args()

    from align.config import load_train_recipe
    from align.training.caches import load_encoders, open_checked
    from align.training.stream import Part, StreamedCacheBatches, cache_bytes

    recipe = load_train_recipe(args.config, [])
    vision, text = load_encoders(recipe, device="cpu")
    cache = open_checked(recipe, "train", vision, text)
    need = cache_bytes(cache, Part())
    budget = int(args.memory_mb * 2**20)
    if need <= budget:
        sys.exit(f"the cache takes {need / 2**20:.1f} MiB <= --memory-mb {args.memory_mb}: nothing would stream")
    windows = len(StreamedCacheBatches(cache, Part(), False, 0, None, budget).windows(0))
    print(f"cache {need / 2**20:.1f} MiB in {len(cache.manifest['shards'])} shards; streamed budget "
          f"{args.memory_mb} MiB = {windows} windows per epoch")
    r1 = {"in_memory": [], "streamed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for side, mb in (("in_memory", None), ("streamed", args.memory_mb)):
                s = run(args.config, seed, mb, Path(tmp) / f"{side}-{seed}")
                v = s["val"]
                r1[side].append((v["t2i_R@1"] + v["i2t_R@1"]) / 2)
                print(f"seed {seed} {side:9s}: t2i R@1 {v['t2i_R@1']:.2f}  i2t R@1 {v['i2t_R@1']:.2f}  "
                      f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}", flush=True)

    def ms(x: list[float]) -> str:
        return f"{statistics.mean(x):.2f}±{statistics.stdev(x) if len(x) > 1 else 0.0:.2f}"

    delta = statistics.mean(r1["streamed"]) - statistics.mean(r1["in_memory"])
    print(f"shuffle: seeds={len(args.seeds)} in_memory_R1={ms(r1['in_memory'])} streamed_R1={ms(r1['streamed'])} "
          f"windows={windows} delta={delta:+.2f}")


if __name__ == "__main__":
    main()
