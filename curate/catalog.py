"""The build catalog: one DuckDB file per build holding every row and every decision.

Tables (see docs/catalog.md):
  samples(uid, source, row_index, url, path, caption, width, height, extra)   every ingested row, good or bad
  concepts(concept_id, name, lemmas, gloss, depth, hypernyms, imagenet1k, origin)
  matches(uid, concept_id, method, score, span)                               caption→concept matches
  decisions(uid, stage, kept, reason, ref_uid, concept_id)                    one row per (uid, stage) verdict
  stages(stage, status, params, started, finished, rows)                      resume bookkeeping
  progress(stage, unit)                                                       finished units of long stages
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

    def scalar(self, sql: str, params=None):
        row = self.execute(sql, params).fetchone()
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
        row = self.execute("SELECT status, params FROM stages WHERE stage = ?", [stage]).fetchone()
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

    # -- queries used by inspect/stats -------------------------------------------------------------------
    def why(self, uid: str) -> list[tuple]:
        """Every decision taken on ``uid``, in stage order of insertion."""
        return self.execute(
            "SELECT stage, kept, reason, ref_uid, concept_id FROM decisions WHERE uid = ? ORDER BY rowid", [uid]
        ).fetchall()


def _params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)
