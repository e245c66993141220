"""`align eval --suite`: many datasets (ImageFolder, saved HF datasets, tables, hub ids) in one paper-style table,
resumable per dataset, a missing dataset a row of the table.

The colour model of test_eval_hostile makes every metric known in advance: an image embeds as its mean colour,
a text as the colour word it names. A CLI test runs the same kind of suite on a tiny random AlignedModel folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from align.eval.suite import Suite, load_suite, run_suite
from tests.test_eval_hostile import COLORS, ColourModel, _flickr, _solid
from tether.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, colours: list[str], per: int = 2) -> Path:
    for c in colours:
        for i in range(per):
            _solid(root / c / f"{i}.png", c)
    return root


def _saved_dataset(path: Path, colours: list[str], classlabel: bool = True) -> Path:
    import datasets
    from PIL import Image

    ims = [Image.new("RGB", (12, 12), COLORS[c]) for c in colours for _ in range(2)]
    labels = [i for i in range(len(colours)) for _ in range(2)]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=colours) if classlabel else datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": ims, "label": labels}, features=feats).save_to_disk(str(path))
    return path


def _retrieval_dataset(path: Path, colours: list[str]) -> Path:
    import datasets
    from PIL import Image

    ims = [Image.new("RGB", (12, 12), COLORS[c]) for c in colours]
    txt = [f"a {c} square\nsomething {c} again" for c in colours]      # clip-benchmark wds style: one row per image
    datasets.Dataset.from_dict({"jpg": ims, "txt": txt},
                               features=datasets.Features({"jpg": datasets.Image(), "txt": datasets.Value("string")})
                               ).save_to_disk(str(path))
    return path


def _suite_file(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(body)
    return p


def _local_suite(tmp_path: Path) -> Path:
    _folder(tmp_path / "data" / "folder", ["red", "green", "blue"])
    _saved_dataset(tmp_path / "data" / "saved", ["yellow", "purple", "cyan"])
    # integer labels without ClassLabel: class names from a file, label i = line i (NOT the sorted order)
    _saved_dataset(tmp_path / "data" / "ints", ["cyan", "red", "green"], classlabel=False)
    (tmp_path / "data" / "ints.txt").write_text("cyan\nred\ngreen\n")
    _flickr(tmp_path / "data" / "f8k", ["red", "green", "blue", "yellow"])
    _retrieval_dataset(tmp_path / "data" / "wds_style", ["purple", "cyan", "blue"])
    return _suite_file(tmp_path, """\
name: local
defaults: {prompts: photo, batch_size: 4}
classification:
  - {name: colours-folder, path: data/folder}
  - {name: colours-saved, path: data/saved}
  - {name: colours-ints, path: data/ints, classnames: data/ints.txt, prompts: ["a {} thing.", "itap of a {c}."]}
  - {name: not-here, path: data/nothing}
  - {name: not-reachable, path: nobody-xyz/wds_nothing}
retrieval:
  - {name: f8k-style, path: data/f8k}
  - {name: wds-style, path: data/wds_style}
""")


def test_a_local_suite_gives_the_paper_table_and_resumes_per_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    suite = load_suite(_local_suite(tmp_path))
    m = ColourModel()
    res = run_suite(m, suite, tmp_path / "out", progress=False)
    rows = {r["dataset"]: r for r in res["rows"]}
    for name in ("colours-folder", "colours-saved", "colours-ints"):
        assert rows[name]["status"] == "ok" and rows[name]["top1"] == 100.0 and rows[name]["n_classes"] == 3, rows[name]
    assert rows["colours-ints"]["prompts"] == "2 templates" and rows["colours-saved"]["prompts"] == "photo"
    assert rows["not-here"]["status"] == "missing" and "no such file or folder" in rows["not-here"]["reason"]
    assert rows["not-reachable"]["status"] == "missing" and "nobody-xyz/wds_nothing" in rows["not-reachable"]["reason"]
    for name, n_img, n_txt in (("f8k-style", 4, 8), ("wds-style", 3, 6)):
        r = rows[name]
        assert r["status"] == "ok" and r["t2i_R@1"] == 100.0 and r["i2t_R@1"] == 100.0, r
        assert (r["n_images"], r["n_texts"]) == (n_img, n_txt)
    assert res["summary"] == {"mean_top1": 100.0, "classification_sets_run": 3, "classification_sets": 5,
                              "retrieval_sets_run": 2, "retrieval_sets": 2}
    out = tmp_path / "out"
    md = (out / "suite.md").read_text()
    assert "| **mean** (3 of 5 sets) | **100.0** |" in md
    assert "| not-here | missing: " in md and "T→I R@1" in md
    assert (out / "suite.png").stat().st_size > 1000 and json.loads((out / "suite.json").read_text())["rows"]
    for name in ("colours-folder", "colours-saved", "f8k-style"):          # each dataset's own report beside it
        assert any((out / "datasets" / name).glob("*.md")), name
    err = capsys.readouterr().err
    assert "not-here: missing" in err and "Traceback" not in err
    assert m.image_calls == 6 + 6 + 6 + 4 + 3

    # a rerun reads finished datasets back: no image is embedded again; the missing ones are tried again
    m2 = ColourModel()
    res2 = run_suite(m2, suite, out, progress=False)
    assert m2.image_calls == 0 and res2["rows"] == res["rows"]
    assert "finished before with this model, read back" in capsys.readouterr().err
    # a dataset whose settings change is evaluated again, the others are not
    changed = suite.model_copy(update={"classification": [suite.classification[0].model_copy(update={"limit": 4})]
                                       + suite.classification[1:]})
    m3 = ColourModel()
    res3 = run_suite(m3, changed, out, progress=False)
    assert {r["dataset"]: r["n_images"] for r in res3["rows"] if r["kind"] == "classification"
            and r["status"] == "ok"}["colours-folder"] == 4
    assert m3.image_calls == 4   # only the changed dataset ran again
    # fresh=True evaluates every dataset again (image embeddings still come from the content-keyed cache)
    capsys.readouterr()
    res4 = run_suite(ColourModel(), suite, out, progress=False, fresh=True)
    err = capsys.readouterr().err
    assert "read back" not in err and err.count(" …") == 7 and res4["rows"] == res["rows"]


def test_wrong_class_names_are_caught(tmp_path):
    _saved_dataset(tmp_path / "ints", ["cyan", "red", "green"], classlabel=False)
    (tmp_path / "two.txt").write_text("cyan\nred\n")
    suite = load_suite(_suite_file(tmp_path, "classification:\n  - {name: a, path: ints, classnames: two.txt}\n"
                                             "  - {name: b, path: ints}\n"))
    res = run_suite(ColourModel(), suite, tmp_path / "out", progress=False)
    a, b = res["rows"]
    assert a["status"] == "failed" and "labels run 0..2 but 2 class names" in a["reason"]
    assert b["status"] == "failed" and "integer labels without class names" in b["reason"]


@pytest.mark.parametrize("body,msg", [
    ("classification: []\n", "at least one dataset"),
    ("classification:\n  - {name: a, path: x}\n  - {name: a, path: y}\n", "used twice"),
    ("classification:\n  - {name: ../up, path: x}\n", "names a folder"),
    ("classification:\n  - {name: a, path: x, prompts: [\"no class here\"]}\n", "needs {c}"),
    ("classification:\n  - {name: a, path: x, prompts: [\"a {0} {c}\"]}\n", "only {c} and {gloss}"),
    ("defaults: {prompts: clip81}\nclassification:\n  - {name: a, path: x}\n", "prompt set"),
    ("classification:\n  - {name: a, path: x, colour: red}\n", "colour"),
])
def test_a_bad_suite_file_is_one_line(tmp_path, body, msg):
    with pytest.raises(RecipeError) as e:
        load_suite(_suite_file(tmp_path, body))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_shipped_suites_validate():
    paper = load_suite(ROOT / "recipes" / "eval_paper.yaml")
    assert len(paper.classification) == 12 and [r.name for r in paper.retrieval] == ["flickr30k", "coco-5k"]
    assert "imagenet1k" in [c.name for c in paper.classification]
    local = load_suite(ROOT / "recipes" / "eval_local.yaml")
    assert isinstance(local, Suite) and local.classification and local.retrieval


def test_the_cli_runs_a_suite_on_an_aligned_model(tmp_path, tiny_vision, tiny_text, capsys, monkeypatch):
    from align.cli import main
    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pc = ProjectorConfig(kind="mlp", out_dim=8)
    AlignedModel.from_parts(DualProjector(pc, pc, tiny_vision.dim, tiny_text.dim), tiny_vision, tiny_text, pc,
                            pc).save_pretrained(tmp_path / "m")
    _folder(tmp_path / "data" / "folder", ["red", "green", "blue"])
    _saved_dataset(tmp_path / "data" / "saved", ["yellow", "purple", "cyan"])
    _flickr(tmp_path / "data" / "f8k", ["red", "green", "blue", "yellow"])
    suite = _suite_file(tmp_path, "name: three\ndefaults: {prompts: photo}\nclassification:\n"
                                  "  - {name: folder, path: data/folder}\n  - {name: saved, path: data/saved}\n"
                                  "  - {name: gone, path: data/gone}\n"
                                  "retrieval:\n  - {name: f8k, path: data/f8k}\n")
    assert main(["eval", str(tmp_path / "m"), "--suite", str(suite), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "folder: top-1" in out and "saved: top-1" in out and "gone: missing" in out and "f8k: T→I R@1" in out
    assert "mean top-1" in out and "(2 of 3 classification sets)" in out
    res = json.loads((tmp_path / "out" / "suite.json").read_text())
    top1 = [r["top1"] for r in res["rows"] if r["kind"] == "classification" and r["status"] == "ok"]
    assert len(top1) == 2 and np.isclose(res["summary"]["mean_top1"], np.mean(top1))
    # one line for a command that names neither or both
    assert main(["eval", str(tmp_path / "m")]) == 2
    assert main(["eval", str(tmp_path / "m"), "--suite", str(suite), "--task", "zeroshot"]) == 2
    err = capsys.readouterr().err
    assert "needs --task zeroshot|retrieval|localize (one dataset) or --suite" in err and "Traceback" not in err
