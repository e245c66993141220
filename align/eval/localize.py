"""Localization score for token-head models: the pointing game on patch maps, and a synthetic benchmark.

A model with per-patch embeddings (a ``token`` image head with a patch term; ``AlignedModel.patch_similarity``)
gives, for an image and a text, a map of cosines on the encoder's patch grid. Given where the named thing is (a box
or a mask), two numbers per (image, class):

* **pointing game** — the map's highest cell lies on the object (at least half of the cell inside its box/mask);
  **chance** is the share of the grid's cells that do (a uniformly random cell's hit rate).
* **mass inside** — the share of the map's mass above its median that falls on the object (energy-based pointing).

Boxes and masks are given in the ORIGINAL image's pixels; the mask is sent through the encoder's own preprocessing
(resize, center crop …) exactly like the image, so the score is computed where the patches are, whatever the
preprocessing.

Data: a folder with ``localization.jsonl`` (or that file itself), one line per (image, class)::

    {"image": "photos/0001.jpg", "class": "dog", "box": [x0, y0, x1, y1]}       # or "boxes": [[...], ...]
    {"image": "photos/0002.jpg", "class": "cat", "mask": "masks/0002.png"}       # non-zero pixels = the object

Paths are relative to the manifest's folder and must stay inside it; a bad line is skipped with a reason, never
fatal. :func:`make_composites` builds the synthetic benchmark from any labelled photos (e.g. the ImageNet sample):
two photos of different classes side by side, each class's half its box — the prompt's map must peak on its half
(chance ≈ 50 %). ``python -m align.eval.localize composites --images DIR --out DIR`` writes one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tether.fileio import atomic_write
from tether.recipe import RecipeError

MANIFEST = "localization.jsonl"
MAX_LINES = 1_000_000


@dataclass
class LocItem:
    image: Path
    classname: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    mask: Path | None = None


def _inside(root: Path, rel: Any, line: int, what: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ValueError(f"line {line}: {what} must be a relative path inside {root}")
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise ValueError(f"line {line}: {what} {rel!r} leaves {root}")
    return p


def _box(v: Any, line: int) -> tuple[float, float, float, float]:
    if (not isinstance(v, (list, tuple)) or len(v) != 4
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        raise ValueError(f"line {line}: a box is [x0, y0, x1, y1] (4 finite numbers), got {str(v)[:60]}")
    x0, y0, x1, y1 = (float(x) for x in v)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"line {line}: empty box {list(v)}")
    return x0, y0, x1, y1


def load_manifest(path: str | Path) -> tuple[list[LocItem], list[dict[str, Any]], str]:
    """``(items, skipped lines with reasons, name)`` from a folder holding ``localization.jsonl`` or the file."""
    p = Path(path)
    f = p / MANIFEST if p.is_dir() else p
    if not f.is_file():
        raise RecipeError(f"{p}: no {MANIFEST} (one JSON object per line: image, class, box/boxes/mask)")
    root = f.parent
    items, skipped = [], []
    with open(f, encoding="utf-8-sig") as fh:
        for n, raw in enumerate(fh, 1):
            if n > MAX_LINES:
                raise RecipeError(f"{f}: more than {MAX_LINES:,} lines")
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError(f"line {n}: not a JSON object")
                name = row.get("class")
                if not isinstance(name, str) or not name.strip() or len(name) > 200:
                    raise ValueError(f"line {n}: 'class' must be a non-empty name (at most 200 characters)")
                img = _inside(root, row.get("image"), n, "image")
                boxes = [_box(b, n) for b in (row.get("boxes") or ([row["box"]] if "box" in row else []))]
                mask = _inside(root, row["mask"], n, "mask") if row.get("mask") is not None else None
                if not boxes and mask is None:
                    raise ValueError(f"line {n}: needs a box, boxes or a mask")
                items.append(LocItem(img, name.strip(), boxes, mask))
            except ValueError as e:   # json.JSONDecodeError is a ValueError too
                msg = str(e) if str(e).startswith("line ") else f"line {n}: not valid JSON ({e})"
                skipped.append({"line": n, "reason": msg})
    if not items:
        raise RecipeError(f"{f}: no usable lines" + (f" (first: {skipped[0]['reason']})" if skipped else ""))
    return items, skipped, root.name


def object_mask(item: LocItem, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool in the original image's pixels: the union of the boxes and the mask."""
    w, h = size
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in item.boxes:
        m[max(0, int(round(y0))):min(h, int(round(y1))), max(0, int(round(x0))):min(w, int(round(x1)))] = True
    if item.mask is not None:
        from align.data import decode_image

        mk = decode_image(str(item.mask), item.mask.name)
        if mk.size != (w, h):
            raise ValueError(f"mask {item.mask.name} is {mk.size[0]}x{mk.size[1]}, its image {w}x{h}")
        m |= np.asarray(mk.convert("L")) > 0
    return m


def grid_fraction(enc: Any, mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[gh, gw]``: the share of each patch cell covered by ``mask`` after the encoder's own preprocessing (the mask
    image goes through ``enc.preprocess`` like a photo; black and white references give the threshold)."""
    import torch
    from PIL import Image

    h, w = mask.shape
    ims = [Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB"),
           Image.new("RGB", (w, h), (0, 0, 0)), Image.new("RGB", (w, h), (255, 255, 255))]
    px = enc.preprocess(ims).float().cpu()[:, 0]                       # [3, H', W'] first channel
    lo, hi = float(px[1].mean()), float(px[2].mean())
    inside = ((px[0] - lo) / (hi - lo)).clamp(0, 1) if hi != lo else torch.zeros_like(px[0])
    return torch.nn.functional.adaptive_avg_pool2d((inside > 0.5).float()[None, None], grid)[0, 0].numpy()


def score_map(sims: np.ndarray, frac: np.ndarray) -> dict[str, float]:
    """Pointing hit, chance and mass inside for one map ``sims [gh, gw]`` and cell coverage ``frac``."""
    on = frac >= 0.5
    hit = float(on.flat[int(np.argmax(sims))])
    z = np.clip(sims - np.median(sims), 0, None)
    mass = float((z * frac).sum() / z.sum()) if z.sum() > 0 else float(frac.mean())
    return {"hit": hit, "chance": float(on.mean()), "mass": mass, "area": float(frac.mean())}


def run_localize(model: Any, data: str | Path, templates: Sequence[str] = ("a photo of a {c}.",),
                 limit: int | None = None, seed: int = 0, out: str | Path | None = None,
                 progress: bool = True, examples: int = 6) -> dict[str, Any]:
    """The pointing game of ``model`` (``patch_similarity`` needed) on a localization manifest. Returns
    ``{"metrics", "meta", "rows"}`` and writes ``localize.json`` / ``.md`` / ``.png`` when ``out`` is given."""
    from align.data import decode_image
    from align.eval.prompts import templates_for
    from tether.progress import progress as bar

    if not getattr(model, "has_patch_embeddings", False):
        raise RecipeError("localization needs a model with per-patch embeddings (a token image head with a patch "
                          "term, projector.image.kind: token); this one has pooled heads only")
    items, skipped, name = load_manifest(data)
    if limit is not None and limit < len(items):
        keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:limit])
        items = [items[i] for i in keep]
    temps = templates_for(list(templates))
    if any("{gloss}" in t for t in temps):
        raise RecipeError("localization prompts name the class only: WordNet-gloss templates are not used here")
    names = sorted({it.classname for it in items})
    # one text vector per class (its prompts' mean, as zero-shot classifiers are made), one patch pass per image
    cls = dict(zip(names, model.zero_shot_classifier(names, temps)))
    rows, shown = [], []
    last: tuple[Path, Any] | None = None
    for it in bar(items, desc="pointing game", unit="image", disable=not progress):
        try:
            im = decode_image(str(it.image), it.image.name)
            mask = object_mask(it, im.size)
            if last is None or last[0] != it.image:     # composites: two lines per image, one encoder pass
                last = (it.image, model.patch_embeddings(im))
            sims = (last[1] @ cls[it.classname]).astype(np.float32)
            frac = grid_fraction(model.vision, mask, sims.shape)
        except Exception as e:  # noqa: BLE001 - an unreadable image or mask: skipped by name, never fatal
            skipped.append({"image": str(it.image.name), "reason": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        r = {"image": str(it.image), "class": it.classname, **score_map(sims, frac)}
        rows.append(r)
        if len(shown) < examples:
            shown.append((im, sims, frac, r))
    if not rows:
        raise RecipeError(f"{data}: no (image, class) could be scored (first: {skipped[0]['reason']})")
    metrics = {"pointing_acc": 100.0 * float(np.mean([r["hit"] for r in rows])),
               "chance": 100.0 * float(np.mean([r["chance"] for r in rows])),
               "mass_inside": 100.0 * float(np.mean([r["mass"] for r in rows])),
               "object_area": 100.0 * float(np.mean([r["area"] for r in rows])),
               "n": len(rows), "n_skipped": len(skipped)}
    k = sum(r["hit"] for r in rows)
    metrics["pointing_ci95"] = [100.0 * x for x in _wilson(int(k), len(rows))]
    result = {"metrics": metrics, "meta": {"task": "localize", "data": str(data), "name": name,
                                           "templates": list(temps), "skipped": skipped[:1000]},
              "rows": rows}
    if out:
        result["files"] = [str(p) for p in write_localize(result, out, shown)]
    return result


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def write_localize(result: dict[str, Any], out: str | Path, shown: list) -> list[Path]:
    from align.eval.report import _clean

    out = Path(out)
    m = result["metrics"]
    lo, hi = m["pointing_ci95"]
    md = (f"# Localization (pointing game): {result['meta']['name']}\n\n"
          f"- data: `{result['meta']['data']}`; {m['n']:,} (image, class) pairs, {m['n_skipped']} skipped\n"
          f"- prompts: {len(result['meta']['templates'])} template(s), maps averaged\n\n"
          "| pointing acc. | 95 % CI | chance | mass inside | object area |\n|---|---|---|---|---|\n"
          f"| {m['pointing_acc']:.1f} | {lo:.1f}–{hi:.1f} | {m['chance']:.1f} | {m['mass_inside']:.1f} | "
          f"{m['object_area']:.1f} |\n\n"
          "Pointing: the map's highest patch lies on the object; chance: the share of patches that do; mass inside: "
          "the share of the map's mass above its median on the object (in %).\n")
    for s in result["meta"]["skipped"][:20]:
        md += f"- skipped {s.get('image', 'line ' + str(s.get('line')))}: {s['reason']}\n"
    files = [atomic_write(out / "localize.json", json.dumps(_clean(result), indent=2) + "\n"),
             atomic_write(out / "localize.md", md)]
    if shown:
        files.append(_examples_png(out / "localize.png", shown))
    return files


def _examples_png(path: Path, shown: list) -> Path:
    from align.eval.report import _plt, _save

    plt = _plt()
    n = len(shown)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for j, (im, sims, frac, r) in enumerate(shown):
        axes[0, j].imshow(im)
        axes[0, j].set_title(f"{r['class'][:18]}", fontsize=7)
        axes[1, j].imshow(sims, cmap="magma")
        axes[1, j].contour(frac >= 0.5, levels=[0.5], colors="cyan", linewidths=0.8)
        gy, gx = np.unravel_index(int(np.argmax(sims)), sims.shape)
        axes[1, j].plot([gx], [gy], marker="x", color="lime" if r["hit"] else "red", markersize=7)
        for a in axes[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle("patch maps (cyan: the object; x: the peak, green = hit)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# the synthetic benchmark: two photos of different classes side by side
# ---------------------------------------------------------------------------------------------------------
def make_composites(images: str | Path, out: str | Path, n: int = 500, size: int = 448, seed: int = 0) -> Path:
    """Write ``n`` composites (``size`` × ``size``: two photos of different classes, each center-cropped to a
    half) and ``localization.jsonl`` (two lines per composite: each class with its half as the box) into ``out``.
    ``images``: an ImageFolder or wnid-prefixed folder (class names as :mod:`align.eval.classnames` reads them)."""
    from PIL import Image

    from align.eval.classnames import load_labeled_images

    if n < 1 or not 32 <= size <= 4096:
        raise RecipeError(f"composites: n must be >= 1 and size in 32..4096 (got n={n}, size={size})")
    lab = load_labeled_images(images)
    if len(set(lab.labels.tolist())) < 2:
        raise RecipeError(f"{images}: composites need photos of at least two classes")
    rng = np.random.default_rng(seed)
    dest = Path(out)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    half = size // 2
    lines = []
    for i in range(n):
        while True:
            a, b = (int(x) for x in rng.choice(len(lab), 2, replace=False))
            if lab.labels[a] != lab.labels[b]:
                break
        canvas = Image.new("RGB", (size, size))
        for slot, k in enumerate((a, b)):
            im = lab.open(k)
            w, h = im.size   # center crop to the half's 1:2 (width:height) aspect, then resize
            cw, ch = (max(1, h // 2), h) if 2 * w > h else (w, min(h, 2 * w))
            left, top = (w - cw) // 2, (h - ch) // 2
            canvas.paste(im.crop((left, top, left + cw, top + ch)).resize((half, size), Image.BICUBIC),
                         (slot * half, 0))
        rel = f"images/{i:05d}.png"
        canvas.save(dest / rel)
        for slot, k in enumerate((a, b)):
            lines.append(json.dumps({"image": rel, "class": lab.classnames[lab.labels[k]],
                                     "class_id": lab.class_ids[lab.labels[k]],
                                     "box": [slot * half, 0, slot * half + half, size]}))
    atomic_write(dest / MANIFEST, "\n".join(lines) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    from tether.clikit import run_command

    p = argparse.ArgumentParser(prog="python -m align.eval.localize", description="localization benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("composites", help="two photos of different classes side by side, each half its class's box")
    c.add_argument("--images", required=True, help="ImageFolder or wnid-prefixed folder (e.g. the ImageNet sample)")
    c.add_argument("--out", required=True)
    c.add_argument("--n", type=int, default=500)
    c.add_argument("--size", type=int, default=448)
    c.add_argument("--seed", type=int, default=0)

    def _composites(a: argparse.Namespace) -> int:
        d = make_composites(a.images, a.out, a.n, a.size, a.seed)
        print(f"{a.n} composites, {2 * a.n} (image, class) lines: {d / MANIFEST}")
        return 0

    c.set_defaults(func=_composites)
    args = p.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
