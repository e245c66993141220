"""The ``align`` command line: ``train``, ``extract``, ``export``, plus subcommands that plugins register.

A plugin is a module listed in :data:`PLUGINS` that defines ``register(subparsers)``; it is imported lazily and
skipped when it is not installed (e.g. ``align.eval.cli`` adds ``align eval`` and ``align select``). Errors in
user input print ``error: <one line>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tether.clikit import add_plugins, run_command
from tether.recipe import RecipeError

PLUGINS = ["align.eval.cli"]


def _train(args: argparse.Namespace) -> int:
    from align.training import program

    if args.processes is None:
        return program.run(args)
    return program.launch(args, args.processes)


def _extract(args: argparse.Namespace) -> int:
    from align.config import load_train_recipe
    from align.training.caches import extract_split, load_encoders

    recipe = load_train_recipe(args.config, args.set)
    splits = ["train", "val"] if args.split == "all" else [args.split]
    if recipe.val is None and "val" in splits:
        if args.split == "val":
            raise RecipeError(f"{args.config}: no val section to extract")
        splits.remove("val")
    vision, text = load_encoders(recipe, device=args.device)
    for split in splits:
        cache = extract_split(recipe, split, vision, text, overwrite=args.overwrite, progress=True)
        skipped = cache.skips.get("counts", {})
        print(f"{split}: {cache.num_images} images, {cache.num_texts} captions in {cache.root}"
              f"; skipped {skipped or 'none'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Turn a training checkpoint (e.g. of a run that was stopped) into an AlignedModel folder plus, when its
    encoders are transformers models, a transformers folder (``<out>/hf``); or (``--model``) convert an AlignedModel
    folder into a transformers folder."""
    from align.hf import export_hf

    if (args.config is None) == (args.model is None):
        raise RecipeError("align export needs --config RECIPE (a training checkpoint) or --model FOLDER (an aligned "
                          "model to convert to a transformers folder), not both")
    if args.model is not None:
        from align.model import AlignedModel

        out = export_hf(AlignedModel.from_pretrained(args.model), args.out, args.vision_ref, args.text_ref)
        print(f"exported {args.model} -> {out} (a transformers folder: AutoModel.from_pretrained(..., "
              "trust_remote_code=True))")
        return 0
    from safetensors.torch import load_file

    from align.config import load_train_recipe
    from align.model import AlignedModel, DualProjector
    from align.training.caches import load_encoders
    from align.training.checkpoints import ema_heads_state, latest_checkpoint

    recipe = load_train_recipe(args.config, args.set)
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(recipe.output_dir)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise RecipeError(f"no checkpoint with model.safetensors found ({ckpt or recipe.output_dir / 'checkpoints'})")
    vision, text = load_encoders(recipe, device="cpu")
    heads = DualProjector.for_encoders(recipe.projector.image, recipe.projector.text, vision, text,
                                       recipe.image_pooling)
    state = load_file(str(ckpt / "model.safetensors"))
    # the raw weights, or (train.ema_decay) their moving average: what the run itself saves as its model
    heads.load_state_dict(ema_heads_state(ckpt) if recipe.train.ema_decay is not None else
                          {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    lt = state.get("loss.log_temperature")
    model = AlignedModel.from_parts(heads, vision, text, recipe.projector.image, recipe.projector.text,
                                    pooling=recipe.image_pooling,
                                    temperature=None if lt is None else float(lt.exp()))
    out = model.save_pretrained(args.out)
    print(f"exported {ckpt} -> {out}")
    if not args.no_hf:
        try:
            hf = export_hf(model, out / "hf", args.vision_ref, args.text_ref)
            print(f"transformers folder (loads without tether, trust_remote_code=True): {hf}")
        except RecipeError as e:
            print(f"no transformers folder: {e}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from align.hf import push

    url = push(args.model, args.repo, private=args.private, token=args.token)
    print(f"pushed {args.model} -> {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from align.training import program

    parser = argparse.ArgumentParser(prog="align", description="Align frozen unimodal encoders (tether).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train projectors (same as `accelerate launch align/train.py` / `-m align.train`)")
    program.build_parser(t)
    t.add_argument("--processes", type=int, default=None, metavar="N",
                   help="launch N processes with accelerate (DDP; on the CPU when there is no GPU) instead of "
                        "training in this process; errors stay one line")
    t.set_defaults(func=_train)

    e = sub.add_parser("extract", help="extract frozen features into the recipe's feature cache (resumable)")
    e.add_argument("--config", required=True)
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--split", choices=["train", "val", "all"], default="all")
    e.add_argument("--overwrite", action="store_true", help="rebuild a cache made with other settings")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_extract)

    x = sub.add_parser("export", help="export a training checkpoint as an AlignedModel folder (+ a transformers "
                                      "folder in <out>/hf), or convert an AlignedModel folder (--model)")
    x.add_argument("--config", help="the training recipe whose checkpoint is exported")
    x.add_argument("--model", help="an AlignedModel folder to write as a transformers folder at --out")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    x.add_argument("--checkpoint", help="checkpoint folder (default: latest in train.output_dir)")
    x.add_argument("--out", required=True)
    x.add_argument("--no-hf", action="store_true", help="--config: no transformers folder")
    x.add_argument("--vision-ref", help="hub id / path the transformers folder names for the vision encoder "
                                        "(default: the one trained with; a zoo name becomes its hub id)")
    x.add_argument("--text-ref", help="the same for the text encoder")
    x.set_defaults(func=_export)

    p = sub.add_parser("push", help="upload a model to the Hugging Face hub (as a transformers folder)")
    p.add_argument("model", help="an AlignedModel folder (its hf/ subfolder, or exported on the fly) or a "
                                 "transformers folder from align export")
    p.add_argument("repo", help="hub repository id, owner/name (created if needed)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="hub token (default: the huggingface_hub login / HF_TOKEN)")
    p.set_defaults(func=_push)

    add_plugins(sub, PLUGINS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)

if __name__ == "__main__":
    sys.exit(main())
