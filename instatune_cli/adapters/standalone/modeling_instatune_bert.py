"""Per-layer-shaped BERT-family classifiers: each layer keeps its own number of attention heads and FFN width.

This file is written by instatune beside the weights of an extracted sub-network and is loaded by
`AutoConfig/AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`. It is
standalone on purpose: it imports only torch and transformers, so the model loads where instatune is not
installed.

Why a class of our own: transformers 5 has no head pruning, and stock BERT derives the head size as
hidden / num_attention_heads, so a layer with fewer heads of the original size, or layers of different
widths, cannot be described by a stock config. Here `num_attention_heads` stays the original count (so the
head size stays hidden / num_attention_heads) and `layer_heads[i]` / `layer_ffn[i]` give the kept heads and
FFN neurons of layer i. The stock attention reshapes projections with `view(..., -1, head_size)`, so
narrower Q/K/V projections simply mean fewer heads; only the six linears of each layer change shape, and the
state_dict keys stay the stock ones.

Families: BERT, RoBERTa (also XLM-R / CamemBERT checkpoints, same architecture), ELECTRA, DistilBERT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)


def _check_layer_shapes(layer_heads: Sequence[int] | None, layer_ffn: Sequence[int] | None, n_layers: int,
                        n_heads: int, ffn: int) -> tuple[list[int], list[int]]:
    heads = [int(h) for h in (layer_heads if layer_heads is not None else [n_heads] * n_layers)]
    widths = [int(f) for f in (layer_ffn if layer_ffn is not None else [ffn] * n_layers)]
    if len(heads) != n_layers or len(widths) != n_layers:
        raise ValueError(
            f"layer_heads ({len(heads)}) and layer_ffn ({len(widths)}) must give one value per layer "
            f"({n_layers})"
        )
    if any(h < 1 or h > n_heads for h in heads):
        raise ValueError(f"layer_heads {heads} must lie in 1..num_attention_heads ({n_heads})")
    if any(f < 1 for f in widths):
        raise ValueError(f"layer_ffn {widths} must be positive")
    return heads, widths


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def _shrink(layers: Sequence[nn.Module], parts: Callable[[nn.Module], tuple[nn.Module, ...]],
            heads: Sequence[int], ffn: Sequence[int], head_dim: int, hidden: int) -> None:
    """Replace each layer's six linears by ones of the kept widths (same attribute names, same keys)."""
    for layer, h, f in zip(layers, heads, ffn, strict=True):
        attn, owner_q, owner_o, owner_i, owner_f, names = parts(layer)
        width = h * head_dim
        for name in names[:3]:
            setattr(owner_q, name, _linear(getattr(owner_q, name), hidden, width))
        setattr(owner_o, names[3], _linear(getattr(owner_o, names[3]), width, hidden))
        setattr(owner_i, names[4], _linear(getattr(owner_i, names[4]), hidden, f))
        setattr(owner_f, names[5], _linear(getattr(owner_f, names[5]), f, hidden))
        # Bookkeeping only: the stock forward reshapes with -1 heads and never reads these two.
        attn.num_attention_heads = h
        attn.all_head_size = width


def _bert_like_parts(layer: nn.Module) -> tuple[nn.Module, ...]:
    sa = layer.attention.self
    return (sa, sa, layer.attention.output, layer.intermediate, layer.output,
            ("query", "key", "value", "dense", "dense", "dense"))


def _distilbert_parts(layer: nn.Module) -> tuple[nn.Module, ...]:
    a = layer.attention
    return (a, a, a, layer.ffn, layer.ffn, ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"))


class _ReadsOwnType:
    """config.json names the family's stock `model_type` (so a stock `AutoTokenizer.from_pretrained(dir)` needs
    no remote code) and ours under `instatune_model_type`. Reading such a file back as ours is what it is for,
    so it is read as ours: transformers' "You are using a model of type `bert` to instantiate a model of type
    `instatune_bert`" warning would only alarm a user loading the directory as documented."""

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("instatune_model_type") == cls.model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


# ---- BERT -------------------------------------------------------------------------------------------

class InstatuneBertConfig(_ReadsOwnType, BertConfig):
    """BertConfig plus per-layer `layer_heads` and `layer_ffn` (head size: hidden/num_attention_heads)."""

    model_type = "instatune_bert"

    layer_heads: list[int] | None = None
    layer_ffn: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.layer_heads, self.layer_ffn = _check_layer_shapes(
            self.layer_heads, self.layer_ffn, self.num_hidden_layers, self.num_attention_heads,
            self.intermediate_size)
        super().__post_init__(**kwargs)


class InstatuneBertForSequenceClassification(BertForSequenceClassification):
    config_class = InstatuneBertConfig

    def __init__(self, config: InstatuneBertConfig):
        super().__init__(config)
        _shrink(self.bert.encoder.layer, _bert_like_parts, config.layer_heads, config.layer_ffn,
                config.hidden_size // config.num_attention_heads, config.hidden_size)
        self.post_init()


# ---- RoBERTa (XLM-R, CamemBERT) ----------------------------------------------------------------------

class InstatuneRobertaConfig(_ReadsOwnType, RobertaConfig):
    """RobertaConfig plus per-layer `layer_heads` and `layer_ffn`."""

    model_type = "instatune_roberta"

    layer_heads: list[int] | None = None
    layer_ffn: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.layer_heads, self.layer_ffn = _check_layer_shapes(
            self.layer_heads, self.layer_ffn, self.num_hidden_layers, self.num_attention_heads,
            self.intermediate_size)
        super().__post_init__(**kwargs)


class InstatuneRobertaForSequenceClassification(RobertaForSequenceClassification):
    config_class = InstatuneRobertaConfig

    def __init__(self, config: InstatuneRobertaConfig):
        super().__init__(config)
        _shrink(self.roberta.encoder.layer, _bert_like_parts, config.layer_heads, config.layer_ffn,
                config.hidden_size // config.num_attention_heads, config.hidden_size)
        self.post_init()


# ---- ELECTRA -----------------------------------------------------------------------------------------

class InstatuneElectraConfig(_ReadsOwnType, ElectraConfig):
    """ElectraConfig plus per-layer `layer_heads` and `layer_ffn`."""

    model_type = "instatune_electra"

    layer_heads: list[int] | None = None
    layer_ffn: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.layer_heads, self.layer_ffn = _check_layer_shapes(
            self.layer_heads, self.layer_ffn, self.num_hidden_layers, self.num_attention_heads,
            self.intermediate_size)
        super().__post_init__(**kwargs)


class InstatuneElectraForSequenceClassification(ElectraForSequenceClassification):
    config_class = InstatuneElectraConfig

    def __init__(self, config: InstatuneElectraConfig):
        super().__init__(config)
        _shrink(self.electra.encoder.layer, _bert_like_parts, config.layer_heads, config.layer_ffn,
                config.hidden_size // config.num_attention_heads, config.hidden_size)
        self.post_init()


# ---- DistilBERT --------------------------------------------------------------------------------------

class InstatuneDistilBertConfig(_ReadsOwnType, DistilBertConfig):
    """DistilBertConfig plus per-layer `layer_heads` and `layer_ffn`."""

    model_type = "instatune_distilbert"

    layer_heads: list[int] | None = None
    layer_ffn: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.layer_heads, self.layer_ffn = _check_layer_shapes(
            self.layer_heads, self.layer_ffn, self.n_layers, self.n_heads, self.hidden_dim)
        super().__post_init__(**kwargs)


class InstatuneDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    config_class = InstatuneDistilBertConfig

    def __init__(self, config: InstatuneDistilBertConfig):
        super().__init__(config)
        _shrink(self.distilbert.transformer.layer, _distilbert_parts, config.layer_heads, config.layer_ffn,
                config.dim // config.n_heads, config.dim)
        self.post_init()


#: model_type -> (config class, sequence-classification class); instatune registers these locally.
CLASSES: dict[str, tuple[type, type]] = {
    "instatune_bert": (InstatuneBertConfig, InstatuneBertForSequenceClassification),
    "instatune_roberta": (InstatuneRobertaConfig, InstatuneRobertaForSequenceClassification),
    "instatune_electra": (InstatuneElectraConfig, InstatuneElectraForSequenceClassification),
    "instatune_distilbert": (InstatuneDistilBertConfig, InstatuneDistilBertForSequenceClassification),
}

__all__ = ["CLASSES"] + [c.__name__ for pair in CLASSES.values() for c in pair]
