"""Exact dedup and optional near-duplicate captions (faiss over frozen text embeddings).

Two stages, each recording one ``decisions`` row per sample it rejects (``kept = false``, a reason, and
``ref_uid`` = the sample that was kept); the caption filters before them are :mod:`curate.filters`.

* ``dedup`` (:func:`run_exact_dedup`) — exact duplicates by ``url``, by normalized caption (``caption``: lower
  case, Unicode punctuation/symbols → space, whitespace collapsed) and by ``url_caption`` (url or local path +
  normalized caption), applied in the configured order. Keep rule: the first sample in ``(source, row_index)``
  order survives; all SQL (window functions), so 10M rows take seconds.
* ``neardup`` (:func:`run_near_dup`) — captions embedded with a frozen sentence encoder
  (:class:`tether.encoders.TextEncoder`), greedy in ``(source, row_index)`` order: a caption whose cosine
  similarity to an EARLIER KEPT caption is ≥ ``threshold`` is dropped with that caption as ``ref_uid``
  (faiss inner-product index over kept embeddings + an exact within-chunk pass). Chunk embeddings are cached
  under ``<catalog>.cache/neardup/`` (keyed by encoder fingerprint and the chunk's uid list), so a killed run
  resumes without re-embedding. With fewer than two captions alive there is nothing to compare and no encoder is
  loaded.

Each stage reads the ``alive`` view, so it only judges samples that earlier stages kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from pydantic import Field

from curate.catalog import Catalog
from curate.judge import Judge, Verdicts, record_table
from curate.stages import Stage
from tether.recipe import Strict

NORM_CAPTION_SQL = "trim(regexp_replace(lower({c}), '[\\pP\\pS\\s]+', ' ', 'g'))"


def norm_caption_sql(col: str = "caption") -> str:
    """SQL expression normalizing a caption column for duplicate detection."""
    return NORM_CAPTION_SQL.format(c=col)


class NearDupConfig(Strict):
    """Recipe section ``dedup.near:`` — off unless ``enabled``."""

    enabled: bool = False
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    threshold: float = Field(default=0.95, gt=0, le=1)
    batch_size: int = Field(default=256, ge=1)
    chunk: int = Field(default=4096, ge=16)
    max_length: int = Field(default=64, ge=8)
    device: str = "cpu"


class DedupConfig(Strict):
    """Recipe section ``dedup:``: exact keys in the order applied, plus the optional near-dup pass."""

    exact: list[Literal["url", "caption", "url_caption"]] = ["url", "url_caption"]
    near: NearDupConfig = NearDupConfig()


def exact_key_sql(key: str) -> tuple[str, str]:
    """SQL ``(expression, condition)`` of an exact-dedup key; rows failing the condition have no key."""
    norm = norm_caption_sql("caption")
    return {
        "url": ("trim(url)", "nullif(trim(url), '') IS NOT NULL"),
        "caption": (norm, "caption IS NOT NULL"),
        "url_caption": (f"coalesce(nullif(trim(url), ''), path) || chr(31) || {norm}",
                        "caption IS NOT NULL AND coalesce(nullif(trim(url), ''), path) IS NOT NULL"),
    }[key]


def run_exact_dedup(cat: Catalog, cfg: DedupConfig, stage: str = Stage.DEDUP) -> int:
    """Exact duplicates by each configured key in turn (first in (source, row_index) order is kept); returns the
    number rejected."""
    return ExactDedup(cfg, stage).run(cat)


class ExactDedup(Judge):
    """Hash aggregation, no sort: alive rows are grouped by the 64-bit hash of their key (DuckDB ``hash``; the
    chance of any false match among 10M distinct keys is ~3e-6), groups of 2+ are joined back and every row
    but the first is rejected with ``ref_uid`` = the first. One verdict query per key, in the recipe's order."""

    def __init__(self, cfg: DedupConfig, stage: str = Stage.DEDUP):
        self.cfg, self.stage = cfg, Stage(stage)

    def verdicts(self, cat: Catalog) -> Iterator[Verdicts]:
        cat.execute("""CREATE OR REPLACE TEMP TABLE _dsrc AS
            SELECT source, (row_number() OVER (ORDER BY source))::BIGINT << 40 AS base
            FROM (SELECT DISTINCT source FROM samples)""")
        for key in self.cfg.exact:
            expr, cond = exact_key_sql(key)
            cat.execute(f"""CREATE OR REPLACE TEMP TABLE _dk AS
                SELECT a.uid, r.base + a.row_index AS ord, hash({expr}) AS k
                FROM alive a JOIN _dsrc r USING (source) WHERE {cond}""")
            yield Verdicts(f"""SELECT d.uid, 'duplicate {key}' AS reason, f.first_uid FROM _dk d JOIN (
                  SELECT k, arg_min(uid, ord) AS first_uid FROM _dk GROUP BY k HAVING count(*) > 1) f USING (k)
                WHERE d.uid <> f.first_uid""", ref="first_uid")
            cat.execute("DROP TABLE _dk")
        cat.execute("DROP TABLE _dsrc")


def _embedding_cache_dir(cat: Catalog, encoder, cfg: NearDupConfig) -> Path | None:
    """``<catalog>.cache/neardup/<encoder fingerprint>-<max_length>/`` (None: encoder without a fingerprint)."""
    fp = getattr(encoder, "fingerprint", None)
    if not fp:
        return None
    return Path(str(cat.path) + ".cache") / "neardup" / f"{fp}-{cfg.max_length}"


def _chunk_file(cache: Path | None, ci: int, uids: list[str]) -> Path | None:
    """Where chunk ``ci`` with exactly this uid list is cached (None: no cache)."""
    import hashlib

    key = hashlib.sha1("\x1f".join(uids).encode()).hexdigest()[:16]
    return cache / f"{ci:06d}-{key}.npy" if cache is not None else None


def encode_chunk(encoder, captions: list[str], batch_size: int) -> np.ndarray:
    """One chunk's caption embeddings (float32), here or in a Ray actor (:func:`tether.distribute.embed_units`)."""
    return encoder.encode(captions, batch_size=batch_size).astype(np.float32)


def _save_chunk(f: Path, emb: np.ndarray) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(f)  # atomic: a killed run never leaves a truncated chunk


def _chunk_embeddings(cache: Path | None, ci: int, uids: list[str], captions, encoder, batch_size: int
                      ) -> np.ndarray:
    """Embeddings of one chunk, from the on-disk cache when it holds this exact uid list (resume after a kill)."""
    f = _chunk_file(cache, ci, uids)
    if f is not None and f.exists():
        return np.load(f)
    emb = encode_chunk(encoder, captions(), batch_size)
    if f is not None:
        _save_chunk(f, emb)
    return emb


def greedy_near_dups(emb: np.ndarray, threshold: float, index=None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy near-dup pass over one chunk of L2-normalized embeddings in order.

    ``index`` (a faiss IndexFlatIP, possibly empty) holds the embeddings kept in EARLIER chunks. Returns
    ``ref`` (per row: -1 if kept, else the id of the MOST similar earlier kept row it duplicates; ids ≥ index.ntotal refer to rows of
    this chunk as ``index.ntotal + i``) and the boolean kept mask. Kept rows are added to ``index``.
    """
    n = emb.shape[0]
    base = index.ntotal if index is not None else 0
    ref = np.full(n, -1, dtype=np.int64)
    best = np.full(n, -np.inf, dtype=np.float64)  # similarity of the best earlier KEPT row found so far
    if index is not None and base:
        d, i = index.search(emb, 1)
        best[:], ref[:] = d[:, 0], i[:, 0]
    sims = emb @ emb.T
    kept = np.zeros(n, dtype=bool)
    for i in range(n):
        js = np.flatnonzero(kept[:i] & (sims[i, :i] >= threshold))
        if js.size:
            j = int(js[np.argmax(sims[i, js])])
            if sims[i, j] > best[i]:
                best[i], ref[i] = sims[i, j], base + j
        kept[i] = not best[i] >= threshold
    ref[kept] = -1
    if index is not None:
        index.add(emb[kept])
    return ref, kept


def run_near_dup(cat: Catalog, cfg: NearDupConfig, stage: str = Stage.NEARDUP, encoder=None,
                 progress: bool = True, distributor=None) -> int:
    """Drop captions whose embedding is within ``threshold`` cosine of an earlier kept caption.

    ``distributor`` ``kind: ray`` (:class:`tether.distribute.DistributorConfig`): the chunks not cached yet are
    embedded by Ray actors first; the greedy pass then runs here over the cache, as a resumed local run would."""
    import faiss
    from tether.progress import progress as tqdm

    cat.clear_decisions(stage)
    if not cfg.enabled:
        return 0
    total = int(cat.scalar("SELECT count(*) FROM alive"))
    if total < 2:  # nothing to compare: no encoder to load
        return 0
    if encoder is None:
        from tether.encoders import TextEncoder
        from tether.zoo import check_model

        check_model("dedup.near.model", cfg.model)
        encoder = TextEncoder.load(cfg.model, device=cfg.device, max_length=cfg.max_length)
    cache = _embedding_cache_dir(cat, encoder, cfg)
    from tether.distribute import embed_units, remote_embedding

    if remote_embedding(distributor) and cache is not None:
        from tether.encoders import TextEncoder

        def missing():
            with cat.con.cursor() as c:
                for ci, b in enumerate(c.sql("SELECT uid, caption FROM alive ORDER BY source, row_index")
                                        .to_arrow_reader(cfg.chunk)):
                    f = _chunk_file(cache, ci, b.column(0).to_pylist())
                    if not f.exists():
                        yield f, (b.column(1).to_pylist(), cfg.batch_size)

        with tqdm(total=total, desc="embed captions (ray)", unit="caption", disable=not progress) as eb:
            embed_units(distributor, TextEncoder.load,
                        {"name_or_path": cfg.model, "device": cfg.device, "max_length": cfg.max_length},
                        encode_chunk, missing(), _save_chunk, eb)
    cur = cat.con.cursor()
    reader = cur.sql("SELECT uid, caption FROM alive ORDER BY source, row_index").to_arrow_reader(cfg.chunk)
    index = faiss.IndexFlatIP(encoder.dim)
    kept_uids: list[str] = []  # uid of every vector in `index`, by id
    dropped: list[tuple[str, str]] = []
    bar = tqdm(total=total, desc="near-dup captions", unit="captions", disable=not progress)
    for ci, batch in enumerate(reader):
        uids = batch.column(0).to_pylist()
        emb = _chunk_embeddings(cache, ci, uids, lambda: batch.column(1).to_pylist(), encoder, cfg.batch_size)
        base = index.ntotal
        ref, kept = greedy_near_dups(emb, cfg.threshold, index)
        for i in np.flatnonzero(~kept):
            r = int(ref[i])
            dropped.append((uids[i], kept_uids[r] if r < base else uids[r - base]))
        kept_uids.extend(uids[j] for j in np.flatnonzero(kept))
        bar.update(len(uids))
    bar.close()
    cur.close()
    if dropped:
        import pyarrow as pa

        tbl = pa.table({"uid": [d[0] for d in dropped], "ref_uid": [d[1] for d in dropped],
                        "reason": [f"near-duplicate caption (cos >= {cfg.threshold})"] * len(dropped)})
        record_table(cat, stage, tbl)
    return len(dropped)
