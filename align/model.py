"""The aligned model: frozen encoder ids (+ weight fingerprints) + trained projector weights + config.

A saved model is a folder::

    config.json          format, encoder ids/fingerprints/layer/pooling, projector configs, input dims, temperature
    model.safetensors    projector weights (``image.*``, ``text.*``)

:meth:`AlignedModel.from_pretrained` rebuilds the projectors from ``config.json`` and loads the encoders lazily
on the first ``encode_*`` call; it needs neither the training code nor the feature cache. Embeddings are
L2-normalised ``float32`` numpy arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from align.projectors import ProjectorConfig, build_projector_from_config
from tether.recipe import RecipeError

FORMAT = "tether-aligned/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def head_dims(image_cfg: ProjectorConfig, vision, text, pooling: str) -> tuple[int, int]:
    """Input widths ``(image, text)`` of the two heads on these frozen encoders — the one rule that training,
    ``align export`` and the text-encoder swap share: a token image head reads the vision encoder's hidden size, a
    pooled one the width of ``pooling``'s output (``cls+mean``: twice the hidden size); the text head reads the
    text encoder's width (pooled or per token)."""
    image = vision.dim if image_cfg.kind == "token" else vision.pooled_dim(pooling)
    return int(image), int(text.dim)


class DualProjector(nn.Module):
    """The two trained heads. ``image``/``text`` take pooled ``[B, D]`` or tokens ``[B, T, D]`` by kind."""

    def __init__(self, image_cfg: ProjectorConfig, text_cfg: ProjectorConfig, image_dim: int, text_dim: int,
                 num_prefix_tokens: int = 1):
        super().__init__()
        self.image = build_projector_from_config(image_cfg, "image", image_dim, num_prefix_tokens)
        self.text = build_projector_from_config(text_cfg, "text", text_dim)

    @classmethod
    def for_encoders(cls, image_cfg: ProjectorConfig, text_cfg: ProjectorConfig, vision, text,
                     pooling: str) -> "DualProjector":
        """New heads sized for ``vision`` + ``text`` (:func:`head_dims`), the image head pooled as ``pooling``."""
        image_dim, text_dim = head_dims(image_cfg, vision, text, pooling)
        return cls(image_cfg, text_cfg, image_dim, text_dim, vision.num_prefix_tokens)

    @property
    def image_tokens(self) -> bool:
        return bool(self.image.token_input)

    @property
    def text_tokens(self) -> bool:
        return bool(self.text.token_input)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None):
        return self.image(image), self.text(text, text_mask if self.text_tokens else None)


def _np(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class AlignedModel(nn.Module):
    """Frozen encoders + trained projectors, usable without any training code.

    ``config`` holds ``vision`` (name, fingerprint, layer, pooling, dtype, dim, num_prefix_tokens), ``text``
    (name, fingerprint, max_length, dtype, dim), ``projector`` (image/text ProjectorConfig dicts) and
    ``temperature``. Encoders can be passed in (already loaded) or are loaded on first use from their names,
    or from ``vision_path``/``text_path`` when the model moved to a machine where the ids differ.
    """

    def __init__(self, config: dict[str, Any], heads: DualProjector, vision=None, text=None,
                 device: str = "cpu", vision_path: str | None = None, text_path: str | None = None,
                 check_fingerprint: bool = True):
        super().__init__()
        self.config = config
        self.heads = heads.to(device).eval()
        self.device = torch.device(device)
        self._vision, self._text = vision, text
        self._paths = {"vision": vision_path, "text": text_path}
        self.check_fingerprint = check_fingerprint

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, heads: DualProjector, vision, text, image_cfg: ProjectorConfig, text_cfg: ProjectorConfig,
                   pooling: str = "cls", temperature: float | None = None, device: str = "cpu") -> "AlignedModel":
        """Bundle trained ``heads`` with the frozen encoder objects they were trained on."""
        config = {
            "format": FORMAT,
            "vision": {"name": vision.name, "fingerprint": vision.fingerprint, "layer": vision.layer,
                       "pooling": pooling, "dtype": str(vision.dtype).replace("torch.", ""),
                       "dim": int(heads.image.in_dim), "num_prefix_tokens": int(vision.num_prefix_tokens)},
            "text": {"name": text.name, "fingerprint": text.fingerprint, "max_length": text.max_length,
                     "dtype": str(text.dtype).replace("torch.", ""), "dim": int(heads.text.in_dim),
                     "pooling": getattr(text, "pooling", "mean")},
            "projector": {"image": image_cfg.model_dump(), "text": text_cfg.model_dump()},
            "embed_dim": int(heads.image.out_dim),
            "temperature": temperature,
        }
        from align.ensemble import model_members

        for side, members in model_members(vision, text).items():  # an encoder ensemble: its members' ids
            config[side]["members"] = members
        return cls(config, heads, vision=vision, text=text, device=device)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomically per file)."""
        import os

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(out / (WEIGHTS + ".tmp")), metadata={"format": FORMAT})
        os.replace(out / (WEIGHTS + ".tmp"), out / WEIGHTS)
        (out / (CONFIG + ".tmp")).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        os.replace(out / (CONFIG + ".tmp"), out / CONFIG)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", vision=None, text=None,
                        vision_path: str | None = None, text_path: str | None = None,
                        check_fingerprint: bool = True) -> "AlignedModel":
        root = Path(path)
        if not (root / CONFIG).is_file() or not (root / WEIGHTS).is_file():
            raise RecipeError(f"{root}: not an aligned model (needs {CONFIG} and {WEIGHTS})")
        config = json.loads((root / CONFIG).read_text())
        if config.get("format") != FORMAT:
            raise RecipeError(f"{root}: model format {config.get('format')!r}, expected {FORMAT!r}")
        pc = config["projector"]
        heads = DualProjector(ProjectorConfig(**pc["image"]), ProjectorConfig(**pc["text"]),
                              config["vision"]["dim"], config["text"]["dim"],
                              config["vision"].get("num_prefix_tokens", 1))
        state = load_file(str(root / WEIGHTS))
        missing, unexpected = heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RecipeError(f"{root}: weights do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(config, heads, vision=vision, text=text, device=device, vision_path=vision_path,
                   text_path=text_path, check_fingerprint=check_fingerprint)

    # -- encoders (lazy) ----------------------------------------------------------------------------------------
    def _checked(self, side: str, enc, want: str | None = None):
        want = self.config[side]["fingerprint"] if want is None else want
        if self.check_fingerprint and want and enc.fingerprint != want:
            raise RecipeError(f"{side} encoder {enc.name!r} has fingerprint {enc.fingerprint}, but this model was "
                              f"trained on {want}; pass the right weights (or check_fingerprint=False)")
        return enc

    def _ensemble(self, side: str):
        """The encoder ensemble of ``side`` (config ``members``), each member checked."""
        from align.ensemble import load_model_side

        if self._paths[side]:
            raise RecipeError(f"this model's {side} side is an encoder ensemble: {side}_path cannot replace it; "
                              f"pass the loaded ensemble as {side}=")
        return self._checked(side, load_model_side(side, self.config[side], str(self.device), self._checked))

    @property
    def vision(self):
        if self._vision is None and "members" in self.config["vision"]:
            self._vision = self._ensemble("vision")
        if self._vision is None:
            from tether.encoders import VisionEncoder

            c = self.config["vision"]
            enc = VisionEncoder.load(self._paths["vision"] or c["name"], device=str(self.device), dtype=c["dtype"],
                                     layer=c["layer"])
            self._vision = self._checked("vision", enc)
        return self._vision

    @property
    def text(self):
        if self._text is None and "members" in self.config["text"]:
            self._text = self._ensemble("text")
        if self._text is None:
            from tether.encoders import TextEncoder

            c = self.config["text"]
            enc = TextEncoder.load(self._paths["text"] or c["name"], device=str(self.device), dtype=c["dtype"],
                                   max_length=c["max_length"])
            self._text = self._checked("text", enc)
        return self._text

    # -- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_image_features(self, feats: np.ndarray | torch.Tensor) -> np.ndarray:
        """Cached vision features → normalised embeddings. Pooled ``[N, D]`` for mlp/linear heads (pooled as
        ``config.vision.pooling``), token grids ``[N, T, D]`` for the token head."""
        x = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats).float().to(self.device)
        return _np(self.heads.image(x))

    @torch.no_grad()
    def project_text_features(self, feats: np.ndarray | torch.Tensor,
                              mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Cached text features → normalised embeddings: mean-pooled ``[N, D]``, or tokens ``[N, T, D]`` + mask
        for the token head."""
        x = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats).float().to(self.device)
        m = None if mask is None else torch.as_tensor(np.asarray(mask)).to(self.device)
        return _np(self.heads.text(x, m if self.heads.text_tokens else None))

    @torch.no_grad()
    def encode_image(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """PIL images → ``[N, embed_dim]`` L2-normalised embeddings."""
        enc, pooling = self.vision, self.config["vision"]["pooling"]
        out = [np.zeros((0, self.config["embed_dim"]), np.float32)]
        for i in range(0, len(images), batch_size):
            t = enc.tokens(enc.preprocess(list(images[i:i + batch_size])))
            x = t if self.heads.image_tokens else enc.pool(t, pooling)
            out.append(_np(self.heads.image(x.float())))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings → ``[N, embed_dim]`` L2-normalised embeddings."""
        enc = self.text
        texts = list(texts)
        out = [np.zeros((0, self.config["embed_dim"]), np.float32)]
        for i in range(0, len(texts), batch_size):
            if self.heads.text_tokens:  # token head: transformers encoders only (others raise a one-line error)
                h, m = enc.tokens(texts[i:i + batch_size])
                out.append(_np(self.heads.text(h.float(), m)))
            else:
                out.append(_np(self.heads.text(enc.pooled(texts[i:i + batch_size]).float(), None)))
        return np.concatenate(out)

    @property
    def has_patch_embeddings(self) -> bool:
        """True when the image head embeds each patch token (a ``token`` head with a patch term)."""
        return self.heads.image_tokens and getattr(self.heads.image, "patch_block", None) is not None

    @torch.no_grad()
    def patch_embeddings(self, image) -> np.ndarray:
        """``[h, w, embed_dim]``: the normalised embedding of each patch of ``image`` (a PIL image) — the token image
        head's patch block on the encoder's patch tokens — on the patch grid of the encoder's input (its
        preprocessing's center crop). Token image heads with a patch term only."""
        if not self.has_patch_embeddings:
            raise RecipeError("this model has pooled heads only: no per-patch embeddings")
        head, enc = self.heads.image, self.vision
        px = enc.preprocess([image.convert("RGB")])
        patches = _np(head.patch_block(enc.tokens(px)[:, head.num_prefix_tokens:].float()))[0]  # [P, E]
        n, (height, width) = len(patches), px.shape[-2:]
        h = max(1, round((n * height / width) ** 0.5))
        if n % h:  # not a grid of the input's aspect ratio: one row
            h = 1
        return patches.reshape(h, n // h, -1)

    @torch.no_grad()
    def patch_similarity(self, image, text: str) -> np.ndarray:
        """``[h, w]``: the cosine of ``text``'s embedding with each patch embedding of ``image``
        (:meth:`patch_embeddings`)."""
        return (self.patch_embeddings(image) @ self.encode_text([text])[0]).astype(np.float32)

    def zero_shot_classifier(self, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                             batch_size: int = 256) -> np.ndarray:
        """``[C, embed_dim]``: per class, the mean of its normalised prompt embeddings, renormalised.

        Templates use ``{}`` or ``{c}`` for the class name."""
        prompts = [t.replace("{c}", "{}").format(c) for c in class_names for t in templates]
        e = self.encode_text(prompts, batch_size=batch_size).reshape(len(class_names), len(templates), -1)
        w = e.mean(1)
        return (w / np.linalg.norm(w, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)


def load_for_plugins(path: str | Path):
    """The ``aligned`` entry of the ``tether.model_loaders`` group (:mod:`tether.plugins`): the model (heads now,
    encoders on the first query) and the files that identify it."""
    from tether.plugins import LoadedModel

    root = Path(path)
    model = AlignedModel.from_pretrained(root)
    c = model.config
    v, t, p = c["vision"], c["text"], c["projector"]
    about = {"vision encoder": f"{v['name']} (layer {v['layer']}, {v['pooling']} pooling)"
                               + (f" + {len(v['members']) - 1} more" if v.get("members") else ""),
             "text encoder": str(t["name"]) + (f" + {len(t['members']) - 1} more" if t.get("members") else ""),
             "projectors": f"image {p['image'].get('kind')}, text {p['text'].get('kind')} → {c['embed_dim']} dims"}
    return LoadedModel(model, [root / CONFIG, root / WEIGHTS],
                       patch_similarity=model.patch_similarity if model.has_patch_embeddings else None, about=about)
