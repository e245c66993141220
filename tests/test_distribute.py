"""Lexical matching in N local processes and on a local Ray cluster gives the catalog of one process, row for
row; a killed multi-process build leaves no worker behind and resumes to the same catalog."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import yaml

from curate.catalog import Catalog
from curate.cli import main
from tether.distribute import DistributorConfig, local_workers, run_units
from test_build import _make_csv, _recipe, _run_cli

IN_ORDER = ("matches", "lexical_removed")  # committed unit by unit in unit order: the same rows in the same order
AS_SETS = ("samples", "decisions", "balance_report")  # written by parallel SQL: the same rows


def _dump(catalog) -> dict:
    with Catalog(catalog, read_only=True) as cat:
        out = {t: cat.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in IN_ORDER}
        out.update({t: sorted(cat.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in AS_SETS})
        out["units"] = sorted(cat.done_units("match_lexical"))
    return out


def _build(tmp_path, name, distributor: dict, rows: int = 3000, unit_rows: int = 250):
    src = tmp_path / "web.csv"
    if not src.exists():
        _make_csv(src, rows)
    rp = _recipe(tmp_path, src, unit_rows=unit_rows)
    r = yaml.safe_load(rp.read_text())
    r["distributor"] = distributor
    rp.write_text(yaml.safe_dump(r))
    assert main(["build", str(rp), "--out", str(tmp_path / name), "--no-progress"]) == 0
    return tmp_path / name / "catalog.duckdb"


class _Square:
    def __init__(self, offset):
        self.offset = offset

    def __call__(self, x):
        return x * x + self.offset


def test_run_units_keeps_item_order_and_bounds_the_window():
    items = [(i, (i,)) for i in range(40)]
    one = list(run_units(DistributorConfig(workers=1), _Square, (1,), items))
    two = list(run_units(DistributorConfig(workers=2, window=3), _Square, (1,), iter(items)))
    assert one == two == [(i, i * i + 1) for i in range(40)]
    assert local_workers(DistributorConfig(), threads=3) == 3 and local_workers(DistributorConfig(workers=5)) == 5


def test_two_processes_give_the_one_process_catalog(tmp_path):
    ref = _dump(_build(tmp_path, "one", {"workers": 1}))
    assert len(ref["units"]) == 12 and ref["matches"]  # several units: the pool is really used
    assert _dump(_build(tmp_path, "two", {"workers": 2})) == ref


@pytest.mark.slow
def test_ray_gives_the_local_catalog(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    ref = _dump(_build(tmp_path, "one", {"workers": 1}))
    assert _dump(_build(tmp_path, "ray", {"kind": "ray", "workers": 2})) == ref


def test_ray_missing_cluster_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    src = tmp_path / "web.csv"
    _make_csv(src, 3000)
    rp = _recipe(tmp_path, src, unit_rows=250)
    r = yaml.safe_load(rp.read_text())
    r["distributor"] = {"kind": "ray", "address": "127.0.0.1:1"}  # nothing listens there
    rp.write_text(yaml.safe_dump(r))
    assert main(["build", str(rp), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: distributor.address='127.0.0.1:1': cannot join the Ray cluster"), err[-1]


def test_killed_parallel_build_leaves_no_worker_and_resumes(tmp_path):
    src = tmp_path / "web.csv"
    _make_csv(src, 30000)
    rp = _recipe(tmp_path, src, unit_rows=500, batch_rows=5000)
    r = yaml.safe_load(rp.read_text())
    r["distributor"] = {"workers": 2, "window": 2}
    rp.write_text(yaml.safe_dump(r))
    ref = tmp_path / "ref"
    p = _run_cli(["build", str(rp), "--out", str(ref), "--no-progress"])
    assert p.wait(600) == 0, p.stderr.read()

    out = tmp_path / "killed"
    p = _run_cli(["build", str(rp), "--out", str(out), "--no-progress"])
    t0 = time.time()
    for line in p.stderr:  # the workers start with the match stage
        if "stage match: start" in line:
            break
        assert time.time() - t0 < 300
    workers: list[psutil.Process] = []
    while len(workers) < 2 and time.time() - t0 < 300 and p.poll() is None:
        workers = [c for c in psutil.Process(p.pid).children(recursive=True)
                   if "spawn" in " ".join(c.cmdline()) or "multiprocessing" in " ".join(c.cmdline())]
        time.sleep(0.05)
    assert p.poll() is None and len(workers) >= 2, "match finished before the kill: make the input bigger"
    time.sleep(1.0)  # some units committed
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers: {[w.pid for w in alive]}"
    p = _run_cli(["build", str(rp), "--out", str(out), "--no-progress"])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    # (on idle cores matching may have finished before the kill: the rerun then resumes a later stage)
    assert _dump(out / "catalog.duckdb") == _dump(ref / "catalog.duckdb")
