"""A tether aligned model as a Hugging Face transformers model (``align export --hf``), usable without tether.

    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported-folder", trust_remote_code=True)
    img = model.get_image_features(pixel_values=model.preprocess(images))        # like CLIPModel
    txt = model.get_text_features(**model.tokenize(["a dog on the grass"]))
    model.encode_image(images), model.encode_text(texts)                         # L2-normalised, as tether's

The two frozen encoders are not stored in the folder: they are loaded on first use from the hub id or path in the
config (``vision_name`` / ``text_name`` override it). Only the projection heads are weights of this model. This
file needs torch and transformers only; it is copied next to the weights by tether's exporter.
"""

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel

try:
    from .configuration_tether import TetherAlignedConfig
except ImportError:  # loaded as a plain module (not through transformers' dynamic modules)
    from configuration_tether import TetherAlignedConfig


def _masked_mean(x, mask):
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1e-9)


class _SwiGLU(nn.Module):
    def forward(self, x):
        u, g = x.chunk(2, dim=-1)
        return nn.functional.silu(g) * u


class _Block(nn.Module):
    """LayerNorm -> Dropout -> Linear skip + (Linear -> GELU, or SwiGLU when gated -> Linear), per position."""

    def __init__(self, in_dim, out_dim, hidden_dim=None, dropout=0.1, gated=False):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Linear(in_dim, out_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim * (2 if gated else 1))
        self.act = _SwiGLU() if gated else nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        h = self.drop(self.norm(x))
        return self.skip(h) + self.fc2(self.act(self.fc1(h)))

    def pool(self, x, mask=None):
        h = self.drop(self.norm(x))
        return self.skip(_masked_mean(h, mask)) + self.fc2(_masked_mean(self.act(self.fc1(h)), mask))


class _ResidualHead(nn.Module):
    def __init__(self, in_dim, out_dim, dropout=0.1):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        p = self.proj(x)
        return self.norm(p + self.drop(self.fc(self.act(p))))


class _Head(nn.Module):
    """One side's projection head; ``kind`` linear / identity / mlp take pooled [B, D], token takes [B, T, D]."""

    def __init__(self, side, cfg, in_dim, num_prefix_tokens=1):
        super().__init__()
        self.side, self.kind = side, cfg.get("kind", "mlp")
        out, hid, drop = int(cfg.get("out_dim", 512)), cfg.get("hidden_dim"), float(cfg.get("dropout", 0.1))
        self.num_prefix_tokens = int(num_prefix_tokens)
        if self.kind == "linear":
            self.proj = nn.Linear(in_dim, out)
        elif self.kind == "mlp":
            self.block = _Block(in_dim, out, hid, drop, bool(cfg.get("gated", False)))
        elif self.kind == "token" and side == "image":
            pooling = cfg.get("image_pooling", "cls+mean")
            self.cls_block = _Block(in_dim, out, hid, drop) if "cls" in pooling else None
            self.patch_block = _Block(in_dim, out, hid, drop) if "mean" in pooling else None
        elif self.kind == "token":
            self.block = _Block(in_dim, out, hid, drop)
            self.head = _ResidualHead(out, out, drop) if cfg.get("text_head", True) else nn.Identity()
        elif self.kind != "identity":
            raise ValueError(f"unknown projector kind {self.kind!r}")

    @property
    def token_input(self):
        return self.kind == "token"

    def forward(self, x, mask=None):
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "identity":
            return x
        if self.kind == "mlp":
            return self.block(x)
        if self.side == "text":
            return self.head(self.block.pool(x, mask))
        p, out = self.num_prefix_tokens, None
        if self.patch_block is not None:
            out = self.patch_block.pool(x[:, p:], None if mask is None else mask[:, p:])
        if self.cls_block is not None:
            c = self.cls_block(x[:, 0])
            out = c if out is None else out + c
        return out


class _Heads(nn.Module):
    def __init__(self, config):
        super().__init__()
        v, t, pc = config.vision, config.text, config.projector
        self.image = _Head("image", pc["image"], int(v["dim"]), int(v.get("num_prefix_tokens", 1)))
        self.text = _Head("text", pc["text"], int(t["dim"]))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TetherAlignedModel(PreTrainedModel):
    """Frozen vision + text encoders and tether's trained heads, with CLIPModel's feature API."""

    config_class = TetherAlignedConfig
    base_model_prefix = "tether"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.heads = _Heads(config)
        self.__dict__["_frozen"] = {}   # the encoders: loaded on first use, not parameters of this model
        self.post_init()

    def _init_weights(self, module):   # every head weight comes from the checkpoint
        pass

    # -- the frozen encoders ---------------------------------------------------------------------------------
    def _dtype(self, side):
        return _DTYPES.get(getattr(self.config, side).get("dtype", "float32"), torch.float32)

    def _load(self, side):
        f = self.__dict__["_frozen"]
        if side not in f:
            name = (self.config.vision_name if side == "vision" else self.config.text_name) \
                or getattr(self.config, side)["name"]
            model = AutoModel.from_pretrained(name, dtype=self._dtype(side))
            model.eval().requires_grad_(False).to(self.device)
            proc = AutoImageProcessor.from_pretrained(name) if side == "vision" else AutoTokenizer.from_pretrained(name)
            f[side] = (model, proc)
        return f[side]

    @property
    def vision_model(self):
        return self._load("vision")[0]

    @property
    def text_model(self):
        return self._load("text")[0]

    @property
    def image_processor(self):
        return self._load("vision")[1]

    @property
    def tokenizer(self):
        return self._load("text")[1]

    def preprocess(self, images):
        """PIL images -> ``pixel_values`` with the vision encoder's own image processor."""
        px = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return px.to(self.device)

    def tokenize(self, texts):
        """Strings -> ``input_ids`` / ``attention_mask`` (the text encoder's tokenizer, the trained max_length)."""
        b = self.tokenizer(list(texts), padding=True, truncation=True,
                           max_length=int(self.config.text.get("max_length", 77)), return_tensors="pt")
        return {k: v.to(self.device) for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    # -- features ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def vision_tokens(self, pixel_values):
        """Token states ``[B, prefix + patches, D]`` of the configured layer (layer-normed as tether reads it); a
        list of layers is read in one pass and concatenated along the feature axis."""
        m, layer = self.vision_model, self.config.vision.get("layer", -1)
        layers = [int(layer)] if isinstance(layer, int) else [int(k) for k in layer]
        px = pixel_values.to(self.device, self._dtype("vision"))
        if layers == [-1]:
            return m(pixel_values=px).last_hidden_state.float()
        out = m(pixel_values=px, output_hidden_states=True)
        ln = getattr(m, "layernorm", None)
        hs = [out.last_hidden_state if k == -1 else (ln(out.hidden_states[k]) if ln is not None
                                                     else out.hidden_states[k]) for k in layers]
        return (hs[0] if len(hs) == 1 else torch.cat(hs, -1)).float()

    def get_image_features(self, pixel_values=None, **kwargs):
        """``[B, embed_dim]`` projected image embeddings (not normalised, as CLIPModel's)."""
        tok = self.vision_tokens(pixel_values)
        if self.heads.image.token_input:
            return self.heads.image(tok)
        p, pooling = int(self.config.vision.get("num_prefix_tokens", 1)), self.config.vision.get("pooling", "cls")
        cls_tok, mean = tok[:, 0], tok[:, p:].mean(1)
        x = {"cls": cls_tok, "mean": mean}.get(pooling)
        return self.heads.image(torch.cat([cls_tok, mean], -1) if x is None else x)

    def get_text_features(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        """``[B, embed_dim]`` projected text embeddings (not normalised, as CLIPModel's)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        b = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if token_type_ids is not None:
            b["token_type_ids"] = token_type_ids.to(self.device)
        with torch.no_grad():
            h = self.text_model(**b).last_hidden_state.float()
        mask = b["attention_mask"]
        if self.heads.text.token_input:
            return self.heads.text(h, mask)
        pooling = self.config.text.get("pooling", "mean")
        if pooling == "cls":
            x = h[:, 0]
        elif pooling == "max":
            x = h.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(h.dtype).min).amax(1)
        else:
            x = _masked_mean(h, mask)
        return self.heads.text(x)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None, **kwargs):
        """CLIP-style: ``logits_per_image`` / ``logits_per_text`` scaled by the trained temperature, and both
        normalised embeddings."""
        img = nn.functional.normalize(self.get_image_features(pixel_values), dim=-1)
        txt = nn.functional.normalize(self.get_text_features(input_ids, attention_mask, token_type_ids), dim=-1)
        t = self.config.softmax_temperature or 0.07
        logits = (img @ txt.T) / float(t)
        return {"logits_per_image": logits, "logits_per_text": logits.T, "image_embeds": img, "text_embeds": txt}

    @torch.no_grad()
    def encode_image(self, images, batch_size=64):
        """PIL images -> ``[N, embed_dim]`` L2-normalised float32 (what tether's AlignedModel.encode_image gives)."""
        out = [nn.functional.normalize(self.get_image_features(self.preprocess(images[i:i + batch_size])).float(), dim=-1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts, batch_size=256):
        """Strings -> ``[N, embed_dim]`` L2-normalised float32 (what tether's AlignedModel.encode_text gives)."""
        texts = list(texts)
        out = [nn.functional.normalize(self.get_text_features(**self.tokenize(texts[i:i + batch_size])).float(), dim=-1)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)
