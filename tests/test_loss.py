"""Contrastive losses: hand-computed InfoNCE (multi-positive, label smoothing) and SigLIP, temperature
clamping/learnability, configs, gather WITH gradient under 2 CPU processes (gloo), and a real MiniLM check."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import pytest
import torch

from align.loss import ContrastiveLoss, LossConfig, build_loss, gather_rows
from tether.recipe import RecipeError, parse

IMG = [[1.0, 0.0, 0.5], [0.6, 0.8, 0.0], [0.0, 1.0, -0.2], [0.3, -0.4, 1.0]]
TXT = [[1.0, 0.2, 0.1], [0.5, 0.5, 0.0], [-0.3, 1.0, 0.4], [0.2, 0.1, 0.9]]


@pytest.fixture(autouse=True)
def _tiny_tensors(one_torch_thread):
    """Tiny tensors: one intra-op thread (see the conftest fixture)."""


def _unit(rows):
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]


def _sims(img, txt):
    a, b = _unit(img), _unit(txt)
    return [[sum(x * y for x, y in zip(r, c)) for c in b] for r in a]


def hand_infonce(img, txt, ids, t, eps=0.0):
    """Loop-by-loop symmetric InfoNCE with uniform multi-positive targets and label smoothing."""
    s = _sims(img, txt)
    n = len(s)

    def direction(mat):
        total = 0.0
        for i in range(n):
            logits = [mat[i][j] / t for j in range(n)]
            lse = math.log(sum(math.exp(z) for z in logits))
            pos = [1.0 if ids[i] == ids[j] else 0.0 for j in range(n)]
            tgt = [(1 - eps) * p / sum(pos) + eps / n for p in pos]
            total += -sum(tj * (zj - lse) for tj, zj in zip(tgt, logits))
        return total / n

    st = [[s[j][i] for j in range(n)] for i in range(n)]
    return (direction(s) + direction(st)) / 2


def hand_siglip(img, txt, ids, t, b):
    s = _sims(img, txt)
    n = len(s)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if ids[i] == ids[j] else -1.0
            total += math.log(1 + math.exp(-z * (s[i][j] / t + b)))
    return total / n


def _t(x):
    return torch.tensor(x, dtype=torch.float64).float()


def test_infonce_single_positive_vs_hand():
    loss_fn = ContrastiveLoss(init_temperature=0.1)
    loss, logs = loss_fn(_t(IMG), _t(TXT))
    assert loss.item() == pytest.approx(hand_infonce(IMG, TXT, [0, 1, 2, 3], 0.1), rel=1e-5)
    assert logs["loss"] == pytest.approx(loss.item()) and logs["temperature"] == pytest.approx(0.1)
    assert logs["batch"] == 4


def test_infonce_multi_positive_vs_hand():
    ids = [7, 7, 3, 9]  # pairs 0 and 1 are two captions of the same image
    loss_fn = ContrastiveLoss(init_temperature=0.2)
    loss, logs = loss_fn(_t(IMG), _t(TXT), image_ids=torch.tensor(ids))
    want = hand_infonce(IMG, TXT, ids, 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # really differs from the single-positive loss
    assert abs(want - hand_infonce(IMG, TXT, [0, 1, 2, 3], 0.2)) > 1e-3
    # a list works too, and label smoothing matches the hand formula
    smooth = ContrastiveLoss(init_temperature=0.2, label_smoothing=0.1)
    assert smooth(_t(IMG), _t(TXT), image_ids=ids)[0].item() == pytest.approx(
        hand_infonce(IMG, TXT, ids, 0.2, eps=0.1), rel=1e-5)


def test_siglip_vs_hand():
    ids = [7, 7, 3, 9]
    loss_fn = ContrastiveLoss(kind="siglip")
    assert loss_fn.temperature.item() == pytest.approx(0.1)  # logit scale 10
    assert loss_fn.logit_bias.item() == -10.0
    loss, logs = loss_fn(_t(IMG), _t(TXT), image_ids=ids)
    assert loss.item() == pytest.approx(hand_siglip(IMG, TXT, ids, 0.1, -10.0), rel=1e-5)
    assert logs["bias"] == -10.0
    loss2, _ = ContrastiveLoss(kind="siglip", init_temperature=0.25, init_bias=1.5)(_t(IMG), _t(TXT))
    assert loss2.item() == pytest.approx(hand_siglip(IMG, TXT, [0, 1, 2, 3], 0.25, 1.5), rel=1e-5)
    loss.backward()
    assert loss_fn.logit_bias.grad is not None and loss_fn.log_temperature.grad is not None


def test_accuracy_logs():
    x = torch.randn(6, 5)
    _, logs = ContrastiveLoss()(x, x * 3.0)  # identical directions: every row's best column is its own pair
    assert logs["acc"] == logs["acc_i2t"] == logs["acc_t2i"] == 1.0
    txt = x.roll(1, 0)  # every text sits one row away from its image
    _, logs = ContrastiveLoss()(x, txt)
    assert logs["acc"] == 0.0
    # pairs sharing an image id count as hits: rows 0/1 swapped, same id
    txt = x.clone()
    txt[[0, 1]] = x[[1, 0]]
    assert ContrastiveLoss()(x, txt)[1]["acc"] == pytest.approx(4 / 6)
    assert ContrastiveLoss()(x, txt, image_ids=[0, 0, 1, 2, 3, 4])[1]["acc"] == 1.0


def test_temperature_clamped_and_learnable():
    loss_fn = ContrastiveLoss(init_temperature=0.07, min_temperature=0.01, max_temperature=0.2)
    assert [n for n, _ in loss_fn.named_parameters()] == ["log_temperature"]
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(5.0))
    assert loss_fn.temperature.item() == pytest.approx(0.2)  # clamped on use
    _, logs = loss_fn(torch.randn(4, 3), torch.randn(4, 3))
    assert logs["temperature"] == pytest.approx(0.2)
    assert loss_fn.log_temperature.item() == pytest.approx(math.log(0.2))  # stored value pulled back into range
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-5))
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    # learnable: the gradient is right (finite difference) and optimisation moves the temperature
    torch.manual_seed(0)
    img, txt = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    fn = ContrastiveLoss(init_temperature=0.1).double()
    loss, _ = fn(img, txt)
    loss.backward()
    h = 1e-4
    with torch.no_grad():
        fn.log_temperature += h
        up = fn(img, txt)[0].item()
        fn.log_temperature -= 2 * h
        down = fn(img, txt)[0].item()
        fn.log_temperature += h
    assert fn.log_temperature.grad.item() == pytest.approx((up - down) / (2 * h), rel=1e-3)
    # aligned pairs: the loss falls by sharpening (lowering) the temperature
    fn2 = ContrastiveLoss(init_temperature=0.3)
    opt = torch.optim.SGD(fn2.parameters(), lr=0.5)
    x = torch.randn(8, 4)
    for _ in range(10):
        opt.zero_grad()
        fn2(x, x + 0.01 * torch.randn(8, 4))[0].backward()
        opt.step()
    assert fn2.temperature.item() < 0.2
    # not learnable: a buffer (saved in the state dict), no parameter, no gradient
    frozen = ContrastiveLoss(kind="siglip", learnable=False)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"log_temperature", "logit_bias"}
    frozen(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))[0].backward()
    assert frozen.temperature.item() == pytest.approx(0.1)


def test_config_and_errors():
    cfg = parse(LossConfig, {"kind": "siglip", "gather": False})
    fn = build_loss(cfg)
    assert fn.kind == "siglip" and not fn.gather and fn.temperature.item() == pytest.approx(0.1)
    assert build_loss(LossConfig()).temperature.item() == pytest.approx(0.07)
    for bad, what in (({"min_temperature": 0.5, "max_temperature": 0.1}, "min_temperature < max_temperature"),
                      ({"init_temperature": 0.9}, "outside"),
                      ({"kind": "siglip", "label_smoothing": 0.1}, "infonce only"),
                      ({"kind": "triplet"}, "kind"),
                      ({"temp": 0.1}, "unknown key")):
        with pytest.raises(RecipeError, match=what) as e:
            parse(LossConfig, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="outside"):
        ContrastiveLoss(init_temperature=1.0)
    with pytest.raises(ValueError, match="same shape"):
        ContrastiveLoss()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="image_ids"):
        ContrastiveLoss()(torch.randn(3, 4), torch.randn(3, 4), image_ids=[1, 2])


def test_low_precision_inputs_are_computed_in_float32():
    torch.manual_seed(0)
    img, txt = torch.randn(16, 8).bfloat16(), torch.randn(16, 8).bfloat16()
    ref, _ = ContrastiveLoss()(img.float(), txt.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = ContrastiveLoss()(img, txt)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_single_process_gather_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_rows(x, [3]) is x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_gather_with_gradient_two_processes(tmp_path):
    """2 gloo processes with UNEQUAL local batches (3 and 5): each rank's input gradients, the loss, the logs
    and the temperature/bias gradients equal those of one process over the concatenated global batch."""
    import torch.multiprocessing as mp

    if str(Path(__file__).parent) not in sys.path:  # e.g. --import-mode=importlib; children inherit sys.path
        sys.path.insert(0, str(Path(__file__).parent))
    import _dist_worker

    torch.manual_seed(0)
    sizes = [3, 5]
    n, d = sum(sizes), 6
    img, txt = torch.randn(n, d), torch.randn(n, d)
    txt[:4] += 2 * img[:4]  # some signal so accuracy is not trivial
    ids = torch.tensor([0, 1, 2, 1, 3, 2, 4, 5])  # image 1 and 2 have captions on both ranks
    cases = {
        "infonce_ids": {"kwargs": {"init_temperature": 0.1}, "use_ids": True},
        "infonce_smooth": {"kwargs": {"init_temperature": 0.2, "label_smoothing": 0.1}, "use_ids": False},
        "siglip_ids": {"kwargs": {"kind": "siglip"}, "use_ids": True},
        "local_only": {"kwargs": {"gather": False}, "use_ids": False},
    }
    data_path = tmp_path / "data.pt"
    torch.save({"sizes": sizes, "img": img, "txt": txt, "ids": ids, "cases": cases}, data_path)
    mp.spawn(_dist_worker.run, args=(2, _free_port(), str(data_path), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    bounds = [(0, 3), (3, 8)]
    for name, case in cases.items():
        if name == "local_only":
            continue
        ref_fn = ContrastiveLoss(**case["kwargs"])
        gi, gt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        loss, logs = ref_fn(gi, gt, image_ids=ids if case["use_ids"] else None)
        loss.backward()
        for r, (lo, hi) in enumerate(bounds):
            got = ranks[r][name]
            torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["img_grad"], gi.grad[lo:hi], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["txt_grad"], gt.grad[lo:hi], atol=1e-5, rtol=1e-5)
            for k, p in ref_fn.named_parameters():
                torch.testing.assert_close(got["param_grads"][k], p.grad, atol=1e-5, rtol=1e-5)
            assert got["logs"]["batch"] == n
            assert got["logs"]["acc"] == pytest.approx(logs["acc"])
        assert gi.grad.abs().sum() > 0
    # gather=False: each rank's loss only sees its own rows
    for r, (lo, hi) in enumerate(bounds):
        local, _ = ContrastiveLoss()(img[lo:hi], txt[lo:hi])
        torch.testing.assert_close(ranks[r]["local_only"]["loss"], local, atol=1e-5, rtol=1e-5)
        assert ranks[r]["local_only"]["logs"]["batch"] == hi - lo


@pytest.mark.real
def test_real_minilm_multi_positive(flickr8k, minilm_path):
    """Real captions: the 5 captions of an image are positives of each other; MiniLM embeddings of caption #k
    vs caption #k+1 find a same-image caption far above chance, and multi-positive targets give a lower loss
    than treating the extra captions as negatives."""
    from tether.encoders import TextEncoder

    lines = (flickr8k / "captions.txt").read_text(encoding="utf-8").splitlines()[:60]  # 12 images x 5
    caps = [ln.split("\t", 1)[1].strip() for ln in lines]
    img_of = [ln.split("#")[0] for ln in lines]
    ids = torch.tensor([sorted(set(img_of)).index(x) for x in img_of])
    emb = torch.from_numpy(TextEncoder.load(str(minilm_path)).encode(caps, normalize=False))
    # pairs (caption #k, caption #k+1) of the same image: 12 images x 4 pairs, all rows distinct
    a = torch.tensor([i for i in range(60) if i % 5 < 4])
    q, keys, pair_ids = emb[a], emb[a + 1], ids[a]
    loss_fn = ContrastiveLoss(init_temperature=0.05)
    loss_multi, logs = loss_fn(q, keys, image_ids=pair_ids)
    assert logs["acc_i2t"] > 0.5 and logs["acc_t2i"] > 0.5  # chance: 4/48
    loss_single, _ = loss_fn(q, keys)
    assert loss_multi.item() < loss_single.item()


def test_structure_regulariser_measures_changed_neighbourhoods():
    from align.loss import structure_divergence

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    # a rotation and a scale keep every cosine: the same neighbourhoods, no divergence
    assert structure_divergence(x, 3.0 * x @ q).item() == pytest.approx(0.0, abs=1e-6)
    assert structure_divergence(x, x, levels=3).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = x[torch.randperm(16)]
    assert structure_divergence(x, shuffled).item() > 0.05
    # the gradient reaches the shared side only
    emb = torch.randn(16, 8, requires_grad=True)
    frozen = x.clone().requires_grad_(True)
    structure_divergence(frozen, emb, levels=2).backward()
    assert emb.grad.abs().sum() > 0 and frozen.grad is None
    assert structure_divergence(x[:2], emb[:2]).item() == 0.0   # too small a batch: nothing to compare


def test_structure_weight_adds_to_the_contrastive_loss():
    from align.loss import structure_divergence

    torch.manual_seed(1)
    img, txt = torch.randn(12, 6), torch.randn(12, 6)
    fi, ft = torch.randn(12, 10), torch.randn(12, 7)
    base, logs0 = ContrastiveLoss(init_temperature=0.1)(img, txt)
    assert "structure" not in logs0
    reg_fn = ContrastiveLoss(init_temperature=0.1, structure=2.0, structure_temperature=0.2)
    with pytest.raises(ValueError, match="frozen features"):
        reg_fn(img, txt)
    loss, logs = reg_fn(img, txt, frozen=(fi, ft))
    want = (structure_divergence(fi, img, 0.2) + structure_divergence(ft, txt, 0.2)) / 2
    assert logs["structure"] == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() == pytest.approx(base.item() + 2.0 * want.item(), rel=1e-5)
    with pytest.raises(RecipeError, match="structure"):
        parse(LossConfig, {"structure": -1})
