"""Benchmark: training throughput of each projector head on CPU (forward + InfoNCE + backward [+ AdamW step]).

Pooled heads (``linear`` = baseline, ``mlp``): batch 1024, 384-d input (MiniLM / DINOv2-S width), 1024-d output.
Token heads: DINOv2-S grids (257 tokens = CLS + 256 patches, 384-d) and MiniLM-like text (32 tokens, random
padding), at smaller batches; the fused pooling of :class:`align.projectors.TokenBlock` is compared with the
naive "project every token, then mean" computation it replaces (identical result).

Every configuration is timed in the same run; samples/s = batch / median step time over ``--iters`` steps after
warm-up, and each line prints its ratio against the baseline measured side by side.

    python bench/bench_heads.py                     # 2 threads, defaults below
    python bench/bench_heads.py --threads 2 --iters 10 --token-batch 64 --text-batch 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.loss import ContrastiveLoss  # noqa: E402
from align.projectors import TokenImageProjector, TokenTextProjector, build_projector, masked_mean  # noqa: E402


def naive_forward(head: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The token heads computed the straightforward way: every token through the whole block, then mean."""
    if isinstance(head, TokenImageProjector):
        p = head.num_prefix_tokens
        return head.cls_block(x[:, 0]) + head.patch_block(x[:, p:]).mean(1)
    if isinstance(head, TokenTextProjector):
        return head.head(masked_mean(head.block(x), mask))
    raise TypeError(type(head))


def time_step(head: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, iters: int, step: bool,
              forward: Callable | None = None) -> float:
    """Median seconds of one training step: head forward, InfoNCE against fixed partners, backward (+ AdamW)."""
    loss_fn = ContrastiveLoss()
    partner = torch.randn(x.shape[0], head.out_dim)
    opt = torch.optim.AdamW(list(head.parameters()) + list(loss_fn.parameters()), lr=1e-3) if step else None
    fwd = forward or (lambda h, a, m: h(a, m))
    head.train()
    times = []
    for i in range(iters + 2):  # 2 warm-up steps
        t0 = time.perf_counter()
        loss, _ = loss_fn(fwd(head, x, mask), partner)
        loss.backward()
        if opt is not None:
            opt.step()
        head.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_loss(batch: int, dim: int, iters: int) -> float:
    """Median seconds of the InfoNCE loss alone (normalise, [B, B] logits, both directions, backward)."""
    loss_fn = ContrastiveLoss()
    img = torch.randn(batch, dim, requires_grad=True)
    txt = torch.randn(batch, dim)
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        loss_fn(img, txt)[0].backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1024, help="pooled heads")
    ap.add_argument("--token-batch", type=int, default=64, help="image token head (257 tokens)")
    ap.add_argument("--text-batch", type=int, default=256, help="text token head (32 tokens)")
    ap.add_argument("--in-dim", type=int, default=384)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, o = args.in_dim, args.out_dim
    pooled = torch.randn(args.batch, d)
    grid = torch.randn(args.token_batch, 257, d)
    text = torch.randn(args.text_batch, 32, d)
    lengths = torch.randint(8, 33, (args.text_batch,))
    mask = (torch.arange(32)[None, :] < lengths[:, None]).long()

    rows: list[dict] = []

    def run(name: str, kind: str, side: str, x, m, baseline: str | None, forward=None) -> None:
        for step in (False, True):
            torch.manual_seed(0)
            head = build_projector(kind, side, d, out_dim=o)
            sec = time_step(head, x, m, args.iters, step, forward)
            row = {"config": name, "head": kind, "side": side, "batch": x.shape[0],
                   "tokens": x.shape[1] if x.ndim == 3 else 1, "step": "fwd+bwd+AdamW" if step else "fwd+bwd",
                   "sec_per_step": sec, "samples_per_s": x.shape[0] / sec, "baseline": baseline}
            base = next((r for r in rows if r["config"] == baseline and r["step"] == row["step"]), None)
            row["ratio"] = row["samples_per_s"] / base["samples_per_s"] if base else 1.0
            rows.append(row)
            print(f"{name:<28} {row['step']:<14} batch {row['batch']:>5} x {row['tokens']:>3} tok  "
                  f"{row['samples_per_s']:>10.0f} samples/s  {row['ratio']:>6.2f}x vs {baseline or 'itself'}",
                  flush=True)

    print(f"torch {torch.__version__}, {args.threads} threads, in {d} -> out {o}, median of {args.iters} steps")
    sec = time_loss(args.batch, o, args.iters)
    rows.append({"config": "InfoNCE loss only", "batch": args.batch, "sec_per_step": sec,
                 "samples_per_s": args.batch / sec})
    print(f"{'InfoNCE loss only':<28} {'fwd+bwd':<14} batch {args.batch:>5} x {o:>4}-d  "
          f"{args.batch / sec:>10.0f} samples/s  (part of every pooled step below)", flush=True)
    run("linear (pooled)", "linear", "image", pooled, None, None)
    run("mlp (pooled)", "mlp", "image", pooled, None, "linear (pooled)")
    run("token image naive", "token", "image", grid, None, "linear (pooled)", forward=naive_forward)
    run("token image (fused pool)", "token", "image", grid, None, "token image naive")
    run("token text naive", "token", "text", text, mask, "linear (pooled)", forward=naive_forward)
    run("token text (fused pool)", "token", "text", text, mask, "token text naive")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
