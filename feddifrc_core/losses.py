"""Loss functions of FedDifRC and of the baselines (FedProx, MOON, SimCLR, distillation).

Pure functions on tensors; every loss returns a scalar averaged over the batch. The forms, and
where they differ from the reference code, are documented in docs/method.md and METHOD.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NDCR_KINDS = ("l2", "kl", "l2-raw")

# Guards the cosine normalisation against an all-zero vector (F.normalize's default).
_EPS = 1e-12


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2:
        raise ValueError(f"`{name}` must be a [B, D] tensor, got shape {tuple(t.shape)}")


def _check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")


def tdcl_loss(
    z: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float
) -> torch.Tensor:
    """Text-driven diffusion contrasting: per-sample InfoNCE with cosine similarity.

    loss_i = -log( e^{s(z_i, p_i)/tau} / (e^{s(z_i, p_i)/tau} + sum_j e^{s(z_i, n_ij)/tau}) ),
    averaged over the batch. Each anchor is contrasted with ITS OWN positive and negatives (the
    reference pools all positives into one numerator and pairs anchors with other samples'
    negatives). Computed as logsumexp - positive logit, which is stable for small tau.

    Args:
        z: local features [B, D].
        positive: diffusion features under the true-class prompt [B, D].
        negatives: diffusion features under K other prompts [B, K, D].
        tau: temperature (> 0; reference 0.04).
    """
    _check_2d("z", z)
    _check_same("z", z, "positive", positive)
    if negatives.ndim != 3 or negatives.shape[0] != z.shape[0] or negatives.shape[2] != z.shape[1]:
        raise ValueError(
            f"`negatives` must be [B={z.shape[0]}, K, D={z.shape[1]}], got {tuple(negatives.shape)}"
        )
    _check_temperature("tau", tau)
    z_n = F.normalize(z, dim=-1, eps=_EPS)  # [B, D]
    pos_n = F.normalize(positive, dim=-1, eps=_EPS)  # [B, D]
    neg_n = F.normalize(negatives, dim=-1, eps=_EPS)  # [B, K, D]
    s_pos = (z_n * pos_n).sum(dim=-1, keepdim=True)  # [B, 1]
    s_neg = torch.bmm(neg_n, z_n.unsqueeze(-1)).squeeze(-1)  # [B, K]
    logits = torch.cat([s_pos, s_neg], dim=1) / tau  # [B, 1 + K], column 0 is the positive
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def ndcr_loss(z: torch.Tensor, h: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Noise-driven diffusion regularisation: consistency of z with the null-prompt target h.

    kind:
        "l2": ||z/|z| - h/|h|||^2 = 2 - 2 cos(z, h), averaged over the batch (project default).
        "kl": KL(softmax(h/|h|) || softmax(z/|z|)) summed over dims, averaged over the batch (the
            reference's KLDivLoss(reduction="batchmean")); nearly zero for 512-d unit vectors.
        "l2-raw": ||z - h||^2 on raw features, summed over dims, averaged over the batch (paper text).
    """
    _check_2d("z", z)
    _check_same("z", z, "h", h)
    if kind == "l2":
        z_n = F.normalize(z, dim=-1, eps=_EPS)  # [B, D]
        h_n = F.normalize(h, dim=-1, eps=_EPS)  # [B, D]
        return (z_n - h_n).pow(2).sum(dim=-1).mean()
    if kind == "kl":
        log_q = F.log_softmax(F.normalize(z, dim=-1, eps=_EPS), dim=-1)  # [B, D] model
        log_p = F.log_softmax(F.normalize(h, dim=-1, eps=_EPS), dim=-1)  # [B, D] target
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    if kind == "l2-raw":
        return (z - h).pow(2).sum(dim=-1).mean()
    raise ValueError(f"`kind` must be one of {list(NDCR_KINDS)}, got {kind!r}")


def fedprox_term(model: nn.Module, global_params: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx proximal term mu/2 * sum_w ||w - w_global||^2 over `model.parameters()`.

    `global_params` are detached tensors in the order of `model.parameters()`, on the same device.
    """
    params = list(model.parameters())
    if len(params) != len(global_params):
        raise ValueError(
            f"`global_params` must hold one tensor per model parameter ({len(params)}), got "
            f"{len(global_params)}; pass [p.detach().clone() for p in global_model.parameters()]"
        )
    if mu < 0:
        raise ValueError(f"`mu` must be >= 0, got {mu!r}")
    total = params[0].new_zeros(())
    for w, w_g in zip(params, global_params, strict=True):
        total = total + (w - w_g).pow(2).sum()
    return 0.5 * mu * total


def moon_loss(
    z: torch.Tensor, z_global: torch.Tensor, z_prev: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MOON model-contrastive loss (Li et al., CVPR 2021), averaged over the batch.

    loss_i = -log( e^{cos(z_i, zg_i)/T} / (e^{cos(z_i, zg_i)/T} + e^{cos(z_i, zp_i)/T}) ): pull the
    local representation toward the global model's, push it from the previous local model's.
    """
    _check_2d("z", z)
    _check_same("z", z, "z_global", z_global)
    _check_same("z", z, "z_prev", z_prev)
    _check_temperature("temperature", temperature)
    s_g = F.cosine_similarity(z, z_global, dim=-1)  # [B]
    s_p = F.cosine_similarity(z, z_prev, dim=-1)  # [B]
    logits = torch.stack([s_g, s_p], dim=1) / temperature  # [B, 2], column 0 is the positive
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR NT-Xent over 2B views: each view's positive is the other view of its image, the other
    2B - 2 views are negatives; cosine similarity / temperature, averaged over all 2B anchors."""
    _check_2d("z1", z1)
    _check_same("z1", z1, "z2", z2)
    _check_temperature("temperature", temperature)
    b = z1.shape[0]
    if b < 2:
        raise ValueError(f"NT-Xent needs a batch of at least 2 images, got {b}")
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=-1, eps=_EPS)  # [2B, D]
    sim = z @ z.t() / temperature  # [2B, 2B]
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)  # [2B]
    return F.cross_entropy(sim, partner)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: T^2 * KL(softmax(teacher / T) || softmax(student / T)),
    mean over the batch (T^2 keeps its gradient scale independent of T)."""
    _check_2d("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_temperature("temperature", temperature)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)  # [B, C]
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)  # [B, C]
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
