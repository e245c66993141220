"""``curate serve BUILD``: a read-only local web explorer over a build's catalog and stored images.

Pages (server-rendered with Jinja2 on FastAPI/Starlette, served by uvicorn on 127.0.0.1 by default):

* ``/``                 overview: stages with counts, rejection reasons, concept head/tail curve, sources
* ``/concepts``         searchable, paginated concept table (matched / balance before-after / alive counts)
* ``/concept/{id}``     gloss, kept samples (thumbnails, the matched span highlighted), dropped ones + reasons,
  and (builds with ``media.agreement``) the samples by image–text agreement, worst first, with the sense check
* ``/sample/{uid}``     what ``curate inspect`` says: decisions per stage, matches, duplicate group, shard/key
* ``/search``           caption search (every word must occur, case-insensitive), filters: concept, status, source
* ``/thumb/{uid}``      a JPEG thumbnail of the stored image (``?size=`` 32..1024), with cache headers
* ``/images``, ``/model`` with ``--model``: text → image search over the build's images (embeddings cached per
  build + model fingerprint under ``$TETHER_CACHE/serve``), the model's config and eval reports

* ``/model`` also draws the patch-level similarity map of a text over an image (``?uid=&q=``, the PNG at
  ``/model/patchmap.png``) when the model's image head embeds patch tokens (``LoadedModel.patch_similarity``)

Read-only by construction: the catalog is opened with ``duckdb.connect(path, read_only=True)`` and images are
read (one tar member, one file) from where the build stored them — never extracted, never written. What has to be
precomputed for large builds (per-concept ranked members, a caption word index, per-sample lookups: see
:class:`Summary`) is cached outside the build, under ``$TETHER_CACHE/serve``. Bad input
(unknown uid/concept, malformed query) gets an HTML page with a 4xx status, never a traceback.
"""


import hashlib
import io
import json
import math
import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlencode

import duckdb
from markupsafe import Markup, escape

from tether.digest import update_from_file
from curate import report
from curate.catalog import recorded_wordnet_dir
from curate.imagestore import ImageStore

PAGE_SIZE = 50  # table rows per page
GRID_SIZE = 24  # thumbnails per page
MAX_PAGE = 1_000_000
MAX_QUERY_CHARS = 300
COUNT_CAP = 10_000  # search results are counted exactly up to this many (beyond: "10,000+", and an estimate)
IMAGE_HITS = 240  # text → image: this many nearest images, paged
STATUSES = ("any", "kept", "dropped")
DEAD = "EXISTS (SELECT 1 FROM decisions d WHERE d.uid = s.uid AND NOT d.kept)"
# caption words, as search sees them: runs of letters, digits and "_" (RE2 in DuckDB, re in Python: the same sets)
TOKEN_SQL = r"[\pL\pN_]+"
TOKEN_RE = re.compile(r"\w+")
MAX_TOKEN = 64  # longer runs are not indexed (and cannot be searched)
RARE_WORD = 20_000  # a search whose rarest word is in at most this many captions checks them all in one query
SUMMARY_VERSION = 1


class BadRequest(Exception):
    """A malformed query (HTTP 400)."""


class NotFound(Exception):
    """An unknown uid / concept (HTTP 404)."""


# ----------------------------------------------------------------------------------------------- the build
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
    def _overview_counts(self, cur) -> dict:
        """The overview's counts, straight from the catalog (``cur``: a cursor whose default database is it)."""
        total = cur.execute("SELECT count(*) FROM samples").fetchone()[0]
        alive = cur.execute("SELECT count(*) FROM alive").fetchone()[0]
        stages = [list(r) for r in report.stage_counts(cur)] if self.has("stages") else []
        reasons = [list(r) for r in report.top_reasons(cur, 30)]
        dead = "SELECT DISTINCT uid FROM decisions WHERE NOT kept"
        sources = [list(r) for r in cur.execute(f"""
            SELECT source, count(*), count(*) FILTER (WHERE d.uid IS NULL) FROM samples s
            LEFT JOIN ({dead}) d USING (uid) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50""").fetchall()]
        langs = None
        if self.has_lang:
            langs = [list(r) for r in cur.execute(f"""
                SELECT coalesce(nullif(trim(s.lang), ''), 'und') AS lang, count(*),
                       count(*) FILTER (WHERE d.uid IS NULL) FROM samples s
                LEFT JOIN ({dead}) d USING (uid) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50""").fetchall()]
        return {"total": total, "alive": alive, "stages": stages, "reasons": reasons, "sources": sources,
                "langs": langs}

    def overview(self) -> dict:
        def compute() -> dict:
            if self.summary_ready:
                with self.summary.cursor() as cur:
                    return {k: json.loads(v) for k, v in cur.execute("SELECT key, value FROM meta").fetchall()}
            with self.cursor() as cur:
                return self._overview_counts(cur)

        ov = dict(self._cached("overview", compute))
        concepts = self.concept_table()
        ov["n_concepts"] = len(concepts)
        ov["n_matched_concepts"] = sum(1 for c in concepts if c["matched"])
        ov["head"] = [c for c in concepts if c["matched"]][:10]
        ov["tail"] = [c for c in concepts if c["matched"]][-10:][::-1]
        ov["curve"] = head_tail_svg([c["matched"] for c in concepts if c["matched"]],
                                    [c["alive"] for c in concepts if c["matched"]])
        ov["has_lang"] = self.has_lang
        return ov

    def _concept_sql(self) -> str:
        """Every concept ``(id, name, gloss, matched, alive, before, after)``, largest first, from the catalog."""
        br = ("LEFT JOIN (SELECT concept_id, any_value(before) AS before, any_value(after) AS after FROM "
              "balance_report WHERE stage = 'balance' GROUP BY 1) b USING (concept_id)"
              if self.has("balance_report") else "")
        bcols = "b.before, b.after" if br else "NULL::BIGINT, NULL::BIGINT"
        return f"""
            WITH mc AS (SELECT DISTINCT uid, concept_id FROM matches),
                 dead AS (SELECT DISTINCT uid FROM decisions WHERE NOT kept),
                 per AS (SELECT mc.concept_id, count(*) AS matched,
                                count(*) FILTER (WHERE dead.uid IS NULL) AS alive
                         FROM mc LEFT JOIN dead USING (uid) GROUP BY 1),
                 ids AS (SELECT concept_id FROM concepts UNION SELECT concept_id FROM per)
            SELECT ids.concept_id AS id, c.name, c.gloss, coalesce(per.matched, 0) AS matched,
                   coalesce(per.alive, 0) AS alive, {bcols}
            FROM ids LEFT JOIN (SELECT concept_id, any_value(name) AS name, any_value(gloss) AS gloss
                                FROM concepts GROUP BY 1) c USING (concept_id)
                 LEFT JOIN per USING (concept_id) {br}
            ORDER BY 4 DESC, 1"""

    def concept_table(self) -> list[dict]:
        """Every concept with matched / balance before-after / alive counts, largest first (computed once);
        ``cix`` is its rank (its key in the summary tables)."""
        def compute() -> list[dict]:
            if self.summary_ready:
                with self.summary.cursor() as cur:
                    rows = [r[1:] for r in cur.execute("SELECT * FROM ctable ORDER BY cix").fetchall()]
            else:
                with self.cursor() as cur:
                    rows = cur.execute(self._concept_sql()).fetchall()
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
        lower-cased and whole), with the filters, in catalog order; counted exactly up to ``COUNT_CAP``."""
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
        return {"n": min(n, COUNT_CAP), "capped": n > COUNT_CAP, "rows": rows, "words": words,
                "estimate": est if n > COUNT_CAP else None}

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
            cur.execute(f"SELECT count(*) FROM (SELECT 1 FROM samples s WHERE {cond} LIMIT {COUNT_CAP + 1})", params)
            n = cur.fetchone()[0]
            # catalog order without ORDER BY: DuckDB keeps insertion order and can stop at the page's last row
            cur.execute(f"""SELECT s.rowid, {DEAD} FROM samples s WHERE {cond}
                            LIMIT {PAGE_SIZE} OFFSET {(page - 1) * PAGE_SIZE}""", params)
            return [(sid, bool(dead)) for sid, dead in cur.fetchall()], n

    def _search_index(self, words, concept, status, source, page) -> tuple[list[tuple[int, bool]], int, int | None]:
        """Search over the summary's word index: the rarest word's postings, intersected with the others', window
        by window of sample ids (windows doubling from 1/64 of the range), stopping once the page is filled and more
        than ``COUNT_CAP`` rows were counted. Returns the page's ``(sid, dropped)``, the count and, when it stopped
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
                if n > COUNT_CAP and n >= stop:  # the page is filled and the count is past the cap
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


# ------------------------------------------------------------------------------- precomputed summary tables
class Summary:
    """Tables precomputed once per build and cached OUTSIDE it (the build is read-only), so that every page reads
    a page of rows whatever the build's size: ``cache_root()/<build key>/explorer-v1.duckdb``, keyed like the
    embedding cache by the catalog's path, size and modification time (a rebuilt catalog gets a new file).

    * ``meta``     the overview's counts (stages, rejection reasons, sources, languages) as JSON
    * ``ctable``   every concept with matched / alive / balance counts and its rank ``cix``
    * ``docs``     one row per sample: ``sid`` (the catalog's rowid), uid, dropped or not, source code
    * ``members``  (concept, sample) pairs sorted by concept, alive-or-not and a per-group rank ``rn``, with the
                   first stage that dropped the sample: a concept's page ``k`` is the rows ``rn`` in
                   ``(24(k-1), 24k]`` (no OFFSET scan; DuckDB's min/max row-group statistics skip the rest)
    * ``postings`` / ``vocab``  an inverted index of caption words (``TOKEN_SQL``, lower-cased) sorted by word:
                   DuckDB's own FTS extension is not available offline, this is the same idea in plain tables
    """

    def __init__(self, explorer: "Explorer"):
        self.ex = explorer
        self.folder = cache_root() / explorer.build_key
        self.path = self.folder / f"explorer-v{SUMMARY_VERSION}.duckdb"
        self.con: duckdb.DuckDBPyConnection | None = None
        self.error: str | None = None
        self.seconds_to_build: float | None = None
        self.step = ""  # what the build is doing now (shown while it runs)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.con is not None

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _open(self) -> bool:
        if not self.path.is_file():
            return False
        try:
            con = duckdb.connect(str(self.path), read_only=True)
            meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('version', 'hash_probe')").fetchall())
            probe = con.execute("SELECT hash('tether')::VARCHAR").fetchone()[0]
            if (json.loads(meta.get("version", "0")), json.loads(meta.get("hash_probe", "0"))) != \
                    (SUMMARY_VERSION, probe):
                con.close()  # another layout, or a DuckDB whose hash() differs: rebuilt
                return False
        except (duckdb.Error, ValueError):
            return False  # a damaged or foreign file is rebuilt
        self.con = con
        return True

    def load_or_build(self) -> None:
        with self._lock:
            if self.con is None and not self._open():
                self._build()
                if not self._open():
                    raise RuntimeError(f"{self.path}: the summary just written cannot be opened")

    def start_background(self) -> None:
        def run():
            try:
                self.load_or_build()
            except Exception as e:  # noqa: BLE001 - the pages keep answering from the catalog itself
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

        self._thread = threading.Thread(target=run, name="tether-serve-summary", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None

    def has(self, table: str) -> bool:
        return self._cached_tables().__contains__(table)

    def _cached_tables(self) -> set[str]:
        if not hasattr(self, "_tables"):
            with self.cursor() as cur:
                self._tables = {r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        return self._tables

    def by_uid(self, table: str, cols: str, uid: str, order: str = "", key: str = "uid") -> list[tuple]:
        """``cols`` of ``table``'s rows whose ``key`` column is ``uid`` (via the sorted ``h = hash(key)``)."""
        with self.cursor() as cur:
            return cur.execute(f"SELECT {cols} FROM {table} WHERE h = hash($u) AND {key} = $u "
                               f"{'ORDER BY ' + order if order else ''}", {"u": uid}).fetchall()

    def _build(self) -> None:
        import time

        t0 = time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".explorer.{os.getpid()}.{threading.get_ident()}.duckdb"
        tmp.unlink(missing_ok=True)
        con = duckdb.connect()  # in memory: reads the catalog (attached read-only), writes the summary file
        try:
            spill = self.folder / f".spill.{os.getpid()}"
            mem = os.environ.get("TETHER_SERVE_MEMORY", "4GB").strip()
            if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", mem, re.IGNORECASE):
                raise ValueError(f"TETHER_SERVE_MEMORY: expected a size such as 4GB, got {mem!r}")
            con.execute(f"SET memory_limit = '{mem}'")
            con.execute("SET temp_directory = '" + str(spill).replace("'", "''") + "'")
            con.execute("ATTACH ? AS c (READ_ONLY)", [str(self.ex.catalog)])
            con.execute("ATTACH ? AS sx", [str(tmp)])
            self.step = "overview"
            con.execute("USE c")  # the catalog's own queries, unchanged
            probe = con.execute("SELECT hash('tether')::VARCHAR").fetchone()[0]
            meta = {"version": SUMMARY_VERSION, "hash_probe": probe, **self.ex._overview_counts(con)}
            self.step = "concepts"
            con.execute(f"""CREATE TABLE sx.ctable AS
                            SELECT (row_number() OVER (ORDER BY matched DESC, id) - 1)::INTEGER AS cix, *
                            FROM ({self.ex._concept_sql()}) ORDER BY cix""")
            con.execute("USE sx")
            self.step = "dropped samples"
            con.execute("""CREATE TEMP TABLE dead AS SELECT uid, stage, reason, ref_uid FROM
                           (SELECT uid, stage, reason, ref_uid, row_number() OVER (PARTITION BY uid ORDER BY rowid) AS r
                            FROM c.decisions WHERE NOT kept) WHERE r = 1""")
            con.execute("""CREATE TEMP TABLE srcs AS SELECT source, (row_number() OVER (ORDER BY source) - 1)::INTEGER
                           AS src FROM (SELECT DISTINCT source FROM c.samples)""")
            self.step = "samples"
            con.execute("""CREATE TABLE docs AS SELECT s.rowid AS sid, s.uid, d.uid IS NOT NULL AS dead, srcs.src
                           FROM c.samples s LEFT JOIN dead d USING (uid)
                           LEFT JOIN srcs ON s.source IS NOT DISTINCT FROM srcs.source ORDER BY sid""")
            con.execute("CREATE TABLE sources AS SELECT * FROM srcs ORDER BY src")
            # per-sample lookups, sorted by hash(uid): a uid's rows sit in one row group, found by its min/max
            # statistics (uids themselves share long prefixes such as "flickr8k:", which those cannot tell apart)
            self.step = "per-sample lookups"
            con.execute("CREATE TABLE uids AS SELECT hash(uid) AS h, uid, sid FROM docs ORDER BY h")
            con.execute("""CREATE TABLE sdec AS SELECT hash(uid) AS h, uid, rowid AS r, stage, kept, reason, ref_uid,
                           concept_id FROM c.decisions ORDER BY h, r""")
            con.execute("""CREATE TABLE sref AS SELECT hash(ref_uid) AS h, ref_uid, uid, stage, reason
                           FROM c.decisions WHERE ref_uid IS NOT NULL ORDER BY h""")
            con.execute("""CREATE TABLE smatch AS SELECT hash(uid) AS h, uid, concept_id, method, score, span
                           FROM c.matches ORDER BY h""")
            if self.ex.has("shard_index"):
                con.execute("CREATE TABLE sshard AS SELECT hash(uid) AS h, uid, shard, key, pos FROM c.shard_index "
                            "ORDER BY h")
            if self.ex.has("downloads"):
                con.execute("""CREATE TABLE sdl AS SELECT hash(uid) AS h, uid, status, error, sha256, width, height,
                               format, store, shard, key, attempt FROM c.downloads ORDER BY h, attempt DESC""")
            self.step = "concept members"
            con.execute("""CREATE TABLE members AS
                WITH m AS (SELECT uid, concept_id, any_value(span) FILTER (WHERE span IS NOT NULL) AS span
                           FROM c.matches GROUP BY ALL),
                     x AS (SELECT ct.cix, m.uid, m.span, docs.sid, d.uid IS NULL AS alive, d.stage, d.reason,
                                  d.ref_uid
                           FROM m JOIN ctable ct ON ct.id = m.concept_id LEFT JOIN dead d USING (uid)
                                LEFT JOIN docs USING (uid))
                SELECT *, row_number() OVER (PARTITION BY cix, alive ORDER BY uid) AS rn FROM x
                ORDER BY cix, alive, rn""")
            con.execute("CREATE TABLE cmem AS SELECT cix, sid FROM members ORDER BY cix, sid")  # concept filter
            self.step = "caption word index"
            con.execute(f"""CREATE TABLE postings AS
                SELECT tok, sid, dead, src FROM (
                    SELECT unnest(list_distinct(regexp_extract_all(lower(s.caption), '{TOKEN_SQL}'))) AS tok,
                           docs.sid, docs.dead, docs.src
                    FROM c.samples s JOIN docs ON docs.sid = s.rowid)
                WHERE length(tok) <= {MAX_TOKEN} ORDER BY tok, sid""")
            con.execute("CREATE TABLE vocab AS SELECT tok, count(*) AS df FROM postings GROUP BY tok ORDER BY tok")
            con.execute("CREATE TABLE meta(key VARCHAR, value VARCHAR)")
            con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            con.execute("USE memory")
            con.execute("DETACH c")
            con.execute("CHECKPOINT sx")
            con.execute("DETACH sx")
            con.close()
            os.replace(tmp, self.path)
            self.seconds_to_build = time.time() - t0
        finally:
            try:
                con.close()
            except duckdb.Error:
                pass
            tmp.unlink(missing_ok=True)
            for leftover in self.folder.glob(f"{tmp.name}.wal"):
                leftover.unlink(missing_ok=True)
            import shutil

            shutil.rmtree(self.folder / f".spill.{os.getpid()}", ignore_errors=True)
            self.step = ""


# ------------------------------------------------------------------------------------------ aligned model
def cache_root() -> Path:
    """Where embeddings of builds are cached: ``$TETHER_CACHE/serve`` (default ``~/.cache/tether/serve``)."""
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether") / "serve"


class ModelIndex:
    """An exported aligned model (loaded through :func:`tether.plugins.load_model`) over the build's images: image and caption embeddings of every
    sample with a stored image (the shards' samples when the build has shards), computed once per (build, model
    fingerprint) and cached outside the build, under :func:`cache_root`."""

    def __init__(self, explorer: Explorer, model_dir: str | Path, eval_dir: str | Path | None = None):
        from tether.plugins import load_model

        self.ex = explorer
        self.dir = Path(model_dir)
        loaded = load_model(self.dir)  # align's AlignedModel: heads now, encoders on the first query
        self.model = loaded.model
        self.patch_similarity = loaded.patch_similarity  # None: pooled heads only
        self._maps: OrderedDict[tuple[str, str], tuple[object, object]] = OrderedDict()
        h = hashlib.sha256()
        for name in loaded.files:
            update_from_file(h, name)
        self.fingerprint = h.hexdigest()[:16]
        self.cache = cache_root() / f"{explorer.build_key}-{self.fingerprint}"
        self.eval_dir = Path(eval_dir) if eval_dir else None
        self._lock = threading.Lock()
        self._index: tuple[list[str], object, object] | None = None
        self.seconds_to_build: float | None = None
        self.progress = (0, 0)  # (images embedded, images to embed) while the index is being built
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._index is not None

    def start_background(self) -> None:
        """Build (or load) the index in a thread, so the pages stay usable meanwhile (``/images`` shows progress)."""
        def run():
            try:
                self.index()
            except Exception as e:  # noqa: BLE001 - shown on /images instead of killing the server
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

        self._thread = threading.Thread(target=run, name="tether-serve-index", daemon=True)
        self._thread.start()

    def _uids(self) -> list[str]:
        with self.ex.cursor() as cur:
            if self.ex.has("shard_index"):
                rows = cur.execute("SELECT uid FROM shard_index ORDER BY pos").fetchall()
                if rows:
                    return [r[0] for r in rows]
            if self.ex.has("downloads"):
                rows = cur.execute(f"""SELECT DISTINCT s.uid FROM samples s JOIN downloads d USING (uid)
                                       WHERE d.status = 'success' AND NOT {DEAD} ORDER BY 1""").fetchall()
                if rows:
                    return [r[0] for r in rows]
            return [r[0] for r in cur.execute(
                f"SELECT uid FROM samples s WHERE path IS NOT NULL AND NOT {DEAD} ORDER BY uid").fetchall()]

    def index(self):
        """``(uids, group [N], image_emb [G, D], caption_emb [N, D])``: ``group[i]`` is the row of ``uids[i]``'s
        image in ``image_emb`` (samples whose stored images are byte-identical — several captions of one photo —
        share one row, embedded once). From the cache, or computed (then cached) once."""
        import numpy as np

        with self._lock:
            if self._index is not None:
                return self._index
            f = self.cache / "index.npz"
            if f.is_file():
                try:
                    with np.load(f, allow_pickle=False) as z:
                        self._index = (list(z["uids"]), z["group"], z["image"], z["caption"])
                    return self._index
                except (OSError, ValueError, KeyError):
                    pass  # a damaged cache file is rebuilt
            import time

            from PIL import Image

            t0 = time.time()
            todo = self._uids()
            with self.ex.cursor() as cur:
                caps = dict(cur.execute("SELECT uid, caption FROM samples WHERE uid IN (SELECT unnest(?))",
                                        [todo]).fetchall())
            uids, group, seen = [], [], {}
            images, captions, img_parts, cap_parts = [], [], [], []

            def flush(force: bool = False):
                if images and (force or len(images) >= 64):
                    img_parts.append(self.model.encode_image(images))
                    images.clear()
                if captions and (force or len(captions) >= 256):
                    cap_parts.append(self.model.encode_text(captions))
                    captions.clear()

            self.progress = (0, len(todo))
            for n, uid in enumerate(todo, 1):
                self.progress = (n, len(todo))
                data = self.ex.image_bytes(uid)
                if data is None:
                    continue
                key = hashlib.sha1(data).digest()
                if key not in seen:
                    try:
                        with Image.open(io.BytesIO(data)) as im:
                            images.append(im.convert("RGB"))
                    except Exception:  # noqa: BLE001 - an undecodable image is left out of the index
                        continue
                    seen[key] = len(seen)
                uids.append(uid)
                group.append(seen[key])
                captions.append(caps.get(uid) or "")
                flush()
            flush(force=True)
            dim = int(self.model.config["embed_dim"])
            img = np.concatenate(img_parts) if img_parts else np.zeros((0, dim), np.float32)
            cap = np.concatenate(cap_parts) if cap_parts else np.zeros((0, dim), np.float32)
            grp = np.asarray(group, dtype=np.int64)
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache / f".index.{os.getpid()}.npz"
            np.savez(tmp, uids=np.array(uids, dtype=str), group=grp, image=img, caption=cap)
            os.replace(tmp, f)
            self.seconds_to_build = time.time() - t0
            self._index = (uids, grp, img, cap)
            return self._index

    def text_to_image(self, q: str, k: int) -> list[tuple[str, float, int]]:
        """The ``k`` images nearest the text ``q``: ``(uid of its first sample, cosine, samples sharing it)``."""
        import numpy as np

        uids, grp, img, _ = self.index()
        if not uids:
            return []
        scores = img @ self.model.encode_text([q])[0]
        first = {}
        for i, g in enumerate(grp.tolist()):
            first.setdefault(g, i)
        counts = np.bincount(grp, minlength=len(img))
        top = np.argsort(-scores, kind="stable")[:k]
        return [(uids[first[int(g)]], float(scores[g]), int(counts[g])) for g in top]

    def image_to_text(self, uid: str, k: int) -> list[tuple[str, float]] | None:
        """The ``k`` indexed captions nearest ``uid``'s image (None when the image is not indexed)."""
        import numpy as np

        uids, grp, img, cap = self.index()
        try:
            i = uids.index(uid)
        except ValueError:
            return None
        scores = cap @ img[grp[i]]
        top = np.argsort(-scores, kind="stable")[:k]
        return [(uids[j], float(scores[j])) for j in top]

    def patch_map(self, uid: str, q: str) -> tuple[object, object]:
        """``(sims [h, w], view)``: the model's patch similarity map of the text ``q`` over ``uid``'s stored image
        and the part of the image it covers (the center square the encoder's preprocessing keeps). The last 32 are
        kept (the page and its PNG ask for the same map)."""
        import numpy as np
        from PIL import Image, ImageOps

        if self.patch_similarity is None:
            raise NotFound("this model has pooled heads only: it has no patch embeddings to map")
        key = (uid, q)
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        data = self.ex.image_bytes(uid)  # NotFound for an unknown uid
        if data is None:
            raise NotFound(f"sample {uid!r} has no stored image")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
        except Exception:  # noqa: BLE001 - a broken stored image is "no image", not a crash
            raise NotFound(f"sample {uid!r}: its stored image cannot be decoded") from None
        sims = np.asarray(self.patch_similarity(im, q), dtype=np.float32)
        if sims.ndim != 2 or not sims.size or not np.isfinite(sims).all():
            raise RuntimeError(f"the model's patch similarity is not a finite 2-D map (shape {sims.shape})")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        out = (sims, im.crop((left, top, left + side, top + side)))
        with self._lock:
            self._maps[key] = out
            while len(self._maps) > 32:
                self._maps.popitem(last=False)
        return out

    def patch_map_png(self, uid: str, q: str, size: int = 384) -> bytes:
        """The map upsampled (bilinear) over the image's center square as a heat map (dark: lowest cosine on this
        image, bright yellow: highest), blended with the photo, as PNG."""
        import numpy as np
        from PIL import Image

        sims, view = self.patch_map(uid, q)
        heat = np.asarray(Image.fromarray(sims).resize((size, size), Image.BILINEAR), dtype=np.float32)
        lo, hi = float(sims.min()), float(sims.max())
        t = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        photo = np.asarray(view.resize((size, size), Image.BICUBIC), dtype=np.float32)
        blend = (0.4 * photo + 0.6 * heat_colors(t)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blend).save(buf, format="PNG")
        return buf.getvalue()

    def reports(self) -> list[dict]:
        """The eval reports (``<task>.md`` + ``<task>.png`` written by ``align eval``) in ``eval_dir``."""
        if not self.eval_dir or not self.eval_dir.is_dir():
            return []
        out = []
        for md in sorted(self.eval_dir.glob("*.md")):
            png = md.with_suffix(".png")
            out.append({"task": md.stem, "text": md.read_text(encoding="utf-8", errors="replace")[:20000],
                        "png": png.name if png.is_file() else None})
        return out


# -------------------------------------------------------------------------------------------- rendering
def highlight(caption: str, spans, whole: bool = True) -> Markup:
    """``caption`` HTML-escaped with every occurrence of the matched span(s) wrapped in ``<mark>`` (``whole``:
    only where the span stands as whole words, as the lexical matcher found it)."""
    forms = sorted({s.strip() for s in (spans if isinstance(spans, (list, tuple)) else [spans]) if s and s.strip()},
                   key=len, reverse=True)
    if not forms:
        return escape(caption)
    b, e = (r"(?<!\w)", r"(?!\w)") if whole else ("", "")
    pat = re.compile("|".join(b + re.escape(f) + e for f in forms), re.IGNORECASE)
    out, last = [], 0
    for m in pat.finditer(caption):
        out += [escape(caption[last:m.start()]), Markup("<mark>"), escape(m.group(0)), Markup("</mark>")]
        last = m.end()
    out.append(escape(caption[last:]))
    return Markup("").join(out)


def heat_colors(t):
    """``t`` in [0, 1] (any shape) → RGB floats on a dark-purple → red → yellow ramp (``[..., 3]``)."""
    import numpy as np

    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
    x = np.clip(t, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def head_tail_svg(matched: list[int], alive: list[int], w: int = 640, h: int = 200) -> Markup:
    """Concept rank → sample count (log y) as an inline SVG: matched (blue) and alive now (orange)."""
    if not matched:
        return Markup("")
    top = math.log10(max(max(matched), 1) + 1)
    n = len(matched)

    def pts(vals):
        step = max(1, n // 400)  # at most ~400 points whatever the number of concepts
        idx = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
        return " ".join(f"{40 + (w - 50) * (i / max(1, n - 1)):.1f},"
                        f"{h - 20 - (h - 30) * math.log10(vals[i] + 1) / top:.1f}" for i in idx)

    return Markup(
        f'<svg class="curve" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="concept head/tail curve"><line x1="40" y1="{h - 20}" x2="{w - 10}" y2="{h - 20}" stroke="#999"/>'
        f'<line x1="40" y1="10" x2="40" y2="{h - 20}" stroke="#999"/>'
        f'<text x="2" y="16" font-size="11">{max(matched):,}</text><text x="2" y="{h - 22}" font-size="11">1</text>'
        f'<text x="{w // 2 - 60}" y="{h - 4}" font-size="11">concept rank (1 … {n:,})</text>'
        f'<polyline fill="none" stroke="#3366cc" stroke-width="2" points="{pts(matched)}"/>'
        f'<polyline fill="none" stroke="#e67300" stroke-width="2" points="{pts(alive)}"/></svg>')


def quote_id(value: str) -> str:
    return quote(str(value), safe="")


# -------------------------------------------------------------------------------------------------- app
def create_app(build: str | Path, model: str | Path | None = None, eval_dir: str | Path | None = None,
               index_in_background: bool = False, summary: bool = True):
    """The FastAPI app over ``build`` (a build folder or its catalog.duckdb); with ``model`` (an exported
    AlignedModel folder) also text → image search, image → text on sample pages, and the model's eval reports
    (``eval_dir``: where ``align eval --out`` wrote them). ``summary``: load (or build and cache) the summary tables
    — now, or in a thread with ``index_in_background`` — instead of answering every page from the catalog."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from fastapi.templating import Jinja2Templates
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ex = Explorer(build)
    if summary:  # the precomputed tables (cached outside the build); without them every page scans the catalog
        ex.use_summary(background=index_in_background)
    mi = ModelIndex(ex, model, eval_dir) if model else None
    if mi is not None and index_in_background:
        mi.start_background()
    templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
    templates.env.filters["q"] = quote_id
    templates.env.filters["num"] = lambda v: "" if v is None else f"{v:,}"
    templates.env.globals["highlight"] = highlight
    templates.env.globals["pct"] = lambda n, total: f"{100 * n / total:.1f}%" if total else ""
    templates.env.globals["has_model"] = mi is not None
    app = FastAPI(title="tether explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex
    app.state.model_index = mi
    build_name = ex.build_dir.resolve().name

    def page(request: Request, name: str, status: int = 200, **ctx):
        return templates.TemplateResponse(request, name, {"build": build_name, **ctx}, status_code=status)

    def error(request: Request, status: int, title: str, message: str):
        return page(request, "error.html", status, title=title, message=message)

    @app.exception_handler(NotFound)
    async def _nf(request: Request, exc: NotFound):
        return error(request, 404, "Not found", str(exc))

    @app.exception_handler(BadRequest)
    async def _br(request: Request, exc: BadRequest):
        return error(request, 400, "Bad request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _val(request: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'query'}: {e.get('msg', '')}"
                         for e in exc.errors())
        return error(request, 400, "Bad request", msgs or "malformed request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(request, exc.status_code, "Not found" if exc.status_code == 404 else "Error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return error(request, 500, "Server error", f"{type(exc).__name__}: {first}")

    def check_page(p: int, name: str = "page") -> int:
        if p < 1 or p > MAX_PAGE:
            raise BadRequest(f"{name} must be between 1 and {MAX_PAGE:,}, got {p}")
        return p

    def pager(request: Request, cur: int, total: int, per: int, name: str = "page") -> dict:
        last = max(1, math.ceil(total / per))

        def url(p: int) -> str:
            qs = dict(request.query_params)
            qs[name] = str(p)
            return f"{request.url.path}?{urlencode(qs)}"

        return {"page": cur, "last": last, "total": total, "prev": url(cur - 1) if cur > 1 else None,
                "next": url(cur + 1) if cur < last else None, "first": url(1), "last_url": url(last)}

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request):
        sm = ex.summary
        note = None
        if sm is not None and sm.error:
            note = f"summary tables could not be built ({sm.error}): every page queries the catalog itself"
        elif sm is not None and not sm.ready:
            note = (f"summary tables are being built ({sm.step or 'starting'}): until then pages query the catalog "
                    "itself, slower on large builds")
        return page(request, "overview.html", ov=ex.overview(), title="Overview", summary_note=note)

    @app.get("/concepts", response_class=HTMLResponse)
    def concepts_page(request: Request, q: str = "", page: int = 1):
        check_page(page)
        if len(q) > MAX_QUERY_CHARS:
            raise BadRequest(f"query too long ({len(q)} > {MAX_QUERY_CHARS} characters)")
        rows = ex.concept_table()
        ql = q.strip().lower()
        if ql:
            rows = [c for c in rows if ql in c["id"].lower() or ql in c["name"].lower() or ql in c["gloss"].lower()]
        return templates.TemplateResponse(request, "concepts.html", {
            "build": build_name, "title": "Concepts", "q": q, "rows": rows[(page - 1) * PAGE_SIZE:page * PAGE_SIZE],
            "pager": pager(request, page, len(rows), PAGE_SIZE)})

    @app.get("/concept/{cid:path}", response_class=HTMLResponse)
    def concept_page(request: Request, cid: str, page: int = 1, dpage: int = 1, apage: int = 1):
        check_page(page)
        check_page(dpage, "dpage")
        check_page(apage, "apage")
        c = ex.concept(cid, page, dpage)
        c["n_scored"], c["scored"] = ex.concept_agreement(cid, apage)
        return templates.TemplateResponse(request, "concept.html", {
            "build": build_name, "title": f"Concept {cid}", "c": c,
            "pager": pager(request, page, c["n_kept"], GRID_SIZE),
            "dpager": pager(request, dpage, c["n_dropped"], GRID_SIZE, "dpage"),
            "apager": pager(request, apage, c["n_scored"], GRID_SIZE, "apage")})

    @app.get("/sample/{uid:path}", response_class=HTMLResponse)
    def sample_page(request: Request, uid: str):
        s = ex.sample(uid)
        near = None
        if mi is not None:
            hits = mi.image_to_text(uid, 10)
            if hits is not None:
                caps = {u: c for u, c in ex_captions([u for u, _ in hits])}
                near = [(u, sc, caps.get(u, "")) for u, sc in hits]
        return page(request, "sample.html", s=s, uid=uid, near=near, title=f"Sample {uid}",
                    patch_maps=mi is not None and mi.patch_similarity is not None)

    ex_captions = ex.captions

    def need_model():
        if mi is None:
            raise NotFound("this explorer runs without a model: start it with `curate serve BUILD --model MODEL_DIR`")
        return mi

    @app.get("/images", response_class=HTMLResponse)
    def images_page(request: Request, q: str = "", page: int = 1):
        m = need_model()
        check_page(page)
        q = q.strip()
        if len(q) > MAX_QUERY_CHARS:
            raise BadRequest(f"query too long ({len(q)} > {MAX_QUERY_CHARS} characters)")
        if "\x00" in q:
            raise BadRequest("query contains a NUL character")
        hits, n = [], 0
        if q and not m.ready and m._thread is not None:  # the background index is still being built
            if m.error:
                raise RuntimeError(f"building the image index failed: {m.error}")
            done, total = m.progress
            return templates.TemplateResponse(request, "images.html", {
                "build": build_name, "title": "Text → image", "q": q, "hits": [], "indexed": None,
                "building": (done, total), "pager": pager(request, 1, 0, GRID_SIZE)})
        if q:
            top = m.text_to_image(q, IMAGE_HITS)
            n = len(top)
            top = top[(page - 1) * GRID_SIZE:page * GRID_SIZE]
            caps = dict(ex_captions([u for u, _, _ in top]))
            hits = [{"uid": u, "score": sc, "shared": k, "caption": caps.get(u) or ""} for u, sc, k in top]
        return templates.TemplateResponse(request, "images.html", {
                "build": build_name, "title": "Text → image", "q": q, "hits": hits, "building": None,
            "indexed": len(m.index()[2]) if q else None, "pager": pager(request, page, n, GRID_SIZE)})

    @app.get("/model", response_class=HTMLResponse)
    def model_page(request: Request, uid: str = "", q: str = ""):
        m = need_model()
        uid, q = uid.strip(), q.strip()
        for name, v in (("q", q), ("uid", uid)):
            if len(v) > MAX_QUERY_CHARS:
                raise BadRequest(f"{name} too long ({len(v)} > {MAX_QUERY_CHARS} characters)")
            if "\x00" in v:
                raise BadRequest(f"{name} contains a NUL character")
        pmap = None
        if m.patch_similarity is not None and uid and q:
            sims, _ = m.patch_map(uid, q)
            pmap = {"grid": sims.shape, "min": float(sims.min()), "max": float(sims.max()),
                    "png": "/model/patchmap.png?" + urlencode({"uid": uid, "q": q})}
        return page(request, "model.html", title="Model", m=m, config=m.model.config, reports=m.reports(),
                    uid=uid, q=q, pmap=pmap)

    @app.get("/model/patchmap.png")
    def patch_map_png(uid: str, q: str):
        m = need_model()
        if not q.strip() or len(q) > MAX_QUERY_CHARS or "\x00" in q or len(uid) > MAX_QUERY_CHARS:
            raise BadRequest("q must be a text of 1 to 300 characters (and uid at most 300)")
        return Response(m.patch_map_png(uid.strip(), q.strip()), media_type="image/png",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/model/report/{name}")
    def model_report(name: str):
        m = need_model()
        ok = {r["png"] for r in m.reports() if r["png"]}
        if name not in ok:
            raise NotFound(f"no eval report image {name!r}")
        return Response((m.eval_dir / name).read_bytes(), media_type="image/png",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/search", response_class=HTMLResponse)
    def search_page(request: Request, q: str = "", concept: str = "", status: str = "any", source: str = "",
                    page: int = 1):
        check_page(page)
        if len(q) > MAX_QUERY_CHARS:
            raise BadRequest(f"query too long ({len(q)} > {MAX_QUERY_CHARS} characters)")
        if "\x00" in q:
            raise BadRequest("query contains a NUL character")
        if status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if source and source not in ex.sources():
            raise BadRequest(f"unknown source {source!r} (sources: {', '.join(ex.sources()[:20])})")
        res = ex.search(q, concept.strip(), status, source, page)
        return templates.TemplateResponse(request, "search.html", {
            "build": build_name, "title": "Search", "q": q, "concept": concept, "status": status, "source": source,
            "statuses": STATUSES, "sources": ex.sources(), "res": res,
            "concept_name": (ex.concept_index().get(concept.strip()) or {}).get("name") if concept.strip() else None,
            "pager": pager(request, page, min(res["n"], COUNT_CAP), PAGE_SIZE)})

    @app.get("/thumb/{uid:path}")
    def thumb(request: Request, uid: str, size: int = 256):
        if not 32 <= size <= 1024:
            raise BadRequest(f"size must be between 32 and 1024 pixels, got {size}")
        etag = '"' + hashlib.sha1(f"{ex.etag_seed}:{uid}:{size}".encode()).hexdigest()[:20] + '"'
        headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = ex.thumbnail(uid, size)
        if data is None:
            raise NotFound(f"sample {uid!r} has no stored image that can be decoded")
        return Response(data, media_type="image/jpeg", headers=headers)

    return app


# -------------------------------------------------------------------------------------------------- CLI
def cmd_serve(args) -> int:
    import socket

    import uvicorn

    from tether.clikit import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1..65535, got {args.port}")
    p = Path(args.build)
    if not (p / "catalog.duckdb" if p.is_dir() else p).is_file():
        raise UserError(f"{args.build}: no build catalog here (run `curate build RECIPE` first)")
    if args.model and not Path(args.model).is_dir():
        raise UserError(f"--model: {args.model}: no such folder (an exported aligned model: config.json + "
                        "model.safetensors)")
    if args.eval and not Path(args.eval).is_dir():
        raise UserError(f"--eval: {args.eval}: no such folder")
    try:
        app = create_app(args.build, model=args.model, eval_dir=args.eval, index_in_background=True)
    except duckdb.Error as e:
        raise UserError(f"{args.build}: cannot open the catalog read-only ({str(e).splitlines()[0]}); is a build "
                        "still writing it?") from None
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); try another --port") \
                from None
    print(f"tether explorer on http://{args.host}:{args.port}/ (read-only over {Path(args.build).resolve()}); "
          "Ctrl-C stops it", flush=True)
    sm = app.state.explorer.summary
    if sm is not None and not sm.ready:
        print(f"summary tables: building them once in the background into {sm.path} (large builds: minutes); pages "
              "answer from the catalog meanwhile", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("TETHER_SERVE_LOG", "warning"))
    return 0


def register(sub) -> None:
    """Plugin hook of :mod:`curate.cli`: the ``serve`` subcommand."""
    s = sub.add_parser("serve", help="a read-only local web explorer over a build (concepts, samples, search)")
    s.add_argument("build", help="build folder or catalog.duckdb")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8731)
    s.add_argument("--model", help="an exported aligned model folder: adds text → image search (embeddings cached "
                                    "in $TETHER_CACHE/serve, default ~/.cache/tether/serve) and image → text")
    s.add_argument("--eval", help="folder of that model's eval reports (`align eval --out`), shown on /model")
    s.set_defaults(func=cmd_serve)
