"""Media stages after selection: download → image dedup → re-balance → shards (recipe section ``media:``).

:func:`media_steps` is the media part of the build plan (:mod:`curate.plan`): ``curate build`` runs it after the
caption steps; ``curate download BUILD``, ``curate shard BUILD`` and ``curate retry-failed BUILD`` (registered by
:func:`register`) run slices of it on an existing build, through the same loop and rule. Every stage records its
verdicts in the build's catalog (``decisions`` with stage ``download`` / ``image_dedup`` / ``agreement`` /
``rebalance``) and its key — parameters + input digest — in ``stages``, so a rerun skips what is done, resumes
what was killed, and redoes exactly the stages whose inputs changed (e.g. after ``retry-failed`` brought back
images). Details: docs/media.md.

Stage order and inputs:

1. ``download`` (:mod:`curate.download`): img2dataset for URL rows, decode check for local rows;
2. ``image_dedup`` (:mod:`curate.imagededup`): exact sha256, pHash near-dups, optional SemDeDup;
3. ``agreement`` (:mod:`curate.agreement`, off by default): image–text agreement scores and filters, and
   image-verified concept senses, with any CLIP-style scorer or tether's own aligned model;
4. ``rebalance``: :func:`curate.balance.run_balance` on the survivors (stage name ``rebalance``), with the
   build's own ``balance:`` settings unless ``media.rebalance.balance`` overrides them; per-concept losses and
   the shortfall below ``floor`` go to ``media/report.json``; matches the sense check refuted do not count;
5. ``shards`` (:mod:`curate.shards`): webdataset tars + sizes.json + index.parquet + HF dataset card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

from curate.agreement import AgreementConfig, agreement_step, refuted_pairs_sql, rule_counts
from curate.balance import BalanceConfig, concept_names, floor_note
from curate.catalog import Catalog
from curate.download import DownloadConfig, download_counts, download_step, retry_step, selection_step
from curate.imagededup import ImageDedupConfig, image_dedup_step
from curate.plan import Context, Done, Step, between, run_steps
from curate.shards import ShardConfig, out_dir_of, shard_summary, shards_step
from curate.stages import Begin, Stage
from tether.clikit import run_command
from tether.fileio import check_build_dir, claim_build_dir, claim_output_dir, open_build_dir
from tether.recipe import RecipeError, Strict, parse, read_yaml

REBALANCE = Stage.REBALANCE
DEDUP = Stage.IMAGE_DEDUP
AGREEMENT = Stage.AGREEMENT


class RebalanceConfig(Strict):
    """``media.rebalance``: re-run balancing on what survived download and dedup."""

    enabled: bool = True
    balance: Optional[BalanceConfig] = None  # None: the build's own ``balance:`` settings


class MediaRecipe(Strict):
    """Recipe section ``media:``."""

    download: DownloadConfig = DownloadConfig()
    image_dedup: ImageDedupConfig = ImageDedupConfig()
    agreement: AgreementConfig = AgreementConfig()
    rebalance: RebalanceConfig = RebalanceConfig()
    shards: ShardConfig = ShardConfig()

    def with_absolute_paths(self, base) -> "MediaRecipe":
        """A copy whose local model paths (``agreement.scorer``) resolve against ``base``, the recipe's folder
        (hub ids stay as they are): the path rule of every tether recipe."""
        from tether.recipe import resolve_input

        if not self.agreement.scorer:
            return self
        ag = self.agreement.model_copy(update={"scorer": resolve_input(self.agreement.scorer, base, may_be_id=True)})
        return self.model_copy(update={"agreement": ag})


# --------------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _params(cat: Catalog, stage: Stage) -> Optional[dict]:
    row = cat.stage_row(stage)
    return row.params_dict() if row else None


def _survivors_sql(before_rebalance: bool = False) -> str:
    """Stored media rows no stage rejected (``before_rebalance``: ignoring the re-balance's own verdicts)."""
    skip = f" AND x.stage <> '{REBALANCE.value}'" if before_rebalance else ""
    return f"""SELECT m.uid FROM media_rows m JOIN downloads d USING (uid) WHERE d.status = 'success'
              AND NOT EXISTS (SELECT 1 FROM decisions x WHERE x.uid = m.uid AND NOT x.kept{skip})"""


def balance_settings(cat: Catalog, cfg: RebalanceConfig) -> BalanceConfig:
    if cfg.balance is not None:
        return cfg.balance
    p = _params(cat, Stage.BALANCE)
    return BalanceConfig.model_validate(p) if p else BalanceConfig()


def concept_losses(cat: Catalog, floor: int = 0) -> list[dict]:
    """Per concept: samples in the selection, stored, after image dedup, final, and the shortfall below floor."""
    rows = cat.execute(f"""
        WITH c AS (SELECT uid, unnest(concept_ids) AS concept_id FROM media_rows),
        st AS (SELECT uid FROM downloads WHERE status = 'success'),
        dd AS ({_survivors_sql(before_rebalance=True)}),
        fin AS ({_survivors_sql()})
        SELECT concept_id, count(*) AS selected,
               count(*) FILTER (WHERE uid IN (SELECT uid FROM st)) AS stored,
               count(*) FILTER (WHERE uid IN (SELECT uid FROM dd)) AS after_dedup,
               count(*) FILTER (WHERE uid IN (SELECT uid FROM fin)) AS final
        FROM c GROUP BY 1 ORDER BY selected - final DESC, concept_id""").fetchall()
    return [{"concept_id": c, "selected": s, "stored": a, "after_dedup": d, "final": f,
             "shortfall": max(floor - f, 0)} for c, s, a, d, f in rows]


def run_rebalance(cat: Catalog, cfg: RebalanceConfig, progress: bool = True):
    from curate.balance import run_balance

    return run_balance(cat, balance_settings(cat, cfg), stage=REBALANCE, candidates_sql=_survivors_sql(),
                       progress=progress, exclude_pairs_sql=refuted_pairs_sql())


def rebalance_step(cfg: RebalanceConfig) -> Step:
    """The ``rebalance`` step: balancing again over what survived; its key holds the balance settings (the
    build's own unless overridden) and the digest of the survivors and of the refuted matches. Turned off, it only
    clears what it wrote before."""

    def inputs(ctx: Context) -> dict:
        if not cfg.enabled:
            return {}
        cat = ctx.cat
        h = hashlib.sha1("\n".join(sorted(r[0] for r in cat.execute(
            _survivors_sql(before_rebalance=True)).fetchall())).encode())
        for u, c in cat.execute(refuted_pairs_sql() + " ORDER BY 1, 2").fetchall():
            h.update(f"\n-{u}\t{c}".encode())
        return {"balance": balance_settings(cat, cfg).model_dump(), "input": h.hexdigest()[:16]}

    def run(ctx: Context, how: Begin) -> Done:
        if not cfg.enabled:
            return Done(None, "off")
        rep = run_rebalance(ctx.cat, cfg, ctx.progress)
        return Done(rep.kept, rep.words())

    return Step(REBALANCE, "media.rebalance", {} if cfg.enabled else {"enabled": False}, run, inputs=inputs)


def media_steps(recipe: MediaRecipe) -> list[Step]:
    """The media part of the build plan, in stage order: selection → download → image dedup → agreement →
    re-balance → shards. ``curate download`` runs the first two, ``curate shard`` the rest."""
    fmt = recipe.download.encode_format
    return [selection_step(), download_step(recipe.download), image_dedup_step(recipe.image_dedup, fmt),
            agreement_step(recipe.agreement, fmt), rebalance_step(recipe.rebalance), shards_step(recipe.shards, fmt)]


def media_report(ctx: Context, recipe: MediaRecipe) -> dict:
    """``media/report.json`` of the build as it stands (and the build's one line on concepts below the floor)."""
    cat, build_dir = ctx.cat, Path(ctx.build_dir)
    bal = balance_settings(cat, recipe.rebalance)
    report: dict = {"downloads": download_counts(cat),
                    "image_dedup": dict(cat.execute(
                        "SELECT split_part(reason, ' (', 1), count(*) FROM decisions WHERE stage = ? "
                        "GROUP BY 1 ORDER BY 1", [DEDUP]).fetchall()),
                    "agreement": rule_counts(cat),
                    "concept_matches_refuted": int(cat.scalar(
                        "SELECT count(*) FROM sense_checks WHERE NOT kept") or 0),
                    "rebalance_dropped": int(cat.scalar(
                        "SELECT count(*) FROM decisions WHERE stage = ? AND NOT kept", [REBALANCE]) or 0),
                    "concepts": concept_losses(cat, bal.floor)}
    report["concepts_short"] = sum(1 for c in report["concepts"] if c["shortfall"] > 0)
    if recipe.shards.enabled:
        sr = ctx.results.get(Stage.SHARDS) or shard_summary(cat, recipe.shards, build_dir)
        report["shards"] = {"dir": str(sr.out_dir), "shards": sr.shards, "samples": sr.samples}
    out = build_dir / "media" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if report["concepts_short"]:  # the build's one word on it: the final counts, after every loss
        when = "after download, dedup" + (" and rebalancing" if recipe.rebalance.enabled else "")
        short = {c["concept_id"]: c["final"] for c in report["concepts"] if c["shortfall"] > 0}
        log("  " + floor_note(short, sum(1 for c in report["concepts"] if c["selected"]), bal.floor, when, str(out),
                              concept_names(cat, short)))
    return report


def _context(cat: Catalog, build_dir, progress: bool, distributor=None, **kw) -> Context:
    return Context(cat, claim_build_dir(build_dir, cat), progress=progress, distributor=distributor, **kw)


def run_after_download(cat: Catalog, recipe: MediaRecipe, build_dir: str | Path, progress: bool = True,
                       encoder=None, distributor=None, scorer=None) -> dict:
    """Image dedup → agreement → re-balance → shards on the current downloads (the plan's slice after the
    download); returns the media report. ``encoder`` / ``scorer``: already loaded models for SemDeDup / the
    agreement stage (tests, notebooks)."""
    ctx = _context(cat, build_dir, progress, distributor, encoder=encoder, scorer=scorer)
    run_steps(ctx, between(media_steps(recipe), Stage.IMAGE_DEDUP))
    return media_report(ctx, recipe)


def run_media(cat: Catalog, recipe: MediaRecipe, selection_path: str | Path, build_dir: str | Path,
              progress: bool = True, encoder=None, distributor=None) -> dict:
    """All media stages over the selection parquet (resumable; see the module doc). Returns the report.
    ``distributor`` (:class:`tether.distribute.DistributorConfig`): where SemDeDup's image embedding runs, and the
    Ray cluster of a ``download.distributor: ray`` download."""
    ctx = _context(cat, build_dir, progress, distributor, encoder=encoder,
                   selection=Path(selection_path) if selection_path is not None else None)
    run_steps(ctx, media_steps(recipe))
    return media_report(ctx, recipe)


# --------------------------------------------------------------------------------------------------------
# CLI: curate download | shard | retry-failed
# --------------------------------------------------------------------------------------------------------
def load_media_recipe(build: Path, recipe: str | None = None) -> tuple[MediaRecipe, dict]:
    """The ``media`` section of ``recipe`` (full recipe or bare section) or of ``BUILD/recipe.yaml``."""
    path = Path(recipe) if recipe else build / "recipe.yaml"
    data = read_yaml(path)
    section = data.get("media", None) if ("media" in data or "sources" in data) else data
    if section is None:
        raise RecipeError(f"{path}: no media section (add `media:` to the recipe or pass --recipe)")
    return parse(MediaRecipe, section, f"{path}: media").with_absolute_paths(path.resolve().parent), data


def _selection_of(build: Path, data: dict, given: str | None) -> Path:
    if given:
        return Path(given)
    name = (data.get("output") or {}).get("selection", "selection.parquet")
    return build / name  # only read here (an absolute name stays as it is)


def _cmd(args) -> int:
    build = Path(args.build)
    try:
        if not (build / "catalog.duckdb").exists():
            raise RecipeError(f"{build}: no catalog.duckdb here (run `curate build` first)")
        check_build_dir(build)  # before reading anything of a folder tether did not make
        recipe, data = load_media_recipe(build, args.recipe)
        over = {k: v for k, v in (("seed", getattr(args, "seed", None)),
                                  ("samples_per_shard", getattr(args, "samples_per_shard", None))) if v is not None}
        if over:
            recipe = recipe.model_copy(update={"shards": parse(ShardConfig, {**recipe.shards.model_dump(), **over},
                                                               "command line: shards")})
        progress = not args.no_progress
        if recipe.shards.enabled and args.media_cmd == "shard":
            claim_output_dir(build, out_dir_of(recipe.shards, build), "media.shards.out", check_only=True)
        # a folder tether did not make is refused untouched; the build lock is held before the first write
        from tether.distribute import DistributorConfig

        # the build's distributor: SemDeDup's actors and the Ray cluster of a `download.distributor: ray` download
        dist = parse(DistributorConfig, data.get("distributor") or {}, f"{build}: distributor")
        steps = media_steps(recipe)
        with open_build_dir(build, create=False), Catalog(build / "catalog.duckdb") as cat:
            ctx = _context(cat, build, progress, dist)
            if args.media_cmd == "download":  # the plan's slice up to the download (asked for: on even if off)
                ctx.selection = _selection_of(build, data, args.selection)
                on = recipe.download.model_copy(update={"enabled": True})
                run_steps(ctx, [selection_step(), download_step(on)])
                print(json.dumps(download_counts(cat)))
            elif args.media_cmd == "retry-failed":  # the retry step (no other plan runs it)
                if not cat.stage_done(Stage.DOWNLOAD):
                    raise RecipeError(f"{build}: run `curate download {build}` first")
                run_steps(ctx, [retry_step(recipe.download)])
                got = ctx.results.get(Stage.DOWNLOAD_RETRY)
                print(json.dumps({"retried": got.rows if got else 0, **download_counts(cat)}))
                print(f"now run `curate shard {build}` to dedup, re-balance and re-shard", file=sys.stderr)
            else:  # the plan's slice after the download
                if not cat.stage_done(Stage.DOWNLOAD):
                    raise RecipeError(f"{build}: run `curate download {build}` first")
                run_steps(ctx, between(steps, Stage.IMAGE_DEDUP))
                rep = media_report(ctx, recipe)
                print(json.dumps({k: v for k, v in rep.items() if k != "concepts"}))
    except (RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    """Add ``download``, ``shard`` and ``retry-failed`` to the ``curate`` CLI."""
    helps = {"download": "download (img2dataset) / check local images of a build's selection",
             "shard": "image dedup, re-balance and write webdataset shards of a downloaded build",
             "retry-failed": "re-download only the rows whose download failed"}
    for name, text in helps.items():
        p = subparsers.add_parser(name, help=text, description=text)
        p.add_argument("build", help="build folder (holds catalog.duckdb and recipe.yaml)")
        p.add_argument("--recipe", help="recipe with a media: section (default: BUILD/recipe.yaml)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "download":
            p.add_argument("--selection", help="selection parquet (default: BUILD/<output.selection>)")
        if name == "shard":
            p.add_argument("--seed", type=int, help="reshard with this seed")
            p.add_argument("--samples-per-shard", type=int, help="reshard with this shard size")
        p.set_defaults(func=_cmd, media_cmd=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curate.media")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args)

if __name__ == "__main__":
    sys.exit(main())
