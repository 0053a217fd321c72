"""Where a policy's logical layers live: torch modules of a model, and nodes of its ONNX graph
(docs/architecture.md, "Quantization").

The family adapter says which modules are the six linears of a layer; everything else is generic: the
word-embedding table is `get_input_embeddings()`, and the head linears are the linears outside the layer
list (two: `pooler` then `classifier`; one: `classifier`). A family shaped otherwise (timm ViT's fused qkv)
names its targets and architecture itself (`FamilyAdapter.quant_targets` / `quant_architecture`).

In an ONNX graph a node is matched to its module
by the exporter's name scope (dynamo exporter: the `pkg.torch.onnx.name_scopes` metadata; TorchScript
exporter: the `/model/bert/encoder/layer.0/...` node name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from instatune_cli.errors import InstatuneError
from instatune_cli.quantize.policy import PARTS, Architecture

if TYPE_CHECKING:
    from torch import nn

    from instatune_cli.adapters.base import FamilyAdapter
    from instatune_cli.space import SubNet

LINEAR_OPS = ("MatMul", "Gemm")
EMBEDDING_OPS = ("Gather",)


def family_adapter(model: Any) -> FamilyAdapter:
    """The adapter of a model, our per-layer extracted classes included (same module layout as the family)."""
    from instatune_cli.adapters import adapter_of

    return adapter_of(model)


def head_linears(model: nn.Module, adapter: FamilyAdapter) -> dict[str, tuple[str, nn.Linear]]:
    """The linears outside the encoder layers, by logical name: `pooler` (if two) and `classifier`."""
    from torch import nn

    inside = {id(m) for layer in adapter.layers(model) for m in layer.modules()}
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]
    if not 1 <= len(found) <= 2:
        raise InstatuneError(f"expected one or two head linears outside the layers, found {[n for n, _ in found]}")
    names = ("pooler", "classifier") if len(found) == 2 else ("classifier",)
    return dict(zip(names, found, strict=True))


def torch_targets(model: nn.Module, sub: SubNet | None = None) -> dict[str, tuple[str, nn.Module]]:
    """Logical name -> (module path, module). With `sub`, layer k is the sub-network's k-th kept layer of a
    super-network (the depth rule); without, the model's own layers (an extracted model)."""
    adapter = family_adapter(model)
    own = adapter.quant_targets(model, sub)
    if own is not None:
        return own
    paths = {id(m): n for n, m in model.named_modules()}
    layers = adapter.layers(model)
    kept = adapter.kept_layers(model, sub) if sub is not None else list(range(len(layers)))
    emb = model.get_input_embeddings()
    out: dict[str, tuple[str, nn.Module]] = {"embeddings": (paths[id(emb)], emb)}
    for k, li in enumerate(kept):
        p = adapter.parts(layers[li])
        for part in PARTS:
            m = getattr(p, part)
            out[f"layer.{k}.{part}"] = (paths[id(m)], m)
    out.update(head_linears(model, adapter))
    return out


def architecture_of(model: nn.Module, sub: SubNet | None = None) -> Architecture:
    """The architecture a policy for this model (or this sub-network of a super-network) is made for."""
    adapter = family_adapter(model)
    own = adapter.quant_architecture(model, sub)
    if own is not None:
        return own
    cfg = model.config
    hidden = int(cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.dim)
    heads_full = int(getattr(cfg, "num_attention_heads", 0) or cfg.n_heads)
    head_dim = hidden // heads_full
    heads_linears = tuple(head_linears(model, adapter))
    if sub is not None:
        heads, ffn = tuple(sub.heads), tuple(sub.ffn)
    else:
        parts = [adapter.parts(layer) for layer in adapter.layers(model)]
        heads = tuple(p.query.out_features // head_dim for p in parts)
        ffn = tuple(p.ffn_in.out_features for p in parts)
    return Architecture(cfg.model_type, hidden, head_dim, heads, ffn, int(cfg.num_labels), heads_linears)


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
