"""ONNX Runtime engine: post-training static quantization of an exported graph, in QDQ format, with a
per-layer policy (docs/architecture.md, "Quantization").

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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError
from instatune_cli.quantize.policy import QuantPolicy

#: settings shared with the PyTorch emulation the joint search uses (quantize/emulate.py)
ACTIVATIONS = "uint8 asymmetric per tensor (MinMax)"
WEIGHTS = "int8 symmetric per output channel"


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
    from instatune_cli.export import ort_feed

    return ort_feed(v)


def quantize_onnx(onnx_in: str | Path, onnx_out: str | Path, policy: QuantPolicy,
                  targets: dict[str, tuple[str, Any]], batches: Sequence[dict[str, Any]],
                  strict: bool = False) -> dict[str, Any]:
    """Write `onnx_out`: `onnx_in` with the policy's INT8 layers statically quantized on `batches` (`strict`:
    module docstring)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from instatune_cli.export import read_metadata
    from instatune_cli.measure.size import onnx_bytes
    from instatune_cli.quantize.targets import onnx_targets

    src, dst = Path(onnx_in), Path(onnx_out)
    graph = onnx.load(str(src), load_external_data=False).graph
    nodes = onnx_targets(graph, targets)
    chosen = [nodes[n] for n in policy.int8()]
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
    _finish(src, dst, read_metadata(src), policy, set(chosen) if strict else None)
    return {"engine": "ort", "method": "onnxruntime.quantization.quantize_static (QDQ)", "activations": ACTIVATIONS,
            "weights": WEIGHTS, "nodes_quantized": len(chosen), "calibration_batches": len(batches),
            "fp32_layers_read": "fp32 activations (strict)" if strict else "shared activation QDQ (ORT default)",
            "bytes_in": onnx_bytes(src), "bytes_out": onnx_bytes(dst), "seconds": round(time.perf_counter() - t0, 3)}


def _finish(src: Path, dst: Path, meta: dict[str, str], policy: QuantPolicy, strict: set[str] | None) -> None:
    """With `strict` (the INT8 node names), keep FP32 consumers FP32; drop the exporter's node metadata; carry
    our graph metadata over."""
    import onnx

    from instatune_cli.export import META_PREFIX

    m = onnx.load(str(dst))
    if strict is not None:
        _fp32_consumers_read_fp32(m.graph, strict)
    for node in m.graph.node:  # the exporter's per-node stack traces: bulk, and the build machine's paths
        del node.metadata_props[:]
    have = {p.key for p in m.metadata_props}
    for k, v in {**meta, "quantization": "ort-static-qdq", "policy": policy.summary()}.items():
        if META_PREFIX + k not in have:
            m.metadata_props.add(key=META_PREFIX + k, value=v)
    onnx.save(m, str(dst))


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
