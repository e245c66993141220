"""bench/curated_vs_random.py builds two Flickr8k arms of equal caption count from a curate selection."""

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from align.data import read_flickr8k

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("curated_vs_random", REPO / "bench" / "curated_vs_random.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flickr(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    lines = [f"im{i}.jpg#{j}\tcaption {j} of image {i}" for i in range(6) for j in range(5)]
    (root / "captions.txt").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    (root / "train_images.txt").write_text("".join(f"im{i}.jpg\n" for i in range(4)), encoding="utf-8")
    (root / "test_images.txt").write_text("im4.jpg\nim5.jpg\n", encoding="utf-8")


def _selection(path: Path, ids: list[str]) -> None:
    pq.write_table(pa.table({"uid": [f"flickr8k:{i}" for i in ids], "caption": ["x"] * len(ids)}), path)


def test_arms_have_equal_size_and_read_back(tmp_path, capsys):
    bench = _bench()
    _flickr(tmp_path / "f8k")
    sel = tmp_path / "selection.parquet"
    _selection(sel, ["im0.jpg#1", "im0.jpg#3", "im2.jpg#0"])
    argv = ["--selection", str(sel), "--flickr8k", str(tmp_path / "f8k"), "--out", str(tmp_path / "cvu"),
            "--prepare-only"]
    assert bench.main(argv) == 0
    assert "curated: 3 captions of 2 images" in capsys.readouterr().out
    cur = list(read_flickr8k(tmp_path / "cvu" / "curated", "train"))
    assert [(s.key, s.captions) for s in cur] == [("im0", ["caption 1 of image 0", "caption 3 of image 0"]),
                                                   ("im2", ["caption 0 of image 2"])]
    assert cur[0].image == str(tmp_path / "cvu" / "curated" / "images" / "im0.jpg")
    rnd = list(read_flickr8k(tmp_path / "cvu" / "random", "train"))
    assert sum(len(s.captions) for s in rnd) == 3 and all(s.key in {"im0", "im1", "im2", "im3"} for s in rnd)
    first = (tmp_path / "cvu" / "random" / "captions.txt").read_text()
    assert bench.main(argv) == 0 and (tmp_path / "cvu" / "random" / "captions.txt").read_text() == first  # seeded
    # another selection into the same folder would mix caches: refused; a test caption is not a train caption
    _selection(sel, ["im1.jpg#0"])
    assert bench.main(argv) == 2 and "fresh --out" in capsys.readouterr().err
    _selection(sel, ["im5.jpg#0"])
    assert bench.main(argv[:-3] + ["--out", str(tmp_path / "x"), "--prepare-only"]) == 2
    assert "not captions of this split" in capsys.readouterr().err


def test_random_arm_from_another_selection_and_extra_arms(tmp_path, capsys):
    bench = _bench()
    _flickr(tmp_path / "f8k")
    sel, pool = tmp_path / "filtered.parquet", tmp_path / "unfiltered.parquet"
    _selection(sel, ["im0.jpg#1", "im2.jpg#0"])
    pool_ids = ["im0.jpg#1", "im1.jpg#2", "im1.jpg#4", "im2.jpg#0"]
    _selection(pool, pool_ids)
    argv = ["--selection", str(sel), "--random-from", str(pool), "--also", f"first={pool}", "--flickr8k",
            str(tmp_path / "f8k"), "--out", str(tmp_path / "cvu"), "--prepare-only"]
    assert bench.main(argv) == 0
    assert "first: 4 captions of 3 images" in capsys.readouterr().out
    rnd = [line.split("\t")[0] for line in (tmp_path / "cvu" / "random" / "captions.txt").read_text().splitlines()]
    assert len(rnd) == 2 and set(rnd) <= set(pool_ids)  # equal size, drawn from the other selection only
    first = [line.split("\t")[0] for line in (tmp_path / "cvu" / "first" / "captions.txt").read_text().splitlines()]
    assert first == pool_ids
    assert bench.main(argv[:4] + ["--also", "random=" + str(pool), "--flickr8k", str(tmp_path / "f8k"), "--out",
                                  str(tmp_path / "y"), "--prepare-only"]) == 2
    assert "new alphanumeric NAME" in capsys.readouterr().err
    _selection(pool, ["im0.jpg#1"])  # fewer captions than the selection: no equal-size draw
    assert bench.main(argv[:-3] + ["--out", str(tmp_path / "z"), "--prepare-only"]) == 2
