"""``align eval`` and ``align select`` (registered into the ``align`` CLI; also ``python -m align.eval.cli``).

    align eval MODEL --task retrieval --data ../shared/data/flickr8k --split test [--out DIR]
    align eval MODEL --task zeroshot  --data ../shared/data/imagenet-sample --prompts clip80
    align eval MODEL --task retrieval --features CACHE_DIR      # from cached frozen features, no re-encoding
    align select --vision facebook/dinov2-small efficientnet-lite0 --text all-MiniLM-L6-v2 \
                 --data ../shared/data/flickr8k --split train --limit 1000 [--probe-steps 300]

MODEL is an ``AlignedModel`` folder (``align.model.AlignedModel.from_pretrained``). Bad input prints
``error: <one line>`` and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from align.eval.prompts import PROMPT_SETS
from curate.clikit import run_command
from curate.recipe import RecipeError, load_recipe, parse


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def model_fingerprint(model: Any) -> str | None:
    """Identity of a model for caches: its ``fingerprint`` attribute, else config + projector weights."""
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    cfg, heads = getattr(model, "config", None), getattr(model, "heads", None)
    if isinstance(cfg, dict) and heads is not None and hasattr(heads, "state_dict"):
        h = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode())
        for k, v in heads.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]
    return None


def load_model(path: str, device: str = "cpu", vision_path: str | None = None, text_path: str | None = None):
    try:
        from align.model import AlignedModel
    except ModuleNotFoundError as e:  # pragma: no cover - only before the aligner exists
        raise RecipeError(f"cannot load {path}: the aligner (align.model) is not installed ({e})") from None
    return AlignedModel.from_pretrained(path, device=device, vision_path=vision_path, text_path=text_path)


def load_cached_image_features(path: str | Path, keys: list[str]) -> np.ndarray:
    """Cached frozen image features for ``keys`` (file names), from an ``align extract`` feature cache folder
    or an ``.npz`` with ``features`` and ``keys`` arrays. Rows are matched by file name (or stem)."""
    p = Path(path)
    if p.is_dir():
        from align.features import FeatureCache

        c = FeatureCache.open(p).load()
        feats, fkeys = c.image.numpy(), list(c.keys)
        if feats.ndim == 3:
            feats = feats[:, 0]      # first crop = the plain (un-augmented) view
    elif p.suffix == ".npz":
        z = np.load(p, allow_pickle=False)
        if "features" not in z or "keys" not in z:
            raise RecipeError(f"{p}: an .npz feature file needs 'features' and 'keys' arrays")
        feats, fkeys = z["features"], [str(k) for k in z["keys"]]
    else:
        raise RecipeError(f"{p}: expected a feature cache folder or an .npz file")
    index: dict[str, int] = {}
    for i, k in enumerate(fkeys):
        index.setdefault(k, i)
        index.setdefault(Path(k).name, i)
        index.setdefault(Path(k).stem, i)
    rows = []
    for k in keys:
        i = index.get(k, index.get(Path(k).stem))
        if i is None:
            raise RecipeError(f"{p}: no cached features for image {k!r} ({len(fkeys)} rows cached)")
        rows.append(i)
    return np.asarray(feats[rows], np.float32)


def _data_key(items: list[str]) -> str:
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# align eval
# ---------------------------------------------------------------------------------------------------------
def run_eval(model: Any, task: str, data: str | None = None, split: str = "test", prompts: str = "clip80",
             limit: int | None = None, seed: int = 0, features: str | None = None, out: str | Path | None = None,
             cache_dir: str | Path | None = None, batch_size: int = 64, label_column: str = "label",
             image_column: str = "image", progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (anything with ``encode_image``/``encode_text``; ``project_*_features`` for cached
    features) and write the report when ``out`` is given. Returns ``{"metrics": ..., "meta": ...}``."""
    from align.eval.retrieval import PairedSet, embed_images, retrieval_metrics

    fp = model_fingerprint(model)
    cache = Path(cache_dir) if cache_dir else (Path(out) / "cache" if out else None)
    meta: dict[str, Any] = {"task": task, "data": data, "model_fingerprint": fp, "features": features}
    if task == "retrieval":
        if features and data is None:
            from align.features import FeatureCache

            c = FeatureCache.open(features).load()
            img_raw = c.image.numpy()
            img_raw = img_raw[:, 0] if img_raw.ndim == 3 else img_raw
            img = model.project_image_features(img_raw)
            txt = model.project_text_features(c.text.numpy())
            text_image = c.text_image.numpy()
        else:
            if data is None:
                raise RecipeError("retrieval needs --data (a Flickr8k-style folder or an image,caption table) "
                                  "or --features (a feature cache)")
            pairs = PairedSet.load(data, split).subset(limit, seed)
            meta["split"] = split
            if features:
                img = model.project_image_features(load_cached_image_features(
                    features, [p.name for p in pairs.image_paths]))
            else:
                sub = cache / f"img-{fp}-{_data_key([str(p) for p in pairs.image_paths])}" if cache and fp else None
                img = embed_images(model.encode_image, pairs.image_paths, batch_size, progress, sub)
            txt = model.encode_text(pairs.captions)
            text_image = pairs.caption_image
        metrics = retrieval_metrics(img, txt, text_image)
    elif task == "zeroshot":
        from align.eval.classnames import from_hf_dataset, load_labeled_images
        from align.eval.zeroshot import classification_metrics, zeroshot_classifier

        if data is None:
            raise RecipeError("zeroshot needs --data (ImageFolder, wnid-prefixed folder or saved HF dataset)")
        dp = Path(data)
        if (dp / "dataset_info.json").exists() or (dp / "state.json").exists() or (dp / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(dp))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise RecipeError(f"{dp}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            labeled = from_hf_dataset(ds, label_column, image_column, name=dp.name)
        else:
            labeled = load_labeled_images(dp)
        idx = np.arange(len(labeled))
        if limit is not None and limit < len(labeled):
            idx = np.sort(np.random.default_rng(seed).permutation(len(labeled))[:limit])
        W = zeroshot_classifier(model.encode_text, labeled.classnames, prompts, labeled.glosses,
                                cache_dir=cache, model_fingerprint=fp, progress=progress)
        keys = [labeled.keys()[i] for i in idx]
        if features:
            img = model.project_image_features(load_cached_image_features(features, keys))
        else:
            sub = cache / f"img-{fp}-{_data_key(keys)}" if cache and fp else None
            img = embed_images(model.encode_image, list(idx), batch_size, progress, sub, opener=labeled.open)
        metrics = classification_metrics(img, W, labeled.labels[idx])
        meta.update({"prompts": prompts, "n_classes": len(labeled.classnames)})
    else:
        raise RecipeError(f"unknown task {task!r} (zeroshot or retrieval)")
    result = {"metrics": metrics, "meta": meta}
    if out:
        from align.eval.report import write_eval

        result["files"] = [str(p) for p in write_eval(result, out, task)]
    return result


def _cmd_eval(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.device, args.vision_path, args.text_path)
    out = args.out or str(Path("runs") / "eval" / Path(args.model).name)
    res = run_eval(model, args.task, args.data, args.split, args.prompts, args.limit, args.seed, args.features,
                   out, args.cache_dir, args.batch_size, args.label_column, args.image_column)
    for k, v in res["metrics"].items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
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
    if args.config:
        cfg = load_recipe(args.config, SelectConfig, [f"{k}={json.dumps(v)}" for k, v in flags.items()])
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
    e.add_argument("--task", choices=["zeroshot", "retrieval"], required=True)
    e.add_argument("--data", help="Flickr8k-style folder / image,caption CSV|JSONL (retrieval); ImageFolder, "
                                  "wnid-prefixed folder or saved HF dataset (zeroshot)")
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
    e.add_argument("--label-column", default="label")
    e.add_argument("--image-column", default="image")
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
