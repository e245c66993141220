"""Multi-stage training (``train.stages``): one training run per stage, each starting from the heads and the
temperature the previous stage ended with; one model at the end.

Stage ``i`` named ``n`` is an ordinary run of the recipe with the stage's settings in ``train`` (epochs, lr …),
``train.init_from`` = the previous stage's model (the first stage: the recipe's own ``init_from``, if any),
``loss.init_temperature`` = the previous stage's learnt temperature, and its output in
``output_dir/stages/NN-n``. A stage with its own ``data`` caches its features apart
(``features.cache_dir/stages/n``; the validation features are copied from the recipe's cache). Each stage resumes
after a kill like any run, and a finished stage is not trained again, so a killed multi-stage run resumes in the
stage where it stopped. The last stage's model is copied to ``output_dir/model``; ``output_dir/metrics.json`` is
the last stage's summary with every stage's under ``stages``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from align.config import TrainRecipe
from tether.recipe import RecipeError, resolve_path

STAGES = "stages"
_TRAIN_FIELDS = ("epochs", "max_steps", "lr", "warmup_ratio", "min_lr_ratio", "weight_decay", "freeze")


def stage_dir(recipe: TrainRecipe, index: int) -> Path:
    return recipe.output_dir / STAGES / f"{index:02d}-{recipe.train.stages[index].name}"


def _temperature(model_dir: Path) -> float | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("temperature")
    except (OSError, ValueError) as e:
        raise RecipeError(f"{model_dir}: cannot read the previous stage's model ({e})") from None


def stage_recipe(recipe: TrainRecipe, index: int, previous: Path | None) -> TrainRecipe:
    """The single-stage recipe of stage ``index``, starting from the model folder ``previous`` (its heads and
    temperature; None: fresh heads)."""
    st = recipe.train.stages[index]
    update: dict[str, Any] = {k: getattr(st, k) for k in _TRAIN_FIELDS if getattr(st, k) is not None}
    update.update(output_dir=str(stage_dir(recipe, index)), stages=[],
                  init_from=str(previous) if previous is not None else None)
    if "epochs" in update and st.max_steps is None:
        update["max_steps"] = None  # a stage's own epochs are not cut by the recipe's max_steps
    r = recipe.model_copy(update={"train": recipe.train.model_copy(update=update)})
    if previous is not None:
        t = _temperature(previous)
        if t is not None:
            lc = recipe.loss
            t = min(max(float(t), lc.min_temperature), lc.max_temperature)
            r = r.model_copy(update={"loss": lc.model_copy(update={"init_temperature": t})})
    if st.data is not None:
        cache = resolve_path(recipe.features.cache_dir)
        features = recipe.features.model_copy(update={"cache_dir": str(cache / STAGES / st.name),
                                                      "reuse": list(recipe.features.reuse) + [str(cache)]})
        r = r.model_copy(update={"data": st.data, "features": features})
    return r


def run_stages(recipe: TrainRecipe, fit: Callable[[TrainRecipe], dict[str, Any]]) -> dict[str, Any]:
    """Train every stage in order with ``fit`` (one single-stage run: ``Trainer(r, …).fit()``; finished stages
    are only checked); returns the final summary."""
    from accelerate import PartialState

    previous = resolve_path(recipe.train.init_from) if recipe.train.init_from else None
    summaries = []
    for i, st in enumerate(recipe.train.stages):
        r = stage_recipe(recipe, i, previous)
        summary = fit(r)
        summaries.append({"stage": st.name, **summary})
        previous = r.output_dir / "model"
    out = recipe.output_dir
    final = dict(summaries[-1], stages=summaries)
    if PartialState().is_main_process:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(previous, tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(tmp, out / "model")
        (out / "metrics.json").write_text(json.dumps(final, indent=2))
    return final


__all__ = ["STAGES", "stage_dir", "stage_recipe", "run_stages"]
