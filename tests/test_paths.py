"""One path rule for every recipe (tether.recipe.resolve_input): relative INPUT paths resolve against the
recipe's folder, OUTPUT locations against the working directory, hub ids / zoo names stay names — in curate and
align alike."""

from __future__ import annotations

from pathlib import Path

import yaml

from align.config import load_train_recipe
from curate.config import load_build_recipe
from tether.recipe import resolve_input


def _align_recipe(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "shards").mkdir()
    (folder / "enc").mkdir()
    r = {"vision": {"name": "./enc"}, "text": {"name": "sentence-transformers/all-MiniLM-L6-v2"},
         "data": {"format": "webdataset", "path": "shards/train-*.tar"},
         "val": {"format": "flickr8k", "path": "../f8k", "split": "test",
                 "captions": [{"path": "../f8k/captions.de.txt", "lang": "de"}]},
         "features": {"cache_dir": "runs/cache", "reuse": ["other/cache"]},
         "projector": {"image": {"kind": "mlp"}, "text": {"kind": "mlp"}},
         "train": {"output_dir": "runs/out", "lock_image_from": "models/m"}}
    p = folder / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_align_inputs_follow_the_recipe_outputs_follow_cwd(tmp_path, monkeypatch):
    rec = _align_recipe(tmp_path / "recipes")
    seen = []
    for cwd in (tmp_path, tmp_path / "recipes" / "shards"):
        monkeypatch.chdir(cwd)
        r = load_train_recipe(rec)
        seen.append((r.vision.name, r.text.name, r.data.path, r.val.path, r.val.captions[0].path,
                     r.features.reuse, r.train.lock_image_from))
        assert r.output_dir.resolve() == cwd / "runs" / "out"
        assert r.cache_dir("train").resolve() == cwd / "runs" / "cache" / "train"
    assert seen[0] == seen[1]
    rd = tmp_path / "recipes"
    assert seen[0] == (str(rd / "enc"), "sentence-transformers/all-MiniLM-L6-v2", str(rd / "shards/train-*.tar"),
                       str(tmp_path / "f8k"), str(tmp_path / "f8k/captions.de.txt"), [str(rd / "other/cache")],
                       str(rd / "models/m"))
    # --set values are recipe values: the same rule
    monkeypatch.chdir(tmp_path)
    r = load_train_recipe(rec, ["data.path=elsewhere/*.tar", "vision.name=efficientnet-lite0"])
    assert r.data.path == str(rd / "elsewhere/*.tar") and r.vision.name == "efficientnet-lite0"


def test_curate_and_align_share_the_rule(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.csv").write_text("url,caption\nhttp://example.com/a.jpg,a dog on grass\n")
    rec = tmp_path / "recipes" / "b.yaml"
    rec.write_text(yaml.safe_dump({"name": "x", "out": "builds/x", "sources": [
        {"name": "c", "format": "csv", "path": "../data/c.csv"}]}))
    for cwd in (tmp_path, tmp_path / "data"):
        monkeypatch.chdir(cwd)
        r = load_build_recipe(rec)
        assert r.sources[0].path == resolve_input("../data/c.csv", tmp_path / "recipes") == str(tmp_path / "data/c.csv")
        assert r.build_dir().resolve() == cwd / "builds" / "x"
    assert resolve_input("org/dataset", tmp_path, may_be_id=True) == "org/dataset"
    assert resolve_input("./org/dataset", tmp_path, may_be_id=True) == str(tmp_path / "org/dataset")
