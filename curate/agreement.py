"""Curation that looks at the images: image–text agreement scores and image-verified concept senses (recipe
section ``media.agreement``; stage ``agreement``, after image dedup and before the re-balance).

A **scorer** (:func:`tether.scorers.load_scorer`: a tether model folder, an exported transformers folder, or any
Hugging Face CLIP / SigLIP model by id or path) embeds every stored image that is still alive, once per distinct
image (rows sharing the image bytes share its embedding), and each caption:

* **agreement** = cosine(image, caption), stored per uid in ``agreement_scores`` (a content-keyed cache: uid,
  image sha256, scorer fingerprint). Rules: ``min_score`` (absolute, DataComp's CLIP-score filter) and
  ``bottom_percentile`` (the lowest p % of each source, DataComp's per-pool percentile filter);
* **image-verified senses** (``senses``): for each (uid, matched concept) whose matched word has other WordNet noun
  senses — in the bank or not — the image is scored against a prompt per sense (``templates`` over the sense's
  lemma, name and gloss; the prompts of one sense averaged, CLIP's prompt ensembling). The match is refuted when
  another sense beats the matched one by more than ``margin``. A second, independent signal
  (``prototype_min``): the cosine of the image with its concept's **image prototype** — the mean image embedding
  of the concept's other samples here (leave-one-out), freeze-align's concept prototypes — below the bound
  refutes the match too. Every checked pair is a ``sense_checks`` row with both scores and its verdict.

Each candidate gets one ``decisions(stage='agreement')`` row: dropped when an agreement rule fails or when every
concept it was selected for is refuted (the reason names the winning sense and both scores); a refuted pair of a
sample that keeps other concepts no longer counts for that concept in the re-balance and leaves its
``concept_ids`` in the shards. The image embeddings are cached chunk by chunk (``image_embeddings``, ``.npy``
files under ``media/embeddings``), the agreement scores chunk by chunk, so a killed stage resumes; with
``distributor: {kind: ray}`` the images are embedded on Ray actors that load the scorer once each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, model_validator

from curate.catalog import Catalog, recorded_wordnet_dir
from curate.download import SUCCESS
from curate.imagededup import _insert, _missing, cached_embeddings, fill_embedding_cache
from curate.judge import record_table
from curate.plan import Context, Step
from curate.stages import Begin, Stage
from tether.recipe import RecipeError, Strict
from tether.scorers import ScorerKind

STAGE = Stage.AGREEMENT
IGNORED = (STAGE, *STAGE.later())  # their verdicts do not limit this stage's candidates
DEFAULT_TEMPLATES = ("a photo of a {lemma}, {gloss}.", "a photo of a {name}.")
PLACEHOLDERS = ("{lemma}", "{name}", "{gloss}")
NULL_SENSE = "(none)"  # the id of the null rival (``senses.null_prompt``)


class SenseConfig(Strict):
    """``media.agreement.senses``: check each matched concept against the matched word's other noun senses."""

    enabled: bool = False
    margin: float = Field(0.0, ge=-2, le=2)  # refuted when another sense's score - the matched one's > margin
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1, max_length=64)
    max_senses: int = Field(8, ge=1, le=64)  # the word's most frequent other noun senses considered
    prototype_min: Optional[float] = Field(None, ge=-1, le=1)  # refute when cos(image, concept prototype) < this
    prototype_min_samples: int = Field(5, ge=2)  # a concept with fewer other samples has no prototype
    wordnet_dir: Optional[str] = None  # None: the build's concepts.wordnet_dir (or where tether always looks)
    # a rival for every checked match, the word's senses aside (e.g. "a photo."): the matched sense must beat a
    # picture of nothing in particular too — catches words that are not nouns here; also checks unambiguous words
    null_prompt: Optional[str] = Field(None, min_length=1, max_length=500)

    @model_validator(mode="after")
    def _check_templates(self):
        for t in self.templates:
            if not any(p in t for p in PLACEHOLDERS):
                raise ValueError(f"template {t!r} names none of {', '.join(PLACEHOLDERS)}")
            try:
                t.format(lemma="x", name="x", gloss="x")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"template {t!r} is not a format string over {', '.join(PLACEHOLDERS)} ({e})")
        return self


class AgreementConfig(Strict):
    """``media.agreement``: image–text agreement filter and image-verified senses (off by default)."""

    enabled: bool = False
    scorer: Optional[str] = None  # tether model folder, transformers CLIP/SigLIP folder or hub id
    kind: ScorerKind = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = Field(32, ge=1, le=4096)
    chunk: int = Field(1000, ge=1, le=1_000_000)
    min_score: Optional[float] = Field(None, ge=-1, le=1)
    bottom_percentile: Optional[float] = Field(None, gt=0, lt=100)
    senses: SenseConfig = SenseConfig()

    @model_validator(mode="after")
    def _need_scorer(self):
        if self.enabled and not self.scorer:
            raise ValueError("enabled: true needs a scorer (a model folder or a hub id)")
        return self


@dataclass
class AgreementResult:
    candidates: int = 0
    images: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # rule → samples
    pairs_checked: int = 0
    pairs_refuted: int = 0

    @property
    def rows(self) -> int:
        return self.candidates

    def words(self) -> str:
        how = ", ".join(f"{k} {v:,}" for k, v in self.dropped.items() if v)
        s = (f"{self.candidates:,} samples ({self.images:,} images) scored, "
             f"{sum(self.dropped.values()):,} dropped" + (f" ({how})" if how else ""))
        if self.pairs_checked:
            s += f"; senses: {self.pairs_refuted:,} of {self.pairs_checked:,} checked matches refuted"
        return s

    def summary(self) -> str:
        return f"agreement: done \N{EM DASH} {self.words()}"


# --------------------------------------------------------------------------------------------------------
# pure functions (embeddings in, verdicts out)
# --------------------------------------------------------------------------------------------------------
def sense_prompts(templates, lemma: str, name: str, gloss: str) -> list[str]:
    """The prompts of one sense (``{lemma}`` the matched word, ``{name}`` the sense's name, ``{gloss}`` its gloss)."""
    gloss = (gloss or "").split(";")[0].strip() or name
    return [t.format(lemma=lemma, name=name, gloss=gloss) for t in templates]


def ensemble(text_emb: np.ndarray, groups: list[int]) -> np.ndarray:
    """Mean of consecutive groups of normalised prompt embeddings (``groups`` = sizes), renormalised."""
    out, s = [], 0
    for g in groups:
        v = text_emb[s:s + g].mean(0)
        out.append(v / max(float(np.linalg.norm(v)), 1e-12))
        s += g
    return np.stack(out).astype(np.float32) if out else np.zeros((0, text_emb.shape[1]), np.float32)


def percentile_bounds(scores: np.ndarray, groups: list, pct: float) -> dict:
    """Per group: the score below which a sample is in the group's bottom ``pct`` % (numpy's linear percentile)."""
    out: dict = {}
    g = np.asarray(groups, dtype=object)
    for key in dict.fromkeys(groups):
        out[key] = float(np.percentile(scores[g == key], pct))
    return out


def leave_one_out(emb: np.ndarray, pair_row: np.ndarray, pair_concept: np.ndarray, min_samples: int
                  ) -> np.ndarray:
    """Per (row, concept) pair: cosine of the row's image with the mean of the OTHER images of that concept
    (NaN when the concept has fewer than ``min_samples`` others). ``emb`` normalised ``[n, d]``."""
    out = np.full(len(pair_row), np.nan, np.float64)
    if not len(pair_row):
        return out
    concepts, inv = np.unique(pair_concept, return_inverse=True)
    sums = np.zeros((len(concepts), emb.shape[1]), np.float64)
    np.add.at(sums, inv, emb[pair_row])
    counts = np.bincount(inv, minlength=len(concepts))
    others = sums[inv] - emb[pair_row]
    n_other = counts[inv] - 1
    norm = np.linalg.norm(others, axis=1)
    ok = (n_other >= min_samples) & (norm > 1e-12)
    out[ok] = np.einsum("ij,ij->i", emb[pair_row[ok]], others[ok]) / norm[ok]
    return out


# --------------------------------------------------------------------------------------------------------
# catalog stage
# --------------------------------------------------------------------------------------------------------
def candidates(cat: Catalog) -> list[tuple]:
    """(uid, sha256, format, store, shard, key, source-of-image, caption, concept_ids, pool source) of every
    alive stored image, in uid order."""
    return cat.execute(
        """SELECT d.uid, d.sha256, d.format, d.store, d.shard, d.key, coalesce(m.path, m.url), m.caption,
                  m.concept_ids, m.source
           FROM downloads d JOIN media_rows m USING (uid)
           WHERE d.status = $ok
             AND NOT EXISTS (SELECT 1 FROM decisions x
                             WHERE x.uid = d.uid AND NOT x.kept AND NOT list_contains($ignore, x.stage))
           ORDER BY d.uid""", {"ok": SUCCESS, "ignore": [s.value for s in IGNORED]}).fetchall()


def candidates_digest(cat: Catalog) -> str:
    """Identity of this stage's input (rows, image bytes, captions, concepts): part of its stage params."""
    import hashlib

    h = hashlib.sha1()
    for uid, sha, *_, caption, concepts, _src in candidates(cat):
        h.update(f"{uid}\t{sha}\t{caption}\t{','.join(concepts or [])}\n".encode())
    return h.hexdigest()[:16]


def _image_groups(rows: list[tuple]) -> tuple[list[int], list[int]]:
    """One representative row per distinct image (same sha256; else same path/url): (reps, rep index per row)."""
    rep_of: dict = {}
    reps: list[int] = []
    group: list[int] = []
    for i, r in enumerate(rows):
        key = ("sha", r[1]) if r[1] else (("src", r[6]) if r[6] is not None else ("row", i))
        if key not in rep_of:
            rep_of[key] = len(reps)
            reps.append(i)
        group.append(rep_of[key])
    return reps, group


def embed_images_with(scorer, blobs: list[bytes], batch_size: int) -> np.ndarray:
    """Normalised scorer embeddings of encoded images: one chunk, here or in a Ray actor."""
    import io

    from PIL import Image

    return scorer.encode_image([Image.open(io.BytesIO(b)).convert("RGB") for b in blobs],
                               batch_size=batch_size).astype(np.float32)


def plan_senses(items: list[tuple[str, str]], bank: dict[str, tuple[str, str]], wn, cfg: SenseConfig
                ) -> tuple[list[int], list[tuple[str, list[str]]], list[tuple[int, list[int]]]]:
    """For (word, concept_id) items: which are checkable (the word has other noun senses with a name and gloss —
    from ``bank`` {concept_id: (name, gloss)} or WordNet), the distinct senses to embed (id, prompts), and per
    checkable item its own sense's index and its rivals' indexes in that list. Returns (checkable item indexes,
    senses, own/rivals)."""
    sense_index: dict[tuple[str, str], int] = {}
    senses: list[tuple[str, list[str]]] = []

    def sense(wnid: str, word: str) -> int | None:
        key = (wnid, word)
        if key not in sense_index:
            if wnid in bank:
                name, gloss = bank[wnid]
            elif wn is not None and wnid in wn:
                syn = wn.synset(wnid)
                name, gloss = syn.lemmas[0].replace("_", " "), syn.gloss
            else:
                return None
            sense_index[key] = len(senses)
            senses.append((wnid, sense_prompts(cfg.templates, word, name or word, gloss or "")))
        return sense_index[key]

    null = None
    if cfg.null_prompt:
        null = len(senses)
        senses.append((NULL_SENSE, [cfg.null_prompt]))
    keep, own_rivals = [], []
    for k, (word, cid) in enumerate(items):
        if not word or wn is None:
            continue
        others = [w for w in wn.senses.get(word.replace("_", " ").lower(), []) if w != cid][:cfg.max_senses]
        if not others and null is None:
            continue
        mine = sense(cid, word)
        theirs = [j for j in (sense(w, word) for w in others) if j is not None] + ([null] if null is not None else [])
        if mine is None or not theirs:
            continue
        keep.append(k)
        own_rivals.append((mine, theirs))
    return keep, senses, own_rivals


def score_senses(img: np.ndarray, senses: list[tuple[str, list[str]]], own_rivals: list[tuple[int, list[int]]],
                 encode_text) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per checked item (``img[k]`` its normalised image embedding): the cosine with its own sense's prompt
    ensemble, the best rival's cosine and that rival's id. ``encode_text``: the scorer's text side."""
    prompts = [p for _, ps in senses for p in ps]
    sense_emb = ensemble(np.asarray(encode_text(prompts), np.float32), [len(ps) for _, ps in senses]) \
        if prompts else np.zeros((0, img.shape[1] if img.ndim == 2 else 1), np.float32)
    own = np.empty(len(own_rivals))
    best = np.empty(len(own_rivals))
    best_id = np.empty(len(own_rivals), dtype=object)
    for k, (mine, theirs) in enumerate(own_rivals):
        v = img[k]
        own[k] = float(v @ sense_emb[mine])
        sims = sense_emb[theirs] @ v
        j = int(np.argmax(sims))
        best[k], best_id[k] = float(sims[j]), senses[theirs[j]][0]
    return own, best, best_id


def _lexical_words(cat: Catalog) -> dict[tuple[str, str], str]:
    """(uid, concept_id) → the lemma its lexical match was made through (the matched form when unknown)."""
    out: dict[tuple[str, str], str] = {}
    for uid, cid, word in cat.execute(
            """SELECT m.uid, m.concept_id, coalesce(f.lemma, m.span) FROM matches m
               LEFT JOIN surface_forms f ON f.form = m.span AND f.concept_id = m.concept_id
               WHERE m.method = 'lexical' AND m.uid IN (SELECT uid FROM media_rows)
               ORDER BY m.uid, m.concept_id, f.sense_rank NULLS LAST""").fetchall():
        out.setdefault((uid, cid), word)
    return out


def _clear(cat: Catalog) -> None:
    """This stage's verdicts (decisions and sense checks), not its bookkeeping nor its content-keyed caches."""
    cat.clear_decisions(STAGE)
    cat.execute("DELETE FROM sense_checks")


def _model_key(scorer) -> str:
    return f"scorer:{scorer.fingerprint}"


def run_agreement(cat: Catalog, cfg: AgreementConfig, build_dir: str | Path, encode_format: str = "jpg",
                  scorer=None, progress: bool = True, distributor=None) -> AgreementResult:
    """Score every alive stored image and caption, check the matched senses, and write this stage's decisions
    and ``sense_checks`` (see the module doc); replaces its earlier verdicts."""
    import pyarrow as pa

    from tether.distribute import remote_embedding
    from tether.progress import progress as tqdm
    from tether.scorers import load_scorer

    rows = candidates(cat)
    res = AgreementResult(candidates=len(rows))
    if not cfg.enabled or not rows:
        with cat.transaction():
            _clear(cat)
        return res
    if scorer is None:
        scorer = load_scorer(cfg.scorer, cfg.kind, cfg.device, cfg.dtype, key="media.agreement.scorer")
    model = _model_key(scorer)
    emb_dir = Path(build_dir) / "media" / "embeddings"
    reps, group = _image_groups(rows)
    rep_rows = [rows[i] for i in reps]
    res.images = len(reps)
    remote = None
    if remote_embedding(distributor):
        remote = (distributor, load_scorer, {"name": cfg.scorer, "kind": cfg.kind, "device": cfg.device,
                                      "dtype": cfg.dtype})
    fill_embedding_cache(cat, rep_rows, model, emb_dir, embed_images_with, (cfg.batch_size,), encoder=scorer,
                         remote=remote, encode_format=encode_format, chunk=cfg.chunk, progress=progress,
                         desc="agreement: embed images")
    dim = int(np.asarray(scorer.encode_text(["a photo"])).shape[1])
    g = np.asarray(group, np.int64)

    # agreement scores, chunk by chunk (committed: a killed run resumes)
    todo = _missing(cat, [r[:2] + (i,) for i, r in enumerate(rows)], "agreement_scores", "AND t.model = ?", [model])
    bar = tqdm(total=len(todo), desc="agreement: captions", unit="row", disable=not progress)
    for s in range(0, len(todo), cfg.chunk):
        part = todo[s:s + cfg.chunk]
        idx = [p[2] for p in part]
        img = cached_embeddings(cat, [rep_rows[g[i]] for i in idx], model, emb_dir, dim)
        txt = np.asarray(scorer.encode_text([rows[i][7] or "" for i in idx], batch_size=max(cfg.batch_size, 64)),
                         np.float32)
        _insert(cat, "agreement_scores", {"uid": [p[0] for p in part], "sha256": [p[1] for p in part],
                                          "model": [model] * len(part),
                                          "score": np.einsum("ij,ij->i", img, txt).astype(float).tolist()})
        bar.update(len(part))
    bar.close()
    got = dict(cat.execute("SELECT uid, score FROM agreement_scores WHERE model = ?", [model]).fetchall())
    score = np.array([got[r[0]] for r in rows], np.float64)

    # the rules
    reason: list[str | None] = [None] * len(rows)
    if cfg.min_score is not None:
        for i in np.flatnonzero(score < cfg.min_score):
            reason[i] = f"image-text agreement {score[i]:.3f} < min_score {cfg.min_score:.3f}"
    res.dropped["min_score"] = sum(r is not None for r in reason)
    if cfg.bottom_percentile is not None:
        src = [r[9] or "" for r in rows]
        bound = percentile_bounds(score, src, cfg.bottom_percentile)
        n = 0
        for i in range(len(rows)):
            if reason[i] is None and score[i] < bound[src[i]]:
                reason[i] = (f"image-text agreement {score[i]:.3f} in the bottom {cfg.bottom_percentile:g} % of "
                             f"source {src[i] or '(none)'} (< {bound[src[i]]:.3f})")
                n += 1
        res.dropped["bottom_percentile"] = n
    checks = None
    if cfg.senses.enabled:
        checks = _check_senses(cat, cfg.senses, rows, rep_rows, g, scorer, model, emb_dir, dim, progress)
        res.pairs_checked, res.pairs_refuted = len(checks["uid"]), int((~checks["kept"]).sum())
        refuted: dict[str, list[tuple]] = {}
        for k in np.flatnonzero(~checks["kept"]):
            refuted.setdefault(checks["uid"][k], []).append(checks["reason"][k])
        n = 0
        for i, r in enumerate(rows):
            gone = refuted.get(r[0], [])
            if reason[i] is None and gone and len(gone) >= len(r[8] or []):
                reason[i] = "image sense check: " + "; ".join(gone)
                n += 1
        res.dropped["senses"] = n
    kept = [x is None for x in reason]
    # refuted matches per row, counted once (not a scan of every check per row)
    n_refuted = np.bincount(checks["uid_index"][~checks["kept"]], minlength=len(rows)) if checks is not None \
        else np.zeros(len(rows), np.int64)
    notes = []
    for i, r in enumerate(rows):
        note = reason[i] or f"image-text agreement {score[i]:.3f}"
        if reason[i] is None and n_refuted[i]:
            note += f"; image sense check refuted {n_refuted[i]} of {len(r[8] or [])} concepts"
        notes.append(note)
    tbl = pa.table({"uid": [r[0] for r in rows], "kept": kept, "reason": notes})
    with cat.transaction():
        _clear(cat)
        record_table(cat, STAGE, tbl)
        if checks is not None and len(checks["uid"]):
            sc = pa.table({k: checks[k].tolist() for k in ("uid", "concept_id", "word", "own", "best_other",
                                                            "other_id", "prototype", "kept", "reason")})
            cat.insert_arrow("sense_checks", sc, "uid, concept_id, word, own, best_other, other_id, prototype, kept, "
                                                 "reason")
    return res


def _check_senses(cat, cfg: SenseConfig, rows, rep_rows, g, scorer, model, emb_dir, dim, progress) -> dict:
    """The ``sense_checks`` columns (numpy arrays) of every checkable (uid, concept) pair of ``rows``."""
    wn = None
    try:
        from curate.wordnet import WordNet

        wn = WordNet.load(cfg.wordnet_dir or recorded_wordnet_dir(cat))
    except RecipeError as e:
        raise RecipeError(f"media.agreement.senses needs WordNet: {e}") from None
    lex = _lexical_words(cat)
    bank = {c: (n, g) for c, n, g in cat.execute("SELECT concept_id, name, gloss FROM concepts").fetchall()}
    all_pairs = [(i, cid, lex.get((r[0], cid))) for i, r in enumerate(rows) for cid in (r[8] or [])]
    keep, senses, own_rivals = plan_senses([(w, c) for _, c, w in all_pairs], bank, wn, cfg)
    pairs = [all_pairs[k] for k in keep]
    cols = ("uid", "concept_id", "word", "own", "best_other", "other_id", "prototype", "kept", "reason", "uid_index")
    if not pairs:
        return {c: np.zeros(0, dtype=object if c in ("uid", "concept_id", "word", "other_id", "reason") else float)
                for c in cols} | {"kept": np.zeros(0, bool), "uid_index": np.zeros(0, np.int64)}
    row_idx = np.array([p[0] for p in pairs], np.int64)
    uniq_rows, inv = np.unique(row_idx, return_inverse=True)
    img = np.zeros((len(uniq_rows), dim), np.float32)
    step = 4096
    for s in range(0, len(uniq_rows), step):
        img[s:s + step] = cached_embeddings(cat, [rep_rows[g[i]] for i in uniq_rows[s:s + step]], model, emb_dir, dim)
    own, best, best_id = score_senses(img[inv], senses, own_rivals,
                                      lambda t: scorer.encode_text(t, batch_size=256))
    concept = np.array([p[1] for p in pairs], dtype=object)
    proto = leave_one_out(img, inv, concept.astype(str), cfg.prototype_min_samples)
    kept = np.ones(len(pairs), bool)
    reason = np.empty(len(pairs), dtype=object)
    names = {c: n for c, (n, _) in bank.items()}
    for k, (i, cid, word) in enumerate(pairs):
        if best[k] - own[k] > cfg.margin:
            kept[k] = False
            if best_id[k] == NULL_SENSE:
                reason[k] = (f"'{word}': {names.get(cid, cid)} ({cid}) {own[k]:.3f} not seen, the null prompt "
                             f"{cfg.null_prompt!r} scores {best[k]:.3f}")
            else:
                other = names.get(best_id[k]) or (wn.synset(best_id[k]).lemmas[0].replace("_", " ")
                                                 if best_id[k] in wn else best_id[k])
                reason[k] = (f"'{word}' looks like {other} ({best_id[k]}) {best[k]:.3f}, not {names.get(cid, cid)} "
                             f"({cid}) {own[k]:.3f}")
        elif cfg.prototype_min is not None and not math.isnan(proto[k]) and proto[k] < cfg.prototype_min:
            kept[k] = False
            reason[k] = (f"'{word}': image far from the {names.get(cid, cid)} ({cid}) prototype "
                         f"({proto[k]:.3f} < {cfg.prototype_min:.3f})")
        else:
            reason[k] = f"'{word}' confirmed: {own[k]:.3f} vs best other sense {best[k]:.3f}"
    return {"uid": np.array([rows[p[0]][0] for p in pairs], dtype=object), "concept_id": concept,
            "word": np.array([p[2] for p in pairs], dtype=object), "own": own, "best_other": best,
            "other_id": best_id, "prototype": np.where(np.isnan(proto), None, proto).astype(object),
            "kept": kept, "reason": reason, "uid_index": row_idx}


def refuted_pairs_sql() -> str:
    """SQL of the (uid, concept_id) pairs the image sense check refuted: the re-balance and the shards leave them out."""
    return "SELECT uid, concept_id FROM sense_checks WHERE NOT kept"


def rule_counts(cat: Catalog) -> dict[str, int]:
    """Samples this stage's decisions kept and removed, per rule (``kept``, ``min_score``, ``bottom_percentile``,
    ``senses``) — the one classification the media report and the data card share."""
    return dict(cat.execute(
        """SELECT CASE WHEN kept THEN 'kept' WHEN reason LIKE 'image sense check%' THEN 'senses'
                       WHEN reason LIKE '%bottom%' THEN 'bottom_percentile' ELSE 'min_score' END, count(*)
           FROM decisions WHERE stage = ? GROUP BY 1 ORDER BY 1""", [STAGE]).fetchall())


def card_lines(cat: Catalog, top: int = 10) -> list[str]:
    """The data card's section on the image checks: samples each rule removed, the concept matches the sense check
    refuted and the words it refuted most (nothing when the stage did not score anything)."""
    counts = rule_counts(cat)
    if not counts:
        return []
    scored = sum(counts.values())
    lines = ["", "## Image checks (media.agreement)", "",
             f"{scored:,} samples scored against their images.", "", "| rule | samples removed |", "|---|---:|"]
    lines += [f"| {rule} | {counts.get(rule, 0):,} |" for rule in ("min_score", "bottom_percentile", "senses")]
    n_checked, n_refuted = cat.one("SELECT count(*), count(*) FILTER (WHERE NOT kept) FROM sense_checks")
    if n_checked:
        lines += ["", f"Image sense check: {n_refuted:,} of {n_checked:,} checked concept matches refuted "
                      "(a refuted match no longer counts for its concept).", "",
                  "| word | concept | refuted | checked |", "|---|---|---:|---:|"]
        lines += [f"| {w} | {c} | {r:,} | {n:,} |" for w, c, r, n in cat.execute(
            """SELECT word, concept_id, count(*) FILTER (WHERE NOT kept) AS r, count(*) FROM sense_checks
               GROUP BY 1, 2 HAVING r > 0 ORDER BY 3 DESC, 1, 2 LIMIT ?""", [top]).fetchall()]
    return lines


def scorer_digest(name: str | None) -> str | None:
    """The exact bytes of a local scorer folder's config and weights (None for a hub id): a retrained model at the
    same path reruns the agreement stage."""
    from tether.encoders import file_fingerprint
    from tether.scorers import model_files

    files = model_files(Path(name).expanduser()) if name else []
    return file_fingerprint(files) if files else None


def agreement_step(cfg: AgreementConfig, encode_format: str = "jpg") -> Step:
    """The ``agreement`` step: its key holds its candidates' digest and the scorer's files; turned off, it only
    clears what it wrote before (nothing to redo when its input changes)."""

    def inputs(ctx: Context) -> dict:
        return {"input": candidates_digest(ctx.cat), "scorer_files": scorer_digest(cfg.scorer)} if cfg.enabled else {}

    def run(ctx: Context, how: Begin) -> AgreementResult:
        return run_agreement(ctx.cat, cfg, ctx.build_dir, encode_format, scorer=ctx.scorer, progress=ctx.progress,
                             distributor=ctx.distributor)

    return Step(STAGE, "media.agreement", cfg.model_dump() if cfg.enabled else {"enabled": False}, run,
                inputs=inputs, models=(("media.agreement.scorer", cfg.scorer, ("config.json",)),) if cfg.enabled else (),
                summary=lambda r: r.words() if cfg.enabled else "off")
