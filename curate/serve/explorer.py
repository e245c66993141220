"""The explorer's queries: one build's catalog (read-only, a cursor per request) and its stored images (through
the one bounded reader, :class:`curate.imagestore.ImageStore`). Returns data, never HTML (:mod:`curate.serve.render`)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb

import curate.serve.common as common
from curate import report
from curate.catalog import recorded_wordnet_dir
from curate.imagestore import ImageStore
from curate.serve.common import DEAD, GRID_SIZE, MAX_TOKEN, PAGE_SIZE, RARE_WORD, TOKEN_RE, TOKEN_SQL, NotFound
from curate.serve.summary import Summary


class Explorer:
    """Read-only access to one build: catalog queries (per-request cursors) and stored image bytes."""

    def __init__(self, build: str | Path):
        p = Path(build)
        self.catalog = p / "catalog.duckdb" if p.is_dir() else p
        if not self.catalog.is_file():
            raise FileNotFoundError(f"{build}: no build catalog here (run `curate build RECIPE` first)")
        self.build_dir = self.catalog.parent
        self.con = duckdb.connect(str(self.catalog), read_only=True)
        self.tables = {r[0] for r in self.con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() UNION "
            "SELECT view_name FROM duckdb_views() WHERE database_name = current_database()").fetchall()}
        self.etag_seed = f"{self.catalog.stat().st_mtime_ns}:{self.catalog.stat().st_size}"
        self._lock = threading.RLock()  # re-entrant: cached values are built from other cached values
        self._cache: dict[str, object] = {}
        self._thumbs: OrderedDict[tuple[str, int], bytes | None] = OrderedDict()
        self.encode_format = self._encode_format()
        self.images = ImageStore(self.encode_format)  # the one bounded stored-image reader (curate/imagestore.py)
        self.shards_dir = self._shards_dir()
        self.has_lang = bool(self.con.execute(
            "SELECT 1 FROM duckdb_columns() WHERE database_name = current_database() AND table_name = 'samples' "
            "AND column_name = 'lang'").fetchall())
        self.build_key = hashlib.sha256(f"{self.catalog.resolve()}:{self.etag_seed}".encode()).hexdigest()[:16]
        self.summary: Summary | None = None  # precomputed tables outside the build (use_summary)

    def wordnet_names(self, wnids: list[str]) -> dict[str, str]:
        """Names of WordNet synsets that are not concepts of the build (the upper part of a hypernym chain), from
        the WordNet the bank was made with (or the default one), read once; {} when there is none."""
        if not wnids:
            return {}
        with self._lock:
            if "wordnet" not in self._cache:
                from curate.wordnet import WordNet

                try:
                    self._cache["wordnet"] = WordNet.load(self._wordnet_dir())
                except Exception:  # noqa: BLE001 - no WordNet here: the chain keeps its ids
                    self._cache["wordnet"] = None
            wn = self._cache["wordnet"]
        if wn is None:
            return {}
        return {w: wn.synset(w).lemmas[0].replace("_", " ") for w in wnids if w in wn and wn.synset(w).lemmas}

    def _wordnet_dir(self) -> str | None:
        """``concepts.wordnet_dir`` of the recipe that made the build, when the catalog recorded it."""
        return recorded_wordnet_dir(self.con)

    def use_summary(self, background: bool = False) -> "Summary":
        """Load (or build, then cache) the summary tables; ``background``: in a thread, the pages answering from
        the catalog itself meanwhile."""
        self.summary = Summary(self)
        if background:
            self.summary.start_background()
        else:
            self.summary.load_or_build()
        return self.summary

    @property
    def summary_ready(self) -> bool:
        return self.summary is not None and self.summary.ready

    def close(self) -> None:
        if self.summary is not None:
            self.summary.close()
        self.images.close()
        self.con.close()

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.con.cursor()  # one per request: DuckDB connections are not shared across threads
        try:
            yield cur
        finally:
            cur.close()

    def has(self, table: str) -> bool:
        return table in self.tables

    def _cached(self, key: str, fn):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = fn()
            return self._cache[key]

    def _encode_format(self) -> str:
        try:
            import yaml

            r = yaml.safe_load((self.build_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
            return str(((r.get("media") or {}).get("download") or {}).get("encode_format") or "jpg")
        except Exception:  # noqa: BLE001 - no/odd recipe: img2dataset's default
            return "jpg"

    def _shards_dir(self) -> Path | None:
        if not self.has("stages"):
            return None
        row = self.con.execute("SELECT params FROM stages WHERE stage = 'shards'").fetchall()
        try:
            out = json.loads(row[0][0]).get("out") if row else None
        except (TypeError, ValueError):
            out = None
        if not out:
            return None
        if not Path(out).is_dir() and (self.build_dir / Path(out).name).is_dir():
            return self.build_dir / Path(out).name  # the build folder was moved: its shards moved with it
        return Path(out)

    # -- overview --------------------------------------------------------------------------------------
    def overview(self) -> dict:
        def compute() -> dict:
            if self.summary_ready:
                with self.summary.cursor() as cur:
                    return {k: json.loads(v) for k, v in cur.execute("SELECT key, value FROM meta").fetchall()}
            with self.cursor() as cur:
                return report.overview_counts(cur, self.has("stages"), self.has_lang)

        ov = dict(self._cached("overview", compute))
        concepts = self.concept_table()
        ov["n_concepts"] = len(concepts)
        ov["n_matched_concepts"] = sum(1 for c in concepts if c["matched"])
        ov["head"] = [c for c in concepts if c["matched"]][:10]
        ov["tail"] = [c for c in concepts if c["matched"]][-10:][::-1]
        ov["has_lang"] = self.has_lang
        return ov

    def concept_table(self) -> list[dict]:
        """Every concept with matched / balance before-after / alive counts, largest first (computed once);
        ``cix`` is its rank (its key in the summary tables)."""
        def compute() -> list[dict]:
            if self.summary_ready:
                with self.summary.cursor() as cur:
                    rows = [r[1:] for r in cur.execute("SELECT * FROM ctable ORDER BY cix").fetchall()]
            else:
                with self.cursor() as cur:
                    rows = cur.execute(report.concept_sql(self.has("balance_report"))).fetchall()
            return [{"id": r[0], "name": r[1] or "", "gloss": r[2] or "", "matched": r[3], "alive": r[4],
                     "before": r[5], "after": r[6], "cix": i} for i, r in enumerate(rows)]

        return self._cached("concepts", compute)

    def concept_index(self) -> dict[str, dict]:
        return self._cached("concept_index", lambda: {c["id"]: c for c in self.concept_table()})

    # -- one concept -----------------------------------------------------------------------------------
    def concept(self, cid: str, page: int, dpage: int) -> dict:
        with self.cursor() as cur:
            cur.execute("""SELECT concept_id, name, lemmas, gloss, depth, hypernyms, origin FROM concepts
                           WHERE concept_id = ? LIMIT 1""", [cid])
            row = cur.fetchone()
            counts = self.concept_index().get(cid)  # matched / alive, from the concept table computed once
            matched, n_kept = (counts["matched"], counts["alive"]) if counts else (0, 0)
            if row is None and not matched:
                raise NotFound(f"concept {cid!r} is not in this build")
            info = dict(zip(["id", "name", "lemmas", "gloss", "depth", "hypernyms", "origin"], row)) if row \
                else {"id": cid, "name": "", "lemmas": None, "gloss": "", "depth": None, "hypernyms": None,
                      "origin": None}
            hyper = list(info["hypernyms"] or [])
            names = dict(cur.execute("SELECT concept_id, any_value(name) FROM concepts WHERE concept_id IN "
                                     "(SELECT unnest(?)) GROUP BY 1", [hyper]).fetchall()) if hyper else {}
            names.update(self.wordnet_names([h for h in hyper if not names.get(h)]))
            info["hypernyms"] = [(h, names.get(h) or h) for h in hyper]
            if self.summary_ready and counts:
                kept, dropped = self._concept_members(counts["cix"], page, dpage)
            else:
                kept, dropped = self._concept_members_scan(cur, cid, page, dpage)
            n_dropped = matched - n_kept
            if all(x.get("sid") is not None for x in kept + dropped):  # the summary's rowids: no lookup
                caps = dict(cur.execute("SELECT uid, caption FROM samples WHERE rowid = ANY(?)",
                                        [[x["sid"] for x in kept + dropped]]).fetchall())
            else:
                caps = dict(self.captions([x["uid"] for x in kept + dropped]))
            for x in kept + dropped:
                x["caption"] = caps.get(x["uid"]) or ""
        return {"info": info, "matched": matched, "n_kept": n_kept, "kept": kept, "n_dropped": n_dropped,
                "dropped": dropped}

    def concept_agreement(self, cid: str, page: int) -> tuple[int, list[dict]]:
        """The concept's scored samples, the worst image–text agreement first (``media.agreement``): score, the
        stage's verdict and the image sense check of this concept. (0, []) when the build has no scores."""
        if not (self.has("agreement_scores") and self.has("media_rows")):
            return 0, []
        with self.cursor() as cur:
            base = """FROM media_rows m JOIN (SELECT uid, any_value(score) AS score FROM agreement_scores GROUP BY uid) a
                      USING (uid) WHERE list_contains(m.concept_ids, $c)"""
            n = int(cur.execute(f"SELECT count(*) {base}", {"c": cid}).fetchone()[0])
            if not n:
                return 0, []
            sense = ("LEFT JOIN sense_checks k ON k.uid = x.uid AND k.concept_id = $c" if self.has("sense_checks")
                     else "LEFT JOIN (SELECT NULL AS uid, NULL AS kept, NULL AS reason) k ON false")
            rows = cur.execute(f"""
                SELECT x.uid, x.caption, x.score, d.kept, d.reason, k.kept, k.reason FROM
                  (SELECT m.uid, m.caption, a.score {base} ORDER BY a.score, m.uid
                   LIMIT {GRID_SIZE} OFFSET $o) x
                LEFT JOIN decisions d ON d.uid = x.uid AND d.stage = 'agreement' {sense}
                ORDER BY x.score, x.uid""", {"c": cid, "o": (page - 1) * GRID_SIZE}).fetchall()
        return n, [{"uid": u, "caption": c or "", "score": sc, "kept": k, "reason": r, "sense_kept": sk,
                    "sense": sr} for u, c, sc, k, r, sk, sr in rows]

    def _concept_members(self, cix: int, page: int, dpage: int) -> tuple[list[dict], list[dict]]:
        """A page of the concept's alive and dropped samples from the summary's ranked ``members`` (keyset on
        ``rn``: the same rows and order as :meth:`_concept_members_scan`)."""
        q = """SELECT uid, span, stage, reason, ref_uid, sid FROM members
               WHERE cix = ? AND alive = ? AND rn > ? AND rn <= ? ORDER BY rn"""
        with self.summary.cursor() as cur:
            kept = [{"uid": u, "span": sp, "sid": sid} for u, sp, _, _, _, sid in cur.execute(
                q, [cix, True, (page - 1) * GRID_SIZE, page * GRID_SIZE]).fetchall()]
            dropped = [{"uid": u, "span": sp, "stage": st, "reason": r, "ref": ref, "sid": sid}
                       for u, sp, st, r, ref, sid in
                       cur.execute(q, [cix, False, (dpage - 1) * GRID_SIZE, dpage * GRID_SIZE]).fetchall()]
        return kept, dropped

    def _concept_members_scan(self, cur, cid: str, page: int, dpage: int) -> tuple[list[dict], list[dict]]:
        """The same page from the catalog itself (before the summary exists): scans matches and decisions."""
        mc = """WITH m AS (SELECT uid, any_value(span) FILTER (WHERE span IS NOT NULL) AS span FROM matches
                         WHERE concept_id = $c GROUP BY uid)"""
        cur.execute(f"""{mc} SELECT uid, span FROM m WHERE NOT EXISTS
                          (SELECT 1 FROM decisions d WHERE d.uid = m.uid AND NOT d.kept)
                        ORDER BY uid LIMIT {GRID_SIZE} OFFSET $o""", {"c": cid, "o": (page - 1) * GRID_SIZE})
        kept = [{"uid": u, "span": sp} for u, sp in cur.fetchall()]
        cur.execute(f"""{mc}, d AS (SELECT uid, stage, reason, ref_uid FROM decisions
                                    WHERE NOT kept AND uid IN (SELECT uid FROM m)
                                    QUALIFY row_number() OVER (PARTITION BY uid ORDER BY rowid) = 1)
                        SELECT m.uid, m.span, d.stage, d.reason, d.ref_uid FROM m JOIN d USING (uid)
                        ORDER BY m.uid LIMIT {GRID_SIZE} OFFSET $o""", {"c": cid, "o": (dpage - 1) * GRID_SIZE})
        dropped = [{"uid": u, "span": sp, "stage": st, "reason": r, "ref": ref}
                   for u, sp, st, r, ref in cur.fetchall()]
        return kept, dropped

    # -- one sample ------------------------------------------------------------------------------------
    def sample(self, uid: str) -> dict:
        fast = self.summary_ready
        S = self.summary
        with self.cursor() as cur:
            if fast:
                sid = S.by_uid("uids", "sid", uid)
                rows = cur.execute("SELECT * FROM samples WHERE rowid = ?", [sid[0][0]]).fetchall() if sid else []
            else:
                rows = cur.execute("SELECT * FROM samples WHERE uid = ?", [uid]).fetchall()
            if not rows:
                raise NotFound(f"uid {uid!r} is not in this build")
            row = dict(zip([d[0] for d in cur.description], rows[0]))
            if fast:
                names = self.concept_index()
                matches = sorted(((c, (names.get(c) or {}).get("name", ""), m, sc, sp) for c, m, sc, sp in
                                  S.by_uid("smatch", "concept_id, method, score, span", uid)),
                                 key=lambda x: (x[2] is None, x[2] or "", x[3] is None, -(x[3] or 0), x[0]))
                decisions = S.by_uid("sdec", "stage, kept, reason, ref_uid, concept_id", uid, "r")
            else:
                matches = report.sample_matches(cur, uid)
                decisions = report.sample_decisions(cur, uid)
            why = report.explain(report.ran_stages(cur) if self.has("stages") else [], decisions)
            stages, verdict = why.stages, why.verdict
            # the duplicate group: the sample this one duplicates, and every sample that duplicates it
            dup_of = sorted({(st, ref) for st, _, _, ref, _ in decisions if ref is not None})
            if fast:
                dups = sorted(S.by_uid("sref", "uid, stage, reason", uid, key="ref_uid"), key=lambda x: (x[1], x[0]))
                dups = dups[:200]
                caps = dict(self.captions([u for u, _, _ in dups]))
                dups = [(u, st, r, caps.get(u)) for u, st, r in dups]
                shard = S.by_uid("sshard", "shard, key, pos", uid) if S.has("sshard") else []
                dl = S.by_uid("sdl", "status, error, sha256, width, height, format", uid, "attempt DESC")[:1] \
                    if S.has("sdl") else []
            else:
                cur.execute("""SELECT d.uid, d.stage, d.reason, s.caption FROM decisions d LEFT JOIN samples s
                               USING (uid) WHERE d.ref_uid = ? ORDER BY d.stage, d.uid LIMIT 200""", [uid])
                dups = cur.fetchall()
                shard = cur.execute("SELECT shard, key, pos FROM shard_index WHERE uid = ?", [uid]).fetchall() \
                    if self.has("shard_index") else []
                dl = cur.execute("""SELECT status, error, sha256, width, height, format FROM downloads WHERE uid = ?
                                    ORDER BY attempt DESC LIMIT 1""", [uid]).fetchall() if self.has("downloads") else []
        return {"row": row, "matches": matches, "stages": stages, "verdict": verdict or "alive (no stage rejected it)",
                "dup_of": dup_of, "dups": dups, "shard": shard[0] if shard else None, "download": dl[0] if dl else None,
                "spans": [m[4] for m in matches if m[4]]}

    def captions(self, uids: list[str]) -> list[tuple[str, str]]:
        """``(uid, caption)`` of these samples (by the summary's rowids when it exists: no scan)."""
        if not uids:
            return []
        with self.cursor() as cur:
            if self.summary_ready:
                # one point lookup per uid: each reads the one row group its hash sorts into (a single query
                # over scattered hashes reads most of them)
                sids = [r[0] for u in dict.fromkeys(uids) for r in self.summary.by_uid("uids", "sid", u)]
                return cur.execute("SELECT uid, caption FROM samples WHERE rowid = ANY(?)", [sids]).fetchall()
            return cur.execute("SELECT uid, caption FROM samples WHERE uid IN (SELECT unnest(?))", [uids]).fetchall()

    # -- search ----------------------------------------------------------------------------------------
    def sources(self) -> list[str]:
        def compute():
            with self.cursor() as cur:
                return [r[0] for r in cur.execute(
                    "SELECT DISTINCT source FROM samples WHERE source IS NOT NULL ORDER BY 1 LIMIT 1000").fetchall()]
        return self._cached("sources", compute)

    def search(self, q: str, concept: str, status: str, source: str, page: int) -> dict:
        """Samples whose caption has every word of ``q`` (words: runs of letters / digits / ``_``, compared
        lower-cased and whole), with the filters, in catalog order; counted exactly up to ``common.COUNT_CAP``."""
        words = list(dict.fromkeys(TOKEN_RE.findall(q.lower())))
        if concept and concept not in self.concept_index():
            raise NotFound(f"concept {concept!r} is not in this build")
        if any(len(w) > MAX_TOKEN for w in words):
            found, n, est = [], 0, None  # never indexed: no caption has it as a word
        elif self.summary_ready:
            found, n, est = self._search_index(words, concept, status, source, page)
        else:
            (found, n), est = self._search_scan(words, concept, status, source, page), None
        with self.cursor() as cur:
            caps = {r[0]: r[1:] for r in cur.execute(
                "SELECT rowid, uid, source, caption FROM samples WHERE rowid = ANY(?)",
                [[sid for sid, _ in found]]).fetchall()} if found else {}
        rows = [{"uid": caps[sid][0], "source": caps[sid][1], "caption": caps[sid][2] or "", "kept": not dead}
                for sid, dead in found if sid in caps]
        return {"n": min(n, common.COUNT_CAP), "capped": n > common.COUNT_CAP, "rows": rows, "words": words,
                "estimate": est if n > common.COUNT_CAP else None}

    def _search_scan(self, words, concept, status, source, page) -> tuple[list[tuple[int, bool]], int]:
        """Search straight over the catalog (before the summary exists): a full scan per request."""
        where, params = [], []
        for w in words:
            where.append(f"s.caption ILIKE ? ESCAPE '\\' AND list_contains(regexp_extract_all(lower(s.caption), "
                         f"'{TOKEN_SQL}'), ?)")
            params += ["%" + re.sub(r"([\\%_])", r"\\\1", w) + "%", w]
        if concept:
            where.append("s.uid IN (SELECT uid FROM matches WHERE concept_id = ?)")
            params.append(concept)
        if source:
            where.append("s.source = ?")
            params.append(source)
        if status == "kept":
            where.append(f"NOT {DEAD}")
        elif status == "dropped":
            where.append(DEAD)
        cond = " AND ".join(where) or "TRUE"
        with self.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM (SELECT 1 FROM samples s WHERE {cond} LIMIT {common.COUNT_CAP + 1})", params)
            n = cur.fetchone()[0]
            # catalog order without ORDER BY: DuckDB keeps insertion order and can stop at the page's last row
            cur.execute(f"""SELECT s.rowid, {DEAD} FROM samples s WHERE {cond}
                            LIMIT {PAGE_SIZE} OFFSET {(page - 1) * PAGE_SIZE}""", params)
            return [(sid, bool(dead)) for sid, dead in cur.fetchall()], n

    def _search_index(self, words, concept, status, source, page) -> tuple[list[tuple[int, bool]], int, int | None]:
        """Search over the summary's word index: the rarest word's postings, intersected with the others', window
        by window of sample ids (windows doubling from 1/64 of the range), stopping once the page is filled and more
        than ``common.COUNT_CAP`` rows were counted. Returns the page's ``(sid, dropped)``, the count and, when it stopped
        early, the count extrapolated to the whole id range (an estimate)."""
        with self.summary.cursor() as cur:
            if words:
                df = {}
                for w in words:  # one equality each: DuckDB skips row groups by it (not by a list parameter)
                    r = cur.execute("SELECT df FROM vocab WHERE tok = ?", [w]).fetchone()
                    if r is None:
                        return [], 0, None  # a word no caption has
                    df[w] = r[0]
                words = sorted(words, key=lambda w: (df[w], w))
                base, bparams = "SELECT sid, dead FROM postings WHERE tok = ?", [words[0]]
            else:
                base, bparams = "SELECT sid, dead FROM docs WHERE TRUE", []
            if status != "any":
                base += " AND dead" if status == "dropped" else " AND NOT dead"
            if source:
                code = cur.execute("SELECT src FROM sources WHERE source = ?", [source]).fetchone()
                if code is None:
                    return [], 0, None
                base += " AND src = ?"
                bparams.append(code[0])
            extra, eparams = "", []
            for w in words[1:]:
                extra += " AND sid IN (SELECT sid FROM postings WHERE tok = ? AND sid BETWEEN $lo AND $hi)"
                eparams.append(w)
            if concept:
                extra += " AND sid IN (SELECT sid FROM cmem WHERE cix = ? AND sid BETWEEN $lo AND $hi)"
                eparams.append(self.concept_index()[concept]["cix"])
            if words:  # the rarest word's sample-id range; one window when it is rare
                lo, top = cur.execute("SELECT min(sid), max(sid) FROM postings WHERE tok = ?", [words[0]]).fetchone()
                windows = 1 if df[words[0]] <= RARE_WORD else 64
            else:
                lo, top = 0, self._cached("max_sid", lambda: cur.execute("SELECT max(sid) FROM docs").fetchone()[0])
                windows = 64
            if top is None:
                return [], 0, None
            # named ($lo, $hi) and positional parameters cannot mix in DuckDB: number them all
            sql = f"WITH h AS ({base} AND sid BETWEEN $lo AND $hi{extra}) " \
                  "SELECT (SELECT count(*) FROM h), (SELECT list([sid, dead::INTEGER]) FROM " \
                  "(SELECT sid, dead FROM h ORDER BY sid LIMIT $lim OFFSET $off))"
            names = iter(range(1, 1000))
            sql = re.sub(r"\?", lambda _: f"$p{next(names)}", sql)
            plist = bparams + eparams
            start, stop = (page - 1) * PAGE_SIZE, page * PAGE_SIZE
            first, step = lo, max(1, -(-(top + 1 - lo) // windows))
            n, found = 0, []
            while lo <= top:
                hi = min(top, lo + step - 1)
                args = {f"p{i + 1}": v for i, v in enumerate(plist)}
                off = max(0, start - n)
                args.update(lo=lo, hi=hi, off=off, lim=max(0, stop - max(n, start)))
                cnt, hits = cur.execute(sql, args).fetchone()
                found += [(int(sid), bool(dead)) for sid, dead in (hits or [])]
                n += cnt
                lo = hi + 1
                if lo - first >= 2 * step:
                    step *= 2
                if n > common.COUNT_CAP and n >= stop:  # the page is filled and the count is past the cap
                    est = n * (top + 1 - first) / (lo - first)
                    return found, n, int(round(est, -max(0, len(str(int(est))) - 3)))  # 3 significant digits
        return found, n, None

    # -- images ----------------------------------------------------------------------------------------
    def image_bytes(self, uid: str) -> bytes | None:
        """The stored bytes of ``uid``'s image: its shard member, else its stored download, else its local file."""
        S = self.summary if self.summary_ready else None
        with self.cursor() as cur:
            if self.shards_dir is not None and self.has("shard_index"):
                r = S.by_uid("sshard", "shard, key", uid) if S is not None and S.has("sshard") else \
                    cur.execute("SELECT shard, key FROM shard_index WHERE uid = ?", [uid]).fetchall()
                if r:
                    data = self.images.get_member(self.shards_dir / r[0][0], f"{r[0][1]}.jpg")
                    if data is not None:
                        return data
            if self.has("downloads"):
                r = [x[1:] for x in S.by_uid("sdl", "status, format, store, shard, key", uid, "attempt DESC")
                     if x[0] == "success"][:1] if S is not None and S.has("sdl") else \
                    cur.execute("""SELECT format, store, shard, key FROM downloads WHERE uid = ? AND status = 'success'
                                   ORDER BY attempt DESC LIMIT 1""", [uid]).fetchall()
                if r:
                    data = self.images.get(*r[0])
                    if data is not None:
                        return data
            if S is not None:
                sid = S.by_uid("uids", "sid", uid)
                r = cur.execute("SELECT path FROM samples WHERE rowid = ?", [sid[0][0]]).fetchall() if sid else []
            else:
                r = cur.execute("SELECT path FROM samples WHERE uid = ?", [uid]).fetchall()
        if not r:
            raise NotFound(f"uid {uid!r} is not in this build")
        return self.images.get("local", "", "", r[0][0]) if r[0][0] else None

    def thumbnail(self, uid: str, size: int) -> bytes | None:
        k = (uid, size)
        with self._lock:
            if k in self._thumbs:
                self._thumbs.move_to_end(k)
                return self._thumbs[k]
        data = self.image_bytes(uid)
        out = None
        if data is not None:
            from PIL import Image, ImageOps

            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.draft("RGB", (size, size))
                    im = ImageOps.exif_transpose(im).convert("RGB")
                    im.thumbnail((size, size))
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=85)
                    out = buf.getvalue()
            except Exception:  # noqa: BLE001 - an undecodable stored image is "no image", not a crash
                out = None
        with self._lock:
            self._thumbs[k] = out
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return out
