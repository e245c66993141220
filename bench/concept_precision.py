"""Concept precision of lexical matching, measured on a hand-labelled set of (caption, concept) pairs.

``bench/data/concept_precision.csv`` holds 600 pairs drawn at random (``draw``, fixed seed) from a quickstart
build: 300 from ALL lexical matches (``set=all``) and 300 from the balanced selection (``set=kept``: each kept
caption with the concept it was kept for), each judged against the concept's WordNet gloss — labelling rule and
error classes in ``docs/concepts.md`` ("Concept precision").

``report`` prints, per set, precision with a 95 % Wilson interval and the wrong pairs per error class. With
``--variant NAME=KEY=VALUE[;KEY=VALUE]`` (recipe overrides, e.g. ``match.lexical.min_sense_share=0.25``) it
re-runs the matcher on the labelled captions, against the recipe's concept bank (or ``--build``'s), once per
variant, and reports side by side: the labelled pairs each variant still matches, their precision, the recall
of the originally correct pairs, and the (caption, concept) pairs a variant adds over the first variant
(unjudged). A variant that only removes matches is measured exactly on ``all``; on ``kept`` it is the kept
sample with the removed pairs gone — a re-balanced selection would fill those slots with other captions.

    python bench/concept_precision.py report --recipe recipes/quickstart_curate.yaml \\
        --variant default= --variant share25=match.lexical.min_sense_share=0.25
    python bench/concept_precision.py draw BUILD --n 300 --seed 13 --out pairs.csv   (unlabelled, to judge)
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tether.clikit import run_command  # noqa: E402
from tether.recipe import RecipeError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "bench" / "data" / "concept_precision.csv"
COLUMNS = ["uid", "caption", "concept_id", "concept_name", "gloss", "matched_form", "set", "correct",
           "error_class", "note"]
SETS = ("all", "kept")
ERROR_CLASSES = {
    "a": "rare noun sense: the common sense is not in the bank",
    "b": "not a common noun here (verb, adjective, quantifier, part of a name)",
    "c": "wrong sense in context (the chosen sense is a common one)",
    "d": "compound / multi-word expression not in the bank",
    "e": "matched as the plural of another concept",
}


# ------------------------------------------------------------------------------------------ statistics
def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95 % for the default ``z``); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Precision:
    n: int
    correct: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.value:.3f} [{lo:.3f}, {hi:.3f}] (n={self.n})"


def precision(rows: Iterable[dict]) -> Precision:
    rows = list(rows)
    return Precision(len(rows), sum(int(r["correct"]) for r in rows))


def error_counts(rows: Iterable[dict]) -> dict[str, int]:
    """Wrong pairs per error class (every class listed, 0 when absent)."""
    out = {c: 0 for c in ERROR_CLASSES}
    for r in rows:
        if not int(r["correct"]):
            out[r["error_class"]] += 1
    return out


# ------------------------------------------------------------------------------------------ labels
def read_labels(path: str | Path = LABELS) -> list[dict]:
    """The labelled pairs, checked: expected columns, ``set`` in all/kept, ``correct`` 0/1, an error class for
    (exactly) the wrong ones. One-line RecipeError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no labelled pairs here")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise RecipeError(f"{path}: columns {reader.fieldnames} (expected {COLUMNS})")
        rows = list(reader)
    for i, r in enumerate(rows, start=2):
        if r["set"] not in SETS or r["correct"] not in ("0", "1"):
            raise RecipeError(f"{path}:{i}: set must be all|kept and correct 0|1")
        if (r["correct"] == "0") != (r["error_class"] in ERROR_CLASSES) or (r["correct"] == "1" and r["error_class"]):
            raise RecipeError(f"{path}:{i}: a wrong pair needs an error class a-e, a correct one none")
    return rows


# ------------------------------------------------------------------------------------------ re-matching
def _bank_catalog(tmp: Path, recipe, recipe_dir: Path, build: str | None):
    """A scratch catalog holding the concept bank: ``build``'s tables, else built from the recipe."""
    from curate.catalog import Catalog
    from curate.concepts import SURFACE_FORMS_DDL, build_concepts

    cat = Catalog(tmp / "bank.duckdb")
    if build:
        src = Path(build) / "catalog.duckdb"
        if not src.is_file():
            raise RecipeError(f"--build {build}: no catalog.duckdb there")
        cat.execute(f"ATTACH '{src}' AS b (READ_ONLY)")
        cat.execute(SURFACE_FORMS_DDL)
        for table in ("concepts", "surface_forms"):
            cat.execute(f"DELETE FROM {table}")
            cat.execute(f"INSERT INTO {table} SELECT * FROM b.{table}")
        cat.execute("DETACH b")
    else:
        build_concepts(cat, recipe.concepts, progress=False, base_dir=recipe_dir)
    return cat


def match_pairs(captions: dict[str, str], recipe_path: str, overrides: Sequence[str], tmp: Path,
                build: str | None = None) -> set[tuple[str, str]]:
    """(uid, concept_id) pairs that ``match.lexical`` of the recipe (+ ``overrides``) finds in ``captions``."""
    from curate.config import BuildRecipe
    from curate.match import RuleMatcher, lexical_plan
    from tether.recipe import load_recipe

    recipe = load_recipe(recipe_path, BuildRecipe, list(overrides))
    cfg = recipe.match.lexical
    key = "build" if build else recipe.concepts.model_dump_json()
    sub = tmp / f"bank{abs(hash(key))}"
    sub.mkdir(exist_ok=True)
    cat = _bank_catalog(sub, recipe, Path(recipe_path).resolve().parent, build)
    try:
        plan = lexical_plan(cat, cfg)
    finally:
        cat.close()
    rules = RuleMatcher(plan, cfg)
    uids = list(captions)
    texts = [captions[u] for u in uids]
    (ci, cc, _), _ = rules(texts)
    return {(uids[i], rules.matcher.concept_ids[c]) for i, c in zip(ci, cc)}


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE;KEY=VALUE`` (or ``NAME=`` for the recipe as it is) → (name, overrides)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise RecipeError(f"--variant {spec!r}: expected NAME=KEY=VALUE[;KEY=VALUE] or NAME=")
    return name, [o for o in rest.split(";") if o.strip()]


def compare(rows: list[dict], found: dict[str, set[tuple[str, str]]]) -> list[dict]:
    """Per variant and set: precision of the labelled pairs it still matches, recall of the correct ones,
    wrong pairs per class left, pairs added over the first variant (on the same captions)."""
    out = []
    names = list(found)
    for name in names:
        pairs = found[name]
        for s in SETS:
            rs = [r for r in rows if r["set"] == s]
            kept = [r for r in rs if (r["uid"], r["concept_id"]) in pairs]
            uids = {r["uid"] for r in rs}
            base = {p for p in found[names[0]] if p[0] in uids}
            mine = {p for p in pairs if p[0] in uids}
            n_correct = sum(int(r["correct"]) for r in rs)
            p = precision(kept)
            out.append({"variant": name, "set": s, "precision": p,
                        "recall": p.correct / n_correct if n_correct else float("nan"),
                        "errors": error_counts(kept), "added": len(mine - base), "labelled": len(rs)})
    return out


# ------------------------------------------------------------------------------------------ output
def report_md(rows: list[dict], comparison: list[dict] | None = None) -> str:
    lines = ["| set | pairs | precision [95 % Wilson] | " + " | ".join(f"({c})" for c in ERROR_CLASSES) + " |",
             "|---|---|---|" + "---|" * len(ERROR_CLASSES)]
    for s in SETS:
        rs = [r for r in rows if r["set"] == s]
        p, e = precision(rs), error_counts(rs)
        lo, hi = p.interval
        lines.append(f"| {s} | {p.n} | {p.value:.3f} [{lo:.3f}, {hi:.3f}] | "
                     + " | ".join(str(e[c]) for c in ERROR_CLASSES) + " |")
    lines.append("")
    lines += [f"({c}) {d}" for c, d in ERROR_CLASSES.items()]
    if comparison:
        lines += ["", "| variant | set | matched / labelled | precision [95 % Wilson] | recall of correct | "
                  + " | ".join(f"({c})" for c in ERROR_CLASSES) + " | added pairs |",
                  "|---|---|---|---|---|" + "---|" * len(ERROR_CLASSES) + "---|"]
        for c in comparison:
            p = c["precision"]
            lo, hi = p.interval
            lines.append(f"| {c['variant']} | {c['set']} | {p.n} / {c['labelled']} | {p.value:.3f} "
                         f"[{lo:.3f}, {hi:.3f}] | {c['recall']:.3f} | "
                         + " | ".join(str(c["errors"][k]) for k in ERROR_CLASSES) + f" | {c['added']} |")
    return "\n".join(lines) + "\n"


def draw(build: str, n: int, seed: int, out: str) -> None:
    """``n`` random pairs from all lexical matches and ``n`` from the kept selection of ``build`` (unlabelled)."""
    import duckdb
    import numpy as np

    src = Path(build) / "catalog.duckdb"
    if not src.is_file():
        raise RecipeError(f"{build}: no catalog.duckdb there")
    con = duckdb.connect(str(src), read_only=True)
    cols = "s.caption, m.concept_id, c.name, c.gloss, m.span"
    pools = {
        "all": con.execute(f"SELECT m.uid, {cols} FROM matches m JOIN samples s USING (uid) "
                           "JOIN concepts c USING (concept_id) WHERE m.method = 'lexical' "
                           "ORDER BY m.uid, m.concept_id").fetchall(),
        "kept": con.execute(f"SELECT d.uid, {cols} FROM decisions d JOIN samples s USING (uid) "
                            "JOIN concepts c USING (concept_id) JOIN matches m ON m.uid = d.uid "
                            "AND m.concept_id = d.concept_id AND m.method = 'lexical' "
                            "WHERE d.stage = 'balance' AND d.kept ORDER BY d.uid").fetchall(),
    }
    con.close()
    rng = np.random.default_rng(seed)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for name in SETS:
            pool = pools[name]
            if len(pool) < n:
                raise RecipeError(f"{build}: only {len(pool)} {name} pairs, fewer than --n {n}")
            for i in sorted(rng.choice(len(pool), size=n, replace=False)):
                w.writerow([*pool[i], name, "", "", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="precision of the labelled pairs, and of re-matched variants")
    r.add_argument("--labels", default=str(LABELS))
    r.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart_curate.yaml"))
    r.add_argument("--build", help="take the concept bank from this build instead of building the recipe's")
    r.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE[;KEY=VALUE] recipe overrides")
    r.add_argument("--out", help="also write the markdown report here")
    d = sub.add_parser("draw", help="draw unlabelled pairs from a build")
    d.add_argument("build")
    d.add_argument("--n", type=int, default=300)
    d.add_argument("--seed", type=int, default=13)
    d.add_argument("--out", required=True)
    return run_command(_run, ap.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "draw":
        draw(args.build, args.n, args.seed, args.out)
        return 0
    rows = read_labels(args.labels)
    comparison = None
    if args.variant:
        variants = [parse_variant(v) for v in args.variant]
        captions = {r["uid"]: r["caption"] for r in rows}
        with tempfile.TemporaryDirectory() as tmp:
            found = {name: match_pairs(captions, args.recipe, ov, Path(tmp), args.build) for name, ov in variants}
        comparison = compare(rows, found)
    text = report_md(rows, comparison)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
