"""The one build plan (curate/plan.py): every stage of a recipe is a Step in stage order, and ONE loop with ONE rule
runs any slice of it — skip what is done with the same key, resume what was killed, rerun a step whose key
(params + inputs) changed together with every later stage, leave a disabled step as it is."""

from __future__ import annotations

import pytest

from curate.catalog import Catalog
from curate.plan import Context, Done, Step, between, preflight, run_steps, until
from curate.stages import Begin, Stage


class Recorder:
    """Fake steps over real stages: what ran, how, and with which key."""

    def __init__(self):
        self.calls: list[tuple[str, Begin]] = []
        self.params = {Stage.FILTER: {"a": 1}, Stage.DEDUP: {"b": 1}, Stage.NEARDUP: {"c": 1}}
        self.inputs = {Stage.FILTER: "x", Stage.DEDUP: "y", Stage.NEARDUP: "z"}
        self.fail: Stage | None = None
        self.present = True
        self.enabled = True

    def steps(self) -> list[Step]:
        def make(stage: Stage, resumable: bool = False, **kw) -> Step:
            def run(ctx: Context, how: Begin):
                self.calls.append((stage.value, how))
                ctx.cat.execute("INSERT INTO decisions VALUES (?, ?, false, 'r', NULL, NULL)", [f"u-{stage}", stage])
                if self.fail is stage:
                    raise KeyboardInterrupt  # killed mid-way
                return Done(1, f"{stage} judged")

            return Step(stage, stage.value, self.params[stage], run, resumable=resumable,
                        inputs=lambda ctx: {"input": self.inputs[stage]}, **kw)

        return [make(Stage.FILTER), make(Stage.DEDUP, resumable=True, outputs_exist=lambda ctx: self.present),
                make(Stage.NEARDUP, enabled=self.enabled)]

    def run(self, cat: Catalog, steps=None) -> list[tuple[str, Begin]]:
        self.calls = []
        run_steps(Context(cat, cat.path.parent), steps or self.steps(),
                  log_to=lambda _m: None)
        return self.calls


def _decided(cat: Catalog) -> list[str]:
    return sorted(r[0] for r in cat.execute("SELECT stage FROM decisions").fetchall())


def test_one_rule_over_any_slice(tmp_path):
    rec = Recorder()
    F, D, N = "filter", "dedup", "neardup"
    with Catalog(tmp_path / "c.duckdb") as cat:
        assert rec.run(cat) == [(F, Begin.FRESH), (D, Begin.FRESH), (N, Begin.FRESH)]
        assert rec.run(cat) == []  # same keys: every step skipped
        rec.inputs[Stage.DEDUP] = "y2"  # what dedup reads changed: it and every later step rerun
        assert rec.run(cat) == [(D, Begin.FRESH), (N, Begin.FRESH)]
        rec.params[Stage.FILTER] = {"a": 2}  # an edited first section reruns everything after it
        assert rec.run(cat) == [(F, Begin.FRESH), (D, Begin.FRESH), (N, Begin.FRESH)]
        assert _decided(cat) == [D, F, N]  # each stage's rows once: a rerun replaced, never appended
        # a slice runs through the same loop: the later stage alone, skipped
        assert rec.run(cat, between(rec.steps(), Stage.NEARDUP)) == []


def test_killed_step_resumes_and_clears_later_stages(tmp_path):
    rec = Recorder()
    with Catalog(tmp_path / "c.duckdb") as cat:
        rec.run(cat)
        rec.inputs[Stage.DEDUP], rec.fail = "y2", Stage.DEDUP
        with pytest.raises(KeyboardInterrupt):
            rec.run(cat)
        assert cat.stage_row(Stage.NEARDUP) is None  # the later stage was cleared before dedup reran
        assert "neardup" not in _decided(cat)
        rec.fail = None
        assert rec.run(cat) == [("dedup", Begin.RESUME), ("neardup", Begin.FRESH)]


def test_vanished_outputs_resume_and_disabled_steps_stay(tmp_path):
    rec = Recorder()
    with Catalog(tmp_path / "c.duckdb") as cat:
        rec.run(cat)
        rec.present = False  # dedup's files vanished: it resumes (rewrites what is missing), the rest follows
        assert rec.run(cat) == [("dedup", Begin.RESUME), ("neardup", Begin.FRESH)]
        rec.present, rec.enabled = True, False
        rec.params[Stage.NEARDUP] = {"c": 2}
        assert rec.run(cat) == []  # turned off: not run, and what it wrote before is left as it is
        assert cat.stage_done(Stage.NEARDUP) and "neardup" in _decided(cat)


def test_the_recipe_plan_lists_every_stage_in_order(tmp_path):
    from curate.config import BuildRecipe
    from curate.pipeline import plan

    src = tmp_path / "s.csv"
    src.write_text("caption,url\na dog,http://x/1.jpg\n")
    recipe = BuildRecipe.model_validate({
        "name": "t", "sources": [{"name": "s", "path": str(src), "format": "csv"}],
        "dedup": {"near": {"enabled": True, "model": str(tmp_path / "no-model")}},
        "media": {"agreement": {"enabled": True, "scorer": str(tmp_path / "no-scorer")}}})
    steps = plan(recipe)
    stages = [st.stage for st in steps]
    assert stages == sorted(stages, key=lambda s: s.order) and len(set(stages)) == len(stages)
    assert [s.value for s in stages] == ["ingest", "filter", "dedup", "neardup", "concepts", "match", "balance",
                                         "select", "media_rows", "download", "image_dedup", "agreement",
                                         "rebalance", "shards"]
    assert all(st.section for st in steps)
    assert [m[0] for st in steps for m in st.models] == ["dedup.near.model", "media.agreement.scorer"]
    assert [st.stage.value for st in until(steps, "neardup")][-1] == "neardup"
    assert [st.stage.value for st in between(steps, Stage.IMAGE_DEDUP)] == ["image_dedup", "agreement",
                                                                            "rebalance", "shards"]
    from tether.recipe import RecipeError

    with pytest.raises(RecipeError, match="dedup.near.model"):  # preflight reads every step's models first
        preflight(steps)
    preflight(until(steps, "dedup"))  # a slice before the near-dup step loads nothing
