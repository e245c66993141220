"""`curate build` end to end: CLI, recipe errors, stats/inspect/preview, kill-and-resume, real Flickr8k."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curate.catalog import Catalog
from curate.cli import main

REPO = Path(__file__).resolve().parent.parent
TABLES = {
    "samples": "uid, source, row_index, url, path, caption, width, height, extra",
    "decisions": "uid, stage, kept, reason, ref_uid, concept_id",
    "matches": "uid, concept_id, method, score, span",
    "concepts": "concept_id, name, gloss, origin",
    "balance_report": "stage, concept_id, before, after, floor, shortfall",
}
WORDS = ["dog", "cat", "horse", "bird", "car", "child", "man", "woman", "ball", "bicycle"]


def _make_csv(path: Path, n: int) -> None:
    """n rows of synthetic web captions: skewed concept frequencies, some duplicates and bad rows."""
    import random

    rng = random.Random(0)
    weights = [50, 20, 8, 6, 4, 3, 3, 2, 1, 1]
    with open(path, "w", encoding="utf-8") as f:
        f.write("url,caption,license\n")
        for i in range(n):
            a, b = rng.choices(WORDS, weights, k=2)
            cap = f"a {rng.choice(['small', 'big', 'red', 'young'])} {a} next to the {b} number {i % 5000}"
            if i % 997 == 5 and i < n - 50:
                cap = ""
            if i % 1499 == 7:
                cap = "ok"
            j = i if i < n - 50 else i - (n - 50) + 100  # the last 50 rows repeat the urls of rows 100..149
            url = f"http://img.example/{j}.jpg"
            f.write(f"{url},{cap},cc-by\n")


def _recipe(tmp_path: Path, src: Path, **over) -> Path:
    r = {
        "name": "tiny", "sources": [{"name": "web", "format": "csv", "path": src.name, "extra_columns": ["license"]}],
        "ingest": {"batch_rows": over.pop("batch_rows", 400)},
        "filter": {"min_words": 2},
        "dedup": {"exact": ["url", "caption"]},
        "concepts": {"imagenet1k": False, "words": WORDS},
        "match": {"mode": "lexical", "lexical": {"unit_rows": over.pop("unit_rows", 500)}},
        "balance": {"method": "t", "t": over.pop("t", 70), "seed": 3, "floor": 30},
        "output": {"extra_columns": ["license"]},
    }
    r.update(over)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _dump(cat_path: Path) -> dict[str, list]:
    with Catalog(cat_path, read_only=True) as cat:
        out = {t: sorted(cat.execute(f"SELECT {cols} FROM {t}").fetchall(), key=repr) for t, cols in TABLES.items()}
        out["stages"] = sorted(cat.execute("SELECT stage, status, params, rows FROM stages").fetchall())
        out["progress"] = sorted(cat.execute("SELECT * FROM progress").fetchall())
    return out


def test_build_stats_inspect_preview(tmp_path, capsys):
    _make_csv(tmp_path / "web.csv", 3000)
    rp = _recipe(tmp_path, tmp_path / "web.csv")
    out = tmp_path / "b"
    assert main(["build", str(rp), "--out", str(out), "--no-progress"]) == 0
    sel = pq.read_table(out / "selection.parquet")
    assert sel.column_names[:5] == ["uid", "url", "path", "caption", "concept_ids"]
    assert "license" in sel.column_names and set(sel.column("license").to_pylist()) == {"cc-by"}
    rows = sel.to_pylist()
    assert rows and all(r["concept_ids"] and r["balance_concept"] in r["concept_ids"] for r in rows)
    assert all(f" {r['balance_concept'][5:]} " in f" {r['caption']} " for r in rows)  # user:<word> in caption
    with Catalog(out / "catalog.duckdb", read_only=True) as cat:
        per = dict(cat.execute("SELECT concept_id, after FROM balance_report").fetchall())
        before = dict(cat.execute("SELECT concept_id, before FROM balance_report").fetchall())
        assert before["user:dog"] > 1000 and per["user:dog"] < before["user:dog"] / 3  # head capped
        tail = [c for c, b in before.items() if b <= 70]
        assert tail and all(per[c] == before[c] for c in tail)  # concepts at or below t keep every sample
        reasons = dict(cat.execute("SELECT reason, count(*) FROM decisions WHERE NOT kept GROUP BY 1").fetchall())
        assert reasons["empty caption"] == 3 and reasons["duplicate url"] == 50
        assert reasons["too few words (1 < 2)"] == 2
        assert cat.scalar("SELECT count(*) FROM alive") == len(rows)
    card = (out / "card" / "README.md").read_text()
    assert "Concepts before/after balancing" in card
    assert (out / "card" / "head_tail.png").stat().st_size > 1000
    assert (out / "card" / "concepts_before_after.png").stat().st_size > 1000
    capsys.readouterr()

    # a rerun skips every stage and gives the same selection
    assert main(["build", str(rp), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 8 and pq.read_table(out / "selection.parquet").equals(sel)
    # a changed balance section reruns balance + select only
    assert main(["build", str(rp), "--out", str(out), "--no-progress", "--set", "balance.t=100"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 6 and "stage balance: start" in err and "stage select: start" in err
    assert pq.read_table(out / "selection.parquet").num_rows > len(rows)
    # a done stage whose output file vanished runs again
    (out / "selection.parquet").unlink()
    assert main(["build", str(rp), "--out", str(out), "--no-progress", "--set", "balance.t=100"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 7 and "stage select: start" in err and (out / "selection.parquet").exists()

    assert main(["stats", str(out), "--concepts", "3"]) == 0
    so = capsys.readouterr().out
    assert "per stage:" in so and "user:dog" in so and "duplicate url" in so
    assert so.split("per concept")[1].count("user:") == 3
    assert main(["inspect", str(out), "--uid", "web:5"]) == 0
    so = capsys.readouterr().out
    assert "ingest: DROPPED - empty caption" in so and "verdict: dropped at ingest" in so
    assert main(["inspect", str(out), "--uid", "web:2960"]) == 0
    so = capsys.readouterr().out
    assert "dedup: DROPPED - duplicate url (duplicate of web:110)" in so
    assert main(["inspect", str(out), "--uid", sel.column("uid")[0].as_py()]) == 0
    so = capsys.readouterr().out
    assert "[lexical]" in so and "balance: " in so and "t-balance" in so

    # coverage balancing through the recipe: each concept claims at most per_concept samples, uniquely
    assert main(["build", str(rp), "--out", str(out), "--no-progress", "--set", "balance.method=coverage",
                 "--set", "balance.per_concept=25"]) == 0
    cov = pq.read_table(out / "selection.parquet").to_pylist()
    owners = [r["balance_concept"] for r in cov]
    assert len(cov) == len(set(r["uid"] for r in cov)) == 10 * 25  # 10 concepts, each has >= 25 candidates
    assert all(owners.count(c) == 25 for c in set(owners))
    capsys.readouterr()

    assert main(["preview", str(rp), "--out", str(out), "--t", "10,40,100000", "--no-progress"]) == 0
    so = capsys.readouterr().out
    lines = [ln.split() for ln in so.splitlines() if ln[:1].isdigit()]
    assert [int(ln[0].replace(",", "")) for ln in lines] == [10, 40, 100000]
    exp = [int(ln[1].replace(",", "")) for ln in lines]
    with Catalog(out / "catalog.duckdb", read_only=True) as cat:
        matched = cat.scalar("SELECT count(DISTINCT uid) FROM matches")
    # on a finished build the preview still sees the pre-balance candidates: t above every count keeps all
    assert exp[0] < exp[1] < exp[2] == matched


@pytest.mark.parametrize("text,msg", [
    ("name: [x\n", "malformed YAML"),
    ("name: t\nsources: [{name: a, format: csv, path: web.csv}]\nbogus: 1\n", "bogus: unknown key"),
    ("name: t\nsources: [{name: a, format: csv, path: web.csv}]\nbalance: {t: lots}\n", "balance.t"),
    ("name: t\nsources: [{name: a, format: csv, path: missing.csv}]\n", "no file matches"),
    ("name: t\nsources: [{name: a, format: csv, path: nocap.csv}]\nconcepts: {imagenet1k: false, words: [dog]}\n",
     "caption column 'caption' not found"),
    ("name: t\nsources: [{name: a, format: csv, path: empty.csv}]\nconcepts: {imagenet1k: false, words: [dog]}\n",
     "is empty"),
    ("name: t\nsources: []\n", "sources"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, text, msg):
    (tmp_path / "web.csv").write_text("url,caption\nhttp://a,a dog\n")
    (tmp_path / "nocap.csv").write_text("url,text\nhttp://a,a dog\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "r.yaml").write_text(text)
    rc = main(["build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and msg in err[-1], err
    assert not any("Traceback" in ln for ln in err)


def test_cli_errors_for_builds(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nope")]) == 2
    assert "no build catalog" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "r.yaml"), "--set", "x"]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TETHER_DEBUG="")
    return subprocess.Popen([sys.executable, "-m", "curate", *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, **kw)


def _kill_when(p: subprocess.Popen, marker: str, wal: Path, timeout: float = 120) -> None:
    """Wait for ``marker`` on stderr, then until a commit hit the WAL, then SIGKILL."""
    t0 = time.time()
    for line in p.stderr:
        if marker in line:
            break
        assert time.time() - t0 < timeout
    else:
        raise AssertionError(f"process ended before {marker!r}")
    while not (wal.exists() and wal.stat().st_size > 0) and p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.02)
    time.sleep(0.3)
    assert p.poll() is None, "build finished before it could be killed: make the input bigger"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)


def test_killed_build_resumes_to_identical_catalog(tmp_path):
    _make_csv(tmp_path / "web.csv", 30000)
    rp = _recipe(tmp_path, tmp_path / "web.csv", batch_rows=500, unit_rows=2000)
    ref = tmp_path / "ref"
    p = _run_cli(["build", str(rp), "--out", str(ref), "--no-progress"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    out = tmp_path / "killed"
    _kill_when(_run_cli(["build", str(rp), "--out", str(out), "--no-progress"]), "stage ingest: start",
               out / "catalog.duckdb.wal")
    with Catalog(out / "catalog.duckdb", read_only=True) as cat:
        assert cat.scalar("SELECT status FROM stages WHERE stage = 'ingest'") == "running"
        units = len(cat.done_units("ingest"))
        assert units < 60 and cat.scalar("SELECT count(*) FROM samples") == 500 * units
    p = _run_cli(["build", str(rp), "--out", str(out), "--no-progress"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "stage ingest: resuming" in err
    assert _dump(out / "catalog.duckdb") == _dump(ref / "catalog.duckdb")
    assert pq.read_table(out / "selection.parquet").equals(pq.read_table(ref / "selection.parquet"))


@pytest.mark.real
def test_real_flickr8k_dogs(tmp_path, flickr8k, capsys):
    """40k real captions: dog concepts match dog captions; per-concept counts are stable for a seed."""
    from curate.balance import BalanceConfig, run_balance

    rp = REPO / "recipes" / "quickstart_curate.yaml"
    out = tmp_path / "qs"
    assert main(["build", str(rp), "--out", str(out), "--no-progress",
                 "--set", f"sources.0.path={flickr8k / 'captions.txt'}"]) == 0
    with Catalog(out / "catalog.duckdb") as cat:
        assert cat.scalar("SELECT count(*) FROM samples") == 40450
        dog = "n02084071"
        dog_caps = {u for (u,) in cat.execute(
            "SELECT uid FROM samples s WHERE regexp_matches(lower(caption), '\\bdogs?\\b') AND NOT EXISTS ("
            "SELECT 1 FROM decisions d WHERE d.uid = s.uid AND NOT d.kept AND d.stage <> 'balance')").fetchall()}
        matched = {u for (u,) in cat.execute("SELECT uid FROM matches WHERE concept_id = ?", [dog]).fetchall()}
        assert len(dog_caps) > 5000
        assert len(dog_caps & matched) / len(dog_caps) > 0.97  # "dog"/"dogs" captions match the dog synset
        assert len(matched - dog_caps) / len(matched) < 0.05   # and little else does
        before = dict(cat.execute("SELECT concept_id, after FROM balance_report WHERE stage='balance'").fetchall())
        t = yaml.safe_load(rp.read_text())["balance"]["t"]
        assert before[dog] < 9000 and before[dog] > t  # dog is the head concept: capped near t
        run_balance(cat, BalanceConfig(**yaml.safe_load(rp.read_text())["balance"]), progress=False)
        again = dict(cat.execute("SELECT concept_id, after FROM balance_report WHERE stage='balance'").fetchall())
        assert again == before
        other = yaml.safe_load(rp.read_text())["balance"] | {"seed": 12345}
        run_balance(cat, BalanceConfig(**other), progress=False)
        moved = dict(cat.execute("SELECT concept_id, after FROM balance_report WHERE stage='balance'").fetchall())
        assert moved != before and abs(moved[dog] - before[dog]) < 0.2 * before[dog]
