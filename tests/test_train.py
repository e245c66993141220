"""align/train.py: cached and encoders-every-step training, resume after a kill, bad input, a real Flickr8k run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.cli import main as cli_main
from align.config import load_train_recipe
from align.data import decode_image, read_webdataset
from tether.recipe import RecipeError
from align.train import EpochPlan, train, validate, warmup_cosine
from test_align_data import synthetic_pairs, write_shard

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text_dir(tiny_text_dir, tmp_path_factory) -> Path:
    """The tiny BERT with a tokenizer that really uses its word vocabulary (transformers 5 ignores
    ``vocab_file=``, which maps every word to [UNK]); identical otherwise."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_text_vocab")
    for f in tiny_text_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, d / f.name)
    BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    pairs = synthetic_pairs(200)
    bad = [("corrupt", b"\xff\xd8\xff garbage", "a red dog in the park"), ("blank", pairs[0][1], " ")]
    write_shard(d / "train-000.tar", pairs[:100] + bad)
    write_shard(d / "train-001.tar", pairs[100:])
    write_shard(d / "val-000.tar", synthetic_pairs(70, seed=1))
    return d


def make_recipe(path: Path, vision_dir, text_dir, data_dir, **over) -> Path:
    r = {
        "vision": {"name": str(vision_dir)},
        "text": {"name": str(text_dir), "max_length": 16},
        "data": {"format": "webdataset", "path": str(data_dir / "train-{000..001}.tar")},
        "val": {"format": "webdataset", "path": str(data_dir / "val-000.tar")},
        "features": {"cache_dir": str(data_dir / "cache"), "shard_size": 64, "crops": 2},
        "projector": {"image": {"kind": "mlp", "out_dim": 64}, "text": {"kind": "mlp", "out_dim": 64}},
        "train": {"output_dir": str(path.parent / "run"), "epochs": 8, "batch_size": 32, "lr": 3e-3,
                  "checkpoint_every": 100, "log_every": 5, "progress": False, "log_with": "jsonl"},
    }
    for k, v in over.items():  # "section__key" sets one key, "section" replaces a whole section
        if "__" in k:
            sec, key = k.split("__")
            r[sec][key] = v
        else:
            r[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r))
    return path


def test_plan_schedule_and_validation():
    plan = EpochPlan(n=103, global_batch=10, grad_accum=3, seed=0)
    assert plan.batches_per_epoch == 9 and plan.steps_per_epoch == 3
    b0, b0b, b1 = plan.batches(0), plan.batches(0), plan.batches(1)
    assert b0.shape == (9, 10) and torch.equal(b0, b0b) and not torch.equal(b0, b1)
    assert len(set(b0.flatten().tolist())) == 90
    f = warmup_cosine(total=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)
    # validation: identity linear heads on features where caption j describes image j // 2 -> perfect recall;
    # crop 1 (augmented views) must not be used
    from align.features import CachedFeatures
    from align.model import DualProjector
    from align.projectors import ProjectorConfig

    pc = ProjectorConfig(kind="linear", out_dim=8)
    heads = DualProjector(pc, pc, 8, 8)
    for lin in (heads.image.proj, heads.text.proj):
        torch.nn.init.eye_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    base = torch.eye(8)[:4] + 0.01
    tix = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    feats = CachedFeatures(image=torch.stack([base, torch.roll(base, 1, 0)], 1), text=base[tix], text_image=tix,
                           keys=list("abcd"), captions=[""] * 8)
    r = validate(heads, feats, torch.device("cpu"))
    assert r["i2t_R@1"] == 100.0 and r["t2i_R@1"] == 100.0 and r["chance_R@1"] == 25.0
    feats.text_image = torch.tensor([1, 1, 2, 2, 3, 3, 0, 0])  # wrong pairing -> nothing retrieved at rank 1
    r = validate(heads, feats, torch.device("cpu"))
    assert r["i2t_R@1"] == 0.0 and r["t2i_R@1"] == 0.0


def test_cache_training_learns_counts_bad_rows_and_exports(tmp_path, tiny_vision_dir, text_dir, data_dir):
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir)
    s = train(load_train_recipe(rp))
    assert s["steps"] == 8 * (200 // 32) and s["num_pairs"] == 200
    assert s["pairs_seen"] == s["steps"] * 32 and s["device"] in ("cpu", "cuda") and 0 < s["device_hours"] < 1
    assert s["last_loss"] < s["first_loss"] - 0.5
    assert s["val"]["t2i_R@5"] > 3 * 5 * s["val"]["chance_R@1"]  # chance R@5 = 5/70
    assert s["skips"]["counts"] == {"corrupt_image": 1, "empty_caption": 1}
    run = tmp_path / "run"
    assert (run / "model" / "config.json").is_file() and (run / "metrics.json").is_file()
    log = [json.loads(line) for line in (run / "logs" / "align" / "log.jsonl").read_text().splitlines()]
    assert any("train/samples_per_s" in x for x in log) and any("val/t2i_R@1" in x for x in log)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000042", "step-00000048"]  # keep_checkpoints=2, no temp folders left
    # `align export` turns the latest checkpoint into the same AlignedModel
    assert cli_main(["export", "--config", str(rp), "--out", str(tmp_path / "exp")]) == 0
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a second call resumes from the final checkpoint and does no more steps
    s2 = train(load_train_recipe(rp))
    # the whole run's first / last loss, carried by the checkpoint (not None for a resume with nothing left to do)
    assert s2["steps"] == s["steps"] and s2["first_loss"] == s["first_loss"] and s2["last_loss"] == s["last_loss"]
    assert s2["pairs_seen"] == s["pairs_seen"] and s2["device_hours"] == s["device_hours"]  # carried by the checkpoint


def test_image_pooling_half_of_a_cls_mean_cache(tmp_path, tiny_vision_dir, text_dir, data_dir):
    """train.image_pooling=cls trains on the CLS half of a cls+mean cache; the saved model pools CLS itself."""
    from align.model import AlignedModel

    cache = str(tmp_path / "cache-cm")
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, train__epochs=2,
                     features={"cache_dir": cache, "shard_size": 64, "pooling": "cls+mean"})
    recipe = load_train_recipe(rp, ["train.image_pooling=cls"])
    assert recipe.image_pooling == "cls"
    train(recipe)
    model = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config["vision"]["pooling"] == "cls"
    from align.features import FeatureCache

    val = FeatureCache.open(tmp_path / "cache-cm" / "val").load()
    img = [decode_image(s.image) for s in read_webdataset(str(data_dir / "val-000.tar"), limit=4)]
    direct = model.encode_image(img)
    from_cache = model.project_image_features(val.image[:4, 0, :32])
    assert np.allclose(direct, from_cache, atol=2e-2)
    with pytest.raises(RecipeError, match="image_pooling=mean picks half"):
        load_train_recipe(make_recipe(tmp_path / "r2.yaml", tiny_vision_dir, text_dir, data_dir),
                          ["train.image_pooling=mean"])


def test_token_heads_and_encoder_path(tmp_path, tiny_vision_dir, text_dir, data_dir):
    feats = {"cache_dir": str(tmp_path / "cache"), "shard_size": 64, "crops": 2, "tokens": True}
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, features=feats,
                     projector__image={"kind": "token", "out_dim": 32},
                     projector__text={"kind": "token", "out_dim": 32})
    s = train(load_train_recipe(rp, ["train.epochs=4"]))
    assert s["last_loss"] < s["first_loss"] and s["val"]["t2i_R@5"] > 2 * 5 * s["val"]["chance_R@1"]
    from align.model import AlignedModel

    m = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert m.encode_text(["a red dog"]).shape == (1, 32)
    # encoders every step (random crops), pooled heads; the corrupt image is skipped inside batches and counted
    s = train(load_train_recipe(rp, ["train.source=encoders", "train.epochs=1", "train.output_dir=" +
                                     str(tmp_path / "enc"), "projector.image.kind=mlp", "projector.text.kind=mlp",
                                     "features.pooling=cls+mean", f"features.cache_dir={tmp_path / 'c2'}"]))
    assert s["steps"] == 201 // 32 and s["skips"]["counts"]["empty_caption"] == 1
    assert s["skips"]["counts"].get("corrupt_image", 0) <= 1 and torch.isfinite(torch.tensor(s["last_loss"]))
    assert load_file(str(tmp_path / "enc" / "model" / "model.safetensors"))["image.block.skip.weight"].shape == (32, 64)


def _run_script(rp: Path, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "align" / "train.py"), "--config", str(rp)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


# the run killed (SIGKILL) right after an optimiser step, by a step callback (align.training.Trainer)
_KILL_AFTER = """
import os, signal, sys
from align.config import load_train_recipe
from align.training import train

def kill_after(trainer):
    if trainer.state.step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)

train(load_train_recipe(sys.argv[1]), callbacks=[kill_after])
"""


def _run_killed_after(rp: Path, step: int, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_AFTER, str(rp), str(step)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("memory_mb", [None, 0.001], ids=["in-memory", "streamed"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_vision_dir, text_dir, data_dir, memory_mb):
    # 6 steps/epoch, 3 epochs; checkpoints every 7 steps and at epoch ends -> killed (SIGKILL) after step 16,
    # the rerun resumes from step 14 = epoch 2, batch 2 (mid-epoch) and redoes steps 15-16.
    # streamed: a 1 KiB budget makes every shard a window of its own (align/training/stream.py)
    over = dict(train__epochs=3, train__checkpoint_every=7)
    if memory_mb is not None:
        over["train__cache_memory_mb"] = memory_mb
    ref = train(load_train_recipe(make_recipe(tmp_path / "ref" / "r.yaml", tiny_vision_dir, text_dir, data_dir,
                                              **over)))
    kill_r = make_recipe(tmp_path / "kill" / "r.yaml", tiny_vision_dir, text_dir, data_dir, **over)
    p = _run_killed_after(kill_r, 16)
    assert p.returncode == -9, p.stderr[-2000:]
    ck = sorted(x.name for x in (tmp_path / "kill" / "run" / "checkpoints").iterdir())
    assert ck[-1] == "step-00000014" and not (tmp_path / "kill" / "run" / "model").exists()
    p = _run_script(kill_r)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(epoch 2, batch 2, step 14)" in p.stdout + p.stderr
    a = load_file(str(tmp_path / "ref" / "run" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "kill" / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    got = json.loads((tmp_path / "kill" / "run" / "metrics.json").read_text())
    assert got["steps"] == ref["steps"] and got["val"] == pytest.approx(ref["val"])
    if memory_mb is not None:
        assert "streamed in shuffled windows" in p.stdout + p.stderr
        assert ref["last_loss"] < ref["first_loss"]  # it learns from windows too


def _torchrun(rp: Path, env: dict, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 align/train.py``; on timeout the whole process group is killed."""
    import signal

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "align" / "train.py"), "--config", str(rp), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"2-process training timed out: {(out + err)[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_cpu_processes(tmp_path, tiny_vision_dir, text_dir, data_dir):
    """DDP over 2 CPU processes (gloo): global batches are split, every rank's RNG state is checkpointed."""
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, train__epochs=2,
                     train__batch_size=16)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    p = _torchrun(rp, env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == 2 * (200 // 32) and m["samples"] == m["steps"] * 32
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # launched with 2 processes but accelerate not told to use them on CPU: refused, not 2 unsynced copies
    env.pop("ACCELERATE_USE_CPU")
    p = _torchrun(rp, env, "--set", f"train.output_dir={tmp_path / 'run2'}")
    assert p.returncode != 0 and "ACCELERATE_USE_CPU" in p.stderr


def test_bad_recipes_give_one_line(tmp_path, tiny_vision_dir, text_dir, data_dir, capsys):
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir)
    cases = [
        (["--set", "train.learning_rate=1"], "train.learning_rate: unknown key"),
        (["--set", "train.batch_size=abc"], "train.batch_size"),
        (["--set", "projector.image.kind=token"], "needs features.tokens: true"),
        (["--set", "data.path=" + str(tmp_path / "none-*.tar"), "--set", f"features.cache_dir={tmp_path}"],
         "no webdataset shards match"),
    ]
    for extra, want in cases:
        assert cli_main(["train", "--config", str(rp), *extra]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and want in last and "Traceback" not in err, err
    # a cache made with other settings is refused, not silently reused or rebuilt
    assert cli_main(["extract", "--config", str(rp), "--split", "val"]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--config", str(rp), "--set", "vision.layer=1"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "stale" in last and "vision.layer" in last and "Traceback" not in err
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.real
@pytest.mark.slow
def test_real_dinov2s_minilm_flickr8k(tmp_path, dinov2_small, minilm_path, flickr8k):
    """Real weights, real photos: 200 train images x 5 captions, 100 test images; loss falls, R@1 >> chance."""
    rp = tmp_path / "r.yaml"
    r = yaml.safe_load((REPO / "recipes" / "align_cpu_flickr8k.yaml").read_text())
    r["vision"]["name"] = str(dinov2_small)
    r["text"]["name"] = str(minilm_path)
    r["data"].update(path=str(flickr8k), limit=200)
    r["val"].update(path=str(flickr8k), limit=100)
    r["features"].update(cache_dir=str(tmp_path / "cache"), batch_size=50)
    r["train"].update(output_dir=str(tmp_path / "run"), epochs=25, batch_size=200, progress=False)
    rp.write_text(yaml.safe_dump(r))
    s = train(load_train_recipe(rp))
    assert s["num_pairs"] == 1000 and s["skips"]["counts"] == {}
    assert s["last_loss"] < s["first_loss"] - 1.0
    chance = s["val"]["chance_R@1"]  # 1% for 100 images
    assert s["val"]["t2i_R@1"] > 5 * chance and s["val"]["i2t_R@1"] > 5 * chance, s["val"]


@pytest.mark.parametrize("kind", ["mlp", "token"])
def test_structure_regulariser_trains_and_is_logged(tmp_path, tiny_vision_dir, text_dir, data_dir, kind):
    """loss.structure > 0: the trainer hands the frozen features of each batch to the loss (token grids by CLS /
    masked mean) and logs the regulariser next to the contrastive loss."""
    feats = {"cache_dir": str(tmp_path / "cache"), "shard_size": 64, "crops": 2, "tokens": kind == "token"}
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, data_dir, features=feats,
                     projector__image={"kind": kind, "out_dim": 32}, projector__text={"kind": kind, "out_dim": 32},
                     loss={"kind": "infonce", "structure": 1.0, "structure_levels": 2})
    s = train(load_train_recipe(rp, ["train.epochs=3"]))
    assert s["last_loss"] < s["first_loss"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "logs" / "align" / "log.jsonl").read_text().splitlines()]
    reg = [r["train/structure"] for r in rows if "train/structure" in r]
    assert reg and all(0.0 <= v < 1.0 for v in reg)


def test_ema_heads_are_the_moving_average_saved_and_resumed(tmp_path, tiny_vision_dir, text_dir, data_dir):
    """train.ema_decay: the saved model (and validation) holds the moving average of the raw head weights after
    each optimiser step, started by the first step's weights; a run killed mid-way and resumed ends with the same
    average (the checkpoint carries it)."""
    decay = 0.8
    over = dict(train__epochs=2, train__checkpoint_every=5, train__ema_decay=decay)
    expect: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}

    def record(trainer):
        for k, v in trainer.unwrapped.heads.state_dict().items():
            raw[k] = v = v.detach().float().clone()
            expect[k] = v if trainer.state.step == 1 else decay * expect[k] + (1 - decay) * v
        assert trainer.heads is not trainer.unwrapped.heads

    rp = make_recipe(tmp_path / "ref" / "r.yaml", tiny_vision_dir, text_dir, data_dir, **over)
    ref = train(load_train_recipe(rp), callbacks=[record])
    assert ref["steps"] == 2 * (200 // 32)
    saved = load_file(str(tmp_path / "ref" / "run" / "model" / "model.safetensors"))
    assert saved.keys() == expect.keys()
    for k in saved:
        torch.testing.assert_close(saved[k].float(), expect[k], rtol=1e-5, atol=1e-6)
    # not the raw weights: the average lags behind them
    assert any(not torch.allclose(raw[k], saved[k].float()) for k in saved)
    # `align export` of the last checkpoint gives the same averaged heads
    assert cli_main(["export", "--config", str(rp), "--out", str(tmp_path / "exp"), "--no-hf"]) == 0
    exp = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert exp.keys() == saved.keys() and all(torch.equal(exp[k], saved[k]) for k in saved)
    # the same run without the average saves different weights
    plain = make_recipe(tmp_path / "plain" / "r.yaml", tiny_vision_dir, text_dir, data_dir,
                        train__epochs=2, train__checkpoint_every=5)
    train(load_train_recipe(plain))
    other = load_file(str(tmp_path / "plain" / "run" / "model" / "model.safetensors"))
    assert any(not torch.allclose(other[k], saved[k]) for k in saved)
    # a checkpoint saved without the average does not resume with one (one line, not accelerate's traceback)
    with pytest.raises(RecipeError, match="no moving average of the heads"):
        train(load_train_recipe(plain, ["train.ema_decay=0.8"]))
    # killed after step 8 (checkpoint at step 6 = the end of epoch 0), resumed: the same averaged model
    kill_r = make_recipe(tmp_path / "kill" / "r.yaml", tiny_vision_dir, text_dir, data_dir, **over)
    p = _run_killed_after(kill_r, 8)
    assert p.returncode == -9, p.stderr[-2000:]
    p = _run_script(kill_r)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step 6)" in p.stdout + p.stderr
    got = load_file(str(tmp_path / "kill" / "run" / "model" / "model.safetensors"))
    for k in saved:
        torch.testing.assert_close(got[k], saved[k], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "kill" / "run" / "metrics.json").read_text())["val"] == pytest.approx(ref["val"])
