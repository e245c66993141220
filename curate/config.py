"""The top-level ``curate build`` recipe (:class:`BuildRecipe`) and its loader.

Path rules: relative INPUT paths in a recipe (sources' ``path``/``captions``/``image_root``, the concepts
``user_list``/``wordnet_dir``) resolve against the recipe file's folder, after ``${VAR:-default}`` / ``~``
expansion; the build folder ``out`` resolves against the current working directory (default ``builds/<name>``),
and ``curate build --out DIR`` overrides it. Missing input files are reported at load time, one line each.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator

from curate.balance import BalanceConfig
from curate.concepts import ConceptsConfig
from curate.dedup import DedupConfig
from tether.distribute import DistributorConfig
from curate.filters import FilterConfig
from curate.match import MatchConfig
from curate.media import MediaRecipe
from tether.recipe import RecipeError, Strict, apply_overrides, parse, read_yaml, resolve_input, resolve_path
from curate.selection import OutputConfig
from curate.sources import IngestConfig, SourceConfig


class BuildRecipe(Strict):
    """``curate build`` recipe: sources → ingest → filter → dedup → concepts → match → balance → output."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    out: str | None = None
    threads: int | None = Field(default=None, ge=1)
    # the catalog's DuckDB memory cap (e.g. "6GB"; unset: DuckDB's default, 80 % of RAM) and where it spills
    # what does not fit (default: BUILD/.tmp; a relative path is inside the build folder)
    memory_limit: str | None = None
    temp_dir: str | None = None
    sources: list[SourceConfig] = Field(min_length=1)
    ingest: IngestConfig = IngestConfig()
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    concepts: ConceptsConfig = ConceptsConfig()
    match: MatchConfig = MatchConfig()
    balance: BalanceConfig = BalanceConfig()
    output: OutputConfig = OutputConfig()
    media: MediaRecipe | None = None
    # where per-unit work runs (lexical matching): local processes (default: `threads`, else every core) or Ray;
    # how to run, not what comes out (tether/distribute.py)
    distributor: DistributorConfig = DistributorConfig()

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str | None) -> str | None:
        return None if v is None else memory_bytes_text(v)

    @field_validator("temp_dir")
    @classmethod
    def _temp_dir(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty path (leave it unset for BUILD/.tmp)")
        return v

    def temp_path(self, build_dir: str | os.PathLike) -> Path:
        """Where DuckDB spills: ``temp_dir`` (relative: inside the build folder), default ``BUILD/.tmp``."""
        if self.temp_dir is None:
            return Path(build_dir) / ".tmp"
        p = Path(os.path.expandvars(self.temp_dir)).expanduser()
        return p if p.is_absolute() else Path(build_dir) / p

    def build_dir(self, out: str | os.PathLike | None = None) -> Path:
        return resolve_path(out or self.out or f"builds/{self.name}")

    def with_absolute_paths(self, base: str | os.PathLike) -> "BuildRecipe":
        """A copy whose relative input paths are resolved against ``base`` (the recipe's folder)."""
        data = self.model_dump()

        def fix(v):
            return None if v is None else resolve_input(v, base)

        for s in data["sources"]:
            for k in ("path", "captions", "image_root"):
                if s.get(k):
                    s[k] = resolve_input(s[k], base, may_be_id=k == "path" and s.get("format") == "hf")
            if s.get("data_files"):
                df = s["data_files"]
                s["data_files"] = fix(df) if isinstance(df, str) else [fix(f) for f in df]
        for k in ("user_list", "wordnet_dir"):
            if data["concepts"].get(k):
                data["concepts"][k] = fix(data["concepts"][k])
        out = type(self).model_validate(data)
        if out.media is not None:
            out = out.model_copy(update={"media": out.media.with_absolute_paths(base)})
        return out

    def check(self, source: str = "recipe", raw_paths: list | None = None) -> None:
        """Input files exist and options are consistent; one-line RecipeError otherwise.

        ``raw_paths``: the sources' ``path`` as written in the recipe (before ``${VAR}`` expansion): when input
        files are missing, the one error line names every source without data and the variables to set."""
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RecipeError(f"{source}: sources: duplicate source name {sorted(dup)[0]!r}")
        _check_missing_inputs(self.sources, source, raw_paths)
        for i, s in enumerate(self.sources):
            try:
                s.check(f"sources[{i}]")
            except RecipeError as e:
                raise RecipeError(f"{source}: {e}") from None
        if self.concepts.user_list and not Path(self.concepts.user_list).is_file():
            raise RecipeError(f"{source}: concepts.user_list: file not found: {self.concepts.user_list}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIN_MEMORY_LIMIT = 100 * 10**6


def memory_bytes_text(v: str) -> str:
    """A memory size as DuckDB reads it (``6GB``, ``512MiB``, ``2.5 GB`` → ``2.5GB``); ValueError otherwise."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", v, flags=re.IGNORECASE)
    if not m or not m.group(2):
        raise ValueError(f"{v!r} is not a memory size: write a number and a unit, e.g. 6GB or 512MiB")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size < MIN_MEMORY_LIMIT:
        raise ValueError(f"{v!r} is below the smallest workable limit, 100MB")
    return f"{m.group(1)}{m.group(2)}"


def _check_missing_inputs(sources: list[SourceConfig], source: str, raw_paths: list | None) -> None:
    """One line for ALL sources whose input files are missing, with the environment variables their paths use."""
    import re

    missing = []
    for i, s in enumerate(sources):
        if s.format == "hf" or not s.path:
            continue
        gone = not Path(s.path).is_dir() if s.format == "folder" else not s.files()
        if gone:
            missing.append((i, s))
    if not missing:
        return
    what = ", ".join(f"{s.name} ({s.path})" for _, s in missing)
    raws = [str(raw_paths[i]) for i, _ in missing if raw_paths and i < len(raw_paths) and raw_paths[i]]
    names = sorted({m for r in raws for m in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", r)})
    if names:
        state = "; ".join(f"{n}={os.environ[n]}" if os.environ.get(n) else f"{n} is not set" for n in names)
        how = (f"the paths use ${{{names[0]}}} ({state}): export {names[0]}=<folder holding the data>"
               if len(names) == 1 else f"the paths use {', '.join('$' + n for n in names)} ({state}): export them")
    else:
        how = "fix the paths"
    first = missing[0][0]
    raise RecipeError(f"{source}: no file matches the input path of {len(missing)} of {len(sources)} sources: "
                      f"{what}; {how}, "
                      f"or set a path with --set sources.{first}.path=... (or remove the sources you lack)")


def load_build_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> BuildRecipe:
    """Load (with overrides), resolve input paths against the recipe's folder and check that input files exist."""
    data = apply_overrides(read_yaml(path), overrides or [])
    r = parse(BuildRecipe, data, str(path))
    r = r.with_absolute_paths(Path(path).resolve().parent)
    r.check(str(path), raw_paths=[s.get("path") if isinstance(s, dict) else None for s in data.get("sources") or []])
    return r
