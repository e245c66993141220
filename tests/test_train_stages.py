"""Multi-stage training (train.stages), train.init_from and train.freeze."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_train_recipe
from align.train import train
from tether.recipe import RecipeError
from test_train import data_dir, make_recipe, text_dir  # noqa: F401 (fixtures)


def test_two_stages_chain_heads_temperature_and_resume(tmp_path, tiny_vision_dir, text_dir, data_dir):  # noqa: F811
    stages = [{"name": "broad", "epochs": 2},
              {"name": "narrow", "epochs": 2, "lr": 1e-3, "freeze": ["text"],
               "data": {"format": "webdataset", "path": str(data_dir / "train-000.tar")}}]
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, train__stages=stages,
                     features={"cache_dir": str(tmp_path / "cache"), "shard_size": 64, "crops": 1})
    s = train(load_train_recipe(rp))
    run = tmp_path / "run"
    one, two = run / "stages" / "00-broad", run / "stages" / "01-narrow"
    assert [x["stage"] for x in s["stages"]] == ["broad", "narrow"]
    assert s["stages"][0]["num_pairs"] == 200 and s["stages"][1]["num_pairs"] == 100  # stage 2's own data
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    final = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], b[k]) for k in b)
    # the frozen text head is stage 1's, the image head trained on
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("text."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("image."))
    cfg1 = json.loads((one / "model" / "config.json").read_text())
    cfg2 = json.loads((two / "model" / "config.json").read_text())
    assert cfg2["initialised_from"] == str(one / "model")
    # stage 2 started at stage 1's learnt temperature
    log = [json.loads(x) for x in (two / "logs" / "align" / "log.jsonl").read_text().splitlines()]
    first_t = next(x["train/temperature"] for x in log if "train/temperature" in x)
    assert first_t == pytest.approx(cfg1["temperature"], rel=0.05) and cfg1["temperature"] != pytest.approx(0.07)
    assert (tmp_path / "cache" / "stages" / "narrow" / "train" / "manifest.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["stages"][1]["stage"] == "narrow"
    # a rerun trains nothing more
    s2 = train(load_train_recipe(rp))
    assert [x["steps"] for x in s2["stages"]] == [x["steps"] for x in s["stages"]]


def test_stage_recipe_errors(tmp_path, tiny_vision_dir, text_dir, data_dir):  # noqa: F811
    dup = [{"name": "a"}, {"name": "a"}]
    with pytest.raises(RecipeError, match="stage names must differ"):
        load_train_recipe(make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, train__stages=dup))
    with pytest.raises(RecipeError, match="nothing to train"):
        load_train_recipe(make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir,
                                      train__freeze=["image", "text"]))
    with pytest.raises(RecipeError, match="name"):
        load_train_recipe(make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir,
                                      train__stages=[{"name": "../x"}]))
    bad = make_recipe(tmp_path / "r2.yaml", tiny_vision_dir, text_dir, data_dir,
                      train__init_from=str(tmp_path / "nothing"))
    with pytest.raises(RecipeError, match="train.init_from"):
        train(load_train_recipe(bad))
