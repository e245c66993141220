"""Caches and checkpoints that cannot go stale or rot unnoticed, and the quickstart recipe through `accelerate launch`.

* encoder fingerprints are hashes of exact bytes: the same under any thread count, in any process;
* a feature cache is tied to the CONTENT of its data (captions and image bytes) and to the bytes of its own files
  (size + sha256 recorded at creation): `align train` runs the same checks as `align extract`;
* a checkpoint whose RNG state is damaged is refused (one line) unless `--ignore-rng-state`;
* `recipes/quickstart_align.yaml` trains through `accelerate launch` with 1 and 2 processes on a cache extracted
  in another process with another thread count, quietly; `align train --processes 2` fails in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.cli import main as cli_main
from align.features import CorruptCacheError, FeatureCache
from test_align_data import synthetic_pairs, write_shard
from test_train import make_recipe, text_dir  # noqa: F401  (fixture: tiny BERT with a real vocabulary)

REPO = Path(__file__).resolve().parent.parent


def _zero_tensor(path: Path, name: str) -> None:
    """Zero the bytes of one tensor inside a safetensors file (the file keeps its size and header)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + start:8 + n + end] = bytes(end - start)
    path.write_bytes(bytes(raw))


def _pairs_dir(root: Path, n: int = 96) -> Path:
    pairs = synthetic_pairs(n)
    write_shard(root / "train-000.tar", pairs[: n // 2])
    write_shard(root / "train-001.tar", pairs[n // 2:])
    write_shard(root / "val-000.tar", synthetic_pairs(24, seed=1))
    return root


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# -- fingerprints ----------------------------------------------------------------------------------------------

def test_fingerprint_is_exact_bytes_under_any_thread_count(minilm_path, tiny_text):
    """The old float-sum fingerprint of all-MiniLM-L6-v2 changed with the thread count (dd27… / a0f5… / 0fed… at
    1 / 2 / 4 threads); a hash of exact bytes cannot."""
    from tether.encoders import TextEncoder, _fingerprint

    enc = TextEncoder.load(str(minilm_path))
    before = torch.get_num_threads()
    try:
        fps = set()
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            fps.add(_fingerprint("x", enc.model))
    finally:
        torch.set_num_threads(before)
    assert len(fps) == 1, fps
    # one weight changed by one ulp: another fingerprint
    with torch.no_grad():
        p = next(tiny_text.model.parameters())
        orig = p[0, 0].clone()
        p[0, 0] = torch.nextafter(orig, torch.tensor(float("inf")))
        nudged = _fingerprint("x", tiny_text.model)
        p[0, 0] = orig
    assert nudged != _fingerprint("x", tiny_text.model)
    # the same (bfloat16-representable) weights held in bfloat16 or float32: one fingerprint
    import copy

    m16 = copy.deepcopy(tiny_text.model).to(torch.bfloat16)
    m32 = copy.deepcopy(m16).to(torch.float32)
    assert _fingerprint("x", m16) == _fingerprint("x", m32)


# -- data content, cache files --------------------------------------------------------------------------------------

@pytest.fixture()
def small(tmp_path, tiny_vision_dir, text_dir):
    d = _pairs_dir(tmp_path / "pairs")
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, text_dir, d, train__epochs=2, train__batch_size=16,
                     features={"cache_dir": str(tmp_path / "cache"), "shard_size": 32, "crops": 1})
    return rp, d


def test_train_refuses_edited_caption_and_swapped_image(small, capsys):
    rp, d = small
    assert cli_main(["extract", "--config", str(rp)]) == 0
    capsys.readouterr()
    pairs = synthetic_pairs(96)
    first = pairs[:48]
    # touching a source file (new mtime, same bytes) is not a change: the bytes are hashed again and match
    os.utime(d / "train-000.tar", ns=(1, 1))
    assert cli_main(["train", "--config", str(rp), "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    # a caption edited inside a shard
    edited = [(k, img, "a purple giraffe on the moon" if i == 5 else cap) for i, (k, img, cap) in enumerate(first)]
    write_shard(d / "train-000.tar", edited)
    assert cli_main(["train", "--config", str(rp), "--set", f"train.output_dir={rp.parent / 'r2'}"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) and "shard-00000.safetensors: holds other images or captions" in _error_lines(err)[-1]
    assert "Traceback" not in err
    # the captions as before but one image swapped for another one: found from the image bytes
    swapped = [(k, pairs[60][1] if i == 7 else img, cap) for i, (k, img, cap) in enumerate(first)]
    write_shard(d / "train-000.tar", swapped)
    assert cli_main(["train", "--config", str(rp), "--set", f"train.output_dir={rp.parent / 'r3'}"]) == 2
    assert "shard-00000.safetensors: holds other images" in capsys.readouterr().err
    assert cli_main(["extract", "--config", str(rp), "--split", "train"]) == 2
    assert "holds other images" in capsys.readouterr().err
    # extract --overwrite makes it fresh again
    assert cli_main(["extract", "--config", str(rp), "--split", "train", "--overwrite"]) == 0


def test_damaged_cache_file_is_detected_and_encoded_again(small, capsys):
    rp, d = small
    assert cli_main(["extract", "--config", str(rp)]) == 0
    cache_dir = rp.parent / "cache" / "train"
    good = FeatureCache.open(cache_dir).load()
    entry = FeatureCache.open(cache_dir).manifest["shards"][1]
    assert entry["file"] == "shard-00001.safetensors" and len(entry["sha256"]) == 64 and entry["bytes"] > 0
    _zero_tensor(cache_dir / "shard-00001.safetensors", "text")
    # reading refuses it (e.g. `align eval --features`), in one line
    with pytest.raises(CorruptCacheError, match=r"shard-00001.safetensors is corrupt .*re-run `align extract`"):
        FeatureCache.open(cache_dir).load()
    with pytest.raises(CorruptCacheError):
        FeatureCache.open(cache_dir).verify()
    capsys.readouterr()
    # extract does not call it complete: it encodes that shard again, and only that one
    mtime0 = (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns
    assert cli_main(["extract", "--config", str(rp), "--split", "train"]) == 0
    assert "shard-00001.safetensors is corrupt" in capsys.readouterr().err
    fixed = FeatureCache.open(cache_dir)
    assert fixed.manifest["repaired_shards"] == ["shard-00001.safetensors"]
    assert (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns == mtime0
    again = fixed.load()
    assert torch.allclose(again.text, good.text, atol=2e-3) and torch.equal(again.image, good.image)
    # train runs the same check: a damaged shard is encoded again before training, never trained on
    _zero_tensor(cache_dir / "shard-00000.safetensors", "image")
    assert cli_main(["train", "--config", str(rp)]) == 0
    assert "shard-00000.safetensors is corrupt" in capsys.readouterr().err
    assert torch.equal(FeatureCache.open(cache_dir).load().image, good.image)


def test_extraction_bar_has_a_total_and_summary_is_rounded(small, capsys):
    rp, d = small
    assert cli_main(["extract", "--config", str(rp), "--split", "train"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"extract features: 100%(\|.*\|)? 96/96 \[", err), err[-800:]
    assert "\r" not in err  # off a terminal: plain progress lines (tether.progress)
    # a second run is a cache hit: the bar says it checks, and one line says nothing was re-encoded
    assert cli_main(["extract", "--config", str(rp), "--split", "train"]) == 0
    err = capsys.readouterr().err
    assert "check cached features" in err and "extract features" not in err, err[-800:]
    assert re.search(r"features cached, checked: 96 images in \d+ shards? at .*\(nothing re-encoded\)", err)
    manifest = rp.parent / "cache" / "train" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, manifest.read_text())
    assert cli_main(["train", "--config", str(rp), "--set", "train.checkpoint_every=3"]) == 0
    # train checked the finished cache and left it untouched (several runs may share one cache)
    assert (manifest.stat().st_mtime_ns, manifest.read_text()) == before
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("done:")][-1]
    assert re.search(r"loss \d+\.\d{3} -> \d+\.\d{3}, val i2t_R@1 \d+(\.\d)?, ", line), line
    assert not re.search(r"\d\.\d{7,}", line), line  # no raw floats
    m = json.loads((rp.parent / "run" / "metrics.json").read_text())
    # a rerun resumes from the final checkpoint: the whole run's losses, not None
    assert cli_main(["train", "--config", str(rp)]) == 0
    line2 = [x for x in capsys.readouterr().out.splitlines() if x.startswith("done:")][-1]
    assert f"loss {m['first_loss']:.3f} -> {m['last_loss']:.3f}" in line2 and "None" not in line2


# -- checkpoints -----------------------------------------------------------------------------------------------

def test_damaged_rng_state_is_refused_unless_asked(small, capsys):
    rp, d = small
    assert cli_main(["train", "--config", str(rp), "--set", "train.checkpoint_every=2"]) == 0
    ckpt = sorted((rp.parent / "run" / "checkpoints").iterdir())[-1]
    sums = json.loads((ckpt / "checksums.json").read_text())
    assert "random_states_0.pkl" in sums["files"] and "model.safetensors" in sums["files"]
    rng = ckpt / "random_states_0.pkl"
    good = rng.read_bytes()
    rng.write_bytes(bytes(len(good)))  # zeroed: accelerate alone would skip it silently
    capsys.readouterr()
    more = ["--set", "train.epochs=3", "--set", "train.checkpoint_every=2"]
    assert cli_main(["train", "--config", str(rp), *more]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "random_states_0.pkl is corrupt" in err and "--ignore-rng-state" in err and "align extract" not in err
    # an older checkpoint without checksums.json: the unreadable pickle itself is refused
    (ckpt / "checksums.json").unlink()
    assert cli_main(["train", "--config", str(rp), *more]) == 2
    assert "random_states_0.pkl cannot be read" in capsys.readouterr().err
    # asked for: resumes without it, says so
    shutil.copytree(ckpt, rp.parent / "ckpt-copy")
    assert cli_main(["train", "--config", str(rp), *more, "--ignore-rng-state"]) == 0
    assert json.loads((rp.parent / "run" / "metrics.json").read_text())["epochs_done"] == 3
    # any other damaged file is refused even then
    ck2 = sorted((rp.parent / "run" / "checkpoints").iterdir())[-1]
    _zero_tensor(ck2 / "model.safetensors", next(iter(json.loads(
        (ck2 / "model.safetensors").read_bytes()[8:8 + int.from_bytes((ck2 / "model.safetensors").read_bytes()[:8],
                                                                       "little")]).keys() - {"__metadata__"})))
    capsys.readouterr()
    assert cli_main(["train", "--config", str(rp), "--set", "train.epochs=4", "--ignore-rng-state"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err and len(_error_lines(err)) == 1
    assert "resume from another checkpoint" in err and "align extract" not in err   # the checkpoint's own hint


# -- the quickstart recipe through accelerate launch ------------------------------------------------------------------

def _quickstart_overrides(tmp: Path, data: Path) -> list[str]:
    return [f"data.path={data / 'train-{000..001}.tar'}", f"val={{format: webdataset, path: {data / 'val-000.tar'}}}",
            f"features.cache_dir={tmp / 'cache'}", "features.shard_size=48", f"train.output_dir={tmp / 'run'}",
            "train.epochs=2", "train.batch_size=16", "train.log_with=jsonl", "train.progress=false"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_NUM_THREADS"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _accelerate(processes: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """The documented quiet launch: the shipped accelerate config, plus --multi_gpu for several CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" /
           "accelerate_cpu.yaml"), "-q"]
    env = _env()
    if processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
        env["ACCELERATE_USE_CPU"] = "true"
    cmd += ["align/train.py", "--config", "recipes/quickstart_align.yaml", *_sets(overrides)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.real
@pytest.mark.slow
def test_quickstart_recipe_through_accelerate_launch(tmp_path, minilm_path):
    """EfficientNet-Lite0 + all-MiniLM-L6-v2 as in recipes/quickstart_align.yaml, on 96 synthetic pairs: extracted
    here (this process's thread count), accepted under OMP_NUM_THREADS=1/2/4 and by `accelerate launch` with 1 and 2
    processes (which set OMP_NUM_THREADS=1); both launches train, print no accelerate warning, and agree."""
    pytest.importorskip("efficientnet_lite_pytorch")
    data = _pairs_dir(tmp_path / "pairs")
    ov = _quickstart_overrides(tmp_path, data)
    assert cli_main(["extract", "--config", str(REPO / "recipes" / "quickstart_align.yaml"), *_sets(ov)]) == 0
    check = ("import os, sys, torch; torch.set_num_threads(int(os.environ['OMP_NUM_THREADS'])); "
             "from align.config import load_train_recipe; "
             "from align.train import load_encoders, open_checked; r = load_train_recipe(sys.argv[1], sys.argv[2:]); "
             "v, t = load_encoders(r); [open_checked(r, s, v, t).verify() for s in ('train', 'val')]; "
             "print('ok', torch.get_num_threads(), v.fingerprint, t.fingerprint)")
    seen = set()
    for n in ("1", "2", "4"):
        p = subprocess.run([sys.executable, "-c", check, "recipes/quickstart_align.yaml", *ov], cwd=REPO,
                           env=_env(OMP_NUM_THREADS=n), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        ok = [x for x in p.stdout.splitlines() if x.startswith("ok ")][-1].split()
        assert ok[1] == n
        seen.add(tuple(ok[2:]))
    assert len(seen) == 1, seen

    one = _accelerate(1, ov)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    assert "were not passed to `accelerate launch`" not in one.stderr and "Traceback" not in one.stderr
    m1 = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m1["processes"] == 1 and m1["steps"] == 2 * (96 // 16) and m1["num_pairs"] == 96
    assert 0 <= m1["val"]["t2i_R@1"] <= 100

    ov2 = [o for o in ov if not o.startswith("train.")] + [f"train.output_dir={tmp_path / 'run2'}", "train.epochs=2",
                                                          "train.batch_size=8", "train.log_with=jsonl",
                                                          "train.progress=false"]
    two = _accelerate(2, ov2)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "were not passed to `accelerate launch`" not in two.stderr and "Traceback" not in two.stderr
    m2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert m2["processes"] == 2 and m2["steps"] == m1["steps"] and m2["pairs_seen"] == m1["pairs_seen"]

    # `align train --processes 2`: after a caption changed in the data, the stale cache is reported once, in one line
    pairs = synthetic_pairs(96)
    write_shard(data / "train-001.tar", [(k, img, "a purple giraffe" if i == 0 else c)
                                         for i, (k, img, c) in enumerate(pairs[48:])])
    p = subprocess.run([sys.executable, "-m", "align", "train", "--processes", "2", "--config",
                        "recipes/quickstart_align.yaml", *_sets(ov2)], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    errors = _error_lines(p.stderr)
    assert len(errors) == 1 and "shard-00001.safetensors: holds other images or captions" in errors[0], p.stderr
    for noise in ("Traceback", "CalledProcessError", "ChildFailedError", "were not passed to `accelerate launch`"):
        assert noise not in p.stderr, p.stderr[-3000:]
