"""The embedding stages on a local Ray cluster (``distributor.kind: ray``) give what they give in this process:
caption embedding for semantic matching and near-duplicate captions (a whole ``curate build``), SemDeDup's image
embedding, and ``align extract`` — each unit really encoded by the Ray actors, the results identical."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from align.data import SkipLog, read_webdataset
from align.features import FeatureCache, FeatureConfig, extract_features
from curate.catalog import Catalog
from curate.cli import main
from tether.distribute import DistributorConfig, run_units
from tether.recipe import RecipeError
from test_align_data import synthetic_pairs, write_shard
from test_build import _make_csv, _recipe

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")

RAY = DistributorConfig(kind="ray", workers=2)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local 2-CPU Ray instance for the module (the stages join it instead of starting their own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture()
def remote_calls(monkeypatch):
    """How many units each stage sent to the Ray actors (wraps tether.distribute.run_units)."""
    import tether.distribute as td

    seen: list[str] = []
    orig = td.run_units

    def counting(cfg, factory, args, items, *a, **kw):
        for key, result in orig(cfg, factory, args, items, *a, **kw):
            if cfg.kind == "ray":
                seen.append(getattr(args[-1], "__name__", "?"))
            yield key, result

    monkeypatch.setattr(td, "run_units", counting)
    import curate.imagededup
    import curate.match
    import align.features

    for mod in (curate.match, align.features):
        if hasattr(mod, "run_units"):
            monkeypatch.setattr(mod, "run_units", counting)
    return seen


def _dump(catalog) -> dict:
    with Catalog(catalog, read_only=True) as cat:
        return {"matches": cat.execute("SELECT * FROM matches ORDER BY rowid").fetchall(),
                "decisions": sorted(cat.execute("SELECT * FROM decisions").fetchall(), key=repr),
                "balance_report": sorted(cat.execute("SELECT * FROM balance_report").fetchall(), key=repr)}


def test_semantic_matching_and_near_dup_on_ray_give_the_local_catalog(tmp_path, tiny_text_dir, monkeypatch,
                                                                      remote_calls):
    monkeypatch.setenv("TETHER_PROMPT_CACHE", "off")
    src = tmp_path / "web.csv"
    _make_csv(src, 1200)
    model = str(tiny_text_dir)

    def build(name, distributor):
        rp = _recipe(tmp_path, src)
        r = yaml.safe_load(rp.read_text())
        r["match"] = {"mode": "semantic", "semantic": {"model": model, "top_k": 40, "unit_rows": 20}}
        r["dedup"]["near"] = {"enabled": True, "model": model, "threshold": 0.995, "chunk": 200}
        r["distributor"] = distributor
        rp.write_text(yaml.safe_dump(r))
        assert main(["build", str(rp), "--out", str(tmp_path / name), "--no-progress"]) == 0
        return _dump(tmp_path / name / "catalog.duckdb")

    ref = build("local", {"kind": "local"})
    assert not remote_calls
    assert ref["matches"] and any(d[1] == "neardup" and not d[2] for d in ref["decisions"])  # both stages decide
    got = build("ray", RAY.model_dump())
    # every caption unit of the semantic stage and every near-dup chunk went through the actors
    assert remote_calls.count("encode_sorted") >= 5 and remote_calls.count("encode_chunk") >= 4
    assert got == ref


def test_semdedup_image_embedding_on_ray(tmp_path, tiny_vision, tiny_vision_dir, remote_calls):
    from curate.download import DownloadConfig, load_selection, run_download
    from curate.imagededup import ImageDedupConfig, run_image_dedup
    from httpserver import make_build
    from test_imagededup import _drops, _noise_jpeg

    rows = []
    for i in range(6):
        p = tmp_path / f"n{i}.jpg"
        p.write_bytes(_noise_jpeg(10 + i))
        rows.append({"uid": f"a{i}", "path": str(p), "caption": "x", "concept_ids": ["n1"]})
    for i in range(2):
        q = tmp_path / f"c{i}.jpg"
        shutil.copyfile(tmp_path / f"n{i}.jpg", q)
        rows.append({"uid": f"b{i}", "path": str(q), "caption": "x", "concept_ids": ["n1"]})
    cfg = ImageDedupConfig(exact=False, phash={"enabled": False}, chunk=3,
                           semantic={"enabled": True, "epsilon": 1e-5, "clusters": 2,
                                     "encoder": str(tiny_vision_dir)})
    out = {}
    for name, dist in (("local", None), ("ray", RAY)):
        build = tmp_path / name
        make_build(build, rows)
        with Catalog(build / "catalog.duckdb") as cat:
            load_selection(cat, build / "selection.parquet")
            run_download(cat, DownloadConfig(), build, progress=False)
            run_image_dedup(cat, cfg, build, encoder=tiny_vision, progress=False, distributor=dist)
            emb = [np.load(f) for f in sorted((build / "media" / "embeddings").glob("*.npy"))]
            out[name] = (_drops(cat), emb)
    assert remote_calls.count("embed_image_bytes") == 3  # 8 images in chunks of 3
    assert out["ray"][0] == out["local"][0] == {"b0": "a0", "b1": "a1"}
    assert len(out["ray"][1]) == 3 and all(np.array_equal(a, b) for a, b in zip(out["ray"][1], out["local"][1]))


def _same_shard(a, b) -> None:
    with safe_open(str(a), "pt") as f, safe_open(str(b), "pt") as g:
        assert f.metadata() == g.metadata() and sorted(f.keys()) == sorted(g.keys()), a.name
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)), (a.name, name)


def test_align_extract_on_ray_writes_the_local_shards(tmp_path, tiny_vision, tiny_text, tiny_vision_dir,
                                                      tiny_text_dir, remote_calls):
    shard = write_shard(tmp_path / "d-000.tar", synthetic_pairs(7) + [("broken", b"\xff\xd8 no", "a red car")])
    cfg = FeatureConfig(shard_size=3, batch_size=4, crops=2)
    load = ({"name_or_path": str(tiny_vision_dir)}, {"name_or_path": str(tiny_text_dir)})

    def extract(name, dist):
        skips = SkipLog()
        return extract_features(read_webdataset(str(shard), skips=skips), tiny_vision, tiny_text, tmp_path / name,
                                cfg, data_id={"shard": "d"}, skips=skips, progress=False, distributor=dist,
                                load_kwargs=load)

    local = extract("local", None)
    remote = extract("ray", RAY)
    assert remote_calls.count("encode_job") == 3
    assert remote.manifest["skips"] == local.manifest["skips"] and remote.num_images == local.num_images == 7
    assert [s["file"] for s in local.manifest["shards"]] == [s["file"] for s in remote.manifest["shards"]]
    for entry in local.manifest["shards"]:  # the same tensors and metadata (the file bytes differ only in the
        _same_shard(tmp_path / "local" / entry["file"], tmp_path / "ray" / entry["file"])  # header's key order)
    # resumed on Ray with one shard deleted: only that shard is encoded again, same file
    (tmp_path / "ray" / "shard-00001.safetensors").unlink()
    remote_calls.clear()
    again = extract("ray", RAY)
    assert remote_calls.count("encode_job") == 3  # (shards on disk travel as no-op units)
    _same_shard(tmp_path / "local" / "shard-00001.safetensors", tmp_path / "ray" / "shard-00001.safetensors")
    assert FeatureCache.open(tmp_path / "ray").manifest["shards"] == again.manifest["shards"]


def test_more_gpus_than_the_cluster_has_is_one_line():
    with pytest.raises(RecipeError, match=r"distributor.gpus=1.*has 0 GPUs"):
        list(run_units(RAY, dict, (), [(0, ())], gpus=1))
