"""Intel Neural Compressor engine (3.x): a quantized PyTorch model with a per-layer policy, saved in Neural
Compressor's own format and reloaded with its own loader (docs/architecture.md, "Quantization").

Two routes, one per policy (a model gets one or the other):

- static INT8 (`int8` layers): PT2E, below. After `convert` the weights' quantize ops are folded into INT8
  constants (torchao's `constant_fold`; Neural Compressor's `convert` drops its `fold_quantize` argument) and the
  FP32 weights they replace are removed, so the saved archive holds INT8 weights.
- weight-only (`int4`, `int8-weights` layers): `RTNConfig` (round to nearest, symmetric, blocks of the policy's
  group size) replaces each linear by Neural Compressor's `WeightOnlyLinear` with packed integer weights;
  `save` writes its state dict, which `load(dir, original_model=...)` reads (torch.load weights_only).

Neural Compressor 3.x quantizes PyTorch through PT2E: `neural_compressor.torch.export.export` captures the
model with `torch.export` (dynamic batch and sequence), `StaticQuantConfig` with `set_local` FP32 overrides
for the policy's FP32 linears drives torchao's X86InductorQuantizer, `prepare` inserts observers, the
calibration sample runs, and `convert` gives a QDQ graph module. Its 2.x APIs (`fit`,
`PostTrainingQuantConfig`, the ONNX adaptor) are gone, so it cannot write an INT8 ONNX file: that is the
`ort` engine's job. The X86 quantizer has no embedding pattern, so the word-embedding table stays FP32 here.
The graph is fast once compiled with `torch.compile` (Inductor lowers QDQ to INT8 kernels); eager, it runs
the QDQ arithmetic in FP32 and is slower than the FP32 model, which the manifest's latency shows.
Neural Compressor's scratch directory is pointed inside the stage's temporary directory. Whether a route ships
is measured by the stage (smaller on disk and not slower than FP32), which refuses it otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instatune_cli.adapters import adapter_of
from instatune_cli.errors import InstatuneError
from instatune_cli.quantize.policy import BITS, QuantPolicy

PREFIX = "model."  # the export wrapper holds the classifier as `model`
#: what the static (PT2E) route has an operator for (policy.engine_refusal): INT8 linears, no embedding pattern
STATIC_SUPPORTS = {"int8": ("linear",)}
#: the weight-only (RTN) route: INT4 / INT8 block-wise linears, no embedding table either
WEIGHT_ONLY_SUPPORTS = {"int4": ("linear",), "int8-weights": ("linear",)}


def route(policy: QuantPolicy) -> str:
    """`static` or `weight-only`: the route a policy takes (one line when it asks for both)."""
    kinds = {policy.layers[n] for n in policy.quantized()}
    if kinds & set(WEIGHT_ONLY_SUPPORTS) and "int8" in kinds:
        raise InstatuneError("the inc engine applies static INT8 (int8 layers) or weight-only RTN (int4/int8-weights "
                             "layers) to a model, not both: make the policy one kind, or use --engine ort")
    return "weight-only" if kinds & set(WEIGHT_ONLY_SUPPORTS) else "static"


def supports(policy: QuantPolicy) -> dict[str, tuple[str, ...]]:
    return WEIGHT_ONLY_SUPPORTS if route(policy) == "weight-only" else STATIC_SUPPORTS


def available() -> str | None:
    """None when the engine can run, else why not (one line for the user). Imports Neural Compressor quietly:
    its logger prints `Auto detect accelerator` and `hw aligned scales not supported` at import, at the level
    of the LOGLEVEL environment variable, which is set only for the import."""
    before = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "ERROR"
    try:
        import neural_compressor.torch.quantization  # noqa: F401
        import torchao  # noqa: F401  (PT2E's X86 quantizer on torch >= 2.11)
    except ImportError as e:
        return f"the inc engine needs neural-compressor 3.x with torchao ({e.name} is not installed); " \
               "pip install 'neural-compressor[pt]' torchao, or use --engine ort"
    finally:
        if before is None:
            os.environ.pop("LOGLEVEL", None)
        else:
            os.environ["LOGLEVEL"] = before
    _quiet()
    return None


def _quiet() -> None:
    for name in ("neural_compressor", "torchao", "torch._export", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quantize_torch(model: Any, policy: QuantPolicy, targets: dict[str, tuple[str, Any]],
                   batches: Sequence[dict[str, Any]], names: Sequence[str], workdir: str | Path) -> tuple[Any, dict]:
    """(quantized graph module taking `names` positionally, info). `workdir` holds Neural Compressor's scratch."""
    import torch

    why = available()
    if why:
        raise InstatuneError(why)
    from neural_compressor.common.utils import set_workspace
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    _quiet()
    why = ""
    set_workspace(str(Path(workdir) / "nc_workspace"))
    t0 = time.perf_counter()
    fam = adapter_of(model)
    wrapped = fam.graph_module(model.float().eval(), list(names))
    example = tuple(torch.as_tensor(batches[0][n]) for n in names)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("sequence", min=2, max=fam.max_sequence_length(model.config))
    try:  # positional shapes: the wrapper's argument names need not be the inputs' names
        captured = export(wrapped, example, dynamic_shapes=tuple({0: batch, 1: seq} for _ in names))
    except RuntimeError as e:
        captured, why = None, str(e).splitlines()[0]
    if captured is None:
        raise InstatuneError(f"Neural Compressor could not capture the model with torch.export ({why}); "
                             "use --engine ort")
    config = StaticQuantConfig()
    fp32 = [n for n in policy.fp32() if n != "embeddings"]
    for name in fp32:
        config.set_local(PREFIX + targets[name][0], StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    prepared = prepare(captured, config)
    with torch.no_grad():
        for b in batches:
            prepared(*(torch.as_tensor(b[n]) for n in names))
    quantized = convert(prepared)
    _fold_int8_weights(quantized)
    info = {"engine": "inc", "route": "static",
            "method": "neural_compressor.torch PT2E StaticQuantConfig (X86InductorQuantizer), weights folded to INT8",
            "linears_fp32": fp32, "embeddings": "fp32 (no embedding pattern in the X86 quantizer)",
            "calibration_batches": len(batches), "int8_linears": len(int8_linears(quantized)),
            "seconds": round(time.perf_counter() - t0, 3)}
    return quantized, info


def _fold_int8_weights(gm: Any) -> None:
    """Fold each weight's quantize op into an INT8 constant (what torchao's convert_pt2e(fold_quantize=True)
    does) and drop the FP32 parameters nothing reads any more, so the saved archive holds INT8 weights."""
    from torchao.quantization.pt2e.constant_fold import constant_fold
    from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint

    constant_fold(gm, _quant_node_constraint)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            path, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(path) if path else gm, attr)


def quantize_weight_only(model: Any, policy: QuantPolicy, targets: dict[str, tuple[str, Any]]) -> tuple[Any, dict]:
    """(model with Neural Compressor's WeightOnlyLinear for the policy's int4/int8-weights linears, info); the
    model is converted in place."""
    why = available()
    if why:
        raise InstatuneError(why)
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    _quiet()
    t0 = time.perf_counter()
    g = policy.group_size
    config = RTNConfig(bits=4, group_size=g, use_sym=True, use_layer_wise=False)
    for name, (path, _) in targets.items():
        if name == "embeddings":
            continue
        p = policy.layers[name]
        config.set_local(path, RTNConfig(dtype="fp32") if p == "fp32" else
                         RTNConfig(bits=BITS[p][0], group_size=g, use_sym=True, use_layer_wise=False))
    q = convert(prepare(model.float().eval(), config))
    from neural_compressor.torch.algorithms.weight_only.modules import WeightOnlyLinear

    packed = [n for n, m in q.named_modules() if isinstance(m, WeightOnlyLinear)]
    info = {"engine": "inc", "route": "weight-only",
            "method": f"neural_compressor.torch RTNConfig (symmetric, group {g}), WeightOnlyLinear packed weights",
            "linears_fp32": [n for n in policy.fp32() if n != "embeddings"],
            "embeddings": "fp32 (RTN quantizes linears only)", "weight_only_linears": len(packed),
            "group_size": g, "seconds": round(time.perf_counter() - t0, 3)}
    return q, info


def save_weight_only(model: Any, out_dir: str | Path) -> list[str]:
    """Neural Compressor's own format for weight-only models (state dict + qconfig.json)."""
    from neural_compressor.torch.quantization import save as nc_save

    nc_save(model, str(out_dir))
    return sorted(p.name for p in Path(out_dir).iterdir())


def load(out_dir: str | Path, original_model: Any = None) -> Any:
    """The saved model, read back with Neural Compressor's own loader (`original_model`: the FP32 model a
    weight-only checkpoint is applied to)."""
    why = available()
    if why:
        raise InstatuneError(why)
    from neural_compressor.torch.quantization import load as nc_load

    _quiet()
    return nc_load(str(out_dir), original_model=original_model)


def int8_linears(gm: Any) -> list[str]:
    """Module paths of the linears whose weight is dequantized from INT8 in a converted graph module."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "linear" in str(node.target) and len(node.args) > 1:
            w = node.args[1]
            if getattr(w, "op", None) == "call_function" and "dequantize" in str(w.target):
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    out.append(str(list(stack.values())[-1][0]).removeprefix(PREFIX))
    return out


def save(gm: Any, example: tuple, out_dir: str | Path) -> list[str]:
    """Neural Compressor's own format (`torch.export.save` archive + qconfig.json); returns the files."""
    gm.save(example, str(out_dir))
    return sorted(p.name for p in Path(out_dir).iterdir())
