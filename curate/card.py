"""Data card of a build: ``card/README.md`` plus PNG plots, written from the catalog alone.

Sections: stage funnel (rows judged / rejected / alive after each stage), top rejection reasons, per-concept
counts before/after balancing (bar plot of the largest concepts), the head/tail curve (concept counts sorted,
log scale, before vs after) and coverage of the ImageNet-1k classes (how many of the 1,000 wnids have at least
1 / 10 / 100 samples before and after balancing).
"""

from __future__ import annotations

from pathlib import Path

from curate import report
from curate.catalog import Catalog
from curate.stages import Stage


def _imagenet1k() -> set[str]:
    try:
        from tether.resources import imagenet_wnids

        return set(imagenet_wnids("1k"))
    except Exception:  # noqa: BLE001 - timm data files absent: coverage falls back to the concepts table flag
        return set()


def concept_before_after(cat: Catalog, stage: Stage = Stage.BALANCE) -> list[tuple[str, str, int, int]]:
    """``(concept_id, name, before, after)`` from ``balance_report`` sorted by ``before`` descending."""
    return cat.execute("""SELECT r.concept_id, coalesce(any_value(c.name), r.concept_id), any_value(r.before),
                                 any_value(r.after)
                          FROM balance_report r LEFT JOIN concepts c USING (concept_id) WHERE r.stage = ?
                          GROUP BY r.concept_id ORDER BY 3 DESC, 1""", [stage]).fetchall()


def language_mix(cat: Catalog) -> list[tuple[str, int, int]]:
    """``(language, ingested, selected)`` per ``samples.lang`` code (empty → ``und``), largest first; ``[]`` when the
    build did not identify languages (``ingest.language_id: false``)."""
    if not cat.scalar("""SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database()
                         AND table_name = 'samples' AND column_name = 'lang'"""):
        return []
    if not cat.scalar("SELECT count(*) FROM samples WHERE lang IS NOT NULL"):
        return []
    return [(str(a), int(b), int(c)) for a, b, c in cat.execute(
        """SELECT coalesce(nullif(trim(s.lang), ''), 'und'), count(*), count(a.uid)
           FROM samples s LEFT JOIN alive a USING (uid) GROUP BY 1 ORDER BY 2 DESC, 1""").fetchall()]


def write_card(cat: Catalog, build_dir: str | Path, name: str, top: int = 40, selection_rows: int | None = None
               ) -> Path:
    """Write ``<build_dir>/card/README.md`` and its PNGs; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(build_dir) / "card"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Data card: {name}", ""]
    total = int(cat.scalar("SELECT count(*) FROM samples"))
    alive = int(cat.scalar("SELECT count(*) FROM alive"))
    lines += [f"Rows ingested: **{total:,}**; selected: **{alive:,}**"
              + (f" (selection parquet rows: {selection_rows:,})" if selection_rows is not None else "") + ".", ""]
    lines += ["## Stages", "", "| stage | status | judged | rejected | alive after |", "|---|---|---:|---:|---:|"]
    for st, status, judged, rej, after in [r for r in report.stage_counts(cat.con) if r[0] != "select"]:
        lines.append(f"| {st} | {status} | {judged:,} | {rej:,} | {after:,} |")
    reasons = report.top_reasons(cat.con, 15)
    lines += ["", "## Top rejection reasons", "", "| stage | reason | rows |", "|---|---|---:|"]
    lines += [f"| {s} | {r} | {n:,} |" for s, r, n in reasons]
    from curate.match.lexical import card_lines as lexical_card_lines  # rules and what each removed (issue 13)

    lines += lexical_card_lines(cat)
    from curate.agreement import card_lines as agreement_card_lines  # image checks (issue 26)

    lines += agreement_card_lines(cat)
    langs = language_mix(cat)
    if langs:
        lines += ["", "## Languages (samples.lang, ingest.language_id)", "",
                  "| language | ingested | share | selected | share |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {code} | {n:,} | {n / max(total, 1):.1%} | {k:,} | {k / max(alive, 1):.1%} |"
                  for code, n, k in langs]

    ba = concept_before_after(cat)
    if ba:
        head = ba[:top]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(head)), 4))
        xs = range(len(head))
        ax.bar([x - 0.2 for x in xs], [r[2] for r in head], width=0.4, label="before balancing")
        ax.bar([x + 0.2 for x in xs], [r[3] for r in head], width=0.4, label="after balancing")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(r[1])[:18] for r in head], rotation=70, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("samples")
        ax.legend()
        ax.set_title(f"{len(head)} largest concepts")
        fig.tight_layout()
        fig.savefig(out / "concepts_before_after.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        before = sorted((r[2] for r in ba), reverse=True)
        after = sorted((r[3] for r in ba if r[3] > 0), reverse=True)
        ax.plot(range(1, len(before) + 1), before, label="before balancing")
        if after:
            ax.plot(range(1, len(after) + 1), after, label="after balancing")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concept rank")
        ax.set_ylabel("samples per concept")
        ax.legend()
        ax.set_title("head/tail curve")
        fig.tight_layout()
        fig.savefig(out / "head_tail.png", dpi=110)
        plt.close(fig)

        n_b = sum(r[2] for r in ba)
        n_a = sum(r[3] for r in ba)
        share = lambda rows, col, k: sum(r[col] for r in rows[:k]) / max(1, sum(r[col] for r in rows))  # noqa: E731
        ba_after = sorted(ba, key=lambda r: -r[3])
        lines += ["", "## Concepts before/after balancing", "",
                  f"{len(ba):,} concepts matched; concept-sample pairs {n_b:,} → {n_a:,}. "
                  f"Share of pairs in the 10 largest concepts: {share(ba, 2, 10):.1%} → {share(ba_after, 3, 10):.1%}.",
                  "", "![per-concept counts](concepts_before_after.png)", "", "![head/tail curve](head_tail.png)", "",
                  "| concept | name | before | after |", "|---|---|---:|---:|"]
        lines += [f"| {c} | {nm} | {b:,} | {a:,} |" for c, nm, b, a in ba[:top]]
        n_short, floor = cat.one("""SELECT count(*), any_value(floor) FROM balance_report
                                    WHERE stage = ? AND shortfall > 0""", [Stage.BALANCE])
        if n_short:
            short = cat.execute("""SELECT concept_id, after FROM balance_report WHERE stage = ?
                                   AND shortfall > 0 ORDER BY shortfall DESC, concept_id LIMIT 20""",
                                [Stage.BALANCE]).fetchall()
            listed = "all listed" if n_short <= len(short) else f"first {len(short)} listed"
            lines += ["", f"{n_short:,} concepts below the floor of {floor:,} samples after balancing ({listed}, "
                      "samples in brackets): " + ", ".join(f"{c} ({a:,})" for c, a in short)]

        in1k = _imagenet1k() or {r[0] for r in cat.execute(
            "SELECT concept_id FROM concepts WHERE imagenet1k").fetchall()}
        if in1k:
            cov = {k: [0, 0] for k in (1, 10, 100)}
            for c, _, b, a in ba:
                if c in in1k:
                    for k in cov:
                        cov[k][0] += b >= k
                        cov[k][1] += a >= k
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ks = list(cov)
            ax.bar([i - 0.2 for i in range(3)], [cov[k][0] for k in ks], width=0.4, label="before")
            ax.bar([i + 0.2 for i in range(3)], [cov[k][1] for k in ks], width=0.4, label="after")
            ax.set_xticks(range(3))
            ax.set_xticklabels([f">= {k} samples" for k in ks])
            ax.set_ylabel(f"ImageNet-1k classes (of {len(in1k)})")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "imagenet1k_coverage.png", dpi=110)
            plt.close(fig)
            lines += ["", "## ImageNet-1k coverage", "", "| classes with | before balancing | after balancing |",
                      "|---|---:|---:|"]
            lines += [f"| >= {k} samples | {cov[k][0]:,} / {len(in1k)} | {cov[k][1]:,} / {len(in1k)} |" for k in ks]
            lines += ["", "![ImageNet-1k coverage](imagenet1k_coverage.png)"]
    md = out / "README.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
