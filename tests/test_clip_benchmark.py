"""CLIP_benchmark through `python -m align.eval.clip_benchmark` (docs/eval.md, "CLIP_benchmark").

Runs CLIP_benchmark's own zero-shot evaluation (`clip_benchmark.metrics.zeroshot_classification.evaluate`) on a
tiny ImageFolder tree through the launcher and checks it against `align eval --task zeroshot` on the same images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                    reason="clip-benchmark not installed (pip install --no-deps clip-benchmark==1.6.2)")

CLASSES = ["bird", "car", "cat", "dog", "tree"]          # sorted = ImageFolder class order


@pytest.fixture(scope="module")
def model_dir(tiny_vision, tiny_text, image_root, tmp_path_factory) -> Path:
    """A tiny aligned model whose image head is fitted (least squares) to map 2 of the 3 images of each class onto
    that class's prompt embedding: accuracy is well above chance but not perfect, so label order matters."""
    import torch
    from PIL import Image

    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    cfg = ProjectorConfig(kind="linear", out_dim=16, dropout=0.0)
    torch.manual_seed(0)
    heads = DualProjector(cfg, cfg, tiny_vision.dim, tiny_text.dim)
    m = AlignedModel.from_parts(heads, tiny_vision, tiny_text, cfg, cfg, pooling="cls")
    target = torch.from_numpy(m.encode_text([f"a photo of a {c}." for c in CLASSES]))
    fit = [(root, ci) for ci, c in enumerate(CLASSES) for root in sorted((image_root / "val" / c).iterdir())[:2]]
    with torch.no_grad():
        feats = tiny_vision.pool(tiny_vision.tokens(tiny_vision.preprocess([Image.open(f).convert("RGB")
                                                                            for f, _ in fit])), "cls").float()
        x = torch.cat([feats, torch.ones(len(fit), 1)], 1)
        w = torch.linalg.lstsq(x, 3 * target[[ci for _, ci in fit]]).solution      # [D+1, 16]
        heads.image.proj.weight.copy_(w[:-1].T)
        heads.image.proj.bias.copy_(w[-1])
    return m.save_pretrained(tmp_path_factory.mktemp("cbmodel") / "tiny")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """imagenet1k-unverified layout: <root>/val/<class>/*.jpg; 256 px images (the hook's crop is then exact)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cbdata")
    rng = np.random.default_rng(1)
    for ci, c in enumerate(CLASSES):
        for i in range(3):
            px = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
            px[..., ci % 3] //= 4                      # some per-class colour structure
            p = root / "val" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(p)
    (root / "classnames.json").write_text(json.dumps({"imagenet1k-unverified": CLASSES}))
    (root / "templates.json").write_text(json.dumps({"imagenet1k-unverified": ["a photo of a {c}."]}))
    return root


def _launch_args(model_dir: Path, root: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(model_dir), "--dataset", "imagenet1k-unverified", "--dataset_root", str(root),
            "--custom_classname_file", str(root / "classnames.json"),
            "--custom_template_file", str(root / "templates.json"), "--no_amp", "--num_workers", "0",
            "--batch_size", "4", "--output", str(out / "{dataset}_{language}_{task}.json"), "--quiet"]


def test_launcher_runs_clip_benchmark_zeroshot_like_align_eval(model_dir, image_root, tmp_path):
    from align.cli import main as align_main
    from align.eval.clip_benchmark import main

    out = tmp_path / "cb"
    # CLIP_benchmark's CLI default --pretrained (laion400m_e32) must not replace the model folder
    assert main(_launch_args(model_dir, image_root, out) + ["--pretrained", "laion400m_e32"]) == 0
    res = json.loads((out / "imagenet1k-unverified_en_zeroshot_classification.json").read_text())
    assert res["task"] == "zeroshot_classification" and res["dataset"] == "imagenet1k-unverified"
    m = res["metrics"]
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"} and 0.0 <= m["acc1"] <= m["acc5"] <= 1.0

    assert align_main(["eval", str(model_dir), "--task", "zeroshot", "--data", str(image_root / "val"),
                       "--prompts", "photo", "--out", str(tmp_path / "ae")]) == 0
    ref = json.loads((tmp_path / "ae" / "zeroshot.json").read_text())["metrics"]
    assert ref["n_images"] == 15 and ref["n_classes"] == 5
    assert 100 * m["acc1"] == pytest.approx(ref["top1"], abs=1e-6)
    assert 100 * m["acc5"] == pytest.approx(ref["top5"], abs=1e-6)
    assert 100 * m["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-6)

    # a class-name file in another order changes the labels' meaning, so CLIP_benchmark's result must change
    (image_root / "shuffled.json").write_text(json.dumps({"imagenet1k-unverified": CLASSES[1:] + CLASSES[:1]}))
    args = _launch_args(model_dir, image_root, tmp_path / "cb2")
    args[args.index("--custom_classname_file") + 1] = str(image_root / "shuffled.json")
    assert main(args) == 0
    m2 = json.loads((tmp_path / "cb2" / "imagenet1k-unverified_en_zeroshot_classification.json").read_text())
    assert m2["metrics"] != m


def test_launcher_as_a_module_and_its_errors(model_dir, image_root, tmp_path, capsys):
    """`python -m align.eval.clip_benchmark` in a fresh process; what it cannot run is refused in one line."""
    from align.eval.clip_benchmark import full_cli, main

    out = tmp_path / "cb"
    r = subprocess.run([sys.executable, "-m", "align.eval.clip_benchmark", *_launch_args(model_dir, image_root, out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "imagenet1k-unverified_en_zeroshot_classification.json").read_text())["metrics"]

    if full_cli()[0] is not None:
        return                       # CLIP_benchmark's own CLI runs here: its own checks apply
    (image_root / "other.json").write_text(json.dumps({"cifar10": CLASSES}))
    bad = [(["--dataset", "cifar10"], "needs CLIP_benchmark's full CLI"),
           (["--task", "zeroshot_retrieval"], "needs CLIP_benchmark's full CLI"),
           (["--recall_k", "5"], "--recall_k: needs CLIP_benchmark's full CLI"),
           (["--dataset_root", str(tmp_path / "missing")], "no such image folder"),
           (["--custom_classname_file", str(image_root / "other.json")], "no class names"),
           (["--model_type", "open_clip"], "invalid choice")]
    for extra, msg in bad:
        capsys.readouterr()
        assert main([*_launch_args(model_dir, image_root, tmp_path / "x"), *extra]) == 2, extra
        errs = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(errs) == 1 and msg in errs[0], (extra, errs)
    assert not (tmp_path / "x").exists()


def test_pretrained_is_ignored_unless_a_folder(model_dir, tmp_path):
    from align.eval import load_clip_benchmark
    from tether.recipe import RecipeError

    a, _, _ = load_clip_benchmark(str(model_dir), "laion400m_e32")
    b, _, _ = load_clip_benchmark("ViT-B-32-quickgelu", str(model_dir))
    ta, tb = a.encode_text(["a dog"]), b.encode_text(["a dog"])
    assert ta.shape == (1, 16) and np.allclose(ta.numpy(), tb.numpy())
    with pytest.raises(RecipeError, match="not an aligned model"):
        load_clip_benchmark(str(tmp_path), "laion400m_e32")


def test_hook_ignores_clip_benchmarks_autocast(model_dir):
    """CLIP_benchmark encodes under torch.autocast (bfloat16 on CPU by default): the hook's output must not
    change with it."""
    import torch

    from align.eval import load_clip_benchmark

    m, transform, tok = load_clip_benchmark(str(model_dir))
    plain = m.encode_text(tok(["a photo of a dog", "a cat"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m.encode_text(tok(["a photo of a dog", "a cat"]))
    assert auto.dtype == torch.float32 and torch.equal(plain, auto)


def test_register_makes_tether_a_model_type():
    try:
        import clip_benchmark.models as cbm
    except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError from a CUDA-built torchvision
        pytest.skip(f"clip_benchmark.models needs open_clip + a working torchvision ({type(e).__name__}: {e})")
    from align.eval import load_clip_benchmark
    from align.eval.clip_benchmark import register

    assert register() and register()
    assert cbm.MODEL_TYPES.count("tether") == 1 and cbm.TYPE2FUNC["tether"] is load_clip_benchmark
    cli = pytest.importorskip("clip_benchmark.cli")
    assert cli.MODEL_TYPES is cbm.MODEL_TYPES        # the --model_type choices list
