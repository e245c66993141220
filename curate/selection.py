"""The build's output: a parquet selection of the samples that survived every stage, ready for img2dataset.

Columns (one row per surviving sample, in ``(source, row_index)`` order):

``uid`` · ``url`` (null for local rows) · ``path`` (absolute local image path, null for URL rows) · ``caption`` ·
``concept_ids`` (every matched concept, sorted; empty list when none) · ``concept_names`` (same order) ·
``balance_concept`` (the concept whose draw / quota kept the sample; null when balancing was off) · ``source`` ·
``width`` · ``height`` · one column per ``output.extra_columns`` entry (from the source's extra columns).

img2dataset reads it with ``input_format="parquet", url_col="url", caption_col="caption",
save_additional_columns=["uid", ...]``. The file is written to a temporary name and renamed, so a killed
build never leaves a truncated selection.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from typing import Annotated

from pydantic import Field, StringConstraints

from curate.catalog import Catalog
from curate.stages import Stage
from tether.fileio import check_outside_file, is_inside, output_path, record_outside_file, remove_path
from tether.recipe import Strict


class OutputConfig(Strict):
    """Recipe section ``output:``."""

    selection: str = "selection.parquet"  # inside the build folder (relative to it, or absolute)
    allow_outside_build: bool = False  # true: `selection` may point outside the build folder (never over a
    #                                    file tether did not write there)
    extra_columns: list[Annotated[str, StringConstraints(pattern=r"^[^'\"]+$")]] = []
    card: bool = True
    card_top_concepts: int = Field(default=40, ge=1)


def selection_sql(cfg: OutputConfig, balance_stage: Stage = Stage.BALANCE) -> str:
    extras = "".join(
        f", json_extract_string(s.extra, '$.\"{c}\"') AS \"{c}\"" for c in cfg.extra_columns)
    return f"""
        SELECT s.uid, s.url, s.path, s.caption,
               coalesce(m.concept_ids, []::VARCHAR[]) AS concept_ids,
               coalesce(m.concept_names, []::VARCHAR[]) AS concept_names,
               b.concept_id AS balance_concept, s.source, s.width, s.height{extras}
        FROM alive s
        LEFT JOIN (
          -- the matches of surviving rows only; a plain list() sorted afterwards (an ORDER BY inside the
          -- aggregate cannot spill: it ran out of a 1GB memory_limit at 10M rows)
          SELECT uid, list_transform(l, lambda x: x.c) AS concept_ids, list_transform(l, lambda x: x.n) AS concept_names
          FROM (SELECT uid, list_sort(list({{'c': concept_id, 'n': coalesce(name, concept_id)}})) AS l
                FROM (SELECT DISTINCT mm.uid, mm.concept_id, c.name FROM matches mm SEMI JOIN alive USING (uid)
                      LEFT JOIN concepts c USING (concept_id))
                GROUP BY uid)) m USING (uid)
        LEFT JOIN (SELECT uid, concept_id FROM decisions WHERE stage = '{balance_stage}' AND kept) b USING (uid)
        ORDER BY s.source, s.row_index"""


def write_selection(cat: Catalog, build_dir: str | Path, cfg: OutputConfig) -> tuple[Path, int]:
    """Write the selection parquet atomically; returns its path and row count. It stays inside the build folder
    unless ``cfg.allow_outside_build``, and even then never replaces a file this build did not write."""
    out = selection_path(build_dir, cfg)
    check_outside_file(build_dir, out, "output.selection")
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_inside(out, build_dir):
        tmp = out.with_name(out.name + ".tmp")
        remove_path(tmp, build_dir)
    else:  # a fresh name that cannot be anyone else's file
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    cat.execute(f"COPY ({selection_sql(cfg)}) TO '{_q(tmp)}' (FORMAT parquet, COMPRESSION zstd)")
    os.replace(tmp, out)
    record_outside_file(build_dir, out)
    n = int(cat.scalar(f"SELECT count(*) FROM read_parquet('{_q(out)}')"))
    return out, n


def selection_path(build_dir: str | Path, cfg: OutputConfig) -> Path:
    """The selection file of a build (one-line error when it leaves the build folder without the opt-in)."""
    return output_path(build_dir, cfg.selection, "output.selection", cfg.allow_outside_build)


def _q(p: Path) -> str:
    return str(p).replace("'", "''")
