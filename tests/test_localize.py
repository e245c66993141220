"""Localization score: the pointing game on a token-head model's patch maps, its manifest format (hostile lines are
skipped with reasons), the mask sent through the encoder's own preprocessing, and the synthetic composites
benchmark — with a token-head model trained here (tiny encoders, colour captions) scoring above chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.eval.localize import grid_fraction, load_manifest, make_composites, run_localize, score_map
from tether.recipe import RecipeError

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 30),
           "white": (245, 245, 245), "black": (15, 15, 15), "brown": (120, 70, 30)}


def test_manifest_lines_that_are_hostile_are_skipped_with_reasons(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "class": "dog", "box": [0, 0, 10, 10]},
        {"image": "a.png", "class": "dog", "boxes": [[0, 0, 5, 5], [5, 5, 10, 10]]},
        "not json {",
        {"image": "../outside.png", "class": "dog", "box": [0, 0, 1, 1]},
        {"image": "/etc/passwd", "class": "dog", "box": [0, 0, 1, 1]},
        {"image": "a.png", "class": "", "box": [0, 0, 1, 1]},
        {"image": "a.png", "class": "dog", "box": [0, 0, "x", 1]},
        {"image": "a.png", "class": "dog", "box": [5, 5, 5, 9]},
        {"image": "a.png", "class": "dog"},
        [1, 2, 3],
    ]
    (tmp_path / "localization.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x)
                                                           for x in lines) + "\n")
    items, skipped, _ = load_manifest(tmp_path)
    assert len(items) == 2 and items[1].boxes == [(0, 0, 5, 5), (5, 5, 10, 10)]
    reasons = [s["reason"] for s in skipped]
    assert len(reasons) == 8
    for want in ("not valid JSON", "leaves", "relative path", "'class' must be", "4 finite numbers", "empty box",
                 "needs a box", "not a JSON object"):
        assert any(want in r for r in reasons), (want, reasons)
    (tmp_path / "localization.jsonl").write_text("nope\n")
    with pytest.raises(RecipeError, match="no usable lines"):
        load_manifest(tmp_path)
    with pytest.raises(RecipeError, match="no localization.jsonl"):
        load_manifest(tmp_path / "missing")


def test_the_mask_goes_through_the_encoders_preprocessing(tiny_vision):
    # tiny DINOv2: resize shortest edge to 64, center crop 56, 14-px patches: a 4 x 4 grid
    mask = np.zeros((80, 160), bool)            # a 2:1 image; resize -> 128 x 64, crop keeps x in [36, 92)
    mask[:, :80] = True                          # the left half of the ORIGINAL image = crop columns < 28
    frac = grid_fraction(tiny_vision, mask, (4, 4))
    np.testing.assert_allclose(frac[:, :2], 1.0)
    np.testing.assert_allclose(frac[:, 2:], 0.0)
    s = np.zeros((4, 4))
    s[1, 1] = 1.0
    assert score_map(s, frac)["hit"] == 1.0 and score_map(s, frac)["chance"] == 0.5
    s[1, 1], s[2, 3] = 0.0, 1.0
    assert score_map(s, frac)["hit"] == 0.0


def _colour_image(c: str, size=(56, 56)) -> Image.Image:
    rng = np.random.default_rng(sum(map(ord, c)) + size[0])
    a = np.clip(np.asarray(COLOURS[c], np.float32) + rng.normal(0, 8, (*size[::-1], 3)), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def _train_token_model(tiny_vision, tiny_text):
    """Token heads trained with tether's loss on single-colour images captioned by their colour."""
    from align.loss import ContrastiveLoss
    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    torch.manual_seed(0)
    names = list(COLOURS)
    ims = [_colour_image(c) for c in names]
    px = tiny_vision.preprocess(ims)
    tok = tiny_vision.tokens(px)
    captions = [f"a {c} photo" for c in names]
    h, m = tiny_text.tokens(captions)
    pc = ProjectorConfig(kind="token", out_dim=16, hidden_dim=32, dropout=0.0)
    heads = DualProjector(pc, pc, tiny_vision.dim, tiny_text.dim, tiny_vision.num_prefix_tokens)
    loss = ContrastiveLoss("infonce", init_temperature=0.1)
    opt = torch.optim.AdamW(list(heads.parameters()) + list(loss.parameters()), lr=3e-3)
    for _ in range(150):
        img, txt = heads(tok, h, m)
        value, _ = loss(img, txt)
        opt.zero_grad()
        value.backward()
        opt.step()
    heads.eval()
    return AlignedModel.from_parts(heads, tiny_vision, tiny_text, pc, pc, pooling="cls+mean", temperature=0.1)


def test_a_trained_token_head_model_points_above_chance_on_composites(tmp_path, tiny_vision, tiny_text):
    src = tmp_path / "src"
    for c in COLOURS:                                  # an ImageFolder of colour photos: the composites' source
        (src / c).mkdir(parents=True)
        for i in range(2):
            _colour_image(c, (40 + 10 * i, 60)).save(src / c / f"{i}.png")
    bench = make_composites(src, tmp_path / "bench", n=20, size=112, seed=0)
    lines = [json.loads(x) for x in (bench / "localization.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and lines[0]["box"] == [0, 0, 56, 112] and lines[1]["box"] == [56, 0, 112, 112]
    assert lines[0]["class"] != lines[1]["class"] and lines[0]["image"] == lines[1]["image"]
    model = _train_token_model(tiny_vision, tiny_text)
    res = run_localize(model, bench, ["a {c} photo"], out=tmp_path / "rep", progress=False)
    m = res["metrics"]
    assert m["n"] == 40 and m["n_skipped"] == 0
    assert m["chance"] == pytest.approx(50.0)
    assert m["pointing_acc"] >= 80.0 and m["pointing_ci95"][0] > 50.0, m    # above chance, with its interval
    assert m["mass_inside"] > 60.0
    md = (tmp_path / "rep" / "localize.md").read_text()
    assert "pointing acc." in md and (tmp_path / "rep" / "localize.png").stat().st_size > 1000


def test_pooled_models_are_refused_in_one_line(tmp_path, tiny_vision, tiny_text):
    from align.cli import main
    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    pc = ProjectorConfig(kind="mlp", out_dim=8)
    AlignedModel.from_parts(DualProjector(pc, pc, tiny_vision.dim, tiny_text.dim), tiny_vision, tiny_text, pc,
                            pc).save_pretrained(tmp_path / "m")
    (tmp_path / "d").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "localization.jsonl").write_text(json.dumps({"image": "a.png", "class": "dog",
                                                                   "box": [0, 0, 5, 5]}) + "\n")
    assert main(["eval", str(tmp_path / "m"), "--task", "localize", "--data", str(tmp_path / "d")]) == 2


def test_composites_refuse_a_single_class(tmp_path):
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (30, 30)).save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(RecipeError, match="at least two classes"):
        make_composites(tmp_path / "one", tmp_path / "out", n=2)
