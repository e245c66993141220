"""The multi-process training path: ``accelerate launch`` with 2 CPU processes (DDP over gloo).

Tiny random encoders, a few steps. Checks that both ranks ran (each saves its RNG state into the checkpoint),
that the loss saw the GLOBAL batch (negatives gathered from both ranks: ``train/batch`` = 2 x per-process
batch), that a checkpoint and an exported model were written, and that 2 processes x 16 pairs train the same
weights as 1 process x 32 pairs (same global batches; dropout off), which only holds if the gathered
negatives really span the global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_align_data import synthetic_pairs, write_shard
from test_train import make_recipe, text_dir  # noqa: F401  (fixture re-used: tiny BERT with a real vocabulary)

REPO = Path(__file__).resolve().parent.parent
PER_PROCESS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rp: Path, processes: int, timeout: int = 150) -> subprocess.CompletedProcess:
    """``python -m accelerate.commands.launch`` (the ``accelerate`` console script needs no extra install)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(REPO)}
    if processes > 1:
        launch = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(_free_port())]
    else:
        launch = ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "align" / "train.py"), "--config", str(rp)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mp_pairs")
    pairs = synthetic_pairs(128)
    write_shard(d / "train-000.tar", pairs[:96])
    write_shard(d / "train-001.tar", pairs[96:])
    write_shard(d / "val-000.tar", synthetic_pairs(40, seed=1))
    return d


def _recipe(path: Path, vision_dir: Path, text_dir: Path, data_dir: Path, out: Path, batch: int) -> Path:
    rp = make_recipe(path, vision_dir, text_dir, data_dir,
                     features={"cache_dir": str(data_dir / "cache"), "shard_size": 64, "crops": 1},
                     projector={"image": {"kind": "mlp", "out_dim": 32, "dropout": 0.0},
                                "text": {"kind": "mlp", "out_dim": 32, "dropout": 0.0}})

    r = yaml.safe_load(rp.read_text())
    r["train"].update(output_dir=str(out), epochs=3, batch_size=batch, checkpoint_every=4, log_every=1,
                      log_with="jsonl", augment=False)
    rp.write_text(yaml.safe_dump(r))
    return rp


def test_two_cpu_processes_gather_global_batch_and_checkpoint(tmp_path, tiny_vision_dir, text_dir, pairs_dir):
    from align.config import load_train_recipe
    from align.train import train

    # the cache is extracted once, in-process (the launched run would do it on rank 0 while rank 1 waits)
    single = _recipe(tmp_path / "one.yaml", tiny_vision_dir, text_dir, pairs_dir, tmp_path / "one", 2 * PER_PROCESS)
    s1 = train(load_train_recipe(single, ["train.progress=false"]))
    assert s1["processes"] == 1 and s1["num_pairs"] == 128

    rp = _recipe(tmp_path / "two.yaml", tiny_vision_dir, text_dir, pairs_dir, tmp_path / "two", PER_PROCESS)
    p = _launch(rp, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "two"
    m = json.loads((run / "metrics.json").read_text())
    steps_per_epoch = 128 // (2 * PER_PROCESS)
    assert m["processes"] == 2 and m["steps"] == 3 * steps_per_epoch == s1["steps"]
    assert m["samples"] == m["steps"] * 2 * PER_PROCESS

    # both ranks ran: accelerate saves one RNG state file per process into every checkpoint
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts and ckpts[-1].name == f"step-{m['steps']:08d}"
    names = {f.name for f in ckpts[-1].iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= names, names
    assert (run / "model" / "model.safetensors").is_file()

    # the loss of each step saw both ranks' pairs: global batch = 2 x per-process batch
    log = [json.loads(x) for x in (run / "logs" / "align" / "log.jsonl").read_text().splitlines()]
    batches = {x["train/batch"] for x in log if "train/batch" in x}
    assert batches == {2.0 * PER_PROCESS}, batches

    # same global batches in the same order → the same weights as one process with the whole batch
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(run / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-4, rtol=1e-3), (k, (w1[k] - w2[k]).abs().max())
    # and training changed them (the comparison is not between two untouched initialisations)
    assert m["last_loss"] < m["first_loss"]

