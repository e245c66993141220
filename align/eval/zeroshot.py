"""Zero-shot classification with text-derived class vectors.

Class vector = mean of the L2-normalised embeddings of the class's prompts, renormalised. Images are scored by
cosine similarity. Metrics (in %): top-1, top-5 and mean per-class recall (top-1 recall averaged over the classes
that have images — the balanced accuracy that a class-imbalanced test set needs). Ties are pessimistic, as in
:mod:`align.eval.retrieval` (same ranking code).

Classifier weights are cached on disk per (model fingerprint, class list hash, prompt set id): re-evaluating the
same model on the same classes skips the text encoder entirely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from align.eval.prompts import PromptSet, build_prompts, prompt_set_id, uses_glosses
from align.eval.retrieval import normalize, ranks

TextFn = Callable[[list[str]], np.ndarray]


def class_embeddings(encode_text: TextFn, prompts: Sequence[Sequence[str]], batch_size: int = 1024,
                     progress: bool = True) -> np.ndarray:
    """[C, D] class vectors from per-class prompt lists (any number of prompts per class, at least one)."""
    from tether.progress import progress as tqdm

    if any(len(p) == 0 for p in prompts):
        raise ValueError("every class needs at least one prompt")
    flat = [t for ps in prompts for t in ps]
    owner = np.repeat(np.arange(len(prompts)), [len(p) for p in prompts])
    embs = []
    for s in tqdm(range(0, len(flat), batch_size), desc="embed prompts", unit="batch", disable=not progress):
        embs.append(normalize(encode_text(flat[s:s + batch_size])))
    e = np.concatenate(embs).astype(np.float64)
    sums = np.zeros((len(prompts), e.shape[1]))
    np.add.at(sums, owner, e)
    return normalize(sums / np.bincount(owner, minlength=len(prompts))[:, None])


def classifier_key(model_fingerprint: str, classnames: Sequence[str], prompt_set: PromptSet,
                   glosses: Sequence[str | None] | None = None) -> str:
    """Cache key of a zero-shot classifier: model × class list (names + glosses) × prompt set."""
    h = hashlib.sha1()
    h.update(model_fingerprint.encode())
    h.update(json.dumps([list(classnames), list(glosses) if glosses is not None else None]).encode())
    h.update(prompt_set_id(prompt_set).encode())
    return h.hexdigest()[:20]


def zeroshot_classifier(encode_text: TextFn, classnames: Sequence[str], prompt_set: PromptSet = "clip80",
                        glosses: Sequence[str | None] | None = None, cache_dir: str | Path | None = None,
                        model_fingerprint: str | None = None, batch_size: int = 1024,
                        progress: bool = True) -> np.ndarray:
    """Class vectors [C, D] for ``classnames``; loaded from / saved to ``cache_dir`` when a model fingerprint
    is known (``<cache_dir>/zs-<key>.npy`` plus a ``.json`` sidecar describing the key)."""
    path = None
    if cache_dir is not None and model_fingerprint:
        key = classifier_key(model_fingerprint, classnames, prompt_set, glosses)
        path = Path(cache_dir) / f"zs-{key}.npy"
        if path.exists():
            w = np.load(path)
            if w.shape[0] == len(classnames):
                return w
    use_glosses = glosses if uses_glosses(prompt_set) else None
    w = class_embeddings(encode_text, build_prompts(classnames, prompt_set, use_glosses), batch_size, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, w)
        tmp.replace(path)  # atomic: a killed run never leaves a truncated classifier behind
        path.with_suffix(".json").write_text(json.dumps(
            {"model": model_fingerprint, "prompt_set": prompt_set_id(prompt_set), "n_classes": len(classnames),
             "first_classes": list(classnames[:5])}, indent=1))
    return w


def classification_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[int] | np.ndarray,
                           ks: Sequence[int] = (1, 5), chunk: int = 2048) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall (%) of cosine scores ``image_emb @ class_emb.T``."""
    return classification_eval(image_emb, class_emb, labels, ks=ks, chunk=chunk)[0]


def classification_eval(image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[int] | np.ndarray,
                        classnames: Sequence[str] | None = None, ks: Sequence[int] = (1, 5),
                        chunk: int = 2048) -> tuple[dict[str, float], list[dict]]:
    """:func:`classification_metrics` plus one row per class that has images: ``class``, ``n``, ``top1`` (%),
    ``top5`` (%) and ``confused_with`` (the wrong class most often predicted first for its images, with count)."""
    labels = np.asarray(labels, np.int64)
    n_cls = int(np.asarray(class_emb).shape[0])
    if len(labels) != len(image_emb):
        raise ValueError(f"{len(labels)} labels for {len(image_emb)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_cls):
        raise ValueError(f"labels must lie in [0, {n_cls})")
    r = ranks(normalize(image_emb), normalize(class_emb), labels, np.arange(n_cls), chunk=chunk)
    out: dict[str, float] = {f"top{k}": 100.0 * float((r < k).mean()) for k in ks}
    present = np.unique(labels)
    count = np.bincount(labels, minlength=n_cls)
    hit = (r == 0).astype(np.float64)
    top1 = np.bincount(labels, weights=hit, minlength=n_cls) / np.maximum(count, 1)
    top5 = np.bincount(labels, weights=(r < 5).astype(np.float64), minlength=n_cls) / np.maximum(count, 1)
    out["mean_per_class_recall"] = 100.0 * float(top1[present].mean()) if len(present) else float("nan")
    out["n_images"] = int(len(labels))
    out["n_classes"] = n_cls
    names = list(classnames) if classnames is not None else [str(c) for c in range(n_cls)]
    wrong = r > 0
    pred = predict(image_emb[wrong], class_emb, 1)[:, 0] if wrong.any() else np.zeros(0, np.int64)
    confusion: dict[int, dict[int, int]] = {}
    for y, p in zip(labels[wrong].tolist(), pred.tolist()):
        confusion.setdefault(y, {}).setdefault(p, 0)
        confusion[y][p] += 1
    rows = []
    for c in present.tolist():
        conf = confusion.get(c)
        top = max(conf.items(), key=lambda kv: (kv[1], -kv[0])) if conf else None
        rows.append({"class": names[c], "n": int(count[c]), "top1": 100.0 * float(top1[c]),
                     "top5": 100.0 * float(top5[c]),
                     "confused_with": f"{names[top[0]]} ({top[1]})" if top else ""})
    return out, rows


def predict(image_emb: np.ndarray, class_emb: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices [N, k] of the top-k classes per image (highest score first)."""
    import torch

    s = torch.as_tensor(normalize(image_emb)) @ torch.as_tensor(normalize(class_emb)).t()
    return s.topk(min(k, s.shape[1]), dim=1).indices.numpy()
