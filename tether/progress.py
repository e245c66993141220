"""Progress bars for every command: tqdm on a terminal, a few plain lines off one.

Logged to a file (``cmd > log 2>&1``), a tqdm bar writes a carriage-return update several times a second: one
endless line per bar. :func:`progress` takes tqdm's arguments and returns a tqdm bar when the output is a
terminal, else :class:`LineProgress`: the same object (``update``, ``set_postfix``, ``write``, iteration,
context manager) that prints a first line, one ordinary line per tenth of the total (or per minute when the total is
unknown) but none sooner than 2 s after the previous one — a step of a second is two lines, not eleven — and a
last line at the end — no ``\\r``. ``TETHER_PROGRESS=tty`` / ``lines`` forces either.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


def _is_tty(fp) -> bool:
    try:
        return bool(fp.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress(tqdm):
    """tqdm that prints plain lines (see the module docstring); ``every_s``: the interval without a total;
    ``min_gap_s``: the least time between two lines before the last."""

    def __init__(self, *args, every_s: float = 60.0, min_gap_s: float = 2.0, **kw):
        self._every_s, self._min_gap_s, self._last_tenth, self._said_n = every_s, min_gap_s, -1, None
        self._last_t = -float("inf")
        kw.setdefault("dynamic_ncols", False)
        kw["ncols"] = kw.get("ncols") or 100
        kw["mininterval"] = 0
        kw["miniters"] = 1
        super().__init__(*args, **kw)

    def _line(self) -> None:
        d = self.format_dict
        d["ncols"] = 0  # no bar graphics: counts, rate, time
        self.fp.write(self.format_meter(**d).strip() + "\n")
        self.fp.flush()
        self._said_n = self.n

    def display(self, msg=None, pos=None):  # called by tqdm on refresh/update/close
        if self.disable:
            return True
        now = time.monotonic()
        if self.total:
            tenth = int(10 * min(self.n, self.total) / self.total)
            due = tenth > self._last_tenth and now - self._last_t >= self._min_gap_s
            if due:
                self._last_tenth = tenth
        else:
            due = now - self._last_t >= self._every_s
        if due:
            self._last_t = now
            self._line()
        return True

    def clear(self, nolock=False):  # nothing to erase: lines are never rewritten (tqdm.write calls this)
        pass

    def close(self):
        if self.disable:
            return
        if self._said_n != self.n:
            self._line()
        self.disable = True  # tqdm's own close would write "\r"/"\n" fragments
        self._decr_instances(self)


def progress(*args, **kw) -> tqdm:
    """A progress bar with tqdm's arguments: a tqdm bar on a terminal, :class:`LineProgress` off one."""
    mode = os.environ.get("TETHER_PROGRESS", "")
    fp = kw.get("file") or sys.stderr
    if mode == "tty" or (mode != "lines" and _is_tty(fp)):
        return tqdm(*args, **{k: v for k, v in kw.items() if k not in ("every_s", "min_gap_s")})
    return LineProgress(*args, **kw)


def quiet_library_bars() -> None:
    """Off a terminal, turn off the progress bars that libraries draw themselves (transformers' "Loading
    weights", huggingface_hub downloads)."""
    if os.environ.get("TETHER_PROGRESS") == "tty" or _is_tty(sys.stderr):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # transformers absent or without it: nothing to quiet
        pass
