"""Caption filters, exact dedup (url / normalized caption / url+caption) and near-duplicate captions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.catalog import Catalog
from curate.dedup import DedupConfig, NearDupConfig, greedy_near_dups, run_exact_dedup, run_near_dup
from curate.filters import WORDS_SQL, FilterConfig, english_stop_words, run_filters, stop_word_sql, words_sql


def _fill(cat: Catalog, rows: list[tuple[str, str | None, str | None, str]]) -> None:
    """rows: (uid, url, path, caption); source 's', row_index in list order."""
    cat.insert_arrow("samples(uid, source, row_index, url, path, caption, width, height, extra)", pa.table({
        "uid": [r[0] for r in rows], "row_index": list(range(len(rows))), "url": [r[1] for r in rows],
        "path": [r[2] for r in rows], "caption": [r[3] for r in rows]}),
        "uid, 's', row_index, url, path, caption, NULL, NULL, NULL")


def _decided(cat: Catalog, stage: str) -> dict[str, tuple[str, str | None]]:
    return {u: (r, ref) for u, r, ref in cat.execute(
        "SELECT uid, reason, ref_uid FROM decisions WHERE stage = ? AND NOT kept", [stage]).fetchall()}


def test_filters(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    _fill(cat, [("a", "u1", None, "A brown dog runs on the grass ."), ("b", "u2", None, "dog"),
                ("c", "u3", None, "Kids playing softball ."),
                ("d", "u4", None, "Ein brauner Hund rennt schnell durch den grünen Park heute"),
                ("e", "u5", None, "Собака бежит по траве в парке"), ("f", "u6", None, "one two three four five six")])
    n = run_filters(cat, FilterConfig(min_words=2, min_chars=4, max_words=8, english_only=True))
    d = _decided(cat, "filter")
    assert n == len(d) == 3
    assert d["b"][0] == "too short (3 < 4 chars)"
    assert d["d"][0].startswith("too many words (10 > 8)")
    assert d["e"][0] == "not English (mostly non-Latin letters)"
    assert "a" not in d and "c" not in d  # terse English passes the stop-word rule (< 8 words)
    # rerun replaces, never duplicates; with english_only off the Cyrillic caption passes
    assert run_filters(cat, FilterConfig(min_words=2)) == 1
    assert set(_decided(cat, "filter")) == {"b"}
    cat.execute("DELETE FROM decisions")
    assert run_filters(cat, FilterConfig(english_only=True, stopword_min_words=5)) == 2
    assert set(_decided(cat, "filter")) == {"d", "e"}


def test_fast_filter_sql_equals_the_plain_expressions():
    """The filter's fast word count and stop-word test give the same value as the plain regular-expression split
    on captions built to break them: every kind of whitespace, leading/trailing spaces, Unicode spaces that
    ``trim`` strips, non-ASCII letters, stop words glued to digits/punctuation/accents, NULL and empty."""
    import duckdb

    pieces = ["a", "dog", "the", "The", "THE", "a1", "é", "école", "狗", "and,", "'s", "x-the", "the-x", "", "1"]
    seps = [" ", "  ", "\t", "\n", "\r\n", "\f", "\v", "\u00a0", "\u3000", "\u2003", " \u00a0", ""]
    rng = np.random.default_rng(0)
    caps: list[str | None] = [None, "", " ", "\u00a0", "\u00a0 x", " a", "a ", "\tthe\t"]
    for _ in range(3000):
        n = int(rng.integers(1, 9))
        parts = [str(rng.choice(seps)) if rng.random() < 0.2 else ""]
        for _ in range(n):
            parts += [str(rng.choice(pieces)), str(rng.choice(seps, p=None if rng.random() < 0.3 else
                                                              [0.89] + [0.01] * 11))]
        caps.append("".join(parts))
    con = duckdb.connect()
    con.register("t", pa.table({"caption": caps}))
    sw = english_stop_words()
    plain_stop = ("list_has_any(regexp_split_to_array(lower(caption), '[^a-z]+'), ["
                  + ", ".join(f"'{w}'" for w in sw) + "])")
    rows = con.execute(f"""SELECT caption, {words_sql('caption')}, {WORDS_SQL.format(c='caption')},
        {stop_word_sql('caption', sw)}, {plain_stop} FROM t""").fetchall()
    assert len(rows) == len(caps)
    bad = [(c, a, b) for c, a, b, _, _ in rows if a != b]
    assert not bad, bad[:5]
    bad = [(c, a, b) for c, _, _, a, b in rows if a != b]
    assert not bad, bad[:5]
    assert sum(1 for r in rows if r[3]) > 100 and sum(1 for r in rows if r[3] is False) > 100


def test_exact_dedup_keys_and_keep_rule(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    _fill(cat, [
        ("r0", "http://x/1", None, "A dog, running!"),
        ("r1", "http://x/1", None, "a dog running"),       # same url + same normalized caption as r0
        ("r2", "http://x/2", None, "A DOG   running."),    # same normalized caption as r0, other url
        ("r3", "http://x/1", None, "a cat"),                # same url only
        ("r4", None, "/img/a.jpg", "a cat"),
        ("r5", None, "/img/a.jpg", "a cat !"),              # local: same path + caption as r4
        ("r6", None, "/img/a.jpg", "another caption"),      # same path, other caption: kept
    ])
    cat.execute("INSERT INTO decisions VALUES ('r0', 'filter', false, 'x', NULL, NULL)")  # r0 already gone
    # r0 was rejected earlier, so r1 is the first alive "x/1 + a dog running"; r2 has another url
    assert run_exact_dedup(cat, DedupConfig(exact=["url_caption"])) == 1
    assert _decided(cat, "dedup") == {"r5": ("duplicate url_caption", "r4")}
    assert run_exact_dedup(cat, DedupConfig(exact=["url", "caption"])) == 3
    d = _decided(cat, "dedup")
    assert d["r3"] == ("duplicate url", "r1")  # first alive row with url x/1 (in source, row_index order)
    assert d["r2"] == ("duplicate caption", "r1")
    assert d["r5"] == ("duplicate caption", "r4")
    assert set(d) == {"r2", "r3", "r5"}


def test_greedy_near_dups_order_and_chains():
    import faiss

    e = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0.9, 0.436, 0], [0, 0.995, 0.0998]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(3)
    ref, kept = greedy_near_dups(e[:2], 0.95, index)
    assert kept.tolist() == [True, False] and ref.tolist() == [-1, 0] and index.ntotal == 1
    ref, kept = greedy_near_dups(e[2:], 0.95, index)  # next chunk: compared with earlier KEPT rows too
    # row 3 (0.9, 0.436) is cos 0.9 to row 0 and 0.966 to row 1 — but row 1 was dropped, so row 3 stays
    assert kept.tolist() == [True, True, False] and ref.tolist() == [-1, -1, 1]
    assert index.ntotal == 3


def _naive_greedy(emb: np.ndarray, thr: float) -> dict[int, int]:
    """Reference: row i is dropped for the most similar EARLIER KEPT row with cosine >= thr."""
    kept: list[int] = []
    out: dict[int, int] = {}
    for i in range(len(emb)):
        sims = [(float(emb[i] @ emb[j]), j) for j in kept]
        best = max(sims, default=(-2.0, -1))
        if best[0] >= thr:
            out[i] = best[1]
        else:
            kept.append(i)
    return out


def test_near_dup_stage_matches_reference_across_chunks(tmp_path, tiny_text):
    from tests.conftest import TINY_WORDS

    rng = np.random.default_rng(0)
    caps = [" ".join(rng.choice(TINY_WORDS, size=rng.integers(3, 8))) for _ in range(40)]
    caps[30] = caps[3]  # an exact copy is always a near-duplicate
    cat = Catalog(tmp_path / "c.duckdb")
    _fill(cat, [(f"u{i:02d}", f"http://x/{i}", None, c) for i, c in enumerate(caps)])

    class Centered:
        """The random tiny model's embeddings are nearly collinear: centre them so cosines spread out."""

        dim = tiny_text.dim
        mean = tiny_text.encode(caps).mean(0)

        def encode(self, texts, batch_size=256):
            e = tiny_text.encode(texts) - self.mean
            return e / np.linalg.norm(e, axis=1, keepdims=True)

    enc = Centered()
    emb = enc.encode(caps)
    off = np.sort((emb @ emb.T)[np.triu_indices(len(caps), 1)])
    off = off[off < 0.999]
    k = int(0.9 * len(off))
    thr = float(off[k] + off[k + 1]) / 2  # midway between two pair similarities: no float ties
    expect = {f"u{i:02d}": f"u{j:02d}" for i, j in _naive_greedy(emb, thr).items()}
    assert 0 < len(expect) < len(caps) - 1
    n = run_near_dup(cat, NearDupConfig(enabled=True, threshold=thr, chunk=16), encoder=enc,
                     progress=False)  # 40 rows in chunks of 16: exercises the cross-chunk index
    got = {u: ref for u, (_, ref) in _decided(cat, "neardup").items()}
    assert got == expect and n == len(expect)
    assert "u30" in got
    assert run_near_dup(cat, NearDupConfig(enabled=False), encoder=tiny_text) == 0
    assert _decided(cat, "neardup") == {}


def test_near_dup_real_minilm(tmp_path, minilm_path):
    import pytest

    pytest.importorskip("faiss")
    from tether.encoders import TextEncoder

    enc = TextEncoder.load(str(minilm_path), max_length=32)
    cat = Catalog(tmp_path / "c.duckdb")
    caps = ["A black dog is running through the grass.", "A black dog runs through the grass .",
            "Two children play soccer on a field.", "A woman rides a bicycle down the street.",
            "Two kids are playing soccer on a field ."]
    _fill(cat, [(f"u{i}", f"http://x/{i}", None, c) for i, c in enumerate(caps)])
    run_near_dup(cat, NearDupConfig(enabled=True, threshold=0.9), encoder=enc, progress=False)
    d = _decided(cat, "neardup")
    assert set(d) == {"u1", "u4"} and d["u1"][1] == "u0" and d["u4"][1] == "u2"
    # embeddings were cached per chunk; a rerun (e.g. after a kill) reads them instead of re-embedding
    cached = list((tmp_path / "c.duckdb.cache" / "neardup").rglob("*.npy"))
    assert len(cached) == 1 and np.allclose(np.load(cached[0]), enc.encode(caps), atol=1e-5)

    class NoEncode:
        dim, fingerprint = enc.dim, enc.fingerprint

        def encode(self, *a, **k):
            raise AssertionError("should have used the cache")

    assert run_near_dup(cat, NearDupConfig(enabled=True, threshold=0.9), encoder=NoEncode(), progress=False) == 2
