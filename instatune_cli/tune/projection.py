"""Gradient projection between the super-network and its sub-networks (`tune --grad-projection`).

The shared weights get one gradient per step: the super-network's term plus the sampled sub-networks' terms
(tune/loss.py). Where the two point against each other (a negative dot product), the sum undoes part of each
side's progress; NASViT (Gong et al., ICLR 2022) traced the slow convergence and early saturation of
weight-sharing super-networks to this conflict and projected one side's gradient onto the normal plane of the
other's. `super` protects the super-network (the sub-networks' gradient loses its component against the
super-network's, so to first order the super-network learns as if alone: what a user who ships the full model
needs); `subnets` protects the sub-networks, as NASViT does. Either way nothing changes where they agree.

The two gradients are kept apart without copies: two accumulators are swapped in and out of each parameter's
`.grad` around the super-network's backward pass (`to_super` / `to_subs`); after the step's micro-batches (and
the processes' average, loop.py's `Trainer.sync`) `combine` projects and writes their sum into `.grad`.
docs/architecture.md, "Tuning".
"""

from __future__ import annotations

from typing import Any

PROJECTION = ("none", "super", "subnets")  # --grad-projection


class GradientProjection:
    """The step's super-network and sub-network gradients, apart, then combined (module docstring)."""

    def __init__(self, params: list[Any], protect: str) -> None:
        if protect not in PROJECTION[1:]:
            raise ValueError(f"protect must be one of {PROJECTION[1:]}, got {protect!r}")
        self.params, self.protect = params, protect
        self.sup: list[Any] = [None] * len(params)
        self.sub: list[Any] = [None] * len(params)

    def to_super(self) -> None:
        """Before the super-network's backward pass: `.grad` becomes its accumulator."""
        for i, p in enumerate(self.params):
            self.sub[i], p.grad = p.grad, self.sup[i]

    def to_subs(self) -> None:
        """After it, before the sub-networks' passes: `.grad` becomes theirs."""
        for i, p in enumerate(self.params):
            self.sup[i], p.grad = p.grad, self.sub[i]

    def super_grads(self) -> list[Any]:
        """The super-network's accumulators, zeros where it produced none (so processes can average them)."""
        import torch

        self.sup = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, self.sup, strict=True)]
        return self.sup

    def combine(self) -> float:
        """Project the unprotected side where the two conflict, write the sum into `.grad` (which holds the
        sub-networks' gradient), and return the cosine of the two gradients before projection."""
        import torch

        pairs = [(s, p.grad) for s, p in zip(self.sup, self.params, strict=True)]
        zero = torch.zeros((), dtype=torch.float64)
        dot = sum(((s.double() * b.double()).sum() for s, b in pairs if s is not None and b is not None), zero)
        ns = sum(((s.double() ** 2).sum() for s, _ in pairs if s is not None), zero)
        nb = sum(((b.double() ** 2).sum() for _, b in pairs if b is not None), zero)
        cos = float(dot / (ns.sqrt() * nb.sqrt())) if ns > 0 and nb > 0 else 0.0
        k_sub = k_sup = 0.0  # multiples of the protected side's gradient taken out of the other
        if dot < 0 and self.protect == "super" and ns > 0:
            k_sub = float(dot / ns)
        elif dot < 0 and self.protect == "subnets" and nb > 0:
            k_sup = float(dot / nb)
        for (s, b), p in zip(pairs, self.params, strict=True):
            if s is None:
                continue
            if b is None:
                p.grad = s
                continue
            if k_sub:
                b.sub_(s, alpha=k_sub)
            if k_sup:
                s.sub_(b, alpha=k_sup)
            b.add_(s)
        self.sup = [None] * len(self.params)
        self.sub = [None] * len(self.params)
        return cos
