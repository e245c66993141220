"""Issue 12, bounded memory: the scale benchmark's pool generator (deterministic, streamed) and the build's DuckDB
memory knobs (`memory_limit`, `temp_dir`: they reach DuckDB, spills stay in the build folder, bad values are one
line)."""

from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curate.catalog import Catalog
from curate.cli import main

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["A dog runs on the beach .", "Two children play football in a park .", "A man rides a red bicycle .",
            "A black cat sleeps on a sofa .", "A girl in a pink dress climbs the stairs .",
            "Three people stand near a lake at sunset ."]


@pytest.fixture(scope="module")
def bs():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(bs, rows, seed=0, **kw) -> pa.Table:
    return pa.Table.from_batches(list(bs.pool_batches(rows, seed, captions=CAPTIONS, **kw)))


def test_pool_is_deterministic_and_a_prefix_of_larger_pools(bs, monkeypatch):
    monkeypatch.setattr(bs, "BATCH", 1000)
    batches = list(bs.pool_batches(4500, 7, captions=CAPTIONS))
    assert [b.num_rows for b in batches] == [1000, 1000, 1000, 1000, 500]  # bounded batches
    a, b = _table(bs, 4500, 7), _table(bs, 4500, 7)
    assert a.equals(b)
    assert _table(bs, 9000, 7).slice(0, 4500).equals(a)  # N rows = the first N rows of a larger pool
    assert not _table(bs, 4500, 8).equals(a)
    urls, caps = a.column("url").to_pylist(), a.column("caption").to_pylist()
    # duplicate urls: about the --dup-urls share (3 %), every repeat names an EARLIER row's url
    assert 0.015 < 1 - len(set(urls)) / len(urls) < 0.05
    assert all(u.startswith("https://cdn") and u.endswith(".jpg") for u in urls)
    # alt-text noise and exact duplicates are there, the real captions too
    assert any(c.split(" ")[0].startswith(("IMG_", "DSC", "image-", "photo_", "P0")) or ".jpg" in c for c in caps)
    assert any(j in c for c in caps for j in bs.JUNK)
    assert sum(c in CAPTIONS for c in caps) > 0.1 * len(caps)
    assert len(set(caps)) < len(caps)
    no_dups = _table(bs, 4500, 7, dup_urls=0.0).column("url").to_pylist()
    assert len(set(no_dups)) == len(no_dups)


def test_pool_writer_streams_in_bounded_memory(bs, tmp_path, monkeypatch):
    """Writing 20 batches does not hold more Python memory than writing 2 (the pool is never held whole)."""
    monkeypatch.setattr(bs, "BATCH", 2000)
    monkeypatch.setattr(bs, "base_captions", lambda path=None: CAPTIONS)

    def peak(rows: int, name: str) -> int:
        tracemalloc.start()
        bs.write_pool(tmp_path / name, rows, seed=1, shard_rows=10_000, progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, big = peak(4000, "small"), peak(40_000, "big")
    assert big < 1.5 * small, (small, big)
    files = sorted((tmp_path / "big").glob("part-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [10_000] * 4
    got = pa.concat_tables([pq.read_table(f) for f in files])
    assert got.equals(pa.Table.from_batches(list(bs.pool_batches(40_000, 1, captions=CAPTIONS))))
    mtime = (tmp_path / "big" / "pool.json").stat().st_mtime_ns
    bs.write_pool(tmp_path / "big", 40_000, seed=1, shard_rows=10_000, progress=False)  # same pool: reused
    assert (tmp_path / "big" / "pool.json").stat().st_mtime_ns == mtime


def test_bench_refuses_a_work_folder_inside_the_repo(bs):
    with pytest.raises(SystemExit, match="inside the repository"):
        bs.main(["--rows", "10", "--work", str(REPO / "runs" / "scale"), "--pool-only"])


def test_catalog_applies_memory_limit_and_spills_inside_temp_dir(tmp_path):
    spill = tmp_path / "build" / ".tmp"
    cat = Catalog(tmp_path / "build" / "catalog.duckdb", threads=1, memory_limit="100MB", temp_dir=spill)
    try:
        assert cat.scalar("SELECT current_setting('memory_limit')") in ("95.3 MiB", "95.3MiB")
        assert Path(cat.scalar("SELECT current_setting('temp_directory')")) == spill
        cur = cat.con.cursor()  # a sort of ~3M rows does not fit in 100MB: DuckDB spills, into `spill` only
        reader = cur.sql("SELECT range AS i, md5(range::VARCHAR) AS m FROM range(3000000) ORDER BY m"
                         ).to_arrow_reader(1000)
        next(iter(reader))
        files = cat.execute("SELECT path FROM duckdb_temporary_files()").fetchall()
        assert files and all(Path(p).parent == spill for (p,) in files)
        del reader
        cur.close()
    finally:
        cat.close()
    assert not spill.exists()  # the spill folder it made, empty again, is removed


def _recipe(tmp_path: Path, **top) -> Path:
    src = tmp_path / "web.csv"
    src.write_text("url,caption\n" + "".join(f"http://x.example/{i}.jpg,{CAPTIONS[i % 6]} {i}\n" for i in range(60)))
    r = {"name": "mem", "sources": [{"name": "web", "format": "csv", "path": src.name}],
         "concepts": {"imagenet1k": False, "words": ["dog", "cat", "bicycle", "lake"]},
         "balance": {"method": "t", "t": 5}, "output": {"card": False}, **top}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(r))
    return rp


@pytest.mark.parametrize("top,spill", [({"memory_limit": "256MB"}, ".tmp"),
                                       ({"memory_limit": "0.5 GiB", "temp_dir": "spill/here"}, "spill/here")])
def test_build_passes_memory_knobs_to_duckdb(tmp_path, monkeypatch, capsys, top, spill):
    import curate.pipeline as pipeline

    seen = {}

    class Spy(Catalog):
        def close(self):
            seen["memory_limit"] = self.scalar("SELECT current_setting('memory_limit')")
            seen["temp_directory"] = self.scalar("SELECT current_setting('temp_directory')")
            super().close()

    monkeypatch.setattr(pipeline, "Catalog", Spy)
    out = tmp_path / "b"
    assert main(["build", str(_recipe(tmp_path, **top)), "--out", str(out), "--no-progress"]) == 0
    assert seen["memory_limit"] in ({"256MB": "244.1 MiB", "0.5 GiB": "512.0 MiB"}[top["memory_limit"]],)
    assert Path(seen["temp_directory"]) == out / spill
    assert (out / "selection.parquet").is_file()
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["memory_limit"] == top["memory_limit"].replace(" ", "")


@pytest.mark.parametrize("value,msg", [("lots", "not a memory size"), ("6", "not a memory size"),
                                       ("10MB", "below the smallest"), ("6 PB", "not a memory size")])
def test_bad_memory_limit_is_one_line(tmp_path, capsys, value, msg):
    rc = main(["build", str(_recipe(tmp_path, memory_limit=value)), "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "memory_limit" in err[0] and msg in err[0], err[0]
    assert not (tmp_path / "b").exists()


def test_empty_temp_dir_is_one_line(tmp_path, capsys):
    rc = main(["build", str(_recipe(tmp_path, temp_dir=" ")), "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "temp_dir" in err[0], err


def test_coverage_streamed_in_small_batches_is_identical(tmp_path, monkeypatch):
    """Coverage balancing streams the sorted (concept, candidate) pairs: a concept split across Arrow batches
    gets exactly the same owners as with one batch holding everything."""
    import random

    import curate.balance as balance

    rng = random.Random(5)
    ms = [(f"u{rng.randrange(3000)}", f"c{int(60 * rng.random() ** 3)}", round(rng.random(), 3)) for _ in range(9000)]
    ms = list({(u, c): (u, c, s) for u, c, s in ms}.values())  # one row per (uid, concept), as the match stage
    runs = []
    for i, batch in enumerate((1 << 20, 7, 1)):
        monkeypatch.setattr(balance, "COVERAGE_BATCH", batch)
        cat = Catalog(tmp_path / f"c{i}.duckdb")
        cat.execute("""INSERT INTO samples(uid, source, row_index, url, path, caption, width, height, extra)
                       SELECT 'u' || i, 's', i, NULL, NULL, 'c', NULL, NULL, NULL FROM range(3200) r(i)""")
        cat.insert_arrow("matches", pa.table({"uid": [m[0] for m in ms], "c": [m[1] for m in ms],
                                              "s": [m[2] for m in ms]}), "uid, c, 'lexical', s, NULL")
        rep = balance.run_balance(cat, balance.BalanceConfig(method="coverage", per_concept=25), progress=False)
        runs.append((rep.kept, sorted(cat.execute("SELECT uid, kept, reason, concept_id FROM decisions").fetchall(),
                                      key=repr),
                     sorted(cat.execute("SELECT * FROM balance_report").fetchall())))
        cat.close()
    assert runs[0][0] > 25 * 10  # many concepts filled, many candidates claimed by an earlier concept
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_memory_limit_does_not_change_the_result(tmp_path, capsys):
    rp = _recipe(tmp_path)
    assert main(["build", str(rp), "--out", str(tmp_path / "free"), "--no-progress"]) == 0
    assert main(["build", str(rp), "--out", str(tmp_path / "capped"), "--no-progress",
                 "--set", "memory_limit=100MB", "--set", "temp_dir=spill"]) == 0
    assert pq.read_table(tmp_path / "capped" / "selection.parquet").equals(
        pq.read_table(tmp_path / "free" / "selection.parquet"))
    dump = []
    for b in ("free", "capped"):
        with Catalog(tmp_path / b / "catalog.duckdb", read_only=True) as cat:
            dump.append(sorted(cat.execute("SELECT uid, stage, kept, reason, ref_uid, concept_id FROM decisions"
                                           ).fetchall(), key=repr))
    assert dump[0] == dump[1] and len(dump[0]) >= 60
    assert not (tmp_path / "capped" / "spill").exists() and not (tmp_path / "free" / ".tmp").exists()


def test_bench_recipe_is_the_full_scale_recipe_without_media(bs, tmp_path):
    from curate.config import load_build_recipe

    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"url": ["https://x/1.jpg"], "caption": ["a dog"]}), pool / "part-00000.parquet")
    rp = bs.make_recipe(pool, tmp_path / "r.yaml", t=2000, threads=2, memory_limit="6GB", workers=3,
                        overrides=["match.lexical.pos=off"])
    r = load_build_recipe(rp)
    assert r.media is None and r.match.mode == "lexical" and r.balance.t == 2000 and r.threads == 2
    assert r.distributor.workers == 3 and r.memory_limit == "6GB" and r.match.lexical.pos == "off"
    assert r.match.lexical.compounds == "wordnet" and r.dedup.exact == ["url", "caption"]  # the rest: as shipped
    assert [s.name for s in r.sources] == ["pool"] and r.output.extra_columns == []
