"""Closed-form multiply-accumulates and parameters of a standard transformer encoder layer (six linears, two
LayerNorms), which families sum over a sub-network's kept layers; not a family (`adapters/__init__.py` skips
it). What lies around the layers (embeddings, pooler, patch projection) each family counts itself."""

from __future__ import annotations

from instatune_cli.space import ModelDims, SubNet


def layer_macs(hidden: int, heads: int, head_dim: int, ffn: int, seq: int) -> int:
    """One encoder layer: QKV 3·N·D·(h·dh), scores + weighted sum 2·N²·(h·dh), output N·(h·dh)·D, FFN 2·N·D·f."""
    a = heads * head_dim
    return 3 * seq * hidden * a + 2 * seq * seq * a + seq * a * hidden + 2 * seq * hidden * ffn


def encoder_macs(dims: ModelDims, sub: SubNet, seq: int = 128) -> int:
    return sum(layer_macs(dims.hidden, h, dims.head_dim, f, seq) for h, f in zip(sub.heads, sub.ffn, strict=True))


def layer_params(hidden: int, heads: int, head_dim: int, ffn: int) -> int:
    a = heads * head_dim
    attn = 3 * (hidden * a + a) + a * hidden + hidden
    ff = hidden * ffn + ffn + ffn * hidden + hidden
    return attn + ff + 2 * 2 * hidden  # two LayerNorms
