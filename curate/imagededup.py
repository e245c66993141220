"""Image dedup after download: exact (sha256) → near (pHash + faiss binary index) → semantic (SemDeDup).

Candidates are the rows still alive whose image was stored (``downloads.status = 'success'``). Rows that point
at the same source (path or url) are ONE image with several captions (Flickr8k/COCO style): the image is judged
once and all its rows share the verdict (``group_same_source``). Each pass only sees the survivors of the
previous one. Every candidate gets one ``decisions(stage='image_dedup')`` row; a
dropped one records ``ref_uid`` = the kept sample it duplicates.

**Keep rule (deterministic, the same for all three passes).** Candidates are ranked by original pixel area
(``original_width × original_height``, larger first: a resized copy loses to its source), then by ``uid``
(ascending). Walking that ranking, a candidate is dropped when a HIGHER-ranked candidate that was KEPT is its
duplicate; ``ref_uid`` is that kept sample (for pHash the closest in Hamming distance, for SemDeDup the most
cosine-similar; ties → the higher-ranked). Duplicates are never chained through a dropped sample, so the result
does not depend on input order, batching or thread count.

* **exact**: equal sha256 of the source bytes (img2dataset's ``compute_hash``; the file bytes for local rows).
* **near**: imagehash pHash (``hash_size``² bits); pairs with Hamming distance ≤ ``threshold`` are found with a
  faiss binary index: ``IndexBinaryFlat`` (exact brute force, SIMD popcount) or ``IndexBinaryMultiHash`` with
  ``threshold + 1`` disjoint sub-hashes (also exact for that radius by the pigeonhole principle; sub-linear).
* **semantic** (SemDeDup, Abbas et al. 2023): L2-normalised embeddings from a frozen
  :class:`tether.encoders.VisionEncoder`, spherical faiss k-means (``clusters`` or ``sqrt(n)``), and within each
  cluster a pair is a duplicate when its cosine similarity is ≥ ``1 - epsilon``. With fewer than two images left
  there is nothing to compare: the pass loads no encoder.

Work that takes long is cached per (uid, sha256) in the catalog — ``image_hashes`` (pHash bytes) and
``image_embeddings`` (which ``.npy`` chunk file and row holds the vector) — committed chunk by chunk, so a
killed run resumes; the decisions themselves are written in one transaction at the end.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from curate.catalog import Catalog
from curate.download import SUCCESS
from curate.imagestore import ImageStore
from curate.judge import record_table
from curate.plan import Context, Done, Step
from curate.stages import Begin, Stage
from tether.recipe import Strict

STAGE = Stage.IMAGE_DEDUP



class PhashConfig(Strict):
    enabled: bool = True
    hash_size: int = Field(8, ge=4, le=32)
    threshold: int = Field(4, ge=0)  # max Hamming distance (bits) of a near-duplicate pair
    index: Literal["flat", "multihash"] = "multihash"  # both exact for the threshold; multihash is sub-linear


class SemDedupConfig(Strict):
    """``media.image_dedup.semantic``: SemDeDup over frozen image embeddings."""

    enabled: bool = False
    encoder: str = "facebook/dinov2-small"  # hub id or local path (any tether.encoders.VisionEncoder)
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    layer: int = -1
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = Field(32, ge=1)
    clusters: Optional[int] = Field(None, ge=1)  # default: round(sqrt(n))
    kmeans_iters: int = Field(20, ge=1)
    epsilon: float = Field(0.05, gt=0, lt=1)  # duplicate when cosine ≥ 1 - epsilon
    seed: int = 0


class ImageDedupConfig(Strict):
    """``media.image_dedup``."""

    enabled: bool = True
    group_same_source: bool = True  # rows with the same path/url = one image with several captions
    exact: bool = True
    phash: PhashConfig = PhashConfig()
    semantic: SemDedupConfig = SemDedupConfig()
    threads: int = Field(2, ge=1)
    chunk: int = Field(2000, ge=1)


@dataclass
class DedupResult:
    candidates: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # pass → count
    drops: list[tuple[str, str, str]] = field(default_factory=list)  # (uid, ref_uid, reason)

    @property
    def kept(self) -> int:
        return self.candidates - sum(self.dropped.values())


# --------------------------------------------------------------------------------------------------------
# pure functions (numpy in, decisions out): usable without a catalog
# --------------------------------------------------------------------------------------------------------
def phash_bytes(data: bytes, hash_size: int = 8) -> bytes:
    """pHash of an encoded image as packed bits (``hash_size**2 / 8`` bytes).

    JPEGs are decoded with DCT scaling to ≥ 2× the hash's working size (4 × hash_size), which is what pHash
    looks at anyway and several times faster than a full decode.
    """
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        side = 4 * hash_size
        if im.format == "JPEG":
            im.draft("L", (2 * side, 2 * side))
        h = imagehash.phash(im, hash_size=hash_size)
    return np.packbits(h.hash.flatten()).tobytes()


def greedy_keep(n: int, q: np.ndarray, idx: np.ndarray, score: np.ndarray, larger_is_closer: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keep rule over ``n`` candidates given in rank order (0 = best).

    Duplicate pairs come as flat arrays: candidate ``q[k]`` duplicates candidate ``idx[k]`` with ``score[k]``
    (any order; self pairs and both directions allowed). Returns ``keep`` (bool), ``ref`` (index of the kept,
    higher-ranked sample each dropped one duplicates; -1 if kept) and the ``score`` of that pair. Only
    candidates with a higher-ranked duplicate are visited in Python, so n in the millions is fine.
    """
    keep = np.ones(n, bool)
    ref = np.full(n, -1, np.int64)
    best = np.zeros(n, np.float64)
    q, idx, score = np.asarray(q, np.int64), np.asarray(idx, np.int64), np.asarray(score, np.float64)
    m = idx < q  # only pairs pointing at a higher-ranked candidate matter
    q, idx, score = q[m], idx[m], score[m]
    if not len(q):
        return keep, ref, best
    # per candidate: its pairs, closest first (ties → higher-ranked partner)
    order = np.lexsort((idx, -score if larger_is_closer else score, q))
    q, idx, score = q[order], idx[order], score[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    ends = np.r_[starts[1:], len(q)]
    for s, e in zip(starts, ends):  # ascending q = rank order, so partners are final when visited
        part = idx[s:e]
        ok = np.flatnonzero(keep[part])
        if len(ok):
            i = q[s]
            keep[i], ref[i], best[i] = False, part[ok[0]], score[s + ok[0]]
    return keep, ref, best


def near_duplicates(codes: np.ndarray, threshold: int, index: str = "flat"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy keep over packed binary codes ``[n, bytes]`` in rank order; Hamming distance ≤ ``threshold``."""
    import faiss

    n, nbytes = codes.shape
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0)
    d = nbytes * 8
    if index == "multihash" and threshold + 1 <= d:
        nhash = threshold + 1
        idx = faiss.IndexBinaryMultiHash(d, nhash, d // nhash)
    else:
        idx = faiss.IndexBinaryFlat(d)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    idx.add(codes)
    lims, dist, ids = idx.range_search(codes, threshold + 1)  # faiss: distance < radius
    q = np.repeat(np.arange(n, dtype=np.int64), np.diff(lims).astype(np.int64))
    return greedy_keep(n, q, ids, dist, larger_is_closer=False)


def semantic_duplicates(emb: np.ndarray, epsilon: float, clusters: int | None = None, iters: int = 20,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup over L2-normalised embeddings ``[n, d]`` in rank order: k-means, then within each cluster pairs
    with cosine ≥ ``1 - epsilon`` are duplicates (greedy keep rule of the module)."""
    import faiss

    n = len(emb)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0)
    x = np.ascontiguousarray(emb, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    k = int(clusters or max(1, round(math.sqrt(n))))
    k = max(1, min(k, n))
    if k > 1:
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, n))
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0]
    else:
        assign = np.zeros(n, np.int64)
    thr = 1.0 - epsilon
    qs, js, ss = [], [], []
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)  # ascending = rank order
        if len(members) < 2:
            continue
        for s in range(0, len(members), 4096):
            rows = members[s:s + 4096]
            sim = x[rows] @ x[members].T
            r, col = np.nonzero(sim >= thr)
            qs.append(rows[r])
            js.append(members[col])
            ss.append(sim[r, col])
    if not qs:
        return greedy_keep(n, np.zeros(0), np.zeros(0), np.zeros(0), larger_is_closer=True)
    return greedy_keep(n, np.concatenate(qs), np.concatenate(js), np.concatenate(ss), larger_is_closer=True)


# --------------------------------------------------------------------------------------------------------
# catalog stage
# --------------------------------------------------------------------------------------------------------
LATER_STAGES = (STAGE, *STAGE.later())  # decisions of these stages do not limit this stage's candidates


def _candidates(cat: Catalog) -> list[tuple]:
    """(uid, sha256, format, store, shard, key, source) of alive stored images, in keep-rule rank order;
    ``source`` is the row's path or url (rows sharing it are one image with several captions)."""
    return cat.execute(
        """SELECT d.uid, d.sha256, d.format, d.store, d.shard, d.key, coalesce(m.path, m.url)
           FROM downloads d JOIN media_rows m USING (uid)
           WHERE d.status = $ok
             AND NOT EXISTS (SELECT 1 FROM decisions x
                             WHERE x.uid = d.uid AND NOT x.kept AND NOT list_contains($ignore, x.stage))
           ORDER BY coalesce(d.original_width, d.width, 0)::BIGINT * coalesce(d.original_height, d.height, 0) DESC,
                    d.uid""", {"ok": SUCCESS, "ignore": [s.value for s in LATER_STAGES]}).fetchall()


def _missing(cat: Catalog, rows: list[tuple], table: str, extra: str, params: list) -> list[tuple]:
    import pyarrow as pa

    cand = pa.table({"uid": [r[0] for r in rows], "sha256": [r[1] for r in rows], "i": list(range(len(rows)))})
    with cat.registered("_cand", cand):
        miss = cat.execute(f"""SELECT i FROM _cand c WHERE NOT EXISTS (SELECT 1 FROM {table} t
                               WHERE t.uid = c.uid AND t.sha256 IS NOT DISTINCT FROM c.sha256 {extra}) ORDER BY i""",
                           params).fetchall()
    return [rows[i] for (i,) in miss]


def _insert(cat: Catalog, table: str, cols: dict) -> None:
    """Append one Arrow batch to ``table`` in its own transaction (a committed chunk of a resumable step)."""
    import pyarrow as pa

    with cat.transaction():
        cat.insert_arrow(f"{table}({', '.join(cols)})", pa.table(cols), ", ".join(cols))


def compute_phashes(cat: Catalog, rows: list[tuple], cfg: ImageDedupConfig, encode_format: str = "jpg",
                    progress: bool = True) -> np.ndarray:
    """pHash codes ``[len(rows), bytes]`` (cached in ``image_hashes``; computed chunk by chunk)."""
    from tether.progress import progress as tqdm

    hs = cfg.phash.hash_size
    todo = _missing(cat, rows, "image_hashes", "AND t.hash_size = ?", [hs])
    bar = tqdm(total=len(todo), desc="pHash", unit="img", disable=not progress)
    with ImageStore(encode_format) as store, ThreadPoolExecutor(cfg.threads) as pool:
        for s in range(0, len(todo), cfg.chunk):
            chunk = todo[s:s + cfg.chunk]
            blobs = [store.read(*r[2:6]) for r in chunk]
            hashes = list(pool.map(lambda b: phash_bytes(b, hs), blobs))
            _insert(cat, "image_hashes", {"uid": [r[0] for r in chunk], "sha256": [r[1] for r in chunk],
                                          "hash_size": [hs] * len(chunk), "phash": hashes})
            bar.update(len(chunk))
    bar.close()
    got = dict(((u, s), h) for u, s, h in cat.execute(
        "SELECT uid, sha256, phash FROM image_hashes WHERE hash_size = ?", [hs]).fetchall())
    return np.stack([np.frombuffer(got[(r[0], r[1])], np.uint8) for r in rows]) if rows else \
        np.zeros((0, hs * hs // 8), np.uint8)


def embed_image_bytes(encoder, blobs: list[bytes], pooling: str, batch_size: int, layer: int | None) -> np.ndarray:
    """L2-normalised float32 embeddings of encoded images: one chunk, here or in a Ray actor."""
    from PIL import Image

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    return encoder.encode(images, pooling=pooling, batch_size=batch_size, normalize=True,
                          layer=layer).astype(np.float32)


def fill_embedding_cache(cat: Catalog, rows: list[tuple], model: str, emb_dir: Path, fn, args: tuple = (),
                         encoder=None, remote: tuple | None = None, encode_format: str = "jpg", chunk: int = 2000,
                         progress: bool = True, desc: str = "embed images") -> None:
    """Embed the stored images of ``rows`` that ``image_embeddings`` lacks for ``model`` (a key naming the exact
    model and its settings), chunk by chunk: ``fn(encoder, blobs, *args)`` → ``[n, d]`` float32, in this process
    or — ``remote = (distributor, load, load_kwargs)`` of ``kind: ray`` — on Ray actors that each load the model
    once (:class:`tether.distribute.Loaded`; the driver sends the stored image bytes). Each chunk is one ``.npy``
    file under ``emb_dir`` plus its catalog rows, committed in order, so a killed run resumes."""
    from tether.distribute import Loaded, actor_load_kwargs, run_units
    from tether.progress import progress as tqdm

    todo = _missing(cat, rows, "image_embeddings", "AND t.model = ?", [model])
    emb_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress)
    with ImageStore(encode_format) as store:
        def chunks():
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                yield part, ([store.read(*r[2:6]) for r in part], *args)

        if remote is not None:
            dist, load, kwargs = remote
            done = run_units(dist, Loaded, (load, actor_load_kwargs(dist, kwargs), fn), chunks(), gpus=dist.gpus)
        else:
            done = ((part, fn(encoder, *payload)) for part, payload in chunks())
        for part, vecs in done:
            n_files = int(cat.scalar("SELECT count(DISTINCT file) FROM image_embeddings") or 0)
            name = f"{model.replace(':', '_').replace('+', '-').replace('/', '_')}-{n_files:06d}.npy"
            tmp = emb_dir / (name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(vecs, np.float32))
            os.replace(tmp, emb_dir / name)
            _insert(cat, "image_embeddings", {"uid": [r[0] for r in part], "sha256": [r[1] for r in part],
                                              "model": [model] * len(part), "file": [name] * len(part),
                                              "row": list(range(len(part)))})
            bar.update(len(part))
    bar.close()


def cached_embeddings(cat: Catalog, rows: list[tuple], model: str, emb_dir: Path, dim: int) -> np.ndarray:
    """``[len(rows), dim]`` embeddings of ``rows`` from the ``image_embeddings`` cache of ``model`` (filled by
    :func:`fill_embedding_cache`); a row missing there or a chunk file that does not match is a one-line error."""
    from tether.recipe import RecipeError

    if not rows:
        return np.zeros((0, dim), np.float32)
    import pyarrow as pa

    cand = pa.table({"uid": [r[0] for r in rows], "sha256": [r[1] for r in rows], "i": list(range(len(rows)))})
    with cat.registered("_want", cand):
        loc = cat.execute("""SELECT w.i, e.file, e.row FROM _want w JOIN image_embeddings e
                             ON e.uid = w.uid AND e.sha256 IS NOT DISTINCT FROM w.sha256 AND e.model = ?
                             ORDER BY w.i""", [model]).fetchall()
    out = np.zeros((len(rows), dim), np.float32)
    seen = np.zeros(len(rows), bool)
    files: dict[str, np.ndarray] = {}
    for i, f, j in loc:
        if seen[i]:
            continue
        if f not in files:
            path = emb_dir / f
            try:
                files[f] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise RecipeError(f"{path}: unreadable embedding chunk ({e}); delete {emb_dir} to recompute") from None
        a = files[f]
        if a.ndim != 2 or a.shape[1] != dim or not 0 <= j < len(a):
            raise RecipeError(f"{emb_dir / f}: embedding chunk does not match its catalog rows (shape {a.shape}, "
                              f"row {j}, dim {dim}); delete {emb_dir} to recompute")
        out[i], seen[i] = a[j], True
    if not seen.all():
        raise RecipeError(f"{int((~seen).sum()):,} images have no cached {model} embedding")
    return out


def compute_embeddings(cat: Catalog, rows: list[tuple], cfg: SemDedupConfig, emb_dir: Path, encoder=None,
                       encode_format: str = "jpg", chunk: int = 2000, progress: bool = True,
                       distributor=None) -> np.ndarray:
    """L2-normalised embeddings ``[len(rows), d]`` from a frozen vision encoder (cached as .npy chunks).

    ``distributor`` ``kind: ray`` (:class:`tether.distribute.DistributorConfig`): the chunks are embedded by Ray
    actors that load ``cfg.encoder`` once each (the driver sends the stored image bytes), committed here in order.
    """
    from tether.distribute import remote_embedding
    from tether.encoders import VisionEncoder

    if encoder is None:
        from tether.zoo import check_model

        check_model("media.image_dedup.semantic.encoder", cfg.encoder, ("config.json", "preprocessor_config.json"))
        encoder = VisionEncoder.load(cfg.encoder, device=cfg.device, dtype=cfg.dtype, layer=cfg.layer)
    model = f"{encoder.fingerprint}:{cfg.pooling}:{cfg.layer if cfg.layer is not None else encoder.layer}"
    remote = None
    if remote_embedding(distributor):
        remote = (distributor, VisionEncoder.load, {"name_or_path": cfg.encoder, "device": cfg.device,
                                                    "dtype": cfg.dtype, "layer": cfg.layer})
    fill_embedding_cache(cat, rows, model, emb_dir, embed_image_bytes, (cfg.pooling, cfg.batch_size, cfg.layer),
                         encoder=encoder, remote=remote, encode_format=encode_format, chunk=chunk, progress=progress)
    return cached_embeddings(cat, rows, model, emb_dir, encoder.dim)


def candidates_digest(cat: Catalog) -> str:
    """Identity of this stage's input (which images, which bytes): part of its stage params."""
    import hashlib

    h = hashlib.sha1()
    for uid, sha, *_ in _candidates(cat):
        h.update(f"{uid}\t{sha}\n".encode())
    return h.hexdigest()[:16]


def run_image_dedup(cat: Catalog, cfg: ImageDedupConfig, build_dir: str | Path, encode_format: str = "jpg",
                    encoder=None, progress: bool = True, distributor=None) -> DedupResult:
    """Judge every stored, alive image once (see module doc); replaces earlier ``image_dedup`` decisions."""
    rows = _candidates(cat)
    res = DedupResult(candidates=len(rows))
    if not cfg.enabled:
        with cat.transaction():
            cat.clear_decisions(STAGE)
        return res
    # one image per source (path / url): the first row in rank order represents all rows sharing it
    group: list[int] = []
    reps: list[int] = []
    rep_of: dict[object, int] = {}
    for i, row in enumerate(rows):
        key = row[6] if (cfg.group_same_source and row[6] is not None) else ("#", i)
        if key not in rep_of:
            rep_of[key] = len(reps)
            reps.append(i)
        group.append(rep_of[key])
    base = [rows[i] for i in reps]
    alive = np.ones(len(base), bool)
    ref = np.full(len(base), -1, np.int64)
    reason: list[str | None] = [None] * len(base)
    size = np.bincount(np.asarray(group, np.int64), minlength=len(base)) if rows else np.zeros(0, np.int64)

    def apply(name: str, sub: np.ndarray, keep: np.ndarray, r: np.ndarray, score: np.ndarray, fmt: str) -> None:
        gone = np.flatnonzero(~keep)
        for j in gone:
            i = sub[j]
            alive[i], ref[i], reason[i] = False, sub[r[j]], fmt.format(score[j])
        res.dropped[name] = int(size[sub[gone]].sum())

    if cfg.exact:
        first: dict[str, int] = {}
        keep = np.ones(len(base), bool)
        r = np.full(len(base), -1, np.int64)
        for i, row in enumerate(base):
            if row[1] is None:
                continue
            if row[1] in first:
                keep[i], r[i] = False, first[row[1]]
            else:
                first[row[1]] = i
        apply("exact", np.arange(len(base)), keep, r, np.zeros(len(base)), "exact duplicate (same sha256)")
    if cfg.phash.enabled:
        sub = np.flatnonzero(alive)
        codes = compute_phashes(cat, [base[i] for i in sub], cfg, encode_format, progress)
        keep, r, d = near_duplicates(codes, cfg.phash.threshold, cfg.phash.index)
        apply("phash", sub, keep, r, d,
              "near duplicate (pHash Hamming distance {:.0f} <= " + f"{cfg.phash.threshold})")
    if cfg.semantic.enabled and alive.sum() < 2:  # no pair to compare: no encoder to load
        res.dropped["semantic"] = 0
    elif cfg.semantic.enabled:
        sub = np.flatnonzero(alive)
        emb = compute_embeddings(cat, [base[i] for i in sub], cfg.semantic, Path(build_dir) / "media" / "embeddings",
                                 encoder=encoder, encode_format=encode_format, chunk=cfg.chunk, progress=progress,
                                 distributor=distributor)
        keep, r, s = semantic_duplicates(emb, cfg.semantic.epsilon, cfg.semantic.clusters, cfg.semantic.kmeans_iters,
                                         cfg.semantic.seed)
        apply("semantic", sub, keep, r, s,
              "semantic duplicate (cosine {:.4f} >= " + f"{1 - cfg.semantic.epsilon:.4f})")
    import pyarrow as pa

    g = np.asarray(group, np.int64)
    kept = alive[g] if len(rows) else np.zeros(0, bool)
    tbl = pa.table({
        "uid": [r[0] for r in rows], "kept": kept.tolist(),
        "reason": [reason[k] or "unique image" for k in g.tolist()],
        "ref_uid": [base[ref[k]][0] if ref[k] >= 0 else None for k in g.tolist()],
    })
    res.drops = [(u, rf, why) for u, k, why, rf in zip(tbl["uid"].to_pylist(), kept.tolist(),
                                                       tbl["reason"].to_pylist(), tbl["ref_uid"].to_pylist()) if not k]
    with cat.transaction():
        cat.clear_decisions(STAGE)
        record_table(cat, STAGE, tbl)
    return res


def image_dedup_step(cfg: ImageDedupConfig, encode_format: str = "jpg") -> Step:
    """The ``image_dedup`` step: its key holds the digest of its candidates (which images, which bytes), so new
    or returned downloads rerun it."""

    def run(ctx: Context, how: Begin) -> Done:
        res = run_image_dedup(ctx.cat, cfg, ctx.build_dir, encode_format, encoder=ctx.encoder,
                              progress=ctx.progress, distributor=ctx.distributor)
        why = ", ".join(f"{k} {v:,}" for k, v in res.dropped.items())
        return Done(res.candidates, f"{res.candidates:,} stored images checked, "
                                    f"{sum(res.dropped.values()):,} dropped as duplicates" + (f" ({why})" if why else ""))

    models = (("media.image_dedup.semantic.encoder", cfg.semantic.encoder, ("config.json", "preprocessor_config.json")),
              ) if cfg.enabled and cfg.semantic.enabled else ()
    return Step(STAGE, "media.image_dedup", cfg.model_dump(), run, models=models,
                inputs=lambda ctx: {"input": candidates_digest(ctx.cat)})
