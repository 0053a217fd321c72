"""ONNX Runtime's transformer fusions for the transformers text encoders' exported graphs (what
`HFTextAdapter.optimize_onnx` runs; `export_onnx` asks the family, docs/architecture.md "Families").

Graph optimization (`optimize_graph`, on by default in `export_onnx`): MACs do not count embeddings, LayerNorm,
GELU, softmax and reshapes, and in the smallest sub-networks those dominate, so a sub-network fell short of
its MAC speedup (MiniLM L3-h6-f512: 0.82 of it at batch 1). ONNX Runtime's transformer fusions
(`onnxruntime.transformers.optimizer`) replace them with fused kernels, but their patterns were written for
other exporters and fire on our dynamo graphs only after three rewrites (`_prepare_for_fusion`): the export
uses eager attention (the SDPA decomposition adds an IsNaN/Where guard no pattern knows), the Q/K/V reshapes
say their own head count instead of -1 (ORT reads num_heads per attention node from them, which is what
per-layer heads need), and the additive attention mask becomes the classic (1 - mask) * min of the
attention_mask input. Then Attention, EmbedLayerNormalization, BiasGelu and LayerNormalization fuse.
SkipLayerNormalization also fuses but is left out, and ORT's own session-time SkipLayerNormFusion is switched
off in `ort_session`: on onnxruntime 1.32's CPU kernel it is 5-7x slower than Add + LayerNormalization
(b1 s128 h384: 0.25 ms vs 0.036 ms). Every fused graph is checked against the unfused one on ragged inputs
before it replaces it; a fusion that changes the logits is dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.errors import InstatuneError
from instatune_cli.onnxrt import SLOW_CPU_OPTIMIZERS, ort_session, read_metadata, set_metadata

if TYPE_CHECKING:
    import numpy as np
    import onnx

#: fusions `optimize_graph` can run (each one switch, or a pair, of ORT's FusionOptions)
FUSIONS = ("attention", "embed_layer_norm", "gelu", "layer_norm", "skip_layer_norm")
#: what `export_onnx` runs: all but skip_layer_norm, slower on ORT's CPU kernel (module docstring)
DEFAULT_FUSIONS = ("attention", "embed_layer_norm", "gelu", "layer_norm")
#: fusions that keep every MatMul/Gemm/Gather node, i.e. everything a per-layer INT8 policy targets
LINEAR_PRESERVING_FUSIONS = ("gelu", "layer_norm")
#: op types counted as fused in `optimize_graph`'s report (ORT contrib ops, and ONNX LayerNormalization)
FUSED_OPS = ("Attention", "MultiHeadAttention", "QAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu", "LayerNormalization")
_FUSION_SWITCHES = {
    "attention": ("enable_attention",),
    "embed_layer_norm": ("enable_embed_layer_norm",),
    "gelu": ("enable_gelu", "enable_bias_gelu"),
    "layer_norm": ("enable_layer_norm",),
    "skip_layer_norm": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
}


_QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear", "QLinearMatMul",
                  "QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat", "QEmbedLayerNormalization"}


def _small_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values of at most 16 elements by name (shape vectors and scalars only:
    reading every weight would copy the whole model)."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer if _numel(i.dims) <= 16}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _scalar(v: np.ndarray | None) -> float | None:
    return float(v.ravel()[0]) if v is not None and v.size == 1 else None


def _add_const(graph: onnx.GraphProto, name: str, value: Any, dtype: str) -> str:
    """An initializer `name` holding `value` (created once)."""
    import numpy as np
    from onnx import numpy_helper

    if not any(i.name == name for i in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
    return name


def _insert_before(graph: onnx.GraphProto, consumer: Any, nodes: Sequence[Any]) -> None:
    i = list(graph.node).index(consumer) if consumer is not None else 0
    for k, n in enumerate(nodes):
        graph.node.insert(i + k, n)


def _explicit_heads(graph: onnx.GraphProto) -> int:
    """Give every Q/K/V reshape [b, s, -1, dh] its own head count (bias width / dh).

    ORT reads num_heads per attention node from this shape; with -1 it falls back to one global value, which is
    wrong for per-layer heads (their layers even share one -1 shape). Returns the reshapes rewritten.
    """
    from onnx import helper

    small = _small_constants(graph)
    widths = {i.name: int(i.dims[0]) for i in graph.initializer if len(i.dims) == 1}
    producer = {o: n for n in graph.node for o in n.output}
    made: dict[tuple[str, int], str] = {}
    count = 0
    for node in [n for n in graph.node if n.op_type == "Reshape"]:
        shape, add = producer.get(node.input[1]), producer.get(node.input[0])
        if shape is None or add is None or shape.op_type != "Concat" or len(shape.input) != 4 or add.op_type != "Add":
            continue
        minus_one, dh = _scalar(small.get(shape.input[2])), _scalar(small.get(shape.input[3]))
        width = next((widths[i] for i in add.input if i in widths), None)
        if minus_one != -1 or not dh or width is None or width % int(dh):
            continue
        heads = width // int(dh)
        key = (shape.output[0], heads)
        if key not in made:
            made[key] = f"{shape.output[0]}_instatune_h{heads}"
            h = _add_const(graph, f"instatune_heads_{heads}", [heads], "int64")
            _insert_before(graph, node, [helper.make_node(
                "Concat", [shape.input[0], shape.input[1], h, shape.input[3]], [made[key]], name=made[key], axis=0)])
        node.input[1] = made[key]
        count += 1
    return count


def _attention_blocks(graph: onnx.GraphProto) -> list[tuple[Any, int, Any]]:
    """(Add, index of its mask input, scale node) of every Softmax(Add(Mul|Div(MatMul, c), mask))."""
    producer = {o: n for n in graph.node for o in n.output}
    blocks = []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        add = producer.get(sm.input[0])
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            continue
        parents = [producer.get(i) for i in add.input]
        k = next((k for k, p in enumerate(parents) if p is not None and p.op_type in ("Mul", "Div")
                  and any(producer.get(i) is not None and producer[i].op_type == "MatMul" for i in p.input)), None)
        if k is not None:
            blocks.append((add, 1 - k, parents[k]))
    return blocks


def _scale_as_div(graph: onnx.GraphProto, node: Any, small: dict[str, np.ndarray]) -> None:
    """Mul(scores, c) -> Div(scores, 1/c): ORT's parent matcher does not backtrack, so with a Mul scale it takes
    the scale for the mask's Mul and the attention pattern fails."""
    c = next(((k, _scalar(small.get(i))) for k, i in enumerate(node.input) if _scalar(small.get(i))), None)
    if node.op_type != "Mul" or c is None:
        return
    k, value = c
    scores = node.input[1 - k]
    node.op_type = "Div"
    del node.input[:]
    node.input.extend([scores, _add_const(graph, f"{node.name or node.output[0]}_instatune_inv", 1.0 / value,
                                          "float32")])


def _classic_mask(graph: onnx.GraphProto) -> int:
    """Rewrite every attention block to the pattern ORT's Attention fusion knows: scores / sqrt(dh) plus
    (1 - attention_mask[:, None, None, :]) * float32.min (the same additive mask transformers 5 builds with a
    Where over a gathered padding mask). Only when every block adds one and the same mask."""
    import numpy as np
    from onnx import TensorProto, helper

    blocks = _attention_blocks(graph)
    if "attention_mask" not in {i.name for i in graph.input} or len({a.input[j] for a, j, _ in blocks}) != 1:
        return 0
    small = _small_constants(graph)
    for _, _, scale in blocks:
        _scale_as_div(graph, scale, small)
    p = "instatune_mask"
    nodes = [
        helper.make_node("Unsqueeze", ["attention_mask", _add_const(graph, f"{p}_ax1", [1], "int64")], [f"{p}_u1"]),
        helper.make_node("Unsqueeze", [f"{p}_u1", _add_const(graph, f"{p}_ax2", [2], "int64")], [f"{p}_u2"]),
        helper.make_node("Cast", [f"{p}_u2"], [f"{p}_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [_add_const(graph, f"{p}_one", 1.0, "float32"), f"{p}_f"], [f"{p}_inv"]),
        helper.make_node("Mul", [f"{p}_inv", _add_const(graph, f"{p}_low", np.finfo(np.float32).min, "float32")],
                         [f"{p}_add"]),
    ]
    for n in nodes:
        n.name = n.output[0]
    _insert_before(graph, None, nodes)
    for add, j, _ in blocks:
        add.input[j] = f"{p}_add"
    return len(blocks)


def _position_slice(graph: onnx.GraphProto) -> int:
    """Slice the position ids to Unsqueeze(Gather(Shape(input_ids), 1)), the form ORT's EmbedLayerNormalization
    matcher expects (the export takes the length from another input's Shape)."""
    from onnx import helper

    dims = {i.name: list(i.dims) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    if "input_ids" not in {i.name for i in graph.input}:
        return 0
    for g in (n for n in graph.node if n.op_type == "Gather"):
        sl = producer.get(g.input[1])
        if sl is None or sl.op_type != "Slice" or len(dims.get(sl.input[0], ())) != 2 or dims[sl.input[0]][0] != 1:
            continue
        p = "instatune_positions"
        _insert_before(graph, None, [
            helper.make_node("Shape", ["input_ids"], [f"{p}_shape"], name=f"{p}_shape"),
            helper.make_node("Gather", [f"{p}_shape", _add_const(graph, f"{p}_one", 1, "int64")], [f"{p}_len"],
                             name=f"{p}_len", axis=0),
            helper.make_node("Unsqueeze", [f"{p}_len", _add_const(graph, f"{p}_ax0", [0], "int64")], [f"{p}_end"],
                             name=f"{p}_end"),
        ])
        sl.input[2] = f"{p}_end"
        return 1
    return 0


def _prepare_for_fusion(model: onnx.ModelProto, fusions: Collection[str]) -> dict[str, int]:
    """Rewrite our exported graph into the shapes the asked-for ORT fusion patterns match; returns what changed."""
    g = model.graph
    out = {}
    if "attention" in fusions:
        out.update(reshape_heads=_explicit_heads(g), attention_masks=_classic_mask(g))
    if "embed_layer_norm" in fusions:
        out["position_slices"] = _position_slice(g)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's tools log (on the root logger and module loggers) and print; our report says what happened."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _fuse(src: Path, fusions: Collection[str], num_heads: int, hidden: int) -> tuple[Any, dict[str, int]]:
    """ORT's BERT fusions (only `fusions`) on `src` after `_prepare_for_fusion`: the OnnxModel and the rewrites."""
    import onnx
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(src))
    rewrites = _prepare_for_fusion(model, fusions)
    opts = FusionOptions("bert")
    opts.attention_mask_format = AttentionMaskFormat.AttentionMask  # raw 2-D mask: MaskIndexEnd assumes right padding
    opts.enable_rotary_embeddings = opts.enable_qordered_matmul = False
    for name, switches in _FUSION_SWITCHES.items():
        for switch in switches:
            setattr(opts, switch, name in fusions)
    with _quiet():
        return optimize_model(model, "bert", num_heads, hidden, optimization_options=opts, opt_level=0), rewrites


def _check_feeds(session: Any, meta: dict[str, str]) -> list[dict[str, Any]]:
    """Random batches of shapes (1, 1), (1, 9), (3, 17), (2, 128) (sequences capped at the model's maximum);
    in the larger two, row 1 is right-padded and the last row left-padded (in batch 2 one row, both ends)."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab, types = int(meta.get("vocab_size") or 100), max(1, int(meta.get("type_vocab_size") or 1))
    longest = int(meta.get("max_sequence_length") or 128)
    out = []
    for b, s in ((1, 1), (1, 9), (3, min(17, longest)), (2, min(128, longest))):
        mask = np.ones((b, s), np.int64)
        if b > 1:
            mask[1, s // 2:] = 0
            mask[-1, : s // 3] = 0
        feeds = {"input_ids": rng.integers(0, vocab, (b, s)), "attention_mask": mask,
                 "token_type_ids": rng.integers(0, types, (b, s))}
        out.append({i.name: feeds.get(i.name, np.zeros((b, s), np.int64)).astype(np.int64)
                    for i in session.get_inputs()})
    return out


def _max_diff(ref: Path, cand: Path) -> float:
    """Largest |Δ output| of `cand` against `ref` over `_check_feeds` (inf when `cand` does not load or run)."""
    import numpy as np

    a = ort_session(ref, threads=1)
    try:
        b = ort_session(cand, threads=1)
        diffs = [np.abs(x - y).max() for f in _check_feeds(a, read_metadata(ref))
                 for x, y in zip(a.run(None, f), b.run(None, f), strict=True)]
    except Exception:  # noqa: BLE001 - a fused graph ORT cannot load or run is simply not used
        return float("inf")
    d = float(max(diffs))
    return d if d == d else float("inf")  # NaN: not equal


def _ladder(fusions: Collection[str]) -> list[tuple[str, ...]]:
    """Fusion sets to try in turn: all asked for, then without the structural ones, then none."""
    wanted = tuple(f for f in FUSIONS if f in fusions)
    steps = [wanted, tuple(f for f in wanted if f not in ("attention", "embed_layer_norm")), ()]
    return [s for i, s in enumerate(steps) if s not in steps[:i]]


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(i.data_location == 1 for i in model.graph.initializer)


def _place(cand: Path, dst: Path, external: bool) -> None:
    """Move the checked graph (and its `.data` file) over `dst`."""
    os.replace(cand, dst)
    if external:
        os.replace(cand.with_name(cand.name + ".data"), dst.with_name(dst.name + ".data"))


def _attempt(src: Path, cand: Path, fusions: Sequence[str], num_heads: int, hidden: int,
             before: dict[str, int], external: bool) -> dict[str, Any]:
    """Fuse `src` into `cand` with `fusions` and measure it against `src` (`max_abs_diff`, inf if it fails)."""
    fused, rewrites = _fuse(src, fusions, num_heads, hidden)
    after = _op_counts(fused.model)
    gained = {op: after.get(op, 0) - before.get(op, 0) for op in FUSED_OPS if after.get(op, 0) > before.get(op, 0)}
    set_metadata(fused.model, "graph_optimization", ",".join(f"{k}={v}" for k, v in gained.items()) or "none")
    # a deployer's own session should switch these off too (module docstring)
    set_metadata(fused.model, "ort_disabled_optimizers", ",".join(SLOW_CPU_OPTIMIZERS))
    fused.save_model_to_file(str(cand), use_external_data_format=external)
    return {"fusions": list(fusions), "fused": gained, "ops": {op: after[op] for op in FUSED_OPS if after.get(op)},
            "rewrites": rewrites, "nodes_after": len(fused.model.graph.node), "max_abs_diff": _max_diff(src, cand)}


def optimize_graph(onnx_in: str | Path, onnx_out: str | Path, num_heads: int = 0, hidden: int = 0, *,
                   fusions: Collection[str] = DEFAULT_FUSIONS, atol: float = 1e-4) -> dict[str, Any]:
    """Fuse an exported graph with ONNX Runtime's transformer optimizer (model_type bert); `onnx_out` may be
    `onnx_in`.

    Why: the ops MACs do not count are what keeps small sub-networks from their MAC speedup (module docstring).
    `num_heads`/`hidden` 0 (the default) read the head count of every attention node from the graph, which
    per-layer heads need; positive values are only a fallback for graphs that do not say. `fusions` picks from
    FUSIONS (LINEAR_PRESERVING_FUSIONS keeps every MatMul/Gemm/Gather a per-layer INT8 policy targets). The fused
    graph must give the input graph's outputs within `atol` on ragged inputs, else fewer fusions are tried
    and, last, the input is kept unchanged (`applied` False).

    INT8: fuse the FP32 graph first, then quantize (`quantize_dynamic_int8` turns a fused Attention into
    QAttention). Attention and embedding fusions need FP32 MatMul/Gather weights, so on an already quantized
    graph only LayerNorm/GELU can fuse; it still works and is checked the same way. Returns which fusions
    fired (`fused`: op type -> nodes added), the rewrites, node counts, the check and seconds.
    """
    import onnx
    import onnxruntime

    unknown = sorted(set(fusions) - set(FUSIONS))
    if unknown:
        raise InstatuneError(f"unknown fusions {unknown}; choose from {', '.join(FUSIONS)}")
    src, dst = Path(onnx_in), Path(onnx_out)
    t0 = time.perf_counter()
    source = onnx.load(str(src), load_external_data=False)
    external, before = _has_external_data(source), _op_counts(source)
    common = {"nodes_before": len(source.graph.node), "input_quantized": bool(_QUANTIZED_OPS & set(before)),
              "atol": atol, "attempts": []}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".instatune-opt-", dir=dst.parent) as td:
        for tried in (f for f in _ladder(fusions) if f):
            res = _attempt(src, Path(td) / dst.name, tried, num_heads, hidden, before, external)
            ok = res["max_abs_diff"] <= atol
            common["attempts"].append({"fusions": list(tried), "max_abs_diff": res["max_abs_diff"]
                                       if math.isfinite(res["max_abs_diff"]) else None})
            if ok:
                _place(Path(td) / dst.name, dst, external)
                return {"applied": True, "tool": f"onnxruntime.transformers.optimizer {onnxruntime.__version__}",
                        "model_type": "bert", **res, **common, "session_disabled_optimizers": list(SLOW_CPU_OPTIMIZERS),
                        "seconds": round(time.perf_counter() - t0, 3)}
    if src.resolve() != dst.resolve():
        onnx.save(onnx.load(str(src)), str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
    reason = "no fusion kept the outputs within atol" if common["attempts"] else "no fusions asked for"
    return {"applied": False, "fusions": [], "fused": {}, "reason": reason, **common,
            "seconds": round(time.perf_counter() - t0, 3)}

