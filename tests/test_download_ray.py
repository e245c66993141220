"""``media.download.distributor: ray``: img2dataset's own Ray distributor on the build's Ray cluster gives the same
download outcomes as its multiprocessing distributor (issue 12), under tether's fetch rules in the Ray workers."""

from __future__ import annotations

import pytest

from curate.catalog import Catalog
from curate.media import MediaRecipe, run_media
from httpserver import PhotoServer, make_build
from tether.distribute import DistributorConfig

pytestmark = [pytest.mark.real, pytest.mark.slow]

DL = {"processes_count": 1, "thread_count": 2, "timeout": 5, "min_image_size": 10, "number_sample_per_shard": 3,
      "image_size": 64, "resize_mode": "keep_ratio",
      "allow_private_hosts": True}  # the test server is on loopback, refused by default


def test_ray_download_gives_the_multiprocessing_outcomes(flickr8k, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    import tether.distribute as td

    joined: list[DistributorConfig] = []
    real = td.ray_cluster

    def spy(cfg):
        joined.append(cfg)
        return real(cfg)

    monkeypatch.setattr(td, "ray_cluster", spy)
    photos = sorted((flickr8k / "images").glob("*.jpg"))[600:605]
    on_disk = sorted((flickr8k / "images").glob("*.jpg"))[700]
    with PhotoServer(flickr8k / "images") as srv:
        rows = [{"uid": f"u{i}", "url": srv.url(p.name), "caption": f"photo {i}", "source": "web",
                 "concept_ids": ["n1"]} for i, p in enumerate(photos)]
        rows += [{"uid": "u0-again", "url": srv.url(photos[0].name), "caption": "second caption", "source": "web",
                  "concept_ids": ["n2"]},  # same URL: one download, both rows
                 {"uid": "f-404", "url": srv.base + "/missing.jpg", "caption": "gone", "source": "web",
                  "concept_ids": ["n2"]},
                 {"uid": "f-html", "url": srv.base + "/html.jpg", "caption": "a page", "source": "web",
                  "concept_ids": ["n2"]},
                 # img2dataset's own urllib would read this photo from disk; tether's fetch rules refuse any
                 # scheme but http(s), in the Ray workers as in the local ones
                 {"uid": "f-file", "url": on_disk.resolve().as_uri(), "caption": "a file", "source": "web",
                  "concept_ids": ["n2"]}]
        out = {}
        for kind in ("multiprocessing", "ray"):
            build = tmp_path / kind
            sel = make_build(build, rows)
            recipe = MediaRecipe.model_validate({
                "download": {**DL, "distributor": kind},
                "image_dedup": {"enabled": False}, "rebalance": {"enabled": False}, "shards": {"enabled": False}})
            with Catalog(build / "catalog.duckdb") as cat:
                run_media(cat, recipe, sel, build, progress=False,
                          distributor=DistributorConfig(kind="ray", workers=2) if kind == "ray" else None)
                out[kind] = sorted(cat.execute(
                    "SELECT uid, status, error, sha256, width, height FROM downloads").fetchall())
    assert [c.workers for c in joined] == [2]  # the build's cluster settings reached the download
    assert not ray.is_initialized()  # the instance the download started is shut down after it
    assert out["ray"] == out["multiprocessing"]
    status = {u: s for u, s, *_ in out["ray"]}
    assert [u for u, s in status.items() if s == "success"] == ["u0", "u0-again", "u1", "u2", "u3", "u4"], status
    assert {status["f-404"], status["f-html"], status["f-file"]} <= {"failed_to_download", "failed_to_resize"}
