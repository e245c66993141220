"""Models that load without tether: a Hugging Face transformers folder with its own modelling code, and a push.

:func:`export_hf` writes ``config.json`` (``model_type: tether_aligned`` + ``auto_map``), ``model.safetensors`` (the
trained heads only), ``configuration_tether.py`` / ``modeling_tether.py`` (torch + transformers only: the two files
in this package) and a ``README.md`` model card. Then, on any machine with transformers::

    AutoModel.from_pretrained(folder, trust_remote_code=True)   # get_image_features / get_text_features

The frozen encoders are referenced by hub id (a zoo short name becomes its hub id) or absolute path, not copied;
only transformers encoders can be referenced this way (a packaged backbone such as EfficientNet-Lite, or a packaged
text encoder, is refused with one line). :func:`push` uploads such a folder with ``huggingface_hub``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from tether.recipe import RecipeError

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_tether.py", "modeling_tether.py")
MODEL_TYPE = "tether_aligned"


def encoder_reference(name: str) -> str:
    """Where a transformers user loads an encoder from: an existing path (absolute), a zoo alias's hub id, or the
    name itself (a hub id)."""
    import os

    from tether.zoo import ALIASES

    p = Path(os.path.expanduser(str(name)))
    if p.exists():
        return str(p.resolve())
    return ALIASES.get(str(name), str(name))


def _check_encoders(model: Any) -> None:
    from tether.encoders import ConvVisionEncoder, TextEncoder, VisionEncoder

    for side in ("vision", "text"):
        if "members" in model.config[side]:
            raise RecipeError(f"this model's {side} side is an encoder ensemble ({model.config[side]['name']}): a "
                              "transformers folder references one encoder per side; share the tether model folder")
    v, t = model.vision, model.text
    if isinstance(v, ConvVisionEncoder) or not isinstance(v, VisionEncoder):
        raise RecipeError(f"vision encoder {model.config['vision']['name']!r} is not a transformers model (a packaged "
                          "backbone): a transformers folder can only reference transformers encoders")
    if not isinstance(t, TextEncoder):
        raise RecipeError(f"text encoder {model.config['text']['name']!r} is not a transformers model (a packaged "
                          "encoder): a transformers folder can only reference transformers encoders")


def export_hf(model: Any, out: str | Path, vision_ref: str | None = None, text_ref: str | None = None) -> Path:
    """Write ``model`` (an :class:`align.model.AlignedModel`) as a transformers folder at ``out`` (see module doc).
    ``vision_ref`` / ``text_ref`` replace the encoder references written into the config (e.g. the hub id of the
    model a local copy was made from)."""
    from align.hf.configuration_tether import TetherAlignedConfig   # the very files that are shipped
    from align.hf.modeling_tether import TetherAlignedModel

    _check_encoders(model)
    c = model.config
    vision = {k: c["vision"].get(k) for k in ("layer", "pooling", "dim", "num_prefix_tokens", "dtype")}
    text = {k: c["text"].get(k) for k in ("max_length", "pooling", "dim", "dtype")}
    vision["name"] = vision_ref or encoder_reference(c["vision"]["name"])
    text["name"] = text_ref or encoder_reference(c["text"]["name"])
    vision["fingerprint"], text["fingerprint"] = c["vision"].get("fingerprint"), c["text"].get("fingerprint")
    cfg = TetherAlignedConfig(vision=vision, text=text, projector=c["projector"], embed_dim=c["embed_dim"],
                              softmax_temperature=c.get("temperature"), tether_format=c.get("format"),
                              architectures=["TetherAlignedModel"])
    cfg.auto_map = {"AutoConfig": "configuration_tether.TetherAlignedConfig",
                    "AutoModel": "modeling_tether.TetherAlignedModel"}
    hf = TetherAlignedModel(cfg)
    missing, unexpected = hf.heads.load_state_dict(model.heads.state_dict(), strict=False)
    if missing or unexpected:   # the shipped modelling code must mirror tether's heads exactly
        raise RecipeError(f"the transformers heads do not mirror this model's (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(dest))
    for f in CODE_FILES:
        shutil.copyfile(HERE / f, dest / f)
    (dest / "README.md").write_text(model_card(cfg))
    return dest


def model_card(cfg: Any) -> str:
    v, t, p = cfg.vision, cfg.text, cfg.projector
    return f"""---
library_name: transformers
tags: [tether, frozen-encoders, image-text-alignment, zero-shot-image-classification]
---
# Aligned frozen encoders (tether)

Two frozen pretrained encoders and small trained projection heads that map both into one {cfg.embed_dim}-d space
(made with tether, https://arxiv.org/abs/2409.19425 style alignment).

- vision encoder: `{v['name']}` (layer {v['layer']}, {v['pooling']} pooling), head: {p['image'].get('kind')}
- text encoder: `{t['name']}` ({t['pooling']} pooling, max {t['max_length']} tokens), head: {p['text'].get('kind')}
- only the heads are stored here; the encoders load from the ids above on first use

```python
from transformers import AutoModel
model = AutoModel.from_pretrained("<this folder or repo>", trust_remote_code=True)
image_emb = model.encode_image(pil_images)            # [N, {cfg.embed_dim}], L2-normalised
text_emb = model.encode_text(["a photo of a dog"])     # [M, {cfg.embed_dim}]
# CLIPModel-style: model.get_image_features(pixel_values=model.preprocess(pil_images)),
#                  model.get_text_features(**model.tokenize(texts))
# encoders from elsewhere: AutoModel.from_pretrained(..., vision_name="/path/to/copy", text_name="...")
```
"""


def is_hf_folder(path: str | Path) -> bool:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def push(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str = "Upload tether aligned model", api: Any = None) -> str:
    """Upload a transformers folder (or a tether AlignedModel folder, exported to one first) to the hub repo
    ``repo_id`` (created if needed). Returns the repo URL the hub reports."""
    import re

    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo_id) or ".." in repo_id:
        raise RecipeError(f"repo id {repo_id!r}: expected owner/name")
    src = Path(model_dir)
    if not src.is_dir():
        raise RecipeError(f"{src}: not a folder")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="tether-push-") as tmp:
        if is_hf_folder(src):
            folder = src
        elif is_hf_folder(src / "hf"):
            folder = src / "hf"
        else:
            from align.model import AlignedModel

            folder = export_hf(AlignedModel.from_pretrained(src), Path(tmp) / "hf")
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(url)


__all__ = ["export_hf", "push", "encoder_reference", "is_hf_folder", "model_card"]
