"""Caption→concept matching stage: ``run_match(cat, cfg)`` fills the catalog's ``matches`` table.

Reads ``SELECT uid, caption FROM alive`` (captions that are NULL or blank are skipped: they match nothing) in
``uid`` order and writes ``matches(uid, concept_id, method, score, span)``:

* ``method='lexical'``: score 1.0, span = the surface form that matched (``dogs``); see :mod:`.lexical`;
* ``method='semantic'``: score = cosine similarity, span NULL; see :mod:`.semantic`.

Resume: lexical matching commits unit by unit (``progress(stage, unit)`` in the same transaction as the
unit's rows) and skips finished units on rerun; semantic matching caches each unit's caption embeddings on
disk and writes all its rows in one transaction at the end; the concept-prompt embeddings are cached across builds
(:class:`.semantic.PromptCache`). With no caption to match, the stage is done at once and loads no encoder.
A finished stage whose parameters (config, concept bank, input) are unchanged is not redone; changed parameters
clear that method's rows and start over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.catalog import Catalog
from tether.digest import json_digest
from tether.distribute import DistributorConfig, embed_units, remote_embedding, run_units
from curate.stages import Begin, Stage
from curate.match.lexical import (REASONS, FormPlan, LexicalConfig, LexicalMatcher, RuleMatcher, choose_senses,
                                  drop_rare_senses, naive_match, plan_forms)
from curate.match.semantic import (EmbeddingCache, PromptCache, SemanticConfig, TopK, concept_prompt,
                                   encode_sorted)
from tether.recipe import RecipeError, Strict, resolve_path

__all__ = ["MatchConfig", "LexicalConfig", "SemanticConfig", "run_match", "run_lexical", "run_semantic",
           "LexicalMatcher", "RuleMatcher", "choose_senses", "drop_rare_senses", "naive_match", "load_form_concepts",
           "lexical_forms", "lexical_plan", "iter_units"]

INPUT_SQL = ("SELECT uid, caption FROM alive WHERE caption IS NOT NULL AND length(trim(caption)) > 0 "
             "ORDER BY uid, caption")


class MatchConfig(Strict):
    """Recipe section ``match``."""

    mode: Literal["lexical", "semantic", "both"] = "lexical"
    lexical: LexicalConfig = Field(default_factory=LexicalConfig)
    semantic: SemanticConfig = Field(default_factory=SemanticConfig)


# ------------------------------------------------------------------------------------------ plumbing
def iter_units(cat: Catalog, unit_rows: int) -> Iterator[tuple[int, list[str], list[str]]]:
    """(unit index, uids, captions) over the input in fixed-size units, streamed (never all in memory).

    Reads on a separate cursor so the caller may commit on ``cat`` between units.
    """
    cur = cat.con.cursor()
    try:
        reader = cur.sql(INPUT_SQL).to_arrow_reader(min(unit_rows, 100_000))
        pending: list[pa.RecordBatch] = []
        n = 0
        unit = 0
        for batch in reader:
            pending.append(batch)
            n += batch.num_rows
            while n >= unit_rows:
                tbl = pa.Table.from_batches(pending)
                head, rest = tbl.slice(0, unit_rows), tbl.slice(unit_rows)
                yield unit, head.column("uid").to_pylist(), head.column("caption").to_pylist()
                unit += 1
                pending, n = rest.to_batches(), rest.num_rows
        if n:
            tbl = pa.Table.from_batches(pending)
            yield unit, tbl.column("uid").to_pylist(), tbl.column("caption").to_pylist()
    finally:
        cur.close()


def _bank_fingerprint(cat: Catalog) -> str:
    """Identity of the concept bank + surface forms, so that a rebuilt bank invalidates old matches."""
    row = cat.execute(
        "SELECT (SELECT count(*) FROM concepts), (SELECT coalesce(sum(hash(concept_id || coalesce(gloss, ''))), 0) "
        "FROM concepts), (SELECT count(*) FROM surface_forms), "
        "(SELECT coalesce(sum(hash(form || '|' || concept_id || '|' || coalesce(sense_rank, -1) || '|' "
        "|| coalesce(lemma, ''))), 0) "
        "FROM surface_forms)").fetchone()
    return json_digest([str(v) for v in row])


def _input(cat: Catalog) -> tuple[str, int]:
    """(identity, size) of the captions to match, from ONE scan of ``alive`` (at 10^8 rows each scan costs
    minutes: the stage reads its input once for this and once to match it)."""
    row = cat.execute(f"SELECT count(*), coalesce(sum(hash(uid || caption)), 0) FROM ({INPUT_SQL})").fetchone()
    return json_digest([str(v) for v in row]), int(row[0])


def _begin(cat: Catalog, stage: Stage, params: dict) -> bool:
    """True when ``stage`` is already done with ``params``; otherwise it is running with ``params`` (resumed with
    its committed units, or started fresh with its old matches cleared): :meth:`Catalog.begin_stage`."""
    return cat.begin_stage(stage, params, resumable=True) is Begin.SKIP


def _count(cat: Catalog, method: str) -> int:
    return int(cat.scalar("SELECT count(*) FROM matches WHERE method = ?", [method]) or 0)


def _form_rows(cat: Catalog) -> list[tuple]:
    rows = cat.execute("SELECT f.form, f.concept_id, f.sense_rank, f.lemma, coalesce(c.imagenet1k, false) "
                       "FROM surface_forms f JOIN concepts c USING (concept_id)").fetchall()
    if not rows:
        raise RecipeError("match: the catalog has no concept surface forms; build the concept bank first")
    return rows


def load_form_concepts(cat: Catalog, senses: str = "first") -> dict[str, tuple[str, ...]]:
    """form → concept ids from the catalog's ``surface_forms`` under the ``senses`` policy (no WordNet filters)."""
    return choose_senses(_form_rows(cat), senses)  # type: ignore[arg-type]


def lexical_plan(cat: Catalog, cfg: LexicalConfig) -> FormPlan:
    """The catalog's bank under ``match.lexical``'s form-level rules (:func:`.lexical.plan_forms`)."""
    return plan_forms(_form_rows(cat), cfg)


def lexical_forms(cat: Catalog, cfg: LexicalConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, list[str]]]:
    """form → concept ids as ``match.lexical`` matches them: rare senses dropped (``min_sense_share``,
    ``uncounted_senses``), plural readings (``own_word_first``), the ``senses`` policy, adjective-dominant forms
    skipped (``skip_adjectives``). Also returns what the WordNet filters removed (``dropped_rare_senses``:
    ``form:concept_id``; ``skipped_adjective_forms``; the other rules' lists when they are on)."""
    plan = lexical_plan(cat, cfg)
    return plan.forms, plan.summary


# ------------------------------------------------------------------------------------------ stages
class LexicalWorker:
    """``match.lexical`` over one unit of captions, built once per process (:mod:`tether.distribute`): the
    automaton, compounds, taggers of :class:`RuleMatcher`. ``(uids, captions)`` → the unit's ``matches`` rows,
    its ``lexical_removed`` rows (Arrow tables) and its caption count."""

    def __init__(self, plan: FormPlan, cfg: LexicalConfig):
        self.rules = RuleMatcher(plan, cfg)
        m = self.rules.matcher
        self.concepts, self.forms = pa.array(m.concept_ids, pa.string()), pa.array(m.forms, pa.string())
        self.reasons = pa.array(REASONS, pa.string())

    def __call__(self, uids: list[str], caps: list[str]) -> tuple[pa.Table, pa.Table, int]:
        (ci, ki, fi), (gi, gk, gf, gr) = self.rules(caps)
        uid_arr = pa.array(uids, pa.string())
        tbl = pa.table({"uid": uid_arr.take(ci), "concept_id": self.concepts.take(ki),
                        "method": pa.array(["lexical"] * len(ci), pa.string()),
                        "score": pa.array(np.ones(len(ci)), pa.float64()), "span": self.forms.take(fi)})
        gone = pa.table({"uid": uid_arr.take(gi), "concept_id": self.concepts.take(gk),
                         "span": self.forms.take(gf), "reason": self.reasons.take(gr)})
        return tbl, gone, len(uids)


def run_lexical(cat: Catalog, cfg: LexicalConfig, progress: bool = True,
                distributor: DistributorConfig | None = None, threads: int | None = None) -> int:
    """Lexical matching, resumable unit by unit; returns the number of ``lexical`` rows in ``matches``.

    ``distributor`` says where the units are matched (:mod:`tether.distribute`; default: this process); the
    result is the same rows in the same order either way."""
    from tether.progress import progress as tqdm

    stage = Stage.MATCH_LEXICAL
    plan = lexical_plan(cat, cfg)
    removed = plan.summary
    skipped, dropped = removed["skipped_adjective_forms"], removed["dropped_rare_senses"]
    # what the WordNet filters removed is part of the stage parameters: `curate inspect` shows it, a change
    # reruns the stage
    fingerprint, n_input = _input(cat)
    params = {"cfg": cfg.model_dump(exclude={"wordnet_dir"}), "bank": _bank_fingerprint(cat),
              "input": fingerprint, **removed}
    if _begin(cat, stage, params):
        return _count(cat, "lexical")
    if n_input == 0:  # no caption to match: no matcher to build, no lemmatizer to load
        cat.mark_done(stage, 0)
        return 0
    if skipped and progress:
        print(f"match lexical: {len(skipped)} adjective-dominant forms not matched "
              f"(e.g. {', '.join(skipped[:8])}); match.lexical.skip_adjectives=false keeps them")
    if dropped and progress:
        print(f"match lexical: {len(dropped)} rare word senses not matched (e.g. {', '.join(dropped[:4])}); "
              f"match.lexical.min_sense_share=0 keeps them")
    done = cat.done_units(stage)
    # (a fresh start cleared the removed rows of an earlier run with its matches: curate.stages.OWNS)
    bar = tqdm(total=n_input, desc="match lexical", unit="caption", disable=not progress)

    def todo():  # the units not committed yet; finished ones only advance the bar
        for unit, uids, caps in iter_units(cat, cfg.unit_rows):
            if str(unit) in done:
                bar.update(len(uids))
            else:
                yield str(unit), (uids, caps)

    # matched in this process or in workers (tether.distribute); committed here, in unit order, one unit a time
    pending = -(-n_input // cfg.unit_rows) - len(done)
    for unit, (tbl, gone, n_captions) in run_units(distributor or DistributorConfig(workers=1), LexicalWorker,
                                                   (plan, cfg), todo(), threads, n_items=pending):
        with cat.transaction():
            cat.insert_arrow("matches", tbl, "uid, concept_id, method, score, span")
            cat.insert_arrow("lexical_removed", gone, "uid, concept_id, span, reason")
            cat.add_unit(stage, unit)
        bar.update(n_captions)
    bar.close()
    n = _count(cat, "lexical")
    cat.mark_done(stage, n)
    return n


def _cache_root(cat: Catalog, cfg: SemanticConfig) -> Path:
    if cfg.cache_dir:
        return resolve_path(cfg.cache_dir)
    return cat.path.with_name(cat.path.name + ".cache") / "match_semantic"


def run_semantic(cat: Catalog, cfg: SemanticConfig, progress: bool = True, encoder=None,
                 distributor: DistributorConfig | None = None) -> int:
    """Semantic top-K matching; returns the number of ``semantic`` rows in ``matches``.

    ``encoder``: an already loaded :class:`tether.encoders.TextEncoder` (else ``cfg.model`` is loaded).
    ``distributor`` ``kind: ray``: the caption units not cached yet are embedded by Ray actors first
    (:func:`tether.distribute.embed_units`, same function per unit), then the search runs here over the cache.
    """
    from tether.progress import progress as tqdm

    stage = Stage.MATCH_SEMANTIC
    fingerprint, n_input = _input(cat)
    params = {"cfg": cfg.model_dump(exclude={"cache_dir", "batch_size", "device"}),
              "bank": _bank_fingerprint(cat), "input": fingerprint}
    if _begin(cat, stage, params):
        return _count(cat, "semantic")
    concepts = cat.execute("SELECT concept_id, name, lemmas, gloss FROM concepts ORDER BY concept_id").fetchall()
    if not concepts:
        raise RecipeError("match: the catalog has no concepts; build the concept bank first")
    if n_input == 0:  # no caption to match: no encoder to load, no prompt to embed
        cat.mark_done(stage, 0)
        return 0
    from tether.encoders import TextEncoder

    if encoder is None:
        from tether.zoo import check_model

        check_model("match.semantic.model", cfg.model)
        try:
            encoder = TextEncoder.load(cfg.model, device=cfg.device, dtype=cfg.dtype, max_length=cfg.max_length)
        except (OSError, ValueError) as e:
            raise RecipeError(f"match.semantic.model: cannot load {cfg.model!r}: {str(e).splitlines()[0]}") from None
    prompts = [concept_prompt(cfg.prompt, name, lemmas, gloss) for _, name, lemmas, gloss in concepts]
    pcache = PromptCache()
    pkey = pcache.key(prompts, encoder)
    queries = pcache.get(pkey, len(prompts))
    if queries is None:
        with tqdm(total=len(prompts), desc="embed concept prompts", unit="concept", disable=not progress) as pbar:
            queries = encode_sorted(encoder, prompts, cfg.batch_size, pbar)
        pcache.put(pkey, queries)
    elif progress:
        print(f"match semantic: {len(prompts):,} concept-prompt embeddings reused from {pcache.root} "
              "(TETHER_PROMPT_CACHE=off recomputes them)")
    cache = EmbeddingCache(_cache_root(cat, cfg), f"{encoder.fingerprint}-{cfg.max_length}")
    if remote_embedding(distributor):
        def missing():
            for unit, uids, caps in iter_units(cat, cfg.unit_rows):
                if cache.get(unit, uids) is None:
                    yield (unit, uids), (caps, cfg.batch_size)

        with tqdm(total=n_input, desc="embed captions (ray)", unit="caption", disable=not progress) as eb:
            embed_units(distributor, TextEncoder.load,
                        {"name_or_path": cfg.model, "device": cfg.device, "dtype": cfg.dtype,
                         "max_length": cfg.max_length}, encode_sorted, missing(),
                        lambda key, emb: cache.put(key[0], key[1], emb), eb)
    top = TopK(queries, cfg.top_k)
    bar = tqdm(total=n_input, desc="match semantic", unit="caption", disable=not progress)
    all_uids: list[pa.Array] = []  # compact Arrow strings: position → uid at the end
    start = 0
    for unit, uids, caps in iter_units(cat, cfg.unit_rows):
        emb = cache.get(unit, uids)
        if emb is None:
            emb = encode_sorted(encoder, caps, cfg.batch_size, bar)
            cache.put(unit, uids, emb)
        else:
            bar.update(len(uids))  # cached by an earlier (killed) run
        top.add(emb, start)
        all_uids.append(pa.array(uids, pa.string()))
        start += len(uids)
    bar.close()
    qi, pos, scores = top.results(cfg.min_score)
    concept_arr = pa.array([c[0] for c in concepts], pa.string())
    uid_arr = pa.chunked_array(all_uids, pa.string()).take(pa.array(pos, pa.int64()))
    tbl = pa.table({"uid": uid_arr, "concept_id": concept_arr.take(qi),
                    "method": pa.array(["semantic"] * len(qi), pa.string()), "score": pa.array(scores),
                    "span": pa.nulls(len(qi), pa.string())})
    with cat.transaction() as con:
        con.execute("DELETE FROM matches WHERE method = 'semantic'")
        cat.insert_arrow("matches", tbl, "uid, concept_id, method, score, span")
        n = _count(cat, "semantic")
        cat.mark_done(stage, n)
    return n


def run_match(cat: Catalog, cfg: MatchConfig, progress: bool = True, distributor: DistributorConfig | None = None,
              threads: int | None = None) -> int:
    """Run the configured matching mode(s); returns the number of rows in ``matches`` they own."""
    n = 0
    if cfg.mode in ("lexical", "both"):
        n += run_lexical(cat, cfg.lexical, progress, distributor, threads)
    if cfg.mode in ("semantic", "both"):
        n += run_semantic(cat, cfg.semantic, progress, distributor=distributor)
    return n
