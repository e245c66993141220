"""Per-concept balancing of matched pairs: MetaCLIP t-balancing and freeze-align coverage balancing.

Both read the candidates (default: every uid of the ``alive`` view) and their ``matches`` and write one
``decisions`` row per candidate (kept or not, with the concept that decided it) plus a per-concept
``balance_report`` (before, after, floor, shortfall). Both are deterministic for a seed and rerunnable: a rerun
first deletes the stage's own decisions and report rows.

**t-balancing** (``method: t``; MetaCLIP, Xu et al. 2023): a concept matched by ``n`` candidates keeps each of
its pairs with probability ``p = t / max(n, t)``; a pair survives if ANY of its matched concepts wins its draw.
The draw of (uid, concept) is ``u = hash(uid, concept, seed) / 2^64`` (DuckDB's multi-argument ``hash``), so the
outcome does not depend on row order, batching or the number of threads (it may change with the DuckDB
version). :func:`preview_t` gives the expected output size
``Σ_uid 1 - Π_concepts (1 - p)`` for a list of ``t`` before committing.

**coverage** (``method: coverage``; freeze-align): concepts are visited weakest tail first (fewest candidate
matches, then lowest score of their ``per_concept``-th best match, then concept id); each takes up to
``per_concept`` of its best-scoring candidates not claimed by an earlier concept (unique assignment). The
greedy runs in numpy over integer codes (one vectorised step per concept), so millions of pairs take seconds; the
pairs stream from DuckDB in bounded batches and Python holds one int32 owner per matched uid.

Matches are read one row per (uid, concept): rows of both methods for the same pair are merged (max score);
with a single method present the match stage's guarantee of one row per (uid, concept, method) is relied on.

Candidates without any match are dropped (``no concept match``) unless ``keep_unmatched``. A concept whose kept
count stays below ``floor`` is reported with its shortfall.

Re-balancing after losses (media stages): ``run_balance(cat, cfg, stage="rebalance",
candidates_sql="SELECT uid FROM alive")`` judges only the survivors (``alive`` excludes everything any stage
rejected, e.g. failed downloads or image duplicates) and records its decisions under its own stage name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from curate.catalog import Catalog
from curate.judge import Verdicts, record
from curate.stages import Stage
from tether.recipe import Strict

TWO64 = "18446744073709551616.0"
COVERAGE_BATCH = 1 << 20  # (concept, candidate) pairs per Arrow batch streamed into the coverage greedy


class BalanceConfig(Strict):
    """Recipe section ``balance:``."""

    method: Literal["t", "coverage", "none"] = "t"
    t: int = Field(default=20_000, ge=1)
    seed: int = 0
    per_concept: int = Field(default=100, ge=1)
    floor: int = Field(default=0, ge=0)
    methods: list[Literal["lexical", "semantic"]] = ["lexical", "semantic"]
    min_score: float | None = None
    keep_unmatched: bool = False


@dataclass
class BalanceReport:
    stage: str
    method: str
    candidates: int = 0
    matched: int = 0
    kept: int = 0
    concepts: int = 0
    shortfall: list[tuple[str, int, int]] = field(default_factory=list)  # (concept_id, after, floor)

    @property
    def dropped(self) -> int:
        return self.candidates - self.kept

    def words(self) -> str:
        return (f"{self.method} kept {self.kept:,} of {self.candidates:,} candidates "
                f"({self.matched:,} matched, {self.concepts:,} concepts)")

    def summary(self) -> str:
        """The stage line (the concepts below the floor are said once, at the end: :func:`floor_note`)."""
        return f"{self.stage}: {self.words()}"


def floor_note(short: dict[str, int], concepts: int, floor: int, when: str, where: str,
               names: dict[str, str] | None = None) -> str:
    """The one line a build prints about concepts whose final count stays below ``floor``, and whether it matters.
    ``short``: concept → its final count (the short ones); ``concepts``: all concepts with a sample; ``when``:
    after which stage; ``where``: where the full list is; ``names``: concept → name, for the three thinnest."""
    names = names or {}
    thinnest = ", ".join(f"{names[c]} ({c}): {n:,}" if names.get(c) else f"{c}: {n:,}"
                         for c, n in sorted(short.items(), key=lambda x: (x[1], x[0]))[:3])
    return (f"{len(short):,} of {concepts:,} concepts end with fewer than {floor:,} samples {when} (thinnest: "
            f"{thinnest}; all in {where}). Not an error: the pool has no more captions of them. It matters only "
            f"if each concept needs {floor:,} examples (e.g. zero-shot on those classes): add caption sources, "
            f"or lower balance.floor to stop this note")


def balance_floor_note(cat: Catalog, where: str, stage: str = Stage.BALANCE) -> str | None:
    """:func:`floor_note` from ``balance_report`` (None when no concept is short)."""
    rows = cat.execute("SELECT concept_id, after, floor, shortfall FROM balance_report WHERE stage = ?",
                       [stage]).fetchall()
    short = {c: int(a) for c, a, _, s in rows if s and s > 0}
    if not short:
        return None
    return floor_note(short, len(rows), max(int(f) for _, _, f, _ in rows), f"after {stage}", where,
                      concept_names(cat, short))


def concept_names(cat: Catalog, ids) -> dict[str, str]:
    """concept id → name from the concept bank (ids without a name are left out)."""
    ids = sorted(ids)
    if not ids:
        return {}
    return {c: str(n) for c, n in cat.execute(
        "SELECT concept_id, name FROM concepts WHERE concept_id IN (SELECT unnest(?))", [ids]).fetchall() if n}


def _prepare(cat: Catalog, cfg: BalanceConfig, candidates_sql: str | None, exclude_pairs_sql: str | None = None
             ) -> None:
    """Temp tables ``_bc(uid)`` (candidates) and ``_bm(uid, concept_id, score)`` (their usable matches)."""
    methods = ", ".join(f"'{m}'" for m in cfg.methods)
    score_rule = f"AND coalesce(score, 1.0) >= {float(cfg.min_score)}" if cfg.min_score is not None else ""
    if exclude_pairs_sql:
        score_rule += (f" AND NOT EXISTS (SELECT 1 FROM ({exclude_pairs_sql}) _x"
                       " WHERE _x.uid = m.uid AND _x.concept_id = m.concept_id)")
    if candidates_sql:
        cat.execute(f"CREATE OR REPLACE TEMP TABLE _bc AS SELECT DISTINCT uid FROM ({candidates_sql})")
    else:  # uids are unique in samples: no DISTINCT needed
        cat.execute("CREATE OR REPLACE TEMP TABLE _bc AS SELECT uid FROM alive")
    present = [r[0] for r in cat.execute(
        f"SELECT DISTINCT method FROM matches WHERE method IN ({methods})").fetchall()]
    if len(present) > 1:  # a (uid, concept) pair may be matched by both methods: one row per pair
        cat.execute(f"""CREATE OR REPLACE TEMP TABLE _bm AS
            SELECT m.uid, m.concept_id, max(coalesce(m.score, 1.0)) AS score
            FROM matches m SEMI JOIN _bc USING (uid)
            WHERE m.method IN ({methods}) {score_rule}
            GROUP BY m.uid, m.concept_id""")
    else:  # the match stage writes one row per (uid, concept, method): no grouping needed
        cat.execute(f"""CREATE OR REPLACE TEMP TABLE _bm AS
            SELECT m.uid, m.concept_id, coalesce(m.score, 1.0) AS score
            FROM matches m SEMI JOIN _bc USING (uid)
            WHERE m.method IN ({methods}) {score_rule}""")
    cat.execute("CREATE OR REPLACE TEMP TABLE _bn AS SELECT concept_id, count(*) AS n FROM _bm GROUP BY 1")


def _cleanup(cat: Catalog) -> None:
    for t in ("_bc", "_bm", "_bn", "_bres"):
        cat.execute(f"DROP TABLE IF EXISTS {t}")


def run_balance(cat: Catalog, cfg: BalanceConfig, stage: Stage = Stage.BALANCE, candidates_sql: str | None = None,
                progress: bool = True, exclude_pairs_sql: str | None = None) -> BalanceReport:
    """Balance the candidates (``candidates_sql`` → a ``uid`` column; default the ``alive`` view), leaving out
    the (uid, concept_id) matches of ``exclude_pairs_sql`` (e.g. the ones the image sense check refuted)."""
    cat.clear_decisions(stage)
    cat.execute("DELETE FROM balance_report WHERE stage = ?", [stage])
    rep = BalanceReport(stage=stage, method=cfg.method)
    if cfg.method == "none":
        cand = candidates_sql or "SELECT uid FROM alive"
        rep.candidates = rep.kept = int(cat.scalar(f"SELECT count(*) FROM ({cand})"))
        return rep
    _prepare(cat, cfg, candidates_sql, exclude_pairs_sql)
    # _bres(uid, concept_id, kept, reason): the verdict of every MATCHED candidate
    if cfg.method == "t":
        _t_balance(cat, cfg)
    else:
        _coverage(cat, cfg, progress)
    unmatched_reason = "'no concept match (kept)'" if cfg.keep_unmatched else "'no concept match'"
    record(cat, stage, Verdicts(f"""
          SELECT r.uid, r.kept, r.reason, r.concept_id FROM _bres r
          UNION ALL
          SELECT c.uid, {str(cfg.keep_unmatched).lower()}, {unmatched_reason}, NULL FROM _bc c ANTI JOIN _bm USING (uid)
        """, kept="kept", concept="concept_id"))
    cat.execute(f"""INSERT INTO balance_report
        SELECT '{stage}', n.concept_id, n.n, coalesce(a.after, 0), {cfg.floor},
               greatest({cfg.floor} - coalesce(a.after, 0), 0)
        FROM _bn n LEFT JOIN (
          SELECT m.concept_id, count(*) AS after FROM _bm m SEMI JOIN (SELECT uid FROM _bres WHERE kept) k USING (uid)
          GROUP BY 1) a USING (concept_id)""")
    rep.candidates = int(cat.scalar("SELECT count(*) FROM _bc"))
    rep.matched, kept = cat.one("SELECT count(*), count(*) FILTER (WHERE kept) FROM _bres")
    rep.kept = int(kept) + (rep.candidates - int(rep.matched) if cfg.keep_unmatched else 0)
    rep.concepts = int(cat.scalar("SELECT count(*) FROM _bn"))
    if cfg.floor:
        rep.shortfall = [tuple(r) for r in cat.execute(
            "SELECT concept_id, after, floor FROM balance_report WHERE stage = ? AND shortfall > 0 "
            "ORDER BY shortfall DESC, concept_id", [stage]).fetchall()]
    _cleanup(cat)
    return rep


def _t_balance(cat: Catalog, cfg: BalanceConfig) -> None:
    t = int(cfg.t)
    cat.execute(f"""CREATE OR REPLACE TEMP TABLE _bres AS
        SELECT uid, arg_min(concept_id, r) AS concept_id, min(r) < 1 AS kept,
               CASE WHEN min(r) < 1 THEN 't-balance: won the draw of its concept (t={t})'
                    ELSE 't-balance: lost the draw of every matched concept (t={t})' END AS reason
        FROM (
          SELECT m.uid, m.concept_id,
                 (hash(m.uid, m.concept_id, {int(cfg.seed)}::BIGINT) / {TWO64})
                   / ({t} / greatest(n.n, {t})::DOUBLE) AS r
          FROM _bm m JOIN _bn n USING (concept_id))
        GROUP BY uid""")


def _coverage(cat: Catalog, cfg: BalanceConfig, progress: bool) -> None:
    from tether.progress import progress as tqdm

    N = int(cfg.per_concept)
    cat.execute("CREATE OR REPLACE TEMP TABLE _bu AS SELECT uid, (row_number() OVER (ORDER BY uid)) - 1 AS code "
                "FROM (SELECT DISTINCT uid FROM _bm)")
    cat.execute(f"""CREATE OR REPLACE TEMP TABLE _bp AS
        SELECT concept_id, (row_number() OVER (ORDER BY n, tail, concept_id)) - 1 AS prio FROM (
          SELECT concept_id, count(*) AS n,
                 min(score) FILTER (WHERE rk <= {N}) AS tail FROM (
            SELECT concept_id, score, row_number() OVER (PARTITION BY concept_id ORDER BY score DESC, uid) AS rk
            FROM _bm) GROUP BY concept_id)""")
    n_uids = int(cat.scalar("SELECT count(*) FROM _bu"))
    n_concepts = int(cat.scalar("SELECT count(*) FROM _bp"))
    # the only pool-sized array: the owner (concept priority) of every matched uid, 4 bytes each; the sorted
    # (concept, candidate) pairs stream from DuckDB in bounded batches (a concept may span two batches)
    owner = np.full(n_uids, -1, dtype=np.int32 if n_concepts < 2**31 - 1 else np.int64)
    # (on the catalog's own connection: the temp tables are its own; nothing else runs on it while reading)
    reader = cat.con.sql("""SELECT p.prio, u.code FROM _bm m JOIN _bp p USING (concept_id) JOIN _bu u USING (uid)
                             ORDER BY p.prio, m.score DESC, m.uid""").to_arrow_reader(COVERAGE_BATCH)
    bar = tqdm(total=n_concepts, desc="coverage balance", unit="concepts", disable=not progress, mininterval=0.5)
    last, taken = -1, 0  # the concept being filled and how many candidates it has taken so far
    for batch in reader:
        prio = batch.column(0).to_numpy().astype(np.int64, copy=False)
        code = batch.column(1).to_numpy().astype(np.int64, copy=False)
        starts = np.flatnonzero(np.r_[True, prio[1:] != prio[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], prio.size]):
            if prio[s] != last:
                last, taken = int(prio[s]), 0
                bar.update(1)
            if taken >= N:
                continue
            cand = code[s:e]
            free = cand[owner[cand] < 0][:N - taken]
            owner[free] = last
            taken += free.size
    bar.close()
    import pyarrow as pa

    owned = np.flatnonzero(owner >= 0)  # at most concepts × per_concept rows, whatever the pool size
    with cat.registered("_bown", pa.table({"code": owned.astype(np.int64), "prio": owner[owned].astype(np.int64)})):
        cat.execute(f"""CREATE OR REPLACE TEMP TABLE _bres AS
            SELECT u.uid, p.concept_id, o.prio IS NOT NULL AS kept,
                   CASE WHEN o.prio IS NOT NULL THEN 'coverage: among the {N} best unclaimed matches of its concept'
                        ELSE 'coverage: not among the {N} best unclaimed matches of any matched concept' END AS reason
            FROM _bu u LEFT JOIN _bown o USING (code) LEFT JOIN _bp p ON p.prio = o.prio""")
    cat.execute("DROP TABLE _bu")
    cat.execute("DROP TABLE _bp")


def candidates_before(cat: Catalog, stage: Stage = Stage.BALANCE) -> str | None:
    """SQL selecting the uids that were alive when ``stage`` last started (None: it never ran → ``alive``).

    Lets ``preview_t`` work on a finished build: the stage's own and later decisions are ignored.
    """
    if cat.one("SELECT 1 FROM stages WHERE stage = ?", [stage]) is None:
        return None
    name = stage.replace("'", "''")
    return ("SELECT uid FROM samples s WHERE NOT EXISTS (SELECT 1 FROM decisions d JOIN stages st USING (stage) "
            f"WHERE d.uid = s.uid AND NOT d.kept AND st.started < "
            f"(SELECT started FROM stages WHERE stage = '{name}'))")


def preview_t(cat: Catalog, ts: list[int], cfg: BalanceConfig | None = None,
              candidates_sql: str | None = None) -> list[dict]:
    """Expected t-balancing output per ``t`` (exact expectation of the seeded draws), without writing anything.

    Returns one dict per t: ``t``, ``expected`` (pairs kept), ``candidates``, ``matched``, ``capped_concepts``
    (concepts with more than t matches) and ``concepts``.
    """
    cfg = cfg or BalanceConfig()
    _prepare(cat, cfg, candidates_sql)
    try:
        cat.execute("CREATE OR REPLACE TEMP TABLE _bt AS SELECT unnest(?::BIGINT[]) AS t", [list(map(int, ts))])
        rows = cat.execute("""
            SELECT t.t,
              (SELECT sum(CASE WHEN any_full THEN 1.0 ELSE 1.0 - exp(slog) END) FROM (
                 SELECT m.uid, bool_or(n.n <= t.t) AS any_full,
                        sum(CASE WHEN n.n > t.t THEN ln(1.0 - t.t / n.n::DOUBLE) ELSE 0 END) AS slog
                 FROM _bm m JOIN _bn n USING (concept_id) GROUP BY m.uid)) AS expected,
              (SELECT count(*) FROM _bn WHERE n > t.t) AS capped
            FROM _bt t ORDER BY t.t""").fetchall()
        cand = int(cat.scalar("SELECT count(*) FROM _bc"))
        matched = int(cat.scalar("SELECT count(DISTINCT uid) FROM _bm"))
        concepts = int(cat.scalar("SELECT count(*) FROM _bn"))
    finally:
        _cleanup(cat)
        cat.execute("DROP TABLE IF EXISTS _bt")
    extra = 0 if not cfg.keep_unmatched else cand - matched
    return [{"t": int(t), "expected": float(e or 0) + extra, "candidates": cand, "matched": matched,
             "capped_concepts": int(c), "concepts": concepts} for t, e, c in rows]
