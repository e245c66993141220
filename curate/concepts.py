"""Concept bank: which visual concepts a build looks for, and the surface forms that name them.

``build_concepts(cat, cfg)`` writes two catalog tables, idempotently (one transaction: delete + rewrite):

* ``concepts(concept_id, name, lemmas, gloss, depth, hypernyms, imagenet1k, origin)`` — ``concept_id`` is an
  ImageNet/WordNet id (``n02084071``) or ``user:<word>`` for a plain word from a user list;
* ``surface_forms(form, concept_id, sense_rank, kind, lemma)`` — every lowercased, punctuation-free lemma
  name (``_`` → space) and, with ``inflections: true``, its plural forms (``dog`` → ``dogs``; irregular ones
  from WordNet's ``noun.exc``: ``mouse`` → ``mice``, ``fireman`` → ``firemen``). ``lemma`` is the normalized
  lemma the form derives from, ``sense_rank`` the concept's position among that lemma's WordNet senses (0 = most
  frequent); both drive the matcher's ambiguity policy. ``kind`` is ``lemma`` or ``inflection``.

Concept sets (combinable; duplicates collapse to the first origin in this priority order, which is also the
order a ``max_concepts`` cap keeps): the user list, ImageNet-1k, WordNet subtrees, ImageNet-21k, then hyponym
expansion. ImageNet class lists are read by path from the files that ship inside the ``timm`` package
(``timm/data/_info``, located by :func:`tether.resources.timm_info_dir`; timm is never imported). WordNet
comes from :mod:`curate.wordnet`. A user list with plain words only needs neither.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
from pydantic import Field

from curate.catalog import TABLES, Catalog, arrow_views
from tether.recipe import RecipeError, Strict, read_text_file, resolve_path
from tether.resources import imagenet_wnids, timm_info_dir
from curate.wordnet import WordNet, irregular_plurals

WNID_RE = re.compile(r"^n\d{8}$")
NON_WORD = re.compile(r"[\W_]+")

SURFACE_FORMS_DDL = TABLES["surface_forms"]  # the catalog schema lives in curate/catalog.py

def normalize(text: str) -> str:
    """Lowercase; every run of punctuation, ``_`` and whitespace becomes one space; trimmed.

    Captions and surface forms go through the same function, so ``"St. Bernard's"`` and lemma
    ``St_Bernard`` meet as ``st bernard``.
    """
    return NON_WORD.sub(" ", text.lower()).strip()


# --------------------------------------------------------------------------------------------- config
class Subtree(Strict):
    """A WordNet subtree: ``root`` (a wnid, or a noun meaning its most frequent sense) and its hyponyms."""

    root: str
    max_depth: int | None = Field(None, ge=0, description="levels below root to include (None: all)")


class ConceptsConfig(Strict):
    """Which concepts a build uses (recipe section ``concepts``)."""

    imagenet1k: bool = True
    imagenet21k: bool = False
    subtrees: list[Subtree] = Field(default_factory=list)
    user_list: str | None = Field(None, description="file: one wnid or plain word per line (word<TAB>gloss ok)")
    words: list[str] = Field(default_factory=list, description="plain words given inline (user concepts)")
    hyponyms: bool = Field(False, description="also add every hyponym of each selected WordNet concept")
    hyponym_depth: int | None = Field(None, ge=1, description="levels of hyponyms to add (None: all)")
    max_concepts: int | None = Field(None, ge=1, description="cap; keeps concepts in priority order")
    inflections: bool = Field(True, description="add plural forms of every lemma")
    drop_stopword_forms: bool = Field(True, description="drop forms that are English function words or numbers")
    min_form_chars: int = Field(2, ge=1)
    wordnet_dir: str | None = Field(None, description="WordNet dict dir / NLTK data dir (None: search)")


# --------------------------------------------------------------------------------------------- inflection
_SIBILANT_ENDS = ("s", "x", "z", "ch", "sh")
_VOWELS = set("aeiou")


def regular_plural(word: str) -> str:
    """English regular plural of one word (``box`` → ``boxes``, ``city`` → ``cities``, ``dog`` → ``dogs``)."""
    if word.endswith(_SIBILANT_ENDS):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        return word[:-1] + "ies"
    return word + "s"


def plural_forms(form: str, irregular: dict[str, list[str]] | None = None) -> list[str]:
    """Plural(s) of a normalized noun phrase; the last word is the head (``hot dog`` → ``hot dogs``).

    ``irregular`` maps a lemma (whole phrase or head word) to irregular plurals (WordNet ``noun.exc``). Those
    are alternatives, not replacements (``camera`` → ``camerae`` and ``cameras``; ``brother`` → ``brethren``
    and ``brothers``), and ``noun.exc`` leaves out what WordNet's own ``-men`` → ``-man`` rule covers, so
    ``woman`` → ``women`` is generated here. A spurious extra (``mouses``) costs nothing: it never occurs.
    """
    irregular = irregular or {}
    head, sep, last = form.rpartition(" ")
    if not last.isalpha():
        return []
    out = [normalize(p) for p in irregular.get(form, [])]
    out += [f"{head}{sep}{normalize(p)}" for p in irregular.get(last, [])]
    if last.endswith("man"):
        out.append(f"{head}{sep}{last[:-3]}men")
    out.append(f"{head}{sep}{regular_plural(last)}")
    if last.endswith("ch"):  # /k/ sound: stomach → stomachs, monarch → monarchs
        out.append(f"{head}{sep}{last}s")
    return list(dict.fromkeys(p for p in out if p))


def _stopwords() -> frozenset[str]:
    """spaCy's English stop-word list. Its module is a plain word list: it is executed by path, because
    importing the ``spacy`` package costs seconds and nothing else of spaCy is needed here."""
    spec = importlib.util.find_spec("spacy")
    if spec is not None and spec.submodule_search_locations:
        f = Path(list(spec.submodule_search_locations)[0]) / "lang" / "en" / "stop_words.py"
        if f.is_file():
            ns: dict = {}
            exec(compile(f.read_text(encoding="utf-8"), str(f), "exec"), ns)
            if isinstance(ns.get("STOP_WORDS"), (set, frozenset)):
                return frozenset(ns["STOP_WORDS"])
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


# --------------------------------------------------------------------------------------------- ImageNet
def imagenet_names() -> dict[str, tuple[list[str], str]]:
    """wnid → (lemma names, definition) from timm's ``imagenet_synset_to_{lemma,definition}.txt``."""
    d = timm_info_dir()
    out: dict[str, tuple[list[str], str]] = {}
    defs = {}
    for ln in (d / "imagenet_synset_to_definition.txt").read_text(encoding="utf-8").splitlines():
        w, _, g = ln.partition("\t")
        defs[w] = g.strip()
    for ln in (d / "imagenet_synset_to_lemma.txt").read_text(encoding="utf-8").splitlines():
        w, _, lem = ln.partition("\t")
        out[w] = ([x.strip() for x in lem.split(",") if x.strip()], defs.get(w, ""))
    return out


# --------------------------------------------------------------------------------------------- bank
@dataclass
class Concept:
    concept_id: str
    lemmas: list[str]
    gloss: str | None
    origin: str
    depth: int | None = None
    hypernyms: list[str] = field(default_factory=list)
    imagenet1k: bool = False

    @property
    def name(self) -> str:
        return self.lemmas[0] if self.lemmas else self.concept_id


def _read_user_list(path: Path) -> list[tuple[str, str | None, int]]:
    """(wnid or word, optional gloss, line number) for every non-blank, non-comment line."""
    text = read_text_file(path, f"concepts.user_list: file not found: {path}", f"concepts.user_list: {path}")
    out = []
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        word, _, gloss = ln.partition("\t")
        out.append((word.strip(), gloss.strip() or None, i))
    return out


def _needs_wordnet(cfg: ConceptsConfig, user_entries: list[tuple[str, str | None, int]]) -> bool:
    return (cfg.imagenet1k or cfg.imagenet21k or bool(cfg.subtrees) or cfg.hyponyms
            or any(WNID_RE.match(w) for w, _, _ in user_entries))


def select_concepts(cfg: ConceptsConfig,
                    base_dir: str | os.PathLike | None = None) -> tuple[list[Concept], "WordNet | None"]:
    """The concept bank ``cfg`` describes (priority-ordered, capped) and the WordNet used (None if not needed)."""
    user_entries: list[tuple[str, str | None, int]] = [(w, None, 0) for w in cfg.words]
    user_src = "concepts.words"
    if cfg.user_list:
        path = resolve_path(cfg.user_list, base_dir)
        user_entries += _read_user_list(path)
        user_src = str(path)
    wn = WordNet.load(cfg.wordnet_dir) if _needs_wordnet(cfg, user_entries) else None
    want_imagenet = cfg.imagenet1k or cfg.imagenet21k
    # the imagenet1k flag marks ImageNet-1k classes whatever selected them (used by senses: imagenet_first)
    in1k = set(imagenet_wnids("1k")) if (want_imagenet or timm_info_dir(required=False)) else set()
    names = imagenet_names() if want_imagenet else {}

    chosen: dict[str, Concept] = {}

    def add_wnid(wnid: str, origin: str, where: str) -> None:
        if wnid in chosen:
            return
        if wn is not None and wnid in wn:
            s = wn.synset(wnid)
            lemmas, gloss = [lm.replace("_", " ") for lm in s.lemmas], s.definition
            depth, hyper = wn.depth(wnid), list(wn.hypernym_path(wnid))
        elif wnid in names:  # a WordNet other than 3.0: keep ImageNet's own names, no hierarchy
            lemmas, gloss, depth, hyper = names[wnid][0], names[wnid][1], None, []
        else:
            raise RecipeError(f"{where}: {wnid} is not a WordNet 3.0 noun synset id")
        if origin.startswith("imagenet") and wnid in names:  # ImageNet's class naming is authoritative
            lemmas, gloss = names[wnid][0] or lemmas, names[wnid][1] or gloss
        chosen[wnid] = Concept(wnid, lemmas, gloss, origin, depth, hyper, wnid in in1k)

    for word, gloss, line in user_entries:
        where = f"{user_src}:{line}" if line else user_src
        if WNID_RE.match(word):
            add_wnid(word, "user", where)
            continue
        form = " ".join(word.lower().split())
        if not normalize(form):
            raise RecipeError(f"{where}: {word!r} has no letters or digits")
        cid = f"user:{form}"
        if cid not in chosen:
            chosen[cid] = Concept(cid, [form], gloss, "user")
    if cfg.imagenet1k:
        for w in imagenet_wnids("1k"):
            add_wnid(w, "imagenet1k", "imagenet1k")
    for st in cfg.subtrees:
        assert wn is not None
        root = st.root if WNID_RE.match(st.root) else wn.first_sense(st.root)
        if root is None or root not in wn:
            raise RecipeError(f"concepts.subtrees: root {st.root!r} is neither a WordNet noun nor a noun synset id")
        for w in wn.descendants(root, st.max_depth):
            add_wnid(w, f"subtree:{root}", "concepts.subtrees")
    if cfg.imagenet21k:
        for w in imagenet_wnids("21k"):
            add_wnid(w, "imagenet21k", "imagenet21k")
    if cfg.hyponyms:
        assert wn is not None
        for cid in [c for c in chosen if WNID_RE.match(c) and c in wn]:
            for w in wn.descendants(cid, cfg.hyponym_depth)[1:]:
                add_wnid(w, f"hyponym:{cid}", "concepts.hyponyms")
    bank = list(chosen.values())
    if cfg.max_concepts is not None:
        bank = bank[: cfg.max_concepts]
    if not bank:
        raise RecipeError("concepts: the configuration selects no concepts (enable imagenet1k, add subtrees, "
                          "words or a user_list)")
    return bank, wn


def surface_forms(bank: Iterable[Concept], cfg: ConceptsConfig, wn: WordNet | None = None,
                  progress: bool = False) -> dict[tuple[str, str], tuple[int, str, str]]:
    """(form, concept_id) → (sense_rank, kind, lemma) for every concept in ``bank``."""
    from tether.progress import progress as tqdm

    stop = _stopwords() if cfg.drop_stopword_forms else frozenset()
    irregular = wn.plurals if wn is not None else (irregular_plurals(cfg.wordnet_dir) if cfg.inflections else {})
    out: dict[tuple[str, str], tuple[int, str, str]] = {}

    def keep(form: str) -> bool:
        return len(form) >= cfg.min_form_chars and not (cfg.drop_stopword_forms and (form in stop or form.isdigit()))

    for c in tqdm(list(bank), desc="surface forms", unit="concept", disable=not progress):
        for lemma in c.lemmas:
            base = normalize(lemma)
            if not base:
                continue
            rank = wn.sense_rank(lemma, c.concept_id) if (wn is not None and WNID_RE.match(c.concept_id)) else 0
            cands = [(base, "lemma")]
            if cfg.inflections:
                cands += [(p, "inflection") for p in plural_forms(base, irregular) if p and p != base]
            for form, kind in cands:
                if not keep(form):
                    continue
                key = (form, c.concept_id)
                prev = out.get(key)
                if prev is None or (rank, kind != "lemma") < (prev[0], prev[1] != "lemma"):
                    out[key] = (rank, kind, base)
    return out


def build_concepts(cat: Catalog, cfg: ConceptsConfig, progress: bool = True,
                   base_dir: str | os.PathLike | None = None) -> int:
    """Write the ``concepts`` and ``surface_forms`` tables for ``cfg`` (replacing them); returns #concepts.

    ``base_dir`` resolves a relative ``user_list`` path (the recipe's folder); default: the working directory.
    """
    bank, wn = select_concepts(cfg, base_dir)
    forms = surface_forms(bank, cfg, wn, progress)
    concepts_tbl = pa.table({
        "concept_id": [c.concept_id for c in bank],
        "name": [c.name for c in bank],
        "lemmas": pa.array([c.lemmas for c in bank], pa.list_(pa.string())),
        "gloss": [c.gloss for c in bank],
        "depth": pa.array([c.depth for c in bank], pa.int32()),
        "hypernyms": pa.array([c.hypernyms for c in bank], pa.list_(pa.string())),
        "imagenet1k": [c.imagenet1k for c in bank],
        "origin": [c.origin for c in bank],
    })
    keys = sorted(forms)
    forms_tbl = pa.table({
        "form": [k[0] for k in keys],
        "concept_id": [k[1] for k in keys],
        "sense_rank": pa.array([forms[k][0] for k in keys], pa.int32()),
        "kind": [forms[k][1] for k in keys],
        "lemma": [forms[k][2] for k in keys],
    })
    with cat.transaction() as con:
        con.execute("DELETE FROM concepts")
        con.execute("DROP TABLE IF EXISTS surface_forms")  # recreated: also upgrades an older layout
        con.execute(SURFACE_FORMS_DDL)
        with arrow_views(con, _tether_concepts=concepts_tbl, _tether_forms=forms_tbl):
            con.execute("INSERT INTO concepts SELECT concept_id, name, lemmas, gloss, depth, hypernyms, imagenet1k, "
                        "origin FROM _tether_concepts")
            con.execute("INSERT INTO surface_forms SELECT form, concept_id, sense_rank, kind, lemma FROM _tether_forms")
    return len(bank)
