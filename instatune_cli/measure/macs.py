"""Exact multiply-accumulates and parameter counts of a sub-network, in closed form.

MACs and params are exact functions of the config, so the search computes them instead of predicting
them (DyNAS-T fits predictors to them). Counted at batch 1 and the space's sequence length.
"""

from __future__ import annotations

from instatune_cli.space import ModelDims, SubNet


def layer_macs(hidden: int, heads: int, head_dim: int, ffn: int, seq: int) -> int:
    """One encoder layer: QKV 3·N·D·(h·dh), scores + weighted sum 2·N²·(h·dh), output N·(h·dh)·D, FFN 2·N·D·f."""
    a = heads * head_dim
    return 3 * seq * hidden * a + 2 * seq * seq * a + seq * a * hidden + 2 * seq * hidden * ffn


def encoder_macs(dims: ModelDims, sub: SubNet, seq: int = 128) -> int:
    return sum(layer_macs(dims.hidden, h, dims.head_dim, f, seq) for h, f in zip(sub.heads, sub.ffn, strict=True))


def head_macs(dims: ModelDims) -> int:
    """Pooler (or DistilBERT's pre-classifier) D·D plus classifier D·C, on the first token only."""
    return dims.hidden * dims.hidden + dims.hidden * dims.num_labels


def total_macs(dims: ModelDims, sub: SubNet, seq: int = 128) -> int:
    return embedding_macs(dims, seq) + encoder_macs(dims, sub, seq) + head_macs(dims)


def layer_params(hidden: int, heads: int, head_dim: int, ffn: int) -> int:
    a = heads * head_dim
    attn = 3 * (hidden * a + a) + a * hidden + hidden
    ff = hidden * ffn + ffn + ffn * hidden + hidden
    return attn + ff + 2 * 2 * hidden  # two LayerNorms


def embedding_params(dims: ModelDims) -> int:
    """Token/position/type tables and their LayerNorm, at the embedding width; plus ELECTRA's projection up
    to the hidden width when the two differ."""
    e = dims.embedding_size or dims.hidden
    project = e * dims.hidden + dims.hidden if e != dims.hidden else 0
    return (dims.vocab_size + dims.max_positions + dims.type_vocab_size) * e + 2 * e + project


def embedding_macs(dims: ModelDims, seq: int = 128) -> int:
    """The embedding projection's multiply-accumulates (table look-ups are free); 0 without one."""
    e = dims.embedding_size or dims.hidden
    return seq * e * dims.hidden if e != dims.hidden else 0


def params(dims: ModelDims, sub: SubNet) -> int:
    """Parameters of the extracted sub-network: embeddings + kept layers + pooler + classifier."""
    enc = sum(layer_params(dims.hidden, h, dims.head_dim, f) for h, f in zip(sub.heads, sub.ffn, strict=True))
    head = dims.hidden * dims.hidden + dims.hidden + dims.hidden * dims.num_labels + dims.num_labels
    return embedding_params(dims) + enc + head
