"""t-balancing (MetaCLIP) and coverage balancing (freeze-align) on catalogs made here."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.balance import BalanceConfig, preview_t, run_balance
from curate.catalog import Catalog


def _catalog(tmp_path, matches: list[tuple[str, str, float]], n_samples: int, name="c.duckdb") -> Catalog:
    cat = Catalog(tmp_path / name)
    cat.execute(f"""INSERT INTO samples(uid, source, row_index, url, path, caption, width, height, extra)
                    SELECT 'u' || i, 's', i, 'http://x/' || i, NULL, 'c ' || i, NULL, NULL,
                    NULL FROM range({n_samples}) r(i)""")
    if matches:
        cat.insert_arrow("matches", pa.table({"uid": [m[0] for m in matches], "c": [m[1] for m in matches],
                                              "s": [m[2] for m in matches]}), "uid, c, 'lexical', s, NULL")
    return cat


def _skewed(n=6000):
    """'head' matched by every 2nd sample, 'mid' by every 5th, 'tail' by every 100th; u0..: overlap allowed."""
    ms = []
    for i in range(n):
        if i % 2 == 0:
            ms.append((f"u{i}", "head", 1.0))
        if i % 5 == 0:
            ms.append((f"u{i}", "mid", 1.0))
        if i % 100 == 0:
            ms.append((f"u{i}", "tail", 1.0))
    return ms


def _kept(cat: Catalog, stage="balance") -> set[str]:
    return {r[0] for r in cat.execute("SELECT uid FROM decisions WHERE stage = ? AND kept", [stage]).fetchall()}


def test_t_balance_caps_head_keeps_tail_and_is_deterministic(tmp_path):
    cat = _catalog(tmp_path, _skewed(), 6000)
    rep = run_balance(cat, BalanceConfig(t=200, seed=1), progress=False)
    report = {c: (b, a) for c, b, a in cat.execute(
        "SELECT concept_id, before, after FROM balance_report WHERE stage='balance'").fetchall()}
    assert report["tail"] == (60, 60)  # below t: every pair kept
    assert report["head"][0] == 3000 and report["mid"][0] == 1200
    # a head pair also survives through 'mid' draws and vice versa: expected head ≈ 200 + mid-only wins
    assert 150 < report["head"][1] < 450 and 150 < report["mid"][1] < 450
    assert rep.candidates == 6000 and rep.matched == 3000 + 1200 - 600 + 0  # |head ∪ mid ∪ tail|
    kept1 = _kept(cat)
    assert {f"u{i}" for i in range(0, 6000, 100)} <= kept1
    # unmatched samples are dropped with a reason
    assert cat.scalar("SELECT reason FROM decisions WHERE uid = 'u1'") == "no concept match"
    # same seed → same selection, independent of reruns; another seed → another selection
    run_balance(cat, BalanceConfig(t=200, seed=1), progress=False)
    assert _kept(cat) == kept1
    assert cat.scalar("SELECT count(*) FROM decisions WHERE stage = 'balance'") == 6000
    run_balance(cat, BalanceConfig(t=200, seed=2), progress=False)
    assert _kept(cat) != kept1
    # insertion order of matches does not matter
    cat2 = _catalog(tmp_path, list(reversed(_skewed())), 6000, "c2.duckdb")
    run_balance(cat2, BalanceConfig(t=200, seed=1), progress=False)
    assert _kept(cat2) == kept1


def test_preview_is_the_expectation_of_the_draws(tmp_path):
    cat = _catalog(tmp_path, _skewed(), 6000)
    pv = preview_t(cat, [50, 200, 100000])
    assert [p["t"] for p in pv] == [50, 200, 100000]
    assert pv[2]["expected"] == pytest.approx(3600)  # t above every count: every matched sample kept
    assert pv[0]["capped_concepts"] == 3 and pv[1]["capped_concepts"] == 2
    # hand-computed expectation for t=200 (head p=200/3000, mid p=200/1200, tail p=1)
    ph, pm = 200 / 3000, 200 / 1200
    n_both = 600 - 60  # multiples of 10 that are not multiples of 100
    expected = 60 + (3000 - 600) * ph + (1200 - 600) * pm + n_both * (1 - (1 - ph) * (1 - pm))
    assert pv[1]["expected"] == pytest.approx(expected, rel=1e-9)
    got = [len(_kept(cat)) for seed in range(8) if run_balance(cat, BalanceConfig(t=200, seed=seed),
                                                               progress=False)]
    assert abs(np.mean(got) - expected) < 4 * np.sqrt(expected / 8)
    assert cat.scalar("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '\\_b%' ESCAPE '\\'") == 0


def test_coverage_unique_assignment_weak_tails_first(tmp_path):
    # c_small has 3 candidates (u0..u2) that c_big (10 candidates u0..u9) ALSO wants most
    ms = [(f"u{i}", "big", 1.0 - i / 100) for i in range(10)]
    ms += [(f"u{i}", "small", 0.5 + i / 100) for i in range(3)]
    ms += [("u11", "tiny", 0.9)]
    cat = _catalog(tmp_path, ms, 12)
    rep = run_balance(cat, BalanceConfig(method="coverage", per_concept=2, floor=3), progress=False)
    owner = dict(cat.execute("SELECT uid, concept_id FROM decisions WHERE stage='balance' AND kept").fetchall())
    # order: tiny (1 candidate) → small (3) → big (10); small takes its 2 best (u2, u1); big the best unclaimed
    assert owner == {"u11": "tiny", "u2": "small", "u1": "small", "u0": "big", "u3": "big"}
    assert rep.kept == 5 and rep.candidates == 12 and rep.matched == 11
    # report "after" = kept samples matched to the concept (whoever claimed them): big 4, small 3, tiny 1
    assert rep.shortfall == [("tiny", 1, 3)]
    assert dict(cat.execute("SELECT concept_id, after FROM balance_report").fetchall()) == \
        {"big": 4, "small": 3, "tiny": 1}
    reasons = dict(cat.execute("SELECT uid, reason FROM decisions WHERE stage='balance' AND NOT kept").fetchall())
    assert reasons["u10"] == "no concept match" and reasons["u9"].startswith("coverage: not among")


def test_candidates_sql_rebalances_survivors(tmp_path):
    cat = _catalog(tmp_path, _skewed(2000), 2000)
    run_balance(cat, BalanceConfig(t=100, seed=0), progress=False)
    first = _kept(cat)
    # a later stage loses half of the kept samples (e.g. failed downloads)
    lost = sorted(first)[::2]
    cat.insert_arrow("decisions", pa.table({"uid": lost}), "uid, 'download', false, 'failed', NULL, NULL")
    rep = run_balance(cat, BalanceConfig(t=50, seed=0, keep_unmatched=True), stage="rebalance",
                      candidates_sql="SELECT uid FROM alive")
    assert rep.candidates == len(first) - len(lost)
    assert _kept(cat, "rebalance") <= first - set(lost)
    assert cat.scalar("SELECT count(*) FROM decisions WHERE stage = 'balance'") == 2000  # untouched
    assert cat.scalar("SELECT count(*) FROM balance_report WHERE stage = 'rebalance'") == 3


def test_none_keeps_everything(tmp_path):
    cat = _catalog(tmp_path, _skewed(100), 100)
    rep = run_balance(cat, BalanceConfig(method="none"))
    assert rep.kept == rep.candidates == 100 and cat.scalar("SELECT count(*) FROM decisions") == 0
