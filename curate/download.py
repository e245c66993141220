"""Download stage: img2dataset fetches URL rows; local rows are checked in place. Every row's outcome → catalog.

URL rows (``url`` set, ``path`` empty) are written to an input parquet and handed to ``img2dataset.download``
(the real library, called from Python) with the recipe's settings; its per-shard status parquet and
``*_stats.json`` files stay in the build folder. Its workers fetch through :mod:`curate.fetch` (http(s) only, every
redirect checked, private hosts refused unless ``allow_private_hosts``, body / deadline / pixel caps) and die
with their parent (:mod:`curate.i2d`). Local rows (``path`` set) are decoded and hashed here, with the
same bookkeeping. Every row ends up in

  downloads(uid, attempt, status, error, sha256, width, height, original_width, original_height,
            format, store, shard, key)
  decisions(uid, stage='download', kept, reason)

``status`` is img2dataset's own vocabulary (``success`` / ``failed_to_download`` / ``failed_to_resize``) plus
``failed_to_decode`` / ``missing_file`` for local rows and ``no_source`` for rows with neither url nor path.
``format``/``store``/``shard``/``key`` say where the image bytes are: an img2dataset output folder in
``webdataset`` or ``files`` layout, or ``local`` (``key`` = the file path). :class:`curate.imagestore.ImageStore`
reads them back.

Resume: img2dataset runs in ``incremental`` mode (a shard whose ``_stats.json`` exists is done), and each
finished img2dataset shard is loaded into the catalog in one transaction together with its
``progress('download', unit)`` row, so a killed download loses and duplicates nothing.
``retry_failed`` re-downloads only failed URL rows into a new attempt folder and replaces their outcomes.
Rows sharing a URL (several captions of one image) download it once and all receive its outcome.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from curate.catalog import Catalog, arrow_views
from curate.judge import Verdicts, record
from curate.plan import Context, Done, Step, run_one
from curate.stages import Begin, Stage
from tether.recipe import RecipeError, Strict

STAGE = Stage.DOWNLOAD
RETRY_STAGE = Stage.DOWNLOAD_RETRY
SUCCESS = "success"


class DownloadConfig(Strict):
    """``media.download``: img2dataset settings (names and meanings follow ``img2dataset.download``)."""

    enabled: bool = True  # false: run_media skips this stage (keeps what an earlier run downloaded)
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    skip_reencode: bool = False
    output_format: Literal["webdataset", "files"] = "webdataset"
    processes_count: int = Field(1, ge=1)
    thread_count: int = Field(32, ge=1)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    min_image_size: int = Field(0, ge=0)
    max_image_area: Optional[float] = Field(None, gt=0)
    max_aspect_ratio: Optional[float] = Field(None, gt=0)
    number_sample_per_shard: int = Field(10000, ge=1)
    # multiprocessing (default, one machine); pyspark / ray: start your Spark session / Ray cluster first,
    # img2dataset then distributes shards over it (see docs/media.md).
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    subjob_size: int = Field(1000, ge=1)
    max_shard_retry: int = Field(1, ge=0)
    user_agent_token: Optional[str] = None
    disallowed_header_directives: Optional[list[str]] = None
    # hostile-web limits, enforced in img2dataset's workers for every URL and redirect (curate/fetch.py)
    deadline: float = Field(60.0, gt=0)  # seconds for one whole download (timeout is per socket operation)
    max_bytes: int = Field(32 << 20, gt=0)  # response body cap
    max_pixels: int = Field(100_000_000, gt=0)  # image header checked before decoding
    allow_private_hosts: bool = False  # true: allow loopback / private / link-local hosts (local testing only)
    # local rows: worker threads for the decode check
    local_threads: int = Field(2, ge=1)
    local_chunk: int = Field(2000, ge=1)


# --------------------------------------------------------------------------------------------------------
# selection → media_rows
# --------------------------------------------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    """A cheap identity for an input file (size + mtime + first MiB), used in stage params."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def selection_step() -> Step:
    """The ``media_rows`` step: (re)load the selection parquet (``ctx.selection``) into ``media_rows``; its key is
    the file's digest, so the same file loads once."""

    def inputs(ctx: Context) -> dict:
        if ctx.selection is None or not Path(ctx.selection).exists():
            raise RecipeError(f"media: selection parquet not found: {ctx.selection}")
        return {"digest": file_digest(ctx.selection)}

    return Step(Stage.MEDIA_ROWS, "output.selection", {}, lambda ctx, how: _load_rows(ctx.cat, ctx.selection),
                inputs=inputs, counts="selected rows loaded")


def load_selection(cat: Catalog, selection_path: str | Path) -> int:
    """(Re)load the selection parquet into ``media_rows`` (columns uid, url, path, caption, concept_ids, source).

    Missing optional columns become NULL; a missing ``uid`` column or duplicate uids are a RecipeError.
    Returns the row count. Skipped when the same file (by digest) is already loaded.
    """
    run_one(Context(cat, Path("."), selection=Path(selection_path)), selection_step())
    return int(cat.scalar("SELECT count(*) FROM media_rows"))


def _load_rows(cat: Catalog, selection_path: Path) -> int:
    cols = set(pq.read_schema(selection_path).names)
    if "uid" not in cols:
        raise RecipeError(f"{selection_path}: selection parquet has no 'uid' column")

    def col(name: str, sql_type: str) -> str:
        return f"CAST({name} AS {sql_type})" if name in cols else f"CAST(NULL AS {sql_type})"

    with cat.transaction() as con:
        con.execute(
            f"""INSERT INTO media_rows SELECT CAST(uid AS VARCHAR), row_number() OVER () - 1,
                nullif(trim({col('url', 'VARCHAR')}), ''), nullif(trim({col('path', 'VARCHAR')}), ''),
                {col('caption', 'VARCHAR')}, {col('concept_ids', 'VARCHAR[]')}, {col('source', 'VARCHAR')}
                FROM read_parquet(?)""",
            [str(selection_path)],
        )
        dup = con.execute("SELECT uid FROM media_rows GROUP BY uid HAVING count(*) > 1 LIMIT 1").fetchone()
        if dup:
            raise RecipeError(f"{selection_path}: duplicate uid {dup[0]!r} in the selection")
        return int(con.execute("SELECT count(*) FROM media_rows").fetchone()[0])


# --------------------------------------------------------------------------------------------------------
# local rows
# --------------------------------------------------------------------------------------------------------
def check_local_image(path: str) -> tuple[str, Optional[str], Optional[str], Optional[int], Optional[int]]:
    """Decode-check one local file: ``(status, error, sha256, width, height)``.

    JPEGs are decoded in draft mode (DCT scaling: every entropy-coded byte is still parsed, so truncation and
    corruption are caught, ~10× faster than a full decode).
    """
    from PIL import Image

    from curate.reasons import stable_reason
    from curate.imagestore import read_local_file

    data, why = read_local_file(path)  # a regular file of ≤ 64 MB only: /dev/zero or a FIFO is never read
    if data is None:
        return "missing_file", why, None, None, None
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error is a per-row reason
        return "failed_to_decode", stable_reason(f"{type(e).__name__}: {e}"), sha, None, None
    return SUCCESS, None, sha, w, h


class Outcome(NamedTuple):
    """One ``downloads`` row: what happened to a media row's image and where its bytes are."""

    uid: str
    attempt: int
    status: str
    error: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    format: str = "none"  # webdataset | files | local | none
    store: str = ""
    shard: str = ""
    key: str = ""


_DL_COLS = Outcome._fields
_DL_TYPES = (pa.string(), pa.int32(), pa.string(), pa.string(), pa.string(), pa.int32(), pa.int32(), pa.int32(),
             pa.int32(), pa.string(), pa.string(), pa.string(), pa.string())


def _record(con, rows: list[Outcome]) -> None:
    """Insert ``downloads`` rows and their ``decisions(stage='download')``, replacing earlier ones (one Arrow
    batch per call: row-by-row inserts cost DuckDB ~1 ms each)."""
    if not rows:
        return
    from curate.reasons import stable_reason

    rows = [r._replace(error=stable_reason(r.error)) for r in rows]  # no object addresses in reasons
    cols = list(zip(*rows))
    tbl = pa.table({c: pa.array(list(v), t) for c, v, t in zip(_DL_COLS, cols, _DL_TYPES)})
    with arrow_views(con, _rec=tbl):  # (a plain connection: the caller holds the transaction)
        con.execute("DELETE FROM downloads WHERE uid IN (SELECT uid FROM _rec)")
        con.execute("DELETE FROM decisions WHERE stage = $stage AND uid IN (SELECT uid FROM _rec)", {"stage": STAGE})
        con.execute(f"INSERT INTO downloads SELECT {', '.join(_DL_COLS)} FROM _rec")
        record(con, STAGE, Verdicts("""SELECT uid, status = $ok AS ok,
                   CASE WHEN status = $ok THEN status ELSE status || ': ' || coalesce(error, '') END AS reason
            FROM _rec""", kept="ok"), {"ok": SUCCESS})


def _local_rows(cat: Catalog, cfg: DownloadConfig, progress: bool) -> None:
    """Check every local row in chunks of ``cfg.local_chunk`` (one transaction + progress unit per chunk)."""
    from tether.progress import progress as tqdm

    rows = cat.execute("SELECT uid, path FROM media_rows WHERE path IS NOT NULL ORDER BY pos").fetchall()
    done = cat.done_units(STAGE)
    chunks = [(f"local/{i // cfg.local_chunk:06d}", rows[i:i + cfg.local_chunk])
              for i in range(0, len(rows), cfg.local_chunk)]
    todo = [c for c in chunks if c[0] not in done]
    bar = tqdm(total=sum(len(c[1]) for c in todo), desc="check local images", unit="img", disable=not progress)
    checked: dict[str, tuple] = {}  # several captions of one file: the file is checked once
    with ThreadPoolExecutor(cfg.local_threads) as pool:
        for unit, chunk in todo:
            paths = [str(Path(p).resolve()) for _, p in chunk]
            new = [p for p in dict.fromkeys(paths) if p not in checked]
            checked.update(zip(new, pool.map(check_local_image, new)))
            recs = []
            for (uid, _), p in zip(chunk, paths):
                status, error, sha, w, h = checked[p]
                recs.append(Outcome(uid, 0, status, error, sha, w, h, w, h, "local", "", "", p))
            with cat.transaction() as con:
                _record(con, recs)
                con.execute("INSERT INTO progress VALUES (?, ?)", [STAGE, unit])
            bar.update(len(chunk))
    bar.close()


# --------------------------------------------------------------------------------------------------------
# img2dataset
# --------------------------------------------------------------------------------------------------------
def img2dataset_kwargs(cfg: DownloadConfig) -> dict:
    """The recipe's settings as ``img2dataset.download`` keyword arguments (input/output set by the caller)."""
    kw = dict(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, skip_reencode=cfg.skip_reencode,
        output_format=cfg.output_format, processes_count=cfg.processes_count, thread_count=cfg.thread_count,
        timeout=cfg.timeout, retries=cfg.retries, min_image_size=cfg.min_image_size,
        number_sample_per_shard=cfg.number_sample_per_shard, distributor=cfg.distributor,
        subjob_size=cfg.subjob_size, max_shard_retry=cfg.max_shard_retry, user_agent_token=cfg.user_agent_token,
        compute_hash="sha256", enable_wandb=False, extract_exif=False, incremental_mode="incremental",
        input_format="parquet", url_col="url", caption_col="caption", save_additional_columns=["uid"],
    )
    if cfg.max_image_area is not None:
        kw["max_image_area"] = cfg.max_image_area
    if cfg.max_aspect_ratio is not None:
        kw["max_aspect_ratio"] = cfg.max_aspect_ratio
    if cfg.disallowed_header_directives is not None:
        kw["disallowed_header_directives"] = cfg.disallowed_header_directives
    return kw


def fetch_policy(cfg: DownloadConfig):
    """The per-download limits of ``cfg`` (:class:`curate.fetch.FetchPolicy`)."""
    from curate.fetch import FetchPolicy

    return FetchPolicy(timeout=cfg.timeout, deadline=cfg.deadline, max_bytes=cfg.max_bytes,
                       max_pixels=cfg.max_pixels, allow_private_hosts=cfg.allow_private_hosts)


def run_img2dataset(url_list: Path, out_dir: Path, cfg: DownloadConfig, cluster=None) -> None:
    """Call ``img2dataset.download`` (resumes by itself: shards with a ``_stats.json`` are skipped) with tether's
    download rules in every worker (:func:`curate.i2d.guarded`).

    ``distributor: ray``: img2dataset's own Ray distributor (one Ray task per shard) on the Ray cluster of
    ``cluster`` (the build's :class:`tether.distribute.DistributorConfig`: the same cluster as the matching and
    embedding stages; default: one already initialised in this process, else a local instance with every CPU),
    joined before and left after the download."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset  # imported late: it pulls albumentations/cv2

    from curate.i2d import guarded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if cfg.distributor == "ray":
            from tether.distribute import DistributorConfig, ray_cluster

            stack.enter_context(ray_cluster(cluster if cluster is not None and cluster.kind == "ray"
                                            else DistributorConfig(kind="ray")))
        with guarded(fetch_policy(cfg)):
            img2dataset.download(url_list=str(url_list), output_folder=str(out_dir), **img2dataset_kwargs(cfg))


def _attempt_dir(build_dir: Path, attempt: int) -> Path:
    return Path(build_dir) / "media" / "download" / f"attempt-{attempt:03d}"


def _write_url_lists(adir: Path, rows: list[tuple]) -> None:
    """``rows.parquet`` (every row of this attempt) and ``input.parquet`` (img2dataset's input: one row per
    distinct URL, the first in order). Written atomically once and kept on resume (shard ids must not move)."""
    adir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    distinct = [r for r in rows if not (r[1] in seen or seen.add(r[1]))]
    for name, part in (("rows.parquet", rows), ("input.parquet", distinct)):
        path = adir / name
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.table({"uid": [r[0] for r in part], "url": [r[1] for r in part],
                                 "caption": [r[2] or "" for r in part]}), tmp)
        os.replace(tmp, path)


def _read_rows(path: Path) -> list[tuple]:
    return [(r["uid"], r["url"], r["caption"]) for r in pq.read_table(path).to_pylist()]


def load_outcomes(cat: Catalog, out_dir: Path, attempt: int, fmt: str, members: dict[str, list[str]] | None = None,
                  progress: bool = True) -> int:
    """Load every finished img2dataset shard (``NNNNN_stats.json`` present) not loaded yet into the catalog.

    ``members`` maps a URL to every uid that asked for it: each gets the outcome of the one download.
    """
    from tether.progress import progress as tqdm

    done = cat.done_units(STAGE)
    stats = sorted(out_dir.glob("*_stats.json"))
    n = 0
    for sj in tqdm(stats, desc="load download outcomes", unit="shard", disable=not progress):
        shard = sj.name[: -len("_stats.json")]
        unit = f"a{attempt:03d}/{shard}"
        if unit in done:
            continue
        recs = [Outcome(uid, attempt, r["status"], r.get("error_message"), r.get("sha256"), r.get("width"),
                        r.get("height"), r.get("original_width"), r.get("original_height"), fmt, str(out_dir), shard,
                        r["key"])
                for r in pq.read_table(out_dir / f"{shard}.parquet").to_pylist()
                for uid in ((members or {}).get(r["url"]) or [r["uid"]])]
        with cat.transaction() as con:
            _record(con, recs)
            con.execute("INSERT INTO progress VALUES (?, ?)", [STAGE, unit])
        n += len(recs)
    return n


def _download_urls(cat: Catalog, cfg: DownloadConfig, rows: list[tuple], build_dir: Path, attempt: int,
                   progress: bool, cluster=None) -> None:
    """Download the distinct URLs of ``rows`` (uid, url, caption) with img2dataset and record every row."""
    if not rows:
        return
    adir = _attempt_dir(build_dir, attempt)
    _write_url_lists(adir, rows)
    rows = _read_rows(adir / "rows.parquet")
    members: dict[str, list[str]] = {}
    for uid, url, _ in rows:
        members.setdefault(url, []).append(uid)
    out = adir / "out"
    expected = -(-len(members) // cfg.number_sample_per_shard)
    if len(list(out.glob("*_stats.json"))) < expected:
        run_img2dataset(adir / "input.parquet", out, cfg, cluster)
    load_outcomes(cat, out, attempt, cfg.output_format, members, progress)
    loaded = cat.scalar("SELECT count(*) FROM downloads WHERE attempt = ? AND format IN ('webdataset', 'files')",
                        [attempt])
    missing = len(rows) - int(loaded or 0)
    if missing > 0:
        # img2dataset gave up on whole shards (max_shard_retry exhausted): rerunning the stage resumes them.
        raise RuntimeError(f"img2dataset left {missing} of {len(rows)} rows without an outcome in {out}; "
                           "rerun to resume the unfinished shards")


def _params(cfg: DownloadConfig) -> dict:
    d = cfg.model_dump()
    for k in ("processes_count", "thread_count", "distributor", "subjob_size", "local_threads"):
        d.pop(k)  # how to run, not what comes out
    return d


def _selection_key(ctx: Context) -> dict:
    row = ctx.cat.stage_row(Stage.MEDIA_ROWS)
    if row is None or row.status != "done":
        raise RecipeError("download: no selection loaded (call load_selection first)")
    return {"selection": row.params}


def download_step(cfg: DownloadConfig) -> Step:
    """The ``download`` step: every ``media_rows`` row downloaded / checked once; resumable. New or changed
    settings (or another selection) start over, their folder too; a rerun with the same ones resumes."""

    def run(ctx: Context, how: Begin) -> Done:
        cat, build_dir = ctx.cat, Path(ctx.build_dir)
        if how is Begin.FRESH:
            _clear_dir(build_dir / "media" / "download", build_dir)
        with cat.transaction() as con:
            none = con.execute("""SELECT uid FROM media_rows WHERE url IS NULL AND path IS NULL
                                  AND uid NOT IN (SELECT uid FROM downloads)""").fetchall()
            _record(con, [Outcome(u, 0, "no_source", "row has neither url nor path") for (u,) in none])
        _local_rows(cat, cfg, ctx.progress)
        urls = cat.execute("SELECT uid, url, caption FROM media_rows WHERE path IS NULL AND url IS NOT NULL "
                           "ORDER BY pos").fetchall()
        _download_urls(cat, cfg, urls, build_dir, 0, ctx.progress, ctx.distributor)
        return Done(int(cat.scalar("SELECT count(*) FROM downloads")), download_summary(download_counts(cat)))

    return Step(STAGE, "media.download", _params(cfg), run, resumable=True, inputs=_selection_key,
                enabled=cfg.enabled)


def run_download(cat: Catalog, cfg: DownloadConfig, build_dir: str | Path, progress: bool = True,
                 cluster=None) -> dict:
    """Download / check every ``media_rows`` row once; returns counts per status. Resumable (see module doc).
    ``cluster``: the build's distributor, whose Ray cluster a ``distributor: ray`` download uses
    (:func:`run_img2dataset`)."""
    step = download_step(cfg.model_copy(update={"enabled": True}))
    run_one(Context(cat, Path(build_dir), progress=progress, distributor=cluster), step)
    return download_counts(cat)


def retry_step(cfg: DownloadConfig) -> Step:
    """The ``download_retry`` step (only in ``curate retry-failed``'s plan): re-download the failed URL rows into
    a new attempt folder. A killed retry keeps its attempt number (its key) and its input list."""

    def attempt(ctx: Context) -> dict:
        row = ctx.cat.stage_row(RETRY_STAGE)
        if row and row.status == "running":  # a killed retry keeps its attempt number
            return {"attempt": row.params_dict()["attempt"]}
        return {"attempt": int(ctx.cat.scalar("SELECT coalesce(max(attempt), 0) FROM downloads")) + 1}

    def run(ctx: Context, how: Begin) -> Done:
        cat, build_dir = ctx.cat, Path(ctx.build_dir)
        n = cat.stage_row(RETRY_STAGE).params_dict()["attempt"]
        listed = _attempt_dir(build_dir, n) / "rows.parquet"
        if listed.exists():
            rows = _read_rows(listed)
        else:
            rows = cat.execute(
                """SELECT m.uid, m.url, m.caption FROM media_rows m JOIN downloads d USING (uid)
                   WHERE d.status <> ? AND m.url IS NOT NULL AND m.path IS NULL ORDER BY m.pos""",
                [SUCCESS]).fetchall()
        _download_urls(cat, cfg, rows, build_dir, n, ctx.progress, ctx.distributor)
        return Done(len(rows), f"{len(rows):,} failed rows retried; {download_summary(download_counts(cat))}")

    return Step(RETRY_STAGE, "media.download", {}, run, resumable=True, inputs=attempt)


def retry_failed(cat: Catalog, cfg: DownloadConfig, build_dir: str | Path, progress: bool = True,
                 cluster=None) -> int:
    """Re-download only the failed URL rows (a new attempt folder); returns how many were retried.

    Resumable: a killed retry keeps its attempt number (``stages('download_retry')``) and its input list.
    """
    _, res = run_one(Context(cat, Path(build_dir), progress=progress, distributor=cluster), retry_step(cfg))
    return res.rows if res is not None else 0


def download_summary(counts: dict) -> str:
    """``3 images stored, 57 failed (failed_to_download 57)`` from :func:`download_counts`."""
    failed = {k: v for k, v in counts.items() if k != SUCCESS}
    s = f"{counts.get(SUCCESS, 0):,} images stored, {sum(failed.values()):,} failed"
    return s + (" (" + ", ".join(f"{k} {v:,}" for k, v in failed.items()) + ")" if failed else "")


def download_counts(cat: Catalog) -> dict[str, int]:
    return dict(cat.execute("SELECT status, count(*) FROM downloads GROUP BY 1 ORDER BY 1").fetchall())


def _clear_dir(d: Path, build_dir: Path) -> None:
    """Delete ``d`` (inside the marked build folder only: :func:`tether.fileio.remove_path`)."""
    from tether.fileio import remove_path

    remove_path(d, build_dir)
