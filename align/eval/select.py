"""Encoder-pair selection before training (``align select``).

For every candidate vision encoder and text encoder, embed a paired image–caption set ONCE (images: pooled
frozen features; texts: the mean of each image's normalised caption embeddings, as in the paper), then score
every vision × text pair with linear CKA, unbiased CKA and mutual-kNN alignment (:mod:`align.eval.cka`) and rank
them. Optionally, a short linear InfoNCE probe is trained per pair (``probe_steps``) and the report says whether
the CKA ranking agrees with the validation loss / recall those short trainings reach (Spearman ρ).

Candidates are hub ids, local folders or zoo names, with optional options after ``@``:
``facebook/dinov2-small@layer=11,pooling=mean`` (vision: ``layer``, ``pooling``; text: ``max_length``).
Features are cached per (encoder fingerprint, options, data) under ``cache_dir`` batch by batch, so a killed run
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from align.eval.cka import similarity_scores
from align.eval.retrieval import PairedSet, embed_images, normalize, ranks
from tether.digest import json_digest
from tether.recipe import RecipeError, Strict

METRICS = ("linear_cka", "unbiased_cka", "mutual_knn")


class SelectConfig(Strict):
    """Settings of ``align select`` (CLI flags or a YAML file with these keys)."""

    vision: list[str] = Field(min_length=1)
    text: list[str] = Field(min_length=1)
    data: str
    split: str = "train"
    limit: int | None = Field(1000, ge=10)
    seed: int = 0
    knn_k: int = Field(10, ge=1)
    rank_by: Literal["linear_cka", "unbiased_cka", "mutual_knn"] = "linear_cka"
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"
    out: str = "runs/select"
    cache_dir: str | None = None
    probe_steps: int = Field(0, ge=0)
    probe_dim: int = Field(256, ge=8)


@dataclass(frozen=True)
class Candidate:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        base = Path(self.name).name if Path(self.name).exists() else self.name
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{base}@{opts}" if opts else base

    def opt(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


_ALLOWED = {"vision": {"layer": int, "pooling": str}, "text": {"max_length": int}}


def parse_candidate(spec: str, side: Literal["vision", "text"]) -> Candidate:
    """``name[@key=value,...]`` → :class:`Candidate`; unknown keys are a one-line :class:`RecipeError`."""
    name, _, opts = spec.partition("@")
    if not name:
        raise RecipeError(f"{side} candidate {spec!r}: empty name")
    out = []
    for kv in filter(None, opts.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or k not in _ALLOWED[side]:
            raise RecipeError(f"{side} candidate {spec!r}: option {kv!r} not understood "
                              f"(allowed: {', '.join(f'{a}=...' for a in _ALLOWED[side])})")
        try:
            out.append((k, _ALLOWED[side][k](v)))
        except ValueError:
            raise RecipeError(f"{side} candidate {spec!r}: {k} must be {_ALLOWED[side][k].__name__}") from None
    if side == "vision" and dict(out).get("pooling", "cls") not in ("cls", "mean", "cls+mean"):
        raise RecipeError(f"vision candidate {spec!r}: pooling must be cls, mean or cls+mean")
    return Candidate(name, tuple(out))


def data_hash(pairs: PairedSet) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([[p.name for p in pairs.image_paths], pairs.captions,
                         pairs.caption_image.tolist()]).encode())
    return h.hexdigest()[:12]


def _key(*parts: Any) -> str:
    return json_digest(parts)


def vision_features(cand: Candidate, pairs: PairedSet, cache_dir: Path | None, batch_size: int = 32,
                    device: str = "cpu", encoder=None, progress: bool = True) -> np.ndarray:
    """Pooled frozen features [n_images, D] of one vision candidate (resumable batch cache)."""
    from tether.encoders import VisionEncoder

    enc = encoder or VisionEncoder.load(cand.name, device=device, layer=cand.opt("layer", -1))
    pooling = cand.opt("pooling", "cls")
    sub = None
    if cache_dir is not None:
        sub = cache_dir / f"vision-{_key(enc.fingerprint, cand.options, data_hash(pairs))}"

    def fn(ims: list) -> np.ndarray:
        return enc.encode(ims, pooling=pooling, batch_size=batch_size, layer=cand.opt("layer", None))

    return embed_images(fn, pairs.image_paths, batch_size, progress, sub, desc=f"embed images ({cand.label})")


def text_features(cand: Candidate, pairs: PairedSet, cache_dir: Path | None, batch_size: int = 256,
                  device: str = "cpu", encoder=None, progress: bool = True) -> np.ndarray:
    """Per image, the mean of its captions' normalised embeddings [n_images, D] (cached when ``cache_dir``)."""
    from tether.encoders import TextEncoder

    kw = {"max_length": cand.opt("max_length")} if cand.opt("max_length") else {}
    enc = encoder or TextEncoder.load(cand.name, device=device, **kw)
    path = None
    if cache_dir is not None:
        path = cache_dir / f"text-{_key(enc.fingerprint, cand.options, data_hash(pairs))}.npy"
        if path.exists():
            return np.load(path)
    caps = enc.encode(pairs.captions, batch_size=batch_size, normalize=True, progress=progress)
    feats = mean_by_owner(caps, pairs.caption_image, len(pairs))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)
    return feats


def mean_by_owner(rows: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``rows`` grouped by ``owner`` index (float64 sums) → [n, D] float32."""
    sums = np.zeros((n, rows.shape[1]))
    np.add.at(sums, np.asarray(owner, np.int64), rows.astype(np.float64))
    cnt = np.bincount(owner, minlength=n)
    if (cnt == 0).any():
        raise ValueError(f"{int((cnt == 0).sum())} images have no caption")
    return (sums / cnt[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Short linear probe: does the CKA ranking predict what a short training reaches?
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """Two linear maps (after centring/scaling) into a shared space, trained with symmetric InfoNCE."""

    wx: np.ndarray
    wy: np.ndarray
    mx: np.ndarray
    my: np.ndarray
    sx: float
    sy: float
    val: dict[str, float]

    def project_x(self, x: np.ndarray) -> np.ndarray:
        return normalize(((np.asarray(x, np.float32) - self.mx) / self.sx) @ self.wx)

    def project_y(self, y: np.ndarray) -> np.ndarray:
        return normalize(((np.asarray(y, np.float32) - self.my) / self.sy) @ self.wy)


def fit_linear_probe(X: np.ndarray, Y: np.ndarray, dim: int = 256, steps: int = 300, lr: float = 2e-3,
                     batch_size: int = 512, temperature: float = 0.05, val_frac: float = 0.2,
                     weight_decay: float = 1e-4, seed: int = 0, groups: np.ndarray | None = None) -> LinearProbe:
    """Fit linear projectors X→Z, Y→Z with symmetric InfoNCE on rows ``(X[i], Y[i])``.

    ``groups`` (optional, e.g. the image index of each caption row) keeps all rows of a group on the same side
    of the train/validation split. Validation: InfoNCE loss and text→image / image→text R@1 (%) on held-out
    rows (one-to-one).
    """
    with _threads(1):
        return _fit_linear_probe(np.asarray(X, np.float32), np.asarray(Y, np.float32), dim, steps, lr, batch_size,
                                 temperature, val_frac, weight_decay, seed, groups)


@contextmanager
def _threads(n: int):
    """Run small torch ops on ``n`` threads: the probe's matrices are small, and with other jobs on the cores
    two-thread synchronisation made each step ~5x slower than one thread (measured here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fit_linear_probe(X: np.ndarray, Y: np.ndarray, dim: int, steps: int, lr: float, batch_size: int,
                      temperature: float, val_frac: float, weight_decay: float, seed: int,
                      groups: np.ndarray | None) -> LinearProbe:
    n = len(X)
    rng = np.random.default_rng(seed)
    g = np.arange(n) if groups is None else np.asarray(groups)
    ug = rng.permutation(np.unique(g))
    n_val = max(2, int(round(len(ug) * val_frac))) if val_frac > 0 else 0
    is_val = np.isin(g, ug[:n_val])
    tr, va = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]
    mx, my = X[tr].mean(0), Y[tr].mean(0)
    sx = float(np.sqrt(((X[tr] - mx) ** 2).sum(1).mean())) or 1.0
    sy = float(np.sqrt(((Y[tr] - my) ** 2).sum(1).mean())) or 1.0
    xt = torch.as_tensor((X - mx) / sx)
    yt = torch.as_tensor((Y - my) / sy)
    torch.manual_seed(seed)
    fx = torch.nn.Linear(X.shape[1], dim, bias=False)
    fy = torch.nn.Linear(Y.shape[1], dim, bias=False)
    opt = torch.optim.AdamW(list(fx.parameters()) + list(fy.parameters()), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    trt = torch.as_tensor(tr)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.normalize(fx(xt[idx]), dim=1)
        b = torch.nn.functional.normalize(fy(yt[idx]), dim=1)
        logits = a @ b.t() / temperature
        tgt = torch.arange(len(idx))
        return 0.5 * (torch.nn.functional.cross_entropy(logits, tgt) +
                      torch.nn.functional.cross_entropy(logits.t(), tgt))

    for _ in range(steps):
        idx = trt[torch.randperm(len(trt), generator=gen)[:batch_size]]
        loss = loss_fn(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = LinearProbe(fx.weight.detach().numpy().T.copy(), fy.weight.detach().numpy().T.copy(), mx, my, sx, sy, {})
    if len(va) >= 2:
        with torch.no_grad():
            vl = float(loss_fn(torch.as_tensor(va)))
        px, py, gv = probe.project_x(X[va]), probe.project_y(Y[va]), g[va]
        # rows of one group (e.g. one image repeated for its captions) are all correct for each other
        probe.val = {"val_loss": vl, "val_t2i_R@1": 100.0 * float((ranks(py, px, gv, gv) < 1).mean()),
                     "val_i2t_R@1": 100.0 * float((ranks(px, py, gv, gv) < 1).mean()), "n_val": len(va)}
    return probe


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with tied values sharing their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    _, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, weights=r)
    return (sums / np.bincount(inv))[inv]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 items or constant input."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")
    ra, rb = _avg_ranks(a) - (len(a) - 1) / 2, _avg_ranks(b) - (len(b) - 1) / 2
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------------------
def score_pairs(vision: dict[str, np.ndarray], text: dict[str, np.ndarray], knn_k: int = 10,
                rank_by: str = "linear_cka", probe: Callable[[np.ndarray, np.ndarray], dict] | None = None
                ) -> list[dict[str, Any]]:
    """Score every (vision label, text label) pair of paired feature arrays; ranked best first (``rank`` 1)."""
    if rank_by not in METRICS:
        raise ValueError(f"rank_by must be one of {METRICS}")
    rows = []
    for vn, X in vision.items():
        for tn, Y in text.items():
            row: dict[str, Any] = {"vision": vn, "text": tn, "n": int(len(X))}
            row.update(similarity_scores(X, Y, k=knn_k))
            if probe is not None:
                row.update(probe(X, Y))
            rows.append(row)
    rows.sort(key=lambda r: -r[rank_by])
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def ranking_agreement(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Spearman ρ between each similarity metric and each probe outcome (higher is better for recall, lower for
    loss, so the loss correlation is reported with its sign flipped: +1 = perfect agreement)."""
    out: dict[str, float] = {}
    if not rows or "val_loss" not in rows[0]:
        return out
    for m in METRICS:
        a = [r[m] for r in rows]
        out[f"{m}_vs_val_loss"] = -spearman(a, [r["val_loss"] for r in rows])
        out[f"{m}_vs_val_t2i_R@1"] = spearman(a, [r["val_t2i_R@1"] for r in rows])
    return out


def run_select(cfg: SelectConfig, progress: bool = True) -> dict[str, Any]:
    """Embed, score, rank, and write ``selection.{json,md,png}`` under ``cfg.out``; returns the result."""
    from align.eval.report import write_select_report

    vis_c = [parse_candidate(s, "vision") for s in cfg.vision]
    txt_c = [parse_candidate(s, "text") for s in cfg.text]
    pairs = PairedSet.load(cfg.data, cfg.split).subset(cfg.limit, cfg.seed)
    out = Path(cfg.out)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    vis = {c.label: vision_features(c, pairs, cache, cfg.batch_size, cfg.device, progress=progress) for c in vis_c}
    txt = {c.label: text_features(c, pairs, cache, device=cfg.device, progress=progress) for c in txt_c}

    probe = None
    if cfg.probe_steps:
        def probe(X: np.ndarray, Y: np.ndarray) -> dict:
            return fit_linear_probe(X, Y, dim=cfg.probe_dim, steps=cfg.probe_steps, seed=cfg.seed).val

    rows = score_pairs(vis, txt, cfg.knn_k, cfg.rank_by, probe)
    result = {"rows": rows, "agreement": ranking_agreement(rows),
              "meta": {"data": str(cfg.data), "split": cfg.split, "n_images": len(pairs),
                       "n_captions": len(pairs.captions), "rank_by": cfg.rank_by, "knn_k": cfg.knn_k,
                       "probe_steps": cfg.probe_steps, "text_features": "mean of normalised caption embeddings",
                       "vision_features": "pooled frozen features (per candidate options)"}}
    result["files"] = [str(p) for p in write_select_report(result, out)]
    return result


class ProbeModel:
    """Frozen encoders + a :class:`LinearProbe`: a minimal aligned model with the evaluation interface
    (``encode_image``, ``encode_text``, ``project_image_features``, ``project_text_features``, ``fingerprint``)."""

    def __init__(self, vision, text, probe: LinearProbe, pooling: str = "cls", layer: int | None = None):
        self.vision, self.text, self.probe, self.pooling, self.layer = vision, text, probe, pooling, layer

    @property
    def fingerprint(self) -> str:
        return _key(self.vision.fingerprint, self.text.fingerprint, self.pooling, self.layer,
                    hashlib.sha1(self.probe.wx.tobytes() + self.probe.wy.tobytes()).hexdigest())

    def project_image_features(self, feats: np.ndarray) -> np.ndarray:
        return self.probe.project_x(feats)

    def project_text_features(self, feats: np.ndarray) -> np.ndarray:
        return self.probe.project_y(feats)

    def encode_image(self, images: Sequence) -> np.ndarray:
        return self.project_image_features(self.vision.encode(list(images), pooling=self.pooling, layer=self.layer))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.project_text_features(self.text.encode(list(texts), normalize=True))
