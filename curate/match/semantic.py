"""Semantic caption→concept matching, freeze-align style.

Captions and concept prompts (``"{name}, {gloss}"`` by default: lemma + WordNet gloss) are embedded with the
same FROZEN sentence encoder (:class:`align.encoders.TextEncoder`, mean pooling, L2-normalized), and every
concept takes its top-K captions by cosine similarity (faiss inner-product search). Captions are processed in
units; each unit's embeddings are cached on disk (``.npy`` written atomically, keyed by the encoder's weight
fingerprint and the unit's uid list), so a killed run re-embeds nothing it finished. The search streams over
units and keeps a running top-K per concept, so memory stays at one unit + ``concepts × K``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydantic import Field

from curate.recipe import Strict

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class SemanticConfig(Strict):
    """Recipe section ``match.semantic``."""

    model: str = Field(DEFAULT_MODEL, description="sentence-transformer hub id or local folder")
    top_k: int = Field(100, ge=1, description="captions kept per concept")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="drop hits below this cosine")
    prompt: str = Field("{name}, {gloss}", description="concept prompt; fields {name} {lemmas} {gloss}")
    batch_size: int = Field(256, ge=1)
    max_length: int = Field(64, ge=8, description="caption tokens kept")
    device: str = "cpu"
    dtype: str = "float32"
    unit_rows: int = Field(50_000, ge=1, description="captions per cached embedding unit")
    cache_dir: str | None = Field(None, description="embedding cache (default: <catalog>.cache/ beside it)")


def concept_prompt(template: str, name: str, lemmas: Sequence[str] | None, gloss: str | None) -> str:
    """Fill ``template``; with no gloss, the part from ``{gloss}`` on falls back to just the name."""
    lemmas = [lm for lm in (lemmas or []) if lm] or [name]
    if not gloss and "{gloss}" in template:
        return template.split("{gloss}")[0].rstrip(" ,;:-").format(name=name, lemmas=", ".join(lemmas)) or name
    return template.format(name=name, lemmas=", ".join(lemmas), gloss=gloss or "")


def encode_sorted(encoder, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalized embeddings of ``texts`` in input order, encoded in length order so that each batch pads
    to similar lengths (on Flickr-style captions this about halves the padded tokens, hence the time)."""
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    emb = encoder.encode([texts[i] for i in order], batch_size=batch_size, normalize=True)
    out = np.empty_like(emb)
    out[order] = emb
    return out


class EmbeddingCache:
    """One ``.npy`` per unit under ``root/<encoder fingerprint>-<max_length>/``, valid for one uid list."""

    def __init__(self, root: str | os.PathLike, encoder_key: str):
        self.dir = Path(root) / encoder_key
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _digest(uids: Sequence[str]) -> str:
        h = hashlib.sha1()
        for u in uids:
            h.update(str(u).encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    def path(self, unit: int, uids: Sequence[str]) -> Path:
        return self.dir / f"unit{unit:06d}-{self._digest(uids)}.npy"

    def get(self, unit: int, uids: Sequence[str]) -> np.ndarray | None:
        p = self.path(unit, uids)
        if not p.exists():
            return None
        try:
            arr = np.load(p)
        except (OSError, ValueError):
            return None
        return arr if arr.shape[0] == len(uids) else None

    def put(self, unit: int, uids: Sequence[str], emb: np.ndarray) -> None:
        p = self.path(unit, uids)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, emb)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


class TopK:
    """Running per-concept top-K over caption units, via faiss exact inner-product search.

    Ties are broken by arrival order (earlier captions win), so the result is deterministic.
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        n = self.q.shape[0]
        self.scores = np.full((n, 0), -np.inf, dtype=np.float32)
        self.uids = np.empty((n, 0), dtype=object)

    def add(self, emb: np.ndarray, uids: Sequence[str]) -> None:
        import faiss

        if len(uids) == 0 or self.q.shape[0] == 0:
            return
        x = np.ascontiguousarray(emb, dtype=np.float32)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        kk = min(self.k, x.shape[0])
        d, i = index.search(self.q, kk)
        uid_arr = np.asarray(list(uids), dtype=object)
        # faiss returns each row sorted by score; to keep ties in arrival order, re-sort stably by position
        order = np.lexsort((i, -d), axis=1)
        d = np.take_along_axis(d, order, 1)
        i = np.take_along_axis(i, order, 1)
        cand_s = np.concatenate([self.scores, d], axis=1)
        cand_u = np.concatenate([self.uids, uid_arr[i]], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(cand_s, keep, 1)
        self.uids = np.take_along_axis(cand_u, keep, 1)

    def results(self, min_score: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays (query index, uid, score) of every kept hit, best first within each query."""
        keep = np.isfinite(self.scores)
        if min_score is not None:
            keep &= self.scores >= min_score
        q = np.broadcast_to(np.arange(self.scores.shape[0])[:, None], self.scores.shape)
        return q[keep], self.uids[keep], self.scores[keep].astype(np.float64)
