"""Benchmark: ``curate build`` to the selection on a synthetic web-like caption pool of N rows (issue 12).

1. **The pool** (:func:`write_pool`): N rows of ``url, caption`` written as parquet shards, streamed in fixed
   batches of :data:`BATCH` rows (generating 100M rows holds one batch, never the pool). Reproducible: batch
   ``b`` is drawn from ``numpy.random.default_rng([seed, b])``, so a pool of N rows is the first N rows of any
   larger pool with the same seed. Captions are the real Flickr8k captions recombined, with alt-text noise:

   * a caption as it is (``--verbatim``), or one of its earlier rows in the batch copied (``--dup-captions``):
     exact duplicates, as web pools have;
   * two captions' halves joined; a caption's words shuffled; a caption with a file name
     (``IMG_1234.jpg``, ``DSC01234.JPG``), stock-photo / SEO junk around it; a bare file name or junk line;
   * random casing and punctuation on top.

   URLs are unique (``https://cdnK.example.com/p/<hex row>/<hash>.jpg``) except a ``--dup-urls`` share that
   repeats the URL of an earlier row. ``pool.json`` next to the shards records the parameters; a pool folder
   with the same ``pool.json`` is reused.
2. **The recipe**: ``recipes/concept_rich.yaml`` with its media section removed, the pool as its one source,
   ``match.mode: lexical``, ``balance.t: 2000`` (``--t``), ``threads`` = ``--threads`` (default: the cores), no
   extra output columns; ``--memory-limit`` / ``--temp-dir`` set the recipe's ``memory_limit`` / ``temp_dir``
   and ``--workers`` the lexical matching processes (``distributor.workers``). Written next to the pool.
3. **The build**: ``python -m curate build RECIPE --out BUILD --no-progress`` as a child process; the RSS of
   its whole process tree (psutil, every 0.2 s) gives the peak (sum over the tree) and the stage it happened
   in; the catalog's ``stages`` table gives each stage's seconds and its own count (``rows``); rows/s per stage
   is the pool's N over the stage's seconds.

Several N in one run, side by side (a table, and JSON with ``--json``)::

    python bench/bench_scale.py --rows 1000000 10000000 --work /work/exp/h5-scale
    python bench/bench_scale.py --rows 1000000 --workers 1 2 --json out.json     # 1 vs 2 matching processes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 100_000  # rows drawn per rng (the unit of reproducibility) and written per parquet row group
GEN_VERSION = 1  # bump when the generator's output changes: pools with another version are regenerated

FILE_NAMES = ("IMG_{n:04d}.jpg", "DSC{n:05d}.JPG", "image-{n}.png", "photo_{n}.jpeg", "P{n:07d}.JPG",
              "{n}_{m}_o.jpg", "Screenshot {n}.png")
JUNK = ("stock photo", "royalty free", "free download", "buy now", "best price", "free shipping",
        "HD wallpaper", "high resolution", "click here", "shop online", "limited offer", "new 2024",
        "vector illustration", "download free", "4k", "sale", "cheap", "top rated", "official site",
        "editorial use only", "stock image", "premium quality")
PUNCT = ("", "", ".", " .", "!", "...", " |", " -", ",", "!!")


def base_captions(path: str | os.PathLike | None = None) -> list[str]:
    """The Flickr8k captions (``IMAGE#N<TAB>caption`` lines), in file order."""
    p = Path(path) if path else Path(os.environ.get("TETHER_SHARED", "/work/shared")) / "data/flickr8k/captions.txt"
    caps = []
    for line in p.read_text(encoding="utf-8").splitlines():
        _, _, cap = line.partition("\t")
        if cap.strip():
            caps.append(cap.strip())
    if not caps:
        raise SystemExit(f"error: {p}: no captions")
    return caps


def url_of(i: int) -> str:
    """The unique URL of row ``i`` (a pure function of i: duplicates repeat an earlier row's URL)."""
    h = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=6).hexdigest()
    return f"https://cdn{i % 97}.example.com/p/{i:x}/{h}.jpg"


def _noise(cap: str, rng: random.Random) -> str:
    c = rng.random()
    if c < 0.15:
        cap = cap.lower()
    elif c < 0.22:
        cap = cap.upper()
    elif c < 0.30:
        cap = cap.title()
    return cap.rstrip(" .") + rng.choice(PUNCT)


def _file_name(rng: random.Random) -> str:
    return rng.choice(FILE_NAMES).format(n=rng.randrange(100_000), m=rng.randrange(10_000))


def _caption(kind: int, caps: list[str], words: list[list[str]], rng: random.Random) -> str:
    a = rng.randrange(len(caps))
    if kind == 0:  # verbatim
        return caps[a]
    if kind == 1:  # halves of two captions joined
        b = rng.randrange(len(caps))
        wa, wb = words[a], words[b]
        return _noise(" ".join(wa[:max(1, len(wa) // 2)] + wb[len(wb) // 2:]), rng)
    if kind == 2:  # the words of one caption shuffled
        w = list(words[a])
        rng.shuffle(w)
        return _noise(" ".join(w), rng)
    if kind == 3:  # caption + a file name / junk around it
        junk = rng.sample(JUNK, rng.randint(1, 3))
        parts = [caps[a].rstrip(" ."), *junk] if rng.random() < 0.5 else [*junk, caps[a].rstrip(" .")]
        if rng.random() < 0.4:
            parts.insert(rng.randrange(len(parts) + 1), _file_name(rng))
        return _noise(rng.choice((" - ", " | ", ", ", " ")).join(parts), rng)
    if kind == 4:  # pure alt-text noise: a file name, or SEO junk
        return _file_name(rng) if rng.random() < 0.5 else " ".join(rng.sample(JUNK, rng.randint(2, 5)))
    return _noise(caps[a], rng)  # kind 5: the caption with casing/punctuation noise


#: share of each caption kind (verbatim, halves, shuffled, caption + junk, pure noise, cased/punctuated)
KINDS = (0.20, 0.25, 0.10, 0.20, 0.05, 0.20)


def pool_batches(rows: int, seed: int = 0, dup_captions: float = 0.05, dup_urls: float = 0.03,
                 captions: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The pool as record batches of at most :data:`BATCH` rows (batch b depends only on seed and b)."""
    caps = captions if captions is not None else base_captions()
    words = [c.rstrip(" .").split() for c in caps]
    kinds_p = np.asarray(KINDS) / sum(KINDS)
    for b, start in enumerate(range(0, rows, BATCH)):
        n = min(BATCH, rows - start)
        g = np.random.default_rng([seed, b])
        rng = random.Random(int(g.integers(2**63)))
        kinds = g.choice(len(KINDS), size=BATCH, p=kinds_p)[:n]
        dup_c = (g.random(BATCH) < dup_captions)[:n]
        dup_u = (g.random(BATCH) < dup_urls)[:n]
        cap_col: list[str] = []
        url_col: list[str] = []
        for j in range(n):
            i = start + j
            if dup_c[j] and j:
                cap_col.append(cap_col[rng.randrange(j)])
            else:
                cap_col.append(_caption(int(kinds[j]), caps, words, rng))
            url_col.append(url_of(rng.randrange(i)) if dup_u[j] and i else url_of(i))
        yield pa.record_batch([pa.array(url_col, pa.string()), pa.array(cap_col, pa.string())],
                              names=["url", "caption"])


def write_pool(out: str | os.PathLike, rows: int, seed: int = 0, shard_rows: int = 1_000_000,
               dup_captions: float = 0.05, dup_urls: float = 0.03, progress: bool = True) -> Path:
    """Write (or reuse) the pool of ``rows`` rows under ``out`` as ``part-NNNNN.parquet`` shards."""
    out = Path(out)
    meta = {"version": GEN_VERSION, "rows": int(rows), "seed": int(seed), "shard_rows": int(shard_rows),
            "dup_captions": dup_captions, "dup_urls": dup_urls, "batch": BATCH}
    manifest = out / "pool.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == meta:
        return out
    if out.exists():
        for f in out.glob("part-*.parquet"):
            f.unlink()
        manifest.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if shard_rows % BATCH:
        raise SystemExit(f"error: --shard-rows must be a multiple of {BATCH:,}")
    writer, shard, in_shard, done, t0 = None, 0, 0, 0, time.time()
    for batch in pool_batches(rows, seed, dup_captions, dup_urls):
        if writer is None or in_shard >= shard_rows:
            if writer is not None:
                writer.close()
                shard += 1
            writer = pq.ParquetWriter(out / f"part-{shard:05d}.parquet", batch.schema, compression="zstd")
            in_shard = 0
        writer.write_batch(batch, row_group_size=BATCH)
        in_shard += batch.num_rows
        done += batch.num_rows
        if progress and (done % (10 * BATCH) == 0 or done == rows):
            print(f"  pool: {done:,}/{rows:,} rows ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    if writer is not None:
        writer.close()
    manifest.write_text(json.dumps(meta, indent=1) + "\n")
    return out


def make_recipe(pool: Path, dest: Path, t: int = 2000, threads: int | None = None, memory_limit: str | None = None,
                temp_dir: str | None = None, workers: int | None = None, overrides: list[str] | None = None,
                kind: str | None = None) -> Path:
    """The full-scale recipe with the media section removed, the pool as its source, lexical matching, t."""
    from curate.config import BuildRecipe

    r = yaml.safe_load((ROOT / "recipes/concept_rich.yaml").read_text())
    r.pop("media", None)
    r["name"] = "scale"
    r.pop("out", None)
    r["threads"] = int(threads or os.cpu_count() or 1)
    r["sources"] = [{"name": "pool", "format": "parquet", "path": str(pool / "*.parquet"),
                     "url_column": "url", "caption_column": "caption"}]
    r["match"]["mode"] = "lexical"
    r["match"].pop("semantic", None)
    r["balance"]["t"] = int(t)
    r["output"]["extra_columns"] = []
    fields = BuildRecipe.model_fields
    for key, value in (("memory_limit", memory_limit), ("temp_dir", temp_dir)):
        if value is not None:
            if key not in fields:
                raise SystemExit(f"error: this tether has no recipe key {key!r}")
            r[key] = value
    if workers is not None:
        if "distributor" in fields:
            r.setdefault("distributor", {})["workers"] = int(workers)
        else:
            raise SystemExit("error: --workers: this tether has no `distributor.workers` recipe key yet")
    if kind is not None:
        r.setdefault("distributor", {})["kind"] = kind
    if overrides:
        from tether.recipe import apply_overrides

        r = apply_overrides(r, overrides)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(r, sort_keys=False))
    return dest


class TreeRSS:
    """Polls the summed RSS of a process and all its descendants (psutil) in a thread: samples (time, bytes)."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.time(), total))
            self._stop.wait(self.every)

    def __enter__(self) -> "TreeRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def peak(self, t0: float | None = None, t1: float | None = None) -> int:
        vals = [v for t, v in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return max(vals, default=0)


def run_build(recipe: Path, build: Path, log: Path) -> dict:
    """``curate build`` as a child process; wall, tree peak RSS, per-stage seconds / rows / peak RSS."""
    from curate.catalog import Catalog

    if build.exists():
        shutil.rmtree(build)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "curate", "build", str(recipe), "--out", str(build), "--no-progress"]
    timef = log.with_suffix(".maxrss")
    if Path("/usr/bin/time").is_file():  # the kernel's max RSS of the largest process of the tree, as a check
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(timef), *cmd]
    t0 = time.time()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        with TreeRSS(p.pid) as mon:
            rc = p.wait()
    wall = time.time() - t0
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"error: curate build exited {rc}; {log}:\n" + "\n".join(tail))
    max_proc = int(timef.read_text().split()[-1]) * 1024 if timef.is_file() else None
    with Catalog(build / "catalog.duckdb", read_only=True) as cat:
        stages = cat.execute("SELECT stage, started, finished, rows FROM stages ORDER BY started").fetchall()
        n = int(cat.scalar("SELECT count(*) FROM samples"))
        dups = int(cat.scalar("SELECT count(*) FROM decisions WHERE stage = 'dedup' AND NOT kept"))
        matched = int(cat.scalar("SELECT count(DISTINCT uid) FROM matches"))
        digest = catalog_digest(cat)
    per = []
    for stage, s, f, rows in stages:
        secs = (f or s) - s
        per.append({"stage": stage, "seconds": round(secs, 2), "rows": rows,
                    "pool_rows_per_s": round(n / secs) if secs > 0 else None,
                    "peak_rss": mon.peak(s, f)})
    peak_stage = max(per, key=lambda d: d["peak_rss"])["stage"] if per else None
    return {"wall_s": round(wall, 1), "peak_rss": mon.peak(), "max_process_rss": max_proc, "peak_stage": peak_stage,
            "rows": n, "exact_duplicates": dups, "matched": matched, "digest": digest, "stages": per,
            "log": str(log)}


def catalog_digest(cat) -> str:
    """A digest of what the build decided: ``matches`` and ``lexical_removed`` row by row in their stored order
    (committed unit by unit: the same rows in the same order from 1 process, N processes or Ray), ``decisions``
    and ``balance_report`` as sets of rows (written by DuckDB's parallel SQL, whose row order may vary between
    any two runs). DuckDB ``hash`` per row (with its ``rowid`` for the ordered tables), summed."""
    parts = []
    for table, ordered in (("matches", True), ("lexical_removed", True), ("decisions", False),
                           ("balance_report", False)):
        cols = ", ".join(r[0] for r in cat.execute(f"DESCRIBE {table}").fetchall())
        h = cat.scalar(f"SELECT coalesce(sum(hash({'rowid, ' if ordered else ''}{cols})::HUGEINT), 0) FROM {table}")
        parts.append(f"{table}:{int(h) & ((1 << 64) - 1):016x}")
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]


def gb(b: int) -> str:
    return f"{b / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="pool sizes, side by side")
    ap.add_argument("--work", default="/work/exp/h5-scale", help="folder for pools, recipes and builds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dup-captions", type=float, default=0.05, help="share of rows copying an earlier caption")
    ap.add_argument("--dup-urls", type=float, default=0.03, help="share of rows repeating an earlier URL")
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--t", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="recipe `threads` (default: the machine's cores)")
    ap.add_argument("--memory-limit", default=None, help="recipe `memory_limit`, e.g. 6GB (default: unset)")
    ap.add_argument("--temp-dir", default=None, help="recipe `temp_dir` (default: BUILD/.tmp)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="lexical matching processes (`distributor.workers`); several values run side by side")
    ap.add_argument("--kinds", nargs="+", choices=("local", "ray"), default=None,
                    help="distributor kinds side by side (ray: a Ray instance started by the build with "
                         "`--workers` CPUs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other recipe override, as `curate build --set` (recorded in the JSON)")
    ap.add_argument("--keep-builds", action="store_true", help="keep each build folder (default: deleted)")
    ap.add_argument("--pool-only", action="store_true", help="write the pools, run nothing")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.rows):
        raise SystemExit("error: --rows must be >= 1")
    work = Path(args.work).resolve()
    if work == ROOT or ROOT in work.parents:
        raise SystemExit(f"error: --work {work} is inside the repository: pools stay out of it")
    results = []
    for n in args.rows:
        pool = work / f"pool-{n}-s{args.seed}"
        t0 = time.time()
        write_pool(pool, n, args.seed, args.shard_rows, args.dup_captions, args.dup_urls)
        gen_s = time.time() - t0
        print(f"pool {n:,} rows: {pool} ({gen_s:.0f}s)", file=sys.stderr, flush=True)
        if args.pool_only:
            continue
        for kind, w in [(k, w) for k in (args.kinds or [None]) for w in (args.workers or [None])]:
            tag = (f"{n}" + (f"-{kind}" if kind else "") + (f"-w{w}" if w else "")
                   + (f"-m{args.memory_limit}" if args.memory_limit else ""))
            recipe = make_recipe(pool, work / f"recipe-{tag}.yaml", args.t, args.threads, args.memory_limit,
                                 args.temp_dir, w, args.set, kind)
            build = work / f"build-{tag}"
            print(f"build {tag}: start", file=sys.stderr, flush=True)
            res = run_build(recipe, build, work / f"build-{tag}.log")
            res.update({"pool_rows": n, "workers": w, "kind": kind or "local", "memory_limit": args.memory_limit, "recipe": str(recipe),
                        "pool_seconds": round(gen_s, 1), "overrides": args.set,
                        "load_avg_after": os.getloadavg()})
            results.append(res)
            print(f"build {tag}: {res['wall_s']:.1f}s, peak RSS {gb(res['peak_rss'])} in {res['peak_stage']}",
                  file=sys.stderr, flush=True)
            if not args.keep_builds:
                shutil.rmtree(build)
    if not results:
        return 0
    head = ["stage"] + [f"N={r['pool_rows']:,}" + (f" {r['kind']}" if args.kinds else "")
                        + (f" w={r['workers']}" if r["workers"] else "") for r in results]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    stages = list(dict.fromkeys(s["stage"] for r in results for s in r["stages"]))
    for st in stages:
        cells = []
        for r in results:
            d = next((s for s in r["stages"] if s["stage"] == st), None)
            cells.append("—" if d is None else f"{d['seconds']:.1f} s, {d['pool_rows_per_s'] or 0:,} rows/s, "
                                               + (gb(d['peak_rss']) if d['peak_rss'] else "(shorter than a poll)"))
        print(f"| {st} | " + " | ".join(cells) + " |")
    print("| **wall** | " + " | ".join(f"{r['wall_s']:.1f} s ({r['pool_rows'] / r['wall_s']:,.0f} rows/s)"
                                       for r in results) + " |")
    print("| **peak RSS (tree)** | " + " | ".join(f"{gb(r['peak_rss'])} ({r['peak_stage']})" for r in results) + " |")
    print("| duplicates / matched | " + " | ".join(f"{r['exact_duplicates']:,} / {r['matched']:,}"
                                                   for r in results) + " |")
    # ratios against the first run of the same pool size (the baseline: list it first, e.g. --workers 1 2)
    base = {}
    for r in results:
        base.setdefault(r["pool_rows"], r)

    def stage_s(r, st):
        return next((s["seconds"] for s in r["stages"] if s["stage"] == st), None)

    for label, get in (("match: × first run's speed", lambda r: stage_s(r, "match")),
                       ("wall: × first run's speed", lambda r: r["wall_s"])):
        cells = []
        for r in results:
            a, b = get(base[r["pool_rows"]]), get(r)
            cells.append(f"{a / b:.2f}×" if a and b else "—")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| catalog digest | " + " | ".join(
        r["digest"] + ("" if r["digest"] == base[r["pool_rows"]]["digest"] else " (DIFFERS)") for r in results) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
