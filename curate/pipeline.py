"""The build plan of a recipe and ``curate build``: :func:`plan` lists every step of a build — the caption steps
(:data:`curate.stages.CAPTION_STAGES`: ``ingest → filter → dedup → neardup → concepts → match → balance → select``)
then, when the recipe has a ``media`` section, the media steps (:func:`curate.media.media_steps`) — and
:func:`build` runs it through the one loop of :mod:`curate.plan` (its docstring has the one rerun rule: skip what is
done with the same key, resume what was killed, clear every later stage before a step reruns).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curate.catalog import Catalog
from curate.config import BuildRecipe
from curate.plan import Context, ModelNeed, Step, models_of, preflight, run_steps, until as plan_until
from curate.stages import CAPTION_STAGES, Begin, Stage
from tether.fileio import atomic_write, open_build_dir

STAGES = tuple(s.value for s in CAPTION_STAGES)  # `curate build --until` choices


@dataclass
class BuildResult:
    build_dir: Path
    catalog: Path
    selection: Path | None = None
    selected: int | None = None
    card: Path | None = None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def caption_steps(recipe: BuildRecipe) -> list[Step]:
    """The caption part of the build plan, in stage order."""
    from curate import balance, card, dedup, filters, selection, sources

    def run_concepts(ctx: Context, how: Begin) -> int:
        from curate.concepts import build_concepts

        return build_concepts(ctx.cat, recipe.concepts, progress=ctx.progress, base_dir=ctx.recipe_dir)

    def run_match(ctx: Context, how: Begin) -> int:
        from curate.match import run_match

        return run_match(ctx.cat, recipe.match, progress=ctx.progress, distributor=recipe.distributor,
                         threads=recipe.threads)

    def run_balance(ctx: Context, how: Begin) -> int:
        rep = balance.run_balance(ctx.cat, recipe.balance, Stage.BALANCE, progress=ctx.progress)
        log(f"  {rep.summary()}")
        return rep.kept

    def run_select(ctx: Context, how: Begin) -> int:
        path, n = selection.write_selection(ctx.cat, ctx.build_dir, recipe.output)
        ctx.selection, ctx.selected = path, n
        if recipe.output.card:
            ctx.card = card.write_card(ctx.cat, ctx.build_dir, recipe.name, recipe.output.card_top_concepts, n)
        return n

    near, match = recipe.dedup.near, recipe.match
    near_model = (("dedup.near.model", near.model, ("config.json",)),) if near.enabled else ()
    match_model = ((("match.semantic.model", match.semantic.model, ("config.json",)),)
                   if match.mode in ("semantic", "both") else ())
    return [
        Step(Stage.INGEST, "sources, ingest", {"sources": [s.model_dump() for s in recipe.sources],
                                               "ingest": recipe.ingest.model_dump()},
             lambda ctx, how: sources.run_ingest(ctx.cat, recipe.sources, recipe.ingest, progress=ctx.progress),
             resumable=True, counts="rows ingested"),
        Step(Stage.FILTER, "filter", recipe.filter.model_dump(),
             lambda ctx, how: filters.run_filters(ctx.cat, recipe.filter), counts="rows rejected"),
        Step(Stage.DEDUP, "dedup.exact", {"exact": recipe.dedup.exact},
             lambda ctx, how: dedup.run_exact_dedup(ctx.cat, recipe.dedup), counts="duplicate rows rejected"),
        Step(Stage.NEARDUP, "dedup.near", near.model_dump(),
             lambda ctx, how: dedup.run_near_dup(ctx.cat, near, progress=ctx.progress,
                                                 distributor=recipe.distributor),
             models=near_model, counts="near-duplicate captions rejected"),
        Step(Stage.CONCEPTS, "concepts", recipe.concepts.model_dump(), run_concepts, counts="concepts in the bank"),
        Step(Stage.MATCH, "match", match.model_dump(), run_match, resumable=True, models=match_model,
             counts="caption-concept matches"),
        Step(Stage.BALANCE, "balance", recipe.balance.model_dump(), run_balance, counts="rows kept"),
        Step(Stage.SELECT, "output", recipe.output.model_dump(exclude={"allow_outside_build"}), run_select,
             outputs_exist=lambda ctx: (ctx.build_dir / recipe.output.selection).exists(), counts="rows selected"),
    ]


def plan(recipe: BuildRecipe) -> list[Step]:
    """Every step of a build of ``recipe``, in stage order (the media ones when it has a ``media`` section)."""
    steps = caption_steps(recipe)
    if recipe.media is not None:
        from curate.media import media_steps

        steps += media_steps(recipe.media)
    return steps


def recipe_models(recipe: BuildRecipe, until: str | None = None) -> list[ModelNeed]:
    """``(recipe key, model name, files a folder must hold)`` of every encoder the steps up to ``until`` load."""
    return models_of(plan_until(plan(recipe), until))


def check_models(recipe: BuildRecipe, until: str | None = None) -> None:
    """Fail fast, before any stage runs, when an encoder the recipe names cannot be loaded (cheap file checks,
    no weights loaded): one-line RecipeError naming the recipe key and the local path to use instead."""
    preflight(plan_until(plan(recipe), until))


def _q(p: Path) -> str:
    return str(p).replace("'", "''")


def build(recipe: BuildRecipe, out: str | None = None, progress: bool = True, until: str | None = None,
          recipe_dir: Path | None = None) -> BuildResult:
    """Run (or resume) a build; returns where its outputs are."""
    from curate.selection import selection_path

    steps = plan_until(plan(recipe), until)
    preflight(steps)  # before any stage: an encoder that cannot be loaded fails now, not hours later
    build_dir = recipe.build_dir(out)
    check_output_paths(recipe, build_dir)  # outputs outside the build folder: refused before anything is written
    # the folder must be new, empty or tether's own (marker); the build lock is held before the first write
    with open_build_dir(build_dir):
        atomic_write(build_dir / "recipe.yaml",
                     yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False))
        result = BuildResult(build_dir=build_dir, catalog=build_dir / "catalog.duckdb")
        with Catalog(result.catalog, threads=recipe.threads, memory_limit=recipe.memory_limit,
                     temp_dir=recipe.temp_path(build_dir)) as cat:
            if progress and sys.stderr.isatty():  # DuckDB's own bar for the long single-statement stages
                cat.execute("SET enable_progress_bar = true")
            ctx = Context(cat, build_dir, progress=progress, distributor=recipe.distributor, recipe_dir=recipe_dir,
                          selection=selection_path(build_dir, recipe.output))
            if recipe.media is not None and until is None:
                from tether.fileio import claim_build_dir

                claim_build_dir(build_dir, cat)  # the download stage deletes only inside a marked build folder
            got = run_steps(ctx, steps)
            result.ran, result.skipped, result.card = got.ran, got.skipped, ctx.card
            sel = ctx.selection
            if sel is not None and sel.exists() and (ctx.selected is not None or "select" in got.skipped):
                result.selection = sel
                result.selected = ctx.selected if ctx.selected is not None else int(
                    cat.scalar(f"SELECT count(*) FROM read_parquet('{_q(sel)}')"))
            if until is None and recipe.media is not None:
                from curate.media import media_report

                media_report(ctx, recipe.media)
                if recipe.output.card and recipe.media.agreement.enabled:  # the card then tells what the images removed
                    from curate.card import write_card

                    result.card = write_card(cat, build_dir, recipe.name, recipe.output.card_top_concepts,
                                             result.selected)
            elif cat.stage_done(Stage.BALANCE):
                from curate.balance import balance_floor_note

                note = balance_floor_note(cat, str(result.card or "the catalog's balance_report"))
                if note:
                    log(f"  {note}")
    return result


def check_output_paths(recipe: BuildRecipe, build_dir: Path) -> None:
    """Read-only checks of the recipe's output paths (``output.selection``, ``media.shards.out``): inside the
    build folder unless opted out, and never onto a file or into a folder tether did not write (one line)."""
    from tether.fileio import check_outside_file, claim_output_dir
    from curate.selection import selection_path

    check_outside_file(build_dir, selection_path(build_dir, recipe.output), "output.selection")
    if recipe.media is not None and recipe.media.shards.enabled:
        from curate.shards import out_dir_of

        claim_output_dir(build_dir, out_dir_of(recipe.media.shards, build_dir), "media.shards.out",
                         check_only=True)
