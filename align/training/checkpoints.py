"""The run position (:class:`TrainState`) and checkpoints: ``accelerator.save_state`` into a temporary folder
renamed into place, the size + sha256 of every file recorded and verified before resuming."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tether.fileio import file_checksum, verify_file
from tether.fileio import atomic_write
from tether.recipe import RecipeError

CKPT_PREFIX = "step-"
CHECKSUMS = "checksums.json"  # in every checkpoint: size + sha256 of each file, verified before resuming
LAST_LOSSES = 10  # metrics.json's last_loss: the mean of the run's last 10 micro-batch losses
# the objects the trainer registers for checkpointing, in this order: accelerate writes the i-th one to
# custom_checkpoint_<i>.pkl ("ema" only with train.ema_decay)
CHECKPOINTED = ("scheduler", "state", "ema")


@dataclass
class TrainState:
    """Position of the run; saved in every checkpoint (accelerate ``register_for_checkpointing``)."""

    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already consumed
    step: int = 0  # optimiser steps done
    samples: int = 0  # pairs seen (global)
    device_seconds: float = 0.0  # training-loop wall time × processes, summed over every (resumed) run
    val: dict = field(default_factory=dict)
    first_loss: float | None = None  # the run's first micro-batch loss (kept across resumes)
    recent_losses: list = field(default_factory=list)  # the last LAST_LOSSES micro-batch losses

    def add_loss(self, loss: float) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        self.recent_losses = (self.recent_losses + [loss])[-LAST_LOSSES:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "samples": self.samples,
                "device_seconds": self.device_seconds, "val": self.val, "first_loss": self.first_loss,
                "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch, self.step = int(d["epoch"]), int(d["batch"]), int(d["step"])
        self.samples, self.val = int(d["samples"]), dict(d.get("val", {}))
        self.device_seconds = float(d.get("device_seconds", 0.0))
        self.first_loss = None if d.get("first_loss") is None else float(d["first_loss"])
        self.recent_losses = [float(x) for x in d.get("recent_losses", [])]


def verify_checkpoint(ckpt: Path, process_index: int, ignore_rng_state: bool = False) -> None:
    """Refuse (one line) a checkpoint whose files differ from the sizes and sha256 recorded when it was saved, or
    that lacks a readable RNG state for this process — accelerate would skip such an RNG state silently and the
    resumed run would diverge. ``ignore_rng_state`` resumes without a damaged or missing RNG state instead."""
    from accelerate.utils import load as accelerate_load

    hint = ("resume from another checkpoint (--resume PATH), start over (--resume never), "
            "or resume without it (--ignore-rng-state)")
    rng = f"random_states_{process_index}.pkl"
    sums_path = ckpt / CHECKSUMS
    if sums_path.is_file():
        try:
            files = json.loads(sums_path.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise RecipeError(f"checkpoint {ckpt}: unreadable {CHECKSUMS} ({e})") from None
        for name, entry in sorted(files.items()):
            rng_file = name.startswith("random_states_")
            try:
                if rng_file and ignore_rng_state:
                    verify_file(ckpt / name, entry, "checkpoint", "resuming without it (--ignore-rng-state)")
                elif rng_file:
                    verify_file(ckpt / name, entry, "checkpoint",
                                f"the resumed run would not continue the same random stream; {hint}")
                else:
                    verify_file(ckpt / name, entry, "checkpoint",
                                "resume from another checkpoint (--resume PATH) or start over (--resume never)")
            except RecipeError as e:
                if rng_file and ignore_rng_state:
                    print(f"warning: {e}", file=sys.stderr)
                    continue
                raise
    if ignore_rng_state:
        return
    path = ckpt / rng
    if not path.is_file():
        raise RecipeError(f"checkpoint {ckpt} has no RNG state for process {process_index} ({rng}; was it saved by "
                          f"fewer processes?); {hint}")
    try:
        accelerate_load(str(path))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise RecipeError(f"checkpoint {ckpt}: {rng} cannot be read ({type(e).__name__}); {hint}") from None


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
    return done[-1] if done else None


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """``save_state`` into ``checkpoints/.tmp-step-N`` then rename to ``step-N``; keep the newest ``keep``."""
    root = output_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # every rank writes its RNG state here, so it must exist before the barrier
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # size + sha256 of every file (model, optimiser, schedule, run position, each rank's RNG state)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {str(p.relative_to(tmp)): file_checksum(p) for p in files}
        atomic_write(tmp / CHECKSUMS, json.dumps({"processes": accelerator.num_processes, "files": sums},
                                                 indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` = the latest in ``output_dir`` (None when there is none),
    ``never``/``none`` = None, anything else a checkpoint folder that must exist."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume in ("never", "none"):
        return None
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise RecipeError(f"--resume {resume}: no checkpoint folder there")
    return ckpt


def checkpointed_file(ckpt: Path, name: str) -> Path:
    """The file in ``ckpt`` that holds the registered object ``name`` (one of :data:`CHECKPOINTED`)."""
    return ckpt / f"custom_checkpoint_{CHECKPOINTED.index(name)}.pkl"


def ema_heads_state(ckpt: Path) -> dict:
    """The moving average of the heads saved in ``ckpt`` (``train.ema_decay``) as a heads ``state_dict``; a
    checkpoint saved without one → :class:`RecipeError` (one line)."""
    import torch

    path = checkpointed_file(ckpt, "ema")
    if not path.is_file():
        raise RecipeError(f"checkpoint {ckpt} has no moving average of the heads (saved without train.ema_decay): "
                          "start over (--resume never) or train without train.ema_decay")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise RecipeError(f"checkpoint {ckpt}: {path.name} cannot be read ({type(e).__name__})") from None
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
