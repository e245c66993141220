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
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tether.digest import update_from_file
from tether.fileio import atomic_write
from tether.recipe import RecipeError

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
    return retrieval_eval(image_emb, text_emb, text_image, ks, chunk)[0]


def retrieval_eval(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int] | np.ndarray,
                   ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024,
                   curve_max_k: int = 50) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`retrieval_metrics` plus recall@K curves (K = 1..``curve_max_k``, in %) for both directions and the
    recall@K of a random ranking (``chance_i2t`` / ``chance_t2i``), from one pass over the similarities."""
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
    kk = np.arange(1, max(1, curve_max_k) + 1)
    curves: dict[str, Any] = {"K": kk.tolist()}
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        curves[name] = [100.0 * float(v) for v in recall_at(r, kk).values()]
    n_txt = len(text_image)
    per_image = np.bincount(text_image, minlength=n_img)
    curves["chance_i2t"] = [100.0 * _chance_recall(n_txt, per_image, int(k)) for k in kk]
    curves["chance_t2i"] = [100.0 * _chance_recall(n_img, np.ones(1, np.int64), int(k)) for k in kk]
    return out, curves


def _chance_recall(gallery: int, n_correct: np.ndarray, k: int) -> float:
    """Mean over queries of P(at least one of the query's ``n_correct`` items is in the top ``k`` of a random
    order of ``gallery`` items) = 1 - C(G - c, k) / C(G, k)."""
    if gallery == 0 or len(n_correct) == 0:
        return float("nan")
    c = np.asarray(n_correct, np.float64)
    miss = np.ones_like(c)
    for j in range(min(k, gallery)):
        miss *= np.clip((gallery - c - j) / (gallery - j), 0.0, 1.0)
    return float((1.0 - miss).mean())


# ---------------------------------------------------------------------------------------------------------
# Paired image–caption sets: Flickr8k layout, COCO captions json, or a CSV/TSV/JSONL/JSON/Parquet table
# ---------------------------------------------------------------------------------------------------------
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class PairedSet:
    """Images with one or more captions each: ``captions[j]`` describes ``image_paths[caption_image[j]]``.

    ``keys[i]`` names image ``i`` relative to the data (``images/`` of Flickr8k, the image root of a table or a
    COCO json): the key that precomputed features are matched on (``align eval --features``).
    """

    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    name: str = "pairs"
    keys: list[str] | None = None

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image needs one image index per caption")
        if self.keys is None:
            self.keys = [Path(p).name for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def select(self, keep: Sequence[int] | np.ndarray, name: str | None = None) -> "PairedSet":
        """The images ``keep`` (increasing indexes) with all their captions."""
        keep = np.asarray(keep, np.int64)
        remap = -np.ones(len(self.image_paths), np.int64)
        remap[keep] = np.arange(len(keep))
        cm = remap[self.caption_image] >= 0
        return PairedSet([self.image_paths[i] for i in keep], [c for c, m in zip(self.captions, cm) if m],
                         remap[self.caption_image[cm]], name=name or self.name,
                         keys=[self.keys[i] for i in keep] if self.keys is not None else None)

    def subset(self, n: int | None, seed: int = 0) -> "PairedSet":
        """The first ``n`` images (in a seeded random order) with all their captions."""
        if n is None or n >= len(self.image_paths):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self.image_paths))[:n])
        return self.select(keep, name=f"{self.name}[{n}]")

    def captions_by_image(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.image_paths]
        for c, i in zip(self.captions, self.caption_image):
            out[int(i)].append(c)
        return out

    @classmethod
    def from_flickr8k(cls, root: str | Path, split: str = "test", captions_file: str | Path | None = None) -> "PairedSet":
        """Flickr8k layout: ``images/``, ``captions.txt`` (``IMG.jpg#N<TAB>caption``), ``{split}_images.txt``.

        ``captions_file``: another file in the same line format (e.g. German captions of the same images) used
        instead of ``captions.txt``; then only the split's images that have a caption in it are kept."""
        root = Path(root)
        cap_file, split_file = root / "captions.txt", root / f"{split}_images.txt"
        if captions_file is not None:
            cap_file = Path(captions_file)
            if not cap_file.is_file():
                raise RecipeError(f"--captions {cap_file}: file not found")
        for f in (split_file, root / "images") + (() if captions_file is not None else (cap_file,)):
            if not f.exists():
                raise RecipeError(f"{root}: not a Flickr8k folder ({f.name} missing)")
        from align.data import flickr8k_captions, flickr8k_split   # the one Flickr8k parser

        names = flickr8k_split(root, split)
        index = {n: i for i, n in enumerate(names)}
        caps: list[str] = []
        owner: list[int] = []
        for name, _, cap in flickr8k_captions(root, captions_file):
            i = index.get(name)
            if i is not None and cap.strip():
                caps.append(cap.strip())
                owner.append(i)
        missing = sorted(set(range(len(names))) - set(owner))
        if missing and captions_file is None:
            raise RecipeError(f"{root}: {len(missing)} {split} images have no caption (first: {names[missing[0]]})")
        full = cls([root / "images" / n for n in names], caps, np.asarray(owner), name=f"flickr8k-{split}",
                   keys=list(names))
        if captions_file is None:
            return full
        if not caps:
            raise RecipeError(f"--captions {cap_file}: no caption for any of the {len(names)} {split} images "
                              "(expected IMAGE.jpg#N<TAB>caption lines with the Flickr8k image names)")
        return full.select(sorted(set(owner)), name=f"flickr8k-{split} ({cap_file.name})")

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, Any]], base: Path, name: str, where: str) -> "PairedSet":
        """(image path, caption or list of captions) rows → a set; a repeated image collects its captions.
        Relative image paths are resolved against ``base``; ``keys`` keep them as written (``/``-separated)."""
        order: dict[str, int] = {}
        caps: list[str] = []
        owner: list[int] = []
        for img, cap in pairs:
            texts = [cap] if isinstance(cap, str) else list(cap) if isinstance(cap, (list, tuple)) else [cap]
            texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
            if not texts:
                continue
            i = order.setdefault(img, len(order))
            caps.extend(texts)
            owner.extend([i] * len(texts))
        if not order:
            raise RecipeError(f"{where}: no image with a non-empty caption")
        imgs = [Path(k) if Path(k).is_absolute() else base / k for k in order]
        keys = [PurePosixPath(k.replace("\\", "/")).as_posix() if not Path(k).is_absolute() else Path(k).name
                for k in order]
        return cls(imgs, caps, np.asarray(owner), name=name, keys=keys)

    @classmethod
    def from_coco(cls, path: str | Path, image_root: str | Path | None = None,
                  doc: dict | None = None) -> "PairedSet":
        """A COCO captions json (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``).

        Images are looked up under ``image_root``; by default the first of these folders that holds the first
        images: the json's folder, ``<json folder>/<set>`` and ``<json folder>/../<set>`` (``<set>`` from
        ``captions_<set>.json``, e.g. ``val2017``: the standard ``annotations/`` + ``val2017/`` layout), and the
        json folder's parent."""
        path = Path(path)
        doc = doc if doc is not None else _read_json(path)
        try:
            images = {im["id"]: str(im["file_name"]) for im in doc["images"]}
            anns = [(a["image_id"], a["caption"]) for a in doc["annotations"]]
        except (KeyError, TypeError) as e:
            raise RecipeError(f"{path}: not a COCO captions file (images need id + file_name, annotations need "
                              f"image_id + caption; missing {e})") from None
        for n, (iid, _) in enumerate(anns):
            if iid not in images:
                raise RecipeError(f"{path}: annotation {n + 1} refers to image id {iid!r}, which is not in 'images'")
        ordered = list(images)                                  # the file's image order
        by_id: dict[Any, list[str]] = {i: [] for i in ordered}
        for iid, cap in anns:
            by_id[iid].append(cap)
        root = _coco_image_root(path, [images[i] for i in ordered if by_id[i]], image_root)
        return cls.from_pairs([(images[i], by_id[i]) for i in ordered], root, path.stem, str(path))

    @classmethod
    def from_table(cls, path: str | Path, image_col: str = "image", caption_col: str = "caption",
                   image_root: str | Path | None = None) -> "PairedSet":
        """A CSV/TSV, JSONL, JSON (a list of rows, or a COCO captions file) or Parquet table of image,caption rows.

        ``image_col`` / ``caption_col`` name the columns (a caption cell may be a list of captions); image paths
        are relative to ``image_root`` (default: the table's folder); repeated images collect their captions.
        """
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: file not found")
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise RecipeError(f"{path}: unknown table type {path.suffix!r} (expected one of {', '.join(TABLE_SUFFIXES)}"
                              " or a Flickr8k folder)")
        rows: list[dict]
        if suffix == ".json":
            doc = _read_json(path)
            if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
                return cls.from_coco(path, image_root, doc)
            if not isinstance(doc, list):
                raise RecipeError(f"{path}: a .json table must be a list of rows or a COCO captions file "
                                  "({'images': [...], 'annotations': [...]})")
            rows = doc
        elif suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8-sig") as f:
                for n, ln in enumerate(f, 1):
                    if ln.strip():
                        try:
                            rows.append(json.loads(ln))
                        except ValueError as e:
                            raise RecipeError(f"{path}: line {n} is not JSON ({e})") from None
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise RecipeError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
            for col in (image_col, caption_col):
                if col not in table.column_names:
                    raise RecipeError(_no_column(path, col, table.column_names))
            rows = table.select([image_col, caption_col]).to_pylist()
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:   # newline="": quoted multi-line fields stay whole
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        pairs = []
        for n, r in enumerate(rows):
            if not isinstance(r, dict):
                raise RecipeError(f"{path}: row {n + 1} is not an object")
            for col in (image_col, caption_col):
                if col not in r:
                    raise RecipeError(_no_column(path, col, list(r), n + 1))
            img = r[image_col]
            if not isinstance(img, str) or not img.strip():
                raise RecipeError(f"{path}: row {n + 1}: column {image_col!r} must be an image path, got "
                                  f"{type(img).__name__}")
            pairs.append((img.strip(), r[caption_col]))
        base = Path(image_root) if image_root is not None else path.parent
        if image_root is not None and not base.is_dir():
            raise RecipeError(f"--image-root {base}: not a folder")
        return cls.from_pairs(pairs, base, path.stem, str(path))

    @classmethod
    def load(cls, data: str | Path, split: str = "test", image_column: str = "image",
             caption_column: str = "caption", image_root: str | Path | None = None,
             captions_file: str | Path | None = None) -> "PairedSet":
        """Flickr8k folder (``captions_file``: its captions in another file/language), COCO captions json or
        caption table, whichever ``data`` is."""
        p = Path(data)
        if p.is_dir():
            return cls.from_flickr8k(p, split, captions_file)
        if captions_file is not None:
            raise RecipeError(f"--captions needs --data to be a Flickr8k-style folder (got {p})")
        return cls.from_table(p, image_column, caption_column, image_root)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except ValueError as e:
        raise RecipeError(f"{path}: not valid JSON ({e})") from None


def _no_column(path: Path, col: str, have: Sequence[str], row: int | None = None) -> str:
    where = f"row {row} has" if row is not None else "has"
    return (f"{path}: {where} no column {col!r} (columns: {', '.join(map(str, have)) or 'none'}); "
            "name yours with --image-column / --caption-column")


def _coco_image_root(path: Path, files: list[str], image_root: str | Path | None) -> Path:
    probe = [f for f in files if not Path(f).is_absolute()][:5]
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise RecipeError(f"--image-root {root}: not a folder")
        return root
    d = path.parent
    m = re.match(r"captions_(.+)$", path.stem)
    sets = [m.group(1)] if m else []
    cands = [d] + [d / s for s in sets] + [d.parent / s for s in sets] + [d.parent]
    for c in cands:
        if not probe or all((c / f).is_file() for f in probe):
            return c
    raise RecipeError(f"{path}: cannot find its images (looked for {probe[0]} in "
                      f"{', '.join(str(c) for c in dict.fromkeys(cands))}); give the folder with --image-root")


# ---------------------------------------------------------------------------------------------------------
# Embedding images: content-keyed resumable cache, unreadable files skipped by name
# ---------------------------------------------------------------------------------------------------------
def content_digest(item: Any) -> str:
    """What an image item's cached embedding depends on: the file's bytes (a path), the bytes themselves, or
    the item's repr for anything else (e.g. a row index into a dataset the caller fingerprints)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(item, (str, Path)):
        try:
            update_from_file(h, item)
        except OSError as e:
            h.update(f"unreadable:{type(e).__name__}".encode())
    elif isinstance(item, (bytes, bytearray)):
        h.update(bytes(item))
    else:
        h.update(repr(item).encode())
    return h.hexdigest()


def embed_images(encode_image: Callable[[list], np.ndarray], paths: Sequence[Any], batch_size: int = 64,
                 progress: bool = True, cache_dir: str | Path | None = None, opener: Callable[[Any], Any] | None = None,
                 desc: str = "embed images", skipped: list | None = None,
                 on_skip: Callable[[int, Any, str], None] | None = None) -> np.ndarray:
    """Open and embed images batch by batch (bounded memory) with a tqdm bar.

    With ``cache_dir`` every finished batch is saved as ``part-<start>-<batch size>-<content digest>.npy``
    (atomically) and reused on rerun, so a killed run resumes without recomputing or duplicating rows. The digest
    covers the bytes of the batch's image files, so an image changed on disk re-embeds its batch (the stale part
    is removed); the caller owns the folder's key (specific to the encoder and the image list).

    An image that cannot be opened (missing, truncated, not an image) raises :class:`RecipeError` naming it, or —
    when a ``skipped`` list is given — is left out: ``(index, item, reason)`` is appended to ``skipped`` (and
    passed to ``on_skip``), and the returned array has one row per image that was NOT skipped.
    """
    from tether.progress import progress as tqdm

    opener = opener or _open_rgb
    cdir = Path(cache_dir) if cache_dir is not None else None
    if cdir is not None:
        cdir.mkdir(parents=True, exist_ok=True)
    outs = []
    for s in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = paths[s:s + batch_size]
        part = bad_file = None
        if cdir is not None:
            h = hashlib.blake2b(digest_size=8)
            for it in batch:
                h.update(content_digest(it).encode())
            prefix = f"part-{s:08d}-{batch_size}-"
            part = cdir / f"{prefix}{h.hexdigest()}.npy"
            bad_file = part.with_suffix(".skipped.json")
            for old in cdir.glob(prefix + "*"):            # earlier contents of this batch: stale
                if old.name not in (part.name, bad_file.name):
                    old.unlink(missing_ok=True)
        bad: list[tuple[int, str]] = []
        if part is not None and part.exists():
            e = np.load(part)
            if bad_file is not None and bad_file.exists():
                bad = [(int(i), str(r)) for i, r in json.loads(bad_file.read_text())]
        else:
            ims = []
            for j, it in enumerate(batch):
                try:
                    ims.append(opener(it))
                except Exception as err:  # noqa: BLE001 - any unreadable image is named and skipped, never fatal
                    reason = _reason(err).replace(f" '{it}'", "").replace(f"{it} ", "")  # the line names the file
                    bad.append((s + j, reason))
            e = (np.asarray(encode_image(ims), dtype=np.float32) if ims else np.zeros((0, 0), np.float32))
            if part is not None:
                if bad:
                    atomic_write(bad_file, json.dumps(bad))
                tmp = part.with_name(part.stem + ".tmp.npy")
                np.save(tmp, e)
                tmp.replace(part)
        for i, reason in bad:
            if skipped is None:
                raise RecipeError(f"{paths[i]}: {reason}")
            skipped.append((i, paths[i], reason))
            if on_skip is not None:
                on_skip(i, paths[i], reason)
        if len(e):
            outs.append(e)
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _reason(err: BaseException) -> str:
    """One deterministic line for an unreadable image (no object addresses)."""
    reason = getattr(err, "reason", None)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    msg = re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", msg)
    if reason:
        detail = msg.split(": ", 2)[-1] if msg.startswith(reason) else msg
        return f"{reason} ({detail})" if detail and detail != reason else reason
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _open_rgb(p: Any):
    from align.data import decode_image

    return decode_image(str(p) if isinstance(p, Path) else p, Path(p).name if isinstance(p, (str, Path)) else "")
