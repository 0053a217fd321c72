"""Family-independent elastic building blocks: a Linear that runs on a prefix of its weight (or, for a fused
projection such as q|k|v, on a prefix of each of its row blocks), a LayerNorm over a prefix of its features,
and a layer list (ModuleList or Sequential) that runs only a chosen subset of its layers (the first L, or L
spread through the stack; see `space.kept_layers` and docs/architecture.md).

All share the original Parameters, so switching sub-networks is setting integers (no weight copy) and
`state_dict()` keys are unchanged: the super-network still saves and loads as a stock checkpoint.
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
            # a Sequential is run by its own forward (timm's `self.blocks(x)`): keep one
            layers.__class__ = ElasticSequential if isinstance(layers, nn.Sequential) else cls
            layers.active = tuple(range(len(layers._modules)))
        layers.depth = depth
        return layers  # type: ignore[return-value]

    def __iter__(self):  # type: ignore[override]
        mods = list(self._modules.values())
        return iter([mods[i] for i in self.active])

    def all_layers(self) -> list[nn.Module]:
        return list(self._modules.values())


class ElasticGroupedLinear(ElasticLinear):
    """A fused projection whose output rows are `groups` equal blocks (timm's q|k|v): `active_out` rows in all,
    the first `active_out // groups` rows of every block (weight[0:w], weight[D:D+w], weight[2D:2D+w]).

    Only the forward gathers the active rows (one small copy per call, which autograd sees as a gather of
    the shared Parameter); switching sub-networks is still setting integers.
    """

    groups: int

    @classmethod
    def wrap(cls, lin: nn.Linear, groups: int = 3) -> ElasticGroupedLinear:  # type: ignore[override]
        if isinstance(lin, ElasticLinear) and not isinstance(lin, ElasticGroupedLinear):
            raise TypeError("linear is already elastic with ungrouped rows")
        if lin.out_features % groups:
            raise ValueError(f"{lin.out_features} output rows do not split into {groups} equal blocks")
        out = super().wrap(lin)
        out.groups = groups
        return out  # type: ignore[return-value]

    def _full(self) -> bool:
        return self.active_out == self.out_features and self.active_in == self.in_features

    def active_weight(self) -> torch.Tensor:
        """The weight rows and columns in use (the Parameter itself when everything is active)."""
        if self._full():
            return self.weight
        g = self.groups
        w = self.weight.view(g, self.out_features // g, self.in_features)
        return w[:, : self.active_out // g, : self.active_in].reshape(-1, self.active_in)

    def active_bias(self) -> torch.Tensor | None:
        if self.bias is None or self._full():
            return self.bias
        g = self.groups
        return self.bias.view(g, -1)[:, : self.active_out // g].reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.active_weight(), self.active_bias())


class ElasticLayerNorm(nn.LayerNorm):
    """A LayerNorm over the last dimension that normalises only the first `active` features, with
    `weight[:active]` and `bias[:active]` (views, no copies): the norm of a sliced width (timm's
    `scale_attn_norm` / `scale_mlp_norm`, BEiT-3's sub-layer norms), whose statistics then cover the kept
    units only, as in a smaller model built with that width.

    Re-classed in place like `ElasticLinear`; at full width it runs its original class's forward (timm's
    `LayerNorm` with its fast-norm option, ...), so the full configuration is the unmodified module. A partial
    width is `F.layer_norm` (plain LayerNorm arithmetic in the input's dtype).
    """

    active: int
    base_class: type

    @classmethod
    def wrap(cls, norm: nn.LayerNorm) -> ElasticLayerNorm:
        """Re-class `norm` (an `nn.LayerNorm` over one dimension) in place: same object, same Parameters."""
        if isinstance(norm, ElasticLayerNorm):
            return norm
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise TypeError(f"only a LayerNorm over the last dimension is elastic, not {norm!r}")
        base = type(norm)
        norm.__class__ = cls
        norm.base_class = base
        norm.active = norm.normalized_shape[0]
        return norm  # type: ignore[return-value]

    @property
    def features(self) -> int:
        return int(self.normalized_shape[0])

    def reset(self) -> None:
        self.active = self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.active
        if n == self.features:
            return self.base_class.forward(self, x)
        w = self.weight[:n] if self.weight is not None else None
        b = self.bias[:n] if self.bias is not None else None
        return F.layer_norm(x, (n,), w, b, self.eps)


class ElasticSequential(ElasticLayerList, nn.Sequential):
    """`ElasticLayerList` for an `nn.Sequential` stack (timm's VisionTransformer runs `self.blocks(x)`): its
    forward runs only the `active` layers. `ElasticLayerList.wrap` picks it for a Sequential.

    Note: timm's gradient checkpointing (`checkpoint_seq`) walks `children()`, i.e. every layer; instatune
    never enables it on an elastic model.
    """

    def __iter__(self):  # type: ignore[override]
        mods = list(self._modules.values())
        active = self.__dict__.get("active")  # a slice (`blocks[:n]`) is a new list without one: all of it
        return iter(mods if active is None else [mods[i] for i in active])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x)
        return x
