"""The read side of a build's catalog: what ``curate inspect``, ``curate stats``, the data card and the explorer
report about a build, in one place.

Every function takes a DuckDB connection or cursor over the catalog (a read-only one is enough: the explorer
passes a per-request cursor, the CLI and the card :attr:`curate.catalog.Catalog.con`) and returns plain rows;
formatting is the caller's. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MATCHES_SQL = """SELECT m.concept_id, coalesce(c.name, ''), m.method, m.score, m.span FROM matches m
                 LEFT JOIN (SELECT concept_id, any_value(name) AS name FROM concepts GROUP BY 1) c
                 USING (concept_id) WHERE m.uid = ?
                 ORDER BY m.method, m.score DESC NULLS LAST, m.concept_id"""


def stage_status(con) -> list[tuple]:
    """``(stage, status, rows, seconds)`` for every stage that started, in start order."""
    return con.execute("SELECT stage, status, rows, finished - started FROM stages ORDER BY started").fetchall()


def stage_counts(con) -> list[tuple[str, str, int, int, int]]:
    """Per stage in run order: ``(stage, status, judged, rejected, alive_after)``.

    ``judged`` counts the stage's decision rows, ``alive_after`` the samples no stage up to and including this one
    rejected."""
    return con.execute("""
        WITH ord AS (SELECT stage, status, row_number() OVER (ORDER BY started) AS o FROM stages),
             fr AS (SELECT d.uid, min(o.o) AS first_reject FROM decisions d JOIN ord o USING (stage)
                    WHERE NOT d.kept GROUP BY d.uid),
             per AS (SELECT stage, count(*) AS judged, count(*) FILTER (WHERE NOT kept) AS rejected
                     FROM decisions GROUP BY stage),
             total AS (SELECT count(*) AS n FROM samples)
        SELECT o.stage, o.status, coalesce(p.judged, 0), coalesce(p.rejected, 0),
               (SELECT n FROM total) - (SELECT count(*) FROM fr WHERE fr.first_reject <= o.o)
        FROM ord o LEFT JOIN per p USING (stage) ORDER BY o.o""").fetchall()


def top_reasons(con, limit: int) -> list[tuple[str, str, int]]:
    """The ``limit`` most frequent rejection reasons: ``(stage, reason, rows)``, most rows first (ties by stage,
    then reason)."""
    return con.execute("""SELECT stage, reason, count(*) FROM decisions WHERE NOT kept GROUP BY ALL
                          ORDER BY 3 DESC, 1, 2 LIMIT ?""", [int(limit)]).fetchall()


def concept_counts_by_stage(con, limit: int | None = 30, concept: str | None = None
                            ) -> tuple[list[str], list[tuple]]:
    """Samples per concept still alive after each stage (from the matching stage on).

    Returns ``(columns, rows)``: columns ``concept_id, name, matched, <stage>...``; rows sorted by ``matched``
    (samples matched to the concept) descending, at most ``limit`` (None: all), or only ``concept`` when given."""
    stages = [r[0] for r in con.execute("SELECT stage FROM stages ORDER BY started").fetchall()]
    judged = {r[0] for r in con.execute("SELECT DISTINCT stage FROM decisions").fetchall()}
    after_match = [s for s in (stages[stages.index("match") + 1:] if "match" in stages else stages) if s in judged]
    where = "WHERE mc.concept_id = $c" if concept else ""
    params: dict = {"c": concept} if concept else {}
    cols = ", ".join(
        f"count(*) FILTER (WHERE fr.first_reject IS NULL OR fr.first_reject > {stages.index(s) + 1}) "
        f"AS \"{s}\"" for s in after_match)
    sql = f"""
        WITH ord AS (SELECT stage, row_number() OVER (ORDER BY started) AS o FROM stages),
             fr AS (SELECT d.uid, min(o.o) AS first_reject FROM decisions d JOIN ord o USING (stage)
                    WHERE NOT d.kept GROUP BY d.uid),
             mc AS (SELECT DISTINCT uid, concept_id FROM matches)
        SELECT mc.concept_id, any_value(c.name) AS name, count(*) AS matched{', ' + cols if cols else ''}
        FROM mc LEFT JOIN fr USING (uid) LEFT JOIN concepts c USING (concept_id) {where}
        GROUP BY mc.concept_id ORDER BY matched DESC, mc.concept_id
        {f'LIMIT {int(limit)}' if limit else ''}"""
    cur = con.execute(sql, params)
    return [d[0] for d in cur.description], cur.fetchall()


def sample_row(con, uid: str) -> dict[str, Any] | None:
    """The ``samples`` row of ``uid`` as a dict (None when unknown)."""
    cur = con.execute("SELECT * FROM samples WHERE uid = ?", [uid])
    rows = cur.fetchall()
    return dict(zip([d[0] for d in cur.description], rows[0])) if rows else None


def sample_matches(con, uid: str) -> list[tuple]:
    """``(concept_id, name, method, score, span)`` of every match of ``uid`` (by method, best score first)."""
    return con.execute(MATCHES_SQL, [uid]).fetchall()


def sample_decisions(con, uid: str) -> list[tuple]:
    """``(stage, kept, reason, ref_uid, concept_id)`` of every decision taken on ``uid``, in insertion order."""
    return con.execute("SELECT stage, kept, reason, ref_uid, concept_id FROM decisions WHERE uid = ? ORDER BY rowid",
                       [uid]).fetchall()


@dataclass
class Explanation:
    """Why a sample is (not) in the selection: per stage that ran, its decisions on the sample, and the verdict."""

    stages: list[dict]  # {stage, status, decisions: [{kept, reason, ref, concept}], after_drop}
    verdict: str | None  # "dropped at <stage>: <reason>" of the first rejection; None: no stage rejected it


def explain(ran: list[tuple[str, str]], decisions: list[tuple]) -> Explanation:
    """Fold ``decisions`` (:func:`sample_decisions` rows) into the stages that ran (``(stage, status)`` in run
    order; a stage with decisions but no ``stages`` row is listed as ``unrecorded``)."""
    decided: dict[str, list] = {}
    for st, kept, reason, ref, cid in decisions:
        decided.setdefault(st, []).append({"kept": kept, "reason": reason, "ref": ref, "concept": cid})
    ran = list(ran) + [(st, "unrecorded") for st in decided if st not in {r[0] for r in ran}]
    stages, verdict = [], None
    for st, status in ran:
        ds = decided.get(st, [])
        stages.append({"stage": st, "status": status, "decisions": ds, "after_drop": verdict is not None})
        for d in ds:
            if not d["kept"] and verdict is None:
                verdict = f"dropped at {st}: {d['reason']}"
    return Explanation(stages, verdict)


def ran_stages(con) -> list[tuple[str, str]]:
    """``(stage, status)`` of every stage that started, in start order."""
    return [(st, status) for st, status, *_ in stage_status(con)]

def overview_counts(cur, has_stages: bool, has_lang: bool) -> dict:
    """The explorer's overview counts (stages, rejection reasons, sources, languages), straight from the catalog
    (``cur``: a cursor whose default database is it)."""
    total = cur.execute("SELECT count(*) FROM samples").fetchone()[0]
    alive = cur.execute("SELECT count(*) FROM alive").fetchone()[0]
    stages = [list(r) for r in stage_counts(cur)] if has_stages else []
    reasons = [list(r) for r in top_reasons(cur, 30)]
    dead = "SELECT DISTINCT uid FROM decisions WHERE NOT kept"
    sources = [list(r) for r in cur.execute(f"""
        SELECT source, count(*), count(*) FILTER (WHERE d.uid IS NULL) FROM samples s
        LEFT JOIN ({dead}) d USING (uid) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50""").fetchall()]
    langs = None
    if has_lang:
        langs = [list(r) for r in cur.execute(f"""
            SELECT coalesce(nullif(trim(s.lang), ''), 'und') AS lang, count(*),
                   count(*) FILTER (WHERE d.uid IS NULL) FROM samples s
            LEFT JOIN ({dead}) d USING (uid) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50""").fetchall()]
    return {"total": total, "alive": alive, "stages": stages, "reasons": reasons, "sources": sources,
            "langs": langs}


def concept_sql(has_balance: bool) -> str:
    """Every concept ``(id, name, gloss, matched, alive, before, after)``, largest first, from the catalog."""
    br = ("LEFT JOIN (SELECT concept_id, any_value(before) AS before, any_value(after) AS after FROM "
          "balance_report WHERE stage = 'balance' GROUP BY 1) b USING (concept_id)"
          if has_balance else "")
    bcols = "b.before, b.after" if br else "NULL::BIGINT, NULL::BIGINT"
    return f"""
        WITH mc AS (SELECT DISTINCT uid, concept_id FROM matches),
             dead AS (SELECT DISTINCT uid FROM decisions WHERE NOT kept),
             per AS (SELECT mc.concept_id, count(*) AS matched,
                            count(*) FILTER (WHERE dead.uid IS NULL) AS alive
                     FROM mc LEFT JOIN dead USING (uid) GROUP BY 1),
             ids AS (SELECT concept_id FROM concepts UNION SELECT concept_id FROM per)
        SELECT ids.concept_id AS id, c.name, c.gloss, coalesce(per.matched, 0) AS matched,
               coalesce(per.alive, 0) AS alive, {bcols}
        FROM ids LEFT JOIN (SELECT concept_id, any_value(name) AS name, any_value(gloss) AS gloss
                            FROM concepts GROUP BY 1) c USING (concept_id)
             LEFT JOIN per USING (concept_id) {br}
        ORDER BY 4 DESC, 1"""


__all__ = ["stage_status", "stage_counts", "top_reasons", "concept_counts_by_stage", "sample_row", "sample_matches",
           "sample_decisions", "Explanation", "explain", "ran_stages",
           "overview_counts", "concept_sql"]
