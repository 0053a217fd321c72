"""Ragged test batches and an independent plain-torch BERT reference over sliced weights.

Tiny models come from `helpers.tiny_model`; the real checkpoint from conftest's `minilm_dir`.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def batch(seed: int = 1, b: int = 3, n: int = 12, vocab: int = 100):
    """Token ids with ragged padding, so masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i in range(1, b):
        mask[i, n - 3 * i:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference_bert_logits(model, heads, ffn, input_ids, attention_mask):
    """Plain-torch BERT forward over explicitly sliced weights: first len(heads) layers, first heads[i]
    heads and first ffn[i] neurons. Shares no code with instatune's elastic wrappers."""
    bert = model.bert
    cfg = model.config
    dh = cfg.hidden_size // cfg.num_attention_heads
    eps = cfg.layer_norm_eps
    x = bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    add_mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    b, n, _ = x.shape
    for i, (h, f) in enumerate(zip(heads, ffn, strict=True)):
        lay = bert.encoder.layer[i]
        sa, so = lay.attention.self, lay.attention.output
        w = h * dh

        def proj(lin, x=x, w=w):
            return (x @ lin.weight[:w].T + lin.bias[:w]).view(b, n, -1, dh).transpose(1, 2)

        q, k, v = proj(sa.query), proj(sa.key), proj(sa.value)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + add_mask, dim=-1)
        ctx = (p @ v).transpose(1, 2).reshape(b, n, w)
        a = ctx @ so.dense.weight[:, :w].T + so.dense.bias
        x1 = F.layer_norm(a + x, (cfg.hidden_size,), so.LayerNorm.weight, so.LayerNorm.bias, eps)
        it, out = lay.intermediate.dense, lay.output
        hmid = F.gelu(x1 @ it.weight[:f].T + it.bias[:f])
        o = hmid @ out.dense.weight[:, :f].T + out.dense.bias
        x = F.layer_norm(o + x1, (cfg.hidden_size,), out.LayerNorm.weight, out.LayerNorm.bias, eps)
    pooled = torch.tanh(bert.pooler.dense(x[:, 0]))
    return model.classifier(pooled)

