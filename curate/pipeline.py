"""Stage runner for ``curate build``: runs the stages in order over one catalog, resumably.

Stages: :data:`curate.stages.CAPTION_STAGES` — ``ingest → filter → dedup → neardup → concepts → match → balance →
select`` — then the media stages (:data:`curate.stages.MEDIA_STAGES`, :mod:`curate.media`) when the recipe has a
``media`` section: one sequence of :class:`curate.stages.Stage`. Each stage has the parameters it was run with
(its recipe section) stored in the catalog's ``stages`` table; every stage starts through
:meth:`curate.catalog.Catalog.begin_stage`.

Rerun rules (what makes a killed or edited build converge to the result of one uninterrupted run):

* a stage marked ``done`` with the same parameters, and no earlier stage rerun, is skipped;
* otherwise every LATER stage in :class:`~curate.stages.Stage` order is cleared first (its catalog rows and
  bookkeeping, the media stages included), because their outputs depend on this stage's;
* a unit-resumable stage (``ingest``, ``match``) found ``running`` with the same parameters continues from its
  committed units; any other stage is cleared and rerun from scratch (its partial writes never count: the
  ``stages`` row only says ``done`` after the stage finished).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from curate.catalog import Catalog
from curate.config import BuildRecipe
from curate.stages import CAPTION_STAGES, Begin, Stage
from tether.fileio import atomic_write, open_build_dir
from tether.recipe import RecipeError

STAGES = tuple(s.value for s in CAPTION_STAGES)  # `curate build --until` choices


@dataclass
class StageStep:
    """One caption stage of a build: what it runs with (``params``, its recipe section) and how."""

    stage: Stage
    params: dict
    run: Callable[[], int | None]
    resumable: bool = False
    outputs_exist: Callable[[], bool] = lambda: True  # a done stage whose files vanished reruns
    counts: str = "rows"  # what run()'s number counts, for the `stage X: done — N <counts>` line


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


def make_stages(cat: Catalog, recipe: BuildRecipe, build_dir: Path, result: BuildResult, progress: bool,
                recipe_dir: Path | None = None) -> list[StageStep]:
    from curate import balance, card, dedup, filters, selection, sources

    def run_concepts() -> int:
        from curate.concepts import build_concepts

        return build_concepts(cat, recipe.concepts, progress=progress, base_dir=recipe_dir)

    def run_match() -> int:
        from curate.match import run_match

        return run_match(cat, recipe.match, progress=progress, distributor=recipe.distributor,
                         threads=recipe.threads)

    def run_balance() -> int:
        rep = balance.run_balance(cat, recipe.balance, Stage.BALANCE, progress=progress)
        log(f"  {rep.summary()}")
        return rep.kept

    def run_select() -> int:
        path, n = selection.write_selection(cat, build_dir, recipe.output)
        result.selection, result.selected = path, n
        if recipe.output.card:
            result.card = card.write_card(cat, build_dir, recipe.name, recipe.output.card_top_concepts, n)
        return n

    return [
        StageStep(Stage.INGEST, {"sources": [s.model_dump() for s in recipe.sources],
                                 "ingest": recipe.ingest.model_dump()},
                  lambda: sources.run_ingest(cat, recipe.sources, recipe.ingest, progress=progress),
                  resumable=True, counts="rows ingested"),
        StageStep(Stage.FILTER, recipe.filter.model_dump(), lambda: filters.run_filters(cat, recipe.filter),
                  counts="rows rejected"),
        StageStep(Stage.DEDUP, {"exact": recipe.dedup.exact}, lambda: dedup.run_exact_dedup(cat, recipe.dedup),
                  counts="duplicate rows rejected"),
        StageStep(Stage.NEARDUP, recipe.dedup.near.model_dump(),
                  lambda: dedup.run_near_dup(cat, recipe.dedup.near, progress=progress,
                                            distributor=recipe.distributor),
                  counts="near-duplicate captions rejected"),
        StageStep(Stage.CONCEPTS, recipe.concepts.model_dump(), run_concepts, counts="concepts in the bank"),
        StageStep(Stage.MATCH, recipe.match.model_dump(), run_match, resumable=True,
                  counts="caption-concept matches"),
        StageStep(Stage.BALANCE, recipe.balance.model_dump(), run_balance, counts="rows kept"),
        StageStep(Stage.SELECT, recipe.output.model_dump(exclude={"allow_outside_build"}), run_select,
                  outputs_exist=lambda: (build_dir / recipe.output.selection).exists(), counts="rows selected"),
    ]


def run_stages(cat: Catalog, steps: list[StageStep], result: BuildResult, until: str | None = None) -> None:
    """Run ``steps`` in order with the rerun rules of this module; stop after ``until`` when given."""
    dirty = False  # an earlier stage ran in this invocation: every later one must rerun
    for st in steps:
        name = st.stage.value
        rerun = dirty or not st.outputs_exist()
        # every stage recorded after this one is cleared with it when it is the first to rerun
        later = [s for s in _recorded(cat) if s in st.stage.later()] if not dirty else []
        how = cat.begin_stage(st.stage, st.params, resumable=st.resumable, rerun=rerun, also_clear=later[::-1])
        if how is Begin.SKIP:
            result.skipped.append(name)
            log(f"stage {name}: done earlier, skipped")
        else:
            dirty = True
            if how is Begin.RESUME:
                with cat.transaction():  # (FRESH cleared them already)
                    for s in later[::-1]:
                        cat.clear_stage(s)
                log(f"stage {name}: resuming ({len(cat.done_units(name))} units done)")
            else:
                log(f"stage {name}: start")
            t0 = time.time()
            n = st.run()
            cat.mark_done(name, n)
            result.ran.append(name)
            what = f"{n:,} {st.counts}" if n is not None else "finished"
            log(f"stage {name}: done \N{EM DASH} {what} ({time.time() - t0:.1f}s)")
        if until and name == until:
            break


def _recorded(cat: Catalog) -> list[Stage]:
    """The stages the catalog has bookkeeping for, in build order."""
    names = [r[0] for r in cat.execute("SELECT stage FROM stages").fetchall()]
    return sorted({s for s in map(Stage.of, names) if s is not None}, key=lambda s: s.order)


def recipe_models(recipe: BuildRecipe, until: str | None = None) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(recipe key, model name, files a folder must hold)`` of every encoder the stages up to ``until`` load."""
    reach = STAGES[:STAGES.index(until) + 1] if until in STAGES else STAGES
    out: list[tuple[str, str, tuple[str, ...]]] = []
    if "neardup" in reach and recipe.dedup.near.enabled:
        out.append(("dedup.near.model", recipe.dedup.near.model, ("config.json",)))
    if "match" in reach and recipe.match.mode in ("semantic", "both"):
        out.append(("match.semantic.model", recipe.match.semantic.model, ("config.json",)))
    media = recipe.media
    if until is None and media is not None and media.image_dedup.enabled and media.image_dedup.semantic.enabled:
        out.append(("media.image_dedup.semantic.encoder", media.image_dedup.semantic.encoder,
                    ("config.json", "preprocessor_config.json")))
    if until is None and media is not None and media.agreement.enabled:
        out.append(("media.agreement.scorer", media.agreement.scorer, ("config.json",)))
    return out


def check_models(recipe: BuildRecipe, until: str | None = None) -> None:
    """Fail fast, before any stage runs, when an encoder the recipe names cannot be loaded (cheap file checks,
    no weights loaded): one-line RecipeError naming the recipe key and the local path to use instead."""
    from tether.zoo import check_model

    for key, name, files in recipe_models(recipe, until):
        check_model(key, name, files)


def _q(p: Path) -> str:
    return str(p).replace("'", "''")


def build(recipe: BuildRecipe, out: str | None = None, progress: bool = True, until: str | None = None,
          recipe_dir: Path | None = None) -> BuildResult:
    """Run (or resume) a build; returns where its outputs are."""
    check_models(recipe, until)  # before any stage: an encoder that cannot be loaded fails now, not hours later
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
            steps = make_stages(cat, recipe, build_dir, result, progress, recipe_dir)
            run_stages(cat, steps, result, until)
            sel = build_dir / recipe.output.selection
            if result.selection is None and "select" in result.skipped and sel.exists():
                result.selection = sel
                result.selected = int(cat.scalar(f"SELECT count(*) FROM read_parquet('{_q(sel)}')"))
            if until is None and recipe.media is not None:
                from curate.media import run_media

                log("media stages: start")  # they say the concepts below the floor once, after their losses
                run_media(cat, recipe.media, result.selection, build_dir, progress=progress,
                          distributor=recipe.distributor)
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
