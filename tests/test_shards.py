"""Shards from local rows: catalog bookkeeping, tar contents, sizes.json, index, HF loading, reshard, kill+resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.catalog import Catalog
from curate.media import MediaRecipe, main as media_main, run_media
from curate.shards import ShardConfig, run_shards
from httpserver import make_build

REPO = Path(__file__).resolve().parent.parent
FIELDS = {"uid", "caption", "concept_ids", "source", "url", "sha256", "width", "height"}


def _photos(flickr8k: Path, n: int, skip: int = 0) -> list[Path]:
    return sorted((flickr8k / "images").glob("*.jpg"))[skip:skip + n]


def _local_rows(photos: list[Path], tmp: Path) -> list[dict]:
    rows = [{"uid": f"f{i:03d}", "path": str(p), "caption": f"photo number {i}", "source": "flickr8k",
             "concept_ids": [f"n{i % 3:08d}"]} for i, p in enumerate(photos)]
    bad = tmp / "corrupt.jpg"
    bad.write_bytes(photos[0].read_bytes()[:300])
    png = tmp / "picture.png"
    Image.open(photos[1]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(png)
    rows += [
        {"uid": "x-missing", "path": str(tmp / "nope.jpg"), "caption": "gone", "source": "disk",
         "concept_ids": ["n00000001"]},
        {"uid": "x-corrupt", "path": str(bad), "caption": "broken", "source": "disk", "concept_ids": ["n00000001"]},
        {"uid": "x-png", "path": str(png), "caption": "a png picture", "source": "disk", "concept_ids": ["n00000002"]},
        {"uid": "x-nothing", "caption": "no url, no path", "source": "disk", "concept_ids": ["n00000002"]},
    ]
    return rows


def _recipe(**shards) -> MediaRecipe:
    return MediaRecipe.model_validate({"shards": {"samples_per_shard": 5, **shards},
                                       "image_dedup": {"phash": {"threshold": 2}}})


def read_tars(folder: Path) -> list[tuple[str, str, dict, bytes, str]]:
    """(shard, key, json, jpg bytes, txt) for every sample, checking member layout on the way."""
    out = []
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
            assert len(members) % 3 == 0
            for i in range(0, len(members), 3):
                names = [m.name for m in members[i:i + 3]]
                key = names[0].split(".")[0]
                assert names == [f"{key}.jpg", f"{key}.txt", f"{key}.json"] and "." not in key
                jpg, txt, js = (tf.extractfile(m).read() for m in members[i:i + 3])
                out.append((tar.name, key, json.loads(js), jpg, txt.decode()))
    return out


@pytest.mark.real
def test_local_rows_to_loadable_shards(flickr8k, tmp_path):
    photos = _photos(flickr8k, 12)
    rows = _local_rows(photos, tmp_path)
    build = tmp_path / "build"
    sel = make_build(build, rows)
    with Catalog(build / "catalog.duckdb") as cat:
        rep = run_media(cat, _recipe(), sel, build, progress=False)
        st = dict(cat.execute("SELECT uid, status FROM downloads").fetchall())
        assert len(st) == len(rows)  # every row has an outcome
        assert st["x-missing"] == "missing_file" and st["x-corrupt"] == "failed_to_decode"
        assert st["x-nothing"] == "no_source" and st["x-png"] == "success"
        assert all(st[f"f{i:03d}"] == "success" for i in range(12))
        dec = dict(cat.execute("SELECT uid, reason FROM decisions WHERE stage='download' AND NOT kept").fetchall())
        assert set(dec) == {"x-missing", "x-corrupt", "x-nothing"} and "truncated" in dec["x-corrupt"].lower()
        w, h, sha = cat.execute("SELECT width, height, sha256 FROM downloads WHERE uid='f003'").fetchone()
        assert (w, h) == Image.open(photos[3]).size
        import hashlib

        assert sha == hashlib.sha256(photos[3].read_bytes()).hexdigest()
    out = build / "shards"
    samples = read_tars(out)
    assert rep["shards"]["samples"] == len(samples) == 13  # 12 photos + the png
    assert len({s[1] for s in samples}) == 13 and len({s[2]["uid"] for s in samples}) == 13
    for _, _, meta, jpg, txt in samples:
        assert set(meta) == FIELDS and all(v is not None for v in meta.values())
        assert meta["caption"] == txt and meta["url"] == "" and meta["concept_ids"]
        im = Image.open(io.BytesIO(jpg))
        assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {f"shard-{i:05d}.tar": n for i, n in enumerate([5, 5, 3])}
    idx = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["uid"] for r in idx] == [s[2]["uid"] for s in samples]

    from datasets import load_dataset

    from curate.hfdataset import load_index, load_shards

    files = sorted(str(p) for p in out.glob("shard-*.tar"))
    hf = str(tmp_path / "hf")
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=hf)  # features inferred
    assert len(ds) == 13 and ds[0]["json"]["uid"] == samples[0][2]["uid"] and ds[0]["txt"] == samples[0][4]
    assert ds[0]["jpg"].size == (samples[0][2]["width"], samples[0][2]["height"])
    # the card's configs + features (own cache_dir: datasets caches a folder by its name, see docs/media.md)
    folder = load_dataset(str(out), split="train", cache_dir=hf)
    assert folder.features == load_shards(out, cache_dir=hf).features and len(folder) == 13
    assert load_index(out, cache_dir=hf)["uid"] == [s[2]["uid"] for s in samples]
    assert "configs:" in (out / "README.md").read_text()
    import webdataset as wds  # the webdataset library reads the tars too

    got = [(x["__key__"], json.loads(x["json"])["uid"]) for x in wds.WebDataset(files, shardshuffle=False)]
    assert got == [(s[1], s[2]["uid"]) for s in samples]


def test_card_features_match_datasets():
    from datasets import DatasetInfo

    from curate.hfdataset import FEATURES_YAML, features

    assert DatasetInfo(features=features())._to_yaml_dict()["features"] == FEATURES_YAML


def test_empty_concept_lists_load_with_card_features(tmp_path):
    """Empty concept lists where the seeded order starts: schema inference must still see a typed list."""
    imgs = []
    for i in range(8):
        p = tmp_path / f"im{i}.jpg"
        Image.new("RGB", (32 + i, 24), (i * 30, 10, 200 - i * 20)).save(p)
        imgs.append(p)
    from curate.shards import shard_order

    first6 = set(shard_order([f"u{i}" for i in range(8)], 1)[:6])  # the first samples of the shard
    rows = [{"uid": f"u{i}", "path": str(p), "caption": f"c{i}", "concept_ids": [] if f"u{i}" in first6 else ["n1"]}
            for i, p in enumerate(imgs)]
    build = tmp_path / "b"
    sel = make_build(build, rows)
    recipe = MediaRecipe.model_validate({"rebalance": {"enabled": False}, "image_dedup": {"enabled": False},
                                         "shards": {"samples_per_shard": 100, "seed": 1}})
    with Catalog(build / "catalog.duckdb") as cat:
        run_media(cat, recipe, sel, build, progress=False)
    from datasets import load_dataset

    ds = load_dataset(str(build / "shards"), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(len(j["concept_ids"]) for j in ds["json"]) == [0] * 6 + [1] * 2
    files = [str(p) for p in (build / "shards").glob("shard-*.tar")]
    plain = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf2"))
    assert plain[0]["json"]["concept_ids"] == ["n1"] and plain.features == ds.features


def test_image_store_reads_every_layout(tmp_path):
    from curate.imagestore import ImageStore, StoredImageError
    from curate.shards import ShardWriter, sample_meta

    blobs = [bytes([i]) * (100 + 700 * i) for i in range(3)]
    (tmp_path / "files" / "00000").mkdir(parents=True)
    (tmp_path / "files" / "00000" / "000000001.jpg").write_bytes(blobs[0])
    w = ShardWriter(tmp_path / "00003.tar")
    for i, b in enumerate(blobs):
        w.write(f"00003{i:04d}", b, "cap", sample_meta("u", "cap", [], "", "", "", 1, 1))
    w.commit()
    (tmp_path / "local.bin").write_bytes(blobs[2])
    with ImageStore("jpg") as st:
        assert st.read("files", str(tmp_path / "files"), "00000", "000000001") == blobs[0]
        assert [st.read("webdataset", str(tmp_path), "00003", f"00003{i:04d}") for i in range(3)] == blobs
        assert st.read("local", "", "", str(tmp_path / "local.bin")) == blobs[2]
        with pytest.raises(ValueError):
            st.read("zip", "", "", "")
        with pytest.raises(StoredImageError, match="not in"):
            st.read("webdataset", str(tmp_path), "00003", "missing")
        with pytest.raises(StoredImageError, match="no such file"):
            st.read("files", str(tmp_path / "files"), "00000", "missing")
        assert st.get("webdataset", str(tmp_path), "nope", "x") is None and st.get("zip", "", "", "") is None
    # bounded: a stored image above max_bytes is refused, never read whole; at most max_tars indexes are kept
    w = ShardWriter(tmp_path / "00004.tar")
    w.write("000040000", blobs[0], "cap", sample_meta("u", "cap", [], "", "", "", 1, 1))
    w.commit()
    with ImageStore("jpg", max_bytes=1000, max_tars=1) as st:
        assert st.read("webdataset", str(tmp_path), "00003", "000030000") == blobs[0]  # 100 bytes
        with pytest.raises(StoredImageError, match="too large"):
            st.read("webdataset", str(tmp_path), "00003", "000030002")  # 1,500 bytes
        with pytest.raises(StoredImageError, match="too large"):
            st.read("local", "", "", str(tmp_path / "local.bin"))
        assert st.read("webdataset", str(tmp_path), "00004", "000040000") == blobs[0]
        assert list(st._tars) == [str(tmp_path / "00004.tar")]  # the other tar's index released


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


@pytest.mark.real
def test_reshard_is_deterministic(flickr8k, tmp_path):
    rows = [{"uid": f"r{i:02d}", "path": str(p), "caption": f"c {i}", "concept_ids": ["n1"], "source": "s"}
            for i, p in enumerate(_photos(flickr8k, 11, skip=40))]
    build = tmp_path / "b"
    sel = make_build(build, rows)
    with Catalog(build / "catalog.duckdb") as cat:
        run_media(cat, _recipe(seed=7, samples_per_shard=4), sel, build, progress=False)
        first = _shard_bytes(build / "shards")
        order7 = [s[2]["uid"] for s in read_tars(build / "shards")]
        again = run_shards(cat, ShardConfig(seed=7, samples_per_shard=4, out=str(tmp_path / "copy"),
                                            allow_outside_build=True), build,
                           progress=False)
        assert again.written == 3 and _shard_bytes(tmp_path / "copy") == first  # byte-identical
        res = run_shards(cat, ShardConfig(seed=8, samples_per_shard=3), build, progress=False)
        order8 = [s[2]["uid"] for s in read_tars(build / "shards")]
        assert res.shards == 4 and sorted(order8) == sorted(order7) and order8 != order7
        assert sorted(json.loads((build / "shards" / "sizes.json").read_text()).values()) == [2, 3, 3, 3]
        assert run_shards(cat, ShardConfig(seed=8, samples_per_shard=3), build, progress=False).written == 0
    # the CLI reshards an existing build with a new seed (recipe.yaml as `curate build` leaves it)
    (build / "recipe.yaml").write_text("name: t\nmedia:\n  shards: {samples_per_shard: 4}\n")
    assert media_main(["shard", str(build), "--seed", "7", "--no-progress"]) == 0
    assert _shard_bytes(build / "shards") == first


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert media_main(["shard", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "catalog.duckdb" in err and "\n" not in err
    Catalog(tmp_path / "b" / "catalog.duckdb").close()
    (tmp_path / "b" / "recipe.yaml").write_text("name: t\nmedia:\n  shards: {samples_per_shardz: 4}\n")
    assert media_main(["download", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "samples_per_shardz: unknown key" in err and "\n" not in err
    (tmp_path / "b" / "recipe.yaml").write_text("name: t\nmedia: {}\n")
    assert media_main(["shard", str(tmp_path / "b"), "--samples-per-shard", "0"]) == 2
    assert "samples_per_shard" in capsys.readouterr().err


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import curate.shards as sh
orig = sh.ShardWriter.commit
def slow_commit(self):
    time.sleep(0.25)
    orig(self)
sh.ShardWriter.commit = slow_commit
from curate.catalog import Catalog
from curate.media import MediaRecipe, run_media
build = Path(sys.argv[1])
recipe = MediaRecipe.model_validate({"shards": {"samples_per_shard": 2}, "image_dedup": {"enabled": False}})
with Catalog(build / "catalog.duckdb") as cat:
    run_media(cat, recipe, build / "selection.parquet", build, progress=False)
"""


@pytest.mark.real
def test_killed_shard_stage_resumes_without_loss(flickr8k, tmp_path):
    photos = _photos(flickr8k, 24, skip=100)
    rows = [{"uid": f"k{i:02d}", "path": str(p), "caption": f"c {i}", "concept_ids": ["n1"]}
            for i, p in enumerate(photos)]
    ref, build = tmp_path / "ref", tmp_path / "killed"
    make_build(ref, rows)
    make_build(build, rows)
    recipe = MediaRecipe.model_validate({"shards": {"samples_per_shard": 2}, "image_dedup": {"enabled": False}})
    with Catalog(ref / "catalog.duckdb") as cat:
        run_media(cat, recipe, ref / "selection.parquet", ref, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(build)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while len(list((build / "shards").glob("shard-*.tar"))) < 3 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        assert len(list((build / "shards").glob("shard-*.tar"))) >= 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    n_before = len(list((build / "shards").glob("shard-*.tar")))
    assert n_before < 12  # killed mid-stage
    with Catalog(build / "catalog.duckdb") as cat:
        assert len(cat.done_units("shards")) in (n_before, n_before - 1)
        run_media(cat, recipe, build / "selection.parquet", build, progress=False)
        assert cat.scalar("SELECT count(*) FROM shard_index") == 24
        assert cat.scalar("SELECT count(DISTINCT uid) FROM shard_index") == 24
    assert _shard_bytes(build / "shards") == _shard_bytes(ref / "shards")
    assert not list((build / "shards").glob(".*.tmp"))
    assert (build / "shards" / "sizes.json").read_text() == (ref / "shards" / "sizes.json").read_text()


def test_local_check_resumes_after_a_crash(tmp_path, monkeypatch):
    """A crash in the middle of the local decode check keeps the committed chunks and redoes only the rest."""
    import curate.download as dl
    from curate.download import DownloadConfig, load_selection, run_download

    rows = []
    for i in range(10):
        p = tmp_path / f"i{i}.jpg"
        Image.new("RGB", (20 + i, 20), (i * 20, 0, 0)).save(p)
        rows.append({"uid": f"u{i}", "path": str(p), "caption": "c", "concept_ids": ["n1"]})
    build = tmp_path / "b"
    make_build(build, rows)
    real, calls = dl.check_local_image, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt  # what a kill looks like to the code that has not committed yet
        return real(path)

    cfg = DownloadConfig(local_chunk=3, local_threads=1)
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        monkeypatch.setattr(dl, "check_local_image", flaky)
        with pytest.raises(KeyboardInterrupt):
            run_download(cat, cfg, build, progress=False)
        assert cat.scalar("SELECT count(*) FROM downloads") == 6 and len(cat.done_units("download")) == 2
        calls.clear()
        assert run_download(cat, cfg, build, progress=False) == {"success": 10}
        assert len(calls) == 4  # only the 4 rows of the unfinished chunks were checked again
        assert cat.scalar("SELECT count(DISTINCT uid) FROM downloads") == 10
        assert cat.scalar("SELECT count(*) FROM decisions WHERE stage = 'download'") == 10
