"""What the joint architecture + precision search (`search --quant`) measures of a candidate
(docs/architecture.md, "Quantization"): its size in closed form, and its accuracy through the QDQ emulation."""

from __future__ import annotations

from typing import Any

from instatune_cli.quantize.policy import BITS, BLOCKWISE, PARTS, Architecture, QuantPolicy, shapes

QDQ_PARAMS = 5  # a tensor's FP32 scale and 8-bit zero point


def size_from_params(total_params: int, arch: Architecture, vocab: int, policy: QuantPolicy | None) -> int:
    """Bytes of a model with `total_params` FP32 parameters once `policy` is applied by the ORT engine: an INT8
    linear keeps one byte per weight plus an FP32 scale and an INT8 zero point per output row (static QDQ, per
    channel) and the scale and zero point of its input and output tensors, the INT8 table one byte per value plus
    those of the table and of the gathered rows; a block-wise layer keeps bits/8 bytes per weight plus one FP32
    scale per block of `group_size` inputs (MatMulNBits / GatherBlockQuantized, no zero point). Biases stay
    FP32."""
    total = 4 * total_params
    if policy is None:
        return total
    for name, (rows, cols, _) in shapes(arch, vocab).items():
        p = policy.layers.get(name, "fp32")
        if p == "int8":
            total -= 3 * rows * cols - (5 * rows if name != "embeddings" else 0) - 2 * QDQ_PARAMS
        elif p in BLOCKWISE:
            bits = BITS[p][0]
            total -= 4 * rows * cols - rows * cols * bits // 8 - 4 * rows * (cols // policy.group_size)
    return total


def size_bytes(model: Any, arch: Architecture, policy: QuantPolicy | None) -> int:
    """`size_from_params` for a physical (extracted) model."""
    return size_from_params(sum(p.numel() for p in model.parameters()), arch, int(model.config.vocab_size), policy)


def int4_flags(space: Any, hidden: int, head_dim: int, group: int, head_linears: int = 2) -> tuple[bool, ...]:
    """Per precision gene of a joint space (its `_encode_quant` layout): whether INT4 block-wise weights are a
    choice there, i.e. `group` divides the layer's input width for every choice the space has (a gene is
    per space, the widths are per member). The embedding table and the head linears read the hidden size."""
    def fits(widths: Any) -> bool:
        return all(w % group == 0 for w in widths)

    per_layer = []
    for i in range(space.max_layers):
        widths = {"attn_out": [h * head_dim for h in space.heads[i]], "ffn_out": list(space.ffn[i])}
        per_layer += [fits(widths.get(part, [hidden])) for part in PARTS]
    return (fits([hidden]), *per_layer, *([fits([hidden])] * head_linears))
