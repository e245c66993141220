"""``curate`` command line: build, inspect, stats, preview (+ subcommands from plugin modules).

Errors in user input (recipes, files, data) print ``error: <one line>`` and exit with status 2; set
``TETHER_DEBUG=1`` to get the Python traceback instead.

Plugins: every module in :data:`PLUGINS` is imported lazily and, if it defines ``register(subparsers)``, may add
subcommands (a plugin that is missing or has no ``register`` is skipped). A plugin subcommand sets its handler
with ``parser.set_defaults(func=handler)``; ``handler(args)`` returns an exit status (or None for 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curate import report
from curate.stages import CAPTION_STAGES, Stage
from tether.clikit import UserError, add_plugins, run_command

PLUGINS = ["curate.media", "curate.serve"]


def _catalog_path(build: str) -> Path:
    p = Path(build)
    if p.is_dir():
        p = p / "catalog.duckdb"
    if not p.exists():
        raise UserError(f"{build}: no build catalog here (run `curate build RECIPE` first)")
    return p


def _open(build: str):
    from curate.catalog import Catalog

    return Catalog(_catalog_path(build), read_only=True)


def _table(headers: list[str], rows: list[tuple]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else (f"{v:,}" if isinstance(v, int) and not
                                            isinstance(v, bool) else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ commands
def cmd_build(args) -> int:
    from curate.config import load_build_recipe
    from curate.pipeline import build

    recipe = load_build_recipe(args.recipe, args.set)
    res = build(recipe, out=args.out, progress=not args.no_progress, until=args.until,
                recipe_dir=Path(args.recipe).resolve().parent)
    print(f"build: {res.build_dir}")
    print(f"catalog: {res.catalog}")
    if res.selection:
        print(f"selection: {res.selection} ({res.selected:,} rows)" if res.selected is not None
              else f"selection: {res.selection}")
    if res.card:
        print(f"data card: {res.card}")
    return 0


def cmd_inspect(args) -> int:
    with _open(args.build) as cat:
        row = report.sample_row(cat.con, args.uid)
        if row is None:
            raise UserError(f"uid {args.uid!r} is not in {args.build}")
        print(f"uid: {row['uid']}\nsource: {row['source']} row {row['row_index']}")
        for k in ("url", "path", "caption", "width", "height", "extra"):
            if row.get(k) is not None:
                v = str(row[k])
                print(f"{k}: {v if len(v) <= 200 else v[:200] + f'... ({len(v)} chars)'}")
        ms = report.sample_matches(cat.con, args.uid)
        print(f"matches: {len(ms)}")
        for cid, name, method, score, span in ms:
            print(f"  {cid} {name} [{method}] score={score if score is None else round(score, 4)}"
                  + (f" span={span}" if span else ""))
        why = report.explain(report.ran_stages(cat.con), report.sample_decisions(cat.con, args.uid))
        print("decisions:")
        for st in why.stages:
            if not st["decisions"]:
                print(f"  {st['stage']}: passed (no objection)"
                      + ("" if st["status"] == "done" else f" [stage {st['status']}]"))
            for d in st["decisions"]:
                print(f"  {st['stage']}: {'KEPT' if d['kept'] else 'DROPPED'} - {d['reason']}"
                      + (f" (duplicate of {d['ref']})" if d["ref"] else "")
                      + (f" [concept {d['concept']}]" if d["concept"] else ""))
        alive = cat.scalar("SELECT count(*) FROM alive WHERE uid = ?", [args.uid])
        print(f"verdict: {why.verdict or 'selected' if not alive else 'alive (no stage rejected it)'}")
    return 0


def cmd_stats(args) -> int:
    with _open(args.build) as cat:
        total = cat.scalar("SELECT count(*) FROM samples")
        print(f"samples: {total:,}  alive: {cat.scalar('SELECT count(*) FROM alive'):,}")
        print("\nper stage:")
        print(_table(["stage", "status", "judged", "rejected", "alive after"], report.stage_counts(cat.con)))
        reasons = report.top_reasons(cat.con, args.reasons)
        if reasons:
            print("\nrejection reasons:")
            print(_table(["stage", "reason", "rows"], reasons))
        cols, rows = report.concept_counts_by_stage(cat.con, limit=None if args.concept else args.concepts,
                                                    concept=args.concept)
        if rows:
            n = cat.scalar("SELECT count(DISTINCT concept_id) FROM matches")
            print(f"\nper concept (samples alive after each stage; {len(rows)} of {n:,} matched concepts):")
            print(_table(cols, rows))
        elif args.concept:
            raise UserError(f"concept {args.concept!r} has no matches in {args.build}")
    return 0


def cmd_preview(args) -> int:
    from curate.balance import candidates_before, preview_t
    from curate.catalog import Catalog
    from curate.config import load_build_recipe
    from curate.pipeline import build

    try:
        ts = [int(x) for x in args.t.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--t: expected comma-separated integers, got {args.t!r}") from None
    if not ts or min(ts) < 1:
        raise UserError("--t: give at least one positive integer")
    recipe = load_build_recipe(args.recipe, args.set)
    res = build(recipe, out=args.out, progress=not args.no_progress, until=Stage.MATCH.value,
                recipe_dir=Path(args.recipe).resolve().parent)
    with Catalog(res.catalog) as cat:
        rows = preview_t(cat, ts, recipe.balance, candidates_sql=candidates_before(cat, Stage.BALANCE))
    c = rows[0]
    print(f"candidates {c['candidates']:,} (matched {c['matched']:,}) over {c['concepts']:,} concepts")
    print(_table(["t", "expected pairs", "share of candidates", "concepts capped"],
                 [(r["t"], int(round(r["expected"])), f"{r['expected'] / max(1, r['candidates']):.1%}",
                   r["capped_concepts"]) for r in rows]))
    return 0


# --------------------------------------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="tether curation: sources → balanced selection")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="run (or resume) a build from a recipe")
    b.add_argument("recipe")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    b.add_argument("--out", help="build folder: new, empty, or an earlier tether build (default: recipe `out` or "
                                  "builds/<name>)")
    b.add_argument("--until", choices=[s.value for s in CAPTION_STAGES], help="stop after this stage")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("inspect", help="every decision taken on one sample")
    i.add_argument("build", help="build folder or catalog.duckdb")
    i.add_argument("--uid", required=True)
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("stats", help="counts per stage and per concept")
    s.add_argument("build")
    s.add_argument("--concepts", type=int, default=30, help="how many concepts to list (largest first)")
    s.add_argument("--concept", help="only this concept id")
    s.add_argument("--reasons", type=int, default=15, help="how many rejection reasons to list")
    s.set_defaults(func=cmd_stats)

    v = sub.add_parser("preview", help="expected t-balancing output size per t (runs the build up to match)")
    v.add_argument("recipe")
    v.add_argument("--t", required=True, help="comma-separated t values, e.g. 1000,5000,20000")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--out")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_preview)

    add_plugins(sub, PLUGINS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
