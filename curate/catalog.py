"""The build catalog: one DuckDB file per build holding every row and every decision.

This module is the ONE place where the catalog's tables are defined (:data:`TABLES`; docs/catalog.md mirrors it)
and where stages start, resume or are skipped (:meth:`Catalog.begin_stage`, over the stage list of
:mod:`curate.stages`).

Resume contract: a stage either runs inside one transaction (killed → rolled back → rerun from scratch), or
commits unit by unit, writing ``progress(stage, unit)`` in the SAME transaction as the unit's rows, and skips
done units on rerun. Either way a killed-and-rerun build ends with the same catalog as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import duckdb

from curate.stages import OWNS, Begin, Stage

#: Every table of a build's catalog, by name (docs/catalog.md has one row per entry, in this order).
TABLES: dict[str, str] = {
    # every ingested row, good or bad (ingest)
    "samples": """CREATE TABLE IF NOT EXISTS samples(
        uid VARCHAR NOT NULL, source VARCHAR, row_index BIGINT, url VARCHAR, path VARCHAR, caption VARCHAR,
        width INTEGER, height INTEGER, extra VARCHAR, lang VARCHAR)""",
    # one row per (uid, stage) verdict (every judging stage)
    "decisions": """CREATE TABLE IF NOT EXISTS decisions(
        uid VARCHAR NOT NULL, stage VARCHAR NOT NULL, kept BOOLEAN NOT NULL, reason VARCHAR, ref_uid VARCHAR,
        concept_id VARCHAR)""",
    # the concept bank (concepts)
    "concepts": """CREATE TABLE IF NOT EXISTS concepts(
        concept_id VARCHAR NOT NULL, name VARCHAR, lemmas VARCHAR[], gloss VARCHAR, depth INTEGER,
        hypernyms VARCHAR[], imagenet1k BOOLEAN, origin VARCHAR)""",
    # the normalised words that name a concept (concepts; docs/concepts.md)
    "surface_forms": """CREATE TABLE IF NOT EXISTS surface_forms(
        form VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, sense_rank INTEGER, kind VARCHAR, lemma VARCHAR)""",
    # caption → concept matches (match_lexical / match_semantic)
    "matches": """CREATE TABLE IF NOT EXISTS matches(
        uid VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, method VARCHAR, score DOUBLE, span VARCHAR)""",
    # the lexical (caption, concept) hits a match.lexical precision rule removed, with the rule (match_lexical)
    "lexical_removed": """CREATE TABLE IF NOT EXISTS lexical_removed(
        uid VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, span VARCHAR, reason VARCHAR NOT NULL)""",
    # per-concept balancing outcome (balance, rebalance)
    "balance_report": """CREATE TABLE IF NOT EXISTS balance_report(
        stage VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, before BIGINT, after BIGINT, floor BIGINT,
        shortfall BIGINT)""",
    # the selection rows the media stages work on: a copy of the selection parquet (media_rows)
    "media_rows": """CREATE TABLE IF NOT EXISTS media_rows(
        uid VARCHAR NOT NULL, pos BIGINT, url VARCHAR, path VARCHAR, caption VARCHAR, concept_ids VARCHAR[],
        source VARCHAR)""",
    # one download / local-file check outcome per media row (download, download_retry)
    "downloads": """CREATE TABLE IF NOT EXISTS downloads(
        uid VARCHAR NOT NULL, attempt INTEGER, status VARCHAR, error VARCHAR, sha256 VARCHAR,
        width INTEGER, height INTEGER, original_width INTEGER, original_height INTEGER,
        format VARCHAR, store VARCHAR, shard VARCHAR, key VARCHAR)""",
    # content-keyed caches of image dedup (kept across reruns: keyed by the image bytes' sha256)
    "image_hashes": """CREATE TABLE IF NOT EXISTS image_hashes(
        uid VARCHAR NOT NULL, sha256 VARCHAR, hash_size INTEGER, phash BLOB)""",
    "image_embeddings": """CREATE TABLE IF NOT EXISTS image_embeddings(
        uid VARCHAR NOT NULL, sha256 VARCHAR, model VARCHAR, file VARCHAR, row INTEGER)""",
    # content-keyed cache of the agreement stage: the scorer's image–caption cosine per (uid, image bytes, model)
    "agreement_scores": """CREATE TABLE IF NOT EXISTS agreement_scores(
        uid VARCHAR NOT NULL, sha256 VARCHAR, model VARCHAR, score DOUBLE)""",
    # image-verified senses (agreement): one verdict per (uid, matched concept) checked against the word's other senses
    "sense_checks": """CREATE TABLE IF NOT EXISTS sense_checks(
        uid VARCHAR NOT NULL, concept_id VARCHAR NOT NULL, word VARCHAR, own DOUBLE, best_other DOUBLE,
        other_id VARCHAR, prototype DOUBLE, kept BOOLEAN NOT NULL, reason VARCHAR)""",
    # where each sample went in the webdataset shards (shards)
    "shard_index": """CREATE TABLE IF NOT EXISTS shard_index(
        uid VARCHAR NOT NULL, shard VARCHAR, key VARCHAR, pos BIGINT)""",
    # stage bookkeeping (the stage runner): parameters and status of every stage that started
    "stages": """CREATE TABLE IF NOT EXISTS stages(
        stage VARCHAR PRIMARY KEY, status VARCHAR, params VARCHAR, started DOUBLE, finished DOUBLE, rows BIGINT)""",
    # finished units of unit-resumable stages
    "progress": """CREATE TABLE IF NOT EXISTS progress(stage VARCHAR NOT NULL, unit VARCHAR NOT NULL)""",
}
#: Samples no stage has rejected so far: what the next stage works on.
ALIVE_VIEW = """CREATE OR REPLACE VIEW alive AS SELECT s.* FROM samples s
    WHERE NOT EXISTS (SELECT 1 FROM decisions d WHERE d.uid = s.uid AND NOT d.kept)"""
SCHEMA = [*TABLES.values(), ALIVE_VIEW]


class StageRow(NamedTuple):
    """A ``stages`` row: ``params`` is the JSON text the stage started with (compare with :func:`params_json`)."""

    stage: str
    status: str
    params: str
    started: float | None
    finished: float | None
    rows: int | None

    def params_dict(self) -> dict:
        return json.loads(self.params) if self.params else {}



@contextmanager
def arrow_views(con: duckdb.DuckDBPyConnection, **tables) -> Iterator[duckdb.DuckDBPyConnection]:
    """Make each Arrow table/batch of ``tables`` queryable under its keyword name on ``con`` for the ``with``
    block, then unregister them all (also on error). The one place the catalog registers Arrow data."""
    done = []
    try:
        for name, data in tables.items():
            con.register(name, data)
            done.append(name)
        yield con
    finally:
        for name in done:
            con.unregister(name)

class Catalog:
    """Thin wrapper around a DuckDB connection with the tether schema and stage bookkeeping."""

    def __init__(self, path: str | Path, read_only: bool = False, threads: int | None = None,
                 memory_limit: str | None = None, temp_dir: str | Path | None = None):
        """``memory_limit`` (validated text such as ``6GB``, :func:`curate.config.memory_bytes_text`) caps DuckDB's
        memory; what does not fit spills to ``temp_dir`` (created here)."""
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no catalog here (run `curate build` first)")
        self.con = duckdb.connect(str(self.path), read_only=read_only)
        if threads:
            self.con.execute(f"SET threads={int(threads)}")
        if memory_limit:
            self.con.execute(f"SET memory_limit='{str(memory_limit).replace(chr(39), '')}'")
        self._temp_made: Path | None = None  # the spill folder this catalog created: removed on close when empty
        if temp_dir:
            if not Path(temp_dir).exists():
                self._temp_made = Path(temp_dir)
            Path(temp_dir).mkdir(parents=True, exist_ok=True)
            self.con.execute(f"SET temp_directory='{str(temp_dir).replace(chr(39), chr(39) * 2)}'")
        if not read_only:
            for stmt in SCHEMA:
                self.con.execute(stmt)

    # -- plumbing ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()
        if self._temp_made is not None and self._temp_made.is_dir() and not any(self._temp_made.iterdir()):
            self._temp_made.rmdir()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, sql: str, params=None):
        return self.con.execute(sql, params) if params is not None else self.con.execute(sql)

    def inserted(self, sql: str, params=None) -> int:
        """Run an INSERT and return how many rows it inserted (DuckDB returns the count as the result)."""
        rows = self.execute(sql, params).fetchall()
        return int(rows[0][0]) if rows else 0

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

    # -- stage bookkeeping: the one stage runner ---------------------------------------------------------
    def stage_row(self, stage: str) -> StageRow | None:
        """The ``stages`` row of ``stage`` (None when it never started or was cleared)."""
        row = self.one("SELECT stage, status, params, started, finished, rows FROM stages WHERE stage = ?", [stage])
        return StageRow(*row) if row else None

    def stage_done(self, stage: str, params: dict | None = None) -> bool:
        row = self.stage_row(stage)
        if row is None or row.status != "done":
            return False
        return params is None or row.params == params_json(params)

    def begin_stage(self, stage: Stage, params: dict, *, resumable: bool = False, rerun: bool = False,
                    also_clear: Iterable[Stage] = (), on_fresh: Callable[[], None] | None = None) -> Begin:
        """Start ``stage`` with ``params`` and say how (every stage of every module starts here):

        * :attr:`Begin.SKIP` — done earlier with the same parameters (and not ``rerun``): nothing to do;
        * :attr:`Begin.RESUME` — a ``resumable`` stage found ``running`` with the same parameters: its committed
          units stay (``done_units``);
        * :attr:`Begin.FRESH` — anything else: in one transaction the stage's own catalog rows (:data:`OWNS`), its
          sub-stages' and those of ``also_clear`` are deleted, ``on_fresh()`` runs (more catalog cleanup of the
          caller), and the stage is marked ``running`` with ``params``.

        The caller then does the work and calls :meth:`mark_done`; the ``stages`` row only says ``done`` after
        that, so a killed stage never counts as finished.
        """
        row = self.stage_row(stage)
        same = row is not None and row.params == params_json(params)
        if same and not rerun and row.status == "done":
            return Begin.SKIP
        if same and resumable and row.status == "running":
            return Begin.RESUME
        with self.transaction():
            for s in (*also_clear, stage):
                self.clear_stage(s)
            if on_fresh is not None:
                on_fresh()
            self.mark_started(stage, params)
        return Begin.FRESH

    def clear_stage(self, stage: Stage) -> None:
        """Delete what ``stage`` and its sub-stages wrote in the catalog (:data:`curate.stages.OWNS`) and forget
        that they ran. Files the stage wrote are the stage's own business."""
        for s in (stage, *stage.children):
            decisions, tables = OWNS[s]
            if decisions:
                self.clear_decisions(s)
            for table, where in tables:
                self.execute(f"DELETE FROM {table}" + (f" WHERE {where}" if where else ""))
            self.invalidate([s])

    def mark_started(self, stage: str, params: dict | None = None) -> None:
        self.execute("DELETE FROM stages WHERE stage = ?", [stage])
        self.execute("INSERT INTO stages VALUES (?, 'running', ?, ?, NULL, NULL)",
                     [stage, params_json(params or {}), time.time()])

    def mark_done(self, stage: str, rows: int | None = None) -> None:
        self.execute("UPDATE stages SET status='done', finished=?, rows=? WHERE stage = ?", [time.time(), rows, stage])

    def invalidate(self, stages: list[str]) -> None:
        """Forget that ``stages`` ran (their bookkeeping only: :meth:`clear_stage` also deletes their rows)."""
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

    def registered(self, name: str, data):
        """Make the Arrow table/batch ``data`` queryable as ``name`` for the ``with`` block (then unregistered)."""
        return arrow_views(self.con, **{name: data})

    def insert_arrow(self, table: str, data, select: str = "*") -> int:
        """Append an Arrow table/batch to ``table`` via ``INSERT INTO table SELECT <select> FROM data``."""
        with self.registered("_tether_arrow_in", data) as con:
            con.execute(f"INSERT INTO {table} SELECT {select} FROM _tether_arrow_in")
        return int(data.num_rows)


def params_json(params: dict) -> str:
    """The canonical JSON text of a stage's parameters (what ``stages.params`` stores and compares)."""
    return json.dumps(params, sort_keys=True, default=str)


def find_key(obj: object, key: str, depth: int = 0) -> object:
    """The first value of ``key`` in a nested dict (breadth of a recipe section; at most 6 levels deep)."""
    if depth > 6:
        return None
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = find_key(v, key, depth + 1)
            if r is not None:
                return r
    return None


def recorded_wordnet_dir(con) -> str | None:
    """``concepts.wordnet_dir`` of the recipe that made the build, when its catalog (a duckdb connection or a
    :class:`Catalog`) recorded it; None otherwise (then WordNet is searched where tether always looks)."""
    import json

    try:
        row = con.execute("SELECT params FROM stages WHERE stage = 'concepts' LIMIT 1").fetchone()
        params = json.loads(row[0]) if row and row[0] else {}
    except (duckdb.Error, ValueError, TypeError):
        return None
    found = find_key(params, "wordnet_dir")
    return found if isinstance(found, str) and found else None
