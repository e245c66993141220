"""Shard stage: the surviving samples → webdataset tars + ``sizes.json`` + parquet index + HF dataset card.

Each sample is three tar members sharing a key (digits only, no dots): ``{key}.jpg`` (the stored image
bytes, unchanged when they already are a JPEG, else converted once), ``{key}.txt`` (the caption) and
``{key}.json`` with EXACTLY these non-null fields in every sample (Hugging Face ``datasets`` infers features
from the first samples; a null or missing field breaks it)::

    uid, caption, concept_ids (list of str), source, url ("" for local rows), sha256, width, height

Order and resharding: samples are ordered by ``sha1(f"{seed}:{uid}")``, a seeded shuffle that does not
depend on catalog order (if the first sample has an empty ``concept_ids`` list, the first one with concepts
is moved to the front so that schema inference sees a typed list), and cut into shards of
``samples_per_shard`` named ``shard-00000.tar`` …; the same survivors + seed + shard size give byte-identical
tars (fixed member metadata). Changing the seed or the shard size reshards (the old shards are removed first).

Resume: a shard is written to ``.shard-NNNNN.tar.tmp`` and renamed when complete; its ``shard_index`` rows
and its ``progress('shards', name)`` row are committed in one transaction after the rename, so a killed run
rewrites at most the shard it was on and loses or duplicates nothing. ``sizes.json``, ``index.parquet`` and
``README.md`` are (re)written at the end from the catalog.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import pyarrow as pa
from pydantic import Field

from curate.catalog import Catalog
from curate.download import SUCCESS
from curate.imagestore import ImageStore
from curate.plan import Context, Step, run_one
from curate.stages import Begin, Stage
from tether.fileio import claim_build_dir, claim_output_dir, is_inside, output_path, remove_path
from tether.recipe import Strict

STAGE = Stage.SHARDS


class ShardConfig(Strict):
    """``media.shards``."""

    enabled: bool = True
    out: str = "shards"  # folder inside the build folder (relative to it, or absolute)
    allow_outside_build: bool = False  # true: `out` may lie outside the build folder (a new or empty folder, or
    #                                    one this build marked as its own; see docs/threat_model.md)
    samples_per_shard: int = Field(1000, ge=1)
    seed: int = 0
    jpeg_quality: int = Field(95, ge=1, le=100)  # only for stored images that are not JPEG already
    name: Optional[str] = None  # dataset name in the card (default: the build folder's name)


@dataclass
class ShardResult:
    out_dir: Path
    shards: int
    samples: int
    written: int  # shards written by this call (the rest were done before)
    seconds: float

    @property
    def rows(self) -> int:
        return self.samples

    def summary(self) -> str:
        return f"{self.samples:,} samples in {self.shards:,} shards at {self.out_dir} ({self.written} written now)"


def shard_order(uids: list[str], seed: int) -> list[str]:
    """The seeded, catalog-order-independent sample order."""
    return sorted(uids, key=lambda u: (hashlib.sha1(f"{seed}:{u}".encode()).digest(), u))


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.tar"


def sample_key(pos: int) -> str:
    return f"{pos:010d}"


def as_jpeg(data: bytes, quality: int = 95) -> bytes:
    """``data`` if it is a JPEG already, else the image re-encoded as an RGB JPEG."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def sample_meta(uid: str, caption: Optional[str], concept_ids, source: Optional[str], url: Optional[str],
                sha256: Optional[str], width: Optional[int], height: Optional[int]) -> dict:
    """The per-sample JSON with a fixed, never-null field set."""
    return {"uid": str(uid), "caption": caption or "", "concept_ids": [str(c) for c in (concept_ids or [])],
            "source": source or "", "url": url or "", "sha256": sha256 or "", "width": int(width or 0),
            "height": int(height or 0)}


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's record size: archives are padded to a multiple of it


def _ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file (mode 0644, uid/gid 0, mtime 0): deterministic and cheap."""
    nb = name.encode("utf-8")
    if len(nb) > 100:
        raise ValueError(f"tar member name too long: {name!r}")
    h = bytearray(_BLOCK)
    h[0:len(nb)] = nb
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class ShardWriter:
    """Writes one webdataset tar (plain ustar, fixed member metadata: deterministic bytes) to a temp name;
    :meth:`commit` fsyncs and renames it into place; :meth:`abort` removes the temp file it created (through
    :func:`tether.fileio.remove_path` when ``root``, the marked tether folder it writes in, is given)."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = path
        self.root = root
        self.tmp = path.with_name(f".{path.name}.tmp")
        self._f = open(self.tmp, "wb", buffering=1 << 20)
        self._n = 0
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        pad = -len(data) % _BLOCK
        self._f.write(_ustar_header(name, len(data)))
        self._f.write(data)
        if pad:
            self._f.write(bytes(pad))
        self._n += _BLOCK + len(data) + pad

    def write(self, key: str, image: bytes, caption: str, meta: dict) -> None:
        self._add(f"{key}.jpg", image)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        self.count += 1

    def commit(self) -> None:
        end = self._n + 2 * _BLOCK
        self._f.write(bytes(2 * _BLOCK + (-end % _RECORD)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            if self.root is not None:
                remove_path(self.tmp, self.root)
            else:
                self.tmp.unlink(missing_ok=True)  # the file this object created in __init__


def out_dir_of(cfg: ShardConfig, build_dir: str | Path) -> Path:
    """The shards folder (one-line error when it leaves the build folder without ``allow_outside_build``)."""
    return output_path(build_dir, cfg.out, "media.shards.out", cfg.allow_outside_build)


def _owner_of(out: Path, build_dir: str | Path) -> Path:
    """The marked tether folder that owns the files in ``out``: the build folder, or ``out`` itself outside it."""
    return Path(build_dir) if is_inside(out, build_dir) else out


class Survivor(NamedTuple):
    """An alive media row with a stored image: what its shard sample holds and where its bytes are."""

    uid: str
    caption: str | None
    concept_ids: list[str] | None
    source: str | None
    url: str | None
    sha256: str | None
    width: int | None
    height: int | None
    format: str
    store: str
    shard: str
    key: str


def _survivors(cat: Catalog) -> list[Survivor]:
    """Every alive media row with a stored image (its concepts less the ones the image sense check refuted)."""
    rows = cat.execute(
        """SELECT m.uid, m.caption, m.concept_ids, m.source, m.url, d.sha256, d.width, d.height,
                  d.format, d.store, d.shard, d.key, r.gone
           FROM media_rows m JOIN downloads d USING (uid)
           LEFT JOIN (SELECT uid, list(concept_id) AS gone FROM sense_checks WHERE NOT kept GROUP BY uid) r
             USING (uid)
           WHERE d.status = $ok AND NOT EXISTS
             (SELECT 1 FROM decisions x WHERE x.uid = m.uid AND NOT x.kept AND x.stage <> $stage)""",
        {"ok": SUCCESS, "stage": STAGE}).fetchall()
    return [Survivor(r[0], r[1], [c for c in r[2] or [] if c not in r[12]] if r[12] else r[2], *r[3:12])
            for r in rows]


def _clear_outputs(out: Path, root: Path) -> None:
    """Remove the files this stage writes (and only those names) from ``out``; ``root``: see :func:`_owner_of`."""
    if not out.exists():
        return
    for p in list(out.glob("shard-*.tar")) + list(out.glob(".shard-*.tar.tmp")):
        remove_path(p, root)
    for name in ("sizes.json", "index.parquet", "README.md"):
        remove_path(out / name, root)


def _ordered(cat: Catalog, cfg: ShardConfig) -> tuple[dict[str, Survivor], list[str], dict]:
    """The survivors by uid, their shard order, and what that input is (the step's key entries)."""
    rows = {r.uid: r for r in _survivors(cat)}
    order = shard_order(list(rows), cfg.seed)
    lead = next((i for i, u in enumerate(order) if rows[u].concept_ids), 0)
    if lead:  # schema inference reads the first samples: lead with one whose concept list is not empty
        order.insert(0, order.pop(lead))
    key = {"samples": hashlib.sha1("\n".join(order).encode()).hexdigest()[:16]}
    refuted = cat.execute("SELECT uid, concept_id FROM sense_checks WHERE NOT kept ORDER BY 1, 2").fetchall()
    if refuted:  # the image sense check took concepts off some samples: their metadata changed
        key["refuted_concepts"] = hashlib.sha1("\n".join(f"{u}\t{c}" for u, c in refuted).encode()).hexdigest()[:16]
    return rows, order, key


def shards_step(cfg: ShardConfig, encode_format: str = "jpg", dataset_name: str | None = None) -> Step:
    """The ``shards`` step: write (or resume, or reshard) the shards of the current survivors (module doc). Its key
    holds the survivors' order digest; a done step whose shard or index files vanished resumes and rewrites them."""
    seen: dict = {}

    def inputs(ctx: Context) -> dict:
        seen["rows"], seen["order"], key = _ordered(ctx.cat, cfg)
        return {"out": str(out_dir_of(cfg, ctx.build_dir)), **key}

    def outputs_exist(ctx: Context) -> bool:
        out = out_dir_of(cfg, ctx.build_dir)
        return (all((out / name).exists() for name in ctx.cat.done_units(STAGE))
                and all((out / f).exists() for f in ("sizes.json", "index.parquet", "README.md")))

    def run(ctx: Context, how: Begin) -> ShardResult:
        return _write_shards(ctx.cat, cfg, ctx.build_dir, encode_format, ctx.progress, dataset_name, how,
                             seen.pop("rows"), seen.pop("order"))

    return Step(STAGE, "media.shards", {"seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard,
                                        "jpeg_quality": cfg.jpeg_quality}, run, resumable=True, inputs=inputs,
                outputs_exist=outputs_exist, enabled=cfg.enabled, summary=ShardResult.summary)


def shard_summary(cat: Catalog, cfg: ShardConfig, build_dir: str | Path) -> ShardResult:
    """What the catalog says the shards folder holds (for a skipped step)."""
    n, samples = cat.one("SELECT count(DISTINCT shard), count(*) FROM shard_index")
    return ShardResult(out_dir=out_dir_of(cfg, build_dir), shards=int(n), samples=int(samples), written=0,
                       seconds=0.0)


def run_shards(cat: Catalog, cfg: ShardConfig, build_dir: str | Path, encode_format: str = "jpg",
               progress: bool = True, dataset_name: str | None = None) -> ShardResult:
    """Write (or resume, or reshard) the shards of the current survivors; see the module doc."""
    ran, res = run_one(Context(cat, Path(build_dir), progress=progress),
                       shards_step(cfg.model_copy(update={"enabled": True}), encode_format, dataset_name))
    return res if ran else shard_summary(cat, cfg, build_dir)


def _write_shards(cat: Catalog, cfg: ShardConfig, build_dir: str | Path, encode_format: str, progress: bool,
                  dataset_name: str | None, how: Begin, rows: dict[str, Survivor], order: list[str]) -> ShardResult:
    from tether.progress import progress as tqdm

    from curate.hfdataset import write_dataset_card, write_index, write_sizes

    t0 = time.time()
    claim_build_dir(build_dir, cat)
    out = out_dir_of(cfg, build_dir)
    claim_output_dir(build_dir, out, "media.shards.out")  # outside the build: new/empty/ours, then marked
    root = _owner_of(out, build_dir)
    if how is Begin.FRESH:  # new parameters or survivors: start over; otherwise finish the shards written so far
        _clear_outputs(out, root)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(".shard-*.tar.tmp"):
        remove_path(p, root)
    n = cfg.samples_per_shard
    plan = [(shard_name(i // n), order[i:i + n], i) for i in range(0, len(order), n)]
    done = cat.done_units(STAGE)
    for name, _, _ in plan:  # a recorded shard whose file vanished is written again
        if name in done and not (out / name).exists():
            with cat.transaction():
                cat.execute("DELETE FROM shard_index WHERE shard = ?", [name])
                cat.execute("DELETE FROM progress WHERE stage = ? AND unit = ?", [STAGE, name])
            done.discard(name)
    todo = [p for p in plan if p[0] not in done]
    written = 0
    bar = tqdm(total=sum(len(p[1]) for p in todo), desc="write shards", unit="sample", disable=not progress)
    with ImageStore(encode_format) as store:
        for name, uids, start in todo:
            w = ShardWriter(out / name, root)
            try:
                for j, uid in enumerate(uids):
                    r = rows[uid]
                    img = as_jpeg(store.read(r.format, r.store, r.shard, r.key), cfg.jpeg_quality)
                    w.write(sample_key(start + j), img, r.caption or "",
                            sample_meta(r.uid, r.caption, r.concept_ids, r.source, r.url, r.sha256, r.width,
                                        r.height))
                w.commit()
            except BaseException:
                w.abort()
                raise
            with cat.transaction():
                cat.insert_arrow("shard_index", pa.table({
                    "uid": uids, "shard": [name] * len(uids), "key": [sample_key(start + j) for j in range(len(uids))],
                    "pos": list(range(start, start + len(uids)))}), "uid, shard, key, pos")
                cat.add_unit(STAGE, name)
            written += 1
            bar.update(len(uids))
    bar.close()
    write_sizes(cat, out)
    write_index(cat, out)
    write_dataset_card(out, name=dataset_name or cfg.name or Path(build_dir).resolve().name,
               shards=len(plan), samples=len(order), seed=cfg.seed)
    return ShardResult(out_dir=out, shards=len(plan), samples=len(order), written=written,
                       seconds=time.time() - t0)
