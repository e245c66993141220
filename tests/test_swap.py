"""Text-encoder swap (issue 15 item 3, ``train.lock_image_from``): train a model with one text encoder, then only a
new text head for another text encoder against its locked image head; the new AlignedModel round trip, and the
one-line refusals of an incompatible model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.cli import main as cli_main
from align.config import load_train_recipe
from align.model import AlignedModel
from align.training import Trainer, train
from test_multilingual import data_dir, fake_encoder, make_recipe  # noqa: F401  (fixtures re-used)
from test_train import text_dir  # noqa: F401  (tiny BERT with a real vocabulary)

HEADS = {"image": {"kind": "mlp", "out_dim": 32, "hidden_dim": 48}, "text": {"kind": "mlp", "out_dim": 32}}


@pytest.fixture(scope="module")
def donor(tmp_path_factory, tiny_vision_dir, text_dir, data_dir) -> Path:
    """A model trained jointly on the tiny DINOv2 + the tiny BERT: the image head to lock."""
    root = tmp_path_factory.mktemp("donor")
    rp = make_recipe(root / "r.yaml", tiny_vision_dir, data_dir, text=str(text_dir), projector=HEADS)
    train(load_train_recipe(rp, ["train.epochs=3"]))
    return root / "run" / "model"


def swap_recipe(tmp_path: Path, vision_dir: Path, data_dir: Path, donor: Path, **over) -> Path:
    rp = make_recipe(tmp_path / "swap" / "r.yaml", vision_dir, data_dir, text="fake-bow", projector=HEADS, **over)
    r = yaml.safe_load(rp.read_text())
    r["train"].update(lock_image_from=str(donor), epochs=4)
    rp.write_text(yaml.safe_dump(r))
    return rp


def test_swap_trains_only_the_text_head_and_saves_a_new_model(tmp_path, tiny_vision_dir, data_dir, fake_encoder,
                                                               donor):
    trainer = Trainer(load_train_recipe(swap_recipe(tmp_path, tiny_vision_dir, data_dir, donor)))
    heads = trainer.unwrapped.heads
    assert not any(p.requires_grad for p in heads.image.parameters())
    assert all(p.requires_grad for p in heads.text.parameters())
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in heads.image.parameters()}
    assert {id(p) for p in heads.text.parameters()} <= trained
    text_before = {k: v.clone() for k, v in heads.text.state_dict().items()}
    summary = trainer.fit()
    assert not heads.image.training  # locked: no dropout, also after validation put the heads back in train mode
    assert summary["steps"] == 4 * (160 // 32) and summary["last_loss"] < summary["first_loss"]

    old, new = load_file(str(donor / "model.safetensors")), load_file(str(tmp_path / "swap" / "run" / "model" /
                                                                          "model.safetensors"))
    image_keys = [k for k in old if k.startswith("image.")]
    assert image_keys and all(torch.equal(old[k], new[k]) for k in image_keys)  # image head bit-identical
    assert new["text.block.skip.weight"].shape[1] == 24 != old["text.block.skip.weight"].shape[1]  # new encoder
    changed = [k for k, v in text_before.items() if not torch.equal(v.cpu(), new[f"text.{k}"])]
    assert len(changed) == len(text_before)  # every text head tensor moved

    # the new AlignedModel: loads on its own, encodes with the new text encoder, same image embeddings as the donor
    m = AlignedModel.from_pretrained(tmp_path / "swap" / "run" / "model")
    d = AlignedModel.from_pretrained(donor)
    assert m.config["text"]["name"] == "fake-bow" and m.config["vision"] == d.config["vision"]
    assert m.config["image_head_locked_from"] == {"path": str(donor), "text": {
        "name": d.config["text"]["name"], "fingerprint": d.config["text"]["fingerprint"]}}
    x = np.random.default_rng(0).standard_normal((5, d.config["vision"]["dim"])).astype(np.float32)
    np.testing.assert_array_equal(m.project_image_features(x), d.project_image_features(x))
    e = m.encode_text(["a red dog in the park", "ein roter hund im park"])
    assert e.shape == (2, 32) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    m.save_pretrained(tmp_path / "again")
    m2 = AlignedModel.from_pretrained(tmp_path / "again")
    assert m2.config == m.config
    np.testing.assert_array_equal(m2.encode_text(["a red dog in the park"]), m.encode_text(["a red dog in the park"]))

    # resumed with nothing left to do: the same model, the image head still the donor's
    again = train(load_train_recipe(swap_recipe(tmp_path, tiny_vision_dir, data_dir, donor)))
    assert again["steps"] == summary["steps"]
    assert json.loads((tmp_path / "swap" / "run" / "metrics.json").read_text())["steps"] == summary["steps"]


@pytest.fixture(scope="module")
def other_vision_dir(tmp_path_factory, tiny_vision_dir) -> Path:
    """The tiny DINOv2 with other random weights (same architecture and processor): another fingerprint."""
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("other_vision")
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config.from_pretrained(tiny_vision_dir)).save_pretrained(d)
    (d / "preprocessor_config.json").write_text((tiny_vision_dir / "preprocessor_config.json").read_text())
    return d


@pytest.mark.parametrize("case", ["fingerprint", "layer", "head", "pooling", "not-a-model", "damaged"])
def test_incompatible_model_is_one_line_error(tmp_path, tiny_vision_dir, other_vision_dir, data_dir, fake_encoder,
                                              donor, case, capsys):
    vision, sets = tiny_vision_dir, []
    if case == "fingerprint":
        vision = other_vision_dir
    elif case == "layer":
        sets = ["--set", "vision.layer=1"]
    elif case == "head":
        sets = ["--set", "projector.image.hidden_dim=64"]
    elif case == "pooling":
        sets = ["--set", "features.pooling=mean"]
    elif case == "not-a-model":
        sets = ["--set", f"train.lock_image_from={tmp_path}"]
    elif case == "damaged":
        bad = tmp_path / "damaged"
        bad.mkdir()
        (bad / "config.json").write_text((donor / "config.json").read_text())
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
        sets = ["--set", f"train.lock_image_from={bad}"]
    rp = swap_recipe(tmp_path, vision, data_dir, donor)
    assert cli_main(["train", "--config", str(rp), *sets]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("error")]  # (transformers' loading bars aside)
    assert len(lines) == 1 and lines[0].startswith("error: train.lock_image_from") and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == lines[0]
    want = {"fingerprint": "fingerprint", "layer": "layer -1 (model) vs 1 (recipe)", "head": "hidden_dim 48 (model)",
            "pooling": "pooling cls (model) vs mean (recipe)", "not-a-model": "not an aligned model",
            "damaged": "cannot read the model"}[case]
    assert want in lines[0], lines[0]
    assert not (tmp_path / "swap" / "cache").exists()  # refused before any feature was extracted


def test_shipped_swap_recipe_matches_the_multilingual_one():
    """recipes/align_flickr8k_swap_use.yaml is the joint multilingual recipe + a locked image head: same encoders,
    data, feature cache and heads, so the two are compared on the same features."""
    from tether.recipe import parse, read_yaml

    from align.config import TrainRecipe

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    swap = parse(TrainRecipe, read_yaml(recipes / "align_flickr8k_swap_use.yaml"), "swap")
    joint = parse(TrainRecipe, read_yaml(recipes / "align_flickr8k_multilingual.yaml"), "joint")
    assert swap.train.lock_image_from and joint.train.lock_image_from is None
    for section in ("vision", "text", "data", "val", "projector", "loss"):
        assert getattr(swap, section) == getattr(joint, section), section
    assert swap.features.cache_dir == joint.features.cache_dir
    same = {k: v for k, v in joint.train.model_dump().items() if k not in ("output_dir", "lock_image_from")}
    assert {k: swap.train.model_dump()[k] for k in same} == same
