"""Worker for the 2-process gather-with-gradient test (tests/test_loss.py), started by torch.multiprocessing.spawn.

Each rank takes its slice of the global batch saved by the test, computes ``ContrastiveLoss`` for every case,
backpropagates and saves its loss, logs and gradients to ``<out>/rank<r>.pt``. CPU only, gloo on 127.0.0.1.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from align.loss import ContrastiveLoss


def run(rank: int, world: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        data = torch.load(data_path)
        sizes = data["sizes"]
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        results = {}
        for name, case in data["cases"].items():
            loss_fn = ContrastiveLoss(**case["kwargs"])
            img = data["img"][sl].clone().requires_grad_(True)
            txt = data["txt"][sl].clone().requires_grad_(True)
            ids = data["ids"][sl] if case["use_ids"] else None
            loss, logs = loss_fn(img, txt, image_ids=ids)
            loss.backward()
            results[name] = {"loss": loss.detach(), "logs": logs, "img_grad": img.grad, "txt_grad": txt.grad,
                             "param_grads": {k: p.grad.clone() for k, p in loss_fn.named_parameters()}}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
