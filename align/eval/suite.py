"""``align eval MODEL --suite SUITE.yaml``: one run over many datasets, one paper-style table.

A suite file lists zero-shot classification sets and retrieval sets (:class:`Suite`). Each dataset is a local
ImageFolder / wnid-prefixed folder, a folder saved by ``datasets``' ``save_to_disk``, a Hugging Face dataset id
(``clip-benchmark/wds_cars``: loaded with ``datasets.load_dataset``; class names and templates may come from the
dataset repository's ``classnames.txt`` / ``zeroshot_classification_templates.txt``), or for retrieval a
Flickr-style folder, a COCO captions json or an image,caption table.

The run writes ``<out>/suite.json`` (everything), ``suite.md`` (the table: per dataset top-1 / top-5 / mean
per-class recall, the mean over the classification sets, retrieval R@1/5/10 both ways) and ``suite.png``, and
each dataset's own report under ``<out>/datasets/<name>/``. A finished dataset is not evaluated again: its entry
(``suite_entry.json``) records the model fingerprint and the dataset's settings, and a rerun with both unchanged
reads it back (``fresh=True`` re-evaluates). Image embeddings go to one content-keyed cache (``<out>/cache``), so a
killed run resumes mid-dataset too. A dataset that is missing or cannot be read is one line in the table (and on
stderr), never an abort.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from align.eval.prompts import PROMPT_SETS, templates_for
from tether.digest import json_digest
from tether.fileio import atomic_write
from tether.recipe import RecipeError, Strict, load_recipe, looks_local, resolve_input

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HUB_CLASSNAMES, HUB_TEMPLATES = "classnames.txt", "zeroshot_classification_templates.txt"
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg", "img")
LABEL_COLUMNS = ("label", "cls", "labels", "class")
CAPTION_COLUMNS = ("caption", "txt", "captions", "text", "sentences")


class SuiteDefaults(Strict):
    """Settings every dataset of the suite gets unless it sets its own."""

    split: str = "test"
    prompts: str | list[str] = "clip80"   # a prompt set name (align.eval.prompts) or a list of templates
    limit: int | None = Field(None, ge=1)  # a seeded random subset of this many images per dataset
    seed: int = 0
    batch_size: int = Field(64, ge=1, le=4096)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v):
        _check_prompts(v)
        return v


def _check_prompts(v: Any) -> None:
    if isinstance(v, str) and v not in PROMPT_SETS and v != "hub" and not v.endswith(".txt"):
        raise ValueError(f"prompts {v!r}: a prompt set ({', '.join(PROMPT_SETS)}), 'hub', a .txt file or a list")
    if isinstance(v, list):
        templates_for(v)


class _Set(Strict):
    name: str
    path: str
    split: str | None = None
    limit: int | None = Field(None, ge=1)
    image_column: str | None = None        # None: the first of IMAGE_COLUMNS the data has

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"dataset name {v!r}: 1-64 letters, digits, '.', '_' or '-' (it names a folder)")
        return v


class ClassificationSet(_Set):
    """A zero-shot classification set. ``source`` ``auto``: a saved HF dataset or an image folder when the path
    exists, a Hugging Face dataset id otherwise."""

    source: Literal["auto", "folder", "hf_disk", "hf"] = "auto"
    label_column: str | None = None        # None: the first of LABEL_COLUMNS
    # None: the data's own (ClassLabel names, folder names / WordNet names of wnids; for a hub id with integer
    # labels, the repository's classnames.txt); a list; a .txt file (one per line); "hub" (the repository's)
    classnames: list[str] | str | None = None
    prompts: str | list[str] | None = None  # None: the suite default; also "hub" or a .txt file (one per line)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v):
        if v is not None:
            _check_prompts(v)
        return v


class RetrievalSet(_Set):
    """An image↔text retrieval set: ``flickr`` folder (``captions``: another captions file of it), ``coco``
    captions json, ``table`` (csv/tsv/jsonl/json/parquet), a saved HF dataset or a hub id (one row per image, its
    captions a list or newline-separated text)."""

    source: Literal["auto", "flickr", "coco", "table", "hf_disk", "hf"] = "auto"
    caption_column: str | None = None      # None: the first of CAPTION_COLUMNS
    captions: str | None = None
    image_root: str | None = None
    language: str | None = None


class Suite(Strict):
    name: str = "suite"
    defaults: SuiteDefaults = SuiteDefaults()
    classification: list[ClassificationSet] = []
    retrieval: list[RetrievalSet] = []

    @model_validator(mode="after")
    def _check(self) -> "Suite":
        names = [d.name for d in self.classification + self.retrieval]
        if not names:
            raise ValueError("a suite needs at least one dataset under classification: or retrieval:")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"dataset name {dup[0]!r} is used twice")
        return self


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; relative local paths resolve against the file's folder (hub ids stay)."""
    suite = load_recipe(path, Suite)
    base = Path(path).resolve().parent

    def fix(d: _Set) -> _Set:
        upd: dict[str, Any] = {"path": resolve_input(d.path, base, may_be_id=d.source in ("auto", "hf"))}
        for f in ("captions", "image_root"):
            if getattr(d, f, None):
                upd[f] = resolve_input(getattr(d, f), base)
        for f in ("classnames", "prompts"):
            v = getattr(d, f, None)
            if isinstance(v, str) and v.endswith(".txt"):
                upd[f] = resolve_input(v, base)
        return d.model_copy(update=upd)

    d = suite.defaults
    if isinstance(d.prompts, str) and d.prompts.endswith(".txt"):
        d = d.model_copy(update={"prompts": resolve_input(d.prompts, base)})
    return suite.model_copy(update={"defaults": d, "classification": [fix(c) for c in suite.classification],
                                    "retrieval": [fix(r) for r in suite.retrieval]})


# ---------------------------------------------------------------------------------------------------------
# loading a dataset
# ---------------------------------------------------------------------------------------------------------
class Missing(RecipeError):
    """The dataset is not there (no such folder, hub unreachable): a table row, not an abort."""


def _source(d: _Set) -> str:
    if d.source != "auto":
        return d.source
    p = Path(d.path)
    if p.exists():
        from align.eval.run import is_saved_dataset

        if is_saved_dataset(p):
            return "hf_disk"
        if isinstance(d, ClassificationSet):
            return "folder"
        if p.is_dir():
            return "flickr"
        return "coco" if p.suffix == ".json" and _looks_coco(p) else "table"
    if looks_local(d.path, Path.cwd()) or not re.match(r"^[\w.-]+/[\w.-]+$", d.path):
        raise Missing(f"{d.path}: no such file or folder")
    return "hf"


def _looks_coco(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8-sig") as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"annotations"' in head or '"images"' in head


def _hub_file(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - offline, no such repo or file: one line
        raise Missing(f"{repo}: cannot fetch {filename} ({_line(e)})") from None


def _lines(path: Path) -> list[str]:
    try:
        out = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read ({_line(e)})") from None
    return [ln for ln in out if ln]


def _hf_dataset(d: _Set, split: str, source: str):
    import datasets

    try:
        if source == "hf_disk":
            ds = datasets.load_from_disk(d.path)
        else:
            ds = datasets.load_dataset(d.path, split=split)
    except FileNotFoundError as e:
        raise Missing(f"{d.path}: {_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - hub unreachable, no such dataset, unreadable files: one line
        if source == "hf" and d.source == "auto":   # a relative path that does not exist reads like an id
            raise Missing(f"{d.path}: no such file or folder, and not loadable as a Hugging Face dataset id "
                          f"({_line(e)})") from None
        raise Missing(f"{d.path}: cannot load ({_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise RecipeError(f"{d.path}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    return ds


def _pick(given: str | None, have: list[str], choices: tuple[str, ...], what: str, where: str) -> str:
    if given is not None:
        if given not in have:
            raise RecipeError(f"{where}: no {what} column {given!r} (columns: {', '.join(have)})")
        return given
    for c in choices:
        if c in have:
            return c
    raise RecipeError(f"{where}: no {what} column among {', '.join(choices)} (columns: {', '.join(have)}); "
                      f"name it with {what}_column")


def _classnames(d: ClassificationSet, source: str) -> list[str] | None:
    if d.classnames is None:
        return None
    if isinstance(d.classnames, list):
        return [str(c) for c in d.classnames]
    if d.classnames == "hub":
        if source != "hf":
            raise RecipeError(f"{d.name}: classnames: hub needs a Hugging Face dataset id (got {d.path})")
        return _lines(_hub_file(d.path, HUB_CLASSNAMES))
    return _lines(Path(d.classnames))


def _prompts(v: str | list[str], d: ClassificationSet, source: str) -> str | list[str]:
    if isinstance(v, list) or v in PROMPT_SETS:
        return v
    if v == "hub":
        if source != "hf":
            raise RecipeError(f"{d.name}: prompts: hub needs a Hugging Face dataset id (got {d.path})")
        temps = _lines(_hub_file(d.path, HUB_TEMPLATES))
    else:
        temps = _lines(Path(v))
    try:
        templates_for(temps)
    except ValueError as e:
        raise RecipeError(f"{d.name}: {e}") from None
    return temps


def load_classification(d: ClassificationSet, defaults: SuiteDefaults):
    """``((LabeledImages, identity), classnames or None, prompts)`` for one classification set."""
    from align.eval.classnames import LabeledImages, _Column, from_hf_dataset, load_labeled_images

    source = _source(d)
    split = d.split or defaults.split
    names = _classnames(d, source)
    prompts = _prompts(d.prompts if d.prompts is not None else defaults.prompts, d, source)
    if source == "folder":
        if not Path(d.path).exists():
            raise Missing(f"{d.path}: no such file or folder")
        return (load_labeled_images(d.path), ""), names, prompts
    ds = _hf_dataset(d, split, source)
    cols = list(ds.column_names)
    img = _pick(d.image_column, cols, IMAGE_COLUMNS, "image", d.path)
    lab = _pick(d.label_column, cols, LABEL_COLUMNS, "label", d.path)
    ident = str(getattr(ds, "_fingerprint", "")) or d.path
    feat = ds.features[lab]
    if getattr(feat, "names", None):
        return (from_hf_dataset(ds, lab, img, name=d.name), ident), names, prompts
    vals = ds[lab]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        if names is None and source == "hf":
            names = _lines(_hub_file(d.path, HUB_CLASSNAMES))
        if names is None:
            raise RecipeError(f"{d.name}: integer labels without class names: give classnames (a list or a .txt)")
        labels = np.asarray(vals, np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise RecipeError(f"{d.name}: labels run {labels.min()}..{labels.max()} but {len(names)} class names")
        labeled = LabeledImages(_Column(ds, img), labels, [str(i) for i in range(len(names))], list(names),
                                [None] * len(names), d.name)
        return (labeled, ident), None, prompts
    return (from_hf_dataset(ds, lab, img, name=d.name), ident), names, prompts


def _captions_of(v: Any) -> list[str]:
    if isinstance(v, str):
        return [c.strip() for c in v.split("\n") if c.strip()]
    if isinstance(v, (list, tuple)):
        return [str(c).strip() for c in v if str(c).strip()]
    return []


def load_retrieval(d: RetrievalSet, defaults: SuiteDefaults):
    """``(PairedSet or path, opener or None, identity)`` for one retrieval set."""
    from align.eval.retrieval import PairedSet

    source = _source(d)
    if source in ("flickr", "coco", "table"):
        if not Path(d.path).exists():
            raise Missing(f"{d.path}: no such file or folder")
        return d.path, None, ""
    ds = _hf_dataset(d, d.split or defaults.split, source)
    cols = list(ds.column_names)
    img = _pick(d.image_column, cols, IMAGE_COLUMNS, "image", d.path)
    cap = _pick(d.caption_column, cols, CAPTION_COLUMNS, "caption", d.path)
    captions, owner, rows = [], [], []
    for i, v in enumerate(ds[cap]):
        cs = _captions_of(v)
        if cs:
            rows.append(i)
            owner += [len(rows) - 1] * len(cs)
            captions += cs
    if not rows:
        raise RecipeError(f"{d.name}: no captions in column {cap!r}")
    pairs = PairedSet(rows, captions, np.asarray(owner, np.int64), name=d.name, keys=[str(i) for i in rows])

    def opener(i: Any):
        return ds[int(i)][img].convert("RGB")

    return pairs, opener, str(getattr(ds, "_fingerprint", "")) or d.path


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------
def _line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


CLS_COLS = ("top1", "top5", "mean_per_class_recall", "n_images", "n_classes")
RET_COLS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "n_images", "n_texts")


def run_suite(model: Any, suite: Suite, out: str | Path, cache_dir: str | Path | None = None,
              progress: bool = True, fresh: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on every dataset of ``suite``; write the table and return it (see the module doc)."""
    from align.eval.run import model_fingerprint, run_retrieval, run_zeroshot

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    fp = model_fingerprint(model)
    rows: list[dict[str, Any]] = []
    todo = [("classification", d) for d in suite.classification] + [("retrieval", d) for d in suite.retrieval]
    for n, (kind, d) in enumerate(todo, 1):
        spec = {"kind": kind, "dataset": d.model_dump(), "defaults": suite.defaults.model_dump()}
        key = json_digest({"model": fp, "spec": spec})
        d_out = out / "datasets" / d.name
        entry = d_out / "suite_entry.json"
        row: dict[str, Any] = {"dataset": d.name, "kind": kind, "path": d.path}
        if not fresh and fp and entry.is_file():
            try:
                old = json.loads(entry.read_text())
            except ValueError:
                old = {}
            if old.get("key") == key and old.get("status") == "ok":
                rows.append(old["row"])
                log(f"[{n}/{len(todo)}] {d.name}: finished before with this model, read back")
                continue
        log(f"[{n}/{len(todo)}] {d.name} ({kind}) …")
        limit = d.limit or suite.defaults.limit
        common = dict(split=d.split or suite.defaults.split, limit=limit, seed=suite.defaults.seed, out=d_out,
                      cache_dir=cache, batch_size=suite.defaults.batch_size, progress=progress)
        try:
            if kind == "classification":
                data, names, prompts = load_classification(d, suite.defaults)
                res = run_zeroshot(model, data, prompts=prompts, classnames=names, **common)
                row.update({c: res["metrics"].get(c) for c in CLS_COLS})
                row["prompts"] = res["meta"].get("prompts")
            else:
                data, opener, ident = load_retrieval(d, suite.defaults)
                res = run_retrieval(model, data, caption_column=d.caption_column or "caption",
                                    image_column=d.image_column or "image", image_root=d.image_root,
                                    captions=d.captions, language=d.language, opener=opener, identity=ident,
                                    **common)
                row.update({c: res["metrics"].get(c) for c in RET_COLS})
            row["n_skipped"] = res["metrics"].get("n_skipped", 0)
            row["status"] = "ok"
            row["report"] = str(d_out)
            atomic_write(entry, json.dumps({"key": key, "status": "ok", "model": fp, "spec": spec, "row": row},
                                           indent=1, default=str) + "\n")
        except (Missing, RecipeError, OSError, ValueError, ImportError) as e:
            row["status"] = "missing" if isinstance(e, (Missing, FileNotFoundError)) else "failed"
            row["reason"] = _line(e)
            log(f"[{n}/{len(todo)}] {d.name}: {row['status']}: {row['reason']}")
        rows.append(row)
    result = summarize(suite.name, rows, fp)
    result["files"] = [str(p) for p in write_suite(result, out)]
    return result


def summarize(name: str, rows: list[dict[str, Any]], fp: str | None) -> dict[str, Any]:
    cls_ok = [r for r in rows if r["kind"] == "classification" and r.get("status") == "ok"]
    n_cls = sum(1 for r in rows if r["kind"] == "classification")
    mean = float(np.mean([r["top1"] for r in cls_ok])) if cls_ok else float("nan")
    return {"suite": name, "model_fingerprint": fp, "rows": rows,
            "summary": {"mean_top1": mean, "classification_sets_run": len(cls_ok), "classification_sets": n_cls,
                        "retrieval_sets_run": sum(1 for r in rows if r["kind"] == "retrieval"
                                                  and r.get("status") == "ok"),
                        "retrieval_sets": sum(1 for r in rows if r["kind"] == "retrieval")}}


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def markdown(result: dict[str, Any]) -> str:
    rows, s = result["rows"], result["summary"]
    out = [f"# Evaluation suite: {result['suite']}\n\n", f"- model fingerprint: `{result['model_fingerprint']}`\n"]
    cls = [r for r in rows if r["kind"] == "classification"]
    ret = [r for r in rows if r["kind"] == "retrieval"]
    if cls:
        out.append("\n## Zero-shot classification (%)\n\n| dataset | top-1 | top-5 | mean per-class recall | images "
                   "| classes | prompts |\n|---|---|---|---|---|---|---|\n")
        for r in cls:
            if r.get("status") == "ok":
                out.append(f"| {r['dataset']} | {_f(r['top1'])} | {_f(r['top5'])} | "
                           f"{_f(r['mean_per_class_recall'])} | {_f(r['n_images'])} | {_f(r['n_classes'])} | "
                           f"{r.get('prompts', '-')} |\n")
            else:
                out.append(f"| {r['dataset']} | {r['status']}: {r['reason']} | | | | | |\n")
        out.append(f"| **mean** ({s['classification_sets_run']} of {s['classification_sets']} sets) | "
                   f"**{_f(s['mean_top1'])}** | | | | | |\n")
    if ret:
        out.append("\n## Retrieval (recall %, all captions of an image are correct)\n\n| dataset | T→I R@1 | T→I R@5 "
                   "| T→I R@10 | I→T R@1 | I→T R@5 | I→T R@10 | images | captions |\n"
                   "|---|---|---|---|---|---|---|---|---|\n")
        for r in ret:
            if r.get("status") == "ok":
                out.append(f"| {r['dataset']} | " + " | ".join(_f(r[c]) for c in RET_COLS) + " |\n")
            else:
                out.append(f"| {r['dataset']} | {r['status']}: {r['reason']} | | | | | | | |\n")
    skipped = [r for r in rows if r.get("n_skipped")]
    for r in skipped:
        out.append(f"\n- {r['dataset']}: {r['n_skipped']} unreadable image(s) skipped (listed in its report)")
    out.append("\n\nEvery dataset's own report (per-class tables, recall curves) is under `datasets/<name>/`.\n")
    return "".join(out)


def write_suite(result: dict[str, Any], out: str | Path) -> list[Path]:
    from align.eval.report import _bar_png, _clean

    out = Path(out)
    files = [atomic_write(out / "suite.json", json.dumps(_clean(result), indent=2) + "\n"),
             atomic_write(out / "suite.md", markdown(result))]
    ok = [r for r in result["rows"] if r.get("status") == "ok"]
    if ok:
        groups = [r["dataset"] for r in ok]
        series = {"top-1 / T→I R@1": [r.get("top1", r.get("t2i_R@1")) for r in ok],
                  "I→T R@1": [r.get("i2t_R@1", float("nan")) for r in ok]}
        if not any(r["kind"] == "retrieval" for r in ok):
            series = {"top-1": series["top-1 / T→I R@1"]}
        files.append(_bar_png(out / "suite.png", groups, series,
                              f"{result['suite']}: mean zero-shot top-1 {_f(result['summary']['mean_top1'])} %",
                              "%"))
    return files


def print_table(result: dict[str, Any]) -> None:
    for r in result["rows"]:
        if r.get("status") != "ok":
            print(f"{r['dataset']:>24}: {r['status']}: {r['reason']}")
        elif r["kind"] == "classification":
            print(f"{r['dataset']:>24}: top-1 {_f(r['top1'])}  top-5 {_f(r['top5'])}  ({_f(r['n_images'])} images, "
                  f"{_f(r['n_classes'])} classes)")
        else:
            print(f"{r['dataset']:>24}: T→I R@1 {_f(r['t2i_R@1'])}  I→T R@1 {_f(r['i2t_R@1'])}  "
                  f"({_f(r['n_images'])} images, {_f(r['n_texts'])} captions)")
    s = result["summary"]
    print(f"{'mean top-1':>24}: {_f(s['mean_top1'])} ({s['classification_sets_run']} of "
          f"{s['classification_sets']} classification sets)")


__all__ = ["Suite", "SuiteDefaults", "ClassificationSet", "RetrievalSet", "load_suite", "run_suite", "markdown",
           "print_table"]
