"""``align eval`` and ``align select`` (registered into the ``align`` CLI; also ``python -m align.eval.cli``).

    align eval MODEL --task retrieval --data ../shared/data/flickr8k --split test [--out DIR]
    align eval MODEL --task zeroshot  --data ../shared/data/imagenet-sample --prompts clip80
    align eval MODEL --task retrieval --features CACHE_DIR      # from cached frozen features, no re-encoding
    align eval MODEL --task retrieval --data ../shared/data/flickr8k --captions ../shared/data/flickr8k-multilingual/captions.de.txt
    align eval MODEL --task retrieval --data annotations/captions_val2017.json [--image-root val2017]
    align eval MODEL --task retrieval --data pairs.parquet --image-column file_name --caption-column text
    align select --vision facebook/dinov2-small efficientnet-lite0 --text all-MiniLM-L6-v2 \
                 --data ../shared/data/flickr8k --split train --limit 1000 [--probe-steps 300]

MODEL is an ``AlignedModel`` folder (``align.model.AlignedModel.from_pretrained``). Bad input prints
``error: <one line>`` and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.eval.prompts import PROMPT_SETS
from align.eval.run import load_model, run_eval
from tether.clikit import run_command
from tether.recipe import RecipeError, load_recipe, parse, resolve_input


def _cmd_eval(args: argparse.Namespace) -> int:
    if (args.suite is None) == (args.task is None):
        raise RecipeError("align eval needs --task zeroshot|retrieval|localize (one dataset) or --suite SUITE.yaml "
                          "(many), not both")
    if args.suite is not None:
        from align.eval.suite import load_suite, print_table, run_suite

        suite = load_suite(args.suite)   # a bad suite file is refused before the model loads
        model = load_model(args.model, args.device, args.vision_path, args.text_path)
        out = args.out or str(Path("runs") / "eval" / Path(args.model).name / suite.name)
        res = run_suite(model, suite, out, args.cache_dir, fresh=args.fresh)
        print_table(res)
        print(f"report: {', '.join(res['files'])}")
        return 0 if any(r.get("status") == "ok" for r in res["rows"]) else 1
    model = load_model(args.model, args.device, args.vision_path, args.text_path)
    out = args.out or str(Path("runs") / "eval" / Path(args.model).name)
    res = run_eval(model, args.task, args.data, args.split, args.prompts, args.limit, args.seed, args.features,
                   out, args.cache_dir, args.batch_size, args.label_column, args.image_column,
                   caption_column=args.caption_column, image_root=args.image_root, captions=args.captions,
                   language=args.language)
    if args.task == "retrieval":
        m = res["meta"]
        counts = f"{m['n_images']} images, {m['n_captions']} captions"
        print(f"{'language':>24}: {m['language']} ({counts})" if m.get("language") else f"{'queries':>24}: {counts}")
    for k, v in res["metrics"].items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if res["metrics"].get("n_skipped"):
        print(f"skipped {res['metrics']['n_skipped']} unreadable image(s): listed in the report")
    print(f"report: {', '.join(res['files'])}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# align select
# ---------------------------------------------------------------------------------------------------------
def _cmd_select(args: argparse.Namespace) -> int:
    from align.eval.report import markdown_table
    from align.eval.select import SelectConfig, run_select

    flags = {k: getattr(args, k) for k in ("vision", "text", "data", "split", "limit", "seed", "knn_k", "rank_by",
                                           "batch_size", "device", "out", "cache_dir", "probe_steps")
             if getattr(args, k) is not None}
    if args.config:  # the file's relative input paths resolve against its folder, command-line values against CWD
        base = Path(args.config).resolve().parent
        cfg = load_recipe(args.config, SelectConfig)
        cfg = cfg.model_copy(update={"data": resolve_input(cfg.data, base, may_be_id=True),
                                     "vision": [resolve_input(v, base, may_be_id=True) for v in cfg.vision],
                                     "text": [resolve_input(t, base, may_be_id=True) for t in cfg.text]})
        cfg = parse(SelectConfig, {**cfg.model_dump(), **flags}, str(args.config))
    else:
        cfg = parse(SelectConfig, flags, "align select")
    res = run_select(cfg)
    cols = ["rank", "vision", "text", "linear_cka", "unbiased_cka", "mutual_knn"]
    if cfg.probe_steps:
        cols += ["val_loss", "val_t2i_R@1"]
    print(markdown_table(res["rows"], cols))
    for k, v in res["agreement"].items():
        print(f"spearman {k}: {v:+.2f}")
    print(f"report: {', '.join(res['files'])}")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` and ``select`` to an argparse subparsers object (the ``align`` CLI calls this)."""
    e = subparsers.add_parser("eval", help="zero-shot classification or retrieval of an aligned model")
    e.add_argument("model", help="AlignedModel folder")
    e.add_argument("--task", choices=["zeroshot", "retrieval", "localize"],
                   help="evaluate one dataset (--data); localize = the pointing game on patch maps (token heads; "
                        "--data: a folder with localization.jsonl, e.g. from python -m align.eval.localize composites)")
    e.add_argument("--suite", help="a suite file (YAML: classification + retrieval datasets, docs/eval.md): one "
                                   "paper-style table, each dataset resumable")
    e.add_argument("--fresh", action="store_true", help="--suite: evaluate finished datasets again")
    e.add_argument("--data", help="retrieval: Flickr8k-style folder, COCO captions .json, or an image,caption "
                                  ".csv/.tsv/.jsonl/.json/.parquet table; zeroshot: ImageFolder, wnid-prefixed folder "
                                  "or saved HF dataset")
    e.add_argument("--split", default="test")
    e.add_argument("--prompts", default="clip80", choices=list(PROMPT_SETS), help="zero-shot prompt set")
    e.add_argument("--features", help="cached frozen features (align extract folder or .npz with features+keys)")
    e.add_argument("--limit", type=int, help="evaluate a seeded random subset of this many images")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="report folder (default runs/eval/<model name>)")
    e.add_argument("--cache-dir", help="classifier / embedding cache (default <out>/cache)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="cpu")
    e.add_argument("--vision-path", help="local copy of the vision encoder when its id is not reachable")
    e.add_argument("--text-path", help="local copy of the text encoder when its id is not reachable")
    e.add_argument("--label-column", default="label", help="label column of a HF dataset (zeroshot)")
    e.add_argument("--image-column", default="image", help="image column of a table (retrieval) or HF dataset")
    e.add_argument("--caption-column", default="caption", help="caption column of a table (retrieval)")
    e.add_argument("--captions", help="retrieval: a Flickr8k-format captions file (IMAGE.jpg#N<TAB>caption, any "
                                      "language) instead of <data>/captions.txt; images without one are left out")
    e.add_argument("--language", help="language of the captions for the report (default: from a *.xx.txt name)")
    e.add_argument("--image-root", help="folder the table's / COCO json's image paths are relative to "
                                        "(default: the file's folder; for COCO also <set>/ beside it)")
    e.set_defaults(func=_cmd_eval)

    s = subparsers.add_parser("select", help="rank vision x text encoder pairs by CKA / mutual kNN before training")
    s.add_argument("--config", help="YAML with SelectConfig keys (flags override it)")
    s.add_argument("--vision", nargs="+", help="vision candidates: id/path[@layer=N,pooling=cls|mean|cls+mean]")
    s.add_argument("--text", nargs="+", help="text candidates: id/path[@max_length=N]")
    s.add_argument("--data", help="Flickr8k-style folder or image,caption CSV/JSONL")
    s.add_argument("--split")
    s.add_argument("--limit", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--knn-k", type=int)
    s.add_argument("--rank-by", choices=["linear_cka", "unbiased_cka", "mutual_knn"])
    s.add_argument("--batch-size", type=int)
    s.add_argument("--device")
    s.add_argument("--out")
    s.add_argument("--cache-dir")
    s.add_argument("--probe-steps", type=int, help="train a linear InfoNCE probe per pair for N steps")
    s.set_defaults(func=_cmd_select)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align.eval.cli", description="tether evaluation")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return run_command(args.func, args)

if __name__ == "__main__":
    sys.exit(main())
