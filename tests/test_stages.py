"""The one stage list (curate.stages) and the one stage runner (Catalog.begin_stage)."""

from __future__ import annotations

import pytest

from curate.catalog import TABLES, Catalog
from curate.stages import CAPTION_STAGES, MEDIA_STAGES, OWNS, Begin, Stage


def test_every_stage_declares_what_it_owns_and_tables_exist():
    assert set(OWNS) == set(Stage)
    for decisions, tables in OWNS.values():
        assert all(t in TABLES for t, _ in tables)
    order = [s.order for s in (*CAPTION_STAGES, *MEDIA_STAGES)]
    assert order == sorted(order)
    assert Stage.MATCH.children == (Stage.MATCH_LEXICAL, Stage.MATCH_SEMANTIC)
    assert Stage.MATCH_LEXICAL not in Stage.MATCH.later() and Stage.MATCH_LEXICAL in Stage.CONCEPTS.later()
    assert f"{Stage.BALANCE}" == "balance" and Stage.of("nope") is None


def _add(cat, stage):
    cat.execute("INSERT INTO decisions VALUES ('u1', ?, false, 'x', NULL, NULL)", [stage])


def test_begin_stage_skip_resume_fresh(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        assert cat.begin_stage(Stage.FILTER, {"a": 1}) is Begin.FRESH
        _add(cat, Stage.FILTER)
        # running, not resumable: a rerun starts over and clears its decisions
        assert cat.begin_stage(Stage.FILTER, {"a": 1}) is Begin.FRESH
        assert cat.scalar("SELECT count(*) FROM decisions") == 0
        _add(cat, Stage.FILTER)
        cat.mark_done(Stage.FILTER, 1)
        assert cat.begin_stage(Stage.FILTER, {"a": 1}) is Begin.SKIP
        assert cat.scalar("SELECT count(*) FROM decisions") == 1
        assert cat.begin_stage(Stage.FILTER, {"a": 1}, rerun=True) is Begin.FRESH
        assert cat.scalar("SELECT count(*) FROM decisions") == 0
        # resumable and running with the same parameters: units and rows stay
        assert cat.begin_stage(Stage.MATCH_LEXICAL, {"p": 1}, resumable=True) is Begin.FRESH
        cat.execute("INSERT INTO matches VALUES ('u1', 'c', 'lexical', 1, 'dog'), ('u1', 'c', 'semantic', 1, NULL)")
        cat.add_unit(Stage.MATCH_LEXICAL, "0")
        assert cat.begin_stage(Stage.MATCH_LEXICAL, {"p": 1}, resumable=True) is Begin.RESUME
        assert cat.done_units(Stage.MATCH_LEXICAL) == {"0"}
        # changed parameters: only this stage's own rows go (the semantic match stays)
        assert cat.begin_stage(Stage.MATCH_LEXICAL, {"p": 2}, resumable=True) is Begin.FRESH
        assert cat.execute("SELECT method FROM matches").fetchall() == [("semantic",)]
        assert cat.done_units(Stage.MATCH_LEXICAL) == set()
        assert cat.stage_row(Stage.MATCH_LEXICAL).params_dict() == {"p": 2}


def test_begin_stage_clears_sub_stages_and_also_clear(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        for s in (Stage.BALANCE, Stage.MATCH_SEMANTIC):
            cat.begin_stage(s, {})
            cat.mark_done(s)
        _add(cat, Stage.BALANCE)
        cat.execute("INSERT INTO balance_report VALUES ('balance', 'c', 2, 1, 0, 0), ('rebalance', 'c', 1, 1, 0, 0)")
        cat.execute("INSERT INTO matches VALUES ('u1', 'c', 'semantic', 1, NULL)")
        assert cat.begin_stage(Stage.MATCH, {"m": 1}, also_clear=[Stage.BALANCE]) is Begin.FRESH
        assert cat.stage_row(Stage.MATCH_SEMANTIC) is None and cat.stage_row(Stage.BALANCE) is None
        assert cat.scalar("SELECT count(*) FROM matches") == 0
        assert cat.scalar("SELECT count(*) FROM decisions") == 0
        assert cat.execute("SELECT stage FROM balance_report").fetchall() == [("rebalance",)]


@pytest.mark.parametrize("stage", list(Stage))
def test_clear_stage_runs_for_every_stage(tmp_path, stage):
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.begin_stage(stage, {"x": 1})
        cat.clear_stage(stage)
        assert cat.stage_row(stage) is None
