"""Contrastive losses over the GLOBAL batch: symmetric InfoNCE (default) and SigLIP's sigmoid loss.

:class:`ContrastiveLoss` L2-normalises image and text embeddings, gathers them from every process when
``torch.distributed`` is initialised with world size > 1 (so negatives span the global batch), and computes
the loss over the concatenated batch on every rank.

Gathering WITH gradient: ``torch.distributed.all_gather`` returns tensors detached from the graph, so after
the gather each rank puts its own (graph-connected) tensor back into its slot. Every rank computes the same
global loss ``L``; the gradient that reaches rank r's inputs through its own slot is exactly ``dL/dx_r``
(the other slots are constants with the same values), i.e. identical to a single process computing the loss
over the concatenated batch. DDP then AVERAGES parameter gradients over ranks, so projector gradients are
``dL/dθ / world_size`` while the temperature (which every rank sees whole) gets ``dL/dτ``; AdamW is invariant
to that per-parameter scale. Ranks may hold different batch sizes (rows are padded for the collective and
trimmed after).

Multi-positive targets: with ``image_ids`` (one integer per pair, e.g. the dataset image index, globally
meaningful), every pair whose image id matches is a positive; InfoNCE targets are uniform over the positive
columns in both directions, SigLIP labels are +1 for every positive.

Temperature: a log-scale parameter ``log_temperature``, clamped to ``[min_temperature, max_temperature]`` on
use (the stored value is also clamped in place at each forward so that it cannot drift out of range).
SigLIP uses ``logit_scale = 1 / temperature`` (init 10 as in the SigLIP paper) and a learnable ``logit_bias``
(init -10).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tether.recipe import RecipeError, Strict, parse

LOSS_KINDS = ("infonce", "siglip")
DEFAULT_INIT_TEMPERATURE = {"infonce": 0.07, "siglip": 0.1}  # SigLIP: logit scale 10


class LossConfig(Strict):
    """Loss settings. ``init_temperature`` ``None`` → 0.07 (InfoNCE) or 0.1 (SigLIP, logit scale 10)."""

    kind: Literal["infonce", "siglip"] = "infonce"
    init_temperature: float | None = Field(None, gt=0.0)
    min_temperature: float = Field(0.001, gt=0.0)
    max_temperature: float = Field(0.5, gt=0.0)
    learnable: bool = True
    gather: bool = True
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    init_bias: float = -10.0
    # STRUCTURE-style regulariser (neighbourhood preservation): weight of the divergence between each batch's
    # neighbourhood distributions in the frozen encoder space and in the shared space, per modality (0 = off)
    structure: float = Field(0.0, ge=0.0, le=1000.0)
    structure_temperature: float = Field(0.1, gt=0.0, le=10.0)
    structure_levels: int = Field(1, ge=1, le=4)   # random-walk steps compared (1 = direct neighbours only)

    @model_validator(mode="after")
    def _check_range(self) -> "LossConfig":
        _validate(self.kind, self.init_temperature, self.min_temperature, self.max_temperature,
                  self.label_smoothing)
        return self


def _validate(kind: str, init_t: float | None, min_t: float, max_t: float, smoothing: float) -> float:
    """Check loss settings; return the initial temperature. Raises ValueError (RecipeError) with one line."""
    if kind not in LOSS_KINDS:
        raise RecipeError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    if not 0.0 < min_t < max_t:
        raise RecipeError(f"loss temperature range must satisfy 0 < min_temperature < max_temperature, "
                          f"got [{min_t}, {max_t}]")
    t = DEFAULT_INIT_TEMPERATURE[kind] if init_t is None else float(init_t)
    if not min_t <= t <= max_t:
        raise RecipeError(f"loss init_temperature {t} is outside [{min_t}, {max_t}]")
    if not 0.0 <= smoothing < 1.0:
        raise RecipeError(f"loss label_smoothing must be in [0, 1), got {smoothing}")
    if kind == "siglip" and smoothing > 0:
        raise RecipeError("loss label_smoothing applies to infonce only, not siglip")
    return t


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size (one tiny all_gather)."""
    _, world = dist_rank_world()
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


def gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order), keeping THIS rank's rows in the graph.

    ``sizes`` are the ranks' row counts (:func:`gather_sizes`); unequal sizes are padded for the collective.
    """
    rank, world = dist_rank_world()
    if world == 1:
        return x
    top = max(sizes)
    send = x.detach()
    if send.shape[0] < top:
        send = torch.cat([send, send.new_zeros((top - send.shape[0],) + tuple(send.shape[1:]))])
    bufs = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(bufs, send.contiguous())
    parts = [b[:n] for b, n in zip(bufs, sizes)]
    parts[rank] = x
    return torch.cat(parts)


def positives(n: int, image_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[n, n]`` bool: pair i and pair j share an image (identity when ``image_ids`` is None)."""
    if image_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return image_ids[:, None] == image_ids[None, :]


def _js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Jensen–Shannon divergence of two row-stochastic matrices."""
    m = (p + q) / 2
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.clamp_min(1e-12).log())).sum(1)  # noqa: E731
    return ((kl(p) + kl(q)) / 2).mean()


def structure_divergence(frozen: torch.Tensor, shared: torch.Tensor, temperature: float = 0.1,
                         levels: int = 1) -> torch.Tensor:
    """How much a batch's neighbourhood structure changed from the frozen space to the shared one (STRUCTURE,
    Gröger et al. 2025): row-wise softmax of cosine similarities / ``temperature`` (self excluded) in each space,
    the Jensen–Shannon divergence of the two, averaged over ``levels`` random-walk steps (P, P², …). ``frozen`` is
    a constant (no gradient); ``shared`` is the projector output."""
    n = frozen.shape[0]
    if n < 3:
        return shared.new_zeros(())
    eye = torch.eye(n, dtype=torch.bool, device=shared.device)

    def walk(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        return torch.softmax((x @ x.t() / temperature).masked_fill(eye, float("-inf")), dim=1)

    p, q = walk(frozen.detach()), walk(shared)
    total, pl, ql = shared.new_zeros(()), p, q
    for level in range(levels):
        total = total + _js_rows(pl, ql)
        if level + 1 < levels:
            pl, ql = pl @ p, ql @ q
    return total / levels


def _hits(sim: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``sim`` (queries × keys): is the best-scoring key a positive?"""
    best = sim.argmax(1)
    if ids is None:
        return best == torch.arange(sim.shape[0], device=sim.device)
    return ids[best] == ids


class ContrastiveLoss(nn.Module):
    """Base of the contrastive losses over the global batch; ``ContrastiveLoss(kind="siglip", ...)`` builds the class
    registered for ``kind`` (:data:`LOSSES`: :class:`InfoNCELoss`, :class:`SigLIPLoss`). Settings are
    :class:`LossConfig`'s fields (one source: keyword arguments are parsed into it, ``config=`` passes one).

    ``forward(img [B, D], txt [B, D], image_ids=None) -> (loss, logs)``; embeddings are NOT expected to be
    normalised. ``logs`` (python floats, same on every rank): ``loss``, ``temperature``, ``acc`` (in-batch
    top-1, both directions averaged; a hit is any positive column), ``acc_i2t``, ``acc_t2i``, ``batch``
    (global), plus the kind's own (:meth:`objective`). A subclass supplies :meth:`objective` only.
    """

    kind: str = ""

    def __new__(cls, *args, **kwargs):
        if cls is ContrastiveLoss:   # the base names a kind: build that kind's class (unknown: __init__ refuses)
            cfg = kwargs.get("config")
            kind = cfg.kind if cfg is not None else kwargs.get("kind", args[0] if args else "infonce")
            cls = LOSSES.get(kind, cls)
        return super().__new__(cls)

    def __init__(self, kind: str | None = None, *, config: LossConfig | None = None, **settings):
        super().__init__()
        if config is None:
            config = parse(LossConfig, {"kind": kind or self.kind or "infonce", **settings}, "loss")
        if self.kind and config.kind != self.kind:
            raise RecipeError(f"a {type(self).__name__} cannot be built from loss kind {config.kind!r}")
        self.config = config
        self.gather, self.learnable = bool(config.gather), bool(config.learnable)
        self.min_temperature, self.max_temperature = float(config.min_temperature), float(config.max_temperature)
        t = DEFAULT_INIT_TEMPERATURE[config.kind] if config.init_temperature is None else config.init_temperature
        self._init_parameter("log_temperature", math.log(t))

    def _init_parameter(self, name: str, value: float) -> None:
        """A learnable parameter, or a buffer (saved, no gradient) when the loss is not learnable."""
        v = torch.tensor(float(value), dtype=torch.float32)
        if self.learnable:
            setattr(self, name, nn.Parameter(v))
        else:
            self.register_buffer(name, v)

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "ContrastiveLoss":
        return LOSSES[cfg.kind](config=cfg)

    @property
    def temperature(self) -> torch.Tensor:
        """The temperature in use: ``exp(log_temperature)`` clamped to ``[min, max]`` (differentiable)."""
        return self.log_temperature.exp().clamp(self.min_temperature, self.max_temperature)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, temperature={self.temperature.item():.4g}, "
                f"range=[{self.min_temperature}, {self.max_temperature}], learnable={self.learnable}, "
                f"gather={self.gather}")

    def _global(self, img: torch.Tensor, txt: torch.Tensor, image_ids: torch.Tensor | None):
        _, world = dist_rank_world()
        if not self.gather or world == 1:
            return img, txt, image_ids
        sizes = gather_sizes(img.shape[0], img.device)
        ids = None if image_ids is None else gather_rows(image_ids, sizes)
        return gather_rows(img, sizes), gather_rows(txt, sizes), ids

    def objective(self, sim: torch.Tensor, temperature: torch.Tensor, ids: torch.Tensor | None):
        """``(loss, extra logs)`` from the global cosine matrix ``sim`` (images × texts)."""
        raise NotImplementedError

    @property
    def wants_frozen(self) -> bool:
        """Whether :meth:`forward` needs the frozen features (``frozen=``): the structure regulariser is on."""
        return self.config.structure > 0

    def forward(self, img: torch.Tensor, txt: torch.Tensor,
                image_ids: torch.Tensor | Sequence[int] | None = None,
                frozen: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``frozen``: the pooled frozen ``(image, text)`` features of this process's batch, for the structure
        regulariser (``config.structure`` > 0; computed on the local batch, not gathered)."""
        reg = None
        if self.wants_frozen:
            if frozen is None:
                raise ValueError("loss.structure > 0 needs the frozen features (frozen=(image, text))")
            c = self.config
            reg = (structure_divergence(frozen[0], img, c.structure_temperature, c.structure_levels)
                   + structure_divergence(frozen[1], txt, c.structure_temperature, c.structure_levels)) / 2
        if img.ndim != 2 or txt.shape != img.shape:
            raise ValueError(f"contrastive loss expects two [B, D] tensors of the same shape, "
                             f"got {tuple(img.shape)} and {tuple(txt.shape)}")
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids, device=img.device).long()
            if image_ids.shape != (img.shape[0],):
                raise ValueError(f"image_ids must have shape ({img.shape[0]},), got {tuple(image_ids.shape)}")
        if self.learnable:
            with torch.no_grad():
                self.log_temperature.clamp_(math.log(self.min_temperature), math.log(self.max_temperature))
        dtype = torch.promote_types(img.dtype, torch.float32)  # fp16/bf16 → fp32; fp64 stays
        with torch.autocast(device_type=img.device.type, enabled=False):
            img = F.normalize(img.to(dtype), dim=-1)
            txt = F.normalize(txt.to(dtype), dim=-1)
            img, txt, ids = self._global(img, txt, image_ids)
            temperature = self.temperature.to(dtype)
            sim = img @ txt.t()
            loss, logs = self.objective(sim, temperature, ids)
            if reg is not None:
                logs = dict(logs, structure=reg.detach())
                loss = loss + self.config.structure * reg
        with torch.no_grad():
            hit_i2t = _hits(sim, ids).to(dtype).mean()
            hit_t2i = _hits(sim.t(), ids).to(dtype).mean()
            stats = dict(logs, loss=loss.detach(), temperature=temperature.detach(), acc_i2t=hit_i2t,
                         acc_t2i=hit_t2i, acc=(hit_i2t + hit_t2i) / 2)
            values = torch.stack([v.to(dtype) for v in stats.values()]).tolist()  # one device sync
        out = dict(zip(stats, map(float, values)))
        out["batch"] = float(img.shape[0])
        return loss, out


class InfoNCELoss(ContrastiveLoss):
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy over ``sim / temperature``; soft targets
    uniform over the positive columns (label smoothing from the config). Logs ``loss_i2t`` / ``loss_t2i``."""

    kind = "infonce"

    def __init__(self, kind: str | None = None, *, config: LossConfig | None = None, **settings):
        super().__init__(kind, config=config, **settings)
        self.label_smoothing = float(self.config.label_smoothing)

    def objective(self, sim: torch.Tensor, temperature: torch.Tensor, ids: torch.Tensor | None):
        logits = sim / temperature
        if ids is None:  # class-index targets: no [N, N] target matrix
            target_i2t = target_t2i = torch.arange(logits.shape[0], device=logits.device)
        else:
            p = positives(logits.shape[0], ids, logits.device).to(logits.dtype)  # symmetric
            target_i2t = target_t2i = p / p.sum(1, keepdim=True)
        loss_i2t = F.cross_entropy(logits, target_i2t, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits.t(), target_t2i, label_smoothing=self.label_smoothing)
        loss = (loss_i2t + loss_t2i) / 2
        return loss, {"loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach()}


class SigLIPLoss(ContrastiveLoss):
    """SigLIP's sigmoid loss: ``-sum(log sigmoid(label * (sim / temperature + bias))) / N``, label +1 for positives
    and -1 otherwise; a learnable ``logit_bias`` (init from the config). Logs ``bias``."""

    kind = "siglip"

    def __init__(self, kind: str | None = None, *, config: LossConfig | None = None, **settings):
        super().__init__(kind, config=config, **settings)
        self._init_parameter("logit_bias", self.config.init_bias)

    def objective(self, sim: torch.Tensor, temperature: torch.Tensor, ids: torch.Tensor | None):
        logits = sim / temperature + self.logit_bias.to(sim.dtype)
        labels = positives(sim.shape[0], ids, sim.device).to(sim.dtype) * 2 - 1
        loss = -F.logsigmoid(labels * logits).sum() / logits.shape[0]
        return loss, {"bias": self.logit_bias.detach()}


LOSSES: dict[str, type[ContrastiveLoss]] = {"infonce": InfoNCELoss, "siglip": SigLIPLoss}


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    """The loss module described by ``cfg`` (one class per kind, :data:`LOSSES`)."""
    return ContrastiveLoss.from_config(cfg)
