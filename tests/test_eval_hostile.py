"""`align eval` on hostile or awkward data: a cache that must notice changed images, precomputed features whose
file names repeat across class folders, unreadable images, data formats people already have (COCO captions json,
JSONL / CSV / JSON / Parquet tables with their own column names) and reports a person can read.

A fake colour model keeps these fast and exact: an image embeds as its mean colour, a text as the colour word it
names, so every metric is known in advance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from align.eval.run import match_feature_keys, run_eval
from align.eval.retrieval import PairedSet
from tether.clikit import run_command
from tether.recipe import RecipeError

COLORS = {"red": (230, 20, 20), "green": (20, 210, 30), "blue": (20, 30, 230), "yellow": (230, 220, 20),
          "purple": (140, 20, 200), "cyan": (20, 220, 220)}


def _vec(rgb) -> np.ndarray:
    v = np.asarray(rgb, np.float32) / 255.0
    return v - v.mean()


class ColourModel:
    """encode_image = mean colour (centred); encode_text = the colour named in the text."""

    fingerprint = "colour-model-v1"

    def __init__(self) -> None:
        self.image_calls = 0

    def encode_image(self, ims) -> np.ndarray:
        self.image_calls += len(ims)
        return np.stack([_vec(np.asarray(im, np.float32).reshape(-1, 3).mean(0)) for im in ims])

    def encode_text(self, texts) -> np.ndarray:
        out = []
        for t in texts:
            word = next((w for w in COLORS if w in t.lower()), None)
            out.append(_vec(COLORS[word]) if word else np.zeros(3, np.float32))
        return np.stack(out)

    def project_image_features(self, x) -> np.ndarray:
        return np.asarray(x, np.float32)

    def project_text_features(self, x) -> np.ndarray:
        return np.asarray(x, np.float32)


def _solid(path: Path, colour: str, size: int = 16) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), COLORS[colour]).save(path)
    return path


def _flickr(root: Path, colours: list[str], ext: str = "bmp") -> Path:
    names = [f"im{i}.{ext}" for i in range(len(colours))]
    for n, c in zip(names, colours):
        _solid(root / "images" / n, c)
    (root / "captions.txt").write_text("".join(f"{n}#{j}\ta {c} thing number {j}\n"
                                               for n, c in zip(names, colours) for j in range(2)))
    (root / "test_images.txt").write_text("\n".join(names) + "\n")
    return root


# ------------------------------------------------------------------------------------- cache keyed on content
def test_embedding_cache_notices_a_changed_image_even_with_same_size_and_mtime(tmp_path):
    root = _flickr(tmp_path / "f8k", ["red", "green", "blue", "yellow"])
    out = tmp_path / "rep"
    m = ColourModel()
    first = run_eval(m, "retrieval", data=str(root), out=out, batch_size=2, progress=False)
    assert first["metrics"]["i2t_R@1"] == 100.0 and m.image_calls == 4
    again = run_eval(m, "retrieval", data=str(root), out=out, batch_size=2, progress=False)
    assert m.image_calls == 4 and again["metrics"] == first["metrics"]         # served from the cache
    # swap image 0 for a green one: same path, same byte size (BMP), same mtime
    p = root / "images" / "im0.bmp"
    st = p.stat()
    _solid(p, "green")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    changed = run_eval(m, "retrieval", data=str(root), out=out, batch_size=2, progress=False)
    assert m.image_calls == 6                                                  # only the changed batch
    fresh = run_eval(ColourModel(), "retrieval", data=str(root), out=tmp_path / "fresh", progress=False)
    assert changed["metrics"] == fresh["metrics"] != first["metrics"]
    assert changed["metrics"]["i2t_R@1"] < 100.0
    parts = sorted(p.name for p in (out / "cache").rglob("part-*.npy"))
    assert len(parts) == 2                                                     # the stale part was replaced


def test_zeroshot_cache_notices_a_changed_image(tmp_path):
    for c in ("red", "green", "blue"):
        for i in range(2):
            _solid(tmp_path / "zs" / c / f"{i:04d}.png", c)
    m = ColourModel()
    a = run_eval(m, "zeroshot", data=str(tmp_path / "zs"), prompts="photo", out=tmp_path / "o", progress=False)
    assert a["metrics"]["top1"] == 100.0
    _solid(tmp_path / "zs" / "red" / "0000.png", "blue")                       # now misfiled
    b = run_eval(m, "zeroshot", data=str(tmp_path / "zs"), prompts="photo", out=tmp_path / "o", progress=False)
    assert b["metrics"]["top1"] == pytest.approx(500 / 6)
    red = next(r for r in b["per_class"] if r["class"] == "red")
    assert red["top1"] == 50.0 and red["confused_with"] == "blue (1)"


# ------------------------------------------------------------------------ features keyed by relative path
def _cifar_like(root: Path) -> Path:
    for c in ("red", "green", "blue", "yellow"):
        for i in range(3):
            _solid(root / c / f"{i:04d}.png", c)                               # 0000.png in every folder
    return root


def test_features_match_relative_paths_when_file_names_repeat(tmp_path):
    root = _cifar_like(tmp_path / "cifar")
    m = ColourModel()
    encoded = run_eval(m, "zeroshot", data=str(root), prompts="photo", progress=False)
    assert encoded["metrics"]["top1"] == 100.0
    files = sorted(root.rglob("*.png"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))                                        # rows in another order
    from PIL import Image

    feats = m.encode_image([Image.open(files[i]).convert("RGB") for i in order])
    keys = np.array([files[i].relative_to(root).as_posix() for i in order])
    np.savez(tmp_path / "rel.npz", features=feats, keys=keys)
    viaf = run_eval(m, "zeroshot", data=str(root), prompts="photo", features=str(tmp_path / "rel.npz"),
                    progress=False)
    assert encoded["metrics"].pop("n_skipped") == 0                             # only counted when images are opened
    assert viaf["metrics"] == encoded["metrics"]
    # keys with the data folder in front (an absolute path, or a longer relative one) match too
    np.savez(tmp_path / "abs.npz", features=feats, keys=np.array([str(files[i]) for i in order]))
    assert run_eval(m, "zeroshot", data=str(root), prompts="photo", features=str(tmp_path / "abs.npz"),
                    progress=False)["metrics"] == encoded["metrics"]


def test_features_keyed_by_bare_file_names_are_refused_in_one_line(tmp_path, capsys):
    root = _cifar_like(tmp_path / "cifar")
    m = ColourModel()
    files = sorted(root.rglob("*.png"))
    from PIL import Image

    feats = m.encode_image([Image.open(f).convert("RGB") for f in files])
    np.savez(tmp_path / "names.npz", features=feats, keys=np.array([f.name for f in files]))
    # 0000.png once as a bare name (it fits blue/, green/, red/ and yellow/0000.png), the rest by relative path
    first = [f.name == "0000.png" for f in files].index(True)
    keep = [i for i, f in enumerate(files) if f.name != "0000.png" or i == first]
    np.savez(tmp_path / "one.npz", features=feats[keep],
             keys=np.array([files[i].name if i == first else files[i].relative_to(root).as_posix() for i in keep]))

    def cli(npz):
        return run_command(lambda a: run_eval(m, "zeroshot", data=str(root), prompts="photo", features=str(npz),
                                              progress=False) and 0, None)

    capsys.readouterr()
    assert cli(tmp_path / "names.npz") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "appears twice" in err[0]
    assert cli(tmp_path / "one.npz") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ambiguous" in err[0] and "0000.png" in err[0]


def test_match_feature_keys_rules():
    assert match_feature_keys(["a/x.jpg", "b/x.jpg"], ["b/x.jpg", "a/x.jpg"], "f") == [1, 0]
    assert match_feature_keys(["x", "y"], ["imgs/y.jpg", "imgs/x.jpg"], "f") == [1, 0]       # stems, no folders
    assert match_feature_keys(["/data/val/a/x.jpg"], ["a/x.jpg"], "f") == [0]
    with pytest.raises(RecipeError, match="several cached keys"):
        match_feature_keys(["a/x.jpg", "b/x.jpg"], ["x.jpg"], "f")
    with pytest.raises(RecipeError, match="no cached features for image 'c/x.jpg'"):
        match_feature_keys(["a/x.jpg", "b/x.jpg"], ["c/x.jpg"], "f")
    with pytest.raises(RecipeError, match="ambiguous"):
        match_feature_keys(["x.jpg"], ["a/x.jpg", "b/x.jpg"], "f")


# ----------------------------------------------------------------------------- unreadable images are skipped
def test_unreadable_images_are_skipped_by_name_and_counted(tmp_path, capsys):
    root = _flickr(tmp_path / "f8k", ["red", "green", "blue", "yellow"], ext="png")
    good = (root / "images" / "im1.png").read_bytes()
    (root / "images" / "im1.png").write_bytes(good[: len(good) // 2])           # truncated
    (root / "images" / "im2.png").write_text("<html>not an image</html>")       # not an image
    m = ColourModel()
    capsys.readouterr()
    res = run_eval(m, "retrieval", data=str(root), out=tmp_path / "rep", batch_size=3, progress=False)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("skipped ")]
    assert len(lines) == 2 and "im1.png" in lines[0] and "im2.png" in lines[1]
    assert "corrupt_image" in lines[0] and "0x" not in err
    met = res["metrics"]
    assert met["n_skipped"] == 2 and met["n_images"] == 2 and met["n_texts"] == 4 and met["i2t_R@1"] == 100.0
    saved = json.loads((tmp_path / "rep" / "retrieval.json").read_text())
    assert saved["meta"]["skipped"]["count"] == 2
    assert [Path(f["file"]).name for f in saved["meta"]["skipped"]["files"]] == ["im1.png", "im2.png"]
    md = (tmp_path / "rep" / "retrieval.md").read_text()
    assert "skipped (unreadable) images: 2" in md and "im2.png" in md
    # a rerun served from the cache reports the same skips
    again = run_eval(m, "retrieval", data=str(root), out=tmp_path / "rep", batch_size=3, progress=False)
    assert again["metrics"] == met and again["meta"]["skipped"] == res["meta"]["skipped"]
    assert len([ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("skipped ")]) == 2


def test_zeroshot_skips_a_truncated_image(tmp_path, capsys):
    root = _cifar_like(tmp_path / "cifar")
    bad = root / "green" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    res = run_eval(ColourModel(), "zeroshot", data=str(root), prompts="photo", out=tmp_path / "o", progress=False)
    assert res["metrics"]["n_skipped"] == 1 and res["metrics"]["n_images"] == 11 and res["metrics"]["top1"] == 100.0
    assert "skipped " in capsys.readouterr().err and "green/0001.png" in res["meta"]["skipped"]["files"][0]["file"]
    assert "skipped (unreadable) images: 1" in (tmp_path / "o" / "zeroshot.md").read_text()


# ------------------------------------------------------------------------------------------ data formats
def _pair_files(tmp_path: Path) -> tuple[Path, list[str]]:
    colours = ["red", "green", "blue"]
    for c in colours:
        _solid(tmp_path / "imgs" / f"{c}.png", c)
    return tmp_path, colours


def test_coco_captions_json_with_standard_layout_and_image_root(tmp_path, capsys):
    coco = tmp_path / "coco"
    colours = ["red", "green", "blue", "yellow"]
    for i, c in enumerate(colours):
        _solid(coco / "val2017" / f"{i:012d}.jpg", c)
    doc = {"info": {}, "images": [{"id": 10 + i, "file_name": f"{i:012d}.jpg", "width": 16, "height": 16}
                                  for i in range(4)],
           "annotations": [{"id": 100 + 5 * i + j, "image_id": 10 + i, "caption": f"A {c} square, take {j}."}
                           for i, c in enumerate(colours) for j in range(5)]}
    (coco / "annotations").mkdir()
    ann = coco / "annotations" / "captions_val2017.json"
    ann.write_text(json.dumps(doc))
    p = PairedSet.load(ann)
    assert len(p) == 4 and len(p.captions) == 20 and p.image_paths[0] == coco / "val2017" / "000000000000.jpg"
    assert p.caption_image.tolist() == [i for i in range(4) for _ in range(5)]
    res = run_eval(ColourModel(), "retrieval", data=str(ann), out=tmp_path / "rep", progress=False)
    assert res["metrics"]["i2t_R@1"] == 100.0 and res["metrics"]["t2i_R@1"] == 100.0
    assert res["meta"]["name"] == "captions_val2017"
    # images elsewhere: --image-root; without it, a one-line error that names the option
    (coco / "val2017").rename(tmp_path / "elsewhere")
    assert len(PairedSet.load(ann, image_root=tmp_path / "elsewhere")) == 4
    capsys.readouterr()
    assert run_command(lambda a: run_eval(ColourModel(), "retrieval", data=str(ann), progress=False) and 0,
                       None) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-root" in err[0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 2,
                                                                                          "caption": "c"}]}))
    with pytest.raises(RecipeError, match="image id 2"):
        PairedSet.load(bad)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "json", "parquet"])
def test_tables_with_their_own_column_names(tmp_path, fmt):
    root, colours = _pair_files(tmp_path)
    rows = [{"file_name": f"imgs/{c}.png", "text": f"a {c} one\nwith a second line" if fmt in ("csv", "parquet")
             else f"a {c} one", "extra": 1} for c in colours]
    rows.append({"file_name": "imgs/red.png", "text": "another red caption", "extra": 2})
    path = root / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["file_name", "text", "extra"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    p = PairedSet.load(path, image_column="file_name", caption_column="text")
    assert p.keys == [f"imgs/{c}.png" for c in colours] and len(p.captions) == 4
    assert p.caption_image.tolist() == [0, 1, 2, 0] and p.image_paths[1] == root / "imgs" / "green.png"
    if fmt in ("csv", "parquet"):
        assert p.captions[0] == "a red one\nwith a second line"             # a quoted multi-line field stays whole
    res = run_eval(ColourModel(), "retrieval", data=str(path), image_column="file_name", caption_column="text",
                   progress=False)
    assert res["metrics"]["n_images"] == 3 and res["metrics"]["t2i_R@1"] == 100.0
    with pytest.raises(RecipeError, match=r"no column 'image' \(columns: .*file_name.*\).*--image-column"):
        PairedSet.load(path)
    # an image root elsewhere
    (root / "imgs").rename(root / "moved")
    (root / "moved2").mkdir()
    (root / "moved").rename(root / "moved2" / "imgs")
    q = PairedSet.load(path, image_column="file_name", caption_column="text", image_root=root / "moved2")
    assert q.image_paths[0] == root / "moved2" / "imgs" / "red.png" and q.image_paths[0].is_file()


# ------------------------------------------------------------------------------------ reports a person reads
def test_reports_name_the_data_and_plot_curves_and_per_class(tmp_path):
    root = _flickr(tmp_path / "f8k", ["red", "green", "blue", "yellow", "purple", "cyan"])
    res = run_eval(ColourModel(), "retrieval", data=str(root), out=tmp_path / "r", progress=False, curve_max_k=20)
    c = res["curves"]
    assert c["K"] == list(range(1, 21)) and all(a <= b for a, b in zip(c["t2i"], c["t2i"][1:]))
    assert c["t2i"][0] == res["metrics"]["t2i_R@1"] and c["i2t"][4] == res["metrics"]["i2t_R@5"]
    assert c["chance_t2i"][0] == pytest.approx(100 / 6) and c["chance_t2i"][5] == pytest.approx(100.0)
    assert c["chance_i2t"][0] == pytest.approx(100 * 2 / 12)                 # 2 correct captions of 12
    md = (tmp_path / "r" / "retrieval.md").read_text()
    assert "flickr8k-test" in md and "None" not in md and "R@20" in md
    assert (tmp_path / "r" / "retrieval.png").stat().st_size > 10_000
    zs = _cifar_like(tmp_path / "zs")
    z = run_eval(ColourModel(), "zeroshot", data=str(zs), prompts="photo", out=tmp_path / "z", progress=False)
    assert sorted(r["class"] for r in z["per_class"]) == ["blue", "green", "red", "yellow"]
    assert all(r["top1"] == 100.0 and r["n"] == 3 for r in z["per_class"])
    zmd = (tmp_path / "z" / "zeroshot.md").read_text()
    assert "Per class" in zmd and "| yellow | 3 |" in zmd
    assert (tmp_path / "z" / "zeroshot.png").stat().st_size > 10_000
