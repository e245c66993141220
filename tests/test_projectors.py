"""Projectors: shapes, masking, prefix tokens, exact fused pooling, configs; a real DINOv2-S + MiniLM check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from align.projectors import (KINDS, SIDES, MLPProjector, ProjectorConfig, TokenBlock, TokenImageProjector,
                              TokenTextProjector, build_projector, build_projector_from_config, masked_mean)
from tether.recipe import RecipeError, parse

D_IN, D_OUT = 12, 8


@pytest.fixture(autouse=True)
def _tiny_tensors(one_torch_thread):
    """Tiny tensors: one intra-op thread (see the conftest fixture)."""


def _inputs(kind: str, b: int = 3, t: int = 6, d: int = D_IN) -> torch.Tensor:
    return torch.randn(b, t, d) if kind == "token" else torch.randn(b, d)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "identity"])
@pytest.mark.parametrize("side", SIDES)
def test_shapes_all_heads_and_sides(kind, side):
    torch.manual_seed(0)
    m = build_projector(kind, side, D_IN, out_dim=D_OUT, hidden_dim=5)
    x = _inputs(kind).requires_grad_(True)
    y = m(x)
    assert y.shape == (3, D_OUT) and torch.isfinite(y).all()
    assert m.kind == kind and m.side == side and m.in_dim == D_IN and m.out_dim == D_OUT
    y.square().sum().backward()  # every trainable parameter is used
    assert all(p.grad is not None for p in m.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0
    # not normalised
    assert not torch.allclose(y.norm(dim=-1), torch.ones(3))


def test_identity_side_keeps_the_encoder_space():
    m = build_projector("identity", "text", D_IN, out_dim=D_IN)
    x = torch.randn(3, D_IN)
    assert torch.equal(m(x), x) and not list(m.parameters())
    with pytest.raises(RecipeError, match="set out_dim: 12"):
        build_projector("identity", "text", D_IN, out_dim=D_OUT)


def test_paper_block_structure_and_defaults():
    m = build_projector("token", "text", D_IN, out_dim=D_OUT)
    assert isinstance(m, TokenTextProjector)
    blk = m.block
    assert isinstance(blk.norm, nn.LayerNorm) and blk.drop.p == pytest.approx(0.1)
    assert blk.fc1.out_features == D_OUT  # hidden_dim None -> out_dim
    assert isinstance(blk.act, nn.GELU) and blk.skip.in_features == D_IN
    assert isinstance(m.head.norm, nn.LayerNorm)  # residual MLP head with LayerNorm
    no_head = build_projector("token", "text", D_IN, out_dim=D_OUT, text_head=False)
    assert isinstance(no_head.head, nn.Identity)
    # the block is LN -> Dropout -> skip + MLP: check against the formula in eval mode
    blk.eval()
    x = torch.randn(4, D_IN)
    h = nn.functional.layer_norm(x, (D_IN,), blk.norm.weight, blk.norm.bias)
    ref = blk.skip(h) + blk.fc2(nn.functional.gelu(blk.fc1(h)))
    torch.testing.assert_close(blk(x), ref)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = build_projector("mlp", "image", D_IN, out_dim=D_OUT, dropout=0.5)
    x = torch.randn(16, D_IN)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_pool_equals_per_token_then_mean(use_mask, gated):
    torch.manual_seed(1)
    blk = TokenBlock(D_IN, D_OUT, hidden_dim=7, gated=gated).eval()
    assert blk.fc1.out_features == (14 if gated else 7)
    x = torch.randn(5, 9, D_IN, dtype=torch.float64, requires_grad=True)
    blk.double()
    mask = (torch.rand(5, 9) > 0.4).long() if use_mask else None
    if mask is not None:
        mask[:, 0] = 1
    fused = blk.pool(x, mask)
    naive = masked_mean(blk(x), mask)
    torch.testing.assert_close(fused, naive, atol=1e-10, rtol=1e-10)
    g1, = torch.autograd.grad(fused.sum(), x)
    g2, = torch.autograd.grad(naive.sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


def test_padding_does_not_change_text_output():
    torch.manual_seed(2)
    m = build_projector("token", "text", D_IN, out_dim=D_OUT).eval()
    lengths = [5, 2, 7]
    T = 7
    x = torch.randn(3, T, D_IN)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    out = m(x, mask)
    # each row alone, unpadded, gives the same vector
    for i, n in enumerate(lengths):
        alone = m(x[i:i + 1, :n], torch.ones(1, n, dtype=torch.long))
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    # garbage (even NaN) in padded positions changes nothing
    y = x.clone()
    y[mask == 0] = float("nan")
    torch.testing.assert_close(m(y, mask), out)
    # mask=None means every token is real
    torch.testing.assert_close(m(x), m(x, torch.ones(3, T)))
    assert not torch.allclose(m(x), out)


def test_prefix_tokens_cls_and_registers():
    torch.manual_seed(3)
    p = 3  # CLS + 2 registers (DINOv2 with registers)
    m = build_projector("token", "image", D_IN, out_dim=D_OUT, num_prefix_tokens=p).eval()
    assert isinstance(m, TokenImageProjector) and m.num_prefix_tokens == p
    x = torch.randn(2, p + 4, D_IN)
    out = m(x)
    # hand composition: projected CLS + mean of projected patch tokens (registers excluded)
    ref = m.cls_block(x[:, 0]) + m.patch_block(x[:, p:]).mean(1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[:, 1:p] = torch.randn(2, p - 1, D_IN) * 100  # registers are ignored
    torch.testing.assert_close(m(y), out)
    y = x.clone()
    y[:, 0] = torch.randn(2, D_IN)  # CLS matters (a shift alone would be removed by LayerNorm)
    assert not torch.allclose(m(y), out)
    y = x.clone()
    y[:, -1] = torch.randn(2, D_IN)  # patches matter
    assert not torch.allclose(m(y), out)
    # with num_prefix_tokens=1 the registers would be counted as patches
    m1 = build_projector("token", "image", D_IN, out_dim=D_OUT, num_prefix_tokens=1)
    m1.load_state_dict(m.state_dict())
    assert not torch.allclose(m1.eval()(x), out)
    with pytest.raises(ValueError, match="no patch tokens"):
        m(x[:, :p])


def test_image_pooling_variants():
    torch.manual_seed(4)
    x = torch.randn(2, 5, D_IN)
    both = build_projector("token", "image", D_IN, out_dim=D_OUT).eval()
    cls_only = build_projector("token", "image", D_IN, out_dim=D_OUT, image_pooling="cls").eval()
    mean_only = build_projector("token", "image", D_IN, out_dim=D_OUT, image_pooling="mean").eval()
    assert cls_only.patch_block is None and mean_only.cls_block is None
    cls_only.cls_block.load_state_dict(both.cls_block.state_dict())
    mean_only.patch_block.load_state_dict(both.patch_block.state_dict())
    torch.testing.assert_close(both(x), cls_only(x) + mean_only(x), atol=1e-5, rtol=1e-5)


def test_config_and_errors():
    cfg = parse(ProjectorConfig, {"kind": "mlp", "out_dim": 16})
    assert cfg.hidden_dim is None and cfg.dropout == 0.1
    m = build_projector_from_config(cfg, "text", 10)
    assert isinstance(m, MLPProjector) and m.block.fc1.out_features == 16 and m(torch.randn(2, 10)).shape == (2, 16)
    tok = build_projector_from_config(ProjectorConfig(out_dim=6, text_head=False), "image", 10, num_prefix_tokens=5)
    assert tok.num_prefix_tokens == 5
    with pytest.raises(RecipeError, match="kind"):
        parse(ProjectorConfig, {"kind": "transformer"})
    with pytest.raises(RecipeError, match="bogus: unknown key"):
        parse(ProjectorConfig, {"bogus": 1})
    with pytest.raises(RecipeError, match="dropout"):
        parse(ProjectorConfig, {"dropout": 1.5})
    for bad in ({"kind": "conv"}, {"side": "audio"}, {"in_dim": 0}, {"hidden_dim": -1}, {"dropout": 1.0}):
        args = {"kind": "mlp", "side": "image", "in_dim": 4} | bad
        with pytest.raises(RecipeError) as e:
            build_projector(args.pop("kind"), args.pop("side"), args.pop("in_dim"), **args)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"expects \[B, D\] with D=10"):
        m(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match=r"expects \[B, T, D\]"):
        tok(torch.randn(2, 10))
    with pytest.raises(ValueError, match="mask shape"):
        build_projector("token", "text", 4)(torch.randn(2, 3, 4), torch.ones(2, 4))


@pytest.mark.real
def test_real_encoders_token_heads(flickr8k, dinov2_small, minilm_path):
    """Real DINOv2-S tokens + MiniLM tokens: shapes, batch-padding invariance and a quick overfit."""
    from PIL import Image

    from tether.encoders import TextEncoder, VisionEncoder
    from align.loss import ContrastiveLoss

    lines = (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines()[:30:5]  # 6 images, caption #0
    names = [ln.split("#")[0] for ln in lines]
    caps = [ln.split("\t", 1)[1].strip() for ln in lines]
    vis = VisionEncoder.load(str(dinov2_small))
    txt = TextEncoder.load(str(minilm_path))
    v_tok = vis.tokens(vis.preprocess([Image.open(flickr8k / "images" / n) for n in names]))
    t_tok, t_mask = txt.tokens(caps)
    assert v_tok.shape[1] == 257 and t_mask.min() == 0  # padding really present
    torch.manual_seed(0)
    img_head = build_projector("token", "image", vis.dim, out_dim=64, num_prefix_tokens=vis.num_prefix_tokens)
    txt_head = build_projector("token", "text", txt.dim, out_dim=64)
    img_head.eval(), txt_head.eval()
    zi, zt = img_head(v_tok), txt_head(t_tok, t_mask)
    assert zi.shape == zt.shape == (6, 64)
    # the caption encoded alone (no padding) projects to the same vector as inside the padded batch
    short = int(t_mask.sum(1).argmin())
    a_tok, a_mask = txt.tokens([caps[short]])
    torch.testing.assert_close(txt_head(a_tok, a_mask)[0], zt[short], atol=1e-4, rtol=1e-4)
    # trainable end to end on real features: a few steps overfit the 6 pairs
    loss_fn = ContrastiveLoss()
    params = list(img_head.parameters()) + list(txt_head.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    img_head.train(), txt_head.train()
    first = None
    for _ in range(20):
        loss, logs = loss_fn(img_head(v_tok), txt_head(t_tok, t_mask))
        first = logs["loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    img_head.eval(), txt_head.eval()
    _, logs = loss_fn(img_head(v_tok), txt_head(t_tok, t_mask))
    assert logs["loss"] < 0.2 * first and logs["acc"] == 1.0


def test_gated_mlp_head_is_a_swiglu_and_only_for_mlp():
    from align.projectors import build_projector_from_config

    torch.manual_seed(0)
    cfg = ProjectorConfig(kind="mlp", out_dim=D_OUT, hidden_dim=5, gated=True)
    m = build_projector_from_config(cfg, "image", D_IN).eval()
    x = torch.randn(3, D_IN)
    h = m.block.norm(x)
    u, g = m.block.fc1(h).chunk(2, -1)
    torch.testing.assert_close(m(x), m.block.skip(h) + m.block.fc2(nn.functional.silu(g) * u))
    with pytest.raises(RecipeError, match="gated"):
        build_projector_from_config(ProjectorConfig(kind="linear", out_dim=D_OUT, gated=True), "image", D_IN)
