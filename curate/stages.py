"""The one ordered list of a build's stages, and what each stage owns in the catalog.

``curate build`` is one sequence of :class:`Stage` values: the caption stages (``ingest`` … ``select``, run by
:mod:`curate.pipeline`) then the media stages (``media_rows`` … ``shards``, run by :mod:`curate.media`), with the
sub-stages that keep their own bookkeeping (``match_lexical`` / ``match_semantic`` under ``match``,
``download_retry`` under ``download``). Every module names stages through this enum, never through string copies.

:data:`OWNS` says which catalog rows a stage writes, so that one routine (:meth:`curate.catalog.Catalog.clear_stage`)
clears any stage, and :meth:`curate.catalog.Catalog.begin_stage` (the one stage runner: skip / resume / fresh)
works the same for every module. Files a stage writes (the selection parquet, the download folder, the shards)
are cleared by the stage itself when it starts fresh.
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """A build stage; the value is the name stored in the catalog (``stages.stage``, ``decisions.stage``)."""

    INGEST = "ingest"
    FILTER = "filter"
    DEDUP = "dedup"
    NEARDUP = "neardup"
    CONCEPTS = "concepts"
    MATCH = "match"
    MATCH_LEXICAL = "match_lexical"
    MATCH_SEMANTIC = "match_semantic"
    BALANCE = "balance"
    SELECT = "select"
    MEDIA_ROWS = "media_rows"
    DOWNLOAD = "download"
    DOWNLOAD_RETRY = "download_retry"
    IMAGE_DEDUP = "image_dedup"
    AGREEMENT = "agreement"
    REBALANCE = "rebalance"
    SHARDS = "shards"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def order(self) -> int:
        return ORDER[self]

    @property
    def parent(self) -> "Stage | None":
        return PARENT.get(self)

    @property
    def children(self) -> tuple["Stage", ...]:
        return tuple(s for s, p in PARENT.items() if p is self)

    def later(self) -> list["Stage"]:
        """The stages after this one in build order, its own sub-stages excluded."""
        return [s for s in Stage if s.order > self.order and s.parent is not self]

    @classmethod
    def of(cls, name: str) -> "Stage | None":
        """The stage named ``name`` (None for a name no version of tether wrote)."""
        try:
            return cls(name)
        except ValueError:
            return None


ORDER = {s: i for i, s in enumerate(Stage)}
PARENT = {Stage.MATCH_LEXICAL: Stage.MATCH, Stage.MATCH_SEMANTIC: Stage.MATCH,
          Stage.DOWNLOAD_RETRY: Stage.DOWNLOAD}

#: The caption stages ``curate build`` runs (``--until`` accepts these), in order.
CAPTION_STAGES = (Stage.INGEST, Stage.FILTER, Stage.DEDUP, Stage.NEARDUP, Stage.CONCEPTS, Stage.MATCH,
                  Stage.BALANCE, Stage.SELECT)
#: The media stages after the selection, in order.
MEDIA_STAGES = (Stage.MEDIA_ROWS, Stage.DOWNLOAD, Stage.IMAGE_DEDUP, Stage.AGREEMENT, Stage.REBALANCE,
                Stage.SHARDS)
#: Stages that record a per-concept balance report (``balance_report.stage``).
BALANCING = (Stage.BALANCE, Stage.REBALANCE)

#: What each stage writes in the catalog besides its ``stages``/``progress`` bookkeeping: ``decisions`` rows with
#: its name (True/False) and the tables (``(table, filter)``; filter None = every row) that belong to it alone.
OWNS: dict[Stage, tuple[bool, tuple[tuple[str, str | None], ...]]] = {
    Stage.INGEST: (True, (("samples", None),)),
    Stage.FILTER: (True, ()),
    Stage.DEDUP: (True, ()),
    Stage.NEARDUP: (True, ()),
    Stage.CONCEPTS: (False, (("concepts", None), ("surface_forms", None))),
    Stage.MATCH: (False, (("matches", None), ("lexical_removed", None))),
    Stage.MATCH_LEXICAL: (False, (("matches", "method = 'lexical'"), ("lexical_removed", None))),
    Stage.MATCH_SEMANTIC: (False, (("matches", "method = 'semantic'"),)),
    Stage.BALANCE: (True, (("balance_report", "stage = 'balance'"),)),
    Stage.SELECT: (False, ()),
    Stage.MEDIA_ROWS: (False, (("media_rows", None),)),
    Stage.DOWNLOAD: (True, (("downloads", None),)),
    Stage.DOWNLOAD_RETRY: (False, ()),
    Stage.IMAGE_DEDUP: (True, ()),
    Stage.AGREEMENT: (True, (("sense_checks", None),)),
    Stage.REBALANCE: (True, (("balance_report", "stage = 'rebalance'"),)),
    Stage.SHARDS: (False, (("shard_index", None),)),
}


class Begin(str, Enum):
    """What :meth:`curate.catalog.Catalog.begin_stage` decided."""

    SKIP = "skip"      # done earlier with the same parameters: nothing to do
    RESUME = "resume"  # killed while running with the same parameters: continue from its committed units
    FRESH = "fresh"    # new, changed or not resumable: its outputs were cleared and it is marked running
