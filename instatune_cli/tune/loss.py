"""The InstaTune loss (paper Eq. 1) and its per-network pieces.

    L_total = α·[CE(Φ_S) + Σ_i CE(Φ_S^i)]
            + (1−α)·[γ·KL(Φ_S‖Φ_T;ρ) + Σ_i ((1−γ)·KL(Φ_S^i‖Φ_S;ρ) + γ·KL(Φ_S^i‖Φ_T;ρ))]

KL(student‖teacher; ρ) is the usual distillation divergence (Hinton et al. 2015, as in DynaBERT and
DyNAS-T): the student is named first, as in the paper, and the divergence computed is
KL(softmax(teacher/ρ) ‖ softmax(student/ρ)), averaged over the batch and scaled by ρ² so that its
gradient has the same size for every temperature. The super-network's logits are detached where they
teach a sub-network (the super-network is not pulled towards its sub-networks).

Optional (`--hidden-distill β`, DynaBERT): β·MSE between each sub-network's hidden states and the
super-network's at the layers it keeps (`hidden_distill`), added to the sub-network's term.

Regression (one output, float labels: STS-B): CE becomes the mean squared error to the labels and each KL
term the mean squared error to the (detached) teacher's or super-network's output, without temperature
(there is no distribution to soften); `ce` and `kd` decide by the labels' dtype and the output width, so every
term below serves both kinds.

Because every sub-network term only sees detached targets, L_total splits exactly into one term for the
super-network plus one per sub-network; the training loop back-propagates them one at a time (memory of
one graph instead of M+1, and the pattern DDP expects), and the sum of the pieces is L_total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from instatune_cli.adapters.base import task_loss


@dataclass(frozen=True)
class LossWeights:
    """α = CE weight, ρ = temperature, γ = weight of the strong teacher (1 with a teacher, else 0);
    `super_ce` = the CE weight of the super-network's own term (None: α, as in Eq. 1)."""

    alpha: float = 0.3
    rho: float = 1.0
    gamma: float = 0.0
    super_ce: float | None = None


ce = task_loss  # the task loss: cross-entropy for class ids, MSE of the one output for float labels (regression)


def kd(student: torch.Tensor, teacher: torch.Tensor, rho: float) -> torch.Tensor:
    """KL(student‖teacher; ρ) = ρ² · mean over the batch of Σ_c p_T,c (log p_T,c − log p_S,c), p = softmax(·/ρ).
    A regressor's single output (width 1) is distilled by MSE to the teacher's output instead (ρ unused)."""
    if student.shape[-1] == 1:
        return F.mse_loss(student.float(), teacher.float())
    log_s = F.log_softmax(student.float() / rho, dim=-1)
    log_t = F.log_softmax(teacher.float() / rho, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (rho * rho)


def super_term(logits: torch.Tensor, labels: torch.Tensor, w: LossWeights,
               teacher: torch.Tensor | None = None) -> torch.Tensor:
    """α·CE(Φ_S) + (1−α)·γ·KL(Φ_S‖Φ_T; ρ) (`w.super_ce` in place of the first α when set)."""
    loss = (w.alpha if w.super_ce is None else w.super_ce) * ce(logits, labels)
    if w.gamma:
        if teacher is None:
            raise ValueError("gamma > 0 needs teacher logits")
        loss = loss + (1 - w.alpha) * w.gamma * kd(logits, teacher, w.rho)
    return loss


def sub_term(logits: torch.Tensor, labels: torch.Tensor, super_logits: torch.Tensor, w: LossWeights,
             teacher: torch.Tensor | None = None) -> torch.Tensor:
    """α·CE(Φ_S^i) + (1−α)·((1−γ)·KL(Φ_S^i‖Φ_S; ρ) + γ·KL(Φ_S^i‖Φ_T; ρ)), super-network logits detached."""
    loss = w.alpha * ce(logits, labels)
    if w.gamma != 1:
        loss = loss + (1 - w.alpha) * (1 - w.gamma) * kd(logits, super_logits.detach(), w.rho)
    if w.gamma:
        if teacher is None:
            raise ValueError("gamma > 0 needs teacher logits")
        loss = loss + (1 - w.alpha) * w.gamma * kd(logits, teacher, w.rho)
    return loss


def hidden_distill(sub_hidden: tuple[torch.Tensor, ...], super_hidden: tuple[torch.Tensor, ...],
                   kept: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """DynaBERT's hidden-state distillation: mean squared error between the sub-network's embeddings and
    each kept layer's output and the super-network's at the same place (targets detached).

    `sub_hidden` = (embeddings, output of kept layer 0, 1, ...), `super_hidden` = (embeddings, output of layer
    0, 1, ..., N-1) as transformers returns them with `output_hidden_states=True`; `kept` are the super-network
    layers the sub-network keeps (`adapter.kept_layers`), so its k-th output is compared with the
    super-network's layer `kept[k]`. Padding positions are left out when `mask` is given. Averaged over the
    L+1 pairs so the weight does not grow with depth.
    """
    pairs = [(sub_hidden[0], super_hidden[0])]
    pairs += [(sub_hidden[k + 1], super_hidden[li + 1]) for k, li in enumerate(kept)]
    total = sub_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        d = (s.float() - t.detach().float()).pow(2).mean(-1)
        total = total + ((d * mask).sum() / mask.sum().clamp(min=1) if mask is not None else d.mean())
    return total / len(pairs)


def instatune_loss(super_logits: torch.Tensor, sub_logits: list[torch.Tensor], labels: torch.Tensor,
                   w: LossWeights, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """L_total of Eq. 1 in one expression (the loop computes the same sum piece by piece)."""
    total = super_term(super_logits, labels, w, teacher)
    for s in sub_logits:
        total = total + sub_term(s, labels, super_logits, w, teacher)
    return total


def plain_loss(logits: torch.Tensor, labels: torch.Tensor, w: LossWeights,
               teacher: torch.Tensor | None = None) -> torch.Tensor:
    """`--plain`: ordinary fine-tuning, CE (MSE for a regressor); with a teacher (γ=1) classic distillation
    α·CE + (1−α)·KL(Φ_S‖Φ_T; ρ).

    Unlike Eq. 1 with no sub-network, plain CE is not scaled by α, so `--lr` means what it means elsewhere.
    """
    if w.gamma and teacher is not None:
        return w.alpha * ce(logits, labels) + (1 - w.alpha) * w.gamma * kd(logits, teacher, w.rho)
    return ce(logits, labels)
