"""Concept bank: WordNet reader, ImageNet lists from timm, user lists, surface forms (curate/concepts.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from curate.catalog import Catalog
from curate.concepts import (ConceptsConfig, Subtree, build_concepts, normalize, plural_forms, regular_plural,
                             timm_info_dir)
from tether.recipe import RecipeError, parse
from curate.wordnet import WordNet, find_wordnet

DEBIAN_WN = Path("/usr/share/wordnet")
NO_WN = "nonexistent-wordnet-dir"  # makes a test independent of any installed WordNet


def _has_debian_wordnet():
    if not (DEBIAN_WN / "data.noun").is_file():
        pytest.skip("Debian wordnet-base not installed (/usr/share/wordnet/data.noun missing)")


def _has_timm():
    try:
        timm_info_dir()
    except RecipeError as e:
        pytest.skip(str(e))


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "build.duckdb")
    yield c
    c.close()


# A three-synset WordNet in the wndb(5WN) format, zipped the way NLTK ships it.
TINY_DATA_NOUN = (
    "  1 This is a licence header line\n"
    "00001740 03 n 01 entity 0 001 ~ 00002000 n 0000 | that which exists  \n"
    "00002000 05 n 02 dog 0 domestic_dog 0 002 @ 00001740 n 0000 ~ 00003000 n 0000 | a domesticated canine; "
    "\"the dog barked\"  \n"
    "00003000 05 n 01 puppy 0 001 @ 00002000 n 0000 | a young dog  \n"
)
TINY_INDEX_NOUN = (
    "  1 licence\n"
    "dog n 1 2 @ ~ 1 0 00002000  \n"
    "domestic_dog n 1 2 @ ~ 1 0 00002000  \n"
    "entity n 1 1 ~ 1 0 00001740  \n"
    "puppy n 1 1 @ 1 0 00003000  \n"
)


def test_wordnet_reader_on_tiny_nltk_zip(tmp_path):
    z = tmp_path / "nltk_data" / "corpora" / "wordnet.zip"
    z.parent.mkdir(parents=True)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("wordnet/data.noun", TINY_DATA_NOUN)
        zf.writestr("wordnet/index.noun", TINY_INDEX_NOUN)
        zf.writestr("wordnet/noun.exc", "puppies puppy\n")
    assert find_wordnet(tmp_path / "nltk_data") == z
    wn = WordNet.load(tmp_path / "nltk_data")
    assert len(wn) == 3
    dog = wn.synset("n00002000")
    assert dog.lemmas == ["dog", "domestic_dog"]
    assert dog.definition == "a domesticated canine"
    assert dog.hypernyms == ["n00001740"] and dog.hyponyms == ["n00003000"]
    assert wn.hypernym_path("n00003000") == ("n00001740", "n00002000")
    assert wn.depth("n00001740") == 0 and wn.depth("n00003000") == 2
    assert wn.descendants("n00001740", max_depth=1) == ["n00001740", "n00002000"]
    assert wn.first_sense("Domestic Dog") == "n00002000"
    assert wn.plurals["puppy"] == ["puppies"]


def test_missing_wordnet_is_one_clear_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        find_wordnet(tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install wordnet-base" in msg and "nltk" in msg


def test_debian_wordnet_reader():
    _has_debian_wordnet()
    wn = WordNet.load(DEBIAN_WN)
    assert len(wn) == 82115  # WordNet 3.0 noun synsets
    dog = wn.synset("n02084071")
    assert dog.lemmas[:2] == ["dog", "domestic_dog"]
    assert dog.definition.startswith("a member of the genus Canis") and '"' not in dog.definition
    assert wn.depth("n02084071") == 8  # as NLTK's dog.n.01.min_depth()
    path = wn.hypernym_path("n02084071")
    assert path[0] == "n00001740" and path[-1] in wn.synset("n02084071").hypernyms
    assert "n01322604" in wn.descendants("n02084071", 1)  # puppy
    assert wn.first_sense("dog") == "n02084071" and wn.sense_rank("dog", "n10114209") == 1  # frump
    assert wn.plurals["mouse"] == ["mice"]


def test_inflections():
    assert [regular_plural(w) for w in ("dog", "box", "bench", "city", "day", "bus")] == \
        ["dogs", "boxes", "benches", "cities", "days", "buses"]
    assert plural_forms("hot dog") == ["hot dogs"]
    assert plural_forms("field mouse", {"mouse": ["mice"]}) == ["field mice", "field mouses"]
    assert plural_forms("fireman", {"fireman": ["firemen"]}) == ["firemen", "firemans"]
    assert plural_forms("young woman") == ["young women", "young womans"]  # WordNet's -men rule, not in noun.exc
    assert plural_forms("2") == []
    assert plural_forms("stomach") == ["stomaches", "stomachs"]
    assert normalize("  St. Bernard's   DOG!") == "st bernard s dog"


def test_user_list_bank_without_wordnet(cat, tmp_path):
    lst = tmp_path / "mine.txt"
    lst.write_text("# my concepts\nDog\nhot dog\tsausage in a bun\n\nbox\nit\ndog\n", encoding="utf-8")
    cfg = ConceptsConfig(imagenet1k=False, user_list=str(lst), words=["bicycle"], wordnet_dir=NO_WN)
    assert build_concepts(cat, cfg, progress=False) == 5
    rows = cat.execute("SELECT concept_id, name, lemmas, gloss, depth, hypernyms, imagenet1k, origin "
                       "FROM concepts ORDER BY concept_id").fetchall()
    assert [r[0] for r in rows] == ["user:bicycle", "user:box", "user:dog", "user:hot dog", "user:it"]
    hot = rows[3]
    assert hot[1] == "hot dog" and hot[2] == ["hot dog"] and hot[3] == "sausage in a bun"
    assert hot[4] is None and hot[5] == [] and hot[6] is False and hot[7] == "user"
    forms = dict(cat.execute("SELECT form, concept_id FROM surface_forms").fetchall())
    assert forms["boxes"] == "user:box" and forms["hot dogs"] == "user:hot dog" and forms["dogs"] == "user:dog"
    assert "it" not in forms  # a stop word never becomes a surface form
    # idempotent: rebuilding replaces, never appends
    before = cat.scalar("SELECT count(*) FROM surface_forms")
    build_concepts(cat, cfg, progress=False)
    assert cat.scalar("SELECT count(*) FROM concepts") == 5
    assert cat.scalar("SELECT count(*) FROM surface_forms") == before
    # size cap keeps the priority order (user list first, inline words after the file)
    capped = cfg.model_copy(update={"max_concepts": 2})
    assert build_concepts(cat, capped, progress=False) == 2
    assert {r[0] for r in cat.execute("SELECT concept_id FROM concepts").fetchall()} == {"user:bicycle", "user:dog"}


def test_bad_concept_inputs(cat, tmp_path):
    with pytest.raises(RecipeError, match="user_list: file not found"):
        build_concepts(cat, ConceptsConfig(imagenet1k=False, user_list=str(tmp_path / "absent.txt")), False)
    (tmp_path / "bin.txt").write_bytes(b"dog\n\xff\xfe cat\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        build_concepts(cat, ConceptsConfig(imagenet1k=False, user_list=str(tmp_path / "bin.txt")), False)
    (tmp_path / "ids.txt").write_text("n02084071\n")
    with pytest.raises(RecipeError, match="apt-get install wordnet-base"):
        build_concepts(cat, ConceptsConfig(imagenet1k=False, user_list=str(tmp_path / "ids.txt"),
                                           wordnet_dir=str(tmp_path / "nowordnet")), False)
    with pytest.raises(RecipeError, match="selects no concepts"):
        build_concepts(cat, ConceptsConfig(imagenet1k=False, wordnet_dir=NO_WN), False)
    with pytest.raises(RecipeError, match="concepts: max_concept: unknown key"):
        parse(ConceptsConfig, {"max_concept": 3}, "concepts")
    # the failed builds left nothing behind
    assert cat.scalar("SELECT count(*) FROM concepts") == 0


def test_imagenet1k_bank(cat):
    _has_debian_wordnet()
    _has_timm()
    assert build_concepts(cat, ConceptsConfig(), progress=False) == 1000
    n, named, glossed, in1k, with_depth = cat.execute(
        "SELECT count(*), count(*) FILTER (len(lemmas) > 0 AND name = lemmas[1]), "
        "count(*) FILTER (length(gloss) > 10), count(*) FILTER (imagenet1k), "
        "count(*) FILTER (depth = len(hypernyms) AND hypernyms[1] = 'n00001740') FROM concepts").fetchone()
    assert (n, named, glossed, in1k, with_depth) == (1000, 1000, 1000, 1000, 1000)
    assert cat.scalar("SELECT origin FROM concepts WHERE concept_id = 'n02085620'") == "imagenet1k"
    assert cat.scalar("SELECT name FROM concepts WHERE concept_id = 'n02085620'") == "Chihuahua"
    crane = cat.execute("SELECT concept_id, sense_rank FROM surface_forms WHERE form = 'cranes' "
                        "ORDER BY concept_id").fetchall()
    assert crane == [("n02012849", 4), ("n03126707", 3)]  # the bird and the machine, WordNet sense order
    assert cat.scalar("SELECT concept_id FROM surface_forms WHERE form = 'great white sharks'") == "n01484850"


def test_forms_record_their_lemma(cat):
    _has_debian_wordnet()
    cfg = ConceptsConfig(imagenet1k=False, words=["n10287213", "n08212347"], wordnet_dir=str(DEBIAN_WN))
    build_concepts(cat, cfg, progress=False)  # man (adult male) and work force (whose lemmas include "men")
    rows = cat.execute("SELECT concept_id, kind, lemma, sense_rank FROM surface_forms WHERE form = 'men' "
                       "ORDER BY concept_id").fetchall()
    assert rows == [("n08212347", "lemma", "men", 0), ("n10287213", "inflection", "man", 0)]


def test_subtree_and_hyponym_expansion(cat):
    _has_debian_wordnet()
    cfg = ConceptsConfig(imagenet1k=False, subtrees=[{"root": "dog", "max_depth": 1}], wordnet_dir=str(DEBIAN_WN))
    n = build_concepts(cat, cfg, progress=False)
    wn = WordNet.load(DEBIAN_WN)
    assert n == 1 + len(wn.synset("n02084071").hyponyms)
    assert cat.scalar("SELECT origin FROM concepts WHERE concept_id = 'n01322604'") == "subtree:n02084071"
    assert cat.scalar("SELECT depth FROM concepts WHERE concept_id = 'n01322604'") == 9
    # max_depth 1 stops above the breeds; at 2 the ImageNet-1k breeds come in, flagged as ImageNet-1k classes
    assert cat.scalar("SELECT count(*) FROM concepts WHERE concept_id = 'n02085620'") == 0
    build_concepts(cat, cfg.model_copy(update={"subtrees": [Subtree(root="n02084071", max_depth=2)]}), False)
    flags = dict(cat.execute("SELECT concept_id, imagenet1k FROM concepts").fetchall())
    assert flags["n02085620"] is True and flags["n02084071"] is False  # Chihuahua is a class, dog is not
    # a user wnid expanded to all its hyponyms
    cfg = ConceptsConfig(imagenet1k=False, words=["n02121808"], hyponyms=True, wordnet_dir=str(DEBIAN_WN))
    n = build_concepts(cat, cfg, progress=False)
    assert n == len(wn.descendants("n02121808"))  # domestic cat and every kind of it
    assert cat.scalar("SELECT origin FROM concepts WHERE concept_id = 'n02124075'") == "hyponym:n02121808"
    with pytest.raises(RecipeError, match="neither a WordNet noun"):
        build_concepts(cat, ConceptsConfig(imagenet1k=False, subtrees=[{"root": "qwzx"}]), False)


def test_wordnet_pos_facts_for_sense_choice(tmp_path):
    """What match.lexical's sense-choice rules read from WordNet: lexicographer files, SemCor noun / non-noun tag
    counts, verb/adjective/adverb lemmas, noun collocations; the index readers work on an NLTK zip too."""
    from curate.wordnet import non_noun_lemmas, noun_collocations, pos_tag_counts

    _has_debian_wordnet()
    wn = WordNet.load(DEBIAN_WN)
    assert wn.synset("n01608432").lexfile == 5 and wn.synset("n03621473").lexfile == 6  # kite: hawk, toy
    counts = pos_tag_counts(DEBIAN_WN)
    noun, other = counts["swing"]
    assert other > 10 * noun > 0  # mostly a verb
    noun, other = counts["dog"]
    assert noun > 10 * other
    nn = non_noun_lemmas(DEBIAN_WN)
    assert {"swing", "stand in", "blond", "fly"} <= nn and "kangaroo" not in nn
    assert "stand in" not in non_noun_lemmas(DEBIAN_WN, ("index.adj", "index.adv"))
    cols = noun_collocations(DEBIAN_WN)
    assert {"tank top", "bathing suit", "water wings", "hot dog"} <= cols and "dog" not in cols
    z = tmp_path / "wordnet.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("wordnet/data.noun", TINY_DATA_NOUN)
        zf.writestr("wordnet/index.noun", TINY_INDEX_NOUN)
        zf.writestr("wordnet/index.verb", "  1 licence line\ndog v 1 1 @ 1 0 01234567  \n")
    assert non_noun_lemmas(z) == {"dog"} and noun_collocations(z) == {"domestic dog"}
