"""Benchmark: `curate serve` page latency (p50 / p95 per page type) on a real build and on a synthetic N-row one.

The synthetic build is the scale benchmark's catalog (bench/bench_balance_dedup.py: N samples, ~1.6 matches per
sample over a Zipf bank of C concepts) after tether's exact dedup and t-balancing, plus a concepts table and the
stage rows the explorer reads, and a ``samples.lang`` column when the generator made none. Pages are requested
in-process through Starlette's TestClient (no network), warm: the first overview request is reported separately.
The explorer's summary tables (curate.serve.Summary) are read from $TETHER_CACHE/serve, or built first (timed and
printed); ``--no-summary`` serves from the catalog alone.

    python bench/bench_serve.py --build runs/quickstart/curate            # a real build (read-only)
    python bench/bench_serve.py --rows 10000000 --concepts 20000          # a synthetic 10M-row build (temp folder)
    python bench/bench_serve.py --rows 10000000 --out DIR [--make-only]   # ... kept in DIR and reused
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_build(folder: Path, rows: int, concepts: int, t: int, memory_limit: str = "6GB") -> Path:
    """The synthetic build in ``folder`` (reused when its catalog is complete), with a ``samples.lang`` column
    (a fixed mix of en / de / fr / und) when the generator made none."""
    import duckdb
    from bench_balance_dedup import make_catalog

    from curate.balance import BalanceConfig, run_balance
    from curate.dedup import DedupConfig, run_exact_dedup

    if (folder / "catalog.duckdb").is_file() and (folder / "DONE").is_file():
        print(f"synthetic build: reusing {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalog.duckdb").unlink(missing_ok=True)
    t0 = time.time()
    # one DuckDB instance per file and process: the generator's connection shares this one's memory limit
    guard = duckdb.connect(str(folder / "catalog.duckdb"))
    guard.execute(f"SET GLOBAL memory_limit = '{memory_limit}'")
    cat = make_catalog(folder / "catalog.duckdb", rows, concepts)
    for stage, fn in (("dedup", lambda: run_exact_dedup(cat, DedupConfig(exact=["url", "caption"]))),
                      ("balance", lambda: run_balance(cat, BalanceConfig(t=t, seed=0), progress=False))):
        cat.mark_started(stage, {})
        fn()
        cat.mark_done(stage)
    cat.execute("""INSERT INTO concepts SELECT concept_id, 'concept ' || concept_id, [concept_id],
                   'a synthetic concept', 1, [], false, 'bench' FROM (SELECT DISTINCT concept_id FROM matches)""")
    cols = {r[0] for r in cat.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'samples'")
            .fetchall()}
    if "lang" not in cols:
        cat.execute("ALTER TABLE samples ADD COLUMN lang VARCHAR")
        cat.execute("""UPDATE samples SET lang = CASE row_index % 20 WHEN 0 THEN 'de' WHEN 1 THEN 'fr'
                       WHEN 2 THEN 'und' ELSE 'en' END""")
    cat.execute("CHECKPOINT")
    cat.close()
    guard.close()
    (folder / "DONE").write_text("complete\n")
    print(f"synthetic build: {rows:,} samples, {concepts:,} concepts, made in {time.time() - t0:.0f}s")
    return folder


def pick(con, rows: int) -> dict[str, list[str]]:
    """Request targets: head, middle and tail concepts, random samples, search words from captions."""
    cs = [r[0] for r in con.execute("""SELECT concept_id FROM (SELECT concept_id, count(*) AS n FROM matches
                                       GROUP BY 1) ORDER BY n DESC, 1""").fetchall()]
    concepts = [cs[0], cs[len(cs) // 2], cs[-1]] if cs else []
    uids = [r[0] for r in con.execute("SELECT uid FROM samples USING SAMPLE 10 ROWS (reservoir, 7)").fetchall()]
    caps = [c or "" for (c,) in con.execute("SELECT caption FROM samples USING SAMPLE 3 ROWS (reservoir, 3)")
            .fetchall()]
    words = [w for c in caps for w in c.split() if len(w) > 3][:3] or ["the"]
    # a word in few captions: the rarest of the sampled captions' words
    toks = {w for c in caps for w in re.findall(r"\w+", c.lower())}
    rare = min(toks, key=lambda w: (con.execute("SELECT count(*) FROM (SELECT 1 FROM samples WHERE caption ILIKE ? "
                                                 "LIMIT 1000)", [f"%{w}%"]).fetchone()[0], w)) if toks else "the"
    src = con.execute("SELECT source FROM samples LIMIT 1").fetchone()
    src = quote(src[0] if src and src[0] else "")
    head = quote(concepts[0], safe="") if concepts else "x"
    return {
        "overview": ["/"],
        "concepts": ["/concepts", "/concepts?page=5", "/concepts?q=" + quote(concepts[-1] if concepts else "x")],
        "concept": [f"/concept/{quote(c, safe='')}" for c in concepts],
        "concept p.3": [f"/concept/{quote(c, safe='')}?page=3&dpage=3" for c in concepts[:1]],
        "concept p.200": [f"/concept/{head}?page=200&dpage=200"],
        "sample": [f"/sample/{quote(u, safe='')}" for u in uids],
        "search": [f"/search?q={quote(w)}" for w in words] + ["/search?q=dog+beach&status=kept"],
        "search rare": [f"/search?q={quote(rare)}", f"/search?q={quote(words[0])}+{quote(rare)}&status=kept"],
        "search filtered": [f"/search?q={quote(words[0])}&concept={head}&status=kept",
                            f"/search?q={quote(words[-1])}&source={src}&status=dropped", f"/search?concept={head}"],
        "search p.100": ["/search?page=100", f"/search?q={quote(words[0])}&status=dropped&page=3"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", help="an existing build folder (else a synthetic one is made in a temp folder)")
    ap.add_argument("--out", help="make (or reuse) the synthetic build in this folder instead of a temp folder")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--concepts", type=int, default=20_000)
    ap.add_argument("--t", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--make-only", action="store_true", help="make the synthetic build (--out) and stop")
    ap.add_argument("--no-summary", action="store_true",
                    help="serve without the precomputed summary tables (every page queries the catalog itself)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from curate.serve import create_app

    with tempfile.TemporaryDirectory() as d:
        build = Path(args.build) if args.build else synthetic_build(Path(args.out or Path(d) / "build"), args.rows,
                                                                   args.concepts, args.t)
        if args.make_only:
            return
        t0 = time.time()
        app = create_app(build, summary=not args.no_summary)
        t_open = time.time() - t0
        ex = app.state.explorer
        if ex.summary is not None:
            made = ex.summary.seconds_to_build
            print(f"summary tables: {ex.summary.path} ("
                  + (f"built now in {made:.1f} s" if made is not None else "read from the cache") + ")")
        with ex.cursor() as cur:
            n = cur.execute("SELECT count(*) FROM samples").fetchone()[0]
            targets = pick(cur, n)
        client = TestClient(app)
        t0 = time.time()
        assert client.get("/").status_code == 200
        cold = time.time() - t0
        print(f"{build}: {n:,} samples; app opened in {t_open * 1000:.0f} ms, first overview (computes the cached "
              f"counts and concept table) {cold * 1000:.0f} ms")
        out = {"build": str(build), "samples": n, "cold_overview_ms": cold * 1000, "open_ms": t_open * 1000,
               "summary": not args.no_summary, "pages": {}}
        print(f"{'page':<14}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
        for kind, urls in targets.items():
            ts = []
            for _ in range(args.repeats):
                for u in urls:
                    t0 = time.time()
                    r = client.get(u)
                    ts.append((time.time() - t0) * 1000)
                    if r.status_code != 200:
                        raise SystemExit(f"{u}: HTTP {r.status_code}")
            ts.sort()
            p50, p95 = ts[len(ts) // 2], ts[min(len(ts) - 1, int(round(0.95 * (len(ts) - 1))))]
            out["pages"][kind] = {"requests": len(ts), "p50_ms": p50, "p95_ms": p95, "max_ms": ts[-1]}
            print(f"{kind:<14}{len(ts):>9}{p50:>9.1f}{p95:>9.1f}{ts[-1]:>9.1f}")
        client.close()
        ex.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
