"""Family-independent elastic building blocks: a Linear that runs on a prefix of its weight, and a layer
list that runs only a chosen subset of its layers (the first L, or L spread through the stack; see
`space.kept_layers` and docs/architecture.md).

Both share the original Parameters, so switching sub-networks is setting two integers (no weight copy)
and `state_dict()` keys are unchanged: the super-network still saves and loads as a stock checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ElasticLinear(nn.Linear):
    """nn.Linear computing with `weight[:active_out, :active_in]` (views, no copies)."""

    active_out: int
    active_in: int

    @classmethod
    def wrap(cls, lin: nn.Linear) -> ElasticLinear:
        """Re-class `lin` in place: same object, same Parameters, same hooks."""
        if isinstance(lin, ElasticLinear):
            return lin
        lin.__class__ = cls
        lin.active_out = lin.out_features
        lin.active_in = lin.in_features
        return lin  # type: ignore[return-value]

    def reset(self) -> None:
        self.active_out, self.active_in = self.out_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_out == self.out_features and self.active_in == self.in_features:
            return F.linear(x, self.weight, self.bias)
        w = self.weight[: self.active_out, : self.active_in]
        b = self.bias[: self.active_out] if self.bias is not None else None
        return F.linear(x, w, b)


class ElasticLayerList(nn.ModuleList):
    """ModuleList whose iteration yields only the layers listed in `active` (indices, in order).

    Encoder forwards in transformers loop `for layer in self.layer`, so this drops layers without touching
    the family's code; indexing and `state_dict` still see every layer. `depth` is the space's depth rule
    (`first` or `spread`), kept here so that activating a sub-network needs nothing but the model.
    """

    active: tuple[int, ...]
    depth: str

    @classmethod
    def wrap(cls, layers: nn.ModuleList, depth: str = "first") -> ElasticLayerList:
        if not isinstance(layers, ElasticLayerList):
            layers.__class__ = cls
            layers.active = tuple(range(len(layers._modules)))
        layers.depth = depth
        return layers  # type: ignore[return-value]

    def __iter__(self):  # type: ignore[override]
        mods = list(self._modules.values())
        return iter([mods[i] for i in self.active])

    def all_layers(self) -> list[nn.Module]:
        return list(self._modules.values())
