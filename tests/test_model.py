"""align.model: AlignedModel save/load round trip, encode_* vs cached-feature projection, zero-shot helper."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from align.model import AlignedModel, DualProjector
from align.projectors import ProjectorConfig
from tether.recipe import RecipeError


def _images(n=5):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (60 + 4 * i, 70, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("kind,pooling", [("mlp", "cls+mean"), ("token", "cls")])
def test_round_trip_and_feature_paths(tmp_path, tiny_vision, tiny_text, tiny_vision_dir, tiny_text_dir, kind, pooling):
    torch.manual_seed(0)
    pc = ProjectorConfig(kind=kind, out_dim=24, dropout=0.1)
    img_dim = tiny_vision.dim * (2 if pooling == "cls+mean" and kind != "token" else 1)
    heads = DualProjector(pc, pc, img_dim, tiny_text.dim, tiny_vision.num_prefix_tokens)
    m = AlignedModel.from_parts(heads, tiny_vision, tiny_text, pc, pc, pooling=pooling, temperature=0.05)
    ims, texts = _images(), ["a red dog", "two cats on the grass", "a man riding a bike"]
    e_img, e_txt = m.encode_image(ims, batch_size=2), m.encode_text(texts)
    assert e_img.shape == (5, 24) and e_txt.shape == (3, 24) and e_img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e_img, axis=1), 1, atol=1e-5)
    # eval mode: dropout off, deterministic
    np.testing.assert_allclose(e_img, m.encode_image(ims, batch_size=5), atol=1e-6)

    out = m.save_pretrained(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision"]["fingerprint"] == tiny_vision.fingerprint and cfg["projector"]["image"]["kind"] == kind
    # loads from the saved folder alone; encoders are loaded lazily from their recorded names
    m2 = AlignedModel.from_pretrained(out)
    assert m2._vision is None
    np.testing.assert_allclose(m2.encode_image(ims), e_img, atol=1e-5)
    np.testing.assert_allclose(m2.encode_text(texts), e_txt, atol=1e-5)
    # cached-feature projection equals end-to-end encoding
    toks = tiny_vision.tokens(tiny_vision.preprocess(ims))
    feats = toks if kind == "token" else tiny_vision.pool(toks, pooling)
    np.testing.assert_allclose(m2.project_image_features(feats.numpy()), e_img, atol=1e-5)
    h, mask = tiny_text.tokens(texts)
    tfeats = h if kind == "token" else tiny_text.pool(h, mask)
    np.testing.assert_allclose(m2.project_text_features(tfeats.numpy(), mask.numpy() if kind == "token" else None),
                               e_txt, atol=1e-5)
    # zero-shot classifier: mean of normalised prompt embeddings, renormalised
    w = m2.zero_shot_classifier(["dog", "cat"], ["a photo of a {}.", "a {c} on grass"])
    assert w.shape == (2, 24)
    p = m2.encode_text(["a photo of a dog.", "a dog on grass"])
    ref = p.mean(0) / np.linalg.norm(p.mean(0))
    np.testing.assert_allclose(w[0], ref, atol=1e-5)


def test_wrong_encoder_weights_and_bad_folder_are_refused(tmp_path, tiny_vision, tiny_text, tiny_vision_dir):
    from tether.encoders import VisionEncoder

    pc = ProjectorConfig(kind="linear", out_dim=8)
    m = AlignedModel.from_parts(DualProjector(pc, pc, tiny_vision.dim, tiny_text.dim), tiny_vision, tiny_text,
                                pc, pc)
    m.save_pretrained(tmp_path / "m")
    other = VisionEncoder.load(str(tiny_vision_dir))
    with torch.no_grad():
        next(other.model.parameters()).mul_(1.5)
    other._fp = None
    loaded = AlignedModel.from_pretrained(tmp_path / "m", vision=None)
    loaded._vision = None
    loaded._paths["vision"] = str(tiny_vision_dir)  # right weights by path: fine
    assert loaded.encode_image(_images(1)).shape == (1, 8)
    bad = AlignedModel.from_pretrained(tmp_path / "m")
    with pytest.raises(RecipeError, match="fingerprint"):
        bad._checked("vision", other)
    with pytest.raises(RecipeError, match="not an aligned model"):
        AlignedModel.from_pretrained(tmp_path)


def test_loading_needs_no_training_code(tmp_path, tiny_vision, tiny_text):
    pc = ProjectorConfig(kind="mlp", out_dim=8)
    AlignedModel.from_parts(DualProjector(pc, pc, tiny_vision.dim, tiny_text.dim), tiny_vision, tiny_text, pc,
                            pc).save_pretrained(tmp_path / "m")
    code = ("import sys; from align.model import AlignedModel; m = AlignedModel.from_pretrained(sys.argv[1]); "
            "import numpy as np; print(m.project_text_features(np.ones((2, 32), 'float32')).shape); "
            "print(sorted(k for k in sys.modules if k.startswith('align')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(2, 8)" in out.stdout
    assert "align.train" not in out.stdout and "align.features" not in out.stdout and "accelerate" not in out.stdout
