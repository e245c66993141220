"""Reports: JSON (machine-readable), markdown (for humans and docs) and a PNG chart, written atomically.

* :func:`write_select_report` — ``selection.json`` / ``selection.md`` (ranked table + ranking agreement) /
  ``selection.png`` (one group of bars per encoder pair: linear CKA, unbiased CKA, mutual kNN).
* :func:`write_eval` — ``<task>.json`` / ``<task>.md`` / ``<task>.png`` for an ``align eval`` run (retrieval:
  recall@K curves; zero-shot: per-class accuracy).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from tether.fileio import atomic_write


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub markdown table of ``columns`` (missing values shown as ``-``)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c, "-"), digits) for c in columns) + " |\n" for r in rows)
    return head + body


def _bar_png(path: Path, groups: Sequence[str], series: dict[str, Sequence[float]], title: str,
             ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n, m = len(groups), max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * n * m * 0.6 + 2), 3.8))
    width = 0.8 / m
    x = np.arange(n)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (m - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_select_report(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the ranked encoder-pair table (JSON, markdown, PNG)."""
    out = Path(out_dir)
    rows = result["rows"]
    meta = result.get("meta", {})
    cols = ["rank", "vision", "text", "linear_cka", "unbiased_cka", "mutual_knn"]
    if rows and "val_loss" in rows[0]:
        cols += ["val_loss", "val_t2i_R@1", "val_i2t_R@1"]
    md = [f"# Encoder-pair selection\n\nData: `{meta.get('data')}` split `{meta.get('split')}`, "
          f"{meta.get('n_images')} images / {meta.get('n_captions')} captions; ranked by "
          f"`{meta.get('rank_by')}` (mutual kNN with k = {meta.get('knn_k')}).\n\n",
          markdown_table(rows, cols)]
    agree = result.get("agreement") or {}
    if agree:
        md.append(f"\nRanking agreement with {meta.get('probe_steps')}-step linear InfoNCE probes "
                  "(Spearman ρ, +1 = same order):\n\n")
        md.append(markdown_table([{"comparison": k, "rho": v} for k, v in agree.items()], ["comparison", "rho"]))
    files = [atomic_write(out / "selection.json", json.dumps(_clean(result), indent=2) + "\n"),
             atomic_write(out / "selection.md", "".join(md))]
    labels = [f"{r['vision']}\n{r['text']}" for r in rows]
    files.append(_bar_png(out / "selection.png", labels,
                          {m: [r[m] for r in rows] for m in ("linear_cka", "unbiased_cka", "mutual_knn")},
                          "encoder-pair similarity (higher = more alignable)", "score"))
    return files


FEW_PER_CLASS = 5  # median images per class below which per-class best/worst tables are collapsed


def write_eval(result: dict[str, Any], out_dir: str | Path, task: str) -> list[Path]:
    """Write an evaluation result as ``<task>.json`` (everything), ``<task>.md`` and ``<task>.png`` (retrieval:
    recall@K curves of both directions against chance; zero-shot: per-class top-1 histogram + best/worst
    classes)."""
    out = Path(out_dir)
    metrics = result["metrics"]
    meta = result.get("meta", {})
    name = meta.get("name") or meta.get("data") or "?"
    lines = [f"# {task} evaluation: {name}\n\n", f"- data: `{meta.get('data')}`\n"]
    for k in ("split", "language", "captions", "n_images", "n_captions", "features", "prompts", "n_classes",
              "model_fingerprint"):
        if meta.get(k) is not None:
            lines.append(f"- {k}: `{meta[k]}`\n")
    skipped = meta.get("skipped") or {}
    if skipped:
        lines.append(f"- skipped (unreadable) images: {skipped.get('count', 0)}\n")
        for f in skipped.get("files", [])[:20]:
            lines.append(f"  - `{f['file']}`: {f['reason']}\n")
        if skipped.get("count", 0) > 20:
            lines.append(f"  - … {skipped['count'] - 20} more in {task}.json\n")
    lines.append("\n" + markdown_table([metrics], list(metrics.keys()), digits=2))
    curves, per_class = result.get("curves"), result.get("per_class")
    if curves:
        ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= len(curves["K"])]
        rows = [{"direction": d, **{f"R@{k}": curves[d][k - 1] for k in ks}}
                for d in ("i2t", "t2i", "chance_i2t", "chance_t2i")]
        lines.append("\nRecall@K (%), with a random ranking's for comparison:\n\n")
        lines.append(markdown_table(rows, ["direction"] + [f"R@{k}" for k in ks], digits=1))
    if per_class:
        srt = sorted(per_class, key=lambda r: (-r["top1"], -r["top5"], r["class"]))
        cols = ["class", "n", "top1", "top5", "confused_with"]
        median_n = float(statistics.median(r["n"] for r in srt))
        if len(srt) <= 20:
            lines.append("\nPer class (top-1 / top-5 in %; `confused_with`: most frequent wrong first guess):\n\n")
            lines.append(markdown_table(srt, cols, digits=1))
        elif median_n < FEW_PER_CLASS:
            # best/worst tables of classes with one or two images are only 100.0 / 0.0 rows: a summary instead
            right = sum(1 for r in srt if r["top1"] >= 100.0)
            wrong = sum(1 for r in srt if r["top1"] <= 0.0)
            top5 = sum(1 for r in srt if r["top5"] >= 100.0)
            lines.append(f"\nPer class: {len(srt):,} classes with a median of {median_n:g} image(s) each, so a "
                         f"class's top-1 is nearly always 0 or 100 % and best/worst tables would say nothing "
                         f"(they are shown from {FEW_PER_CLASS} images per class). {right:,} classes all right at "
                         f"top-1, {wrong:,} all wrong, {len(srt) - right - wrong:,} mixed; {top5:,} all right "
                         f"at top-5. Every class is in {task}.json (`per_class`).\n")
        else:
            lines.append("\nBest 10 classes (top-1 / top-5 in %):\n\n" + markdown_table(srt[:10], cols, digits=1))
            lines.append("\nWorst 10 classes (`confused_with`: most frequent wrong first guess):\n\n"
                         + markdown_table(srt[-10:][::-1], cols, digits=1))
    files = [atomic_write(out / f"{task}.json", json.dumps(_clean(result), indent=2) + "\n"),
             atomic_write(out / f"{task}.md", "".join(lines))]
    if curves:
        files.append(_recall_png(out / f"{task}.png", curves, metrics, name))
    elif per_class:
        files.append(_per_class_png(out / f"{task}.png", per_class, metrics, name, meta.get("prompts")))
    return files


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def _recall_png(path: Path, curves: dict[str, Any], metrics: dict[str, Any], name: str) -> Path:
    plt = _plt()
    ks = curves["K"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for d, label, color in (("i2t", "image → text", "tab:blue"), ("t2i", "text → image", "tab:orange")):
        ax.plot(ks, curves[d], color=color, lw=2,
                label=f"{label}  (R@1 {curves[d][0]:.1f}, R@10 {curves[d][min(9, len(ks) - 1)]:.1f})")
        ax.plot(ks, curves[f"chance_{d}"], color=color, lw=1, ls=":", label=f"{label}, random ranking")
    ax.set_xscale("log")
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= ks[-1]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.set_xlim(1, ks[-1])
    ax.set_ylim(0, 100)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_title(f"retrieval: {name}\n{metrics.get('n_images')} images, {metrics.get('n_texts')} captions",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def _per_class_png(path: Path, per_class: list[dict], metrics: dict[str, Any], name: str,
                   prompts: str | None) -> Path:
    import numpy as np

    plt = _plt()
    srt = sorted(per_class, key=lambda r: (-r["top1"], -r["top5"], r["class"]))
    shown = srt if len(srt) <= 20 else srt[:10] + srt[-10:]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(4.0, 0.28 * len(shown) + 1.5)),
                                   gridspec_kw={"width_ratios": [1, 1.3]})
    acc = np.array([r["top1"] for r in per_class])
    ax1.hist(acc, bins=np.linspace(0, 100, 11), color="tab:blue", edgecolor="white")
    mpc = metrics.get("mean_per_class_recall", float("nan"))
    ax1.axvline(mpc, color="k", ls="--", lw=1, label=f"mean per-class {mpc:.1f} %")
    if metrics.get("n_classes"):
        ax1.axvline(100.0 / metrics["n_classes"], color="tab:red", ls=":", lw=1,
                    label=f"chance {100.0 / metrics['n_classes']:.1f} %")
    ax1.set_xlim(0, 100)
    ax1.set_ylim(0, ax1.get_ylim()[1] * 1.25)                      # room for the legend
    ax1.yaxis.get_major_locator().set_params(integer=True)
    ax1.set_xlabel("top-1 accuracy of a class (%)")
    ax1.set_ylabel("classes")
    ax1.set_title(f"{len(per_class)} classes: top-1 {metrics.get('top1', float('nan')):.1f} %, "
                  f"top-5 {metrics.get('top5', float('nan')):.1f} %", fontsize=9)
    ax1.legend(fontsize=8, loc="upper center")
    y = np.arange(len(shown))[::-1]
    colors = ["tab:blue"] * len(shown) if len(srt) <= 20 else ["tab:green"] * 10 + ["tab:red"] * 10
    ax2.barh(y, [r["top1"] for r in shown], color=colors)
    for yy, r in zip(y, shown):
        ax2.text(min(r["top1"], 88) + 1, yy, f"{r['top1']:.0f}%", va="center", fontsize=7)
    if len(srt) > 20:
        ax2.axhline(y[9] - 0.5, color="k", lw=0.8, ls="--")
    ax2.set_yticks(y)
    ax2.set_yticklabels([f"{r['class'][:28]} (n={r['n']})" for r in shown], fontsize=7)
    ax2.set_xlim(0, 100)
    ax2.set_xlabel("top-1 (%)")
    ax2.set_title("all classes" if len(srt) <= 20 else "best 10 (green) and worst 10 (red) classes", fontsize=9)
    ax2.grid(axis="x", alpha=0.3)
    fig.suptitle(f"zero-shot: {name}" + (f" (prompts {prompts})" if prompts else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _clean(obj: Any) -> Any:
    """JSON-safe copy (NaN → None, numpy scalars → Python)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj
