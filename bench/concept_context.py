"""Can a sentence encoder's caption ↔ gloss similarity veto wrong senses? Measured on the labelled pairs.

For every labelled (caption, concept) pair that ``match.lexical`` of the recipe still matches (the judged selection
of ``bench/data/concept_precision_new_kept.csv`` is scored as labelled), the caption is embedded, and so is a
signature of each noun sense of the matched word (``word, its first lemmas (hypernym): definition``). The margin
is the matched sense's cosine minus the best other sense's. A veto drops the match when the margin is below a
threshold — either for any sense, or only when the matched sense is not the word's first WordNet sense (the
frequency prior kept). Printed per set and threshold: wrong and correct pairs the veto would remove, and the
precision and recall of correct pairs that would follow (recall against the original correct pairs, as in
``concept_precision.py report``). Nothing here changes the matcher: it tells whether the signal is worth building.

    python bench/concept_context.py --encoder all-MiniLM-L6-v2 --encoder sentence-transformers/all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import concept_precision as cp  # noqa: E402
from tether.clikit import run_command  # noqa: E402

THRESHOLDS = (-0.15, -0.1, -0.05, 0.0)


def word_lemma(wn, form: str, wnid: str) -> str:
    """The WordNet lemma behind a matched surface form (``wings`` → ``wing``): the first candidate that lists
    ``wnid``, else the first WordNet lemma, else the form itself."""
    f = form.lower()
    cands = [f, f[:-1] if f.endswith("s") else "", f[:-2] if f.endswith("es") else "",
             f[:-3] + "y" if f.endswith("ies") else ""]
    cands = [c for c in cands if c]
    return (next((c for c in cands if wnid in wn.senses.get(c, [])), None)
            or next((c for c in cands if c in wn.senses), f))


def signature(wn, word: str, wnid: str) -> str:
    s = wn.synset(wnid)
    hyper = ", ".join(wn.synset(h).lemmas[0].replace("_", " ") for h in s.hypernyms[:1])
    return f"{word}, {', '.join(x.replace('_', ' ') for x in s.lemmas[:3])} ({hyper}): {s.definition}"


def margins(rows: list[dict], enc, wn) -> list[tuple[dict, float, int, int]]:
    """(row, margin, number of senses, rank of the matched sense) per row; ``enc.encode(texts)`` → unit vectors."""
    senses = []
    for r in rows:
        w = word_lemma(wn, r["matched_form"], r["concept_id"])
        s = list(wn.senses.get(w, []))
        if r["concept_id"] not in s:
            s.insert(0, r["concept_id"])
        senses.append((w, s))
    sigs = sorted({(w, x) for w, s in senses for x in s})
    sv = np.asarray(enc.encode([signature(wn, w, x) for w, x in sigs]))
    index = {k: i for i, k in enumerate(sigs)}
    cv = np.asarray(enc.encode([r["caption"] for r in rows]))
    out = []
    for r, (w, s), c in zip(rows, senses, cv):
        sims = {x: float(c @ sv[index[(w, x)]]) for x in s}
        other = max((v for x, v in sims.items() if x != r["concept_id"]), default=-1.0)
        out.append((r, sims[r["concept_id"]] - other, len(s), s.index(r["concept_id"])))
    return out


def veto_table(m: list[tuple[dict, float, int, int]], n_correct: dict[str, int],
               thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict]:
    """Per veto kind, threshold and set: the pairs a veto removes (only words with several senses; ``not first
    sense`` spares rank 0) and the precision / recall of what is left."""
    out = []
    for veto in ("any sense", "not first sense"):
        for t in thresholds:
            for s in dict.fromkeys(x[0]["set"] for x in m):
                mine = [x for x in m if x[0]["set"] == s]
                gone = [x for x in mine if x[2] > 1 and x[1] < t and (veto == "any sense" or x[3] > 0)]
                ok = sum(int(x[0]["correct"]) for x in mine) - sum(int(x[0]["correct"]) for x in gone)
                wrong = sum(1 - int(x[0]["correct"]) for x in gone)
                left = len(mine) - len(gone)
                out.append({"veto": veto, "threshold": t, "set": s, "wrong_removed": wrong,
                            "correct_removed": len(gone) - wrong, "precision": ok / left if left else float("nan"),
                            "recall": ok / n_correct[s] if n_correct.get(s) else float("nan")})
    return out


def report(args: argparse.Namespace) -> None:
    rows = cp.read_labels()
    n_correct = {s: sum(int(r["correct"]) for r in rows if r["set"] == s) for s in cp.SETS}
    with tempfile.TemporaryDirectory() as tmp:
        found = cp.match_pairs({r["uid"]: r["caption"] for r in rows}, args.recipe, [], Path(tmp))
    rows = [r for r in rows if (r["uid"], r["concept_id"]) in found]
    judged = [dict(r, set="new") for r in cp.read_labels(cp.ROOT / "bench" / "data" / "concept_precision_new_kept.csv")]
    n_correct["new"] = sum(int(r["correct"]) for r in judged)
    rows += judged
    from curate.wordnet import WordNet
    from tether.encoders import load_text_encoder

    wn = WordNet.load()
    print("| encoder | veto | threshold | set | wrong removed | correct removed | precision | recall of correct |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.encoder or ["all-MiniLM-L6-v2"]:
        m = margins(rows, load_text_encoder(name), wn)
        for v in veto_table(m, n_correct):
            print(f"| {name} | {v['veto']} | {v['threshold']:+.2f} | {v['set']} | {v['wrong_removed']} | "
                  f"{v['correct_removed']} | {v['precision']:.3f} | {v['recall']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(cp.ROOT / "recipes" / "quickstart_curate.yaml"))
    ap.add_argument("--encoder", action="append", default=[], help="text encoder (zoo name, hub id or folder)")
    return run_command(report, ap.parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())
