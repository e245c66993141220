"""Caption→concept matching: lexical (Aho-Corasick) and semantic (frozen encoder + faiss) (curate/match)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import TINY_WORDS
from curate.catalog import Catalog
from curate.concepts import ConceptsConfig, build_concepts
from curate.match import (LexicalMatcher, MatchConfig, choose_senses, drop_rare_senses, iter_units,
                          load_form_concepts, naive_match, run_match)
from curate.match.semantic import TopK, concept_prompt
from tether.recipe import RecipeError, parse

NO_WN = "nonexistent-wordnet-dir"
WORDS = ["dog", "cat", "hot dog", "box", "bicycle", "wolf", "grass"]


def _catalog(path: Path, captions: list[str | None]) -> Catalog:
    cat = Catalog(path)
    tbl = pa.table({"uid": [f"u{i:05d}" for i in range(len(captions))], "caption": captions})
    cat.con.register("_caps", tbl)
    cat.execute("INSERT INTO samples(uid, caption) SELECT uid, caption FROM _caps")
    cat.con.unregister("_caps")
    return cat


def _matches(cat: Catalog, method: str = "lexical") -> list[tuple]:
    return cat.execute("SELECT uid, concept_id, method, score, span FROM matches WHERE method = ? "
                       "ORDER BY uid, concept_id", [method]).fetchall()


@pytest.fixture
def word_cat(tmp_path):
    caps = ["Two dogs run on the grass.", "A cathedral at night", "a cat sleeps on a box", "A hot-dog stand!",
            "boxes, and more BOXES", "two wolves howl", None, "   ", "a dog's bicycle", "catalog of dogma"]
    cat = _catalog(tmp_path / "b.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=WORDS, wordnet_dir=NO_WN), progress=False)
    yield cat
    cat.close()


def test_choose_senses_policies():
    rows = [("crane", "bird", 4, "crane", True), ("crane", "machine", 3, "crane", True),
            ("crane", "stretch", 0, "crane", False), ("glasses", "spectacles", 0, "glasses", False),
            ("glasses", "glass", 0, "glass", False), ("glasses", "glassful", 2, "glass", False),
            ("men", "workforce", 0, "men", False), ("men", "man", 0, "man", False),
            ("men", "serviceman", 1, "man", False)]
    assert choose_senses(rows, "all") == {"crane": ("bird", "machine", "stretch"),
                                          "glasses": ("glass", "glassful", "spectacles"),
                                          "men": ("man", "serviceman", "workforce")}
    # first: the most frequent sense of each lemma the form comes from
    assert choose_senses(rows, "first") == {"crane": ("stretch",), "glasses": ("glass", "spectacles"),
                                            "men": ("man", "workforce")}
    assert choose_senses(rows, "imagenet_first")["crane"] == ("machine",)


def test_lexical_whole_words_and_plurals(word_cat):
    assert run_match(word_cat, MatchConfig(), progress=False) == 9
    got = {(u, c, s) for u, c, _, _, s in _matches(word_cat)}
    assert got == {("u00000", "user:dog", "dogs"), ("u00000", "user:grass", "grass"),
                   ("u00002", "user:cat", "cat"), ("u00002", "user:box", "box"),
                   ("u00003", "user:hot dog", "hot dog"), ("u00003", "user:dog", "dog"),
                   ("u00004", "user:box", "boxes"), ("u00008", "user:bicycle", "bicycle"),
                   ("u00008", "user:dog", "dog")}
    # explicit expectations: plural → lemma concept; "cathedral"/"catalog"/"dogma" match nothing
    assert ("u00000", "user:dog", "dogs") in got and ("u00004", "user:box", "boxes") in got
    assert not any(u in ("u00001", "u00009") for u, _, _ in got)
    assert {c for u, c, _ in got if u == "u00008"} == {"user:dog", "user:bicycle"}
    assert all(m[2] == "lexical" and m[3] == 1.0 for m in _matches(word_cat))
    # "wolves" is irregular and this bank has no WordNet: only spaCy lemmatization finds it
    assert not any(u == "u00005" for u, _, _ in got)


def test_lexical_equals_metaclip_reference(tmp_path):
    rng = random.Random(0)
    vocab = TINY_WORDS + ["hot", "dog", "hotdog", "cathedral", "dogs", "boxes", "box"]
    caps = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 15))) + rng.choice([".", "!", ""])
            for _ in range(400)]
    cat = _catalog(tmp_path / "r.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=WORDS + ["man", "woman", "red ball"],
                                       wordnet_dir=NO_WN), progress=False)
    forms = load_form_concepts(cat, "first")
    oracle = naive_match(caps, forms)
    run_match(cat, MatchConfig(lexical={"unit_rows": 64}), progress=False)
    got: list[set[str]] = [set() for _ in caps]
    for uid, cid, *_ in _matches(cat):
        got[int(uid[1:])].add(cid)
    assert got == oracle
    assert sum(map(len, got)) > 300  # the comparison is not vacuous
    cat.close()


def test_overlaps_longest(word_cat):
    run_match(word_cat, MatchConfig(lexical={"overlaps": "longest"}), progress=False)
    assert [(c, s) for u, c, _, _, s in _matches(word_cat) if u == "u00003"] == [("user:hot dog", "hot dog")]


def test_lemmatize_with_spacy(word_cat):
    pytest.importorskip("spacy")
    try:
        run_match(word_cat, MatchConfig(lexical={"lemmatize": True}), progress=False)
    except RecipeError as e:
        pytest.skip(str(e))
    assert ("u00005", "user:wolf", "lexical", 1.0, "wolf") in _matches(word_cat)


def test_lexical_resume_after_kill(tmp_path, monkeypatch):
    rng = random.Random(1)
    caps = [" ".join(rng.choice(TINY_WORDS) for _ in range(10)) for _ in range(1000)]
    cfg = MatchConfig(lexical={"unit_rows": 100})
    ref = _catalog(tmp_path / "ref.duckdb", caps)
    build_concepts(ref, ConceptsConfig(imagenet1k=False, words=WORDS + ["man", "ball"], wordnet_dir=NO_WN), False)
    n_ref = run_match(ref, cfg, progress=False)
    expected = _matches(ref)
    ref.close()

    cat = _catalog(tmp_path / "k.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=WORDS + ["man", "ball"], wordnet_dir=NO_WN), False)
    calls = {"n": 0}
    orig = LexicalMatcher.match

    def dies_on_fourth_unit(self, captions, lemma_texts=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return orig(self, captions, lemma_texts)

    monkeypatch.setattr(LexicalMatcher, "match", dies_on_fourth_unit)
    with pytest.raises(KeyboardInterrupt):
        run_match(cat, cfg, progress=False)
    cat.close()
    cat = Catalog(tmp_path / "k.duckdb")  # reopen as a restarted process would
    assert cat.done_units("match_lexical") == {"0", "1", "2"}
    assert run_match(cat, cfg, progress=False) == n_ref
    assert calls["n"] == 4 + 7  # only the 7 unfinished units were matched again
    assert _matches(cat) == expected
    # done + unchanged: nothing is redone; changed config: rows replaced, not appended
    assert run_match(cat, cfg, progress=False) == n_ref and calls["n"] == 11
    run_match(cat, MatchConfig(lexical={"unit_rows": 100, "overlaps": "longest"}), progress=False)
    dup = "SELECT count(*) FROM (SELECT uid, concept_id FROM matches GROUP BY ALL HAVING count(*) > 1)"
    assert cat.scalar(dup) == 0
    cat.close()


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from curate.catalog import Catalog
from curate.match import LexicalMatcher, MatchConfig, run_match
orig = LexicalMatcher.match
def slow(self, captions, lemma_texts=None):
    out = orig(self, captions, lemma_texts)
    print("unit", flush=True)
    time.sleep(0.3)
    return out
LexicalMatcher.match = slow
run_match(Catalog({db!r}), MatchConfig(lexical={{"unit_rows": 100}}), progress=False)
print("finished", flush=True)
"""


def test_lexical_resume_after_sigkill(tmp_path):
    import subprocess
    import sys

    rng = random.Random(2)
    caps = [" ".join(rng.choice(TINY_WORDS) for _ in range(10)) for _ in range(1000)]
    words = ConceptsConfig(imagenet1k=False, words=WORDS + ["man", "ball"], wordnet_dir=NO_WN)
    ref = _catalog(tmp_path / "ref.duckdb", caps)
    build_concepts(ref, words, False)
    run_match(ref, MatchConfig(lexical={"unit_rows": 100}), progress=False)
    expected = _matches(ref)
    ref.close()
    db = tmp_path / "k.duckdb"
    cat = _catalog(db, caps)
    build_concepts(cat, words, False)
    cat.close()
    script = KILL_SCRIPT.format(repo=str(Path(__file__).resolve().parent.parent), db=str(db))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        while seen < 4:  # let it commit a few units, then kill it in the middle of the next ones
            line = proc.stdout.readline()
            assert line, "matcher subprocess ended early"
            seen += line.startswith("unit")
        proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    cat = Catalog(db)
    done = cat.done_units("match_lexical")
    assert 3 <= len(done) < 10  # killed mid-stage, with some units committed
    assert cat.scalar("SELECT count(*) FROM matches") > 0
    run_match(cat, MatchConfig(lexical={"unit_rows": 100}), progress=False)
    assert _matches(cat) == expected  # no loss, no duplicates
    cat.close()


def test_iter_units_exact_sizes(word_cat):
    units = list(iter_units(word_cat, 3))
    assert [len(u[1]) for u in units] == [3, 3, 2]  # 8 non-blank captions
    assert [u[0] for u in units] == [0, 1, 2]
    assert [x for u in units for x in u[1]] == sorted(x for u in units for x in u[1])


def test_match_config_errors():
    with pytest.raises(RecipeError, match=r"match: mode: .*got 'fuzzy'"):
        parse(MatchConfig, {"mode": "fuzzy"}, "match")
    with pytest.raises(RecipeError, match="match: lexical.sense: unknown key"):
        parse(MatchConfig, {"lexical": {"sense": "all"}}, "match")


def test_topk_matches_bruteforce():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    x = np.round(rng.normal(size=(230, 16)), 1).astype(np.float32)
    x[50] = x[10]  # an exact tie: the earlier caption must win
    uids = [f"c{i:03d}" for i in range(len(x))]
    top = TopK(q, 5, block=3)  # several query blocks
    for s in range(0, len(x), 64):
        top.add(x[s:s + 64], s)
    got = {}
    for qi, p, score in zip(*top.results()):
        got.setdefault(int(qi), []).append((uids[p], score))
    sims = q @ x.T
    for qi in range(len(q)):
        order = sorted(range(len(x)), key=lambda j: (-round(float(sims[qi, j]), 4), j))[:5]
        assert [u for u, _ in got[qi]] == [uids[j] for j in order]
        assert np.allclose([s for _, s in got[qi]], sims[qi, order], atol=1e-4)


def test_concept_prompt():
    assert concept_prompt("{name}, {gloss}", "dog", ["dog", "domestic dog"], "a canine") == "dog, a canine"
    assert concept_prompt("{name}, {gloss}", "dog", None, None) == "dog"
    assert concept_prompt("a photo of {lemmas}", "dog", ["dog", "pooch"], None) == "a photo of dog, pooch"


def test_semantic_tiny_encoder_and_cache(word_cat, tiny_text_dir, tmp_path, monkeypatch):
    from tether.encoders import TextEncoder

    monkeypatch.setenv("TETHER_PROMPT_CACHE", str(tmp_path / "prompts"))  # an empty prompt cache

    enc = TextEncoder.load(str(tiny_text_dir))
    calls = {"n": 0}
    orig = enc.encode

    def counting(texts, **kw):
        calls["n"] += 1
        return orig(texts, **kw)

    enc.encode = counting  # type: ignore[method-assign]
    from curate.match import run_semantic
    from curate.match.semantic import SemanticConfig

    cfg = SemanticConfig(model=str(tiny_text_dir), top_k=3, unit_rows=3, cache_dir=str(tmp_path / "cache"))
    n = run_semantic(word_cat, cfg, progress=False, encoder=enc)
    assert n == len(WORDS) * 3 and calls["n"] == 1 + 3  # prompts + three caption units
    rows = _matches(word_cat, "semantic")
    per = {}
    for uid, cid, method, score, span in rows:
        per.setdefault(cid, []).append(score)
        assert span is None and -1.0001 <= score <= 1.0001
    assert set(per) == {f"user:{w}" for w in WORDS} and all(len(v) == 3 for v in per.values())
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3
    # an embedding identical to a direct encode of the same caption
    uid, cid, _, score, _ = rows[0]
    cap = word_cat.scalar("SELECT caption FROM samples WHERE uid = ?", [uid])
    prompt = concept_prompt(cfg.prompt, cid[5:], [cid[5:]], None)
    e = orig([cap, prompt], normalize=True)
    assert abs(float(e[0] @ e[1]) - score) < 1e-4
    # killed before writing: rerun re-embeds no caption (cache) and no concept prompt (prompt cache)
    word_cat.execute("UPDATE stages SET status = 'running' WHERE stage = 'match_semantic'")
    word_cat.execute("DELETE FROM matches WHERE method = 'semantic'")
    calls["n"] = 0
    assert run_semantic(word_cat, cfg, progress=False, encoder=enc) == n and calls["n"] == 0
    assert _matches(word_cat, "semantic") == rows
    # without the prompt cache the prompts are embedded again
    monkeypatch.setenv("TETHER_PROMPT_CACHE", "off")
    word_cat.execute("UPDATE stages SET status = 'running' WHERE stage = 'match_semantic'")
    word_cat.execute("DELETE FROM matches WHERE method = 'semantic'")
    assert run_semantic(word_cat, cfg, progress=False, encoder=enc) == n and calls["n"] == 1
    assert _matches(word_cat, "semantic") == rows
    # min_score filters; "both" keeps the lexical rows beside the semantic ones
    strict = cfg.model_copy(update={"min_score": 0.999})
    assert run_semantic(word_cat, strict, progress=False, encoder=enc) < n


def test_semantic_by_model_path_in_both_mode(word_cat, tiny_text_dir, tmp_path):
    cfg = MatchConfig(mode="both", semantic={"model": str(tiny_text_dir), "top_k": 2})
    n = run_match(word_cat, cfg, progress=False)
    assert n == len(_matches(word_cat)) + len(_matches(word_cat, "semantic")) == 9 + 2 * len(WORDS)
    assert (word_cat.path.parent / "b.duckdb.cache" / "match_semantic").is_dir()


# --------------------------------------------------------------------------------------- real data
def _flickr_captions(flickr8k: Path) -> list[str]:
    caps = []
    for line in (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines():
        key, _, cap = line.partition("\t")
        if cap:
            caps.append(cap)
    return caps


DOG_RE = re.compile(r"\b(dog|dogs)\b", re.I)


@pytest.mark.real
def test_real_flickr8k_dog_captions(flickr8k, minilm_path, tmp_path):
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("Debian wordnet-base not installed")
    caps = _flickr_captions(flickr8k)
    assert len(caps) > 40_000
    cat = _catalog(tmp_path / "f.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=True, subtrees=[{"root": "n02084071", "max_depth": 2}]),
                   progress=False)
    run_match(cat, MatchConfig(), progress=False)
    dog_uids = {f"u{i:05d}" for i, c in enumerate(caps) if DOG_RE.search(c)}
    matched = {u for (u,) in cat.execute("SELECT uid FROM matches WHERE concept_id = 'n02084071'").fetchall()}
    assert len(dog_uids) > 5000 and matched == dog_uids  # every dog caption, and only those
    breeds = cat.execute("SELECT count(DISTINCT m.concept_id) FROM matches m JOIN concepts c USING (concept_id) "
                         "WHERE list_contains(c.hypernyms, 'n02084071')").fetchone()[0]
    assert breeds >= 5  # hyponyms (puppy, poodle, terrier, ...) matched too
    # whole words only, over all the matches of the ~40k captions: each span occurs with word boundaries
    n_all, n_whole = cat.execute(
        "SELECT count(*), count(*) FILTER (strpos(' ' || trim(regexp_replace(lower(s.caption), '[^a-z0-9]+', ' ', "
        "'g')) || ' ', ' ' || m.span || ' ') > 0) FROM matches m JOIN samples s USING (uid)").fetchone()
    assert n_all > 20_000 and n_whole == n_all
    cat.close()

    # semantic, real MiniLM, on a 600-caption subset: the top-20 captions of "dog" are dog captions
    sub = caps[:600]
    cat = _catalog(tmp_path / "s.duckdb", sub)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=["n02084071", "n02121808", "n02374451",
                                                                  "n02834778", "n09217230"]), progress=False)
    run_match(cat, MatchConfig(mode="semantic", semantic={"model": str(minilm_path), "top_k": 20}),
              progress=False)
    top = cat.execute("SELECT s.caption FROM matches m JOIN samples s USING (uid) WHERE m.concept_id = "
                      "'n02084071' ORDER BY m.score DESC").fetchall()
    assert len(top) == 20
    doggy = sum(bool(re.search(r"\b(dogs?|pupp(y|ies)|terriers?|poodles?|collies?)\b", c, re.I)) for (c,) in top)
    assert doggy >= 17, top
    cat.close()


def test_adjective_forms_are_not_matched(tmp_path):
    """With WordNet's person subtree, "white"/"black"/"young" are person nouns (White person, Black person,
    young = offspring) but in captions they are colours and ages: skip_adjectives (default) leaves them out,
    while true nouns (man, child) still match; skip_adjectives=false restores MetaCLIP's plain matching."""
    if not Path("/usr/share/wordnet/cntlist.rev").is_file():
        pytest.skip("Debian wordnet-base not installed")
    from curate.wordnet import adjective_words

    adj = adjective_words()
    assert {"white", "black", "young", "little", "red"} <= adj and not {"dog", "man", "orange", "husky"} & adj
    caps = ["A white dog runs .", "A young black man sits .", "A little child in red ."]
    cat = _catalog(tmp_path / "a.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, subtrees=[{"root": "n00007846", "max_depth": 3}]),
                   progress=False)
    run_match(cat, MatchConfig(), progress=False)
    spans = {s for (s,) in cat.execute("SELECT DISTINCT span FROM matches").fetchall()}
    assert {"man", "child"} <= spans and not spans & {"white", "black", "young", "little", "red"}
    run_match(cat, MatchConfig(lexical={"skip_adjectives": False}), progress=False)  # params changed: rerun
    spans = {s for (s,) in cat.execute("SELECT DISTINCT span FROM matches").fetchall()}
    assert {"white", "black", "man", "child"} <= spans
    cat.close()


def test_drop_rare_senses_unit():
    rows = [("spot", "spotlight", 11, "spot", True), ("spot", "place", 0, "spot", False),
            ("jeans", "denim", 0, "jean", True), ("crane", "bird", 1, "crane", False), ("x", "user", None, "x", False)]
    counts = {"spot": {0: 23, 11: 0, 1: 2}, "crane": {0: 4, 1: 3}}
    kept, dropped = drop_rare_senses(rows, counts, 0.25)
    assert dropped == ["spot:spotlight"] and [r[1] for r in kept] == ["place", "denim", "bird", "user"]
    assert drop_rare_senses(rows, counts, 0.0) == (rows, [])


def test_rare_senses_are_not_matched(tmp_path):
    """"spots" names the ImageNet class "spotlight, spot" but SemCor never tags that sense of "spot" (0 vs 23
    tags for its first sense): min_sense_share 0.25 leaves it out; 0 (the default) matches it."""
    if not Path("/usr/share/wordnet/cntlist.rev").is_file():
        pytest.skip("Debian wordnet-base not installed")
    caps = ["A dog with brown spots sits on a park bench .", "A man in jeans and a sweatshirt ."]
    cat = _catalog(tmp_path / "a.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=True, subtrees=[]), progress=False)
    run_match(cat, MatchConfig(lexical={"min_sense_share": 0.25}), progress=False)
    spans = {s for (s,) in cat.execute("SELECT DISTINCT span FROM matches").fetchall()}
    assert {"park bench", "jeans", "sweatshirt"} <= spans and "spots" not in spans
    params = json.loads(cat.scalar("SELECT params FROM stages WHERE stage = 'match_lexical'"))
    assert "spots:n04286575" in params["dropped_rare_senses"]
    run_match(cat, MatchConfig(), progress=False)  # params changed: rerun
    spans = {s for (s,) in cat.execute("SELECT DISTINCT span FROM matches").fetchall()}
    assert "spots" in spans
    cat.close()


# ------------------------------------------------------------------------------- sense-choice rules (issue 13)
def _need_wordnet():
    from curate.wordnet import find_wordnet

    try:
        if not (find_wordnet() / "cntlist.rev").is_file():
            pytest.skip("WordNet without cntlist.rev")
    except RecipeError as e:
        pytest.skip(str(e))


def test_plan_own_word_first_unit():
    """own_word_first: a form that is a lemma of its own is not also the plural of another lemma, unless SemCor
    tags that other lemma more often (glasses: glass); off, both readings stay."""
    from curate.match.lexical import LexicalConfig, WordNetFacts, plan_forms

    rows = [("sunglasses", "n_sunglasses", 0, "sunglasses", False), ("sunglasses", "n_sunglass", 0, "sunglass", False),
            ("sunglass", "n_sunglass", 0, "sunglass", False),
            ("glasses", "n_spectacles", 0, "glasses", False), ("glasses", "n_glass", 0, "glass", False)]
    facts = WordNetFacts(sense_counts={"glass": {0: 22, 1: 12}, "glasses": {0: 4}})
    off = plan_forms(rows, LexicalConfig(skip_adjectives=False), facts)
    assert off.forms["sunglasses"] == ("n_sunglass", "n_sunglasses") and off.removed == {}
    on = plan_forms(rows, LexicalConfig(skip_adjectives=False, own_word_first=True), facts)
    assert on.forms["sunglasses"] == ("n_sunglasses",) and on.forms["sunglass"] == ("n_sunglass",)
    assert on.forms["glasses"] == ("n_glass", "n_spectacles")  # glass is tagged more often than glasses
    assert on.removed == {"sunglasses": {"n_sunglass": 4}} and on.summary["dropped_plural_readings"] == [
        "sunglasses:n_sunglass"]


def test_lexical_config_rules_validate():
    from curate.match.lexical import LexicalConfig

    assert LexicalConfig(compounds=False, pos=False).pos == "off"  # YAML's unquoted `off`
    for bad in ({"compounds": "all"}, {"pos": "verb"}, {"uncounted_senses": "some"}, {"pos_ambiguity": -1}):
        with pytest.raises(ValueError):
            LexicalConfig(**bad)


RULE_CAPTIONS = ["A girl in a tank top stands by a tank .",          # tank top blocks tank; the second tank stays
                 "Three children in bathing suits play .",          # bathing suit is not a suit
                 "A baseball player runs .",                        # a baseball player IS a player
                 "A young man walks .",                             # young man → boyfriend is a rare sense: man stays
                 "A man paddles down the rapids .",                 # paddles: a verb
                 "He holds a wooden paddle .",                      # paddle: a noun
                 "A lady wearing sunglasses .",                     # sunglasses, not sunglass + s
                 "Three kites in the air .",                        # the toy kite comes first: not the hawk
                 "A swimmer in the pool ."]                         # both senses of swimmer are persons: kept
RULE_BANK = ["n04389033", "n04350905", "n10439851", "n10287213", "n03873416", "n04355933", "n04356056",
             "n01608432", "n10683126", "n09871364", "n09835506"]
PRECISE = {"min_sense_share": 0.25, "adjective_ratio": 0.5, "uncounted_senses": "same_kind", "own_word_first": True,
           "compounds": "wordnet", "pos": "noun_or_proper"}


def test_rules_on_real_wordnet_with_reasons(tmp_path):
    """The precise settings on captions with each error class: the wrong pairs go, each with its reason in
    lexical_removed, the right ones stay; the card counts what each rule removed."""
    _need_wordnet()
    pytest.importorskip("spacy")
    from curate.match.lexical import card_lines

    cat = _catalog(tmp_path / "c.duckdb", RULE_CAPTIONS)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=RULE_BANK), progress=False)
    try:
        run_match(cat, MatchConfig(lexical=PRECISE), progress=False)
    except RecipeError as e:
        pytest.skip(f"no spaCy English pipeline: {e}")
    got = set(cat.execute("SELECT uid, concept_id FROM matches").fetchall())
    gone = {(u, c): r for u, c, r in cat.execute("SELECT uid, concept_id, reason FROM lexical_removed").fetchall()}
    assert got == {("u00000", "n04389033"), ("u00002", "n10439851"), ("u00002", "n09835506"),
                   ("u00003", "n10287213"), ("u00004", "n10287213"), ("u00005", "n03873416"),
                   ("u00006", "n04356056"), ("u00008", "n10683126")}
    assert gone[("u00001", "n04350905")] == "inside_compound"
    assert gone[("u00003", "n09871364")] == "rare_sense"
    assert gone[("u00004", "n03873416")] == "not_a_noun"
    assert gone[("u00006", "n04355933")] == "plural_reading"
    assert gone[("u00007", "n01608432")] == "uncounted_sense"
    assert not set(gone) & got
    card = "\n".join(card_lines(cat))
    assert "| not_a_noun | 1 |" in card and "| inside_compound | 1 |" in card and "Wilson" in card
    # the plain matcher (rules off) finds every one of them
    run_match(cat, MatchConfig(lexical={"adjective_ratio": 0.5}), progress=False)
    plain = set(cat.execute("SELECT uid, concept_id FROM matches").fetchall())
    assert plain >= got | set(gone)
    assert cat.scalar("SELECT count(*) FROM lexical_removed") == 0  # a fresh run forgets the old reasons
    cat.close()


def test_rules_resume_after_kill_same_rows(tmp_path, monkeypatch):
    """With the rules on, a killed run resumes to exactly the matches AND removed rows of an uninterrupted one."""
    _need_wordnet()
    caps = RULE_CAPTIONS * 7
    cfg = {**PRECISE, "pos": "off", "unit_rows": 10}  # (no tagger: this checks the unit bookkeeping)
    clean = _catalog(tmp_path / "a.duckdb", caps)
    build_concepts(clean, ConceptsConfig(imagenet1k=False, words=RULE_BANK), progress=False)
    run_match(clean, MatchConfig(lexical=cfg), progress=False)
    want = (_matches(clean), clean.execute("SELECT * FROM lexical_removed ORDER BY ALL").fetchall())
    clean.close()
    cat = _catalog(tmp_path / "b.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=RULE_BANK), progress=False)
    orig, calls = LexicalMatcher.match, {"n": 0}

    def dies_on_third_unit(self, captions, lemma_texts=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return orig(self, captions, lemma_texts)

    monkeypatch.setattr(LexicalMatcher, "match", dies_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        run_match(cat, MatchConfig(lexical=cfg), progress=False)
    monkeypatch.setattr(LexicalMatcher, "match", orig)
    run_match(cat, MatchConfig(lexical=cfg), progress=False)
    assert want[1] and (_matches(cat), cat.execute("SELECT * FROM lexical_removed ORDER BY ALL").fetchall()) == want
    cat.close()


def test_name_and_agreement_helpers():
    """in_a_name: a capitalised word running on into another capitalised word, not the name's last word, not in
    title case; singular_phrase_verb: NNS after a singular noun in a phrase a singular determiner opens."""
    from curate.match.lexical import WORD, in_a_name, singular_phrase_verb

    def name(cap, word):
        sp = [m.span() for m in WORD.finditer(cap)]
        j = [cap[a:b].lower() for a, b in sp].index(word)
        return in_a_name(cap, sp, j, j)

    assert name("A man in a Spider-Man costume .", "spider")          # hyphen-joined
    assert name("Spider-Man poses .", "spider")                       # hyphen-joined, even first in the caption
    assert name("Kids on a ride called the Frog Hopper .", "frog")
    assert not name("Tourists below the Eiffel Tower .", "tower")     # the name's last word: its head
    assert not name("Frog Hopper ride for kids .", "frog")            # first word, space-joined: case says nothing
    assert not name("A Frog Sits On A Green Leaf .", "frog")          # title case
    assert not name("A frog and a Tower .", "frog") and not name("Two guys play Cricket", "cricket")
    assert not name("A Spider-man", "spider")                         # the next word is not capitalised
    # tags as the tagger gives them per word of the window
    assert singular_phrase_verb("A girl swings on a nice", ["DT", "NN", "NNS", "IN", "DT", "JJ"], 2, 1)
    assert singular_phrase_verb("a green boat paddles through the", ["DT", "JJ", "NN", "NNS", "IN", "DT"], 3, 2)
    assert not singular_phrase_verb("A few girl swings", ["DT", "JJ", "NN", "NNS"], 3, 1)       # quantifier
    assert not singular_phrase_verb("The girl swings on", ["DT", "NN", "NNS", "IN"], 2, 1)      # not singular
    assert not singular_phrase_verb("A heron , wings ,", ["DT", "NN", "NNS"], 2, 1)             # a comma between
    assert not singular_phrase_verb("a silver helmet , knee pads ,", ["DT", "JJ", "NN", "NN", "NNS"], 4, 2)
    assert not singular_phrase_verb("a man wearing sunglasses", ["DT", "NN", "VBG", "NNS"], 3, 1)
    assert not singular_phrase_verb("A girl swings", ["DT", "NN", "VBZ"], 2, 1)                 # tagged a verb


def test_names_and_agreement_rules_on_real_wordnet(tmp_path):
    """names + pos_context in the matcher: Spider-Man and the Frog Hopper are no spider or frog, and "a girl
    swings" / "a green boat paddles" are verbs the tagger reads as plural nouns, "a brunette girl" an adjective; each with its reason. Off, the
    precise settings keep them all; the nouns stay either way."""
    _need_wordnet()
    pytest.importorskip("spacy")
    caps = ["A man in a Spider-Man bedspread .", "Kids on a ride called the Frog Hopper .", "A girl swings on a nice day .",
            "A kayaker in a green boat paddles through the rapids .", "A spider on a web .",
            "A green frog on a leaf .", "Two girls on the swings .", "A man with two paddles .",
            "Tourists below the Eiffel Tower .", "A little brunette girl smiles .", "A brunette in a red coat ."]
    bank = ["n01772222", "n01639765", "n04371774", "n03873416", "n04460130", "n09877856"]
    cat = _catalog(tmp_path / "c.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=bank), progress=False)
    try:
        run_match(cat, MatchConfig(lexical=PRECISE), progress=False)
    except RecipeError as e:
        pytest.skip(f"no spaCy English pipeline: {e}")
    before = set(cat.execute("SELECT uid, concept_id FROM matches").fetchall())
    run_match(cat, MatchConfig(lexical={**PRECISE, "names": True, "pos_context": True}), progress=False)
    got = set(cat.execute("SELECT uid, concept_id FROM matches").fetchall())
    gone = {(u, c): r for u, c, r in cat.execute("SELECT uid, concept_id, reason FROM lexical_removed").fetchall()}
    assert before - got == {("u00000", "n01772222"), ("u00001", "n01639765"), ("u00002", "n04371774"),
                            ("u00003", "n03873416"), ("u00009", "n09877856")} and got <= before
    assert gone[("u00000", "n01772222")] == gone[("u00001", "n01639765")] == "in_a_name"
    assert gone[("u00002", "n04371774")] == gone[("u00003", "n03873416")] == gone[("u00009", "n09877856")] \
        == "not_a_noun"  # (a brunette girl: an adjective before a noun, whatever the tagger said)
    assert {("u00004", "n01772222"), ("u00005", "n01639765"), ("u00006", "n04371774"), ("u00007", "n03873416"),
            ("u00008", "n04460130"), ("u00010", "n09877856")} <= got
    from curate.match.lexical import card_lines

    assert "| in_a_name | 2 |" in "\n".join(card_lines(cat))
    cat.close()


def test_pos_tagger_aligns_with_normalized_words():
    pytest.importorskip("spacy")
    from curate.concepts import normalize
    from curate.match.lexical import PosTagger

    try:
        tagger = PosTagger()
    except RecipeError as e:
        pytest.skip(str(e))
    caps = ["A blonde-haired man paddles down the rapids with a paddle .", "Domino's Pizza sign", "",
            "İstanbul street"]
    tags = tagger(caps)
    assert [len(t) if t is not None else None for t in tags] == [len(normalize(c).split()) if c else 0
                                                                 for c in caps[:3]] + [None]
    words = normalize(caps[0]).split()
    assert tags[0][words.index("paddles")].startswith("VB") and tags[0][words.index("paddle")] == "NN"
    assert tags[0][words.index("blonde")] == "JJ" and tags[0][words.index("haired")] != "NN"
    assert tagger.captions == 4


def test_rules_on_hostile_captions(tmp_path):
    """The precise settings on captions that are blank, punctuation only, odd Unicode (lowercasing changes the
    length), very long, or full of control characters: no error, hits kept when the tagger cannot align."""
    _need_wordnet()
    pytest.importorskip("spacy")
    caps = [None, "", "   ", "?!.,;", "İSTANBUL: a girl swings on a swing", "swing " * 400, "a\tswing\nswings\x00 .",
            "Swings", "A MAN PADDLES A KAYAK"]
    cat = _catalog(tmp_path / "c.duckdb", caps)
    build_concepts(cat, ConceptsConfig(imagenet1k=False, words=["n04371774", "n03873416"]), progress=False)
    try:
        run_match(cat, MatchConfig(lexical=PRECISE), progress=False)
    except RecipeError as e:
        pytest.skip(f"no spaCy English pipeline: {e}")
    got = dict(cat.execute("SELECT uid, count(*) FROM matches GROUP BY 1").fetchall())
    assert got.get("u00004") == 1  # Unicode that lowercases longer (İ) does not derail the word positions
    assert got.get("u00005") == 1 and "u00008" not in got  # "paddles a kayak": a verb before a determiner
    assert {"u00000", "u00001", "u00002", "u00003"}.isdisjoint(got)
    cat.close()
