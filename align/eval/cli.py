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
import hashlib
import json
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from align.eval.prompts import PROMPT_SETS
from tether.clikit import run_command
from tether.recipe import RecipeError, load_recipe, parse, resolve_input


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


def caption_language(path: str | Path | None, flickr_default: bool = False) -> str | None:
    """Language code in a caption file's name (``captions.de.txt`` → ``de``, ``val.zh.jsonl`` → ``zh``);
    ``en`` for a Flickr8k folder's own ``captions.txt`` (``flickr_default``); else None (unknown)."""
    if path is not None:
        suffixes = Path(str(path)).suffixes
        if len(suffixes) >= 2:
            code = suffixes[-2].lstrip(".").lower()
            if 2 <= len(code) <= 3 and code.isalpha():
                return code
    return "en" if flickr_default else None


def load_model(path: str, device: str = "cpu", vision_path: str | None = None, text_path: str | None = None):
    try:
        from align.model import AlignedModel
    except ModuleNotFoundError as e:  # pragma: no cover - only before the aligner exists
        raise RecipeError(f"cannot load {path}: the aligner (align.model) is not installed ({e})") from None
    return AlignedModel.from_pretrained(path, device=device, vision_path=vision_path, text_path=text_path)


def load_cached_image_features(path: str | Path, keys: list[str]) -> np.ndarray:
    """Cached frozen image features for ``keys`` (image paths relative to the data, e.g. ``cat/0001.jpg``), from
    an ``align extract`` feature cache folder or an ``.npz`` with ``features`` and ``keys`` arrays.

    Rows are matched on the relative path (see :func:`match_feature_keys`); a key that fits several rows, or a row
    that fits several images (``cat/0001.jpg`` and ``dog/0001.jpg`` against a bare ``0001.jpg``), is an error."""
    p = Path(path)
    if p.is_dir():
        from align.features import FeatureCache

        c = FeatureCache.open(p).load()
        feats, fkeys = c.image.numpy(), [str(k) for k in c.keys]
        if feats.ndim == 3:
            feats = feats[:, 0]      # first crop = the plain (un-augmented) view
    elif p.suffix == ".npz":
        if not p.is_file():
            raise RecipeError(f"{p}: file not found")
        z = np.load(p, allow_pickle=False)
        if "features" not in z or "keys" not in z:
            raise RecipeError(f"{p}: an .npz feature file needs 'features' and 'keys' arrays")
        feats, fkeys = z["features"], [str(k) for k in z["keys"]]
        if len(fkeys) != len(feats):
            raise RecipeError(f"{p}: {len(fkeys)} keys for {len(feats)} feature rows")
    else:
        raise RecipeError(f"{p}: expected a feature cache folder or an .npz file")
    return np.asarray(feats[match_feature_keys(fkeys, keys, str(p))], np.float32)


def _parts(key: str) -> tuple[str, ...]:
    return tuple(x for x in PurePosixPath(str(key).replace("\\", "/")).parts if x not in ("", "/"))


def _same_file(a: str, b: str) -> bool:
    return a == b or PurePosixPath(a).stem == b or a == PurePosixPath(b).stem


def _fits(cached: tuple[str, ...], wanted: tuple[str, ...]) -> bool:
    """The shorter path is a suffix of the longer one (the file name may lack its extension on one side)."""
    if not cached or not wanted or not _same_file(cached[-1], wanted[-1]):
        return False
    n = min(len(cached), len(wanted)) - 1
    return n == 0 or cached[-1 - n:-1] == wanted[-1 - n:-1]


def match_feature_keys(cached: list[str], wanted: list[str], where: str) -> list[int]:
    """Row of ``cached`` for each ``wanted`` key. An exact (normalised) path match wins; otherwise the one cached
    key that is a path suffix of the wanted one or the other way round (``0001.jpg`` fits ``cat/0001.jpg``; a
    missing extension is allowed). Refused with one line: duplicate cached keys, a wanted key that fits several
    cached rows, a cached row that fits several wanted images, a wanted key with no row."""
    exact: dict[tuple[str, ...], int] = {}
    by_name: dict[str, list[int]] = {}
    cparts = [_parts(k) for k in cached]
    for i, t in enumerate(cparts):
        if t in exact:
            raise RecipeError(f"{where}: feature key {cached[i]!r} appears twice (rows {exact[t]} and {i})")
        exact[t] = i
        if t:
            for n in {t[-1], PurePosixPath(t[-1]).stem}:
                by_name.setdefault(n, []).append(i)
    rows: list[int] = []
    owner: dict[int, str] = {}
    for k in wanted:
        w = _parts(k)
        i = exact.get(w)
        if i is None:
            cands = sorted({j for n in ({w[-1], PurePosixPath(w[-1]).stem} if w else ())
                            for j in by_name.get(n, []) if _fits(cparts[j], w)})
            if not cands:
                raise RecipeError(f"{where}: no cached features for image {k!r} ({len(cached)} rows cached)")
            if len(cands) > 1:
                raise RecipeError(f"{where}: image {k!r} matches several cached keys ({cached[cands[0]]!r}, "
                                  f"{cached[cands[1]]!r}); store the features under paths relative to the data")
            i = cands[0]
        if i in owner and owner[i] != k:
            raise RecipeError(f"{where}: cached key {cached[i]!r} is ambiguous: images {owner[i]!r} and {k!r} both "
                              "match it; store the features under paths relative to the data (e.g. "
                              f"{owner[i]!r})")
        owner[i] = k
        rows.append(i)
    return rows


def _data_key(items: list[str]) -> str:
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:12]


class _Skips:
    """Images that could not be opened: one stderr line each (naming the file) and a list for the report."""

    def __init__(self, name: Any) -> None:
        self.items: list[tuple[int, Any, str]] = []
        self.name = name

    def __call__(self, i: int, item: Any, reason: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"skipped {self.name(i, item)}: {reason}", file=sys.stderr)

    def indexes(self) -> set[int]:
        return {i for i, _, _ in self.items}

    def report(self, limit: int = 1000) -> dict[str, Any]:
        return {"count": len(self.items),
                "files": [{"file": str(self.name(i, it)), "reason": r} for i, it, r in self.items[:limit]]}


# ---------------------------------------------------------------------------------------------------------
# align eval
# ---------------------------------------------------------------------------------------------------------
def run_eval(model: Any, task: str, data: str | None = None, split: str = "test", prompts: str = "clip80",
             limit: int | None = None, seed: int = 0, features: str | None = None, out: str | Path | None = None,
             cache_dir: str | Path | None = None, batch_size: int = 64, label_column: str = "label",
             image_column: str = "image", progress: bool = True, caption_column: str = "caption",
             image_root: str | None = None, curve_max_k: int = 50, captions: str | None = None,
             language: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (anything with ``encode_image``/``encode_text``; ``project_*_features`` for cached
    features) and write the report when ``out`` is given. Returns ``{"metrics": ..., "meta": ..., ...}``:
    retrieval adds ``curves`` (recall@K, K = 1..``curve_max_k``), zero-shot adds ``per_class``.

    Retrieval: ``captions`` = a Flickr8k-format captions file (any language) used instead of ``<data>/captions.txt``
    (only the split's images that have captions there are evaluated); ``language`` (default: guessed from a
    ``*.xx.txt`` / ``*.xx.jsonl`` file name, else ``en`` for Flickr8k's own captions, else unknown) goes into
    ``meta["language"]`` and the report.

    Images that cannot be opened are skipped (one stderr line each) and listed in ``meta["skipped"]``;
    ``metrics["n_skipped"]`` counts them."""
    from align.eval.retrieval import PairedSet, embed_images, retrieval_eval

    fp = model_fingerprint(model)
    cache = Path(cache_dir) if cache_dir else (Path(out) / "cache" if out else None)
    meta: dict[str, Any] = {"task": task, "data": data if data is not None else features,
                            "model_fingerprint": fp, "features": features}
    result: dict[str, Any] = {}
    skips: _Skips | None = None
    if task == "retrieval":
        if features and data is None:
            from align.features import FeatureCache

            fc = FeatureCache.open(features)
            c = fc.load()
            langs = fc.manifest.get("caption_langs") or {}  # {code: captions}, when extraction recorded them
            meta["language"] = language or (", ".join(langs) if langs else None)
            meta["n_images"], meta["n_captions"] = int(c.image.shape[0]), int(c.text.shape[0])
            img_raw = c.image.numpy()
            img_raw = img_raw[:, 0] if img_raw.ndim == 3 else img_raw
            img = model.project_image_features(img_raw)
            txt = model.project_text_features(c.text.numpy())
            text_image = c.text_image.numpy()
            meta["name"] = f"features {Path(features).name}"
        else:
            if data is None:
                raise RecipeError("retrieval needs --data (a Flickr8k-style folder, a COCO captions json or an "
                                  "image,caption table) or --features (a feature cache)")
            pairs = PairedSet.load(data, split, image_column, caption_column, image_root,
                                   captions_file=captions).subset(limit, seed)
            meta["name"] = pairs.name
            meta["language"] = language or caption_language(captions or data, flickr_default=captions is None
                                                            and Path(data).is_dir())
            if captions:
                meta["captions"] = str(captions)
            meta["n_images"], meta["n_captions"] = len(pairs), len(pairs.captions)
            if Path(data).is_dir():
                meta["split"] = split
            if features:
                img = model.project_image_features(load_cached_image_features(features, list(pairs.keys)))
            else:
                sub = cache / f"img-{fp}-{_data_key([str(p) for p in pairs.image_paths])}" if cache and fp else None
                skips = _Skips(lambda i, item: item)
                img = embed_images(model.encode_image, pairs.image_paths, batch_size, progress, sub,
                                   skipped=skips.items, on_skip=skips)
                if skips.items:
                    bad = skips.indexes()
                    pairs = pairs.select([i for i in range(len(pairs)) if i not in bad])
                    if not len(pairs):
                        raise RecipeError(f"{data}: none of the images could be opened (first: "
                                          f"{skips.items[0][1]}: {skips.items[0][2]})")
            txt = model.encode_text(pairs.captions)
            text_image = pairs.caption_image
        metrics, result["curves"] = retrieval_eval(img, txt, text_image, curve_max_k=curve_max_k)
    elif task == "zeroshot":
        from align.eval.classnames import from_hf_dataset, load_labeled_images
        from align.eval.zeroshot import classification_eval, zeroshot_classifier

        if data is None:
            raise RecipeError("zeroshot needs --data (ImageFolder, wnid-prefixed folder or saved HF dataset)")
        dp = Path(data)
        ds_fp = ""
        if (dp / "dataset_info.json").exists() or (dp / "state.json").exists() or (dp / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(dp))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise RecipeError(f"{dp}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            labeled = from_hf_dataset(ds, label_column, image_column, name=dp.name)
            ds_fp = str(getattr(ds, "_fingerprint", ""))   # rows have no file to hash: the dataset's identity
        else:
            labeled = load_labeled_images(dp)
        meta["name"] = labeled.name
        idx = np.arange(len(labeled))
        if limit is not None and limit < len(labeled):
            idx = np.sort(np.random.default_rng(seed).permutation(len(labeled))[:limit])
        W = zeroshot_classifier(model.encode_text, labeled.classnames, prompts, labeled.glosses,
                                cache_dir=cache, model_fingerprint=fp, progress=progress)
        all_keys = labeled.keys()
        keys = [all_keys[i] for i in idx]
        if features:
            img = model.project_image_features(load_cached_image_features(features, keys))
        else:
            sub = cache / f"img-{fp}-{_data_key(keys + [ds_fp])}" if cache and fp else None
            # a file is cached under its bytes' digest; a dataset row under its index (+ the dataset fingerprint)
            items = [labeled.images[i] if isinstance(labeled.images[i], (str, Path)) else int(i) for i in idx]

            def opener(item: Any):
                if isinstance(item, (str, Path)):
                    from align.data import decode_image

                    return decode_image(str(item), Path(item).name)
                return labeled.open(item)

            skips = _Skips(lambda n, item: item if isinstance(item, (str, Path)) else f"row {item}")
            img = embed_images(model.encode_image, items, batch_size, progress, sub, opener=opener,
                               skipped=skips.items, on_skip=skips)
            if skips.items:
                bad = skips.indexes()
                idx = np.asarray([i for n, i in enumerate(idx) if n not in bad], np.int64)
                if not len(idx):
                    raise RecipeError(f"{data}: none of the images could be opened (first: "
                                      f"{skips.items[0][1]}: {skips.items[0][2]})")
        metrics, result["per_class"] = classification_eval(img, W, labeled.labels[idx], labeled.classnames)
        meta.update({"prompts": prompts, "n_classes": len(labeled.classnames)})
    else:
        raise RecipeError(f"unknown task {task!r} (zeroshot or retrieval)")
    if skips is not None:
        metrics["n_skipped"] = len(skips.items)
        meta["skipped"] = skips.report()
    result = {"metrics": metrics, "meta": meta, **result}
    if out:
        from align.eval.report import write_eval

        result["files"] = [str(p) for p in write_eval(result, out, task)]
    return result


def _cmd_eval(args: argparse.Namespace) -> int:
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
    e.add_argument("--task", choices=["zeroshot", "retrieval"], required=True)
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
