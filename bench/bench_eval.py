"""Benchmarks of the evaluation stage, each against a baseline measured side by side in the same run.

    python bench/bench_eval.py                 # all three
    python bench/bench_eval.py --only cka      # cka | zeroshot | retrieval

1. Linear CKA on 10k × 1024 features (goal < 1 s): feature-space form (``align.eval.cka.linear_cka``) vs the
   textbook n×n centring-matrix form ``tr(KHLH)`` (``linear_cka_gram``).
2. Zero-shot evaluation of 1,000 classes from cached pooled features (goal < 15 s): 50,000 cached 384-d
   features (ImageNet-val size) → an AlignedModel's MLP image head → top-1/top-5/mean per-class recall against a
   cached classifier; baseline: the same scores ranked by a full ``argsort`` per image.
3. Retrieval 5k images × 25k captions (goal < 15 s): chunked ``retrieval_metrics`` vs a full similarity matrix
   with a full ``argsort`` per query.

Prints every timing, the ratio to its baseline, and whether both produce the same numbers.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _argsort_ranks(q: np.ndarray, g: np.ndarray, qid: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Baseline: full similarity matrix, full argsort per query, position of the first correct item."""
    s = q @ g.T
    order = np.argsort(-s, axis=1, kind="stable")
    correct = qid[:, None] == gid[order]
    return correct.argmax(1)


def bench_cka(n: int, d: int, baseline_n: int) -> None:
    from align.eval.cka import linear_cka, linear_cka_gram

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(n, d)) + 5.0).astype(np.float32)
    Y = (X @ rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d) + rng.normal(size=(n, d))).astype(np.float32)
    linear_cka(X[:500], Y[:500])
    v, t = _t(lambda: linear_cka(X, Y))
    print(f"[cka] feature-space linear CKA {n}x{d} (fp32 in, fp64 centring+products): {t:.3f} s  (value {v:.6f})")
    v32, t32 = _t(lambda: linear_cka(X, Y, products="float32"))
    print(f"[cka] same with products='float32' (centring still fp64): {t32:.3f} s  (|diff| to fp64 {abs(v32 - v):.1e})")
    Xb, Yb = X[:baseline_n], Y[:baseline_n]
    vb, tb = _t(lambda: linear_cka_gram(Xb, Yb))
    vf, tf = _t(lambda: linear_cka(Xb, Yb))
    print(f"[cka] n×n centring-matrix form on {baseline_n}x{d}: {tb:.3f} s vs feature form {tf:.3f} s on the same "
          f"rows -> {tb / tf:.1f}x faster; |diff| = {abs(vb - vf):.2e}")
    if baseline_n != n:
        print(f"[cka] (baseline at n={baseline_n}; the n×n form scales as n^3 — x{(n / baseline_n) ** 3:.0f} at n={n})")


def bench_zeroshot(n_img: int, n_cls: int, dim: int) -> None:
    from align.eval.zeroshot import classification_metrics
    from align.eval.retrieval import normalize
    from align.model import DualProjector
    from align.projectors import ProjectorConfig

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    cfg = ProjectorConfig(kind="mlp", out_dim=512, dropout=0.0)
    heads = DualProjector(cfg, cfg, dim, 384).eval()
    labels = rng.integers(0, n_cls, n_img)
    protos = rng.normal(size=(n_cls, dim)).astype(np.float32)
    cached = (protos[labels] + 2.0 * rng.normal(size=(n_img, dim))).astype(np.float32)   # "cached features"
    with torch.no_grad():
        W = normalize(heads.image(torch.from_numpy(protos)).numpy())                      # "cached classifier"

    def ours():
        with torch.no_grad():
            emb = torch.cat([heads.image(torch.from_numpy(cached[s:s + 8192])) for s in range(0, n_img, 8192)])
        return classification_metrics(emb.numpy(), W, labels)

    m, t = _t(ours)
    print(f"[zeroshot] {n_img} cached {dim}-d features -> MLP head -> {n_cls}-class metrics: {t:.2f} s  "
          f"(top1 {m['top1']:.2f}, top5 {m['top5']:.2f}, mpcr {m['mean_per_class_recall']:.2f})")

    def base():
        with torch.no_grad():
            emb = normalize(heads.image(torch.from_numpy(cached)).numpy())
        r = _argsort_ranks(emb, W, labels, np.arange(n_cls))
        return 100 * (r < 1).mean(), 100 * (r < 5).mean()

    (b1, b5), tb = _t(base)
    print(f"[zeroshot] baseline (full argsort per image): {tb:.2f} s -> ours {tb / t:.1f}x faster; "
          f"top1/top5 baseline {b1:.2f}/{b5:.2f} (random features: no ties, so both agree)")


def bench_retrieval(n_img: int, per: int, dim: int) -> None:
    from align.eval.retrieval import normalize, retrieval_metrics

    rng = np.random.default_rng(0)
    img = normalize(rng.normal(size=(n_img, dim)))
    owner = np.repeat(np.arange(n_img), per)
    txt = normalize(img[owner] + 1.2 * rng.normal(size=(n_img * per, dim)).astype(np.float32))
    m, t = _t(lambda: retrieval_metrics(img, txt, owner))
    print(f"[retrieval] {n_img} images x {len(txt)} captions ({dim}-d), both directions, chunked: {t:.2f} s  "
          f"(i2t R@1 {m['i2t_R@1']:.2f}, t2i R@1 {m['t2i_R@1']:.2f})")

    def base():
        r_t2i = _argsort_ranks(txt, img, owner, np.arange(n_img))
        r_i2t = _argsort_ranks(img, txt, np.arange(n_img), owner)
        return 100 * (r_i2t < 1).mean(), 100 * (r_t2i < 1).mean()

    (bi, bt), tb = _t(base)
    print(f"[retrieval] baseline (full matrix + full argsort per query): {tb:.2f} s -> ours {tb / t:.1f}x faster; "
          f"R@1 baseline i2t {bi:.2f} t2i {bt:.2f}; peak matrix {n_img * len(txt) * 4 / 2**20:.0f} MiB vs "
          f"{1024 * len(txt) * 4 / 2**20:.0f} MiB per chunk")


def calibrate() -> None:
    """Effective GEMM speed of this machine right now (other jobs share the cores): context for the timings."""
    for dt in (np.float32, np.float64):
        a = np.random.default_rng(0).normal(size=(2048, 2048)).astype(dt)
        a @ a
        _, t = _t(lambda: a @ a)
        print(f"[calibration] {np.dtype(dt).name} GEMM 2048^3: {2 * 2048 ** 3 / t / 1e9:.1f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["cka", "zeroshot", "retrieval"])
    ap.add_argument("--cka-n", type=int, default=10_000)
    ap.add_argument("--cka-d", type=int, default=1024)
    ap.add_argument("--cka-baseline-n", type=int, default=4_000, help="rows for the n×n baseline (RAM: ~5 n^2 x 8 B)")
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    calibrate()
    if args.only in (None, "cka"):
        bench_cka(args.cka_n, args.cka_d, args.cka_baseline_n)
    if args.only in (None, "zeroshot"):
        bench_zeroshot(50_000, 1000, 384)
    if args.only in (None, "retrieval"):
        bench_retrieval(5000, 5, 512)


if __name__ == "__main__":
    main()
