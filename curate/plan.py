"""The one build plan: every stage of a build is a :class:`Step`, and :func:`run_steps` is the one loop that runs
them (skip / resume / fresh) with ONE invalidation rule.

A step says what a stage is — the :class:`~curate.stages.Stage`, the recipe section it comes from, the parameters
it runs with, what it reads (``inputs``, a digest computed just before it starts), the models it loads (checked
before anything runs: :func:`preflight`), whether it resumes from committed units, and ``run(ctx, how)``.
:func:`curate.pipeline.plan` lists every step of a recipe in stage order (the caption steps, then
:func:`curate.media.media_steps`); ``curate build`` runs the whole list, ``curate download`` / ``shard`` /
``retry-failed`` run slices of it, and the library's ``run_download`` / ``run_shards`` / ... run one-step slices.

The rule (what makes a killed, edited or partly re-run build converge to one uninterrupted run):

* a step's key is its ``params`` plus what its ``inputs`` say (stored in the catalog's ``stages`` table);
* a step is **skipped** when it is done with the same key, its outputs are there, and no step before it ran in
  this invocation;
* otherwise every LATER stage the catalog has recorded is cleared first (rows and bookkeeping), and the step
  **resumes** from its committed units when it is resumable and was killed (or its outputs vanished) with the
  same key, else starts **fresh** (its own rows cleared, marked running; ``done`` only after it finished).

A disabled step (``enabled=False``: ``download`` / ``shards`` turned off) is left as it is: not run, not cleared.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from curate.catalog import Catalog, params_json
from curate.stages import Begin, Stage

#: ``(recipe key, model name or path, files a local folder must hold)``
ModelNeed = tuple[str, str, tuple[str, ...]]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Done:
    """What a step's ``run`` may return: the row count stored in ``stages.rows`` and, optionally, the words of its
    ``stage X: done — ...`` line (default: ``<rows> <Step.counts>``)."""

    rows: int | None
    summary: str | None = None


@dataclass
class Context:
    """What steps share while a plan runs: the catalog, the build folder, the run's settings, and what earlier
    steps produced (``selection`` from ``select``; ``results``: each step's returned value by stage)."""

    cat: Catalog
    build_dir: Path
    progress: bool = True
    distributor: Any = None           # tether.distribute.DistributorConfig of the build
    recipe_dir: Path | None = None    # where the recipe's relative paths resolve
    selection: Path | None = None     # the selection parquet (set by ``select``, or given to ``curate download``)
    selected: int | None = None
    card: Path | None = None
    encoder: Any = None               # already loaded models (tests, notebooks): SemDeDup's encoder,
    scorer: Any = None                # the agreement stage's scorer
    results: dict[Stage, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One stage of a build (see the module doc)."""

    stage: Stage
    section: str                                   # the recipe section its params come from (``dedup.near``)
    params: dict
    run: Callable[[Context, Begin], Any]           # does the work; returns a row count, a Done, or a result object
    resumable: bool = False
    models: tuple[ModelNeed, ...] = ()
    inputs: Callable[[Context], dict] | None = None        # what it reads, as key entries (computed at its start)
    outputs_exist: Callable[[Context], bool] | None = None  # a done step whose outputs vanished runs again
    counts: str = "rows"                           # what a returned count counts, for the done line
    enabled: bool = True
    summary: Callable[[Any], str] | None = None    # the done line's words for a returned result object

    def key(self, ctx: Context) -> dict:
        return {**self.params, **(self.inputs(ctx) if self.inputs else {})}


@dataclass
class RunLog:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def recorded(cat: Catalog) -> list[Stage]:
    """The stages the catalog has bookkeeping for, in build order."""
    names = [r[0] for r in cat.execute("SELECT stage FROM stages").fetchall()]
    return sorted({s for s in map(Stage.of, names) if s is not None}, key=lambda s: s.order)


def preflight(steps: Sequence[Step]) -> None:
    """Fail fast, before any step runs, when a model a step loads cannot be loaded (cheap file checks, no weights):
    a one-line RecipeError naming the recipe key and the local path to use instead."""
    from tether.zoo import check_model

    for key, name, files in models_of(steps):
        check_model(key, name, files)


def models_of(steps: Sequence[Step]) -> list[ModelNeed]:
    return [m for st in steps if st.enabled for m in st.models]


def until(steps: Sequence[Step], last: str | Stage | None) -> list[Step]:
    """``steps`` up to and including stage ``last`` (all of them for None)."""
    if last is None:
        return list(steps)
    names = [st.stage.value for st in steps]
    return list(steps[:names.index(str(last)) + 1]) if str(last) in names else list(steps)


def between(steps: Sequence[Step], first: Stage, last: Stage | None = None) -> list[Step]:
    """The slice of ``steps`` from stage ``first`` to stage ``last`` (inclusive; None = to the end)."""
    lo = first.order
    hi = last.order if last is not None else len(Stage)
    return [st for st in steps if lo <= st.stage.order <= hi]


def run_steps(ctx: Context, steps: Sequence[Step], log_to: Callable[[str], None] = log) -> RunLog:
    """Run ``steps`` in order with the module's rule; returns which ran and which were skipped."""
    cat = ctx.cat
    out = RunLog()
    dirty = False  # a step ran in this invocation: every later one runs too
    for st in steps:
        name = st.stage.value
        if not st.enabled:
            continue
        key = st.key(ctx)
        row = cat.stage_row(st.stage)
        same = row is not None and row.params == params_json(key)
        gone = same and row.status == "done" and st.outputs_exist is not None and not st.outputs_exist(ctx)
        if gone and st.resumable and not dirty:  # finish what vanished from its committed units
            cat.execute("UPDATE stages SET status = 'running' WHERE stage = ?", [name])
        later = [s for s in recorded(cat) if s in st.stage.later()] if not dirty else []
        how = cat.begin_stage(st.stage, key, resumable=st.resumable, rerun=dirty or gone, also_clear=later[::-1])
        if how is Begin.SKIP:
            out.skipped.append(name)
            log_to(f"stage {name}: done earlier, skipped")
            continue
        dirty = True
        if how is Begin.RESUME:
            with cat.transaction():  # (FRESH cleared them already)
                for s in later[::-1]:
                    cat.clear_stage(s)
            log_to(f"stage {name}: resuming ({len(cat.done_units(name))} units done)")
        else:
            log_to(f"stage {name}: start")
        t0 = time.time()
        res = st.run(ctx, how)
        ctx.results[st.stage] = res
        if isinstance(res, Done):
            rows, words = res.rows, res.summary
        elif res is None or isinstance(res, int):
            rows, words = res, None
        else:
            rows, words = getattr(res, "rows", None), None
        if words is None and st.summary is not None:
            words = st.summary(res)
        if words is None:
            words = f"{rows:,} {st.counts}" if rows is not None else "finished"
        cat.mark_done(name, rows)
        out.ran.append(name)
        log_to(f"stage {name}: done \N{EM DASH} {words} ({time.time() - t0:.1f}s)")
    return out


def run_one(ctx: Context, step: Step) -> tuple[bool, Any]:
    """Run one step through the loop (the library functions' way in); returns (ran, its result or None)."""
    got = run_steps(ctx, [step], log_to=lambda _m: None)
    return bool(got.ran), ctx.results.get(step.stage) if got.ran else None
