"""Curated vs random: does concept balancing change what the aligner learns, at equal data size?

Builds two arms from the same split of a Flickr8k-layout folder and trains/evaluates both with
``bench/flickr8k_results.py`` (same recipe, same seeds, retrieval on the test split + ImageNet zero-shot):

* ``curated`` — the captions a ``curate build`` kept (its ``selection.parquet``; e.g. the quickstart's
  concept-balanced selection), matched back to the split by their Flickr8k caption id (``IMAGE.jpg#N``);
* ``random`` — the same NUMBER of captions drawn uniformly from the split (``random.Random(seed).sample`` over
  the split's caption ids in file order), or with ``--random-from SELECTION`` from that selection's captions
  (e.g. the agreement-filtered build against an equal-size draw from the unfiltered one);
* ``--also NAME=SELECTION``: more arms, each a selection trained as it is (e.g. the unfiltered build in full).

Each arm is written as a Flickr8k folder (``captions.txt``, ``<split>_images.txt`` and an ``images`` link to
the source images), so both are read the same way: an image's selected captions form one multi-positive
sample. A selection row that is not a caption of the split is an error (wrong folder or split), not skipped.

    python bench/curated_vs_random.py --selection runs/quickstart/curate/selection.parquet \\
        --config recipes/quickstart_align.yaml --seeds 0 1 2 --out runs/cvu
    python bench/curated_vs_random.py --selection runs/loop/curate/shards/index.parquet \
        --random-from runs/quickstart/curate/shards/index.parquet \
        --also first=runs/quickstart/curate/shards/index.parquet --out runs/loop/compare   (recipes/loop_quickstart.sh)

Rerunning resumes: the arm folders are rewritten identically, caches and finished runs are reused.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tether.recipe import RecipeError  # noqa: E402


def split_captions(root: Path, split: str) -> list[tuple[str, str]]:
    """(caption id ``IMAGE.jpg#N``, caption) of every non-empty caption of the split's images, in captions.txt
    order (read as the aligner reads a Flickr8k folder)."""
    from align.data import flickr8k_captions, flickr8k_split

    names = set(flickr8k_split(root, split))
    out = [(cid, cap) for img, cid, cap in flickr8k_captions(root) if img in names and cap.strip()]
    if not out:
        raise RecipeError(f"{root}: no captions for the {split} split")
    return out


def selected_ids(selection: Path, known: set[str]) -> list[str]:
    """The Flickr8k caption ids of a curate selection (uid ``<source>:IMAGE.jpg#N``), all of them in ``known``."""
    import pyarrow.parquet as pq

    if not selection.is_file():
        raise RecipeError(f"{selection}: no selection (run `curate build` first; it writes selection.parquet)")
    table = pq.read_table(selection, columns=["uid"])
    ids = [u.rsplit(":", 1)[-1] for u in table.column("uid").to_pylist()]
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise RecipeError(f"{selection}: {len(unknown)} of {len(ids)} selected captions are not captions of this "
                          f"split (first: {unknown[0]!r}); pass the --flickr8k folder and --split it was curated from")
    if len(set(ids)) != len(ids):
        raise RecipeError(f"{selection}: a caption is selected twice")
    return ids


def write_arm(out: Path, ids: list[str], captions: dict[str, str], split: str, images: Path) -> int:
    """A Flickr8k folder holding exactly ``ids`` (in captions.txt order); returns its number of images."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = set(ids)
    order = [cid for cid in captions if cid in chosen]
    names = list(dict.fromkeys(cid.split("#", 1)[0] for cid in order))
    text = "".join(f"{cid}\t{captions[cid]}\n" for cid in order)
    old = out / "captions.txt"
    if old.is_file() and old.read_text(encoding="utf-8") != text:
        # feature caches and finished runs under --out were made from the other captions: never mix them
        raise RecipeError(f"{old}: holds another selection than this one; pass a fresh --out")
    old.write_text(text, encoding="utf-8")
    (out / f"{split}_images.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    link = out / "images"
    if link.is_symlink() or link.exists():
        if link.resolve() != images.resolve():
            raise RecipeError(f"{link}: exists and is not a link to {images}")
    else:
        os.symlink(images.resolve(), link, target_is_directory=True)
    return len(names)


def main(argv: list[str] | None = None) -> int:
    from tether.recipe import shared_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selection", required=True, help="a curate build's selection.parquet")
    p.add_argument("--flickr8k", default=None, help="the Flickr8k folder curated from (default $TETHER_SHARED/data/"
                   "flickr8k)")
    p.add_argument("--split", default="train")
    p.add_argument("--config", default=str(REPO / "recipes" / "quickstart_align.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the random arm's draw")
    p.add_argument("--imagenet", default=None, help="passed to flickr8k_results.py ('none' skips zero-shot)")
    p.add_argument("--random-from", help="draw the random arm from this selection's captions, not the whole split")
    p.add_argument("--also", action="append", default=[], metavar="NAME=SELECTION",
                   help="one more arm: a selection trained as it is")
    p.add_argument("--out", default="runs/cvu")
    p.add_argument("--prepare-only", action="store_true", help="write the two arms and stop")
    args = p.parse_args(argv)
    try:
        root = Path(args.flickr8k) if args.flickr8k else shared_dir() / "data" / "flickr8k"
        pairs = split_captions(root, args.split)
        captions = dict(pairs)
        curated = selected_ids(Path(args.selection), set(captions))
        pool = selected_ids(Path(args.random_from), set(captions)) if args.random_from else [cid for cid, _ in pairs]
        pool_ids = set(pool)
        pool = [cid for cid, _ in pairs if cid in pool_ids]  # split file order: the draw does not depend on the file
        if len(pool) < len(curated):
            raise RecipeError(f"--random-from {args.random_from}: {len(pool)} captions, fewer than the "
                              f"{len(curated)} of --selection")
        rand = random.Random(args.sample_seed).sample(pool, len(curated))
        arms = [("curated", curated), ("random", rand)]
        for spec in args.also:
            name, eq, sel = spec.partition("=")
            if not eq or not name or not sel or name in dict(arms) or not name.replace("-", "").isalnum():
                raise RecipeError(f"--also {spec!r}: expected NAME=SELECTION with a new alphanumeric NAME")
            arms.append((name, selected_ids(Path(sel), set(captions))))
        out = Path(args.out).resolve()  # (data.path overrides are recipe inputs: absolute, not recipe-relative)
        sizes = {arm: write_arm(out / arm, ids, captions, args.split, root / "images") for arm, ids in arms}
        print("; ".join(f"{arm}: {len(ids)} captions of {sizes[arm]} images" for arm, ids in arms)
              + f" (random drawn from {len(pool)} of {len(pairs)} {args.split} captions)", flush=True)
        if args.prepare_only:
            return 0
        import flickr8k_results

        bench = ["--config", args.config, "--seeds", *map(str, args.seeds), "--out", str(out / "results")]
        for arm, _ in arms:
            bench += ["--variant", f"{arm}=data.format=flickr8k;data.path={out / arm};data.split={args.split};"
                                   f"features.cache_dir={out / ('cache-' + arm)}"]
        if args.imagenet:
            bench += ["--imagenet", args.imagenet]
        return flickr8k_results.main(bench)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
