"""File helpers shared by curate and align: atomic writes, and the build folder's ownership rules (marker,
lock, the one deletion helper, outputs outside the build folder). Rules: docs/threat_model.md."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional


# ------------------------------------------------------------------------------------------------------------
# File integrity: a file is what was written when its size and sha256 equal the record made then
# ------------------------------------------------------------------------------------------------------------
_VERIFIED: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256): hash each file once per process


def _corrupt_base():
    from tether.recipe import RecipeError

    return RecipeError


class CorruptFileError(_corrupt_base()):  # type: ignore[misc]
    """A file is not what was written: missing, or its size or sha256 differs from the record (one line, with the
    caller's hint on what to do)."""


def file_checksum(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file (memoised on path, size and mtime)."""
    from tether.digest import file_sha256

    st = os.stat(path)
    memo = _VERIFIED.get(str(path))
    if memo and memo[:2] == (st.st_size, st.st_mtime_ns):
        return {"bytes": st.st_size, "sha256": memo[2]}
    sha = file_sha256(path)
    _VERIFIED[str(path)] = (st.st_size, st.st_mtime_ns, sha)
    return {"bytes": st.st_size, "sha256": sha}


def remember_checksum(path: str | os.PathLike, size: int, mtime_ns: int, sha256: str) -> None:
    """Record a sha256 computed elsewhere (e.g. over bytes already read) for :func:`file_checksum`'s memo."""
    _VERIFIED[str(path)] = (size, mtime_ns, sha256)


def known_checksum(path: str | os.PathLike) -> tuple[int, int, str] | None:
    """``(size, mtime_ns, sha256)`` hashed before in this process, if any."""
    return _VERIFIED.get(str(path))


def verify_file(path: str | os.PathLike, entry: dict, what: str, hint: str,
                error: type = CorruptFileError) -> None:
    """Raise ``error`` (one line: ``<what> <folder>: <file> is missing|corrupt (…); <hint>``) unless ``path`` has
    the size and sha256 that ``entry`` (``{"bytes", "sha256"}``) records; an entry without a sha256 is not checked."""
    if "sha256" not in entry:
        return
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path.parent}: {path.name} is missing; {hint}")
    got = file_checksum(path)
    if got["bytes"] != entry.get("bytes") or got["sha256"] != entry["sha256"]:
        raise error(f"{what} {path.parent}: {path.name} is corrupt (size {got['bytes']} / sha256 "
                    f"{got['sha256'][:12]}… differ from {entry.get('bytes')} / {entry['sha256'][:12]}… "
                    f"recorded when it was written); {hint}")


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a hidden temp file + rename: a kill never leaves a
    half-written file, and folder loaders globbing the visible names never see the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------
# Build folders: what tether owns, and the only way it deletes anything
# ------------------------------------------------------------------------------------------------------------
# A folder tether writes into carries MARKER, a small JSON file written when tether creates (or adopts) it:
#   {"tether": FORMAT, "kind": "build"}                      a build folder (``curate build --out``)
#   {"tether": FORMAT, "kind": "output", "build": "/abs/b"}  an output folder outside its build (opt-in only)
# Files tether wrote outside any marked folder (an opted-out ``output.selection``) are listed in the build's
# marker under "outside": {path: [size, mtime_ns]}, so a later run overwrites only a file it wrote itself.
# LOCK (``fcntl.flock``) serialises the processes that write one build folder.

MARKER = ".tether-build"
LOCK = ".tether-lock"
FORMAT = 1
_IGNORABLE = {MARKER, LOCK, f".{MARKER}.tmp"}  # a folder holding only these counts as empty (a killed first run, a waiting lock)


def _error(msg: str) -> Exception:
    from tether.recipe import RecipeError

    return RecipeError(msg)


def read_marker(folder: str | os.PathLike) -> Optional[dict]:
    """The marker of ``folder`` (None when it has none); a malformed or newer one is a one-line error."""
    p = Path(folder) / MARKER
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise _error(f"{p}: unreadable tether marker (delete it only if this folder is a tether build)") from None
    if not isinstance(m, dict) or not isinstance(m.get("tether"), int) or m.get("kind") not in ("build", "output"):
        raise _error(f"{p}: not a tether marker")
    if m["tether"] > FORMAT:
        raise _error(f"{p}: made by a newer tether (build folder format {m['tether']}, this one reads "
                     f"{FORMAT}); upgrade tether")
    return m


def write_marker(folder: str | os.PathLike, marker: dict) -> None:
    atomic_write(Path(folder) / MARKER, json.dumps(marker, sort_keys=True, indent=1) + "\n")


def _is_tether_catalog(path: Path) -> bool:
    """``path`` is a DuckDB file holding tether's bookkeeping tables (read-only probe; writes nothing)."""
    import duckdb

    try:
        con = duckdb.connect(str(path), read_only=True)
    except Exception as e:  # noqa: BLE001 - not DuckDB, or locked by another process
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lock" in text.lower():
            raise _error(f"{path}: catalog is locked by another process ({text})") from None
        return False
    try:
        names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()
    return {"samples", "decisions", "stages", "progress"} <= names


def build_dir_state(folder: str | os.PathLike) -> str:
    """``missing`` | ``empty`` | ``marked`` | ``legacy`` (a tether build made before markers: its catalog has
    tether's ``stages`` and ``progress`` tables) | ``foreign`` (anything else). Reads only."""
    d = Path(folder)
    if not d.exists():
        return "missing"
    if not d.is_dir():
        raise _error(f"{d}: build folder path exists and is not a folder")
    m = read_marker(d)
    if m is not None:
        if m["kind"] != "build":
            raise _error(f"{d}: is an output folder of the tether build {m.get('build')}, not a build folder")
        return "marked"
    if not any(p.name not in _IGNORABLE for p in d.iterdir()):
        return "empty"
    cat = d / "catalog.duckdb"
    if cat.is_file() and _is_tether_catalog(cat):
        return "legacy"
    return "foreign"


def _refuse_foreign(d: Path) -> Exception:
    return _error(f"{d} is not empty and is not a tether build folder (no {MARKER}); "
                  "give a new or empty folder with --out")


def check_build_dir(folder: str | os.PathLike) -> str:
    """:func:`build_dir_state`, with a one-line error for a folder tether may not use. Reads only."""
    state = build_dir_state(folder)
    if state == "foreign":
        raise _refuse_foreign(Path(folder))
    return state


def claim_build_dir(folder: str | os.PathLike, catalog=None) -> Path:
    """Make sure ``folder`` is a tether build folder and carries the marker (create it / adopt a legacy build);
    refuse (one line) a non-empty folder tether did not make. ``catalog``: an already open
    :class:`curate.catalog.Catalog` of this folder (library callers), used instead of the read-only probe."""
    d = Path(folder)
    if catalog is not None and read_marker(d) is None and d.is_dir() and \
            Path(catalog.path).resolve() == (d / "catalog.duckdb").resolve() and catalog.table_exists("progress"):
        state = "legacy"
    else:
        state = build_dir_state(d)
    if state == "foreign":
        raise _refuse_foreign(d)
    if state != "marked":
        d.mkdir(parents=True, exist_ok=True)
        write_marker(d, {"tether": FORMAT, "kind": "build", **({"adopted": True} if state == "legacy" else {})})
    return d


@contextlib.contextmanager
def build_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the build folder's lock (``fcntl.flock`` on ``folder/.tether-lock``) for the ``with`` block; a second
    process gets a one-line error naming the holder's pid. The lock dies with its process (kill -9 included)."""
    d = Path(folder)
    path = d / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise _error(f"build folder {d} is in use by another curate process (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield d
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting process)


@contextlib.contextmanager
def open_build_dir(folder: str | os.PathLike, create: bool = True) -> Iterator[Path]:
    """Check → create → lock → mark a build folder, in that order: a folder tether may not use is refused before
    anything is written into it, and nothing (not even the marker) is written before the lock is held."""
    d = Path(folder)
    if check_build_dir(d) == "missing":
        if not create:
            raise _error(f"{d}: no build folder here (run `curate build` first)")
        d.mkdir(parents=True, exist_ok=True)
    with build_lock(d):
        claim_build_dir(d)  # re-checked under the lock
        yield d


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """``path`` lies strictly inside ``folder`` once symlinks and ``..`` are resolved (the last component of
    ``path`` itself is not followed: a link inside the folder is inside)."""
    p = Path(path)
    parent = p.parent.resolve()
    root = Path(folder).resolve()
    if p.name in ("", ".", ".."):
        return False
    return parent == root or root in parent.parents


def _owning_root(path: Path, root: Path) -> None:
    m = read_marker(root)
    if m is None:
        raise _error(f"refusing to delete {path}: {root} is not a tether build folder (no {MARKER})")
    if not is_inside(path, root):
        raise _error(f"refusing to delete {path}: it is not inside the tether folder {root}")


def remove_path(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Delete ``path`` (a file, a link, or a folder tree) — only when it lies inside ``root`` and ``root`` carries
    tether's marker; a one-line error otherwise. Every deletion in curate goes through here. Returns whether
    something was deleted (a missing path is no error and needs no check: nothing is touched)."""
    p = Path(path)
    if not os.path.lexists(p):
        return False
    _owning_root(p, Path(root))
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
    return True


# -- outputs that may leave the build folder ------------------------------------------------------------------
def _stat_key(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def output_path(build_dir: str | os.PathLike, value: str | os.PathLike, key: str, allow_outside: bool) -> Path:
    """Where the output ``value`` (relative to the build folder, or absolute) goes. Inside the build folder it is
    always allowed; outside only with ``allow_outside`` (the recipe's ``allow_outside_build: true``), else a
    one-line error naming ``key``."""
    b = Path(build_dir)
    p = Path(value) if Path(value).is_absolute() else b / value
    if is_inside(p, b):
        return p
    if not allow_outside:
        raise _error(f"{key}: {p} is outside the build folder {b} (set allow_outside_build: true next to it to "
                     "allow outputs elsewhere)")
    return p


def check_outside_file(build_dir: str | os.PathLike, path: str | os.PathLike, key: str) -> None:
    """An opted-out output file outside the build folder may be (over)written only when it does not exist or is
    the very file this build wrote there last (same size and mtime as recorded in the build's marker)."""
    b, p = Path(build_dir), Path(path)
    if is_inside(p, b) or not os.path.lexists(p):
        return
    rec = ((read_marker(b) or {}).get("outside") or {}).get(str(p.resolve()))
    if p.is_symlink() or not p.is_file() or rec != _stat_key(p):
        raise _error(f"{key}: refusing to overwrite {p}: tether did not write it")


def record_outside_file(build_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Remember (in the build's marker) an output file this build just wrote outside the build folder."""
    b, p = Path(build_dir), Path(path)
    if is_inside(p, b):
        return
    m = read_marker(b) or {"tether": FORMAT, "kind": "build"}
    m.setdefault("outside", {})[str(p.resolve())] = _stat_key(p)
    write_marker(b, m)


def claim_output_dir(build_dir: str | os.PathLike, out: str | os.PathLike, key: str,
                     check_only: bool = False) -> Path:
    """An output folder: inside the build folder nothing more to check. Outside (opted in), tether writes into
    it only if it is new, empty, or already marked as this build's output folder; it marks it on first use
    (unless ``check_only``). A one-line error otherwise."""
    b, o = Path(build_dir), Path(out)
    if is_inside(o, b):
        return o
    if o.exists():
        if not o.is_dir():
            raise _error(f"{key}: {o} exists and is not a folder")
        m = read_marker(o)
        if m is not None:
            if m["kind"] != "output" or Path(m.get("build", "")) != b.resolve():
                owner = m.get("build") if m["kind"] == "output" else "a tether build folder itself"
                raise _error(f"{key}: {o} belongs to {owner}, not to the build {b}")
            return o
        if any(p.name not in _IGNORABLE for p in o.iterdir()):
            raise _error(f"{key}: refusing to write into {o}: it is not empty and tether did not create it")
    if not check_only:
        o.mkdir(parents=True, exist_ok=True)
        write_marker(o, {"tether": FORMAT, "kind": "output", "build": str(b.resolve())})
    return o
