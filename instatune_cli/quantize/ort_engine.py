"""ONNX Runtime engine: post-training quantization of an exported graph with a per-layer policy: static QDQ for
INT8 layers, ONNX Runtime's block-wise weight-only operators for INT4 (docs/architecture.md, "Quantization").

Only the nodes of the policy's INT8 layers are quantized (`nodes_to_quantize`): the MatMul/Gemm of each INT8
linear (weights INT8 symmetric per output channel, activations UINT8 asymmetric per tensor from MinMax
calibration) and the Gather of an INT8 word-embedding table. Everything else, the attention's own MatMuls
included, stays FP32. The result is an ordinary ONNX file any ONNX Runtime loads; ORT fuses each QDQ pair
into integer kernels when it builds the session.

Two readings of an FP32 layer. ORT's quantizer puts one Quantize/Dequantize pair on a tensor and feeds every
consumer the dequantized value, so an FP32 linear next to an INT8 one keeps FP32 *weights* but reads the
rounded activation; the pair then fuses into QLinearMatMul (MiniLM b1 s128, one thread: 31 ms vs 71 ms FP32).
`strict=True` rewires FP32 consumers to the original tensor, so an FP32 layer computes exactly as in FP32 (the
arithmetic the joint search's emulation assumes); that breaks the fusion and INT8 runs slower than FP32 on
ORT 1.32 (about 135 ms), so it is for checking, not shipping.

Block-wise layers (`int4`, `int8-weights`) are rewritten after the static pass: a linear's MatMul/Gemm becomes
`com.microsoft.MatMulNBits` (weights packed [N, K/group, group*bits/8], one FP32 scale per block, symmetric: no
zero point stored), the embedding Gather becomes `com.microsoft.GatherBlockQuantized` (quantized along the
hidden axis). Both read FP32 activations (whatever the tensor they read holds: a shared INT8 QDQ of a neighbour
included) and compute in FP32 (accuracy_level unset: the INT8-activation mode was not faster here, 1.63 vs
1.34 ms for a 128x384x1536 product at group 32, one thread). `quantize/emulate.py` applies the same arithmetic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError
from instatune_cli.measure.size import onnx_bytes
from instatune_cli.onnxrt import META_PREFIX, ort_feed, read_metadata
from instatune_cli.quantize.emulate import blockwise
from instatune_cli.quantize.policy import QuantPolicy
from instatune_cli.quantize.targets import onnx_targets

#: settings shared with the PyTorch emulation the joint search uses (quantize/emulate.py)
ACTIVATIONS = "uint8 asymmetric per tensor (MinMax)"
WEIGHTS = "int8 symmetric per output channel"
BLOCKWISE_WEIGHTS = "symmetric per block of group_size inputs, FP32 scales, FP32 activations"
#: what this engine has an operator for (policy.engine_refusal)
SUPPORTS = {"int8": ("linear", "embeddings"), "int8-weights": ("linear", "embeddings"),
            "int4": ("linear", "embeddings")}


class _Reader:
    """ORT's CalibrationDataReader protocol over our batches (token ids as int64, pixels as float32)."""

    def __init__(self, batches: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
        self._it: Iterator[dict[str, Any]] = iter(
            [{n: _np(b[n]) for n in names} for b in batches])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # ORT calls this only for multi-pass calibrators
        raise NotImplementedError


def _np(v: Any) -> Any:
    return ort_feed(v)


def quantize_onnx(onnx_in: str | Path, onnx_out: str | Path, policy: QuantPolicy,
                  targets: dict[str, tuple[str, Any]], batches: Sequence[dict[str, Any]],
                  strict: bool = False) -> dict[str, Any]:
    """Write `onnx_out`: `onnx_in` with the policy's INT8 layers statically quantized on `batches` (`strict`:
    module docstring)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(onnx_in), Path(onnx_out)
    graph = onnx.load(str(src), load_external_data=False).graph
    nodes = onnx_targets(graph, targets)
    chosen = [nodes[n] for n in policy.int8()]
    blockwise = {nodes[n]: policy.weight_bits()[n] for n in policy.quantized() if policy.layers[n] != "int8"}
    names = [i.name for i in graph.input]
    if not batches:
        raise InstatuneError("no calibration batches; give --calibration-samples of at least 1")
    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT warns on the root logger ("consider pre-processing") every call
    try:
        if chosen:
            quantize_static(str(src), str(dst), _Reader(batches, names), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm", "Gather"], nodes_to_quantize=chosen,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        else:  # an all-FP32 policy is a copy
            onnx.save(onnx.load(str(src)), str(dst))
    finally:
        root.setLevel(level)
    _finish(src, dst, read_metadata(src), policy, set(chosen) if strict else None, blockwise)
    return {"engine": "ort", "method": "onnxruntime.quantization.quantize_static (QDQ)"
            + (" + MatMulNBits/GatherBlockQuantized (block-wise weights)" if blockwise else ""),
            "activations": ACTIVATIONS, "weights": WEIGHTS,
            **({"blockwise_weights": BLOCKWISE_WEIGHTS, "group_size": policy.group_size} if blockwise else {}),
            "nodes_quantized": len(chosen) + len(blockwise), "nodes_static_int8": len(chosen),
            "nodes_blockwise": {f"int{b}": sum(v == b for v in blockwise.values()) for b in (4, 8)},
            "calibration_batches": len(batches),
            "fp32_layers_read": "fp32 activations (strict)" if strict else "shared activation QDQ (ORT default)",
            "bytes_in": onnx_bytes(src), "bytes_out": onnx_bytes(dst), "seconds": round(time.perf_counter() - t0, 3)}


def _finish(src: Path, dst: Path, meta: dict[str, str], policy: QuantPolicy, strict: set[str] | None,
            blockwise: dict[str, int]) -> None:
    """With `strict` (the INT8 node names), keep FP32 consumers FP32; rewrite the `blockwise` nodes (name ->
    weight bits); drop the exporter's node metadata; carry our graph metadata over."""
    import onnx

    m = onnx.load(str(dst))
    if strict is not None:
        _fp32_consumers_read_fp32(m.graph, strict)
    if blockwise:
        _blockwise(m, blockwise, policy.group_size)
    for node in m.graph.node:  # the exporter's per-node stack traces: bulk, and the build machine's paths
        del node.metadata_props[:]
    have = {p.key for p in m.metadata_props}
    for k, v in {**meta, "quantization": "ort-static-qdq", "policy": policy.summary()}.items():
        if META_PREFIX + k not in have:
            m.metadata_props.add(key=META_PREFIX + k, value=v)
    onnx.save(m, str(dst))


def _blockwise(model: Any, nodes: dict[str, int], group: int) -> None:
    """Replace each named MatMul/Gemm by MatMulNBits and the named Gather by GatherBlockQuantized, weights
    quantized by `emulate.blockwise` (module docstring)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    used: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            used[i] = used.get(i, 0) + 1
    for pos, node in enumerate(list(g.node)):
        bits = nodes.get(node.name)
        if bits is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        wname = node.input[0] if node.op_type == "Gather" else node.input[1]
        if wname not in inits:
            raise InstatuneError(f"{node.name}: its weight {wname} is not a constant of the graph; cannot quantize "
                                 "it block-wise")
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        if node.op_type == "Gather":  # [vocab, hidden], quantized along hidden
            packed, scales = blockwise(w, bits, group)
            new = helper.make_node("GatherBlockQuantized", [wname + "_q", node.input[1], wname + "_scales"],
                                   list(node.output), name=node.name, domain="com.microsoft", bits=bits,
                                   block_size=group, gather_axis=0, quantize_axis=1)
        else:
            if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                           or attrs.get("beta", 1.0) != 1.0):
                raise InstatuneError(f"{node.name}: a Gemm with transA/alpha/beta; cannot quantize it block-wise")
            rows_cols = w if node.op_type == "Gemm" and attrs.get("transB", 0) else w.T  # [N, K]
            n_out, k = rows_cols.shape
            packed, scales = blockwise(rows_cols, bits, group)
            packed = packed.reshape(n_out, k // group, group * bits // 8)
            bias = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
            ins = [node.input[0], wname + "_q", wname + "_scales", *(["", ""] + bias if bias else [])]
            new = helper.make_node("MatMulNBits", ins, list(node.output), name=node.name, domain="com.microsoft",
                                   K=k, N=n_out, bits=bits, block_size=group)
        g.initializer.extend([numpy_helper.from_array(packed, wname + "_q"),
                              numpy_helper.from_array(scales.reshape(-1) if node.op_type != "Gather" else scales,
                                                      wname + "_scales")])
        g.node.remove(node)
        g.node.insert(pos, new)
        used[wname] -= 1
        if not used[wname]:  # the FP32 table/weight is gone from the file
            g.initializer.remove(inits[wname])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _fp32_consumers_read_fp32(graph: Any, chosen: set[str]) -> int:
    """ORT's QDQ quantizer puts one QuantizeLinear/DequantizeLinear pair on a tensor and hands the dequantized
    value to *every* consumer: with `query` INT8 and `key` FP32, the key projection and the residual Add would
    read the rounded hidden states too. Rewire every consumer outside `chosen` to the original FP32 tensor,
    so a policy's FP32 layer computes exactly as in FP32 (and as the joint search's emulation assumes)."""
    produced_by = {o: n for n in graph.node for o in n.output}
    original: dict[str, str] = {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = produced_by.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                original[n.output[0]] = q.input[0]
    rewired = 0
    for n in graph.node:
        if n.name in chosen or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(n.input):
            if name in original:
                n.input[i] = original[name]
                rewired += 1
    return rewired


def quantized_nodes(onnx_path: str | Path) -> set[str]:
    """Names of the MatMul/Gemm/Gather nodes whose weight is dequantized from an 8-bit initializer (INT8 linears;
    UINT8 for the embedding table, which ORT quantizes per tensor)."""
    import onnx

    g = onnx.load(str(onnx_path)).graph
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    inits = {i.name: i for i in g.initializer}
    weights_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return {n.name for n in g.node if n.op_type in ("MatMul", "Gemm", "Gather")
            and any(i in weights_dq for i in n.input) and any(i in dq_out for i in n.input)}


def blockwise_nodes(onnx_path: str | Path) -> dict[str, int]:
    """Name -> weight bits of the MatMulNBits / GatherBlockQuantized nodes of a graph."""
    import onnx
    from onnx import helper

    return {n.name: int(next(helper.get_attribute_value(a) for a in n.attribute if a.name == "bits"))
            for n in onnx.load(str(onnx_path)).graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
