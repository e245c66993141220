"""tether.progress: off a terminal, every bar prints a few plain lines (no carriage-return storms)."""

from __future__ import annotations

import io
import subprocess
import sys

from tether.progress import LineProgress, progress


def test_off_a_terminal_a_bar_is_a_few_plain_lines():
    fast = io.StringIO()  # a step of well under 2 s: its first line and its last, not a line per tenth
    for _ in progress(range(3153), desc="surface forms", file=fast):
        pass
    assert [x.split(":")[1].split()[0] for x in fast.getvalue().splitlines()] == ["0%", "100%"]
    buf = io.StringIO()
    bar = progress(total=10_000, desc="extract features", unit="img", file=buf, min_gap_s=0)
    assert isinstance(bar, LineProgress)
    for i in range(10_000):
        bar.update(1)
        if i == 5_000:
            bar.set_postfix(skipped=2)
            bar.write("skipped x: corrupt", file=buf)
    bar.close()
    out = buf.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 12 and lines[-1].startswith("extract features: 100% 10000/10000")  # 0..100 % + message
    assert "skipped x: corrupt" in lines and "skipped=2" in lines[-1]
    buf2 = io.StringIO()
    assert sum(1 for _ in progress(range(7), desc="embed", file=buf2)) == 7 and "\r" not in buf2.getvalue()


def test_a_logged_cli_run_has_no_carriage_returns(tmp_path):
    """A real command with its stderr in a file (not a terminal): the extraction bar and the libraries' own bars."""
    code = ("import sys; from tether.clikit import run_command; from tether.progress import progress\n"
            "def f(a):\n"
            "    for _ in progress(range(300), desc='work'): pass\n"
            "    from transformers.utils import logging as l; print('hf bars', l.is_progress_bar_enabled())\n"
            "sys.exit(run_command(f, None))\n")
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, check=True)
    out = (tmp_path / "log").read_text()
    assert "\r" not in out and "work: 100% 300/300" in out and "hf bars False" in out
