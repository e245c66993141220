"""The training program's command line: ``align train`` (:func:`run`, or :func:`launch` with ``--processes N``)
and the entry of ``align/train.py`` / ``python -m align.train`` (:func:`main`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from align.config import load_train_recipe
from align.training.trainer import train
from tether.clikit import one_line, run_command
from tether.fileio import atomic_write
from tether.recipe import RecipeError

ERROR_DIR_ENV = "TETHER_LAUNCH_ERRORS"  # set by `align train --processes`: each rank writes its error line there
# what `align train --processes` launches: the file, not `-m align.train` — `python -m` puts the current directory
# first on sys.path, where any user's data.py or config.py would shadow a dependency; align/ holds only our modules
ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="align train", description="Train projectors between frozen encoders.")
    p.add_argument("--config", required=True, help="training recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=5e-4 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto (latest checkpoint in output_dir, default), never, or a checkpoint folder")
    p.add_argument("--ignore-rng-state", action="store_true",
                   help="resume even if the checkpoint's RNG state is damaged or missing (the run then diverges "
                        "from an uninterrupted one); without it such a checkpoint is refused")
    return p


def run(args: argparse.Namespace) -> int:
    recipe = load_train_recipe(args.config, args.set)
    train(recipe, resume=args.resume, ignore_rng_state=args.ignore_rng_state)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err_dir = os.environ.get(ERROR_DIR_ENV)
    if not err_dir:
        return run_command(run, args)
    # started by `align train --processes N`: the launcher prints the first rank's error, once
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - reported by the launcher in one line
        if os.environ.get("TETHER_DEBUG"):
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        atomic_write(Path(err_dir) / f"rank-{rank:05d}.txt", one_line(e))
        return 2


def launch(args: argparse.Namespace, processes: int) -> int:
    """``align train --processes N``: ``accelerate launch`` of ``align/train.py`` with every launch value passed (no
    accelerate warnings, no accelerate config needed) and one-line errors: a failing run prints the lowest failed
    rank's ``error: ...`` once, not accelerate's or torch.distributed's tracebacks. On a machine without CUDA the
    processes run on the CPU (gloo)."""
    import logging
    import subprocess
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser

    if processes < 1:
        raise RecipeError(f"--processes must be at least 1, got {processes}")
    load_train_recipe(args.config, args.set)  # a bad recipe fails here, once, before any process starts
    script = [str(ENTRY_SCRIPT), "--config", str(args.config), "--resume", str(args.resume)]
    for s in args.set:
        script += ["--set", s]
    if args.ignore_rng_state:
        script.append("--ignore-rng-state")
    flags = ["--quiet", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "--num_cpu_threads_per_process",
             os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))]
    if processes > 1:
        flags += ["--multi_gpu", "--main_process_port", "0"]
    env = {ERROR_DIR_ENV: None, "ACCELERATE_USE_CPU": None}
    with tempfile.TemporaryDirectory(prefix="tether-launch-") as err_dir:
        env[ERROR_DIR_ENV] = err_dir
        if processes > 1 and not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
            env["ACCELERATE_USE_CPU"] = "true"
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v for k, v in env.items() if v is not None})
        quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.run", "accelerate")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.CRITICAL + 1)
        failed: BaseException | None = None
        try:
            launch_command(launch_command_parser().parse_args([*flags, *script]))
        except SystemExit as e:  # --quiet single-process launch: exit 1 when the script failed
            failed = e if e.code not in (0, None) else None
        except (subprocess.CalledProcessError, Exception) as e:  # noqa: BLE001 - reported below in one line
            failed = e
        finally:
            for lg, lvl in zip(quiet, levels):
                lg.setLevel(lvl)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if failed is None:
            return 0
        errors = sorted(Path(err_dir).glob("rank-*.txt"))
        if errors:
            raise RecipeError(errors[0].read_text().strip())
        raise RecipeError(f"training failed in the {processes} launched process(es) without an error message "
                          f"({one_line(failed)})")
