"""Tiny timm ViT / DeiT / BEiT / BEiT-3 models and independent references for the vit family's tests.

The references share no code with instatune's elastic or extraction code: `timm_reference` builds a smaller
model from timm's own classes (per-block `timm.layers.Attention` / `Mlp`, with BEiT-3's sub-layer LayerNorms at
the block's own widths) and loads weights sliced here by explicit indexing; `masked_reference` is the unmodified
timm model with the dropped heads, neurons and blocks zeroed out of the residual stream (works for BEiT, whose
timm attention cannot run fewer heads than its width; not for BEiT-3, whose sub-layer norms normalise over the
kept units only, which no masking of the full-width norm reproduces).
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import torch

TINY = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 4, "embed_dim": 48, "num_heads": 4}
HEAD_DIM = 12
ARCHS = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "beit_base_patch16_224",
         "beitv2_base_patch16_224", "beit3_base_patch16_224")
#: BEiT-3's LayerNorm eps (timm's `beit3_*` entry points; timm's LayerNorm default is 1e-6)
BEIT3_EPS = 1e-5
LABELS = {i: f"class{i}" for i in range(TINY["num_classes"])}


def tiny_timm(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny randomly initialised timm model whose every parameter is non-trivial (timm initialises biases,
    BEiT's q/v biases and relative position tables to zero and its layer scale to 1e-5, which would hide
    slicing mistakes)."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, **{**TINY, **overrides})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "gamma_1", "gamma_2", "ls1.gamma",
                              "ls2.gamma")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return m.eval()


def pixels(seed: int = 1, b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, TINY["img_size"], TINY["img_size"], generator=torch.Generator().manual_seed(seed))


def sliced_block(sd: dict[str, torch.Tensor], src: int, dst: int, heads: int, ffn: int, full_width: int
                 ) -> dict[str, torch.Tensor]:
    """Block `src` of a timm state_dict as block `dst` of a smaller model, by explicit row/column indexing."""
    w = heads * HEAD_DIM
    out = {}
    rows = torch.cat([torch.arange(w) + g * full_width for g in range(3)])
    for k, v in sd.items():
        pre = f"blocks.{src}."
        if not k.startswith(pre):
            continue
        rest = k[len(pre):]
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            v = v[rows]
        elif rest in ("attn.q_bias", "attn.v_bias"):
            v = v[:w]
        elif rest == "attn.relative_position_bias_table":
            v = v[:, :heads]
        elif rest == "attn.proj.weight":
            v = v[:, :w]
        elif rest in ("attn.norm.weight", "attn.norm.bias"):  # BEiT-3: LayerNorm over the heads' output
            v = v[:w]
        elif rest in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.norm.weight", "mlp.norm.bias"):
            v = v[:ffn]
        elif rest == "mlp.fc2.weight":
            v = v[:, :ffn]
        out[f"blocks.{dst}.{rest}"] = v.clone()
    return out


def is_beit(arch: str) -> bool:
    """BEiT / BEiT-v2 (timm's `Beit`), not BEiT-3 (a `VisionTransformer`)."""
    return arch.startswith(("beit_", "beitv2_"))


def has_sublayer_norms(arch: str) -> bool:
    """BEiT-3: LayerNorms over the attention output (`attn.norm`) and the MLP features (`mlp.norm`)."""
    return arch.startswith("beit3_")


def timm_reference(arch: str, original: torch.nn.Module, keep: list[int], heads: list[int], ffn: list[int],
                   **overrides: Any) -> torch.nn.Module:
    """A smaller model made of timm's own classes holding `original`'s sliced weights. ViT / DeiT / BEiT-3: any
    heads (per-block `timm.layers.Attention(dim, num_heads=h, attn_head_dim=12)`, for BEiT-3 with
    `scale_norm=True` and a LayerNorm of eps 1e-5 over its h·12 features, and `Mlp` with one over its f);
    BEiT: all heads (timm's BEiT attention reshapes to the input width), any depth and one MLP width
    (`mlp_ratio`)."""
    import timm
    from timm.layers import Attention, LayerNorm, Mlp

    beit = is_beit(arch)
    norm = partial(LayerNorm, eps=BEIT3_EPS) if has_sublayer_norms(arch) else None
    d, full_w = TINY["embed_dim"], TINY["num_heads"] * HEAD_DIM
    kw = {**TINY, **overrides, "depth": len(keep)}
    if beit:
        assert all(h == TINY["num_heads"] for h in heads) and len(set(ffn)) == 1
        kw["mlp_ratio"] = ffn[0] / d
    ref = timm.create_model(arch, pretrained=False, **kw)
    if not beit:
        for blk, h, f in zip(ref.blocks, heads, ffn, strict=True):
            blk.attn = Attention(d, num_heads=h, attn_head_dim=HEAD_DIM, qkv_bias=True, scale_norm=norm is not None,
                                 norm_layer=norm)
            blk.mlp = Mlp(d, hidden_features=f, norm_layer=norm)
    sd = original.state_dict()
    new = {k: v.clone() for k, v in sd.items() if not k.startswith("blocks.")}
    for dst, (src, h, f) in enumerate(zip(keep, heads, ffn, strict=True)):
        new.update(sliced_block(sd, src, dst, h, f, full_w))
    ref.load_state_dict(new, strict=True)
    return ref.eval()


def masked_reference(original: torch.nn.Module, keep: list[int], heads: list[int], ffn: list[int]
                     ) -> torch.nn.Module:
    """The unmodified timm model computing the same sub-network: a dropped head's proj columns and a dropped
    neuron's fc2 column are zero (they add nothing), a dropped block's proj and fc2 (weights and biases) are
    zero (the block adds nothing to the residual stream, whatever its layer scale)."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for i, blk in enumerate(ref.blocks):
            a, m = blk.attn, blk.mlp
            if i not in keep:
                for lin in (a.proj, m.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
                continue
            k = keep.index(i)
            a.proj.weight[:, heads[k] * HEAD_DIM:] = 0
            m.fc2.weight[:, ffn[k]:] = 0
    return ref.eval()


def save_tiny(fam: Any, arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny model saved by the family in timm's save_for_hf layout (what a user's checkpoint looks like)."""
    m = fam.prepare(tiny_timm(arch, seed), LABELS)
    fam.save(m, None, path)
    return path
