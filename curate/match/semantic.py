"""Semantic caption→concept matching, freeze-align style.

Captions and concept prompts (``"{name}, {gloss}"`` by default: lemma + WordNet gloss) are embedded with the
same FROZEN sentence encoder (:class:`tether.encoders.TextEncoder`, mean pooling, L2-normalized), and every
concept takes its top-K captions by cosine similarity (faiss inner-product search). Captions are processed in
units; each unit's embeddings are cached on disk (``.npy`` written atomically, keyed by the encoder's weight
fingerprint and the unit's uid list), so a killed run re-embeds nothing it finished. The search streams over
units and keeps a running top-K per concept, so memory stays at one unit + ``concepts × K``. The concept-prompt
embeddings (32k prompts for a large bank) are cached across builds in the user cache (:class:`PromptCache`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import Field

from tether.recipe import Strict

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


def encode_sorted(encoder, texts: Sequence[str], batch_size: int = 256, bar=None) -> np.ndarray:
    """L2-normalized embeddings of ``texts`` in input order, encoded in length order so that each batch pads
    to similar lengths (less padding; measured in docs/benchmarks.md). ``bar``: a tqdm bar advanced
    by the number of texts after each batch."""
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    parts = []
    for s in range(0, len(order), batch_size):
        parts.append(encoder.encode([texts[i] for i in order[s:s + batch_size]], batch_size=batch_size,
                                    normalize=True))
        if bar is not None:
            bar.update(len(parts[-1]))
    if not parts:
        return encoder.encode([], batch_size=batch_size, normalize=True)
    emb = np.concatenate(parts)
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


def prompt_cache_dir() -> Path | None:
    """``$TETHER_PROMPT_CACHE``, else ``$TETHER_CACHE/prompt-embeddings`` (default
    ``~/.cache/tether/prompt-embeddings``; see tether.zoo.cache_dir). ``TETHER_PROMPT_CACHE=off``: no cache (None)."""
    env = os.environ.get("TETHER_PROMPT_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if env:
        return Path(os.path.expanduser(env))
    from tether.zoo import cache_dir

    return cache_dir() / "prompt-embeddings"


class PromptCache:
    """Concept-prompt embeddings shared by every build (same prompts + same encoder = same vectors).

    Content-keyed: the key is a hash of the prompt list, the encoder's weight fingerprint and the options that
    change the vectors (max_length, pooling, dtype). ``<key>.json`` names the data file ``<key>-<sha>.npy`` with
    its size and sha256; a load checks both (a truncated or edited file is recomputed). Both files are written
    to a temporary name and ``os.replace``d, and the data file's name carries its own hash, so two builds
    writing at once never leave a record that points at other bytes.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else prompt_cache_dir()  # None: caching off

    @staticmethod
    def key(prompts: Sequence[str], encoder, **options) -> str:
        h = hashlib.sha256()
        for t in prompts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        ident = {"prompts": h.hexdigest(), "n": len(prompts), "encoder": encoder.fingerprint,
                 "max_length": getattr(encoder, "max_length", None), "pooling": getattr(encoder, "pooling", None),
                 "dtype": str(getattr(encoder, "dtype", "")), "normalize": True, **options}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str, n: int) -> np.ndarray | None:
        if self.root is None:
            return None
        try:
            meta = json.loads((self.root / f"{key}.json").read_text())
            data = (self.root / meta["file"]).read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError):
            return None
        return arr if arr.ndim == 2 and arr.shape[0] == n else None

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put(self, key: str, emb: np.ndarray) -> bool:
        """Store ``emb`` under ``key``; False (and nothing half-written) when the cache folder is not writable."""
        if self.root is None:
            return False
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        name = f"{key}-{sha[:16]}.npy"
        meta = {"file": name, "size": len(data), "sha256": sha, "shape": list(emb.shape)}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._write(self.root / name, data)
            self._write(self.root / f"{key}.json", (json.dumps(meta) + "\n").encode())
        except OSError:
            return False
        return True


class TopK:
    """Running per-concept top-K over caption units, via faiss exact inner-product search.

    Captions are identified by their global position in the input stream (int64), so the state is two
    ``queries × K`` arrays (float32 scores, int64 positions) however long the stream. Queries are searched in
    blocks to bound faiss's temporary result arrays. Ties are broken by position (earlier captions win), so
    the result is deterministic.
    """

    def __init__(self, queries: np.ndarray, k: int, block: int = 4096):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.k, self.block = k, block
        n = self.q.shape[0]
        self.scores = np.full((n, 0), -np.inf, dtype=np.float32)
        self.pos = np.empty((n, 0), dtype=np.int64)

    def add(self, emb: np.ndarray, start: int) -> None:
        """Offer captions ``start … start + len(emb) - 1`` (their normalized embeddings)."""
        import faiss

        n = self.q.shape[0]
        if len(emb) == 0 or n == 0:
            return
        x = np.ascontiguousarray(emb, dtype=np.float32)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        kk = min(self.k, x.shape[0])
        width = min(self.k, self.scores.shape[1] + kk)
        new_s = np.empty((n, width), dtype=np.float32)
        new_p = np.empty((n, width), dtype=np.int64)
        for b in range(0, n, self.block):
            d, i = index.search(self.q[b:b + self.block], kk)
            cand_s = np.concatenate([self.scores[b:b + self.block], d], axis=1)
            cand_p = np.concatenate([self.pos[b:b + self.block], i.astype(np.int64) + start], axis=1)
            keep = np.lexsort((cand_p, -cand_s), axis=1)[:, :width]  # score desc, then position asc
            new_s[b:b + self.block] = np.take_along_axis(cand_s, keep, 1)
            new_p[b:b + self.block] = np.take_along_axis(cand_p, keep, 1)
        self.scores, self.pos = new_s, new_p

    def results(self, min_score: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays (query index, caption position, score) of every kept hit, best first within each query."""
        keep = np.isfinite(self.scores)
        if min_score is not None:
            keep &= self.scores >= min_score
        q = np.broadcast_to(np.arange(self.scores.shape[0])[:, None], self.scores.shape)
        return q[keep], self.pos[keep], self.scores[keep].astype(np.float64)
