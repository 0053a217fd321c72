"""What the joint architecture + precision search (`search --quant`) measures of a candidate
(docs/architecture.md, "Quantization"): its size in closed form, and its accuracy through the QDQ emulation."""

from __future__ import annotations

from typing import Any

from instatune_cli.quantize.policy import Architecture, QuantPolicy, shapes


def size_from_params(total_params: int, arch: Architecture, vocab: int, policy: QuantPolicy | None) -> int:
    """Bytes of a model with `total_params` FP32 parameters once `policy`'s layers are INT8: each INT8 weight
    saves 3 bytes per value and adds one FP32 scale per output row."""
    saved = 0
    if policy is not None:
        for name, (rows, cols, _) in shapes(arch, vocab).items():
            if policy.layers.get(name) == "int8":
                saved += 3 * rows * cols - (4 if name != "embeddings" else 0) * rows
    return 4 * total_params - saved + (8 if policy is not None and policy.layers.get("embeddings") == "int8" else 0)


def size_bytes(model: Any, arch: Architecture, policy: QuantPolicy | None) -> int:
    """`size_from_params` for a physical (extracted) model."""
    return size_from_params(sum(p.numel() for p in model.parameters()), arch, int(model.config.vocab_size), policy)
