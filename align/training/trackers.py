"""accelerate trackers: tensorboard when installed, otherwise one JSON line per ``log`` call."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tether.recipe import RecipeError


def _jsonl_tracker_class():
    from accelerate.tracking import GeneralTracker

    class JSONLTracker(GeneralTracker):
        """One JSON object per ``log`` call in ``<logging_dir>/<run>/log.jsonl`` (used when tensorboard is absent)."""

        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self, run_name: str, logging_dir: str, **kwargs):
            super().__init__()
            self.path = Path(logging_dir) / run_name / "log.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = None

        @property
        def tracker(self):
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")
            return self._f

        def store_init_configuration(self, values: dict):
            self.log({"config": values}, step=0)

        def log(self, values: dict, step: int | None = None, **kwargs):
            self.tracker.write(json.dumps({"step": step, "time": time.time(), **values}, default=str) + "\n")
            self.tracker.flush()

        def finish(self):
            if self._f is not None:
                self._f.close()
                self._f = None

    return JSONLTracker


def make_trackers(kind: str, logging_dir: Path):
    if kind == "none":
        return None
    if kind in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
            return "tensorboard"
        except ImportError:
            if kind == "tensorboard":
                raise RecipeError("train.log_with=tensorboard but tensorboard is not installed "
                                  "(pip install tensorboard, or use jsonl)") from None
    return _jsonl_tracker_class()(run_name="align", logging_dir=str(logging_dir))


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
