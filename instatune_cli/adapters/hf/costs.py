"""Closed-form MACs and parameters of the transformers text encoders (BERT, RoBERTa, ELECTRA, DistilBERT):
the layers' (`adapters/costs.py`) plus their embeddings (and ELECTRA's projection) and pooler. Torch-free."""

from __future__ import annotations

from instatune_cli.adapters.costs import encoder_macs, layer_params
from instatune_cli.space import ModelDims, SubNet


def head_macs(dims: ModelDims) -> int:
    """Pooler (or DistilBERT's pre-classifier) D·D plus classifier D·C, on the first token only."""
    return dims.hidden * dims.hidden + dims.hidden * dims.num_labels


def total_macs(dims: ModelDims, sub: SubNet, seq: int = 128) -> int:
    return embedding_macs(dims, seq) + encoder_macs(dims, sub, seq) + head_macs(dims)


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
