"""End to end with img2dataset downloading for real from a loopback server: outcomes, dedup, shards, HF, retry,
kill + resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.catalog import Catalog
from curate.download import DownloadConfig, img2dataset_kwargs
from curate.media import MediaRecipe, run_media
from httpserver import PhotoServer, make_build
from test_shards import FIELDS, read_tars

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.real

DL = {"processes_count": 1, "thread_count": 4, "timeout": 2, "min_image_size": 10, "number_sample_per_shard": 8,
      "image_size": 224, "resize_mode": "keep_ratio",
      "allow_private_hosts": True}  # the test server is on loopback, refused by default


def test_recipe_maps_to_img2dataset_parameters():
    import inspect

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    kw = img2dataset_kwargs(DownloadConfig(max_aspect_ratio=3, distributor="pyspark"))
    params = inspect.signature(img2dataset.download).parameters
    assert set(kw) <= set(params) and kw["distributor"] == "pyspark" and kw["max_aspect_ratio"] == 3
    assert kw["compute_hash"] == "sha256" and kw["enable_wandb"] is False and kw["save_additional_columns"] == ["uid"]


KILL_SCRIPT = """
import sys
from pathlib import Path
from curate.catalog import Catalog
from curate.media import MediaRecipe, run_media
build = Path(sys.argv[1])
recipe = MediaRecipe.model_validate_json(sys.argv[2])
if __name__ == "__main__":
    with Catalog(build / "catalog.duckdb") as cat:
        run_media(cat, recipe, build / "selection.parquet", build, progress=False)
"""


def _run_and_kill(build: Path, recipe: MediaRecipe, tmp_path: Path) -> list[str]:
    """Run the media stages in a subprocess; SIGKILL its process group once img2dataset finished a shard."""
    script = tmp_path / "media_run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(build), recipe.model_dump_json()], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = build / "media" / "download" / "attempt-000" / "out"
    try:
        deadline = time.time() + 120
        while not list(out.glob("*_stats.json")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        return sorted(p.name for p in out.glob("*_stats.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: img2dataset's spawned workers too
        proc.wait(timeout=10)


def _path(rows: list[dict], uid: str) -> str:
    url = next(r["url"] for r in rows if r["uid"] == uid)
    return "/" + url.split("/", 3)[3]


def test_download_kill_resume_end_to_end(flickr8k, tmp_path, capsys):
    """img2dataset downloads from 127.0.0.1; the run is killed after its first shard and resumed; then every
    row's outcome, image dedup, re-balance report, shards, sizes.json, HF loading and retry-failed are checked."""
    photos = sorted((flickr8k / "images").glob("*.jpg"))[500:507]
    with PhotoServer(flickr8k / "images", truncate_from=photos[0].name, slow_s=8) as srv:
        srv.delay_s = 0.1  # slow enough per image that the first img2dataset shard ends well before the last
        b = srv.base
        rows = [{"uid": f"u{i:02d}", "url": srv.url(p.name), "caption": f"photo {i}", "source": "web",
                 "concept_ids": ["n1" if i < 4 else "n2"]} for i, p in enumerate(photos[:6])]
        rows += [
            {"uid": "u06-dup", "url": srv.url(photos[0].name) + "?copy=1", "caption": "same bytes", "source": "web",
             "concept_ids": ["n2"]},
            {"uid": "l00", "path": str(photos[6]), "caption": "a local photo", "source": "disk",
             "concept_ids": ["n2"]},
            {"uid": "u01-cap2", "url": srv.url(photos[1].name), "caption": "second caption of photo 1",
             "source": "web", "concept_ids": ["n1"]},  # same URL: downloaded once, both rows kept
        ]
        fails = {"f-404": "/missing.jpg", "f-html": "/html.jpg", "f-trunc": "/truncated.jpg", "f-tiny": "/tiny.jpg",
                 "f-slow": "/slow.jpg", "f-fixed": "/fixed.jpg"}
        rows += [{"uid": u, "url": b + path, "caption": u, "source": "web", "concept_ids": ["n3"]}
                 for u, path in fails.items()]
        build = tmp_path / "build"
        sel = make_build(build, rows)
        recipe = MediaRecipe.model_validate({
            "download": {**DL, "thread_count": 1, "number_sample_per_shard": 4}, "shards": {"samples_per_shard": 3},
            "rebalance": {"balance": {"method": "t", "t": 100, "floor": 3}}})
        done_before = _run_and_kill(build, recipe, tmp_path)
        assert 1 <= len(done_before) < 4  # 13 URL rows in img2dataset shards of 4
        hits_before = dict(srv.hits)
        with Catalog(build / "catalog.duckdb") as cat:
            capsys.readouterr()
            rep = run_media(cat, recipe, sel, build, progress=False)
            err = capsys.readouterr().err  # the short concepts: one line, the final counts, with what to do
            assert err.count("concepts end with fewer than") == 1 and "below the floor" not in err, err
            assert "1 of 3 concepts end with fewer than 3 samples after download, dedup and rebalancing" in err, err
            # the img2dataset shards finished before the kill were not downloaded again
            first = [(u, k) for u, s, k in cat.execute("SELECT uid, shard, key FROM downloads").fetchall()
                     if s in {n[:5] for n in done_before}]
            assert len({k for _, k in first}) == 4 * len(done_before)
            assert all(srv.hits[_path(rows, u)] == hits_before[_path(rows, u)] == 1 for u, _ in first)
            assert srv.hits[_path(rows, "u01")] == 1  # requested once for its two rows
            assert cat.one("SELECT key FROM downloads WHERE uid = 'u01'") == \
                cat.one("SELECT key FROM downloads WHERE uid = 'u01-cap2'")
            out = {u: (s, e, sha, w, h, a) for u, s, e, sha, w, h, a in cat.execute(
                "SELECT uid, status, error, sha256, width, height, attempt FROM downloads").fetchall()}
            assert set(out) == {r["uid"] for r in rows}  # every row has exactly one outcome
            assert cat.scalar("SELECT count(*) FROM downloads") == len(rows)
            for i, p in enumerate(photos[:6]):
                s, e, sha, w, h, _ = out[f"u{i:02d}"]
                assert (s, e, w, h) == ("success", None, 224, 224)
                assert sha == hashlib.sha256(p.read_bytes()).hexdigest()
            assert out["l00"][:2] == ("success", None)
            assert out["f-404"][:2] == ("failed_to_download", "HTTP Error 404: Not Found")
            assert out["f-fixed"][0] == "failed_to_download"
            assert out["f-html"][:2] == ("failed_to_resize", "Image decoding error")
            assert out["f-trunc"][:2] == ("failed_to_resize", "Image decoding error")
            assert out["f-tiny"][:2] == ("failed_to_resize", "image too small")
            assert out["f-slow"][0] == "failed_to_download" and "timed out" in out["f-slow"][1]
            why = dict(cat.execute("SELECT uid, reason FROM decisions WHERE stage='download' AND NOT kept").fetchall())
            assert set(why) == set(fails) and why["f-tiny"] == "failed_to_resize: image too small"
            dd = cat.execute("SELECT uid, ref_uid, reason FROM decisions WHERE stage='image_dedup' AND NOT kept"
                             ).fetchall()
            assert dd == [("u06-dup", "u00", "exact duplicate (same sha256)")]
            short = {c["concept_id"]: c for c in rep["concepts"]}
            assert short["n3"]["selected"] == 6 and short["n3"]["final"] == 0 and short["n3"]["shortfall"] == 3
            assert short["n1"]["final"] == 5 and short["n2"]["final"] == 3 and short["n2"]["after_dedup"] == 3
        # img2dataset's own artefacts are kept
        i2d = build / "media" / "download" / "attempt-000" / "out"
        assert (i2d / "00000_stats.json").exists() and (i2d / "00000.parquet").exists()
        stats = [json.loads(p.read_text()) for p in sorted(i2d.glob("*_stats.json"))]
        assert sum(s["successes"] for s in stats) == 7 and sum(s["count"] for s in stats) == 13  # distinct URLs

        samples = read_tars(build / "shards")
        assert len(samples) == 8 and rep["shards"]["samples"] == 8
        by_uid = {m["uid"]: (m, jpg, txt) for _, _, m, jpg, txt in samples}
        assert set(by_uid) == {f"u{i:02d}" for i in range(6)} | {"l00", "u01-cap2"}
        assert by_uid["u01"][1] == by_uid["u01-cap2"][1] and by_uid["u01-cap2"][2] == "second caption of photo 1"
        for m, jpg, txt in by_uid.values():
            assert set(m) == FIELDS and m["caption"] == txt and jpg[:3] == b"\xff\xd8\xff"
        assert by_uid["u03"][0]["url"] == srv.url(photos[3].name) and by_uid["l00"][0]["url"] == ""
        assert by_uid["l00"][1] == photos[6].read_bytes()  # local JPEG bytes stored as they are
        sizes = json.loads((build / "shards" / "sizes.json").read_text())
        assert sizes == {"shard-00000.tar": 3, "shard-00001.tar": 3, "shard-00002.tar": 2}

        from datasets import load_dataset

        files = sorted(str(p) for p in (build / "shards").glob("shard-*.tar"))
        ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
        assert sorted(ds["__key__"]) == sorted(s[1] for s in samples)
        assert {j["uid"] for j in ds["json"]} == set(by_uid) and ds[0]["jpg"].size == (224, 224)
        idx = load_dataset("parquet", data_files=str(build / "shards" / "index.parquet"), split="train",
                           cache_dir=str(tmp_path / "hf"))
        assert sorted(idx["uid"]) == sorted(by_uid)

        # `curate retry-failed BUILD`: only the failed rows are requested again; the now-fixed one comes back
        import yaml

        from curate.media import main as media_main

        (build / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "media": recipe.model_dump()}))
        srv.fix()
        srv.hits.clear()
        assert media_main(["retry-failed", str(build), "--no-progress"]) == 0
        assert not any(h.startswith("/img/") for h in srv.hits)
        assert srv.hits["/fixed.jpg"] == 1 and set(srv.hits) == set(fails.values())
        with Catalog(build / "catalog.duckdb") as cat:
            st = dict(cat.execute("SELECT uid, status || ':' || attempt FROM downloads").fetchall())
            assert st["f-fixed"] == "success:1" and st["f-404"] == "failed_to_download:1" and st["u00"] == "success:0"
            assert cat.scalar("SELECT count(*) FROM downloads") == len(rows)
            assert cat.scalar("SELECT count(*) FROM decisions WHERE stage='download'") == len(rows)
        # `curate shard BUILD`: dedup, re-balance and shards see the changed input and rerun
        assert media_main(["shard", str(build), "--no-progress"]) == 0
        rep2 = json.loads((build / "media" / "report.json").read_text())
        assert rep2["shards"]["samples"] == 9 and "f-fixed" in {s[2]["uid"] for s in read_tars(build / "shards")}
        assert {c["concept_id"]: c["final"] for c in rep2["concepts"]}["n3"] == 1
