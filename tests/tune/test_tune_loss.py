"""The InstaTune loss (Eq. 1) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from instatune_cli.tune import loss as L


def _softmax(x: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _ce(logits: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(_softmax(r)[y]) for r, y in zip(logits, labels, strict=True)) / len(labels)


def _kl(student: list[list[float]], teacher: list[list[float]], rho: float) -> float:
    tot = 0.0
    for s, t in zip(student, teacher, strict=True):
        ps, pt = _softmax(s, rho), _softmax(t, rho)
        tot += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return rho * rho * tot / len(student)


S = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]]
SUB1 = [[1.0, 0.0, 0.0], [-0.5, 1.5, 0.2]]
SUB2 = [[0.3, 0.3, 1.2], [2.0, 2.0, -2.0]]
T = [[3.0, -2.0, 0.0], [0.0, 1.0, 0.5]]
Y = [0, 2]


def _t(x: list[list[float]]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_kd_is_scaled_forward_kl() -> None:
    for rho in (1.0, 2.0, 4.0):
        got = L.kd(_t(SUB1), _t(T), rho).item()
        assert got == pytest.approx(_kl(SUB1, T, rho), rel=1e-6)
    assert L.kd(_t(S), _t(S), 2.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_eq1_hand_value(gamma: float) -> None:
    alpha, rho = 0.3, 2.0
    w = L.LossWeights(alpha=alpha, rho=rho, gamma=gamma)
    teacher = _t(T) if gamma else None
    got = L.instatune_loss(_t(S), [_t(SUB1), _t(SUB2)], torch.tensor(Y), w, teacher).item()
    want = alpha * (_ce(S, Y) + _ce(SUB1, Y) + _ce(SUB2, Y))
    kd_part = gamma * _kl(S, T, rho)
    for sub in (SUB1, SUB2):
        kd_part += (1 - gamma) * _kl(sub, S, rho) + gamma * _kl(sub, T, rho)
    want += (1 - alpha) * kd_part
    assert got == pytest.approx(want, rel=1e-6)


def test_eq1_fixed_number() -> None:
    """One literal value, so a change of convention (direction, ρ², batchmean) cannot slip through."""
    w = L.LossWeights(alpha=0.3, rho=1.0, gamma=0.0)
    got = L.instatune_loss(_t(S), [_t(SUB1)], torch.tensor(Y), w).item()
    assert got == pytest.approx(0.3 * (_ce(S, Y) + _ce(SUB1, Y)) + 0.7 * _kl(SUB1, S, 1.0), rel=1e-6)
    assert got == pytest.approx(0.6798713, abs=1e-6)


def test_pieces_sum_to_total_and_detach_super() -> None:
    w = L.LossWeights(alpha=0.3, rho=1.5, gamma=0.0)
    s = _t(S).requires_grad_()
    sub = _t(SUB1).requires_grad_()
    y = torch.tensor(Y)
    total = L.instatune_loss(s, [sub], y, w)
    pieces = L.super_term(s, y, w) + L.sub_term(sub, y, s, w)
    assert total.item() == pytest.approx(pieces.item(), rel=1e-12)
    # the sub-network term must not push gradient into the super-network's logits
    L.sub_term(sub, y, s, w).backward()
    assert s.grad is None and sub.grad is not None


def test_teacher_term_needs_teacher() -> None:
    w = L.LossWeights(gamma=1.0)
    with pytest.raises(ValueError):
        L.super_term(_t(S), torch.tensor(Y), w, None)


def test_plain_loss() -> None:
    y = torch.tensor(Y)
    assert L.plain_loss(_t(S), y, L.LossWeights()).item() == pytest.approx(_ce(S, Y), rel=1e-6)
    w = L.LossWeights(alpha=0.3, rho=2.0, gamma=1.0)
    want = 0.3 * _ce(S, Y) + 0.7 * _kl(S, T, 2.0)
    assert L.plain_loss(_t(S), y, w, _t(T)).item() == pytest.approx(want, rel=1e-6)


def test_hidden_distill_pairs_each_kept_layer_with_its_super_layer() -> None:
    torch.manual_seed(0)
    sup = tuple(torch.randn(2, 3, 4) for _ in range(7))  # embeddings + 6 layers
    kept = [1, 3, 5]
    sub = tuple(sup[i].clone().requires_grad_() for i in [0] + [k + 1 for k in kept])
    assert L.hidden_distill(sub, sup, kept).item() == 0.0
    # paired with the wrong layers (the first three) it is not zero
    assert L.hidden_distill(sub, sup, [0, 1, 2]).item() > 0.1
    # by hand: one pair off by 1 everywhere, averaged over the L+1 = 4 pairs
    off = (sub[0], sub[1] + 1.0, sub[2], sub[3])
    assert L.hidden_distill(off, sup, kept).item() == pytest.approx(1.0 / 4)
    # padding positions are left out
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pad_off = tuple(s.clone() for s in sub)
    pad_off[2].data[0, 2] += 5.0  # a padded position of layer 3's output
    assert L.hidden_distill(pad_off, sup, kept, mask).item() == pytest.approx(0.0, abs=1e-7)
    # the super-network's hidden states are targets: no gradient reaches them
    sup_g = tuple(h.clone().requires_grad_() for h in sup)
    L.hidden_distill(off, sup_g, kept).backward()
    assert all(h.grad is None for h in sup_g) and sub[1].grad is not None
