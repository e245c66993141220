"""The build catalog: one DuckDB file per build holding every row and every decision.

Tables (see docs/catalog.md):
  samples(uid, source, row_index, url, path, caption, width, height, extra)   every ingested row, good or bad
  concepts(concept_id, name, lemmas, gloss, depth, hypernyms, imagenet1k, origin)
  matches(uid, concept_id, method, score, span)                               caption→concept matches
  decisions(uid, stage, kept, reason, ref_uid, concept_id)                    one row per (uid, stage) verdict
  stages(stage, status, params, started, finished, rows)                      resume bookkeeping
  progress(stage, unit)                                                       finished units of long stages
  surface_forms(form, concept_id)                                             written by the concepts stage
  balance_report(stage, concept_id, before, after, floor, shortfall)          per-concept balancing outcome
  alive (view)                                                                samples no stage has rejected

Resume contract: a stage either runs inside one transaction (killed → rolled back → rerun from scratch), or
commits unit by unit, writing ``progress(stage, unit)`` in the SAME transaction as the unit's rows, and skips
done units on rerun. Either way a killed-and-rerun build ends with the same catalog as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS samples(
        uid VARCHAR NOT NULL, source VARCHAR, row_index BIGINT, url VARCHAR, path VARCHAR, caption VARCHAR,
        width INTEGER, height INTEGER, extra VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS concepts(
        concept_id VARCHAR NOT NULL, name VARCHAR, lemmas VARCHAR[], gloss VARCHAR, depth INTEGER,
        hypernyms VARCHAR[], imagenet1k BOOLEAN, origin VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS matches(
        uid VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, method VARCHAR, score DOUBLE, span VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS decisions(
        uid VARCHAR NOT NULL, stage VARCHAR NOT NULL, kept BOOLEAN NOT NULL, reason VARCHAR, ref_uid VARCHAR,
        concept_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS stages(
        stage VARCHAR PRIMARY KEY, status VARCHAR, params VARCHAR, started DOUBLE, finished DOUBLE, rows BIGINT)""",
    """CREATE TABLE IF NOT EXISTS progress(stage VARCHAR NOT NULL, unit VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS balance_report(
        stage VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, before BIGINT, after BIGINT, floor BIGINT,
        shortfall BIGINT)""",
    # Samples no stage has rejected so far: what the next stage works on.
    """CREATE OR REPLACE VIEW alive AS SELECT s.* FROM samples s
        WHERE NOT EXISTS (SELECT 1 FROM decisions d WHERE d.uid = s.uid AND NOT d.kept)""",
]


class Catalog:
    """Thin wrapper around a DuckDB connection with the tether schema and stage bookkeeping."""

    def __init__(self, path: str | Path, read_only: bool = False, threads: int | None = None):
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no catalog here (run `curate build` first)")
        self.con = duckdb.connect(str(self.path), read_only=read_only)
        if threads:
            self.con.execute(f"SET threads={int(threads)}")
        if not read_only:
            for stmt in SCHEMA:
                self.con.execute(stmt)

    # -- plumbing ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, sql: str, params=None):
        return self.con.execute(sql, params) if params is not None else self.con.execute(sql)

    def one(self, sql: str, params=None) -> tuple | None:
        """First row of a query (the result is fully consumed: DuckDB 2 refuses new work on an open result)."""
        rows = self.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, params=None):
        row = self.one(sql, params)
        return row[0] if row else None

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        else:
            self.con.execute("COMMIT")

    # -- stage bookkeeping ------------------------------------------------------------------------------
    def stage_done(self, stage: str, params: dict | None = None) -> bool:
        row = self.one("SELECT status, params FROM stages WHERE stage = ?", [stage])
        if not row or row[0] != "done":
            return False
        return params is None or row[1] == _params_json(params)

    def mark_started(self, stage: str, params: dict | None = None) -> None:
        self.execute("DELETE FROM stages WHERE stage = ?", [stage])
        self.execute("INSERT INTO stages VALUES (?, 'running', ?, ?, NULL, NULL)",
                     [stage, _params_json(params or {}), time.time()])

    def mark_done(self, stage: str, rows: int | None = None) -> None:
        self.execute("UPDATE stages SET status='done', finished=?, rows=? WHERE stage = ?", [time.time(), rows, stage])

    def invalidate(self, stages: list[str]) -> None:
        """Forget that ``stages`` ran (their outputs are cleared by the stage itself before it reruns)."""
        for s in stages:
            self.execute("DELETE FROM stages WHERE stage = ?", [s])
            self.execute("DELETE FROM progress WHERE stage = ?", [s])

    def done_units(self, stage: str) -> set[str]:
        return {r[0] for r in self.execute("SELECT unit FROM progress WHERE stage = ?", [stage]).fetchall()}

    def add_unit(self, stage: str, unit: str) -> None:
        self.execute("INSERT INTO progress VALUES (?, ?)", [stage, unit])

    def clear_decisions(self, stage: str) -> None:
        self.execute("DELETE FROM decisions WHERE stage = ?", [stage])

    def table_exists(self, name: str) -> bool:
        return bool(self.scalar(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = current_database()",
            [name]) or self.scalar(
            "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND database_name = current_database()",
            [name]))

    def insert_arrow(self, table: str, data, select: str = "*") -> int:
        """Append an Arrow table/batch to ``table`` via ``INSERT INTO table SELECT <select> FROM data``."""
        name = "_tether_arrow_in"
        self.con.register(name, data)
        try:
            self.con.execute(f"INSERT INTO {table} SELECT {select} FROM {name}")
        finally:
            self.con.unregister(name)
        return int(data.num_rows)

    def stage_status(self) -> list[tuple]:
        """``(stage, status, rows, seconds)`` for every stage that started, in start order."""
        return self.execute(
            "SELECT stage, status, rows, finished - started FROM stages ORDER BY started").fetchall()

    # -- queries used by inspect/stats -------------------------------------------------------------------
    def why(self, uid: str) -> list[tuple]:
        """Every decision taken on ``uid``, in stage order of insertion."""
        return self.execute(
            "SELECT stage, kept, reason, ref_uid, concept_id FROM decisions WHERE uid = ? ORDER BY rowid", [uid]
        ).fetchall()

    def stage_counts(self) -> list[tuple[str, str, int, int, int]]:
        """Per stage in run order: ``(stage, status, judged, rejected, alive_after)``.

        ``judged`` counts the stage's decision rows, ``alive_after`` the samples no stage up to and including
        this one rejected.
        """
        return self.execute("""
            WITH ord AS (SELECT stage, status, row_number() OVER (ORDER BY started) AS o FROM stages),
                 fr AS (SELECT d.uid, min(o.o) AS first_reject FROM decisions d JOIN ord o USING (stage)
                        WHERE NOT d.kept GROUP BY d.uid),
                 per AS (SELECT stage, count(*) AS judged, count(*) FILTER (WHERE NOT kept) AS rejected
                         FROM decisions GROUP BY stage),
                 total AS (SELECT count(*) AS n FROM samples)
            SELECT o.stage, o.status, coalesce(p.judged, 0), coalesce(p.rejected, 0),
                   (SELECT n FROM total) - (SELECT count(*) FROM fr WHERE fr.first_reject <= o.o)
            FROM ord o LEFT JOIN per p USING (stage) ORDER BY o.o""").fetchall()

    def concept_counts_by_stage(self, limit: int | None = 30, concept: str | None = None
                                ) -> tuple[list[str], list[tuple]]:
        """Samples per concept still alive after each stage (from the matching stage on).

        Returns ``(columns, rows)``: columns ``concept_id, name, matched, <stage>...``; rows sorted by
        ``matched`` (samples matched to the concept) descending, at most ``limit`` (None: all), or only
        ``concept`` when given.
        """
        stages = [r[0] for r in self.execute("SELECT stage FROM stages ORDER BY started").fetchall()]
        judged = {r[0] for r in self.execute("SELECT DISTINCT stage FROM decisions").fetchall()}
        after_match = [s for s in (stages[stages.index("match") + 1:] if "match" in stages else stages)
                       if s in judged]
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
        cur = self.execute(sql, params)
        return [d[0] for d in cur.description], cur.fetchall()

    def sample(self, uid: str) -> dict | None:
        """The ``samples`` row of ``uid`` as a dict (None when unknown)."""
        cur = self.execute("SELECT * FROM samples WHERE uid = ?", [uid])
        rows = cur.fetchall()
        if not rows:
            return None
        return dict(zip([d[0] for d in cur.description], rows[0]))


def _params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)
