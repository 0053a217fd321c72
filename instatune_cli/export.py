"""ONNX export of a model directory, ORT parity check, and INT8 dynamic quantization.

Exporter choice: `torch.onnx.export(..., dynamo=True)` with `torch.export.Dim` dynamic shapes for batch and
sequence. On the tested stack (torch 2.14, transformers 5.24, onnxscript 0.7) it exports stock and
per-layer (instatune_*) BERT-family classifiers with SDPA attention, the graph runs in ORT for batch and
sequence sizes other than the example's (batch 1 and sequence 1 included), and logits match torch within
~1e-7 (MiniLM: 4e-8). It is the exporter torch develops (the TorchScript one is deprecated). It is slower
to run (3-15 s for MiniLM/bert-base vs 1-2 s), which does not matter for a one-off stage; ORT runs both
graphs at about the same speed (MiniLM b1/b8 s128, within the noise of a shared 2-core machine). If it
raises, `export_onnx` falls back to the TorchScript exporter (`dynamo=False`,
`dynamic_axes`), which also handles these models, and records the fallback and its reason; pass
`exporter="torchscript"` to use it directly. Either way `check_parity` on real inputs is the judge.

The graph takes `input_ids`, `attention_mask` and, where the model has more than one token type,
`token_type_ids` (all int64, shape [batch, sequence]) and returns `logits` [batch, num_labels]. Model facts
the latency probe needs (vocabulary size, maximum sequence length) are written to the ONNX metadata.

Graph optimization (on by default in `export_onnx`) is the family's (`FamilyAdapter.optimize_onnx`): ONNX
Runtime's transformer fusions for the transformers text encoders (`adapters/hf/fusion.py`, whose names this
module re-exports), none for a family without rewrites.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import adapter_of, family_for_source
from instatune_cli.adapters.hf import extract as hf_extract
from instatune_cli.adapters.hf.fusion import DEFAULT_FUSIONS as DEFAULT_FUSIONS
from instatune_cli.adapters.hf.fusion import FUSED_OPS as FUSED_OPS
from instatune_cli.adapters.hf.fusion import FUSIONS as FUSIONS
from instatune_cli.adapters.hf.fusion import LINEAR_PRESERVING_FUSIONS as LINEAR_PRESERVING_FUSIONS
from instatune_cli.adapters.hf.fusion import optimize_graph as optimize_graph
from instatune_cli.errors import InstatuneError
from instatune_cli.measure.size import onnx_bytes
from instatune_cli.onnxrt import META_PREFIX
from instatune_cli.onnxrt import SLOW_CPU_OPTIMIZERS as SLOW_CPU_OPTIMIZERS
from instatune_cli.onnxrt import ort_feed as ort_feed
from instatune_cli.onnxrt import ort_session as ort_session
from instatune_cli.onnxrt import read_metadata as read_metadata

if TYPE_CHECKING:
    from torch import nn

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
#: graphs larger than this keep their weights in a `<name>.data` file beside the .onnx (protobuf limit 2 GiB)
EXTERNAL_DATA_BYTES = 1_800_000_000


def _first_line(e: BaseException) -> str:
    """The informative line of an exception (torch.export puts its real cause under 'Exception summary')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("<class "):
            return ln
    return lines[0] if lines else type(e).__name__


def _as_model(model_or_dir: Any) -> Any:
    """A loaded classifier, or the extracted model in a directory loaded by the family that claims it."""
    if isinstance(model_or_dir, (str, Path)):
        try:
            fam = family_for_source(str(model_or_dir))
        except InstatuneError:
            fam = None  # a per-layer directory written before its config named the family
        return fam.load_extracted(model_or_dir) if fam is not None else hf_extract.load_extracted(model_or_dir)
    return model_or_dir


def _export_dynamo(wrapped: nn.Module, args: tuple, names: list[str], path: Path, opset: int,
                   max_seq: int, external: bool) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # max_seq 0: the family's sequence length is fixed by the model (images); only the batch is dynamic
    seq = torch.export.Dim("sequence", min=1, max=max_seq) if max_seq else None
    # positional (not by name): the wrapper's argument names need not be the graph's input names
    shapes = tuple({0: batch, 1: seq} if seq is not None else {0: batch} for _ in names)
    with warnings.catch_warnings():
        # "axis name batch will not be used, since it shares the same shape constraints": it is used
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
        torch.onnx.export(wrapped, args, str(path), dynamo=True, input_names=names, output_names=["logits"],
                          dynamic_shapes=shapes, opset_version=opset, external_data=external, verbose=False,
                          optimize=True)


def _export_torchscript(wrapped: nn.Module, args: tuple, names: list[str], path: Path, opset: int,
                        max_seq: int = 1) -> None:
    import torch

    axes = {n: ({0: "batch", 1: "sequence"} if max_seq else {0: "batch"}) for n in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, args, str(path), dynamo=False, input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=min(opset, 17), do_constant_folding=True)


def _write_metadata(path: Path, meta: dict[str, Any], external: bool) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=True)
    present = {p.key: p for p in m.metadata_props}
    for k, v in meta.items():
        key = META_PREFIX + k
        if key in present:
            present[key].value = str(v)
        else:
            m.metadata_props.add(key=key, value=str(v))
    if external:
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(m, str(path))


@contextlib.contextmanager
def _attention(model: Any, impl: str | None) -> Iterator[None]:
    """Run `model` with attention implementation `impl` (None: leave it), restoring it afterwards."""
    before = getattr(model.config, "_attn_implementation", None)
    if impl is None or impl == before or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        if before is not None:
            model.set_attn_implementation(before)


def export_onnx(model_dir: str | Path, out_path: str | Path, opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo", example_shape: tuple[int, int] = (2, 16),
                optimize: bool = True) -> dict[str, Any]:
    """Export the classifier in `model_dir` (stock or extracted per-layer) to `out_path` with dynamic axes.

    `optimize` (default) exports eager attention and runs the family's `optimize_onnx` on the result, so the graph a
    user ships is the fused one; `optimize=False` writes exactly the plain export (model's own attention).
    Returns what a stage records: path, exporter actually used (and why it fell back, if it did), opset,
    inputs, bytes, seconds, and `optimization` (which fusions fired). Parity is checked separately with
    `check_parity`.
    """
    import torch

    if exporter not in EXPORTERS:
        raise InstatuneError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    model = _as_model(model_dir).float().eval()
    fam = adapter_of(model)
    cfg = model.config
    names = fam.input_names(model)
    max_seq = fam.max_sequence_length(cfg)  # 0: the model fixes its input size, no sequence axis (images)
    b, s = example_shape
    if b < 2 or max_seq and (s < 2 or s > max_seq):
        raise InstatuneError(
            f"example shape {example_shape} must have batch >= 2 and 2 <= sequence <= {max_seq}")
    ex = fam.random_batch(model, b, s, seed=0)
    args = tuple(ex[n] for n in names)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    external = 4 * n_params > EXTERNAL_DATA_BYTES
    wrapped = fam.graph_module(model, names)

    used, fallback = exporter, None
    t0 = time.perf_counter()
    with torch.no_grad(), _attention(model, "eager" if optimize else None):
        if exporter == "dynamo":
            try:
                _export_dynamo(wrapped, args, names, out, opset, max_seq, external)
            except Exception as e:  # noqa: BLE001 - any exporter failure: record it and use the other exporter
                fallback = f"dynamo export failed ({type(e).__name__}: {_first_line(e)[:300]})"
                used = "torchscript"
        if used == "torchscript":
            if external:
                raise InstatuneError(
                    "the TorchScript exporter cannot write graphs over 2 GB and the dynamo export failed: "
                    + (fallback or ""))
            _export_torchscript(wrapped, args, names, out, opset, max_seq)
    seconds = time.perf_counter() - t0
    meta = {"model_type": cfg.model_type, "num_labels": int(cfg.num_labels), "inputs": ",".join(names),
            "exporter": used}
    if max_seq:  # what the latency probe needs to make token feeds (measure/latency.py)
        dims = fam.dims_of(model)
        meta.update(vocab_size=dims.vocab_size, type_vocab_size=dims.type_vocab_size, max_sequence_length=max_seq)
    else:
        meta["input_shape"] = ",".join(str(d) for d in ex[names[0]].shape[1:])
    _write_metadata(out, meta, external)
    optimization = fam.optimize_onnx(out) if optimize else {"applied": False, "reason": "optimize=False"}
    if optimization is None:
        optimization = {"applied": False, "reason": f"the {fam.family} family has no graph fusions"}
    import onnx

    opset_used = next((o.version for o in onnx.load(str(out), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), opset)
    return {
        "onnx_path": str(out),
        "exporter": used,
        "exporter_requested": exporter,
        "fallback_reason": fallback,
        "opset": int(opset_used),
        "inputs": names,
        "outputs": ["logits"],
        "dynamic_axes": {"batch": 0, "sequence": 1} if max_seq else {"batch": 0},
        "max_sequence_length": max_seq or None,
        "external_data": external,
        "bytes": onnx_bytes(out),
        "params": n_params,
        "export_seconds": round(seconds, 3),
        "optimization": optimization,
    }


def check_parity(onnx_path: str | Path, model: Any, batches: Sequence[dict[str, Any]],
                 atol: float = 1e-4, session: Any = None) -> dict[str, Any]:
    """Compare ORT logits with PyTorch logits on the given (real) batches; raise InstatuneError past `atol`.

    `model` is a loaded classifier or a model directory. Batches are dicts of tensors/arrays as a tokenizer
    returns them; keys the graph does not take are ignored, graph inputs missing from a batch are an error.
    """
    import numpy as np
    import torch

    if not batches:
        raise InstatuneError("check_parity needs at least one batch of inputs")
    model = _as_model(model)
    fam = adapter_of(model)
    sess = session if session is not None else ort_session(onnx_path)
    graph_inputs = [i.name for i in sess.get_inputs()]
    worst, per_batch, shapes = 0.0, [], []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            missing = [n for n in graph_inputs if n not in batch]
            if missing:
                raise InstatuneError(f"parity batch lacks graph inputs {missing}; give {graph_inputs}")
            feeds = {n: ort_feed(batch[n]) for n in graph_inputs}
            (ort_logits,) = sess.run(["logits"], feeds)
            with torch.no_grad():
                ref = fam.logits(model, {n: torch.as_tensor(v) for n, v in feeds.items()}).float().cpu().numpy()
            if ort_logits.shape != ref.shape:
                raise InstatuneError(f"ONNX logits have shape {ort_logits.shape}, PyTorch {ref.shape}")
            d = float(np.abs(ort_logits - ref).max())
            per_batch.append(d)
            shapes.append(list(feeds[graph_inputs[0]].shape))
            worst = max(worst, d)
    finally:
        model.train(was_training)
    if not worst <= atol:
        raise InstatuneError(
            f"ONNX model {onnx_path} disagrees with PyTorch: max |Δlogit| {worst:.3g} > {atol:g} "
            f"on shapes {shapes}"
        )
    return {"max_abs_diff": worst, "per_batch": per_batch, "shapes": shapes, "atol": atol}


def quantize_dynamic_int8(onnx_in: str | Path, onnx_out: str | Path, per_channel: bool = False,
                          nodes_to_exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """INT8 weights with dynamic activation quantization (ORT `quantize_dynamic`, MatMul/Gemm/... ops).

    The interim INT8 path until a calibrated static one exists; the caller says which was used. Metadata
    of the input graph is kept.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic


    src, dst = Path(onnx_in), Path(onnx_out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" warning on the root logger every call
    try:
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(nodes_to_exclude or []))
    finally:
        root.setLevel(level)
    seconds = time.perf_counter() - t0
    meta = read_metadata(src)
    if meta:
        m = onnx.load(str(dst))
        have = {p.key for p in m.metadata_props}
        for k, v in meta.items():
            if META_PREFIX + k not in have:
                m.metadata_props.add(key=META_PREFIX + k, value=v)
        m.metadata_props.add(key=META_PREFIX + "quantization", value="ort-dynamic-int8")
        onnx.save(m, str(dst))
    return {
        "onnx_path": str(dst),
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "activations": "dynamic (per batch, uint8)",
        "per_channel": per_channel,
        "nodes_excluded": list(nodes_to_exclude or []),
        "bytes_in": onnx_bytes(src),
        "bytes_out": onnx_bytes(dst),
        "seconds": round(seconds, 3),
    }
