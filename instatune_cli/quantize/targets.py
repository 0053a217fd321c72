"""Where a policy's logical layers live: torch modules of a model, and nodes of its ONNX graph
(docs/architecture.md, "Quantization").

The family adapter decides which modules they are (`FamilyAdapter.quant_targets` / `quant_architecture`): by
default the six `parts` of each layer, the embedding table (`embedding_table`: transformers'
`get_input_embeddings()`), and the head linears, the linears outside the layer list (two: `pooler` then
`classifier`; one: `classifier`). A family shaped otherwise (timm ViT's fused qkv) overrides them.

In an ONNX graph a node is matched to its module
by the exporter's name scope (dynamo exporter: the `pkg.torch.onnx.name_scopes` metadata; TorchScript
exporter: the `/model/bert/encoder/layer.0/...` node name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import adapter_of
from instatune_cli.errors import InstatuneError

if TYPE_CHECKING:
    from torch import nn

    from instatune_cli.adapters.base import Architecture
    from instatune_cli.space import SubNet

LINEAR_OPS = ("MatMul", "Gemm")
EMBEDDING_OPS = ("Gather",)


def torch_targets(model: nn.Module, sub: SubNet | None = None) -> dict[str, tuple[str, nn.Module]]:
    """Logical name -> (module path, module): the family's answer (`FamilyAdapter.quant_targets`). With `sub`,
    layer k is the sub-network's k-th kept layer of a super-network (the depth rule); without, the model's own
    layers (an extracted model)."""
    return adapter_of(model).quant_targets(model, sub)


def architecture_of(model: nn.Module, sub: SubNet | None = None) -> Architecture:
    """The architecture a policy for this model (or this sub-network of a super-network) is made for."""
    return adapter_of(model).quant_architecture(model, sub)


def _scope(node: Any) -> str | None:
    """The module path a node was exported from ('' prefix of our export wrapper removed), or None."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            mods = [s for s in scopes if s.startswith("model")]
            return mods[-1].removeprefix("model.").removeprefix("model") if mods else None
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        if parts and parts[0] == "model":
            return ".".join(parts[1:])
    return None


def onnx_targets(graph: Any, targets: dict[str, tuple[str, Any]]) -> dict[str, str]:
    """Logical name -> the ONNX node computing it (the MatMul/Gemm of a linear, the Gather of the table)."""
    by_path = {path: name for name, (path, _) in targets.items()}
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in LINEAR_OPS + EMBEDDING_OPS:
            continue
        scope = _scope(node)
        name = by_path.get(scope or "")
        if name is None:
            continue
        if (name == "embeddings") != (node.op_type in EMBEDDING_OPS):
            continue
        if name in found:
            raise InstatuneError(f"two ONNX nodes ({found[name]}, {node.name}) compute {name}; cannot apply a policy")
        found[name] = node.name
    missing = [n for n in targets if n not in found]
    if missing:
        raise InstatuneError(
            f"the ONNX graph has no node for {', '.join(missing[:4])}; it was not exported by instatune export")
    return found
