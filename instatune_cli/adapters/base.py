"""The one interface every model family implements.

A family adapter knows where a model keeps its layers, attention projections and FFN, and nothing else
in instatune does: tuning, search, extraction and MAC counting go through these methods, so a new family
(e.g. timm ViT) is one new file implementing `FamilyAdapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from instatune_cli.space import ModelDims, SubNet

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LayerParts:
    """The six linears of one encoder layer that elasticity slices."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear

    def head_rows(self) -> list[nn.Linear]:
        """Linears whose *output* rows are grouped by head."""
        return [self.query, self.key, self.value]


class FamilyAdapter(ABC):
    """Load, make elastic, activate, reorder by importance, extract, count MACs for one model family."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def supports(self, model_type: str) -> bool:
        return model_type in self.model_types

    @abstractmethod
    def dims(self, config: Any) -> ModelDims:
        """Shape of the full model from its (transformers) config."""

    @abstractmethod
    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's ModuleList of layers."""

    @abstractmethod
    def parts(self, layer: nn.Module) -> LayerParts:
        """The sliceable linears of one layer."""

    # Generic behaviour, written once against layer_list/parts --------------------------------

    def layers(self, model: nn.Module) -> list[nn.Module]:
        ll = self.layer_list(model)
        return ll.all_layers() if hasattr(ll, "all_layers") else list(ll)

    def make_elastic(self, model: nn.Module, depth: str = "first") -> nn.Module:
        """Make `model` elastic in place (idempotent); adds no layer and no parameter.

        `depth` is the space's depth rule: which layers a depth-L sub-network keeps (`space.kept_layers`).
        """
        from instatune_cli.adapters.elastic import ElasticLayerList, ElasticLinear
        from instatune_cli.space import DEPTH_RULES

        if depth not in DEPTH_RULES:
            raise ValueError(f"unknown depth rule {depth!r}; use one of {DEPTH_RULES}")
        ElasticLayerList.wrap(self.layer_list(model), depth)
        for layer in self.layers(model):
            p = self.parts(layer)
            for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
                ElasticLinear.wrap(lin)
        model._instatune_adapter = self  # type: ignore[attr-defined]
        return model

    def kept_layers(self, model: nn.Module, sub: SubNet | None) -> list[int]:
        """Indices of the layers `sub` keeps under the model's depth rule (None: every layer)."""
        from instatune_cli.space import kept_layers

        n = len(self.layers(model))
        if sub is None:
            return list(range(n))
        if sub.layers > n:
            raise ValueError(f"{sub.name} keeps {sub.layers} layers, model has {n}")
        return kept_layers(sub.layers, n, getattr(self.layer_list(model), "depth", "first"))

    def activate(self, model: nn.Module, sub: SubNet | None) -> None:
        """Run `sub` (None = the full super-network): the layers its depth rule keeps (`kept_layers`), the
        first h heads and the first f FFN neurons of each; gene k of `sub` belongs to the k-th kept layer."""
        dims = self.dims(model.config)
        ll = self.layer_list(model)
        if not hasattr(ll, "active"):
            raise RuntimeError("model is not elastic; call make_elastic first")
        layers = self.layers(model)
        keep = self.kept_layers(model, sub)
        ll.active = tuple(keep)
        for layer in layers:
            p = self.parts(layer)
            for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
                lin.reset()
        if sub is None:
            return
        for i, li in enumerate(keep):
            p = self.parts(layers[li])
            width = sub.heads[i] * dims.head_dim
            for lin in p.head_rows():
                lin.active_out = width
            p.attn_out.active_in = width
            p.ffn_in.active_out = sub.ffn[i]
            p.ffn_out.active_in = sub.ffn[i]

    # Importance reordering -------------------------------------------------------------------

    def permute(self, model: nn.Module, head_orders: list[list[int]], neuron_orders: list[list[int]]) -> None:
        """Reorder heads and FFN neurons of every layer so prefixes keep the chosen units.

        A consistent permutation of Q/K/V output rows (by whole heads) with attention-output input columns,
        and of FFN-in rows with FFN-out columns, leaves the full model's function unchanged.
        """
        import torch

        dh = self.dims(model.config).head_dim
        with torch.no_grad():
            for layer, horder, norder in zip(self.layers(model), head_orders, neuron_orders, strict=True):
                p = self.parts(layer)
                rows = torch.tensor([h * dh + j for h in horder for j in range(dh)])
                for lin in p.head_rows():
                    lin.weight.copy_(lin.weight[rows])
                    if lin.bias is not None:
                        lin.bias.copy_(lin.bias[rows])
                p.attn_out.weight.copy_(p.attn_out.weight[:, rows])
                n = torch.tensor(norder)
                p.ffn_in.weight.copy_(p.ffn_in.weight[n])
                if p.ffn_in.bias is not None:
                    p.ffn_in.bias.copy_(p.ffn_in.bias[n])
                p.ffn_out.weight.copy_(p.ffn_out.weight[:, n])

    def importance(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None = None
                   ) -> tuple[list[list[float]], list[list[float]]]:
        """Per-layer head and FFN-neuron importance.

        With batches: first-order Taylor |w · dL/dw| summed over each unit's weights (the criterion
        DynaBERT's head/neuron masks approximate, without needing mask hooks in the family's code).
        Without: L2 norm of each unit's weights (data-free fallback).
        """
        import torch

        dh = self.dims(model.config).head_dim
        self.activate(model, None)
        if batches:
            was_training = model.training
            model.eval()
            model.zero_grad(set_to_none=True)
            for b in batches:
                out = model(**b)
                out.loss.backward()
            model.train(was_training)
        heads_out: list[list[float]] = []
        neurons_out: list[list[float]] = []
        for layer in self.layers(model):
            p = self.parts(layer)

            def score(w: torch.Tensor) -> torch.Tensor:
                if batches and w.grad is not None:
                    return (w * w.grad).abs()
                return w.pow(2)

            with torch.no_grad():
                hs = sum(score(lin.weight).sum(1) for lin in p.head_rows()) + score(p.attn_out.weight).sum(0)
                hs = hs.view(-1, dh).sum(1)
                ns = score(p.ffn_in.weight).sum(1) + score(p.ffn_out.weight).sum(0)
            heads_out.append(hs.tolist())
            neurons_out.append(ns.tolist())
        if batches:
            model.zero_grad(set_to_none=True)
        return heads_out, neurons_out

    def reorder_by_importance(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None = None
                              ) -> dict[str, Any]:
        """Sort heads and neurons by descending importance; returns the orders applied (for the manifest)."""
        hs, ns = self.importance(model, batches)
        horders = [sorted(range(len(s)), key=lambda i, s=s: -s[i]) for s in hs]
        norders = [sorted(range(len(s)), key=lambda i, s=s: -s[i]) for s in ns]
        self.permute(model, horders, norders)
        return {"method": "taylor" if batches else "magnitude", "head_orders": horders}
