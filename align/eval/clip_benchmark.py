"""CLIP_benchmark with a tether model: ``python -m align.eval.clip_benchmark eval --model <model folder> ...``.

The launcher registers ``tether`` as a CLIP_benchmark model type in its own process (a registration made in one
Python process never reaches a separate ``clip_benchmark eval`` process) and makes it the default
``--model_type``. It then takes one of two routes:

* **CLIP_benchmark's own CLI** (``clip_benchmark.cli.main``, every dataset, task and option) when
  ``clip_benchmark.cli`` can be imported — that needs ``open_clip`` and a ``torchvision`` whose C++ ops load
  beside the installed torch.
* **CLIP_benchmark's zero-shot metric** (``clip_benchmark.metrics.zeroshot_classification.evaluate``) otherwise,
  e.g. beside the CPU torch wheel, where PyPI's torchvision wheels (CUDA builds) fail to import with
  ``operator torchvision::nms does not exist``. The launcher then parses the same ``eval`` options, builds the
  dataset itself for the one CLIP_benchmark dataset that is a plain local folder, ``imagenet1k-unverified``
  (a torchvision ``ImageFolder`` tree at ``<dataset_root>/val``, or ``/train`` for ``--split train``), looks
  up class names and templates the way CLIP_benchmark's ``build_dataset`` does, and writes CLIP_benchmark's
  result JSON. Options, datasets and tasks this route cannot honour are refused with one line, never ignored.

In both routes ``--pretrained`` is ignored unless it names a folder (CLIP_benchmark's default,
``laion400m_e32``, would otherwise replace the model folder); see :func:`align.eval.load_clip_benchmark`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tether.clikit import run_command
from tether.recipe import RecipeError

MODEL_TYPE = "tether"
INSTALL_HINT = "pip install --no-deps clip-benchmark==1.6.2 scikit-learn (or: pip install -e '.[bench]' and that)"
# torchvision's ImageFolder extensions (IMG_EXTENSIONS), so both routes see the same images
IMAGE_FOLDER_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
METRICS_ROUTE_DATASETS = ("imagenet1k-unverified",)
METRICS_ROUTE_TASKS = ("auto", "zeroshot_classification")
ALL_TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "captioning",
             "image_caption_selection", "auto")


def register() -> bool:
    """Make ``tether`` a CLIP_benchmark model type in THIS process: ``TYPE2FUNC["tether"]`` and an entry in
    ``MODEL_TYPES`` (the very list that ``clip_benchmark.cli`` uses as ``--model_type`` choices and that
    ``load_clip`` checks). Returns False when ``clip_benchmark.models`` cannot be imported (it imports
    ``open_clip``, which imports ``torchvision``)."""
    try:
        import clip_benchmark.models as cbm
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError from a torchvision built for another torch
        return False
    from align.eval import load_clip_benchmark

    cbm.TYPE2FUNC[MODEL_TYPE] = load_clip_benchmark
    if MODEL_TYPE not in cbm.MODEL_TYPES:
        cbm.MODEL_TYPES.append(MODEL_TYPE)
    return True


def _topk_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's ``zeroshot_classification.accuracy`` (fraction of rows whose target is among the top k
    logits, per k) taking ``.item()`` of the count: 1.6.2 calls ``float()`` on a 1-element array, which
    numpy >= 2.4 refuses (``TypeError: only 0-dimensional arrays can be converted to Python scalars``)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    hit = pred.eq(target.view(1, -1).expand_as(pred))
    return [hit[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def numpy_compat() -> bool:
    """Swap in :func:`_topk_accuracy` when CLIP_benchmark's own ``accuracy`` fails on a 2-row probe under the
    installed numpy; True when swapped. Nothing else in CLIP_benchmark changes."""
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zc

    if zc.accuracy is _topk_accuracy:
        return True
    try:
        zc.accuracy(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]), topk=(1,))
    except TypeError:
        zc.accuracy = _topk_accuracy
        return True
    return False


def full_cli():
    """``(clip_benchmark.cli, None)``, or ``(None, why)`` when CLIP_benchmark's CLI cannot be imported here."""
    try:
        import clip_benchmark.cli as cli
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return cli, None


# ------------------------------------------------------------------------------------ CLIP_benchmark's data files
def _package_file(name: str) -> Path:
    import clip_benchmark.datasets  # an empty package __init__: imports nothing heavy

    return Path(clip_benchmark.datasets.__file__).parent / name


def _read_json_option(path: str | None, what: str) -> Any:
    """``--custom_*_file``: a path, else a file shipped in clip_benchmark/datasets (as CLIP_benchmark does)."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        p = _package_file(path)
    if not p.is_file():
        raise RecipeError(f"{what} file {path!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RecipeError(f"{p}: not valid JSON ({e})") from None


def _first_key(d: dict | None, keys: list[str]):
    for k in keys:
        if d and k in d:
            return d[k]
    return None


def classnames_and_templates(dataset: str, language: str, n_classes: int, custom_classname_file: str | None,
                             custom_template_file: str | None) -> tuple[list[str], list[str] | dict]:
    """The class names and templates CLIP_benchmark's ``build_dataset`` would give ``dataset``: templates from
    the custom file (keys ``dataset``, ``imagenet1k``), else from the shipped
    ``<language>_zeroshot_classification_templates.json`` (same keys); class names from the custom file (key
    ``dataset``), else the shipped ImageNet-1k names (``imagenet1k-unverified`` always uses those)."""
    custom_t = _read_json_option(custom_template_file, "custom template")
    if custom_t is not None:
        templates = _first_key(custom_t, [dataset, "imagenet1k"])
    else:
        shipped = _package_file(f"{language}_zeroshot_classification_templates.json")
        templates = _first_key(json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else None,
                               [dataset, "imagenet1k"])
    if templates is None:
        raise RecipeError(f"no zero-shot templates for {dataset!r} in language {language!r}")
    custom_c = _read_json_option(custom_classname_file, "custom classname")
    if custom_c is not None:
        classes = _first_key(custom_c, [dataset])
        if classes is None:
            raise RecipeError(f"{custom_classname_file}: no class names for {dataset!r}")
    else:
        shipped = _package_file(f"{language}_classnames.json")
        classes = _first_key(json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else None,
                             ["imagenet1k"])
        if classes is None:
            raise RecipeError(f"no ImageNet-1k class names for language {language!r}: give --custom_classname_file")
    if len(classes) < n_classes:
        raise RecipeError(f"{dataset}: {n_classes} class folders but only {len(classes)} class names "
                          "(give --custom_classname_file with one name per folder, in sorted folder order)")
    return list(classes), templates


class ImageFolderDataset:
    """torchvision ``ImageFolder`` semantics without torchvision: class index = position of the folder in the
    sorted list of sub-folders, images sorted per class, ``(transform(PIL RGB image), label)`` items."""

    def __init__(self, root: str | Path, transform=None):
        root = Path(root)
        if not root.is_dir():
            raise RecipeError(f"{root}: no such image folder (imagenet1k-unverified reads <dataset_root>/val, "
                              "or <dataset_root>/train for --split train, with one sub-folder per class)")
        self.folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.folders:
            raise RecipeError(f"{root}: no class sub-folders")
        self.samples: list[tuple[Path, int]] = []
        for i, name in enumerate(self.folders):
            files = sorted(f for f in (root / name).rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_FOLDER_EXTS)
            if not files:
                raise RecipeError(f"{root / name}: class folder without images ({', '.join(IMAGE_FOLDER_EXTS)})")
            self.samples += [(f, i) for f in files]
        self.transform = transform
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from align.data import decode_image

        path, label = self.samples[i]
        im = decode_image(str(path), path.name)
        return (self.transform(im) if self.transform is not None else im), label


# --------------------------------------------------------------------------------------------- metrics route
def _parser() -> argparse.ArgumentParser:
    """CLIP_benchmark's ``eval`` options that the metrics route honours (same names, same defaults except
    ``--model_type``, ``--model`` and ``--pretrained``)."""
    p = argparse.ArgumentParser(prog="python -m align.eval.clip_benchmark",
                                description="CLIP_benchmark with a tether model (zero-shot metric route)")
    sub = p.add_subparsers(dest="which", required=True, metavar="COMMAND")
    e = sub.add_parser("eval", help="evaluate")
    e.add_argument("--dataset", nargs="+", default=["cifar10"])
    e.add_argument("--dataset_root", default="root")
    e.add_argument("--split", default="test")
    e.add_argument("--test_split", dest="split")
    e.add_argument("--model", nargs="+", required=True, help="tether model folder(s) (align train output)")
    e.add_argument("--pretrained", nargs="+", default=[""], help="ignored unless it is a model folder")
    e.add_argument("--task", default="auto", choices=ALL_TASKS)
    e.add_argument("--no_amp", action="store_false", dest="amp", default=True)
    e.add_argument("--num_workers", default=4, type=int)
    e.add_argument("--seed", default=0, type=int)
    e.add_argument("--batch_size", default=64, type=int)
    e.add_argument("--model_cache_dir", default=None)
    e.add_argument("--custom_classname_file", default=None)
    e.add_argument("--custom_template_file", default=None)
    e.add_argument("--dump_classnames", action="store_true")
    e.add_argument("--dump_templates", action="store_true")
    e.add_argument("--language", nargs="+", default=["en"])
    e.add_argument("--output", default="{dataset}_{pretrained}_{model}_{language}_{task}.json")
    e.add_argument("--quiet", dest="verbose", action="store_false")
    e.add_argument("--save_clf", default=None)
    e.add_argument("--load_clfs", nargs="+", default=[])
    e.add_argument("--skip_existing", action="store_true")
    e.add_argument("--model_type", default=MODEL_TYPE, choices=[MODEL_TYPE])
    return p


def _slug(s: str) -> str:
    return s.strip("/").replace("/", "_") or "_"


def _run_one(args: argparse.Namespace, model_dir: str, pretrained: str, dataset: str, language: str,
             why: str) -> dict | None:
    import torch
    from clip_benchmark.metrics import zeroshot_classification

    from align.eval import load_clip_benchmark

    if dataset not in METRICS_ROUTE_DATASETS:
        raise RecipeError(f"dataset {dataset!r} needs CLIP_benchmark's full CLI ({why}); this route runs "
                          f"only {', '.join(METRICS_ROUTE_DATASETS)} (an ImageFolder tree; names via "
                          "--custom_classname_file)")
    if args.split not in ("train", "test"):
        raise RecipeError(f"only `train` and `test` splits for {dataset} (got {args.split!r})")
    task = "zeroshot_classification"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    output = args.output.format(model=_slug(model_dir), pretrained=_slug(pretrained) if pretrained else "",
                                pretrained_full_path=_slug(pretrained) if pretrained else "", task=task,
                                dataset=dataset.replace("/", "_"), language=language)
    if args.skip_existing and os.path.exists(output):
        if args.verbose:
            print(f"Skip {output}, exists already.")
        return None
    root = args.dataset_root.format(dataset=dataset, dataset_cleaned=dataset.replace("/", "-"))
    folder = Path(root) / ("train" if args.split == "train" else "val")
    ds = ImageFolderDataset(folder)          # check the data before loading the model
    classes, templates = classnames_and_templates(dataset, language, len(ds.folders), args.custom_classname_file,
                                                  args.custom_template_file)
    ds.classes = classes
    if args.verbose:
        print(f"Running '{task}' on '{dataset}' with the model '{model_dir}' on language '{language}'")
        print(f"Dataset size: {len(ds)} ({len(ds.folders)} class folders, {len(classes)} class names)")
    model, transform, tokenizer = load_clip_benchmark(model_dir, pretrained or None, args.model_cache_dir, device)
    model.eval()
    ds.transform = transform
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers)
    metrics = zeroshot_classification.evaluate(model, loader, tokenizer, classes, templates, device=device,
                                               amp=args.amp, verbose=args.verbose, save_clf=args.save_clf,
                                               load_clfs=args.load_clfs)
    dump: dict[str, Any] = {"dataset": dataset, "model": model_dir, "pretrained": pretrained, "task": task,
                            "metrics": metrics, "language": language}
    if args.dump_classnames:
        dump["classnames"] = classes
    if args.dump_templates:
        dump["templates"] = templates
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        json.dump(dump, f)
    print(f"{dataset} / {model_dir}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" -> {output}")
    return dump



def _metrics_route(argv: list[str], why: str) -> int:
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        opts = sorted({u.split("=", 1)[0] for u in unknown if u.startswith("-")}) or unknown
        raise RecipeError(f"{' '.join(opts)}: needs CLIP_benchmark's full CLI ({why}); this route honours "
                          "the zero-shot classification options only (see docs/eval.md)")
    if args.task not in METRICS_ROUTE_TASKS:
        raise RecipeError(f"--task {args.task} needs CLIP_benchmark's full CLI ({why}); this route runs "
                          "zeroshot_classification (align eval --task retrieval covers retrieval)")
    for model_dir in args.model:
        for pretrained in args.pretrained:
            for dataset in args.dataset:
                for language in args.language:
                    _run_one(args, model_dir, pretrained, dataset, language, why)
    return 0


# ---------------------------------------------------------------------------------------------------- entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import clip_benchmark.metrics.zeroshot_classification  # noqa: F401
    except ImportError as e:
        print(f"error: CLIP_benchmark is not usable here ({e}): {INSTALL_HINT}", file=sys.stderr)
        return 2
    if argv[:1] == ["eval"] and not any(a == "--model_type" or a.startswith("--model_type=") for a in argv):
        argv[1:1] = ["--model_type", MODEL_TYPE]
    numpy_compat()
    try:
        return _route(argv)
    except SystemExit as e:          # argparse (either CLI): usage + one error line, exit status 2
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def _route(argv: list[str]) -> int:
    cli, why = full_cli()
    if cli is not None:
        register()
        saved = sys.argv
        sys.argv = ["clip_benchmark", *argv]
        try:
            return run_command(lambda _a: cli.main(), argparse.Namespace())
        finally:
            sys.argv = saved
    why = f"clip_benchmark.cli cannot be imported: {why}"
    if argv[:1] == ["eval"] and "-h" not in argv and "--help" not in argv:
        print(f"note: running CLIP_benchmark's zero-shot metric on a local folder ({why})", file=sys.stderr)
    return run_command(lambda _a: _metrics_route(argv, why), argparse.Namespace())


if __name__ == "__main__":
    sys.exit(main())
