"""Loss values against numbers worked out by hand (small tensors) and against plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from feddifrc_core.losses import fedprox_term, moon_loss, ndcr_loss, nt_xent, tdcl_loss

T = torch.tensor


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# --- TDCL --------------------------------------------------------------------------------------
def test_tdcl_hand_computed() -> None:
    # sample 1: cos(z, pos) = 1, negatives cos 0 and -1; sample 2: cos 1/sqrt2, negatives -1 and 0
    z = T([[3.0, 0.0], [0.0, 2.0]])
    pos = T([[1.0, 0.0], [1.0, 1.0]])
    neg = T([[[0.0, 1.0], [-1.0, 0.0]], [[0.0, -3.0], [1.0, 0.0]]])
    tau = 0.5
    r = math.sqrt(2.0)  # (1/sqrt2) / 0.5
    l1 = math.log(math.e**2 + 1 + math.e**-2) - 2
    l2 = math.log(math.e**r + math.e**-2 + 1) - r
    assert tdcl_loss(z, pos, neg, tau).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_tdcl_matches_per_sample_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z, pos = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    neg = torch.randn(5, 3, 8, generator=g)
    tau = 0.04
    losses = []
    for i in range(5):
        e_pos = math.exp(_cos(z[i], pos[i]) / tau)
        e_neg = sum(math.exp(_cos(z[i], neg[i, j]) / tau) for j in range(3))
        losses.append(-math.log(e_pos / (e_pos + e_neg)))
    assert tdcl_loss(z, pos, neg, tau).item() == pytest.approx(sum(losses) / 5, rel=1e-4)


def test_tdcl_is_stable_for_tiny_tau_and_gives_gradients() -> None:
    z = torch.randn(4, 16, requires_grad=True)
    loss = tdcl_loss(z, torch.randn(4, 16), torch.randn(4, 10, 16), tau=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_tdcl_uses_only_each_samples_own_negatives() -> None:
    # sample 0's loss must not change when sample 1's negatives change (the reference's tiling bug)
    z, pos, neg = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4)
    neg2 = neg.clone()
    neg2[1] = torch.randn(3, 4)
    a = tdcl_loss(z[:1], pos[:1], neg[:1], 0.1)
    b = tdcl_loss(z[:1], pos[:1], neg2[:1], 0.1)
    assert a.item() == b.item()
    assert tdcl_loss(z, pos, neg, 0.1).item() != pytest.approx(tdcl_loss(z, pos, neg2, 0.1).item())


def test_tdcl_rejects_bad_shapes_and_tau() -> None:
    with pytest.raises(ValueError, match="negatives"):
        tdcl_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="tau"):
        tdcl_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), 0.0)


# --- NDCR --------------------------------------------------------------------------------------
Z = T([[3.0, 4.0], [1.0, 0.0]])
H = T([[4.0, 3.0], [0.0, 5.0]])


def test_ndcr_l2_is_two_minus_two_cos() -> None:
    # cos = 24/25 -> 0.08; orthogonal -> 2
    assert ndcr_loss(Z, H, "l2").item() == pytest.approx((0.08 + 2.0) / 2, rel=1e-6)
    assert ndcr_loss(Z, H).item() == ndcr_loss(Z, H, "l2").item()  # l2 is the default


def test_ndcr_l2_raw_sums_dims_and_averages_batch() -> None:
    # (3-4)^2 + (4-3)^2 = 2 ; 1 + 25 = 26
    assert ndcr_loss(Z, H, "l2-raw").item() == pytest.approx(14.0, rel=1e-6)


def test_ndcr_kl_hand_computed_and_equals_reference_formula() -> None:
    # unit vectors [.6,.8] (z) and [.8,.6] (h): p = softmax(h) = (sig(.2), sig(-.2)),
    # q = softmax(z) = (sig(-.2), sig(.2)); KL(p||q) = 0.2 (p1 - p2) = 0.2 tanh(0.1)
    z, h = Z[:1], H[:1]
    assert ndcr_loss(z, h, "kl").item() == pytest.approx(0.2 * math.tanh(0.1), rel=1e-5)
    g = torch.Generator().manual_seed(1)
    z, h = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    zn, hn = z / z.norm(dim=-1, keepdim=True), h / h.norm(dim=-1, keepdim=True)
    ref = nn.KLDivLoss(reduction="batchmean")(zn.log_softmax(1), hn.softmax(1))
    assert ndcr_loss(z, h, "kl").item() == pytest.approx(ref.item(), rel=1e-5)


def test_ndcr_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        ndcr_loss(Z, H, "cosine")


# --- FedProx, MOON, NT-Xent --------------------------------------------------------------------
def test_fedprox_term_hand_computed() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(T([[1.0, 2.0]]))
        model.bias.copy_(T([3.0]))
    anchor = [T([[0.0, 0.0]]), T([1.0])]
    # ||w - w_g||^2 = 1 + 4 + 4 = 9 -> 0.1 / 2 * 9
    assert fedprox_term(model, anchor, 0.1).item() == pytest.approx(0.45, rel=1e-6)
    with pytest.raises(ValueError, match="global_params"):
        fedprox_term(model, anchor[:1], 0.1)


def test_moon_loss_hand_computed() -> None:
    z = T([[1.0, 0.0], [1.0, 1.0]])
    zg = T([[2.0, 0.0], [1.0, 0.0]])  # cos 1 ; 1/sqrt2
    zp = T([[0.0, 1.0], [1.0, 1.0]])  # cos 0 ; 1
    t = 0.5
    l1 = math.log(1 + math.exp((0 - 1) / t))
    l2 = math.log(1 + math.exp((1 - 1 / math.sqrt(2)) / t))
    assert moon_loss(z, zg, zp, t).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_nt_xent_hand_computed() -> None:
    # views v0=[1,0], v1=[0,1], v2=[1,1]/r2, v3=[1,-1]/r2; pairs (0,2), (1,3); a = cos 45 deg / T
    z1 = T([[1.0, 0.0], [0.0, 1.0]])
    z2 = T([[1.0, 1.0], [1.0, -1.0]])
    a = 1 / math.sqrt(2)  # T = 1
    l0 = math.log(1 + 2 * math.exp(a)) - a  # anchor 0: others 0 (v1), a (v2, positive), a (v3)
    l1 = math.log(1 + math.exp(a) + math.exp(-a)) + a  # anchor 1: 0, a, -a (v3, positive)
    l2 = math.log(1 + 2 * math.exp(a)) - a  # anchor 2: a (v0, positive), a, 0
    l3 = math.log(1 + math.exp(a) + math.exp(-a)) + a  # anchor 3: a, -a (v1, positive), 0
    assert nt_xent(z1, z2, 1.0).item() == pytest.approx((l0 + l1 + l2 + l3) / 4, rel=1e-6)


def test_nt_xent_matches_loop() -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t = 0.5
    v = torch.cat([z1, z2])
    losses = []
    for i in range(6):
        j = (i + 3) % 6
        den = sum(math.exp(_cos(v[i], v[k]) / t) for k in range(6) if k != i)
        losses.append(-math.log(math.exp(_cos(v[i], v[j]) / t) / den))
    assert nt_xent(z1, z2, t).item() == pytest.approx(sum(losses) / 6, rel=1e-5)


def test_kd_loss_matches_its_definition():
    from feddifrc_core.losses import kd_loss

    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.5, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, dim=1)
    q = torch.softmax(student / t, dim=1)
    expected = t**2 * (p * (p.log() - q.log())).sum(dim=1).mean()
    assert kd_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(student, teacher[:, :2], 1.0)
