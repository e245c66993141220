"""Flickr8k alignment results: variants x seeds trained from ONE feature cache, one table.

Every variant is a set of recipe overrides on top of ``--config`` (+ ``--set``); every (variant, seed) trains
projectors from the recipe's feature cache (``align extract`` it first, or let the first run extract it), then

* retrieval: Flickr8k test images (1k) x their captions (5k), from the cached ``val`` features (the training
  run's own validation, identical to ``align eval --task retrieval --features <cache>/val``);
* zero-shot: the ImageNet sample, with frozen image features and frozen prompt features computed ONCE per
  encoder (``<out>/zeroshot-*.npz``) and only the projectors applied per model (token heads: not evaluated).

With ``--captions NAME=FILE`` (repeatable; e.g. ``de=captions.de.txt``), each model is also scored on the val
split's images with that captions file (Flickr8k format, any language; images without a caption in it are left
out): the frozen caption features are computed ONCE per (text encoder, file) into ``<out>/captions-*.npz`` and
the image features come from the recipe's val cache, so per model only the projectors run — the numbers
``align eval MODEL --task retrieval --data VAL_FOLDER --captions FILE --features CACHE/val`` prints.
``NAME=FILE@REF`` compares its T→I R@1 with captions file REF's (default: the English val captions), e.g.
German on its 929 images against English on the same images.

With ``--cka N``, each variant's frozen train features (the first N images of its train cache: crop 0, and the
mean of each image's caption features) are also scored by linear CKA, unbiased CKA and mutual kNN, and the
Spearman ρ between each score and the trained retrieval over the variants answers "does the CKA ranking
predict the retrieval ranking after training?" (a pair sweep: one variant per encoder pair).

Writes ``<out>/results.json`` and ``<out>/results.md`` (mean ± std over seeds, and each variant's ratio to the
first variant, the baseline) and prints the table. Finished runs (``metrics.json`` present) are not retrained,
so a killed sweep resumes where it stopped.

    python bench/flickr8k_results.py --config recipes/quickstart_align.yaml --seeds 0 1 2 \\
        --variant mlp= --variant 'linear=projector.image.kind=linear;projector.text.kind=linear' \\
        --out runs/results/quickstart
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from align.config import TrainRecipe, load_train_recipe  # noqa: E402
from tether.recipe import RecipeError  # noqa: E402

CKA_COLUMNS = [("linear_cka", "linear CKA"), ("unbiased_cka", "unbiased CKA"), ("mutual_knn", "mutual kNN")]
COLUMNS = [("t2i_R@1", "T→I R@1"), ("t2i_R@5", "T→I R@5"), ("i2t_R@1", "I→T R@1"), ("i2t_R@5", "I→T R@5"),
           ("zs_top1", "IN zero-shot top-1"), ("zs_top5", "IN top-5"), ("train_s", "train s")]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``NAME=key.a=v1;key.b=v2`` → (NAME, overrides); ``NAME=`` is the recipe unchanged."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise RecipeError(f"--variant {spec!r}: expected NAME=override;override (or NAME= for none)")
    return name, [s.strip() for s in rest.split(";") if s.strip()]


def _members(recipe: TrainRecipe, *sides: str) -> list:
    """An encoder ensemble's members (part of the frozen-feature file keys; nothing for single encoders, so the
    files computed before ensembles existed keep their names)."""
    got = [[m.model_dump() for m in getattr(recipe, side).members] for side in (sides or ("vision", "text"))]
    return got if any(got) else []


class FrozenZeroShot:
    """Frozen ImageNet-sample image features and prompt features of one (vision, pooling, text) setting, computed
    once and stored in an ``.npz``; :meth:`evaluate` applies a trained model's projectors only."""

    def __init__(self, recipe: TrainRecipe, data: Path, prompts: str, out: Path):
        self.recipe, self.data, self.prompts = recipe, data, prompts
        key = json.dumps([recipe.encoder_name("vision"), recipe.vision.layer, recipe.image_pooling,
                          recipe.encoder_name("text"), recipe.text.max_length, str(data.resolve()), prompts]
                         + _members(recipe))
        self.path = out / f"zeroshot-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
        self._feats: dict[str, Any] | None = None

    def _compute(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from align.eval.classnames import load_labeled_images
        from align.eval.prompts import build_prompts
        from align.train import load_encoders

        labeled = load_labeled_images(self.data)
        vision, text = load_encoders(self.recipe)
        image_rows = []
        with torch.no_grad():
            for i in tqdm(range(0, len(labeled), 32), desc="zero-shot image features", unit="batch"):
                imgs = [labeled.open(j) for j in range(i, min(i + 32, len(labeled)))]
                image_rows.append(vision.pool(vision.tokens(vision.preprocess(imgs)),
                                              self.recipe.image_pooling).float().numpy())
            per_class = build_prompts(labeled.classnames, self.prompts, labeled.glosses or None)
            texts = [t for ps in per_class for t in ps]
            text_rows = []
            for i in tqdm(range(0, len(texts), 128), desc="zero-shot prompt features", unit="batch"):
                # the encoder's own pooled embedding, as in the feature cache: any text encoder, packaged
                # (pooled-only, e.g. use-multilingual-v3) ones included
                text_rows.append(text.pooled(texts[i:i + 128]).float().numpy())
        feats = {"image": np.concatenate(image_rows), "keys": np.array(labeled.keys()),
                 "labels": np.asarray(labeled.labels), "text": np.concatenate(text_rows),
                 "n_templates": np.array(len(per_class[0]))}
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **feats)
        tmp.replace(self.path)
        return feats

    def features(self) -> dict[str, Any]:
        if self._feats is None:
            self._feats = dict(np.load(self.path)) if self.path.exists() else self._compute()
        return self._feats

    def evaluate(self, model) -> dict[str, float]:
        from align.eval.zeroshot import classification_metrics

        f = self.features()
        t = int(f["n_templates"])
        emb = model.project_text_features(f["text"])  # [C*T, D], L2-normalised
        w = emb.reshape(-1, t, emb.shape[-1]).mean(1)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        img = model.project_image_features(f["image"])
        m = classification_metrics(img, w, f["labels"])
        return {"zs_top1": m["top1"], "zs_top5": m["top5"]}


class FrozenCaptions:
    """Retrieval on the val images with another captions file (``--captions``): frozen caption features once per
    (text encoder, file), image features from the recipe's val cache; :meth:`evaluate` runs the projectors only."""

    METRICS = ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5")

    def __init__(self, recipe: TrainRecipe, spec: str, out: Path):
        from tether.recipe import resolve_path

        name, sep, rest = spec.partition("=")
        file, _, self.ref = rest.partition("@")
        if not sep or not name or not file:
            raise RecipeError(f"--captions {spec!r}: expected NAME=FILE or NAME=FILE@REF")
        val = recipe.val
        if val is None or val.format != "flickr8k":
            raise RecipeError("--captions needs the recipe's val section to be a flickr8k folder")
        self.name, self.file = name, resolve_path(file)
        if not self.file.is_file():
            raise RecipeError(f"--captions {spec!r}: {self.file} not found")
        self.root, self.split = resolve_path(val.path if isinstance(val.path, str) else val.path[0]), val.split
        self.recipe, self.cache = recipe, recipe.cache_dir("val")
        st = self.file.stat()
        key = json.dumps([recipe.encoder_name("text"), recipe.text.max_length, recipe.text.dtype,
                          str(self.file.resolve()), st.st_size, st.st_mtime_ns, str(self.root.resolve()), self.split,
                          str(self.cache.resolve())] + _members(recipe, "text"))
        self.path = out / f"captions-{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
        self._feats: dict[str, Any] | None = None

    def _compute(self) -> dict[str, Any]:
        from align.eval.run import load_cached_image_features
        from align.ensemble import load_text_side
        from align.eval.retrieval import PairedSet

        pairs = PairedSet.from_flickr8k(self.root, self.split, self.file)
        text = load_text_side(self.recipe)
        caps = list(pairs.captions)
        with torch.no_grad():  # what AlignedModel.encode_text feeds its text head: the pooled embedding, float32
            rows = [text.pooled(caps[i:i + 256]).float().numpy() for i in range(0, len(caps), 256)]
        feats = {"text": np.concatenate(rows), "text_image": np.asarray(pairs.caption_image),
                 "image": load_cached_image_features(self.cache, list(pairs.keys)),
                 "fingerprint": np.array(text.fingerprint)}
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **feats)
        tmp.replace(self.path)
        return feats

    def features(self, fingerprint: str | None = None) -> dict[str, Any]:
        if self._feats is None and self.path.exists():
            self._feats = dict(np.load(self.path))
        if self._feats is None or (fingerprint and str(self._feats["fingerprint"]) != fingerprint):
            self._feats = self._compute()
        return self._feats

    def evaluate(self, model) -> dict[str, float]:
        from align.eval.retrieval import retrieval_eval

        f = self.features(model.config["text"].get("fingerprint"))
        m, _ = retrieval_eval(model.project_image_features(f["image"]), model.project_text_features(f["text"]),
                              f["text_image"])
        out = {f"{self.name}:{k}": float(m[k]) for k in self.METRICS}
        out[f"{self.name}:n_images"] = int(f["image"].shape[0])
        return out


def run_one(config: str, overrides: list[str], out_dir: Path, zeroshot: FrozenZeroShot | None,
            captions: list[FrozenCaptions] = ()) -> dict[str, Any]:
    """Train (unless finished) and evaluate one (variant, seed); returns its flat metrics."""
    from align.model import AlignedModel
    from align.train import train

    done = out_dir / "result.json"
    if done.exists():
        row = json.loads(done.read_text())
        todo = [c for c in captions if f"{c.name}:t2i_R@1" not in row]
        if todo:  # a finished run scored on captions files added since
            model = AlignedModel.from_pretrained(out_dir / "model")
            for c in todo:
                row.update(c.evaluate(model))
            done.write_text(json.dumps(row, indent=2))
        return row
    recipe = load_train_recipe(config, overrides + [f"train.output_dir={out_dir}", "train.progress=false"])
    metrics = out_dir / "metrics.json"  # written when training finished (killed later, e.g. in zero-shot)
    trained_before = metrics.exists()
    t0 = time.perf_counter()
    s = json.loads(metrics.read_text()) if trained_before else train(recipe)  # train() resumes a killed run
    row: dict[str, Any] = {"train_s": None if trained_before else time.perf_counter() - t0,
                           "steps": s["steps"], "num_pairs": s["num_pairs"],
                           "first_loss": s["first_loss"], "last_loss": s["last_loss"],
                           "temperature": s["temperature"], **{k: v for k, v in (s["val"] or {}).items()}}
    tokens = "token" in (recipe.projector.image.kind, recipe.projector.text.kind)
    if zeroshot is not None and not tokens:
        row.update(zeroshot.evaluate(AlignedModel.from_pretrained(out_dir / "model")))
    if captions:
        model = AlignedModel.from_pretrained(out_dir / "model")
        for c in captions:
            row.update(c.evaluate(model))
    done.write_text(json.dumps(row, indent=2))
    return row


def cache_similarity(config: str, overrides: list[str], n: int, knn_k: int = 10) -> dict[str, float]:
    """Linear / unbiased CKA and mutual kNN of one variant's frozen train features (first ``n`` images)."""
    from align.eval.cka import similarity_scores
    from align.eval.select import mean_by_owner
    from align.features import FeatureCache
    from align.train import pooled_part

    recipe = load_train_recipe(config, overrides)
    cache = FeatureCache.open(recipe.cache_dir("train"))
    feats = pooled_part(cache.load(), recipe.train.image_pooling, cache.dims["image_token"])
    n = min(n, feats.num_images)
    keep = feats.text_image < n
    X = feats.image[:n, 0].numpy().astype(np.float32)
    Y = mean_by_owner(feats.text[keep].numpy(), feats.text_image[keep].numpy(), n)
    return similarity_scores(X, Y, k=knn_k)


def summarise(results: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Markdown table (mean ± std over seeds, ratio to the first variant) and the JSON summary."""
    summary: dict[str, Any] = {}
    for name, rows in results.items():
        summary[name] = {}
        for key, _ in COLUMNS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                summary[name][key] = {"mean": statistics.fmean(vals),
                                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    base = next(iter(summary.values()), {})
    head = "| variant | seeds | " + " | ".join(h for _, h in COLUMNS) + " | T→I R@1 vs baseline |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, cols in summary.items():
        cells = [f"{cols[k]['mean']:.1f} ± {cols[k]['std']:.1f}" if k in cols else "—" for k, _ in COLUMNS]
        ratio = (f"{cols['t2i_R@1']['mean'] / base['t2i_R@1']['mean']:.2f}×"
                 if "t2i_R@1" in cols and base.get("t2i_R@1", {}).get("mean") else "—")
        lines.append(f"| {name} | {len(results[name])} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n", summary


def captions_table(results: dict[str, list[dict[str, Any]]], captions: list[FrozenCaptions],
                   summary: dict[str, Any]) -> str:
    """Per variant and captions file: retrieval on the val images (mean ± std over seeds) and T→I R@1 as a share
    of the reference's (``@REF``, default the English val captions)."""
    def stat(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None

    cols = [(k, h) for k, h in COLUMNS if k in FrozenCaptions.METRICS]
    out = ["\nRetrieval on the val images per captions file (`--captions`; `val` = the recipe's own val captions):\n",
           "| variant | captions | images | " + " | ".join(h for _, h in cols) + " | T→I R@1 vs reference |",
           "|" + "---|" * (len(cols) + 4)]
    for name, rows in results.items():
        for c in [None, *captions]:
            prefix = "" if c is None else f"{c.name}:"
            cells = [stat(rows, prefix + k) for k, _ in cols]
            if c is not None:
                summary[name].update({prefix + k: {"mean": v[0], "std": v[1], "n": len(rows)}
                                      for (k, _), v in zip(cols, cells) if v})
            ref_prefix = f"{c.ref}:" if c is not None and c.ref else ""
            ref = stat(rows, ref_prefix + "t2i_R@1") if c is not None else None
            mine = cells[0] if cols[0][0] == "t2i_R@1" else stat(rows, prefix + "t2i_R@1")
            ratio = f"{100 * mine[0] / ref[0]:.0f} % (of {c.ref or 'val'})" if ref and mine and ref[0] else "—"
            n_img = rows[0].get(prefix + "n_images", "") if c is not None else ""
            out.append(f"| {name} | {'val' if c is None else c.name} | {n_img} | "
                       + " | ".join(f"{v[0]:.1f} ± {v[1]:.1f}" if v else "—" for v in cells) + f" | {ratio} |")
    return "\n".join(out) + "\n"


def cka_table(args, variants, summary: dict[str, Any]) -> str:
    """Per variant: frozen-feature similarity scores and trained R@1; then Spearman rho of each score vs each
    trained recall over the variants (+1 = the similarity ranking is the trained ranking)."""
    from align.eval.select import spearman

    rows = []
    for name, sets in variants:
        sim = cache_similarity(args.config, list(args.set) + sets, args.cka)
        summary[name].update({k: {"mean": v, "std": 0.0, "n": 1} for k, v in sim.items()})
        rows.append((name, sim, summary[name]["t2i_R@1"]["mean"], summary[name]["i2t_R@1"]["mean"]))
    rows.sort(key=lambda r: -r[1]["linear_cka"])
    out = [f"\nFrozen train features, first {args.cka} images (crop 0 vs the mean of the image's caption features):"
           "\n", "| variant | " + " | ".join(h for _, h in CKA_COLUMNS) + " | trained T→I R@1 | trained I→T R@1 |",
           "|" + "---|" * (len(CKA_COLUMNS) + 3)]
    for name, sim, t2i, i2t in rows:
        out.append(f"| {name} | " + " | ".join(f"{sim[k]:.3f}" for k, _ in CKA_COLUMNS) + f" | {t2i:.1f} | {i2t:.1f} |")
    out += ["", "| score | ρ vs trained T→I R@1 | ρ vs trained I→T R@1 |", "|---|---|---|"]
    for k, h in CKA_COLUMNS:
        a = [r[1][k] for r in rows]
        out.append(f"| {h} | {spearman(a, [r[2] for r in rows]):.3f} | {spearman(a, [r[3] for r in rows]):.3f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "recipes" / "quickstart_align.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="NAME=key=value;key=value (repeatable; the first is the baseline); default: the recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--imagenet", default=None, help="ImageNet sample folder (default $TETHER_SHARED/data/"
                   "imagenet-sample); 'none' skips zero-shot")
    p.add_argument("--prompts", default="photo", help="prompt set for zero-shot (photo | clip80 | ...)")
    p.add_argument("--out", default="runs/results/flickr8k")
    p.add_argument("--captions", action="append", default=[], metavar="NAME=FILE[@REF]",
                   help="also score each model on the val images with this captions file (any language); @REF: "
                        "compare its T→I R@1 with captions file REF's instead of the val captions'")
    p.add_argument("--cka", type=int, default=0, metavar="N",
                   help="also score each variant's frozen train features (first N images) by CKA / mutual kNN and "
                        "report Spearman rho against the trained retrieval")
    args = p.parse_args(argv)
    try:
        from tether.recipe import shared_dir

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        variants = [parse_variant(v) for v in args.variant] or [("recipe", [])]
        imagenet = Path(args.imagenet) if args.imagenet else shared_dir() / "data" / "imagenet-sample"
        results: dict[str, list[dict[str, Any]]] = {}
        for name, sets in variants:
            ov = list(args.set) + sets
            zs = None
            if args.imagenet != "none":
                if not imagenet.is_dir():
                    raise RecipeError(f"{imagenet}: no ImageNet sample (pass --imagenet DIR or --imagenet none)")
                zs = FrozenZeroShot(load_train_recipe(args.config, ov), imagenet, args.prompts, out)
            caps = [FrozenCaptions(load_train_recipe(args.config, ov), c, out) for c in args.captions]
            names = {c.name for c in caps}
            for c in caps:
                if c.ref and c.ref not in names:
                    raise RecipeError(f"--captions {c.name}=…@{c.ref}: no --captions named {c.ref!r}")
            for seed in args.seeds:
                row = run_one(args.config, ov + [f"train.seed={seed}"], out / name / f"seed{seed}", zs, caps)
                results.setdefault(name, []).append({"seed": seed, **row})
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {row[k]:.1f}" for k, _ in COLUMNS if row.get(k) is not None),
                      flush=True)
        table, summary = summarise(results)
        if args.captions:
            table += captions_table(results, caps, summary)
        if args.cka:
            table += cka_table(args, variants, summary)
        meta = {"command": " ".join(["python", "bench/flickr8k_results.py", *(argv or sys.argv[1:])]),
                "config": args.config, "set": args.set, "variants": dict(variants), "seeds": args.seeds}
        (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=2))
        (out / "results.md").write_text(f"`{meta['command']}`\n\n{table}")
        print(table)
        return 0
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
