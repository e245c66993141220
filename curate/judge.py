"""The one writer of ``decisions``: a stage that judges rows says WHICH rows and WHY; this module writes them.

A judging stage hands over :class:`Verdicts` — a query (or a registered Arrow table) giving a ``uid`` and a
``reason`` per row, plus SQL for the other columns of a ``decisions`` row (``kept``, ``ref_uid``, ``concept_id``;
default: rejected, no reference, no concept) — and :func:`record` appends them under the stage's name. Stages
whose verdicts are one or more queries over the catalog subclass :class:`Judge` (the caption filters, exact
dedup): the base replaces the stage's earlier verdicts and returns how many rows it rejected. The set-based
form keeps a 100M-row stage one SQL statement: rows never pass through Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from curate.catalog import Catalog, arrow_views
from curate.stages import Stage


@dataclass(frozen=True)
class Verdicts:
    """Rows a stage decided: ``rows`` is a SELECT (or a view name) with ``uid`` and ``reason`` columns; ``kept``,
    ``ref`` and ``concept`` are SQL expressions over its columns."""

    rows: str
    kept: str = "false"
    ref: str = "NULL"
    concept: str = "NULL"


def record(con, stage: Stage, v: Verdicts, params: dict | list | None = None) -> int:
    """Append ``v`` as ``stage``'s decisions; returns the rows written. ``con``: a :class:`Catalog` or a DuckDB
    connection (inside the caller's transaction); ``params``: the query's parameters."""
    sql = (f"INSERT INTO decisions(uid, stage, kept, reason, ref_uid, concept_id) "
           f"SELECT uid, '{Stage(stage).value}', {v.kept}, reason, {v.ref}, {v.concept} FROM ({v.rows})")
    rows = (con.execute(sql, params) if params is not None else con.execute(sql)).fetchall()
    return int(rows[0][0]) if rows else 0


def record_table(con, stage: Stage, table) -> int:
    """Append an Arrow table's rows as ``stage``'s decisions: columns ``uid``, ``reason`` and optionally ``kept``
    (default false), ``ref_uid``, ``concept_id``. ``con``: a :class:`Catalog` or a DuckDB connection."""
    cols = set(table.column_names)
    raw = con.con if isinstance(con, Catalog) else con
    v = Verdicts("SELECT * FROM _tether_verdicts", kept="kept" if "kept" in cols else "false",
                 ref="ref_uid" if "ref_uid" in cols else "NULL", concept="concept_id" if "concept_id" in cols else "NULL")
    with arrow_views(raw, _tether_verdicts=table):
        return record(raw, stage, v)


class Judge:
    """Base of a judging stage: :meth:`verdicts` yields its :class:`Verdicts` (SQL; setup statements may run
    between yields); :meth:`run` replaces the stage's earlier decisions with them and returns the rows written."""

    stage: Stage

    def verdicts(self, cat: Catalog) -> Iterable[Verdicts]:
        raise NotImplementedError

    def run(self, cat: Catalog) -> int:
        cat.clear_decisions(self.stage)
        return sum(record(cat, self.stage, v) for v in self.verdicts(cat))
