"""Evaluation as library functions: :func:`run_retrieval`, :func:`run_zeroshot` (and :func:`run_eval`, which
picks one by ``task``), model loading and cached-feature lookup. ``align eval`` (:mod:`align.eval.cli`) and
``align eval --suite`` (:mod:`align.eval.suite`) are thin callers of these.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from tether.recipe import RecipeError

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


def _finish(result: dict[str, Any], skips: "_Skips | None", out: str | Path | None, task: str) -> dict[str, Any]:
    if skips is not None:
        result["metrics"]["n_skipped"] = len(skips.items)
        result["meta"]["skipped"] = skips.report()
    if out:
        from align.eval.report import write_eval

        result["files"] = [str(p) for p in write_eval(result, out, task)]
    return result


def _embed_cache(model: Any, out: str | Path | None, cache_dir: str | Path | None) -> tuple[str | None, Path | None]:
    fp = model_fingerprint(model)
    return fp, (Path(cache_dir) if cache_dir else (Path(out) / "cache" if out else None))


def run_retrieval(model: Any, data: str | None = None, split: str = "test", limit: int | None = None,
                  seed: int = 0, features: str | None = None, out: str | Path | None = None,
                  cache_dir: str | Path | None = None, batch_size: int = 64, image_column: str = "image",
                  caption_column: str = "caption", image_root: str | None = None, captions: str | None = None,
                  language: str | None = None, curve_max_k: int = 50, progress: bool = True,
                  opener: Callable[[Any], Any] | None = None, identity: str = "") -> dict[str, Any]:
    """Image↔text retrieval of ``model`` (``encode_image``/``encode_text``; ``project_*_features`` for cached
    features) on ``data`` (a Flickr8k-style folder, a COCO captions json or an image,caption table) or on a feature
    cache (``features``). Returns ``{"metrics", "meta", "curves"}`` (recall@K, K = 1..``curve_max_k``) and writes the
    report when ``out`` is given.

    ``captions`` = a Flickr8k-format captions file (any language) used instead of ``<data>/captions.txt`` (only the
    split's images that have captions there are evaluated); ``language`` (default: guessed from a ``*.xx.txt`` /
    ``*.xx.jsonl`` file name, else ``en`` for Flickr8k's own captions, else unknown) goes into the report.
    ``data`` may also be a :class:`align.eval.retrieval.PairedSet` already loaded, whose ``image_paths`` are opened
    with ``opener`` (e.g. row numbers of a Hugging Face dataset) and cached under ``identity`` (the dataset's).
    Images that cannot be opened are skipped (one stderr line each), listed in ``meta["skipped"]`` and counted in
    ``metrics["n_skipped"]``."""
    from align.eval.retrieval import PairedSet, embed_images, retrieval_eval

    fp, cache = _embed_cache(model, out, cache_dir)
    loaded = isinstance(data, PairedSet)
    meta: dict[str, Any] = {"task": "retrieval", "model_fingerprint": fp, "features": features,
                            "data": data.name if loaded else data if data is not None else features}
    skips: _Skips | None = None
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
        pairs = (data if loaded else PairedSet.load(data, split, image_column, caption_column, image_root,
                                                    captions_file=captions)).subset(limit, seed)
        meta["name"] = pairs.name
        meta["language"] = language or (None if loaded else caption_language(
            captions or data, flickr_default=captions is None and Path(data).is_dir()))
        if captions:
            meta["captions"] = str(captions)
        meta["n_images"], meta["n_captions"] = len(pairs), len(pairs.captions)
        if loaded or Path(data).is_dir():
            meta["split"] = split
        if features:
            img = model.project_image_features(load_cached_image_features(features, list(pairs.keys)))
        else:
            sub = (cache / f"img-{fp}-{_data_key([str(p) for p in pairs.image_paths] + ([identity] if identity else []))}"
                   if cache and fp else None)
            skips = _Skips(lambda i, item: item if opener is None else f"row {item}")
            img = embed_images(model.encode_image, pairs.image_paths, batch_size, progress, sub, opener=opener,
                               skipped=skips.items, on_skip=skips)
            if skips.items:
                bad = skips.indexes()
                pairs = pairs.select([i for i in range(len(pairs)) if i not in bad])
                if not len(pairs):
                    raise RecipeError(f"{data}: none of the images could be opened (first: "
                                      f"{skips.items[0][1]}: {skips.items[0][2]})")
        txt = model.encode_text(pairs.captions)
        text_image = pairs.caption_image
    metrics, curves = retrieval_eval(img, txt, text_image, curve_max_k=curve_max_k)
    return _finish({"metrics": metrics, "meta": meta, "curves": curves}, skips, out, "retrieval")


def is_saved_dataset(path: str | Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_labeled(data: str, split: str = "test", label_column: str = "label", image_column: str = "image"):
    """:class:`align.eval.classnames.LabeledImages` and a dataset identity (``""`` for files, which are cached
    under their bytes' digest) from an ImageFolder / wnid-prefixed folder or a saved HF dataset."""
    from align.eval.classnames import from_hf_dataset, load_labeled_images

    dp = Path(data)
    if not is_saved_dataset(dp):
        return load_labeled_images(dp), ""
    import datasets

    ds = datasets.load_from_disk(str(dp))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise RecipeError(f"{dp}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    # rows have no file to hash: the dataset's fingerprint is their identity
    return from_hf_dataset(ds, label_column, image_column, name=dp.name), str(getattr(ds, "_fingerprint", ""))


def run_zeroshot(model: Any, data: Any, split: str = "test", prompts: "str | Sequence[str]" = "clip80",
                 limit: int | None = None, seed: int = 0, features: str | None = None,
                 out: str | Path | None = None, cache_dir: str | Path | None = None, batch_size: int = 64,
                 label_column: str = "label", image_column: str = "image", classnames: Sequence[str] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Zero-shot classification of ``model`` on ``data``: an ImageFolder / wnid-prefixed folder / saved HF dataset
    path, or a :class:`align.eval.classnames.LabeledImages` already loaded (with its dataset identity as
    ``(labeled, identity)``). ``prompts`` is a prompt-set name (:data:`align.eval.prompts.PROMPT_SETS`) or a list of
    templates (``{c}`` or ``{}`` = class name); ``classnames`` replaces the data's class names (same order as its
    sorted class ids / ClassLabel names). Returns ``{"metrics", "meta", "per_class"}``; writes the report when
    ``out`` is given."""
    from align.eval.retrieval import embed_images
    from align.eval.zeroshot import classification_eval, zeroshot_classifier

    fp, cache = _embed_cache(model, out, cache_dir)
    if data is None:
        raise RecipeError("zeroshot needs --data (ImageFolder, wnid-prefixed folder or saved HF dataset)")
    labeled, ds_fp = data if isinstance(data, tuple) else load_labeled(str(data), split, label_column,
                                                                       image_column)
    if classnames is not None:
        if len(classnames) != len(labeled.classnames):
            raise RecipeError(f"{labeled.name}: {len(classnames)} class names given for {len(labeled.classnames)} "
                              "classes in the data")
        labeled.classnames = [str(c) for c in classnames]
    meta: dict[str, Any] = {"task": "zeroshot", "data": str(data) if not isinstance(data, tuple) else labeled.name,
                            "model_fingerprint": fp, "features": features, "name": labeled.name}
    idx = np.arange(len(labeled))
    if limit is not None and limit < len(labeled):
        idx = np.sort(np.random.default_rng(seed).permutation(len(labeled))[:limit])
    W = zeroshot_classifier(model.encode_text, labeled.classnames, prompts, labeled.glosses,
                            cache_dir=cache, model_fingerprint=fp, progress=progress)
    all_keys = labeled.keys()
    keys = [all_keys[i] for i in idx]
    skips: _Skips | None = None
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
                raise RecipeError(f"{meta['data']}: none of the images could be opened (first: "
                                  f"{skips.items[0][1]}: {skips.items[0][2]})")
    metrics, per_class = classification_eval(img, W, labeled.labels[idx], labeled.classnames)
    from align.eval.prompts import prompt_label

    meta.update({"prompts": prompt_label(prompts), "n_classes": len(labeled.classnames)})
    return _finish({"metrics": metrics, "meta": meta, "per_class": per_class}, skips, out, "zeroshot")


def run_eval(model: Any, task: str, data: str | None = None, split: str = "test", prompts: str = "clip80",
             limit: int | None = None, seed: int = 0, features: str | None = None, out: str | Path | None = None,
             cache_dir: str | Path | None = None, batch_size: int = 64, label_column: str = "label",
             image_column: str = "image", progress: bool = True, caption_column: str = "caption",
             image_root: str | None = None, curve_max_k: int = 50, captions: str | None = None,
             language: str | None = None) -> dict[str, Any]:
    """:func:`run_retrieval` or :func:`run_zeroshot` by ``task`` (the ``align eval`` flags, one to one)."""
    common = dict(split=split, limit=limit, seed=seed, features=features, out=out, cache_dir=cache_dir,
                  batch_size=batch_size, image_column=image_column, progress=progress)
    if task == "retrieval":
        return run_retrieval(model, data, caption_column=caption_column, image_root=image_root,
                             captions=captions, language=language, curve_max_k=curve_max_k, **common)
    if task == "zeroshot":
        return run_zeroshot(model, data, prompts=prompts, label_column=label_column, **common)
    if task == "localize":
        from align.eval.localize import run_localize
        from align.eval.prompts import templates_for

        if data is None:
            raise RecipeError("localize needs --data (a folder with localization.jsonl, or the file)")
        return run_localize(model, data, templates_for(prompts), limit=limit, seed=seed, out=out, progress=progress)
    raise RecipeError(f"unknown task {task!r} (zeroshot, retrieval or localize)")
