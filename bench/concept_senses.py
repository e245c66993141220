"""Concept precision with the image sense check: the labelled (caption, concept) pairs of
``bench/data/concept_precision.csv``, each image scored against a prompt per noun sense of its matched word
(:func:`curate.agreement.plan_senses` / :func:`curate.agreement.score_senses`, the code the ``agreement`` stage
runs), per variant of ``media.agreement.senses`` settings.

For each variant and labelled set: the pairs the check keeps, their precision (95 % Wilson), the recall of the
correct pairs, and the wrong pairs left per error class — next to the text-only matcher (``text``: every labelled
pair the recipe's lexical matcher still finds today). ``--build`` is the quickstart build the labels were drawn from: its catalog gives each pair's image, the
matched lemma and the concept bank, and (for ``prototype_min``) every selected image of a concept for its
leave-one-out image prototype. Choose settings on ``set=all``; ``set=kept`` is the selection the target is about.

    python bench/concept_senses.py --scorer runs/quickstart/align/model --build runs/quickstart/curate \\
        --variant m0=margin=0 --variant m05=margin=0.05 --variant proto=margin=0.05;prototype_min=0.2

The last line: ``kept: <variant> precision P recall R`` for the variant with the best kept-set precision among
those that keep ≥ 90 % of its correct pairs (or the best recall when none does).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from concept_precision import LABELS, ROOT, compare, match_pairs, read_labels, report_md  # noqa: E402
from tether.clikit import run_command  # noqa: E402
from tether.recipe import RecipeError, parse  # noqa: E402


def parse_variant(spec: str):
    from curate.agreement import SenseConfig

    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise RecipeError(f"--variant {spec!r}: expected NAME=KEY=VALUE[;KEY=VALUE]")
    data: dict = {"enabled": True}
    for kv in filter(None, (s.strip() for s in rest.split(";"))):
        k, eq, v = kv.partition("=")
        if not eq:
            raise RecipeError(f"--variant {spec!r}: {kv!r} is not KEY=VALUE")
        import yaml

        data[k.strip()] = yaml.safe_load(v)
    return name, parse(SenseConfig, data, f"--variant {name}")


def _images(paths: list[str], scorer, batch: int = 32, cache: str | None = None) -> np.ndarray:
    """Scorer embeddings of image files (``cache``: a folder keeping them per scorer fingerprint and file list)."""
    from PIL import Image

    from tether.digest import json_digest

    if cache:
        f = Path(cache) / f"{json_digest([scorer.fingerprint, paths])}.npy"
        if f.is_file():
            return np.load(f)
        out = _images(paths, scorer, batch)
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, out)
        return out

    from tether.progress import progress as tqdm

    out = []
    for s in tqdm(range(0, len(paths), batch), desc="embed images", unit="batch"):
        ims = []
        for p in paths[s:s + batch]:
            with open(p, "rb") as f:
                ims.append(Image.open(io.BytesIO(f.read())).convert("RGB"))
        out.append(np.asarray(scorer.encode_image(ims, batch_size=batch), np.float32))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def run(args) -> int:
    import duckdb

    from curate.agreement import leave_one_out, plan_senses, score_senses
    from curate.catalog import recorded_wordnet_dir
    from curate.wordnet import WordNet
    from tether.scorers import load_scorer

    rows = read_labels(args.labels)
    variants = [parse_variant(v) for v in args.variant]
    if not variants:
        raise RecipeError("name at least one --variant NAME=margin=0.05[;prototype_min=0.2]")
    db = Path(args.build) / "catalog.duckdb"
    if not db.is_file():
        raise RecipeError(f"--build {args.build}: no catalog.duckdb there")
    con = duckdb.connect(str(db), read_only=True)
    path = dict(con.execute("SELECT uid, path FROM samples WHERE uid IN (SELECT unnest(?))",
                            [[r["uid"] for r in rows]]).fetchall())
    missing = [r["uid"] for r in rows if not path.get(r["uid"])]
    if missing:
        raise RecipeError(f"{len(missing)} labelled uids have no local image in {db} (first: {missing[0]})")
    lemma = {(f, c): lem for f, c, lem in con.execute("SELECT form, concept_id, lemma FROM surface_forms").fetchall()}
    bank = {c: (n, g) for c, n, g in con.execute("SELECT concept_id, name, gloss FROM concepts").fetchall()}
    wn = WordNet.load(args.wordnet_dir or recorded_wordnet_dir(con))
    t0 = time.time()
    scorer = load_scorer(args.scorer, args.kind, key="--scorer")
    items = [(lemma.get((r["matched_form"], r["concept_id"]), r["matched_form"]), r["concept_id"]) for r in rows]
    uniq = sorted({path[r["uid"]] for r in rows})
    emb = _images(uniq, scorer, cache=args.cache)
    row_img = np.array([uniq.index(path[r["uid"]]) for r in rows])
    protos = None
    if any(cfg.prototype_min is not None for _, cfg in variants):
        sel = con.execute("""SELECT m.uid, s.path, unnest(m.concept_ids) FROM media_rows m JOIN samples s USING (uid)
                             WHERE s.path IS NOT NULL""").fetchall()
        ppaths = sorted({p for _, p, _ in sel} - set(uniq))
        pemb = np.concatenate([emb, _images(ppaths, scorer, cache=args.cache)]) if ppaths else emb
        where = {p: i for i, p in enumerate(uniq + ppaths)}
        protos = (pemb, where, sel)
    secs = time.time() - t0
    import tempfile

    labelled = {(r["uid"], r["concept_id"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:  # what today's text-only matcher still matches of the labelled pairs
        text = match_pairs({r["uid"]: r["caption"] for r in rows}, args.recipe, [], Path(tmp), args.build) & labelled
    found: dict[str, set] = {"text": text}
    for name, cfg in variants:
        keep_idx, senses, own_rivals = plan_senses(items, bank, wn, cfg)
        own, best, _ = score_senses(emb[row_img[keep_idx]], senses, own_rivals,
                                    lambda t: scorer.encode_text(t, batch_size=256))
        refuted = {keep_idx[k] for k in np.flatnonzero(best - own > cfg.margin)}
        if cfg.prototype_min is not None:
            pemb, where, sel = protos
            # per labelled pair: its image + every selected image of its concept except its own uid's
            pr, pc, owner = [], [], []
            for k, r in enumerate(rows):
                pr.append(where[path[r["uid"]]])
                pc.append(f"{k}")
                owner.append(k)
                for u, p, c in sel:
                    if c == r["concept_id"] and u != r["uid"]:
                        pr.append(where[p])
                        pc.append(f"{k}")
                        owner.append(-1)
            sims = leave_one_out(pemb, np.array(pr), np.array(pc), cfg.prototype_min_samples)
            first = {o: i for i, o in enumerate(owner) if o >= 0}
            refuted |= {k for k in range(len(rows)) if not np.isnan(sims[first[k]]) and sims[first[k]] < cfg.prototype_min}
        found[name] = {(r["uid"], r["concept_id"]) for k, r in enumerate(rows) if k not in refuted} & text
        if args.show_wrong:  # the wrong kept pairs the check leaves, to read
            for r in rows:
                if r["set"] == "kept" and r["correct"] == "0" and (r["uid"], r["concept_id"]) in found[name]:
                    print(f"  {name} wrong kept: {r['matched_form']} -> {r['concept_name']} ({r['error_class']}): "
                          f"{r['caption'][:80]}", file=sys.stderr)
        print(f"{name}: {len(keep_idx)} of {len(rows)} labelled pairs checkable, {len(refuted)} refuted",
              file=sys.stderr)
    comparison = compare(rows, found)
    base = {c["set"]: c for c in comparison if c["variant"] == "text"}
    for c in comparison:  # recall of the pairs the text matcher keeps: what the image check costs
        c["of_text"] = c["precision"].correct / base[c["set"]]["precision"].correct if base[c["set"]]["precision"].correct else float("nan")
    report = report_md(rows, comparison)
    report += "\n| variant | set | kept pairs | precision | correct pairs kept, of the text matcher's |\n|---|---|---|---|---|\n"
    report += "".join(f"| {c['variant']} | {c['set']} | {c['precision'].n} | {c['precision'].value:.3f} | "
                      f"{c['of_text']:.3f} |\n" for c in comparison)
    report += f"\nscorer {args.scorer}: {len(uniq)} labelled images embedded in {secs:.1f} s\n"
    print(report, end="")
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    kept = [c for c in comparison if c["set"] == "kept" and c["variant"] != "text"]
    ok = [c for c in kept if c["of_text"] >= 0.9]
    best = max(ok, key=lambda c: c["precision"].value) if ok else max(kept, key=lambda c: c["of_text"])
    print(f"kept: {best['variant']} precision {best['precision'].value:.3f} recall {best['of_text']:.3f} "
          f"(text only: precision {base['kept']['precision'].value:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scorer", required=True, help="tether model folder / CLIP-style folder or hub id")
    ap.add_argument("--kind", default="auto", choices=["auto", "aligned", "clip"])
    ap.add_argument("--build", required=True, help="the build the labels were drawn from")
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart_curate.yaml"),
                    help="the text matcher whose pairs the image check is applied to")
    ap.add_argument("--wordnet-dir")
    ap.add_argument("--cache", help="keep the image embeddings here (per scorer and image list) for reruns")
    ap.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE[;KEY=VALUE] of senses settings")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--show-wrong", action="store_true", help="list the wrong kept pairs each variant leaves (stderr)")
    return run_command(run, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
