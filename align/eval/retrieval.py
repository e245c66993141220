"""Image↔text retrieval: R@K with several correct items per query, chunked so large galleries fit in memory.

The ranking primitive :func:`ranks` is shared with zero-shot classification (a class is a one-item gallery
entry). Conventions, fixed here and tested:

* A query's correct items are the gallery items with the same id (``query_ids[i] == gallery_ids[j]``), so one
  image with five captions, one caption with one image, or one image with one class all use the same code.
* The rank of a query is the number of WRONG gallery items scoring at least as high as its best correct item
  (0 = a correct item is first). Ties are broken pessimistically — a wrong item tied with the best correct item
  counts as ranked above it — so a degenerate model that scores everything equally gets R@1 = 0, not 1.
* R@K is the fraction of queries with rank < K (a hit if ANY correct item is in the top K). When K is at least the
  gallery size every query that has a correct item is a hit. A query with no correct item in the gallery is an
  error (it would silently lower every recall).

Similarities are dot products of the given embeddings (pass L2-normalised embeddings for cosine similarity);
they are computed in query chunks of ``chunk`` rows, so 5k images × 25k captions never needs the full matrix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from curate.recipe import RecipeError

DEFAULT_KS = (1, 5, 10)


def _as_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {tuple(t.shape)}")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _correct_pairs(qid: np.ndarray, gid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse (query row, gallery col) pairs of correct items, grouped by query; and their offsets [Q+1]."""
    order = np.argsort(gid, kind="stable")
    sg = gid[order]
    lo, hi = np.searchsorted(sg, qid, "left"), np.searchsorted(sg, qid, "right")
    cnt = hi - lo
    if len(cnt) and (cnt == 0).any():
        bad = int(np.nonzero(cnt == 0)[0][0])
        raise ValueError(f"query {bad} (id {int(qid[bad])}) has no correct item in the gallery")
    offsets = np.concatenate([[0], np.cumsum(cnt)])
    rows = np.repeat(np.arange(len(qid)), cnt)
    cols = order[np.repeat(lo, cnt) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], cnt))]
    return rows, cols, offsets


def ranks(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor,
          query_ids: Sequence[int] | np.ndarray, gallery_ids: Sequence[int] | np.ndarray,
          chunk: int = 1024) -> np.ndarray:
    """Rank of each query's best correct gallery item (pessimistic ties; see the module docstring).

    ``queries`` [Q, D], ``gallery`` [G, D]; ``query_ids`` [Q] and ``gallery_ids`` [G] are integer ids that
    define correctness. Returns int64 ranks [Q].

    Per chunk of queries only ONE dense pass follows the matrix product: ``(sims >= best).sum(1)``; the best
    correct score and the correct items tied with it come from the (few) correct entries, gathered sparsely.
    """
    q = _as_tensor(queries, "queries")
    g = _as_tensor(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but gallery has dim {g.shape[1]}")
    qid = np.asarray(query_ids, dtype=np.int64)
    gid = np.asarray(gallery_ids, dtype=np.int64)
    if qid.shape != (q.shape[0],) or gid.shape != (g.shape[0],):
        raise ValueError(f"ids must be 1-D with one id per row: got {qid.shape} for {q.shape[0]} queries "
                         f"and {gid.shape} for {g.shape[0]} gallery items")
    rows, cols, offsets = (torch.as_tensor(a) for a in _correct_pairs(qid, gid))
    out = torch.empty(q.shape[0], dtype=torch.int64)
    gt = g.t().contiguous()
    for s in range(0, q.shape[0], chunk):
        e = min(s + chunk, q.shape[0])
        sims = q[s:e] @ gt                                            # [c, G]
        r, c = rows[offsets[s]:offsets[e]] - s, cols[offsets[s]:offsets[e]]
        out[s:e], _ = _row_ranks(sims, r, c)
    return out.numpy()


def _row_ranks(sims: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a similarity chunk: how many WRONG items score at least as high as the row's best correct item
    (ties count against the model), given the correct cells ``(r, c)``; also returns those cells' scores."""
    vals = sims[r, c]
    best = torch.full((sims.shape[0],), float("-inf")).scatter_reduce(0, r, vals, "amax")
    tied_correct = torch.zeros(sims.shape[0], dtype=torch.int64).scatter_add(0, r, (vals >= best[r]).long())
    return (sims >= best[:, None]).sum(1) - tied_correct, vals


def paired_ranks(image_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor,
                 text_image: Sequence[int] | np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Image→text and text→image ranks from ONE pass over the similarity matrix (chunks of image rows).

    Same definitions as :func:`ranks` (which would need two matrix products): image→text per row as there;
    text→image per column, counting the wrong images whose score reaches the caption's own image score.
    """
    im = _as_tensor(image_emb, "image embeddings")
    tx = _as_tensor(text_emb, "text embeddings")
    if im.shape[1] != tx.shape[1]:
        raise ValueError(f"image embeddings have dim {im.shape[1]} but text embeddings have dim {tx.shape[1]}")
    owner_np = np.asarray(text_image, dtype=np.int64)
    n = im.shape[0]
    rows, cols, offsets = (torch.as_tensor(a) for a in _correct_pairs(np.arange(n), owner_np))
    owner = torch.as_tensor(owner_np)
    own_score = (im[owner] * tx).sum(1)                           # each caption's score with its own image
    t2i = torch.zeros(tx.shape[0], dtype=torch.int64)
    i2t = torch.empty(n, dtype=torch.int64)
    txt_t = tx.t().contiguous()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        sims = im[s:e] @ txt_t                                      # [c, M]
        r, c = rows[offsets[s]:offsets[e]] - s, cols[offsets[s]:offsets[e]]
        i2t[s:e], vals = _row_ranks(sims, r, c)
        t2i += (sims >= own_score[None, :]).sum(0)
        t2i[c] -= (vals >= own_score[c]).long()                     # the caption's own image is not wrong
    return i2t.numpy(), t2i.numpy()


def recall_at(r: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose rank is below each K."""
    r = np.asarray(r)
    return {int(k): float((r < k).mean()) if len(r) else float("nan") for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int] | np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict[str, float]:
    """Image→text and text→image recall (in %) for ``text_emb[j]`` describing image ``text_image[j]``.

    Returns ``{"i2t_R@1": .., "i2t_R@5": .., ..., "t2i_R@10": .., "i2t_median_rank": .., "t2i_median_rank": ..,
    "n_images": .., "n_texts": ..}``. Median ranks are 1-based.
    """
    text_image = np.asarray(text_image, dtype=np.int64)
    n_img = int(np.asarray(image_emb).shape[0])
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= n_img):
        raise ValueError(f"text_image indexes must lie in [0, {n_img}), got range "
                         f"[{text_image.min()}, {text_image.max()}]")
    r_i2t, r_t2i = paired_ranks(image_emb, text_emb, text_image, chunk=chunk)
    out: dict[str, float] = {}
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k, v in recall_at(r, ks).items():
            out[f"{name}_R@{k}"] = 100.0 * v
        out[f"{name}_median_rank"] = float(np.median(r) + 1)
    out["n_images"] = n_img
    out["n_texts"] = int(len(text_image))
    return out


# ---------------------------------------------------------------------------------------------------------
# Paired image–caption sets (Flickr8k layout, or a CSV/JSONL of image,caption rows)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PairedSet:
    """Images with one or more captions each: ``captions[j]`` describes ``image_paths[caption_image[j]]``."""

    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    name: str = "pairs"

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image needs one image index per caption")

    def __len__(self) -> int:
        return len(self.image_paths)

    def subset(self, n: int | None, seed: int = 0) -> "PairedSet":
        """The first ``n`` images (in a seeded random order) with all their captions."""
        if n is None or n >= len(self.image_paths):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self.image_paths))[:n])
        remap = -np.ones(len(self.image_paths), np.int64)
        remap[keep] = np.arange(len(keep))
        cm = remap[self.caption_image] >= 0
        return PairedSet([self.image_paths[i] for i in keep], [c for c, m in zip(self.captions, cm) if m],
                         remap[self.caption_image[cm]], name=f"{self.name}[{n}]")

    def captions_by_image(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.image_paths]
        for c, i in zip(self.captions, self.caption_image):
            out[int(i)].append(c)
        return out

    @classmethod
    def from_flickr8k(cls, root: str | Path, split: str = "test") -> "PairedSet":
        """Flickr8k layout: ``images/``, ``captions.txt`` (``IMG.jpg#N<TAB>caption``), ``{split}_images.txt``."""
        root = Path(root)
        cap_file, split_file = root / "captions.txt", root / f"{split}_images.txt"
        for f in (cap_file, split_file, root / "images"):
            if not f.exists():
                raise RecipeError(f"{root}: not a Flickr8k folder ({f.name} missing)")
        names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        index = {n: i for i, n in enumerate(names)}
        caps: list[str] = []
        owner: list[int] = []
        for ln in cap_file.read_text(encoding="utf-8").splitlines():
            ln = ln.strip()
            if not ln or "\t" not in ln:
                continue
            key, cap = ln.split("\t", 1)
            i = index.get(key.split("#", 1)[0])
            if i is not None and cap.strip():
                caps.append(cap.strip())
                owner.append(i)
        missing = sorted(set(range(len(names))) - set(owner))
        if missing:
            raise RecipeError(f"{root}: {len(missing)} {split} images have no caption (first: {names[missing[0]]})")
        return cls([root / "images" / n for n in names], caps, np.asarray(owner), name=f"flickr8k-{split}")

    @classmethod
    def from_table(cls, path: str | Path, image_col: str = "image", caption_col: str = "caption") -> "PairedSet":
        """A CSV/TSV or JSONL file of ``image,caption`` rows (image paths relative to the file); repeated images
        collect several captions."""
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"{path}: file not found")
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        order: dict[str, int] = {}
        caps: list[str] = []
        owner: list[int] = []
        for n, r in enumerate(rows):
            if image_col not in r or caption_col not in r:
                raise RecipeError(f"{path}: row {n + 1} lacks column {image_col!r} or {caption_col!r}")
            img = str(r[image_col])
            owner.append(order.setdefault(img, len(order)))
            caps.append(str(r[caption_col]))
        imgs = [Path(p) if Path(p).is_absolute() else path.parent / p for p in order]
        return cls(imgs, caps, np.asarray(owner), name=path.stem)

    @classmethod
    def load(cls, data: str | Path, split: str = "test") -> "PairedSet":
        """Flickr8k folder or caption table, whichever ``data`` is."""
        p = Path(data)
        if p.is_dir():
            return cls.from_flickr8k(p, split)
        return cls.from_table(p)


def embed_images(encode_image: Callable[[list], np.ndarray], paths: Sequence[Any], batch_size: int = 64,
                 progress: bool = True, cache_dir: str | Path | None = None, opener: Callable[[Any], Any] | None = None,
                 desc: str = "embed images") -> np.ndarray:
    """Open and embed images batch by batch (bounded memory) with a tqdm bar.

    With ``cache_dir`` every finished batch is saved as ``part-<start>.npy`` (atomically) and skipped on rerun,
    so a killed run resumes without recomputing or duplicating rows; the caller owns the folder's key (it must
    be specific to the encoder and the image list).
    """
    from tqdm.auto import tqdm

    opener = opener or _open_rgb
    cdir = Path(cache_dir) if cache_dir is not None else None
    if cdir is not None:
        cdir.mkdir(parents=True, exist_ok=True)
    outs = []
    for s in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
        part = cdir / f"part-{s:08d}-{batch_size}.npy" if cdir is not None else None
        if part is not None and part.exists():
            outs.append(np.load(part))
            continue
        e = np.asarray(encode_image([opener(p) for p in paths[s:s + batch_size]]), dtype=np.float32)
        if part is not None:
            tmp = part.with_name(part.stem + ".tmp.npy")
            np.save(tmp, e)
            tmp.replace(part)
        outs.append(e)
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _open_rgb(p: Any):
    from PIL import Image

    with Image.open(p) as im:
        return im.convert("RGB")
