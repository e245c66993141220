"""Reports: JSON (machine-readable), markdown (for humans and docs) and a PNG bar chart, written atomically.

* :func:`write_selection` — ``selection.json`` / ``selection.md`` (ranked table + ranking agreement) /
  ``selection.png`` (one group of bars per encoder pair: linear CKA, unbiased CKA, mutual kNN).
* :func:`write_eval` — ``<task>.json`` / ``<task>.md`` / ``<task>.png`` for an ``align eval`` run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from curate.fileio import atomic_write


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


def write_selection(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
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


def write_eval(result: dict[str, Any], out_dir: str | Path, task: str) -> list[Path]:
    """Write an evaluation result (metrics dict + meta) as ``<task>.json/.md/.png``."""
    out = Path(out_dir)
    metrics = result["metrics"]
    meta = result.get("meta", {})
    lines = [f"# {task} evaluation\n\n"]
    lines += [f"- {k}: `{v}`\n" for k, v in meta.items()]
    lines.append("\n" + markdown_table([metrics], list(metrics.keys()), digits=2))
    files = [atomic_write(out / f"{task}.json", json.dumps(_clean(result), indent=2) + "\n"),
             atomic_write(out / f"{task}.md", "".join(lines))]
    if task == "retrieval":
        ks = sorted({int(k.split("@")[1]) for k in metrics if "_R@" in k})
        series = {d: [metrics[f"{d}_R@{k}"] for k in ks] for d in ("i2t", "t2i")}
        files.append(_bar_png(out / f"{task}.png", [f"R@{k}" for k in ks], series,
                              f"retrieval ({meta.get('data', '')})", "recall (%)"))
    else:
        keys = [k for k in metrics if k.startswith("top") or k == "mean_per_class_recall"]
        files.append(_bar_png(out / f"{task}.png", keys, {"accuracy": [metrics[k] for k in keys]},
                              f"zero-shot ({meta.get('data', '')})", "%"))
    return files


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
