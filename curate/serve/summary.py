"""Precomputed summary tables of a build, cached outside it, behind the same reads as the catalog
(:class:`Summary`)."""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from typing import Iterator

import duckdb

from curate import report
from curate.serve.common import MAX_TOKEN, SUMMARY_VERSION, TOKEN_SQL, cache_root


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

    def __init__(self, explorer):
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
            meta = {"version": SUMMARY_VERSION, "hash_probe": probe, **report.overview_counts(con, self.ex.has("stages"), self.ex.has_lang)}
            self.step = "concepts"
            con.execute(f"""CREATE TABLE sx.ctable AS
                            SELECT (row_number() OVER (ORDER BY matched DESC, id) - 1)::INTEGER AS cix, *
                            FROM ({report.concept_sql(self.ex.has("balance_report"))}) ORDER BY cix""")
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
