"""Benchmark: exact dedup + t-balancing over a synthetic N-row catalog (goal: 10M rows < 30 s).

Builds a DuckDB catalog of N samples (web-like urls with ~2% repeated urls, captions with ~3% repeated texts)
and ~1.6 matches per sample over a Zipf-distributed bank of C concepts, then times tether's SQL stages:
``run_exact_dedup`` (url, then normalized caption) and ``run_balance`` (t-balancing). Side by side, in the same
run, a naive pure-Python implementation of the same two steps (dict of seen keys; per-pair ``random.Random``
draws) on a subsample, reported as rows/s and the speed ratio.

    python bench/bench_balance_dedup.py --rows 10000000 --concepts 20000 --naive-rows 500000
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curate.balance import BalanceConfig, run_balance  # noqa: E402
from curate.catalog import Catalog  # noqa: E402
from curate.dedup import DedupConfig, run_exact_dedup  # noqa: E402


def make_catalog(path: Path, rows: int, concepts: int) -> Catalog:
    cat = Catalog(path)
    cat.execute(f"""INSERT INTO samples(uid, source, row_index, url, path, caption, width, height, extra)
        SELECT 'u' || i, 'synthetic', i,
               'http://img.example/' || CASE WHEN i % 50 = 7 THEN i // 3 ELSE i END || '.jpg', NULL,
               CASE WHEN i % 33 = 5 THEN 'a photo of a dog on the beach'
                    ELSE 'a ' || (['red', 'small', 'young', 'old'])[1 + i % 4] || ' thing number ' || i ||
                         ' near the ' || (['tree', 'car', 'house', 'river', 'street'])[1 + (i // 7) % 5] END,
               NULL, NULL, NULL
        FROM range({rows}) r(i)""")
    # 1-2 concepts per sample, Zipf-like: concept index = floor(C ** u) - 1 with u uniform from a hash
    cat.execute(f"""INSERT INTO matches
        SELECT 'u' || i, 'c' || (floor(pow({concepts}, (hash(i * 2 + k) % 1000003) / 1000003.0)) - 1)::BIGINT,
               'lexical', 1.0, NULL
        FROM range({rows}) r(i), range(2) k(k) WHERE k = 0 OR i % 5 < 3""")
    cat.execute("CHECKPOINT")
    return cat


def naive(rows: list[tuple[str, str, str]], matches: dict[str, list[str]], t: int, seed: int) -> int:
    """Reference implementation in plain Python: exact dedup by url then normalized caption, then t-balance."""
    seen_url: set[str] = set()
    seen_cap: set[str] = set()
    alive = []
    for uid, url, cap in rows:
        if url in seen_url:
            continue
        seen_url.add(url)
        norm = " ".join(re.sub(r"[^\w\s]+", " ", cap.lower()).split())
        if norm in seen_cap:
            continue
        seen_cap.add(norm)
        alive.append(uid)
    counts: dict[str, int] = defaultdict(int)
    for uid in alive:
        for c in matches.get(uid, ()):
            counts[c] += 1
    kept = 0
    for uid in alive:
        for c in matches.get(uid, ()):
            if random.Random(f"{uid}|{c}|{seed}").random() < t / max(counts[c], t):
                kept += 1
                break
    return kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--concepts", type=int, default=20_000)
    ap.add_argument("--t", type=int, default=20_000)
    ap.add_argument("--naive-rows", type=int, default=500_000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        cat = make_catalog(Path(d) / "bench.duckdb", args.rows, args.concepts)
        cat.execute(f"SET threads={args.threads}")
        n_m = cat.scalar("SELECT count(*) FROM matches")
        print(f"synthetic catalog: {args.rows:,} samples, {n_m:,} matches over {args.concepts:,} concepts "
              f"(made in {time.time() - t0:.1f}s)")

        t0, c0 = time.time(), time.process_time()
        dropped = run_exact_dedup(cat, DedupConfig(exact=["url", "caption"]))
        t_dedup, c_dedup = time.time() - t0, time.process_time() - c0
        t0, c0 = time.time(), time.process_time()
        rep = run_balance(cat, BalanceConfig(t=args.t, seed=0), progress=False)
        t_bal, c_bal = time.time() - t0, time.process_time() - c0
        total = t_dedup + t_bal
        goal = ("MET" if total < 30 else "MISSED") if args.rows >= 10_000_000 else "n/a"
        print(f"tether: exact dedup {t_dedup:.1f}s wall / {c_dedup:.1f}s CPU ({dropped:,} duplicates), t-balance "
              f"{t_bal:.1f}s wall / {c_bal:.1f}s CPU ({rep.kept:,} kept) -> {total:.1f}s wall total, "
              f"{args.rows / total:,.0f} rows/s [goal < 30 s for 10M rows: {goal}]")

        n = min(args.naive_rows, args.rows)
        rows = cat.execute(f"SELECT uid, url, caption FROM samples WHERE row_index < {n} ORDER BY row_index").fetchall()
        matches: dict[str, list[str]] = defaultdict(list)
        for uid, c in cat.execute(f"SELECT m.uid, m.concept_id FROM matches m JOIN samples s USING (uid) "
                                  f"WHERE s.row_index < {n}").fetchall():
            matches[uid].append(c)
        t_scaled = max(1, args.t * n // args.rows)
        t0, c0 = time.time(), time.process_time()
        kept = naive(rows, matches, t_scaled, 0)
        t_naive = time.time() - t0
        print(f"naive CPU time {time.process_time() - c0:.1f}s")
        naive_rate = n / t_naive
        print(f"naive Python on {n:,} rows (t scaled to {t_scaled}): {t_naive:.1f}s, {naive_rate:,.0f} rows/s "
              f"({kept:,} kept) -> tether is {args.rows / total / naive_rate:.1f}x faster per row "
              f"(naive extrapolated to {args.rows:,} rows: {args.rows / naive_rate:.0f}s)")
        cat.close()


if __name__ == "__main__":
    main()
