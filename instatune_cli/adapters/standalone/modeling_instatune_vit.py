"""Per-layer timm ViT / DeiT / BEiT / BEiT-3 sub-networks extracted by instatune: each block keeps its own number of
attention heads and its own MLP width (timm's constructors take one `num_heads` and one `mlp_ratio`).

This file is copied beside the weights and imports only torch, timm, safetensors and json, so the model loads
without instatune:

    import sys; sys.path.insert(0, DIR)
    import modeling_instatune_vit
    model = modeling_instatune_vit.load(DIR)

`config.json` is timm's `save_for_hf` layout (`architecture`, `num_classes`, `model_args` with the kept depth,
`pretrained_cfg`) plus an `instatune` object with `layer_heads`, `layer_ffn` and `head_dim`. The model is the
timm architecture built from `model_args`, whose blocks then get timm's own `Attention(dim, num_heads=h_i,
attn_head_dim=head_dim)` and `Mlp(dim, hidden_features=f_i)` (BEiT: `BeitAttention` below; BEiT-3 and any
`scale_attn_norm` / `scale_mlp_norm` model: `Attention(..., scale_norm=True, norm_layer=...)` and
`Mlp(..., norm_layer=...)` with the built norm's class and eps, at the block's own width); everything else
(patch embedding, tokens, norms, layer scale, heads) is timm's module as built.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm import create_model
from timm.layers import Attention, Mlp
from timm.models import PretrainedCfg
from timm.models import beit as _beit
from torch import nn

FORMAT = "instatune-timm-vit-per-layer/1"
WEIGHTS = "model.safetensors"


class BeitAttention(_beit.Attention):
    """timm's BEiT attention for `num_heads * head_dim != dim`: timm reshapes the heads' output to the *input*
    width (`reshape(B, N, C)`), which holds only when every head is kept. Same parameters, same maths."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


def _norm_layer(old: nn.Module):  # -> a constructor (features, **kw) -> nn.Module, or None
    """A constructor for `old`'s sub-layer norm at another width (its class and eps), or None when there is none
    (`nn.Identity`)."""
    if old is None or isinstance(old, nn.Identity):
        return None
    cls, eps = type(old), old.eps

    def make(features: int, **kw) -> nn.Module:
        return cls(features, eps=eps, **kw)

    return make


def _resize_attention(old: nn.Module, dim: int, heads: int, head_dim: int) -> nn.Module:
    """A fresh attention with `heads` heads of `head_dim`, carrying over the non-sliced parts of `old`."""
    if isinstance(old, _beit.Attention):
        new = BeitAttention(dim, num_heads=heads, qkv_bias=old.q_bias is not None,
                            qkv_bias_separate=old.qkv_bias_separate, attn_drop=old.attn_drop.p,
                            proj_drop=old.proj_drop.p, window_size=old.window_size, attn_head_dim=head_dim,
                            device=old.qkv.weight.device, dtype=old.qkv.weight.dtype)
    else:
        norm = _norm_layer(old.norm)  # scale_attn_norm (BEiT-3): a norm over the heads' output, at their width
        new = Attention(dim, num_heads=heads, attn_head_dim=head_dim, qkv_bias=old.qkv.bias is not None,
                        scale_norm=norm is not None, norm_layer=norm, proj_bias=old.proj.bias is not None,
                        attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p, device=old.qkv.weight.device,
                        dtype=old.qkv.weight.dtype)
        new.q_norm, new.k_norm = old.q_norm, old.k_norm  # per head_dim: shared by every head, not sliced
    new.fused_attn = old.fused_attn
    return new


def _resize_mlp(old: nn.Module, dim: int, hidden: int) -> nn.Module:
    new = Mlp(dim, hidden_features=hidden, norm_layer=_norm_layer(old.norm),  # scale_mlp_norm (BEiT-3)
              bias=(old.fc1.bias is not None, old.fc2.bias is not None), drop=(old.drop1.p, old.drop2.p),
              device=old.fc1.weight.device, dtype=old.fc1.weight.dtype)
    new.act = old.act  # the same activation module (GELU, QuickGELU, ...): parameter-free
    return new


def build(config: dict) -> nn.Module:
    """The per-layer model of a `config.json` (a dict), with freshly initialised weights."""
    ext = config["instatune"]
    heads, widths, head_dim = ext["layer_heads"], ext["layer_ffn"], int(ext["head_dim"])
    args = dict(config.get("model_args") or {})
    args["num_classes"] = int(config.get("num_classes", args.get("num_classes", 1000)))
    args["depth"] = len(heads)
    # the saved preprocessing (input size, mean/std, crop) rather than the architecture's default tag's
    known = PretrainedCfg.__dataclass_fields__
    pcfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in known}
    pcfg["architecture"] = config["architecture"]
    model = create_model(config["architecture"], pretrained=False, pretrained_cfg=pcfg, **args)
    dim = int(model.embed_dim)
    if len(model.blocks) != len(heads) or len(widths) != len(heads):
        raise ValueError(f"config has {len(heads)} head counts and {len(widths)} MLP widths for "
                         f"{len(model.blocks)} blocks")
    for block, h, f in zip(model.blocks, heads, widths, strict=True):
        block.attn = _resize_attention(block.attn, dim, int(h), head_dim)
        block.mlp = _resize_mlp(block.mlp, dim, int(f))
    return model


def load(directory: str) -> nn.Module:
    """Build the model of `directory/config.json` and load `directory/model.safetensors` (strict), eval mode."""
    directory = str(directory).rstrip("/\\") or "/"
    with open(f"{directory}/config.json", encoding="utf-8") as f:
        config = json.load(f)
    model = build(config)
    model.load_state_dict(load_file(f"{directory}/{WEIGHTS}"), strict=True)
    return model.eval()
