"""The training program's entry points: ``align/train.py`` run as a file (directly and through
``accelerate launch``) and ``accelerate launch -m align.train`` — same run, and no module of ``align/`` shadows a
top-level module while ``align/`` is first on ``sys.path`` (checked on every module the run imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_train import data_dir, make_recipe, text_dir  # noqa: F401  (fixtures re-used)

REPO = Path(__file__).resolve().parent.parent
# what a file run would shadow: every module and package name directly under align/
ALIGN_NAMES = {p.stem for p in (REPO / "align").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").is_file()) and not p.name.startswith("__")}


def _recipe(tmp_path: Path, vision_dir, text_dir, data_dir, name: str) -> Path:
    rp = make_recipe(tmp_path / name / "r.yaml", vision_dir, text_dir, data_dir)
    r = yaml.safe_load(rp.read_text())
    r["train"].update(epochs=1, log_with="none")
    rp.write_text(yaml.safe_dump(r))
    return rp


def _top_level_imports(stderr: str) -> set[str]:
    """Top-level names of every module imported, from ``-X importtime`` / PYTHONPROFILEIMPORTTIME output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def _run(cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the installed package only, as a user runs it
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _check_run(p: subprocess.CompletedProcess, out: Path) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    imported = _top_level_imports(p.stderr)
    assert "torch" in imported and "align" in imported  # the profile really covers the run
    assert not imported & ALIGN_NAMES, f"align/ modules imported as top-level modules: {imported & ALIGN_NAMES}"
    assert (out / "model" / "model.safetensors").is_file()
    return json.loads((out / "metrics.json").read_text())


def test_file_and_module_entries_train_the_same(tmp_path, tiny_vision_dir, text_dir, data_dir):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {"file": [sys.executable, "align/train.py"],
            "accelerate-file": [*accelerate, "align/train.py"],
            "accelerate-module": [*accelerate, "-m", "align.train"]}
    metrics = {}
    for name, cmd in runs.items():
        rp = _recipe(tmp_path, tiny_vision_dir, text_dir, data_dir, name)
        metrics[name] = _check_run(_run([*cmd, "--config", str(rp)]), tmp_path / name / "run")
    first = metrics["file"]
    assert first["steps"] == 200 // 32
    for m in metrics.values():
        assert (m["steps"], m["first_loss"], m["last_loss"], m["val"]) == \
            (first["steps"], first["first_loss"], first["last_loss"], first["val"])


def test_file_entry_without_the_package_says_so_in_one_line():
    # -S: no site-packages, so no installed `align`; the file's folder alone does not provide it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-S", "align/train.py", "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: the align package is not importable: install the project (pip install -e .), or set PYTHONPATH to "
        "the repository root"]
