"""The build folder owns its outputs and nothing else: marker, build lock, the one deletion helper, outputs outside
the build folder (issue 17; docs/threat_model.md)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml
from PIL import Image

from curate.cli import main
from tether.fileio import LOCK, MARKER, build_lock, read_marker, remove_path
from tether.recipe import RecipeError
from httpserver import make_build

REPO = Path(__file__).resolve().parent.parent
WORDS = ["dog", "cat", "horse", "bird", "car"]


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (files by content hash, folders and links by kind) — a folder's fingerprint."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _csv(path: Path, n: int = 120) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("url,caption\n")
        for i in range(n):
            f.write(f"http://img.example/{i}.jpg,a small {WORDS[i % 5]} next to the {WORDS[(i * 3) % 5]} {i}\n")
    return path


def _recipe(tmp_path: Path, **over) -> Path:
    src = _csv(tmp_path / "web.csv")
    r = {"name": "tiny", "sources": [{"name": "web", "format": "csv", "path": src.name}],
         "concepts": {"imagenet1k": False, "words": WORDS}, "match": {"mode": "lexical"},
         "balance": {"method": "t", "t": 10, "seed": 1}, "output": {"card": False}}
    r.update(over)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _foreign(folder: Path) -> Path:
    """Another project's folder: files, a media/download tree, and a DuckDB catalog of its own."""
    (folder / "media" / "download").mkdir(parents=True)
    (folder / "media" / "download" / "keep.bin").write_bytes(b"\x00precious" * 100)
    (folder / "README.md").write_text("# my project\n")
    (folder / "recipe.yaml").write_text("mine: true\n")
    (folder / "selection.parquet").write_bytes(b"not yours")
    con = duckdb.connect(str(folder / "catalog.duckdb"))
    con.execute("CREATE TABLE accounts(id INTEGER, name VARCHAR)")
    con.execute("INSERT INTO accounts VALUES (1, 'a'), (2, 'b')")
    con.close()
    return folder


def unlocked_tree(folder: Path) -> dict[str, str]:
    """:func:`tree` without the lock file (whose content is the pid of the process holding the lock)."""
    return {k: v for k, v in tree(folder).items() if k != LOCK}


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------ foreign folders
def test_unrelated_folder_is_refused_and_untouched(tmp_path, capsys):
    rp = _recipe(tmp_path)
    other = _foreign(tmp_path / "other")
    before = tree(other)
    assert main(["build", str(rp), "--out", str(other), "--no-progress"]) == 2
    assert "is not empty and is not a tether build folder" in _err_line(capsys)
    for cmd in ("download", "shard", "retry-failed"):
        assert main([cmd, str(other), "--no-progress"]) == 2, cmd
        assert "not a tether build folder" in _err_line(capsys)
    assert tree(other) == before  # nothing deleted, overwritten or added (no marker, no lock file)
    con = duckdb.connect(str(other / "catalog.duckdb"), read_only=True)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert tables == {"accounts"}  # the foreign catalog got none of tether's tables


def test_new_and_empty_folders_are_marked(tmp_path, capsys):
    rp = _recipe(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "new" / "deeper"):
        assert main(["build", str(rp), "--out", str(out), "--no-progress"]) == 0
        assert read_marker(out) == {"tether": 1, "kind": "build"}
        assert (out / "selection.parquet").exists()
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    assert main(["build", str(rp), "--out", str(tmp_path / "afile"), "--no-progress"]) == 2
    assert "not a folder" in _err_line(capsys)
    (empty / MARKER).write_text(json.dumps({"tether": 99, "kind": "build"}))
    assert main(["build", str(rp), "--out", str(empty), "--no-progress"]) == 2
    assert "newer tether" in _err_line(capsys)


def test_remove_path_deletes_only_inside_a_marked_folder(tmp_path):
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    (plain / "sub" / "f").write_text("x")
    with pytest.raises(RecipeError, match="not a tether build folder"):
        remove_path(plain / "sub", plain)
    assert (plain / "sub" / "f").exists()

    b = tmp_path / "b"
    b.mkdir()
    (b / MARKER).write_text(json.dumps({"tether": 1, "kind": "build"}))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "v").write_text("keep")
    (b / "sub").mkdir()
    for bad in (victim, b / ".." / "victim", b, b / "sub" / ".."):
        with pytest.raises(RecipeError, match="not inside"):
            remove_path(bad, b)
    (b / "link").symlink_to(victim)  # a link inside the build folder to a folder outside it
    assert remove_path(b / "link", b) and not os.path.lexists(b / "link")
    with pytest.raises(RecipeError, match="not inside"):  # through the link: outside
        (b / "link2").symlink_to(victim)
        remove_path(b / "link2" / "v", b)
    assert (victim / "v").read_text() == "keep"
    (b / "media" / "download").mkdir(parents=True)
    (b / "media" / "download" / "x").write_text("ours")
    assert remove_path(b / "media" / "download", b) and not (b / "media" / "download").exists()
    assert not remove_path(b / "gone", b)  # nothing there: nothing to do


# ------------------------------------------------------------------------------------------------ output paths
def test_outputs_outside_the_build_folder_are_refused(tmp_path, capsys):
    rp = _recipe(tmp_path, media={"download": {"enabled": False}})
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "index.parquet").write_bytes(b"their index")
    (proj / "README.md").write_text("# theirs\n")
    before = tree(proj)
    out = tmp_path / "b"
    for key, val in (("output.selection", str(proj / "index.parquet")), ("output.selection", "../project/x.parquet"),
                     ("media.shards.out", str(proj)), ("media.shards.out", "../project")):
        assert main(["build", str(rp), "--out", str(out), "--no-progress", "--set", f"{key}={val}"]) == 2
        err = _err_line(capsys)
        assert key in err and "outside the build folder" in err and "allow_outside_build" in err
        assert not out.exists()  # refused before the build folder was even made
    assert tree(proj) == before


def test_opted_out_outputs_never_overwrite_foreign_files(tmp_path, capsys):
    rp = _recipe(tmp_path)
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "index.parquet").write_bytes(b"their index")
    before = tree(proj)
    out = tmp_path / "b"
    sel = ["--set", "output.allow_outside_build=true"]
    assert main(["build", str(rp), "--out", str(out), "--no-progress", *sel,
                 "--set", f"output.selection={proj / 'index.parquet'}"]) == 2
    assert "refusing to overwrite" in _err_line(capsys)
    assert tree(proj) == before
    # a new file outside: written, recorded, and rewritten by a later run of the same build
    mine = str(proj / "sel.parquet")
    assert main(["build", str(rp), "--out", str(out), "--no-progress", *sel, "--set", f"output.selection={mine}"]) == 0
    assert str(Path(mine).resolve()) in read_marker(out)["outside"]
    assert main(["build", str(rp), "--out", str(out), "--no-progress", *sel, "--set", f"output.selection={mine}",
                 "--set", "balance.t=5"]) == 0
    capsys.readouterr()
    # someone else replaces it: tether no longer owns it and refuses to write over it
    Path(mine).write_bytes(b"someone else's now")
    assert main(["build", str(rp), "--out", str(out), "--no-progress", *sel, "--set", f"output.selection={mine}",
                 "--set", "balance.t=7"]) == 2
    assert "refusing to overwrite" in _err_line(capsys)
    assert Path(mine).read_bytes() == b"someone else's now"
    assert not list(proj.glob(".*.tmp"))


def _media_build(tmp_path: Path, n: int = 6) -> Path:
    rows = []
    for i in range(n):
        p = tmp_path / "img" / f"i{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (40 * i, 255 - 30 * i, 7 * i)).save(p)
        rows.append({"uid": f"u{i}", "path": str(p), "caption": f"picture {i}", "concept_ids": ["n1"],
                     "source": "s"})
    build = tmp_path / "b"
    make_build(build, rows)  # a tether catalog made without the marker: a build from before markers
    return build


def test_opted_out_shards_folder_must_be_new_or_ours(tmp_path, capsys):
    build = _media_build(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "README.md").write_text("# their dataset\n")
    (theirs / "shard-00000.tar").write_bytes(b"their tar")
    before = tree(theirs)

    def recipe(out, allow=True, seed=0):
        (build / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "media": {
            "image_dedup": {"enabled": False}, "rebalance": {"enabled": False},
            "shards": {"out": str(out), "allow_outside_build": allow, "samples_per_shard": 2, "seed": seed}}}))

    recipe(theirs, allow=False)
    assert main(["download", str(build), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["shard", str(build), "--no-progress"]) == 2
    assert "outside the build folder" in _err_line(capsys)
    recipe(theirs)
    assert main(["shard", str(build), "--no-progress"]) == 2
    assert "not empty and tether did not create it" in _err_line(capsys)
    assert tree(theirs) == before
    ours = tmp_path / "ours"
    recipe(ours)
    assert main(["shard", str(build), "--no-progress"]) == 0
    assert read_marker(ours) == {"tether": 1, "kind": "output", "build": str(build.resolve())}
    assert len(list(ours.glob("shard-*.tar"))) == 3
    (ours / "notes.txt").write_text("a note the user left")
    recipe(ours, seed=5)  # reshard: the old tars are removed, in the folder tether marked as this build's
    assert main(["shard", str(build), "--no-progress"]) == 0
    assert len(list(ours.glob("shard-*.tar"))) == 3 and (ours / "notes.txt").exists()
    capsys.readouterr()
    # another build may not take over this output folder
    other = _media_build(tmp_path / "second")
    (other / "recipe.yaml").write_text((build / "recipe.yaml").read_text())
    assert main(["download", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["shard", str(other), "--no-progress"]) == 2
    assert f"belongs to {build.resolve()}" in _err_line(capsys)


# ------------------------------------------------------------------------------------------------ build lock
HOLD = """
import sys, time
from tether.fileio import build_lock
with build_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_process_is_refused_before_writing(tmp_path, capsys):
    rp = _recipe(tmp_path)
    out = tmp_path / "b"
    assert main(["build", str(rp), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    before = unlocked_tree(out)
    stat = (out / "recipe.yaml").stat()
    assert "balance" in (out / "recipe.yaml").read_text()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["build", str(rp), "--out", str(out), "--no-progress", "--set", "balance.t=3"]) == 2
        assert _err_line(capsys) == (f"error: build folder {out} is in use by another curate process "
                                     f"(pid {holder.pid})")
        assert unlocked_tree(out) == before and (out / "recipe.yaml").stat().st_mtime_ns == stat.st_mtime_ns
        (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text() + "media: {}\n")  # media commands too
        before = unlocked_tree(out)
        for cmd in ("download", "shard", "retry-failed"):
            assert main([cmd, str(out), "--no-progress"]) == 2
            assert f"in use by another curate process (pid {holder.pid})" in _err_line(capsys)
    finally:
        holder.communicate("", timeout=30)
    assert unlocked_tree(out) == before
    with build_lock(out):  # released with its process: the next one gets it
        assert (out / LOCK).read_text().strip() == str(os.getpid())


def test_lock_is_exclusive_within_one_process(tmp_path):
    with build_lock(tmp_path):
        with pytest.raises(RecipeError, match=f"pid {os.getpid()}"):
            with build_lock(tmp_path):
                pass
    with build_lock(tmp_path):
        pass


# ------------------------------------------------------------------------------------------------ old builds
def test_build_from_before_markers_still_resumes(tmp_path, capsys):
    rp = _recipe(tmp_path)
    out = tmp_path / "b"
    assert main(["build", str(rp), "--out", str(out), "--no-progress"]) == 0
    (out / MARKER).unlink()
    (out / LOCK).unlink()  # as an older tether left it
    capsys.readouterr()
    assert main(["build", str(rp), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stage select: done earlier, skipped" in err and "stage ingest: done earlier, skipped" in err
    assert read_marker(out) == {"tether": 1, "kind": "build", "adopted": True}
