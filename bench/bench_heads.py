"""Benchmark: training throughput of each projector head on CPU (forward + InfoNCE + backward [+ AdamW step]).

Pooled heads (``linear`` = baseline, ``mlp``): batch 1024, 384-d input (MiniLM / DINOv2-S width), 1024-d output.
Token heads: DINOv2-S grids (257 tokens = CLS + 256 patches, 384-d) and MiniLM-like text (32 tokens, random
padding), at smaller batches; the fused pooling of :class:`align.projectors.TokenBlock` is compared with the
naive "project every token, then mean" computation it replaces (identical result).

Every configuration is timed in the same run, round-robin (one step of each per round, so that all of them see
the same machine load); samples/s = batch / median step time over ``--iters`` rounds after one warm-up round,
and each line prints its ratio against the baseline measured side by side. Samples per CPU-second (process time
of all threads) are printed too: with ``--threads 1`` they estimate one core's throughput even when other jobs
share the machine.

    python bench/bench_heads.py                     # 2 threads, defaults below
    python bench/bench_heads.py --threads 2 --iters 7 --token-batch 16 --text-batch 128 --adamw --json out.json
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


class Case:
    """One configuration: a closure doing one training step on a fixed batch."""

    def __init__(self, name: str, batch: int, tokens: int, baseline: str | None, step: Callable[[], None]):
        self.name, self.batch, self.tokens, self.baseline, self.step = name, batch, tokens, baseline, step
        self.times: list[float] = []  # wall seconds per step
        self.cpu: list[float] = []  # CPU seconds per step (all threads of this process)


def head_case(name: str, head: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, baseline: str | None,
              adamw: bool, forward: Callable | None = None) -> Case:
    """Head forward → InfoNCE against fixed random partners → backward (→ AdamW step with ``adamw``)."""
    loss_fn = ContrastiveLoss()
    partner = torch.randn(x.shape[0], head.out_dim)
    opt = torch.optim.AdamW(list(head.parameters()) + list(loss_fn.parameters()), lr=1e-3) if adamw else None
    fwd = forward or (lambda h, a, m: h(a, m))
    head.train()

    def step() -> None:
        loss, _ = loss_fn(fwd(head, x, mask), partner)
        loss.backward()
        if opt is not None:
            opt.step()
        head.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)

    return Case(name, x.shape[0], x.shape[1] if x.ndim == 3 else 1, baseline, step)


def loss_case(batch: int, dim: int) -> Case:
    """The InfoNCE loss alone (normalise, [B, B] logits, both directions, backward) — part of every head step."""
    loss_fn = ContrastiveLoss()
    img, txt = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim)

    def step() -> None:
        loss_fn(img, txt)[0].backward()
        img.grad = None

    return Case("InfoNCE loss only", batch, 1, None, step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7, help="timed rounds (after 1 warm-up round)")
    ap.add_argument("--batch", type=int, default=1024, help="pooled heads")
    ap.add_argument("--token-batch", type=int, default=16, help="image token head (257 tokens)")
    ap.add_argument("--text-batch", type=int, default=128, help="text token head (32 tokens)")
    ap.add_argument("--in-dim", type=int, default=384)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--adamw", action="store_true", help="include the AdamW step in every timed step")
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

    def head(kind: str, side: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_projector(kind, side, d, out_dim=o)

    lin = "linear (pooled)"
    cases = [
        loss_case(args.batch, o),
        head_case(lin, head("linear", "image"), pooled, None, None, args.adamw),
        head_case("mlp (pooled)", head("mlp", "image"), pooled, None, lin, args.adamw),
        head_case("token image, naive", head("token", "image"), grid, None, lin, args.adamw, naive_forward),
        head_case("token image", head("token", "image"), grid, None, "token image, naive", args.adamw),
        head_case("token text, naive", head("token", "text"), text, mask, lin, args.adamw, naive_forward),
        head_case("token text", head("token", "text"), text, mask, "token text, naive", args.adamw),
    ]
    what = "fwd+loss+bwd" + ("+AdamW" if args.adamw else "")
    print(f"torch {torch.__version__}, {args.threads} threads, in {d} -> out {o}, {what}, median of "
          f"{args.iters} rounds; the configurations run round-robin so that all see the same machine load",
          flush=True)
    for r in range(args.iters + 1):  # round 0 = warm-up
        for c in cases:
            t0, c0 = time.perf_counter(), time.process_time()
            c.step()
            if r:
                c.times.append(time.perf_counter() - t0)
                c.cpu.append(time.process_time() - c0)
    by_name = {c.name: c for c in cases}
    rows = []
    for c in cases:
        sps = c.batch / statistics.median(c.times)
        base = by_name.get(c.baseline) if c.baseline else None
        ratio = sps / (base.batch / statistics.median(base.times)) if base else 1.0
        cpu_sps = c.batch / statistics.median(c.cpu)
        rows.append({"config": c.name, "batch": c.batch, "tokens": c.tokens, "step": what,
                     "sec_per_step": statistics.median(c.times), "samples_per_s": sps, "baseline": c.baseline,
                     "ratio": ratio, "samples_per_cpu_s": cpu_sps})
        print(f"{c.name:<20} batch {c.batch:>5} x {c.tokens:>3} tok  {sps:>9.0f} samples/s  "
              f"{ratio:>6.2f}x vs {c.baseline or 'itself':<20} ({cpu_sps:.0f} samples per CPU-second)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
