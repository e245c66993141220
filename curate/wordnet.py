"""A small, fast reader of the WordNet 3.0 noun database (the ``wndb(5WN)`` file format), offline.

tether needs only the noun hierarchy: synset ids (ImageNet's ``n`` + 8-digit offset), lemma names, glosses,
hypernym / hyponym links, the sense order of each lemma (``index.noun`` lists a lemma's synsets most frequent
first) and the irregular plurals of ``noun.exc``. Reading ``data.noun`` directly takes about a second and
needs nothing beyond the dictionary files, whichever of these holds them:

* Debian / Ubuntu ``wordnet-base`` (``/usr/share/wordnet``);
* an NLTK data directory (``<nltk_data>/corpora/wordnet`` or its ``wordnet.zip``);
* Princeton's own install (``$WNHOME/dict``, ``$WNSEARCHDIR``) or any configured folder.

NLTK's ``WordNetCorpusReader`` is not used: it needs a ``lexnames`` file Debian does not ship and (NLTK ≥ 3.9)
refuses directories outside ``nltk.data.path``; it also builds every POS index, which tether does not need.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tether.recipe import RecipeError
from tether.resources import WORDNET_HELP, find_wordnet  # noqa: F401  (the one WordNet locator)

ROOT_WNID = "n00001740"  # entity.n.01


def wnid_of(offset: int | str) -> str:
    """ImageNet-style id of a noun synset: ``n`` + zero-padded 8-digit byte offset in ``data.noun``."""
    return f"n{int(offset):08d}"


@dataclass
class Synset:
    """One noun synset. ``lemmas`` keep WordNet's spelling (``domestic_dog``, ``Canis_familiaris``)."""

    wnid: str
    lemmas: list[str]
    gloss: str
    hypernyms: list[str] = field(default_factory=list)  # includes instance hypernyms (@i)
    hyponyms: list[str] = field(default_factory=list)  # includes instance hyponyms (~i)
    lexfile: int = -1  # lexicographer file (3 noun.act, 5 noun.animal, 6 noun.artifact, 18 noun.person …)

    @property
    def definition(self) -> str:
        """The gloss without its quoted usage examples."""
        return self.gloss.split('; "', 1)[0].strip()


def _open_text(where: Path, name: str) -> io.TextIOBase:
    if where.is_file():  # a zip (NLTK's wordnet.zip holds wordnet/<name>)
        zf = zipfile.ZipFile(where)
        member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == name), None)
        if member is None:
            raise FileNotFoundError(name)
        return io.TextIOWrapper(zf.open(member), encoding="utf-8", errors="replace")
    return open(where / name, encoding="utf-8", errors="replace")


def read_irregular_plurals(where: Path) -> dict[str, list[str]]:
    """Lowercased lemma → irregular plurals, from ``noun.exc`` (``mouse`` → ``mice``); {} when absent."""
    out: dict[str, list[str]] = {}
    try:
        f = _open_text(where, "noun.exc")
    except FileNotFoundError:
        return out
    with f:
        for line in f:
            t = line.split()
            for base in t[1:]:
                out.setdefault(base.replace("_", " ").lower(), []).append(t[0].replace("_", " "))
    return out


def _cntlist(path: str | os.PathLike | None) -> Iterator[tuple[str, str, int, int]]:
    """(lowercased lemma with spaces, ss_type digit, sense number, SemCor tag count) of WordNet's ``cntlist.rev``;
    nothing when the file is missing."""
    try:
        f = _open_text(find_wordnet(path), "cntlist.rev")
    except (FileNotFoundError, KeyError):
        return
    with f:
        for line in f:
            t = line.split()
            if len(t) != 3 or "%" not in t[0]:
                continue
            lemma, _, lex = t[0].partition("%")
            yield lemma.replace("_", " ").lower(), lex[:1], int(t[1]), int(t[2])


def adjective_words(path: str | os.PathLike | None = None, min_count: int = 5,
                    ratio: float = 2.0) -> frozenset[str]:
    """One-word lemmas that WordNet's SemCor sense counts (``cntlist.rev``) tag mostly as ADJECTIVES: at least
    ``min_count`` adjective tags and more than ``ratio`` × their noun tags (white 76 vs 16, young 108 vs 7,
    little 289 vs 12; but orange 7 vs 8 and husky 4 vs 0 stay nouns). In captions these words are colours and
    ages far more often than the person/colour nouns they also name. Empty when ``cntlist.rev`` is missing."""
    counts: dict[str, list[int]] = {}
    for lemma, kind, _, n in _cntlist(path):
        k = {"1": 0, "3": 1, "5": 1}.get(kind)
        if k is not None and " " not in lemma:
            counts.setdefault(lemma, [0, 0])[k] += n
    return frozenset(w for w, (noun, adj) in counts.items() if adj >= min_count and adj > ratio * noun)


def noun_sense_counts(path: str | os.PathLike | None = None) -> dict[str, dict[int, int]]:
    """Lowercased noun lemma (spaces, not underscores) → {0-based sense rank: SemCor tag count}, for the lemmas
    SemCor tagged at least once as a noun (``spot``: rank 0 "a point located with respect to surface features"
    23 … the spotlight sense 0). Ranks are WordNet's sense order, as :meth:`WordNet.sense_rank`. Empty when
    ``cntlist.rev`` is missing."""
    out: dict[str, dict[int, int]] = {}
    for lemma, kind, number, n in _cntlist(path):
        if kind == "1" and n > 0:
            out.setdefault(lemma, {})[number - 1] = n
    return out


def pos_tag_counts(path: str | os.PathLike | None = None) -> dict[str, tuple[int, int]]:
    """Lowercased lemma (spaces) → (SemCor noun tags, SemCor verb + adjective + adverb tags), over every lemma
    ``cntlist.rev`` counts (``swing``: 6 noun vs 40 other; ``dog``: 42 vs 2). Empty when the file is missing."""
    out: dict[str, list[int]] = {}
    for lemma, kind, _, n in _cntlist(path):
        if kind in "12345" and kind:
            out.setdefault(lemma, [0, 0])[0 if kind == "1" else 1] += n
    return {k: (v[0], v[1]) for k, v in out.items()}


def _index_lemmas(where: Path, name: str) -> Iterator[str]:
    try:
        f = _open_text(where, name)
    except (FileNotFoundError, KeyError):
        return
    with f:
        for line in f:
            if not line.startswith("  "):
                word = line.split(" ", 1)[0]
                if word:
                    yield word.replace("_", " ").lower()


def non_noun_lemmas(path: str | os.PathLike | None = None,
                    files: tuple[str, ...] = ("index.verb", "index.adj", "index.adv")) -> frozenset[str]:
    """Lemmas (lowercased, spaces) that WordNet also lists as a verb, adjective or adverb (``index.verb``,
    ``index.adj``, ``index.adv``; ``files`` picks): ``swing``, ``fly``, ``stand in``, ``blond``. Needs the
    WordNet files."""
    where = find_wordnet(path)
    return frozenset(w for name in files for w in _index_lemmas(where, name))


def noun_collocations(path: str | os.PathLike | None = None) -> frozenset[str]:
    """Every multi-word WordNet noun lemma (``index.noun``; lowercased, ``_`` → space): ``bathing suit``,
    ``tank top``, ``water wings``, ``ski lift`` — about 60k compounds. Needs the WordNet files."""
    return frozenset(w for w in _index_lemmas(find_wordnet(path), "index.noun") if " " in w)


def irregular_plurals(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Best effort: the irregular plurals of the WordNet found at ``path`` (or searched), {} without WordNet."""
    try:
        return read_irregular_plurals(find_wordnet(path))
    except RecipeError:
        return {}


class WordNet:
    """The WordNet noun hierarchy in memory (≈82k synsets, ≈117k lemmas; about a second to load).

    Use :meth:`load` (cached per directory).
    """

    _cache: dict[str, "WordNet"] = {}

    def __init__(self, where: Path):
        self.where = where
        self.synsets: dict[str, Synset] = {}
        self.senses: dict[str, list[str]] = {}  # lowercased lemma → wnids, most frequent sense first
        self.plurals: dict[str, list[str]] = {}  # lowercased lemma → irregular plural forms (noun.exc)
        self._read_data()
        self._read_index()
        self._read_exceptions()
        self._depth: dict[str, int] = {}
        self._path: dict[str, tuple[str, ...]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "WordNet":
        where = find_wordnet(path)
        key = str(where.resolve())
        if key not in cls._cache:
            try:
                cls._cache[key] = cls(where)
            except (OSError, ValueError, IndexError) as e:
                raise RecipeError(f"WordNet files under {where} are unreadable or not WordNet 3.0 "
                                  f"({type(e).__name__}: {e}); {WORDNET_HELP}") from None
        return cls._cache[key]

    # -- parsing ------------------------------------------------------------------------------------------
    def _read_data(self) -> None:
        with _open_text(self.where, "data.noun") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                t = head.split()
                wnid = wnid_of(t[0])
                n_words = int(t[3], 16)
                lemmas = [t[4 + 2 * i] for i in range(n_words)]
                i = 4 + 2 * n_words
                n_ptr = int(t[i])
                hyper: list[str] = []
                hypo: list[str] = []
                for j in range(i + 1, i + 1 + 4 * n_ptr, 4):
                    sym, off, pos = t[j], t[j + 1], t[j + 2]
                    if pos != "n":
                        continue
                    if sym in ("@", "@i"):
                        hyper.append(wnid_of(off))
                    elif sym in ("~", "~i"):
                        hypo.append(wnid_of(off))
                self.synsets[wnid] = Synset(wnid, lemmas, gloss.strip(), hyper, hypo, int(t[1]))
        if not self.synsets:
            raise ValueError("data.noun holds no synsets")

    def _read_index(self) -> None:
        with _open_text(self.where, "index.noun") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                t = line.split()
                n_syn = int(t[2])
                self.senses[t[0].replace("_", " ").lower()] = [wnid_of(o) for o in t[len(t) - n_syn:]]

    def _read_exceptions(self) -> None:
        self.plurals = read_irregular_plurals(self.where)

    # -- queries ------------------------------------------------------------------------------------------
    def __contains__(self, wnid: str) -> bool:
        return wnid in self.synsets

    def __len__(self) -> int:
        return len(self.synsets)

    def synset(self, wnid: str) -> Synset:
        return self.synsets[wnid]

    def first_sense(self, word: str) -> str | None:
        """The most frequent noun sense of ``word`` (spaces or underscores), or None."""
        s = self.senses.get(word.replace("_", " ").lower())
        return s[0] if s else None

    def sense_rank(self, lemma: str, wnid: str) -> int:
        """0 for ``lemma``'s most frequent sense, 1 for the next …; a large number when unrelated."""
        s = self.senses.get(lemma.replace("_", " ").lower(), [])
        return s.index(wnid) if wnid in s else 99

    def hypernym_path(self, wnid: str) -> tuple[str, ...]:
        """A shortest path root → … → parent (empty for the root); its length is :meth:`depth`."""
        if wnid in self._path:
            return self._path[wnid]
        # iterative post-order so that deep chains cannot hit the recursion limit
        stack = [wnid]
        while stack:
            cur = stack[-1]
            parents = [p for p in self.synsets[cur].hypernyms if p in self.synsets]
            todo = [p for p in parents if p not in self._path]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            if cur in self._path:
                continue
            if not parents:
                self._path[cur] = ()
            else:
                best = min(parents, key=lambda p: (len(self._path[p]), p))
                self._path[cur] = self._path[best] + (best,)
        return self._path[wnid]

    def depth(self, wnid: str) -> int:
        """Minimum number of hypernym links to the root (``entity`` = 0), as NLTK's ``min_depth``."""
        return len(self.hypernym_path(wnid))

    def descendants(self, wnid: str, max_depth: int | None = None) -> list[str]:
        """``wnid`` and its hyponyms (instance hyponyms included) down to ``max_depth`` levels, BFS order."""
        seen = {wnid}
        order = [wnid]
        frontier = [wnid]
        level = 0
        while frontier and (max_depth is None or level < max_depth):
            nxt = []
            for w in frontier:
                for h in self.synsets[w].hyponyms:
                    if h not in seen and h in self.synsets:
                        seen.add(h)
                        order.append(h)
                        nxt.append(h)
            frontier = nxt
            level += 1
        return order

    def __iter__(self) -> Iterator[Synset]:
        return iter(self.synsets.values())
