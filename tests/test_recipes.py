"""Every shipped recipe parses into its typed model (no unknown keys, right types), and keeps the settings the
docs promise for it. File existence is not checked here: full-scale inputs are not on this machine."""

from pathlib import Path

import pytest

from align.config import TrainRecipe
from align.eval.suite import Suite
from curate.config import BuildRecipe
from curate.media import MediaRecipe
from tether.recipe import parse, read_yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
KIND = {"concept_rich": BuildRecipe, "quickstart_curate": BuildRecipe, "align_dinov2_roberta": TrainRecipe,
        "align_cpu_flickr8k": TrainRecipe, "quickstart_align": TrainRecipe, "align_flickr8k_lite_mpnet": TrainRecipe,
        "align_flickr8k_multilingual": TrainRecipe}
KIND["align_flickr8k_swap_use"] = TrainRecipe  # text-encoder swap (train.lock_image_from), tests/test_swap.py
KIND["align_flickr8k_multilingual_mixed"] = TrainRecipe  # English + German + Chinese train captions (data.captions)
KIND["eval_paper"] = KIND["eval_local"] = Suite  # align eval --suite files (tests/test_eval_suite.py)
KIND["loop_agreement"] = MediaRecipe  # a bare media: section (curate shard --recipe; recipes/loop_quickstart.sh)
KIND["align_flickr8k_ensemble"] = TrainRecipe  # vision.members: an encoder ensemble (tests/test_ensemble.py)
KIND["align_dinov2_roberta_ensemble"] = TrainRecipe  # the full-scale pair + ensemble members (GPU users)
KIND["align_flickr8k_dinov2s"] = TrainRecipe  # the best DINOv2-S-based recipe (docs/results.md section 10.2)
LAUNCH = {"accelerate_cpu"}  # accelerate launch configs (.ci/install makes this one accelerate's default)


def test_every_recipe_is_known():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(KIND) | LAUNCH


@pytest.mark.parametrize("name", sorted(LAUNCH))
def test_launch_config_is_accelerates(name):
    """accelerate itself reads it: one local process, no value left for `accelerate launch` to warn about."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(RECIPES / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig)
    assert (cfg.num_processes, cfg.num_machines, str(cfg.mixed_precision)) == (1, 1, "no")


@pytest.mark.parametrize("name", sorted(KIND))
def test_recipe_parses(name):
    parse(KIND[name], read_yaml(RECIPES / f"{name}.yaml"), name)


def test_paper_settings():
    r = parse(TrainRecipe, read_yaml(RECIPES / "align_dinov2_roberta.yaml"), "paper")
    assert r.vision.name == "facebook/dinov2-large" and r.text.name.endswith("all-roberta-large-v1")
    assert r.projector.image.kind == r.projector.text.kind == "token"
    assert r.projector.image.out_dim == 1024 and r.projector.image.dropout == 0.1
    assert (r.train.lr, r.train.weight_decay, r.train.batch_size, r.train.epochs) == (1e-3, 0.02, 1800, 15)
    assert "shard-" in str(r.data.path)  # the names `curate shard` writes
    b = parse(BuildRecipe, read_yaml(RECIPES / "concept_rich.yaml"), "concept_rich")
    assert b.media is not None and b.concepts.imagenet1k


def test_flickr8k_best_pair_settings():
    """docs/results.md section 1: the dev-chosen settings of the best-pair recipe."""
    r = parse(TrainRecipe, read_yaml(RECIPES / "align_flickr8k_lite_mpnet.yaml"), "best")
    assert (r.vision.name, r.text.name) == ("efficientnet-lite0", "all-mpnet-base-v2")
    assert r.features.crops == 4 and r.train.augment and r.train.epochs == 3
    assert r.projector.image.hidden_dim == r.projector.text.hidden_dim == 2048


def test_flickr8k_dinov2s_settings():
    """docs/results.md section 10.2: the dev-chosen DINOv2-S recipe (4 layers in one pass, three text encoders,
    4 epochs with the STRUCTURE regulariser at weight 2, section 10.3; the heads' moving average, 10.4)."""
    r = parse(TrainRecipe, read_yaml(RECIPES / "align_flickr8k_dinov2s.yaml"), "dinov2s")
    assert r.vision.name.endswith("models/dinov2-small") and list(r.vision.layer) == [9, 10, 11, -1]
    assert [m.name for m in r.text.members] == ["sentence-transformers/all-MiniLM-L6-v2", "use-multilingual-v3"]
    assert (r.train.epochs, r.loss.structure, r.features.pooling) == (4, 2.0, "cls+mean")
    assert r.train.ema_decay == 0.98  # section 10.4
