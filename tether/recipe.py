"""Typed recipe loading shared by curate and align.

Every recipe section is a pydantic model deriving from :class:`Strict` (unknown keys are errors). A bad recipe
raises :class:`RecipeError` whose message is ONE line naming the file, the key path and what is wrong; the
CLIs print it as ``error: ...`` and exit 2, never a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Type, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe (or other user input) is invalid; ``str(err)`` is a single human-readable line."""


class Strict(BaseModel):
    """Base for every config section: unknown keys are rejected, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn a pydantic error into one line: ``source: key.path: message (got 'value')``."""
    parts = []
    for e in err.errors():
        loc = _fmt_loc(tuple(e.get("loc", ())))
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        gots = ""
        if e.get("type") != "missing" and not isinstance(got, (dict, list)) and got is not None:
            s = repr(got)
            gots = f" (got {s[:60]})"
        parts.append(f"{loc}: {msg}{gots}")
    extra = f" (+{len(parts) - 1} more)" if len(parts) > 1 else ""
    return f"{source}: {parts[0]}{extra}" if parts else f"{source}: invalid recipe"


def read_text_file(path: str | os.PathLike, missing: str, what: str) -> str:
    """A UTF-8 text file a recipe names; one-line RecipeError ``missing`` when it is not a file, ``what: not UTF-8
    text (…)`` when it does not decode."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(missing)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; any problem becomes a one-line RecipeError."""
    p = Path(path)
    text = read_text_file(p, f"{p}: recipe file not found", str(p))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{p}:{where}: malformed YAML: {problem}") from None
    if data is None:
        raise RecipeError(f"{p}: recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse(model: Type[T], data: Any, source: str = "recipe") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None


def load_recipe(path: str | os.PathLike, model: Type[T], overrides: list[str] | None = None) -> T:
    """Load ``path`` into ``model``. ``overrides`` are ``a.b.c=value`` strings (value parsed as YAML).

    Relative paths inside the recipe are NOT rewritten; models that hold paths resolve them against
    ``recipe_dir`` (set in the returned data under the private key ``_recipe_dir`` when the model accepts it).
    """
    data = apply_overrides(read_yaml(path), overrides or [])
    return parse(model, data, str(path))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML); integer keys index lists (``sources.0.path=x``)."""
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r}: expected key.path=value")
        key, val = ov.split("=", 1)
        keys = [k for k in key.strip().split(".") if k]
        if not keys:
            raise RecipeError(f"override {ov!r}: empty key")
        cur: object = data
        for j, k in enumerate(keys):
            last = j == len(keys) - 1
            if isinstance(cur, list):
                if not k.isdigit() or int(k) >= len(cur):
                    raise RecipeError(f"override {ov!r}: {k} is not an index of a {len(cur)}-item list")
                if last:
                    cur[int(k)] = yaml.safe_load(val)
                else:
                    cur = cur[int(k)]
            elif isinstance(cur, dict):
                if last:
                    cur[k] = yaml.safe_load(val)
                else:
                    nxt = cur.setdefault(k, {})
                    if not isinstance(nxt, (dict, list)):
                        raise RecipeError(f"override {ov!r}: {k} is not a section")
                    cur = nxt
            else:
                raise RecipeError(f"override {ov!r}: {keys[j - 1]} is not a section")
    return data


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """Expand ``~``, ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` (the shell's default form)."""
    value = _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), str(value))
    return os.path.expandvars(os.path.expanduser(value))


def shared_dir() -> Path:
    """Where the offline real resources live: ``$TETHER_SHARED`` or ``../shared`` beside the checkout."""
    env = os.environ.get("TETHER_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared"


def looks_local(value: str, base: str | os.PathLike | None) -> bool:
    """Whether a value that may be a hub id / zoo name (``facebook/dinov2-small``) is meant as a local path: absolute
    after expansion, starting with ``.``, or existing relative to ``base``."""
    return (Path(expand(str(value))).is_absolute() or str(value).startswith(".")
            or resolve_path(value, base).exists())


def resolve_input(value: str, base: str | os.PathLike, may_be_id: bool = False) -> str:
    """THE path rule of every tether recipe (curate and align): a relative INPUT path (data, captions, local
    models, caches read from other runs) resolves against the recipe's folder ``base``, so a recipe means the same
    from any working directory; OUTPUT locations (build folder, feature cache, output_dir) stay relative to the
    working directory. ``may_be_id``: a value that is not :func:`looks_local` (a hub id or zoo name) is kept."""
    if may_be_id and not looks_local(value, base):
        return value
    return os.path.normpath(resolve_path(value, base))


def resolve_path(value: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Expand env vars (``${VAR:-default}`` too) and resolve a relative path against ``base`` (or CWD)."""
    p = Path(expand(str(value)))
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p
