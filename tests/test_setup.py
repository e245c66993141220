"""The README's set-up commands on a stock machine: only `python3` on PATH (no `python`), a PEP 668 system
Python, so everything goes through the project venv that .ci/install makes. These checks read the scripts; the
whole path is exercised by CI itself (`bash .ci/run` on a fresh clone)."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [REPO / ".ci" / "install", REPO / ".ci" / "run", REPO / "recipes" / "quickstart.sh",
           REPO / "recipes" / "loop_quickstart.sh", REPO / "recipes" / "_env.sh"]
# `python` / `pip` as a command word, i.e. at the start of a command (not python3, not "$PY" -m pip, not a path)
BARE = re.compile(r"(^|[;&|(`]|\b(?:then|do|else|exec|time|env|sudo))\s*(python|pip|pip3)(\s|$)")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_call_no_bare_python(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    code = [ln.split("#", 1)[0] for ln in script.read_text().splitlines()]
    offenders = [ln for ln in code if BARE.search(ln)]
    # .ci/run calls `python -m pytest` only after sourcing the venv it made
    if script.name == "run":
        text = script.read_text()
        assert text.index('source "$VENV/bin/activate"') < text.index("python -m pytest")
        offenders = [ln for ln in offenders if "python -m pytest" not in ln]
    assert not offenders, f"{script.name} calls a bare python/pip: {offenders}"


def test_install_makes_and_uses_a_venv():
    text = (REPO / ".ci" / "install").read_text()
    assert '-m venv "$VENV"' in text and 'PY="$VENV/bin/python"' in text
    assert "python3-venv" in text  # Debian/Ubuntu ship the venv module separately
    # every pip install runs the venv's pip; torch==2.13.0 (CPU) is installed before the project
    pips = [ln for ln in text.splitlines() if "pip install" in ln and not ln.lstrip().startswith("#")]
    assert pips and all(ln.lstrip().startswith('"$PY" -m pip install') for ln in pips), pips
    assert "torch==2.13.0" in pips[0]


def test_quickstart_refuses_without_install(tmp_path):
    """Without the venv and without `curate` on PATH the quickstart says what to run, in one line, exit 2."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TETHER_VENV": str(tmp_path / "none")}
    out = subprocess.run(["bash", str(REPO / "recipes" / "quickstart.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: curate not found: run `bash .ci/install` first (it installs "
                                               f"tether into {tmp_path / 'none'})"]
