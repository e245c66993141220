"""Cost of the agreement stage (``media.agreement``): images/s and captions/s of a cold run on a copy of a build,
and the share it adds to that build (the build's own recorded stage times as the baseline, side by side).

    python bench/bench_agreement.py --build runs/quickstart/curate --scorer runs/quickstart/align/model

The copy (catalog + marker; the stored images are read where they are) lives in a temporary folder, so the
build itself is not touched. Last line: ``agreement: <img/s> images/s, <cap/s> captions/s; adds <p> % to the
build (<a> s on top of <b> s)``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tether.clikit import run_command  # noqa: E402
from tether.recipe import RecipeError, parse  # noqa: E402


def run(args) -> int:
    from curate.agreement import AgreementConfig, run_agreement
    from curate.catalog import Catalog
    from tether.scorers import load_scorer

    build = Path(args.build)
    if not (build / "catalog.duckdb").is_file():
        raise RecipeError(f"--build {build}: no catalog.duckdb there")
    cfg = parse(AgreementConfig, {"enabled": True, "scorer": args.scorer, "batch_size": args.batch_size,
                                  "senses": {"enabled": not args.no_senses}}, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "build"
        copy.mkdir()
        for f in build.iterdir():
            if f.is_file():
                shutil.copy2(f, copy / f.name)
        with Catalog(copy / "catalog.duckdb") as cat:
            base = cat.execute("""SELECT stage, finished - started FROM stages
                                  WHERE finished IS NOT NULL AND stage <> 'agreement' ORDER BY started""").fetchall()
            cat.execute("DELETE FROM image_embeddings")
            cat.execute("DELETE FROM agreement_scores")
            t0 = time.perf_counter()
            scorer = load_scorer(args.scorer, key="--scorer")
            t_load = time.perf_counter() - t0
            t1 = time.perf_counter()
            res = run_agreement(cat, cfg, copy, scorer=scorer, progress=not args.no_progress)
            secs = time.perf_counter() - t1
    build_s = sum(s for _, s in base)
    print("| step | seconds |\n|---|---:|")
    for st, s in base:
        print(f"| {st} (recorded) | {s:.1f} |")
    print(f"| scorer load | {t_load:.1f} |\n| agreement (cold) | {secs:.1f} |")
    print(res.summary())
    total = secs + t_load
    print(f"agreement: {res.images / secs:.1f} images/s, {res.candidates / secs:.1f} captions/s; adds "
          f"{100 * total / max(build_s, 1e-9):.0f} % to the build ({total:.0f} s on top of {build_s:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--scorer", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-senses", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return run_command(run, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
